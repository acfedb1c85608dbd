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
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from curvlinops._calls import Unit, Use
from curvlinops._layer_pass import conv2d_patches_channels_first, layer_rows, output_gradient_rows


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
        patches = conv2d_patches_channels_first(module, x)
        return batched_gram_factor(patches, 1.0 / (num_data * patches.shape[2]), joint)
    else:
        rows = layer_rows(module, x, reduce)
        scale = 1.0 / (num_data * rows.shape[1])
        rows_t = rows.reshape(-1, rows.shape[-1]).T
    return gram_factor(rows_t, scale, joint)


def gram_factor(rows_t: Tensor, scale: float, joint: bool) -> Tensor:
    """``scale * R R^T`` of rows ``R`` given as columns ``[d, rows]`` (bias ones appended if joint).

    The scale is applied to whichever is smaller, the rows or the factor.
    """
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


#: Most entries of the ``[n, d, d]`` temporaries of one chunk of :func:`batched_gram`,
#: relative to the entries of its input (at least one ``d x d`` matrix per chunk).
GRAM_CHUNK_FRACTION = 0.25


def batched_gram(columns: Tensor) -> Tensor:
    """``sum_n C_n C_n^T`` of matrices ``C_n`` given as ``[N, d, L]`` (any strides).

    Batched products over chunks of the ``N`` matrices, without the transposing copy of all
    of them that one product ``[d, N L] @ [N L, d]`` would need; a chunk's ``[n, d, d]``
    temporaries stay below :data:`GRAM_CHUNK_FRACTION` of the input (or one ``d x d``).
    """
    N, d, _ = columns.shape
    step = max(1, min(N, int(GRAM_CHUNK_FRACTION * columns.numel()) // max(1, d * d)))
    total = None
    for start in range(0, N, step):
        chunk = columns[start : start + step]
        part = torch.bmm(chunk, chunk.transpose(1, 2)).sum(0)
        total = part if total is None else total.add_(part)
    return total if total is not None else columns.new_zeros(d, d)


def batched_gram_factor(columns: Tensor, scale: float, joint: bool) -> Tensor:
    """:func:`gram_factor` of the rows ``C_n^T`` of all matrices ``C_n`` (``[N, d, L]``)."""
    core = batched_gram(columns).mul_(scale)
    if not joint:
        return core
    sums = columns.sum((0, 2)).unsqueeze(1) * scale
    count = sums.new_full((1, 1), columns.shape[0] * columns.shape[2] * scale)
    return torch.cat([torch.cat([core, sums], 1), torch.cat([sums.T, count], 1)], 0)


def rows_gram(g: Tensor) -> Tensor:
    """``sum g_r g_r^T`` over all rows ``g_r`` of ``[..., S, d]`` (views of any layout).

    Rows that are a transposed view of channels-first gradients (convolutions, see
    :func:`~curvlinops._layer_pass.output_gradient_rows`) go through :func:`batched_gram`
    instead of a copy into row-major order.
    """
    d = g.shape[-1]
    if g.ndim >= 2 and g.stride(-1) != 1 and g.shape[-2] > 1 and g.stride(-2) == 1:
        return batched_gram(g.reshape(-1, *g.shape[-2:]).transpose(1, 2))
    flat = g.reshape(-1, d)
    return flat.T @ flat


def gradient_factor(g: Tensor, reduce: bool) -> Tensor:
    """A batch's contribution to ``G`` from output-gradient rows ``[V, B, S, d_out]``."""
    if reduce:
        g = g.sum(2)
    return rows_gram(g)


def accumulate(totals: Dict[str, Tensor], contributions: Dict[str, Tensor]):
    """Add per-layer contributions into ``totals`` (in place after the first batch)."""
    for name, value in contributions.items():
        totals[name] = value if name not in totals else totals[name].add_(value)


# ------------------------------------------------------------------ units used by calls
# A unit (see :mod:`curvlinops._calls`) may be used several times per forward pass. All uses
# count as more rows: EXPAND sums over all rows of all uses with s = (rows of all uses) / B;
# REDUCE averages the inputs / sums the output gradients over the positions of all uses per
# datum, which needs every use to have its batch axis first (module calls).


def _require_batch_first(name: str, uses: List[Use]):
    if not all(use.batch_first for use in uses):
        raise NotImplementedError(
            f"kfac_approx='reduce' needs the batch axis of every call of {name!r} first, but "
            "it is used functionally (e.g. inside nn.MultiheadAttention, whose projections "
            "see [T, B, E] or [T * B, E] inputs). Use kfac_approx='expand'."
        )


def _weight_uses(unit: Unit, uses: List[Use], joint: bool) -> List[Use]:
    """The uses that define the unit's output factor (checks weight and bias go together)."""
    weight_uses = [u for u in uses if u.weight] if unit.weight is not None else []
    bias_uses = [u for u in uses if u.bias] if unit.bias is not None else []
    if (
        unit.weight is not None
        and unit.bias is not None
        and (len(weight_uses) != len(bias_uses) or any(not u.bias for u in weight_uses))
    ):
        raise NotImplementedError(
            f"The weight and bias of {unit.name!r} are used in different calls, so they share "
            "no gradient factor. Remove one of them from params."
        )
    del joint  # joint blocks need the same calls, which the check above guarantees
    return weight_uses or bias_uses


def _kept_rows(x: Tensor, use: Use, row_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The mask ``[B, S]`` of a use's rows aligned with the counted output rows, or ``None``.

    A use is aligned if its batch axis is first and it has one row per output row.
    """
    if row_mask is None or not use.batch_first or tuple(x.shape[:2]) != tuple(row_mask.shape):
        return None
    return row_mask


def unit_input_factor(
    unit: Unit,
    uses: List[Use],
    reduce: bool,
    joint: bool,
    num_data: int,
    batch_size: int,
    row_mask: Optional[Tensor] = None,
) -> Tensor:
    """A batch's contribution to a linear or convolution unit's input factor, all uses.

    Args:
        unit: The unit.
        uses: Its uses in the batch.
        reduce: ``KFACType.REDUCE``.
        joint: Append the bias ones.
        num_data: Number :math:`N` of data points.
        batch_size: Number :math:`B` of data points in the batch.
        row_mask: ``[B, S]`` mask of the output rows the loss counts (``ignore_index``), or
            ``None``: rows of aligned uses at ignored positions are left out, and
            :math:`s` counts the kept rows.

    Returns:
        ``[d_in (+1), d_in (+1)]`` (see the comment above for the rows and the scale).
    """
    selected = _weight_uses(unit, uses, joint)
    xs = [layer_rows(unit.module, u.x, False) for u in selected]
    masks = [_kept_rows(x, u, row_mask) for x, u in zip(xs, selected)]
    if reduce:
        _require_batch_first(unit.name, uses)
        weights = [
            x.new_ones(x.shape[:2]) if m is None else m.to(x.dtype) for x, m in zip(xs, masks)
        ]
        total = sum((x * w.unsqueeze(-1)).sum(1) for x, w in zip(xs, weights))
        count = sum(w.sum(1) for w in weights).clamp(min=1).unsqueeze(-1)
        return gram_factor((total / count).T, 1.0 / num_data, joint)
    parts = [x.reshape(-1, x.shape[-1]) if m is None else x[m] for x, m in zip(xs, masks)]
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)
    return gram_factor(rows.T, batch_size / (num_data * max(rows.shape[0], 1)), joint)


def unit_gradient_factor(unit: Unit, uses: List[Use], reduce: bool, joint: bool) -> Tensor:
    """A batch's contribution to a unit's gradient factor, from all its uses' gradients."""
    selected = _weight_uses(unit, uses, joint)
    if unit.kind == "embedding" or not reduce:
        # every use's rows count: a sum of Gramians, without concatenating (copying) rows
        return sum_in_place(
            rows_gram(output_gradient_rows(unit.module, u.grad) if unit.kind == "conv" else u.grad)
            for u in selected
        )
    _require_batch_first(unit.name, selected)
    g = sum_in_place(output_gradient_rows(unit.module, u.grad).sum(2) for u in selected)
    return rows_gram(g)


def sum_in_place(tensors) -> Tensor:
    """The sum of the tensors of an iterable, accumulated into the first one."""
    iterator = iter(tensors)
    total = next(iterator)
    for tensor in iterator:
        total = total.add_(tensor) if total.shape == tensor.shape else total + tensor
    return total


def embedding_input_factor(
    unit: Unit, uses: List[Use], num_data: int, batch_size: int, row_mask=None
) -> Tensor:
    r"""A batch's contribution to an embedding's *diagonal* input factor ``[vocab]``.

    An embedding is the linear map :math:`\mathbf{W}^\top\mathbf{e}_i` of one-hot inputs, so
    its input factor is diagonal with the token counts, scaled like a linear layer's (EXPAND,
    :math:`s` = indices per datum). ``padding_idx`` rows get no gradient, i.e. a zero input
    row: their count is zero (their positions still count in :math:`s` and in ``G``).
    Positions ignored by the loss (``row_mask``, for index tensors aligned with the output
    rows) are left out, as for linear layers.
    """
    module = unit.module
    vocab = unit.weight.shape[0]
    kept = []
    for use in uses:
        mask = _kept_rows(use.x, use, row_mask) if use.x.ndim >= 2 else None
        kept.append(use.x.reshape(-1) if mask is None else use.x[mask])
    indices = torch.cat(kept)
    counts = torch.bincount(indices, minlength=vocab).to(unit.weight.dtype)
    if module.padding_idx is not None:
        counts[module.padding_idx] = 0
    return counts * (batch_size / (num_data * max(indices.numel(), 1)))
