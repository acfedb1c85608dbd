r"""A curvature report: what a model's curvature looks like, in numbers.

:func:`curvature_report` computes, for a model, a loss and data, and one of the matrices
:math:`\mathbf{A}` = Hessian, GGN, empirical Fisher or Monte-Carlo Fisher:

- the top-:math:`k` eigenvalues (:func:`curvlinops.eigen.eigsh`, thick-restart Lanczos);
- the trace by Hutchinson's estimator with :math:`n` Rademacher vectors :math:`\mathbf{v}_i`,
  :math:`\hat t = \frac{1}{n}\sum_i \mathbf{v}_i^\top \mathbf{A}\mathbf{v}_i`, with the 95%
  confidence interval :math:`\hat t \pm 1.96\, s / \sqrt{n}` (:math:`s` the sample standard
  deviation of the :math:`n` terms; a normal approximation), from one multi-column product;
- the spectral density from one Lanczos run (Gaussian-smoothed Ritz values, Papyan 2020), on
  a linear grid for the Hessian and of :math:`\log(|\lambda| + \epsilon)` for the positive
  semi-definite matrices, whose eigenvalues span many orders of magnitude;
- per layer (the parameters of one module): the trace of its diagonal block, estimated from
  the same products (:math:`\mathbb{E}[\mathbf{v}_l^\top (\mathbf{A}\mathbf{v})_l] =
  \operatorname{tr} \mathbf{A}_{ll}`, so it costs nothing extra), its share of the total, and
  the top eigenvalue of the block (an operator on the layer's parameters only).

All products over the data are cached between Lanczos iterations (``A.cache()``). Every
random draw comes from a ``torch.Generator`` seeded with ``seed`` (the Monte-Carlo Fisher
gets ``seed`` as its sampling seed, for the full matrix and its layer blocks alike, so the
blocks are the full matrix's blocks), so a report is reproducible.
"""

import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

from curvlinops._checks import check_count
from curvlinops._torch_base import PyTorchLinearOperator, _CompositeLinearOperator
from curvlinops.eigen import eigsh
from curvlinops.fisher import FisherMCLinearOperator
from curvlinops.ggn import GGNLinearOperator
from curvlinops.gradient_moments import EFLinearOperator
from curvlinops.hessian import HessianLinearOperator
from curvlinops.papyan2020traces.spectrum import (
    fast_lanczos,
    lanczos_approximate_log_spectrum_from_iter,
    lanczos_approximate_spectrum_from_iter,
)
from curvlinops.sampling import rademacher_columns

MATRICES: Dict[str, type] = {
    "hessian": HessianLinearOperator,
    "ggn": GGNLinearOperator,
    "ef": EFLinearOperator,
    "mc_fisher": FisherMCLinearOperator,
}
#: The matrices that are positive semi-definite (their density is shown on a log scale).
PSD_MATRICES = ("ggn", "ef", "mc_fisher")
LOG_EPSILON = 1e-6


class ProblemError(ValueError):
    """The model, loss and data do not work with the requested matrix (message says why)."""


def layer_groups(model: nn.Module) -> List[Tuple[str, List[nn.Parameter]]]:
    """The trainable parameters grouped by the module that owns them, in model order."""
    groups: Dict[str, List[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0] or "(root)", []).append(p)
    return list(groups.items())


