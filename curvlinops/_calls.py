r"""Kronecker units found by the *calls* that use a weight, not by the module that owns it.

A *unit* is a weight (and optionally a bias) with one Kronecker-factored block. Units are
found statically (:func:`find_units`) and fed per batch by intercepting the functional calls
that use their tensors (:class:`CallPass`):

- every ``torch.nn.functional.linear(x, W, b)`` whose ``W`` or ``b`` is a unit tensor, i.e.
  ``nn.Linear`` modules *and* functional uses such as ``nn.MultiheadAttention``'s packed input
  projection (unit ``"<mha>.in_proj"``, weight ``in_proj_weight``, bias ``in_proj_bias``), its
  separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` (units ``"<mha>.q_proj"``,
  ...) and its output projection (the ``out_proj`` ``nn.Linear`` whose forward never runs);
- every ``torch.nn.functional.embedding(idx, W)`` of an ``nn.Embedding`` unit;
- convolutions through their module hooks (as in :class:`~curvlinops._layer_pass.LayerPass`).

The interception is a scoped replacement of the two functions in ``torch.nn.functional``
(both ``nn.Linear.forward`` and ``F.multi_head_attention_forward`` look them up there at call
time); it is undone when the forward pass ends, also on errors. PyTorch's fused
multi-head-attention fast path is disabled during the pass, so the projections are always
visible.

A weight used several times in one forward pass (a layer applied twice, or a tied parameter
held by several modules) belongs to its *first* owner in ``named_modules()`` order and
collects every use (:class:`Use`). A tensor used through slices (a packed ``in_proj_weight``
in cross-attention, where query, key and value differ and the projection is split into three
calls on views) has no single Kronecker factor: the pass raises ``NotImplementedError``.
"""

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlinops._autodiff import guarded_models
from curvlinops._fallback import per_row_squares
from curvlinops._layer_pass import (
    CONV_MODULES,
    LayerPass,
    OutputNode,
    backpropagate,
    is_supported_layer,
)


@dataclass(eq=False)
class Unit:
    """A weight (and bias) with one Kronecker block.

    Attributes:
        name: Key of the unit in ``_mapping`` and the factor dicts (module name for modules).
        kind: ``"linear"``, ``"conv"`` or ``"embedding"``.
        module: The owning module (for convolutions' patches and ``nn.Linear`` batch axes).
        weight: The weight tensor in ``params`` or ``None``.
        bias: The bias tensor in ``params`` or ``None``.
    """

    name: str
    kind: str
    module: nn.Module
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None


@dataclass
class Use:
    """One call using a unit's tensors during a forward pass.

    Attributes:
        x: The detached layer input (embedding: the indices), ``None`` if only the bias is used.
        output: The call's output as a target of differentiation (an
            :class:`~curvlinops._layer_pass.OutputNode`, shared by the uses of one call; the
            output tensor itself if it has no gradient edge), released after the backward pass.
        batch_first: Whether the input's first axis is the batch axis (module calls).
        weight: Whether the call used the unit's weight.
        bias: Whether the call used the unit's bias.
        grad: ``[V, *output.shape]`` output gradients, filled in by the backward pass.
    """

    x: Optional[Tensor]
    output: object
    batch_first: bool
    weight: bool = True
    bias: bool = False
    grad: Optional[Tensor] = None


@dataclass
class CallBatch:
    """What the call pass hands over for one batch: ``uses[unit name] -> [Use, ...]``."""

    X: object
    y: Tensor
    uses: Dict[str, List[Use]] = field(default_factory=dict)
    backpropagated: bool = False
    fallback_squares: Optional[List[Tensor]] = None


def _mha_units(name: str, module: nn.MultiheadAttention) -> List[Unit]:
    """The input-projection units of a multi-head attention module (``out_proj`` is a Linear)."""
    if module.in_proj_weight is not None or module.in_proj_bias is not None:
        packed = Unit(f"{name}.in_proj", "linear", module, module.in_proj_weight)
        packed.bias = module.in_proj_bias
        units = [packed]
    else:
        units = []
    for which in ("q", "k", "v"):
        weight = getattr(module, f"{which}_proj_weight", None)
        if weight is not None:
            units.append(Unit(f"{name}.{which}_proj", "linear", module, weight))
    return units


