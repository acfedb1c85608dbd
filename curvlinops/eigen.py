r"""Extreme eigenpairs of symmetric operators, on the operator's device.

:func:`eigsh` runs a thick-restarted block Lanczos (block Krylov-Schur) iteration:

1. Expand an orthonormal basis :math:`\mathbf{Q}` block by block: each step multiplies the
   newest block of :math:`p` columns with :math:`\mathbf{A}` (one product; ``block_size``
   :math:`p = 1` by default, which needed the fewest products in our benchmark) and
   orthogonalises the result against the basis twice (full re-orthogonalisation), until the
   basis has ``ncv`` columns. The products :math:`\mathbf{W} = \mathbf{A}\mathbf{Q}` are kept.
2. Rayleigh-Ritz: :math:`\mathbf{Q}^\top\mathbf{W} = \mathbf{Y}\boldsymbol{\Theta}
   \mathbf{Y}^\top`; the wanted Ritz pairs :math:`(\theta_i, \mathbf{Q}\mathbf{y}_i)` have
   residuals :math:`\|\mathbf{W}\mathbf{y}_i - \theta_i\mathbf{Q}\mathbf{y}_i\|` at no extra
   product. Stop when all ``k`` are below ``tol`` times the largest :math:`|\theta|`.
3. Restart: keep the best ``k + p`` Ritz vectors (and their products), continue with the
   dominant directions of their residuals, which span the next Krylov block.

Everything stays in PyTorch on ``A.device`` (no host round trip per product, unlike ARPACK
through ``A.to_scipy()``); the only host synchronisation per restart is the convergence test.
"""

import warnings
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor
from tqdm import tqdm

from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.utils import assert_is_square

_WHICH = ("LA", "SA", "LM")


