"""The built-in problem of ``curvlinops report``: a small MLP on a synthetic classification set.

The data are defined here, so nothing is downloaded: 1024 points in 10 dimensions from four
classes, each class a Gaussian blob around its own centre with a class-specific non-linear
twist, drawn from a fixed seed (``synthetic_classification``). The model, a 10-32-32-4 tanh
MLP in float64, is trained for 200 full-batch Adam steps (well under a second), so the report
shows the curvature of a trained network rather than of a random one. Everything is
deterministic: the same seed gives the same data, weights and report.
"""

from typing import List, Tuple

import torch
from torch import Tensor, nn

NUM_POINTS, DIM, NUM_CLASSES, BATCH_SIZE = 1024, 10, 4, 128


def synthetic_classification(seed: int = 0) -> Tuple[Tensor, Tensor]:
    """The data set: inputs ``[1024, 10]`` (float64) and labels ``[1024]`` in ``0..3``."""
    generator = torch.Generator().manual_seed(seed)
    centres = 0.7 * torch.randn(NUM_CLASSES, DIM, generator=generator, dtype=torch.float64)
    y = torch.arange(NUM_POINTS) % NUM_CLASSES
    noise = torch.randn(NUM_POINTS, DIM, generator=generator, dtype=torch.float64)
    X = centres[y] + noise
    X[:, 0] += torch.sin(2.0 * X[:, 1]) * (y - 1.5)  # a twist, so classes are not linear
    return X, y


def default_problem(seed: int = 0) -> Tuple[nn.Module, nn.Module, List[Tuple[Tensor, Tensor]]]:
    """Train the MLP and return ``(model, loss_func, data)`` with 8 batches of 128 points."""
    X, y = synthetic_classification(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, NUM_CLASSES)
    ).double()
    loss_func = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        loss_func(model(X), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    data = list(zip(X.split(BATCH_SIZE), y.split(BATCH_SIZE)))
    return model, loss_func, data
