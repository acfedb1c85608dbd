r"""Shared pieces of the randomised estimators (trace, diagonal, Frobenius norm).

Test vectors are drawn one column at a time with :func:`curvlinops.sampling.random_vector`
and stacked as columns, so an estimator gives the same numbers as a plain implementation of
its algorithm run under the same ``torch.manual_seed`` (or the same ``generator``). All
products with :math:`\mathbf{A}` are multi-column products.
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from curvlinops._checks import check_count, check_generator
from curvlinops._distributed import shared_draw
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.sampling import rademacher_columns, random_vector
from curvlinops.utils import assert_divisible_by, assert_is_square, assert_matvecs_subseed_dim

Operand = Union[Tensor, PyTorchLinearOperator]
DISTRIBUTIONS = ("rademacher", "normal")


def check_num_matvecs(num_matvecs: int, divisor: int = 1):
    """Raise a ``ValueError`` unless ``num_matvecs`` is an integer of at least ``divisor``.

    Args:
        num_matvecs: Number of matrix-vector products an estimator may use.
        divisor: Smallest allowed value (the required divisor).
    """
    check_count("num_matvecs", num_matvecs, divisor)


def check_sampling(distribution: str, generator: Optional[torch.Generator]):
    """Raise a ``ValueError`` for an unknown distribution or a generator of the wrong type.

    Args:
        distribution: Name of the distribution of the test vectors.
        generator: Random number generator or ``None``.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    check_generator(generator)


def check_square(
    A: Operand,
    num_matvecs: int,
    divisor: int = 1,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
) -> int:
    """Validate in the contract's order: square, ``num_matvecs < dim``, divisibility.

    ``num_matvecs`` must be an integer (checked right after squareness) and at least
    ``divisor`` (checked last); ``distribution`` and ``generator`` are checked before any
    product or draw.

    Args:
        A: The matrix or operator.
        num_matvecs: Number of matrix-vector products the estimator may use.
        divisor: Required divisor of ``num_matvecs``.
        distribution: Name of the distribution of the test vectors.
        generator: Random number generator or ``None``.

    Returns:
        The dimension of ``A``.
    """
    dim = assert_is_square(A)
    check_num_matvecs(num_matvecs, 1)
    assert_matvecs_subseed_dim(A, num_matvecs)
    if divisor > 1:
        assert_divisible_by(num_matvecs, divisor, "num_matvecs")
    check_num_matvecs(num_matvecs, divisor)
    check_sampling(distribution, generator)
    return dim


def draw(
    A: Operand,
    dim: int,
    num_vectors: int,
    distribution: str,
    generator: Optional[torch.Generator],
) -> Tensor:
    """Draw ``num_vectors`` random vectors of length ``dim`` as the columns of a matrix.

    Same numbers as ``num_vectors`` calls of ``random_vector``; Rademacher columns are drawn
    in one call (see :func:`~curvlinops.sampling.rademacher_columns`). The matrix ``[dim,
    num_vectors]`` is the transpose of a contiguous ``[num_vectors, dim]`` tensor (each
    column contiguous), the layout in which operators multiply it and return the product
    without a transposing copy (see
    :meth:`~curvlinops._torch_base.PyTorchLinearOperator.__matmul__`).
    """
    if distribution == "rademacher":
        drawn = rademacher_columns(dim, num_vectors, A.device, A.dtype, generator=generator)
    else:
        columns = [
            random_vector(dim, distribution, A.device, A.dtype, generator=generator)
            for _ in range(num_vectors)
        ]
        drawn = torch.stack(columns).T
    return shared_draw(A, drawn)  # data-parallel operators: the same vectors on every rank


def adjoint(A: Operand) -> Operand:
    """The adjoint of a matrix or operator."""
    return A.mH if isinstance(A, Tensor) else A.adjoint()


def leave_one_out_basis(Y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    r"""QR of the sketch and the vectors that remove one basis direction at a time.

    With :math:`\mathbf{Y} = \mathbf{Q}\mathbf{R}`, the span of all sketch columns but the
    :math:`i`-th has the projector :math:`\mathbf{Q}(\mathbf{I} - \mathbf{s}_i
    \mathbf{s}_i^\top)\mathbf{Q}^\top` where :math:`\mathbf{s}_i` is the normalised
    :math:`i`-th column of :math:`(\mathbf{R}^\top)^{-1}` (Epperly, Tropp & Webber, 2024).

    Args:
        Y: The sketch :math:`\mathbf{A}\mathbf{\Omega}` ``[D, k]``.

    Returns:
        ``Q`` ``[D, k]``, ``R`` ``[k, k]`` and ``S`` ``[k, k]`` (columns :math:`\mathbf{s}_i`).
    """
    Q, R = torch.linalg.qr(Y)
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    S = torch.linalg.solve_triangular(R, eye, upper=True).mT  # (R^T)^{-1} = (R^{-1})^T
    return Q, R, S / S.norm(dim=0, keepdim=True)


def sketch_is_rank_deficient(R: Tensor) -> bool:
    """Whether the sketch's triangular factor is (numerically) singular.

    Then the leave-one-out formula of :func:`leave_one_out_basis` divides by zero (an exactly
    zero or low-rank operator, or dependent test vectors) and
    :func:`leave_one_out_projectors` must be used instead.
    """
    diagonal = R.diagonal().abs()
    if diagonal.numel() == 0:
        return False
    threshold = 1e3 * R.shape[0] * torch.finfo(R.dtype).eps * diagonal.max()
    return bool((diagonal <= threshold).any())


def leave_one_out_projectors(Y: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Orthonormal basis of a possibly rank-deficient sketch and its leave-one-out projectors.

    With :math:`\mathbf{Q}` ``[D, r]`` an orthonormal basis of the range of
    :math:`\mathbf{Y}` (``r`` its numerical rank, possibly 0), the projector onto the span of
    all sketch columns but the :math:`i`-th is :math:`\mathbf{Q}\mathbf{P}_i\mathbf{Q}^\top`.
    Costs small SVDs only (no products with the operator).

    Args:
        Y: The sketch ``[D, k]``.

    Returns:
        ``Q`` ``[D, r]`` and ``P`` ``[k, r, r]``.
    """
    k = Y.shape[1]
    U, sigma, Vh = torch.linalg.svd(Y, full_matrices=False)
    threshold = 1e2 * k * torch.finfo(Y.dtype).eps * sigma.max().clamp_min(0)
    r = int((sigma > threshold).sum().item()) if sigma.max() > 0 else 0
    Q = U[:, :r]
    coordinates = sigma[:r, None] * Vh[:r]  # Q^T Y, [r, k]
    P = Y.new_zeros(k, r, r)
    for i in range(k):
        others = torch.cat([coordinates[:, :i], coordinates[:, i + 1 :]], dim=1)
        if r == 0 or others.numel() == 0:
            continue
        U_i, sigma_i, _ = torch.linalg.svd(others, full_matrices=False)
        rank_i = int((sigma_i > threshold).sum().item())
        P[i] = U_i[:, :rank_i] @ U_i[:, :rank_i].mT
    return Q, P
