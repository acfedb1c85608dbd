r"""Structured block operators of the block-diagonal Kronecker approximations.

KFAC, EKFAC and their inverse are block-diagonal over layers. One block object serves one
layer (module) and acts on its parameter *kinds*: a weight :math:`\mathbf{V} \in
\mathbb{R}^{d_\text{out} \times n}` (convolution weights flattened over their last axes),
a bias :math:`\mathbf{v} \in \mathbb{R}^{d_\text{out} \times 1}`, or, for a joint weight and
bias, :math:`[\mathbf{V}_W \mid \mathbf{v}_b]`. All products accept ``V`` as ``[d_out, n]``
or, columns last, ``[d_out, n, K]`` and treat all columns in one matrix product.

- :class:`KroneckerBlock`: :math:`\mathbf{G} \otimes \mathbf{A}` in the row-major
  flattening, :math:`\mathbf{V} \mapsto \mathbf{G}\mathbf{V}\mathbf{A}` (a bias uses
  :math:`\mathbf{G}` alone);
- :class:`EigenbasisBlock`: :math:`(\mathbf{Q}_G \otimes \mathbf{Q}_A)\,
  \mathrm{diag}(\mathrm{vec}\boldsymbol{\Lambda})\,(\mathbf{Q}_G \otimes \mathbf{Q}_A)^\top`,
  :math:`\mathbf{V} \mapsto \mathbf{Q}_G((\mathbf{Q}_G^\top\mathbf{V}\mathbf{Q}_A) \odot
  \boldsymbol{\Lambda})\mathbf{Q}_A^\top` (KFAC's eigenvalues :math:`\boldsymbol{\lambda}_G
  \boldsymbol{\lambda}_A^\top`, or EKFAC's corrected ones);
- :class:`DiagonalBlock`: :math:`\mathrm{diag}(\mathrm{vec}\,\mathbf{D})`,
  :math:`\mathbf{V} \mapsto \mathbf{D} \odot \mathbf{V}`.

Each knows its product, damped inverse, trace, (log-)determinant and squared Frobenius norm
per parameter kind.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from curvlinops._autodiff import is_compiling
from curvlinops._ekfac_correction import batched_eigh

#: A damping :math:`\delta` or a pair :math:`(\delta_A, \delta_G)`.
Damping = Union[float, Tuple[float, float]]

#: Parameter kinds a block acts on: ``"weight"`` (G and A), ``"bias"`` (G alone) and
#: ``"joint"`` (weight and bias, A with the ones row).
KINDS = ("weight", "bias", "joint")


def block_left(L: Tensor, V: Tensor) -> Tensor:
    """``L @ V`` for a block ``V`` of shape ``[o, n]`` or, columns last, ``[o, n, K]``."""
    if V.ndim == 2:
        return L @ V
    return (L @ V.reshape(V.shape[0], -1)).view(L.shape[0], *V.shape[1:])


def block_right(V: Tensor, R: Tensor) -> Tensor:
    """``V @ R`` for a block ``V`` of shape ``[o, n]`` or, columns last, ``[o, n, K]``.

    The columns-last case makes one transposing copy and then a single matrix product
    instead of ``K`` broadcast products. (Plain ``transpose``/``reshape`` here: this runs per
    block and product, where ``einops``' per-call overhead is measurable for small layers.)
    """
    if V.ndim == 2:
        return V @ R
    o, n, K = V.shape
    return (V.transpose(1, 2).reshape(o * K, n) @ R).view(o, K, -1).transpose(1, 2)


def block_scale(V: Tensor, S: Tensor) -> Tensor:
    """Entry-wise ``V * S`` with ``S`` of shape ``[o, n]`` (broadcast over columns)."""
    return V * (S if V.ndim == 2 else S.unsqueeze(-1))


def _damped_copy(matrix: Tensor, damping: float, dtype: torch.dtype) -> Tensor:
    r""":math:`\mathbf{M} + \delta\mathbf{I}` as a new matrix of ``dtype`` (no identity matrix)."""
    damped = matrix.to(dtype=dtype, copy=True)
    damped.diagonal().add_(damping)
    return damped


def _spd_inverse(holder: List[Tensor]) -> Tensor:
    """Inverse of a symmetric positive definite matrix by Cholesky.

    The matrix comes in a one-element list that this function empties, so that the matrix is
    freed as soon as its Cholesky factor exists: at most two matrices of its size are alive
    at once (the matrix and its factor, then the factor and the inverse).

    A numerically singular matrix (rank-deficient up to round-off) can pass the Cholesky
    factorisation with a tiny positive pivot and give an inverse of size ``1 / eps``; such a
    pivot is treated like a failed factorisation.

    Raises:
        torch.linalg.LinAlgError: If the matrix is not numerically positive definite.
    """
    matrix = holder.pop()
    L = torch.linalg.cholesky(matrix)
    if is_compiling():  # no data-dependent checks in a traced product
        return torch.cholesky_inverse(L)
    n = matrix.shape[0]
    scale = matrix.diagonal().abs().max() if n > 0 else None
    tolerance = n * torch.finfo(matrix.dtype).eps * scale if n > 0 else None
    del matrix
    pivots = L.diagonal() ** 2
    # NaN and infinity propagate into the sum (isfinite(L) would copy L); finite entries
    # cannot overflow it: |L_ij| <= sqrt(max M_ii) <= sqrt(largest float)
    if n > 0 and (pivots.min() <= tolerance or not torch.isfinite(L.sum())):
        raise torch.linalg.LinAlgError(
            f"the matrix is numerically singular (smallest Cholesky pivot {pivots.min():.3e} "
            f"is within round-off {tolerance:.3e} of zero)."
        )
    return torch.cholesky_inverse(L)


def damped_spd_inverse(matrix: Tensor, damping: float, what: str, retry_double: bool) -> Tensor:
    r""":math:`(\mathbf{M} + \delta\mathbf{I})^{-1}` by Cholesky, retried in float64 if allowed.

    Peak memory: two matrices of the factor's size besides the factor (the damped copy and its
    Cholesky factor, then the factor and the inverse).

    Args:
        matrix: A symmetric positive semi-definite factor.
        damping: The damping :math:`\delta` added to its diagonal.
        what: Description of the factor for messages.
        retry_double: Retry a failed low-precision factorisation in float64 (with a warning).

    Returns:
        The inverse, in the factor's dtype.

    Raises:
        RuntimeError: (``torch.linalg.LinAlgError``) If the damped factor is not numerically
            positive definite (after the float64 retry, if allowed).
    """
    dtype = matrix.dtype
    try:
        return _spd_inverse([_damped_copy(matrix, damping, dtype)])
    except RuntimeError as error:
        if dtype == torch.float64 or not retry_double:
            hint = (
                ""
                if dtype == torch.float64
                else ", or pass retry_double_precision=True to retry in float64"
            )
            raise torch.linalg.LinAlgError(
                f"Cholesky factorisation of the damped {what} (damping {damping}) failed in "
                f"{dtype}: {error} Increase the damping (or min_damping){hint}."
            ) from error
        first_error = error
    warnings.warn(
        f"Cholesky factorisation of the damped {what} failed in {dtype} ({first_error}); "
        "retrying in float64.",
        UserWarning,
        stacklevel=6,
    )
    try:
        inverse = _spd_inverse([_damped_copy(matrix, damping, torch.float64)])
    except RuntimeError as error:
        raise torch.linalg.LinAlgError(
            f"Cholesky factorisation of the damped {what} (damping {damping}) failed in "
            f"{dtype} and in float64: {error} Increase the damping (or min_damping)."
        ) from error
    return inverse.to(dtype)


@dataclass(frozen=True)
class InverseOptions:
    r"""How a block is inverted (the hyper-parameters of the KFAC inverse).

    Attributes:
        damping: :math:`\delta`, or :math:`(\delta_A, \delta_G)` for factor damping.
        heuristic: Split :math:`\delta` between the factors with the :math:`\pi` heuristic.
        min_damping: Lower bound of the heuristic factor dampings.
        exact: Invert :math:`\text{block} + \delta\mathbf{I}` exactly (eigenbasis).
        retry_double: Retry a failed Cholesky factorisation in float64.
    """

    damping: Damping = 0.0
    heuristic: bool = False
    min_damping: float = 1e-8
    exact: bool = False
    retry_double: bool = True


class KroneckerBlock:
    r"""A layer's block :math:`\mathbf{G} \otimes \mathbf{A}` (a bias uses :math:`\mathbf{G}`).

    For a weight (or joint) kind with :math:`n = \dim\mathbf{A}`, :math:`m = \dim\mathbf{G}`:
    :math:`\mathrm{tr} = \mathrm{tr}\mathbf{A}\,\mathrm{tr}\mathbf{G}`,
    :math:`\det = \det(\mathbf{A})^m \det(\mathbf{G})^n`,
    :math:`\log\det = m\log\det\mathbf{A} + n\log\det\mathbf{G}`,
    :math:`\|\cdot\|_F^2 = \|\mathbf{A}\|_F^2\|\mathbf{G}\|_F^2`; a bias kind has
    :math:`\mathbf{A} = 1` (:math:`n = 1`).

    Attributes:
        name: The layer's module name (for messages).
        G: The output-side factor ``[d_out, d_out]``.
        A: The input-side factor ``[n, n]``, or ``None`` if the layer has no weight.
        eigenvalues: ``None`` (the block is not stored in an eigenbasis).
    """

    eigenvalues = None

    def __init__(self, name: str, G: Tensor, A: Optional[Tensor] = None):
        """Store the factors (by reference: they are read live)."""
        self.name, self.G, self.A = name, G, A

    def factors(self) -> Tuple[Optional[Tensor], Tensor]:
        """``(A, G)``."""
        return self.A, self.G

    def matmat(self, V: Tensor, kind: str) -> Tensor:
        r""":math:`\mathbf{G}\mathbf{V}\mathbf{A}` (bias: :math:`\mathbf{G}\mathbf{V}`)."""
        GV = block_left(self.G, V)
        return GV if kind == "bias" else block_right(GV, self.A)

    def trace(self, kind: str) -> Tensor:
        """Trace of the kind's block."""
        return self.G.trace() * (1.0 if kind == "bias" else self.A.trace())

    def det(self, kind: str) -> Tensor:
        """Determinant of the kind's block."""
        if kind == "bias":
            return self.G.det()
        return self.G.det() ** self.A.shape[0] * self.A.det() ** self.G.shape[0]

    def logdet(self, kind: str) -> Tensor:
        """Log-determinant of the kind's block."""
        if kind == "bias":
            return self.G.logdet()
        return self.A.shape[0] * self.G.logdet() + self.G.shape[0] * self.A.logdet()

    def squared_frobenius_norm(self, kind: str) -> Tensor:
        """Squared Frobenius norm of the kind's block."""
        return (self.G**2).sum() * (1.0 if kind == "bias" else (self.A**2).sum())

    # ------------------------------------------------------------- inverse
    def factor_dampings(self, options: InverseOptions) -> Tuple[float, float]:
        r"""The dampings :math:`(\delta_A, \delta_G)` of the factors.

        With the heuristic (Martens & Grosse, 2015, section 6.3), :math:`\pi =
        \sqrt{(\mathrm{tr}\mathbf{A}/n) / (\mathrm{tr}\mathbf{G}/m)}`, :math:`\delta_A =
        \max(\pi\sqrt{\delta}, \delta_\text{min})`, :math:`\delta_G =
        \max(\sqrt{\delta}/\pi, \delta_\text{min})`. It applies only with both factors, a
        positive mean eigenvalue of :math:`\mathbf{G}` and a positive :math:`\pi` (else
        :math:`\delta_G = \infty`); the plain damping is used otherwise.
        """
        if isinstance(options.damping, tuple):
            return float(options.damping[0]), float(options.damping[1])
        delta = float(options.damping)
        if options.heuristic and self.A is not None:
            mean_A = (self.A.diagonal() if self.A.ndim == 2 else self.A).mean().item()
            mean_G = (self.G.trace() / self.G.shape[0]).item()
            if mean_A >= 0 and mean_G > 0:
                pi = math.sqrt(mean_A / mean_G)
                if pi > 0:
                    root = math.sqrt(delta)
                    return max(pi * root, options.min_damping), max(root / pi, options.min_damping)
        return delta, delta

    def inverse_parts(self, options: InverseOptions) -> Tuple[object, object]:
        r"""What the inverse needs from the factors, ``(A part, G part)`` (cacheable).

        Factor damping: :math:`(\mathbf{A} + \delta_A\mathbf{I})^{-1}` (``None`` without
        ``A``) and :math:`(\mathbf{G} + \delta_G\mathbf{I})^{-1}`. Exact damping: the
        eigenpairs ``(eigenvectors, eigenvalues)`` of ``A`` (or ``None``) and ``G``, from one
        batched ``eigh`` call.
        """
        if options.exact:
            decomposed = batched_eigh([self.G] if self.A is None else [self.G, self.A])
            G_pair = decomposed[0][::-1]
            return (None if self.A is None else decomposed[1][::-1]), G_pair
        delta_A, delta_G = self.factor_dampings(options)
        retry = options.retry_double
        A_inv = (
            None
            if self.A is None
            else damped_spd_inverse(self.A, delta_A, f"input factor of module {self.name!r}", retry)
        )
        G_inv = damped_spd_inverse(
            self.G, delta_G, f"gradient factor of module {self.name!r}", retry
        )
        return A_inv, G_inv

    def inverse_from_parts(
        self, parts: Tuple[object, object], options: InverseOptions, kinds
    ) -> Union["KroneckerBlock", "EigenbasisBlock"]:
        """The damped inverse block from :meth:`inverse_parts` (possibly cached)."""
        A_part, G_part = parts
        if not options.exact:
            return KroneckerBlock(self.name, G_part, A_part)
        eigen = EigenbasisBlock.from_eigenpairs(self.name, G_part, A_part, kinds)
        return eigen.inverse(float(options.damping))


