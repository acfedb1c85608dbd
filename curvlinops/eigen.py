r"""Extreme eigenpairs of symmetric operators, on the operator's device.

:func:`eigsh` runs a thick-restarted block Lanczos (block Krylov-Schur) iteration:

1. Expand an orthonormal basis :math:`\mathbf{Q}` block by block: each step multiplies the
   newest block of :math:`p` columns with :math:`\mathbf{A}` (one product; ``block_size``
   :math:`p = 1` by default) and orthogonalises the result against the basis twice (full
   re-orthogonalisation), until the basis has ``ncv`` columns. The products
   :math:`\mathbf{W} = \mathbf{A}\mathbf{Q}` are kept.
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
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor
from tqdm import tqdm

from curvlinops._checks import check_generator, check_int, check_number
from curvlinops._distributed import shared_draw
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.utils import assert_is_square

_WHICH = ("LA", "SA", "LM")


def _normalize_rows(block: Tensor, floor: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Orthonormal rows spanning ``block``'s rows and the triangular factor ``R``.

    ``block.T = Q R``. Cholesky QR (a small Gram matrix instead of a tall QR) unless the
    block is close to rank-deficient, then Householder QR, dropping vanished directions:
    those below ``1e2`` machine epsilons of the largest one, or not above ``floor``.

    The rows are returned contiguous, so that ``A @ rows.T`` multiplies columns that are
    contiguous in memory and returns its product in that layout (no transposing copies,
    see :meth:`~curvlinops._torch_base.PyTorchLinearOperator.__matmul__`).
    """
    L, info = torch.linalg.cholesky_ex(block @ block.T)
    diagonal = L.diagonal().abs()
    if info.item() == 0 and diagonal.min() > max(1e-4 * diagonal.max(), floor):
        # L^{-1} block as the transpose of block^T L^{-T}: the same substitutions, but
        # LAPACK's column-major result then has contiguous rows
        rows = torch.linalg.solve_triangular(L.T, block.T, upper=True, left=False).T
        return rows, L.T
    Q, R = torch.linalg.qr(block.T)
    diagonal = R.diagonal().abs()
    keep = (diagonal > 1e2 * torch.finfo(block.dtype).eps * diagonal.max()) & (diagonal > floor)
    return Q.T[keep], R


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of Ritz values from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


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

    Stages: check the arguments, run the restarted Lanczos iteration (steps 1 to 3 of the
    module docstring), search for missed copies of repeated eigenvalues (step 4), and shape
    the eigenvectors.

    Args:
        A: A symmetric ``PyTorchLinearOperator`` (or a symmetric 2-d tensor).
        k: Number of eigenpairs.
        which: ``"LA"`` (largest algebraic), ``"SA"`` (smallest algebraic) or ``"LM"``
            (largest magnitude).
        tol: Relative residual tolerance (>= 0; 0 means machine precision): stop once
            every wanted pair has ``||A x - theta x|| <= tol * max |theta|``.
        max_iter: Most restarts (an integer >= 1).
        block_size: Columns ``p`` per product, an integer in ``[1, D - k]``. The default 1
            is thick-restart Lanczos; a larger block multiplies ``p`` columns in one product
            and finds repeated eigenvalues (multiplicity up to ``p``) without the extra
            search of step 4.
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
    p = _check_eigsh_arguments(dim, k, which, tol, max_iter, block_size, ncv, generator)
    evals, evecs, converged, certified, a_norm = _lanczos(
        A, dim, k, which, tol, max_iter, p, ncv, generator, progressbar
    )
    if converged and not certified:
        evals, evecs = _find_missed_copies(
            A, dim, evals, evecs, which, tol, max_iter, ncv, generator, a_norm
        )
    if not return_eigenvectors:
        return evals
    return evals, _in_list_format(A, evecs) if list_format else evecs


