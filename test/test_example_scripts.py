"""Run every ``docs/examples/example_*.py`` in quick mode and check what it prints.

All scripts start at once as subprocesses (module fixture) and run while the tests build their
references; each test then waits for its own script. The printed numbers are compared with dense
matrices built here from each script's own ``problem()`` by plain autograd
(``reference.hessian`` / ``reference.ggn``), and the KFAC step with a Kronecker-factored matrix
assembled here from its closed form for the script's two-layer network.
"""

import importlib.util
import os
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
# The report example drives the command line written in curvlinops/cli.py.
HAS_CLI = importlib.util.find_spec("curvlinops.cli") is not None
# Each pytest-xdist worker that runs a test of this module starts all scripts; with
# ``--dist loadgroup`` this keeps the module on one worker, so the scripts run once.
pytestmark = pytest.mark.xdist_group("example_scripts")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def processes():
    # One thread per script: all seven share the machine's cores with the test process.
    # the package of this checkout first (the scripts' own directory is on their path)
    root = str(EXAMPLES.parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    started = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in SCRIPTS
        if HAS_CLI or name != "example_report"
    }
    yield started
    for process in started.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


_outputs = {}


def output(processes, name: str) -> str:
    """The script's standard output; fails the calling test if the script failed."""
    if name not in _outputs:
        _outputs[name] = processes[name].communicate(timeout=300)
    stdout, stderr = _outputs[name]
    assert processes[name].returncode == 0, f"{name} failed:\n{stderr}"
    return stdout


def numbers(out: str, label: str) -> torch.Tensor:
    """The floats printed after ``label`` on the first line starting with it."""
    lines = [line for line in out.splitlines() if line.startswith(label)]
    assert lines, f"no line starts with {label!r} in:\n{out}"
    return torch.tensor([float(x) for x in re.findall(FLOAT, lines[0][len(label) :])])


def dense(kind, model, loss_func, data) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return (hessian if kind == "hessian" else ggn)(model, loss_func, params, data)


def flat_gradient(model, loss_func, data) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    N = sum(len(y) for _, y in data)
    total = sum(loss_func(model(X), y) * len(y) / N for X, y in data)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-8):
    """Printed values carry 11 significant digits, hence the default ``rtol``."""
    torch.testing.assert_close(actual, expected.reshape(-1).to(actual.dtype), rtol=rtol, atol=1e-12)


def test_every_topic_has_a_script():
    assert SCRIPTS == [
        "example_eigenvalues",
        "example_inverses_kfac_step",
        "example_kfac_gpt",
        "example_products_scipy",
        "example_report",
        "example_spectral_density",
        "example_submatrices",
        "example_trace_diagonal",
    ]


def test_kfac_gpt(processes):
    """KFAC/EKFAC over all parameters of a GPT-style model; their inverses; training steps."""
    out = output(processes, "example_kfac_gpt")
    assert "diagonal" in out and "kronecker" in out
    assert numbers(out, "inverse residual:")[0] < 1e-10
    assert numbers(out, "EKFAC inverse residual:")[0] < 1e-10
    losses = numbers(out, "losses:")
    assert len(losses) == 4 and (losses[1:] < losses[:-1]).all()


def test_products_and_scipy(processes):
    model, loss_func, data = load("example_products_scipy").problem(quick=True)
    H, G = dense("hessian", model, loss_func, data), dense("ggn", model, loss_func, data)
    D = G.shape[0]
    step = torch.linalg.solve(G + 1e-2 * torch.eye(D), flat_gradient(model, loss_func, data))

    out = output(processes, "example_products_scipy")
    assert f"parameters: {D}" in out
    close(numbers(out, "H @ ones, first 3 entries:"), (H @ torch.ones(D).double())[:3])
    assert "G @ M: shape (75, 4)" in out
    close(numbers(out, "G @ M, column norms:"), G[:, :4].norm(dim=0))
    assert numbers(out, "list format vs flat vector: max difference")[0] < 1e-12
    close(
        numbers(out, "top 3 GGN eigenvalues (scipy eigsh):"), torch.linalg.eigvalsh(G)[-3:].flip(0)
    )
    assert "CG converged: True" in out
    assert numbers(out, "CG converged: True, relative residual:")[0] < 1e-10
    close(numbers(out, "Newton step, first 3 entries:"), step[:3], rtol=1e-6)


