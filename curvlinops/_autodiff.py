r"""Differentiation primitives shared by every curvature operator.

Every batch product is written once against :class:`Autodiff`, two reverse-mode primitives:

- :meth:`Autodiff.vjp` evaluates a function and returns its *pullback*
  :math:`\mathbf{u} \mapsto \mathbf{J}^\top \mathbf{u}` (a vector-Jacobian product);
- :meth:`Autodiff.grad` is the gradient of a scalar function, itself differentiable, so that
  the pullback of a gradient is a Hessian-vector product (reverse-over-reverse);
- a *Jacobian-vector product* :math:`\mathbf{J} \mathbf{v}` transposes the pullback
  (:func:`linearize`): :math:`\mathbf{u} \mapsto \mathbf{J}^\top \mathbf{u}` is linear, and
  its own pullback is :math:`\mathbf{v} \mapsto \mathbf{J} \mathbf{v}`.

Two implementations execute a product: :data:`EAGER` with ``torch.autograd`` (several columns
at once by ``torch.autograd.grad(..., is_grads_batched=True)``, the pullback a backward pass
through a graph recorded once per batch, which the product cache keeps), and
:class:`FunctionalAutodiff` with ``torch.func`` (``vmap`` over columns), which
``torch.compile`` traces. Only reverse mode is used; ``benchmarks/README.md`` records why
(timings, and forward-mode gaps of some layers in the torch versions measured).

Fused attention kernels have no double backward in PyTorch. Every evaluation of the model for
curvature therefore runs inside :func:`second_order_context`, which selects the composite
("math") scaled-dot-product attention that is differentiable to any order.
"""

import importlib
import inspect
import itertools
import threading
import time
import warnings
import weakref
from collections.abc import Callable, MutableMapping
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch
    sdpa_kernel = None

#: Default for the most columns multiplied at once after a forward pass (see
#: :func:`in_column_chunks`): bounds peak memory at that of 16 simultaneous products.
MAX_COLUMNS_PER_CHUNK = 16


@contextmanager
def second_order_context() -> Iterator[None]:
    """Enable autograd and select attention kernels that support double backward."""
    with torch.enable_grad():
        if sdpa_kernel is None:  # pragma: no cover - older torch
            yield
        else:
            with sdpa_kernel([SDPBackend.MATH]):
                yield


