r"""Random vectors for randomised (trace, diagonal, norm) estimators.

Two distributions with :math:`\mathbb{E}[\mathbf{v}] = \mathbf{0}` and
:math:`\mathbb{E}[\mathbf{v} \mathbf{v}^\top] = \mathbf{I}` are offered:

- Rademacher: i.i.d. entries :math:`v_i \in \{-1, +1\}`, each with probability
  :math:`\frac{1}{2}`, drawn as :math:`v_i = 2 b_i - 1` with
  :math:`b_i \sim \mathrm{Bernoulli}(\frac{1}{2})`;
- normal: i.i.d. entries :math:`v_i \sim \mathcal{N}(0, 1)`.

By default PyTorch's global random number generator is used (so ``torch.manual_seed``
controls the draws); pass ``generator`` to use a dedicated ``torch.Generator`` instead.
"""

import numbers
from functools import cache
from typing import Optional, Union

import torch
from torch import Tensor

_DISTRIBUTIONS = ("rademacher", "normal")


def rademacher(
    dim: int,
    device: Union[torch.device, str],
    dtype: torch.dtype,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Draw a vector with i.i.d. Rademacher entries (:math:`\pm 1` with probability ½).

    The entries are the Bernoulli(½) draws of ``bernoulli_(0.5)`` on an uninitialised vector
    (the contract's draw, reproduced exactly), mapped to
    :math:`\{-1, +1\}` by :math:`b \mapsto 2b - 1`.

    Args:
        dim: Length of the vector.
        device: Device of the vector.
        dtype: Data type of the vector.
        generator: Optional random number generator (on ``device``). If ``None``, the
            global generator is used.

    Returns:
        The random vector of shape ``[dim]``.
    """
    return rademacher_columns(dim, 1, device, dtype, generator=generator)[:, 0]


@cache
def _uniform_draws_match_bernoulli() -> bool:
    """Whether CPU ``bernoulli_(0.5)`` equals ``rand(float64) < 0.5`` (numbers and RNG state).

    Checked once on private generators, so that an implementation where they differ falls
    back to ``bernoulli_`` instead of changing the numbers.
    """
    for size in (1, 17, 1000):
        for dtype in (torch.float32, torch.float64):
            g1, g2 = torch.Generator().manual_seed(size), torch.Generator().manual_seed(size)
            a = torch.empty(size, dtype=dtype).bernoulli_(0.5, generator=g1)
            b = (torch.rand(size, dtype=torch.float64, generator=g2) < 0.5).to(dtype)
            if not (
                torch.equal(a, b)
                and torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
            ):
                return False
    return True


def rademacher_columns(
    dim: int,
    num_columns: int,
    device: Union[torch.device, str],
    dtype: torch.dtype,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Draw ``num_columns`` Rademacher vectors one after the other, stacked as columns.

    Gives exactly the numbers (and generator state) of ``num_columns`` calls of
    :func:`rademacher`, i.e. of Bernoulli(1/2) draws on uninitialised vectors. Where
    ``bernoulli_(0.5)`` compares float64 uniforms with 1/2 (checked at run time on the CPU),
    all columns come from one ``rand`` call instead of one ``bernoulli_`` call per column.

    Args:
        dim: Length of each vector.
        num_columns: Number of vectors.
        device: Device of the vectors.
        dtype: Data type of the vectors.
        generator: Optional random number generator (on ``device``).

    Returns:
        ``[dim, num_columns]`` with entries in ``{-1, +1}``, the transpose of a contiguous
        ``[num_columns, dim]`` tensor (each column contiguous), which operators multiply
        without a transposing copy.
    """
    _check_size(dim, "dim")
    _check_size(num_columns, "num_columns")
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and _uniform_draws_match_bernoulli():
        uniforms = torch.rand(num_columns, dim, dtype=torch.float64, generator=generator)
        signs = (uniforms < 0.5).to(dtype)
    else:
        signs = torch.stack(
            [
                torch.empty(dim, device=device, dtype=dtype).bernoulli_(0.5, generator=generator)
                for _ in range(num_columns)
            ]
        )
    return signs.mul_(2).sub_(1).T


def normal(
    dim: int,
    device: Union[torch.device, str],
    dtype: torch.dtype,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Draw a vector with i.i.d. standard normal entries :math:`\mathcal{N}(0, 1)`.

    Args:
        dim: Length of the vector.
        device: Device of the vector.
        dtype: Data type of the vector.
        generator: Optional random number generator (on ``device``). If ``None``, the
            global generator is used.

    Returns:
        The random vector of shape ``[dim]``.
    """
    _check_size(dim, "dim")
    return torch.randn(dim, device=device, dtype=dtype, generator=generator)


def _check_size(value, name: str):
    """Raise ``ValueError`` unless ``value`` is a non-negative integer."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


def random_vector(
    dim: int,
    distribution: str,
    device: Union[torch.device, str],
    dtype: torch.dtype,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Draw a random vector from the given distribution.

    Args:
        dim: Length of the vector.
        distribution: ``"rademacher"`` or ``"normal"``.
        device: Device of the vector.
        dtype: Data type of the vector.
        generator: Optional random number generator (on ``device``). If ``None``, the
            global generator is used.

    Returns:
        The random vector of shape ``[dim]``.

    Raises:
        ValueError: If the distribution is not supported.
    """
    if distribution == "rademacher":
        return rademacher(dim, device, dtype, generator=generator)
    if distribution == "normal":
        return normal(dim, device, dtype, generator=generator)
    raise ValueError(
        f"Unsupported distribution {distribution!r}. "
        f"Supported distributions: {', '.join(repr(d) for d in _DISTRIBUTIONS)}."
    )
