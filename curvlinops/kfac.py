r"""Kronecker-factored approximate curvature (KFAC).

For a layer with weight :math:`\mathbf{W} \in \mathbb{R}^{d_\text{out} \times d_\text{in}}`
(convolution weights flattened over their last axes), inputs :math:`\mathbf{x}` and output
gradients :math:`\mathbf{g}`, KFAC approximates the layer's block of the Fisher/GGN by

.. math::
    \mathbf{G} \otimes \mathbf{A},\quad
    \mathbf{A} = \frac{1}{N s} \sum_{n, t} \hat{\mathbf{x}}_{n,t} \hat{\mathbf{x}}_{n,t}^\top,
    \quad
    \mathbf{G} = \sum_{n, t, v} \hat{\mathbf{g}}_{n,t,v} \hat{\mathbf{g}}_{n,t,v}^\top,

in the row-major flattening of :math:`\mathbf{W}` (so :math:`\mathbf{V} \mapsto \mathbf{G}
\mathbf{V} \mathbf{A}`). :math:`t` runs over the :math:`s` positions that share the weight
(sequence positions of a ``Linear``, output locations of a convolution whose inputs are
unfolded into patches). ``KFACType.EXPAND`` treats every position as an example;
``KFACType.REDUCE`` averages the inputs and sums the output gradients over the positions first
(:math:`s = 1`). Biases use :math:`\mathbf{G}` alone, or join the weight when
``separate_weight_and_bias=False`` (a constant 1 is appended to every input).

The output gradients :math:`\hat{\mathbf{g}}` are backpropagated from the flattened output
``[R, C]`` (rows = loss terms) with the vectors :math:`v` that define the curvature:

- ``TYPE2``: the :math:`C` columns of a square root of the loss Hessian per row (exact GGN
  for linear networks);
- ``MC``: ``mc_samples`` sampled gradients whose outer products average to the loss Hessian
  (the same samples as :class:`~curvlinops.FisherMCLinearOperator` with the same seed);
- ``EMPIRICAL``: the gradients at the true labels;
- ``FORWARD_ONLY``: no backward pass, :math:`\mathbf{G} = \mathbf{I}`.

They are scaled so that the sum above equals :math:`\kappa \sum \mathbf{g}\mathbf{g}^\top`
with :math:`\kappa = 1/M` for ``reduction='sum'`` and :math:`\kappa = (BR)^2 / (NMR)` for
``'mean'`` applied to the gradients of the mean-reduced loss (:math:`R` loss terms per datum,
:math:`M` samples, and the :math:`\sqrt{C}` correction for mean MSE/BCE).

**Structure.** The factors come from one :class:`~curvlinops._layer_pass.LayerPass` per
pass over the data (each layer's input turned into its factor contribution right away, the
vectors above backpropagated to all layer outputs in one batched call); the operator is the
block-diagonal composition of one :class:`~curvlinops._blocks.KroneckerBlock` per layer,
built on demand from the live factor dicts, which also gives the trace, determinants, norm
and (in :class:`~curvlinops.KFACInverseLinearOperator`) the damped inverses.
"""

from enum import Enum, EnumMeta
from math import sqrt
from typing import Callable, Dict, Iterator, List, Optional, Union

from torch import Tensor, nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from curvlinops import _distributed
from curvlinops._blocks import (
    Block,
    BlockDiagonalMixin,
    EmbeddingBlock,
    KroneckerBlock,
    Slot,
    block_layout,
)
from curvlinops._calls import find_units
from curvlinops._fallback import FallbackMixin, check_fallback
from curvlinops._kfac_factors import (
    input_factor,
    rows_with_ones,
)
from curvlinops._kfac_state import KFACStateMixin, check_numeric_arguments
from curvlinops._kfac_units import KFACUnitsMixin
from curvlinops._layer_pass import (
    LayerBatch,
    LayerPass,
    layer_rows,
    map_parameters,
    raise_unsupported,
)
from curvlinops._losses import MonteCarloSampling, loss_strategy
from curvlinops._torch_base import CurvatureLinearOperator
from curvlinops.utils import allclose_report

FactorType = Optional[Tensor]


class MetaEnum(EnumMeta):
    """Enum metaclass whose ``in`` accepts members and member values and never raises."""

    def __contains__(cls, item) -> bool:
        try:
            cls(item)
        except Exception:  # noqa: BLE001 (membership must not raise for any input)
            return False
        return True


