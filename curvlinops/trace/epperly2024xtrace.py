r"""XTrace (Epperly, Tropp & Webber, 2024): exchangeable trace estimation.

With :math:`k = \text{num\_matvecs}/2` test vectors :math:`\mathbf{\Omega}`, sketch
:math:`\mathbf{Y} = \mathbf{A}\mathbf{\Omega} = \mathbf{Q}\mathbf{R}`. For each :math:`i`, the
basis :math:`\mathbf{Q}_i` of the sketch without column :math:`i` gives the estimate

.. math::
    t_i = \mathrm{tr}(\mathbf{Q}_i^\top \mathbf{A} \mathbf{Q}_i) + \boldsymbol{\omega}_i^\top
    (\mathbf{I} - \mathbf{Q}_i\mathbf{Q}_i^\top) \mathbf{A}
    (\mathbf{I} - \mathbf{Q}_i\mathbf{Q}_i^\top) \boldsymbol{\omega}_i,

and XTrace returns their mean. With :math:`\mathbf{Q}_i\mathbf{Q}_i^\top = \mathbf{Q}(\mathbf{I}
- \mathbf{s}_i\mathbf{s}_i^\top)\mathbf{Q}^\top` every :math:`t_i` reduces to :math:`k \times k`
matrices built from :math:`\mathbf{Y}`, :math:`\mathbf{Z} = \mathbf{A}\mathbf{Q}` and
:math:`\mathbf{\Omega}`, so the :math:`k` leave-one-out estimates cost no further products.
"""

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from curvlinops._estimators import (
    Operand,
    check_square,
    draw,
    leave_one_out_basis,
    leave_one_out_projectors,
    sketch_is_rank_deficient,
)


def xtrace(
    A: Operand,
    num_matvecs: int,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Estimate the trace of a square matrix with XTrace.

    Args:
        A: A square matrix (2-d tensor) or linear operator.
        num_matvecs: Number of matrix-vector products; even, less than the dimension.
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: Optional random number generator; the global one if ``None``.

    Returns:
        The trace estimate (0-d tensor).

    Raises:
        ValueError: If ``A`` is not square or ``num_matvecs`` is too large or odd.
    """
    dim = check_square(A, num_matvecs, 2, distribution, generator)
    W = draw(A, dim, num_matvecs // 2, distribution, generator)
    Y = A @ W
    Q, R, S = leave_one_out_basis(Y)
    if not sketch_is_rank_deficient(R):
        # Q_i Q_i^T = Q (I - s_i s_i^T) Q^T, and Q^T Y = R
        def remove_one(H: Tensor, C: Tensor) -> Tuple[Tensor, Tensor]:
            return H.trace() - (S * (H @ S)).sum(0), C - S * (S * C).sum(0)

        return _mean_of_leave_one_out_estimates(A, W, Y, Q, R, remove_one)
    # a rank-deficient sketch (e.g. a zero or low-rank operator): general leave-one-out
    # projectors Q P_i Q^T, Q a basis of the sketch's range; a zero operator gives exactly 0
    Q, P = leave_one_out_projectors(Y)

    def project(H: Tensor, C: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.einsum("irs,sr->i", P, H), torch.einsum("irs,si->ri", P, C)

    return _mean_of_leave_one_out_estimates(A, W, Y, Q, Q.mT @ Y, project)


def _mean_of_leave_one_out_estimates(
    A: Operand,
    W: Tensor,
    Y: Tensor,
    Q: Tensor,
    QtY: Tensor,
    leave_one_out: Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]],
) -> Tensor:
    """The mean of the estimates ``t_i`` with ``Q_i Q_i^T = Q P_i Q^T``.

    Args:
        A: The operator.
        W: The test vectors ``[D, k]``.
        Y: The sketch ``A W``.
        Q: An orthonormal basis ``[D, r]`` of the sketch's range.
        QtY: ``Q^T Y``.
        leave_one_out: Maps ``H = Q^T A Q`` and ``C = Q^T W`` to ``tr(P_i H)`` for all ``i``
            ``[k]`` and the columns ``P_i c_i`` ``[r, k]``, the basis coefficients that
            ``I - Q_i Q_i^T`` removes.
    """
    Z = A @ Q
    H = Q.mT @ Z  # Q^T A Q
    T = W.mT @ Z  # row i: w_i^T A Q
    C = Q.mT @ W  # column i: Q^T w_i
    basis_part, C_loo = leave_one_out(H, C)
    residual_part = (
        (W * Y).sum(0)  # w_i^T A w_i
        - (T.mT * C_loo).sum(0)  # w_i^T A Q c_i
        - (C_loo * QtY).sum(0)  # c_i^T Q^T A w_i
        + (C_loo * (H @ C_loo)).sum(0)  # c_i^T Q^T A Q c_i
    )
    return (basis_part + residual_part).mean()