def _check_eigsh_arguments(
    dim: int,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    block_size: Optional[int],
    ncv: Optional[int],
    generator: Optional[torch.Generator],
) -> int:
    """Check :func:`eigsh`'s arguments for a ``dim x dim`` operator; return the block size.

    All checks run before the first product, so a wrong argument costs nothing.
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}.")
    check_int("k", k, 1, dim - 1, bounds=f"in [1, {dim})", note=f" for a {dim}x{dim} operator")
    check_int("max_iter", max_iter, 1, note=" (number of restarts)")
    check_number("tol", tol, 0, note=" (0 means machine precision)")
    check_int(
        "block_size",
        block_size,
        1,
        dim - k,
        optional=True,
        note=f" (at least 1 and at most the dimension {dim} minus k = {k})",
    )
    p = 1 if block_size is None else block_size
    check_int(
        "ncv",
        ncv,
        k + p,
        optional=True,
        bounds=f">= k + block_size = {k + p}",
        note=f" (values above the dimension {dim} are capped)",
    )
    check_generator(generator)
    return p


def _in_list_format(A: PyTorchLinearOperator, evecs: Tensor) -> List[Tensor]:
    """Split the ``[D, k]`` eigenvectors into ``A``'s input shapes (columns last).

    A plain tensor ``A`` has one flat input space of ``D`` entries.
    """
    shapes = A._in_shape if hasattr(A, "_in_shape") else [torch.Size([evecs.shape[0]])]
    sizes = [shape.numel() for shape in shapes]
    k = evecs.shape[1]
    return [block.reshape(*shape, k) for block, shape in zip(evecs.split(sizes), shapes)]


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

    Each restart grows the basis until it is full or the wanted pairs converge (steps 1 and
    2 of the module docstring), then keeps the best Ritz vectors (step 3).

    Returns:
        The ``k`` wanted eigenvalues (ascending), their eigenvectors ``[D, k]``, whether
        the iteration converged, whether the basis spanned the whole space (then the result
        is exact and complete), and a lower bound of ``||A||_2`` (at least ``norm_floor``,
        which also bounds the tolerances' scale from below).
    """
    run = _BlockLanczos(A, dim, k, which, tol, p, ncv, generator, norm_floor)
    bar = tqdm(range(max_iter), desc="eigsh (restarts)", disable=not progressbar)
    for _ in bar:
        run.grow_basis()
        bar.set_postfix(residual=f"{run.worst:.1e}")
        if run.converged or run.size <= k:
            break
        run.restart()
    if not run.converged:
        warnings.warn(
            f"eigsh did not converge in {max_iter} restarts (largest relative residual "
            f"{run.worst:.1e}, tol {run.tol:.1e}"
            + (
                "; after an exhausted Krylov space the search for further copies of wanted "
                "eigenvalues must converge too"
                if run.fresh_start is not None
                else ""
            )
            + "); the returned pairs are Ritz approximations. Increase max_iter or ncv.",
            RuntimeWarning,
            stacklevel=3,
        )
    evals, evecs = run.wanted_pairs()
    return evals, evecs, run.converged, run.converged and run.size >= dim, run.a_norm


