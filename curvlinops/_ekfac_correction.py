r"""Eigen-machinery of EKFAC: batched eigendecompositions and the eigenvalue correction.

**Eigenvalue correction.** For a layer with per-example, per-position output gradients
:math:`\mathbf{g}_{n,s} \in \mathbb{R}^{D_1}` and inputs :math:`\mathbf{a}_{n,s} \in
\mathbb{R}^{D_2}` (:math:`s` runs over the :math:`S` positions that share the weight), the
per-example weight gradient is :math:`\boldsymbol{\Gamma}_n = \sum_s
\mathbf{g}_{n,s}\mathbf{a}_{n,s}^\top`. In the Kronecker eigenbasis :math:`\mathbf{Q}_1
\otimes \mathbf{Q}_2` of KFAC's factors the corrected eigenvalues are the second moments of
the rotated gradients,

.. math::
    \mathbf{E} = \sum_n \big(\mathbf{Q}_1^\top \boldsymbol{\Gamma}_n
    \mathbf{Q}_2\big)^{\odot 2}
    = \sum_n \sum_{s,t} (\tilde{\mathbf{g}}_{n,s} \odot \tilde{\mathbf{g}}_{n,t})
    (\tilde{\mathbf{a}}_{n,s} \odot \tilde{\mathbf{a}}_{n,t})^\top,

with :math:`\tilde{\mathbf{g}} = \mathbf{Q}_1^\top\mathbf{g}`, :math:`\tilde{\mathbf{a}} =
\mathbf{Q}_2^\top\mathbf{a}`. The left form ("per_example_gradients") materialises rotated
per-example gradients (memory :math:`N D_1 D_2`), the right one ("gramian") contracts the
:math:`S \times S` Gramians entry by entry (memory :math:`N S^2 (D_1 + D_2)`); both are exact,
and the default picks the one with less memory. A bias has :math:`\boldsymbol{\Gamma}_n =
\sum_s \mathbf{g}_{n,s}` and :math:`\mathbf{E} = \sum_n (\mathbf{Q}_1^\top
\boldsymbol{\Gamma}_n)^{\odot 2}`. The sum over :math:`n` runs in chunks of examples, so the
working memory stays below :data:`MAX_CHUNK_ENTRIES` entries whatever :math:`N`.

**Batched eigendecompositions.** :func:`batched_eigh` stacks same-sized symmetric matrices
and decomposes each stack in one ``torch.linalg.eigh`` call (in float64 for lower-precision
matrices up to :data:`FLOAT64_EIGH_MAX_DIM`, cast back, so that float32 eigenbases are as
accurate as the factors). LAPACK's symmetric eigensolver
can fail to converge on ill-conditioned (e.g. rank-deficient float32) matrices; a failing
stack is retried in float64, then with a small diagonal shift
:math:`\epsilon = 10^{-8} \cdot \mathrm{mean}_i |M_{ii}|` (which leaves the eigenvectors of
:math:`\mathbf{M} + \epsilon\mathbf{I}` equal to those of :math:`\mathbf{M}` and shifts the
eigenvalues by :math:`\epsilon`, undone afterwards), each time with a warning.

**Rank-limited factors.** A factor :math:`\mathbf{R}^\top\mathbf{R}` built from :math:`r \ll
d` rows has its non-zero eigenpairs in the small Gram matrix :math:`\mathbf{R}
\mathbf{R}^\top` (:func:`eigenbasis_from_rows`).
"""

import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from curvlinops._autodiff import is_compiling

#: Upper bound on the number of entries of the intermediate tensors of one chunk of the
#: eigenvalue correction (``2**24`` entries are 128 MiB in float64).
MAX_CHUNK_ENTRIES = 2**24

#: Relative size of the diagonal shift of the last :func:`batched_eigh` fallback.
EIGH_DAMPING = 1e-8

#: Largest dimension of lower-precision matrices that :func:`batched_eigh` decomposes in
#: float64 (larger ones are decomposed in their own dtype, where float64 would be slow).
FLOAT64_EIGH_MAX_DIM = 2048

_STRATEGIES = ("per_example_gradients", "gramian")


