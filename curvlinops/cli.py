"""The ``curvlinops`` command (also ``python -m curvlinops``).

``curvlinops report`` prints a curvature report of a model (see :mod:`curvlinops.report`):
top eigenvalues, a trace estimate with its 95% confidence interval, per-layer traces, shares
and top eigenvalues, and optionally writes the numbers as JSON and the spectral density as a
PNG. Without ``--problem`` it reports on a built-in problem (a small MLP trained on a
synthetic data set shipped in the package).

Errors in the input (a problem that cannot be imported or returns the wrong thing, an unknown
matrix, ``k`` out of range, an unwritable output file, ``--plot`` without matplotlib) are
reported in one line on stderr with exit status 2.
"""

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

PROG = "curvlinops"


class UsageError(Exception):
    """A problem with the command's input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``curvlinops report ...``)."""
    from curvlinops.report import MATRICES

    parser = _Parser(prog=PROG, description="Curvature of neural networks from the command line.")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    report = commands.add_parser(
        "report",
        help="top eigenvalues, trace, spectral density and per-layer table of a model",
        description=(
            "Report a model's curvature: the top-k eigenvalues (Lanczos), the trace "
            "(Hutchinson's estimator with Rademacher vectors, all multiplied in one "
            "multi-column product; 95% confidence interval mean +- 1.96 std/sqrt(n), a normal "
            "approximation), a per-layer table (a layer is the parameters of one module: the "
            "trace of its diagonal block from the same products, its share of the total trace, "
            "and the block's top eigenvalue) and the spectral density (one Lanczos run). "
            "Progress bars go to stderr, the report to stdout."
        ),
        epilog=(
            "Input errors (a problem that cannot be imported or returns the wrong thing, k out "
            "of range, an unwritable output file, --plot without matplotlib) print one line "
            "to stderr and exit with status 2."
        ),
    )
    report.add_argument(
        "--problem",
        metavar="MODULE:FUNCTION",
        help="a function without arguments returning (model, loss_func, data): an nn.Module, "
        "a loss module with reduction 'mean' or 'sum', and a list or DataLoader of (X, y) "
        "batches. MODULE is an importable module (the working directory is on the path) or "
        "a path to a .py file. Default: a 10-32-32-4 tanh MLP (float64) trained for 200 Adam "
        "steps on a synthetic 4-class set of 1024 points shipped with the package",
    )
    report.add_argument(
        "--matrix",
        choices=list(MATRICES),
        default="ggn",
        help="the curvature matrix: Hessian, generalized Gauss-Newton, empirical Fisher or "
        "Monte-Carlo Fisher (one sample per loss term). Default: %(default)s",
    )
    report.add_argument(
        "--k", type=int, default=5, help="number of top eigenvalues (default %(default)s)"
    )
    report.add_argument(
        "--num-samples",
        type=int,
        default=64,
        help="Rademacher vectors of the trace estimate, at least 2 (default %(default)s)",
    )
    report.add_argument(
        "--lanczos-steps",
        type=int,
        default=64,
        help="Lanczos steps of the spectral density, capped at the dimension (default %(default)s)",
    )
    report.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of every random draw (Lanczos start vectors, trace vectors, Monte-Carlo "
        "samples), so that a report repeats exactly (default %(default)s)",
    )
    report.add_argument("--json", metavar="FILE", help="also write all numbers to FILE as JSON")
    report.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the spectral density with the top eigenvalues marked (log axis for the "
        "positive semi-definite matrices); needs matplotlib: pip install curvlinops[plot]",
    )
    report.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def load_problem(spec: Optional[str]):
    """Import and call the problem function and validate what it returns.

    Args:
        spec: ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION``; ``None`` for the built-in
            problem.

    Returns:
        ``(model, loss_func, data)``.

    Raises:
        UsageError: If the function cannot be found or called, or returns the wrong thing.
    """
    if spec is None:
        from curvlinops._default_problem import default_problem

        return default_problem()
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise UsageError(
            f"--problem {spec!r} must have the form MODULE:FUNCTION or path/to/file.py:FUNCTION."
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"--problem: file {module_name!r} does not exist.")
            # like running the file as a script: it may import modules next to it
            _prepend_to_sys_path(path.resolve().parent)
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            _prepend_to_sys_path(Path.cwd())
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as error:  # the user's module: any failure is reported in one line
        raise UsageError(
            f"--problem: cannot import {module_name!r}: {type(error).__name__}: {error}"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"--problem: {module_name!r} has no function {function_name!r}.")
    try:
        problem = function()
    except Exception as error:
        raise UsageError(
            f"--problem: {function_name}() raised {type(error).__name__}: {error}"
        ) from None
    return validate_problem(problem, function_name)


def _prepend_to_sys_path(directory: Path):
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))