class _SpectralBlock:
    """Trace, determinants and norm of a block from its eigenvalues ``{kind: [d_out, n]}``."""

    eigenvalues: Dict[str, Tensor]

    def trace(self, kind: str) -> Tensor:
        """Sum of the kind's eigenvalues."""
        return self.eigenvalues[kind].sum()

    def det(self, kind: str) -> Tensor:
        """Product of the kind's eigenvalues."""
        return self.eigenvalues[kind].prod()

    def logdet(self, kind: str) -> Tensor:
        """Sum of the logarithms of the kind's eigenvalues."""
        return self.eigenvalues[kind].log().sum()

    def squared_frobenius_norm(self, kind: str) -> Tensor:
        """Sum of the kind's squared eigenvalues."""
        return (self.eigenvalues[kind] ** 2).sum()

    def inverse_parts(self, options: "InverseOptions") -> None:
        """Nothing to precompute or cache: the eigenvalues are already there."""
        return None

    def inverse_from_parts(self, parts, options: "InverseOptions", kinds):
        """The exactly damped inverse (``parts`` is unused)."""
        return self.inverse(float(options.damping))


class EigenbasisBlock(_SpectralBlock):
    r"""A layer's block in a Kronecker eigenbasis, :math:`\mathbf{Q}_G \otimes \mathbf{Q}_A`.

    :math:`\mathbf{V} \mapsto \mathbf{Q}_G((\mathbf{Q}_G^\top\mathbf{V}\mathbf{Q}_A) \odot
    \boldsymbol{\Lambda})\mathbf{Q}_A^\top` with eigenvalues :math:`\boldsymbol{\Lambda}`
    (``[d_out, n]`` per kind; a bias has no :math:`\mathbf{Q}_A` and ``n = 1``). Trace
    :math:`\sum\Lambda`, determinant :math:`\prod\Lambda`, log-determinant
    :math:`\sum\log\Lambda`, squared Frobenius norm :math:`\sum\Lambda^2`; the damped inverse
    keeps the basis and takes :math:`1 / (\boldsymbol{\Lambda} + \delta)`.

    Attributes:
        name: The layer's module name (for messages).
        Q_G: Eigenvectors of the output side (columns).
        Q_A: Eigenvectors of the input side, or ``None`` if the layer has no weight.
        eigenvalues: ``{kind: [d_out, n]}``.
        round_off: ``{kind: tolerance}`` below which an eigenvalue counts as zero, or
            ``None`` for :math:`\max(d_\text{out}, n)\,\epsilon\max|\Lambda|`.
    """

    def __init__(
        self,
        name: str,
        Q_G: Tensor,
        Q_A: Optional[Tensor],
        eigenvalues: Dict[str, Tensor],
        round_off: Optional[Dict[str, Tensor]] = None,
    ):
        """Store basis and eigenvalues (by reference)."""
        self.name, self.Q_G, self.Q_A = name, Q_G, Q_A
        self.eigenvalues, self.round_off = eigenvalues, round_off

    @classmethod
    def from_eigenpairs(
        cls, name: str, G_pair: Tuple[Tensor, Tensor], A_pair, kinds
    ) -> "EigenbasisBlock":
        r"""KFAC's block in its eigenbasis, from the eigenpairs of its factors.

        The eigenvalues are :math:`\boldsymbol{\lambda}_G \boldsymbol{\lambda}_A^\top` (a
        bias: :math:`\boldsymbol{\lambda}_G`); ``eigh`` is accurate to about
        :math:`\dim \cdot \epsilon \cdot \max|\lambda|` per
        factor, which gives the round-off of the products.

        Args:
            name: The module name.
            G_pair: ``(Q_G, lambda_G)``.
            A_pair: ``(Q_A, lambda_A)`` or ``None``.
            kinds: The parameter kinds of the layer.
        """
        Q_G, lam_G = G_pair
        eps = torch.finfo(lam_G.dtype).eps
        eigenvalues, round_off = {}, {}
        for kind in kinds:
            if kind == "bias":
                eigenvalues[kind] = lam_G.unsqueeze(-1)
                round_off[kind] = lam_G.numel() * eps * lam_G.abs().max()
            else:
                lam_A = A_pair[1]
                eigenvalues[kind] = torch.outer(lam_G, lam_A)
                round_off[kind] = (
                    (lam_G.numel() + lam_A.numel()) * eps * lam_G.abs().max() * lam_A.abs().max()
                )
        return cls(name, Q_G, None if A_pair is None else A_pair[0], eigenvalues, round_off)

    def factors(self) -> Tuple[Optional[Tensor], Tensor]:
        """``(Q_A, Q_G)``."""
        return self.Q_A, self.Q_G

    def matmat(self, V: Tensor, kind: str) -> Tensor:
        """Rotate into the eigenbasis, scale by the eigenvalues, rotate back."""
        rotated = block_left(self.Q_G.T, V)
        if kind != "bias":
            rotated = block_right(rotated, self.Q_A)
        out = block_left(self.Q_G, block_scale(rotated, self.eigenvalues[kind]))
        return out if kind == "bias" else block_right(out, self.Q_A.T)

    def inverse(self, delta: float) -> "EigenbasisBlock":
        """``(block + delta I)^{-1}``, refusing a numerically singular damped block.

        Raises:
            torch.linalg.LinAlgError: (a ``RuntimeError``) If a damped eigenvalue is not
                clearly positive, which would give infinite or NaN products.
        """
        inverse = {}
        for kind, values in self.eigenvalues.items():
            damped = values + delta
            if not is_compiling():  # no data-dependent checks in a traced product
                self._check_invertible(kind, damped, delta)
            inverse[kind] = 1.0 / damped
        return EigenbasisBlock(self.name, self.Q_G, self.Q_A, inverse)

    def _check_invertible(self, kind: str, damped: Tensor, delta: float):
        values = self.eigenvalues[kind]
        if self.round_off is not None:
            tolerance = self.round_off[kind]
        else:  # sums of squares: round-off relative to the largest one
            tolerance = max(values.shape) * values.abs().max() * torch.finfo(values.dtype).eps
        smallest = damped.min()
        if not torch.isfinite(damped).all() or smallest <= tolerance:
            raise torch.linalg.LinAlgError(
                f"The exactly damped curvature block of module {self.name!r} is singular: its "
                f"smallest damped eigenvalue is {smallest.item():.3e} with damping {delta}, "
                f"within round-off ({tolerance.item():.3e}) of zero, so its inverse would be "
                "infinite or NaN. Increase the damping (damping > 0)."
            )