def test_eigenvalues(processes):
    H = dense("hessian", *load("example_eigenvalues").problem(quick=True))
    exact = torch.linalg.eigvalsh(H)
    assert exact[0] < 0  # the example's point: the Hessian of the trained net is indefinite

    out = output(processes, "example_eigenvalues")
    close(numbers(out, "largest 3 eigenvalues:"), exact[-3:].flip(0))
    close(numbers(out, "smallest 2 eigenvalues:"), exact[:2])
    close(numbers(out, "largest 3 eigenvalues (scipy):"), exact[-3:].flip(0))
    assert "top eigenvector, shapes: [(8, 4), (8,), (2, 8), (2,)]" in out
    assert numbers(out, "top eigenpair: residual ||H v - lambda v|| =")[0] < 1e-8


def kfac_type2_dense(model, X: torch.Tensor) -> torch.Tensor:
    """KFAC (type-2, mean cross-entropy) of ``Linear -> ReLU -> Linear`` from its definition.

    Per layer with input ``x_n`` and output ``s_n``: ``A = mean_n x_n x_n^T`` and
    ``G = mean_n J_n^T H_n J_n`` with ``J_n = d logits_n / d s_n`` and ``H_n`` the softmax
    Hessian; the weight block is ``G kron A`` (row-major weights), the bias block ``G``.
    """
    first, _, second = model
    W1, b1, W2, b2 = (p.detach() for p in (first.weight, first.bias, second.weight, second.bias))
    z = X @ W1.T + b1
    h = z.relu()
    p = (h @ W2.T + b2).softmax(dim=1)
    H_out = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # [N, C, C]
    J1 = W2.unsqueeze(0) * (z > 0).to(X.dtype).unsqueeze(1)  # [N, C, hidden]
    G1 = torch.einsum("nci,ncd,ndj->ij", J1, H_out, J1) / len(X)
    G2 = H_out.mean(dim=0)
    A1, A2 = X.T @ X / len(X), h.T @ h / len(X)
    return torch.block_diag(torch.kron(G1, A1), G1, torch.kron(G2, A2), G2)


def test_inverses_and_kfac_step(processes):
    module = load("example_inverses_kfac_step")
    model, loss_func, data = module.problem(quick=True)
    params = list(model.parameters())
    damping, lr = 0.1, 0.2
    G = dense("ggn", model, loss_func, data)
    gradient = flat_gradient(model, loss_func, data)
    identity = torch.eye(G.shape[0], dtype=G.dtype)
    newton_step = torch.linalg.solve(G + damping * identity, gradient)
    X = torch.cat([X for X, _ in data])
    K = kfac_type2_dense(model, X)
    direction = torch.linalg.solve(K + damping * identity, gradient)
    loss_before = module.dataset_loss(model, loss_func, data)
    with torch.no_grad():
        for p, d in zip(params, direction.split([p.numel() for p in params])):
            p.sub_(lr * d.reshape(p.shape))
    loss_after_one = module.dataset_loss(model, loss_func, data)

    out = output(processes, "example_inverses_kfac_step")
    assert numbers(out, "CG: relative residual of (G + 0.1 I) x = g:")[-1] < 1e-8
    close(numbers(out, "CG step, first 3 entries:"), newton_step[:3], rtol=1e-6)
    assert numbers(out, "Neumann (200 terms): relative distance to the CG step:")[-1] < 1e-3
    assert numbers(out, "first KFAC direction: max |(K + 0.1 I) d - g| =")[-1] < 1e-12
    close(numbers(out, "first KFAC direction, first 3 entries:"), direction[:3], rtol=1e-7)
    close(numbers(out, "first KFAC direction, norm:"), direction.norm(), rtol=1e-7)
    before = numbers(out, "loss before KFAC steps:")[0]
    after_one = numbers(out, "loss after 1 KFAC step:")[0]
    close(before.reshape(1), torch.tensor(loss_before))
    close(after_one.reshape(1), torch.tensor(loss_after_one))
    assert after_one < before
    assert numbers(out, "loss after 5 KFAC steps:")[0] < 0.7 * before


