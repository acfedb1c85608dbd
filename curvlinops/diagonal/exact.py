r"""Exact diagonals of the GGN, the Monte-Carlo Fisher and the empirical Fisher.

All three matrices share the form (flattened 2-d view of the output, rows :math:`r` = loss
terms, see ``curvlinops._losses``)

.. math::
    \mathbf{M} = \sum_b \frac{w_b}{c_b} \sum_{r \in b} \sum_v
    (\mathbf{J}_r^\top \mathbf{s}_{r,v}) (\mathbf{J}_r^\top \mathbf{s}_{r,v})^\top,
    \qquad
    \mathrm{diag}(\mathbf{M}) = \sum_b \frac{w_b}{c_b} \sum_{r, v}
    (\mathbf{J}_r^\top \mathbf{s}_{r,v})^{\odot 2},

with :math:`\mathbf{J}_r` the Jacobian of row :math:`r`'s output, :math:`w_b, c_b` the batch
weight and loss normalisation of the operators, and vectors :math:`\mathbf{s}_{r,v}`:

- GGN (type-2): the :math:`C` columns of a square root of the row loss Hessian (MSE
  :math:`\sqrt{2}\mathbf{I}`, cross-entropy :math:`\mathrm{diag}(\sqrt{\mathbf{p}}) -
  \mathbf{p}\sqrt{\mathbf{p}}^\top`, BCE :math:`\mathrm{diag}(\sqrt{\sigma(1-\sigma)})`);
- Monte-Carlo Fisher: ``mc_samples`` sampled output gradients divided by
  :math:`\sqrt{M}`, drawn exactly as :class:`~curvlinops.FisherMCLinearOperator` draws them
  (same seed, same samples);
- empirical Fisher: the gradient of the row loss at the true label.

The squared vectors :math:`\mathbf{J}_r^\top \mathbf{s}_{r,v}` are per-datum gradients,
computed with ``torch.func`` (``vmap`` over data points and vectors of a ``vjp`` of the model
evaluated on one data point) and squared right away. Data points are processed in chunks
so that at most ``max_elements`` gradient entries exist at once: memory does not grow with
batch size times classes times parameters. So the model must treat data points
independently (no batch statistics; put BatchNorm in ``eval()`` mode).
"""

import math
from collections.abc import MutableMapping
from math import sqrt
from typing import Callable, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from curvlinops import _distributed
from curvlinops._autodiff import make_functional_model, second_order_context
from curvlinops._ekfac_correction import per_example_square_sums
from curvlinops._layer_pass import (
    LayerBatch,
    LayerPass,
    has_symmetric_padding,
    layer_rows,
    partition_parameters,
)
from curvlinops._losses import (
    LossStrategy,
    MonteCarloSampling,
    check_positive_integer,
    loss_strategy,
)
from curvlinops._torch_base import CurvatureLinearOperator, PyTorchLinearOperator

MAX_ELEMENTS = 2**24


def _datum_inputs(X: Union[Tensor, MutableMapping]):
    """Split a batch input into what ``vmap`` maps over and a rebuild function."""
    if isinstance(X, Tensor):
        return X, lambda x: x.unsqueeze(0)
    tensors = {k: v for k, v in X.items() if isinstance(v, Tensor)}
    others = {k: v for k, v in X.items() if not isinstance(v, Tensor)}

    def rebuild(x: dict):
        return type(X)({**others, **{k: v.unsqueeze(0) for k, v in x.items()}})

    return tensors, rebuild


def _slice_inputs(X, start: int, stop: int):
    if isinstance(X, Tensor):
        return X[start:stop]
    return {k: v[start:stop] for k, v in X.items()}


