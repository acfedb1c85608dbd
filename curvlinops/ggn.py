r"""Generalized Gauss-Newton (GGN) matrix.

For the empirical risk :math:`\mathcal{L}(\boldsymbol{\theta}) = \sum_b w_b\,
\ell(f_{\boldsymbol{\theta}}(\mathbf{X}_b), \mathbf{y}_b)` (:math:`w_b = 1` for
``reduction='sum'``, :math:`B_b/N` for ``'mean'``) the GGN is

.. math::
    \mathbf{G}(\boldsymbol{\theta}) = \sum_b w_b\, \mathbf{J}_b^\top
    \left(\nabla^2_{\mathbf{f}_b} \ell(\mathbf{f}_b, \mathbf{y}_b)\right) \mathbf{J}_b\,,
    \qquad \mathbf{J}_b = \frac{\partial \mathbf{f}_b}{\partial \boldsymbol{\theta}}\,,

with the loss Hessian taken w.r.t. *all* entries of the batch output
:math:`\mathbf{f}_b = f_{\boldsymbol{\theta}}(\mathbf{X}_b)`, so outputs of any shape (sequences,
images) are exact. It is the Hessian of the risk of the model linearised at
:math:`\boldsymbol{\theta}`, and positive semi-definite for convex losses.

Products use one forward pass per batch: :math:`\mathbf{J}_b \mathbf{V}` by the double-vjp trick,
the loss Hessian by double backward through the loss alone, and :math:`\mathbf{J}_b^\top` by one
backward pass, each for all columns at once. The same pattern with a different middle factor
gives the empirical and Monte-Carlo Fisher (:func:`make_batch_ggn_type_product`).
"""

from collections.abc import Callable, MutableMapping
from functools import cached_property
from typing import List, Sequence, Tuple, Union

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
    make_output_hessian_product,
    second_order_context,
    vjp,
)
from curvlinops._torch_base import CurvatureLinearOperator

# ``make_middle(output, y) -> middle``, called once per batch; ``middle(JM, batched) -> T`` is
# the output-space factor applied to ``J M`` (leading column axis if ``batched``), per chunk.
MiddleFactor = Callable[[Tensor, bool], Tensor]
MakeMiddleFactor = Callable[[Tensor, Tensor], MiddleFactor]


def make_batch_ggn_type_product(
    model_func: nn.Module, params: Tuple[Tensor, ...]
) -> Callable[..., Tuple[Tensor, ...]]:
    r"""Build ``(X, y, make_middle, *M) -> J^T middle(J M)`` with one forward pass per batch.

    Args:
        model_func: The neural network.
        params: The parameters defining :math:`\mathbf{J}`.

    Returns:
        The batch product in list format (entries ``[*p.shape, K]``), with a keyword
        ``max_columns`` (columns per chunk). ``make_middle(output, y)`` is called once per
        batch (e.g. to draw samples) and returns the output-space factor ``middle(JM,
        batched)``, which is applied to every chunk's :math:`\mathbf{J}\mathbf{M}`. Its
        attribute ``prepare(X, y, make_middle)`` runs the forward pass alone and returns
        ``multiply(M_chunk)`` (used by the product cache).
    """
    f = make_functional_model(model_func, params)

    def prepare(
        X: Union[Tensor, MutableMapping], y: Tensor, make_middle: MakeMiddleFactor
    ) -> Callable[[List[Tensor]], List[Tensor]]:
        with second_order_context():
            leaves = detached_leaves(params)
            output = f(leaves, X)
            jvp = linearize(output, leaves)
            middle = make_middle(output.detach(), y)

        def multiply(M_chunk: List[Tensor]) -> List[Tensor]:
            M_cols, batched = columns_first(M_chunk)
            T = middle(jvp(M_cols, batched), batched)
            result = vjp([output], leaves, [T], batched)
            return columns_last([r.detach() for r in result], batched)

        return multiply

    def ggn_type_product(
        X: Union[Tensor, MutableMapping],
        y: Tensor,
        make_middle: MakeMiddleFactor,
        *M: Tensor,
        max_columns: int = MAX_COLUMNS_PER_CHUNK,
    ) -> Tuple[Tensor, ...]:
        return tuple(in_column_chunks(prepare(X, y, make_middle), M, max_columns))

    ggn_type_product.prepare = prepare
    return ggn_type_product


# ``middle(output, y, JM, *extra) -> T``: the output-space factor applied to ``J M`` (leading
# column axis) inside a ``torch.func`` program; ``extra`` holds tensors computed outside it.
FunctionalMiddle = Callable[..., Tensor]


