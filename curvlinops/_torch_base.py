r"""Base classes: matrix-free linear operators in PyTorch, and curvature operators over data.

:class:`PyTorchLinearOperator` is a linear map :math:`\mathbf{A}: \mathcal{X} \to \mathcal{Y}`
between tensor-product spaces, :math:`\mathcal{X} = \mathbb{R}^{n_1} \times \dots \times
\mathbb{R}^{n_k}` with each factor carrying a tensor shape (typically the shapes of a network's
parameters). Its matrix has shape :math:`(\sum_j m_j, \sum_i n_i)`, obtained by flattening every
factor row-major and concatenating in list order. Operators multiply flat vectors ``[N]``,
matrices ``[N, K]`` and the equivalent "list format" (one tensor per factor, with an optional
trailing column axis), compose lazily (``A + B``, ``A - B``, ``s * A``, ``A @ B``,
``A.adjoint()``), and export to SciPy with :meth:`PyTorchLinearOperator.to_scipy`.

:class:`CurvatureLinearOperator` adds everything that is shared by operators defined through a
model, a loss and data: iteration over the batches (with optional progress bar), the empirical
risk's normalisation

.. math::
    \mathcal{L}(\boldsymbol{\theta}) = \sum_b w_b\, \ell_b(\boldsymbol{\theta}),
    \qquad w_b = 1 \text{ (sum)}, \quad w_b = B_b / N \text{ (mean)},

where :math:`\ell_b` is the loss of batch :math:`b` with the loss's own reduction, block
structure, the determinism check, and gradient/loss evaluation. Products are memory-bounded:
after a batch's forward pass, the columns are multiplied in chunks of at most
:attr:`CurvatureLinearOperator.MAX_COLUMNS_PER_CHUNK`, so all chunks share one forward pass while
peak memory does not grow with the number of columns. A
subclass implements one hook, :meth:`CurvatureLinearOperator._prepare_batch`: for a batch, do
what all columns share and return the product of the mini-batch matrix with a column chunk.
The base class runs the data loop, weighting, chunking, caching and compilation on top of it.
"""

import functools
import inspect
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from contextlib import contextmanager
from itertools import zip_longest
from numbers import Integral, Real
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from tqdm import tqdm

from curvlinops import _distributed
from curvlinops._autodiff import (
    MAX_COLUMNS_PER_CHUNK,
    EagerAutodiff,
    detached_leaves,
    guarded_models,
    in_column_chunks,
    locked_models,
    make_functional_model,
    model_lock,
    parameter_names,
    parameter_positions,
    restore_buffers,
    second_order_context,
    snapshot_buffers,
)
from curvlinops._batch_products import BatchProducts
from curvlinops._losses import check_reduction
from curvlinops.utils import allclose_report

_ShapeList = List[Tuple[int, ...]]