def squared_gradient_sum(
    model_func: nn.Module,
    params: List[Tensor],
    X: Union[Tensor, MutableMapping],
    cotangents: Tensor,
    max_elements: int = MAX_ELEMENTS,
    detach: bool = True,
) -> List[Tensor]:
    r"""``sum_n sum_w (J_n^T u_{n,w})^2`` with per-datum gradients (``torch.func``).

    Args:
        model_func: The network.
        params: The parameters.
        X: Batch input with ``B`` data points (tensor or dict of tensors, batch axis first).
        cotangents: ``[B, W, 1, *S]``: ``W`` output cotangents per data point, each shaped like
            the model's output on that single data point.
        max_elements: Most gradient entries held at once (chunk size over data points).
        detach: Return constants; with ``False`` the result stays differentiable w.r.t.
            ``params`` (``torch.func`` composes with autograd).

    Returns:
        The sums, shaped like ``params``.
    """
    check_positive_integer(max_elements, "max_elements")
    model = make_functional_model(model_func, params)
    mapped, rebuild = _datum_inputs(X)
    primals = tuple(p.detach() if detach else p for p in params)

    def datum(x_n, cot_n):
        def f(*values):
            return model(values, rebuild(x_n))

        _, pullback = vjp(f, *primals)
        grads = vmap(pullback)(cot_n)
        return tuple((g**2).sum(0) for g in grads)

    B, W = cotangents.shape[:2]
    D = sum(p.numel() for p in params)
    chunk = max(1, max_elements // max(1, W * D))
    totals = [torch.zeros_like(p) for p in primals]
    for start in range(0, B, chunk):
        stop = min(B, start + chunk)
        with second_order_context():  # the math attention kernel has batching rules
            squares = vmap(datum)(_slice_inputs(mapped, start, stop), cotangents[start:stop])
        totals = [total + sq.sum(0) for total, sq in zip(totals, squares)]
    return totals


def _row_cotangents(
    strategy: LossStrategy, vectors: Tensor, B: int, output_shape: torch.Size
) -> Tensor:
    """Place the row vectors ``[V, R, C]`` into per-datum output cotangents ``[B, W, 1, *S]``.

    Datum ``n`` owns rows ``n R' .. (n+1) R' - 1`` (batch axis outermost); vector ``(v, r)``
    is zero except on its own row, so ``W = V R'``.
    """
    V, R, C = vectors.shape
    rows_per_datum = R // B
    per_datum = vectors.reshape(V, B, rows_per_datum, C)
    eye = torch.eye(rows_per_datum, dtype=vectors.dtype, device=vectors.device)
    rows = torch.einsum("vnrc,rs->nvrsc", per_datum, eye)  # [B, V, R', R', C]
    rows = rows.reshape(B, V * rows_per_datum, rows_per_datum, C)
    datum_shape = (B, V * rows_per_datum, 1, *output_shape[1:])
    return strategy.from_rows(rows, torch.Size(datum_shape), num_leading=2)


class _DiagonalAlgebra:
    """Entry-wise product, trace and damped inverse of an operator with a ``diagonal``."""

    diagonal: List[Tensor]

    @property
    def trace(self) -> Tensor:
        """The sum of the diagonal entries."""
        return sum(d.sum() for d in self.diagonal)

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        return [d.unsqueeze(-1) * x for d, x in zip(self.diagonal, X)]

    def inverse(self, damping: float = 0.0) -> "DiagonalLinearOperator":
        r"""The inverse of the damped diagonal.

        Args:
            damping: Added to every diagonal entry before inverting.

        Returns:
            :math:`(\mathrm{diag}(\mathbf{d}) + \delta\mathbf{I})^{-1}`.

        Raises:
            ValueError: If a damped entry is zero (not invertible).
        """
        if (
            not isinstance(damping, (int, float))
            or isinstance(damping, bool)
            or not (math.isfinite(damping))
        ):
            raise ValueError(f"damping must be a finite number, got {damping!r}.")
        damped = [d + damping for d in self.diagonal]
        if any((d == 0).any() for d in damped):
            raise ValueError(
                "The damped diagonal has zero entries and cannot be inverted; pass damping > 0."
            )
        return DiagonalLinearOperator([1.0 / d for d in damped])


class DiagonalLinearOperator(_DiagonalAlgebra, PyTorchLinearOperator):
    r"""A diagonal matrix on a tensor-product space (e.g. the parameter space).

    Multiplies entry-wise, reports its ``trace``, and inverts with damping:
    ``inverse(delta)`` is :math:`(\mathrm{diag}(\mathbf{d}) + \delta\mathbf{I})^{-1}`.

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    SELF_ADJOINT: bool = True

    def __init__(self, diagonal: List[Tensor]):
        """Wrap a diagonal in list format.

        Args:
            diagonal: Tensors holding the diagonal entries, shaped like the space.
        """
        super().__init__([d.shape for d in diagonal], [d.shape for d in diagonal])
        self._diagonal = list(diagonal)

    @property
    def diagonal(self) -> List[Tensor]:
        """The diagonal in list format."""
        return self._diagonal

    @property
    def device(self) -> torch.device:
        """The diagonal's device."""
        return self.diagonal[0].device

    @property
    def dtype(self) -> torch.dtype:
        """The diagonal's dtype."""
        return self.diagonal[0].dtype


class _ExactDiagonal(_DiagonalAlgebra, CurvatureLinearOperator):
    """Exact curvature diagonal over a data set, computed at first use and cached."""

    SELF_ADJOINT: bool = True

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: Union[MSELoss, CrossEntropyLoss, BCEWithLogitsLoss],
        params: List[Tensor],
        data: Iterable,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: Optional[int] = None,
        batch_size_fn: Optional[Callable] = None,
    ):
        loss_strategy(loss_func, type(self).__name__)  # unsupported losses raise
        self._cached_diagonal: Optional[List[Tensor]] = None
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

    def _row_vectors(self, output_flat: Tensor, y_flat: Tensor, y: Tensor) -> Tensor:
        """The vectors ``s_{r,v}`` of a batch, ``[V, R, C]`` (unnormalised)."""
        raise NotImplementedError

    @property
    def diagonal(self) -> List[Tensor]:
        """The exact diagonal in list format (computed once)."""
        if self._cached_diagonal is None:
            self._cached_diagonal = self._compute_diagonal()
        return self._cached_diagonal

    def _compute_diagonal(self) -> List[Tensor]:
        with _distributed.agreement(self._process_group, "The exact diagonal"):
            layerwise = self._layerwise_diagonal()
            diagonal = self._per_datum_diagonal() if layerwise is None else layerwise
        return _distributed.all_reduce_(diagonal, self._process_group, "Summing the diagonal")

    def _layerwise_diagonal(self) -> Optional[List[Tensor]]:
        r"""Per-layer computation for Linear/Conv parameters and one loss term per datum.

        Uses the layer pass (one backward pass per batch, all vectors batched) to get each
        layer's inputs ``a`` and output gradients ``g``; the diagonal of a weight is then
        :math:`\sum_{n,v} (\sum_s g_{n,v,s} a_{n,s}^\top)^{\odot 2}` and of a bias
        :math:`\sum_{n,v} (\sum_s g_{n,v,s})^2`, with no per-parameter-entry Jacobians.

        Returns:
            The diagonal, or ``None`` (use the per-datum path) for parameters outside
            supported layers, convolutions needing asymmetric padding, a layer called more
            than once per forward pass (tied weights), or a batch with several loss terms per
            datum (their cross terms would enter the squares).
        """
        mapping, missing = partition_parameters(self._params, self._model_func)
        modules = dict(self._model_func.named_modules())
        layers = {name: modules[name] for name in mapping}
        if missing or not all(has_symmetric_padding(m) for m in layers.values()):
            return None
        strategy = loss_strategy(self._loss_func)
        layer_pass = LayerPass(
            self._model_func,
            layers,
            strategy.to_rows,
            strategy.flatten_labels,
            self.MAX_COLUMNS_PER_CHUNK,
        )
        self._start_pass()
        totals = [torch.zeros_like(p) for p in self._params]
        weights = [n for n, e in mapping.items() if "weight" in e]
        for batch in layer_pass.run(
            self._loop_over_data(desc="diagonal"),
            weights,
            lambda name, x: layer_rows(layers[name], x, reduce=False),
            self._layer_vectors,
        ):
            if batch.reused or batch.grads is None:
                return None
            _add_layer_squares(totals, mapping, batch)
        return totals

    def _layer_vectors(
        self, X, y: Tensor, output: Tensor, f_flat: Tensor, y_flat: Tensor
    ) -> Optional[Tensor]:
        r"""The row vectors scaled by :math:`\sqrt{w_b / c_b}`, or ``None`` unless 2-d."""
        if output.ndim != 2 or y.ndim not in (1, 2):
            return None
        f = f_flat.detach()
        strategy = loss_strategy(self._loss_func)
        # rows the loss ignores (ignore_index) contribute nothing; mean over the counted ones
        scale = self._get_normalization_factor(X, y) / strategy.normalization(f, y_flat)
        return strategy.mask_rows(self._row_vectors(f, y_flat, y), y_flat) * sqrt(scale)

    def _per_datum_diagonal(self) -> List[Tensor]:
        self._start_pass()
        totals = [torch.zeros_like(p, dtype=self.dtype) for p in self._params]
        for X, y in self._loop_over_data(desc="diagonal"):
            with torch.no_grad():
                output = self._model_func(X)
            strategy = loss_strategy(self._loss_func)
            output_flat, y_flat = strategy.flatten(output, y)
            vectors = strategy.mask_rows(self._row_vectors(output_flat, y_flat, y), y_flat)
            scale = self._get_normalization_factor(X, y) / strategy.normalization(
                output_flat, y_flat
            )
            B = output.shape[0]
            cotangents = _row_cotangents(strategy, vectors, B, output.shape)
            squares = squared_gradient_sum(self._model_func, self._params, X, cotangents)
            for total, sq in zip(totals, squares):
                total.add_(sq, alpha=scale)
        return totals


