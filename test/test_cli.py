"""The ``curvlinops report`` command against dense matrices built here, and its error paths."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from curvlinops import FisherMCLinearOperator
from curvlinops._default_problem import (
    DATA_FILE,
    default_problem,
    load_data,
    synthetic_classification,
    write_data_file,
)
from curvlinops.cli import main
from curvlinops.report import curvature_report

THIS_FILE = Path(__file__).resolve()


# ----------------------------------------------------------- problem functions for --problem
def tiny_problem():
    """A problem function as a user writes it: MSE regression, two batches, float64."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    return model, nn.MSELoss(reduction="sum"), [(X[:6], y[:6]), (X[6:], y[6:])]


def tiny_classification():
    """Cross-entropy with mean reduction, for the MC-Fisher."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return model, nn.CrossEntropyLoss(), [(X[:7], y[:7]), (X[7:], y[7:])]


def not_a_problem():
    return "model", "loss"


def four_things():
    return (*tiny_problem(), "extra")


def not_a_module():
    _, loss_func, data = tiny_problem()
    return (lambda X: X), loss_func, data


def frozen_model():
    model, loss_func, data = tiny_problem()
    model.requires_grad_(False)
    return model, loss_func, data


def unreduced_loss():
    model, _, data = tiny_problem()
    return model, nn.MSELoss(reduction="none"), data


def empty_data():
    model, loss_func, _ = tiny_problem()
    return model, loss_func, []


def one_pass_data():
    model, loss_func, data = tiny_problem()
    return model, loss_func, iter(data)


def unpaired_batches():
    model, loss_func, data = tiny_problem()
    return model, loss_func, [X for X, _ in data]


def mismatched_labels():
    model, _, data = tiny_problem()
    return model, nn.CrossEntropyLoss(), [(X, y[:, 0]) for X, y in data]


def dropout_left_on():
    _, loss_func, data = tiny_problem()
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    return model, loss_func, data


def unsupported_loss():
    model, _, data = tiny_problem()
    return model, nn.L1Loss(), data


def raising_problem():
    raise RuntimeError("no data today\nsecond line")


# ----------------------------------------------------------- independent dense references
def flat_function(model):
    """``f(theta, X)`` of the flattened trainable parameters (the report's ordering)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(flat, X):
        values = dict(zip(names, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))))
        return functional_call(model, values, (X,))

    return f, theta, sizes


def dense_hessian(model, loss_func, data) -> torch.Tensor:
    f, theta, _ = flat_function(model)
    return torch.autograd.functional.hessian(
        lambda t: sum(loss_func(f(t, X), y) for X, y in data), theta
    )


def dense_ggn_cross_entropy_mean(model, data) -> torch.Tensor:
    """(1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n with per-example Jacobians."""
    f, theta, _ = flat_function(model)
    X = torch.cat([x for x, _ in data])
    J = vmap(jacrev(lambda t, x: f(t, x.unsqueeze(0)).squeeze(0)), in_dims=(None, 0))(theta, X)
    p = f(theta, X).softmax(dim=1).detach()
    # diag(p) - p p^T = S S^T with S = diag(sqrt p) - p sqrt(p)^T, because sum(p) = 1
    S = torch.diag_embed(p.sqrt()) - p.unsqueeze(2) * p.sqrt().unsqueeze(1)
    B = torch.einsum("ncd,nce->ned", J, S).reshape(-1, theta.numel())  # rows (J_n^T S_n)^T
    return B.T @ B / X.shape[0]


def dense_ef_mse_sum(model, data) -> torch.Tensor:
    """sum_n g_n g_n^T with g_n the gradient of the n-th example's summed squared error."""
    f, theta, _ = flat_function(model)
    X, y = torch.cat([x for x, _ in data]), torch.cat([t for _, t in data])
    per_example = vmap(
        grad(lambda t, x, t_y: ((f(t, x.unsqueeze(0)).squeeze(0) - t_y) ** 2).sum()),
        in_dims=(None, 0, 0),
    )(theta, X, y)
    return per_example.T @ per_example


def block_top_eigenvalues(A: torch.Tensor, sizes):
    blocks = zip(torch.tensor(sizes).cumsum(0) - torch.tensor(sizes), sizes)
    return [torch.linalg.eigvalsh(A[s : s + n, s : s + n])[-1].item() for s, n in blocks]


