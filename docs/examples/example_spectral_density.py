"""Spectral densities of the Hessian and the GGN from a few dozen matrix-vector products.

``lanczos_approximate_spectrum`` runs Lanczos from random start vectors and smooths the Ritz
values with Gaussians (Papyan, 2020) into a density on a grid; it needs the spectrum's
boundaries, which it finds with ARPACK unless given. ``lanczos_approximate_log_spectrum`` does
the same for ``log(|lambda| + epsilon)``, which suits positive semi-definite matrices such as
the GGN whose eigenvalues span many orders of magnitude (its density is still per unit of
eigenvalue, so it integrates to about 1 over the grid). With ``--plot FILE.png`` (needs
matplotlib) both densities are drawn.

Run: ``python docs/examples/example_spectral_density.py`` (``--quick``: fewer Lanczos steps).
"""

import argparse

import torch
from torch import nn

from curvlinops import (
    GGNLinearOperator,
    HessianLinearOperator,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)
from curvlinops.eigen import eigsh


def problem(quick: bool = False):
    """A float64 MLP classifier and two batches of synthetic data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    data = [(torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 3, (32,))) for _ in range(2)]
    return model, nn.CrossEntropyLoss(), data


def integral(grid: torch.Tensor, density: torch.Tensor) -> float:
    """The trapezoidal integral of a density over its grid."""
    return torch.trapezoid(density, grid).item()


def main(quick: bool = False, plot: str = None):
    model, loss_func, data = problem(quick)
    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, loss_func, params, data)
    G = GGNLinearOperator(model, loss_func, params, data)
    ncv = 20 if quick else 60
    generator = torch.Generator().manual_seed(0)

    grid, density = lanczos_approximate_spectrum(
        H, ncv, num_points=512, num_repeats=2, generator=generator
    )
    print(
        f"Hessian density: grid [{grid[0]:.6e}, {grid[-1]:.6e}], "
        f"integral {integral(grid, density):.4f}"
    )
    print(f"Hessian density peaks at {grid[density.argmax()]:.6e}")
    # The density's mass below zero estimates the share of negative eigenvalues (each random
    # start vector weighs the eigenvalues randomly, so expect an error of a few 0.01).
    negative = integral(grid, density * (grid < 0))
    print(f"Hessian density: mass below zero {negative:.4f}")

    # The GGN is positive semi-definite: its smallest magnitude is 0, the largest from eigsh.
    top = eigsh(G, k=1, generator=generator, return_eigenvectors=False)[0].item()
    log_grid, log_density = lanczos_approximate_log_spectrum(
        G, ncv, num_points=512, num_repeats=2, boundaries=(0.0, top), generator=generator
    )
    print(
        f"GGN log-density: grid [{log_grid[0]:.6e}, {log_grid[-1]:.6e}], "
        f"integral {integral(log_grid, log_density):.4f}"
    )
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        left.plot(grid, density)
        left.set(xlabel="eigenvalue", ylabel="density", yscale="log", title="Hessian")
        left.set_ylim(bottom=density.max() * 1e-6)
        right.plot(log_grid, log_density)
        right.set(xlabel="|eigenvalue| + epsilon", xscale="log", yscale="log", title="GGN")
        right.set_ylim(bottom=log_density.max() * 1e-6)
        fig.tight_layout()
        fig.savefig(plot)
        print(f"plotted to {plot}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer Lanczos steps, for the tests")
    parser.add_argument("--plot", metavar="FILE.png", help="plot both densities (matplotlib)")
    args = parser.parse_args()
    main(args.quick, args.plot)
