r"""Monte-Carlo approximation of the type-I Fisher information matrix.

With each batch output viewed as :math:`R_b` rows of :math:`C` entries (flattened 2-d view,
see ``curvlinops._losses``), :math:`M` = ``mc_samples`` and sampled output gradients
:math:`\hat{\mathbf{g}}_{rm}` of the sum-reduced row losses, the operator represents

.. math::
    \mathbf{F}_{\mathrm{MC}} = \sum_b \frac{w_b}{M c_b} \sum_{r \in b} \sum_{m=1}^{M}
    \mathbf{J}_r^\top \hat{\mathbf{g}}_{rm} \hat{\mathbf{g}}_{rm}^\top \mathbf{J}_r\,,

with :math:`w_b = 1` (sum) or :math:`B_b/N` (mean) and :math:`c_b = 1` (sum), :math:`R_b`
(cross-entropy, mean) or :math:`R_b C` (MSE/BCE, mean). The samples are

- MSE: :math:`\hat{\mathbf{g}} \sim \mathcal{N}(\mathbf{0}, 2\mathbf{I}_C)`;
- cross-entropy: :math:`\hat{\mathbf{g}} = \mathrm{softmax}(\mathbf{f}_r) -
  \mathrm{onehot}(\tilde{y})`, :math:`\tilde{y} \sim \mathrm{Categorical}(\mathrm{softmax}(
  \mathbf{f}_r))`;
- BCE: :math:`\hat{\mathbf{g}} = \sigma(\mathbf{f}_r) - \tilde{\mathbf{y}}`,
  :math:`\tilde{\mathbf{y}} \sim \mathrm{Bernoulli}(\sigma(\mathbf{f}_r))`.

Since :math:`\mathbb{E}[\hat{\mathbf{g}}\hat{\mathbf{g}}^\top]` is the Hessian of the row loss
w.r.t. the row output, :math:`\mathbb{E}[\mathbf{F}_{\mathrm{MC}}]` equals the GGN.

**Reproducibility.** A generator on the operator's device is seeded with ``_seed`` at the start
of every pass over the data and batches are sampled in data order, so repeated products are
identical, multiplying columns together or one by one gives the same result, and changing
``_seed`` (e.g. ``op._seed += 1``) draws fresh samples. Per batch, all ``mc_samples`` samples are
drawn by one torch call, the same as in the 3.0.1 release (API contract, section 20); with
``mc_samples=1`` KFAC and EKFAC with ``fisher_type="mc"`` and the same seed see the same samples.
"""

from collections.abc import Callable, MutableMapping
from typing import List, Optional, Tuple, Union

import torch
from torch import Generator, Tensor, nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from curvlinops._autodiff import EAGER, Autodiff, eager_batch_product, make_functional_model
from curvlinops._losses import MonteCarloSampling, check_positive_integer, loss_strategy
from curvlinops._torch_base import CurvatureLinearOperator
from curvlinops.ggn import prepare_ggn_type_product
from curvlinops.gradient_moments import OutputGradients, gradient_moments_middle


def make_grad_output_sampler(
    loss_func: Union[MSELoss, CrossEntropyLoss, BCEWithLogitsLoss],
) -> Callable[[Tensor, int, Tensor, Optional[Generator]], Tensor]:
    """Build a sampler of output gradients whose outer products average to the loss Hessian.

    Args:
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.

    Returns:
        ``sampler(output, num_samples, y, generator)`` returning ``[num_samples,
        *output.shape]`` gradients of the sum-reduced row losses for a 2-d ``output``.

    Raises:
        NotImplementedError: For unsupported losses (also raised by the sampler for a
            non-2-d output, or BCE with non-binary targets ``y``).
    """
    strategy = loss_strategy(loss_func, "make_grad_output_sampler")

    def sampler(
        output: Tensor, num_samples: int, y: Tensor, generator: Optional[Generator]
    ) -> Tensor:
        check_positive_integer(num_samples, "num_samples")
        if output.ndim != 2:
            raise NotImplementedError(
                f"Expected a 2-d output [rows, classes], got {list(output.shape)}. "
                "Flatten sequence outputs into rows first."
            )
        strategy.check_targets(y, "FisherMCLinearOperator")
        return strategy.grad_samples(output.detach(), num_samples, generator)

    return sampler


def sampled_output_gradients(
    loss_func, mc_samples: int, generator: Optional[Generator]
) -> OutputGradients:
    r"""The MC-Fisher's output factor: samples scaled by :math:`(M c_b)^{-1/2}`, ``[M, R, C]``.

    Args:
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        mc_samples: Number of samples :math:`M` per row.
        generator: The random number generator (one draw per call).

    Returns:
        ``output_grads(output_flat, y_flat)``.
    """
    sampler = make_grad_output_sampler(loss_func)
    strategy = loss_strategy(loss_func)

    def output_grads(output_flat: Tensor, y_flat: Tensor) -> Tensor:
        grads = sampler(output_flat, mc_samples, y_flat, generator)
        # ignored rows (ignore_index) count nothing
        c_b = strategy.normalization(output_flat, y_flat)
        return (mc_samples * c_b) ** -0.5 * strategy.mask_rows(grads, y_flat)

    return output_grads


