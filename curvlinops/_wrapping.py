"""The common base of operators built around one other operator ``_A``."""

import torch

from curvlinops._torch_base import PyTorchLinearOperator


class _WrappingLinearOperator(PyTorchLinearOperator):
    """An operator that multiplies through another operator, stored as ``_A``.

    It lives on ``A``'s device, in ``A``'s dtype, and is compiled by compiling ``A``'s products
    (what it does around them, e.g. a solver's iteration or an index selection, stays eager).
    Subclasses set ``_A`` and the spaces, and implement ``_matmat`` (and ``_adjoint`` unless
    they are self-adjoint).
    """

    @property
    def device(self) -> torch.device:
        """The device of ``A``."""
        return self._A.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``A``."""
        return self._A.dtype

    def compile(self, **compile_kwargs) -> "_WrappingLinearOperator":
        """Compile the products of ``A`` in place; the rest of this operator stays eager.

        Args:
            **compile_kwargs: Passed on to ``A.compile``.

        Returns:
            The operator itself.
        """
        self._A.compile(**compile_kwargs)
        return self
