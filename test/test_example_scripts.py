"""Run every ``docs/examples/example_*.py`` in quick mode and check what it prints.

The scripts run as subprocesses, all started at once (module fixture); the numbers they print
are compared with dense matrices built here from each script's own ``problem()`` by plain
autograd (``reference.hessian`` / ``reference.ggn``).
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import ggn, hessian

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
SCRIPTS = sorted(p.stem for p in EXAMPLES.glob("example_*.py"))
FLOAT = r"[-+]?\d+\.\d+(?:e[-+]\d+)?"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def outputs():
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in SCRIPTS
    }
    results = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name} failed:\n{err}"
        results[name] = out
    return results


def numbers(out: str, label: str) -> torch.Tensor:
    """The floats printed after ``label`` on its line."""
    line = next(line for line in out.splitlines() if line.startswith(label))
    return torch.tensor([float(x) for x in re.findall(FLOAT, line[len(label) :])])


def dense(kind, model, loss_func, data) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return (hessian if kind == "hessian" else ggn)(model, loss_func, params, data)


def flat_gradient(model, loss_func, data) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    N = sum(len(y) for _, y in data)
    total = sum(loss_func(model(X), y) * len(y) / N for X, y in data)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-8):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=1e-12)


def test_every_topic_has_a_script():
    assert SCRIPTS == [
        "example_eigenvalues",
        "example_inverses_kfac_step",
        "example_products_scipy",
        "example_report",
        "example_spectral_density",
        "example_submatrices",
        "example_trace_diagonal",
    ]


def test_products_and_scipy(outputs):
    out = outputs["example_products_scipy"]
    model, loss_func, data = load("example_products_scipy").problem(quick=True)
    H, G = dense("hessian", model, loss_func, data), dense("ggn", model, loss_func, data)
    close(numbers(out, "H @ ones, first 3 entries:"), (H @ torch.ones(H.shape[0]).double())[:3])
    close(numbers(out, "G @ first four unit vectors, entry [0, 0]:"), G[:1, 0])
    close(
        numbers(out, "top 3 GGN eigenvalues (scipy eigsh):"), torch.linalg.eigvalsh(G)[-3:].flip(0)
    )
    assert "CG converged: True" in out
    step = torch.linalg.solve(
        G + 1e-2 * torch.eye(G.shape[0]), flat_gradient(model, loss_func, data)
    )
    close(numbers(out, "Newton step, first 3 entries:"), step[:3], rtol=1e-6)


def test_eigenvalues(outputs):
    out = outputs["example_eigenvalues"]
    H = dense("hessian", *load("example_eigenvalues").problem(quick=True))
    exact = torch.linalg.eigvalsh(H)
    close(numbers(out, "largest 3 eigenvalues:"), exact[-3:].flip(0))
    close(numbers(out, "smallest 2 eigenvalues:"), exact[:2])
    close(numbers(out, "largest 3 eigenvalues (scipy):"), exact[-3:].flip(0))
    assert exact[0] < 0  # the example's point: the Hessian is indefinite


def test_inverses_and_kfac_step(outputs):
    out = outputs["example_inverses_kfac_step"]
    model, loss_func, data = load("example_inverses_kfac_step").problem(quick=True)
    G = dense("ggn", model, loss_func, data)
    step = torch.linalg.solve(
        G + 0.1 * torch.eye(G.shape[0]), flat_gradient(model, loss_func, data)
    )
    assert numbers(out, "CG: relative residual of (G + 0.1 I) x = g:")[-1] < 1e-8
    close(numbers(out, "CG step, first 3 entries:"), step[:3], rtol=1e-6)
    assert numbers(out, "Neumann (200 terms): relative distance to the CG step:")[-1] < 1e-3
    before = numbers(out, "loss before KFAC steps:")[0]
    after = numbers(out, "loss after 5 KFAC steps:")[0]
    assert after < 0.7 * before


def test_trace_and_diagonal(outputs):
    out = outputs["example_trace_diagonal"]
    G = dense("ggn", *load("example_trace_diagonal").problem(quick=True))
    exact = torch.trace(G)
    close(numbers(out, "exact trace (sum of the exact diagonal):"), exact.reshape(1))
    close(numbers(out, "exact diagonal, first 3 entries:"), G.diagonal()[:3])
    for name in ("hutchinson", "hutch++", "xtrace"):
        estimate = numbers(out, f"{name} trace (30 products):")[-1]
        assert abs(estimate - exact) < 0.1 * exact
    assert numbers(out, "xdiag diagonal (30 products): relative error")[0] < 0.5


def test_spectral_density(outputs):
    out = outputs["example_spectral_density"]
    model, loss_func, data = load("example_spectral_density").problem(quick=True)
    exact = torch.linalg.eigvalsh(dense("hessian", model, loss_func, data))
    low, high, mass = numbers(out, "Hessian density: grid")
    assert low <= exact[0] and exact[-1] <= high
    assert abs(mass - 1) < 1e-3
    top_ggn = torch.linalg.eigvalsh(dense("ggn", model, loss_func, data))[-1]
    _, high, mass = numbers(out, "GGN log-density: grid")
    assert top_ggn <= high and 0.9 < mass < 1.05


def test_submatrices(outputs):
    out = outputs["example_submatrices"]
    model, loss_func, data = load("example_submatrices").problem(quick=True)
    G = dense("ggn", model, loss_func, data)
    params = list(model.parameters())
    n1, n2, n3 = (p.numel() for p in params[:3])
    block, coupling = G[:n1, :n1], G[:n1, n1 + n2 : n1 + n2 + n3]
    close(numbers(out, "first-layer block: trace"), torch.trace(block).reshape(1))
    close(numbers(out, "coupling block: Frobenius norm"), coupling.norm().reshape(1))
    close(numbers(out, "first-layer block: top eigenvalue"), torch.linalg.eigvalsh(block)[-1:])


def test_report(outputs):
    out = outputs["example_report"]
    H = dense("hessian", *load("example_report").problem())
    close(numbers(out, "top eigenvalues:"), torch.linalg.eigvalsh(H)[-3:].flip(0))
    estimate, low, high = numbers(out, "trace estimate:")
    assert low <= torch.trace(H) <= high and low <= estimate <= high