def layer_sizes(model):
    sizes = {}
    for name, p in model.named_parameters():
        module = name.rpartition(".")[0]
        sizes[module] = sizes.get(module, 0) + p.numel()
    return list(sizes.values())


# ----------------------------------------------------------- helpers
def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_report_against(report, A: torch.Tensor, k: int, sizes, rtol=1e-8):
    exact = torch.linalg.eigvalsh(A).flip(0)
    assert report["num_parameters"] == A.shape[0]
    torch.testing.assert_close(
        torch.tensor(report["eigenvalues"], dtype=torch.float64), exact[:k], rtol=rtol, atol=1e-12
    )
    low, high = report["trace"]["ci95"]
    assert low <= torch.trace(A).item() <= high
    assert low <= report["trace"]["estimate"] <= high
    layers = report["layers"]
    assert [layer["num_parameters"] for layer in layers] == sizes
    assert sum(layer["share"] for layer in layers) == pytest.approx(1.0, abs=1e-12)
    # the layer traces come from the same products as the total, so they add up exactly
    assert sum(layer["trace"] for layer in layers) == pytest.approx(
        report["trace"]["estimate"], rel=1e-10
    )
    for layer, top in zip(layers, block_top_eigenvalues(A, sizes)):
        assert layer["top_eigenvalue"] == pytest.approx(top, rel=1e-6, abs=1e-12)


# ----------------------------------------------------------- tests
def test_shipped_data_file_is_the_generator_output(tmp_path):
    check_shipped_data_file(tmp_path)


def test_shipped_data_file_check_tolerates_another_cpus_last_bit(tmp_path, monkeypatch):
    """On another CPU torch.sin may round the other way; the file still counts as its output.

    Simulated by moving every sine to the next float towards +inf; a bit-for-bit comparison
    (the test before) failed on such a machine.
    """
    sin = torch.sin

    def sin_on_another_cpu(x):
        return torch.nextafter(sin(x), torch.full_like(x, 2.0))

    X_here, _ = synthetic_classification(0)
    monkeypatch.setattr(torch, "sin", sin_on_another_cpu)
    X_shifted, _ = synthetic_classification(0)
    assert not torch.equal(X_shifted, X_here)  # the shift shows (same process, same kernels)
    check_shipped_data_file(tmp_path)


def check_shipped_data_file(tmp_path):
    X, y = load_data()
    X_new, y_new = synthetic_classification(0)
    # torch.sin's last bit depends on the CPU's vector instructions: the file, written on one
    # machine, matches the generator on another only up to round-off
    torch.testing.assert_close(X_new, X, rtol=1e-13, atol=1e-13)
    assert torch.equal(y, y_new)  # integer labels: exact
    assert X.shape == (1024, 10) and X.dtype == torch.float64
    assert torch.equal(torch.bincount(y), torch.full((4,), 256))
    # the .npz round trip itself is lossless (same process, same values)
    assert load_data(write_data_file(tmp_path / "copy.npz"))[0].equal(X_new)
    assert DATA_FILE.stat().st_size < 200_000
    with pytest.raises(FileNotFoundError, match="python -m curvlinops._default_problem"):
        load_data(tmp_path / "missing.npz")


def test_default_problem_report_matches_dense_ggn(capsys, tmp_path):
    json_path, plot_path = tmp_path / "report.json", tmp_path / "density.png"
    code, out, err = run(
        capsys, "report", "--no-progress", "--json", str(json_path), "--plot", str(plot_path)
    )
    assert code == 0, err
    assert "top 5 eigenvalues" in out and "95% CI" in out and "1.96 std/sqrt(n)" in out
    assert err == ""  # --no-progress: no bars
    report = json.loads(json_path.read_text())
    assert report["matrix"] == "ggn" and report["num_data"] == 1024
    assert report["density"]["scale"] == "log"
    grid, density = (torch.tensor(report["density"][key]) for key in ("grid", "density"))
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=0.02)
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model, _, data = default_problem()
    check_report_against(
        report, dense_ggn_cross_entropy_mean(model, data), 5, sizes=[352, 1056, 132]
    )
    for layer in report["layers"]:  # the table shows every layer with its share
        assert f"{100 * layer['share']:.1f}%" in out


