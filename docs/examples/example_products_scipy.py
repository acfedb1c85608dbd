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
    # K columns in one pass over the data: here the first four columns of G itself
    M = torch.eye(D, dtype=torch.float64)[:, :4]
    GM = G @ M
    print(f"G @ M: shape {tuple(GM.shape)}")
    print("G @ M, column norms:", " ".join(f"{x:.10e}" for x in GM.norm(dim=0)))
    # list format: one tensor per parameter in, one per parameter out
    list_result = G @ [torch.ones_like(p) for p in params]
    print("G @ list of ones, shapes:", [tuple(t.shape) for t in list_result])
    flat_result = torch.cat([t.reshape(-1) for t in list_result])
    print(f"list format vs flat vector: max difference {(flat_result - G @ v).abs().max():.1e}")

    G_scipy = G.to_scipy()  # a scipy.sparse.linalg.LinearOperator working on NumPy arrays
    v0 = np.random.default_rng(0).standard_normal(D)  # ARPACK's start vector, reproducible
    top = eigsh(G_scipy, k=3, which="LA", v0=v0, return_eigenvectors=False)[::-1]
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