def _add_layer_squares(totals: List[Tensor], mapping, batch: LayerBatch):
    """Add a batch's squared per-datum layer gradients to the diagonal ``totals``."""
    for name, entry in mapping.items():
        grads = batch.grads[name]
        g = grads.reshape(-1, *grads.shape[2:])  # [V * B, S, d_out]
        if "bias" in entry:
            totals[entry["bias"]] += per_example_square_sums(g, None)
        if "weight" in entry:
            a = batch.inputs[name]
            a = a.unsqueeze(0).expand(grads.shape[0], *a.shape)
            square_sums = per_example_square_sums(g, a.reshape(-1, *a.shape[2:]))
            totals[entry["weight"]] += square_sums.reshape(totals[entry["weight"]].shape)


class GGNDiagonalLinearOperator(_ExactDiagonal):
    """Exact diagonal of the GGN (type-2) of ``MSELoss``/``CrossEntropyLoss``/``BCEWithLogitsLoss``.

    Same data conventions as :class:`~curvlinops.GGNLinearOperator`; multiplies entry-wise,
    ``trace`` and ``inverse(damping)`` as :class:`DiagonalLinearOperator`.
    """

    def _row_vectors(self, output_flat: Tensor, y_flat: Tensor, y: Tensor) -> Tensor:
        strategy = loss_strategy(self._loss_func)
        strategy.check_targets(y, type(self).__name__)
        return strategy.hessian_sqrt_columns(output_flat)


