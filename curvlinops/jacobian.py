r"""Jacobian of the model output w.r.t. the parameters, and its transpose.

For data points :math:`\mathbf{x}_1, \dots, \mathbf{x}_N` (batches concatenated in data order)
with per-datum outputs of shape :math:`S`, the Jacobian has shape :math:`(N \prod S) \times D`,

.. math::
    [\mathbf{J}]_{(n, s), d} = \frac{\partial f_{\boldsymbol{\theta}}(\mathbf{x}_n)_s}
    {\partial \theta_d}\,,

rows ordered by data point, then output entry (row-major). Its output space is one tensor
``[N, *S]``; the transposed operator swaps the spaces. :math:`\mathbf{J}\mathbf{M}` transposes the
pullback and :math:`\mathbf{J}^\top \mathbf{V}` is the pullback, one forward pass per batch and
all columns at once.
"""

from collections.abc import Callable, MutableMapping
from functools import cached_property
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from curvlinops._autodiff import (
    EAGER,
    MAX_COLUMNS_PER_CHUNK,
    Autodiff,
    columns_first,
    columns_last,
    eager_batch_product,
    in_column_chunks,
    linearize,
    make_functional_model,
    second_order_context,
)
from curvlinops._torch_base import CurvatureLinearOperator, PyTorchLinearOperator


def prepare_jacobian_product(
    ad: Autodiff, f: Callable[..., Tensor], values: Sequence[Tensor], X, transposed: bool
) -> Callable[[List[Tensor]], List[Tensor]]:
    """One batch's Jacobian (or its transpose): forward pass once, then ``multiply``.

    Args:
        ad: The autodiff implementation.
        f: Functional model ``f(param_values, X)``.
        values: The parameter values.
        X: Input batch.
        transposed: Whether to multiply with the transposed Jacobian.

    Returns:
        ``multiply(M_chunk)``: ``[J M]`` (entry ``[B, *S, K]``) for ``M`` in parameter list
        format, or ``J^T V`` in parameter list format for ``[V]`` with ``V`` ``[B, *S, K]``.
    """
    output, pullback = ad.vjp(lambda *v: f(v, X), values)
    apply = pullback if transposed else linearize(ad, output, pullback)

    def multiply(M_chunk: List[Tensor]) -> List[Tensor]:
        M_cols, batched = columns_first(M_chunk)
        result = apply(M_cols, batched)
        return columns_last(result if transposed else [result], batched)

    return multiply


def make_batch_jacobian_matrix_product(
    model_func: nn.Module, params: Tuple[Tensor, ...]
) -> Callable[..., Tensor]:
    """Build the product of a batch's output-parameter Jacobian with a matrix.

    Args:
        model_func: The neural network.
        params: The parameters.

    Returns:
        ``jacobian_matrix_product(X, *M, max_columns=16)`` returning ``[B, *S, K]`` for
        ``M`` in list format.
    """
    f = make_functional_model(model_func, params)
    product = eager_batch_product(
        lambda X, y: prepare_jacobian_product(EAGER, f, params, X, transposed=False)
    )

    def jacobian_matrix_product(X, *M: Tensor, max_columns: int = MAX_COLUMNS_PER_CHUNK):
        return product(X, None, *M, max_columns=max_columns)[0]

    return jacobian_matrix_product


def make_batch_transposed_jacobian_matrix_product(
    model_func: nn.Module, params: Tuple[Tensor, ...]
) -> Callable[..., Tuple[Tensor, ...]]:
    """Build the product of a batch's transposed Jacobian with a matrix.

    Args:
        model_func: The neural network.
        params: The parameters.

    Returns:
        ``transposed_jacobian_matrix_product(X, V, max_columns=16)`` for ``V``
        ``[B, *S, K]``, returning a tuple of ``[*p.shape, K]``.
    """
    f = make_functional_model(model_func, params)
    product = eager_batch_product(
        lambda X, y: prepare_jacobian_product(EAGER, f, params, X, transposed=True)
    )

    def transposed_jacobian_matrix_product(
        X, V: Tensor, max_columns: int = MAX_COLUMNS_PER_CHUNK
    ) -> Tuple[Tensor, ...]:
        return product(X, None, V, max_columns=max_columns)

    return transposed_jacobian_matrix_product


def _check_num_data(op: CurvatureLinearOperator, total: int):
    """Raise a ``ValueError`` if the data hold another number of points than ``num_data``.

    The Jacobians' output space has one row block per data point, so a wrong ``num_data``
    would misalign the rows with the data.
    """
    if total != op._N_data:
        at_least = "at least " if total > op._N_data else ""
        raise ValueError(
            f"The data hold {at_least}{total} data points, but num_data={op._N_data}: the "
            "Jacobian has one row per data point. Pass num_data equal to the total number of "
            "data points (or None to count them), and keep the data unchanged."
        )


