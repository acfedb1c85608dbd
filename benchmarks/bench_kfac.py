"""Cost of KFAC, EKFAC and the KFAC inverse relative to a gradient, and to plain floors.

Same problems, timing method and conventions as ``bench_products.py`` (float32, one thread,
one batch, mean cross-entropy; medians of interleaved calls in one process, as ratios to one
loss + gradient by plain autograd):

- KFAC build (``compute_kronecker_factors``) for the MC, type-2 and empirical Fisher;
- KFAC product with 1 and 16 columns, and its floor: the per-layer ``G @ V @ A`` written here
  on the same factors, with the columns first in per-layer matrices;
- KFAC-inverse build (Cholesky inverses of all damped factors through
  ``_compute_or_get_cached_inverse``) and product, with the floor ``G^-1 @ V @ A^-1``;
- the transformer's KFAC covers its feed-forward layers and head (see ``kfac_params``);
- ``transformer-all``: KFAC over *all* parameters of the transformer (attention projections,
  embedding, ``fallback="diagonal"`` for the layer norms), its build and products against the
  exact GGN diagonal and the GGN product, with the peak resident memory of each (Linux;
  ``VmHWM`` after resetting it through ``/proc/self/clear_refs``);
- EKFAC build (factors, eigenbases, eigenvalue correction) and product. The target for the build
  is the KFAC (MC) build plus a plain batched ``torch.linalg.eigh`` of the same factors plus
  1.5 gradients; that sum is printed as the EKFAC floor.

Usage: ``python benchmarks/bench_kfac.py [--quick]``; writes ``benchmarks/results/kfac.json``.
"""

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_products import CLASSIFIERS, make_transformer, time_round_robin  # noqa: E402

