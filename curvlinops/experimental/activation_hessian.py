r"""Hessian of the loss with respect to an intermediate tensor of the network.

For one batch :math:`(\mathbf{X}, \mathbf{y})` and an intermediate tensor :math:`\mathbf{Z}`
(the input or output of a sub-module), the operator represents

.. math::
    \nabla^2_{\mathbf{Z}}\, \ell\big(g(\mathbf{Z}), \mathbf{y}\big),

where :math:`g` is the rest of the network after :math:`\mathbf{Z}` and :math:`\ell` the loss
with its own reduction (batch axis included in :math:`\mathbf{Z}`'s shape). During a product
a hook replaces :math:`\mathbf{Z}` by a detached leaf with the same value, so the forward pass
computes exactly :math:`g(\mathbf{Z})`; products are then double backward passes w.r.t. that
leaf, all columns at once.
"""

from contextlib import contextmanager
from typing import Iterable, Iterator, List, Tuple

import torch
from torch import Tensor, nn

from curvlinops._autodiff import (
    EAGER,
    Autodiff,
    columns_first,
    columns_last,
    second_order_context,
    vjp,
)
from curvlinops._torch_base import CurvatureLinearOperator, _iterate


def _named_module(model: nn.Module, module_name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if module_name not in modules:
        raise ValueError(
            f"No module named {module_name!r} in the model; choose one of "
            f"{sorted(modules)} ('' is the model itself)."
        )
    return modules[module_name]


def _select(tensors, io_idx: int, what: str) -> Tensor:
    if isinstance(tensors, Tensor):
        if io_idx != 0:
            raise ValueError(f"The {what} is a single tensor; io_idx must be 0, got {io_idx}.")
        return tensors
    return tensors[io_idx]


class store_activation:  # noqa: N801 (a context manager named like the 3.0.1 function)
    """Context manager that stores a sub-module's input or output on every forward pass.

    Attributes:
        SUPPORTED_IO_TYPES: ``{"input", "output"}``.
    """

    SUPPORTED_IO_TYPES = {"input", "output"}

    def __init__(
        self,
        model: nn.Module,
        module_name: str,
        io_type: str,
        io_idx: int,
        destination: List[Tensor],
    ):
        """Set up the storage.

        Args:
            model: The network.
            module_name: Name of the sub-module (``named_modules()``; ``""`` is the model).
            io_type: ``"input"`` or ``"output"``.
            io_idx: Index into the module's input tuple or output (tuple); 0 for a tensor.
            destination: Empty list that receives the tensors.

        Raises:
            ValueError: For an unknown module, an unsupported ``io_type``, or a non-empty
                ``destination``.
        """
        self._module = _named_module(model, module_name)
        if io_type not in self.SUPPORTED_IO_TYPES:
            raise ValueError(
                f"io_type must be one of {sorted(self.SUPPORTED_IO_TYPES)}, got {io_type!r}."
            )
        if len(destination) != 0:
            raise ValueError("destination must be an empty list.")
        self._io_type, self._io_idx, self._destination = io_type, io_idx, destination
        self._handle = None

    def _hook(self, module: nn.Module, inputs: Tuple, output=None):
        tensors = inputs if self._io_type == "input" else output
        self._destination.append(_select(tensors, self._io_idx, self._io_type))

    def __enter__(self) -> "store_activation":
        """Install the hook."""
        self._handle = self._module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        """Remove the hook."""
        self._handle.remove()


@contextmanager
def _replaced_by_leaf(
    model: nn.Module, activation: Tuple[str, str, int], leaves: List[Tensor]
) -> Iterator[None]:
    """Replace the selected tensor by a detached leaf (appended to ``leaves``)."""
    module_name, io_type, io_idx = activation
    module = _named_module(model, module_name)

    def replace(tensors, what):
        selected = _select(tensors, io_idx, what)
        leaf = selected.detach().requires_grad_()
        leaves.append(leaf)
        if isinstance(tensors, Tensor):
            return leaf
        replaced = list(tensors)
        replaced[io_idx] = leaf
        return type(tensors)(replaced) if isinstance(tensors, tuple) else replaced

    if io_type == "input":
        handle = module.register_forward_pre_hook(lambda m, inputs: replace(inputs, "input"))
    else:
        handle = module.register_forward_hook(lambda m, i, output: replace(output, "output"))
    try:
        yield
    finally:
        handle.remove()


class ActivationHessianLinearOperator(CurvatureLinearOperator):
    r"""Hessian of the loss w.r.t. an intermediate tensor, for a single batch.

    Represents :math:`\nabla^2_{\mathbf{Z}} \ell(g(\mathbf{Z}), \mathbf{y})` (see the module
    docstring), a square operator on :math:`\mathbf{Z}`'s shape (batch axis included).

    Attributes:
        SELF_ADJOINT: ``True``.
    """

    SELF_ADJOINT: bool = True

    def __init__(
        self,
        model_func: nn.Module,
        loss_func,
        activation: Tuple[str, str, int],
        data: Iterable[Tuple[Tensor, Tensor]],
        progressbar: bool = False,
        check_deterministic: bool = True,
    ):
        """Set up the operator.

        Args:
            model_func: The network.
            loss_func: Loss with ``reduction`` ``'mean'`` or ``'sum'``.
            activation: ``(module_name, "input" | "output", index)``.
            data: Exactly one batch ``(X, y)``.
            progressbar: Show a progress bar over the (single) batch.
            check_deterministic: Check determinism at construction.

        Raises:
            ValueError: If ``data`` has more than one batch, or ``activation`` names an
                unknown module or io type.
        """
        batches = _iterate(data)  # a one-shot iterator raises here, before it is consumed
        next(batches, None)
        if next(batches, None) is not None:
            raise ValueError(
                "ActivationHessianLinearOperator needs data with exactly one batch, got more."
            )
        if not isinstance(activation, (tuple, list)) or len(activation) != 3:
            raise ValueError(
                "activation must be a tuple (module_name, 'input' | 'output', index), got "
                f"{activation!r}."
            )
        module_name, io_type, io_idx = activation
        if not isinstance(module_name, str):
            raise ValueError(
                f"activation[0] must be a module name (str), got {type(module_name).__name__}."
            )
        _named_module(model_func, module_name)
        if io_type not in store_activation.SUPPORTED_IO_TYPES:
            raise ValueError(f"activation io type must be 'input' or 'output', got {io_type!r}.")
        if isinstance(io_idx, bool) or not isinstance(io_idx, int) or io_idx < 0:
            raise ValueError(
                f"activation[2] (the index into the module's inputs or outputs) must be a "
                f"non-negative integer, got {io_idx!r}."
            )
        if not any(True for _ in model_func.parameters()):
            raise ValueError(
                "model_func has no parameters; ActivationHessianLinearOperator takes its "
                "dtype and device from them. Give the model at least one parameter."
            )
        self._activation = activation
        super().__init__(
            model_func,
            loss_func,
            list(model_func.parameters()),
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
        )

    def _get_in_shape(self) -> List[torch.Size]:
        (X, _) = next(iter(self._loop_over_data(desc="activation shape")))
        stored: List[Tensor] = []
        with torch.no_grad(), store_activation(self._model_func, *self._activation, stored):
            self._model_func(X)
        if len(stored) != 1:
            raise ValueError(
                f"The activation {self._activation} was seen {len(stored)} times in one "
                "forward pass; it must be computed exactly once."
            )
        return [stored[0].shape]

    _get_out_shape = _get_in_shape

    def _prepare_batch(self, X, y: Tensor, ad: Autodiff = EAGER):
        """Forward pass with the activation as a leaf and its gradient, then its pullback.

        Eager only (``ad`` is always :data:`~curvlinops._autodiff.EAGER`, see :meth:`compile`).
        """
        with second_order_context():
            leaves: List[Tensor] = []
            with _replaced_by_leaf(self._model_func, self._activation, leaves):
                loss = self._loss_func(self._model_func(X), y)
            (Z,) = leaves
            (grad,) = vjp([loss], [Z], [loss.new_ones(())], batched=False, create_graph=True)

        def multiply(M_chunk: List[Tensor]) -> List[Tensor]:
            (M_cols,), batched = columns_first(M_chunk)
            (HM,) = vjp([grad], [Z], [M_cols], batched=batched)
            return columns_last([HM], batched)

        return multiply

    def compile(self, **compile_kwargs):
        """Not supported: the activation is replaced by forward hooks, which are not traced.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError(
            "ActivationHessianLinearOperator cannot be compiled (its activation hooks cannot "
            "be traced); use it eagerly."
        )


__all__ = ["ActivationHessianLinearOperator", "store_activation"]