class _JacobianBase(CurvatureLinearOperator):
    """Shared set-up of the Jacobian and its transpose (no loss, fixed data order)."""

    FIXED_DATA_ORDER: bool = True
    _CACHEABLE: bool = False  # rows follow the data order; see cache()
    _TRANSPOSED: bool = False

    def __init__(
        self,
        model_func: nn.Module,
        params: List[nn.Parameter],
        data,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: Optional[int] = None,
        batch_size_fn: Optional[Callable[[Union[Tensor, MutableMapping]], int]] = None,
    ):
        """Set up the operator.

        Args:
            model_func: The neural network.
            params: The parameters (define the parameter space).
            data: Re-iterable source of batches ``(X, y)`` in a fixed order; ``y`` is unused.
            progressbar: Show a progress bar over batches.
            check_deterministic: Check determinism at construction.
            num_data: Total number of data points (computed if ``None``).
            batch_size_fn: Number of data points of a batch input (required for dict ``X``).
        """
        super().__init__(
            model_func,
            None,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
        )

    @cached_property
    def _output_shape(self) -> torch.Size:
        """Shape ``[N, *S]`` of the outputs of all data, from one forward pass."""
        X, _ = next(iter(self._loop_over_data(desc="output_shape")))
        with torch.no_grad(), second_order_context():
            output = self._functional_model(self._params, X)
        return torch.Size([self._N_data, *output.shape[1:]])

    def _prepare_batch(
        self, X: Union[Tensor, MutableMapping], y: Tensor, ad: Autodiff = EAGER
    ) -> Callable[[List[Tensor]], List[Tensor]]:
        """Forward pass, then products with the (transposed) Jacobian per column chunk."""
        values = ad.values(self._params)
        return prepare_jacobian_product(
            ad, self._functional_model, values, X, transposed=self._TRANSPOSED
        )

    def _adjoint_kwargs(self) -> dict:
        """Arguments that rebuild the operator's counterpart on the same model and data."""
        return dict(
            model_func=self._model_func,
            params=self._params,
            data=self._data,
            progressbar=self._progressbar,
            check_deterministic=False,
            num_data=self._N_data,
            batch_size_fn=self._batch_size_fn,
        )


class JacobianLinearOperator(_JacobianBase):
    r"""Linear operator for the Jacobian of the model outputs w.r.t. the parameters.

    Maps a parameter-space vector to the output space ``[N, *S]``:
    :math:`[\mathbf{J}]_{(n, s), d} = \partial f(\mathbf{x}_n)_s / \partial \theta_d`.

    Attributes:
        FIXED_DATA_ORDER: ``True``.
    """

    def _get_out_shape(self) -> List[torch.Size]:
        return [self._output_shape]

    def _combine(self, M: List[Tensor], batches) -> List[Tensor]:
        """Write the batches' Jacobian-matrix products into consecutive rows of the output.

        The output is allocated once in the input's layout (see
        :meth:`~curvlinops._torch_base.PyTorchLinearOperator._new_output`), so that no
        concatenation and no final re-layout copy is needed.
        """
        result, start = None, 0
        for _, _, multiply in batches:
            part = in_column_chunks(multiply, M, self.MAX_COLUMNS_PER_CHUNK)[0]
            del multiply  # one batch's graph alive at a time
            end = start + part.shape[0]
            if end > self._N_data:
                _check_num_data(self, end)
            if result is None:
                (result,) = self._new_output(M[0].shape[-1], like=part, layout_of=M[0])
            result[start:end] = part
            start = end
        _check_num_data(self, start)
        return [result]

    def _adjoint(self) -> PyTorchLinearOperator:
        return TransposedJacobianLinearOperator(**self._adjoint_kwargs())


class TransposedJacobianLinearOperator(_JacobianBase):
    r"""Linear operator for the transposed Jacobian of the model outputs.

    Maps an output-space tensor ``[N, *S]`` to parameter space:
    :math:`\mathbf{J}^\top \mathbf{v} = \sum_n \sum_s v_{n, s} \nabla_{\boldsymbol{\theta}}
    f(\mathbf{x}_n)_s`.

    Attributes:
        FIXED_DATA_ORDER: ``True``.
    """

    def _get_in_shape(self) -> List[torch.Size]:
        return [self._output_shape]

    _TRANSPOSED: bool = True

    def _combine(self, M: List[Tensor], batches) -> List[Tensor]:
        """Sum the batches' products with consecutive row blocks of ``M``."""
        (V,) = M
        result = [r.zero_() for r in self._new_output(V.shape[-1], like=V)]  # V's layout
        start = 0
        for X, _, multiply in batches:
            end = start + self._batch_size(X)
            if end > V.shape[0]:
                _check_num_data(self, end)
            batch_result = in_column_chunks(multiply, [V[start:end]], self.MAX_COLUMNS_PER_CHUNK)
            for r, p in zip(result, batch_result):
                r.add_(p)
            start = end
            del multiply  # one batch's graph alive at a time
        _check_num_data(self, start)
        return result

    def _adjoint(self) -> PyTorchLinearOperator:
        return JacobianLinearOperator(**self._adjoint_kwargs())