def _rows_contiguous(block: Tensor) -> bool:
    """Whether each column ``block[..., j]`` is contiguous (row-major in ``block.shape[:-1]``)."""
    expected = 1
    for size, stride in zip(reversed(block.shape[:-1]), reversed(block.stride()[:-1])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


class PyTorchLinearOperator:
    """Matrix-free linear operator acting on (lists of) PyTorch tensors.

    Subclasses implement :meth:`_matmat` (matrix case, list format with trailing column axis),
    :meth:`_adjoint` unless ``SELF_ADJOINT`` is true, and the ``device`` and ``dtype``
    properties.

    Attributes:
        SELF_ADJOINT: Whether the operator equals its adjoint. May be set per instance.
    """

    SELF_ADJOINT: bool = False

    def __init__(self, in_shape: _ShapeList, out_shape: _ShapeList):
        """Set up the operator's input and output spaces.

        Args:
            in_shape: Shapes of the tensors that form the input space.
            out_shape: Shapes of the tensors that form the output space.
        """
        self._in_shape = [torch.Size(s) for s in in_shape]
        self._out_shape = [torch.Size(s) for s in out_shape]
        self._in_shape_flat = [s.numel() for s in self._in_shape]
        self._out_shape_flat = [s.numel() for s in self._out_shape]
        self.shape = (sum(self._out_shape_flat), sum(self._in_shape_flat))

    @property
    def device(self) -> torch.device:
        """Device on which the operator multiplies."""
        raise NotImplementedError("Subclasses must implement the device property.")

    @property
    def dtype(self) -> torch.dtype:
        """Data type in which the operator multiplies."""
        raise NotImplementedError("Subclasses must implement the dtype property.")

    # ----------------------------------------------------------------- products
    def __matmul__(
        self, X: Union[Tensor, List[Tensor], "PyTorchLinearOperator"]
    ) -> Union[Tensor, List[Tensor], "PyTorchLinearOperator"]:
        """Multiply with a vector, a matrix (tensor or list format) or another operator.

        Args:
            X: A tensor ``[N]`` or ``[N, K]``, a list of tensors shaped like the input
                space (optionally with a common trailing column axis ``K``), or an operator.

        Returns:
            The product in the same format as ``X``, or a lazy product operator. A tensor
            result is never a view of ``X``.

        A matrix with zero columns gives an empty result of the right shape.

        Memory layout of a tensor ``X`` ``[N, K]``: if ``X`` is the transpose of a
        contiguous ``[K, N]`` tensor (``X = W.T``: ``X.T.is_contiguous()`` and not
        ``X.is_contiguous()``), it is used without a copy and the result is the transpose of
        a new contiguous ``[K, M]`` tensor (``out.T.is_contiguous()``), like
        ``torch.empty_like``'s ``preserve_format``. Any other ``X``, e.g. the usual
        contiguous one, gives a contiguous result. The exact operators multiply column by
        column, so blocks allocated as ``torch.empty(K, N).T`` save the transposing copies
        into and out of each product. A list whose entries are consecutive row blocks of
        such a ``W.T`` gives entries laid out alike; other lists are handled as before.

        The models that the product evaluates are locked for its duration (products over
        the same model from several threads run one after the other) and their buffers are
        restored afterwards, also when the product raises.

        Raises:
            ValueError: If ``X`` has an unsupported type, shape, dtype or device.
        """
        if isinstance(X, PyTorchLinearOperator):
            return _ProductLinearOperator(self, X)
        # data-parallel: a bad input on one rank must stop all ranks, not leave them waiting
        with _distributed.agreement(
            _distributed.operator_group(self), "Checking a product's input"
        ):
            X_list, is_vector, as_tensor = self._to_list_format(X)
            self._check_dtype_and_device(X_list)
            num_columns = X_list[0].shape[-1] if X_list else 0
            chunk = getattr(self, "MAX_COLUMNS_PER_CHUNK", 1)
            if isinstance(chunk, bool) or not isinstance(chunk, Integral) or chunk <= 0:
                raise ValueError(
                    f"MAX_COLUMNS_PER_CHUNK must be a positive integer, got {chunk!r} (set on "
                    f"{type(self).__name__} or the instance)."
                )
        if num_columns == 0:  # autograd cannot batch over zero columns; nothing to compute
            like = X_list[0] if X_list else X
            if as_tensor:
                return like.new_zeros(self.shape[0], 0)
            return [like.new_zeros(*s, 0) for s in self._out_shape]
        with torch.no_grad(), guarded_models(self._models()):
            AX = self._matmat(X_list)
        self._check_output(AX, num_columns)
        if as_tensor:
            columns_major = self._columns_major(X_list[0])
            flat = self._flat_view(AX, num_columns, columns_major)
            shares_input = flat is not None and (
                flat.untyped_storage().data_ptr() == X.untyped_storage().data_ptr()
            )
            if flat is None or shares_input:  # never hand the caller's tensor back
                flat = self._new_flat(num_columns, AX[0], columns_major)
                for block, t in zip(flat.split(self._out_shape_flat), AX):
                    block.view(t.shape).copy_(t)
            return flat.squeeze(-1) if is_vector else flat
        return [t.squeeze(-1) for t in AX] if is_vector else list(AX)

    def _models(self) -> List[nn.Module]:
        """The models whose forward passes this operator's products run (found recursively).

        Looks for ``_model_func`` modules in this operator and in every operator it holds
        (composites, inverses), so that :meth:`__matmul__` can lock them.
        """
        models, stack, seen = [], [self], set()
        while stack:
            op = stack.pop()
            if id(op) in seen:
                continue
            seen.add(id(op))
            for name, value in vars(op).items():
                if name == "_model_func" and isinstance(value, nn.Module):
                    models.append(value)
                elif isinstance(value, PyTorchLinearOperator):
                    stack.append(value)
                elif type(value) in (list, tuple) and name not in ("_data", "_params"):
                    stack.extend(v for v in value if isinstance(v, PyTorchLinearOperator))
        return models

    def compile(self, **compile_kwargs) -> "PyTorchLinearOperator":
        """Run this operator's products through ``torch.compile`` from now on (in place).

        Data-driven operators compile their mini-batch product (a ``torch.func`` program of
        the parameters, one batch and the columns), so iterating over the data stays eager;
        operators built from stored matrices (KFAC and its relatives) compile the whole
        product. Results equal the eager products up to floating-point round-off. The first
        product of each new shape pays the compilation.

        Args:
            **compile_kwargs: Passed on to ``torch.compile`` (e.g. ``backend``, ``mode``,
                ``fullgraph``, ``dynamic``).

        Returns:
            The operator itself, so ``A = Operator(...).compile()`` works.
        """
        self._prepare_compile()
        self._matmat = torch.compile(self._matmat, **compile_kwargs)
        return self

    def _prepare_compile(self):
        """Compute what the products need and must not be traced (subclass hook)."""

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        """Multiply with a matrix in list format (entries ``[*in_i, K]``).

        Args:
            X: Matrix in list format with trailing column axis.

        Returns:
            The product in list format, entries ``[*out_j, K]``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement _matmat, so it cannot multiply."
        )

    def _to_list_format(self, X) -> Tuple[List[Tensor], bool, bool]:
        """Convert an input into list format with a trailing column axis.

        Returns:
            The list, whether ``X`` was a single vector, and whether ``X`` was a tensor.
        """
        N = self.shape[1]
        if isinstance(X, Tensor):
            if X.ndim not in (1, 2) or X.shape[0] != N:
                raise ValueError(
                    f"Expected a tensor of shape [{N}] or [{N}, K] for an operator of shape "
                    f"{self.shape}, got shape {list(X.shape)}."
                )
            is_vector = X.ndim == 1
            X2 = X.unsqueeze(-1) if is_vector else X
            blocks = X2.split(self._in_shape_flat)
            return (
                [b.reshape(*s, X2.shape[1]) for b, s in zip(blocks, self._in_shape)],
                is_vector,
                True,
            )
        if not isinstance(X, list) or not all(isinstance(x, Tensor) for x in X):
            raise ValueError(
                "Expected a torch.Tensor, a list of tensors, or a PyTorchLinearOperator, "
                f"got {type(X).__name__}. Convert NumPy arrays with torch.as_tensor and "
                "tuples with list()."
            )
        if len(X) != len(self._in_shape):
            raise ValueError(
                f"Expected a list of {len(self._in_shape)} tensors with shapes "
                f"{[tuple(s) for s in self._in_shape]}, got {len(X)} tensors."
            )
        if all(x.shape == s for x, s in zip(X, self._in_shape)):
            return [x.unsqueeze(-1) for x in X], True, False
        shapes_ok = all(
            x.ndim == len(s) + 1 and x.shape[:-1] == s for x, s in zip(X, self._in_shape)
        )
        if not shapes_ok:
            raise ValueError(
                "List entries must have shapes "
                f"{[tuple(s) for s in self._in_shape]} (one vector), or these shapes with "
                f"a common trailing column axis; got {[tuple(x.shape) for x in X]}."
            )
        if len({x.shape[-1] for x in X}) != 1:
            raise ValueError(
                "All list entries must have the same number of columns (trailing axis), "
                f"got {[x.shape[-1] for x in X]}."
            )
        return list(X), False, False

    def _columns_major(self, block: Tensor) -> bool:
        """Whether an input block (list format) is laid out as a row block of ``W.T``.

        ``W`` a contiguous ``[K, N]`` tensor (``N`` the input dimension, ``K > 1``): the
        block's column axis has stride ``N`` and each column's entries are contiguous and
        row-major in its shape. This is the layout that :meth:`__matmul__` preserves.
        """
        num_columns, num_rows = block.shape[-1], self.shape[1]
        if num_columns <= 1 or num_rows <= 1 or block.stride(-1) != num_rows:
            return False
        return _rows_contiguous(block)

    def _new_flat(self, num_columns: int, like: Tensor, columns_major: bool) -> Tensor:
        """Uninitialised ``[M, K]`` tensor: contiguous, or the transpose of a contiguous one."""
        if columns_major:
            return like.new_empty(num_columns, self.shape[0]).T
        return like.new_empty(self.shape[0], num_columns)

    def _new_output(
        self, num_columns: int, like: Tensor, layout_of: Optional[Tensor] = None
    ) -> List[Tensor]:
        """Uninitialised output in list format, as views of one flat ``[M, K]`` tensor.

        Products written into these views can be returned as a flat tensor without a copy
        (see :meth:`_flat_view`). The flat tensor is the transpose of a contiguous
        ``[K, M]`` tensor if the input block ``layout_of`` (default: ``like``) is laid out
        as a row block of such a transpose (:meth:`_columns_major`), else contiguous; so
        products keep the caller's layout (see :meth:`__matmul__`).

        Args:
            num_columns: Number of columns ``K``.
            like: Tensor whose dtype and device the output gets.
            layout_of: Input block (list format) whose layout decides the output's.
        """
        columns_major = self._columns_major(like if layout_of is None else layout_of)
        flat = self._new_flat(num_columns, like, columns_major)
        return [
            block.view(*shape, num_columns)
            for block, shape in zip(flat.split(self._out_shape_flat), self._out_shape)
        ]

    def _flat_view(
        self, AX: List[Tensor], num_columns: int, columns_major: bool = False
    ) -> Optional[Tensor]:
        """The flat ``[M, K]`` tensor that ``AX`` are consecutive views of, if any.

        Only a flat tensor in the requested layout counts (see :meth:`_new_flat`):
        contiguous, or with ``columns_major`` the transpose of a contiguous ``[K, M]``.
        """
        root = AX[0]._base
        M = self.shape[0]
        shape = (num_columns, M) if columns_major else (M, num_columns)
        if (
            root is None
            or root.shape != shape
            or not root.is_contiguous()
            or any(t._base is not root for t in AX)
        ):
            return None
        # consecutive blocks start numel apart (within each column if column-major), else numel * K
        step = (1 if columns_major else num_columns) * root.element_size()
        offset = root.data_ptr()
        for t, numel in zip(AX, self._out_shape_flat):
            in_place = (
                t.stride(-1) == M and _rows_contiguous(t)
                if columns_major and num_columns > 1
                else t.is_contiguous()
            )
            if t.data_ptr() != offset or not in_place:
                return None
            offset += numel * step
        return root.T if columns_major else root

    def _check_dtype_and_device(self, X: List[Tensor]):
        """Raise a ``ValueError`` if the input's dtype or device differs from the operator's."""
        try:
            dtype, device = self.dtype, self.device
        except NotImplementedError:  # bare base class: nothing to compare with
            return
        for x in X:
            if x.dtype != dtype:
                raise ValueError(
                    f"Input has dtype {x.dtype}, but the operator works in {dtype}. "
                    "Convert the input with .to(A.dtype)."
                )
            if x.device != device:
                raise ValueError(
                    f"Input is on device {x.device}, but the operator works on {device}. "
                    "Move the input with .to(A.device)."
                )

    def _check_output(self, AX: List[Tensor], num_columns: int):
        """Raise a ``ValueError`` if ``_matmat`` returned tensors of the wrong shapes."""
        expected = [(*s, num_columns) for s in self._out_shape]
        if len(AX) != len(expected) or any(tuple(t.shape) != e for t, e in zip(AX, expected)):
            raise ValueError(
                f"{type(self).__name__}._matmat returned shapes "
                f"{[tuple(t.shape) for t in AX]}, expected {expected}."
            )

    # ----------------------------------------------------------------- algebra
    def adjoint(self) -> "PyTorchLinearOperator":
        """Return the adjoint (for real operators: the transpose).

        Returns:
            ``self`` if the operator is self-adjoint, otherwise ``self._adjoint()``.
        """
        return self if self.SELF_ADJOINT else self._adjoint()

    def _adjoint(self) -> "PyTorchLinearOperator":
        """Construct the adjoint operator (subclasses that are not self-adjoint)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _adjoint.")

    @property
    def T(self) -> "PyTorchLinearOperator":
        """The transpose (same as :meth:`adjoint` for real operators)."""
        return self.adjoint()

    def __add__(self, other: "PyTorchLinearOperator") -> "PyTorchLinearOperator":
        """Lazy sum ``A + B`` of two operators with identical spaces, dtype and device."""
        if not isinstance(other, PyTorchLinearOperator):
            return NotImplemented
        return _SumLinearOperator(self, other)

    def __sub__(self, other: "PyTorchLinearOperator") -> "PyTorchLinearOperator":
        """Lazy difference ``A - B = A + (-1) * B``."""
        if not isinstance(other, PyTorchLinearOperator):
            return NotImplemented
        return _SumLinearOperator(self, _ScaledLinearOperator(other, -1.0))

    def __mul__(self, scalar: Real) -> "PyTorchLinearOperator":
        """Lazy scaling ``A * s`` by a real scalar."""
        if isinstance(scalar, bool) or not isinstance(scalar, Real):
            return NotImplemented
        return _ScaledLinearOperator(self, float(scalar))

    __rmul__ = __mul__

    def __neg__(self) -> "PyTorchLinearOperator":
        """Lazy negation ``-A``."""
        return _ScaledLinearOperator(self, -1.0)

    # ----------------------------------------------------------------- SciPy
    def to_scipy(self, dtype: Optional[np.dtype] = None) -> LinearOperator:
        """Wrap the operator as a ``scipy.sparse.linalg.LinearOperator``.

        NumPy inputs are converted to the operator's dtype and device, multiplied in
        PyTorch, and returned on the CPU with the input array's dtype. A Fortran-ordered
        block is multiplied without a copy and gives a Fortran-ordered result (the layout
        rule of :meth:`__matmul__`); other arrays give C-ordered results.

        Args:
            dtype: The SciPy operator's dtype. Defaults to NumPy's default float (float64).

        Returns:
            The SciPy linear operator.
        """
        try:
            adjoint = self.adjoint()
        except NotImplementedError:
            adjoint = None

        def multiply(op: Optional[PyTorchLinearOperator], x: np.ndarray) -> np.ndarray:
            if op is None:
                raise NotImplementedError(
                    f"{type(self).__name__} has no adjoint, so rmatvec is unavailable."
                )
            # Fortran-ordered blocks are the transposed layout (see __matmul__): no copy
            fortran = x.ndim == 2 and x.flags.f_contiguous and not x.flags.c_contiguous
            x_torch = torch.as_tensor(x if fortran else np.ascontiguousarray(x)).to(
                device=self.device, dtype=self.dtype
            )
            result = (op @ x_torch).detach().cpu()
            if result.dtype == torch.bfloat16:
                result = result.float()
            return result.numpy().astype(x.dtype, copy=False)

        return LinearOperator(
            shape=self.shape,
            dtype=np.dtype(float) if dtype is None else dtype,
            matvec=lambda x: multiply(self, x),
            rmatvec=lambda x: multiply(adjoint, x),
            matmat=lambda x: multiply(self, x),
            rmatmat=lambda x: multiply(adjoint, x),
        )


def _check_same_spaces(A: PyTorchLinearOperator, B: PyTorchLinearOperator, in_B_from_out: bool):
    """Check that two operators can be added (or, with ``in_B_from_out``, composed)."""
    if in_B_from_out:
        if A._in_shape != B._out_shape:
            raise ValueError(
                "Cannot compose A @ B: A's input shapes "
                f"{[tuple(s) for s in A._in_shape]} differ from B's output shapes "
                f"{[tuple(s) for s in B._out_shape]}."
            )
    elif A._in_shape != B._in_shape or A._out_shape != B._out_shape:
        raise ValueError(
            "Cannot add operators with different spaces: "
            f"{[tuple(s) for s in A._in_shape]} -> {[tuple(s) for s in A._out_shape]} "
            f"vs. {[tuple(s) for s in B._in_shape]} -> "
            f"{[tuple(s) for s in B._out_shape]}."
        )
    if A.device != B.device:
        raise ValueError(f"Operators live on different devices: {A.device}, {B.device}.")
    if A.dtype != B.dtype:
        raise ValueError(f"Operators have different dtypes: {A.dtype}, {B.dtype}.")


class _DelegatingLinearOperator(PyTorchLinearOperator):
    """An operator built around an operand ``_A``: another operator or a tensor.

    The one place where such operators (lazy composites, inverses, sub-matrices, the example
    operators over a stored matrix) get their device, dtype and compilation: they live on
    ``_A``'s device, in ``_A``'s dtype. ``compile`` compiles the operands that are operators
    (the attributes named in ``_OPERANDS``) in place, so what this operator does around
    their products (a sum, a solver's iteration, an index selection) stays eager; an operator
    whose operands are all tensors compiles its own product instead.

    Attributes:
        _OPERANDS: Names of the attributes holding the operands (missing ones are skipped).
    """

    _A: Union[PyTorchLinearOperator, Tensor]
    _OPERANDS: Tuple[str, ...] = ("_A",)

    @property
    def device(self) -> torch.device:
        """The device of ``_A``."""
        return self._A.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``_A``."""
        return self._A.dtype

    def compile(self, **compile_kwargs) -> "PyTorchLinearOperator":
        """Compile the operand operators' products in place, or else this operator's product.

        Args:
            **compile_kwargs: Passed on to each operand's ``compile`` (or ``torch.compile``).

        Returns:
            The operator itself.
        """
        operands = [getattr(self, name, None) for name in self._OPERANDS]
        operators = [op for op in operands if isinstance(op, PyTorchLinearOperator)]
        if not operators:
            return super().compile(**compile_kwargs)
        for operator in operators:
            operator.compile(**compile_kwargs)
        return self


class _CompositeLinearOperator(_DelegatingLinearOperator):
    """A lazy composite of ``_A`` (and ``_B``), on the device and in the dtype of ``_A``."""

    _A: PyTorchLinearOperator
    _OPERANDS = ("_A", "_B")


class _SumLinearOperator(_CompositeLinearOperator):
    """Lazy sum ``A + B``."""

    def __init__(self, A: PyTorchLinearOperator, B: PyTorchLinearOperator):
        _check_same_spaces(A, B, in_B_from_out=False)
        super().__init__(A._in_shape, A._out_shape)
        self._A, self._B = A, B
        self.SELF_ADJOINT = A.SELF_ADJOINT and B.SELF_ADJOINT

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        return [a + b for a, b in zip(self._A._matmat(X), self._B._matmat(X))]

    def _adjoint(self) -> PyTorchLinearOperator:
        return _SumLinearOperator(self._A.adjoint(), self._B.adjoint())


class _ScaledLinearOperator(_CompositeLinearOperator):
    """Lazy scaling ``s * A``."""

    def __init__(self, A: PyTorchLinearOperator, scalar: float):
        super().__init__(A._in_shape, A._out_shape)
        self._A, self._scalar = A, scalar
        self.SELF_ADJOINT = A.SELF_ADJOINT

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        return [self._scalar * t for t in self._A._matmat(X)]

    def _adjoint(self) -> PyTorchLinearOperator:
        return _ScaledLinearOperator(self._A.adjoint(), self._scalar)


class _ProductLinearOperator(_CompositeLinearOperator):
    """Lazy product ``A @ B``."""

    def __init__(self, A: PyTorchLinearOperator, B: PyTorchLinearOperator):
        _check_same_spaces(A, B, in_B_from_out=True)
        super().__init__(B._in_shape, A._out_shape)
        self._A, self._B = A, B

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        return self._A._matmat(self._B._matmat(X))

    def _adjoint(self) -> PyTorchLinearOperator:
        return _ProductLinearOperator(self._B.adjoint(), self._A.adjoint())


# ------------------------------------------------------------------------ data-driven
def validate_params(params, model_func=None) -> List[Tensor]:
    """Check the ``params`` argument of a curvature operator and return it as a list.

    Called first by every data-driven operator's construction (subclasses that inspect
    ``params`` before the base class, like KFAC, can call it themselves).

    Args:
        params: The ``params`` argument.
        model_func: The model; if an ``nn.Module``, every tensor must be one of its
            parameters.

    Returns:
        ``params`` (a new list if a tuple was passed).

    Raises:
        ValueError: If ``params`` is not a list or tuple of tensors (e.g. a generator such
            as ``model.parameters()``), is empty, holds the same tensor twice, or holds a
            tensor that is not a parameter of ``model_func``.
    """
    _check_params_structure(params)
    if isinstance(model_func, nn.Module):
        parameter_names(model_func, params)  # raises early for foreign tensors
    return params if isinstance(params, list) else list(params)


def _check_params_structure(params):
    """The model-independent checks of :func:`validate_params`."""
    if isinstance(params, Tensor) or not isinstance(params, Sequence):
        raise ValueError(
            f"params must be a list of tensors, got {type(params).__name__}. Pass e.g. "
            "list(model.parameters()) or [p for p in model.parameters() if p.requires_grad]."
        )
    if len(params) == 0:
        raise ValueError(
            "params is empty: pass a non-empty list of the model's parameters, e.g. "
            "list(model.parameters())."
        )
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise ValueError(
                f"params[{i}] is a {type(p).__name__}, not a tensor. Pass the model's "
                "parameters, e.g. list(model.parameters())."
            )
    first_position = parameter_positions(params)
    for i, p in enumerate(params):
        if first_position[id(p)] != i:
            raise ValueError(
                f"params[{first_position[id(p)]}] and params[{i}] are the same tensor "
                f"(shape {tuple(p.shape)}); each parameter may appear only once. Remove the "
                "duplicate (tied weights are one parameter)."
            )


def _check_flag(value, name: str):
    """Raise a ``ValueError`` unless ``value`` is a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


