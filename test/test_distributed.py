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