class ModelLock:
    """Re-entrant lock of one model that any thread may release on the owner's behalf.

    Unlike ``threading.RLock``, :meth:`release` takes the token returned by :meth:`acquire`,
    so a generator holding the lock may be finalised (closed) in another thread than the one
    that started it without raising or leaking the lock.

    Attributes:
        order: Creation rank; locks of several models are always taken in this order, so two
            threads multiplying with composites of the same models cannot deadlock.
    """

    _counter = itertools.count()

    def __init__(self):
        """Create an unlocked lock."""
        self.order = next(ModelLock._counter)
        self._condition = threading.Condition(threading.Lock())
        self._owner = None
        self._count = 0

    def acquire(self) -> int:
        """Block until the calling thread owns the lock (re-entrant); return its token."""
        me = threading.get_ident()
        with self._condition:
            while self._owner is not None and self._owner != me:
                self._condition.wait()
            self._owner = me
            self._count += 1
        return me

    def held_by_current_thread(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._owner == threading.get_ident()

    def release(self, token: int):
        """Undo one :meth:`acquire` of the thread identified by ``token`` (from any thread)."""
        with self._condition:
            if self._owner != token or self._count == 0:
                return  # already released (e.g. a generator closed twice)
            self._count -= 1
            if self._count == 0:
                self._owner = None
                self._condition.notify_all()


_MODEL_LOCKS: "weakref.WeakKeyDictionary[nn.Module, ModelLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> ModelLock:
    """The process-wide lock of ``model`` (created on first use, freed with the model)."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = ModelLock()
        return lock


@contextmanager
def locked_models(models: Iterable[nn.Module]) -> Iterator[None]:
    r"""Hold the locks of ``models`` (re-entrant, in a global order) inside the block.

    Every forward and backward pass that the library runs over a model happens while its
    lock is held, because evaluating with substituted parameters
    (:func:`substituted_parameters`) and layer hooks are visible to every thread: products
    over the same model from several threads are serialised, products over different
    models run in parallel.
    """
    locks = sorted({id(m): model_lock(m) for m in models}.values(), key=lambda lk: lk.order)
    tokens = []
    try:
        for lock in locks:
            tokens.append((lock, lock.acquire()))
        yield
    finally:
        for lock, token in reversed(tokens):
            lock.release(token)


def _buffer_slots(model: nn.Module) -> List[Tuple[nn.Module, str, torch.Tensor]]:
    """Every ``(module, name, buffer)`` of ``model`` (aliases included)."""
    return [
        (module, name, buffer)
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    ]


def snapshot_buffers(model: nn.Module) -> List[Tuple[nn.Module, str, torch.Tensor, torch.Tensor]]:
    """Record every buffer of ``model`` (object and a copy of its values)."""
    return [(m, name, b, b.detach().clone()) for m, name, b in _buffer_slots(model)]


def restore_buffers(snapshot: List[Tuple[nn.Module, str, torch.Tensor, torch.Tensor]]):
    """Put every recorded buffer back: the same object, with the recorded values.

    Values are written only where they changed, so buffers that autograd saved for a
    backward pass (e.g. batch-norm statistics in evaluation mode) keep their version and
    cached graphs stay valid.
    """
    with torch.no_grad():
        for module, name, buffer, values in snapshot:
            if module._buffers.get(name) is not buffer:
                module._buffers[name] = buffer
            if buffer.shape != values.shape or buffer.dtype != values.dtype:
                buffer.data = values
            elif not _same_values(buffer, values):
                buffer.copy_(values)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality that counts NaN as equal to NaN (buffers may hold NaN on purpose)."""
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


@contextmanager
def guarded_models(models: Iterable[nn.Module]) -> Iterator[None]:
    """Hold the models' locks and restore all their buffers on exit, also after an error.

    The library never changes a module's buffers: forward passes of layers in training mode
    (e.g. ``BatchNorm`` updating ``running_mean``, ``running_var`` and
    ``num_batches_tracked``) are undone, in place, when the block ends.
    """
    models = list({id(m): m for m in models}.values())
    with locked_models(models):
        snapshots = [snapshot_buffers(m) for m in models]
        try:
            yield
        finally:
            for snapshot in snapshots:
                restore_buffers(snapshot)


def is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller (no data-dependent Python then)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False  # pragma: no cover - older torch


def parameter_positions(tensors: Iterable[Tensor]) -> Dict[int, int]:
    """Position of each tensor in ``tensors``, keyed by object identity (first occurrence).

    The library's one notion of parameter identity: a parameter is the *object* (``is``), not
    its name (tied weights have several) nor its storage (``p.data = ...`` moves it, and
    views share it). Look a tensor ``p`` up with ``id(p) in positions`` while ``tensors``
    are alive.

    Args:
        tensors: The tensors, e.g. ``params`` or ``model.parameters()``.

    Returns:
        ``{id(t): index}``.
    """
    positions: Dict[int, int] = {}
    for i, t in enumerate(tensors):
        positions.setdefault(id(t), i)
    return positions


def parameter_names(model_func: nn.Module, params: Sequence[Tensor]) -> List[str]:
    """Find the names under which ``model_func`` owns each tensor of ``params``.

    Args:
        model_func: The neural network.
        params: Tensors that are parameters of ``model_func`` (matched by identity).

    Returns:
        The name of each parameter, in the order of ``params``.

    Raises:
        ValueError: If ``model_func`` is not an ``nn.Module`` or a tensor is not one of its
            parameters.
    """
    if not isinstance(model_func, nn.Module):
        raise ValueError(
            f"model_func must be a torch.nn.Module, got {type(model_func).__name__}. "
            "Wrap your function in an nn.Module whose parameters include params."
        )
    named = list(model_func.named_parameters(remove_duplicate=False))
    positions = parameter_positions(p for _, p in named)
    names = []
    for i, p in enumerate(params):
        if id(p) not in positions:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of model_func. "
                "Pass tensors from model_func.parameters()."
            )
        names.append(named[positions[id(p)]][0])
    return names


