"""Data-parallel curvature: 1 vs 2 processes (gloo, one thread each) on the same total data.

Times, on rank 0 and as medians over repeats (after one warm-up), the GGN and Hessian products
with 1 and 16 columns, building KFAC (type-2 factors) and a 20-step Lanczos run on the GGN, for
one process holding all batches and for two processes holding half of them each
(``process_group=WORLD``). The communication share is the time spent inside
``torch.distributed`` collectives (the status agreements, all-reduces and broadcasts of
:mod:`curvlinops._distributed`), which includes waiting for the slower rank.

Usage: ``python benchmarks/bench_distributed.py [--quick]`` (run from the project root).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASKS = ("GGN K=1", "GGN K=16", "Hessian K=1", "Hessian K=16", "KFAC build", "Lanczos 20")


def _problem(num_points: int, batch_size: int):
    """A 64-128-128-10 tanh MLP with mean cross-entropy on synthetic float64 data."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    ).double()
    X = torch.randn(num_points, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (num_points,))
    data = [
        (X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, num_points, batch_size)
    ]
    return model, nn.CrossEntropyLoss(), data


def _worker(rank: int, world: int, port: str, repeats: int, num_points: int):
    """Run the tasks on this rank; rank 0 prints a JSON line of medians and comm shares."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    import curvlinops as cl
    from curvlinops.papyan2020traces.spectrum import fast_lanczos

    group = None
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=300),
        )
        group = dist.group.WORLD
        comm = {"time": 0.0}
        for name in ("all_reduce", "broadcast"):  # time every collective curvlinops calls
            original = getattr(dist, name)

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    comm["time"] += time.perf_counter() - start

            setattr(dist, name, timed)
    model, loss_func, data = _problem(num_points, 128)
    mine = data[rank::world]
    params = [p for p in model.parameters()]
    kw = dict(check_deterministic=False, process_group=group)
    G = cl.GGNLinearOperator(model, loss_func, params, mine, **kw)
    H = cl.HessianLinearOperator(model, loss_func, params, mine, **kw)
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(G.shape[1], 16, dtype=torch.float64, generator=gen)
    tasks = {
        "GGN K=1": lambda: G @ V[:, 0],
        "GGN K=16": lambda: G @ V,
        "Hessian K=1": lambda: H @ V[:, 0],
        "Hessian K=16": lambda: H @ V,
        "KFAC build": lambda: cl.KFACLinearOperator(
            model, loss_func, params, mine, fisher_type="type-2", **kw
        ).compute_kronecker_factors(),
        "Lanczos 20": lambda: fast_lanczos(G, 20, generator=torch.Generator().manual_seed(1)),
    }
    results = {}
    for name, task in tasks.items():
        times, shares = [], []
        for repeat in range(repeats + 1):
            if group is not None:
                dist.barrier()
                comm["time"] = 0.0
            start = time.perf_counter()
            task()
            elapsed = time.perf_counter() - start
            if repeat > 0:  # the first run warms up
                times.append(elapsed)
                shares.append(comm["time"] / elapsed if group is not None else 0.0)
        results[name] = {"time": statistics.median(times), "comm": statistics.median(shares)}
    if rank == 0:
        print("RESULT " + json.dumps(results))
    if group is not None:
        dist.destroy_process_group()


def _run(world: int, repeats: int, num_points: int) -> dict:
    """Start ``world`` worker processes and return rank 0's results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(r), str(world), port, str(repeats)]
            + [str(num_points)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for r in range(world)
    ]
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed: {outputs}")
    line = next(x for x in outputs[0].splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, port, repeats, num_points = sys.argv[2:7]
        _worker(int(rank), int(world), port, int(repeats), int(num_points))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 instead of 7 repeats")
    parser.add_argument("--num-points", type=int, default=2048)
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    one = _run(1, repeats, args.num_points)
    two = _run(2, repeats, args.num_points)
    import torch

    print(
        f"torch {torch.__version__}, gloo on CPU, 1 thread per process, float64, "
        f"{args.num_points} data points in batches of 128, median of {repeats} runs"
    )
    print(f"{'task':<14}{'1 proc [s]':>12}{'2 procs [s]':>13}{'speed-up':>10}{'comm share':>12}")
    for name in TASKS:
        t1, t2 = one[name]["time"], two[name]["time"]
        print(f"{name:<14}{t1:>12.4f}{t2:>13.4f}{t1 / t2:>10.2f}{two[name]['comm']:>11.1%}")


if __name__ == "__main__":
    main()
