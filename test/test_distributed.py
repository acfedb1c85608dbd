"""Data-parallel operators (``process_group``) against single-process ones, gloo on CPU.

Each test starts 2 (or 3) worker processes (``test/_distributed_worker.py``) with a hard timeout,
so that a hanging collective fails the test instead of blocking CI.
"""

import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_distributed_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, world: int, timeout: float):
    """Run ``scenario`` on ``world`` processes; fail on a non-zero exit or a timeout."""
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, scenario, str(rank), str(world), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{scenario}: ranks did not finish within {timeout} s (hang?)")
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
        assert f"rank {rank}: ok" in out


def test_exact_operators_two_ranks():
    """Every exact operator, KFAC family, diagonals, solvers, estimators on unequal shards."""
    run_ranks("exact", 2, timeout=150)


def test_three_ranks():
    """Three ranks, one batch each."""
    run_ranks("three", 3, timeout=60)


def test_errors_ddp_and_jacobians():
    """An error on one rank raises everywhere within seconds; DDP; Jacobians refused."""
    run_ranks("errors", 2, timeout=60)


def test_kfac_fallback_and_transformer_two_ranks():
    """KFAC/EKFAC with ``fallback="diagonal"``; KFAC/EKFAC on a tiny transformer with padding."""
    run_ranks("kfac_extras", 2, timeout=90)


def small_problem():
    """A ``--problem`` for the CLI test: cross-entropy (mean), three batches of unequal size."""
    import torch
    from torch import nn

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(15, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (15,))
    return model, nn.CrossEntropyLoss(), [(X[:7], y[:7]), (X[7:10], y[7:10]), (X[10:], y[10:])]


def test_cli_report_under_torchrun(tmp_path):
    """``torchrun --nproc-per-node=2 -m curvlinops report`` prints the single-process report."""
    import json

    problem = ["--problem", f"{os.path.abspath(__file__)}:small_problem", "--no-progress"]
    options = [*problem, "--k", "2", "--num-samples", "8", "--lanczos-steps", "8"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}

    def run(launcher, json_path):
        command = [*launcher, "-m", "curvlinops", "report", *options, "--json", str(json_path)]
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
        )
        assert done.returncode == 0, done.stderr[-4000:]
        return [line for line in done.stdout.splitlines() if "written to" not in line]

    single = run([sys.executable], tmp_path / "single.json")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    distributed = run([*torchrun, f"--master-port={_free_port()}"], tmp_path / "dist.json")
    assert distributed == single  # printed once (rank 0), the same numbers
    a = json.loads((tmp_path / "single.json").read_text())
    b = json.loads((tmp_path / "dist.json").read_text())
    assert a["num_data"] == b["num_data"] == 15
    numbers_a, numbers_b = _numbers(a), _numbers(b)
    assert len(numbers_a) == len(numbers_b) > 10
    for x, y in zip(numbers_a, numbers_b):
        assert abs(x - y) <= 1e-9 * max(abs(x), 1e-12), (x, y)


def _numbers(tree) -> list:
    """All numbers of a JSON tree, in order."""
    if isinstance(tree, dict):
        return [n for key in sorted(tree) for n in _numbers(tree[key])]
    if isinstance(tree, list):
        return [n for item in tree for n in _numbers(item)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []
