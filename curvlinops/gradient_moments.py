r"""Empirical Fisher: the uncentred second moment of the per-term loss gradients.

Each batch output is viewed as :math:`R_b` rows (loss terms) of :math:`C` entries (the
flattened 2-d view: class axis 1 for cross-entropy, last axis for MSE/BCE; see
``curvlinops._losses``). With :math:`\ell_r` the sum-reduced loss of row :math:`r` and
:math:`\mathbf{g}_r = \nabla_{\boldsymbol{\theta}} \ell_r`, the empirical Fisher is

.. math::
    \mathbf{F}_{\mathrm{E}} = \sum_b \frac{w_b}{c_b} \sum_{r \in b}
    \mathbf{g}_r \mathbf{g}_r^\top
    = \sum_b \frac{w_b}{c_b} \mathbf{J}_b^\top \left(\sum_r \mathbf{e}_r\mathbf{e}_r^\top
    \otimes \nabla_{\mathbf{f}_r}\ell_r \nabla_{\mathbf{f}_r}\ell_r^\top\right) \mathbf{J}_b\,,

with :math:`w_b = 1` (sum) or :math:`B_b/N` (mean) and :math:`c_b = 1` (sum), :math:`R_b`
(cross-entropy, mean) or :math:`R_b C` (MSE/BCE, mean). For 2-d outputs this is the usual
per-example gradient outer product, divided by :math:`N` (cross-entropy, mean) or :math:`NC`
(MSE/BCE, mean). The right-hand form is how products are computed: one forward pass, a
Jacobian-vector product, a row-wise rank-one middle factor, and a vector-Jacobian product, so
no per-example gradients are materialised.
"""

from collections.abc import Callable, MutableMapping
from functools import cached_property
from typing import List, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from curvlinops._autodiff import EAGER, Autodiff, eager_batch_product, make_functional_model
from curvlinops._losses import LossStrategy, loss_strategy
from curvlinops._torch_base import CurvatureLinearOperator
from curvlinops.ggn import MakeMiddleFactor, MiddleFactor, prepare_ggn_type_product

# ``output_grads(output_flat, y_flat) -> [M, R, C]``: output gradients per row, pre-scaled.
OutputGradients = Callable[[Tensor, Tensor], Tensor]


def apply_gradient_moments(strategy: LossStrategy, grads: Tensor, JM: Tensor) -> Tensor:
    """Apply ``sum_r e_r e_r^T (x) G_r G_r^T`` to ``JM`` (leading column axis).

    Args:
        strategy: The loss's strategy (decides the 2-d row view).
        grads: Output gradients per row, ``[M, R, C]``.
        JM: Output-shaped columns ``[K, *output.shape]``.

    Returns:
        The result, shaped like ``JM``.
    """
    JM_rows = strategy.to_rows(JM, num_leading=1)  # [K, R, C]
    coefficients = torch.einsum("mrc,krc->kmr", grads, JM_rows)
    T_rows = torch.einsum("kmr,mrc->krc", coefficients, grads)
    return strategy.from_rows(T_rows, JM.shape, num_leading=1)


def gradient_moments_middle(
    strategy: LossStrategy, output_grads: OutputGradients
) -> MakeMiddleFactor:
    r"""The middle factor of the empirical and the Monte-Carlo Fisher.

    :math:`\sum_r \mathbf{e}_r\mathbf{e}_r^\top \otimes \mathbf{G}_r \mathbf{G}_r^\top`
    with the ``[M, C]`` output gradients :math:`\mathbf{G}_r` of row :math:`r`.

    Args:
        strategy: The loss's strategy (decides the 2-d row view).
        output_grads: ``(output_flat, y_flat) -> [M, R, C]``, the pre-scaled output
            gradients :math:`\mathbf{G}_r` of each row, called once per batch.

    Returns:
        ``make_middle`` for :func:`~curvlinops.ggn.prepare_ggn_type_product`.
    """

    def make_middle(output: Tensor, y: Tensor) -> MiddleFactor:
        grads = output_grads(*strategy.flatten(output, y))

        def middle(JM: Tensor, batched: bool) -> Tensor:
            T = apply_gradient_moments(strategy, grads, JM if batched else JM.unsqueeze(0))
            return T if batched else T.squeeze(0)

        return middle

    return make_middle