def _candidate_units(model: nn.Module) -> Iterator[Unit]:
    """All units of a model, in ``named_modules()`` order (tied tensors appear repeatedly)."""
    for name, module in model.named_modules():
        if is_supported_layer(module):
            kind = "conv" if isinstance(module, CONV_MODULES) else "linear"
            yield Unit(name, kind, module, module.weight, module.bias)
        elif isinstance(module, nn.Embedding):
            yield Unit(name, "embedding", module, module.weight)
        elif isinstance(module, nn.MultiheadAttention):
            yield from _mha_units(name, module)


def find_units(
    params: List[Tensor], model: nn.Module, untie_embeddings: bool = False
) -> Tuple[Dict[str, Dict[str, int]], Dict[str, Unit], List[int]]:
    """Map the units of ``model`` to the positions of their tensors in ``params``.

    Tensors are matched by object identity; a tensor held by several modules (tied weights)
    belongs to the first unit holding it. With ``untie_embeddings``, an embedding table that
    another unit holds too (a tied head) belongs to no unit.

    Returns:
        ``{unit name: {"weight": position, "bias": position}}`` (present entries only),
        ``{unit name: Unit}`` restricted to those tensors, and the positions of parameters
        that belong to no unit.
    """
    positions = {id(p): i for i, p in enumerate(params)}
    claimed = set()
    mapping: Dict[str, Dict[str, int]] = {}
    units: Dict[str, Unit] = {}
    candidates = list(_candidate_units(model))
    if untie_embeddings:
        holders: Dict[int, int] = {}
        for unit in candidates:
            for tensor in (unit.weight, unit.bias):
                if tensor is not None:
                    holders[id(tensor)] = holders.get(id(tensor), 0) + 1
        tied = {
            id(u.weight) for u in candidates if u.kind == "embedding" and holders[id(u.weight)] > 1
        }
        claimed |= tied
    for unit in candidates:
        entry = {}
        for role in ("weight", "bias"):
            tensor = getattr(unit, role)
            if tensor is None or id(tensor) in claimed or id(tensor) not in positions:
                setattr(unit, role, None)
                continue
            claimed.add(id(tensor))
            entry[role] = positions[id(tensor)]
        if entry:
            mapping[unit.name], units[unit.name] = entry, unit
    found = {id(getattr(u, r)) for u in units.values() for r in ("weight", "bias")}
    return mapping, units, [i for i in range(len(params)) if id(params[i]) not in found]


_TIED = (
    "The weight of unit {!r} is used both as an embedding table and as a linear weight (a "
    "tied head): the two uses act on transposed sides of the weight, so they share no "
    "Kronecker factor. Untie the weight, remove it from params, or pass fallback='diagonal'."
)


def probe_units(model: nn.Module, units: Dict[str, Unit], X) -> set:
    """Names of units whose calls have no Kronecker factor, from one forward pass on ``X``.

    Tied embedding/linear weights, slices of unit tensors and unsupported embedding options
    are only visible in the calls; ``fallback="diagonal"`` moves such units to the fallback.
    """
    recorder = _Recorder(model, units, record_outputs=False)
    recorder.demoted = set()
    with guarded_models([model]), recorder.active(), torch.no_grad():
        model(X)
    return recorder.demoted


