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
4. Repeated eigenvalues: a Krylov space of one start vector holds only one direction per
   distinct eigenvalue, so Lanczos alone can return a converged but incomplete answer (one
   zero of a low-rank GGN instead of ``k``). When the Krylov space is exhausted (an
   invariant subspace), the iteration continues from random directions orthogonal to it;
   and after convergence a second Lanczos search looks for the most wanted eigenvalue on
   the complement of the ``k`` found eigenvectors, swapping it in while it beats the least
   wanted one (one more run, plus one per missed copy). The result is complete up to the
   usual Krylov caveat (a start vector without a component along an eigenvector).

Everything stays in PyTorch on ``A.device`` (no host round trip per product, unlike ARPACK
through ``A.to_scipy()``); the only host synchronisation per restart is the convergence test.
"""

import warnings
from math import inf
from numbers import Integral, Real
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor
from tqdm import tqdm

from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.utils import assert_is_square

_WHICH = ("LA", "SA", "LM")


def _normalize_rows(block: Tensor, floor: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Orthonormal rows spanning ``block``'s rows and the triangular factor ``R``.

    ``block.T = Q R``. Cholesky QR (a small Gram matrix instead of a tall QR) unless the
    block is close to rank-deficient, then Householder QR, dropping vanished directions:
    those below ``1e2`` machine epsilons of the largest one, or not above ``floor``.
    """
    L, info = torch.linalg.cholesky_ex(block @ block.T)
    diagonal = L.diagonal().abs()
    if info.item() == 0 and diagonal.min() > max(1e-4 * diagonal.max(), floor):
        return torch.linalg.solve_triangular(L, block, upper=False), L.T
    Q, R = torch.linalg.qr(block.T)
    diagonal = R.diagonal().abs()
    keep = (diagonal > 1e2 * torch.finfo(block.dtype).eps * diagonal.max()) & (diagonal > floor)
    return Q[:, keep].T.contiguous(), R


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of Ritz values from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _is_int(value) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), but not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _best_ritz_pair(H: Tensor, run_start: int, size: int, which: str) -> Tuple[Tensor, Tensor]:
    """Most wanted Ritz value of the run in rows ``run_start:size`` and its coefficients.

    After an exhausted Krylov space, the rows of a new run are (in exact arithmetic)
    decoupled from the invariant subspace before them, so the run's Ritz pairs come from its
    own diagonal block of ``H``.
    """
    theta, Y = torch.linalg.eigh(H[run_start:size, run_start:size])
    best = _order(theta, which)[0]
    return theta[best], Y[:, best]


