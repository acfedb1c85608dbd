r"""Hessian of the empirical risk.

For the empirical risk :math:`\mathcal{L}(\boldsymbol{\theta}) = \sum_b w_b
\ell_b(\boldsymbol{\theta})` (:math:`w_b = 1` for ``reduction='sum'``, :math:`B_b / N` for
``'mean'``), the operator represents

.. math::
    \nabla^2_{\boldsymbol{\theta}} \mathcal{L}(\boldsymbol{\theta})
    = \sum_b w_b\, \nabla^2_{\boldsymbol{\theta}} \ell_b(\boldsymbol{\theta})\,.

With ``block_sizes = [s_1, s_2, ...]`` it represents the block-diagonal matrix whose
:math:`i`-th block is the Hessian w.r.t. the :math:`i`-th consecutive group of :math:`s_i`
parameter tensors.

Products are reverse-over-reverse: one forward pass and one backward pass that records its own
graph per batch, then one backward pass through that graph for all columns at once
(``is_grads_batched``). On this CPU that beat forward-over-reverse (``vmap`` of ``jvp`` of
``grad``) for 1 and for 16 columns (see ``benchmarks/``), and it is exact for
``nn.LayerNorm``, where ``torch.func.hessian`` is not in torch 2.13.
"""

from collections.abc import Callable, MutableMapping
from functools import cached_property
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from curvlinops._autodiff import (
    MAX_COLUMNS_PER_CHUNK,
    columns_first,
    columns_last,
    detached_leaves,
    in_column_chunks,
    make_functional_model,
    second_order_context,
    vjp,
)
from curvlinops._torch_base import CurvatureLinearOperator


def parameter_groups(num_params: int, block_sizes: Optional[List[int]]) -> List[range]:
    """Index ranges of consecutive parameter groups (one group without ``block_sizes``)."""
    sizes = [num_params] if block_sizes is None else list(block_sizes)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def make_batch_hessian_matrix_product(
    model_func: nn.Module,
    loss_func: Callable[[Tensor, Tensor], Tensor],
    params: Tuple[Tensor, ...],
    block_sizes: Optional[List[int]] = None,
) -> Callable[..., Tuple[Tensor, ...]]:
    """Build the product of the (block-diagonal) mini-batch Hessian with a matrix.

    Args:
        model_func: The neural network.
        loss_func: The loss function.
        params: The parameters w.r.t. which the Hessian is taken.
        block_sizes: Sizes of consecutive parameter groups; ``None`` for the full Hessian.

    Returns:
        ``hessian_matrix_product(X, y, *M, max_columns=16)`` returning ``H_b M`` in list
        format (entries ``[*p.shape, K]``), with ``H_b`` the Hessian of
        ``loss_func(model_func(X), y)``. Columns are multiplied in chunks of at most
        ``max_columns`` after one forward and one (recorded) backward pass. Its attribute
        ``prepare(X, y)`` runs those two passes alone and returns ``multiply(M_chunk)``,
        which then costs one backward pass per call (used by the product cache).
    """
    f = make_functional_model(model_func, params)
    groups = parameter_groups(len(params), block_sizes)

    def prepare(
        X: Union[Tensor, MutableMapping], y: Tensor
    ) -> Callable[[List[Tensor]], List[Tensor]]:
        with second_order_context():
            leaves = detached_leaves(params)
            loss = loss_func(f(leaves, X), y)
            grad = vjp([loss], leaves, [loss.new_ones(())], batched=False, create_graph=True)

        def multiply(M_chunk: List[Tensor]) -> List[Tensor]:
            M_cols, batched = columns_first(M_chunk)
            HM = [None] * len(params)
            for group in groups:
                products = vjp(
                    [grad[i] for i in group],
                    [leaves[i] for i in group],
                    [M_cols[i] for i in group],
                    batched=batched,
                )
                for i, product in zip(group, products):
                    HM[i] = product.detach()
            return columns_last(HM, batched)

        return multiply

    def hessian_matrix_product(
        X: Union[Tensor, MutableMapping],
        y: Tensor,
        *M: Tensor,
        max_columns: int = MAX_COLUMNS_PER_CHUNK,
    ) -> Tuple[Tensor, ...]:
        return tuple(in_column_chunks(prepare(X, y), M, max_columns))

    hessian_matrix_product.prepare = prepare
    return hessian_matrix_product


