"""The one product protocol of the data-driven curvature operators.

An exact curvature operator implements a single hook, :meth:`BatchProducts._prepare_batch`:
for one batch it does what all columns share (forward pass, recorded first backward,
Monte-Carlo samples) and returns ``multiply(M_chunk)``, the product of the unweighted
mini-batch matrix with a column chunk. :class:`BatchProducts` (a mixin of
:class:`~curvlinops._torch_base.CurvatureLinearOperator`) runs everything else on top of it,
for every operator, compiled or not:

- the pass over the data and the combination of the batches (``sum_b w_b A_b M`` by default,
  :meth:`BatchProducts._combine`), chunking the columns (``MAX_COLUMNS_PER_CHUNK``);
- the opt-in product cache (:meth:`BatchProducts.cache`), which keeps every batch's
  ``multiply``;
- compilation (:meth:`BatchProducts.compile`), which traces the same hook with
  :class:`~curvlinops._autodiff.FunctionalAutodiff`.
"""

import functools
import warnings
from collections.abc import Callable, Iterable, MutableMapping
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from curvlinops import _distributed
from curvlinops._autodiff import (
    EAGER,
    Autodiff,
    EagerAutodiff,
    FunctionalAutodiff,
    MeasuredRoute,
    RouteChoice,
    RuleRoute,
    column_chunks,
    make_functional_model,
    prefers_forward_route,
    second_order_context,
)