class DiagonalBlock(_SpectralBlock):
    r"""A diagonal layer block, :math:`\mathbf{V} \mapsto \mathbf{D} \odot \mathbf{V}`.

    Its eigenvalues are the entries :math:`\mathbf{D}`: trace :math:`\sum D`, determinant
    :math:`\prod D`, log-determinant :math:`\sum \log D`, squared Frobenius norm
    :math:`\sum D^2`, damped inverse :math:`1 / (\mathbf{D} + \delta)`.

    Attributes:
        name: The layer's module name (for messages).
        eigenvalues: The diagonal entries ``{kind: [d_out, n]}``.
    """

    def __init__(self, name: str, entries: Dict[str, Tensor]):
        """Store the diagonal (by reference)."""
        self.name, self.eigenvalues = name, entries

    def factors(self) -> Tuple[None, None]:
        """No factors: ``(None, None)``."""
        return None, None

    def matmat(self, V: Tensor, kind: str) -> Tensor:
        """Entry-wise product with the kind's diagonal."""
        return block_scale(V, self.eigenvalues[kind])

    def inverse_from_parts(self, parts, options: "InverseOptions", kinds):
        """``(D + delta)^{-1}``; a pair ``(delta_A, delta_G)`` damps by ``delta_A * delta_G``."""
        damping = options.damping
        if isinstance(damping, tuple):
            damping = float(damping[0]) * float(damping[1])
        return self.inverse(float(damping))

    def inverse(self, delta: float) -> "DiagonalBlock":
        """``(D + delta)^{-1}`` entry-wise.

        Raises:
            torch.linalg.LinAlgError: If a damped entry is not clearly positive.
        """
        inverse = EigenbasisBlock(self.name, None, None, self.eigenvalues).inverse(delta)
        return DiagonalBlock(self.name, inverse.eigenvalues)