class _Recorder:
    """Intercepts the calls using unit tensors during one forward pass."""

    def __init__(self, model: nn.Module, units: Dict[str, Unit], record_outputs: bool):
        self.units, self.record_outputs = units, record_outputs
        self.linear_modules = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.by_weight = {id(u.weight): u for u in units.values() if u.weight is not None}
        self.by_bias = {id(u.bias): u for u in units.values() if u.bias is not None}
        self.uses: Dict[str, List[Use]] = {}
        # probing (see probe_units): units without a Kronecker factor are collected here
        # instead of raising
        self.demoted: Optional[set] = None
        # id(nn.Linear) -> id(the input of its running forward): calls with that input have
        # the batch axis first
        self.module_inputs: Dict[int, int] = {}

    def _node(self, output: Tensor):
        """What a use keeps of the call's output: its gradient edge, not its values.

        The edge stays at the call when an in-place operation later overwrites the output,
        so the output needs no copy (and no reference that would keep it alive).
        """
        return OutputNode.of(output) if self.record_outputs else None

    def _refuse(self, unit: Unit, message: str):
        """Raise ``NotImplementedError(message)``, or note the unit when probing."""
        if self.demoted is None:
            raise NotImplementedError(message)
        self.demoted.add(unit.name)

    def _check_slices(self, *tensors):
        for tensor in tensors:
            base = getattr(tensor, "_base", None)
            if base is None:
                continue
            unit = self.by_weight.get(id(base)) or self.by_bias.get(id(base))
            if unit is not None:
                self._refuse(
                    unit,
                    f"A slice of a tensor of unit {unit.name!r} is used in a call (e.g. "
                    "nn.MultiheadAttention's packed in-projection in cross-attention, where "
                    "query, key and value differ): its slices see different inputs, so it has "
                    "no single Kronecker factor. Use self-attention (query is key is value), "
                    "kdim/vdim projections, remove the tensor from params, or pass "
                    "fallback='diagonal'.",
                )

    def linear(self, original, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None):
        output = original(x, weight, bias)
        w_unit = self.by_weight.get(id(weight))
        b_unit = self.by_bias.get(id(bias)) if bias is not None else None
        if w_unit is None and b_unit is None:
            self._check_slices(weight, *(() if bias is None else (bias,)))
            return output
        if w_unit is not None and w_unit.kind == "embedding":
            self._refuse(w_unit, _TIED.format(w_unit.name))
            return output
        batch_first = id(x) in self.module_inputs.values()
        units = [w_unit] if w_unit is not None else []
        if b_unit is not None and b_unit is not w_unit:
            units.append(b_unit)
        node = self._node(output)
        for unit in units:
            use = Use(
                x.detach() if unit is w_unit else None,
                node,
                batch_first and isinstance(unit.module, nn.Linear),
                weight=unit is w_unit,
                bias=bias is not None and unit.bias is bias,
            )
            self.uses.setdefault(unit.name, []).append(use)
        return output

    def embedding(self, original, idx: Tensor, weight: Tensor, *args, **kwargs):
        unit = self.by_weight.get(id(weight))
        if unit is None:
            return original(idx, weight, *args, **kwargs)
        if unit.kind != "embedding":
            self._refuse(unit, _TIED.format(unit.name))
            return original(idx, weight, *args, **kwargs)
        module = unit.module
        if module.max_norm is not None or module.scale_grad_by_freq:
            self._refuse(
                unit,
                f"nn.Embedding {unit.name!r} uses max_norm or scale_grad_by_freq, which KFAC "
                "does not support (renormalised rows / rescaled gradients). Remove its weight "
                "from params, disable these options, or pass fallback='diagonal'.",
            )
            return original(idx, weight, *args, **kwargs)
        output = original(idx, weight, *args, **kwargs)
        self.uses.setdefault(unit.name, []).append(Use(idx.detach(), self._node(output), True))
        return output

    def conv_hooks(self, unit: Unit):
        def pre_hook(module, args):
            if len(args) != 1:
                raise ValueError(
                    f"KFAC expects one positional input for module {unit.name!r} "
                    f"({type(module).__name__}), got {len(args)}."
                )
            self._pending[unit.name] = args[0].detach()

        def hook(module, args, output):
            x = self._pending.pop(unit.name)
            use = Use(x, self._node(output), True, bias=unit.bias is not None)
            use.weight = unit.weight is not None
            self.uses.setdefault(unit.name, []).append(use)
            return None

        return pre_hook, hook

    def linear_pre_hook(self, module, args):
        if args:
            self.module_inputs[id(module)] = id(args[0])

    def linear_hook(self, module, args, output):
        self.module_inputs.pop(id(module), None)

    @contextmanager
    def active(self):
        """Intercept ``F.linear``/``F.embedding`` and hook the modules for one forward pass."""
        self._pending: Dict[str, Tensor] = {}
        handles = []
        try:
            for unit in self.units.values():
                if unit.kind == "conv":
                    pre, post = self.conv_hooks(unit)
                    handles.append(unit.module.register_forward_pre_hook(pre))
                    handles.append(unit.module.register_forward_hook(post))
            for module in self.linear_modules:
                handles.append(module.register_forward_pre_hook(self.linear_pre_hook))
                handles.append(module.register_forward_hook(self.linear_hook))
            with _intercepting(self):
                yield self
        finally:
            for handle in handles:
                handle.remove()


