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

Products use one forward pass per batch: :math:`\mathbf{J}_b \mathbf{V}` by transposing the
pullback, the loss Hessian by double backward through the loss alone, and
:math:`\mathbf{J}_b^\top` by the pullback, each for all columns at once. The same routine
(:func:`prepare_ggn_type_product`) with a different middle factor gives the empirical and the
Monte-Carlo Fisher.
"""

from collections.abc import Callable, MutableMapping
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from curvlinops._autodiff import (
    EAGER,
    JVP_ROUTES,
    Autodiff,
    RouteChoice,
    columns_first,
    columns_last,
    eager_batch_product,
    forward_linearize,
    linearize,
    linearize_at,
    loss_hessian_product,
    make_functional_model,
    second_order_context,
)
from curvlinops._torch_base import CurvatureLinearOperator

# ``make_middle(output, y) -> middle``, called once per batch; ``middle(JM, batched) -> T`` is
# the output-space factor applied to ``J M`` (leading column axis if ``batched``), per chunk.
MiddleFactor = Callable[[Tensor, bool], Tensor]
MakeMiddleFactor = Callable[[Tensor, Tensor], MiddleFactor]


def prepare_ggn_type_product(
    ad: Autodiff,
    f: Callable[[Sequence[Tensor], Union[Tensor, MutableMapping]], Tensor],
    values: Sequence[Tensor],
    X: Union[Tensor, MutableMapping],
    y: Tensor,
    make_middle: MakeMiddleFactor,
    loss_func: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    jvp_route: Union[str, RouteChoice] = "reverse",
) -> Callable[[List[Tensor]], List[Tensor]]:
    r"""One batch's :math:`\mathbf{J}^\top (\text{middle})\, \mathbf{J}`: forward pass once.

    Args:
        ad: The autodiff implementation.
        f: Functional model ``f(param_values, X)``.
        values: The parameter values defining :math:`\mathbf{J}`.
        X: Input batch.
        y: Label batch.
        make_middle: ``make_middle(output, y) -> middle`` (called once, on the detached
            output), with ``middle(JM, batched)`` the output-space factor.
        loss_func: The loss, needed only when ``ad.probe`` records the batch's loss and
            gradient: the loss from this forward pass, the gradient from the transposed
            pullback that the ``"reverse"`` route records anyway (other routes: one more
            pullback).
        jvp_route: How :math:`\mathbf{J}\mathbf{V}` is computed: ``"reverse"`` by
            transposing the pullback (:func:`~curvlinops._autodiff.linearize`) or
            ``"forward"`` with ``torch.func.jvp`` over the columns
            (:func:`~curvlinops._autodiff.forward_linearize`); the same numbers up to round-off;
            or a :class:`~curvlinops._autodiff.RouteChoice` choosing between them.

    Raises:
        ValueError: If ``jvp_route`` is not one of these.

    Returns:
        ``multiply(M_chunk)`` in list format (entries ``[*p.shape, K]``): per call a
        transposed pullback, the middle factor and a pullback, for all columns at once.
    """
    output, pullback = ad.vjp(lambda *v: f(v, X), values)
    probe = ad.probe if loss_func is not None else None
    reverse = lambda: linearize(ad, output, pullback)  # noqa: E731
    if probe is not None:
        output_gradient = record_loss(probe, loss_func, output, y)
        if jvp_route != "forward":
            # The transposed pullback, recorded for J V by the reverse route (which a chosen
            # route takes for the check's single column), evaluated at the output gradient
            # instead of zero is the parameter gradient: no extra backward pass.
            gradient, jvp_at_gradient = linearize_at(ad, pullback, output_gradient)
            probe["gradient"] = [g.detach() for g in gradient]
            reverse = lambda: jvp_at_gradient  # noqa: E731
        else:  # forced forward mode: one more pullback
            probe["gradient"] = [g.detach() for g in pullback([output_gradient], False)]
    routes = {
        "reverse": reverse,
        "forward": lambda: forward_linearize(lambda *v: f(v, X), values),
    }
    if isinstance(jvp_route, RouteChoice):
        jvp = jvp_route.jvp(routes)
    elif jvp_route in routes:
        jvp = routes[jvp_route]()
    else:
        raise ValueError(
            f"JVP_ROUTE must be one of {JVP_ROUTES}, got {jvp_route!r}. Set the operator's "
            "JVP_ROUTE attribute to 'auto' (by the model's layers), 'reverse' (transposed "
            "pullback), 'forward' (torch.func.jvp) or 'measure' (the faster one, timed at the "
            "first product)."
        )
    middle = make_middle(output.detach(), y)

    def multiply(M_chunk: List[Tensor]) -> List[Tensor]:
        M_cols, batched = columns_first(M_chunk)
        T = middle(jvp(M_cols, batched), batched)
        return columns_last(pullback([T], batched), batched)

    return multiply


def record_loss(probe: dict, loss_func: Callable, output: Tensor, y: Tensor) -> Tensor:
    r"""Record prediction and loss of a batch from its forward pass; return the loss gradient.

    The loss is evaluated on the detached output (the model is not run again) and
    differentiated w.r.t. it alone, giving :math:`\nabla_{\mathbf{f}} \ell`; the parameter
    gradient is then :math:`\mathbf{J}^\top \nabla_{\mathbf{f}} \ell`, which the caller takes
    from a pullback it evaluates anyway (see :func:`prepare_ggn_type_product`).

    Args:
        probe: The dict to record ``prediction`` and ``loss`` (detached) into.
        loss_func: The loss function.
        output: The model output of the batch.
        y: The labels.

    Returns:
        The loss's gradient w.r.t. the output (detached).
    """
    with second_order_context():
        leaf = output.detach().requires_grad_()
        loss = loss_func(leaf, y)
        (output_gradient,) = torch.autograd.grad(loss, leaf)
    probe.update(prediction=output.detach(), loss=loss.detach())
    return output_gradient


def loss_hessian_middle(ad: Autodiff, loss_func: Callable) -> MakeMiddleFactor:
    """The GGN's middle factor: the loss Hessian w.r.t. the output."""
    return lambda output, y: loss_hessian_product(ad, loss_func, output, y)


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
    f = make_functional_model(model_func, params)
    middle = loss_hessian_middle(EAGER, loss_func)
    return eager_batch_product(
        lambda X, y: prepare_ggn_type_product(EAGER, f, params, X, y, middle)
    )


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
        middle = loss_hessian_middle(EAGER, lambda pred, y_: c(pred, y_, *c_args))
        multiply = prepare_ggn_type_product(
            EAGER, lambda values, X_: f(*values, X_), params, X, y, middle
        )
        return tuple(t.squeeze(-1) for t in multiply([t.unsqueeze(-1) for t in v]))

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

    def _prepare_batch(
        self, X: Union[Tensor, MutableMapping], y: Tensor, ad: Autodiff = EAGER
    ) -> Callable[[List[Tensor]], List[Tensor]]:
        """Forward pass, then ``J^T (loss Hessian) J`` per column chunk."""
        middle = loss_hessian_middle(ad, self._loss_func)
        values = ad.values(self._params)
        return prepare_ggn_type_product(
            ad, self._functional_model, values, X, y, middle, self._loss_func, self._jvp_route(ad)
        )