@contextmanager
def substituted_parameters(
    model_func: nn.Module, params: Sequence[Tensor], values: Sequence[Tensor]
):
    """Temporarily replace ``params`` (every alias, so tied weights stay tied) by ``values``.

    Swapping the entries of ``_parameters`` and putting the very same objects back keeps
    every parameter's identity (:func:`parameter_positions`), for tied weights too; an
    optimizer holding the parameters stays attached to the model (``functional_call`` has
    been seen to restore tied weights as new objects, see ``benchmarks/README.md``).

    Args:
        model_func: The module.
        params: Parameters of ``model_func`` (matched by identity).
        values: Tensors to use instead, in the order of ``params``.

    Yields:
        Nothing; ``model_func`` evaluates with ``values`` inside the block.
    """
    values = list(values)
    replacement = {key: values[i] for key, i in parameter_positions(params).items()}
    # The swap is visible to every thread: hold the model's lock (see locked_models). While
    # torch.compile traces, the caller (a product) already holds it, and dynamo cannot trace
    # the lock.
    with locked_models([] if is_compiling() else [model_func]):
        swapped = []
        for module in model_func.modules():
            for name, p in module._parameters.items():
                if id(p) in replacement:
                    swapped.append((module, name, p))
        try:
            for module, name, p in swapped:
                module._parameters[name] = replacement[id(p)]
            yield
        finally:
            for module, name, p in swapped:
                module._parameters[name] = p


def make_functional_model(
    model_func: nn.Module, params: Sequence[Tensor]
) -> Callable[[Sequence[Tensor], Union[Tensor, MutableMapping]], Tensor]:
    """Turn a module into a function of the parameters in ``params``.

    Args:
        model_func: The neural network.
        params: The parameters that become arguments (identity-matched).

    Returns:
        ``f(param_values, X)`` evaluating ``model_func(X)`` with ``param_values`` substituted
        for ``params`` (all their aliases) and all other parameters and buffers taken from the
        module.
    """
    parameter_names(model_func, params)  # validates params
    params = list(params)

    def f(param_values: Sequence[Tensor], X: Union[Tensor, MutableMapping]) -> Tensor:
        with substituted_parameters(model_func, params, param_values):
            return model_func(X)

    return f


def detached_leaves(params: Sequence[Tensor]) -> List[Tensor]:
    """Fresh leaf tensors sharing the parameters' values, never touching their ``.grad``."""
    return [p.detach().requires_grad_() for p in params]


def vjp(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Sequence[Optional[Tensor]],
    batched: bool,
    create_graph: bool = False,
) -> List[Tensor]:
    """Vector-Jacobian products through a recorded graph, optionally for several columns.

    Args:
        outputs: Tensors to differentiate.
        inputs: Tensors to differentiate with respect to.
        cotangents: One per output (``None`` for a zero cotangent); with ``batched=True``
            each carries a leading column axis.
        batched: Whether the cotangents have a leading column axis.
        create_graph: Whether to record the backward pass for further differentiation.

    Returns:
        One tensor per input (with the leading column axis if ``batched``). Inputs that the
        outputs do not depend on get zeros.
    """
    given = [c for c in cotangents if c is not None]
    leading = given[0].shape[:1] if batched and given else ()
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if c is not None and o.requires_grad]
    if not pairs:  # the outputs are constant in the inputs
        return [x.new_zeros((*leading, *x.shape)) for x in inputs]
    outs, cots = zip(*pairs)
    grads = torch.autograd.grad(
        outs,
        inputs,
        cots,
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        is_grads_batched=batched,
    )
    # Unused inputs get zeros (``materialize_grads`` would drop the column axis).
    return [x.new_zeros((*leading, *x.shape)) if g is None else g for g, x in zip(grads, inputs)]


#: ``pullback(cotangents, batched, wrt=None) -> list``: vector-Jacobian products of a function
#: evaluated by :meth:`Autodiff.vjp`, one cotangent per output (``None`` for zero; leading
#: column axis if ``batched``), returning the products w.r.t. the primals at positions ``wrt``
#: (all if ``None``).
Pullback = Callable[..., List[Tensor]]


def _as_list(out: Union[Tensor, Sequence[Tensor]]) -> List[Tensor]:
    return [out] if isinstance(out, Tensor) else list(out)


