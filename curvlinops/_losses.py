r"""Loss-function conventions shared by the operators.

**Reductions.** Every loss-based operator reads the loss's ``reduction``; only ``'mean'`` and
``'sum'`` are supported.

**Flattened 2-d view.** Gradient-outer-product operators (empirical Fisher, Monte-Carlo Fisher,
KFAC) treat each *row* of the flattened output as one independent loss term: for
``CrossEntropyLoss`` the class axis is axis 1, so an output ``[B, C, *S]`` becomes
``[B * prod(S), C]`` (batch outermost, positions row-major) and labels ``[B, *S]`` become
``[B * prod(S)]``; for ``MSELoss`` and ``BCEWithLogitsLoss`` the last axis holds the features,
so ``[B, *S, C]`` becomes ``[B * prod(S), C]`` and labels are flattened alike. With
:math:`R_b` rows of :math:`C` entries, the mini-batch loss is the sum of the row losses divided
by :math:`c_b = 1` (sum), :math:`R_b` (cross-entropy, mean) or :math:`R_b C` (MSE/BCE, mean).

**Sampled output gradients.** For the row loss :math:`\ell_r` (sum-reduced),
:math:`\mathbb{E}[\hat{\mathbf{g}} \hat{\mathbf{g}}^\top] = \nabla^2_{\mathbf{f}_r} \ell_r` with

- MSE: :math:`\tilde{\mathbf{y}} = \mathbf{f} + \sqrt{1/2}\,\boldsymbol{\epsilon}`,
  :math:`\hat{\mathbf{g}} = 2(\mathbf{f} - \tilde{\mathbf{y}}) = -\sqrt{2}\,\boldsymbol{\epsilon}`,
  :math:`\boldsymbol{\epsilon} \sim \mathcal{N}(\mathbf{0}, \mathbf{I})`;
- cross-entropy: :math:`\tilde{y} \sim \mathrm{Categorical}(\mathrm{softmax}(\mathbf{f}))`,
  :math:`\hat{\mathbf{g}} = \mathrm{softmax}(\mathbf{f}) - \mathrm{onehot}(\tilde{y})`;
- BCE: :math:`\tilde{\mathbf{y}} \sim \mathrm{Bernoulli}(\sigma(\mathbf{f}))` entry-wise,
  :math:`\hat{\mathbf{g}} = \sigma(\mathbf{f}) - \tilde{\mathbf{y}}`.

The draws are those of the 3.0.1 release (API contract, section 20), so a seed reproduces
published results: :meth:`LossStrategy.grad_samples` draws all ``M`` samples of a batch in one
call (Monte-Carlo Fisher and its exact diagonal), :meth:`LossStrategy.label_grad_samples` draws
one label set at a time (KFAC/EKFAC with ``fisher_type="mc"``, ``M`` calls per batch). With
``M = 1`` both consume the generator identically, so operators built with the same seed see the
same samples (the MSE sample of one is the negative of the other's, which leaves outer products
unchanged).
"""

import copy
import numbers
from math import sqrt
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Generator, Tensor
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from curvlinops import _distributed
from curvlinops._autodiff import is_compiling

SUPPORTED_LOSSES = (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss)