def curvature_report(
    model: nn.Module,
    loss_func: nn.Module,
    data: Iterable,
    matrix: str = "ggn",
    k: int = 5,
    num_samples: int = 64,
    lanczos_steps: int = 64,
    num_points: int = 512,
    seed: int = 0,
    progressbar: bool = False,
    batch_size_fn: Optional[Callable] = None,
    *,
    process_group=None,
) -> dict:
    """Compute the curvature report (see the module docstring).

    Stages: check the arguments, build the operator, its top eigenvalues, the trace
    estimate, the spectral density and the per-layer table, in this order (which fixes the
    order of the random draws).

    Args:
        model: The network.
        loss_func: Its loss (``reduction`` ``'mean'`` or ``'sum'``).
        data: Re-iterable batches ``(X, y)``.
        matrix: ``"hessian"``, ``"ggn"``, ``"ef"`` or ``"mc_fisher"``.
        k: Number of top eigenvalues.
        num_samples: Rademacher vectors of the trace estimate (at least 2).
        lanczos_steps: Lanczos steps of the spectral density (capped at the dimension).
        num_points: Grid points of the density.
        seed: Seed of every random draw (start vectors, trace vectors and, for
            ``"mc_fisher"``, the Monte-Carlo samples of the labels).
        progressbar: Show ``tqdm`` progress bars.
        batch_size_fn: Number of data points of a batch input (needed for dict inputs).
        process_group: A ``torch.distributed`` process group: ``data`` is this rank's shard
            and the report is that of the union of all shards, identical on every rank.

    Returns:
        A JSON-ready dict with the keys ``matrix``, ``num_parameters``, ``num_data``,
        ``eigenvalues``, ``trace``, ``density`` and ``layers``.

    Raises:
        ValueError: For an unknown matrix, ``k`` not in ``[1, D)``, ``num_samples``,
            ``lanczos_steps`` or ``num_points`` below 2, a non-integer count or ``seed``, a
            ``batch_size_fn`` that is not callable, a ``model`` that is not an ``nn.Module``
            or has no trainable parameters.
        ProblemError: If building the operator fails on the model, loss and data (e.g.
            mismatched shapes, a non-deterministic model, a loss the matrix does not support).
    """
    groups, dim = _checked_layer_groups(
        model, matrix, k, num_samples, lanczos_steps, num_points, seed, batch_size_fn
    )
    build = _OperatorFactory(matrix, model, loss_func, data, seed, batch_size_fn, process_group)
    stages = _StageBar(f"curvlinops report ({matrix})", 4, progressbar)
    with stages.stage("operator and determinism check"):
        A = build.full([p for _, group in groups for p in group])
        generator = torch.Generator(A.device).manual_seed(seed)
    with stages.stage(f"top-{k} eigenvalues"):
        eigenvalues = _top_eigenvalues(A, k, generator, progressbar)
    with stages.stage(f"trace ({num_samples} vectors)"):
        VAV = _hutchinson_terms(A, dim, num_samples, generator)
        trace = _mean_and_interval(VAV.sum(0))
    steps = min(lanczos_steps, dim)
    with stages.stage(f"spectral density ({steps} Lanczos steps)"):
        density = _spectral_density(
            A, matrix, eigenvalues, steps, num_points, generator, progressbar
        )
        A.clear_cache()
    stages.close()
    layers = _layer_table(model, groups, build, A, VAV, trace, generator, progressbar)
    return {
        "matrix": matrix,
        "num_parameters": dim,
        "num_data": A._N_data,
        "seed": seed,
        "eigenvalues": [float(e) for e in eigenvalues],
        "trace": {**trace, "num_samples": num_samples, "method": "Hutchinson, Rademacher"},
        "density": density,
        "layers": layers,
    }


def _checked_layer_groups(
    model: nn.Module,
    matrix: str,
    k: int,
    num_samples: int,
    lanczos_steps: int,
    num_points: int,
    seed: int,
    batch_size_fn: Optional[Callable],
) -> Tuple[List[Tuple[str, List[nn.Parameter]]], int]:
    """Check the report's arguments before any pass over the data.

    Returns:
        The layer groups (:func:`layer_groups`) and the number of their parameters.

    Checked first, so that a typo costs nothing.

    Raises:
        ValueError: Naming the first argument outside its range.
    """
    if matrix not in MATRICES:
        raise ValueError(f"unknown matrix {matrix!r}; choose one of {', '.join(MATRICES)}.")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}.")
    check_count("k", k, 1, name_value=True)
    check_count("num_samples", num_samples, 2, " for an interval", name_value=True)
    check_count("lanczos_steps", lanczos_steps, 2, " for a density", name_value=True)
    check_count("num_points", num_points, 2, " for a density grid", name_value=True)
    check_count("seed", seed, None)
    if batch_size_fn is not None and not callable(batch_size_fn):
        raise ValueError(
            "batch_size_fn must be a callable X -> int or None, got "
            f"{type(batch_size_fn).__name__}."
        )
    groups = layer_groups(model)
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad=True).")
    dim = sum(p.numel() for _, group in groups for p in group)
    if not 1 <= k < dim:
        raise ValueError(f"k={k} must be at least 1 and less than the dimension {dim}.")
    return groups, dim


