"""The speed and memory targets of the benchmark issue, checked against the latest results.

Reads what the other benchmark scripts wrote to ``benchmarks/results/`` (run them first;
``make bench`` does) and prints one row per target: the measured value, the target and
whether it is met. Every value is a ratio measured within one process of one script:

- products: curvlinops' product time / the best floor's for the same number of columns (the
  Hessian floors for the Hessian; the GGN floors, the same J^T (.) J structure, for the GGN,
  EF and MC-Fisher; forward-mode floors included), target 1.0 with 16 columns and 1.1 with
  one; compiled products and products of a contiguous ``[D, K]`` input the same way
  (reported, no target);
- construction with the default determinism check / one loss + gradient, target 5;
- KFAC build (MC) / gradient, target 2.5; KFAC and KFAC-inverse products / their per-layer
  floors, target 1.2; EKFAC build / (KFAC build + plain batched eigh + 1.5), target 1;
- estimators / the products they need, target 1.1; a 50-step Lanczos run with the product
  cache / without it (reported, target < 1: the cache must save work);
- peak memory of a 16-column product / its floor's, each in a fresh process, target 1.1; of
  a KFAC, EKFAC or KFAC-inverse build / its floor's, target 1.2.

Writes ``benchmarks/results/summary.json``, ``summary.txt`` and, if matplotlib is installed,
``summary.png`` (``--docs`` also copies the table and plot to ``docs/_static/``).

Usage: ``python benchmarks/targets.py [--docs]``.
"""

import argparse
import json
import shutil
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DOCS_STATIC = Path(__file__).resolve().parent.parent / "docs" / "_static"
TARGET_PROBLEMS = ("mlp", "cnn", "transformer")
FLOOR_OF = {"hessian": "hessian", "ggn": "ggn", "ef": "ggn", "mc_fisher": "ggn"}
#: Products / best plain-PyTorch floor with the same number of columns (forward-mode floors
#: included): at most 1.0 with 16 columns (issue "Speed II"), 1.1 with one.
PRODUCT_TARGET = {1: 1.1, 16: 1.0}


