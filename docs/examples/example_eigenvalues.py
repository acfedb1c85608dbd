"""Extreme eigenvalues of the Hessian with curvlinops' PyTorch Lanczos (``curvlinops.eigen.eigsh``).

``eigsh`` runs thick-restart Lanczos on the operator's device and dtype without leaving
PyTorch (no NumPy round trips), with a ``torch.Generator`` for a reproducible start vector.
The script computes the largest and the smallest Hessian eigenvalues (the Hessian of a trained
network is indefinite: negative eigenvalues show directions of negative curvature), the top
eigenvector in list format (one tensor per parameter), and compares with SciPy's ARPACK.

Run: ``python docs/examples/example_eigenvalues.py`` (``--quick`` for a smaller problem).
"""

import argparse

import torch
from scipy.sparse.linalg import eigsh as scipy_eigsh
from torch import nn

from curvlinops import HessianLinearOperator
from curvlinops.eigen import eigsh


def problem(quick: bool = False):
    """A small float64 MLP regression problem, trained briefly so that it is not at random."""
    torch.manual_seed(0)
    width = 8 if quick else 32
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2)).double()
    X = torch.randn(64, 4, dtype=torch.float64)
    y = torch.stack([X[:, 0].sin(), X[:, 1] * X[:, 2]], dim=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(50):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        optimizer.step()
    return model, nn.MSELoss(), [(X[:32], y[:32]), (X[32:], y[32:])]


def main(quick: bool = False):
    model, loss_func, data = problem(quick)
    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, loss_func, params, data)
    generator = torch.Generator().manual_seed(0)

    largest, vectors = eigsh(H, k=3, which="LA", generator=generator, list_format=True)
    smallest = eigsh(H, k=2, which="SA", generator=generator, return_eigenvectors=False)
    print("largest 3 eigenvalues:", " ".join(f"{x:.10e}" for x in largest.flip(0)))
    print("smallest 2 eigenvalues:", " ".join(f"{x:.10e}" for x in smallest))
    # list format: one tensor per parameter with the k eigenvectors on the trailing axis
    top_vector = [v[..., -1] for v in vectors]
    print("top eigenvector, shapes:", [tuple(v.shape) for v in top_vector])
    Hv = H @ top_vector
    residual = sum(((a - largest[-1] * v) ** 2).sum() for a, v in zip(Hv, top_vector)).sqrt()
    print(f"top eigenpair: residual ||H v - lambda v|| = {residual:.1e}")

    arpack = scipy_eigsh(H.to_scipy(), k=3, which="LA", return_eigenvectors=False)[::-1]
    print("largest 3 eigenvalues (scipy):", " ".join(f"{x:.10e}" for x in arpack))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problem, for the tests")
    main(parser.parse_args().quick)