class EmbeddingBlock(KroneckerBlock):
    r"""An embedding's block :math:`\mathrm{diag}(\mathbf{a}) \otimes \mathbf{G}`.

    The table :math:`\mathbf{W}` (``[vocab, d]``) acts as the linear map
    :math:`\mathbf{W}^\top` of one-hot inputs, so in the row-major flattening of
    :math:`\mathbf{W}` the Kronecker order is (input side, output side) and the input factor is
    the diagonal :math:`\mathbf{a}` of token counts: :math:`\mathbf{V} \mapsto
    \mathrm{diag}(\mathbf{a})\,\mathbf{V}\mathbf{G}`. Never a vocabulary-sized dense matrix:
    trace :math:`\sum a\,\mathrm{tr}\mathbf{G}`, :math:`\log\det = d\sum\log a +
    n\log\det\mathbf{G}`, squared Frobenius norm :math:`\|\mathbf{a}\|^2\|\mathbf{G}\|_F^2`,
    damped inverse :math:`\mathrm{diag}(1/(\mathbf{a}+\delta_A)) \otimes
    (\mathbf{G}+\delta_G\mathbf{I})^{-1}` (exact damping: eigenvalues
    :math:`\mathbf{a}\boldsymbol{\lambda}_G^\top` in the basis :math:`\mathbf{I} \otimes
    \mathbf{Q}_G`).

    Attributes:
        A: The diagonal ``[vocab]`` (1-d).
        G: The output-side factor ``[d, d]``.
    """

    def matmat(self, V: Tensor, kind: str) -> Tensor:
        r""":math:`\mathrm{diag}(\mathbf{a})\,\mathbf{V}\mathbf{G}`."""
        return _scale_rows(block_right(V, self.G), self.A)

    def trace(self, kind: str) -> Tensor:
        """Trace of the block."""
        return self.A.sum() * self.G.trace()

    def det(self, kind: str) -> Tensor:
        """Determinant of the block."""
        return self.A.prod() ** self.G.shape[0] * self.G.det() ** self.A.shape[0]

    def logdet(self, kind: str) -> Tensor:
        """Log-determinant of the block."""
        return self.G.shape[0] * self.A.log().sum() + self.A.shape[0] * self.G.logdet()

    def squared_frobenius_norm(self, kind: str) -> Tensor:
        """Squared Frobenius norm of the block."""
        return (self.A**2).sum() * (self.G**2).sum()

    def inverse_parts(self, options: InverseOptions) -> Tuple[object, object]:
        """``(1 / (a + delta_A), (G + delta_G I)^{-1})``, or ``((None, a), eigh(G))`` if exact.

        Raises:
            torch.linalg.LinAlgError: If a damped count is not positive.
        """
        if options.exact:
            Q_G, lam_G = batched_eigh([self.G])[0][::-1]
            return (None, self.A), (Q_G, lam_G)
        delta_A, delta_G = self.factor_dampings(options)
        damped = self.A + delta_A
        if not is_compiling() and self.A.numel() > 0 and damped.min() <= 0:
            raise torch.linalg.LinAlgError(
                f"The damped input factor (token counts) of embedding {self.name!r} has the "
                f"entry {damped.min().item():.3e} <= 0 (damping {delta_A}); increase the damping."
            )
        G_inv = damped_spd_inverse(
            self.G, delta_G, f"gradient factor of module {self.name!r}", options.retry_double
        )
        return 1.0 / damped, G_inv

    def inverse_from_parts(self, parts, options: InverseOptions, kinds):
        """The damped inverse block from :meth:`inverse_parts` (possibly cached)."""
        A_part, G_part = parts
        if not options.exact:
            return EmbeddingBlock(self.name, G_part, A_part)
        Q_G, lam_G = G_part
        lam = torch.outer(A_part[1], lam_G)
        eps = torch.finfo(lam.dtype).eps
        round_off = (lam.shape[0] + lam.shape[1]) * eps * lam.abs().max()
        return RightEigenbasisBlock(self.name, Q_G, {"weight": lam}, {"weight": round_off}).inverse(
            float(options.damping)
        )


