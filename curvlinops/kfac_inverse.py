r"""Damped inverse of a KFAC or EKFAC approximation, e.g. as an optimizer preconditioner.

KFAC is block-diagonal over layers; a weight block is :math:`\mathbf{G} \otimes \mathbf{A}`
in the row-major flattening of the weight :math:`[d_\text{out}, n]` (:math:`\mathbf{V}
\mapsto \mathbf{G}\mathbf{V}\mathbf{A}`), a bias block is :math:`\mathbf{G}`, and a joint
weight-and-bias block is :math:`\mathbf{G} \otimes \mathbf{A}` on :math:`[\mathbf{V}_W \mid
\mathbf{v}_b]`. The inverse is block-diagonal too. Per block, with
:math:`n = \dim\mathbf{A}`, :math:`m = \dim\mathbf{G}`:

- **Factor damping** (default): :math:`(\mathbf{G} + \delta_G\mathbf{I})^{-1} \otimes
  (\mathbf{A} + \delta_A\mathbf{I})^{-1}`, i.e. :math:`\mathbf{V} \mapsto (\mathbf{G} +
  \delta_G \mathbf{I})^{-1} \mathbf{V} (\mathbf{A} + \delta_A\mathbf{I})^{-1}`, with
  :math:`\delta_A = \delta_G = \delta` or a pair :math:`(\delta_A, \delta_G)`. The factor
  inverses come from Cholesky factorisations. This inverts the damped *factors*, not
  :math:`\mathbf{G} \otimes \mathbf{A} + \delta \mathbf{I}`: the Kronecker product of the
  damped factors contains the cross terms :math:`\delta_G \mathbf{I} \otimes \mathbf{A} +
  \delta_A \mathbf{G} \otimes \mathbf{I}`.
- **Heuristic damping** (Martens & Grosse, 2015, section 6.3) for blocks with both factors:
  :math:`\pi = \sqrt{(\mathrm{tr}\mathbf{A}/n) / (\mathrm{tr}\mathbf{G}/m)}`,
  :math:`\delta_A = \max(\pi\sqrt{\delta}, \delta_\text{min})`, :math:`\delta_G =
  \max(\sqrt{\delta}/\pi, \delta_\text{min})`, which balances the damping between the factors
  so that :math:`\delta_A\delta_G = \delta` (before clipping).
- **Exact damping**: :math:`(\mathbf{G} \otimes \mathbf{A} + \delta\mathbf{I})^{-1}` from the
  eigendecompositions :math:`\mathbf{A} = \mathbf{Q}_A \mathrm{diag}(\boldsymbol{\lambda}_A)
  \mathbf{Q}_A^\top`, :math:`\mathbf{G} = \mathbf{Q}_G \mathrm{diag}(\boldsymbol{\lambda}_G)
  \mathbf{Q}_G^\top`: :math:`\mathbf{V} \mapsto \mathbf{Q}_G \big((\mathbf{Q}_G^\top
  \mathbf{V} \mathbf{Q}_A) \oslash (\boldsymbol{\lambda}_G \boldsymbol{\lambda}_A^\top +
  \delta)\big) \mathbf{Q}_A^\top`. For EKFAC the eigenvalue grid is replaced by the corrected
  eigenvalues :math:`\boldsymbol{\Lambda}`, i.e. :math:`(\mathrm{EKFAC} + \delta
  \mathbf{I})^{-1}` exactly.

Biases (separate) use the :math:`\mathbf{G}` part alone. A Cholesky factorisation that fails
in a low precision is retried in float64 (with a warning) when
``retry_double_precision=True``.
"""

import math
import warnings
from numbers import Real
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from curvlinops._ekfac_correction import batched_eigh
from curvlinops._inverse_base import _InversePyTorchLinearOperator
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.ekfac import EKFACLinearOperator
from curvlinops.kfac import KFACLinearOperator, block_left, block_right, block_scale

Damping = Union[float, Tuple[float, float]]

_STATE_KEYS = (
    "A",
    "damping",
    "use_heuristic_damping",
    "min_damping",
    "use_exact_damping",
    "cache",
    "retry_double_precision",
    "inverse_input_covariances",
    "inverse_gradient_covariances",
)


