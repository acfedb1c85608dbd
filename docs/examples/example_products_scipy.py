"""Matrix products with curvature operators, and handing them to SciPy.

Shows how to build a Hessian and a GGN operator over a data set, multiply them with one vector
and with several at once (a ``[D, K]`` matrix, or a list of tensors shaped like the
parameters), and export them with ``.to_scipy()`` to SciPy's ``eigsh`` (top eigenvalues) and
``cg`` (a damped Newton step). The matrices are never formed.

Run: ``python docs/examples/example_products_scipy.py`` (``--quick`` for a smaller problem).
"""

import argparse

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, cg, eigsh
from torch import nn

from curvlinops import GGNLinearOperator, HessianLinearOperator


def problem(quick: bool = False):
    """A small float64 MLP classifier and four batches of synthetic data."""
    torch.manual_seed(0)
    width = 8 if quick else 32
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3)).double()
    data = [(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(4)]
    return model, nn.CrossEntropyLoss(), data


def main(quick: bool = False):
    model, loss_func, data = problem(quick)
    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, loss_func, params, data)
    G = GGNLinearOperator(model, loss_func, params, data)
    D = G.shape[0]
    print(f"parameters: {D}")

    v = torch.ones(D, dtype=torch.float64)
    print("H @ ones, first 3 entries:", " ".join(f"{x:.10e}" for x in (H @ v)[:3]))
    M = torch.eye(D, dtype=torch.float64)[:, :4]  # four columns in one pass over the data
    print("G @ first four unit vectors, entry [0, 0]:", f"{(G @ M)[0, 0]:.10e}")
    list_input = [torch.ones_like(p) for p in params]  # list format: shaped like the params
    print("list format gives one tensor per parameter:", [tuple(t.shape) for t in G @ list_input])

    G_scipy = G.to_scipy()  # a scipy.sparse.linalg.LinearOperator working on NumPy arrays
    top = eigsh(G_scipy, k=3, which="LA", return_eigenvectors=False)[::-1]
    print("top 3 GGN eigenvalues (scipy eigsh):", " ".join(f"{x:.10e}" for x in top))

    # A damped Gauss-Newton step: solve (G + damping I) x = gradient with SciPy's CG.
    damping = 1e-2
    gradient = torch.cat([g.reshape(-1) for g in G.gradient_and_loss()[0]]).numpy()
    damped = LinearOperator(G_scipy.shape, matvec=lambda x: G_scipy @ x + damping * x)
    step, info = cg(damped, gradient, rtol=1e-12, atol=0, maxiter=10 * D)
    residual = np.linalg.norm(damped @ step - gradient) / np.linalg.norm(gradient)
    print(f"CG converged: {info == 0}, relative residual: {residual:.2e}")
    print("Newton step, first 3 entries:", " ".join(f"{x:.10e}" for x in step[:3]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problem, for the tests")
    main(parser.parse_args().quick)