class _StageBar:
    """The report's outer progress bar: one step per stage, labelled while the stage runs."""

    def __init__(self, description: str, num_stages: int, progressbar: bool):
        """Open the bar (shown only if ``progressbar``)."""
        self._bar = tqdm(total=num_stages, desc=description, disable=not progressbar)

    @contextmanager
    def stage(self, label: str):
        """Label the bar while the ``with`` block runs, then advance it; close it on errors."""
        self._bar.set_postfix_str(label)
        try:
            yield
        except BaseException:
            self._bar.close()
            raise
        self._bar.update()

    def close(self):
        """Close the bar after the last stage."""
        self._bar.close()


class _OperatorFactory:
    """Builds the requested matrix for all parameters, or for one layer's parameters.

    For ``"mc_fisher"`` every operator gets ``seed`` as its sampling seed: the blocks then
    draw the same samples as the full matrix, so they are its diagonal blocks.
    """

    def __init__(self, matrix, model, loss_func, data, seed, batch_size_fn, process_group=None):
        """Store the problem and the keyword arguments every operator gets."""
        self.matrix, self.cls = matrix, MATRICES[matrix]
        self.model, self.loss_func, self.data = model, loss_func, data
        self.kwargs = {} if batch_size_fn is None else {"batch_size_fn": batch_size_fn}
        if process_group is not None:  # every operator is the union's (see docs/scaling.rst)
            self.kwargs["process_group"] = process_group
        if matrix == "mc_fisher":
            self.kwargs["seed"] = seed

    def full(self, params: List[nn.Parameter]) -> PyTorchLinearOperator:
        """The matrix of all ``params`` with the determinism check, its products cached.

        The first passes over the data run the user's model and loss: a failure there is a
        property of the problem (wrong shapes, dropout left on, unsupported loss), reported
        as a :class:`ProblemError`.
        """
        try:
            A = self.cls(self.model, self.loss_func, params, self.data, **self.kwargs)
        except (ValueError, RuntimeError, NotImplementedError, TypeError) as error:
            raise ProblemError(
                f"the {self.matrix} cannot be built for this model, loss and data: "
                f"{type(error).__name__}: {error}"
            ) from error
        return A.cache()

    def block(self, group: List[nn.Parameter], num_data: int) -> PyTorchLinearOperator:
        """The diagonal block of one layer's parameters, its products cached.

        The full matrix has passed the determinism check and measured the data already.
        """
        block = self.cls(
            self.model,
            self.loss_func,
            group,
            self.data,
            check_deterministic=False,
            num_data=num_data,
            **self.kwargs,
        )
        return block.cache()


def _top_eigenvalues(
    A: PyTorchLinearOperator, k: int, generator: torch.Generator, progressbar: bool
) -> Tensor:
    """The ``k`` largest eigenvalues, descending (thick-restart Lanczos)."""
    eigenvalues = eigsh(
        A, k=k, which="LA", generator=generator, return_eigenvectors=False, progressbar=progressbar
    )
    return eigenvalues.flip(0)


def _hutchinson_terms(
    A: PyTorchLinearOperator, dim: int, num_samples: int, generator: torch.Generator
) -> Tensor:
    """``v_i * (A v_i)`` for ``num_samples`` Rademacher vectors, as columns ``[D, n]``.

    One multi-column product. A column's sum is one term of the trace estimate; the sum of a
    layer's rows is one term of that layer's block trace.
    """
    V = rademacher_columns(dim, num_samples, A.device, A.dtype, generator=generator)
    return V * (A @ V)


