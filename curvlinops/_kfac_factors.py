r"""Per-batch contributions to the Kronecker factors (consumers of the layer pass).

With the layer rows :math:`\hat{\mathbf{x}}` (``[B, S, d_in]``, see
:mod:`curvlinops._layer_pass`) and output-gradient rows :math:`\hat{\mathbf{g}}`
(``[V, B, S, d_out]``, already scaled by the operator):

.. math::
    \mathbf{A} \mathrel{+}= \frac{1}{N S} \sum_{b, s} \hat{\mathbf{x}}_{b,s}
    \hat{\mathbf{x}}_{b,s}^\top,
    \qquad
    \mathbf{G} \mathrel{+}= \sum_{v, b, s} \hat{\mathbf{g}}_{v,b,s} \hat{\mathbf{g}}_{v,b,s}^\top,

where ``KFACType.REDUCE`` first averages the inputs and sums the gradients over the
:math:`S` shared positions (:math:`S = 1`), and a joint weight and bias appends a constant 1
to every input row.
"""

from math import sqrt
from typing import Dict

import torch
from torch import Tensor, nn

from curvlinops._layer_pass import conv2d_patches_channels_first, layer_rows


def rows_with_ones(rows: Tensor) -> Tensor:
    """Append a constant 1 to every row (the bias column of a joint block)."""
    return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)


def input_factor(module: nn.Module, x: Tensor, reduce: bool, joint: bool, num_data: int) -> Tensor:
    """A batch's contribution to the input factor ``A``, from the layer input ``x``.

    Computed from the rows without appending the bias ones (their block follows from the
    row sums), and for ``Conv2d`` in the expand setting from ``F.unfold``'s channels-first
    layout, which avoids a transposing copy of all patches. The scale ``1 / (N S)`` is
    applied to whichever is smaller, the rows or the factor.

    Args:
        module: The layer.
        x: Its (detached) input.
        reduce: ``KFACType.REDUCE`` (average over shared positions).
        joint: Append the bias ones (weight and bias in one block).
        num_data: Number :math:`N` of data points.

    Returns:
        The contribution ``[d_in (+1), d_in (+1)]``.
    """
    if isinstance(module, nn.Conv2d) and not reduce:
        rows_t, num_locations = conv2d_patches_channels_first(module, x)
        scale = 1.0 / (num_data * num_locations)
    else:
        rows = layer_rows(module, x, reduce)
        scale = 1.0 / (num_data * rows.shape[1])
        rows_t = rows.reshape(-1, rows.shape[-1]).T
    d, num_rows = rows_t.shape
    prescale = rows_t.numel() < d * d
    if prescale:
        rows_t = rows_t * sqrt(scale)
    core = rows_t @ rows_t.T
    if joint:
        sums = rows_t.sum(1, keepdim=True) * (sqrt(scale) if prescale else 1.0)
        count = sums.new_full((1, 1), num_rows * (scale if prescale else 1.0))
        core = torch.cat([torch.cat([core, sums], 1), torch.cat([sums.T, count], 1)], 0)
    return core if prescale else core.mul_(scale)


def gradient_factor(g: Tensor, reduce: bool) -> Tensor:
    """A batch's contribution to ``G`` from output-gradient rows ``[V, B, S, d_out]``."""
    if reduce:
        g = g.sum(2)
    flat = g.reshape(-1, g.shape[-1])
    return flat.T @ flat


def accumulate(totals: Dict[str, Tensor], contributions: Dict[str, Tensor]):
    """Add per-layer contributions into ``totals`` (in place after the first batch)."""
    for name, value in contributions.items():
        totals[name] = value if name not in totals else totals[name].add_(value)