def make_functional_ggn_type_product(
    model_func: nn.Module, params: Tuple[Tensor, ...], middle: FunctionalMiddle
) -> Callable[..., Tuple[Tensor, ...]]:
    r"""Build ``J^T middle(J M)`` for one batch as a ``torch.func`` program (for compiling).

    Args:
        model_func: The neural network.
        params: The parameters defining :math:`\mathbf{J}`.
        middle: ``middle(output, y, JM, *extra)`` with ``JM`` of shape ``[K, *output.shape]``.

    Returns:
        ``product(param_values, X, y, *extra_and_M, num_extra=0)``: the first ``num_extra``
        positional tensors after ``y`` are handed to ``middle``, the rest are the matrix in
        list format (entries ``[*p.shape, K]``); returns the product in list format.
    """
    f = make_functional_model(model_func, params)

    def product(
        param_values: Sequence[Tensor],
        X: Union[Tensor, MutableMapping],
        y: Tensor,
        *extra_and_M: Tensor,
        num_extra: int = 0,
    ) -> Tuple[Tensor, ...]:
        extra, M = extra_and_M[:num_extra], extra_and_M[num_extra:]
        primals = tuple(param_values)

        def f_of(*values: Tensor) -> Tensor:
            return f(values, X)

        output, pullback = torch.func.vjp(f_of, *primals)
        # J v by transposing the pullback (double-vjp trick): no forward mode, which some
        # layers lack in torch 2.13
        _, transposed_pullback = torch.func.vjp(pullback, torch.zeros_like(output))

        def jvp(*v: Tensor) -> Tensor:
            return transposed_pullback(v)[0]

        JM = torch.func.vmap(jvp, in_dims=-1)(*M)
        T = middle(output.detach(), y, JM, *extra)
        return tuple(torch.func.vmap(pullback, out_dims=-1)(T))

    return product


def make_functional_output_hessian_product(loss_func) -> FunctionalMiddle:
    """Loss-Hessian products w.r.t. the output by ``vjp`` of ``grad`` (a functional middle)."""

    def middle(output: Tensor, y: Tensor, JM: Tensor) -> Tensor:
        gradient = torch.func.grad(lambda out: loss_func(out, y))
        _, pullback = torch.func.vjp(gradient, output)
        return torch.func.vmap(lambda v: pullback(v)[0])(JM)

    return middle


def make_batch_ggn_matrix_product(
    model_func: nn.Module,
    loss_func: Callable[[Tensor, Tensor], Tensor],
    params: Tuple[Tensor, ...],
) -> Callable[..., Tuple[Tensor, ...]]:
    """Build the product of the mini-batch GGN with a matrix in list format.

    Args:
        model_func: The neural network.
        loss_func: The loss function (any, with its own reduction).
        params: The parameters.

    Returns:
        ``ggn_matrix_product(X, y, *M, max_columns=16)`` returning ``G_b M`` (entries
        ``[*p.shape, K]``), multiplying at most ``max_columns`` columns at once.
    """
    product = make_batch_ggn_type_product(model_func, params)

    def loss_hessian(output: Tensor, y: Tensor) -> MiddleFactor:
        return make_output_hessian_product(loss_func, output, y)

    def ggn_matrix_product(X, y, *M: Tensor, **kwargs) -> Tuple[Tensor, ...]:
        return product(X, y, loss_hessian, *M, **kwargs)

    ggn_matrix_product.prepare = lambda X, y: product.prepare(X, y, loss_hessian)
    return ggn_matrix_product


def make_ggn_vector_product(
    f: Callable[..., Tensor], c: Callable[..., Tensor], num_c_extra_args: int = 0
) -> Callable[..., Tuple[Tensor, ...]]:
    """Build a GGN-vector product for a functional model and criterion.

    Args:
        f: Functional model ``f(*params, X) -> prediction``.
        c: Criterion ``c(prediction, y, *c_args) -> loss``.
        num_c_extra_args: Number of extra arguments ``c_args`` of the criterion.

    Returns:
        ``ggn_vector_product(params, X, y, *c_args, *v)`` returning ``J^T H J v`` as a tuple
        shaped like ``params``, with ``H`` the Hessian of ``c`` w.r.t. the prediction.
    """

    def ggn_vector_product(params, X, y, *args) -> Tuple[Tensor, ...]:
        c_args, v = args[:num_c_extra_args], args[num_c_extra_args:]
        with second_order_context():
            leaves = detached_leaves(params)
            output = f(*leaves, X)
            Jv = linearize(output, leaves)(v, batched=False)
            HJv = make_output_hessian_product(lambda pred, y_: c(pred, y_, *c_args), output, y)(
                Jv, batched=False
            )
            result = vjp([output], leaves, [HJv], batched=False)
        return tuple(r.detach() for r in result)

    return ggn_vector_product


class GGNLinearOperator(CurvatureLinearOperator):
    r"""Linear operator for the generalized Gauss-Newton matrix of an empirical risk.

    .. math::
        \mathbf{G}(\boldsymbol{\theta}) = \sum_b w_b\, \mathbf{J}_b^\top
        \left(\nabla^2_{\mathbf{f}_b} \ell(\mathbf{f}_b, \mathbf{y}_b)\right) \mathbf{J}_b

    with :math:`w_b = 1` (``reduction='sum'``) or :math:`B_b/N` (``'mean'``), the loss
    Hessian w.r.t. all entries of the batch output, and :math:`\mathbf{J}_b` the Jacobian of
    the batch output w.r.t. the parameters. Any loss with ``reduction`` ``'mean'`` or
    ``'sum'`` works.

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    SELF_ADJOINT: bool = True

    @cached_property
    def _batch_product(self) -> Callable[..., Tuple[Tensor, ...]]:
        """The mini-batch product, built once."""
        return make_batch_ggn_matrix_product(self._model_func, self._loss_func, tuple(self._params))

    @property
    def _functional_batch_product(self) -> Callable[..., Tuple[Tensor, ...]]:
        """The mini-batch product as a ``torch.func`` program (for :meth:`compile`)."""
        return make_functional_ggn_type_product(
            self._model_func,
            tuple(self._params),
            make_functional_output_hessian_product(self._loss_func),
        )