def _check_first_batch(data, batch_size_fn):
    """Peek at the first batch: non-empty, an ``(X, y)`` pair, ``batch_size_fn`` for dicts."""
    data_iter = _iterate(data)
    try:
        batch0 = next(data_iter)
    except StopIteration:
        raise ValueError(
            "data is empty: pass an iterable of (X, y) batches with at least one batch."
        ) from None
    X0, _ = _unpack_batch(batch0, 0)
    if isinstance(X0, MutableMapping) and batch_size_fn is None:
        raise ValueError(
            "The inputs X are dict-like, so batch_size_fn must be given to count the "
            "data points of a batch, e.g. batch_size_fn=lambda X: X['x'].shape[0]."
        )


def _check_arguments(progressbar, check_deterministic, num_data, batch_size_fn):
    """Type and range checks of the flags, ``num_data`` and ``batch_size_fn``."""
    _check_flag(progressbar, "progressbar")
    _check_flag(check_deterministic, "check_deterministic")
    if num_data is not None and (
        isinstance(num_data, bool) or not isinstance(num_data, Integral) or num_data <= 0
    ):
        raise ValueError(
            f"num_data must be positive, got {num_data!r}: pass the total number of data "
            "points (an integer > 0), or None to count them."
        )
    if batch_size_fn is not None and not callable(batch_size_fn):
        raise ValueError(
            f"batch_size_fn must be callable (X -> number of data points), got "
            f"{type(batch_size_fn).__name__}."
        )