class _BlockLanczos:
    """State of the thick-restarted block Lanczos iteration of :func:`_lanczos`.

    The orthonormal basis vectors are the rows ``Q_buffer[:size]`` of a preallocated buffer;
    ``H = Q A Q^T`` is filled as the basis grows (the Krylov relation is
    ``A Q^T = Q^T H + F^T E_last`` with ``F`` the newest residual block); ``block`` holds the
    rows to add next. After an exhausted Krylov space (an invariant subspace), ``fresh_start``
    is the first row of the newest run, started from random directions: the rows before it
    have exact Ritz pairs but only one direction per distinct eigenvalue, so further copies of
    a wanted eigenvalue can only show up in the new run, which therefore must converge too.
    """

    def __init__(self, A, dim, k, which, tol, p, ncv, generator, norm_floor):
        """Draw the start block and allocate the basis (the first random draw of the run)."""
        self.A, self.dim, self.k, self.which, self.p = A, dim, k, which, p
        self.generator, self.norm_floor = generator, norm_floor
        self.m = min(dim, ncv or max(2 * k + 4 * p, 20))
        self.dtype, self.device = A.dtype, A.device
        self.tol = torch.finfo(self.dtype).eps if tol == 0 else tol
        start = torch.randn(p, dim, dtype=self.dtype, device=self.device, generator=generator)
        start = shared_draw(A, start)  # data-parallel operators: the same start on every rank
        self.block, _ = _normalize_rows(start)
        self.Q_buffer = torch.empty(self.m, dim, dtype=self.dtype, device=self.device)
        self.H = torch.zeros(self.m, self.m, dtype=self.dtype, device=self.device)
        self.size = 0
        self.fresh_start: Optional[int] = None
        self.a_norm = norm_floor  # running lower bound of ||A||_2 from the products so far
        # relative size of F below which the basis counts as an invariant subspace; below the
        # tolerance so that the neglected part does not spoil the residual estimates
        self.exhausted = min(max(0.1 * self.tol, 1e4 * torch.finfo(self.dtype).eps), 1e-3)
        self.converged = False
        self.worst = inf  # largest relative residual of the last convergence test
        # Ritz values, their coefficients, their order (most wanted first), the k wanted
        self.theta = self.Y = self.order = self.wanted = None

    def grow_basis(self):
        """Add blocks until the basis is full or the test after a product says stop."""
        while self.block.shape[0] > 0 and self.size + self.block.shape[0] <= self.m:
            start_row, R_last = self._multiply_newest_block()
            completed_start = self._continue_after_invariant_subspace()
            if self.size > self.k and self._ritz_test(start_row, R_last, completed_start):
                self.converged = True
                return

    def _multiply_newest_block(self) -> Tuple[int, Tensor]:
        """Append ``block`` to the basis, multiply it with ``A`` once and fill ``H``.

        The product's part orthogonal to the basis (twice Gram-Schmidt only after
        cancellation, Daniel-Gragg-Kaufman-Stewart) gives the next block. Directions of it far
        below ``A``'s products are round-off noise (an exhausted Krylov space leaves about
        ``1e3 eps ||A||``) and are dropped: the basis then spans an invariant subspace.
        Continuing with that noise as if it were a Krylov direction would hide the end of the
        subspace and stop with its exact but incomplete Ritz values (e.g. one zero of a
        low-rank operator instead of ``k``).

        Returns:
            The first basis row of the block and the triangular factor ``R_last`` of the
            residual block ``F = R_last^T next_block``.
        """
        start_row, size = self.size, self.size + self.block.shape[0]
        self.size = size
        self.Q_buffer[start_row:size] = self.block
        Q = self.Q_buffer[:size]
        AB = (self.A @ self.block.T).T
        # the projection coefficients of A b onto the basis are H's new columns
        coefficients = AB @ Q.T
        self.H[start_row:size, :size] = coefficients
        self.H[:start_row, start_row:size] = coefficients[:, :start_row].T
        F = AB - coefficients @ Q
        if (F.norm(dim=1) < 0.7071 * AB.norm(dim=1)).any():
            F = F - (F @ Q.T) @ Q
        self.a_norm = max(self.a_norm, AB.norm(dim=1).max().item())
        block, R_last = _normalize_rows(F, floor=self.exhausted * self.a_norm)
        self.block = block[: self.p]
        return start_row, R_last

    def _continue_after_invariant_subspace(self) -> Optional[int]:
        """Continue with random directions orthogonal to an invariant subspace, if reached.

        An invariant subspace (e.g. of a zero or low-rank operator, or with repeated
        eigenvalues) leaves no next block although the basis is not the whole space.

        Returns:
            The first row of the run that just ended in the invariant subspace, or ``None``.
        """
        if self.block.shape[0] > 0 or self.size >= self.dim:
            return None
        Q = self.Q_buffer[: self.size]
        fresh = torch.randn(
            min(self.p, self.dim - self.size),
            self.dim,
            dtype=self.dtype,
            device=self.device,
            generator=self.generator,
        )
        fresh = shared_draw(self.A, fresh)
        for _ in range(2):
            fresh = fresh - (fresh @ Q.T) @ Q
        self.block, _ = _normalize_rows(fresh)
        completed_start = 0 if self.fresh_start is None else self.fresh_start
        self.fresh_start = self.size
        return completed_start

    def _ritz_test(self, start_row: int, R_last: Tensor, completed_start: Optional[int]) -> bool:
        """Rayleigh-Ritz on the basis and the convergence test; whether to stop.

        By the Krylov relation a Ritz pair's residual is the part ``R_last^T y_last`` of the
        residual block (``y_last`` the pair's coefficients of the newest block), so the test
        costs no product. After an invariant subspace, the newest run must converge too (its
        most wanted Ritz value is where further copies of wanted eigenvalues would show up).
        When a run has just ended in an invariant subspace, the rest of the space holds only
        eigenvalues that run has found (one direction per distinct eigenvalue): unless its
        best value is more wanted than the ``k``-th, none can enter the wanted set.
        """
        size, which = self.size, self.which
        theta, Y = torch.linalg.eigh(self.H[:size, :size])
        order = _order(theta, which)
        wanted = order[: self.k]
        self.theta, self.Y, self.order, self.wanted = theta, Y, order, wanted
        residuals = (R_last @ Y[start_row:size, wanted]).norm(dim=0)
        floor = max(torch.finfo(self.dtype).tiny, self.norm_floor)
        scale = theta.abs().max().clamp_min(floor)
        self.worst = (residuals / scale).max().item()
        complete = True
        if size < self.dim and completed_start is not None:
            best, _ = _best_ritz_pair(self.H, completed_start, size, which)
            kth = theta[wanted[-1]].item()
            complete = not _more_wanted(best.item(), kth, which, self.tol * scale.item())
        elif size < self.dim and self.fresh_start is not None:
            _, y = _best_ritz_pair(self.H, self.fresh_start, size, which)
            fresh_residual = (R_last @ y[start_row - self.fresh_start :]).norm() / scale
            self.worst = max(self.worst, fresh_residual.item())
        done = self.worst <= self.tol and complete
        return done or size >= self.dim or self.block.shape[0] == 0

    def restart(self):
        """Thick restart: keep the best ``k + p`` Ritz vectors; the next block is unchanged.

        The invariant subspace's vectors come first so that the newest run stays a contiguous
        block of rows.
        """
        keep = self.order[: min(self.k + self.p, self.m - self.p)]
        if self.fresh_start is not None:
            in_fresh = self.Y[self.fresh_start : self.size, keep].norm(dim=0) > 0.5
            keep = torch.cat([keep[~in_fresh], keep[in_fresh]])
            self.fresh_start = int((~in_fresh).sum().item())
        self.Q_buffer[: len(keep)] = self.Y[:, keep].T @ self.Q_buffer[: self.size]
        self.size = len(keep)
        self.H.zero_()
        self.H[: self.size, : self.size] = torch.diag(self.theta[keep])

    def wanted_pairs(self) -> Tuple[Tensor, Tensor]:
        """The ``k`` wanted Ritz pairs, eigenvalues ascending, eigenvectors ``[D, k]``.

        Without convergence the basis was just restarted: its (diagonal) Rayleigh quotient's
        pairs are recomputed first.
        """
        if not self.converged:
            self.theta, self.Y = torch.linalg.eigh(self.H[: self.size, : self.size])
            self.wanted = _order(self.theta, self.which)[: self.k]
        theta, wanted = self.theta, self.wanted
        ascending = torch.argsort(theta[wanted])
        evecs = (self.Y[:, wanted[ascending]].T @ self.Q_buffer[: self.size]).T
        return theta[wanted][ascending], evecs
