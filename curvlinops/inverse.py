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
from typing import Any, Callable, Dict, List

import numpy as np
import torch
from scipy.sparse.linalg import lsmr
from torch import Tensor

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
    emits a :class:`CGNotConvergedWarning` (a ``RuntimeWarning``).
    """

    def __init__(self, A: PyTorchLinearOperator, **cg_hyperparameters):
        """Store the operator and the CG hyper-parameters.

        Args:
            A: A symmetric positive definite operator.
            **cg_hyperparameters: ``initial_guess``, ``tolerance`` (1.0), ``eps`` (1e-10),
                ``stop_updating_after`` (1e-10), ``max_iter`` (1000), ``max_tridiag_iter``
                (20), ``preconditioner`` (None), ``n_tridiag`` (0).

        Raises:
            ValueError: For unknown keywords or a non-square ``A``.
            RuntimeError: If ``max_tridiag_iter > max_iter``.
            NotImplementedError: If ``n_tridiag != 0``.
        """
        super().__init__(A)
        unknown = set(cg_hyperparameters) - set(_CG_DEFAULTS)
        if unknown:
            raise ValueError(
                f"Unknown CG keyword(s) {sorted(unknown)}; supported: {sorted(_CG_DEFAULTS)}."
            )
        self._cg_hyperparameters = dict(cg_hyperparameters)
        hp = {**_CG_DEFAULTS, **cg_hyperparameters}
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

    def _solve(self, rhs: Tensor) -> Tensor:
        """Solve ``A X = rhs`` for a ``[D, K]`` right-hand side."""
        hp = self._hp
        eps, tolerance, max_iter = hp["eps"], hp["tolerance"], hp["max_iter"]
        precondition: Callable[[Tensor], Tensor] = hp["preconditioner"] or (lambda r: r)

        rhs_norm = rhs.norm(dim=0, keepdim=True)
        rhs_is_zero = rhs_norm < eps
        rhs_norm = rhs_norm.masked_fill(rhs_is_zero, 1.0)
        rhs = rhs / rhs_norm

        guess = hp["initial_guess"]
        if guess is None:
            x = torch.zeros_like(rhs)
            residual = rhs.clone()
        else:
            guess = guess.reshape(rhs.shape) if guess.ndim == 1 else guess
            if guess.shape != rhs.shape:
                raise ValueError(
                    f"initial_guess must have shape {list(rhs.shape)}, got {list(guess.shape)}."
                )
            x = guess.to(rhs) / rhs_norm
            residual = rhs - self._A @ x
        if torch.isnan(residual).any():
            raise RuntimeError(
                "NaNs in the initial CG residual: check A, the right-hand side and "
                "initial_guess for NaNs or infinities."
            )

        z = precondition(residual)
        p = z.clone()
        rz = (residual * z).sum(0, keepdim=True)
        min_iter = min(11, max_iter)
        residual_norm = residual.norm(dim=0, keepdim=True)
        converged_mean = False
        num_iter = 0
        # ``eps`` guards divisions by the squared quantities p^T A p and r^T z, so it is
        # compared with their square roots: residuals far below sqrt(eps) must still update
        # (comparing r^T z itself with eps froze CG at residuals of about 1e-5).
        tiny = eps**2
        for num_iter in range(1, max_iter + 1):
            Ap = self._A @ p
            pAp = (p * Ap).sum(0, keepdim=True)
            alpha = rz / pAp.masked_fill(pAp.abs() < tiny, 1.0)
            # Safe division and frozen columns: a zero step keeps x and the residual.
            alpha = alpha.masked_fill(
                (pAp.abs() < tiny) | (residual_norm < hp["stop_updating_after"]), 0.0
            )
            x.addcmul_(alpha.expand_as(p), p)
            residual.addcmul_(alpha.expand_as(Ap), Ap, value=-1.0)
            residual_norm = residual.norm(dim=0, keepdim=True)
            # One host synchronisation per iteration: the stopping decision.
            if num_iter >= min_iter and residual_norm.mean().item() < tolerance:
                converged_mean = True
                break
            z = precondition(residual)
            rz_new = (residual * z).sum(0, keepdim=True)
            beta = rz_new / rz.masked_fill(rz.abs() < tiny, 1.0)
            beta = beta.masked_fill(rz.abs() < tiny, 0.0)
            p = z + beta * p
            rz = rz_new

        if not converged_mean:
            warnings.warn(
                f"CG stopped after {num_iter} iterations with mean residual norm "
                f"{residual_norm.mean().item():.3e} above the tolerance {tolerance:.3e}. "
                "Increase max_iter or relax tolerance.",
                CGNotConvergedWarning,
                stacklevel=4,
            )
        return (x * rhs_norm).masked_fill(rhs_is_zero, 0.0)

    def _adjoint(self) -> "CGInverseLinearOperator":
        return CGInverseLinearOperator(self._A.adjoint(), **self._cg_hyperparameters)


class LSMRInverseLinearOperator(_InversePyTorchLinearOperator):
    r"""Inverse by SciPy's LSMR, which minimises :math:`\|\mathbf{A}\mathbf{x} - \mathbf{b}\|`.

    Each column is solved separately on the host on ``A.to_scipy()`` (float64) with SciPy's
    keywords (``damp``, ``atol``, ``btol``, ``conlim``, ``maxiter``, ``show``, ``x0``). The
    information LSMR returns per column (``istop, itn, normr, normar, norma, conda, normx``)
    is kept in ``_lsmr_info`` after each product.
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
        allowed = {"damp", "atol", "btol", "conlim", "maxiter", "show", "x0"}
        unknown = set(lsmr_hyperparameters) - allowed
        if unknown:
            raise ValueError(f"Unknown LSMR keyword(s) {sorted(unknown)}; supported: {allowed}.")
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
        flat = torch.from_numpy(np.stack(solutions, axis=1)).to(self.device, self.dtype)
        return self._unflatten(flat)

    def _adjoint(self) -> "LSMRInverseLinearOperator":
        return LSMRInverseLinearOperator(self._A.adjoint(), **self._lsmr_hyperparameters)


