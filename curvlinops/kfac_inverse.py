r"""Damped inverse of a KFAC or EKFAC approximation, e.g. as an optimizer preconditioner.

Per layer block with factors :math:`\mathbf{A}, \mathbf{G}` (dimensions :math:`n, m`):

- default: :math:`(\mathbf{G} + \delta_G\mathbf{I})^{-1} \otimes (\mathbf{A} +
  \delta_A\mathbf{I})^{-1}`, i.e. :math:`\mathbf{V} \mapsto (\mathbf{G} + \delta_G
  \mathbf{I})^{-1} \mathbf{V} (\mathbf{A} + \delta_A\mathbf{I})^{-1}` with Cholesky-based
  factor inverses, :math:`\delta_A = \delta_G = \delta` or a pair :math:`(\delta_A,
  \delta_G)`. This inverts the damped *factors*, not :math:`\mathbf{G} \otimes \mathbf{A} +
  \delta \mathbf{I}`;
- heuristic damping (Martens & Grosse, 2015, section 6.3): :math:`\pi = \sqrt{(\mathrm{tr}
  \mathbf{A}/n) / (\mathrm{tr}\mathbf{G}/m)}`, :math:`\delta_A = \max(\pi\sqrt{\delta},
  \delta_\text{min})`, :math:`\delta_G = \max(\sqrt{\delta}/\pi, \delta_\text{min})`;
- exact damping: :math:`(\mathbf{G} \otimes \mathbf{A} + \delta\mathbf{I})^{-1}` in the
  Kronecker eigenbasis, eigenvalues :math:`1 / (\lambda_G \lambda_A^\top + \delta)`; for EKFAC
  :math:`1 / (\boldsymbol{\Lambda} + \delta)` with its corrected eigenvalues.

Biases use the :math:`\mathbf{G}` part alone. A failed Cholesky factorisation in low precision
is retried in float64 (with a warning) when ``retry_double_precision=True``.
"""

import warnings
from numbers import Real
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from curvlinops._ekfac_correction import batched_eigh
from curvlinops._inverse_base import _InversePyTorchLinearOperator
from curvlinops.ekfac import EKFACLinearOperator
from curvlinops.kfac import KFACLinearOperator, block_left, block_right, block_scale

Damping = Union[float, Tuple[float, float]]


