"""Peak memory of 16-column products, each measured in a fresh process, against the floors.

For each problem of ``bench_products.py`` and each method (curvlinops' Hessian, GGN, empirical
and Monte-Carlo Fisher and KFAC products; the plain-PyTorch floors of ``bench_products.py``),
a child process builds the problem and the operator (``check_deterministic=False``) or floor,
runs one warm-up product with 16 columns, then measures one more: the peak resident set size
during the product minus the resident set size before it. The high-water mark is reset right
before the product by writing ``5`` to ``/proc/self/clear_refs`` (Linux), and read from
``VmHWM`` in ``/proc/self/status`` after it, while the product's result is still alive, so both
curvlinops and the floors are charged for their outputs. Inputs are allocated before the
measurement. The ratio compares each curvlinops product with the best (lowest) floor of the
same structure: the Hessian floors for the Hessian, the GGN floors (the same J^T (.) J
structure) for the GGN, EF and MC-Fisher. Target of the benchmark issue: at most 1.1.

Usage: ``python benchmarks/bench_memory.py [--quick]``; writes ``benchmarks/results/memory.json``.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
K = 16
OPERATOR_METHODS = ("hessian", "ggn", "ef", "mc_fisher", "kfac")
FLOOR_METHODS = {
    "hessian": ("double backward", "torch.func vmap(jvp(grad))"),
    "ggn": ("double-vjp, autograd", "torch.func vmap(jvp)+vmap(vjp)"),
}
FLOOR_OF = {"hessian": "hessian", "ggn": "ggn", "ef": "ggn", "mc_fisher": "ggn"}
TARGET = 1.1


def status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def child(problem: str, method: str) -> dict:
    """Build one method on one problem and measure one 16-column product (in this process)."""
    import torch
    from bench_products import LOSSES, OPERATORS, PROBLEMS, make_floors

    from curvlinops import KFACLinearOperator

    torch.set_num_threads(1)
    model, X, y = PROBLEMS[problem]()
    loss_func = LOSSES[problem]()
    params = list(model.parameters())
    torch.manual_seed(1)
    D = sum(p.numel() for p in params)
    V = torch.randn(D, K)
    if method in OPERATORS:
        op = OPERATORS[method](model, loss_func, params, [(X, y)], check_deterministic=False)
        run = lambda: op @ V  # noqa: E731
    elif method == "kfac":
        from bench_kfac import kfac_params

        kfac_p = kfac_params(model)
        op = KFACLinearOperator(model, loss_func, kfac_p, [(X, y)], check_deterministic=False)
        V = torch.randn(sum(p.numel() for p in kfac_p), K)
        run = lambda: op @ V  # noqa: E731
    else:
        kind, name = method.split(" | ")
        fn = make_floors(model, loss_func, X, y)[kind][name]
        blocks = V.split([p.numel() for p in params])
        V_list = [b.T.reshape(K, *p.shape).contiguous() for b, p in zip(blocks, params)]
        run = lambda: fn(V_list)  # noqa: E731
    try:
        result = run()  # warm-up: lazy initialisation, factors, allocator pools
    except (RuntimeError, NotImplementedError) as error:  # torch.func gaps of the floors
        return {"problem": problem, "method": method, "error": str(error)[:120]}
    del result
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    result = run()
    peak = status_kib("VmHWM")
    del result
    return {"problem": problem, "method": method, "peak_extra_bytes": (peak - before) * 1024}


def measure(problem: str, method: str) -> dict:
    """Run ``child`` in a fresh interpreter and parse its JSON line."""
    # A fixed mmap threshold makes glibc return every large freed block to the OS at once, so
    # the resident set follows the live tensors instead of the allocator's reuse decisions.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    output = subprocess.run(
        [sys.executable, __file__, "--child", problem, method],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the MLP's GGN only (about 10 s)")
    parser.add_argument("--child", nargs=2, metavar=("PROBLEM", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    problems = ("mlp",) if args.quick else ("mlp", "cnn", "transformer", "regression")
    start = time.perf_counter()
    rows = []
    print(f"peak extra memory of one product with {K} columns, each in a fresh process")
    print(f"{'problem':12s} {'method':42s} {'MiB':>8s} {'/ floor':>8s} {'target':>7s}  met")
    for problem in problems:
        measured = {}
        methods = list(OPERATOR_METHODS) + [
            f"{kind} | {name}" for kind, names in FLOOR_METHODS.items() for name in names
        ]
        if args.quick:  # the GGN and its floors only
            methods = ["ggn"] + [f"ggn | {name}" for name in FLOOR_METHODS["ggn"]]
        for method in methods:
            measured[method] = measure(problem, method)
        floors = {}
        for kind, names in FLOOR_METHODS.items():
            values = [
                measured[f"{kind} | {n}"].get("peak_extra_bytes")
                for n in names
                if f"{kind} | {n}" in measured
            ]
            values = [v for v in values if v is not None]
            floors[kind] = min(values) if values else None
        for method, entry in measured.items():
            mib = entry.get("peak_extra_bytes")
            floor = floors.get(FLOOR_OF.get(method))
            ratio = None if mib is None or floor is None else mib / floor
            row = {
                **entry,
                "peak_mib": None if mib is None else mib / 2**20,
                "value": ratio,
                "target": TARGET if ratio is not None else None,
                "met": None if ratio is None else ratio <= TARGET,
            }
            rows.append(row)
            cells = (
                f"{row['peak_mib']:8.1f}" if mib is not None else f"{'n/a':>8s}",
                f"{ratio:8.2f}" if ratio is not None else f"{'':8s}",
                f"{TARGET:7.2f}" if ratio is not None else f"{'':7s}",
                {True: "yes", False: "NO", None: ""}[row["met"]],
            )
            print(f"{problem:12s} {method:42s} {cells[0]} {cells[1]} {cells[2]}  {cells[3]}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"K": K, "rows": rows}, indent=1))
    print(f"\nwritten to {RESULTS} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