class UnsupportedReductionError(ValueError, KeyError):
    """A loss reduction other than ``'mean'`` or ``'sum'``.

    Derives from ``ValueError`` and from ``KeyError`` (what 3.0.1 raised) so that code
    catching either keeps working.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_reduction(loss_func) -> str:
    """Return the loss's reduction after checking that it is ``'mean'`` or ``'sum'``.

    Args:
        loss_func: The loss function.

    Returns:
        The reduction.

    Raises:
        UnsupportedReductionError: If the reduction is missing or unsupported.
    """
    reduction = getattr(loss_func, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise UnsupportedReductionError(
            f"Loss reduction must be 'mean' or 'sum', got {reduction!r} from "
            f"{type(loss_func).__name__}. Construct the loss with reduction='mean' or "
            "'sum' (reduction='none' is not supported)."
        )
    return reduction


class LossStrategy:
    r"""The conventions of one supported loss, used by every operator.

    A strategy wraps a loss module and answers, for the flattened 2-d view of the output
    (module docstring): which axis holds the classes, how outputs and labels become rows,
    the normalisation :math:`c_b`, a square root of the row loss Hessian, row gradients,
    the Monte-Carlo draws of API.md section 20, and which targets and options it supports.
    Subclasses fill in the loss-specific parts; nothing outside this module branches on the
    loss type.

    Attributes:
        loss_class: The ``torch.nn`` loss class the strategy handles.
        classes_axis_one: Whether the classes are on axis 1 (cross-entropy) instead of last.
        least_squares: Whether the loss is a least-squares loss (Gauss-Newton :math:`J^\top J`).
        sampled_options: Loss attributes (with their defaults) that sampling cannot honour.
    """

    loss_class: type = torch.nn.Module
    classes_axis_one: bool = False
    least_squares: bool = False
    sampled_options: Tuple[Tuple[str, object], ...] = ()

    def __init__(self, loss_func):
        """Wrap a loss module.

        Args:
            loss_func: An instance of :attr:`loss_class`.
        """
        self.loss_func = loss_func

    # ------------------------------------------------------------- row view
    def class_axis(self, num_leading: int = 0) -> int:
        """Axis holding the classes/features of an output with ``num_leading`` extra axes."""
        return num_leading + 1 if self.classes_axis_one else -1

    def to_rows(self, T: Tensor, num_leading: int = 0) -> Tensor:
        """View an output-shaped tensor as rows of loss terms ``[*leading, R, C]``.

        Args:
            T: Tensor shaped like a batch output, with ``num_leading`` extra leading axes.
            num_leading: Number of extra leading axes (e.g. a column axis) to keep.

        Returns:
            The rows, batch outermost and positions in row-major order.
        """
        if T.ndim == num_leading + 1:  # scalar outputs [B]: one entry per row
            T = T.unsqueeze(-1)
        moved = T.movedim(self.class_axis(num_leading), -1)
        return moved.reshape(*T.shape[:num_leading], -1, moved.shape[-1])

    def from_rows(self, rows: Tensor, shape: torch.Size, num_leading: int = 0) -> Tensor:
        """Inverse of :meth:`to_rows`: restore the output shape ``shape`` (incl. leading axes)."""
        axis = self.class_axis(num_leading)
        moved_shape = list(shape)
        moved_shape.append(moved_shape.pop(axis))
        return rows.reshape(moved_shape).movedim(-1, axis)

    def flatten_labels(self, y: Tensor) -> Tensor:
        """Flatten labels like :meth:`to_rows` flattens outputs: ``[R]`` indices or ``[R, C]``."""
        return self.to_rows(y)

    def flatten(self, output: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """A batch's output and labels in the 2-d view: ``[R, C]`` and ``[R]`` or ``[R, C]``."""
        return self.to_rows(output), self.flatten_labels(y)

    def num_rows(self, y: Tensor) -> int:
        """Number of loss terms (output rows) of a batch with labels ``y``."""
        return y.shape[:-1].numel()

    # ------------------------------------------------------------- normalisation
    def normalization(self, output_flat: Tensor, y_flat: Optional[Tensor] = None) -> float:
        """Divisor ``c_b`` turning the sum of row losses into the mini-batch loss.

        Args:
            output_flat: The flattened output ``[R, C]``.
            y_flat: The flattened labels; needed to count the rows a cross-entropy with
                ``ignore_index`` keeps (ignored otherwise).

        Returns:
            1 for sum reduction, ``R`` for mean cross-entropy (the number of counted rows
            with ``ignore_index``; a 0-d tensor while ``torch.compile`` traces), ``R * C``
            for mean MSE/BCE.
        """
        if check_reduction(self.loss_func) == "sum":
            return 1.0
        return float(output_flat.numel())

    def counted_rows(self, y_flat: Tensor) -> Optional[Tensor]:
        """Boolean mask ``[R]`` of the rows the loss counts, or ``None`` if it counts all."""
        return None

    def mask_rows(self, vectors: Tensor, y_flat: Tensor) -> Tensor:
        """Zero the ignored rows of row vectors ``[..., R, C]`` (unchanged if none ignored)."""
        mask = self.counted_rows(y_flat)
        if mask is None:
            return vectors
        return vectors * mask.unsqueeze(-1).to(vectors.dtype)

    def mean_correction(self, num_classes: int) -> float:
        r"""Factor turning a mean-reduced row gradient into one of the row's own loss.

        Mean MSE/BCE average over the :math:`C` entries of a row as well, so KFAC's
        backpropagated vectors are multiplied by :math:`\sqrt{C}`; cross-entropy has one
        term per row (factor 1).
        """
        return sqrt(num_classes)

    # ------------------------------------------------------------- curvature
    def sum_loss(self):
        """A copy of the loss with ``reduction='sum'`` (its other options kept)."""
        loss_sum = copy.copy(self.loss_func)
        loss_sum.reduction = "sum"
        return loss_sum

    def row_losses(self, output_flat: Tensor, y_flat: Tensor) -> Tensor:
        """The sum-reduced loss of every row, ``[R]`` (differentiable)."""
        unreduced = copy.copy(self.loss_func)
        unreduced.reduction = "none"
        return unreduced(output_flat, y_flat).sum(-1)

    def row_gradients(self, output_flat: Tensor, y_flat: Tensor) -> Tensor:
        """Gradients of each row's sum-reduced loss w.r.t. that row of the output, ``[R, C]``."""
        f = output_flat.detach().requires_grad_()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.sum_loss()(f, y_flat), f)
        return grad

    def hessian_sqrt_columns(self, output_flat: Tensor) -> Tensor:
        """Columns of a square root of each row's sum-reduced loss Hessian, ``[C, R, C]``.

        ``S[c, r]`` is column ``c`` of row ``r``'s square root (formulas in the subclasses).
        """
        raise NotImplementedError

    # ------------------------------------------------------------- sampling
    def grad_samples(self, output_flat: Tensor, num_samples: int, generator) -> Tensor:
        """All ``M`` sampled output gradients of a batch in one draw (MC-Fisher, its diagonal).

        Exactly the torch calls of the 3.0.1 release (API contract, section 20), so that a seed
        gives the same samples:

        - MSE: ``2 * torch.normal(zeros(M, R, C), as_tensor(sqrt(0.5)), generator)`` (the
          standard deviation is a default-dtype scalar tensor, as in 3.0.1);
        - cross-entropy: ``softmax(f).multinomial(M, replacement=True, generator)`` gives
          ``[R, M]`` classes, the sample is ``softmax(f) - onehot``;
        - BCE: ``sigmoid(f).unsqueeze(0).expand(M, R, C).bernoulli(generator)`` gives labels,
          the sample is ``sigmoid(f) - label``.

        Args:
            output_flat: The flattened output ``[R, C]`` (detached).
            num_samples: Number of samples ``M``.
            generator: Random number generator (or ``None`` for the global one).

        Returns:
            ``[M, R, C]`` sampled gradients of the sum-reduced row losses.

        Raises:
            ValueError: If ``output_flat`` is not 2-d.
        """
        _check_2d(output_flat)
        return self._grad_samples(output_flat, num_samples, generator)

    def draw_label(self, output_flat: Tensor, generator) -> Tensor:
        """One label draw of KFAC's Monte-Carlo Fisher, with the torch calls of 3.0.1.

        API contract, section 20: MSE ``f + sqrt(0.5) * randn(f.shape, generator)``;
        cross-entropy ``softmax(f).multinomial(1, generator).squeeze(-1)``; BCE
        ``sigmoid(f).bernoulli(generator)``.

        Args:
            output_flat: The flattened output ``[R, C]`` (detached).
            generator: Random number generator (or ``None`` for the global one).

        Returns:
            ``[R, C]`` labels (MSE, BCE) or ``[R]`` class indices (cross-entropy).

        Raises:
            ValueError: If ``output_flat`` is not 2-d.
        """
        _check_2d(output_flat)
        return self._draw_label(output_flat, generator)

    def label_grad_samples(self, output_flat: Tensor, num_samples: int, generator) -> Tensor:
        """KFAC's ``M`` Monte-Carlo output gradients: ``M`` label draws in turn, ``[M, R, C]``.

        With ``M = 1`` this consumes the generator as :meth:`grad_samples` does (the MSE
        sample is the negative of that one's).

        Raises:
            ValueError: If ``output_flat`` is not 2-d.
        """
        samples = output_flat.new_empty(num_samples, *output_flat.shape)
        for sample in samples:  # filled in turn: no list of samples beside the stack
            sample.copy_(self.label_gradients(output_flat, self.draw_label(output_flat, generator)))
        return samples

    def _grad_samples(self, output_flat: Tensor, num_samples: int, generator) -> Tensor:
        """The loss's draw of :meth:`grad_samples` on a 2-d output."""
        raise NotImplementedError

    def _draw_label(self, output_flat: Tensor, generator) -> Tensor:
        """The loss's draw of :meth:`draw_label` on a 2-d output."""
        raise NotImplementedError

    def label_gradients(self, output_flat: Tensor, labels: Tensor) -> Tensor:
        """Gradients of the sum-reduced row losses at labels ``labels``, ``[R, C]``."""
        raise NotImplementedError

    # ------------------------------------------------------------- checks
    def check_targets(self, y: Tensor, what: str):
        """Raise ``NotImplementedError`` for targets the curvature does not support."""

    def check_sampling_options(self, operator: str):
        """Reject loss options that the sampled output gradients would silently ignore.

        Args:
            operator: Name of the operator, for the message.

        Raises:
            NotImplementedError: For weighted, label-smoothed or ``ignore_index``
                cross-entropy and weighted BCE.
        """
        unsupported = [
            name
            for name, default in self.sampled_options
            if not _is_default(getattr(self.loss_func, name), default)
        ]
        if unsupported:
            raise NotImplementedError(
                f"{operator} samples from the plain likelihood of "
                f"{type(self.loss_func).__name__} and cannot honour its "
                f"{', '.join(unsupported)}; use the loss's defaults."
            )


