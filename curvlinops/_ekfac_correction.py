r"""Eigen-machinery of EKFAC: batched eigendecompositions and the eigenvalue correction.

For a layer with per-example, per-position output gradients :math:`\mathbf{g}_{n,s}` and inputs
:math:`\mathbf{a}_{n,s}`, the per-example weight gradient is :math:`\boldsymbol{\Gamma}_n =
\sum_s \mathbf{g}_{n,s}\mathbf{a}_{n,s}^\top`. In the Kronecker eigenbasis
:math:`\mathbf{Q}_G \otimes \mathbf{Q}_A` the corrected eigenvalues are the second moments of
the rotated gradients,

.. math::
    \boldsymbol{\Lambda} = \sum_n \big(\mathbf{Q}_G^\top \boldsymbol{\Gamma}_n
    \mathbf{Q}_A\big)^{\odot 2}
    = \sum_n \sum_{s,t} (\tilde{\mathbf{g}}_{n,s} \odot \tilde{\mathbf{g}}_{n,t})
    (\tilde{\mathbf{a}}_{n,s} \odot \tilde{\mathbf{a}}_{n,t})^\top,

with :math:`\tilde{\mathbf{g}} = \mathbf{Q}_G^\top\mathbf{g}`, :math:`\tilde{\mathbf{a}} =
\mathbf{Q}_A^\top\mathbf{a}`. The left form materialises rotated per-example gradients
(memory :math:`N D_1 D_2`), the right one contracts :math:`S \times S` Gramians (memory
:math:`N S^2 (D_1 + D_2)`); both are exact.
"""

import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor


def compute_eigenvalue_correction_linear_weight_sharing(
    g: Tensor,
    ggT_eigvecs: Tensor,
    a: Tensor,
    aaT_eigvecs: Optional[Tensor],
    _force_strategy: Optional[str] = None,
) -> Tensor:
    r"""Corrected eigenvalues of a layer with weight sharing.

    Args:
        g: Output gradients ``[N, S, D1]``.
        ggT_eigvecs: Eigenvectors of the gradient factor ``[D1, D1]`` (columns).
        a: Inputs ``[N, S, D2]``.
        aaT_eigvecs: Eigenvectors of the input factor ``[D2, D2]``, or ``None`` for a bias.
        _force_strategy: ``"per_example_gradients"`` or ``"gramian"``; by default
            ``"gramian"`` iff :math:`S^2 (D_1 + D_2) < D_1 D_2`.

    Returns:
        ``[D1, D2]`` (weight) or ``[D1]`` (bias, ``aaT_eigvecs=None``).

    Raises:
        ValueError: For an unknown strategy.
    """
    g_rot = g @ ggT_eigvecs
    a_rot = None if aaT_eigvecs is None else a @ aaT_eigvecs
    return per_example_square_sums(g_rot, a_rot, _force_strategy)


def per_example_square_sums(g: Tensor, a: Optional[Tensor], strategy: Optional[str] = None):
    """``sum_n (sum_s g_{n,s} a_{n,s}^T)^2`` (entry-wise), or ``sum_n (sum_s g_{n,s})^2``.

    Args:
        g: ``[N, S, D1]``.
        a: ``[N, S, D2]``, or ``None`` for the bias form.
        strategy: ``"per_example_gradients"`` or ``"gramian"`` (see
            :func:`compute_eigenvalue_correction_linear_weight_sharing`); ``None`` picks the
            one with less memory.

    Returns:
        ``[D1, D2]``, or ``[D1]`` without ``a``.

    Raises:
        ValueError: For an unknown strategy.
    """
    if a is None:
        return (g.sum(1) ** 2).sum(0)
    S, D1, D2 = g.shape[1], g.shape[2], a.shape[2]
    if strategy is None:
        strategy = "gramian" if S**2 * (D1 + D2) < D1 * D2 else "per_example_gradients"
    if strategy == "per_example_gradients":
        per_example = torch.einsum("nsi,nsj->nij", g, a)
        return (per_example**2).sum(0)
    if strategy == "gramian":
        if S == 1:
            return (g[:, 0] ** 2).T @ (a[:, 0] ** 2)
        g_gram = torch.einsum("nsi,nti->nsti", g, g).reshape(-1, D1)
        a_gram = torch.einsum("nsj,ntj->nstj", a, a).reshape(-1, D2)
        return g_gram.T @ a_gram
    raise ValueError(
        f"Invalid _force_strategy {strategy!r}; use 'per_example_gradients' or 'gramian'."
    )