def _more_wanted(a: float, b: float, which: str, slack: float) -> bool:
    """Whether the value ``a`` is more wanted than ``b`` by more than ``slack``."""
    if which == "LA":
        return a > b + slack
    if which == "SA":
        return a < b - slack
    return abs(a) > abs(b) + slack


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
        tol: Relative residual tolerance (>= 0; 0 means machine precision): stop once
            every wanted pair has ``||A x - theta x|| <= tol * max |theta|``.
        max_iter: Most restarts (an integer >= 1).
        block_size: Columns ``p`` per product, an integer in ``[1, D - k]``. The default 1
            (thick-restart Lanczos) needs the fewest products; a larger block multiplies
            ``p`` columns at once, which pays when multi-column products are much cheaper
            per column (e.g. on a GPU) and finds repeated eigenvalues (multiplicity up to
            ``p``) without the extra search of step 4.
        ncv: Basis size before a restart, an integer of at least ``k + p`` (default
            ``max(2 k + 4 p, 20)``, capped at the dimension).
        generator: Random number generator for the start block (global one if ``None``).
        return_eigenvectors: Also return the eigenvectors.
        list_format: Return the eigenvectors as a list shaped like ``A``'s input space
            (columns last) instead of a ``[D, k]`` matrix.
        progressbar: Show a progress bar over restarts.

    Returns:
        The eigenvalues ``[k]`` in ascending order and, if requested, the eigenvectors
        (column ``i`` belongs to eigenvalue ``i``).

    Raises:
        ValueError: If ``A`` is not square, ``which`` is unknown, or ``k``, ``max_iter``,
            ``tol``, ``block_size``, ``ncv`` or ``generator`` is outside its range (each
            message names the argument and the range).

    Warns:
        RuntimeWarning: If the iteration (or the search for repeated eigenvalues) did not
            converge within ``max_iter`` restarts; the returned pairs are then the best
            Ritz approximations, not eigenpairs to ``tol``.
    """
    dim = assert_is_square(A)
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}.")
    if not _is_int(k) or not 1 <= k < dim:
        raise ValueError(f"k must be an integer in [1, {dim}) for a {dim}x{dim} operator, got {k}.")
    if not _is_int(max_iter) or max_iter < 1:
        raise ValueError(
            f"max_iter must be an integer >= 1 (number of restarts), got {max_iter!r}."
        )
    if isinstance(tol, bool) or not isinstance(tol, Real) or not 0 <= tol < inf:
        raise ValueError(
            f"tol must be a finite number >= 0 (0 means machine precision), got {tol!r}."
        )
    if block_size is not None and (not _is_int(block_size) or not 1 <= block_size <= dim - k):
        raise ValueError(
            f"block_size must be None or an integer in [1, {dim - k}] (at least 1 and at most "
            f"the dimension {dim} minus k = {k}), got {block_size!r}."
        )
    p = 1 if block_size is None else block_size
    if ncv is not None and (not _is_int(ncv) or ncv < k + p):
        raise ValueError(
            f"ncv must be None or an integer >= k + block_size = {k + p} (values above the "
            f"dimension {dim} are capped), got {ncv!r}."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator)}.")
    evals, evecs, converged, certified, a_norm = _lanczos(
        A, dim, k, which, tol, max_iter, p, ncv, generator, progressbar
    )
    if converged and not certified:
        evals, evecs = _find_missed_copies(
            A, dim, evals, evecs, which, tol, max_iter, ncv, generator, a_norm
        )
    if not return_eigenvectors:
        return evals
    if list_format:
        sizes = [s.numel() for s in A._in_shape] if hasattr(A, "_in_shape") else [dim]
        shapes = A._in_shape if hasattr(A, "_in_shape") else [torch.Size([dim])]
        evecs = [block_.reshape(*shape, k) for block_, shape in zip(evecs.split(sizes), shapes)]
    return evals, evecs


class _Deflated:
    """``A`` on the complement of the orthonormal columns ``X``, shifted away on ``X``.

    ``(I - X X^T) A (I - X X^T) + shift X X^T``: on the complement it acts like ``A``; the
    directions of ``X`` get the least wanted value ``shift``, so a search for the most
    wanted eigenvalue never returns them again (even after round-off leaks into them).
    """

    def __init__(self, A, X: Tensor, shift: float):
        self._A, self._X, self._shift = A, X, shift
        self.shape, self.dtype, self.device = (X.shape[0], X.shape[0]), X.dtype, X.device

    def __matmul__(self, V: Tensor) -> Tensor:
        coefficients = self._X.T @ V
        projected = V - self._X @ coefficients
        AV = self._A @ projected
        return AV - self._X @ (self._X.T @ AV) + self._shift * (self._X @ coefficients)


def _find_missed_copies(
    A,
    dim: int,
    evals: Tensor,
    evecs: Tensor,
    which: str,
    tol: float,
    max_iter: int,
    ncv: Optional[int],
    generator: Optional[torch.Generator],
    a_norm: float,
) -> Tuple[Tensor, Tensor]:
    """Search the complement of the found eigenvectors for a more wanted eigenvalue.

    A Krylov space of one start vector holds one direction per distinct eigenvalue (in
    exact arithmetic), so Lanczos finds further copies of a repeated eigenvalue (e.g. the
    null space of a low-rank GGN) only by round-off or not at all, and its converged but
    incomplete answer looks fine. Hence a second search for the single most wanted
    eigenvalue of ``A`` restricted to the complement of the ``k`` found eigenvectors: while
    it beats the least wanted of them, it replaces it (one more copy found) and the search
    repeats. Costs roughly one more Lanczos run, plus one per missed copy.
    """
    k = evals.numel()
    for _ in range(dim - k):
        scale = evals.abs().max().item()
        # a value less wanted than every found one, for the directions already found
        shift = {
            "LA": evals.min().item() - scale - 1.0,
            "SA": evals.max().item() + scale + 1.0,
        }.get(which, 0.0)
        deflated = _Deflated(A, evecs, shift)
        # tolerances relative to ||A||, not to the deflated operator (e.g. zero)
        value, vector, converged, _, _ = _lanczos(
            deflated, dim, 1, which, tol, max_iter, 1, ncv, generator, False, a_norm
        )
        order = _order(evals, which)
        least = order[-1]
        # round-off of the shifted directions leaking into the search is no improvement
        eps = torch.finfo(evals.dtype).eps
        slack = max(tol * max(scale, abs(value.item()), a_norm), 1e2 * eps * (abs(shift) + a_norm))
        if not converged or not _more_wanted(value.item(), evals[least].item(), which, slack):
            break
        evals, evecs = evals.clone(), evecs.clone()
        evals[least], evecs[:, least] = value[0], vector[:, 0]
        ascending = torch.argsort(evals)
        evals, evecs = evals[ascending], evecs[:, ascending]
    return evals, evecs


def _lanczos(
    A,
    dim: int,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    p: int,
    ncv: Optional[int],
    generator: Optional[torch.Generator],
    progressbar: bool,
    norm_floor: float = 0.0,
) -> Tuple[Tensor, Tensor, bool, bool, float]:
    """The restarted block Lanczos iteration behind :func:`eigsh` (arguments checked).

    Returns:
        The ``k`` wanted eigenvalues (ascending), their eigenvectors ``[D, k]``, whether
        the iteration converged, whether the basis spanned the whole space (then the result
        is exact and complete), and a lower bound of ``||A||_2`` (at least ``norm_floor``,
        which also bounds the tolerances' scale from below).
    """
    m = min(dim, ncv or max(2 * k + 4 * p, 20))
    dtype, device = A.dtype, A.device
    if tol == 0:
        tol = torch.finfo(dtype).eps

    start = torch.randn(p, dim, dtype=dtype, device=device, generator=generator)
    block, _ = _normalize_rows(start)
    # basis vectors as rows of a preallocated buffer; H = Q A Q^T is filled as we go
    Q_buffer = torch.empty(m, dim, dtype=dtype, device=device)
    H = torch.zeros(m, m, dtype=dtype, device=device)
    size = 0
    # First basis row of the newest Lanczos run after an exhausted Krylov space (None: none
    # so far). The rows before it span an invariant subspace: their Ritz pairs are exact, but
    # they hold only one direction per distinct eigenvalue, so further copies of a wanted
    # eigenvalue can only show up in the new run, which therefore must converge as well.
    fresh_start: Optional[int] = None
    a_norm = norm_floor  # running lower bound of ||A||_2 from the products so far
    # relative size of F below which the basis counts as an invariant subspace; below the
    # tolerance so that the neglected part does not spoil the residual estimates
    exhausted = min(max(0.1 * tol, 1e4 * torch.finfo(dtype).eps), 1e-3)
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
            # Directions of F far below A's products are round-off noise (an exhausted
            # Krylov space leaves about 1e3 eps ||A||): the basis then spans an invariant
            # subspace, treated below. Continuing with that noise as if it were a Krylov
            # direction would hide the end of the subspace and stop with its exact but
            # incomplete Ritz values (e.g. one zero of a low-rank operator instead of k).
            a_norm = max(a_norm, AB.norm(dim=1).max().item())
            block, R_last = _normalize_rows(F, floor=exhausted * a_norm)
            block = block[:p]
            completed_start = None  # first row of a run that ended with this product
            if block.shape[0] == 0 and size < dim:
                # The basis spans an invariant subspace (e.g. a zero or low-rank operator, or
                # repeated eigenvalues): continue with random directions orthogonal to it.
                fresh = torch.randn(
                    min(p, dim - size), dim, dtype=dtype, device=device, generator=generator
                )
                for _ in range(2):
                    fresh = fresh - (fresh @ Q.T) @ Q
                block, _ = _normalize_rows(fresh)
                completed_start = 0 if fresh_start is None else fresh_start
                fresh_start = size
            if size <= k:
                continue
            # Krylov relation A Q^T = Q^T H + F^T E_last: a Ritz pair's residual is F's part
            theta, Y = torch.linalg.eigh(H[:size, :size])
            order = _order(theta, which)
            wanted = order[:k]
            residuals = (R_last @ Y[start_row:size, wanted]).norm(dim=0)
            scale = theta.abs().max().clamp_min(max(torch.finfo(dtype).tiny, norm_floor))
            worst = (residuals / scale).max().item()
            complete = True
            if size < dim and completed_start is not None:
                # A run just ended in an invariant subspace. The rest of the space holds only
                # eigenvalues this run has found (one direction per distinct eigenvalue), so
                # unless its best value is more wanted than the k-th, none can enter the
                # wanted set; otherwise the new run must look for further copies.
                best, _ = _best_ritz_pair(H, completed_start, size, which)
                complete = not _more_wanted(
                    best.item(), theta[wanted[-1]].item(), which, tol * scale.item()
                )
            elif size < dim and fresh_start is not None:
                # the run after an invariant subspace must converge too: its most wanted
                # Ritz value is where further copies of wanted eigenvalues would show up
                _, y = _best_ritz_pair(H, fresh_start, size, which)
                fresh_residual = (R_last @ y[start_row - fresh_start :]).norm() / scale
                worst = max(worst, fresh_residual.item())
            if (worst <= tol and complete) or size >= dim or block.shape[0] == 0:
                converged = True
                break
        bar.set_postfix(residual=f"{worst:.1e}")
        if converged or size <= k:
            break
        # thick restart: keep the best Ritz vectors; the next Krylov block is unchanged
        keep = order[: min(k + p, m - p)]
        if fresh_start is not None:
            # keep the invariant subspace's vectors first so that the newest run stays a
            # contiguous block of rows
            in_fresh = Y[fresh_start:size, keep].norm(dim=0) > 0.5
            keep = torch.cat([keep[~in_fresh], keep[in_fresh]])
            fresh_start = int((~in_fresh).sum().item())
        Q_buffer[: len(keep)] = Y[:, keep].T @ Q_buffer[:size]
        size = len(keep)
        H.zero_()
        H[:size, :size] = torch.diag(theta[keep])
    certified = converged and size >= dim
    if not converged:
        warnings.warn(
            f"eigsh did not converge in {max_iter} restarts (largest relative residual "
            f"{worst:.1e}, tol {tol:.1e}"
            + (
                "; after an exhausted Krylov space the search for further copies of wanted "
                "eigenvalues must converge too"
                if fresh_start is not None
                else ""
            )
            + "); the returned pairs are Ritz approximations. Increase max_iter or ncv.",
            RuntimeWarning,
            stacklevel=3,
        )
        # the basis was just restarted: recompute its (diagonal) Rayleigh quotient's pairs
        theta, Y = torch.linalg.eigh(H[:size, :size])
        wanted = _order(theta, which)[:k]
    ascending = torch.argsort(theta[wanted])
    evals = theta[wanted][ascending]
    evecs = (Y[:, wanted[ascending]].T @ Q_buffer[:size]).T
    return evals, evecs, converged, certified, a_norm
