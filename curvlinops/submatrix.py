r"""Sub-matrices of linear operators.

:class:`SubmatrixLinearOperator` represents :math:`\mathbf{A}_{\mathcal{R}, \mathcal{C}}`, the
rows :math:`\mathcal{R}` and columns :math:`\mathcal{C}` of :math:`\mathbf{A}` in the given
order. A product embeds the :math:`K` input columns into zero vectors at the positions
:math:`\mathcal{C}`, multiplies with :math:`\mathbf{A}` once (all columns together), and keeps the
rows :math:`\mathcal{R}`. Its adjoint is :math:`(\mathbf{A}^\top)_{\mathcal{C}, \mathcal{R}}`.
"""

from typing import List

import torch
from torch import Tensor

from curvlinops._torch_base import PyTorchLinearOperator, _DelegatingLinearOperator


class SubmatrixLinearOperator(_DelegatingLinearOperator):
    """The sub-matrix ``A[row_idxs][:, col_idxs]`` of an operator ``A``.

    It has ``A``'s device and dtype; compiling it compiles ``A``'s products (selecting rows
    and columns stays eager).
    """

    def __init__(self, A: PyTorchLinearOperator, row_idxs: List[int], col_idxs: List[int]):
        """Select rows and columns of ``A``.

        Args:
            A: The operator (anything with ``shape``, ``device``, ``dtype`` and ``@``).
            row_idxs: Row indices (distinct Python ints in ``[0, A.shape[0])``).
            col_idxs: Column indices (distinct Python ints in ``[0, A.shape[1])``).
        """
        self._A = A
        self.set_submatrix(row_idxs, col_idxs)

    def set_submatrix(self, row_idxs: List[int], col_idxs: List[int]):
        """Redefine the selected rows and columns (and hence the shape).

        Args:
            row_idxs: Row indices (distinct Python ints in ``[0, A.shape[0])``).
            col_idxs: Column indices (distinct Python ints in ``[0, A.shape[1])``).

        Raises:
            ValueError: If an index is not an int, an index list has duplicates, or an index
                is out of range.
        """
        for idxs, axis, name in ((row_idxs, 0, "row_idxs"), (col_idxs, 1, "col_idxs")):
            if not isinstance(idxs, (list, tuple, range)):
                raise ValueError(
                    f"{name} must be a list of Python ints, got {type(idxs).__name__}; convert "
                    "tensors or arrays with .tolist()."
                )
            if any(isinstance(i, bool) or not isinstance(i, int) for i in idxs):
                raise ValueError(
                    f"{name} must contain Python ints; convert tensors or arrays with .tolist()."
                )
            if len(set(idxs)) != len(idxs):
                raise ValueError(f"{name} contains duplicate indices.")
            size = self._A.shape[axis]
            if any(i < 0 or i >= size for i in idxs):
                raise ValueError(
                    f"{name} must lie in [0, {size}), got min {min(idxs)}, max {max(idxs)}."
                )
        self._row_idxs = list(row_idxs)
        self._col_idxs = list(col_idxs)
        super().__init__([(len(self._col_idxs),)], [(len(self._row_idxs),)])

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        (x,) = X
        # columns first ([K, N] seen as [N, K]): A's products take that layout without copies
        embedded = x.new_zeros(x.shape[-1], self._A.shape[1]).T
        col_idxs = torch.tensor(self._col_idxs, device=x.device, dtype=torch.long)
        row_idxs = torch.tensor(self._row_idxs, device=x.device, dtype=torch.long)
        embedded[col_idxs] = x
        return [(self._A @ embedded)[row_idxs]]

    def _adjoint(self) -> "SubmatrixLinearOperator":
        return SubmatrixLinearOperator(self._A.adjoint(), self._col_idxs, self._row_idxs)