class Autodiff:
    r"""The two reverse-mode primitives every product is written with.

    Each batch product is defined once in terms of :meth:`vjp` (evaluate a function and
    return its pullback) and :meth:`grad` (the gradient of a scalar function, itself
    differentiable). Two implementations execute it: :data:`EAGER` with ``torch.autograd``
    (the pullback is a backward pass through the recorded graph, batched over columns with
    ``is_grads_batched``) and :class:`FunctionalAutodiff` with ``torch.func`` (no
    ``torch.autograd`` call, so ``torch.compile`` can trace the whole product).

    Attributes:
        state: Per-batch tensors that were computed outside a traced product (e.g.
            Monte-Carlo samples, which need a generator); ``None`` when not traced.
        probe: ``None``, or a dict into which a product that evaluates the batch loss
            records ``prediction``, ``loss`` and ``gradient`` of the *unweighted* batch loss
            (detached), computed from the passes it runs anyway (the determinism check's
            products; see :meth:`~curvlinops._torch_base._DeterminismCheck._probing_product`).
    """

    state = None
    probe: Optional[dict] = None

    def values(self, params: Sequence[Tensor]) -> List[Tensor]:
        """The values at which ``params`` are differentiated (the parameters themselves)."""
        return list(params)

    def vjp(self, fn: Callable[..., Any], primals: Sequence[Tensor]) -> Tuple[Any, Pullback]:
        """Evaluate ``fn(*primals)`` (a tensor or a tuple of tensors) and its pullback."""
        raise NotImplementedError

    def grad(self, fn: Callable[..., Tensor]) -> Callable[..., Tuple[Tensor, ...]]:
        """The gradient ``(*inputs) -> tuple`` of a scalar function w.r.t. all its inputs."""
        raise NotImplementedError


class EagerAutodiff(Autodiff):
    """:class:`Autodiff` with ``torch.autograd`` (reverse-over-reverse, batched backward).

    Args:
        probe: A dict to record the batch's prediction, loss and gradient into (see
            :attr:`Autodiff.probe`), or ``None``.
    """

    def __init__(self, probe: Optional[dict] = None):
        self.probe = probe

    def vjp(self, fn, primals):
        """Evaluate ``fn`` at fresh leaves of ``primals``; the pullback is a backward pass."""
        leaves = detached_leaves(primals)
        with second_order_context():
            out = fn(*leaves)
        outs = _as_list(out)

        def pullback(cotangents, batched: bool, wrt=None) -> List[Tensor]:
            inputs = leaves if wrt is None else [leaves[i] for i in wrt]
            # differentiable in the cotangents only when they are being differentiated
            create_graph = torch.is_grad_enabled() and any(
                c is not None and c.requires_grad for c in cotangents
            )
            return vjp(outs, inputs, cotangents, batched, create_graph=create_graph)

        return out, pullback

    def grad(self, fn):
        """The gradient, recorded for double backward when the inputs require grad."""

        def gradient(*inputs: Tensor) -> Tuple[Tensor, ...]:
            with second_order_context():
                leaves = [x if x.requires_grad else x.detach().requires_grad_() for x in inputs]
                out = fn(*leaves)
                create_graph = any(x.requires_grad for x in inputs)
                return tuple(vjp([out], leaves, [torch.ones_like(out)], False, create_graph))

        return gradient


class FunctionalAutodiff(Autodiff):
    """:class:`Autodiff` with ``torch.func`` (traceable), at given parameter values.

    Args:
        param_values: The values substituted for the parameters.
        state: Per-batch tensors computed outside the traced product (see
            :attr:`Autodiff.state`).
    """

    def __init__(self, param_values: Sequence[Tensor], state=None):
        self._values = list(param_values)
        self.state = state

    def values(self, params):
        """The given parameter values (``params`` only fixes their number)."""
        return self._values

    def vjp(self, fn, primals):
        """``torch.func.vjp``; columns are batched with ``torch.func.vmap``."""
        out, pb = torch.func.vjp(fn, *primals)
        outs = _as_list(out)

        def pullback(cotangents, batched: bool, wrt=None) -> List[Tensor]:
            given = next(c for c in cotangents if c is not None)
            leading = given.shape[:1] if batched else ()
            full = [
                o.new_zeros((*leading, *o.shape)) if c is None else c
                for o, c in zip(outs, cotangents)
            ]
            cot = full[0] if isinstance(out, Tensor) else tuple(full)
            result = torch.func.vmap(pb)(cot) if batched else pb(cot)
            return list(result) if wrt is None else [result[i] for i in wrt]

        return out, pullback

    def grad(self, fn):
        """``torch.func.grad`` w.r.t. every input."""

        def gradient(*inputs: Tensor) -> Tuple[Tensor, ...]:
            return tuple(torch.func.grad(fn, argnums=tuple(range(len(inputs))))(*inputs))

        return gradient