def test_trace_and_diagonal(processes):
    G = dense("ggn", *load("example_trace_diagonal").problem(quick=True))
    exact = torch.trace(G)

    out = output(processes, "example_trace_diagonal")
    close(numbers(out, "exact trace (sum of the exact diagonal):"), exact)
    close(numbers(out, "exact diagonal, first 3 entries:"), G.diagonal()[:3])
    close(numbers(out, "exact diagonal, norm:"), G.diagonal().norm())
    for name in ("hutchinson", "hutch++", "xtrace"):
        estimate, error = numbers(out, f"{name} trace (30 products):")
        # the tolerance the script's docstring states
        assert abs(estimate - exact) < 0.1 * exact, name
        assert abs(error - abs(estimate - exact) / exact) < 1e-3, name
    for name in ("hutchinson", "xdiag"):
        assert numbers(out, f"{name} diagonal (30 products): relative error")[0] < 0.5, name


def test_spectral_density(processes):
    model, loss_func, data = load("example_spectral_density").problem(quick=True)
    exact = torch.linalg.eigvalsh(dense("hessian", model, loss_func, data))
    top_ggn = torch.linalg.eigvalsh(dense("ggn", model, loss_func, data))[-1]

    out = output(processes, "example_spectral_density")
    low, high, mass = numbers(out, "Hessian density: grid")
    assert low <= exact[0] and exact[-1] <= high
    assert abs(mass - 1) < 1e-3
    # Two random start vectors weigh the eigenvalues randomly (about 1/sqrt(D) each), and the
    # smoothing moves mass of eigenvalues near zero across zero: a loose but meaningful bound.
    negative_share = (exact < 0).double().mean()
    assert abs(numbers(out, "Hessian density: mass below zero")[0] - negative_share) < 0.15
    _, high, mass = numbers(out, "GGN log-density: grid")
    assert top_ggn <= high and 0.9 < mass < 1.05


def test_submatrices(processes):
    model, loss_func, data = load("example_submatrices").problem(quick=True)
    G = dense("ggn", model, loss_func, data)
    n1, n2, n3 = (p.numel() for p in list(model.parameters())[:3])
    block, coupling = G[:n1, :n1], G[:n1, n1 + n2 : n1 + n2 + n3]
    scattered = G[::3, ::3]

    out = output(processes, "example_submatrices")
    assert f"first-layer block: ({n1}, {n1}), coupling block: ({n1}, {n3})" in out
    close(numbers(out, "first-layer block: trace"), torch.trace(block))
    close(numbers(out, "coupling block: Frobenius norm"), coupling.norm())
    close(numbers(out, "coupling block, row 0, first 3 entries:"), coupling[0, :3])
    assert f"every third parameter: block {tuple(scattered.shape)}" in out
    close(numbers(out, "every third parameter: block (19, 19), Frobenius norm"), scattered.norm())
    close(numbers(out, "first-layer block: top eigenvalue"), torch.linalg.eigvalsh(block)[-1])


@pytest.mark.skipif(not HAS_CLI, reason="the command line (curvlinops/cli.py) does not exist yet")
def test_report(processes):
    H = dense("hessian", *load("example_report").problem())
    n_first = 4 * 10 + 10  # the first Linear layer's weight and bias

    out = output(processes, "example_report")
    close(numbers(out, "top eigenvalues:"), torch.linalg.eigvalsh(H)[-3:].flip(0))
    estimate, low, high = numbers(out, "trace estimate:")
    assert low <= torch.trace(H) <= high and low <= estimate <= high
    for name, block in (("0", H[:n_first, :n_first]), ("2", H[n_first:, n_first:])):
        label = f"layer {name} ({block.shape[0]} parameters): top eigenvalue"
        close(numbers(out, label), torch.linalg.eigvalsh(block)[-1], rtol=1e-6)
