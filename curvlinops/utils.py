r"""General utilities: list splitting, comparisons, argument checks, functional models.

The functional helpers turn an ``nn.Module`` into a pure function of (some of) its
parameters, which is what ``torch.func`` transforms need. Given parameters
:math:`\boldsymbol{\theta}` and an input :math:`\mathbf{X}`,
:func:`make_functional_model_and_loss` returns
:math:`f(\boldsymbol{\theta}, \mathbf{X})` and :math:`c(f, \mathbf{y})`, and
:func:`make_functional_flattened_model_and_loss` returns the same functions acting on
the *flattened 2-d view* of the output: for ``CrossEntropyLoss`` an output of shape
:math:`[B, C, S_1, \dots, S_k]` is rearranged to :math:`[B \prod_i S_i, C]` (batch axis
outermost, positions row-major), for ``MSELoss`` / ``BCEWithLogitsLoss`` an output
:math:`[B, S_1, \dots, S_k, C]` is reshaped to :math:`[B \prod_i S_i, C]`. Labels are
flattened consistently, so the loss value is unchanged.
"""

from collections.abc import Callable
from numbers import Integral
from typing import List, Optional, Tuple, Union

import numpy
import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlinops._autodiff import make_functional_model
from curvlinops._losses import loss_strategy


def split_list(x: Union[list, tuple], sizes: List[int]) -> List[list]:
    """Split a list into consecutive chunks of the given sizes.

    Args:
        x: The list (or tuple) to split.
        sizes: Lengths of the chunks. Must sum to ``len(x)``.

    Returns:
        The chunks, each a list, in order.

    Raises:
        ValueError: If a size is not a non-negative integer or the sizes do not sum to the
            length of ``x``.
    """
    if any(isinstance(s, bool) or not isinstance(s, Integral) or s < 0 for s in sizes):
        raise ValueError(f"sizes must be non-negative integers, got {list(sizes)}.")
    if len(x) != sum(sizes):
        raise ValueError(f"Sum of sizes ({sum(sizes)}) does not match the list length ({len(x)}).")
    chunks, start = [], 0
    for size in sizes:
        chunks.append(list(x[start : start + size]))
        start += size
    return chunks


def _as_tensor(x: Union[Tensor, numpy.ndarray]) -> Tensor:
    """Convert a NumPy array (or scalar) to a tensor; tensors are returned unchanged.

    Args:
        x: Tensor or NumPy array.

    Returns:
        A tensor with the same values.
    """
    return x if isinstance(x, Tensor) else torch.as_tensor(numpy.asarray(x))


def allclose_report(
    tensor1: Union[Tensor, numpy.ndarray],
    tensor2: Union[Tensor, numpy.ndarray],
    rtol: float = 1e-5,
    atol: float = 1e-8,
    max_mismatches_printed: Optional[int] = None,
) -> bool:
    r"""Compare two tensors like ``torch.allclose`` and report mismatches.

    Two entries :math:`a, b` are close if
    :math:`|a - b| \le \mathrm{atol} + \mathrm{rtol}\,|b|`. If the inputs are not close,
    every mismatching entry is printed (index, both values and their ratio), followed by
    the largest and smallest absolute values of each input, the number of mismatches out
    of the total number of entries, and the tolerances.

    Args:
        tensor1: First tensor (or NumPy array).
        tensor2: Second tensor (or NumPy array). Moved to the device of ``tensor1``.
            If the dtypes differ, both are compared in the promoted dtype.
        rtol: Relative tolerance. Default: ``1e-5``.
        atol: Absolute tolerance. Default: ``1e-8``.
        max_mismatches_printed: Print at most this many mismatching entries (all if
            ``None``), so that a large non-deterministic tensor does not flood the output.

    Returns:
        Whether the two inputs are close.
    """
    tensor1 = _as_tensor(tensor1)
    tensor2 = _as_tensor(tensor2).to(tensor1.device)
    if tensor1.dtype != tensor2.dtype:  # compare in the promoted dtype
        dtype = torch.promote_types(tensor1.dtype, tensor2.dtype)
        tensor1, tensor2 = tensor1.to(dtype), tensor2.to(dtype)
    close = torch.allclose(tensor1, tensor2, rtol=rtol, atol=atol)
    if not close:
        is_close = torch.isclose(tensor1, tensor2, rtol=rtol, atol=atol)
        mismatches = torch.nonzero(~is_close)
        if max_mismatches_printed is not None:
            mismatches = mismatches[:max_mismatches_printed]
        for idx in mismatches:
            index = tuple(idx.tolist())
            a, b = tensor1[index], tensor2[index]
            print(f"at index {index}: {a:.5e}, {b:.5e}, ratio: {a / b:.5e}")
        for name, t in (("tensor1", tensor1), ("tensor2", tensor2)):
            t_abs = t.abs()
            print(
                f"{name}: abs max {t_abs.max():.5e}, abs min {t_abs.min():.5e}"
                if t.numel() > 0
                else f"{name}: empty"
            )
        num_mismatch = (~is_close).sum().item()
        print(f"Mismatches: {num_mismatch} / {is_close.numel()}")
        print(f"rtol = {rtol}, atol = {atol}")
    return close


def assert_is_square(A) -> int:
    """Check that an object with a ``shape`` attribute is a square matrix.

    Args:
        A: Matrix or linear operator (anything with a ``.shape``).

    Returns:
        The matrix dimension.

    Raises:
        ValueError: If ``A`` is not 2-d or not square.
    """
    if len(A.shape) != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"Expected a square matrix. Got shape {tuple(A.shape)}.")
    return A.shape[0]