class NeumannInverseLinearOperator(_InversePyTorchLinearOperator):
    r"""Inverse by the truncated Neumann series.

    .. math::
        \mathbf{A}^{-1} \approx \alpha \sum_{k=0}^{K} (\mathbf{I} - \alpha\mathbf{A})^k

    with :math:`\alpha` = ``scale`` and :math:`K` = ``num_terms`` (:math:`K` products with
    :math:`\mathbf{A}`). The series converges iff all eigenvalues of :math:`\mathbf{A}` lie
    in :math:`(0, 2/\alpha)`.
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
            num_terms: Number of terms :math:`K` after the first.
            scale: The scale :math:`\alpha`.
            check_nan: Raise a ``ValueError`` as soon as a partial sum contains NaNs.

        Raises:
            ValueError: If ``A`` is not square or ``num_terms`` is negative.
        """
        super().__init__(A)
        if num_terms < 0:
            raise ValueError(f"num_terms must be non-negative, got {num_terms}.")
        self._num_terms = num_terms
        self._scale = scale
        self._check_nan = check_nan
        self.SELF_ADJOINT = A.SELF_ADJOINT

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        term = self._flatten(X)
        partial_sum = term.clone()
        for k in range(1, self._num_terms + 1):
            term = term - self._scale * (self._A @ term)
            partial_sum.add_(term)
            if self._check_nan and torch.isnan(partial_sum).any():
                raise ValueError(
                    f"Neumann series produced NaNs at term {k}: it diverges because some "
                    f"eigenvalue of A lies outside (0, 2/scale) = (0, {2 / self._scale:.3g}). "
                    "Decrease scale."
                )
        return self._unflatten(self._scale * partial_sum)

    def _adjoint(self) -> "NeumannInverseLinearOperator":
        return NeumannInverseLinearOperator(
            self._A.adjoint(), self._num_terms, self._scale, self._check_nan
        )
