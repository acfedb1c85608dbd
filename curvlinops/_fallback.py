r"""The exact diagonal fallback of KFAC/EKFAC for parameters without Kronecker structure.

With ``fallback="diagonal"``, every parameter that belongs to no Kronecker unit (see
:mod:`curvlinops._calls`: LayerNorm/RMSNorm/GroupNorm/BatchNorm affine parameters, positional
embedding tensors, a tied embedding/head weight, ...) gets the exact diagonal block of the
curvature that KFAC approximates, computed in KFAC's data pass from the same output-space
vectors :math:`\mathbf{s}_{r,v}` (loss-Hessian square-root columns for ``type-2``, the same
Monte-Carlo samples for ``mc``, the row gradients for ``empirical``; already scaled like
KFAC's):

.. math::
    \mathrm{diag}(\mathbf{M})_\theta = \sum_{r, v}
    \left(\frac{\partial \mathbf{f}_r}{\partial \theta}^\top \mathbf{s}_{r,v}\right)^2,

one backpropagated vector per row :math:`r` (loss term) and vector :math:`v`, so no cross terms
between rows enter: the diagonal of the GGN / MC-Fisher / empirical Fisher of
:mod:`curvlinops.diagonal`. ``forward-only`` has no such curvature and refuses the fallback.

The blocks are :class:`~curvlinops._blocks.DiagonalBlock` objects (inverse, trace,
determinants and norm from the entries). With a ``(damping_A, damping_G)`` pair, a diagonal
block is damped by :math:`\delta_A\delta_G` (the identity term of
:math:`(\mathbf{A}+\delta_A\mathbf{I})\otimes(\mathbf{G}+\delta_G\mathbf{I})`).
"""

from typing import Dict, List

import torch
from torch import Tensor

from curvlinops._blocks import Block, DiagonalBlock, Slot
from curvlinops._layer_pass import chunk_gradients

FALLBACKS = ("error", "diagonal")


def check_fallback(fallback, forward_only: bool):
    """Validate the ``fallback`` keyword.

    Raises:
        ValueError: If ``fallback`` is not ``"error"`` or ``"diagonal"``.
        NotImplementedError: For ``"diagonal"`` with ``fisher_type='forward-only'``.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {list(FALLBACKS)}, got {fallback!r}.")
    if fallback == "diagonal" and forward_only:
        raise NotImplementedError(
            "fallback='diagonal' needs a curvature to take the diagonal of, but "
            "fisher_type='forward-only' has none. Use another fisher_type or fallback='error'."
        )


def per_row_squares(
    f_flat: Tensor, params: List[Tensor], cotangents: Tensor, max_columns: int
) -> List[Tensor]:
    r""":math:`\sum_{r,v} (\partial\mathbf{f}_r/\partial\theta^\top\mathbf{s}_{r,v})^2` per tensor.

    Args:
        f_flat: The flattened output ``[R, C]`` (a node of the graph).
        params: The tensors :math:`\theta`.
        cotangents: The vectors ``[V, R, C]``.
        max_columns: Most vectors backpropagated in one batched call.

    Returns:
        The sums of squares, shaped like ``params``.
    """
    V, R, C = cotangents.shape
    totals = [torch.zeros_like(p) for p in params]
    rows_per_chunk = max(1, max_columns // max(V, 1))
    for start in range(0, R, rows_per_chunk):
        stop = min(R, start + rows_per_chunk)
        index = torch.arange(stop - start, device=cotangents.device)
        chunk = cotangents.new_zeros(V, stop - start, R, C)
        chunk[:, index, start + index] = cotangents[:, start:stop]
        chunk = chunk.reshape(-1, R, C)
        for total, g in zip(totals, chunk_gradients(f_flat, params, chunk)):
            total.add_((g**2).sum(0))
    return totals


def parameter_names(params: List[Tensor], model, positions: List[int]) -> Dict[int, str]:
    """Readable names of ``params[i]`` for the positions (``"param<i>"`` if not in the model)."""
    names: Dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)  # a tied tensor is named after its first holder
    return {i: names.get(id(params[i]), f"param{i}") for i in positions}


class FallbackMixin:
    """Diagonal blocks for the fallback parameters of a KFAC/EKFAC operator.

    The operator sets ``_fallback`` (``"error"``/``"diagonal"``), ``_fallback_names``
    (``{position: name}``) and ``_fallback_diagonals`` (``{name: diagonal}``, live and
    editable like the factor dicts).
    """

    def _fallback_layout(self) -> List[Slot]:
        return [(name, "weight", (i,)) for i, name in self._fallback_names.items()]

    def _fallback_blocks(self) -> Dict[str, Block]:
        if self._fallback_names and not self._fallback_diagonals:
            self.compute_kronecker_factors()
        blocks = {}
        for name in self._fallback_names.values():
            D = self._fallback_diagonals[name]
            rows = D.shape[0] if D.ndim > 0 else 1
            blocks[name] = DiagonalBlock(name, {"weight": D.reshape(rows, -1)})
        return blocks

    def structure(self) -> Dict[str, str]:
        """Which parameter got which structure, in the order of ``params``.

        Returns:
            ``{parameter name: description}``, e.g. ``"kronecker (unit 'net.0', weight)"``,
            ``"embedding: diag(token counts) x G (unit 'embedding')"`` or
            ``"diagonal (exact)"``.
        """
        names = parameter_names(self._params, self._model_func, range(len(self._params)))
        described = {}
        for unit, entry in self._mapping.items():
            kind = self._units[unit].kind
            for role, i in entry.items():
                if kind == "embedding":
                    what = f"embedding: diag(token counts) x G (unit {unit!r})"
                else:
                    joint = " jointly with its bias" if self._joint(unit) else ""
                    what = f"kronecker G x A (unit {unit!r}, {role}{joint})"
                described[i] = what
        for i in self._fallback_names:
            described[i] = "diagonal (exact diagonal of the approximated curvature)"
        return {names[i]: described[i] for i in sorted(described)}
