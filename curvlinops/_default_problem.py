"""The built-in problem of ``curvlinops report``: a small MLP on a synthetic classification set.

The data set ships with the package as ``curvlinops/data/default_problem.npz``, so nothing is
downloaded and the points do not depend on the random number generator of the installed
torch: 1024 points in 10 dimensions from four classes, each class a Gaussian blob around its
own centre with a class-specific non-linear twist. :func:`synthetic_classification` is the
seeded generator the file was made with; ``python -m curvlinops._default_problem`` rewrites
the file from it.

The model, a 10-32-32-4 tanh MLP in float64, is trained for 200 full-batch Adam steps, so the
report shows the curvature of a trained network (about 99.8% training accuracy) rather than of
a random one. Everything is deterministic: the same seed
gives the same weights and report.
"""

from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from torch import Tensor, nn

NUM_POINTS, DIM, NUM_CLASSES, BATCH_SIZE = 1024, 10, 4, 128
DATA_FILE = Path(__file__).parent / "data" / "default_problem.npz"
TRAINING_STEPS = 200


def synthetic_classification(seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Generate the data set: inputs ``[1024, 10]`` (float64), labels ``[1024]`` in ``0..3``.

    Args:
        seed: Seed of the generator.

    Returns:
        The inputs and the labels (balanced classes, in the order ``0, 1, 2, 3, 0, ...``).
    """
    generator = torch.Generator().manual_seed(seed)
    centres = 0.7 * torch.randn(NUM_CLASSES, DIM, generator=generator, dtype=torch.float64)
    y = torch.arange(NUM_POINTS) % NUM_CLASSES
    noise = torch.randn(NUM_POINTS, DIM, generator=generator, dtype=torch.float64)
    X = centres[y] + noise
    X[:, 0] += torch.sin(2.0 * X[:, 1]) * (y - 1.5)  # a twist, so classes are not linear
    return X, y


def write_data_file(path: Path = DATA_FILE) -> Path:
    """Write the data of :func:`synthetic_classification` (seed 0) to ``path`` as ``.npz``.

    Args:
        path: Destination file (default: the file shipped with the package).

    Returns:
        The path written.
    """
    X, y = synthetic_classification(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, X=X.numpy(), y=y.numpy())
    return path


def load_data(path: Path = DATA_FILE) -> Tuple[Tensor, Tensor]:
    """Read the shipped data set.

    Args:
        path: The ``.npz`` file with arrays ``X`` and ``y``.

    Returns:
        Inputs ``[1024, 10]`` (float64) and labels ``[1024]`` (int64).

    Raises:
        FileNotFoundError: If the file is missing (a broken installation).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"The built-in data set {path} is missing; reinstall curvlinops or regenerate the "
            "file with `python -m curvlinops._default_problem`."
        )
    with np.load(path) as arrays:
        return torch.from_numpy(arrays["X"]).double(), torch.from_numpy(arrays["y"]).long()


def default_problem(seed: int = 0) -> Tuple[nn.Module, nn.Module, List[Tuple[Tensor, Tensor]]]:
    """Train the MLP on the shipped data set.

    Args:
        seed: Seed of the weight initialisation.

    Returns:
        ``(model, loss_func, data)``: the trained MLP, ``CrossEntropyLoss()`` (mean reduction)
        and the data as a list of 8 batches of 128 points.
    """
    X, y = load_data()
    init_generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # nn.Linear draws its initial weights from the global generator
    model = nn.Sequential(
        nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, NUM_CLASSES)
    ).double()
    torch.random.set_rng_state(init_generator_state)  # leave the caller's random stream alone
    loss_func = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(TRAINING_STEPS):
        optimizer.zero_grad()
        loss_func(model(X), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    data = list(zip(X.split(BATCH_SIZE), y.split(BATCH_SIZE)))
    return model, loss_func, data


if __name__ == "__main__":
    print(f"wrote {write_data_file()}")
