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
import numbers
from collections.abc import Callable, Iterable
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

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
) -> dict:
    """Compute the curvature report (see the module docstring).

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
    if matrix not in MATRICES:
        raise ValueError(f"unknown matrix {matrix!r}; choose one of {', '.join(MATRICES)}.")
    # Checked before any pass over the data, so a typo costs nothing.
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}.")
    _check_integer("k", k, 1)
    _check_integer("num_samples", num_samples, 2, "for an interval")
    _check_integer("lanczos_steps", lanczos_steps, 2, "for a density")
    _check_integer("num_points", num_points, 2, "for a density grid")
    _check_integer("seed", seed, None)
    if batch_size_fn is not None and not callable(batch_size_fn):
        raise ValueError(
            "batch_size_fn must be a callable X -> int or None, got "
            f"{type(batch_size_fn).__name__}."
        )
    groups = layer_groups(model)
    params = [p for _, group in groups for p in group]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True).")
    dim = sum(p.numel() for p in params)
    if not 1 <= k < dim:
        raise ValueError(f"k={k} must be at least 1 and less than the dimension {dim}.")
    if num_samples < 2:
        raise ValueError(f"num_samples={num_samples} must be at least 2 for an interval.")
    kwargs = {} if batch_size_fn is None else {"batch_size_fn": batch_size_fn}
    if matrix == "mc_fisher":
        # The blocks then draw the same samples as the full matrix, so they are its blocks.
        kwargs["seed"] = seed
    cls = MATRICES[matrix]
    stages = tqdm(total=4, desc=f"curvlinops report ({matrix})", disable=not progressbar)
    stages.set_postfix_str("operator and determinism check")
    try:
        # The first passes over the data run the user's model and loss: a failure there is
        # a property of the problem (wrong shapes, dropout left on, unsupported loss).
        A = cls(model, loss_func, params, data, **kwargs)
    except (ValueError, RuntimeError, NotImplementedError, TypeError) as error:
        stages.close()
        raise ProblemError(
            f"the {matrix} cannot be built for this model, loss and data: "
            f"{type(error).__name__}: {error}"
        ) from error
    A.cache()
    generator = torch.Generator(A.device).manual_seed(seed)
    stages.update()

    stages.set_postfix_str(f"top-{k} eigenvalues")
    eigenvalues = eigsh(
        A, k=k, which="LA", generator=generator, return_eigenvectors=False, progressbar=progressbar
    )
    eigenvalues = eigenvalues.flip(0)  # descending
    stages.update()

    stages.set_postfix_str(f"trace ({num_samples} vectors)")
    V = rademacher_columns(dim, num_samples, A.device, A.dtype, generator=generator)
    VAV = V * (A @ V)  # [D, n]: one multi-column product
    terms = VAV.sum(0)
    trace = _mean_and_interval(terms)
    stages.update()

    steps = min(lanczos_steps, dim)
    stages.set_postfix_str(f"spectral density ({steps} Lanczos steps)")
    with tqdm(total=steps, desc="Lanczos (products)", disable=not progressbar) as bar:
        ritz_values, ritz_vectors = fast_lanczos(
            _CountingOperator(A, bar), steps, generator=generator
        )
    if matrix in PSD_MATRICES:
        top = max(float(ritz_values.abs().max()), float(eigenvalues[0]))
        grid, density = lanczos_approximate_log_spectrum_from_iter(
            (ritz_values, ritz_vectors),
            (0.0, top),
            num_points,
            kappa=1.04,
            margin=0.05,
            epsilon=LOG_EPSILON,
        )
    else:
        low = min(float(ritz_values.min()), 0.0)
        high = max(float(ritz_values.max()), float(eigenvalues[0]))
        grid, density = lanczos_approximate_spectrum_from_iter(
            (ritz_values, ritz_vectors), (low, high), num_points, kappa=3.0, margin=0.05
        )
    A.clear_cache()
    stages.update()
    stages.close()

    layers = []
    start = 0
    for name, group in tqdm(groups, desc="per-layer top eigenvalues", disable=not progressbar):
        size = sum(p.numel() for p in group)
        layer_trace = _mean_and_interval(VAV[start : start + size].sum(0))
        start += size
        block = cls(
            model, loss_func, group, data, check_deterministic=False, num_data=A._N_data, **kwargs
        ).cache()
        top_eigenvalue = (
            eigsh(block, k=1, generator=generator, return_eigenvectors=False)[0]
            if size > 1
            else (block @ torch.ones(1, dtype=A.dtype, device=A.device))[0]
        )
        module = model if name == "(root)" else model.get_submodule(name)
        layers.append(
            {
                "name": name,
                "module": type(module).__name__,
                "num_parameters": size,
                "trace": layer_trace["estimate"],
                "trace_ci95": layer_trace["ci95"],
                "share": layer_trace["estimate"] / trace["estimate"] if trace["estimate"] else None,
                "top_eigenvalue": float(top_eigenvalue),
            }
        )
    return {
        "matrix": matrix,
        "num_parameters": dim,
        "num_data": A._N_data,
        "seed": seed,
        "eigenvalues": [float(e) for e in eigenvalues],
        "trace": {**trace, "num_samples": num_samples, "method": "Hutchinson, Rademacher"},
        "density": {
            "scale": "log" if matrix in PSD_MATRICES else "linear",
            "grid": grid.tolist(),
            "density": density.tolist(),
            "lanczos_steps": steps,
            "epsilon": LOG_EPSILON if matrix in PSD_MATRICES else None,
        },
        "layers": layers,
    }


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


def _check_integer(name: str, value, minimum: Optional[int], why: str = ""):
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an ``int`` >= ``minimum``.

    ``bool`` is refused although it is an ``int`` subclass: ``k=True`` is a mistake, not 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{name} must be an integer, got {value!r} ({type(value).__name__}); pass e.g. "
            f"{name}=int(...)."
        )
    if minimum is not None and value < minimum:
        reason = f" {why}" if why else ""
        raise ValueError(f"{name}={value} must be at least {minimum}{reason}.")


def _mean_and_interval(terms: Tensor) -> dict:
    """Mean of the Hutchinson terms and its 95% normal-approximation confidence interval."""
    mean = float(terms.mean())
    half_width = 1.96 * float(terms.std()) / math.sqrt(terms.numel())
    return {"estimate": mean, "ci95": [mean - half_width, mean + half_width]}
