"""Smoke tests for the example scripts in docs/examples.

The quick-start demo runs in a subprocess exactly as ``make demo`` runs it; its printed numbers
are checked against dense matrices built here independently with plain PyTorch (the Hessian of
the flattened parameters by ``torch.autograd.functional.hessian``, the GGN from the Jacobian and
the closed-form cross-entropy Hessian).
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "docs" / "examples" / "demo_quickstart.py"
FLOAT = r"[-+]?\d+\.\d+(?:e[-+]\d+)?"


def load_demo_module():
    spec = importlib.util.spec_from_file_location("demo_quickstart", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_process():
    """Start the demo in the background, so the dense reference is built meanwhile."""
    process = subprocess.Popen(
        [sys.executable, str(DEMO)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def demo_output(demo_process, dense_reference) -> str:
    stdout, stderr = demo_process.communicate(timeout=120)
    assert demo_process.returncode == 0, stderr
    return stdout


@pytest.fixture(scope="module")
def dense_reference(demo_process):
    """Dense Hessian and GGN of the demo problem, and the demo's random vector ``v``.

    The demo's loss is a cross-entropy mean over equal-sized batches, so the empirical risk is
    the mean over all data points, and the GGN is
    ``(1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n`` with ``p_n`` the softmax output.
    """
    demo = load_demo_module()
    model, loss_func, params, data = demo.make_problem()
    v = demo.random_vector(sum(p.numel() for p in params))

    names = [n for n, p in model.named_parameters() if any(p is q for q in params)]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().flatten() for p in params])
    X = torch.cat([X for X, _ in data])
    y = torch.cat([y for _, y in data])
    assert loss_func.reduction == "mean" and len({X.shape[0] for X, _ in data}) == 1

    def output(flat):
        unflat = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return functional_call(model, unflat, (X,))

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # leave the other core to the demo running meanwhile
    try:
        H = torch.autograd.functional.hessian(
            lambda flat: loss_func(output(flat), y), theta, vectorize=True
        )
        J = jacrev(output)(theta)  # [N, C, D]
        p = output(theta).detach().softmax(dim=1)
        H_out = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # [N, C, C]
        G = torch.einsum("ncd,nce,nef->df", J, H_out, J) / X.shape[0]
    finally:
        torch.set_num_threads(num_threads)
    return H, G, v


def test_demo_prints_all_steps_with_timings(demo_output):
    lines = demo_output.splitlines()
    assert lines[0].startswith("MLP 10-16-16-3 (tanh), 499 parameters")
    for step in ("1) Construct", "2) Matrix-vector", "3) Five largest", "4) Damped"):
        assert any(line.startswith(step) for line in lines), step
    timings = re.findall(rf"^  \[(.+): ({FLOAT}) s\]$", demo_output, flags=re.MULTILINE)
    labels = [label for label, _ in timings]
    assert len(labels) == 6
    assert labels[0].startswith("HessianLinearOperator")
    assert labels[1:] == ["GGNLinearOperator", "H @ v", "GGN @ v", "eigsh", "(GGN + 1e-3 I) @ v"]
    assert all(float(t) >= 0 for _, t in timings)
    assert "shapes: H (499, 499), GGN (499, 499)" in demo_output
    assert re.search(rf"^Done in {FLOAT} s", lines[-1])


def test_demo_eigenvalues_match_dense_ggn(demo_output, dense_reference):
    _, G, _ = dense_reference
    match = re.search(r"eigenvalues: (.+)$", demo_output, flags=re.MULTILINE)
    eigvals = np.array([float(e) for e in match.group(1).split()])
    assert eigvals.shape == (5,)
    assert np.all(np.diff(eigvals) <= 0), "eigenvalues must be printed in descending order"
    assert np.all(eigvals > 0)
    G_np = G.numpy()
    assert np.allclose(G_np, G_np.T, atol=1e-12)
    reference = np.linalg.eigh(G_np)[0][::-1][:5]
    np.testing.assert_allclose(eigvals, reference, rtol=1e-5, atol=1e-10)


def test_demo_products_match_dense_matrices(demo_output, dense_reference):
    H, G, v = dense_reference
    for name, A in (("H", H), ("GGN", G)):
        match = re.search(rf"\|\|{name} v\|\| = ({FLOAT}), v\^T {name} v = ({FLOAT})", demo_output)
        assert match is not None, name
        Av = A @ v
        np.testing.assert_allclose(float(match.group(1)), Av.norm().item(), rtol=1e-5)
        np.testing.assert_allclose(float(match.group(2)), (v @ Av).item(), rtol=1e-5)
    match = re.search(
        rf"max \|\(GGN \+ 1e-3 I\) v - \(GGN v \+ 1e-3 v\)\| = ({FLOAT})", demo_output
    )
    assert match is not None and float(match.group(1)) < 1e-12


def test_example_operators_reject_malformed_arguments():
    from curvlinops.examples import IdentityLinearOperator, OuterProductLinearOperator

    for shape in ([(2, -1)], [(2, 1.5)], [(True,)], (2, 3), "2x3", [3]):
        # before: negative sizes gave a (-2, -2) operator, others a deep TypeError
        with pytest.raises(ValueError, match="shape must be a list of tensor shapes"):
            IdentityLinearOperator(shape, "cpu", torch.float64)
    with pytest.raises(ValueError, match="dtype must be a torch.dtype"):
        IdentityLinearOperator([(2,)], "cpu", "float64")
    identity = IdentityLinearOperator(
        [torch.Size([2, 3]), (np.int64(4),), (0,)], "cpu", torch.float64
    )
    assert identity.shape == (10, 10)
    with pytest.raises(ValueError, match="c and A must be tensors, got list"):
        OuterProductLinearOperator([1.0, 2.0], torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"c of shape \[K\] and A of shape \[D, K\]"):
        OuterProductLinearOperator(torch.ones(3), torch.ones(3, 2))
