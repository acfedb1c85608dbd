"""Cost of the exact curvature diagonals relative to a GGN product with ``C`` columns.

For the MLP and CNN of ``bench_products.py`` (float32, one thread, one batch, mean
cross-entropy, ``C = 10`` classes): the exact GGN, empirical-Fisher and MC-Fisher diagonals
(``curvlinops.diagonal.exact``) against one GGN product with ``C`` columns, both as medians of
interleaved repeats and as ratios to one loss + gradient. Target of the issue: at most 1.5 times
the ``C``-column GGN product.

Usage: ``python benchmarks/bench_diagonals.py [--quick]``; writes
``benchmarks/results/diagonals.json``.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_products import CLASSIFIERS as PROBLEMS  # noqa: E402
from bench_products import time_round_robin  # noqa: E402

import curvlinops  # noqa: E402
from curvlinops import GGNLinearOperator  # noqa: E402
from curvlinops.diagonal.exact import ef_diagonal, fisher_mc_diagonal, ggn_diagonal  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "diagonals.json"


def run(name: str, repeats: int) -> dict:
    model, X, y = PROBLEMS[name]()
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    data = [(X, y)]
    ggn = GGNLinearOperator(model, loss_func, params, data, check_deterministic=False)
    C = model(X).shape[1]
    V = torch.randn(ggn.shape[0], C)
    entries = {
        "gradient": lambda: torch.autograd.grad(loss_func(model(X), y), params),
        f"GGN product, {C} columns": lambda: ggn @ V,
        "GGN diagonal": lambda: ggn_diagonal(model, loss_func, params, data),
        "EF diagonal": lambda: ef_diagonal(model, loss_func, params, data),
        "MC-Fisher diagonal": lambda: fisher_mc_diagonal(model, loss_func, params, data),
    }
    times = time_round_robin(list(entries.values()), [repeats] * len(entries), warmup=1)
    medians = {key: statistics.median(t) for key, t in zip(entries, times)}
    reference = medians["gradient"]
    product = medians[f"GGN product, {C} columns"]
    return {
        key: {"median_s": t, "ratio_to_gradient": t / reference, "ratio_to_product": t / product}
        for key, t in medians.items()
    }


def main():
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 3 if args.quick else 11
    print(f"curvlinops {curvlinops.__version__}, torch {torch.__version__}, 1 thread, float32")
    results = {}
    for name in PROBLEMS:
        results[name] = run(name, repeats)
        print(f"\n{name}:  {'ratio to gradient':>18s} {'ratio to C-column GGN product':>30s}")
        for key, r in results[name].items():
            print(f"  {key:26s} {r['ratio_to_gradient']:10.2f} {r['ratio_to_product']:22.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
