r"""Operators that approximate :math:`\mathbf{A}^{-1}` for a square operator :math:`\mathbf{A}`.

- :class:`CGInverseLinearOperator`: conjugate gradients for symmetric positive definite
  :math:`\mathbf{A}`, all right-hand sides at once, on :math:`\mathbf{A}`'s device.
- :class:`LSMRInverseLinearOperator`: SciPy's LSMR (least squares, any square
  :math:`\mathbf{A}`), column by column on the host.
- :class:`NeumannInverseLinearOperator`: the truncated Neumann series
  :math:`\mathbf{A}^{-1} \approx \alpha \sum_{k=0}^{K} (\mathbf{I} - \alpha \mathbf{A})^k`,
  which converges iff every eigenvalue of :math:`\mathbf{A}` lies in :math:`(0, 2/\alpha)`.
- :class:`KFACInverseLinearOperator`: the damped inverse of a KFAC/EKFAC approximation
  (:mod:`curvlinops.kfac_inverse`).

The inverse of a self-adjoint operator is self-adjoint; otherwise the adjoint is the same kind
of inverse of :math:`\mathbf{A}^\top` with the same hyper-parameters.
"""

import warnings
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
from scipy.sparse.linalg import lsmr
from torch import Tensor

from curvlinops._checks import check_int, check_number
from curvlinops._inverse_base import _InversePyTorchLinearOperator
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.kfac_inverse import KFACInverseLinearOperator

__all__ = [
    "CGInverseLinearOperator",
    "LSMRInverseLinearOperator",
    "NeumannInverseLinearOperator",
    "KFACInverseLinearOperator",
]


class CGNotConvergedWarning(RuntimeWarning):
    """Conjugate gradients stopped before reaching the requested tolerance."""


class LSMRNotConvergedWarning(RuntimeWarning):
    """LSMR stopped at its iteration limit before reaching ``atol``/``btol``."""


#: SciPy's ``lsmr`` keywords (besides the operator and the right-hand side).
_LSMR_KEYWORDS = ("damp", "atol", "btol", "conlim", "maxiter", "show", "x0")

_CG_DEFAULTS: Dict[str, Any] = {
    "initial_guess": None,
    "tolerance": 1.0,
    "eps": 1e-10,
    "stop_updating_after": 1e-10,
    "max_iter": 1000,
    "max_tridiag_iter": 20,
    "preconditioner": None,
    "n_tridiag": 0,
}


def _check_keywords(solver: str, given: Dict[str, Any], supported):
    """Raise a ``ValueError`` for keywords the solver does not know."""
    unknown = set(given) - set(supported)
    if unknown:
        raise ValueError(
            f"Unknown {solver} keyword(s) {sorted(unknown)}; supported: {sorted(supported)}."
        )


def _check_cg_hyperparameters(hp: Dict[str, Any], dim: int):
    """Raise a ``ValueError`` naming the first CG keyword outside its range."""
    for name in ("tolerance", "eps", "stop_updating_after"):
        check_number(name, hp[name], 0)
    check_int("max_iter", hp["max_iter"], 1)
    check_int("max_tridiag_iter", hp["max_tridiag_iter"], 0)
    if hp["preconditioner"] is not None and not callable(hp["preconditioner"]):
        raise ValueError(
            "preconditioner must be None or a callable mapping a [D, K] residual to "
            f"M^{{-1}} times it, got {type(hp['preconditioner']).__name__}."
        )
    guess = hp["initial_guess"]
    if guess is not None:
        if not isinstance(guess, Tensor):
            raise ValueError(f"initial_guess must be None or a tensor, got {type(guess).__name__}.")
        if guess.ndim not in (1, 2) or guess.shape[0] != dim:
            raise ValueError(
                f"initial_guess must have shape [D] or [D, K] with D = {dim}, got "
                f"{list(guess.shape)}."
            )