def _is_default(value, default) -> bool:
    return value is None if default is None else value == default


class MSEStrategy(LossStrategy):
    r"""``MSELoss``: features last, Hessian square root :math:`\sqrt{2}\mathbf{I}`.

    Samples (section 20): ``M`` at once ``2 * normal(0, sqrt(1/2))``; one label draw
    ``f + sqrt(1/2) * randn``, whose gradient is :math:`2(\mathbf{f} - \tilde{\mathbf{y}})`.
    """

    loss_class = MSELoss
    least_squares = True

    def hessian_sqrt_columns(self, output_flat: Tensor) -> Tensor:
        R, C = output_flat.shape
        eye = torch.eye(C, dtype=output_flat.dtype, device=output_flat.device)
        return sqrt(2.0) * eye.unsqueeze(1).expand(C, R, C)

    def _grad_samples(self, output_flat: Tensor, num_samples: int, generator) -> Tensor:
        mean = output_flat.new_zeros(num_samples, *output_flat.shape)
        std = torch.as_tensor(sqrt(0.5), device=output_flat.device)
        return 2 * torch.normal(mean, std, generator=generator)

    def _draw_label(self, output_flat: Tensor, generator) -> Tensor:
        noise = torch.randn(
            output_flat.shape,
            dtype=output_flat.dtype,
            device=output_flat.device,
            generator=generator,
        )
        return output_flat + sqrt(0.5) * noise

    def label_gradients(self, output_flat: Tensor, labels: Tensor) -> Tensor:
        return 2 * (output_flat - labels)


