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

    The entries are drawn as Bernoulli(½) in place on an uninitialised vector, then mapped
    to :math:`\{-1, +1\}` by :math:`b \mapsto 2b - 1`.

    Args:
        dim: Length of the vector.
        device: Device of the vector.
        dtype: Data type of the vector.
        generator: Optional random number generator (on ``device``). If ``None``, the
            global generator is used.

    Returns:
        The random vector of shape ``[dim]``.
    """
    v = torch.empty(dim, device=device, dtype=dtype)
    v.bernoulli_(0.5, generator=generator)
    return v.mul_(2).sub_(1)


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
    return torch.randn(dim, device=device, dtype=dtype, generator=generator)


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