def ef_output_gradients(ad: Autodiff, strategy: LossStrategy, row_loss) -> OutputGradients:
    r"""The EF's output factor: row gradients scaled by :math:`c_b^{-1/2}`, ``[1, R, C]``.

    Args:
        ad: The autodiff implementation.
        strategy: The loss's strategy (its reduction decides :math:`c_b`).
        row_loss: The loss with ``reduction='sum'``, whose gradient w.r.t. the flattened
            output holds each row's gradient (built once, outside traced code).

    Returns:
        ``output_grads(output_flat, y_flat)``.
    """

    def output_grads(output_flat: Tensor, y_flat: Tensor) -> Tensor:
        (grads,) = ad.grad(lambda out: row_loss(out, y_flat))(output_flat)
        # mean over the counted rows, as PyTorch's loss (ignore_index rows count nothing)
        scale = strategy.normalization(output_flat, y_flat) ** -0.5
        return (scale * grads).unsqueeze(0)

    return output_grads


def make_batch_ef_matrix_product(
    model_func: nn.Module, loss_func, params: Tuple[Tensor, ...]
) -> Callable[..., Tuple[Tensor, ...]]:
    """Build the product of the mini-batch empirical Fisher with a matrix.

    Args:
        model_func: The neural network.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: The parameters.

    Returns:
        ``ef_matrix_product(X, y, *M, max_columns=16)`` in list format (entries
        ``[*p.shape, K]``).
    """
    strategy = loss_strategy(loss_func, "EFLinearOperator")
    f = make_functional_model(model_func, params)
    middle = gradient_moments_middle(
        strategy, ef_output_gradients(EAGER, strategy, strategy.sum_loss())
    )
    return eager_batch_product(
        lambda X, y: prepare_ggn_type_product(EAGER, f, params, X, y, middle)
    )


class EFLinearOperator(CurvatureLinearOperator):
    r"""Linear operator for the empirical Fisher of an empirical risk.

    .. math::
        \mathbf{F}_{\mathrm{E}} = \sum_b \frac{w_b}{c_b} \sum_{r \in b}
        \nabla_{\boldsymbol{\theta}} \ell_r (\nabla_{\boldsymbol{\theta}} \ell_r)^\top

    over the loss terms :math:`r` (rows of the flattened 2-d output view) with
    :math:`w_b = 1` or :math:`B_b/N` and :math:`c_b = 1` (sum), :math:`R_b` (cross-entropy,
    mean) or :math:`R_b C` (MSE/BCE, mean). Supports ``MSELoss``, ``CrossEntropyLoss`` and
    ``BCEWithLogitsLoss``; other losses raise ``NotImplementedError`` at the first product.

    Attributes:
        SELF_ADJOINT: ``True``.
        SUPPORTED_LOSSES: The supported loss classes.
    """

    SELF_ADJOINT: bool = True
    SUPPORTED_LOSSES = (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss)

    @cached_property
    def _row_loss(self):
        """The loss with ``reduction='sum'`` (checked to be supported; built once)."""
        return loss_strategy(self._loss_func, type(self).__name__).sum_loss()

    def _prepare_compile(self):
        super()._prepare_compile()
        _ = self._row_loss  # a cached property: not built inside traced code

    def _prepare_batch(
        self, X: Union[Tensor, MutableMapping], y: Tensor, ad: Autodiff = EAGER
    ) -> Callable[[List[Tensor]], List[Tensor]]:
        """Forward pass and row gradients, then ``J^T (rank-one rows) J`` per chunk."""
        row_loss = self._row_loss  # first: names this operator if the loss is unsupported
        strategy = loss_strategy(self._loss_func)
        output_grads = ef_output_gradients(ad, strategy, row_loss)
        middle = gradient_moments_middle(strategy, output_grads)
        values = ad.values(self._params)
        return prepare_ggn_type_product(
            ad, self._functional_model, values, X, y, middle, self._loss_func, self._jvp_route(ad)
        )