def _spectral_density(
    A: PyTorchLinearOperator,
    matrix: str,
    eigenvalues: Tensor,
    steps: int,
    num_points: int,
    generator: torch.Generator,
    progressbar: bool,
) -> dict:
    """The smoothed spectral density from one Lanczos run of ``steps`` products.

    Positive semi-definite matrices get the density of ``log(|lambda| + epsilon)`` on
    ``[0, top]``; the Hessian a linear grid from ``min(lambda_min, 0)``. The top eigenvalue
    widens the interval where the short Lanczos run fell short of it.
    """
    with tqdm(total=steps, desc="Lanczos (products)", disable=not progressbar) as bar:
        run = fast_lanczos(_CountingOperator(A, bar), steps, generator=generator)
    ritz_values = run[0]
    log_scale = matrix in PSD_MATRICES
    if log_scale:
        top = max(float(ritz_values.abs().max()), float(eigenvalues[0]))
        grid, density = lanczos_approximate_log_spectrum_from_iter(
            run, (0.0, top), num_points, kappa=1.04, margin=0.05, epsilon=LOG_EPSILON
        )
    else:
        low = min(float(ritz_values.min()), 0.0)
        high = max(float(ritz_values.max()), float(eigenvalues[0]))
        grid, density = lanczos_approximate_spectrum_from_iter(
            run, (low, high), num_points, kappa=3.0, margin=0.05
        )
    return {
        "scale": "log" if log_scale else "linear",
        "grid": grid.tolist(),
        "density": density.tolist(),
        "lanczos_steps": steps,
        "epsilon": LOG_EPSILON if log_scale else None,
    }


def _layer_table(
    model: nn.Module,
    groups: List[Tuple[str, List[nn.Parameter]]],
    build: "_OperatorFactory",
    A: PyTorchLinearOperator,
    VAV: Tensor,
    trace: dict,
    generator: torch.Generator,
    progressbar: bool,
) -> List[dict]:
    """One row per layer: block trace (from the trace's products), share, top eigenvalue.

    The block trace costs nothing extra: ``E[v_l^T (A v)_l] = tr A_ll``. The top eigenvalue
    is that of the layer's block, an operator on the layer's parameters only (a ``1 x 1``
    block is its own eigenvalue).
    """
    layers, start = [], 0
    for name, group in tqdm(groups, desc="per-layer top eigenvalues", disable=not progressbar):
        size = sum(p.numel() for p in group)
        layer_trace = _mean_and_interval(VAV[start : start + size].sum(0))
        start += size
        block = build.block(group, A._N_data)
        top_eigenvalue = (
            eigsh(block, k=1, generator=generator, return_eigenvectors=False)[0]
            if size > 1
            else (block @ torch.ones(1, dtype=A.dtype, device=A.device))[0]
        )
        module = model if name == "(root)" else model.get_submodule(name)
        share = layer_trace["estimate"] / trace["estimate"] if trace["estimate"] else None
        layers.append(
            {
                "name": name,
                "module": type(module).__name__,
                "num_parameters": size,
                "trace": layer_trace["estimate"],
                "trace_ci95": layer_trace["ci95"],
                "share": share,
                "top_eigenvalue": float(top_eigenvalue),
            }
        )
    return layers


class _CountingOperator(_CompositeLinearOperator):
    """``A`` itself, advancing a progress bar at every product (Lanczos has no bar of its own)."""

    SELF_ADJOINT = True

    def __init__(self, A: PyTorchLinearOperator, bar: tqdm):
        super().__init__(A._in_shape, A._out_shape)
        self._A, self._bar = A, bar

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        result = self._A._matmat(X)
        self._bar.update()
        return result


def _mean_and_interval(terms: Tensor) -> dict:
    """Mean of the Hutchinson terms and its 95% normal-approximation confidence interval."""
    mean = float(terms.mean())
    half_width = 1.96 * float(terms.std()) / math.sqrt(terms.numel())
    return {"estimate": mean, "ci95": [mean - half_width, mean + half_width]}