def batched_eigh(matrices: Dict[str, Tensor]) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Eigendecompose symmetric matrices, same-sized ones in one batched call.

    A group whose decomposition fails (LAPACK can fail to converge on rank-deficient float32
    factors) is retried in float64 and cast back; if that fails too, a damping of 1e-8 times
    the mean absolute diagonal is added, with a warning. Nothing fails silently.

    Args:
        matrices: Symmetric matrices by key.

    Returns:
        ``(eigenvalues ascending, eigenvectors as columns)`` by key.

    Raises:
        RuntimeError: If even the damped float64 decomposition fails.
    """
    groups: Dict[Tuple, List[str]] = {}
    for key, matrix in matrices.items():
        groups.setdefault((matrix.shape, matrix.dtype, matrix.device), []).append(key)
    result = {}
    for keys in groups.values():
        stacked = torch.stack([matrices[k] for k in keys])
        evals, evecs = _robust_eigh(stacked, keys)
        for i, key in enumerate(keys):
            result[key] = (evals[i], evecs[i])
    return result


def _robust_eigh(stacked: Tensor, keys: List[str]) -> Tuple[Tensor, Tensor]:
    try:
        return torch.linalg.eigh(stacked)
    except RuntimeError as error:  # torch.linalg.LinAlgError derives from RuntimeError
        first_error = error
    dtype = stacked.dtype
    if dtype != torch.float64:
        try:
            evals, evecs = torch.linalg.eigh(stacked.to(torch.float64))
            warnings.warn(
                f"eigh failed in {dtype} for {keys}; decomposed in float64 instead.",
                UserWarning,
                stacklevel=3,
            )
            return evals.to(dtype), evecs.to(dtype)
        except RuntimeError:
            pass
    double = stacked.to(torch.float64)
    scale = double.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-30)
    eye = torch.eye(double.shape[-1], dtype=torch.float64, device=double.device)
    damping = 1e-8 * scale[:, None, None]
    try:
        evals, evecs = torch.linalg.eigh(double + damping * eye)
    except RuntimeError as error:
        raise RuntimeError(
            f"eigh failed for {keys} in {dtype}, in float64, and with damping: {error}"
        ) from first_error
    warnings.warn(
        f"eigh failed for {keys}; decomposed after adding a damping of 1e-8 x mean |diagonal| "
        "(subtracted from the eigenvalues again).",
        UserWarning,
        stacklevel=3,
    )
    return (evals - damping[:, 0]).to(dtype), evecs.to(dtype)


def eigenbasis_from_rows(rows: Tensor) -> Tensor:
    r"""Eigenvectors of :math:`\mathbf{R}^\top\mathbf{R}` from the small Gram matrix.

    For a factor :math:`\mathbf{A} = \mathbf{R}^\top\mathbf{R}` with :math:`r` rows
    :math:`\ll d` columns, :math:`\mathbf{R}\mathbf{R}^\top = \mathbf{U}\boldsymbol{\Lambda}
    \mathbf{U}^\top` gives the eigenvectors :math:`\mathbf{R}^\top\mathbf{U}
    \boldsymbol{\Lambda}^{-1/2}` of the non-zero eigenvalues; a complete QR factorisation adds
    an orthonormal basis of the null space (eigenvalue zero, so any basis is valid). Costs
    :math:`O(r^3 + d^2 r)` instead of :math:`O(d^3)`.

    Args:
        rows: :math:`\mathbf{R}` of shape ``[r, d]``.

    Returns:
        An orthonormal eigenbasis ``[d, d]`` of :math:`\mathbf{R}^\top\mathbf{R}`, with the
        range first.
    """
    evals, U = torch.linalg.eigh(rows @ rows.T)
    tolerance = evals.max().clamp_min(0) * rows.shape[0] * torch.finfo(rows.dtype).eps
    keep = evals > tolerance
    thin = (rows.T @ U[:, keep]) / evals[keep].sqrt()
    Q, R = torch.linalg.qr(thin, mode="complete")
    # align the first columns with the range eigenvectors (QR fixes them up to sign)
    signs = torch.sign(torch.diagonal(R)).masked_fill(torch.diagonal(R) == 0, 1.0)
    Q[:, : signs.numel()] *= signs
    return Q