def assert_matvecs_subseed_dim(A, num_matvecs: int):
    """Check that the number of matrix-vector products is smaller than every dimension.

    Randomised estimators only make sense if they use fewer products than it would take
    to compute the matrix exactly.

    Args:
        A: Matrix or linear operator (anything with a ``.shape``).
        num_matvecs: Number of matrix-vector products.

    Raises:
        ValueError: If ``num_matvecs`` is not a positive integer, or is greater than or equal
            to any dimension of ``A``.
    """
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, Integral) or num_matvecs <= 0:
        raise ValueError(f"num_matvecs must be a positive integer, got {num_matvecs!r}.")
    if any(num_matvecs >= d for d in A.shape):
        raise ValueError(
            f"num_matvecs ({num_matvecs}) must be less than every dimension of A "
            f"(shape {tuple(A.shape)})."
        )


def assert_divisible_by(num: int, divisor: int, name: str):
    """Check that a number is divisible by a divisor.

    Args:
        num: The number to check.
        divisor: The divisor.
        name: Name of the number, used in the error message.

    Raises:
        ValueError: If ``divisor`` is not a positive integer or ``num`` is not divisible by
            ``divisor``.
    """
    if isinstance(divisor, bool) or not isinstance(divisor, Integral) or divisor <= 0:
        raise ValueError(f"The divisor of {name} must be a positive integer, got {divisor!r}.")
    if num % divisor != 0:
        raise ValueError(f"{name} ({num}) must be divisible by {divisor}.")


def make_functional_call(module: nn.Module, free_param_names: List[str]) -> Callable:
    """Create a function that evaluates a module with some parameters substituted.

    Args:
        module: The module to evaluate.
        free_param_names: Names (as in ``module.named_parameters()``) of the parameters
            that become arguments of the returned function.

    Returns:
        A function ``fn(*free_params, *inputs)`` that evaluates ``module(*inputs)`` with
        the first ``len(free_param_names)`` arguments used for the named parameters. All
        other parameters and buffers are taken from the module (the tensors present at
        creation time).
    """
    free_param_names = list(free_param_names)
    num_free = len(free_param_names)
    free = set(free_param_names)
    frozen = {name: p for name, p in module.named_parameters() if name not in free} | dict(
        module.named_buffers()
    )

    def fn(*args):
        """Evaluate the module with substituted parameters.

        Args:
            *args: The free parameters followed by the module inputs.

        Returns:
            The module output.
        """
        params_and_buffers = dict(frozen)
        params_and_buffers.update(zip(free_param_names, args[:num_free]))
        return functional_call(module, params_and_buffers, tuple(args[num_free:]))

    return fn


def make_functional_model_and_loss(
    model_func: nn.Module, loss_func: nn.Module, params: List[Tensor]
) -> Tuple[Callable, Callable]:
    """Create functional versions of a model and a loss.

    Args:
        model_func: The model.
        loss_func: The loss module.
        params: Parameters of ``model_func`` (identified by identity) that become
            arguments.

    Returns:
        ``(f, c)`` with ``f(*params, X)`` the prediction and ``c(prediction, y)`` the
        loss.

    Raises:
        ValueError: If a tensor of ``params`` is not a parameter of ``model_func``.
    """
    num_params = len(params)
    f_of_values = make_functional_model(model_func, params)  # parameters matched by identity

    def f(*params_and_X):
        return f_of_values(params_and_X[:num_params], *params_and_X[num_params:])

    return f, make_functional_call(loss_func, [])


def make_functional_flattened_model_and_loss(
    model_func: nn.Module, loss_func: nn.Module, params: List[Tensor]
) -> Tuple[Callable, Callable]:
    """Create functional versions of a model and a loss on the flattened 2-d view.

    For ``CrossEntropyLoss`` the class axis (axis 1) is moved last and the remaining
    axes are flattened (batch outermost); for ``MSELoss`` and ``BCEWithLogitsLoss`` all
    axes but the last are flattened. Labels are flattened in the same way, so
    ``c_flat(f_flat(*params, X), y)`` equals ``loss_func(model_func(X), y)``.

    Args:
        model_func: The model.
        loss_func: The loss module.
        params: Parameters of ``model_func`` (identified by identity) that become
            arguments.

    Returns:
        ``(f_flat, c_flat)`` with ``f_flat(*params, X)`` the flattened prediction
        ``[rows, C]`` and ``c_flat(output_flat, y)`` the loss.

    Raises:
        ValueError: If a tensor of ``params`` is not a parameter of ``model_func``.
    """
    f, c = make_functional_model_and_loss(model_func, loss_func, params)

    def f_flat(*params_and_X):
        """Evaluate the model and flatten its output.

        Args:
            *params_and_X: The parameters followed by the input.

        Returns:
            The flattened output of shape ``[rows, C]``.
        """
        return loss_strategy(loss_func, "make_functional_flattened_model_and_loss").to_rows(
            f(*params_and_X)
        )

    def c_flat(output_flat: Tensor, y: Tensor) -> Tensor:
        """Evaluate the loss on a flattened output with flattened labels.

        Args:
            output_flat: Flattened output ``[rows, C]``.
            y: Labels (un-flattened, batch axis first).

        Returns:
            The loss.
        """
        y_flat = loss_strategy(
            loss_func, "make_functional_flattened_model_and_loss"
        ).flatten_labels(y)
        return c(output_flat, y_flat)

    return f_flat, c_flat
