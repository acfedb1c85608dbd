r"""Hutch++ trace estimator (Meyer, Musco, Musco & Woodruff, 2021).

With :math:`n = k/3`, a sketch :math:`\mathbf{A}\mathbf{S}` of :math:`n` random vectors gives an
orthonormal basis :math:`\mathbf{Q}` of (approximately) the dominant range; its trace part is
computed exactly and Hutchinson's method handles the deflated rest:

.. math::
    \mathrm{tr}(\mathbf{A}) \approx \mathrm{tr}(\mathbf{Q}^\top\mathbf{A}\mathbf{Q})
    + \frac{1}{n} \sum_{i=1}^n \mathbf{g}_i^\top (\mathbf{I} - \mathbf{Q}\mathbf{Q}^\top)
    \mathbf{A} (\mathbf{I} - \mathbf{Q}\mathbf{Q}^\top) \mathbf{g}_i.

Total :math:`3n` products; the error decays like :math:`1/k` instead of :math:`1/\sqrt{k}` for
matrices with decaying spectra.
"""

from typing import Optional

import torch
from torch import Tensor

from curvlinops._estimators import Operand, check_square, draw


def hutchpp_trace(
    A: Operand,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Estimate the trace of a square matrix with Hutch++.

    Args:
        A: A square matrix (2-d tensor) or linear operator.
        num_matvecs: Number of matrix-vector products; divisible by 3, less than the
            dimension.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: Optional random number generator; the global one if ``None``.

    Returns:
        The trace estimate (0-d tensor).

    Raises:
        ValueError: If ``A`` is not square or ``num_matvecs`` is too large or not
            divisible by 3.
    """
    dim = check_square(A, num_matvecs, 3, distribution, generator)
    n = num_matvecs // 3
    S = draw(A, dim, n, distribution, generator)
    Q, _ = torch.linalg.qr(A @ S)
    G = draw(A, dim, n, distribution, generator)
    G = G - Q @ (Q.mT @ G)
    # One product with the basis and the deflated test vectors together, columns contiguous
    AQG = A @ torch.cat([Q.mT, G.mT]).mT
    AQ, AG = AQG[:, :n], AQG[:, n:]
    return (Q * AQ).sum() + (G * AG).sum() / n
