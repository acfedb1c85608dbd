r"""Small linear operators for examples, tests and composition with curvature operators.

- :class:`TensorLinearOperator` wraps a dense matrix :math:`\mathbf{A}`.
- :class:`IdentityLinearOperator` is :math:`\mathbf{I}` on a tensor-product space (e.g. the
  parameter space), so ``GGN + delta * Identity`` is a damped GGN.
- :class:`OuterProductLinearOperator` is :math:`\sum_i c_i \mathbf{a}_i \mathbf{a}_i^\top`.
"""

import numbers
from typing import List, Tuple

import torch
from torch import Tensor

from curvlinops._torch_base import PyTorchLinearOperator, _DelegatingLinearOperator

__all__ = [
    "PyTorchLinearOperator",
    "TensorLinearOperator",
    "IdentityLinearOperator",
    "OuterProductLinearOperator",
]


class TensorLinearOperator(_DelegatingLinearOperator):
    """Linear operator wrapping a dense matrix ``A`` of shape ``[M, N]``.

    It lives on the device and in the dtype of ``A``.
    """

    def __init__(self, A: Tensor):
        """Wrap a matrix.

        Args:
            A: A 2-d tensor.

        Raises:
            ValueError: If ``A`` is not 2-d.
        """
        if not isinstance(A, Tensor) or A.ndim != 2:
            raise ValueError(f"Expected a 2-d tensor, got {getattr(A, 'shape', type(A).__name__)}.")
        super().__init__([(A.shape[1],)], [(A.shape[0],)])
        self._A = A
        self.SELF_ADJOINT = A.shape[0] == A.shape[1] and torch.allclose(A, A.mH)

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        return [self._A @ X[0]]

    def _adjoint(self) -> "TensorLinearOperator":
        return TensorLinearOperator(self._A.mH)


def _is_size(n) -> bool:
    """A tensor dimension: a non-negative integer (``bool`` excluded)."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0


class IdentityLinearOperator(PyTorchLinearOperator):
    """The identity on a tensor-product space, e.g. ``[p.shape for p in params]``."""

    SELF_ADJOINT: bool = True

    def __init__(self, shape: List[Tuple[int, ...]], device: torch.device, dtype: torch.dtype):
        """Set up the identity.

        Args:
            shape: Shapes of the tensors forming the space.
            device: Device of the operator.
            dtype: Data type of the operator.

        Raises:
            ValueError: If ``shape`` is not a list of shapes with non-negative integer sizes,
                or ``dtype`` is not a ``torch.dtype``.
        """
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(s, (list, tuple)) and all(_is_size(n) for n in s) for s in shape
        ):
            raise ValueError(
                "shape must be a list of tensor shapes with non-negative integer sizes, e.g. "
                f"[p.shape for p in params], got {shape!r}."
            )
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype such as torch.float64, got {dtype!r}.")
        super().__init__(shape, shape)
        self._device = torch.device(device)
        self._dtype = dtype

    @property
    def device(self) -> torch.device:
        """The operator's device."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The operator's dtype."""
        return self._dtype

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        return X


class OuterProductLinearOperator(_DelegatingLinearOperator):
    """The matrix ``sum_i c_i a_i a_i^T`` (weights ``c`` ``[K]``, columns ``A`` ``[D, K]``).

    It lives on the device and in the dtype of ``A``.
    """

    SELF_ADJOINT: bool = True

    def __init__(self, c: Tensor, A: Tensor):
        """Set up the operator.

        Args:
            c: Weights of the outer products, shape ``[K]``.
            A: The vectors ``a_i`` as columns, shape ``[D, K]``.

        Raises:
            ValueError: If the shapes do not fit.
        """
        if not isinstance(c, Tensor) or not isinstance(A, Tensor):
            raise ValueError(
                f"c and A must be tensors, got {type(c).__name__} and {type(A).__name__}."
            )
        if A.ndim != 2 or c.ndim != 1 or c.shape[0] != A.shape[1]:
            raise ValueError(
                f"Expected c of shape [K] and A of shape [D, K], got {list(c.shape)} and "
                f"{list(A.shape)}."
            )
        super().__init__([(A.shape[0],)], [(A.shape[0],)])
        self._c, self._A = c, A

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        return [self._A @ (self._c.unsqueeze(-1) * (self._A.mT @ X[0]))]