def load(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def row(problem, what, value, target, note=""):
    """One row; ``target`` None means reported only. ``met`` is None where nothing is measured."""
    met = None if value is None or target is None else bool(value <= target)
    return {
        "problem": problem,
        "what": what,
        "value": value,
        "target": target,
        "met": met,
        "note": note,
    }


def product_rows(products: dict) -> list:
    rows = []
    for problem, result in products["problems"].items():
        ratio = {
            (e["kind"], e["method"], e["K"]): e["ratio_to_gradient"] for e in result["timings"]
        }
        floors: dict = {}
        for (kind, method, K), value in ratio.items():
            if not method.startswith(("curvlinops", "construction")) and K != "-":
                key = (kind, K)
                floors[key] = min(floors.get(key, float("inf")), value)
        for kind, floor_kind in FLOOR_OF.items():
            for K in (1, 16):
                floor = floors.get((floor_kind, K))
                for method, target in (
                    ("curvlinops", PRODUCT_TARGET[K]),
                    ("curvlinops, contiguous [D, K] input", None),
                    ("curvlinops compiled", None),
                ):
                    value = ratio.get((kind, method, K))
                    if value is None or floor is None:
                        continue
                    label = (
                        f"{kind} product, K={K}"
                        + {
                            "curvlinops": "",
                            "curvlinops compiled": ", compiled",
                            "curvlinops, contiguous [D, K] input": ", [D, K] contiguous",
                        }[method]
                    )
                    note = f"{value:.2f} vs floor {floor:.2f} gradients"
                    rows.append(row(problem, label, value / floor, target, note))
            construction = ratio.get((kind, "construction (determinism check)", "-"))
            if construction is not None:
                rows.append(row(problem, f"{kind} construction", construction, 5.0, "gradients"))
    return rows


def kfac_rows(kfac: dict) -> list:
    rows = []
    for problem, result in kfac.items():
        ratio = {
            (e["kind"], e["method"], e["K"]): e["ratio_to_gradient"] for e in result["timings"]
        }
        if ("kfac build", "mc", "-") not in ratio:  # e.g. transformer-all: reported only
            continue
        rows.append(
            row(problem, "KFAC build (MC)", ratio["kfac build", "mc", "-"], 2.5, "gradients")
        )
        for kind, floor in (
            ("kfac product", "per-layer G @ V @ A"),
            ("inverse product", "per-layer G^-1 @ V @ A^-1"),
        ):
            for K in (1, 16):
                value, reference = ratio[kind, "curvlinops", K], ratio[kind, floor, K]
                note = f"{value:.2f} vs floor {reference:.2f} gradients"
                rows.append(row(problem, f"{kind}, K={K}", value / reference, 1.2, note))
        target = ratio.get(("ekfac build", "target: kfac build (mc) + plain eigh + 1.5", "-"))
        if target is None:
            rows.append(row(problem, "EKFAC build", None, 1.0, "EKFAC takes 2-d outputs only"))
        else:
            value = ratio["ekfac build", "curvlinops", "-"]
            note = f"{value:.2f} vs {target:.2f} gradients"
            rows.append(row(problem, "EKFAC build / target", value / target, 1.0, note))
    return rows


def estimator_rows(estimators: dict) -> list:
    rows = []
    for problem, result in estimators.items():
        for key, r in result.items():
            if key.startswith("rademacher draws"):
                note = "draw time / time of the product of the drawn block"
                rows.append(row(problem, key, r["ratio"], None, note))
            elif key.endswith("cached"):
                note = "time with A.cache() / without"
                rows.append(row(problem, key, r["ratio"], 1.0, note))
            else:
                note = f"{r['ratio_to_gradient']:.1f} gradients"
                rows.append(row(problem, f"{key} / its products", r["ratio"], 1.1, note))
    return rows


def memory_rows(memory: dict) -> list:
    rows = []
    for entry in memory.get("rows", []):
        value = entry.get("value")
        if value is None:
            continue
        what = entry.get("what") or f"peak memory {entry['method']}, K=16 / floor"
        note = f"{entry.get('peak_mib', float('nan')):.1f} MiB"
        rows.append(row(entry["problem"], what, value, entry.get("target", 1.1), note))
    return rows


def format_rows(rows: list) -> str:
    lines = [f"{'problem':12s} {'row':48s} {'value':>7s} {'target':>7s}  {'met':4s} note"]
    lines.append("-" * 100)
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.2f}"
        target = "-" if r["target"] is None else f"{r['target']:.2f}"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(
            f"{r['problem']:12s} {r['what']:48s} {value:>7s} {target:>7s}  {met:4s} {r['note']}"
        )
    targeted = [r for r in rows if r["met"] is not None and r["problem"] in TARGET_PROBLEMS]
    met = sum(r["met"] for r in targeted)
    lines.append(
        f"\n{met} of {len(targeted)} targets met on the MLP, CNN and transformer problems."
    )
    return "\n".join(lines)


def plot(rows: list, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot (pip install matplotlib)")
        return False
    shown = [r for r in rows if r["value"] is not None and r["target"] is not None]
    labels = [f"{r['problem']}: {r['what']}" for r in shown]
    values = [r["value"] / r["target"] for r in shown]
    colors = ["tab:green" if r["met"] else "tab:red" for r in shown]
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(shown) + 1.2))
    ax.barh(range(len(shown)), values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(shown)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("measured / target (<= 1: met)")
    ax.set_title("curvlinops benchmark targets (float32, 1 CPU thread)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", action="store_true", help="copy table and plot to docs/_static")
    args = parser.parse_args()
    rows, missing = [], []
    for name, make_rows in (
        ("products", product_rows),
        ("kfac", kfac_rows),
        ("estimators", estimator_rows),
        ("memory", memory_rows),
    ):
        results = load(name)
        if results is None:
            missing.append(name)
        else:
            rows += make_rows(results)
    rows.sort(key=lambda r: (r["problem"] not in TARGET_PROBLEMS, r["problem"]))
    table = format_rows(rows)
    if missing:
        table += f"\nNo results yet from: {', '.join(missing)} (run `make bench`)."
    print(table)
    (RESULTS / "summary.txt").write_text(table + "\n")
    (RESULTS / "summary.json").write_text(json.dumps(rows, indent=1))
    plotted = plot(rows, RESULTS / "summary.png")
    if args.docs:
        DOCS_STATIC.mkdir(parents=True, exist_ok=True)
        shutil.copy(RESULTS / "summary.txt", DOCS_STATIC / "benchmark_summary.txt")
        if plotted:
            shutil.copy(RESULTS / "summary.png", DOCS_STATIC / "benchmark_summary.png")


if __name__ == "__main__":
    main()