def test_user_problem_function_hessian(capsys, tmp_path):
    json_path, plot_path = tmp_path / "r.json", tmp_path / "density.png"
    code, out, err = run(
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
    assert code == 0, err
    report = json.loads(json_path.read_text())
    model, loss_func, data = tiny_problem()
    check_report_against(report, dense_hessian(model, loss_func, data), 3, layer_sizes(model))
    assert [layer["name"] for layer in report["layers"]] == ["0", "2"]
    assert report["density"]["scale"] == "linear"
    density = torch.tensor(report["density"]["density"])
    grid = torch.tensor(report["density"]["grid"])
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=0.02)
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bars_go_to_stderr(capsys):
    code, out, err = run(capsys, "report", "--problem", f"{THIS_FILE}:tiny_problem", "--k", "1")
    assert code == 0
    for bar in ("curvlinops report (ggn)", "eigsh", "Lanczos", "per-layer"):
        assert bar in err and bar not in out


def test_mc_fisher_uses_the_seed_for_its_samples(capsys, tmp_path):
    def report_for(seed):
        path = tmp_path / f"mc{seed}.json"
        argv = ["report", "--problem", f"{THIS_FILE}:tiny_classification", "--no-progress"]
        argv += ["--matrix", "mc_fisher", "--k", "2", "--seed", str(seed), "--json", str(path)]
        assert run(capsys, *argv)[0] == 0
        return json.loads(path.read_text())

    model, loss_func, data = tiny_classification()
    sizes = layer_sizes(model)
    for seed in (1, 2):
        # the direct library call with the same seed: its dense matrix and diagonal blocks
        F = FisherMCLinearOperator(model, loss_func, list(model.parameters()), data, seed=seed)
        dense = F @ torch.eye(F.shape[0], dtype=torch.float64)
        check_report_against(report_for(seed), dense, 2, sizes)
    assert report_for(1)["eigenvalues"] != report_for(2)["eigenvalues"]