class CGInverseLinearOperator(_InversePyTorchLinearOperator):
    r"""Inverse of a symmetric positive definite operator by batched conjugate gradients.

    All :math:`K` right-hand sides :math:`\mathbf{B}` are solved together: every iteration
    costs one product :math:`\mathbf{A}\mathbf{P}` with a ``[D, K]`` matrix. The keyword
    arguments follow GPyTorch's ``linear_cg``:

    - each right-hand side is divided by its norm (norms below ``eps`` count as zero and give
      a zero solution); the residuals below refer to this normalised system;
    - iteration stops once the mean residual norm over the columns is below ``tolerance``,
      but not before :math:`\min(11, \text{max\_iter})` iterations, or after ``max_iter``;
    - columns whose residual norm fell below ``stop_updating_after`` stop updating;
    - step sizes :math:`\alpha = \mathbf{r}^\top\mathbf{z} / \mathbf{p}^\top\mathbf{A}\mathbf{p}`
      and :math:`\beta` whose denominators are below ``eps`` are set to zero (``eps=0``
      disables this safeguard);
    - ``initial_guess`` (``[D, K]``, default zeros) and ``preconditioner`` (a callable
      :math:`\mathbf{R} \mapsto \mathbf{M}^{-1}\mathbf{R}` on ``[D, K]``) are optional.

    With the defaults CG stops after about 11 iterations (a rough solution); pass e.g.
    ``eps=0, tolerance=1e-5`` or a larger ``max_iter`` for accuracy. Missing the tolerance
    emits a :class:`CGNotConvergedWarning` (a ``RuntimeWarning``). A search direction with
    negative curvature :math:`\mathbf{p}^\top\mathbf{A}\mathbf{p} < 0` (beyond round-off)
    proves that :math:`\mathbf{A}` is not positive definite: the product raises a
    ``ValueError`` instead of returning CG's meaningless iterate (checked on the device and
    read at the existing once-per-iteration synchronisation, so it costs no extra one).
    """

    def __init__(self, A: PyTorchLinearOperator, **cg_hyperparameters):
        """Store the operator and the CG hyper-parameters.

        Args:
            A: A symmetric positive definite operator.
            **cg_hyperparameters: ``initial_guess``, ``tolerance`` (1.0), ``eps`` (1e-10),
                ``stop_updating_after`` (1e-10), ``max_iter`` (1000), ``max_tridiag_iter``
                (20), ``preconditioner`` (None), ``n_tridiag`` (0).

        Raises:
            ValueError: For unknown keywords, a non-square ``A``, or a keyword outside its
                range: ``tolerance``, ``eps``, ``stop_updating_after`` finite and >= 0,
                ``max_iter`` an integer >= 1, ``max_tridiag_iter`` an integer >= 0,
                ``preconditioner`` callable, ``initial_guess`` a tensor ``[D]`` or ``[D, K]``.
            RuntimeError: If ``max_tridiag_iter > max_iter``.
            NotImplementedError: If ``n_tridiag != 0``.
        """
        super().__init__(A)
        _check_keywords("CG", cg_hyperparameters, _CG_DEFAULTS)
        self._cg_hyperparameters = dict(cg_hyperparameters)
        hp = {**_CG_DEFAULTS, **cg_hyperparameters}
        _check_cg_hyperparameters(hp, sum(self._in_shape_flat))
        if hp["max_tridiag_iter"] > hp["max_iter"]:
            raise RuntimeError(
                f"max_tridiag_iter ({hp['max_tridiag_iter']}) must not exceed max_iter "
                f"({hp['max_iter']})."
            )
        if hp["n_tridiag"] != 0:
            raise NotImplementedError("n_tridiag must be 0: tridiagonal outputs are unsupported.")
        self._hp = hp
        self.SELF_ADJOINT = A.SELF_ADJOINT

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        return self._unflatten(self._solve(self._flatten(X)))

    def _not_positive_definite(self, pAp: Tensor, p: Tensor, Ap: Tensor) -> Tensor:
        """Whether a column has clearly negative curvature ``p^T A p`` (a device-side flag).

        For a positive (semi-)definite ``A``, ``p^T A p`` is negative only by round-off, at
        most about ``eps * ||p|| * ||A p||``.
        """
        slack = 1e2 * torch.finfo(p.dtype).eps * p.norm(dim=0, keepdim=True)
        return (pAp < -slack * Ap.norm(dim=0, keepdim=True)).any()

    def _solve(self, rhs: Tensor) -> Tensor:
        """Solve ``A X = rhs`` for a ``[D, K]`` right-hand side.

        Stages: normalise the right-hand sides, start from the initial guess, iterate, and
        report what went wrong (an indefinite ``A``, non-finite values, no convergence).
        """
        rhs_norm = rhs.norm(dim=0, keepdim=True)
        rhs_is_zero = rhs_norm < self._hp["eps"]
        rhs_norm = rhs_norm.masked_fill(rhs_is_zero, 1.0)
        rhs = rhs / rhs_norm
        x, residual = self._start(rhs, rhs_norm)
        num_iter, converged_mean, residual_norm, indefinite = self._iterate(x, residual)
        if indefinite:
            raise ValueError(
                "CGInverseLinearOperator: A is not positive definite: CG met a direction p "
                f"with p^T A p < 0 (by iteration {num_iter}), so its result would be wrong. "
                "CG needs a symmetric positive definite A (e.g. a GGN or Fisher plus "
                "damping, not a Hessian); add damping, or use LSMRInverseLinearOperator for "
                "indefinite A."
            )
        if not torch.isfinite(x).all():
            raise RuntimeError(
                f"CG produced non-finite values (by iteration {num_iter}): check A and the "
                "preconditioner for NaNs or infinities, and that A is positive definite."
            )
        if not converged_mean:
            warnings.warn(
                f"CG stopped after {num_iter} iterations with mean residual norm "
                f"{residual_norm.mean().item():.3e} above the tolerance "
                f"{self._hp['tolerance']:.3e}. Increase max_iter or relax tolerance.",
                CGNotConvergedWarning,
                stacklevel=4,
            )
        return (x * rhs_norm).masked_fill(rhs_is_zero, 0.0)

    def _start(self, rhs: Tensor, rhs_norm: Tensor) -> Tuple[Tensor, Tensor]:
        """The initial iterate of the normalised system and its residual.

        Zero, or ``initial_guess`` scaled like the right-hand sides (a ``[D]`` guess serves a
        single right-hand side).

        Raises:
            ValueError: If the guess does not fit the right-hand side.
            RuntimeError: If the initial residual is not finite.
        """
        guess = self._hp["initial_guess"]
        if guess is None:
            x = torch.zeros_like(rhs)
            residual = rhs.clone()
        else:
            if guess.ndim == 1 and guess.numel() == rhs.numel():
                guess = guess.reshape(rhs.shape)  # a vector for a single right-hand side
            if guess.shape != rhs.shape:
                raise ValueError(
                    f"initial_guess must have shape {list(rhs.shape)} ([D, K] for K "
                    f"right-hand sides, or [D] for one), got {list(guess.shape)}."
                )
            x = guess.to(rhs) / rhs_norm
            residual = rhs - self._A @ x
        if not torch.isfinite(residual).all():
            raise RuntimeError(
                "NaNs in the initial CG residual: check A, the right-hand side and "
                "initial_guess for NaNs or infinities."
            )
        return x, residual

    def _iterate(self, x: Tensor, residual: Tensor) -> Tuple[int, bool, Tensor, bool]:
        """Run the (preconditioned) CG iteration, updating ``x`` and ``residual`` in place.

        One host synchronisation per iteration (the stopping decision). ``eps`` guards the
        divisions by the squared quantities ``p^T A p`` and ``r^T z``, so it is compared with
        their square roots: residuals far below ``sqrt(eps)`` must still update. Negative
        curvature (``A`` not positive definite) is flagged on the device and read at that
        synchronisation, so the check costs no extra one.

        Returns:
            The number of iterations, whether the mean residual norm reached ``tolerance``,
            the final residual norms ``[1, K]`` and whether ``A`` proved indefinite.
        """
        hp = self._hp
        max_iter, stop_updating_after = hp["max_iter"], hp["stop_updating_after"]
        precondition: Callable[[Tensor], Tensor] = hp["preconditioner"] or (lambda r: r)
        z = precondition(residual)
        p = z.clone()
        rz = (residual * z).sum(0, keepdim=True)
        min_iter = min(11, max_iter)
        residual_norm = residual.norm(dim=0, keepdim=True)
        num_iter, tiny = 0, hp["eps"] ** 2
        indefinite = torch.zeros((), dtype=torch.bool, device=residual.device)
        for num_iter in range(1, max_iter + 1):
            Ap = self._A @ p
            pAp = (p * Ap).sum(0, keepdim=True)
            active = residual_norm >= stop_updating_after
            indefinite = indefinite | self._not_positive_definite(
                pAp.masked_fill(~active, 1.0), p, Ap
            )
            alpha = rz / pAp.masked_fill(pAp.abs() < tiny, 1.0)
            # Safe division and frozen columns: a zero step keeps x and the residual.
            frozen = residual_norm < stop_updating_after
            alpha = alpha.masked_fill((pAp.abs() < tiny) | frozen, 0.0)
            x.addcmul_(alpha.expand_as(p), p)
            residual.addcmul_(alpha.expand_as(Ap), Ap, value=-1.0)
            residual_norm = residual.norm(dim=0, keepdim=True)
            if num_iter >= min_iter:
                mean_residual, stop = torch.stack(
                    [residual_norm.mean(), indefinite.to(residual_norm.dtype)]
                ).tolist()
                if stop or mean_residual < hp["tolerance"]:
                    return num_iter, not stop, residual_norm, bool(stop)
            z = precondition(residual)
            rz_new = (residual * z).sum(0, keepdim=True)
            beta = rz_new / rz.masked_fill(rz.abs() < tiny, 1.0)
            beta = beta.masked_fill(rz.abs() < tiny, 0.0)
            p = z + beta * p
            rz = rz_new
        return num_iter, False, residual_norm, indefinite.item()

    def _adjoint(self) -> "CGInverseLinearOperator":
        return CGInverseLinearOperator(self._A.adjoint(), **self._cg_hyperparameters)