class KFACInverseLinearOperator(_InversePyTorchLinearOperator):
    """Damped inverse of a :class:`~curvlinops.KFACLinearOperator` (or EKFAC).

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    SELF_ADJOINT: bool = True

    def __init__(
        self,
        A: KFACLinearOperator,
        damping: Damping = 0.0,
        use_heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        use_exact_damping: bool = False,
        cache: bool = True,
        retry_double_precision: bool = True,
    ):
        r"""Set up the inverse (factor inverses are computed on first use).

        Args:
            A: The KFAC or EKFAC operator.
            damping: Damping :math:`\delta`, or :math:`(\delta_A, \delta_G)`.
            use_heuristic_damping: Split the damping between the factors with Martens &
                Grosse's :math:`\pi` heuristic.
            min_damping: Lower bound of the heuristic dampings.
            use_exact_damping: Invert :math:`\mathbf{G} \otimes \mathbf{A} + \delta
                \mathbf{I}` exactly (required for EKFAC).
            cache: Keep the inverted factors between products.
            retry_double_precision: Retry a failed Cholesky factorisation in float64.

        Raises:
            ValueError: For an operator that is not KFAC/EKFAC, a non-square operator,
                conflicting damping options, negative or malformed damping, or EKFAC
                without exact damping.
        """
        if not isinstance(A, KFACLinearOperator):
            raise ValueError(
                f"KFACInverseLinearOperator needs a KFACLinearOperator or EKFACLinearOperator, "
                f"got {type(A).__name__}. Use CGInverseLinearOperator for other operators."
            )
        super().__init__(A)
        if use_heuristic_damping and use_exact_damping:
            raise ValueError("Use either use_heuristic_damping or use_exact_damping, not both.")
        if isinstance(damping, tuple) and (use_heuristic_damping or use_exact_damping):
            raise ValueError(
                "A (damping_A, damping_G) tuple cannot be combined with heuristic or exact "
                "damping; pass a single float."
            )
        if isinstance(A, EKFACLinearOperator) and not use_exact_damping:
            raise ValueError(
                "EKFAC has no Kronecker factors to damp separately; pass use_exact_damping=True."
            )
        values = damping if isinstance(damping, tuple) else (damping,)
        if (
            len(values) not in (1, 2)
            or any(isinstance(v, bool) or not isinstance(v, Real) for v in values)
            or any(v < 0 for v in values)
        ):
            raise ValueError(
                f"damping must be a non-negative float or a pair of them, got {damping!r}."
            )
        if min_damping < 0:
            raise ValueError(f"min_damping must be non-negative, got {min_damping}.")
        self._damping = damping
        self._use_heuristic_damping = use_heuristic_damping
        self._min_damping = min_damping
        self._use_exact_damping = use_exact_damping
        self._cache = cache
        self._retry_double_precision = retry_double_precision
        self._inverse_input_covariances: Dict[str, object] = {}
        self._inverse_gradient_covariances: Dict[str, object] = {}

    # ----------------------------------------------------------------- inverses
    def _damped_inverse(self, matrix: Tensor, damping: float) -> Tensor:
        """``(matrix + damping I)^{-1}`` by Cholesky, retried in float64 if allowed."""
        damped = matrix + damping * torch.eye(
            matrix.shape[0], dtype=matrix.dtype, device=matrix.device
        )
        try:
            return torch.cholesky_inverse(torch.linalg.cholesky(damped))
        except RuntimeError:
            if matrix.dtype == torch.float64 or not self._retry_double_precision:
                raise
        warnings.warn(
            f"Cholesky factorisation failed in {matrix.dtype}; retrying in float64.",
            UserWarning,
            stacklevel=4,
        )
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped.to(torch.float64)))
        return inverse.to(matrix.dtype)

    def _factor_dampings(self, A: Optional[Tensor], G: Tensor) -> Tuple[float, float]:
        if isinstance(self._damping, tuple):
            return self._damping
        delta = float(self._damping)
        if self._use_heuristic_damping and A is not None:
            mean_A, mean_G = A.trace() / A.shape[0], G.trace() / G.shape[0]
            if mean_A >= 0 and mean_G > 0:
                pi = torch.sqrt(mean_A / mean_G).item()
                root = delta**0.5
                return (
                    max(pi * root, self._min_damping),
                    max(root / pi if pi > 0 else float("inf"), self._min_damping),
                )
        return delta, delta

    def _compute_or_get_cached_inverse(
        self, name: str
    ) -> Tuple[object, object, Optional[Dict[str, Tensor]]]:
        r"""Inverse parts of a module, from the cache or computed (and cached).

        Args:
            name: Module name.

        Returns:
            ``(A part, G part, inverse damped eigenvalues)``. Without exact damping: the
            inverted damped factors (``None`` for a missing input factor) and ``None``. With
            exact damping (KFAC): ``(eigenvectors, eigenvalues)`` pairs of A (or ``None``)
            and G, and a dict from block kind (``"weight"``, ``"bias"``, ``"joint"``) to
            :math:`1/(\lambda + \delta)` shaped ``[d_out, n]``. For EKFAC: its eigenvectors
            and the inverse damped corrected eigenvalues (nothing is cached).
        """
        kfac = self._A
        blocks = [(k, p) for n, k, p in kfac._blocks() if n == name]
        if isinstance(kfac, EKFACLinearOperator):
            kfac._maybe_compute_ekfac()
            delta = float(self._damping)
            Q_A = kfac._input_covariances_eigenvectors.get(name)
            Q_G = kfac._gradient_covariances_eigenvectors[name]
            inverse_eigenvalues = {
                kind: 1.0 / (kfac._block_eigenvalues(name, kind, positions) + delta)
                for kind, positions in blocks
            }
            return Q_A, Q_G, inverse_eigenvalues
        if name in self._inverse_gradient_covariances:
            A_part = self._inverse_input_covariances[name]
            G_part = self._inverse_gradient_covariances[name]
        else:
            kfac._maybe_compute_kronecker_factors()
            A = kfac._input_covariances.get(name)
            G = kfac._gradient_covariances[name]
            if self._use_exact_damping:
                matrices = {"G": G} if A is None else {"A": A, "G": G}
                decomposed = batched_eigh(matrices)
                A_part = None if A is None else decomposed["A"][::-1]
                G_part = decomposed["G"][::-1]
            else:
                delta_A, delta_G = self._factor_dampings(A, G)
                A_part = None if A is None else self._damped_inverse(A, delta_A)
                G_part = self._damped_inverse(G, delta_G)
            if self._cache:
                self._inverse_input_covariances[name] = A_part
                self._inverse_gradient_covariances[name] = G_part
        if not self._use_exact_damping:
            return A_part, G_part, None
        delta = float(self._damping)
        lam_G = G_part[1]
        inverse_eigenvalues = {}
        for kind, _ in blocks:
            if kind == "bias":
                inverse_eigenvalues[kind] = 1.0 / (lam_G.unsqueeze(-1) + delta)
            else:
                inverse_eigenvalues[kind] = 1.0 / (torch.outer(lam_G, A_part[1]) + delta)
        return A_part, G_part, inverse_eigenvalues

    # ----------------------------------------------------------------- products
    def _matmat(self, M):
        parts = {}

        def apply(name: str, kind: str, V: Tensor) -> Tensor:
            if name not in parts:
                parts[name] = self._compute_or_get_cached_inverse(name)
            A_part, G_part, inverse_eigenvalues = parts[name]
            if inverse_eigenvalues is None:
                out = block_left(G_part, V)
                return out if kind == "bias" else block_right(out, A_part)
            exact_ekfac = isinstance(self._A, EKFACLinearOperator)
            Q_G = G_part if exact_ekfac else G_part[0]
            Q_A = None if kind == "bias" else (A_part if exact_ekfac else A_part[0])
            rotated = block_left(Q_G.T, V)
            if Q_A is not None:
                rotated = block_right(rotated, Q_A)
            out = block_left(Q_G, block_scale(rotated, inverse_eigenvalues[kind]))
            return out if Q_A is None else block_right(out, Q_A.T)

        return self._A._apply_blocks(M, apply)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict:
        """The wrapped operator's state and the inverse's hyper-parameters and cache.

        Returns:
            The state dict.
        """
        return {
            "A": self._A.state_dict(),
            "damping": self._damping,
            "use_heuristic_damping": self._use_heuristic_damping,
            "min_damping": self._min_damping,
            "use_exact_damping": self._use_exact_damping,
            "cache": self._cache,
            "retry_double_precision": self._retry_double_precision,
            "inverse_input_covariances": self._inverse_input_covariances,
            "inverse_gradient_covariances": self._inverse_gradient_covariances,
        }

    def load_state_dict(self, state_dict: Dict):
        """Restore a checkpoint (loads the wrapped operator's state, with its warning).

        Args:
            state_dict: A dict from :meth:`state_dict`.
        """
        self._A.load_state_dict(state_dict["A"])
        self._damping = state_dict["damping"]
        self._use_heuristic_damping = state_dict["use_heuristic_damping"]
        self._min_damping = state_dict["min_damping"]
        self._use_exact_damping = state_dict["use_exact_damping"]
        self._cache = state_dict["cache"]
        self._retry_double_precision = state_dict["retry_double_precision"]
        self._inverse_input_covariances = dict(state_dict["inverse_input_covariances"])
        self._inverse_gradient_covariances = dict(state_dict["inverse_gradient_covariances"])

    @classmethod
    def from_state_dict(
        cls, state_dict: Dict, A: KFACLinearOperator
    ) -> "KFACInverseLinearOperator":
        """Build an inverse from a checkpoint.

        Args:
            state_dict: A dict from :meth:`state_dict`.
            A: The KFAC/EKFAC operator to wrap (its state is loaded from the checkpoint).

        Returns:
            The restored inverse.
        """
        inverse = cls(
            A,
            damping=state_dict["damping"],
            use_heuristic_damping=state_dict["use_heuristic_damping"],
            min_damping=state_dict["min_damping"],
            use_exact_damping=state_dict["use_exact_damping"],
            cache=state_dict["cache"],
            retry_double_precision=state_dict["retry_double_precision"],
        )
        inverse.load_state_dict(state_dict)
        return inverse
