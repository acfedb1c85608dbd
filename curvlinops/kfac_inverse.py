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

The wrapped operator supplies one block per layer (:mod:`curvlinops._blocks`); each block
computes its damped inverse (factor inverses or eigenpairs, cached per layer with
``cache=True``; an eigenbasis block needs nothing cached). Biases (separate) use the
:math:`\mathbf{G}` part alone. A Cholesky factorisation that fails
in a low precision is retried in float64 (with a warning) when
``retry_double_precision=True``.
"""

import math
from numbers import Real
from typing import Dict, List, Tuple

import numpy as np

from curvlinops._blocks import Block, Damping, InverseOptions, apply_block_diagonal
from curvlinops._inverse_base import _InversePyTorchLinearOperator
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.kfac import KFACLinearOperator

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


def _check_state_keys(state_dict: Dict):
    """Raise ``ValueError`` unless ``state_dict`` has every key of an inverse's checkpoint."""
    missing = [key for key in _STATE_KEYS if key not in state_dict]
    if missing:
        raise ValueError(
            f"Not a KFACInverseLinearOperator state dict: missing keys {missing}. Create "
            "it with KFACInverseLinearOperator.state_dict()."
        )


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
        if not self._A._FACTOR_DAMPING and not use_exact_damping:
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
    def _options(self) -> InverseOptions:
        """The inversion hyper-parameters, as the blocks take them."""
        return InverseOptions(
            damping=self._damping,
            heuristic=self._use_heuristic_damping,
            min_damping=self._min_damping,
            exact=self._use_exact_damping,
            retry_double=self._retry_double_precision,
        )

    def _inverse_block(
        self, name: str, block: Block, kinds: List[str], options: InverseOptions
    ) -> Tuple[Tuple[object, object], Block]:
        """A module's damped inverse block and its (cacheable) parts.

        The wrapped operator supplies the module's block; the block computes what its
        inverse needs (inverted damped factors, or eigenpairs), which is cached per module
        with ``cache=True`` (blocks already in an eigenbasis need nothing cached).
        """
        if name in self._inverse_gradient_covariances:
            parts = (
                self._inverse_input_covariances[name],
                self._inverse_gradient_covariances[name],
            )
        else:
            parts = block.inverse_parts(options)
            if self._cache and parts is not None:
                self._inverse_input_covariances[name] = parts[0]
                self._inverse_gradient_covariances[name] = parts[1]
        inverse = block.inverse_from_parts(parts, options, kinds)
        return (inverse.factors() if parts is None else parts), inverse

    def _kinds(self) -> Dict[str, List[str]]:
        """The parameter kinds of every module's blocks."""
        kinds: Dict[str, List[str]] = {}
        for name, kind, _ in self._A._full_layout():
            kinds.setdefault(name, []).append(kind)
        return kinds

    def _compute_or_get_cached_inverse(self, name: str) -> Tuple[object, object, object]:
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
        block = self._A._layer_block(name)
        kinds = self._kinds()[name]
        (A_part, G_part), inverse = self._inverse_block(name, block, kinds, self._options())
        return A_part, G_part, inverse.eigenvalues

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
        options, kinds = self._options(), self._kinds()
        blocks = {
            name: self._inverse_block(name, block, kinds[name], options)[1]
            for name, block in self._A._all_blocks().items()
        }
        result = self._A._new_output(M[0].shape[-1], like=M[0])
        return apply_block_diagonal(
            self._A._full_layout(), M, result, lambda name, kind, V: blocks[name].matmat(V, kind)
        )

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
        _check_state_keys(state_dict)
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
        for key in _STATE_KEYS[1:]:  # everything but the wrapped operator's state
            value = state_dict[key]
            setattr(self, f"_{key}", dict(value) if isinstance(value, dict) else value)

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
        _check_state_keys(state_dict)
        # the constructor's keyword arguments are the hyper-parameter keys of the checkpoint
        inverse = cls(A, **{key: state_dict[key] for key in _STATE_KEYS[1:7]})
        inverse.load_state_dict(state_dict)
        return inverse