def _check_lsmr_hyperparameters(hp: Dict[str, Any], dim: int):
    """Raise a ``ValueError`` naming the first LSMR keyword outside its range."""
    for name in ("damp", "atol", "btol", "conlim"):
        if name in hp:
            check_number(name, hp[name], 0)
    check_int("maxiter", hp.get("maxiter"), 1, optional=True)
    x0 = hp.get("x0")
    if x0 is not None and np.asarray(x0).shape != (dim,):
        raise ValueError(f"x0 must be None or a vector of shape ({dim},), got {np.shape(x0)}.")


class LSMRInverseLinearOperator(_InversePyTorchLinearOperator):
    r"""Inverse by SciPy's LSMR, which minimises :math:`\|\mathbf{A}\mathbf{x} - \mathbf{b}\|`.

    Each column is solved separately on the host on ``A.to_scipy()`` (float64) with SciPy's
    keywords (``damp``, ``atol``, ``btol``, ``conlim``, ``maxiter``, ``show``, ``x0``). The
    information LSMR returns per column (``istop, itn, normr, normar, norma, conda, normx``)
    is kept in ``_lsmr_info`` after each product. A column that stops at the iteration limit
    (``istop = 7``) emits an :class:`LSMRNotConvergedWarning` (a ``RuntimeWarning``).
    """

    def __init__(self, A: PyTorchLinearOperator, **lsmr_hyperparameters):
        """Store the operator, its SciPy export and the LSMR keywords.

        Args:
            A: A square operator.
            **lsmr_hyperparameters: Keyword arguments of ``scipy.sparse.linalg.lsmr``.

        Raises:
            ValueError: For unknown keywords or a non-square ``A``.
        """
        super().__init__(A)
        _check_keywords("LSMR", lsmr_hyperparameters, _LSMR_KEYWORDS)
        _check_lsmr_hyperparameters(lsmr_hyperparameters, sum(self._in_shape_flat))
        self._lsmr_hyperparameters = dict(lsmr_hyperparameters)
        self._A_scipy = A.to_scipy()
        self._lsmr_info: List[tuple] = []
        self.SELF_ADJOINT = A.SELF_ADJOINT

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        B = self._flatten(X).detach().cpu().to(torch.float64).numpy()
        solutions, self._lsmr_info = [], []
        for b in B.T:
            result = lsmr(self._A_scipy, b, **self._lsmr_hyperparameters)
            solutions.append(result[0])
            self._lsmr_info.append(tuple(result[1:]))
        stopped = [i for i, info in enumerate(self._lsmr_info) if info[0] == 7]
        if stopped:
            # istop = 7: SciPy's iteration limit, not a solution to the requested atol/btol
            warnings.warn(
                f"LSMR reached its iteration limit (maxiter) before atol/btol for column(s) "
                f"{stopped} (istop = 7 in _lsmr_info): the result is not converged. Increase "
                "maxiter or relax atol/btol.",
                LSMRNotConvergedWarning,
                stacklevel=3,
            )
        flat = torch.from_numpy(np.stack(solutions, axis=1)).to(self.device, self.dtype)
        return self._unflatten(flat)

    def _adjoint(self) -> "LSMRInverseLinearOperator":
        return LSMRInverseLinearOperator(self._A.adjoint(), **self._lsmr_hyperparameters)


