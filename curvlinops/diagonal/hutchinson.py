r"""Hutchinson's diagonal estimator (Bekas, Kokiopoulou & Saad, 2007).

.. math::
    \mathrm{diag}(\mathbf{A}) \approx \frac{1}{k} \sum_{i=1}^k \mathbf{g}_i \odot
    (\mathbf{A}\mathbf{g}_i),

unbiased for test vectors with zero mean and identity covariance.
"""

from typing import Optional

import torch
from torch import Tensor

from curvlinops._estimators import Operand, check_square, draw


def hutchinson_diag(
    A: Operand,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Estimate the diagonal of a square matrix with Hutchinson's method.

    Args:
        A: A square matrix (2-d tensor) or linear operator.
        num_matvecs: Number of matrix-vector products; less than the dimension.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: Optional random number generator; the global one if ``None``.

    Returns:
        The diagonal estimate ``[D]``.

    Raises:
        ValueError: If ``A`` is not square or ``num_matvecs`` is too large.
    """
    dim = check_square(A, num_matvecs, 1, distribution, generator)
    G = draw(A, dim, num_matvecs, distribution, generator)
    return (G * (A @ G)).sum(1) / num_matvecs