def _normalize_rows(block: Tensor) -> Tuple[Tensor, Tensor]:
    """Orthonormal rows spanning ``block``'s rows and the triangular factor ``R``.

    ``block.T = Q R``. Cholesky QR (a small Gram matrix instead of a tall QR) unless the
    block is close to rank-deficient, then Householder QR, dropping vanished directions.
    """
    L, info = torch.linalg.cholesky_ex(block @ block.T)
    diagonal = L.diagonal().abs()
    if info.item() == 0 and diagonal.min() > 1e-4 * diagonal.max():
        return torch.linalg.solve_triangular(L, block, upper=False), L.T
    Q, R = torch.linalg.qr(block.T)
    diagonal = R.diagonal().abs()
    keep = diagonal > 1e2 * torch.finfo(block.dtype).eps * diagonal.max()
    return Q[:, keep].T.contiguous(), R


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of Ritz values from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def eigsh(
    A: PyTorchLinearOperator,
    k: int = 6,
    which: str = "LA",
    tol: float = 1e-6,
    max_iter: int = 100,
    block_size: Optional[int] = None,
    ncv: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_eigenvectors: bool = True,
    list_format: bool = False,
    progressbar: bool = False,
) -> Union[Tensor, Tuple[Tensor, Union[Tensor, List[Tensor]]]]:
    """Compute ``k`` extreme eigenpairs of a symmetric operator by restarted block Lanczos.

    Args:
        A: A symmetric ``PyTorchLinearOperator`` (or a symmetric 2-d tensor).
        k: Number of eigenpairs.
        which: ``"LA"`` (largest algebraic), ``"SA"`` (smallest algebraic) or ``"LM"``
            (largest magnitude).
        tol: Relative residual tolerance: stop once every wanted pair has
            ``||A x - theta x|| <= tol * max |theta|``.
        max_iter: Most restarts.
        block_size: Columns ``p`` per product. The default 1 (thick-restart Lanczos) needs
            the fewest products; a larger block multiplies ``p`` columns at once, which pays
            when multi-column products are much cheaper per column (e.g. on a GPU) and is
            needed to resolve eigenvalues of multiplicity above 1.
        ncv: Basis size before a restart (default ``max(2 k + 4 p, 20)``, capped at the
            dimension).
        generator: Random number generator for the start block (global one if ``None``).
        return_eigenvectors: Also return the eigenvectors.
        list_format: Return the eigenvectors as a list shaped like ``A``'s input space
            (columns last) instead of a ``[D, k]`` matrix.
        progressbar: Show a progress bar over restarts.

    Returns:
        The eigenvalues ``[k]`` in ascending order and, if requested, the eigenvectors
        (column ``i`` belongs to eigenvalue ``i``).

    Raises:
        ValueError: If ``A`` is not square, ``k`` is not in ``[1, D)``, or ``which`` is
            unknown.
    """
    dim = assert_is_square(A)
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}.")
    if not isinstance(k, int) or not 1 <= k < dim:
        raise ValueError(f"k must be an integer in [1, {dim}) for a {dim}x{dim} operator, got {k}.")
    p = block_size or 1
    m = min(dim, ncv or max(2 * k + 4 * p, 20))
    if m < k + p:
        raise ValueError(f"ncv ({m}) must be at least k + block_size ({k + p}).")
    dtype, device = A.dtype, A.device

    start = torch.randn(p, dim, dtype=dtype, device=device, generator=generator)
    block, _ = _normalize_rows(start)
    # basis vectors as rows of a preallocated buffer; H = Q A Q^T is filled as we go
    Q_buffer = torch.empty(m, dim, dtype=dtype, device=device)
    H = torch.zeros(m, m, dtype=dtype, device=device)
    size = 0
    bar = tqdm(range(max_iter), desc="eigsh (restarts)", disable=not progressbar)
    converged = False
    worst = float("inf")
    for _ in bar:
        while block.shape[0] > 0 and size + block.shape[0] <= m:
            start_row, size = size, size + block.shape[0]
            Q_buffer[start_row:size] = block
            Q = Q_buffer[:size]
            AB = (A @ block.T).T
            # the projection coefficients of A b onto the basis are H's new columns
            coefficients = AB @ Q.T
            H[start_row:size, :size] = coefficients
            H[:start_row, start_row:size] = coefficients[:, :start_row].T
            F = AB - coefficients @ Q
            # second Gram-Schmidt pass only after cancellation (Daniel-Gragg-Kaufman-Stewart)
            if (F.norm(dim=1) < 0.7071 * AB.norm(dim=1)).any():
                F = F - (F @ Q.T) @ Q
            block, R_last = _normalize_rows(F)
            block = block[:p]
            if block.shape[0] == 0 and size < dim:
                # The basis spans an invariant subspace (e.g. a zero or low-rank operator):
                # continue with a random direction orthogonal to it.
                fresh = torch.randn(1, dim, dtype=dtype, device=device, generator=generator)
                for _ in range(2):
                    fresh = fresh - (fresh @ Q.T) @ Q
                block, _ = _normalize_rows(fresh)
            if size <= k:
                continue
            # Krylov relation A Q^T = Q^T H + F^T E_last: a Ritz pair's residual is F's part
            theta, Y = torch.linalg.eigh(H[:size, :size])
            order = _order(theta, which)
            wanted = order[:k]
            residuals = (R_last @ Y[start_row:size, wanted]).norm(dim=0)
            scale = theta.abs().max().clamp_min(torch.finfo(dtype).tiny)
            worst = (residuals / scale).max().item()
            if worst <= tol or size >= dim or block.shape[0] == 0:
                converged = True
                break
        bar.set_postfix(residual=f"{worst:.1e}")
        if converged or size <= k:
            break
        # thick restart: keep the best Ritz vectors; the next Krylov block is unchanged
        keep = order[: min(k + p, m - p)]
        Q_buffer[: len(keep)] = Y[:, keep].T @ Q_buffer[:size]
        size = len(keep)
        H.zero_()
        H[:size, :size] = torch.diag(theta[keep])
    if not converged:
        warnings.warn(
            f"eigsh did not converge in {max_iter} restarts (largest relative residual "
            f"{worst:.1e} > tol {tol:.1e}); increase max_iter or ncv.",
            RuntimeWarning,
            stacklevel=2,
        )
    ascending = torch.argsort(theta[wanted])
    evals = theta[wanted][ascending]
    if not return_eigenvectors:
        return evals
    if converged:
        evecs = (Y[:, wanted[ascending]].T @ Q_buffer[:size]).T
    else:  # stopped right after a restart: the wanted Ritz vectors lead the basis
        evecs = Q_buffer[:k][ascending].T
    if list_format:
        sizes = [s.numel() for s in A._in_shape] if hasattr(A, "_in_shape") else [dim]
        shapes = A._in_shape if hasattr(A, "_in_shape") else [torch.Size([dim])]
        evecs = [block_.reshape(*shape, k) for block_, shape in zip(evecs.split(sizes), shapes)]
    return evals, evecs
