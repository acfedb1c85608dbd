r"""Hutchinson's trace estimator.

.. math::
    \mathrm{tr}(\mathbf{A}) \approx \frac{1}{k} \sum_{i=1}^k \mathbf{g}_i^\top \mathbf{A}
    \mathbf{g}_i,

with :math:`k` random vectors of zero mean and identity covariance (Rademacher or normal);
unbiased, with variance :math:`2\|\mathbf{A}\|_F^2/k` minus the diagonal's share for
Rademacher vectors (Hutchinson, 1989).
"""

from typing import Optional

import torch
from torch import Tensor

from curvlinops._estimators import Operand, check_square, draw


def hutchinson_trace(
    A: Operand,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Estimate the trace of a square matrix with Hutchinson's method.

    Args:
        A: A square matrix (2-d tensor) or linear operator.
        num_matvecs: Number of matrix-vector products (= test vectors); less than the
            dimension.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: Optional random number generator; the global one if ``None``.

    Returns:
        The trace estimate (0-d tensor).

    Raises:
        ValueError: If ``A`` is not square or ``num_matvecs`` is too large.
    """
    dim = check_square(A, num_matvecs, 1, distribution, generator)
    G = draw(A, dim, num_matvecs, distribution, generator)
    return (G * (A @ G)).sum() / num_matvecs
