r"""Jacobian of the model output w.r.t. the parameters, and its transpose.

For data points :math:`\mathbf{x}_1, \dots, \mathbf{x}_N` (batches concatenated in data order)
with per-datum outputs of shape :math:`S`, the Jacobian has shape :math:`(N \prod S) \times D`,

.. math::
    [\mathbf{J}]_{(n, s), d} = \frac{\partial f_{\boldsymbol{\theta}}(\mathbf{x}_n)_s}
    {\partial \theta_d}\,,

rows ordered by data point, then output entry (row-major). Its output space is one tensor
``[N, *S]``; the transposed operator swaps the spaces. :math:`\mathbf{J}\mathbf{M}` uses the
double-vjp trick and :math:`\mathbf{J}^\top \mathbf{V}` one backward pass per batch, each for all
columns at once.
"""

from collections.abc import Callable, MutableMapping
from functools import cached_property
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from curvlinops._autodiff import (
    MAX_COLUMNS_PER_CHUNK,
    columns_first,
    columns_last,
    detached_leaves,
    in_column_chunks,
    linearize,
    make_functional_model,
    second_order_context,
    vjp,
)
from curvlinops._torch_base import CurvatureLinearOperator, PyTorchLinearOperator


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

    def jacobian_matrix_product(
        X: Union[Tensor, MutableMapping], *M: Tensor, max_columns: int = MAX_COLUMNS_PER_CHUNK
    ) -> Tensor:
        with second_order_context():
            leaves = detached_leaves(params)
            jvp = linearize(f(leaves, X), leaves)

            def multiply(M_chunk: List[Tensor]) -> List[Tensor]:
                M_cols, batched = columns_first(M_chunk)
                return columns_last([jvp(M_cols, batched).detach()], batched)

            return in_column_chunks(multiply, M, max_columns)[0]

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

    def transposed_jacobian_matrix_product(
        X: Union[Tensor, MutableMapping], V: Tensor, max_columns: int = MAX_COLUMNS_PER_CHUNK
    ) -> Tuple[Tensor, ...]:
        with second_order_context():
            leaves = detached_leaves(params)
            output = f(leaves, X)

            def multiply(V_chunk: List[Tensor]) -> List[Tensor]:
                V_cols, batched = columns_first(V_chunk)
                JtV = vjp([output], leaves, V_cols, batched)
                return columns_last([t.detach() for t in JtV], batched)

            return tuple(in_column_chunks(multiply, [V], max_columns))

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
        f = make_functional_model(self._model_func, self._params)
        with torch.no_grad(), second_order_context():
            output = f(self._params, X)
        return torch.Size([self._N_data, *output.shape[1:]])

    def _product(self) -> Callable[..., Tuple[Tensor, ...]]:
        """``(X, *M, max_columns) -> tuple``: the eager or (after ``compile``) compiled product."""
        if self._compiled_batch_product is None:
            return self._batch_product
        values = tuple(p.detach() for p in self._params)

        def compiled_product(X, *M: Tensor, max_columns: int) -> Tuple[Tensor, ...]:
            def multiply(chunk: List[Tensor]) -> List[Tensor]:
                return list(self._compiled_batch_product(values, X, *chunk))

            return tuple(in_column_chunks(multiply, M, max_columns))

        return compiled_product

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

    @cached_property
    def _batch_product(self) -> Callable[..., Tensor]:
        return make_batch_jacobian_matrix_product(self._model_func, tuple(self._params))

    def _matmat(self, M: List[Tensor]) -> List[Tensor]:
        """Stack the batches' Jacobian-matrix products along the data axis."""
        max_columns = self.MAX_COLUMNS_PER_CHUNK
        product = self._product()
        products = [
            product(X, *M, max_columns=max_columns) for X, _ in self._loop_over_data(desc="_matmat")
        ]
        result = torch.cat([p if isinstance(p, Tensor) else p[0] for p in products])
        _check_num_data(self, result.shape[0])
        return [result]

    @property
    def _functional_batch_product(self) -> Callable[..., Tuple[Tensor]]:
        """``(param_values, X, *M) -> (J M,)`` in ``torch.func`` (for :meth:`compile`)."""
        f = make_functional_model(self._model_func, self._params)

        def product(param_values, X, *M: Tensor) -> Tuple[Tensor]:
            output, pullback = torch.func.vjp(lambda *p: f(p, X), *param_values)
            # J v by transposing the pullback: forward mode is missing for some layers
            _, transposed_pullback = torch.func.vjp(pullback, torch.zeros_like(output))

            def jvp(*v: Tensor) -> Tensor:
                return transposed_pullback(v)[0]

            return (torch.func.vmap(jvp, in_dims=-1, out_dims=-1)(*M),)

        return product

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

    @cached_property
    def _batch_product(self) -> Callable[..., Tuple[Tensor, ...]]:
        return make_batch_transposed_jacobian_matrix_product(self._model_func, tuple(self._params))

    def _matmat(self, M: List[Tensor]) -> List[Tensor]:
        """Sum the batches' products with consecutive row blocks of ``M``."""
        (V,) = M
        result = [
            torch.zeros((*p.shape, V.shape[-1]), dtype=V.dtype, device=V.device)
            for p in self._params
        ]
        start = 0
        product = self._product()
        for X, _ in self._loop_over_data(desc="_matmat"):
            end = start + self._batch_size(X)
            if end > V.shape[0]:
                _check_num_data(self, end)
            batch_result = product(X, V[start:end], max_columns=self.MAX_COLUMNS_PER_CHUNK)
            for r, p in zip(result, batch_result):
                r.add_(p)
            start = end
        _check_num_data(self, start)
        return result

    @property
    def _functional_batch_product(self) -> Callable[..., Tuple[Tensor, ...]]:
        """``(param_values, X, V) -> J^T V`` in ``torch.func`` (for :meth:`compile`)."""
        f = make_functional_model(self._model_func, self._params)

        def product(param_values, X, V: Tensor) -> Tuple[Tensor, ...]:
            _, pullback = torch.func.vjp(lambda *p: f(p, X), *param_values)
            return tuple(torch.func.vmap(pullback, in_dims=-1, out_dims=-1)(V))

        return product

    def _adjoint(self) -> PyTorchLinearOperator:
        return JacobianLinearOperator(**self._adjoint_kwargs())