class EFDiagonalLinearOperator(_ExactDiagonal):
    """Exact diagonal of the empirical Fisher (same conventions as ``EFLinearOperator``)."""

    def _row_vectors(self, output_flat: Tensor, y_flat: Tensor, y: Tensor) -> Tensor:
        return loss_strategy(self._loss_func).row_gradients(output_flat, y_flat).unsqueeze(0)


class FisherMCDiagonalLinearOperator(MonteCarloSampling, _ExactDiagonal):
    """Exact diagonal of the Monte-Carlo Fisher.

    The samples are those ``FisherMCLinearOperator`` draws for the same ``seed`` and
    ``mc_samples``.
    """

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: Union[MSELoss, CrossEntropyLoss, BCEWithLogitsLoss],
        params: List[Tensor],
        data: Iterable,
        progressbar: bool = False,
        check_deterministic: bool = True,
        seed: int = 2147483647,
        mc_samples: int = 1,
        num_data: Optional[int] = None,
        batch_size_fn: Optional[Callable] = None,
    ):
        """Set up the operator (see :class:`~curvlinops.FisherMCLinearOperator`).

        Args:
            model_func: The network.
            loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
            params: The parameters.
            data: Re-iterable batches ``(X, y)``.
            progressbar: Show progress bars.
            check_deterministic: Check determinism at construction.
            seed: Seed of the samples.
            mc_samples: Number of samples per loss term.
            num_data: Number of data points (one pass if ``None``).
            batch_size_fn: Number of data points of a batch input.
        """
        self._init_sampling(loss_func, seed, mc_samples, type(self).__name__)
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

    def _row_vectors(self, output_flat: Tensor, y_flat: Tensor, y: Tensor) -> Tensor:
        strategy = loss_strategy(self._loss_func)
        strategy.check_targets(y, type(self).__name__)
        samples = strategy.grad_samples(output_flat, self._mc_samples, self._generator)
        return samples / sqrt(self._mc_samples)