#: The eager implementation (stateless, shared).
EAGER = EagerAutodiff()


def columns_first(M: Sequence[Tensor]) -> Tuple[List[Tensor], bool]:
    """Move the trailing column axis to the front; drop it for a single column.

    Args:
        M: Tensors with a trailing column axis of common size ``K``.

    Returns:
        The tensors with the column axis leading (``K > 1``) or removed (``K == 1``), and
        whether the columns are batched (``K > 1``).
    """
    batched = M[0].shape[-1] > 1
    if batched:
        return [_column_major(m.movedim(-1, 0)) for m in M], True
    return [m.squeeze(-1) for m in M], False


def _column_major(m: Tensor) -> Tensor:
    """``m`` (columns first) with each column contiguous, copied only if it is not yet.

    Blocks of a ``[K, D]`` tensor seen as ``[D, K]`` already are (the columns-first layout
    that estimators and eigensolvers allocate); a contiguous ``[D, K]`` input is copied once
    into that layout, which the batched backward passes are fastest with.
    """
    return m if m[0].is_contiguous() else m.contiguous()


def columns_last(M: Sequence[Tensor], batched: bool) -> List[Tensor]:
    """Inverse of :func:`columns_first`: put the column axis back at the end."""
    if batched:
        return [m.movedim(0, -1) for m in M]
    return [m.unsqueeze(-1) for m in M]


def linearize(ad: Autodiff, output: Tensor, pullback: Pullback) -> Callable[..., Tensor]:
    r"""Jacobian-vector products :math:`\mathbf{J}\mathbf{v}` by transposing the pullback.

    The pullback :math:`\mathbf{u} \mapsto \mathbf{J}^\top \mathbf{u}` is linear in
    :math:`\mathbf{u}`; its own pullback at any point (zero here) is
    :math:`\mathbf{v} \mapsto \mathbf{J}\mathbf{v}`. No forward mode is needed (which some
    layers lack), and the transposed pullback is recorded once for all columns.

    Args:
        ad: The autodiff implementation that produced ``pullback``.
        output: The output of the function that ``pullback`` belongs to.
        pullback: Its pullback (see :data:`Pullback`).

    Returns:
        ``jvp(tangents, batched)`` returning ``J v`` shaped like ``output`` (with the
        tangents' leading column axis if ``batched``).
    """
    return linearize_at(ad, pullback, torch.zeros_like(output))[1]


def linearize_at(
    ad: Autodiff, pullback: Pullback, point: Tensor
) -> Tuple[List[Tensor], Callable[..., Tensor]]:
    r""":func:`linearize` with the pullback transposed at ``point``; also returns its value.

    The pullback is linear, so its own pullback (:math:`\mathbf{v} \mapsto \mathbf{J}
    \mathbf{v}`) is the same at every point, while the value at ``point`` is
    :math:`\mathbf{J}^\top \mathbf{u}` for free: at the loss's output gradient, the
    parameter gradient (how the determinism check takes the gradient from a GGN-type product).

    Args:
        ad: The autodiff implementation that produced ``pullback``.
        pullback: The pullback of a function with one tensor output (see :data:`Pullback`).
        point: Where to evaluate the pullback, shaped like that output.

    Returns:
        ``J^T point`` (one tensor per primal, attached to the recorded graph) and
        ``jvp(tangents, batched)`` as returned by :func:`linearize`.
    """
    value, transposed = ad.vjp(lambda u: tuple(pullback([u], False)), [point])

    def jvp(tangents: Sequence[Tensor], batched: bool) -> Tensor:
        return transposed(list(tangents), batched)[0]

    return list(value), jvp


#: Values of ``JVP_ROUTE`` (see :func:`forward_linearize`, :func:`linearize`,
#: :class:`RuleRoute`, :class:`MeasuredRoute`).
JVP_ROUTES = ("auto", "reverse", "forward", "measure")