import curvlinops  # noqa: E402
from curvlinops import (  # noqa: E402
    EKFACLinearOperator,
    GGNLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from curvlinops.diagonal.exact import ggn_diagonal  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kfac.json"
PROBLEMS = {**CLASSIFIERS, "transformer": make_transformer}
NUM_COLUMNS = (1, 16)
DAMPING = 1e-3


def per_layer_floor(kfac: KFACLinearOperator, left: dict, right: dict, V: dict) -> Callable:
    """``left[name] @ V[name] @ right[name]`` per layer (weights) and ``left @ v`` (biases)."""

    def product():
        out = {}
        for (name, kind), block in V.items():
            result = left[name] @ block
            out[name, kind] = result if kind == "bias" else result @ right[name]
        return out

    return product


def layer_blocks(kfac: KFACLinearOperator, K: int) -> dict:
    """Random per-layer column blocks, columns first: ``[K, d_out, d_in]`` or ``[K, d_out, 1]``."""
    blocks = {}
    for name, kind, positions in kfac._layout():
        p = kfac._params[positions[0]]
        n = 1 if kind == "bias" else p[0].numel()
        blocks[name, kind] = torch.randn(K, p.shape[0], n)
    return blocks


def kfac_params(model: nn.Module) -> list:
    """Parameters of the Linear and Conv2d layers that run as modules.

    On the transformer these are the feed-forward layers and the head: the attention's
    projections are used as plain weights by ``MultiheadAttention`` (its ``out_proj`` module
    never runs), and embeddings and layer norms have no KFAC approximation.
    """
    skip = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [
        p
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in skip
        for p in m.parameters(recurse=False)
    ]


def bench_problem(name: str, repeats: int, warmup: int, log: Callable[[str], None]) -> dict:
    """Time everything for one problem (interleaved); return the JSON-ready results."""
    model, X, y = PROBLEMS[name]()
    loss_func = nn.CrossEntropyLoss()
    all_params = list(model.parameters())
    params = kfac_params(model)
    data = [(X, y)]
    D = sum(p.numel() for p in params)
    log(f"{name}: {D} parameters, batch {X.shape[0]}, input {tuple(X.shape[1:])}")
    result = {"num_params": D, "batch_size": X.shape[0]}
    entries = result["timings"] = []
    fns, reps = [], []

    def add(kind: str, method: str, K, fn: Callable[[], object]):
        entries.append({"kind": kind, "method": method, "K": K})
        fns.append(fn)
        reps.append(repeats)

    def loss_and_gradient():  # w.r.t. all parameters, as in bench_products.py
        return torch.autograd.grad(loss_func(model(X), y), all_params)

    add("gradient", "plain autograd", "-", loss_and_gradient)

    kfacs = {
        fisher_type: KFACLinearOperator(
            model, loss_func, params, data, fisher_type=fisher_type, check_deterministic=False
        )
        for fisher_type in ("mc", "type-2", "empirical")
    }
    for fisher_type, kfac in kfacs.items():
        add("kfac build", fisher_type, "-", kfac.compute_kronecker_factors)
        kfac.compute_kronecker_factors()
    kfac = kfacs["mc"]

    inverse = KFACInverseLinearOperator(kfac, damping=DAMPING, cache=False)
    names = list(kfac._mapping)

    def build_inverse():
        return [inverse._compute_or_get_cached_inverse(n) for n in names]

    add("inverse build", "curvlinops (Cholesky)", "-", build_inverse)
    cached_inverse = KFACInverseLinearOperator(kfac, damping=DAMPING)
    parts = {n: cached_inverse._compute_or_get_cached_inverse(n) for n in names}
    A_inv = {n: p[0] for n, p in parts.items()}
    G_inv = {n: p[1] for n, p in parts.items()}

    ekfac = EKFACLinearOperator(model, loss_func, params, data, check_deterministic=False)

    def build_ekfac():
        ekfac.compute_kronecker_factors()
        ekfac._maybe_compute_ekfac()

    try:
        build_ekfac()
    except ValueError as error:  # EKFAC takes 2-d outputs only (the transformer's are 3-d)
        log(f"  EKFAC not available: {str(error)[:100]}")
        ekfac = None
    else:
        add("ekfac build", "curvlinops", "-", build_ekfac)
    factors = list(kfac._input_covariances.values()) + list(kfac._gradient_covariances.values())
    by_size: dict = {}
    for factor in factors:
        by_size.setdefault(factor.shape, []).append(factor)
    stacked = [torch.stack(group) for group in by_size.values()]
    add(
        "ekfac build",
        "plain batched eigh of the factors",
        "-",
        lambda: [torch.linalg.eigh(s) for s in stacked],
    )

    for K in NUM_COLUMNS:
        torch.manual_seed(K)
        V = torch.randn(D, K).squeeze(-1) if K == 1 else torch.randn(D, K)
        add("kfac product", "curvlinops", K, lambda V=V: kfac @ V)
        blocks = layer_blocks(kfac, K)
        add(
            "kfac product",
            "per-layer G @ V @ A",
            K,
            per_layer_floor(kfac, kfac._gradient_covariances, kfac._input_covariances, blocks),
        )
        add("inverse product", "curvlinops", K, lambda V=V: cached_inverse @ V)
        add(
            "inverse product",
            "per-layer G^-1 @ V @ A^-1",
            K,
            per_layer_floor(kfac, G_inv, A_inv, blocks),
        )
        if ekfac is not None:
            add("ekfac product", "curvlinops", K, lambda V=V: ekfac @ V)

    for entry, times in zip(entries, time_round_robin(fns, reps, warmup)):
        entry["median_s"] = statistics.median(times)
        entry["times_s"] = times
    reference = entries[0]["median_s"]
    for entry in entries:
        entry["ratio_to_gradient"] = entry["median_s"] / reference
    ratio = {(e["kind"], e["method"], e["K"]): e["ratio_to_gradient"] for e in entries}
    if ekfac is None:
        return result
    entries.append(
        {
            "kind": "ekfac build",
            "method": "target: kfac build (mc) + plain eigh + 1.5",
            "K": "-",
            "ratio_to_gradient": ratio["kfac build", "mc", "-"]
            + ratio["ekfac build", "plain batched eigh of the factors", "-"]
            + 1.5,
        }
    )
    return result


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory during ``fn()`` above the memory before it (Linux), in MiB."""
    status = Path("/proc/self/status")
    if not status.exists():
        return float("nan")

    def kib(key):
        return int(re.search(rf"{key}:\s+(\d+) kB", status.read_text()).group(1))

    Path("/proc/self/clear_refs").write_text("5")
    before = kib("VmRSS")
    result = fn()
    peak = kib("VmHWM")
    del result
    return (peak - before) / 1024


def _transformer_all_operations():
    """The transformer-all problem and its timed operations ``(kind, method, K, fn)``."""
    model, X, y = make_transformer()
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    data = [(X, y)]
    D = sum(p.numel() for p in params)
    kfac = KFACLinearOperator(
        model, loss_func, params, data, check_deterministic=False, fallback="diagonal"
    )
    ggn = GGNLinearOperator(model, loss_func, params, data, check_deterministic=False)

    def gradient():
        return torch.autograd.grad(loss_func(model(X), y), params)

    operations = [
        ("gradient", "plain autograd", "-", gradient),
        ("kfac build", "mc, fallback='diagonal'", "-", kfac.compute_kronecker_factors),
        (
            "exact diagonal",
            "ggn_diagonal",
            "-",
            lambda: ggn_diagonal(model, loss_func, params, data),
        ),
    ]
    kfac.compute_kronecker_factors()
    for K in NUM_COLUMNS:
        torch.manual_seed(K)
        V = torch.randn(D, K).squeeze(-1) if K == 1 else torch.randn(D, K)
        operations.append(("kfac product", "curvlinops", K, lambda V=V: kfac @ V))
        operations.append(("ggn product", "GGNLinearOperator", K, lambda V=V: ggn @ V))
    return kfac, X, D, operations


def memory_child(index: int):
    """Print the peak memory (MiB) of operation ``index`` in this fresh process."""
    torch.set_num_threads(1)
    *_, operations = _transformer_all_operations()
    print(peak_memory_mib(operations[index][-1]))


def bench_transformer_all(repeats: int, warmup: int, log: Callable[[str], None]) -> dict:
    """KFAC over all transformer parameters vs the exact GGN diagonal and the GGN product.

    Peak memory of each operation is measured in a fresh process (first call).
    """
    kfac, X, D, operations = _transformer_all_operations()
    kinds: dict = {}
    for kind in kfac.structure().values():
        kinds[kind.split(" ")[0]] = kinds.get(kind.split(" ")[0], 0) + 1
    log(f"transformer-all: {D} parameters, batch {X.shape[0]}, structure {kinds}")
    result = {"num_params": D, "batch_size": X.shape[0]}
    entries = result["timings"] = [{"kind": k, "method": m, "K": K} for k, m, K, _ in operations]
    fns = [op[-1] for op in operations]
    times = time_round_robin(fns, [repeats] * len(fns), warmup)
    for index, (entry, t) in enumerate(zip(entries, times)):
        entry["median_s"] = statistics.median(t)
        entry["times_s"] = t
        child = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(index)],
            capture_output=True,
            text=True,
            check=True,
        )
        entry["peak_mib"] = float(child.stdout.split()[-1])
    for entry in entries:
        entry["ratio_to_gradient"] = entry["median_s"] / entries[0]["median_s"]
    return result


def format_table(results: dict) -> str:
    """Ratios to the gradient, one row per (kind, method), columns K=1 and K=16."""
    lines = []
    for name, result in results.items():
        entries = result["timings"]
        reference = entries[0]["median_s"]
        lines.append(
            f"\n{name}: {result['num_params']} parameters, batch {result['batch_size']}; "
            f"loss + gradient (plain autograd) = {1e3 * reference:.2f} ms = 1.0"
        )
        header = f"  {'operation':16s} {'method':42s} {'build':>7s} {'K=1':>7s} {'K=16':>7s}"
        lines += [header, "  " + "-" * (len(header) - 2)]
        rows: dict = {}
        for entry in entries[1:]:
            rows.setdefault((entry["kind"], entry["method"]), {})[entry["K"]] = entry
        for (kind, method), by_K in rows.items():
            cells = [
                f"{by_K[k]['ratio_to_gradient']:7.2f}" if k in by_K else f"{'':>7s}"
                for k in ("-", 1, 16)
            ]
            peaks = [f"{e['peak_mib']:.0f}" for e in by_K.values() if "peak_mib" in e]
            memory = f"  peak MiB {'/'.join(peaks)}" if peaks else ""
            lines.append(f"  {kind:16s} {method:42s} {' '.join(cells)}{memory}")
    return "\n".join(lines)


def main():
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (under a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per entry")
    choices = [*PROBLEMS, "transformer-all"]
    parser.add_argument("--problems", nargs="+", choices=choices, default=choices)
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        return memory_child(args.memory_child)
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = 1 if args.quick else 2
    torch.set_num_threads(1)
    print(
        f"curvlinops {curvlinops.__version__}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, 1 thread, float32, "
        f"median of {repeats} runs after {warmup} warm-up run(s)"
    )
    start = time.perf_counter()
    results = {
        name: (bench_transformer_all if name == "transformer-all" else bench_problem)(
            *((repeats, warmup) if name == "transformer-all" else (name, repeats, warmup)),
            log=print,
        )
        for name in args.problems
    }
    print(format_table(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {RESULTS} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