def _scale_rows(V: Tensor, a: Tensor) -> Tensor:
    """``diag(a) V`` for ``V`` of shape ``[o, n]`` or ``[o, n, K]``."""
    return V * a.view(-1, *([1] * (V.ndim - 1)))


class RightEigenbasisBlock(_SpectralBlock):
    r"""A block in the basis :math:`\mathbf{I} \otimes \mathbf{Q}` (an embedding's, exactly damped).

    :math:`\mathbf{V} \mapsto ((\mathbf{V}\mathbf{Q}) \odot \boldsymbol{\Lambda})\mathbf{Q}^\top`.

    Attributes:
        name: The module name.
        Q: Eigenvectors of the column side.
        eigenvalues: ``{"weight": [vocab, d]}``.
        round_off: ``{"weight": tolerance}`` or ``None``.
    """

    def __init__(self, name: str, Q: Tensor, eigenvalues: Dict[str, Tensor], round_off=None):
        """Store basis and eigenvalues (by reference)."""
        self.name, self.Q, self.eigenvalues, self.round_off = name, Q, eigenvalues, round_off

    def factors(self) -> Tuple[None, Tensor]:
        """``(None, Q)``."""
        return None, self.Q

    def matmat(self, V: Tensor, kind: str) -> Tensor:
        """Rotate the columns, scale, rotate back."""
        scaled = block_scale(block_right(V, self.Q), self.eigenvalues[kind])
        return block_right(scaled, self.Q.T)

    def inverse(self, delta: float) -> "RightEigenbasisBlock":
        """``(block + delta I)^{-1}`` (refusing a singular damped block, as eigenbasis blocks)."""
        values = EigenbasisBlock(self.name, None, None, self.eigenvalues, self.round_off)
        return RightEigenbasisBlock(self.name, self.Q, values.inverse(delta).eigenvalues)