class NeumannDivergenceWarning(RuntimeWarning):
    """The terms of a Neumann series grew: the truncated series is not an inverse."""


class NeumannInverseLinearOperator(_InversePyTorchLinearOperator):
    r"""Inverse by the truncated Neumann series.

    .. math::
        \mathbf{A}^{-1} \approx \alpha \sum_{k=0}^{K} (\mathbf{I} - \alpha\mathbf{A})^k

    with :math:`\alpha` = ``scale`` and :math:`K` = ``num_terms`` (:math:`K` products with
    :math:`\mathbf{A}`). The series converges iff all eigenvalues of :math:`\mathbf{A}` lie
    in :math:`(0, 2/\alpha)`.

    Divergence is reported, never returned silently: with ``check_nan=True`` a NaN or
    infinity in a partial sum raises a ``ValueError`` at that term; and after every product,
    if the last term :math:`(\mathbf{I} - \alpha\mathbf{A})^K\mathbf{x}` of a column is
    larger than its first term :math:`\mathbf{x}` (the series is not converging: some
    eigenvalue lies outside :math:`[0, 2/\alpha]`), a :class:`NeumannDivergenceWarning` (a
    ``RuntimeWarning``) is emitted. Turn it into an error with
    ``warnings.simplefilter("error", NeumannDivergenceWarning)``. (A warning rather than an
    error because a truncated series over a slightly indefinite or singular ``A`` is a
    deliberate regulariser in some uses, e.g. LiSSA-style influence functions.)
    """

    def __init__(
        self,
        A: PyTorchLinearOperator,
        num_terms: int = 100,
        scale: float = 1.0,
        check_nan: bool = True,
    ):
        r"""Store the operator and the series' hyper-parameters.

        Args:
            A: A square operator.
            num_terms: Number of terms :math:`K` after the first (an integer >= 0).
            scale: The scale :math:`\alpha` (a finite number > 0).
            check_nan: Raise a ``ValueError`` as soon as a partial sum contains NaNs or
                infinities (one host synchronisation per term).

        Raises:
            ValueError: If ``A`` is not square, ``num_terms`` is not an integer >= 0,
                ``scale`` is not a finite positive number or ``check_nan`` is not a bool.
        """
        super().__init__(A)
        check_int("num_terms", num_terms, 0)
        check_number(
            "scale",
            scale,
            0,
            strict=True,
            note=" (the series converges for scale < 2 / largest eigenvalue of A)",
        )
        if not isinstance(check_nan, bool):
            raise ValueError(f"check_nan must be a bool, got {check_nan!r}.")
        self._num_terms = int(num_terms)
        self._scale = scale
        self._check_nan = check_nan
        self.SELF_ADJOINT = A.SELF_ADJOINT

    def _diverges_message(self, what: str) -> str:
        return (
            f"Neumann series {what}: it diverges because some eigenvalue of A lies outside "
            f"(0, 2/scale) = (0, {2 / self._scale:.3g}). Decrease scale (below 2 / largest "
            "eigenvalue of A) and make sure A is positive definite (e.g. add damping)."
        )

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        term = self._flatten(X)
        first_norm = term.norm(dim=0)
        partial_sum = term.clone()
        for k in range(1, self._num_terms + 1):
            term = term - self._scale * (self._A @ term)
            partial_sum.add_(term)
            if self._check_nan and not torch.isfinite(partial_sum).all():
                kind = "NaNs" if torch.isnan(partial_sum).any() else "infinities"
                raise ValueError(self._diverges_message(f"produced {kind} at term {k}"))
        if self._num_terms > 0:
            # One host synchronisation per product: did any column's terms grow?
            growth = (term.norm(dim=0) / first_norm)[first_norm > 0]
            worst = growth.max().item() if growth.numel() > 0 else 0.0
            if not worst <= 1.0:  # also catches NaN
                warnings.warn(
                    self._diverges_message(
                        f"terms grew (the last is {worst:.3g} times the first, so the "
                        "result is no approximate inverse)"
                    ),
                    NeumannDivergenceWarning,
                    stacklevel=3,
                )
        return self._unflatten(self._scale * partial_sum)

    def _adjoint(self) -> "NeumannInverseLinearOperator":
        return NeumannInverseLinearOperator(
            self._A.adjoint(), self._num_terms, self._scale, self._check_nan
        )
