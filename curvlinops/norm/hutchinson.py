r"""Hutchinson-type estimator of the squared Frobenius norm.

.. math::
    \|\mathbf{A}\|_F^2 = \mathrm{tr}(\mathbf{A}^\top\mathbf{A}) \approx \frac{1}{k}
    \sum_{i=1}^k \|\mathbf{A}\mathbf{g}_i\|_2^2,

for test vectors with zero mean and identity covariance. For a wide matrix the estimator
works with :math:`\mathbf{A}^\top` (same norm, shorter test vectors).
"""

from typing import Optional

import torch
from torch import Tensor

from curvlinops._estimators import Operand, adjoint, check_num_matvecs, check_sampling, draw


def hutchinson_squared_fro(
    A: Operand,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Estimate the squared Frobenius norm of a (possibly rectangular) matrix.

    Args:
        A: A 2-d tensor or linear operator.
        num_matvecs: Number of matrix-vector products; less than ``min(A.shape)``.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: Optional random number generator; the global one if ``None``.

    Returns:
        The estimate of the squared Frobenius norm (0-d tensor).

    Raises:
        ValueError: If ``A`` is not 2-d, ``num_matvecs`` is not an integer in
            ``[1, min(A.shape))``, or ``distribution`` or ``generator`` is invalid.
    """
    if len(A.shape) != 2:
        raise ValueError(f"Expected a 2-d matrix, got shape {tuple(A.shape)}.")
    rows, cols = A.shape
    check_num_matvecs(num_matvecs)
    if num_matvecs >= min(rows, cols):
        raise ValueError(
            f"num_matvecs ({num_matvecs}) must be less than min(A.shape) = {min(rows, cols)}."
        )
    check_sampling(distribution, generator)
    if cols > rows:  # wide: ||A||_F = ||A^T||_F with shorter test vectors
        A, cols = adjoint(A), rows
    G = draw(A, cols, num_matvecs, distribution, generator)
    return (A @ G).pow(2).sum() / num_matvecs
