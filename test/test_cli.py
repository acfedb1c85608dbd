"""The ``curvlinops report`` command against dense matrices built here, and its error paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from curvlinops._default_problem import default_problem
from curvlinops.cli import main

THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parent.parent


def tiny_problem():
    """A problem function as a user writes it: MSE regression, two batches, float64."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    return model, nn.MSELoss(reduction="sum"), [(X[:6], y[:6]), (X[6:], y[6:])]


def not_a_problem():
    return "model", "loss"


def raising_problem():
    raise RuntimeError("no data today")


def dense_hessian(model, loss_func, data) -> torch.Tensor:
    params = dict(model.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def risk(flat):
        values = dict(zip(names, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))))
        return sum(loss_func(functional_call(model, values, (X,)), y) for X, y in data)

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    return torch.autograd.functional.hessian(risk, flat)


def dense_ggn_cross_entropy_mean(model, data) -> torch.Tensor:
    """(1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n, the Jacobians by ``jacrev``."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    X = torch.cat([x for x, _ in data])
    J = jacrev(lambda p: functional_call(model, p, (X,)))(params)
    J = torch.cat([J[n].reshape(X.shape[0], -1, params[n].numel()) for n in params], dim=2)
    probs = model(X).softmax(dim=1).detach()
    H = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)
    return torch.einsum("nci,ncd,ndj->ij", J, H, J) / X.shape[0]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_default_problem_report_matches_dense_ggn(capsys, tmp_path):
    json_path = tmp_path / "report.json"
    code, out, _ = run(capsys, "report", "--no-progress", "--json", str(json_path))
    assert code == 0
    assert "top 5 eigenvalues" in out and "95% CI" in out
    report = json.loads(json_path.read_text())
    model, _, data = default_problem()
    G = dense_ggn_cross_entropy_mean(model, data)
    exact = torch.linalg.eigvalsh(G).flip(0)
    assert report["matrix"] == "ggn" and report["num_parameters"] == G.shape[0]
    torch.testing.assert_close(
        torch.tensor(report["eigenvalues"], dtype=torch.float64), exact[:5], rtol=1e-8, atol=0
    )
    low, high = report["trace"]["ci95"]
    assert low <= torch.trace(G).item() <= high
    assert sum(layer["share"] for layer in report["layers"]) == pytest.approx(1.0, abs=1e-12)
    start = 0
    for layer in report["layers"]:
        end = start + layer["num_parameters"]
        block_top = torch.linalg.eigvalsh(G[start:end, start:end])[-1].item()
        assert layer["top_eigenvalue"] == pytest.approx(block_top, rel=1e-8)
        start = end
    assert start == G.shape[0]


def test_user_problem_function_hessian(capsys, tmp_path):
    json_path, plot_path = tmp_path / "r.json", tmp_path / "density.png"
    code, out, _ = run(
        capsys,
        "report",
        "--problem",
        f"{THIS_FILE}:tiny_problem",
        "--matrix",
        "hessian",
        "--k",
        "3",
        "--num-samples",
        "200",
        "--no-progress",
        "--json",
        str(json_path),
        "--plot",
        str(plot_path),
    )
    assert code == 0, out
    report = json.loads(json_path.read_text())
    H = dense_hessian(*tiny_problem())
    exact = torch.linalg.eigvalsh(H).flip(0)
    torch.testing.assert_close(
        torch.tensor(report["eigenvalues"], dtype=torch.float64), exact[:3], rtol=1e-8, atol=0
    )
    low, high = report["trace"]["ci95"]
    assert low <= torch.trace(H).item() <= high
    assert report["density"]["scale"] == "linear"
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [layer["name"] for layer in report["layers"]] == ["0", "2"]


def test_module_entry_point_and_module_form_of_problem(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "curvlinops",
            "report",
            "--problem",
            "test_cli:tiny_problem",
            "--k",
            "2",
            "--matrix",
            "ef",
            "--no-progress",
        ],
        cwd=THIS_FILE.parent,  # the module form imports from the working directory
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "top 2 eigenvalues" in result.stdout
    assert "ef of a model with 32 parameters on 10 data points" in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--problem", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
        (["--problem", f"{THIS_FILE}:missing"], "has no function 'missing'"),
        (["--problem", f"{THIS_FILE}:not_a_problem"], "must return a tuple (model, loss_func"),
        (["--problem", f"{THIS_FILE}:raising_problem"], "raised RuntimeError: no data today"),
        (["--problem", "missing_colon"], "must have the form MODULE:FUNCTION"),
        (["--problem", "nowhere/file.py:f"], "does not exist"),
        (["--matrix", "curvature"], "invalid choice: 'curvature'"),
        (["--problem", f"{THIS_FILE}:tiny_problem", "--k", "32"], "less than the dimension 32"),
        (["--problem", f"{THIS_FILE}:tiny_problem", "--k", "0"], "at least 1"),
        (["--json", "/nonexistent_dir/report.json"], "--json: cannot write"),
        (["--plot", "/nonexistent_dir/plot.png"], "--plot: cannot write"),
        (["--num-samples", "1"], "--num-samples must be at least 2"),
        (["--k", "three"], "invalid int value"),
    ],
)
def test_errors_are_one_line_with_status_2(capsys, argv, message):
    code, out, err = run(capsys, "report", "--no-progress", *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("curvlinops report: error: ")
    assert message in err
    assert "Traceback" not in err and out == ""


def test_missing_command(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "curvlinops report" in err


def test_plot_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    code, _, err = run(capsys, "report", "--plot", str(tmp_path / "x.png"))
    assert code == 2
    assert "pip install curvlinops[plot]" in err
    assert not (tmp_path / "x.png").exists()


def test_help_states_the_interval(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "95% confidence interval" in out and "%%" not in out
