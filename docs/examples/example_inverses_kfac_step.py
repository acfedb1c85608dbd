"""Inverse curvature: CG and Neumann solves, and KFAC-preconditioned training steps.

1. ``CGInverseLinearOperator`` represents ``(G + damping I)^{-1}`` for the damped GGN; its
   product with the gradient is a damped Gauss-Newton step, solved by conjugate gradients in
   PyTorch (batched over columns).
2. ``NeumannInverseLinearOperator`` approximates the same inverse by a truncated Neumann series
   (cheap per term, slow to converge for ill-conditioned matrices).
3. ``KFACLinearOperator`` + ``KFACInverseLinearOperator`` as an optimizer preconditioner: each
   step moves the parameters by ``-lr (K + damping I)^{-1} g`` with ``K`` the KFAC
   approximation of the GGN (``fisher_type="type-2"``: exact loss-Hessian square roots, no
   sampling), and every few steps the Kronecker factors are recomputed at the current
   parameters. ``use_exact_damping=True`` inverts ``K + damping I`` itself; the default
   damps the two Kronecker factors instead, which is cheaper but a different matrix.

Run: ``python docs/examples/example_inverses_kfac_step.py`` (``--quick``: fewer steps).
"""

import argparse

import torch
from torch import nn

from curvlinops import (
    CGInverseLinearOperator,
    FisherType,
    GGNLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    NeumannInverseLinearOperator,
)
from curvlinops.examples import IdentityLinearOperator


def problem(quick: bool = False):
    """A float64 MLP classifier on two Gaussian blobs per class, in four batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    y = torch.arange(128) % 3
    X = torch.randn(128, 6, dtype=torch.float64) + 1.5 * nn.functional.one_hot(y, 6).double()
    return model, nn.CrossEntropyLoss(), list(zip(X.split(32), y.split(32)))


def dataset_loss(model, loss_func, data) -> float:
    """The mean loss over all data points (the batches may differ in size)."""
    num_data = sum(len(y) for _, y in data)
    with torch.no_grad():
        return sum(loss_func(model(X), y).item() * len(y) for X, y in data) / num_data


def main(quick: bool = False):
    model, loss_func, data = problem(quick)
    params = [p for p in model.parameters() if p.requires_grad]
    damping = 1e-1

    G = GGNLinearOperator(model, loss_func, params, data)
    identity = IdentityLinearOperator([p.shape for p in params], G.device, G.dtype)
    damped = G + damping * identity
    gradient = torch.cat([g.reshape(-1) for g in G.gradient_and_loss()[0]])

    # CG's defaults stop after about 11 iterations; ask for an accurate solve.
    step = CGInverseLinearOperator(damped, tolerance=1e-10, max_iter=500) @ gradient
    residual = (damped @ step - gradient).norm() / gradient.norm()
    print(f"CG: relative residual of (G + {damping} I) x = g: {residual:.2e}")
    print("CG step, first 3 entries:", " ".join(f"{x:.10e}" for x in step[:3]))

    # The Neumann series converges if the scaled operator's eigenvalues lie in (0, 2).
    neumann = NeumannInverseLinearOperator(damped, num_terms=200, scale=0.5)
    distance = (neumann @ gradient - step).norm() / step.norm()
    print(f"Neumann (200 terms): relative distance to the CG step: {distance:.2e}")

    # KFAC-preconditioned gradient descent: p <- p - lr (K + damping I)^{-1} g.
    lr, steps, refresh = 0.2, (5 if quick else 30), 5
    print(f"loss before KFAC steps: {dataset_loss(model, loss_func, data):.10f}")
    K = KFACLinearOperator(
        model, loss_func, params, data, fisher_type=FisherType.TYPE2, check_deterministic=False
    )
    for step_index in range(steps):
        if step_index % refresh == 0:
            if step_index > 0:
                K.compute_kronecker_factors()  # factors at the current parameters
            # The inverse caches its factor eigendecompositions, so it is rebuilt with K.
            K_inv = KFACInverseLinearOperator(K, damping=damping, use_exact_damping=True)
        gradient = K.gradient_and_loss()[0]  # list format: one tensor per parameter
        direction = K_inv @ gradient  # list format in, list format out
        if step_index == 0:
            # (K + damping I) d = g up to round-off: the inverse is exact, not iterative
            Kd = K @ direction
            error = max(
                (a + damping * d - g).abs().max() for a, d, g in zip(Kd, direction, gradient)
            )
            flat = torch.cat([d.reshape(-1) for d in direction])
            print(f"first KFAC direction: max |(K + {damping} I) d - g| = {error:.1e}")
            print("first KFAC direction, first 3 entries:", " ".join(f"{x:.10e}" for x in flat[:3]))
            print(f"first KFAC direction, norm: {flat.norm():.10e}")
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(lr * d)
        if step_index == 0:
            print(f"loss after 1 KFAC step: {dataset_loss(model, loss_func, data):.10f}")
    print(f"loss after {steps} KFAC steps: {dataset_loss(model, loss_func, data):.10f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, for the tests")
    main(parser.parse_args().quick)