def make_functional_hessian_matrix_product(
    model_func: nn.Module,
    loss_func: Callable[[Tensor, Tensor], Tensor],
    params: Tuple[Tensor, ...],
    block_sizes: Optional[List[int]] = None,
) -> Callable[..., Tuple[Tensor, ...]]:
    """Build the (block-diagonal) mini-batch Hessian product as a ``torch.func`` program.

    Reverse-over-reverse like the eager product (``vmap`` over the columns of the ``vjp`` of
    ``grad``; forward mode is wrong or missing for some layers in torch 2.13), with no
    ``torch.autograd`` call, so that ``torch.compile`` can trace it whole.

    Args:
        model_func: The neural network.
        loss_func: The loss function.
        params: The parameters w.r.t. which the Hessian is taken.
        block_sizes: Sizes of consecutive parameter groups; ``None`` for the full Hessian.

    Returns:
        ``product(param_values, X, y, *M)`` returning ``H_b M`` in list format (entries
        ``[*p.shape, K]``), evaluated at ``param_values`` instead of ``params``.
    """
    f = make_functional_model(model_func, params)
    groups = [tuple(group) for group in parameter_groups(len(params), block_sizes)]
    all_argnums = [tuple(range(len(group))) for group in groups]  # not traced by dynamo

    def product(
        param_values: Sequence[Tensor], X: Union[Tensor, MutableMapping], y: Tensor, *M: Tensor
    ) -> Tuple[Tensor, ...]:
        HM = [None] * len(params)
        for group, argnums in zip(groups, all_argnums):

            def loss_of_group(*group_values: Tensor, group=group) -> Tensor:
                values = list(param_values)
                for i, value in zip(group, group_values):
                    values[i] = value
                return loss_func(f(values, X), y)

            gradient = torch.func.grad(loss_of_group, argnums=argnums)
            _, pullback = torch.func.vjp(gradient, *(param_values[i] for i in group))

            def hvp(*v: Tensor, pullback=pullback) -> Tuple[Tensor, ...]:
                return pullback(v)

            products = torch.func.vmap(hvp, in_dims=-1, out_dims=-1)(*(M[i] for i in group))
            for i, product_i in zip(group, products):
                HM[i] = product_i
        return tuple(HM)

    return product


class HessianLinearOperator(CurvatureLinearOperator):
    r"""Linear operator for the Hessian of an empirical risk.

    For :math:`\mathcal{L}(\boldsymbol{\theta}) = \sum_b w_b \ell_b(\boldsymbol{\theta})` with
    :math:`w_b = 1` (``reduction='sum'``) or :math:`w_b = B_b/N` (``'mean'``), represents

    .. math::
        \nabla^2_{\boldsymbol{\theta}} \mathcal{L}
        = \sum_b w_b \nabla^2_{\boldsymbol{\theta}} \ell_b(\boldsymbol{\theta})\,,

    or, with ``block_sizes``, its block diagonal over consecutive parameter groups.
    Any loss with ``reduction`` ``'mean'`` or ``'sum'`` works, for outputs of any shape.

    Attributes:
        SELF_ADJOINT: ``True``.
        SUPPORTS_BLOCKS: ``True``.
    """

    SELF_ADJOINT: bool = True
    SUPPORTS_BLOCKS: bool = True

    @cached_property
    def _batch_product(self) -> Callable[..., Tuple[Tensor, ...]]:
        """The mini-batch product, built once."""
        return make_batch_hessian_matrix_product(
            self._model_func, self._loss_func, tuple(self._params), self._block_sizes
        )

    @property
    def _functional_batch_product(self) -> Callable[..., Tuple[Tensor, ...]]:
        """The mini-batch product as a ``torch.func`` program (for :meth:`compile`)."""
        return make_functional_hessian_matrix_product(
            self._model_func, self._loss_func, tuple(self._params), self._block_sizes
        )