def make_batch_fmc_matrix_product(
    model_func: nn.Module, loss_func, params: Tuple[Tensor, ...]
) -> Callable[..., Tuple[Tensor, ...]]:
    """Build the product of the mini-batch Monte-Carlo Fisher with a matrix.

    Args:
        model_func: The neural network.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: The parameters.

    Returns:
        ``fmc_matrix_product(X, y, mc_samples, generator, *M, max_columns=16)`` in list
        format (entries ``[*p.shape, K]``). One draw of ``mc_samples`` samples per call
        serves all columns.
    """
    strategy = loss_strategy(loss_func, "make_grad_output_sampler")
    f = make_functional_model(model_func, params)

    def prepare(X, y: Tensor, mc_samples: int, generator: Optional[Generator]):
        output_grads = sampled_output_gradients(loss_func, mc_samples, generator)
        middle = gradient_moments_middle(strategy, output_grads)
        return prepare_ggn_type_product(EAGER, f, params, X, y, middle)

    return eager_batch_product(prepare)


class FisherMCLinearOperator(MonteCarloSampling, CurvatureLinearOperator):
    r"""Linear operator for a Monte-Carlo approximation of the type-I Fisher.

    .. math::
        \mathbf{F}_{\mathrm{MC}} = \sum_b \frac{w_b}{M c_b} \sum_{r \in b} \sum_{m=1}^{M}
        \mathbf{J}_r^\top \hat{\mathbf{g}}_{rm} \hat{\mathbf{g}}_{rm}^\top \mathbf{J}_r

    (see the module docstring for the samples and normalisation). Its expectation is the
    GGN. The samples are reproducible: they depend only on ``_seed`` and the data.

    Attributes:
        SELF_ADJOINT: ``True``.
        FIXED_DATA_ORDER: ``True`` (samples are drawn in data order).
        supported_losses: The supported loss classes.
    """

    SELF_ADJOINT: bool = True
    FIXED_DATA_ORDER: bool = True
    supported_losses = (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss)
    _CACHE_KEY_ATTRIBUTES = ("_seed", "_mc_samples")  # cached samples follow them

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: Union[MSELoss, CrossEntropyLoss, BCEWithLogitsLoss],
        params: List[nn.Parameter],
        data,
        progressbar: bool = False,
        check_deterministic: bool = True,
        seed: int = 2147483647,
        mc_samples: int = 1,
        num_data: Optional[int] = None,
        batch_size_fn: Optional[Callable[[Union[Tensor, MutableMapping]], int]] = None,
    ):
        """Set up the Monte-Carlo Fisher.

        Args:
            model_func: The neural network.
            loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
            params: The parameters defining the operator's space.
            data: Re-iterable source of batches ``(X, y)`` in a fixed order.
            progressbar: Show a progress bar over batches.
            check_deterministic: Check determinism at construction.
            seed: Seed of the generator, re-applied at the start of every product.
            mc_samples: Number of Monte-Carlo samples per loss term.
            num_data: Total number of data points (computed if ``None``).
            batch_size_fn: Number of data points of a batch input (required for dict ``X``).

        Raises:
            NotImplementedError: If the loss is unsupported or has options (class weights,
                ``pos_weight``) that sampling ignores (``ignore_index`` and label smoothing
                are honoured).
            ValueError: If ``mc_samples`` is not a positive integer or ``seed`` is not an
                integer seed.
        """
        self._init_sampling(loss_func, seed, mc_samples, type(self).__name__)
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
        )

    def _untraced_state(self, X: Union[Tensor, MutableMapping], y: Tensor) -> Tensor:
        """The scaled samples of a batch, drawn from an eager forward pass (for ``compile``).

        A generator cannot be traced, so a compiled product receives the samples that the
        eager product would draw (same generator state, same output).
        """
        with torch.no_grad():
            output = self._functional_model(self._params, X)
        output_flat, y_flat = loss_strategy(self._loss_func).flatten(output, y)
        return self._output_gradients()(output_flat, y_flat)

    def _output_gradients(self) -> OutputGradients:
        return sampled_output_gradients(self._loss_func, self._mc_samples, self._generator)

    def _prepare_batch(
        self, X: Union[Tensor, MutableMapping], y: Tensor, ad: Autodiff = EAGER
    ) -> Callable[[List[Tensor]], List[Tensor]]:
        """Forward pass and samples (drawn once per batch), then ``J^T (samples) J``."""
        if ad.state is None:
            output_grads = self._output_gradients()
        else:  # traced: the samples were drawn outside (see _untraced_state)
            output_grads = lambda output_flat, y_flat: ad.state  # noqa: E731
        middle = gradient_moments_middle(loss_strategy(self._loss_func), output_grads)
        values = ad.values(self._params)
        return prepare_ggn_type_product(
            ad, self._functional_model, values, X, y, middle, self._loss_func, self._jvp_route(ad)
        )
