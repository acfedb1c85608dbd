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

Products are a double backward: per batch, one forward pass and one differentiable backward
pass (the gradient), then, per column chunk and parameter group, the pullback of the gradient
(:func:`prepare_hessian_product`, executed eagerly or, after ``compile``, with ``torch.func``).
"""

from collections.abc import Callable, MutableMapping
from typing import List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

from curvlinops._autodiff import (
    EAGER,
    Autodiff,
    columns_first,
    columns_last,
    eager_batch_product,
    make_functional_model,
)
from curvlinops._torch_base import CurvatureLinearOperator


def parameter_groups(num_params: int, block_sizes: Optional[List[int]]) -> List[range]:
    """Index ranges of consecutive parameter groups (one group without ``block_sizes``)."""
    sizes = [num_params] if block_sizes is None else list(block_sizes)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def prepare_hessian_product(
    ad: Autodiff,
    f: Callable[[Sequence[Tensor], Union[Tensor, MutableMapping]], Tensor],
    loss_func: Callable[[Tensor, Tensor], Tensor],
    values: Sequence[Tensor],
    X: Union[Tensor, MutableMapping],
    y: Tensor,
    groups: Sequence[range],
) -> Callable[[List[Tensor]], List[Tensor]]:
    """One batch's (block-diagonal) Hessian: gradient once, then ``multiply(M_chunk)``.

    Args:
        ad: The autodiff implementation.
        f: Functional model ``f(param_values, X)``.
        loss_func: The loss function.
        values: The parameter values.
        X: Input batch.
        y: Label batch.
        groups: Index ranges of the parameter groups (diagonal blocks).

    Returns:
        ``multiply(M_chunk)``: ``H_b M_chunk`` in list format (entries ``[*p.shape, K]``);
        each call is one pullback of the gradient per group.
    """
    probe = ad.probe

    def loss_of(*v: Tensor) -> Tensor:
        prediction = f(v, X)
        loss = loss_func(prediction, y)
        if probe is not None:  # the determinism check reuses this pass (see Autodiff.probe)
            probe.update(prediction=prediction.detach(), loss=loss.detach())
        return loss

    gradient, pullback = ad.vjp(ad.grad(loss_of), values)
    if probe is not None:
        probe["gradient"] = [g.detach() for g in gradient]

    def multiply(M_chunk: List[Tensor]) -> List[Tensor]:
        M_cols, batched = columns_first(M_chunk)
        HM: List[Tensor] = [None] * len(M_cols)
        for group in groups:
            cotangents = [M_cols[i] if i in group else None for i in range(len(M_cols))]
            for i, product in zip(group, pullback(cotangents, batched, wrt=group)):
                HM[i] = product
        return columns_last(HM, batched)

    return multiply


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
        ``max_columns`` after one forward and one (recorded) backward pass.
    """
    f = make_functional_model(model_func, params)
    groups = parameter_groups(len(params), block_sizes)
    return eager_batch_product(
        lambda X, y: prepare_hessian_product(EAGER, f, loss_func, params, X, y, groups)
    )


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

    def _prepare_batch(
        self, X: Union[Tensor, MutableMapping], y: Tensor, ad: Autodiff = EAGER
    ) -> Callable[[List[Tensor]], List[Tensor]]:
        """Gradient of the batch loss, then products with its pullback per group."""
        groups = parameter_groups(len(self._params), self._block_sizes)
        return prepare_hessian_product(
            ad, self._functional_model, self._loss_func, ad.values(self._params), X, y, groups
        )