def compute_eigenvalue_correction_linear_weight_sharing(
    g: Tensor,
    ggT_eigvecs: Tensor,
    a: Tensor,
    aaT_eigvecs: Optional[Tensor],
    _force_strategy: Optional[str] = None,
) -> Tensor:
    r"""Corrected eigenvalues of a linear layer with weight sharing.

    Computes :math:`\sum_n (\mathbf{Q}_1^\top (\sum_s \mathbf{g}_{n,s}
    \mathbf{a}_{n,s}^\top) \mathbf{Q}_2)^{\odot 2}`, or :math:`\sum_n (\mathbf{Q}_1^\top
    \sum_s \mathbf{g}_{n,s})^{\odot 2}` for a bias (``aaT_eigvecs=None``; ``a`` is ignored
    then).

    Args:
        g: Output gradients ``[N, S, D1]``.
        ggT_eigvecs: Eigenvectors :math:`\mathbf{Q}_1` of the gradient factor ``[D1, D1]``
            (as columns).
        a: Inputs ``[N, S, D2]`` (ignored for a bias).
        aaT_eigvecs: Eigenvectors :math:`\mathbf{Q}_2` of the input factor ``[D2, D2]``, or
            ``None`` for a bias.
        _force_strategy: ``"per_example_gradients"`` or ``"gramian"``; by default
            ``"gramian"`` iff :math:`S^2 (D_1 + D_2) < D_1 D_2` (the one with less memory).

    Returns:
        ``[D1, D2]`` for a weight, ``[D1]`` for a bias.

    Raises:
        ValueError: For an unknown ``_force_strategy`` or inconsistent shapes.
    """
    _check_strategy(_force_strategy)
    if g.ndim != 3:
        raise ValueError(f"g must have shape [N, S, D1], got {list(g.shape)}.")
    if ggT_eigvecs.shape != (g.shape[2], g.shape[2]):
        raise ValueError(
            f"ggT_eigvecs must have shape [D1, D1] = {[g.shape[2]] * 2} to match g "
            f"{list(g.shape)}, got {list(ggT_eigvecs.shape)}."
        )
    if aaT_eigvecs is not None:
        if a is None or a.ndim != 3 or a.shape[:2] != g.shape[:2]:
            raise ValueError(
                f"a must have shape [N, S, D2] with the [N, S] = {list(g.shape[:2])} of g, got "
                f"{None if a is None else list(a.shape)}."
            )
        if aaT_eigvecs.shape != (a.shape[2], a.shape[2]):
            raise ValueError(
                f"aaT_eigvecs must have shape [D2, D2] = {[a.shape[2]] * 2} to match a "
                f"{list(a.shape)}, got {list(aaT_eigvecs.shape)}."
            )
    return _rotated_square_sums(
        g, ggT_eigvecs, None if aaT_eigvecs is None else a, aaT_eigvecs, _force_strategy
    )