def _check_block_sizes(block_sizes, num_params: int, supported: bool, operator: str):
    """``block_sizes``: ``None``, or positive integers summing to ``num_params``."""
    if block_sizes is None:
        return
    if not supported:
        raise ValueError(f"{operator} does not support block_sizes; pass None.")
    if (
        not isinstance(block_sizes, Sequence)
        or any(isinstance(s, bool) or not isinstance(s, Integral) for s in block_sizes)
        or sum(block_sizes) != num_params
        or any(s <= 0 for s in block_sizes)
    ):
        raise ValueError(
            f"block_sizes {block_sizes} must be positive and sum to the number of "
            f"parameter tensors ({num_params}): a list of positive integers."
        )


def _guarded_init(init: Callable) -> Callable:
    """Run a constructor with its model locked, then finish the operator, buffers restored.

    A ``params`` argument is checked first (:func:`_check_params_structure`), so that
    subclasses which inspect ``params`` before the base constructor (KFAC's layer mapping)
    report a generator, an empty list or a duplicate tensor as such. When the outermost
    constructor of the concrete class returns, :meth:`CurvatureLinearOperator._finish_init`
    measures the data, builds the spaces and runs the determinism check, so subclasses may
    set their own state before or after calling the base constructor.
    """
    if getattr(init, "_curvlinops_guarded", False):
        return init
    signature = inspect.signature(init)

    @functools.wraps(init)
    def guarded(self, *args, **kwargs):
        if self.__dict__.get("_init_depth", 0) == 0 and "process_group" not in signature.parameters:
            group = _distributed.check_process_group(kwargs.pop("process_group", None))
            args, kwargs = _data_parallel_arguments(self, group, args, kwargs)
            self.__dict__["_process_group"] = group
        model = args[0] if args else kwargs.get("model_func")
        depth = self.__dict__.get("_init_depth", 0)
        self.__dict__["_init_depth"] = depth + 1
        group = self.__dict__.get("_process_group") if depth == 0 else None
        try:
            with _distributed.agreement(group, f"Constructing {type(self).__name__}"):
                try:
                    arguments = signature.bind_partial(self, *args, **kwargs).arguments
                except TypeError:  # let the constructor report its own signature errors
                    arguments = {}
                if "params" in arguments:
                    _check_params_structure(arguments["params"])
                with guarded_models([model] if isinstance(model, nn.Module) else []):
                    init(self, *args, **kwargs)
                    if depth == 0:
                        self._finish_init()
        finally:
            if depth == 0:
                del self.__dict__["_init_depth"]
            else:
                self.__dict__["_init_depth"] = depth

    guarded._curvlinops_guarded = True
    if "process_group" not in signature.parameters:  # the extra keyword every operator takes
        parameters = list(signature.parameters.values())
        position = next(
            (i for i, q in enumerate(parameters) if q.kind is inspect.Parameter.VAR_KEYWORD),
            len(parameters),
        )
        parameters.insert(
            position,
            inspect.Parameter("process_group", inspect.Parameter.KEYWORD_ONLY, default=None),
        )
        guarded.__signature__ = signature.replace(parameters=parameters)
    return guarded


