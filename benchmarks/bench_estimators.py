"""Cost of the randomised estimators and the Lanczos spectrum relative to the products they need.

For the MLP, CNN and transformer of ``bench_products.py`` (float32, one thread, one batch):
Hutchinson trace,
Hutch++ and XTrace with 16/15/16 products, the Hutchinson and XDiag diagonals, and a Lanczos
spectral density with 16 steps (boundaries given, so no ARPACK calls), each against the plain
products it needs (one multi-column product of a block in the estimators' columns-first layout,
or 16 single-column ones for Lanczos), as medians of
interleaved repeats, also as ratios to one loss + gradient. Target of the benchmark issue: within
1.1x of the products. The draws of the Hutchinson trace's 16 Rademacher columns alone are
timed against the same product (reported: the part of an estimator's overhead that reproducing
3.0.1's numbers fixes). Finally, a 50-step Lanczos spectrum of the GGN and of the Hessian with the
product cache (``A.cache()``) against the same run without it.

Usage: ``python benchmarks/bench_estimators.py [--quick]``; writes
``benchmarks/results/estimators.json``.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_products import CLASSIFIERS, make_transformer, time_round_robin  # noqa: E402

import curvlinops  # noqa: E402
from curvlinops import (  # noqa: E402
    GGNLinearOperator,
    HessianLinearOperator,
    hutchinson_diag,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_approximate_spectrum,
    xdiag,
    xtrace,
)
from curvlinops.sampling import rademacher_columns  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "estimators.json"
PROBLEMS = {**CLASSIFIERS, "transformer": make_transformer}
LANCZOS_STEPS = 50


def run(name: str, repeats: int, cached_kinds=("ggn", "hessian")) -> dict:
    model, X, y = PROBLEMS[name]()
    params = list(model.parameters())
    op = GGNLinearOperator(
        model, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False
    )
    D = op.shape[0]
    # Blocks in the layout the estimators allocate (``[K, D]`` contiguous, used as ``[D, K]``),
    # which the products take without a copy.
    V16, V15, V8 = (torch.randn(K, D).T for K in (16, 15, 8))
    v = torch.randn(D)
    pairs = {
        "hutchinson_trace (16)": (lambda: hutchinson_trace(op, 16), lambda: op @ V16),
        "hutchinson_diag (16)": (lambda: hutchinson_diag(op, 16), lambda: op @ V16),
        "hutchpp_trace (15)": (
            lambda: hutchpp_trace(op, 15),
            lambda: (op @ V15[:, :5], op @ V15[:, 5:]),
        ),
        "xtrace (16)": (lambda: xtrace(op, 16), lambda: (op @ V8, op @ V8)),
        "xdiag (16)": (lambda: xdiag(op, 16), lambda: (op @ V8, op @ V8)),
        # not an estimator: the 16 Rademacher columns that hutchinson_trace (16) draws (the
        # numbers of 3.0.1's column-by-column draws: float64 uniforms from the generator)
        "rademacher draws (16)": (
            lambda: rademacher_columns(D, 16, "cpu", torch.float32),
            lambda: op @ V16,
        ),
        "lanczos spectrum (16 steps)": (
            lambda: lanczos_approximate_spectrum(op, 16, num_points=256, boundaries=(0.0, 10.0)),
            lambda: [op @ v for _ in range(16)],
        ),
    }
    # The product cache on a 50-step Lanczos run: the same run with A.cache() vs. without.
    classes = {"ggn": GGNLinearOperator, "hessian": HessianLinearOperator}
    for kind, cls in ((k, classes[k]) for k in cached_kinds):
        plain = cls(model, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False)
        cached = cls(model, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False)
        cached.cache()
        pairs[f"lanczos {kind} ({LANCZOS_STEPS} steps), cached"] = tuple(
            lambda A=A: lanczos_approximate_spectrum(
                A, LANCZOS_STEPS, num_points=256, boundaries=(-10.0, 10.0)
            )
            for A in (cached, plain)
        )

    def loss_and_gradient():
        return torch.autograd.grad(nn.CrossEntropyLoss()(model(X), y), params)

    fns = [f for pair in pairs.values() for f in pair] + [loss_and_gradient]
    times = time_round_robin(fns, [repeats] * len(fns), warmup=1)
    medians = [statistics.median(t) for t in times]
    gradient_s = medians[-1]
    return {
        key: {
            "estimator_s": medians[2 * i],
            "products_s": medians[2 * i + 1],
            "ratio": medians[2 * i] / medians[2 * i + 1],
            "ratio_to_gradient": medians[2 * i] / gradient_s,
        }
        for i, key in enumerate(pairs)
    }


def main():
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="two repeats, cached Lanczos of the GGN only"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 2 if args.quick else 11
    print(f"curvlinops {curvlinops.__version__}, torch {torch.__version__}, 1 thread, float32")
    results = {}
    for name in PROBLEMS:
        results[name] = run(name, repeats, ("ggn",) if args.quick else ("ggn", "hessian"))
        print(
            f"\n{name}: estimator time / time of the products it needs (target <= 1.1); "
            "cached Lanczos: time with A.cache() / time without"
        )
        print(f"  {'estimator':40s} {'ratio':>6s}  {'x gradient':>10s}")
        for key, r in results[name].items():
            print(f"  {key:40s} {r['ratio']:6.2f}  {r['ratio_to_gradient']:10.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