def validate_problem(problem, function_name: str = "the problem function"):
    """Check that ``problem`` is a ``(model, loss_func, data)`` the report can use.

    Runs the model and the loss on the first batch, so that a mismatch shows here with the
    problem function's name rather than deep inside the computation.

    Args:
        problem: What the problem function returned.
        function_name: Its name, for the messages.

    Returns:
        ``(model, loss_func, data)``.

    Raises:
        UsageError: Naming what is wrong.
    """
    where = f"{function_name}()"
    if not isinstance(problem, tuple) or len(problem) != 3:
        got = f"a tuple of length {len(problem)}" if isinstance(problem, tuple) else None
        raise UsageError(
            f"{where} must return a tuple (model, loss_func, data), got "
            f"{got or type(problem).__name__}."
        )
    model, loss_func, data = problem
    if not isinstance(model, nn.Module):
        raise UsageError(f"{where}: model must be an nn.Module, got {type(model).__name__}.")
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(
            f"{where}: the model has no trainable parameters; the report needs parameters "
            "with requires_grad=True."
        )
    if getattr(loss_func, "reduction", None) not in ("mean", "sum"):
        raise UsageError(
            f"{where}: loss_func must be a loss module with reduction 'mean' or 'sum' (e.g. "
            f"nn.CrossEntropyLoss()), got {type(loss_func).__name__} with reduction "
            f"{getattr(loss_func, 'reduction', None)!r}."
        )
    if not isinstance(data, Iterable):
        raise UsageError(
            f"{where}: data must be a list or DataLoader of (X, y) batches, got "
            f"{type(data).__name__}."
        )
    if iter(data) is data:
        raise UsageError(
            f"{where}: data is a one-pass iterator ({type(data).__name__}), but the report "
            "passes over the data many times; return a list or a DataLoader."
        )
    batch = next(iter(data), None)
    if batch is None:
        raise UsageError(f"{where}: data is empty; it must hold at least one (X, y) batch.")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise UsageError(
            f"{where}: every batch of data must be a pair (X, y), the first one is a "
            f"{type(batch).__name__}."
        )
    X, y = batch
    try:
        with torch.no_grad():
            loss = loss_func(model(X), y)
    except Exception as error:
        raise UsageError(
            f"{where}: loss_func(model(X), y) fails on the first batch: "
            f"{type(error).__name__}: {error}"
        ) from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise UsageError(f"{where}: loss_func(model(X), y) must return a scalar tensor.")
    return model, loss_func, data