def _data_parallel_arguments(op, group, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """Check that ``op`` supports ``process_group`` and unwrap a DDP model argument.

    Raises:
        NotImplementedError: For operators that do not sum over the data (Jacobians) with a
            process group, and for sharded-parameter models (see
            :func:`curvlinops._distributed.unwrap_model`).
    """
    if group is not None and type(op)._combine is not BatchProducts._combine:
        raise NotImplementedError(
            f"{type(op).__name__} does not support process_group: its output space is the "
            "concatenation of all data points' outputs, which data parallelism would have to "
            "all-gather (uneven sizes) and slice; it is not a sum over the data. Build it per "
            "shard without process_group."
        )
    if args:
        args = (_distributed.unwrap_model(args[0], group), *args[1:])
    elif "model_func" in kwargs:
        kwargs = {**kwargs, "model_func": _distributed.unwrap_model(kwargs["model_func"], group)}
    return args, kwargs


class _DeterminismCheck:
    """The determinism check of :class:`CurvatureLinearOperator` (a mixin of it)."""

    def _check_deterministic(self):
        """Check that two passes over the data and two products agree.

        Compares (per batch for ``FIXED_DATA_ORDER``) inputs, labels, predictions, losses and
        gradients of two simultaneous passes, then the accumulated losses and gradients, then
        two products with the same random vector.

        Raises:
            RuntimeError: If anything differs, naming what.
        """
        self._ensure_spaces()  # also when a subclass calls the check from its constructor
        rtol, atol = 5e-5, 1e-6

        def fail(what: str):
            raise RuntimeError(
                f"Non-deterministic {what} detected (two passes over the data gave different "
                "results). Use model.eval() to disable dropout and batch-norm statistics "
                "updates, use a data loader without shuffling or augmentation, or pass "
                "check_deterministic=False if this is intended."
            )

        def close(a, b) -> bool:  # exact equality, the usual case, is much cheaper to check
            return a.shape == b.shape and (
                torch.equal(a, b)
                or allclose_report(a, b, rtol=rtol, atol=atol, max_mismatches_printed=10)
            )

        # the probe must not advance the caller's random number generator
        device = self.device
        devices = []
        if device.type == "cuda":
            devices = [torch.cuda.current_device() if device.index is None else device.index]
        with torch.random.fork_rng(devices=devices):
            v = torch.rand(self.shape[1], dtype=self.dtype, device=self.device)  # API.md 2.2

        if not self._products_probe_loss():
            first = self.data_prediction_loss_gradient(desc="_check_deterministic")
            second = self.data_prediction_loss_gradient(desc="_check_deterministic")
            self._compare_and_close(first, second, close, fail)
            if not close(self @ v, self @ v):
                fail("matrix-vector product")
            return

        # Each pass is a product that also yields every batch's prediction, loss and
        # gradient, taken from the forward and backward passes the product runs anyway.
        M = [b.reshape(*s, 1) for b, s in zip(v.split(self._in_shape_flat), self._in_shape)]
        products: List[List[Tensor]] = [[], []]
        first, second = (self._probing_product(M, out) for out in products)
        self._compare_and_close(first, second, close, fail)
        # entry-wise tolerances, so comparing per parameter equals comparing the whole vector
        if not all(close(a, b) for a, b in zip(*products)):
            fail("matrix-vector product")

    def _compare_and_close(self, first: Iterator, second: Iterator, close, fail):
        """Compare two simultaneous passes; release them (and their locks) also on failure."""
        try:
            self._compare_passes(zip_longest(first, second), close, fail)
        finally:
            first.close()
            second.close()

    def _products_probe_loss(self) -> bool:
        """Whether the determinism check can take losses and gradients from its products.

        True for operators with a summed per-batch product (:meth:`_prepare_batch`) and a
        loss, evaluated eagerly in one process; otherwise the check runs separate gradient
        passes and two products.
        """
        return (
            self._loss_func is not None
            and self._has_batch_product()
            and type(self)._combine is BatchProducts._combine
            and self._process_group is None
            and self._compiled_batch_product is None
            and self._product_cache_max_bytes is None
        )

    def _probing_product(self, M: List[Tensor], out: List[Tensor]) -> Iterator:
        """One product ``A M`` into ``out`` that yields every batch like the gradient pass.

        Yields ``((X, y), prediction, w_b * loss_b, its gradient)`` per batch, as
        :meth:`data_prediction_loss_gradient`; the prediction, loss and gradient come from
        the product's own passes (:attr:`~curvlinops._autodiff.Autodiff.probe`), or from a
        separate forward and backward pass for products that do not evaluate the loss. A
        Monte-Carlo generator gets a copy per pass, so two simultaneous passes draw alike.
        """
        self._start_pass()
        generator = getattr(self, "_generator", None)
        if isinstance(generator, torch.Generator):
            generator = torch.Generator(device=generator.device).set_state(generator.get_state())
        f = self._functional_model
        for index, (X, y) in enumerate(self._loop_over_data(desc="_check_deterministic")):
            probe: dict = {}
            with _own_generator(self, generator):
                multiply = self._prepare_batch(X, y, EagerAutodiff(probe))
            weight = self._get_normalization_factor(X, y)
            if "gradient" in probe:
                _check_finite_result(probe["prediction"], "model output", index)
                loss = probe["loss"] * weight
                _check_finite_result(loss, "loss", index)
                batch = (probe["prediction"], loss, [g * weight for g in probe["gradient"]])
            else:
                batch = self._batch_prediction_loss_gradient(f, X, y, index)
            with torch.no_grad():
                result = in_column_chunks(multiply, M, self.MAX_COLUMNS_PER_CHUNK)
                del multiply
                if out:
                    for r, b in zip(out, result):
                        r.add_(b, alpha=weight)
                else:  # new tensors: a batch result may alias M
                    out.extend(b * weight for b in result)
            yield (X, y), *batch

    def _compare_passes(self, passes, close: Callable, fail: Callable):
        """Steps 1-3 of :meth:`_check_deterministic` on two zipped passes."""
        loss1 = loss2 = None
        grad1 = grad2 = None
        for batch1, batch2 in passes:
            if batch1 is None or batch2 is None:
                fail("number of batches")
            (X1, y1), pred1, l1, g1 = batch1
            (X2, y2), pred2, l2, g2 = batch2
            if self.FIXED_DATA_ORDER:
                if not _same_inputs(X1, X2, close):
                    fail("input X")
                if not close(y1, y2):
                    fail("label y")
                if not close(pred1, pred2):
                    fail("prediction")
                if l1 is not None and not close(l1, l2):
                    fail("loss")
                if g1 is not None and not all(close(a, b) for a, b in zip(g1, g2)):
                    fail("gradient")
            if l1 is not None:
                loss1 = l1 if loss1 is None else loss1 + l1
                loss2 = l2 if loss2 is None else loss2 + l2
                grad1 = g1 if grad1 is None else [a + b for a, b in zip(grad1, g1)]
                grad2 = g2 if grad2 is None else [a + b for a, b in zip(grad2, g2)]
        if loss1 is not None:
            if not close(loss1, loss2):
                fail("loss")
            if not all(close(a, b) for a, b in zip(grad1, grad2)):
                fail("gradient")


class CurvatureLinearOperator(BatchProducts, _DeterminismCheck, PyTorchLinearOperator):
    r"""Base class of operators defined by a model, a loss function and data.

    The represented matrix refers to the empirical risk
    :math:`\mathcal{L}(\boldsymbol{\theta}) = \sum_b w_b \ell_b(\boldsymbol{\theta})` with
    :math:`w_b = 1` for ``reduction='sum'`` and :math:`w_b = B_b / N` for ``'mean'``
    (:math:`B_b` the size of batch :math:`b`, :math:`N` = ``num_data``). A subclass implements
    :meth:`_prepare_batch`, which returns the product of the mini-batch matrix (built from
    :math:`\ell_b`, without :math:`w_b`) with a column chunk; this class weights and sums it
    over the batches (:meth:`_combine`), chunks the columns, caches and compiles. Its
    constructor only stores and validates the arguments; the data are measured, the spaces
    built and the determinism check run once the concrete class's constructor has returned.

    Attributes:
        SELF_ADJOINT: Whether the operator is self-adjoint.
        SUPPORTS_BLOCKS: Whether ``block_sizes`` (block-diagonal approximation) is supported.
        FIXED_DATA_ORDER: Whether every pass over the data must give identical batches in
            identical order (checked batch by batch in the determinism check).
        MAX_COLUMNS_PER_CHUNK: Most columns multiplied at once. After each batch's forward
            pass, more columns are processed in chunks of this size, so peak memory stays that
            of ``MAX_COLUMNS_PER_CHUNK`` simultaneous products. May be set per instance.

    What is checked (at construction and on every pass over the data):

    - ``data`` must be re-iterable (a list, a ``DataLoader``): one-shot iterators such as
      generators raise ``ValueError``, as does a pass that yields no batch.
    - every batch must be an ``(X, y)`` pair with a tensor ``y``, floating-point tensors in
      the parameters' dtype, and finite values (``ValueError`` naming the batch).
    - every tensor in ``params`` must still be a parameter of the model (``RuntimeError``
      after ``load_state_dict(..., assign=True)`` or assigning a new ``nn.Parameter``:
      rebuild the operator). Editing parameter values in place is fine.

    What is left as it was: the model's parameters, ``.grad`` fields, hooks, train/eval mode
    and buffers. Layers in training mode (``BatchNorm``) evaluate with batch statistics as
    usual, and the library puts their running statistics and ``num_batches_tracked`` back,
    in place, after every pass, product and construction (also when one raises), so the
    operator represents the curvature of the training-mode function while the model's
    state does not move. The global random number generator is only used for the
    determinism probe, whose draw is undone.

    Thread safety: constructions, products and data passes hold a per-model lock while they
    evaluate the model, so operators over the same model can be used from several threads
    (their model evaluations run one after the other); the caller must not change the model
    from other threads meanwhile.

    Data parallelism: every constructor also takes the keyword ``process_group`` (default
    ``None``, one process). With a ``torch.distributed`` process group, each rank passes its
    own shard of the data and holds the operator of the union of all shards: a counted
    ``num_data`` is summed over the ranks (a given one is the union's total and must agree),
    and every product and :meth:`gradient_and_loss` is summed over the ranks with one
    ``all_reduce`` of the result, preceded by a status agreement so that an error on one rank
    makes all ranks raise (see :mod:`curvlinops._distributed` and ``docs/scaling.rst``). All
    ranks must call the same operations in the same order, from one thread each. A model
    wrapped in ``DistributedDataParallel`` is unwrapped; operators that do not sum over the
    data (Jacobians) and sharded-parameter models raise ``NotImplementedError``.
    """

    SELF_ADJOINT: bool = False
    SUPPORTS_BLOCKS: bool = False
    FIXED_DATA_ORDER: bool = False
    MAX_COLUMNS_PER_CHUNK: int = MAX_COLUMNS_PER_CHUNK
    #: ``process_group`` keyword (see :mod:`curvlinops._distributed`); ``None``: one process.
    _process_group = None

    def __init_subclass__(cls, **kwargs):
        """Guard every subclass constructor like the base one (lock, buffers restored)."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _guarded_init(cls.__dict__["__init__"])

    @_guarded_init
    def __init__(
        self,
        model_func: Callable[[Union[Tensor, MutableMapping]], Tensor],
        loss_func: Optional[Callable[[Tensor, Tensor], Tensor]],
        params: List[nn.Parameter],
        data: Iterable[Tuple[Union[Tensor, MutableMapping], Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: Optional[int] = None,
        block_sizes: Optional[List[int]] = None,
        batch_size_fn: Optional[Callable[[Union[Tensor, MutableMapping]], int]] = None,
    ):
        """Set up the operator.

        Args:
            model_func: The neural network (an ``nn.Module``) mapping a batch input ``X``
                (tensor or dict-like) to predictions with a leading batch axis.
            loss_func: Loss function criterion with ``reduction`` ``'mean'`` or ``'sum'``,
                or ``None`` for loss-independent operators (Jacobians).
            params: Parameters of ``model_func`` defining the operator's space (any subset,
                any order).
            data: Re-iterable source of batches ``(X, y)``, e.g. a list or a ``DataLoader``.
            progressbar: Show a ``tqdm`` progress bar over batches.
            check_deterministic: Check at construction that data and model are deterministic.
            num_data: Total number of data points; computed with one pass if ``None``.
            block_sizes: Sizes of consecutive parameter groups whose cross-group blocks are
                zero (block-diagonal approximation), only where ``SUPPORTS_BLOCKS``.
            batch_size_fn: Maps ``X`` to its number of data points. Defaults to
                ``X.shape[0]``; required for dict-like ``X``.

        Raises:
            ValueError: For empty or one-shot data, batches that are not ``(X, y)`` pairs,
                dict-like inputs without ``batch_size_fn``, invalid ``params`` (see
                :func:`validate_params`), ``block_sizes``, ``num_data`` or flags, or an
                unsupported loss reduction.
        """
        _check_first_batch(data, batch_size_fn)
        params = validate_params(params, model_func)
        _check_arguments(progressbar, check_deterministic, num_data, batch_size_fn)
        _check_block_sizes(block_sizes, len(params), self.SUPPORTS_BLOCKS, type(self).__name__)
        if loss_func is not None:
            check_reduction(loss_func)
        self._block_sizes = [len(params)] if block_sizes is None else [int(s) for s in block_sizes]

        self._model_func = model_func
        self._loss_func = loss_func
        self._params = params
        self._data = data
        self._progressbar = progressbar
        self._batch_size_fn = (lambda X: X.shape[0]) if batch_size_fn is None else batch_size_fn
        self._num_data = None if num_data is None else int(num_data)
        self._check_on_init = bool(check_deterministic)

    def _finish_init(self):
        """Measure ``num_data``, build the spaces, run the determinism check (once).

        Called when the concrete class's constructor has returned (see
        :func:`_guarded_init`), so every hook it calls sees the subclass's whole state.
        """
        _ = self._N_data  # counts the data now, so that empty or malformed data raise here
        self._ensure_spaces()
        if self._check_on_init:
            self._check_deterministic()

    @property
    def _N_data(self) -> int:
        """Total number of data points: ``num_data``, or counted with one pass when first used.

        Raises:
            ValueError: If the data hold no data point.
        """
        group = self._process_group
        if self._num_data is None:
            total = sum(self._batch_size(X) for X, _ in self._loop_over_data(desc="num_data"))
            # data parallel: the shards' counts add up to the union's (once per operator)
            total = _distributed.all_reduce_int(total, group, "Summing num_data")
            if total <= 0:
                raise ValueError(f"num_data must be positive, got {total}.")
            self._num_data = total
            self.__dict__["_num_data_agreed"] = True
        elif group is not None and not self.__dict__.get("_num_data_agreed"):
            # a given num_data is the union's total: the same on every rank
            _distributed.check_same_int(self._num_data, group, "num_data")
            self.__dict__["_num_data_agreed"] = True
        return self._num_data

    @_N_data.setter
    def _N_data(self, value: int):
        self._num_data = int(value)
        self.__dict__["_num_data_agreed"] = True  # set explicitly: already the union's

    def _ensure_spaces(self):
        """Build the input and output spaces from the shape hooks, if not done yet."""
        if "shape" not in self.__dict__:
            PyTorchLinearOperator.__init__(self, self._get_in_shape(), self._get_out_shape())

    # ----------------------------------------------------------------- properties
    def _get_in_shape(self) -> List[torch.Size]:
        """Shapes of the input space (default: the parameters' shapes)."""
        return [p.shape for p in self._params]

    def _get_out_shape(self) -> List[torch.Size]:
        """Shapes of the output space (default: the parameters' shapes)."""
        return [p.shape for p in self._params]

    @property
    def device(self) -> torch.device:
        """The parameters' device.

        Raises:
            RuntimeError: If the parameters live on several devices.
        """
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise RuntimeError(f"Parameters must live on one device, found {devices}.")
        return devices.pop()

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype.

        Raises:
            RuntimeError: If the parameters have several dtypes.
        """
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) != 1:
            raise RuntimeError(f"Parameters must have one dtype, found {dtypes}.")
        return dtypes.pop()

    # ----------------------------------------------------------------- data
    def _loop_over_data(
        self, desc: Optional[str] = None, add_device_to_desc: bool = True
    ) -> Iterator[Tuple[Union[Tensor, MutableMapping], Tensor]]:
        """Iterate over the batches, moving tensors to the operator's device.

        Dict-like ``X`` is passed through untouched (the model must move its contents).

        Args:
            desc: Label of the progress bar.
            add_device_to_desc: Whether to add the device to the label.

        Every pass checks that ``params`` are still the model's parameters and that each
        batch is a well-formed, finite ``(X, y)`` pair in the parameters' dtype. The model is
        locked during the pass (so the caller's forward passes between the batches are too),
        and its buffers are put back after every batch.

        Yields:
            The batches ``(X, y)``.

        Raises:
            ValueError: If ``data`` is a one-shot iterator, the pass yields no batch, or a
                batch is malformed, non-finite or of another dtype than the parameters.
            RuntimeError: If a tensor in ``params`` is no longer a parameter of the model.
        """
        self._check_parameters_present()
        data_iter = _iterate(self._data)
        if self._progressbar:
            label = f"{type(self).__name__}.{desc}"
            if add_device_to_desc:
                label += f" (on {self.device})"
            total = len(self._data) if hasattr(self._data, "__len__") else None
            data_iter = tqdm(data_iter, desc=label, total=total)
        device = self.device
        dtypes = {p.dtype for p in self._params}
        dtype = dtypes.pop() if len(dtypes) == 1 else None  # mixed: the products will raise
        models = [self._model_func] if isinstance(self._model_func, nn.Module) else []
        # Under a public entry point (product, construction) this thread holds the lock
        # already; not taking it again means a pass abandoned after an error holds nothing.
        with locked_models([m for m in models if not model_lock(m).held_by_current_thread()]):
            buffers = [snapshot_buffers(m) for m in models]
            num_batches = 0
            for batch in data_iter:
                X, y = _unpack_batch(batch, num_batches)
                if isinstance(X, Tensor):
                    X = X.to(device)
                y = y.to(device)
                # operators without a loss (Jacobians) only carry y along
                _check_batch_values(X, y, num_batches, dtype, check_y=self._loss_func is not None)
                yield X, y
                num_batches += 1
                # not in a finally: a generator abandoned after an error may be closed much
                # later, when restoring would undo the user's own changes; the guards of the
                # public entry points restore on errors
                for snapshot in buffers:
                    restore_buffers(snapshot)
        if num_batches == 0:
            raise ValueError(
                "A pass over data yielded no batch. data must be re-iterable and non-empty "
                "on every pass: pass a list of (X, y) batches or a DataLoader, not a "
                "generator or another one-shot iterator."
            )

    def _check_parameters_present(self):
        """Raise a ``RuntimeError`` if a tensor in ``params`` left the model (was replaced)."""
        if not isinstance(self._model_func, nn.Module):
            return
        present = parameter_positions(self._model_func.parameters())
        missing = [i for i, p in enumerate(self._params) if id(p) not in present]
        if missing:
            raise RuntimeError(
                f"{', '.join(f'params[{i}]' for i in missing)} "
                f"{'is' if len(missing) == 1 else 'are'} no longer a parameter of model_func: "
                "replaced "
                "after the operator was built (e.g. by load_state_dict(..., assign=True) or by "
                "assigning a new nn.Parameter), so the operator would treat them as constants. "
                "Rebuild the operator with the model's current parameters (changing values in "
                "place, e.g. with load_state_dict without assign or an optimizer step, is fine)."
            )

    def _batch_size(self, X: Union[Tensor, MutableMapping]) -> int:
        """``batch_size_fn(X)``, checked to be a non-negative integer."""
        size = self._batch_size_fn(X)
        if isinstance(size, Tensor) and size.numel() == 1 and not size.is_floating_point():
            size = size.item()
        if isinstance(size, bool) or not isinstance(size, Integral) or size < 0:
            raise ValueError(
                f"batch_size_fn returned {size!r} for a batch; it must return the number of "
                "data points in X as a non-negative integer (e.g. X['x'].shape[0])."
            )
        return int(size)

    def _get_normalization_factor(self, X: Union[Tensor, MutableMapping], y: Tensor) -> float:
        """Weight ``w_b`` of a batch: 1 for sum reduction, ``B_b / N`` for mean."""
        reduction = check_reduction(self._loss_func)
        return 1.0 if reduction == "sum" else self._batch_size(X) / self._N_data

    # ----------------------------------------------------------------- gradient & loss
    def data_prediction_loss_gradient(
        self, desc: str = "batch_prediction_loss_gradient"
    ) -> Iterator[
        Tuple[
            Tuple[Union[Tensor, MutableMapping], Tensor],
            Tensor,
            Optional[Tensor],
            Optional[List[Tensor]],
        ]
    ]:
        """Yield each batch with its prediction, normalised loss and gradient.

        Args:
            desc: Label of the progress bar.

        Yields:
            ``((X, y), prediction, loss, gradient)`` with ``loss`` = ``w_b * loss_b``
            (detached) and ``gradient`` its detached gradient shaped like ``params``; both
            ``None`` without a loss function.

        Raises:
            RuntimeError: If a batch's prediction or loss is not finite (the data are checked
                before, see :meth:`_loop_over_data`).
        """
        f = make_functional_model(self._model_func, self._params)
        for index, (X, y) in enumerate(self._loop_over_data(desc=desc)):
            if self._loss_func is None:
                with torch.no_grad():
                    prediction = f(self._params, X)
                _check_finite_result(prediction, "model output", index)
                yield (X, y), prediction, None, None
                continue
            yield (X, y), *self._batch_prediction_loss_gradient(f, X, y, index)

    def _batch_prediction_loss_gradient(
        self, f: Callable, X: Union[Tensor, MutableMapping], y: Tensor, index: int
    ) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """One batch's prediction, ``w_b * loss_b`` and its gradient (all detached)."""
        with second_order_context():
            leaves = detached_leaves(self._params)
            prediction = f(leaves, X)
            _check_finite_result(prediction, "model output", index)
            loss = self._loss_func(prediction, y) * self._get_normalization_factor(X, y)
            _check_finite_result(loss, "loss", index)
            gradient = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        return prediction.detach(), loss.detach(), [g.detach() for g in gradient]

    def gradient_and_loss(self) -> Tuple[List[Tensor], Tensor]:
        """Evaluate the empirical risk and its gradient over all data.

        Returns:
            The gradient (shaped like ``params``) and the loss (0-d tensor).

        Raises:
            ValueError: If there is no loss function.
        """
        if self._loss_func is None:
            raise ValueError("gradient_and_loss needs a loss function, got None.")
        group = self._process_group
        with guarded_models(self._models()):
            with _distributed.agreement(group, "gradient_and_loss"):
                gradient, loss = self._gradient_and_loss()
            _distributed.all_reduce_([*gradient, loss], group, "Summing gradient_and_loss")
            return gradient, loss

    def _gradient_and_loss(self) -> Tuple[List[Tensor], Tensor]:
        """:meth:`gradient_and_loss` without the model guard."""
        total_loss = torch.zeros((), dtype=self.dtype, device=self.device)
        total_grad = [torch.zeros_like(p) for p in self._params]
        for _, _, loss, gradient in self.data_prediction_loss_gradient(desc="gradient_and_loss"):
            total_loss.add_(loss)
            for t, g in zip(total_grad, gradient):
                t.add_(g)
        return total_grad, total_loss


@contextmanager
def _own_generator(op, generator: Optional[torch.Generator]) -> Iterator[None]:
    """Let ``op`` draw from ``generator`` inside the block (if one is given)."""
    if not isinstance(generator, torch.Generator):
        yield
        return
    shared = op._generator
    op._generator = generator
    try:
        yield
    finally:
        op._generator = shared


def _same_inputs(X1, X2, close: Callable[[Tensor, Tensor], bool]) -> bool:
    """Compare two inputs: tensors, or the tensor values of dict-like inputs."""
    if isinstance(X1, MutableMapping):
        if not isinstance(X2, MutableMapping) or X1.keys() != X2.keys():
            return False
        return all(
            close(X1[k], X2[k])
            for k in X1
            if isinstance(X1[k], Tensor) and isinstance(X2[k], Tensor)
        )
    return close(X1, X2)


def _iterate(data) -> Iterator:
    """A fresh iterator over ``data``; ``ValueError`` if ``data`` is not re-iterable."""
    try:
        data_iter = iter(data)
    except TypeError:
        raise ValueError(
            f"data must be an iterable of (X, y) batches, got {type(data).__name__}: pass a "
            "list of (X, y) batches or a DataLoader."
        ) from None
    if data_iter is data:
        raise ValueError(
            f"data is a one-shot iterator ({type(data).__name__}), but operators pass over the "
            "data many times (every product) and it would be used up after the first pass. "
            "Pass a list of (X, y) batches, e.g. list(your_generator), or a DataLoader."
        )
    return data_iter


def _unpack_batch(batch, index: int) -> Tuple[Union[Tensor, MutableMapping], Tensor]:
    """Split a batch into ``(X, y)``, with a ``ValueError`` naming the batch if malformed."""
    if isinstance(batch, (Tensor, str, bytes, MutableMapping)) or not isinstance(batch, Sequence):
        raise ValueError(
            f"Batch {index} of data is a {type(batch).__name__}, not an (X, y) pair. data must "
            "yield (X, y) tuples or lists, e.g. [(X1, y1), (X2, y2)] or a DataLoader over a "
            "TensorDataset(X, y)."
        )
    if len(batch) != 2:
        raise ValueError(
            f"Batch {index} of data has {len(batch)} entries, expected an (X, y) pair. Wrap "
            "extra inputs into a dict X (with batch_size_fn) and yield (X, y)."
        )
    X, y = batch
    if not isinstance(X, (Tensor, MutableMapping)):
        raise ValueError(
            f"Batch {index}: X is a {type(X).__name__}; it must be a torch.Tensor or a "
            "dict-like of inputs. Convert it with torch.as_tensor."
        )
    if not isinstance(y, Tensor):
        raise ValueError(
            f"Batch {index}: y is a {type(y).__name__}; it must be a torch.Tensor (also for "
            "operators that ignore it, e.g. Jacobians). Convert it with torch.as_tensor."
        )
    return X, y


def _check_batch_values(
    X: Union[Tensor, MutableMapping], y: Tensor, index: int, dtype, check_y: bool = True
):
    """Raise a ``ValueError`` for floating-point data of another dtype or non-finite data."""
    named = [("X", X)]
    if isinstance(X, MutableMapping):
        named = [(f"X[{k!r}]", v) for k, v in X.items() if isinstance(v, Tensor)]
    if check_y:
        named.append(("y", y))
    for name, t in named:
        if not (t.is_floating_point() or t.is_complex()):
            continue
        if dtype is not None and name in ("X", "y") and t.is_floating_point() and t.dtype != dtype:
            raise ValueError(
                f"Batch {index}: {name} has dtype {t.dtype}, but the parameters (and the "
                f"operator) use {dtype}. Convert the data with .to({dtype}) or the model with "
                f".to({t.dtype})."
            )
        if not _all_finite(t):
            raise ValueError(
                f"Batch {index}: {name} contains NaN or Inf. Remove or replace the non-finite "
                "values in the data (curvature of a non-finite loss is undefined)."
            )


def _check_finite_result(t: Tensor, what: str, index: int):
    """Raise a ``RuntimeError`` if the model evaluation of a batch gave NaN or Inf."""
    if not _all_finite(t):
        raise RuntimeError(
            f"Batch {index}: the {what} contains NaN or Inf although the data are finite. "
            "Check the model's parameters and buffers for non-finite values (and for "
            "overflow, e.g. in float16)."
        )


def _all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (no NaN or Inf).

    A finite sum implies finite entries (NaN propagates; Inf propagates or, against -Inf,
    gives NaN), and one summing pass is many times cheaper than ``isfinite`` (which writes a
    mask the size of ``t``, e.g. for every input batch). Only a non-finite sum, which finite
    entries can also give by overflow, needs the exact entry-wise test.
    """
    if t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