def _is_non_negative_number(value) -> bool:
    return (
        isinstance(value, Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _is_compiling() -> bool:
    """Whether the code runs inside ``torch.compile`` tracing."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def _spd_inverse(matrix: Tensor) -> Tensor:
    """Inverse of a symmetric positive definite matrix by Cholesky.

    A numerically singular matrix (rank-deficient up to round-off) can pass the Cholesky
    factorisation with a tiny positive pivot and give an inverse of size ``1 / eps``; such a
    pivot is treated like a failed factorisation.

    Raises:
        torch.linalg.LinAlgError: If the matrix is not numerically positive definite.
    """
    L = torch.linalg.cholesky(matrix)
    if _is_compiling():  # no data-dependent checks in a traced product (see _prepare_compile)
        return torch.cholesky_inverse(L)
    pivots = L.diagonal() ** 2
    scale = matrix.diagonal().abs().max()
    tolerance = matrix.shape[0] * torch.finfo(matrix.dtype).eps * scale
    if matrix.shape[0] > 0 and (pivots.min() <= tolerance or not torch.isfinite(L).all()):
        raise torch.linalg.LinAlgError(
            f"the matrix is numerically singular (smallest Cholesky pivot {pivots.min():.3e} "
            f"is within round-off {tolerance:.3e} of zero)."
        )
    return torch.cholesky_inverse(L)


def _check_flag(value, name: str):
    """Raise ``ValueError`` unless ``value`` is a boolean (or 0/1)."""
    if not isinstance(value, (bool, np.bool_)) and not (isinstance(value, int) and value in (0, 1)):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


class KFACInverseLinearOperator(_InversePyTorchLinearOperator):
    """Damped inverse of a :class:`~curvlinops.KFACLinearOperator` (or EKFAC).

    The inverted factors (or eigendecompositions) are computed on first use, per module,
    and kept in ``_inverse_input_covariances`` / ``_inverse_gradient_covariances`` when
    ``cache=True``. The cache is not invalidated when the factors of ``A`` change later;
    build a new inverse then.

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    SELF_ADJOINT: bool = True

    # Its product is plain algebra on the inverted factors: compile all of it, not ``A``'s.
    compile = PyTorchLinearOperator.compile

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
        r"""Set up the inverse (the inverses themselves are computed on first use).

        Args:
            A: The KFAC or EKFAC operator.
            damping: Damping :math:`\delta \geq 0`, or :math:`(\delta_A, \delta_G)` for the
                input and gradient factors.
            use_heuristic_damping: Split the damping between the factors with Martens &
                Grosse's :math:`\pi` heuristic.
            min_damping: Lower bound of the heuristic factor dampings.
            use_exact_damping: Invert :math:`\mathbf{G} \otimes \mathbf{A} + \delta
                \mathbf{I}` exactly (required for EKFAC).
            cache: Keep the inverted factors between products.
            retry_double_precision: Retry a failed Cholesky factorisation in float64.

        Raises:
            ValueError: In this order: ``A`` is not a KFAC/EKFAC operator; ``A`` is not
                square; heuristic and exact damping together; a damping tuple with heuristic
                or exact damping; EKFAC without exact damping; a damping that is not a
                non-negative number or a pair of them; a negative ``min_damping``.
        """
        if not isinstance(A, KFACLinearOperator):
            raise ValueError(
                f"KFACInverseLinearOperator needs a KFACLinearOperator or EKFACLinearOperator, "
                f"got {type(A).__name__}. Use CGInverseLinearOperator for other operators."
            )
        super().__init__(A)
        self._check_hyperparameters(damping, use_heuristic_damping, min_damping, use_exact_damping)
        _check_flag(cache, "cache")
        _check_flag(retry_double_precision, "retry_double_precision")
        self._damping = damping
        self._use_heuristic_damping = use_heuristic_damping
        self._min_damping = min_damping
        self._use_exact_damping = use_exact_damping
        self._cache = cache
        self._retry_double_precision = retry_double_precision
        self._inverse_input_covariances: Dict[str, object] = {}
        self._inverse_gradient_covariances: Dict[str, object] = {}

    def _check_hyperparameters(
        self, damping, use_heuristic_damping: bool, min_damping, use_exact_damping: bool
    ):
        """Validate the damping options against each other and against ``self._A``.

        Raises:
            ValueError: See :meth:`__init__`.
        """
        for flag, name in (
            (use_heuristic_damping, "use_heuristic_damping"),
            (use_exact_damping, "use_exact_damping"),
        ):
            _check_flag(flag, name)
        if use_heuristic_damping and use_exact_damping:
            raise ValueError(
                "Either use heuristic damping or exact damping, not both: set "
                "use_heuristic_damping=True or use_exact_damping=True, but not both."
            )
        if isinstance(damping, tuple) and (use_heuristic_damping or use_exact_damping):
            raise ValueError(
                "Heuristic and exact damping require a single damping value. A "
                "(damping_A, damping_G) tuple only works with plain factor damping; pass a "
                "single float."
            )
        if isinstance(self._A, EKFACLinearOperator) and not use_exact_damping:
            raise ValueError(
                "EKFAC has no Kronecker factors to damp separately; pass use_exact_damping=True."
            )
        values = damping if isinstance(damping, tuple) else (damping,)
        wrong_length = isinstance(damping, tuple) and len(damping) != 2
        if wrong_length or not all(_is_non_negative_number(v) for v in values):
            raise ValueError(
                "damping must be a non-negative finite float or a pair (damping_A, damping_G) "
                f"of them, got {damping!r}."
            )
        if not _is_non_negative_number(min_damping):
            raise ValueError(
                f"min_damping must be a non-negative finite float, got {min_damping!r}."
            )

    # ----------------------------------------------------------------- inverses
    def _damped_inverse(self, matrix: Tensor, damping: float, what: str) -> Tensor:
        """``(matrix + damping I)^{-1}`` by Cholesky, retried in float64 if allowed.

        Args:
            matrix: A symmetric positive semi-definite factor.
            damping: The damping added to its diagonal.
            what: Description of the factor for messages.

        Returns:
            The inverse, in the factor's dtype.

        Raises:
            RuntimeError: (``torch.linalg.LinAlgError``) If the damped factor is not
                numerically positive definite (after the float64 retry, if allowed).
        """
        eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        damped = matrix + damping * eye
        dtype = matrix.dtype
        try:
            return _spd_inverse(damped)
        except RuntimeError as error:
            if dtype == torch.float64 or not self._retry_double_precision:
                hint = (
                    ""
                    if dtype == torch.float64
                    else ", or pass retry_double_precision=True to retry in float64"
                )
                raise torch.linalg.LinAlgError(
                    f"Cholesky factorisation of the damped {what} (damping {damping}) failed in "
                    f"{dtype}: {error} Increase the damping (or min_damping){hint}."
                ) from error
            first_error = error
        warnings.warn(
            f"Cholesky factorisation of the damped {what} failed in {dtype} ({first_error}); "
            "retrying in float64.",
            UserWarning,
            stacklevel=5,
        )
        try:
            inverse = _spd_inverse(damped.to(torch.float64))
        except RuntimeError as error:
            raise torch.linalg.LinAlgError(
                f"Cholesky factorisation of the damped {what} (damping {damping}) failed in "
                f"{dtype} and in float64: {error} Increase the damping (or min_damping)."
            ) from error
        return inverse.to(dtype)

    def _factor_dampings(self, A: Optional[Tensor], G: Tensor) -> Tuple[float, float]:
        r"""The dampings :math:`(\delta_A, \delta_G)` of a module's factors.

        The heuristic applies only with both factors and a positive mean eigenvalue of
        :math:`\mathbf{G}` and a non-negative one of :math:`\mathbf{A}`; with
        :math:`\pi = 0` (a zero input factor) it would set :math:`\delta_G = \infty`, so the
        plain damping is used then as well.
        """
        if isinstance(self._damping, tuple):
            return float(self._damping[0]), float(self._damping[1])
        delta = float(self._damping)
        if self._use_heuristic_damping and A is not None:
            mean_A = (A.trace() / A.shape[0]).item()
            mean_G = (G.trace() / G.shape[0]).item()
            if mean_A >= 0 and mean_G > 0:
                pi = math.sqrt(mean_A / mean_G)
                if pi > 0:
                    root = math.sqrt(delta)
                    return max(pi * root, self._min_damping), max(root / pi, self._min_damping)
        return delta, delta

    def _compute_or_get_cached_inverse(
        self, name: str
    ) -> Tuple[object, object, Optional[Dict[str, Tensor]]]:
        r"""Inverse parts of a module, from the cache or computed (and cached if enabled).

        Args:
            name: Module name (a key of the KFAC operator's ``_mapping``).

        Returns:
            ``(A part, G part, inverse damped eigenvalues)``:

            - factor damping: the inverted damped factors :math:`(\mathbf{A} + \delta_A
              \mathbf{I})^{-1}` (``None`` without input factor) and :math:`(\mathbf{G} +
              \delta_G\mathbf{I})^{-1}`, and ``None``;
            - exact damping (KFAC): ``(eigenvectors, eigenvalues)`` of :math:`\mathbf{A}`
              (or ``None``) and of :math:`\mathbf{G}`, and a dict from block kind
              (``"weight"``, ``"bias"``, ``"joint"``) to :math:`1 / (\boldsymbol{\lambda}_G
              \boldsymbol{\lambda}_A^\top + \delta)` of shape ``[d_out, n]`` (``n = 1`` for a
              bias);
            - exact damping (EKFAC): EKFAC's eigenvectors :math:`\mathbf{Q}_A` (or ``None``)
              and :math:`\mathbf{Q}_G`, and the dict of :math:`1 / (\boldsymbol{\Lambda} +
              \delta)` with the corrected eigenvalues (nothing is cached).

        Raises:
            ValueError: If ``name`` is not a module of the KFAC operator.
        """
        kfac = self._A
        if name not in kfac._mapping:
            raise ValueError(
                f"Unknown module name {name!r}; the KFAC operator has {list(kfac._mapping)}."
            )
        blocks = [(kind, positions) for n, kind, positions in kfac._blocks() if n == name]
        delta = float(self._damping) if self._use_exact_damping else None

        if isinstance(kfac, EKFACLinearOperator):
            kfac._maybe_compute_ekfac()
            inverse_eigenvalues = {}
            for kind, positions in blocks:
                values = self._ekfac_eigenvalues(name, kind, positions)
                # corrected eigenvalues are sums of squares of rotated gradients: their
                # round-off is relative to the largest one
                tolerance = max(values.shape) * values.abs().max() * torch.finfo(values.dtype).eps
                inverse_eigenvalues[kind] = self._inverse_damped(values, delta, tolerance, name)
            return (
                kfac._input_covariances_eigenvectors.get(name),
                kfac._gradient_covariances_eigenvectors[name],
                inverse_eigenvalues,
            )

        if name in self._inverse_gradient_covariances:
            A_part = self._inverse_input_covariances[name]
            G_part = self._inverse_gradient_covariances[name]
        else:
            kfac._maybe_compute_kronecker_factors()
            A = kfac._input_covariances.get(name)
            G = kfac._gradient_covariances[name]
            if self._use_exact_damping:
                # eigh returns (eigenvalues, eigenvectors); the cache holds (eigenvectors,
                # eigenvalues). A and G of equal size share one batched call.
                decomposed = batched_eigh([G] if A is None else [G, A])
                G_part = decomposed[0][::-1]
                A_part = None if A is None else decomposed[1][::-1]
            else:
                delta_A, delta_G = self._factor_dampings(A, G)
                A_part = (
                    None
                    if A is None
                    else self._damped_inverse(A, delta_A, f"input factor of module {name!r}")
                )
                G_part = self._damped_inverse(G, delta_G, f"gradient factor of module {name!r}")
            if self._cache:
                self._inverse_input_covariances[name] = A_part
                self._inverse_gradient_covariances[name] = G_part

        if not self._use_exact_damping:
            return A_part, G_part, None
        lam_G = G_part[1]
        eps = torch.finfo(lam_G.dtype).eps
        inverse_eigenvalues = {}
        for kind, _ in blocks:
            # eigh's eigenvalues are accurate to about dim * eps * max |eigenvalue|
            if kind == "bias":
                values = lam_G.unsqueeze(-1)
                tolerance = lam_G.numel() * eps * lam_G.abs().max()
            else:
                lam_A = A_part[1]
                values = torch.outer(lam_G, lam_A)
                tolerance = (
                    (lam_G.numel() + lam_A.numel()) * eps * lam_G.abs().max() * lam_A.abs().max()
                )
            inverse_eigenvalues[kind] = self._inverse_damped(values, delta, tolerance, name)
        return A_part, G_part, inverse_eigenvalues

    def _inverse_damped(self, values: Tensor, delta: float, tolerance: Tensor, name: str) -> Tensor:
        """``1 / (values + delta)``, refusing a numerically singular damped block.

        Args:
            values: Eigenvalues of a block (KFAC's grid or EKFAC's corrected eigenvalues).
            delta: The damping.
            tolerance: Round-off level of ``values``: damped eigenvalues at or below it are
                indistinguishable from zero.
            name: Module name, for the message.

        Returns:
            The inverse damped eigenvalues.

        Raises:
            torch.linalg.LinAlgError: (a ``RuntimeError``) If a damped eigenvalue is not
                clearly positive, which would give infinite or NaN products.
        """
        damped = values + delta
        if _is_compiling():  # no data-dependent checks in a traced product
            return 1.0 / damped
        smallest = damped.min()
        if not torch.isfinite(damped).all() or smallest <= tolerance:
            raise torch.linalg.LinAlgError(
                f"The exactly damped curvature block of module {name!r} is singular: its "
                f"smallest damped eigenvalue is {smallest.item():.3e} with damping {delta}, "
                f"within round-off ({tolerance.item():.3e}) of zero, so its inverse would be "
                "infinite or NaN. Increase the damping (damping > 0)."
            )
        return 1.0 / damped

    def _ekfac_eigenvalues(self, name: str, kind: str, positions: Tuple[int, ...]) -> Tensor:
        """EKFAC's corrected eigenvalues of a block as ``[d_out, n]`` (``n = 1`` for a bias)."""
        stored = self._A._corrected_eigenvalues[name]
        values = stored if kind == "joint" else stored[positions[0]]
        return values.unsqueeze(-1) if kind == "bias" else values

    # ----------------------------------------------------------------- products
    def _prepare_compile(self):
        """Compute (and, with ``cache=True``, cache) the inverses eagerly before tracing.

        The singularity checks are data-dependent and skipped inside a compiled product; run
        eagerly here, they still guard the cached inverses that the compiled product reads.
        """
        self._A._prepare_compile()
        for name in self._A._mapping:
            self._compute_or_get_cached_inverse(name)

    def _matmat(self, M):
        parts = {}

        def apply(name: str, kind: str, V: Tensor) -> Tensor:
            # V: [d_out, n] or, columns last, [d_out, n, K]; all columns in one product
            if name not in parts:
                parts[name] = self._compute_or_get_cached_inverse(name)
            A_part, G_part, inverse_eigenvalues = parts[name]
            if inverse_eigenvalues is None:
                out = block_left(G_part, V)
                return out if kind == "bias" else block_right(out, A_part)
            ekfac = isinstance(self._A, EKFACLinearOperator)
            Q_G = G_part if ekfac else G_part[0]
            Q_A = None if kind == "bias" else (A_part if ekfac else A_part[0])
            rotated = block_left(Q_G.T, V)
            if Q_A is not None:
                rotated = block_right(rotated, Q_A)
            out = block_left(Q_G, block_scale(rotated, inverse_eigenvalues[kind]))
            return out if Q_A is None else block_right(out, Q_A.T)

        return self._A._apply_blocks(M, apply)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict:
        """The wrapped operator's state, the inverse's hyper-parameters and its cache.

        Returns:
            A dict with keys ``A``, ``damping``, ``use_heuristic_damping``, ``min_damping``,
            ``use_exact_damping``, ``cache``, ``retry_double_precision``,
            ``inverse_input_covariances`` and ``inverse_gradient_covariances``.
        """
        return {
            "A": self._A.state_dict(),
            "damping": self._damping,
            "use_heuristic_damping": self._use_heuristic_damping,
            "min_damping": self._min_damping,
            "use_exact_damping": self._use_exact_damping,
            "cache": self._cache,
            "retry_double_precision": self._retry_double_precision,
            "inverse_input_covariances": dict(self._inverse_input_covariances),
            "inverse_gradient_covariances": dict(self._inverse_gradient_covariances),
        }

    def load_state_dict(self, state_dict: Dict):
        """Restore a checkpoint; loads the wrapped operator's state (with its warning).

        Everything (the wrapped operator's checkpoint included) is checked before anything
        changes: on an error, model, operator and inverse are left as they were.

        Args:
            state_dict: A dict from :meth:`state_dict`.

        Raises:
            ValueError: If keys are missing, the stored hyper-parameters are invalid for the
                wrapped operator, or the cached inverses belong to unknown modules.
        """
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(
                f"Not a KFACInverseLinearOperator state dict: missing keys {missing}. Create "
                "it with KFACInverseLinearOperator.state_dict()."
            )
        # everything is checked before anything changes (the wrapped operator included)
        self._A._warn_overwrite(stacklevel=3)
        self._A._validate_state_dict(state_dict["A"])
        self._check_hyperparameters(
            state_dict["damping"],
            state_dict["use_heuristic_damping"],
            state_dict["min_damping"],
            state_dict["use_exact_damping"],
        )
        for key in ("inverse_input_covariances", "inverse_gradient_covariances"):
            if not isinstance(state_dict[key], dict):
                raise ValueError(
                    f"The checkpoint's {key} must be a dict, got {type(state_dict[key]).__name__}."
                )
            unknown = sorted(set(state_dict[key]) - set(self._A._mapping))
            if unknown:
                raise ValueError(
                    f"The checkpoint's {key} has modules {unknown} that the KFAC operator does "
                    f"not have ({list(self._A._mapping)})."
                )
        self._A._install_state_dict(state_dict["A"])
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

        Raises:
            ValueError: If keys are missing (or see :meth:`__init__` and
                :meth:`load_state_dict`).
        """
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(
                f"Not a KFACInverseLinearOperator state dict: missing keys {missing}. Create "
                "it with KFACInverseLinearOperator.state_dict()."
            )
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