def ggn_diagonal(
    model_func: nn.Module,
    loss_func: Union[MSELoss, CrossEntropyLoss, BCEWithLogitsLoss],
    params: List[Tensor],
    data: Iterable,
    progressbar: bool = False,
    num_data: Optional[int] = None,
    batch_size_fn: Optional[Callable] = None,
    *,
    process_group=None,
) -> List[Tensor]:
    """Exact diagonal of the GGN (type-2), shaped like ``params``.

    Args:
        model_func: The network.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: The parameters.
        data: Re-iterable batches ``(X, y)``.
        progressbar: Show a progress bar.
        num_data: Number of data points (one pass if ``None``).
        batch_size_fn: Number of data points of a batch input (needed for dict inputs).
        process_group: A ``torch.distributed`` process group: every rank passes its shard
            of the data and gets the diagonal over the union (see docs/scaling.rst).

    Returns:
        The diagonal in list format.
    """
    return GGNDiagonalLinearOperator(
        model_func,
        loss_func,
        params,
        data,
        progressbar,
        False,
        num_data,
        batch_size_fn,
        process_group=process_group,
    ).diagonal


def ef_diagonal(
    model_func: nn.Module,
    loss_func: Union[MSELoss, CrossEntropyLoss, BCEWithLogitsLoss],
    params: List[Tensor],
    data: Iterable,
    progressbar: bool = False,
    num_data: Optional[int] = None,
    batch_size_fn: Optional[Callable] = None,
    *,
    process_group=None,
) -> List[Tensor]:
    """Exact diagonal of the empirical Fisher, shaped like ``params``.

    Args:
        model_func: The network.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: The parameters.
        data: Re-iterable batches ``(X, y)``.
        progressbar: Show a progress bar.
        num_data: Number of data points (one pass if ``None``).
        batch_size_fn: Number of data points of a batch input (needed for dict inputs).
        process_group: A ``torch.distributed`` process group: every rank passes its shard
            of the data and gets the diagonal over the union (see docs/scaling.rst).

    Returns:
        The diagonal in list format.
    """
    return EFDiagonalLinearOperator(
        model_func,
        loss_func,
        params,
        data,
        progressbar,
        False,
        num_data,
        batch_size_fn,
        process_group=process_group,
    ).diagonal


def fisher_mc_diagonal(
    model_func: nn.Module,
    loss_func: Union[MSELoss, CrossEntropyLoss, BCEWithLogitsLoss],
    params: List[Tensor],
    data: Iterable,
    progressbar: bool = False,
    seed: int = 2147483647,
    mc_samples: int = 1,
    num_data: Optional[int] = None,
    batch_size_fn: Optional[Callable] = None,
    *,
    process_group=None,
) -> List[Tensor]:
    """Exact diagonal of the Monte-Carlo Fisher (samples as ``FisherMCLinearOperator``).

    Args:
        model_func: The network.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: The parameters.
        data: Re-iterable batches ``(X, y)``.
        progressbar: Show a progress bar.
        seed: Seed of the samples.
        mc_samples: Number of samples per loss term.
        num_data: Number of data points (one pass if ``None``).
        batch_size_fn: Number of data points of a batch input (needed for dict inputs).
        process_group: A ``torch.distributed`` process group: every rank passes its shard
            of the data and gets the diagonal over the union (see docs/scaling.rst).

    Returns:
        The diagonal in list format.
    """
    return FisherMCDiagonalLinearOperator(
        model_func,
        loss_func,
        params,
        data,
        progressbar,
        False,
        seed,
        mc_samples,
        num_data,
        batch_size_fn,
        process_group=process_group,
    ).diagonal


__all__ = [
    "DiagonalLinearOperator",
    "GGNDiagonalLinearOperator",
    "EFDiagonalLinearOperator",
    "FisherMCDiagonalLinearOperator",
    "ggn_diagonal",
    "ef_diagonal",
    "fisher_mc_diagonal",
    "squared_gradient_sum",
]