def test_module_entry_point_ef_against_per_example_gradients(tmp_path):
    json_path = tmp_path / "ef.json"
    result = subprocess.run(
        [sys.executable, "-m", "curvlinops", "report", "--problem", "test_cli:tiny_problem"]
        + ["--k", "2", "--matrix", "ef", "--num-samples", "300", "--no-progress"]
        + ["--json", str(json_path)],
        cwd=THIS_FILE.parent,  # the module form imports from the working directory
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "top 2 eigenvalues" in result.stdout
    assert "ef of a model with 32 parameters on 10 data points" in result.stdout
    model, _, data = tiny_problem()
    check_report_against(
        json.loads(json_path.read_text()), dense_ef_mse_sum(model, data), 2, layer_sizes(model)
    )


def test_same_seed_same_report_and_no_files_on_success_paths_unless_asked(capsys, tmp_path):
    argv = ["report", "--problem", f"{THIS_FILE}:tiny_problem", "--k", "2", "--no-progress"]
    first, second = run(capsys, *argv, "--seed", "5"), run(capsys, *argv, "--seed", "5")
    other = run(capsys, *argv, "--seed", "6")
    assert first == second
    assert first[1] != other[1]  # the trace vectors differ
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--problem", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
        (["--problem", f"{THIS_FILE}:missing"], "has no function 'missing'"),
        (["--problem", f"{THIS_FILE}:not_a_problem"], "must return a tuple (model, loss_func"),
        (["--problem", f"{THIS_FILE}:four_things"], "got a tuple of length 4"),
        (["--problem", f"{THIS_FILE}:not_a_module"], "model must be an nn.Module, got function"),
        (["--problem", f"{THIS_FILE}:frozen_model"], "no trainable parameters"),
        (["--problem", f"{THIS_FILE}:unreduced_loss"], "reduction 'mean' or 'sum'"),
        (["--problem", f"{THIS_FILE}:empty_data"], "data is empty"),
        (["--problem", f"{THIS_FILE}:one_pass_data"], "one-pass iterator"),
        (["--problem", f"{THIS_FILE}:unpaired_batches"], "must be a pair (X, y)"),
        (["--problem", f"{THIS_FILE}:mismatched_labels"], "fails on the first batch"),
        (["--problem", f"{THIS_FILE}:dropout_left_on"], "Non-deterministic"),
        (
            ["--problem", f"{THIS_FILE}:unsupported_loss", "--matrix", "ef"],
            "the ef cannot be built for this model, loss and data: NotImplementedError",
        ),
        (
            ["--problem", f"{THIS_FILE}:raising_problem"],
            "raised RuntimeError: no data today second line",
        ),
        (["--problem", "missing_colon"], "must have the form MODULE:FUNCTION"),
        (["--problem", "nowhere/file.py:f"], "does not exist"),
        (["--matrix", "curvature"], "invalid choice: 'curvature'"),
        (["--problem", f"{THIS_FILE}:tiny_problem", "--k", "32"], "less than the dimension 32"),
        (["--k", "0"], "--k must be at least 1"),
        (["--k", "three"], "invalid int value"),
        (["--json", "/nonexistent_dir/report.json"], "--json: cannot write"),
        (["--plot", "/nonexistent_dir/plot.png"], "--plot: cannot write"),
        (["--json", "."], "is a directory"),
        (["--num-samples", "1"], "--num-samples must be at least 2"),
        (["--lanczos-steps", "1"], "--lanczos-steps must be at least 2"),
        (["--unknown-option"], "unrecognized arguments: --unknown-option"),
    ],
)
def test_errors_are_one_line_with_status_2(capsys, argv, message):
    code, out, err = run(capsys, "report", "--no-progress", *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("curvlinops report: error: ")
    assert message in err
    assert "Traceback" not in err and "curvlinops report:" not in out


def test_unwritable_output_is_detected_before_the_computation(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr("curvlinops.cli.load_problem", lambda spec: calls.append(spec))
    for option in ("--json", "--plot"):
        code, _, err = run(capsys, "report", option, "/nonexistent_dir/out")
        assert code == 2 and f"{option}: cannot write" in err
    assert calls == []  # the problem was never loaded, so nothing long ran


def test_missing_command(capsys):
    code, _, err = run(capsys)
    assert code == 2 and err.count("\n") == 1 and "curvlinops report" in err


def test_plot_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    code, out, err = run(capsys, "report", "--plot", str(tmp_path / "x.png"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "pip install curvlinops[plot]" in err
    assert not (tmp_path / "x.png").exists()


def test_help_states_the_interval_and_the_default_problem(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert exit_info.value.code == 0
    assert "95% confidence interval" in out and "%%" not in out
    assert "mean +- 1.96" in out and "float64" in out and "pip install curvlinops[plot]" in out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k=0 must be at least 1"),
        ({"k": -2}, "k=-2 must be at least 1"),
        ({"k": 2.0}, "k must be an integer, got 2.0"),
        ({"k": True}, "k must be an integer, got True"),
        ({"num_samples": 1}, "num_samples=1 must be at least 2"),
        ({"num_samples": 0}, "num_samples=0 must be at least 2"),
        ({"num_samples": 10.5}, "num_samples must be an integer"),
        ({"lanczos_steps": 1}, "lanczos_steps=1 must be at least 2"),
        ({"lanczos_steps": 0}, "lanczos_steps=0 must be at least 2"),
        ({"lanczos_steps": "8"}, "lanczos_steps must be an integer"),
        ({"num_points": 1}, "num_points=1 must be at least 2"),
        ({"num_points": -5}, "num_points=-5 must be at least 2"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"seed": None}, "seed must be an integer, got None"),
        ({"batch_size_fn": 3}, "batch_size_fn must be a callable"),
        ({"matrix": "fisher"}, "unknown matrix 'fisher'"),
        ({"model": lambda X: X}, "model must be an nn.Module, got function"),
    ],
)
def test_curvature_report_rejects_out_of_range_arguments(kwargs, message):
    """Each bad argument is named before any pass over the data (which would fail later)."""
    model, loss_func, data = tiny_problem()

    def poisoned():  # the data is never touched when an argument is wrong
        raise AssertionError("data read before the arguments were checked")
        yield

    class Untouchable:
        def __iter__(self):
            return poisoned()

    kwargs = {"model": model, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        curvature_report(loss_func=loss_func, data=Untouchable(), **kwargs)
    # and the same problem with valid arguments runs (the range limits are inclusive)
    if "k" in kwargs and kwargs["k"] == 0:
        curvature_report(model, loss_func, data, k=1, num_samples=2, lanczos_steps=2, num_points=2)
