"""Blocks of a curvature matrix with ``SubmatrixLinearOperator``.

Often one layer's block, or the coupling between two layers, is what matters. A
``SubmatrixLinearOperator(A, row_idxs, col_idxs)`` multiplies only with the selected rows and
columns of ``A`` (it still uses products with the whole matrix, so no block is ever formed).
The script takes the GGN block of the first layer's weight with itself and with the second
layer's weight, densifies the small blocks, and finds the top eigenvalue of the first block.

Run: ``python docs/examples/example_submatrices.py`` (``--quick`` for a smaller problem).
"""

import argparse

import torch
from torch import nn

from curvlinops import GGNLinearOperator, SubmatrixLinearOperator
from curvlinops.eigen import eigsh


def problem(quick: bool = False):
    """A float64 MLP classifier and two batches of synthetic data."""
    torch.manual_seed(0)
    width = 6 if quick else 24
    model = nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, 3)).double()
    data = [(torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))) for _ in range(2)]
    return model, nn.CrossEntropyLoss(), data


def index_ranges(params):
    """Where each parameter's entries sit in the flattened parameter vector."""
    ranges, start = [], 0
    for p in params:
        ranges.append(list(range(start, start + p.numel())))
        start += p.numel()
    return ranges


def main(quick: bool = False):
    model, loss_func, data = problem(quick)
    params = [p for p in model.parameters() if p.requires_grad]
    G = GGNLinearOperator(model, loss_func, params, data)
    weight1, _, weight2, _ = index_ranges(params)

    block = SubmatrixLinearOperator(G, weight1, weight1)
    coupling = SubmatrixLinearOperator(G, weight1, weight2)
    print(f"first-layer block: {block.shape}, coupling block: {coupling.shape}")
    dense_block = block @ torch.eye(block.shape[1], dtype=torch.float64)
    dense_coupling = coupling @ torch.eye(coupling.shape[1], dtype=torch.float64)
    print(f"first-layer block: trace {torch.trace(dense_block):.10e}")
    print(f"coupling block: Frobenius norm {dense_coupling.norm():.10e}")
    print(
        "coupling block, row 0, first 3 entries:",
        " ".join(f"{x:.10e}" for x in dense_coupling[0, :3]),
    )
    # Indices need not be contiguous: every third parameter, rows and columns alike.
    scattered = list(range(0, G.shape[0], 3))
    sub = SubmatrixLinearOperator(G, scattered, scattered)
    dense_sub = sub @ torch.eye(sub.shape[1], dtype=torch.float64)
    print(f"every third parameter: block {sub.shape}, Frobenius norm {dense_sub.norm():.10e}")
    top = eigsh(block, k=1, generator=torch.Generator().manual_seed(0), return_eigenvectors=False)
    print(f"first-layer block: top eigenvalue {top[0]:.10e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problem, for the tests")
    main(parser.parse_args().quick)