def check_writable(path: Optional[str], option: str):
    """Fail early, before the long computation, if ``path`` cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option} {path!r} is a directory; give a file name.")
    try:
        existed = target.exists()
        with open(target, "a"):
            pass
        if not existed:
            target.unlink()
    except OSError as error:
        raise UsageError(f"{option}: cannot write {path!r}: {error.strerror}.") from None


def format_report(report: dict) -> str:
    """The report as a readable text table."""
    trace = report["trace"]
    low, high = trace["ci95"]
    lines = [
        f"curvlinops report: {report['matrix']} of a model with {report['num_parameters']} "
        f"parameters on {report['num_data']} data points (seed {report['seed']})",
        "",
        f"top {len(report['eigenvalues'])} eigenvalues: "
        + ", ".join(f"{e:.6g}" for e in report["eigenvalues"]),
        f"trace: {trace['estimate']:.6g}  (95% CI [{low:.6g}, {high:.6g}]; Hutchinson, "
        f"{trace['num_samples']} Rademacher vectors, mean +- 1.96 std/sqrt(n))",
        "",
        f"{'layer':24s} {'params':>8s} {'trace':>12s} {'share':>7s} {'top eigenvalue':>15s}",
        "-" * 70,
    ]
    for layer in report["layers"]:
        share = "n/a" if layer["share"] is None else f"{100 * layer['share']:.1f}%"
        label = f"{layer['name']} ({layer['module']})"
        lines.append(
            f"{label:24s} {layer['num_parameters']:8d} {layer['trace']:12.6g} "
            f"{share:>7s} {layer['top_eigenvalue']:15.6g}"
        )
    return "\n".join(lines)


def plot_density(report: dict, path: str):
    """Write the spectral density to a PNG, with the top eigenvalues marked.

    For the positive semi-definite matrices the density is over a log axis and shown as the
    fraction of eigenvalues per decade, so areas on the plot are fractions of the spectrum;
    for the Hessian it is the density per unit eigenvalue on a linear axis.

    Args:
        report: The output of :func:`curvlinops.report.curvature_report`.
        path: The PNG file.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and none is available in scripts or CI
    import matplotlib.pyplot as plt

    density = report["density"]
    grid, values = density["grid"], density["density"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if density["scale"] == "log":
        values = [v * x * math.log(10) for x, v in zip(grid, values)]
        ax.set_xscale("log")
        ax.set_xlabel(rf"eigenvalue $|\lambda|$ + {density['epsilon']:g} (log scale)")
        ax.set_ylabel("fraction of eigenvalues per decade")
    else:
        ax.set_xlabel(r"eigenvalue $\lambda$")
        ax.set_ylabel("density of eigenvalues")
    ax.plot(
        grid, values, color="tab:blue", label=f"density ({density['lanczos_steps']} Lanczos steps)"
    )
    for i, e in enumerate(report["eigenvalues"]):
        ax.axvline(
            e,
            color="tab:red",
            linewidth=0.8,
            alpha=0.7,
            label=f"top {len(report['eigenvalues'])} eigenvalues" if i == 0 else None,
        )
    ax.set_yscale("log")
    # The Gaussian tails fall off to 1e-300; without a floor they would take most of the axis.
    ax.set_ylim(bottom=max(values) * 1e-8, top=max(values) * 3)
    names = {"hessian": "Hessian", "ggn": "GGN", "ef": "empirical Fisher", "mc_fisher": "MC Fisher"}
    ax.set_title(
        f"Spectral density of the {names.get(report['matrix'], report['matrix'])} "
        f"({report['num_parameters']} parameters)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_report(args: argparse.Namespace) -> int:
    """Run the ``report`` command.

    Args:
        args: The parsed command line.

    Returns:
        The exit status 0.

    Raises:
        UsageError: For bad input, before the long computation where possible.
    """
    from curvlinops.report import ProblemError, curvature_report

    if args.num_samples < 2:
        raise UsageError(
            f"--num-samples must be at least 2 for an interval, got {args.num_samples}."
        )
    if args.lanczos_steps < 2:
        raise UsageError(f"--lanczos-steps must be at least 2, got {args.lanczos_steps}.")
    if args.k < 1:
        raise UsageError(f"--k must be at least 1, got {args.k}.")
    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError(
                "--plot needs matplotlib, which is not installed: pip install curvlinops[plot] "
                "(or pip install matplotlib), or leave out --plot."
            ) from None
    model, loss_func, data = load_problem(args.problem)
    group, started_here = _torchrun_group()
    try:
        if group is not None:
            data = _shard(data, group)
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if args.k >= dim:
            raise UsageError(
                f"--k {args.k} must be less than the dimension {dim} (the model's number of "
                "trainable parameters)."
            )
        try:
            report = curvature_report(
                model,
                loss_func,
                data,
                matrix=args.matrix,
                k=args.k,
                num_samples=args.num_samples,
                lanczos_steps=args.lanczos_steps,
                seed=args.seed,
                progressbar=not args.no_progress and _rank(group) == 0,
                process_group=group,
            )
        except ProblemError as error:
            raise UsageError(str(error)) from None
        if _rank(group) != 0:  # every rank holds the same report; rank 0 prints and writes it
            return 0
        print(format_report(report))
        if args.json is not None:
            Path(args.json).write_text(json.dumps(report, indent=1))
            print(f"\nnumbers written to {args.json}")
        if args.plot is not None:
            plot_density(report, args.plot)
            print(f"spectral density plotted to {args.plot}")
        return 0
    finally:
        # a process group left alive at interpreter exit can abort in gloo's threads
        if started_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _torchrun_group() -> Tuple[Optional[object], bool]:
    """The process group under ``torchrun`` (initialised here if needed), else ``None``.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and the rendezvous variables; the group uses
    NCCL when CUDA is available and gloo on the CPU.

    Returns:
        The group (or ``None`` outside ``torchrun``) and whether it was initialised here (then
        the caller destroys it when done).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return None, False
    import torch.distributed as dist

    started_here = not dist.is_initialized()
    if started_here:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.group.WORLD, started_here


def _rank(group) -> int:
    from curvlinops._distributed import rank

    return rank(group)


def _shard(data: Iterable, group) -> list:
    """This rank's batches: every ``world_size``-th one, starting at the rank."""
    from curvlinops._distributed import rank, world_size

    batches = list(data)
    if len(batches) < world_size(group):
        raise UsageError(
            f"the problem has {len(batches)} batches, fewer than the {world_size(group)} "
            "processes: use smaller batches or fewer processes (--nproc-per-node)."
        )
    return batches[rank(group) :: world_size(group)]


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``curvlinops`` command.

    Args:
        argv: The arguments after the program name; ``sys.argv[1:]`` if ``None``.

    Returns:
        The exit status: 0 on success, 2 for bad input (after one line on stderr).
    """
    try:
        args = build_parser().parse_args(argv)
        if args.command != "report":
            raise UsageError("choose a command: curvlinops report [--help]")
        return run_report(args)
    except BrokenPipeError:
        # the reader of stdout (e.g. `| head`) left early: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UsageError as error:
        # one line, even when a user's exception message spans several
        message = " ".join(str(error).split())
        print(f"{PROG} report: error: {message}", file=sys.stderr)
        return 2
