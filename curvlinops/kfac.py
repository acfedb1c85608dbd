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

**How the factors are computed.** One forward pass per batch with hooks: a forward pre-hook
turns each layer's input into rows (patches for convolutions) right away, and a forward hook
keeps the layer's output as a node of the graph and hands the next layer a copy, so in-place
activations (``ReLU(inplace=True)``) cannot overwrite it. Then *one* call of
``torch.autograd.grad`` from the flattened output to all kept layer outputs computes the
output gradients of every layer, for all backpropagated vectors at once
(``is_grads_batched``, in chunks of ``MAX_COLUMNS_PER_CHUNK``). Parameter ``.grad`` fields
are never touched.
"""

import warnings
from collections.abc import Mapping
from enum import Enum, EnumMeta
from math import sqrt
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Generator, Tensor, nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from torch.nn.functional import unfold

from curvlinops._autodiff import guarded_models
from curvlinops._losses import (
    check_positive_integer,
    check_sampling_options,
    check_seed,
    draw_label,
    flatten_labels,
    kfac_mc_grad_outputs,
    loss_hessian_sqrt_columns,
    loss_strategy,
    num_terms_normalization,
    row_loss_gradients,
    seeded_generator,
    to_rows,
)
from curvlinops._torch_base import CurvatureLinearOperator
from curvlinops.kfac_utils import (
    _extract_averaged_patches_nd,
    _extract_patches_nd,
    _symmetric_padding,
)
from curvlinops.utils import allclose_report

FactorType = Optional[Tensor]

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Beyond the contract's _SUPPORTED_MODULES: 1-d and 3-d convolutions share the patch maths.
_KFAC_MODULES = (nn.Linear, *_CONV_MODULES)


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


# A block of the block-diagonal approximation: (module name, kind, parameter positions) with
# kind "weight", "bias" (G alone) or "joint" (weight and bias, ones appended to the inputs).
Block = Tuple[str, str, Tuple[int, ...]]


def block_left(L: Tensor, V: Tensor) -> Tensor:
    """``L @ V`` for a block ``V`` of shape ``[o, n]`` or, columns last, ``[o, n, K]``."""
    if V.ndim == 2:
        return L @ V
    return (L @ V.reshape(V.shape[0], -1)).view(L.shape[0], *V.shape[1:])


def block_right(V: Tensor, R: Tensor) -> Tensor:
    """``V @ R`` for a block ``V`` of shape ``[o, n]`` or, columns last, ``[o, n, K]``.

    The columns-last case makes one transposing copy and then a single large matrix product,
    instead of ``K`` broadcast products.
    """
    if V.ndim == 2:
        return V @ R
    o, n, K = V.shape
    return (V.transpose(1, 2).reshape(o * K, n) @ R).view(o, K, -1).transpose(1, 2)


def block_scale(V: Tensor, S: Tensor) -> Tensor:
    """Entry-wise ``V * S`` with ``S`` of shape ``[o, n]`` (broadcast over columns)."""
    return V * (S if V.ndim == 2 else S.unsqueeze(-1))


class KFACLinearOperator(CurvatureLinearOperator):
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
        if not isinstance(loss_func, self._SUPPORTED_LOSSES):
            raise ValueError(
                f"Invalid loss {type(loss_func).__name__}; supported losses: "
                f"{[c.__name__ for c in self._SUPPORTED_LOSSES]}."
            )
        if fisher_type not in self._SUPPORTED_FISHER_TYPE:
            raise ValueError(
                f"Invalid fisher_type {fisher_type!r}; supported: "
                f"{[FisherType(t).value for t in self._SUPPORTED_FISHER_TYPE]}."
            )
        if mc_samples != 1 and fisher_type != FisherType.MC:
            raise ValueError(
                f"mc_samples={mc_samples} only makes sense with fisher_type='mc', got "
                f"fisher_type={FisherType(fisher_type).value!r}. Leave mc_samples=1."
            )
        if kfac_approx not in self._SUPPORTED_KFAC_APPROX:
            raise ValueError(
                f"Invalid kfac_approx {kfac_approx!r}; supported: {[t.value for t in KFACType]}."
            )
        self._check_arguments(seed, mc_samples, num_per_example_loss_terms)
        if not isinstance(separate_weight_and_bias, bool) and separate_weight_and_bias not in (
            0,
            1,
        ):
            raise ValueError(
                f"separate_weight_and_bias must be True or False, got {separate_weight_and_bias!r}."
            )
        if FisherType(fisher_type) != FisherType.FORWARD_ONLY:
            check_sampling_options(loss_func, type(self).__name__)
        self._mapping = self.compute_parameter_mapping(params, model_func)
        self._modules = dict(model_func.named_modules())
        self._seed = seed
        self._generator: Optional[Generator] = None
        self._fisher_type = fisher_type
        self._mc_samples = mc_samples
        self._kfac_approx = kfac_approx
        self._separate_weight_and_bias = separate_weight_and_bias
        self._initialize_storage()
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=False,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
        )
        self._num_per_example_loss_terms = (
            self._infer_num_per_example_loss_terms()
            if num_per_example_loss_terms is None
            else num_per_example_loss_terms
        )
        if check_deterministic:
            self._check_deterministic()

    # ----------------------------------------------------------------- set-up
    @staticmethod
    def _check_arguments(seed, mc_samples, num_per_example_loss_terms):
        """Range checks of the numeric constructor arguments.

        Raises:
            ValueError: If ``seed`` is not an integer seed, ``mc_samples`` is not a positive
                integer, or ``num_per_example_loss_terms`` is neither ``None`` nor a positive
                integer.
        """
        check_seed(seed)
        check_positive_integer(
            mc_samples, "mc_samples", "It is the number of Monte-Carlo samples per loss term."
        )
        if num_per_example_loss_terms is not None:
            check_positive_integer(
                num_per_example_loss_terms,
                "num_per_example_loss_terms",
                "It is the number of loss terms (output rows) per data point; pass None to "
                "infer it from the labels.",
            )

    @classmethod
    def compute_parameter_mapping(
        cls, params: List[Tensor], model_func: nn.Module
    ) -> Dict[str, Dict[str, int]]:
        """Map supported layers to the positions of their weight/bias in ``params``.

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
        positions = {p.data_ptr(): i for i, p in enumerate(params)}
        mapping: Dict[str, Dict[str, int]] = {}
        found = set()
        for name, module in model_func.named_modules():
            if (
                not isinstance(module, _KFAC_MODULES)
                or getattr(module, "padding_mode", "zeros") != "zeros"
            ):  # patches assume zero padding
                continue
            entry = {}
            for kind in ("weight", "bias"):
                p = getattr(module, kind, None)
                if p is not None and p.data_ptr() in positions:
                    entry[kind] = positions[p.data_ptr()]
                    found.add(entry[kind])
            if entry:
                mapping[name] = entry
        missing = [i for i in range(len(params)) if i not in found]
        if missing:
            owners = []
            for name, module in model_func.named_modules():
                for p_name, p in module.named_parameters(recurse=False):
                    if p.data_ptr() in {params[i].data_ptr() for i in missing}:
                        mode = getattr(module, "padding_mode", "zeros")
                        detail = "" if mode == "zeros" else f", padding_mode={mode!r}"
                        owners.append(f"{name}.{p_name} ({type(module).__name__}{detail})")
            where = ", ".join(owners) if owners else f"positions {missing} (not in the model)"
            raise NotImplementedError(
                f"KFAC supports parameters of {[c.__name__ for c in _KFAC_MODULES]} (zero "
                "padding) only; "
                f"unsupported: {where}. Remove these from params."
            )
        return mapping

    def _initialize_storage(self):
        """Empty factor dicts and property caches."""
        self._input_covariances: Dict[str, Tensor] = {}
        self._gradient_covariances: Dict[str, Tensor] = {}
        self._reset_properties()

    def _infer_num_per_example_loss_terms(self) -> int:
        total = 0
        for _, y in self._loop_over_data(desc="num_per_example_loss_terms"):
            total += loss_strategy(self._loss_func).num_rows(y)
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

    def _blocks(self) -> List[Block]:
        """The diagonal blocks, in module order."""
        blocks = []
        for name, entry in self._mapping.items():
            if "weight" in entry and "bias" in entry and not self._separate_weight_and_bias:
                blocks.append((name, "joint", (entry["weight"], entry["bias"])))
                continue
            if "weight" in entry:
                blocks.append((name, "weight", (entry["weight"],)))
            if "bias" in entry:
                blocks.append((name, "bias", (entry["bias"],)))
        return blocks

    def _joint(self, name: str) -> bool:
        entry = self._mapping[name]
        return "weight" in entry and "bias" in entry and not self._separate_weight_and_bias

    # ----------------------------------------------------------------- sampling
    def _reseed_generator(self):
        self._generator = seeded_generator(self._generator, self.device, self._seed)

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
        if output.ndim != 2:
            raise ValueError(
                "Only 2d outputs [R, C] are supported by draw_label (a 2-d output is needed), "
                f"got shape {list(output.shape)}."
            )
        if self._generator is None:
            self._reseed_generator()
        return draw_label(self._loss_func, output.detach(), self._generator)

    def _mc_vectors(self, f: Tensor) -> Tensor:
        """Monte-Carlo output gradients ``[M, R, C]``: ``M`` label draws in turn (section 20)."""
        return kfac_mc_grad_outputs(self._loss_func, f, self._mc_samples, self._generator)

    # ----------------------------------------------------------------- data passes
    def _cotangents(self, X, y: Tensor, f_flat: Tensor, y_flat: Tensor) -> Tensor:
        """Vectors backpropagated from the flattened output, ``[V, R, C]``, scaled (see module)."""
        fisher_type = FisherType(self._fisher_type)
        loss_func = self._loss_func
        f = f_flat.detach()
        if fisher_type == FisherType.TYPE2:
            loss_strategy(loss_func).check_targets(
                y, f"{type(self).__name__} (fisher_type='type-2')"
            )
            vectors, num_samples = loss_hessian_sqrt_columns(loss_func, f), 1
        elif fisher_type == FisherType.MC:
            vectors = self._mc_vectors(f)
            num_samples = self._mc_samples
        else:
            vectors, num_samples = row_loss_gradients(loss_func, f, y_flat).unsqueeze(0), 1
        if loss_func.reduction == "sum":
            return vectors / sqrt(num_samples)
        B, R = self._batch_size_fn(X), self._num_per_example_loss_terms
        if f.shape[0] != B * R:
            # the mean-reduction scaling assumes R loss terms (output rows) per data point
            raise ValueError(
                f"num_per_example_loss_terms={R}, but a batch of {B} data points has "
                f"{f.shape[0]} loss terms (output rows), not {B * R}. Pass the number of "
                "output rows per data point, or None to infer it from the labels."
            )
        kappa = (B * R) ** 2 / (self._N_data * num_samples * R)
        # gradient of the mean-reduced loss, with the sqrt(C) correction for MSE/BCE
        correction = loss_strategy(loss_func).mean_correction(f.shape[1])
        return vectors * (sqrt(kappa) * correction / num_terms_normalization(loss_func, f))

    def _layer_rows(self, name: str, x: Tensor, reduce: bool, append_ones: bool = True) -> Tensor:
        """A layer input as rows ``[B, S, d_in']`` (``S = 1`` if reduced; ones if joint)."""
        module = self._modules[name]
        if isinstance(module, _CONV_MODULES):
            args = (
                x,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
            )
            rows = (
                _extract_averaged_patches_nd(*args).unsqueeze(1)
                if reduce
                else _extract_patches_nd(*args)
            )
        else:
            rows = x.reshape(x.shape[0], -1, x.shape[-1])
            if reduce:
                rows = rows.mean(1, keepdim=True)
        if append_ones and self._joint(name):
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
        return rows

    def _input_factor(self, name: str, x: Tensor) -> Tensor:
        """A batch's contribution to the input factor, from the layer input ``x``.

        Computed from the rows without appending the bias ones (their block follows from the
        row sums), and for ``Conv2d`` in the expand setting from ``F.unfold``'s
        channels-first layout, which avoids a transposing copy of all patches.
        """
        module = self._modules[name]
        reduce = KFACType(self._kfac_approx) == KFACType.REDUCE
        if isinstance(module, nn.Conv2d) and not reduce:
            if module.groups > 1:
                B, C = x.shape[:2]
                x = x.reshape(B, module.groups, C // module.groups, *x.shape[2:]).mean(1)
            padding = _symmetric_padding(module.padding, module.kernel_size, module.dilation)
            U = unfold(x, module.kernel_size, module.dilation, padding, module.stride)
            d, num_rows = U.shape[1], U.shape[0] * U.shape[2]
            rows_t = U.transpose(0, 1).reshape(d, num_rows)  # [d, B * L]
            scale = 1.0 / (self._N_data * U.shape[2])
        else:
            rows = self._layer_rows(name, x, reduce, append_ones=False)
            scale = 1.0 / (self._N_data * rows.shape[1])
            rows_t = rows.reshape(-1, rows.shape[-1]).T
            d, num_rows = rows_t.shape
        # scale whichever is smaller, the rows or the factor
        prescale = rows_t.numel() < d * d
        if prescale:
            rows_t = rows_t * sqrt(scale)
        core = rows_t @ rows_t.T
        if self._joint(name):
            sums = rows_t.sum(1, keepdim=True) * (sqrt(scale) if prescale else 1.0)
            count = sums.new_full((1, 1), num_rows * (scale if prescale else 1.0))
            core = torch.cat([torch.cat([core, sums], 1), torch.cat([sums.T, count], 1)], 0)
        return core if prescale else core.mul_(scale)

    @staticmethod
    def _output_gradient_rows(module: nn.Module, g: Tensor) -> Tensor:
        """Output gradients ``[V, B, *out]`` as rows ``[V, B, S, d_out]``."""
        if isinstance(module, _CONV_MODULES):
            g = g.movedim(2, -1)
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])

    def _layer_quantities(
        self, input_names: List[str], input_fn: Callable[[str, Tensor], Tensor], desc: str
    ) -> Iterator[Tuple[Dict[str, Tensor], Optional[Dict[str, Tensor]]]]:
        """One pass over the data yielding, per batch, layer input data and output gradients.

        Args:
            input_names: Modules whose inputs are needed.
            input_fn: Maps a module name and its (detached) input to what is kept, e.g. the
                rows ``[B, S, d_in']`` or the batch's input factor.
            desc: Progress bar label.

        Yields:
            ``(inputs, grads)``: ``inputs[name]`` = ``input_fn(name, x)``; ``grads[name]``
            ``[V, B, S, d_out]`` (unreduced, scaled as in the module docstring) for every
            mapped module, or ``None`` for ``FisherType.FORWARD_ONLY``.
        """
        need_grads = FisherType(self._fisher_type) != FisherType.FORWARD_ONLY
        if need_grads:
            self._reseed_generator()
        # the model is locked and its buffers (e.g. BatchNorm's running statistics) restored
        # after the pass, even on errors, also when called outside a product or constructor
        with guarded_models([self._model_func]):
            yield from self._layer_quantities_pass(input_names, input_fn, desc, need_grads)

    def _layer_quantities_pass(
        self,
        input_names: List[str],
        input_fn: Callable[[str, Tensor], Tensor],
        desc: str,
        need_grads: bool,
    ) -> Iterator[Tuple[Dict[str, Tensor], Optional[Dict[str, Tensor]]]]:
        """The pass of :meth:`_layer_quantities` (hooks removed after each forward pass)."""
        for X, y in self._loop_over_data(desc=desc):
            inputs: Dict[str, Tensor] = {}
            outputs: Dict[str, Tensor] = {}
            handles = []

            def store_input(name, inputs=inputs):
                def hook(module, args):
                    if len(args) != 1:
                        raise ValueError(
                            f"KFAC expects one positional input for module {name!r} "
                            f"({type(module).__name__}), got {len(args)}."
                        )
                    if name in inputs:
                        raise NotImplementedError(
                            f"Module {name!r} ({type(module).__name__}) is called more than once "
                            "per forward pass; KFAC supports each layer once. Remove its "
                            "parameters from params."
                        )
                    inputs[name] = input_fn(name, args[0].detach())

                return hook

            def store_output(name, outputs=outputs):
                def hook(module, args, layer_output):
                    if name in outputs:
                        raise NotImplementedError(
                            f"Module {name!r} ({type(module).__name__}) is called more than once "
                            "per forward pass; KFAC supports each layer once. Remove its "
                            "parameters from params."
                        )
                    outputs[name] = layer_output
                    # the next layer gets a copy, so in-place ops cannot overwrite the node
                    return layer_output.clone()

                return hook

            try:
                for name in input_names:
                    handles.append(self._modules[name].register_forward_pre_hook(store_input(name)))
                if need_grads:
                    for name in self._mapping:
                        handles.append(
                            self._modules[name].register_forward_hook(store_output(name))
                        )
                with torch.set_grad_enabled(need_grads):
                    output = self._model_func(X)
            finally:
                for handle in handles:
                    handle.remove()
            if not need_grads:
                yield inputs, None
                continue
            yield inputs, self._output_gradients(X, y, output, outputs)

    def _output_gradients(
        self, X, y: Tensor, output: Tensor, outputs: Dict[str, Tensor]
    ) -> Dict[str, Tensor]:
        """Backpropagate the cotangents to all layer outputs at once, in column chunks."""
        if not outputs:  # no mapped layer ran (reported after the pass)
            return {}
        with torch.enable_grad():
            f_flat = to_rows(self._loss_func, output)
            y_flat = flatten_labels(self._loss_func, y)
            cotangents = self._cotangents(X, y, f_flat, y_flat)
            names = list(outputs)
            chunks = []
            for chunk in cotangents.split(self.MAX_COLUMNS_PER_CHUNK):
                batched = chunk.shape[0] > 1
                grads = torch.autograd.grad(
                    f_flat,
                    [outputs[n] for n in names],
                    chunk if batched else chunk[0],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=batched,
                )
                chunks.append(
                    [
                        torch.zeros_like(outputs[n]).expand(chunk.shape[0], *outputs[n].shape)
                        if g is None
                        else (g if batched else g.unsqueeze(0)).detach()
                        for n, g in zip(names, grads)
                    ]
                )
        return {
            n: self._output_gradient_rows(self._modules[n], torch.cat(parts))
            for n, parts in zip(names, zip(*chunks))
        }

    # ----------------------------------------------------------------- factors
    def compute_kronecker_factors(self):
        """Compute the Kronecker factors with one pass over the data (resets the properties)."""
        self._reset_properties()
        self._input_covariances.clear()
        self._gradient_covariances.clear()
        reduce = KFACType(self._kfac_approx) == KFACType.REDUCE
        input_names = [n for n, e in self._mapping.items() if "weight" in e]
        A, G = {}, {}
        for inputs, grads in self._layer_quantities(
            input_names, self._input_factor, "compute_kronecker_factors"
        ):
            for name, contribution in inputs.items():
                A[name] = contribution if name not in A else A[name].add_(contribution)
            if grads is None:
                continue
            for name, g in grads.items():
                if reduce:
                    g = g.sum(2)
                flat = g.reshape(-1, g.shape[-1])
                contribution = flat.T @ flat
                G[name] = contribution if name not in G else G[name].add_(contribution)
        if FisherType(self._fisher_type) == FisherType.FORWARD_ONLY:
            for name, entry in self._mapping.items():
                param = self._params[next(iter(entry.values()))]
                G[name] = torch.eye(param.shape[0], dtype=self.dtype, device=self.device)
        missing = [
            n for n, e in self._mapping.items() if n not in G or ("weight" in e and n not in A)
        ]
        if missing:
            raise RuntimeError(
                f"The layers {missing} hold parameters in params but their forward was never "
                "called (e.g. the out_proj of nn.MultiheadAttention, whose weights are used "
                "functionally), so KFAC cannot see their inputs and outputs. Remove their "
                "parameters from params."
            )
        self._input_covariances.update(A)
        self._gradient_covariances.update(G)

    def _maybe_compute_kronecker_factors(self):
        """Compute the factors if both factor dicts are empty."""
        if not self._input_covariances and not self._gradient_covariances:
            self.compute_kronecker_factors()

    # ----------------------------------------------------------------- products
    def _apply_blocks(
        self,
        M: List[Tensor],
        apply: Callable[[str, str, Tensor], Tensor],
    ) -> List[Tensor]:
        """Apply a per-block map to a matrix in list format.

        Each block's columns are gathered into ``V``: ``[d_out, n]`` for one column, else
        ``[d_out, n, K]`` (columns last, as the input comes). A weight block has ``n = d_in'``
        (conv weights flattened over their last axes), a bias block ``n = 1``, a joint block
        ``n = d_in' + 1`` (bias as last column). ``apply(name, kind, V)`` returns a tensor of
        the same shape, best built with :func:`block_left`, :func:`block_right` and
        :func:`block_scale`; it is written into one flat output buffer.

        Args:
            M: Matrix in list format (entries ``[*p.shape, K]``).
            apply: The block map, e.g. ``V -> G @ V @ A`` for KFAC.

        Returns:
            The result in list format (views of one flat ``[D, K]`` tensor).
        """
        K = M[0].shape[-1]
        result = self._new_output(K, like=M[0])
        for name, kind, positions in self._blocks():
            parts = [M[i].reshape(M[i].shape[0], -1, K) for i in positions]
            V = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            out = apply(name, kind, V.squeeze(-1) if K == 1 else V)
            if K == 1:
                out = out.unsqueeze(-1)
            targets = [result[i].view(result[i].shape[0], -1, K) for i in positions]
            if kind == "joint":
                targets[0].copy_(out[:, :-1])
                targets[1].copy_(out[:, -1:])
            else:
                targets[0].copy_(out)
        return result

    def _prepare_compile(self):
        """Compute the factors eagerly: their hooks and autograd passes are not traced."""
        self._maybe_compute_kronecker_factors()

    def _matmat(self, M: List[Tensor]) -> List[Tensor]:
        self._maybe_compute_kronecker_factors()

        def apply(name: str, kind: str, V: Tensor) -> Tensor:
            GV = block_left(self._gradient_covariances[name], V)
            return GV if kind == "bias" else block_right(GV, self._input_covariances[name])

        return self._apply_blocks(M, apply)

    # ----------------------------------------------------------------- properties
    def _factor_pairs(self) -> Iterator[Tuple[Optional[Tensor], Tensor]]:
        """(A or None for bias blocks, G) per block."""
        self._maybe_compute_kronecker_factors()
        for name, kind, _ in self._blocks():
            A = None if kind == "bias" else self._input_covariances[name]
            yield A, self._gradient_covariances[name]

    @property
    def trace(self) -> Tensor:
        r"""Trace, :math:`\sum \mathrm{tr}(\mathbf{A})\mathrm{tr}(\mathbf{G})` over blocks."""
        if self._trace is None:
            self._trace = sum(
                G.trace() * (1.0 if A is None else A.trace()) for A, G in self._factor_pairs()
            )
        return self._trace

    @property
    def det(self) -> Tensor:
        r"""Determinant, :math:`\prod \det(\mathbf{A})^m \det(\mathbf{G})^n` over blocks."""
        if self._det is None:
            det = torch.ones((), dtype=self.dtype, device=self.device)
            for A, G in self._factor_pairs():
                n = 1 if A is None else A.shape[0]
                det = det * G.det() ** n
                if A is not None:
                    det = det * A.det() ** G.shape[0]
            self._det = det
        return self._det

    @property
    def logdet(self) -> Tensor:
        r"""Log-determinant, :math:`\sum m \log\det\mathbf{A} + n \log\det\mathbf{G}`."""
        if self._logdet is None:
            logdet = torch.zeros((), dtype=self.dtype, device=self.device)
            for A, G in self._factor_pairs():
                n = 1 if A is None else A.shape[0]
                logdet = logdet + n * G.logdet()
                if A is not None:
                    logdet = logdet + G.shape[0] * A.logdet()
            self._logdet = logdet
        return self._logdet

    @property
    def frobenius_norm(self) -> Tensor:
        r"""Frobenius norm, :math:`\sqrt{\sum \|\mathbf{A}\|_F^2 \|\mathbf{G}\|_F^2}`."""
        if self._frobenius_norm is None:
            total = sum(
                (G**2).sum() * (1.0 if A is None else (A**2).sum()) for A, G in self._factor_pairs()
            )
            self._frobenius_norm = torch.as_tensor(total).sqrt()
        return self._frobenius_norm

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
        return snapshot

    def _recompute(self):
        self.compute_kronecker_factors()

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict:
        """Everything needed to restore the operator (model parameters included).

        Enum hyper-parameters are stored as their string values, so that the checkpoint only
        holds tensors and plain Python values and ``torch.load`` reads it with its default
        ``weights_only=True``.

        Returns:
            The state dict (see the contract for its keys).
        """
        return {
            "model_func_state_dict": self._model_func.state_dict(),
            "loss_type": type(self._loss_func).__name__,
            "loss_reduction": self._loss_func.reduction,
            "progressbar": bool(self._progressbar),
            "seed": int(self._seed),
            "fisher_type": FisherType(self._fisher_type).value,
            "mc_samples": int(self._mc_samples),
            "kfac_approx": KFACType(self._kfac_approx).value,
            "num_per_example_loss_terms": int(self._num_per_example_loss_terms),
            "separate_weight_and_bias": bool(self._separate_weight_and_bias),
            "num_data": int(self._N_data),
            "input_covariances": self._input_covariances,
            "gradient_covariances": self._gradient_covariances,
            "trace": self._trace,
            "det": self._det,
            "logdet": self._logdet,
            "frobenius_norm": self._frobenius_norm,
        }

    def _check_keys(self, factors: Dict, what: str, input_side: bool):
        """Raise if a non-empty factor dict does not belong to this operator's layers."""
        expected = {n for n, e in self._mapping.items() if "weight" in e or not input_side}
        if not isinstance(factors, dict):
            raise ValueError(f"The checkpoint's {what} must be a dict, got {type(factors)}.")
        if factors and set(factors) != expected:
            raise ValueError(
                f"The checkpoint's {what} have keys {sorted(factors)}, but this operator "
                f"expects {sorted(expected)}: the checkpoint is from another model or "
                "parameter selection."
            )

    def _check_factor_shapes(self, factors: Dict, what: str, input_side: bool, separate: bool):
        """Raise if a factor does not have the size of its layer (checkpoint of other params)."""
        for name, factor in factors.items():
            entry = self._mapping[name]
            if input_side:
                weight = self._params[entry["weight"]]
                dim = weight[0].numel() + (0 if separate or "bias" not in entry else 1)
            else:
                dim = self._params[next(iter(entry.values()))].shape[0]
            if not isinstance(factor, Tensor) or tuple(factor.shape) != (dim, dim):
                shape = list(factor.shape) if isinstance(factor, Tensor) else type(factor)
                raise ValueError(
                    f"The checkpoint's {what} of module {name!r} has shape {shape}, but this "
                    f"operator's parameters need [{dim}, {dim}]: the checkpoint is from other "
                    "parameters or another separate_weight_and_bias setting."
                )

    def _check_model_state_dict(self, model_state: Dict):
        """Dry run of the model's strict ``load_state_dict``: keys and shapes, nothing copied.

        Raises:
            RuntimeError: With torch's wording ("Error(s) in loading state_dict for ...") if
                keys are missing or unexpected, or shapes differ.
        """
        if not isinstance(model_state, Mapping):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self._model_func).__name__}: "
                f"model_func_state_dict must be a mapping, got {type(model_state).__name__}."
            )
        current = self._model_func.state_dict()
        errors = []
        unexpected = [k for k in model_state if k not in current]
        missing = [k for k in current if k not in model_state]
        if unexpected:
            keys = ", ".join(f'"{k}"' for k in unexpected)
            errors.append(f"Unexpected key(s) in state_dict: {keys}. ")
        if missing:
            keys = ", ".join(f'"{k}"' for k in missing)
            errors.append(f"Missing key(s) in state_dict: {keys}. ")
        for key, value in model_state.items():
            if key not in current or not isinstance(current[key], Tensor):
                continue
            if not isinstance(value, Tensor):
                errors.append(
                    f'While copying the parameter named "{key}", expected torch.Tensor from '
                    f"checkpoint but received {type(value)}"
                )
            elif value.shape != current[key].shape:
                errors.append(
                    f"size mismatch for {key}: copying a param with shape {value.shape} from "
                    f"checkpoint, the shape in current model is {current[key].shape}."
                )
        if errors:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self._model_func).__name__}:\n\t"
                + "\n\t".join(errors)
                + "\nThe checkpoint is from another model; nothing was changed."
            )

    def _warn_overwrite(self, stacklevel: int = 3):
        warnings.warn(
            "Loading a KFAC state dict will overwrite the parameters of the model.",
            UserWarning,
            stacklevel=stacklevel,
        )

    def _validate_state_dict(self, state_dict: Dict):
        """All checks of :meth:`load_state_dict`, in the contract's order; changes nothing.

        Raises:
            ValueError: Missing keys, loss or reduction mismatch, invalid hyper-parameters,
                factors of other layers or sizes.
            RuntimeError: If the model's state dict does not fit the model.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}.")
        missing = sorted(set(KFACLinearOperator.state_dict(self)) - set(state_dict))
        if missing:
            raise ValueError(f"The checkpoint is missing the keys {missing}.")
        self._check_model_state_dict(state_dict["model_func_state_dict"])
        if type(self._loss_func).__name__ != state_dict["loss_type"]:
            raise ValueError(
                f"Loss function mismatch: the checkpoint's loss is {state_dict['loss_type']}, "
                f"this operator's loss is {type(self._loss_func).__name__}. Load it into an "
                "operator built with the same loss."
            )
        if self._loss_func.reduction != state_dict["loss_reduction"]:
            raise ValueError(
                f"Loss reduction mismatch: the checkpoint's loss reduction is "
                f"{state_dict['loss_reduction']!r}, this operator's reduction is "
                f"{self._loss_func.reduction!r}. Load it into an operator whose loss has the "
                "same reduction."
            )
        fisher_type, kfac_approx = state_dict["fisher_type"], state_dict["kfac_approx"]
        if fisher_type not in self._SUPPORTED_FISHER_TYPE:
            raise ValueError(f"The checkpoint's fisher_type {fisher_type!r} is not supported.")
        if kfac_approx not in self._SUPPORTED_KFAC_APPROX:
            raise ValueError(f"The checkpoint's kfac_approx {kfac_approx!r} is not supported.")
        self._check_arguments(
            state_dict["seed"], state_dict["mc_samples"], state_dict["num_per_example_loss_terms"]
        )
        if state_dict["mc_samples"] != 1 and fisher_type != FisherType.MC:
            raise ValueError(
                f"The checkpoint's mc_samples={state_dict['mc_samples']} needs "
                f"fisher_type='mc', got {FisherType(fisher_type).value!r}."
            )
        check_positive_integer(state_dict["num_data"], "The checkpoint's num_data")
        separate = state_dict["separate_weight_and_bias"]
        self._check_keys(state_dict["input_covariances"], "input covariances", True)
        self._check_keys(state_dict["gradient_covariances"], "gradient covariances", False)
        self._check_factor_shapes(
            state_dict["input_covariances"], "input covariance", True, separate
        )
        self._check_factor_shapes(
            state_dict["gradient_covariances"], "gradient covariance", False, separate
        )

    def _install_state_dict(self, state_dict: Dict):
        """Load the model's parameters and install the (validated) checkpoint."""
        self._model_func.load_state_dict(state_dict["model_func_state_dict"])
        self._progressbar = state_dict["progressbar"]
        self._seed = state_dict["seed"]
        self._fisher_type = state_dict["fisher_type"]
        self._mc_samples = state_dict["mc_samples"]
        self._kfac_approx = state_dict["kfac_approx"]
        self._num_per_example_loss_terms = state_dict["num_per_example_loss_terms"]
        self._separate_weight_and_bias = state_dict["separate_weight_and_bias"]
        self._N_data = state_dict["num_data"]
        self._input_covariances = dict(state_dict["input_covariances"])
        self._gradient_covariances = dict(state_dict["gradient_covariances"])
        self._trace = state_dict["trace"]
        self._det = state_dict["det"]
        self._logdet = state_dict["logdet"]
        self._frobenius_norm = state_dict["frobenius_norm"]

    def load_state_dict(self, state_dict: Dict):
        """Restore a checkpoint (overwrites the model's parameters).

        Everything is checked before anything changes (a dry run of the model's strict
        ``load_state_dict`` included): on an error, the model and the operator are left as
        they were. Checkpoints written before enums were stored as strings load as well.

        Args:
            state_dict: A dict from :meth:`state_dict`.

        Raises:
            RuntimeError: If the model's state dict does not fit the model.
            ValueError: If loss, reduction, hyper-parameters or factors do not match this
                operator.
        """
        self._warn_overwrite()
        self._validate_state_dict(state_dict)
        self._install_state_dict(state_dict)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Dict,
        model_func: nn.Module,
        params: List[Tensor],
        data,
        check_deterministic: bool = True,
        batch_size_fn: Optional[Callable] = None,
    ) -> "KFACLinearOperator":
        """Build an operator from a checkpoint.

        Args:
            state_dict: A dict from :meth:`state_dict`.
            model_func: The network (its parameters are overwritten).
            params: The parameters.
            data: The data.
            check_deterministic: Run the determinism check after loading.
            batch_size_fn: Number of data points of a batch input.

        Returns:
            The restored operator (of class ``cls``).
        """
        loss_classes = {c.__name__: c for c in cls._SUPPORTED_LOSSES}
        if state_dict.get("loss_type") not in loss_classes:
            raise ValueError(
                f"The checkpoint's loss_type {state_dict.get('loss_type')!r} is not one of "
                f"{sorted(loss_classes)}."
            )
        loss_func = loss_classes[state_dict["loss_type"]](reduction=state_dict["loss_reduction"])
        op = cls(
            model_func,
            loss_func,
            params,
            data,
            progressbar=state_dict["progressbar"],
            check_deterministic=False,
            seed=state_dict["seed"],
            fisher_type=state_dict["fisher_type"],
            mc_samples=state_dict["mc_samples"],
            kfac_approx=state_dict["kfac_approx"],
            num_per_example_loss_terms=state_dict["num_per_example_loss_terms"],
            separate_weight_and_bias=state_dict["separate_weight_and_bias"],
            num_data=state_dict["num_data"],
            batch_size_fn=batch_size_fn,
        )
        op.load_state_dict(state_dict)
        if check_deterministic:
            op._check_deterministic()
        return op
