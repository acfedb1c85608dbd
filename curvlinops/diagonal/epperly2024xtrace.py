r"""XDiag (Epperly, Tropp & Webber, 2024): exchangeable diagonal estimation.

With :math:`k = \text{num\_matvecs}/2` Rademacher vectors :math:`\mathbf{\Omega}`, sketch
:math:`\mathbf{Y} = \mathbf{A}\mathbf{\Omega} = \mathbf{Q}\mathbf{R}` and
:math:`\mathbf{Q}_i\mathbf{Q}_i^\top = \mathbf{Q}(\mathbf{I} - \mathbf{s}_i\mathbf{s}_i^\top)
\mathbf{Q}^\top` (basis without sketch column :math:`i`),

.. math::
    \mathrm{diag}(\mathbf{A}) \approx \frac{1}{k} \sum_{i=1}^k \left[
    \mathrm{diag}(\mathbf{Q}_i\mathbf{Q}_i^\top\mathbf{A}) + \boldsymbol{\omega}_i \odot
    \left((\mathbf{I} - \mathbf{Q}_i\mathbf{Q}_i^\top)\mathbf{A}\boldsymbol{\omega}_i\right)
    \oslash \boldsymbol{\omega}_i^2 \right].

:math:`\mathbf{Q}^\top\mathbf{A} = (\mathbf{A}^\top\mathbf{Q})^\top` needs the adjoint; the total
is :math:`2k` products and the leave-one-out sum is vectorised.
"""

from typing import Optional

import torch
from torch import Tensor

from curvlinops._estimators import (
    Operand,
    adjoint,
    check_square,
    draw,
    leave_one_out_basis,
    leave_one_out_projectors,
    sketch_is_rank_deficient,
)


def xdiag(A: Operand, num_matvecs: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Estimate the diagonal of a square matrix with XDiag (Rademacher test vectors).

    Args:
        A: A square matrix (2-d tensor) or linear operator with ``adjoint()``.
        num_matvecs: Number of matrix-vector products; even, less than the dimension.
        generator: Optional random number generator; the global one if ``None``.

    Returns:
        The diagonal estimate ``[D]``.

    Raises:
        ValueError: If ``A`` is not square or ``num_matvecs`` is too large or odd.
    """
    dim = check_square(A, num_matvecs, 2, generator=generator)
    k = num_matvecs // 2
    W = draw(A, dim, k, "rademacher", generator)
    Y = A @ W
    Q, R, S = leave_one_out_basis(Y)
    if sketch_is_rank_deficient(R):
        return _xdiag_rank_deficient(A, W, Y)
    AtQ = adjoint(A) @ Q  # rows of Q^T A, transposed
    QS, AtQS = Q @ S, AtQ @ S
    # sum_i diag(Q (I - s_i s_i^T) Q^T A)
    basis_part = k * (Q * AtQ).sum(1) - (QS * AtQS).sum(1)
    # (I - Q_i Q_i^T) A w_i = Y_i - Q (I - s_i s_i^T) R_i, using Q^T Y = R
    R_loo = R - S * (S * R).sum(0)
    residual = Y - Q @ R_loo
    residual_part = (W * residual).sum(
        1
    )  # Rademacher entries are +-1, so the division by W^2 is exact as a no-op
    return (basis_part + residual_part) / k


def _xdiag_rank_deficient(A: Operand, W: Tensor, Y: Tensor) -> Tensor:
    """XDiag for a rank-deficient sketch (e.g. a zero or low-rank operator).

    The same estimate with general leave-one-out projectors ``Q P_i Q^T`` (``Q`` a basis of
    the sketch's range); an exactly zero operator gives exactly 0.
    """
    k = W.shape[1]
    Q, P = leave_one_out_projectors(Y)
    AtQ = adjoint(A) @ Q  # rows of Q^T A, transposed
    # sum_i diag(Q P_i Q^T A)
    basis_part = torch.einsum("dr,rs,ds->d", Q, P.sum(0), AtQ)
    # (I - Q P_i Q^T) A w_i = Y_i - Q P_i Q^T Y_i
    residual = Y - Q @ torch.einsum("irs,si->ri", P, Q.mT @ Y)
    return (basis_part + (W * residual).sum(1)) / k