Block = Union[KroneckerBlock, EigenbasisBlock, DiagonalBlock, EmbeddingBlock, RightEigenbasisBlock]


#: One slot of the block-diagonal layout: (module name, kind, parameter positions).
Slot = Tuple[str, str, Tuple[int, ...]]


def block_layout(mapping: Dict[str, Dict[str, int]], separate_weight_and_bias: bool) -> List[Slot]:
    """The diagonal blocks of a layer mapping, in module order.

    A module with weight and bias in ``params`` forms one ``"joint"`` block unless
    ``separate_weight_and_bias``; otherwise each present parameter forms its own block.
    """
    layout = []
    for name, entry in mapping.items():
        if "weight" in entry and "bias" in entry and not separate_weight_and_bias:
            layout.append((name, "joint", (entry["weight"], entry["bias"])))
            continue
        layout.extend((name, kind, (entry[kind],)) for kind in ("weight", "bias") if kind in entry)
    return layout


def apply_block_diagonal(
    layout: List[Slot],
    M: List[Tensor],
    result: List[Tensor],
    apply: Callable[[str, str, Tensor], Tensor],
) -> List[Tensor]:
    """Apply a per-block map to a matrix in list format (entries ``[*p.shape, K]``).

    Each block's columns are gathered into ``V``: ``[d_out, n]`` for one column, else
    ``[d_out, n, K]`` (columns last, as the input comes). A weight block has ``n = d_in'``
    (conv weights flattened over their last axes), a bias block ``n = 1``, a joint block
    ``n = d_in' + 1`` (bias as last column). ``apply(name, kind, V)`` returns a tensor of the
    same shape, which is written into ``result`` (e.g. views of one flat output buffer).

    Returns:
        ``result``.
    """
    K = M[0].shape[-1]
    for name, kind, positions in layout:
        parts = [M[i].reshape(M[i].shape[0], -1, K) for i in positions]
        V = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        out = apply(name, kind, V.squeeze(-1) if K == 1 else V)
        if K == 1:
            out = out.unsqueeze(-1)
        targets = [result[i].view(result[i].shape[0], -1, K) for i in positions]
        if kind == "joint":
            targets[0].copy_(out[:, :-1])
            targets[1].copy_(out[:, -1:])
        else:
            targets[0].copy_(out)
    return result


