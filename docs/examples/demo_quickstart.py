"""Quick start: curvature matrices of a small neural network as linear operators.

This script shows the basic workflow of ``curvlinops`` on a deterministic toy problem:

1. a small MLP classifier (float64) and synthetic data (a fixed seed, a few batches),
2. constructing a Hessian and a generalized Gauss-Newton (GGN) operator over all batches
   (construction includes the default determinism check),
3. one Hessian-vector and one GGN-vector product (the matrices are never formed),
4. the five largest GGN eigenvalues via ``GGN.to_scipy()`` and ``scipy.sparse.linalg.eigsh``,
5. a damped GGN ``GGN + delta * I`` built by composing operators.

Every step prints its result and the wall time it took. The script runs in about a second
(plus imports) on one CPU thread and prints the same numbers on every run (up to
floating-point round-off across machines). The first operator's construction time includes
PyTorch's one-time lazy imports on the first backward pass (about half a second), so the
second construction shows the cost of the determinism check itself.

Run it with ``make demo`` or ``python docs/examples/demo_quickstart.py``.
"""

import time
from contextlib import contextmanager

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

from curvlinops import GGNLinearOperator, HessianLinearOperator
from curvlinops.examples import IdentityLinearOperator


@contextmanager
def timed(label: str):
    """Print how long the enclosed block took, after the block's own output."""
    start = time.perf_counter()
    yield
    print(f"  [{label}: {time.perf_counter() - start:.3f} s]")


NUM_BATCHES, BATCH_SIZE = 4, 32
IN_DIM, HIDDEN, NUM_CLASSES = 10, 16, 3
DTYPE = torch.float64


def make_problem():
    """Build the deterministic model, loss, parameters and data (also used by the tests).

    Returns:
        ``(model, loss_func, params, data)`` with ``data`` a list of ``(X, y)`` batches.
    """
    torch.manual_seed(0)
    dtype, in_dim, hidden, num_classes = DTYPE, IN_DIM, HIDDEN, NUM_CLASSES

    # Deterministic synthetic data: Gaussian inputs, labels from a fixed random linear rule.
    W_true = torch.randn(in_dim, num_classes, dtype=dtype)
    data = []
    for _ in range(NUM_BATCHES):
        X = torch.randn(BATCH_SIZE, in_dim, dtype=dtype)
        y = (X @ W_true).argmax(dim=1)
        data.append((X, y))

    model = nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, num_classes),
    ).to(dtype)
    loss_func = nn.CrossEntropyLoss()  # reduction="mean": operators refer to the dataset mean
    params = [p for p in model.parameters() if p.requires_grad]
    return model, loss_func, params, data


def random_vector(dim: int) -> torch.Tensor:
    """The demo's random vector, from its own generator (also used by the tests).

    The operators' determinism check draws from PyTorch's global generator, so the vector
    uses a separate one to stay the same whatever is constructed before it.
    """
    return torch.randn(dim, dtype=DTYPE, generator=torch.Generator().manual_seed(1))


def main():
    """Run the quick start."""
    # The problem is tiny, so intra-op threads only add synchronisation; on a busy machine a
    # second thread made this script 10-30x slower in our runs. One thread keeps times stable.
    torch.set_num_threads(1)
    model, loss_func, params, data = make_problem()
    dtype = DTYPE
    D = sum(p.numel() for p in params)
    print(
        f"MLP {IN_DIM}-{HIDDEN}-{HIDDEN}-{NUM_CLASSES} (tanh), {D} parameters, "
        f"{NUM_BATCHES} batches of {BATCH_SIZE} ({NUM_BATCHES * BATCH_SIZE} data points), "
        f"{str(dtype).removeprefix('torch.')}, 1 CPU thread"
    )

    print("1) Construct operators (includes the default determinism check)")
    with timed("HessianLinearOperator, incl. PyTorch's one-time lazy imports"):
        H = HessianLinearOperator(model, loss_func, params, data)
    with timed("GGNLinearOperator"):
        GGN = GGNLinearOperator(model, loss_func, params, data)
    print(f"  shapes: H {H.shape}, GGN {GGN.shape}")

    v = random_vector(D)
    print("2) Matrix-vector products with a random vector v")
    with timed("H @ v"):
        Hv = H @ v
    print(f"  ||H v|| = {Hv.norm().item():.6f}, v^T H v = {(v @ Hv).item():.6f}")
    with timed("GGN @ v"):
        Gv = GGN @ v
    print(f"  ||GGN v|| = {Gv.norm().item():.6f}, v^T GGN v = {(v @ Gv).item():.6f}")

    print("3) Five largest GGN eigenvalues (GGN.to_scipy() + scipy.sparse.linalg.eigsh)")
    GGN_scipy = GGN.to_scipy()
    v0 = np.random.default_rng(0).standard_normal(D)  # fixed start vector: reproducible
    with timed("eigsh"):
        eigvals = eigsh(GGN_scipy, k=5, which="LA", v0=v0, return_eigenvectors=False)
    eigvals = np.sort(eigvals)[::-1]
    print("  eigenvalues: " + " ".join(f"{e:.6e}" for e in eigvals))

    print("4) Damped GGN by composition: GGN + 1e-3 * I")
    identity = IdentityLinearOperator([p.shape for p in params], GGN.device, GGN.dtype)
    damped = GGN + 1e-3 * identity
    with timed("(GGN + 1e-3 I) @ v"):
        damped_v = damped @ v
    error = (damped_v - (Gv + 1e-3 * v)).abs().max().item()
    print(f"  max |(GGN + 1e-3 I) v - (GGN v + 1e-3 v)| = {error:.1e}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"Done in {time.perf_counter() - start:.2f} s (wall time after imports).")