class CrossEntropyStrategy(LossStrategy):
    r"""``CrossEntropyLoss``: classes on axis 1, one loss term per row.

    Hessian square root :math:`\mathrm{diag}(\sqrt{\mathbf{p}}) - \mathbf{p}
    \sqrt{\mathbf{p}}^\top` with :math:`\mathbf{p} = \mathrm{softmax}(\mathbf{f})`; samples
    ``softmax(f).multinomial`` (section 20) with gradient :math:`\mathbf{p} -
    \mathrm{onehot}(\tilde{y})`.
    """

    loss_class = CrossEntropyLoss
    classes_axis_one = True
    # ignore_index is honoured by masking rows; label smoothing leaves the logit Hessian
    # unchanged (its extra term is linear in the log-probabilities), so sampling is exact
    sampled_options = (("weight", None),)

    def counted_rows(self, y_flat: Tensor) -> Optional[Tensor]:
        """Rows whose class index is not ``ignore_index`` (``None`` if all count)."""
        if y_flat.is_floating_point():  # probabilities: ignore_index does not apply
            return None
        mask = y_flat != self.loss_func.ignore_index
        if is_compiling():  # a traced product cannot branch on data: always mask
            return mask
        return None if bool(mask.all()) else mask

    def flatten_labels(self, y: Tensor) -> Tensor:
        if not y.is_floating_point():  # class indices
            return y.reshape(-1)
        return self.to_rows(y)

    def num_rows(self, y: Tensor) -> int:
        return y.numel()

    def normalization(self, output_flat: Tensor, y_flat: Optional[Tensor] = None) -> float:
        if check_reduction(self.loss_func) == "sum":
            return 1.0
        mask = None if y_flat is None else self.counted_rows(y_flat)
        if mask is None:
            return float(output_flat.shape[0])
        # PyTorch's mean over the counted rows; a batch without any has no curvature
        count = mask.sum().clamp(min=1)
        # traced: a 0-d tensor (reading its value would be a data-dependent branch)
        return count.to(output_flat.dtype) if is_compiling() else float(count)

    def mean_correction(self, num_classes: int) -> float:
        return 1.0

    def row_losses(self, output_flat: Tensor, y_flat: Tensor) -> Tensor:
        unreduced = copy.copy(self.loss_func)
        unreduced.reduction = "none"
        return unreduced(output_flat, y_flat)

    def hessian_sqrt_columns(self, output_flat: Tensor) -> Tensor:
        C = output_flat.shape[1]
        eye = torch.eye(C, dtype=output_flat.dtype, device=output_flat.device)
        p = output_flat.softmax(dim=1)
        # column c of diag(sqrt p) - p sqrt(p)^T is sqrt(p_c) (e_c - p)
        return p.sqrt().T.unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))

    def _grad_samples(self, output_flat: Tensor, num_samples: int, generator) -> Tensor:
        probs = output_flat.softmax(dim=1)
        classes = probs.multinomial(num_samples=num_samples, replacement=True, generator=generator)
        onehot = torch.nn.functional.one_hot(classes.T, output_flat.shape[1])
        return probs - onehot.to(output_flat.dtype)

    def _draw_label(self, output_flat: Tensor, generator) -> Tensor:
        probs = output_flat.softmax(dim=1)
        return probs.multinomial(num_samples=1, generator=generator).squeeze(-1)

    def label_gradients(self, output_flat: Tensor, labels: Tensor) -> Tensor:
        # p - onehot(labels), without the one-hot matrices (int64 and float) beside p
        gradients = output_flat.softmax(dim=1)
        rows = torch.arange(labels.shape[0], device=labels.device)
        gradients[rows, labels] -= 1
        return gradients