class BlockDiagonalMixin:
    """Products and properties of an operator that is block-diagonal over layers.

    The operator supplies ``_layer_blocks()`` (``{module name: block}``), ``_layout()``
    (:func:`block_layout`), ``_new_output`` and the property caches ``_trace``, ``_det``,
    ``_logdet``, ``_frobenius_norm``; the trace, (log-)determinant and Frobenius norm are
    those of the blocks combined (sums, products, root of the summed squares).
    """

    def _fallback_layout(self) -> List[Slot]:
        """Slots of blocks without layer factors (e.g. the diagonal fallback); none here."""
        return []

    def _fallback_blocks(self) -> Dict[str, "Block"]:
        """Blocks of :meth:`_fallback_layout`; none here."""
        return {}

    def _full_layout(self) -> List[Slot]:
        """All slots: the layers' (``_layout()``) and the fallback's."""
        return self._layout() + self._fallback_layout()

    def _all_blocks(self) -> Dict[str, "Block"]:
        """All blocks: the layers' (computed first) and the fallback's."""
        blocks = dict(self._layer_blocks())
        blocks.update(self._fallback_blocks())
        return blocks

    def _apply_blocks(self, M: List[Tensor], blocks: Dict[str, "Block"]) -> List[Tensor]:
        """Multiply ``M`` (list format) by the block-diagonal matrix of ``blocks``."""
        result = self._new_output(M[0].shape[-1], like=M[0])
        return apply_block_diagonal(
            self._full_layout(), M, result, lambda name, kind, V: blocks[name].matmat(V, kind)
        )

    def _matmat(self, M: List[Tensor]) -> List[Tensor]:
        return self._apply_blocks(M, self._all_blocks())

    def _block_sum(self, quantity: str) -> Tensor:
        """Sum of a per-block quantity (``"trace"``, ``"logdet"``, ...) over all blocks."""
        blocks = self._all_blocks()
        return sum(getattr(blocks[name], quantity)(kind) for name, kind, _ in self._full_layout())

    @property
    def trace(self) -> Tensor:
        r"""Trace, the sum of the block traces.

        KFAC: :math:`\sum \mathrm{tr}(\mathbf{A})\mathrm{tr}(\mathbf{G})` over blocks.
        """
        if self._trace is None:
            self._trace = self._block_sum("trace")
        return self._trace

    @property
    def det(self) -> Tensor:
        r"""Determinant, the product of the block determinants.

        KFAC: :math:`\prod \det(\mathbf{A})^m \det(\mathbf{G})^n` over blocks.
        """
        if self._det is None:
            det = torch.ones((), dtype=self.dtype, device=self.device)
            blocks = self._all_blocks()
            for name, kind, _ in self._full_layout():
                det = det * blocks[name].det(kind)
            self._det = det
        return self._det

    @property
    def logdet(self) -> Tensor:
        r"""Log-determinant, the sum of the block log-determinants.

        KFAC: :math:`\sum m \log\det\mathbf{A} + n \log\det\mathbf{G}` over blocks.
        """
        if self._logdet is None:
            zero = torch.zeros((), dtype=self.dtype, device=self.device)
            self._logdet = zero + self._block_sum("logdet")
        return self._logdet

    @property
    def frobenius_norm(self) -> Tensor:
        r"""Frobenius norm, the root of the sum of the squared block norms.

        KFAC: :math:`\sqrt{\sum \|\mathbf{A}\|_F^2 \|\mathbf{G}\|_F^2}` over blocks.
        """
        if self._frobenius_norm is None:
            self._frobenius_norm = torch.as_tensor(self._block_sum("squared_frobenius_norm")).sqrt()
        return self._frobenius_norm