class FisherType(str, Enum, metaclass=MetaEnum):
    """Which curvature KFAC approximates (how output gradients are backpropagated)."""

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"
    FORWARD_ONLY = "forward-only"


class KFACType(str, Enum, metaclass=MetaEnum):
    """How weight sharing is handled (Eschenhagen et al., 2023)."""

    EXPAND = "expand"
    REDUCE = "reduce"


class _ParsedEnum:
    """An attribute holding a value as passed, whose enum member is parsed on assignment.

    Reading returns the value as passed (string or member); the member is stored in the
    attribute named ``member_attribute``, so code uses it without parsing again.
    """

    def __init__(self, enum: type, member_attribute: str):
        self.enum, self.member_attribute = enum, member_attribute

    def __set_name__(self, owner, name: str):
        self.value_attribute = f"{name}_value"

    def __get__(self, instance, owner=None):
        return self if instance is None else getattr(instance, self.value_attribute)

    def __set__(self, instance, value):
        setattr(instance, self.member_attribute, self.enum(value))
        setattr(instance, self.value_attribute, value)


def _check_choices(cls, loss_func, fisher_type, mc_samples, kfac_approx):
    """The constructor's checks of loss, enums and flags, in the contract's order.

    Raises:
        ValueError: See :meth:`KFACLinearOperator.__init__`.
    """
    if not isinstance(loss_func, cls._SUPPORTED_LOSSES):
        raise ValueError(
            f"Invalid loss {type(loss_func).__name__}; supported losses: "
            f"{[c.__name__ for c in cls._SUPPORTED_LOSSES]}."
        )
    if fisher_type not in cls._SUPPORTED_FISHER_TYPE:
        raise ValueError(
            f"Invalid fisher_type {fisher_type!r}; supported: "
            f"{[FisherType(t).value for t in cls._SUPPORTED_FISHER_TYPE]}."
        )
    if mc_samples != 1 and fisher_type != FisherType.MC:
        raise ValueError(
            f"mc_samples={mc_samples} only makes sense with fisher_type='mc', got "
            f"fisher_type={FisherType(fisher_type).value!r}. Leave mc_samples=1."
        )
    if kfac_approx not in cls._SUPPORTED_KFAC_APPROX:
        raise ValueError(
            f"Invalid kfac_approx {kfac_approx!r}; supported: {[t.value for t in KFACType]}."
        )


def _check_flag(separate_weight_and_bias):
    """Raise ``ValueError`` unless ``separate_weight_and_bias`` is a boolean."""
    if not isinstance(separate_weight_and_bias, bool) and separate_weight_and_bias not in (0, 1):
        raise ValueError(
            f"separate_weight_and_bias must be True or False, got {separate_weight_and_bias!r}."
        )


