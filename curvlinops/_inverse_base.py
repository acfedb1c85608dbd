"""The common base of the inverse operators (:mod:`curvlinops.inverse`)."""

from typing import List

import torch
from torch import Tensor

from curvlinops._torch_base import PyTorchLinearOperator, _DelegatingLinearOperator


class _InversePyTorchLinearOperator(_DelegatingLinearOperator):
    """Base of operators that approximate the inverse of a square operator ``A``.

    The inverse acts on the spaces of ``A`` (which must coincide), multiplies in ``A``'s
    dtype on ``A``'s device, and keeps ``A`` in ``_A``; compiling it compiles ``A``'s
    products (the solver's iteration stays eager). Subclasses implement ``_matmat`` (and
    ``_adjoint`` unless they are self-adjoint).
    """

    def __init__(self, A: PyTorchLinearOperator):
        """Store ``A`` after checking that its input and output spaces coincide.

        Args:
            A: The operator to invert.

        Raises:
            ValueError: If ``A``'s input and output spaces differ.
        """
        if not isinstance(A, PyTorchLinearOperator):
            raise ValueError(
                f"Expected a PyTorchLinearOperator to invert, got {type(A).__name__}. "
                "Wrap a dense matrix with curvlinops.examples.TensorLinearOperator."
            )
        if A._in_shape != A._out_shape:
            raise ValueError(
                "Only operators with identical input and output spaces can be inverted, got "
                f"input shapes {[tuple(s) for s in A._in_shape]} and output shapes "
                f"{[tuple(s) for s in A._out_shape]}."
            )
        super().__init__(A._in_shape, A._out_shape)
        self._A = A

    def _flatten(self, X: List[Tensor]) -> Tensor:
        """Stack list-format columns (entries ``[*shape, K]``) into one ``[D, K]`` matrix.

        The matrix is the transpose of a contiguous ``[K, D]`` tensor, the layout that
        products take and return without transposing copies; the solvers' elementwise
        updates keep it, so only this first stacking may transpose.
        """
        return torch.cat([x.reshape(-1, x.shape[-1]).T for x in X], dim=1).T

    def _unflatten(self, flat: Tensor) -> List[Tensor]:
        """Split a ``[D, K]`` matrix into list format (entries ``[*shape, K]``)."""
        return [
            block.reshape(*shape, flat.shape[-1])
            for block, shape in zip(flat.split(self._out_shape_flat), self._out_shape)
        ]