#: Modules whose double-backward graph (the reverse route's transposed pullback) is much
#: costlier than their forward-mode rule: normalisation and attention. Validated on the
#: benchmark problems (measurements in ``benchmarks/README.md``, "Forward and reverse mode").
FORWARD_FRIENDLY_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.MultiheadAttention)
#: Modules whose vmapped forward-mode rule is slower than the transposed pullback on CPU.
REVERSE_FRIENDLY_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def prefers_forward_route(model: Any) -> bool:
    """Whether ``JVP_ROUTE = "auto"`` takes forward mode for several columns on ``model``.

    True for a model with normalisation or attention layers and without convolutions
    (module types, found recursively). Functions that are not modules give ``False``
    (nothing is known about their layers).
    """
    if not isinstance(model, nn.Module):
        return False
    modules = list(model.modules())
    return any(isinstance(m, FORWARD_FRIENDLY_MODULES) for m in modules) and not any(
        isinstance(m, REVERSE_FRIENDLY_MODULES) for m in modules
    )


class RouteChoice:
    """A route for ``J V`` chosen once per column count and then kept.

    A route that raises (forward mode through a layer without a forward-mode rule, or
    random operations under ``vmap``) is replaced by the reverse route, which every model
    supports, and never tried again for that column count. Both routes compute the same map,
    so the choice changes only round-off.

    Attributes:
        choices: ``{num_columns: route}`` chosen so far.
    """

    def __init__(self):
        self.choices: Dict[int, str] = {}

    def _choose(self, route: Callable, names: List[str], tangents, batched: bool) -> str:
        """The route for a new column count (subclass hook)."""
        raise NotImplementedError

    def jvp(self, routes: Dict[str, Callable[[], Callable[..., Tensor]]]) -> Callable[..., Tensor]:
        """``jvp(tangents, batched)`` through the chosen route; ``routes`` builds each lazily."""
        built: Dict[str, Callable[..., Tensor]] = {}

        def route(name: str) -> Callable[..., Tensor]:
            if name not in built:
                built[name] = routes[name]()
            return built[name]

        def jvp(tangents: Sequence[Tensor], batched: bool) -> Tensor:
            K = tangents[0].shape[0] if batched else 1
            if K not in self.choices:
                self.choices[K] = self._choose(route, list(routes), tangents, batched)
            if self.choices[K] != "reverse":
                try:
                    return route(self.choices[K])(tangents, batched)
                except (RuntimeError, NotImplementedError):
                    self.choices[K] = "reverse"
            return route("reverse")(tangents, batched)

        return jvp


class RuleRoute(RouteChoice):
    """``JVP_ROUTE = "auto"``: forward mode for two or more columns if the model prefers it.

    One column always takes the reverse route (as fast or faster on every benchmark problem);
    several take the forward route if :func:`prefers_forward_route` holds for the model.

    Args:
        forward: Whether the model prefers the forward route.
    """

    def __init__(self, forward: bool):
        super().__init__()
        self.forward = forward

    def _choose(self, route: Callable, names: List[str], tangents, batched: bool) -> str:
        return "forward" if batched and self.forward else "reverse"


class MeasuredRoute(RouteChoice):
    """``JVP_ROUTE = "measure"``: the faster route per column count, measured once.

    Like cuDNN's benchmark mode: the first chunk of each column count runs every route twice
    and keeps the one whose second run was faster (a route that raises is never chosen). The
    measurement costs about four extra ``J V`` computations per column count.
    """

    def _choose(self, route: Callable, names: List[str], tangents, batched: bool) -> str:
        timings = {}
        for name in names:
            try:
                for _ in range(2):  # the first run may pay one-time costs (decompositions)
                    start = time.perf_counter()
                    route(name)(tangents, batched)
                    timings[name] = time.perf_counter() - start
            except (RuntimeError, NotImplementedError):
                if name == "reverse":
                    raise
        return min(timings, key=timings.get)


_FORWARD_AD_READY = threading.Lock()
_forward_ad_loaded = False


def _load_forward_ad_decompositions():
    """Import torch's forward-AD decompositions once, without their deprecation warning.

    ``torch.func.jvp`` imports them on first use, and their import calls
    ``torch.jit.script``, which warns (``DeprecationWarning``) about torch's own code: a
    user's ``-W error`` would turn that into an exception inside a product.
    """
    global _forward_ad_loaded
    with _FORWARD_AD_READY:
        if _forward_ad_loaded:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                importlib.import_module("torch._decomp.decompositions_for_jvp")
            except ImportError:  # other torch versions: nothing to pre-load
                pass
        _forward_ad_loaded = True