class KFACLinearOperator(
    MonteCarloSampling,
    FallbackMixin,
    KFACUnitsMixin,
    KFACStateMixin,
    BlockDiagonalMixin,
    CurvatureLinearOperator,
):
    r"""Kronecker-factored approximation of the Fisher/GGN (block-diagonal over layers).

    See the module docstring for the mathematics. Each block maps a weight
    :math:`\mathbf{V}` (``[d_out, d_in]``) to :math:`\mathbf{G}\mathbf{V}\mathbf{A}`, a bias
    :math:`\mathbf{v}` to :math:`\mathbf{G}\mathbf{v}`; cross-layer blocks are zero.
    Supports ``nn.Linear`` (any leading axes) and ``nn.Conv1d/2d/3d`` layers, ``MSELoss``,
    ``CrossEntropyLoss`` and ``BCEWithLogitsLoss`` with mean or sum reduction, outputs with
    extra (sequence) axes and dict inputs.

    The factors live in ``_input_covariances`` (A, per module with a weight in ``params``) and
    ``_gradient_covariances`` (G, per module), keyed by module name; products read them live.

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    SELF_ADJOINT: bool = True
    _SUPPORTED_LOSSES = (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss)
    _SUPPORTED_MODULES = (nn.Linear, nn.Conv2d)
    _SUPPORTED_FISHER_TYPE = FisherType
    _SUPPORTED_KFAC_APPROX = KFACType
    #: Whether the blocks have Kronecker factors that can be damped separately.
    _FACTOR_DAMPING = True
    #: Whether units used by calls (functional linears, attention projections, embeddings,
    #: shared weights) are supported, see :mod:`curvlinops._calls`; else modules only.
    _CALL_UNITS = True

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: Union[MSELoss, CrossEntropyLoss, BCEWithLogitsLoss],
        params: List[Tensor],
        data,
        progressbar: bool = False,
        check_deterministic: bool = True,
        seed: int = 2147483647,
        fisher_type: str = FisherType.MC,
        mc_samples: int = 1,
        kfac_approx: str = KFACType.EXPAND,
        num_per_example_loss_terms: Optional[int] = None,
        separate_weight_and_bias: bool = True,
        num_data: Optional[int] = None,
        batch_size_fn: Optional[Callable] = None,
        fallback: str = "error",
    ):
        """Set up the operator (the factors are computed lazily or by the check).

        Args:
            model_func: The network (an ``nn.Module``).
            loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
            params: Weights and biases of supported layers (any subset, any order).
            data: Re-iterable batches ``(X, y)``.
            progressbar: Show progress bars.
            check_deterministic: Check determinism at construction (computes the factors).
            seed: Seed of the generator for Monte-Carlo samples.
            fisher_type: A :class:`FisherType` (or its value).
            mc_samples: Number of Monte-Carlo samples (only with ``FisherType.MC``).
            kfac_approx: A :class:`KFACType` (or its value).
            num_per_example_loss_terms: Loss terms (rows) per datum; inferred if ``None``.
            separate_weight_and_bias: Treat weight and bias of a layer as separate blocks.
            num_data: Number of data points; one pass over the data if ``None``.
            batch_size_fn: Number of data points of a batch input (needed for dict inputs).
            fallback: ``"error"`` (default): a parameter without Kronecker structure raises
                ``NotImplementedError``; ``"diagonal"``: it gets the exact diagonal block of
                the approximated curvature (see :mod:`curvlinops._fallback`), as does an
                embedding table tied to a linear head.

        Raises:
            ValueError: For an unsupported loss, Fisher type or KFAC type, ``mc_samples != 1``
                without ``FisherType.MC``, a ``seed`` that is not an integer, ``mc_samples``
                or ``num_per_example_loss_terms`` that is not a positive integer, a
                non-boolean ``separate_weight_and_bias``, dict inputs without
                ``batch_size_fn``, or a non-integer number of loss terms per datum (inferred;
                an explicit count that does not match a batch's output rows raises when the
                factors are computed with mean reduction).
            NotImplementedError: If a parameter does not belong to a supported layer, or the
                loss uses options that sampling ignores.
        """
        _check_choices(type(self), loss_func, fisher_type, mc_samples, kfac_approx)
        check_numeric_arguments(seed, mc_samples, num_per_example_loss_terms)
        _check_flag(separate_weight_and_bias)
        forward_only = FisherType(fisher_type) == FisherType.FORWARD_ONLY
        self._init_sampling(loss_func, seed, mc_samples, type(self).__name__, not forward_only)
        check_fallback(fallback, forward_only)
        self._set_up_units(params, model_func, fallback)
        self._fisher_type, self._kfac_approx = fisher_type, kfac_approx
        self._separate_weight_and_bias = separate_weight_and_bias
        self._initialize_storage()
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
        )
        self._num_per_example_loss_terms = (
            self._infer_num_per_example_loss_terms()
            if num_per_example_loss_terms is None
            else num_per_example_loss_terms
        )
        if fallback == "diagonal" and self._mapping:
            self._demote_units()

    # ----------------------------------------------------------------- set-up
    # The contract keeps the values as passed; their members are parsed once per assignment.
    _fisher_type = _ParsedEnum(FisherType, "_fisher")
    _kfac_approx = _ParsedEnum(KFACType, "_approx")

    @classmethod
    def compute_parameter_mapping(
        cls, params: List[Tensor], model_func: nn.Module
    ) -> Dict[str, Dict[str, int]]:
        """Map supported layers to the positions of their weight/bias in ``params``.

        Parameters are matched by object identity.

        Args:
            params: The parameters.
            model_func: The network.

        Returns:
            ``{module_name: {"weight": position, "bias": position}}`` (present entries only),
            in the order of ``model_func.named_modules()``.

        Raises:
            NotImplementedError: If a parameter is not the weight or bias of a supported
                layer (the message names the layer and its type).
        """
        if not cls._CALL_UNITS:
            return map_parameters(params, model_func)
        mapping, _, missing = find_units(params, model_func)
        if missing:
            supported = ["Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "MultiheadAttention"]
            raise_unsupported(params, model_func, missing, supported)
        return mapping

    def _initialize_storage(self):
        """Empty factor dicts and property caches."""
        self._input_covariances: Dict[str, Tensor] = {}
        self._gradient_covariances: Dict[str, Tensor] = {}
        self._fallback_diagonals: Dict[str, Tensor] = {}
        self._reset_properties()

    def _infer_num_per_example_loss_terms(self) -> int:
        strategy = loss_strategy(self._loss_func)
        total = sum(
            strategy.num_rows(y) for _, y in self._loop_over_data(desc="num_per_example_loss_terms")
        )
        total = _distributed.all_reduce_int(total, self._process_group, "Counting loss terms")
        if total % self._N_data != 0:
            raise ValueError(
                f"Cannot infer num_per_example_loss_terms: {total} loss terms over "
                f"{self._N_data} data points is not an integer. Pass it explicitly."
            )
        return total // self._N_data

    def _reset_properties(self):
        self._trace: Optional[Tensor] = None
        self._det: Optional[Tensor] = None
        self._logdet: Optional[Tensor] = None
        self._frobenius_norm: Optional[Tensor] = None

    def _layout(self) -> List[Slot]:
        """The diagonal blocks ``(module name, kind, parameter positions)``, in module order."""
        return block_layout(self._mapping, self._separate_weight_and_bias)

    def _joint(self, name: str) -> bool:
        entry = self._mapping[name]
        return "weight" in entry and "bias" in entry and not self._separate_weight_and_bias

    # ----------------------------------------------------------------- sampling
    def draw_label(self, output: Tensor) -> Tensor:
        """Sample labels from the likelihood the loss defines (operator's generator).

        Args:
            output: 2-d output ``[R, C]``.

        Returns:
            MSE: ``output + sqrt(0.5) * noise``; CE: class indices ``[R]``; BCE: 0/1 floats.
            The torch calls are those of 3.0.1 (API contract, section 20).

        Raises:
            ValueError: If ``output`` is not 2-d.
            NotImplementedError: For unsupported losses.
        """
        strategy = loss_strategy(self._loss_func, "draw_label")
        return strategy.draw_label(output.detach(), self._sampling_generator())

    # ----------------------------------------------------------------- layer pass
    def _vectors(self, X, y: Tensor, output: Tensor, f_flat: Tensor, y_flat: Tensor) -> Tensor:
        """Vectors backpropagated from the flattened output, ``[V, R, C]``, scaled (see module)."""
        strategy = loss_strategy(self._loss_func)
        f = f_flat.detach()
        if self._fisher == FisherType.TYPE2:
            strategy.check_targets(y, f"{type(self).__name__} (fisher_type='type-2')")
            vectors, num_samples = strategy.hessian_sqrt_columns(f), 1
        elif self._fisher == FisherType.MC:
            vectors = strategy.label_grad_samples(f, self._mc_samples, self._generator)
            num_samples = self._mc_samples
        else:
            vectors, num_samples = strategy.row_gradients(f, y_flat).unsqueeze(0), 1
        # rows the loss ignores (ignore_index) contribute nothing
        vectors = strategy.mask_rows(vectors, y_flat)
        # the vectors are new tensors here (samples, products, gradients), so they are scaled
        # in place: no second [V, R, C] tensor next to them
        if self._loss_func.reduction == "sum":
            return vectors.div_(sqrt(num_samples))
        B, R = self._batch_size_fn(X), self._num_per_example_loss_terms
        if f.shape[0] != B * R:
            # the mean-reduction scaling assumes R loss terms (output rows) per data point
            raise ValueError(
                f"num_per_example_loss_terms={R}, but a batch of {B} data points has "
                f"{f.shape[0]} loss terms (output rows), not {B * R}. Pass the number of "
                "output rows per data point, or None to infer it from the labels."
            )
        if strategy.counted_rows(y_flat) is not None:
            # mean over the counted rows of the batch, weighted by B / N (= kappa / c_b^2
            # below when all rows count)
            count = strategy.normalization(f, y_flat)
            return vectors.mul_(sqrt(B / (self._N_data * num_samples * count)))
        kappa = (B * R) ** 2 / (self._N_data * num_samples * R)
        # gradient of the mean-reduced loss, with the sqrt(C) correction for MSE/BCE
        scale = sqrt(kappa) * strategy.mean_correction(f.shape[1]) / strategy.normalization(f)
        return vectors.mul_(scale)

    def _layer_pass(
        self, input_names: List[str], input_fn: Callable[[str, Tensor], Tensor], desc: str
    ) -> Iterator[LayerBatch]:
        """One pass over the data with the operator's vectors (none for forward-only).

        Raises:
            NotImplementedError: If a mapped layer is called more than once per forward pass.
        """
        forward_only = self._fisher == FisherType.FORWARD_ONLY
        if not forward_only:
            self._start_pass()
        strategy = loss_strategy(self._loss_func)
        layers = {name: self._modules[name] for name in self._mapping}
        layer_pass = LayerPass(
            self._model_func,
            layers,
            strategy.to_rows,
            strategy.flatten_labels,
            self.MAX_COLUMNS_PER_CHUNK,
        )
        vectors = None if forward_only else self._vectors
        for batch in layer_pass.run(
            self._loop_over_data(desc=desc), input_names, input_fn, vectors
        ):
            if batch.reused:
                name = batch.reused[0]
                raise NotImplementedError(
                    f"Module {name!r} ({type(self._modules[name]).__name__}) is called more "
                    "than once per forward pass; KFAC supports each layer once. Remove its "
                    "parameters from params."
                )
            yield batch

    def _layer_rows(self, name: str, x: Tensor, reduce: bool, append_ones: bool = True) -> Tensor:
        """A layer input as rows ``[B, S, d_in']`` (``S = 1`` if reduced; ones if joint)."""
        rows = layer_rows(self._modules[name], x, reduce)
        return rows_with_ones(rows) if append_ones and self._joint(name) else rows

    def _input_factor(self, name: str, x: Tensor) -> Tensor:
        """A batch's contribution to the input factor (see :func:`input_factor`)."""
        reduce = self._approx == KFACType.REDUCE
        return input_factor(self._modules[name], x, reduce, self._joint(name), self._N_data)

    # ----------------------------------------------------------------- factors
    def _maybe_compute_kronecker_factors(self):
        """Compute the factors if both factor dicts are empty."""
        if not self._input_covariances and not self._gradient_covariances:
            if not (self._fallback_diagonals and not self._mapping):
                self.compute_kronecker_factors()

    # ----------------------------------------------------------------- blocks
    def _layer_block(self, name: str) -> Block:
        """The block of module ``name``, built from the live factors (computed if missing).

        Raises:
            ValueError: If ``name`` is not a module of this operator.
        """
        if name not in self._mapping and name not in self._fallback_names.values():
            raise ValueError(
                f"Unknown module name {name!r}; the KFAC operator has {list(self._mapping)}."
            )
        return self._all_blocks()[name]

    def _layer_blocks(self) -> Dict[str, Block]:
        """One :class:`~curvlinops._blocks.KroneckerBlock` per module (live factors)."""
        self._maybe_compute_kronecker_factors()
        return {
            name: (EmbeddingBlock if self._units[name].kind == "embedding" else KroneckerBlock)(
                name, self._gradient_covariances[name], self._input_covariances.get(name)
            )
            for name in self._mapping
        }

    def _prepare_compile(self):
        """Compute the factors eagerly: their hooks and autograd passes are not traced."""
        self._layer_blocks()

    # ----------------------------------------------------------------- determinism
    def _has_factors(self) -> bool:
        return bool(self._input_covariances or self._gradient_covariances)

    def _check_deterministic(self):
        """The base checks (which compute the factors), then a second factor computation.

        Factors that existed before the check (loaded from a checkpoint) are kept: only the
        base checks run then, so a checkpoint is never overwritten by a recomputation.

        Raises:
            RuntimeError: If data, model, or the Kronecker factors are not deterministic.
        """
        loaded = self._has_factors()
        super()._check_deterministic()
        if loaded:
            return
        first = self._factor_snapshot()
        self._recompute()
        second = self._factor_snapshot()
        for key in first:
            if first[key].shape != second[key].shape or not allclose_report(
                first[key], second[key], rtol=5e-5, atol=1e-6, max_mismatches_printed=10
            ):
                raise RuntimeError(
                    f"Non-deterministic {key} detected (two computations differ). Use "
                    "model.eval() and deterministic data, or pass check_deterministic=False."
                )

    def _factor_snapshot(self) -> Dict[str, Tensor]:
        snapshot = {f"input covariance {k}": v.clone() for k, v in self._input_covariances.items()}
        snapshot.update(
            {f"gradient covariance {k}": v.clone() for k, v in self._gradient_covariances.items()}
        )
        snapshot.update(
            {f"fallback diagonal {k}": v.clone() for k, v in self._fallback_diagonals.items()}
        )
        return snapshot

    def _recompute(self):
        self.compute_kronecker_factors()