class BCEWithLogitsStrategy(LossStrategy):
    r"""``BCEWithLogitsLoss``: features last, binary targets only.

    Hessian square root :math:`\mathrm{diag}(\sqrt{\sigma(1 - \sigma)})`; samples
    ``sigmoid(f).bernoulli`` (section 20) with gradient :math:`\sigma(\mathbf{f}) -
    \tilde{\mathbf{y}}`.
    """

    loss_class = BCEWithLogitsLoss
    sampled_options = (("weight", None), ("pos_weight", None))

    def hessian_sqrt_columns(self, output_flat: Tensor) -> Tensor:
        C = output_flat.shape[1]
        eye = torch.eye(C, dtype=output_flat.dtype, device=output_flat.device)
        sigma = output_flat.sigmoid()
        return eye.unsqueeze(1) * (sigma * (1 - sigma)).sqrt().unsqueeze(0)

    def _grad_samples(self, output_flat: Tensor, num_samples: int, generator) -> Tensor:
        probs = output_flat.sigmoid()
        labels = probs.unsqueeze(0).expand(num_samples, *probs.shape).bernoulli(generator=generator)
        return probs - labels

    def _draw_label(self, output_flat: Tensor, generator) -> Tensor:
        return output_flat.sigmoid().bernoulli(generator=generator)

    def label_gradients(self, output_flat: Tensor, labels: Tensor) -> Tensor:
        return output_flat.sigmoid() - labels

    def check_targets(self, y: Tensor, what: str):
        if not torch.logical_or(y == 0, y == 1).all():
            raise NotImplementedError(
                f"{what} with BCEWithLogitsLoss requires binary targets (0 or 1); got "
                "non-binary values."
            )


_STRATEGIES = (MSEStrategy, CrossEntropyStrategy, BCEWithLogitsStrategy)


def is_supported_loss(loss_func) -> bool:
    """Whether ``loss_func`` is one of :data:`SUPPORTED_LOSSES`."""
    return isinstance(loss_func, SUPPORTED_LOSSES)


def loss_strategy(loss_func, operator: str = "This operator") -> LossStrategy:
    """The strategy object of a supported loss.

    Args:
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        operator: Name of the operator, for the message.

    Returns:
        The strategy wrapping ``loss_func``.

    Raises:
        NotImplementedError: For other losses (the message names ``operator``).
    """
    for strategy in _STRATEGIES:
        if isinstance(loss_func, strategy.loss_class):
            return strategy(loss_func)
    raise NotImplementedError(
        f"{operator} supports {', '.join(c.__name__ for c in SUPPORTED_LOSSES)}; got "
        f"{type(loss_func).__name__}."
    )


