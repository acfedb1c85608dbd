"""Small models and dense block-diagonal references for the KFAC/EKFAC tests."""

import itertools
from typing import List, Sequence

import torch
from torch import Tensor, nn

DT = torch.float64


def block_mask(params: Sequence[Tensor], groups: Sequence[Sequence[int]]) -> Tensor:
    """0/1 mask keeping the blocks of the given parameter groups (indices into params)."""
    sizes = [p.numel() for p in params]
    starts = [0, *itertools.accumulate(sizes)]
    mask = torch.zeros(starts[-1], starts[-1], dtype=DT)
    for group in groups:
        idx = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in group])
        mask[idx.unsqueeze(1), idx.unsqueeze(0)] = 1
    return mask


def layer_groups(model: nn.Module, params: List[Tensor]) -> List[List[int]]:
    """Parameter indices per layer (weight and bias of one module together)."""
    ptr = {p.data_ptr(): i for i, p in enumerate(params)}
    groups = []
    for module in model.modules():
        group = [ptr[p.data_ptr()] for p in module.parameters(recurse=False) if p.data_ptr() in ptr]
        if group:
            groups.append(group)
    return groups


def tensor_groups(params: List[Tensor]) -> List[List[int]]:
    return [[i] for i in range(len(params))]


def deep_linear(d_in=3, hidden=4, d_out=2, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, d_out)
    ).to(DT)


def relu_mlp(d_in=3, hidden=4, d_out=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out)
    ).to(DT)


def regression_data(num_batches=3, batch=4, d_in=3, d_out=2, seed=1, shape=()):
    gen = torch.Generator().manual_seed(seed)
    sizes = [batch + i for i in range(num_batches)]  # unequal batches
    return [
        (
            torch.randn(n, *shape, d_in, dtype=DT, generator=gen),
            torch.randn(n, *shape, d_out, dtype=DT, generator=gen),
        )
        for n in sizes
    ]


class MeanOverPositions(nn.Module):
    """Weight sharing in the reduce setting: position-wise linear layers, then a mean."""

    def __init__(self, d_in=3, hidden=4, d_out=2):
        super().__init__()
        self.lin1 = nn.Linear(d_in, hidden)
        self.lin2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.lin2(self.lin1(x)).mean(1)


class Flatten01(nn.Module):
    """Flatten the batch and position axes of a [B, T, C] output."""

    def forward(self, x):
        return x.flatten(0, 1)