def forward_linearize(
    fn: Callable[..., Tensor], primals: Sequence[Tensor]
) -> Callable[[Sequence[Tensor], bool], Tensor]:
    r"""Jacobian-vector products :math:`\mathbf{J}\mathbf{v}` in forward mode.

    ``torch.func.jvp`` pushes the tangents through ``fn`` alongside the primal computation,
    ``torch.func.vmap`` over the columns. The same map as :func:`linearize`, by another route
    (each call evaluates ``fn`` once more; layers without forward-mode rules raise).

    Args:
        fn: ``fn(*primals) -> Tensor``.
        primals: The point of linearisation (detached for the evaluation).

    Returns:
        ``jvp(tangents, batched)`` as for :func:`linearize`.
    """
    points = tuple(p.detach() for p in primals)
    _load_forward_ad_decompositions()

    def one(*tangents: Tensor) -> Tensor:
        return torch.func.jvp(fn, points, tangents)[1]

    def jvp(tangents: Sequence[Tensor], batched: bool) -> Tensor:
        with second_order_context():  # attention kernels with forward-mode rules
            return torch.func.vmap(one)(*tangents) if batched else one(*tangents)

    return jvp


def loss_hessian_product(
    ad: Autodiff, loss_func: Callable[[Tensor, Tensor], Tensor], output: Tensor, y: Tensor
) -> Callable[[Tensor, bool], Tensor]:
    r"""Products with the Hessian of the loss w.r.t. the model output.

    Computes :math:`\nabla^2_{\mathbf{f}} \ell(\mathbf{f}, \mathbf{y}) \mathbf{V}` by double
    backward through the loss only (not through the network), so any loss works. The
    loss's gradient is recorded once and reused by every call.

    Args:
        ad: The autodiff implementation.
        loss_func: The loss function.
        output: The model output (detached).
        y: The labels.

    Returns:
        ``hessian_product(V, batched)`` for ``V`` shaped like ``output`` (leading column
        axis if ``batched``).
    """
    _, pullback = ad.vjp(ad.grad(lambda f: loss_func(f, y)), [output])

    def hessian_product(V: Tensor, batched: bool) -> Tensor:
        return pullback([V], batched)[0]

    return hessian_product


def in_column_chunks(
    multiply: Callable[[List[Tensor]], List[Tensor]], M: Sequence[Tensor], max_columns: int
) -> List[Tensor]:
    """Apply a product to chunks of at most ``max_columns`` columns and join the results.

    Used after a batch's forward pass, so that all chunks share it while peak memory stays
    that of ``max_columns`` simultaneous products.

    Args:
        multiply: Maps a matrix in list format (trailing column axis) to its product.
        M: Matrix in list format.
        max_columns: Most columns per chunk.

    Returns:
        The product of all columns in list format.
    """
    results = [multiply(part) for _, part in column_chunks(M, max_columns)]
    if len(results) == 1:
        return list(results[0])
    return [torch.cat(parts, dim=-1) for parts in zip(*results)]


def column_chunks(M: Sequence[Tensor], max_columns: int) -> Iterator[Tuple[slice, List[Tensor]]]:
    """The column chunks of a matrix in list format: ``(columns, M[..., columns])`` pairs.

    One chunk (``slice(None)``, ``M`` itself) if ``M`` has at most ``max_columns`` columns;
    otherwise views of consecutive blocks of at most ``max_columns`` columns.
    """
    num_columns = M[0].shape[-1]
    if num_columns <= max_columns:
        yield slice(None), list(M)
        return
    for start in range(0, num_columns, max_columns):
        columns = slice(start, start + max_columns)
        yield columns, [m[..., columns] for m in M]


def eager_batch_product(
    prepare: Callable[..., Callable[[List[Tensor]], List[Tensor]]],
) -> Callable[..., Tuple[Tensor, ...]]:
    """Turn ``prepare(X, y, *args) -> multiply`` into ``(X, y, *args_and_M, max_columns)``.

    The public ``make_batch_*`` helpers are this wrapper around the operators' definitions;
    the number of extra arguments is that of ``prepare`` beyond ``X`` and ``y``.
    """
    num_args = len(inspect.signature(prepare).parameters) - 2

    def batch_product(
        X: Union[Tensor, MutableMapping],
        y: Tensor,
        *args_and_M,
        max_columns: int = MAX_COLUMNS_PER_CHUNK,
    ) -> Tuple[Tensor, ...]:
        args, M = args_and_M[:num_args], args_and_M[num_args:]
        return tuple(in_column_chunks(prepare(X, y, *args), M, max_columns))

    return batch_product