class BatchProducts:
    """Data loop, weighting, chunking, cache and compilation around ``_prepare_batch``."""

    #: How products of the GGN family compute ``J V``: ``"auto"`` (default) takes forward mode
    #: for two or more columns if the model has normalisation or attention layers and no
    #: convolutions, and the transposed pullback otherwise (a rule validated on the benchmark
    #: problems, :class:`~curvlinops._autodiff.RuleRoute`); ``"reverse"`` always transposes the
    #: pullback; ``"forward"`` always uses ``torch.func.jvp`` vmapped over the columns (needs
    #: forward-mode rules for every layer); ``"measure"`` times both once per column count at
    #: the first eager product and keeps the faster
    #: (:class:`~curvlinops._autodiff.MeasuredRoute`, like cuDNN's benchmark mode). Where the
    #: forward route raises (a layer without a forward-mode rule, random operations under
    #: ``vmap``), ``"auto"`` and ``"measure"`` fall back to the reverse route; compiled
    #: products always use the reverse route under these two settings. All give the same
    #: operator up to round-off. May be set per instance.
    JVP_ROUTE: str = "auto"

    def _jvp_route(self, ad: Autodiff) -> Union[str, RouteChoice]:
        """The ``J V`` route for a product with ``ad`` (an object choosing per column count)."""
        setting = self.JVP_ROUTE
        if setting not in ("auto", "measure"):
            return setting  # checked where the route is used
        if not isinstance(ad, EagerAutodiff):  # no timing or fallback inside traced code
            return "reverse"
        choices = self.__dict__.setdefault("_jvp_route_choices", {})
        if setting not in choices:
            choices[setting] = (
                MeasuredRoute()
                if setting == "measure"
                else RuleRoute(prefers_forward_route(getattr(self, "_model_func", None)))
            )
        return choices[setting]

    def _prepare_batch(
        self, X: Union[Tensor, MutableMapping], y: Tensor, ad: Autodiff = EAGER
    ) -> Callable[[List[Tensor]], List[Tensor]]:
        """The one product hook: a batch's column-independent work, then its multiply.

        Does what all columns share for this batch (forward pass, recorded first backward,
        Monte-Carlo samples) and returns ``multiply(M_chunk)``, the product of the
        *unweighted* mini-batch matrix with a column chunk in list format. The base class
        runs the data loop, the weighting and summation, the chunking over columns, the
        product cache and compilation on top of it.

        Args:
            X: Input batch.
            y: Label batch.
            ad: How to differentiate: :data:`~curvlinops._autodiff.EAGER`, or a
                :class:`~curvlinops._autodiff.FunctionalAutodiff` when traced for ``compile``
                (then the parameter values to use are ``ad.values(self._params)``).

        Returns:
            ``multiply(M_chunk) -> List[Tensor]``.

        Downstream subclasses written against the 3.0.1 contract may implement
        ``_matmat_batch(X, y, M)`` (the whole mini-batch product) instead; it is called from
        here, and such operators compile their whole product and cannot be cached.

        Raises:
            NotImplementedError: In the base class (operators without a batch product).
        """
        matmat_batch = getattr(type(self), "_matmat_batch", None)
        if matmat_batch is not None:  # 3.0.1 subclass contract (API.md section 2.2)
            return lambda M: matmat_batch(self, X, y, M)
        raise NotImplementedError(
            f"{type(self).__name__} does not implement _prepare_batch, so it cannot multiply."
        )

    def _has_batch_product(self) -> bool:
        """Whether the operator defines ``_prepare_batch`` (traceable and cacheable)."""
        return type(self)._prepare_batch is not BatchProducts._prepare_batch

    @functools.cached_property
    def _functional_model(self) -> Callable[..., Tensor]:
        """``f(param_values, X)``: the model as a function of the values of ``params``."""
        return make_functional_model(self._model_func, self._params)

    def _prepare_compile(self):
        """Build what the traced product reads but must not build itself (subclasses extend).

        Cached properties (``functools.cached_property`` takes a lock, which ``torch.compile``
        cannot trace) are computed here, before the first traced product.
        """
        _ = self._functional_model

    def _start_pass(self):
        """Called before every product's pass over the data (e.g. to re-seed a generator)."""

    def _untraced_state(self, X: Union[Tensor, MutableMapping], y: Tensor):
        """Per-batch tensors a traced product gets from outside (``ad.state``); none here."""
        return None

    def _matmat(self, M: List[Tensor]) -> List[Tensor]:
        """Multiply with a matrix in list format in one pass over the data.

        With a ``process_group``, each rank multiplies on its shard and the results are
        summed over the ranks (one ``all_reduce`` of the result).
        """
        group = getattr(self, "_process_group", None)
        with _distributed.agreement(group, "A product"):
            result = self._combine(M, self._batch_multiplies())
        return _distributed.all_reduce_(result, group, "Summing a product")

    def _combine(
        self, M: List[Tensor], batches: Iterable[Tuple[Tensor, Tensor, Callable]]
    ) -> List[Tensor]:
        """Join the batches' products: ``sum_b w_b A_b M`` (Jacobians stack or slice instead).

        The columns are multiplied in chunks of at most ``MAX_COLUMNS_PER_CHUNK`` after each
        batch's forward pass, and every chunk's product is written straight into its
        columns of the output (no concatenation). The output is laid out like ``M`` (see
        :meth:`~curvlinops._torch_base.PyTorchLinearOperator._new_output`): for columns
        that are contiguous in memory (``M`` from ``V = W.T``), copying a product in is a
        copy of contiguous columns, not a transpose.

        Args:
            M: The matrix in list format.
            batches: ``(X, y, multiply)`` per batch, in data order. An override must drop
                each ``multiply`` before taking the next one (``del``), so that only one
                batch's recorded graph is alive at a time.

        Returns:
            The product in list format, as views of one new flat buffer.
        """
        result, first = None, True
        for X, y, multiply in batches:  # no enumerate: its cached tuple would keep multiply
            weight = self._get_normalization_factor(X, y)
            for columns, part in column_chunks(M, self.MAX_COLUMNS_PER_CHUNK):
                products = multiply(part)
                if result is None:
                    result = self._new_output(M[0].shape[-1], like=products[0], layout_of=M[0])
                for r, b in zip(result, products):
                    if first:  # out of place: products may alias their inputs
                        torch.mul(b, weight, out=r[..., columns])
                    else:
                        r[..., columns].add_(b, alpha=weight)
                del products
            del multiply  # free this batch's graph before the next batch records its own
            first = False
        return result

    def _batch_multiplies(self) -> Iterator[Tuple[Tensor, Tensor, Callable]]:
        """``(X, y, multiply)`` of every batch: cached, compiled or eager."""
        self._start_pass()  # e.g. Monte-Carlo operators seed per pass (and per rank)
        if self._product_cache_max_bytes is not None:
            entries = self._cache_entries()
            if entries is not None:
                yield from entries
                return
        for X, y in self._loop_over_data(desc="_matmat"):
            yield X, y, self._multiply_of(X, y)

    def _multiply_of(self, X: Union[Tensor, MutableMapping], y: Tensor) -> Callable:
        """The batch's ``multiply``: eager, or through the compiled product."""
        compiled = self._compiled_batch_product
        if compiled is None:
            return self._prepare_batch(X, y)
        values = tuple(p.detach() for p in self._params)
        state = self._untraced_state(X, y)
        return lambda chunk: list(compiled(values, X, y, state, *chunk))

    # ----------------------------------------------------------------- product cache
    _CACHEABLE: bool = True
    #: Attributes besides parameters and data that the cached batch states depend on.
    _CACHE_KEY_ATTRIBUTES: Tuple[str, ...] = ()
    _product_cache_max_bytes: Optional[int] = None
    _product_cache: Optional[Tuple[tuple, list, list]] = None
    _product_cache_overflowed_at: Optional[tuple] = None

    def cache(self, max_bytes: int = 2**30) -> "BatchProducts":
        """Keep what each batch's product needs between products (opt-in, in place).

        Repeated products over the same data (CG, Lanczos, ``eigsh``) then skip the work that
        does not depend on the multiplied matrix: the data loading and forward pass of every
        batch and, for the Hessian, the first backward pass. The first product records, per
        batch, the autograd graph that later products only differentiate through again;
        afterwards a product costs the remaining backward passes. A compiled operator caches
        the batches and their untraced state (Monte-Carlo samples) and runs its compiled
        product on them. The cache is rebuilt when
        the value of a parameter in ``params`` changes, however it was changed: in place
        (``p.add_``, an optimizer step, ``p.data.copy_``), by ``p.data = ...``, or by
        ``load_state_dict``; this is detected by comparing the parameters with a copy of
        their values taken when the cache was built (one comparison per product, the memory
        of one copy of ``params``). Replacing a parameter object raises (rebuild the
        operator). In-place edits of the batch tensors (``X``, the tensor values of a
        dict-like ``X``, ``y``) that bump their version counter (``X.mul_``, ``X.copy_``,
        ``X[0] = ...``) also rebuild the cache, when the data already live on the operator's
        device (otherwise the cache holds its own copy, consistent with the old data), and so
        does a change of the Monte-Carlo Fisher's ``_seed`` or ``_mc_samples``. The
        cache does not follow anything else: batches replaced or added in ``data``, edits
        through ``X.data``, changes of the model's buffers or of parameters that are not in
        ``params`` go unnoticed, so call :meth:`clear_cache` (or :meth:`cache` again) after
        such changes. If the tensors that the
        graphs save would exceed ``max_bytes``, a warning is issued and products run
        uncached until the parameters change.

        Args:
            max_bytes: Bound on the memory of the saved tensors of all batches' graphs.

        Returns:
            The operator itself.

        Raises:
            NotImplementedError: If the operator has no per-batch product to cache (KFAC
                and its relatives, whose products use stored factors) or combines batches
                other than by summation (Jacobians).
            ValueError: If ``max_bytes`` is not a non-negative integer.
        """
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}.")
        if not (self._CACHEABLE and self._has_batch_product()):
            raise NotImplementedError(
                f"{type(self).__name__} has no per-batch product state to cache; its products "
                "are computed without it."
            )
        self.clear_cache()
        self._product_cache_max_bytes = max_bytes
        return self

    def clear_cache(self):
        """Free the product cache and stop caching (undoes :meth:`cache`)."""
        self._product_cache = self._product_cache_overflowed_at = self._product_cache_max_bytes = (
            None
        )

    def _cache_state(self) -> tuple:
        """The cache's key: a copy of the parameter values (compared exactly) and the token.

        Values rather than ``_version`` counters: ``p.data.copy_(...)`` does not bump
        ``p._version``, and ``p.data = ...`` may reuse the old storage address.
        """
        return ([p.detach().clone() for p in self._params], self._cache_key())

    def _cache_key(self) -> tuple:
        return tuple(getattr(self, name) for name in self._CACHE_KEY_ATTRIBUTES)

    def _same_state(self, state: Optional[tuple]) -> bool:
        """Whether the parameters and the token still are as recorded in ``state``."""
        if state is None or state[1] != self._cache_key():
            return False
        return all(
            s.shape == p.shape and s.dtype == p.dtype and torch.equal(s, p.detach())
            for s, p in zip(state[0], self._params)
        )

    def _cache_entries(self) -> Optional[List[Tuple[Tensor, Tensor, Callable]]]:
        """The cached ``(X, y, multiply)`` of all batches, built if needed; ``None`` if too big."""
        self._check_parameters_present()  # cached products do not pass over the data
        cached = self._product_cache
        if (
            cached is not None
            and self._same_state(cached[0])
            and all(_data_versions(entry[:2]) == v for entry, v in zip(cached[1], cached[2]))
        ):
            return cached[1]
        self._product_cache = None
        if self._same_state(self._product_cache_overflowed_at):
            return None
        state = self._cache_state()
        saved = _SavedTensorsMeter(self._params)
        entries, data_versions = [], []
        for X, y in self._loop_over_data(desc="cache"):
            data_versions.append(_data_versions((X, y)))
            with saved.hooks():
                entries.append((X, y, self._multiply_of(X, y)))
            if saved.nbytes > self._product_cache_max_bytes:
                warnings.warn(
                    f"{type(self).__name__}: the product cache would exceed max_bytes="
                    f"{self._product_cache_max_bytes}; products run uncached until the parameters "
                    "change. Pass a larger max_bytes to cache().",
                    stacklevel=5,
                )
                self._product_cache_overflowed_at = state
                return None
        self._product_cache = (state, entries, data_versions)
        return entries

    # ----------------------------------------------------------------- compilation
    _compiled_batch_product: Optional[Callable[..., Tuple[Tensor, ...]]] = None

    def compile(self, **compile_kwargs) -> "BatchProducts":
        """Run this operator's products through ``torch.compile`` from now on (in place).

        The mini-batch product (:meth:`_prepare_batch` with
        :class:`~curvlinops._autodiff.FunctionalAutodiff`, a ``torch.func`` program of the
        parameter values, one batch and a column chunk) is compiled; the loop over the data,
        the weighting and the chunking over columns stay eager, and so does what cannot be
        traced (Monte-Carlo sampling, see :meth:`_untraced_state`). Operators without a
        batch product (KFAC and its relatives) compile their whole product. Results equal
        the eager products up to floating-point round-off. Shapes are static unless
        ``dynamic`` is passed, so each new batch or column shape compiles once; compiling
        many operators (or shapes) in one process can reach
        ``torch._dynamo.config.recompile_limit`` (then ``torch.compile`` falls back to
        eager products, or raises with ``fullgraph=True``). Compiling and :meth:`cache`
        combine: the cache then keeps the batches and their untraced state.

        Args:
            **compile_kwargs: Passed on to ``torch.compile`` (e.g. ``backend``, ``mode``,
                ``fullgraph``, ``dynamic``).

        Returns:
            The operator itself, so ``A = Operator(...).compile()`` works.
        """
        if not self._has_batch_product():
            return super().compile(**compile_kwargs)
        self._prepare_compile()

        def product(values, X, y, state, *chunk: Tensor) -> Tuple[Tensor, ...]:
            ad = FunctionalAutodiff(values, state)
            return tuple(self._prepare_batch(X, y, ad)(list(chunk)))

        # static shapes by default: double backward of convolutions fails with symbolic sizes
        compiled = torch.compile(product, **{"dynamic": False, **compile_kwargs})

        def compiled_batch_product(*args) -> Tuple[Tensor, ...]:
            with second_order_context():  # traced with attention kernels that differentiate twice
                return compiled(*args)

        self._compiled_batch_product = compiled_batch_product
        self._product_cache = None  # cached eager multiplies are rebuilt as compiled ones
        return self


def _data_versions(batch) -> tuple:
    """Version counters of the tensors of a batch ``(X, y)`` (bumped by in-place edits)."""
    X, y = batch
    tensors = list(X.values()) if isinstance(X, MutableMapping) else [X]
    return tuple(t._version for t in [*tensors, y] if isinstance(t, Tensor))


class _SavedTensorsMeter:
    """Sum of the storage sizes that autograd saves for backward (parameters excluded)."""

    def __init__(self, params: Sequence[Tensor]):
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in params}
        self._saved: dict = {}

    @property
    def nbytes(self) -> int:
        """Bytes saved so far."""
        return sum(self._saved.values())

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._parameter_storages:
            self._saved[storage.data_ptr()] = storage.nbytes()
        return t

    def hooks(self):
        """Context manager recording the saved tensors of the graphs built inside."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