def seeded_generator(
    generator: Optional[Generator], device: torch.device, seed: int, group=None
) -> Generator:
    """``generator`` (or a new one if missing or on another device) re-seeded for this rank.

    The Monte-Carlo operators re-seed at the start of every pass over the data, which is what
    couples their samples. Under a process group every rank draws its own samples
    (:func:`curvlinops._distributed.rank_seed`; rank 0 and a single process use ``seed``).

    Args:
        generator: The generator to re-use, or ``None``.
        device: Device the generator must live on.
        seed: The operator's seed.
        group: The operator's ``torch.distributed`` process group, or ``None``.

    Returns:
        The re-seeded generator.
    """
    check_seed(seed, "_seed")  # also catches a bad value assigned to op._seed later
    if generator is None or generator.device != device:
        generator = torch.Generator(device=device)
    return generator.manual_seed(_distributed.rank_seed(seed, group))


class MonteCarloSampling:
    """Seed, sample count and generator of an operator that draws Monte-Carlo samples.

    A mixin of curvature operators (it needs their ``device`` and ``_process_group``): the
    generator is re-seeded with ``_seed`` (mixed with the rank under a process group) at the
    start of every pass over the data, so repeated products draw the same samples, operators
    built with the same seed are coupled, and assigning a new ``_seed`` draws fresh samples
    from the next pass on. Used by the Monte-Carlo Fisher, its exact diagonal and KFAC.
    """

    def _init_sampling(self, loss_func, seed, mc_samples, operator: str, sampled: bool = True):
        """Check the loss and the sampling arguments, then store them.

        Args:
            loss_func: The loss (supported, without options that sampling ignores).
            seed: Seed of the generator.
            mc_samples: Number of Monte-Carlo samples per loss term.
            operator: Name of the operator, for the messages.
            sampled: Whether the operator backpropagates vectors that the loss's options
                would change (``False``: only check that the loss is supported).

        Raises:
            NotImplementedError: For unsupported losses or loss options sampling ignores.
            ValueError: If ``seed`` is not an integer seed or ``mc_samples`` is not a
                positive integer.
        """
        strategy = loss_strategy(loss_func, operator)
        if sampled:
            strategy.check_sampling_options(operator)
        check_seed(seed)
        check_positive_integer(
            mc_samples, "mc_samples", "It is the number of Monte-Carlo samples per loss term."
        )
        self._seed, self._mc_samples = seed, mc_samples
        self._generator: Optional[Generator] = None

    def _start_pass(self):
        """Seed the generator with ``_seed`` (and the rank): every pass draws the same samples."""
        self._generator = seeded_generator(
            self._generator, self.device, self._seed, self._process_group
        )

    def _sampling_generator(self) -> Generator:
        """The generator, seeded as at the start of a pass if no pass has seeded it yet."""
        if self._generator is None:
            self._start_pass()
        return self._generator


def _check_2d(output_flat: Tensor):
    if output_flat.ndim != 2:
        raise ValueError(
            "Only 2d outputs [rows, classes] can be sampled from (a 2-d output is needed), got "
            f"shape {list(output_flat.shape)}. Flatten sequence outputs into rows first."
        )


def is_integer(value) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), ``bool`` excluded."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


#: Seeds ``torch.Generator.manual_seed`` accepts.
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seed(seed, name: str = "seed"):
    """Raise ``ValueError`` unless ``seed`` is an integer that ``torch.Generator`` accepts.

    Args:
        seed: The seed.
        name: Argument name for the message.
    """
    if not is_integer(seed) or not SEED_RANGE[0] <= int(seed) <= SEED_RANGE[1]:
        raise ValueError(
            f"{name} must be an integer in [-2**63, 2**64 - 1] (a torch.Generator seed), got "
            f"{seed!r}. Pass e.g. {name}=0."
        )


def check_positive_integer(value, name: str, hint: str = ""):
    """Raise ``ValueError`` unless ``value`` is an integer >= 1.

    Args:
        value: The value.
        name: Argument name for the message.
        hint: Optional guidance appended to the message.
    """
    if not is_integer(value) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer (>= 1), got {value!r}.{' ' + hint if hint else ''}"
        )