# ``F.linear`` and ``F.embedding`` are module attributes shared by every thread. They are
# replaced by dispatchers while at least one recorder is active anywhere (reference count
# under a lock) and restored when the last one ends; a dispatcher hands a call to the
# recorder active in the *calling* thread, if any, so other threads' forward passes (and
# several recorders in several threads) never see each other. The MHA fast path (which
# bypasses F.linear) is off for the same window.
_INTERCEPT_LOCK = threading.Lock()
_INTERCEPT_STATE = {"count": 0, "saved": None}
_THREAD = threading.local()


def _dispatch(name: str, original):
    def call(*args, **kwargs):
        recorder = getattr(_THREAD, "recorder", None)
        if recorder is None:
            return original(*args, **kwargs)
        return getattr(recorder, name)(original, *args, **kwargs)

    return call


@contextmanager
def _intercepting(recorder) -> Iterator[None]:
    """Route this thread's ``F.linear``/``F.embedding`` calls to ``recorder`` inside the block."""
    with _INTERCEPT_LOCK:
        if _INTERCEPT_STATE["count"] == 0:
            saved = (F.linear, F.embedding, torch.backends.mha.get_fastpath_enabled())
            _INTERCEPT_STATE["saved"] = saved
            F.linear = _dispatch("linear", saved[0])
            F.embedding = _dispatch("embedding", saved[1])
            torch.backends.mha.set_fastpath_enabled(False)
        _INTERCEPT_STATE["count"] += 1
    previous = getattr(_THREAD, "recorder", None)
    _THREAD.recorder = recorder
    try:
        yield
    finally:
        _THREAD.recorder = previous
        with _INTERCEPT_LOCK:
            _INTERCEPT_STATE["count"] -= 1
            if _INTERCEPT_STATE["count"] == 0:
                F.linear, F.embedding, fastpath = _INTERCEPT_STATE["saved"]
                torch.backends.mha.set_fastpath_enabled(fastpath)
                _INTERCEPT_STATE["saved"] = None


class CallPass(LayerPass):
    """The data pass over a model's units (see the module docstring).

    Like :class:`~curvlinops._layer_pass.LayerPass` (the same vectors, the same single
    batched backward pass), but the quantities are collected per *use* of a unit.
    """

    def __init__(
        self, model, units: Dict[str, Unit], to_rows, flatten_labels, max_columns, fallback=()
    ):
        """Store the set-up; nothing runs yet.

        ``fallback`` lists tensors whose exact diagonal is computed from the same vectors
        (see :mod:`curvlinops._fallback`).
        """
        super().__init__(model, {}, to_rows, flatten_labels, max_columns)
        self.units, self.fallback = units, list(fallback)

    def run_calls(self, batches: Iterable, vectors) -> Iterator[CallBatch]:
        """One pass over ``batches``, yielding a :class:`CallBatch` per batch.

        Args:
            batches: The ``(X, y)`` batches.
            vectors: The output-space vectors (see :data:`~curvlinops._layer_pass.VectorFn`),
                or ``None`` for a forward-only pass.

        Yields:
            The uses of every unit, with output gradients if ``vectors`` is given.
        """
        with guarded_models([self.model]):
            for X, y in batches:
                recorder = _Recorder(self.model, self.units, vectors is not None)
                with recorder.active(), torch.set_grad_enabled(vectors is not None):
                    output = self.model(X)
                batch = CallBatch(X, y, recorder.uses)
                if vectors is not None:
                    self._backward_uses(batch, output, vectors)
                del output, recorder  # not kept alive while the consumer works on the batch
                yield batch

    def _backward_uses(self, batch: CallBatch, output: Tensor, vectors):
        """Fill in every use's output gradients with one batched backward pass per chunk."""
        uses = [use for unit_uses in batch.uses.values() for use in unit_uses]
        nodes = list({id(u.output): u.output for u in uses}.values())
        if not nodes and not self.fallback:
            return
        with torch.enable_grad():
            f_flat = self.to_rows(output)
            cotangents = vectors(batch.X, batch.y, output, f_flat, self.flatten_labels(batch.y))
            if cotangents is None:
                return
            if self.fallback:
                batch.fallback_squares = per_row_squares(
                    f_flat, self.fallback, cotangents, self.max_columns
                )
            if not nodes:
                return
            grads = dict(
                zip(map(id, nodes), backpropagate(f_flat, nodes, cotangents, self.max_columns))
            )
        for use in uses:
            use.grad = grads[id(use.output)]
            use.output = None  # the graph is freed: nothing left to differentiate
        batch.backpropagated = True
