"""The ``curvlinops`` command (also ``python -m curvlinops``).

``curvlinops report`` prints a curvature report of a model (see :mod:`curvlinops.report`):
top eigenvalues, a trace estimate with its 95% confidence interval, per-layer traces, shares
and top eigenvalues, and optionally writes the numbers as JSON and the spectral density as a
PNG. Without ``--problem`` it reports on a built-in problem (a small MLP trained in a few
seconds on a synthetic data set shipped in the package).

Errors in the input (a problem that cannot be imported or returns the wrong thing, an unknown
matrix, ``k`` out of range, an unwritable output file, ``--plot`` without matplotlib) are
reported in one line on stderr with exit status 2.
"""

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import List, Optional

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
            "(Hutchinson with Rademacher vectors; 95% confidence interval mean +- 1.96 "
            "std/sqrt(n), a normal approximation), a per-layer table (trace of the layer's "
            "diagonal block from the same products, its share of the total, and the block's "
            "top eigenvalue) and the spectral density (Lanczos, --plot)."
        ),
    )
    report.add_argument(
        "--problem",
        metavar="MODULE:FUNCTION",
        help="a function returning (model, loss_func, data); MODULE is an importable module "
        "or a path to a .py file. Default: a small MLP trained on built-in synthetic data",
    )
    report.add_argument("--matrix", choices=list(MATRICES), default="ggn", help="default: ggn")
    report.add_argument("--k", type=int, default=5, help="number of top eigenvalues (default 5)")
    report.add_argument(
        "--num-samples", type=int, default=64, help="Rademacher vectors for the trace (default 64)"
    )
    report.add_argument(
        "--lanczos-steps", type=int, default=64, help="Lanczos steps for the density (default 64)"
    )
    report.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    report.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    report.add_argument("--plot", metavar="FILE.png", help="plot the spectral density (matplotlib)")
    report.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def load_problem(spec: Optional[str]):
    """Import and call the problem function; validate ``(model, loss_func, data)``."""
    if spec is None:
        from curvlinops._default_problem import default_problem

        return default_problem()
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise UsageError(f"--problem {spec!r} must have the form MODULE:FUNCTION.")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"--problem: file {module_name!r} does not exist.")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
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


def validate_problem(problem, function_name: str = "the problem function"):
    """Check that ``problem`` is ``(model, loss_func, data)`` usable by the report."""
    if not isinstance(problem, tuple) or len(problem) != 3:
        raise UsageError(
            f"{function_name}() must return a tuple (model, loss_func, data), got "
            f"{type(problem).__name__}."
        )
    model, loss_func, data = problem
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"{function_name}(): model must be an nn.Module, got {type(model).__name__}."
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"{function_name}(): the model has no trainable parameters.")
    if getattr(loss_func, "reduction", None) not in ("mean", "sum"):
        raise UsageError(
            f"{function_name}(): loss_func must be a loss module with reduction 'mean' or "
            f"'sum', got {type(loss_func).__name__}."
        )
    if not isinstance(data, Iterable) or next(iter(data), None) is None:
        raise UsageError(f"{function_name}(): data must be a non-empty iterable of (X, y).")
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
    """Write the spectral density with the top eigenvalues marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    density = report["density"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(density["grid"], density["density"], color="tab:blue", label="density (Lanczos)")
    for i, e in enumerate(report["eigenvalues"]):
        ax.axvline(
            e,
            color="tab:red",
            linewidth=0.8,
            alpha=0.7,
            label="top eigenvalues" if i == 0 else None,
        )
    if density["scale"] == "log":
        ax.set_xscale("log")
        ax.set_xlabel(f"eigenvalue (|lambda| + {density['epsilon']:g}, log scale)")
    else:
        ax.set_xlabel("eigenvalue")
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(density["density"]) * 1e-8)  # Gaussian tails would dominate the axis
    ax.set_ylabel("density")
    ax.set_title(
        f"Spectral density of the {report['matrix']} ({report['num_parameters']} parameters)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_report(args: argparse.Namespace) -> int:
    """The ``report`` command."""
    from curvlinops.report import curvature_report

    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError(
                "--plot needs matplotlib, which is not installed: pip install curvlinops[plot]"
            ) from None
    if args.num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2, got {args.num_samples}.")
    if args.lanczos_steps < 2:
        raise UsageError(f"--lanczos-steps must be at least 2, got {args.lanczos_steps}.")
    model, loss_func, data = load_problem(args.problem)
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not 1 <= args.k < dim:
        raise UsageError(f"--k {args.k} must be at least 1 and less than the dimension {dim}.")
    report = curvature_report(
        model,
        loss_func,
        data,
        matrix=args.matrix,
        k=args.k,
        num_samples=args.num_samples,
        lanczos_steps=args.lanczos_steps,
        seed=args.seed,
        progressbar=not args.no_progress,
    )
    print(format_report(report))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nnumbers written to {args.json}")
    if args.plot is not None:
        plot_density(report, args.plot)
        print(f"spectral density plotted to {args.plot}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``curvlinops`` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.command != "report":
            raise UsageError("choose a command: curvlinops report [--help]")
        return run_report(args)
    except UsageError as error:
        print(f"{PROG} report: error: {error}", file=sys.stderr)
        return 2