def per_example_square_sums(g: Tensor, a: Optional[Tensor], strategy: Optional[str] = None):
    r"""``sum_n (sum_s g_{n,s} a_{n,s}^T)^2`` (entry-wise), or ``sum_n (sum_s g_{n,s})^2``.

    The correction without rotation (identity eigenvectors), e.g. for exact diagonals.

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
    _check_strategy(strategy)
    return _rotated_square_sums(g, None, a, None, strategy)


def _check_strategy(strategy: Optional[str]):
    if strategy is not None and strategy not in _STRATEGIES:
        raise ValueError(
            f"Invalid _force_strategy {strategy!r}; use None (automatic), "
            "'per_example_gradients' or 'gramian'."
        )


def _chunk_size(num_examples: int, entries_per_example: int) -> int:
    """Examples per chunk so that a chunk's intermediates stay below the entry budget."""
    return max(1, min(num_examples, MAX_CHUNK_ENTRIES // max(1, entries_per_example)))


def _rotated_square_sums(
    g: Tensor,
    Q1: Optional[Tensor],
    a: Optional[Tensor],
    Q2: Optional[Tensor],
    strategy: Optional[str],
) -> Tensor:
    """The correction; ``a=None`` is the bias form, ``Q1``/``Q2=None`` mean no rotation."""
    N, S, D1 = g.shape
    if a is None:  # bias
        out = g.new_zeros(D1)
        step = _chunk_size(N, S * D1)
        for start in range(0, N, step):
            summed = g[start : start + step].sum(1)
            if Q1 is not None:
                summed = summed @ Q1
            out += (summed**2).sum(0)
        return out
    D2 = a.shape[2]
    if strategy is None:
        strategy = "gramian" if S**2 * (D1 + D2) < D1 * D2 else "per_example_gradients"
    per_example = D1 * D2 if strategy == "per_example_gradients" else S * S * (D1 + D2)
    step = _chunk_size(N, per_example + S * (D1 + D2))
    out = g.new_zeros(D1, D2)
    for start in range(0, N, step):
        g_c, a_c = g[start : start + step], a[start : start + step]
        if Q1 is not None:
            g_c = g_c @ Q1
        if Q2 is not None:
            a_c = a_c @ Q2
        if strategy == "per_example_gradients":
            gradients = torch.einsum("nsi,nsj->nij", g_c, a_c)
            out += torch.einsum("nij,nij->ij", gradients, gradients)
        elif S == 1:
            out += (g_c[:, 0] ** 2).T @ (a_c[:, 0] ** 2)
        else:
            # entry-wise Gramians: [n, s, t, D] with g_ns * g_nt, contracted over (n, s, t)
            g_gram = (g_c.unsqueeze(2) * g_c.unsqueeze(1)).reshape(-1, D1)
            a_gram = (a_c.unsqueeze(2) * a_c.unsqueeze(1)).reshape(-1, D2)
            out += g_gram.T @ a_gram
    return out


def batched_eigh(
    matrices: Union[List[Tensor], Dict[object, Tensor]],
) -> Union[List[Tuple[Tensor, Tensor]], Dict[object, Tuple[Tensor, Tensor]]]:
    """Eigendecompose symmetric matrices; same-sized ones in one batched ``eigh`` call.

    Matrices with equal shape, dtype and device form a group that is stacked and decomposed
    by one ``torch.linalg.eigh`` call. If the call fails to converge (``LinAlgError``, a
    ``RuntimeError``), a non-float64 group is retried in float64 and cast back; if that fails
    too, the group is decomposed in float64 after adding :data:`EIGH_DAMPING` times each
    matrix's mean absolute diagonal to its diagonal (the shift is subtracted from the
    eigenvalues again). Every fallback emits a ``UserWarning``.

    Args:
        matrices: Symmetric matrices ``[n, n]``, as a list or as a dict (any keys).

    Returns:
        ``(eigenvalues ascending [n], eigenvectors as columns [n, n])`` per matrix, like
        ``torch.linalg.eigh``: a list in input order for a list, a dict with the same keys
        for a dict.

    Raises:
        ValueError: If an entry is not a square matrix or has non-finite entries.
        RuntimeError: If even the damped float64 decomposition fails.
    """
    as_dict = isinstance(matrices, dict)
    items = list(matrices.items()) if as_dict else list(enumerate(matrices))
    groups: Dict[Tuple, List] = {}
    for key, matrix in items:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            what = list(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"batched_eigh needs square matrices, got {what} for {key!r}.")
        groups.setdefault((matrix.shape, matrix.dtype, matrix.device), []).append(key)
    lookup = dict(items)
    result = {}
    for keys in groups.values():
        group = [lookup[k] for k in keys]
        if is_compiling():  # traced: no data-dependent checks or fallbacks
            evals, evecs = _traced_eigh(torch.stack(group))
            for i, key in enumerate(keys):
                result[key] = (evals[i], evecs[i])
            continue
        bad = [k for k, matrix in zip(keys, group) if not _is_finite(matrix)]
        if bad:
            raise ValueError(
                f"batched_eigh got matrices with NaN or infinite entries: {bad}. Check the "
                "data and the model for overflow (or use float64)."
            )
        evals, evecs = _robust_eigh(group, keys)
        for i, key in enumerate(keys):
            result[key] = (evals[i], evecs[i])
    if as_dict:
        return {key: result[key] for key, _ in items}
    return [result[i] for i in range(len(items))]


def _is_finite(matrix: Tensor) -> bool:
    """Whether every entry is finite (minimum and maximum propagate NaN and infinity).

    ``torch.isfinite`` would allocate a copy of the matrix (its absolute values) and masks.
    """
    return matrix.numel() == 0 or bool(torch.isfinite(torch.stack(matrix.aminmax())).all())


def _stack(group: List[Tensor], dtype: torch.dtype) -> Tensor:
    """The matrices as one ``[b, n, n]`` tensor of ``dtype``; a view for one of that dtype.

    Written into the result one by one (no stack in the original dtype next to the cast).
    """
    if len(group) == 1 and group[0].dtype == dtype:
        return group[0].unsqueeze(0)
    first = group[0]
    stacked = torch.empty((len(group), *first.shape), dtype=dtype, device=first.device)
    for target, matrix in zip(stacked, group):
        target.copy_(matrix)
    return stacked


def _traced_eigh(stacked: Tensor) -> Tuple[Tensor, Tensor]:
    """``eigh`` as :func:`_robust_eigh` starts it (float64 for small low-precision stacks)."""
    dtype = stacked.dtype
    if dtype != torch.float64 and stacked.shape[-1] <= FLOAT64_EIGH_MAX_DIM:
        evals, evecs = torch.linalg.eigh(stacked.to(torch.float64))
        return evals.to(dtype), evecs.to(dtype)
    return torch.linalg.eigh(stacked)


def _robust_eigh(group: List[Tensor], keys: List) -> Tuple[Tensor, Tensor]:
    """Batched ``eigh`` of same-sized matrices with the float64 and damped fallbacks.

    Lower-precision matrices up to :data:`FLOAT64_EIGH_MAX_DIM` are decomposed in float64 and
    cast back: a float32 ``eigh`` loses a few digits more than the factor's own round-off
    (eigenvectors about ``n`` times ``eps`` from orthogonal), which EKFAC and exact damping
    would pass on to every product; in float64 the result is the float32 rounding of an
    accurate decomposition, at a cost that is small next to the data passes. Each attempt's
    input is made when it runs (a single matrix in its own dtype is not copied).
    """
    dtype, n = group[0].dtype, group[0].shape[-1]
    if dtype == torch.float64:
        attempts = [dtype]
    elif n <= FLOAT64_EIGH_MAX_DIM:
        attempts = [torch.float64]  # small: float64 directly (accuracy)
    else:
        attempts = [dtype, torch.float64]  # large: own dtype, float64 if it fails
    first_error = None
    for attempt in attempts:
        try:
            evals, evecs = torch.linalg.eigh(_stack(group, attempt))
        except RuntimeError as error:  # torch.linalg.LinAlgError derives from RuntimeError
            first_error = first_error or error
            continue
        if first_error is not None:
            warnings.warn(
                f"eigh did not converge in {dtype} for {keys} ({first_error}); decomposed in "
                "float64 instead and cast back.",
                UserWarning,
                stacklevel=3,
            )
        return evals.to(dtype), evecs.to(dtype)
    double = _stack(group, torch.float64)
    if double.data_ptr() == group[0].data_ptr():  # a view of the caller's matrix: copy
        double = double.clone()
    scale = double.diagonal(dim1=-2, dim2=-1).abs().mean(-1)
    # an all-zero matrix still needs a positive shift to perturb the iteration
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    shift = EIGH_DAMPING * scale
    double.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
    try:
        evals, evecs = torch.linalg.eigh(double)
    except RuntimeError as error:
        raise RuntimeError(
            f"eigh failed for {keys} in {dtype}, in float64 and with a diagonal shift of "
            f"{EIGH_DAMPING} x mean |diagonal| ({error}). The matrices are probably badly "
            "scaled; rescale them or add damping before decomposing."
        ) from first_error
    warnings.warn(
        f"eigh did not converge for {keys} in {dtype}"
        + ("" if dtype == torch.float64 else " nor in float64")
        + f" ({first_error}); decomposed in float64 after adding a damping of {EIGH_DAMPING} x "
        "mean |diagonal| to the diagonal (subtracted from the eigenvalues again).",
        UserWarning,
        stacklevel=3,
    )
    return (evals - shift[:, None]).to(dtype), evecs.to(dtype)


def eigenbasis_from_rows(rows: Tensor) -> Tensor:
    r"""Eigenvectors of :math:`\mathbf{R}^\top\mathbf{R}` from the small Gram matrix.

    For a factor :math:`\mathbf{A} = \mathbf{R}^\top\mathbf{R}` with :math:`r` rows and
    :math:`d \gg r` columns, :math:`\mathbf{R}\mathbf{R}^\top = \mathbf{U}\boldsymbol{\Lambda}
    \mathbf{U}^\top` gives the eigenvectors :math:`\mathbf{R}^\top\mathbf{U}
    \boldsymbol{\Lambda}^{-1/2}` of the non-zero eigenvalues; a complete QR factorisation adds
    an orthonormal basis of the null space (eigenvalue zero, so any basis is valid). Costs
    :math:`O(r^3 + d^2 r)` instead of :math:`O(d^3)`.

    Args:
        rows: :math:`\mathbf{R}` of shape ``[r, d]``.

    Returns:
        An orthonormal eigenbasis ``[d, d]`` of :math:`\mathbf{R}^\top\mathbf{R}` (columns),
        with the range first.

    Raises:
        ValueError: If ``rows`` is not a matrix.
    """
    if rows.ndim != 2:
        raise ValueError(f"rows must be a matrix [r, d], got shape {list(rows.shape)}.")
    dtype = rows.dtype
    if dtype in (torch.float32, torch.float16, torch.bfloat16) and max(rows.shape) <= (
        FLOAT64_EIGH_MAX_DIM
    ):
        # as in batched_eigh: the float32 rounding of an accurate basis
        return eigenbasis_from_rows(rows.to(torch.float64)).to(dtype)
    ((evals, U),) = batched_eigh([rows @ rows.T])
    tolerance = evals.max().clamp_min(0) * rows.shape[0] * torch.finfo(rows.dtype).eps
    keep = evals > tolerance
    thin = (rows.T @ U[:, keep]) / evals[keep].sqrt()
    if thin.shape[1] == 0:  # R = 0: every basis is an eigenbasis
        return torch.eye(rows.shape[1], dtype=rows.dtype, device=rows.device)
    Q, R = torch.linalg.qr(thin, mode="complete")
    # align the first columns with the range eigenvectors (QR fixes them up to sign)
    diagonal = torch.diagonal(R)
    signs = torch.where(diagonal < 0, -torch.ones_like(diagonal), torch.ones_like(diagonal))
    Q[:, : signs.numel()] *= signs
    return Q
