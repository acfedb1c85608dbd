r"""The curvature report of the command line, on your own model.

``curvlinops report --problem MODULE:FUNCTION`` (or ``python -m curvlinops report ...``)
imports ``FUNCTION`` from ``MODULE`` (a module name, or a path to a ``.py`` file), calls it,
and reports on the ``(model, loss_func, data)`` it returns: top eigenvalues, a trace estimate
with its 95% confidence interval, a per-layer table, and with ``--plot`` the spectral density.
This script is such a module: its ``problem()`` is the function, and running the script runs
the command on itself and reads the ``--json`` output (``--seed`` fixes every random draw,
so the numbers repeat). The same from a shell::

    curvlinops report --problem docs/examples/example_report.py:problem --matrix hessian \
        --seed 0 --json report.json --plot report.png

Run: ``python docs/examples/example_report.py`` (``--quick``: fewer trace samples).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn


def problem():
    """The model, loss and data to report on (this is what ``--problem`` calls)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 2)).double()
    X = torch.randn(60, 4, dtype=torch.float64)
    y = torch.stack([X[:, 0] * X[:, 1], X[:, 2].cos()], dim=1)
    return model, nn.MSELoss(), [(X[:30], y[:30]), (X[30:], y[30:])]


def main(quick: bool = False):
    with tempfile.TemporaryDirectory() as directory:
        json_path = Path(directory) / "report.json"
        command = [
            sys.executable, "-m", "curvlinops", "report",
            "--problem", f"{Path(__file__).resolve()}:problem",
            "--matrix", "hessian",
            "--k", "3",
            "--seed", "0",
            "--num-samples", "32" if quick else "256",
            "--json", str(json_path),
            "--no-progress",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"curvlinops report failed:\n{result.stderr}")
        print(result.stdout)
        report = json.loads(json_path.read_text())
    print("from the JSON file:")
    print("top eigenvalues:", " ".join(f"{e:.10e}" for e in report["eigenvalues"]))
    low, high = report["trace"]["ci95"]
    print(f"trace estimate: {report['trace']['estimate']:.10e} in [{low:.10e}, {high:.10e}]")
    for layer in report["layers"]:
        print(
            f"layer {layer['name']} ({layer['num_parameters']} parameters): "
            f"top eigenvalue {layer['top_eigenvalue']:.10e}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, for the tests")
    main(parser.parse_args().quick)
