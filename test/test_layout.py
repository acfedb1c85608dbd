"""Memory layout of multi-column products (issue 14, "Memory layout").

An input ``[D, K]`` that is the transpose of a contiguous ``[K, D]`` tensor (``V = W.T``) is
multiplied without a copy and gives a result that is the transpose of a contiguous ``[K, M]``
tensor; every other input keeps today's contiguous result. Both layouts must give the same
numbers (float64, up to round-off), for every operator family, with several batches,
chunked columns and a single column. The estimators, ``eigsh`` and the report hand their
blocks to the products in the transposed layout, with unchanged draws.
"""

from typing import List

import numpy as np
import pytest
import torch
from cases import make_case
from torch import Tensor, nn

from curvlinops import (
    CGInverseLinearOperator,
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    SubmatrixLinearOperator,
    TransposedJacobianLinearOperator,
    hutchinson_diag,
    hutchinson_squared_fro,
    hutchinson_trace,
    hutchpp_trace,
    report,
    xdiag,
    xtrace,
)
from curvlinops import ggn as ggn_module
from curvlinops import hessian as hessian_module
from curvlinops._estimators import draw
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.eigen import eigsh
from curvlinops.examples import IdentityLinearOperator, TensorLinearOperator
from curvlinops.sampling import rademacher_columns, random_vector

DT = torch.float64


def columns_contiguous(V: Tensor) -> Tensor:
    """The same values as ``V`` ``[D, K]``, laid out as the transpose of a contiguous tensor."""
    return V.T.contiguous().T


def assert_same(actual: Tensor, expected: Tensor):
    """Equal up to round-off (relative to the largest entry)."""
    scale = max(expected.abs().max().item(), 1.0)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-10 * scale


def assert_layout(out: Tensor, columns_major: bool):
    """``out`` is contiguous, or (``columns_major``) the transpose of a contiguous tensor."""
    if columns_major:
        assert out.T.is_contiguous(), out.stride()
    else:
        assert out.is_contiguous(), out.stride()


def check_layouts(A: PyTorchLinearOperator, num_columns: int, seed: int = 0):
    """Contiguous and transposed inputs: same numbers, each result in its input's layout."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(A.shape[1], num_columns, dtype=DT, generator=gen)
    W = columns_contiguous(V)
    expected = A @ V
    assert_layout(expected, columns_major=False)
    out = A @ W
    assert_same(out, expected)
    assert_layout(out, columns_major=num_columns > 1)
    if num_columns > 1 and A.shape[0] > 1:
        assert not out.is_contiguous()
    assert out.untyped_storage().data_ptr() != W.untyped_storage().data_ptr()
    # the input is left alone
    assert torch.equal(W, V)


# ------------------------------------------------------------------------------------------------
# operators
def _mlp():
    return make_case("mlp_ce", "mean")


def _kfac(c):
    return KFACLinearOperator(*c.tensors(), fisher_type="type-2")


def _damped_ggn(c):
    G = GGNLinearOperator(*c.tensors())
    return G + 0.5 * IdentityLinearOperator([p.shape for p in c.params], G.device, DT)


OPERATORS = {
    "hessian": lambda c: HessianLinearOperator(*c.tensors()),
    "hessian_blocks": lambda c: HessianLinearOperator(*c.tensors(), block_sizes=[2, 2]),
    "ggn": lambda c: GGNLinearOperator(*c.tensors()),
    "ggn_cached": lambda c: GGNLinearOperator(*c.tensors()).cache(),
    "ef": lambda c: EFLinearOperator(*c.tensors()),
    "mc_fisher": lambda c: FisherMCLinearOperator(*c.tensors(), mc_samples=2),
    "jacobian": lambda c: JacobianLinearOperator(c.model, c.params, c.data),
    "jacobian_t": lambda c: TransposedJacobianLinearOperator(c.model, c.params, c.data),
    "kfac": _kfac,
    "ekfac": lambda c: EKFACLinearOperator(*c.tensors(), fisher_type="type-2"),
    "kfac_inverse": lambda c: KFACInverseLinearOperator(_kfac(c), damping=1e-2),
    "cg_inverse": lambda c: CGInverseLinearOperator(_damped_ggn(c), max_iter=200, tolerance=1e-9),
    "sum": lambda c: GGNLinearOperator(*c.tensors()) + HessianLinearOperator(*c.tensors()),
    "difference_scaled": lambda c: (
        2.0 * GGNLinearOperator(*c.tensors()) - HessianLinearOperator(*c.tensors())
    ),
    "product": lambda c: GGNLinearOperator(*c.tensors()) @ HessianLinearOperator(*c.tensors()),
    "identity": lambda c: IdentityLinearOperator([p.shape for p in c.params], "cpu", DT),
    "submatrix": lambda c: SubmatrixLinearOperator(
        GGNLinearOperator(*c.tensors()), [0, 3, 7, 20], [1, 2, 5, 11, 30]
    ),
}


@pytest.mark.parametrize("num_columns", [1, 5])
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_transposed_input_same_numbers_and_layout(name, num_columns):
    """Every operator family: ``A @ W.T`` equals ``A @ V`` and is laid out like its input."""
    A = OPERATORS[name](_mlp())
    check_layouts(A, num_columns)


@pytest.mark.parametrize("name", ["hessian", "ggn", "ef", "mc_fisher", "jacobian", "jacobian_t"])
def test_chunked_columns(name):
    """Fewer columns per chunk than ``K``: same numbers as unchunked, layout kept."""
    c = _mlp()
    A = OPERATORS[name](c)
    V = torch.randn(A.shape[1], 7, dtype=DT, generator=torch.Generator().manual_seed(3))
    expected = A @ V
    A.MAX_COLUMNS_PER_CHUNK = 3
    for W, columns_major in ((V, False), (columns_contiguous(V), True)):
        out = A @ W
        assert_same(out, expected)
        assert_layout(out, columns_major)


@pytest.mark.parametrize("route", ["forward", "auto"])
def test_forward_mode_route_takes_transposed_columns(route):
    """``J V`` by forward mode (``vmap`` over ``jvp``) on columns laid out as ``W.T``."""
    for cls in (GGNLinearOperator, EFLinearOperator):
        A = cls(*_mlp().tensors())
        A.JVP_ROUTE = route
        check_layouts(A, 4)


def test_conv_and_transformer_models():
    """Parameters of several shapes (conv kernels, attention, LayerNorm), several batches."""
    for case in ("cnn_mse", "transformer_ce"):
        c = make_case(case, "sum")
        for A in (HessianLinearOperator(*c.tensors()), GGNLinearOperator(*c.tensors())):
            check_layouts(A, 4)


def test_single_column_transposed_edge_case():
    """``W`` ``[1, D]``: ``W.T`` is contiguous as well, so the result is too."""
    A = GGNLinearOperator(*_mlp().tensors())
    W = torch.randn(1, A.shape[1], dtype=DT)
    out = A @ W.T
    assert out.shape == (A.shape[0], 1)
    assert out.is_contiguous() and out.T.is_contiguous()
    assert_same(out, A @ W.T.contiguous())
    assert_same(out[:, 0], A @ W[0])


def test_vectors_and_lists_keep_their_layout():
    """Vectors give vectors; a list of contiguous entries gives contiguous entries."""
    c = _mlp()
    A = GGNLinearOperator(*c.tensors())
    v = torch.randn(A.shape[1], dtype=DT)
    out = A @ v
    assert out.shape == (A.shape[0],) and out.is_contiguous()
    K = 4
    V = torch.randn(A.shape[1], K, dtype=DT)
    expected = A @ V
    blocks = [b.reshape(*p.shape, K).clone() for b, p in zip(V.split(A._in_shape_flat), c.params)]
    result = A @ blocks
    assert isinstance(result, list)
    for r, e, p in zip(result, expected.split(A._out_shape_flat), c.params):
        assert r.is_contiguous()
        assert_same(r, e.reshape(*p.shape, K))
    # consecutive row blocks of one W.T: entries laid out alike
    W = columns_contiguous(V)
    views = [b.view(*p.shape, K) for b, p in zip(W.split(A._in_shape_flat), c.params)]
    for r, e in zip(A @ views, A @ blocks):
        assert_same(r, e)
        assert r.stride(-1) == A.shape[0]


def test_other_strides_give_contiguous_results():
    """Inputs that are neither layout (sliced columns) are multiplied as before."""
    A = GGNLinearOperator(*_mlp().tensors())
    big = torch.randn(A.shape[1], 10, dtype=DT)
    V = big[:, ::2]
    out = A @ V
    assert out.is_contiguous()
    assert_same(out, A @ V.contiguous())
    W = torch.randn(6, A.shape[1] + 3, dtype=DT)[:, : A.shape[1]].T  # padded rows
    out = A @ W
    assert out.is_contiguous()
    assert_same(out, A @ W.contiguous())


def test_result_never_aliases_the_input():
    """An operator that returns its input (the identity) still gives a new tensor."""
    c = _mlp()
    identity = IdentityLinearOperator([p.shape for p in c.params], "cpu", DT)
    W = torch.randn(3, identity.shape[1], dtype=DT)
    out = identity @ W.T
    assert torch.equal(out, W.T)
    assert out.untyped_storage().data_ptr() != W.untyped_storage().data_ptr()
    assert out.T.is_contiguous()
    out.zero_()
    assert W.abs().sum() > 0


@pytest.mark.parametrize("chunk", [16, 2])
@pytest.mark.parametrize("cls", [GGNLinearOperator, HessianLinearOperator, EFLinearOperator])
def test_no_copy_of_the_input(cls, chunk, monkeypatch):
    """The column blocks handed to the batch product and to autodiff are views of ``W``.

    Before, the columns were gathered into new contiguous tensors (``columns_first``), and
    the result was transposed into a contiguous ``[M, K]`` output.
    """
    c = _mlp()
    A = cls(*c.tensors())
    A.MAX_COLUMNS_PER_CHUNK = chunk
    W = torch.randn(5, A.shape[1], dtype=DT)
    storage = W.untyped_storage().data_ptr()
    handed, differentiated = [], []

    prepare = A._prepare_batch

    def recording_prepare(X, y, *rest):
        multiply = prepare(X, y, *rest)

        def recording_multiply(M):
            handed.extend(M)
            return multiply(M)

        return recording_multiply

    A._prepare_batch = recording_prepare
    module = hessian_module if cls is HessianLinearOperator else ggn_module
    original = module.columns_first

    def recording_columns_first(M):
        result = original(M)
        differentiated.extend(result[0])
        return result

    monkeypatch.setattr(module, "columns_first", recording_columns_first)
    out = A @ W.T
    assert len(handed) == len(differentiated) == len(c.data) * len(c.params) * -(-5 // chunk)
    for t in handed + differentiated:
        assert t.untyped_storage().data_ptr() == storage
    assert out.T.is_contiguous()
    A._prepare_batch = prepare
    assert_same(out, A @ W.T.contiguous())


def test_to_scipy_fortran_blocks():
    """SciPy export: Fortran-ordered blocks (the transposed layout) give the same numbers."""
    A = GGNLinearOperator(*_mlp().tensors())
    S = A.to_scipy()
    X = np.random.default_rng(0).standard_normal((A.shape[1], 4))
    expected = S.matmat(np.ascontiguousarray(X))
    result = S.matmat(np.asfortranarray(X))
    assert result.flags.f_contiguous
    np.testing.assert_allclose(result, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.rmatmat(np.asfortranarray(X)), expected, rtol=1e-10, atol=1e-12)


def test_compiled_batch_product_with_transposed_input():
    """The traced batch product takes columns in either layout."""
    c = _mlp()
    A = GGNLinearOperator(*c.tensors()).compile(backend="eager")
    check_layouts(A, 3)


# ------------------------------------------------------------------------------------------------
# our own callers
class _Recording(TensorLinearOperator):
    """A dense matrix that records whether each multi-column input was ``W.T``."""

    def __init__(self, matrix: Tensor):
        super().__init__(matrix)
        self.layouts: List[bool] = []

    def _matmat(self, X: List[Tensor]) -> List[Tensor]:
        if X[0].shape[-1] > 1:
            self.layouts.append(X[0].T.is_contiguous())
        return super()._matmat(X)


def _symmetric(dim=40, seed=0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(dim, dim, dtype=DT, generator=gen)
    return B @ B.T / dim + torch.diag(torch.linspace(0.1, 3.0, dim, dtype=DT))


ESTIMATORS = {
    "hutchinson_trace_normal": lambda A: hutchinson_trace(A, 6, distribution="normal"),
    "hutchinson_trace": lambda A: hutchinson_trace(A, 6),
    "hutchpp_trace": lambda A: hutchpp_trace(A, 9, distribution="normal"),
    "xtrace": lambda A: xtrace(A, 8, distribution="normal"),
    "hutchinson_diag": lambda A: hutchinson_diag(A, 6, distribution="normal"),
    "xdiag": lambda A: xdiag(A, 8),
    "squared_fro": lambda A: hutchinson_squared_fro(A, 6, distribution="normal"),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimators_multiply_transposed_blocks_with_unchanged_results(name):
    """Every multi-column product of an estimator gets ``W.T``; same numbers as a tensor."""
    matrix = _symmetric()
    A = _Recording(matrix)
    torch.manual_seed(5)
    estimate = ESTIMATORS[name](A)
    assert A.layouts and all(A.layouts)
    torch.manual_seed(5)
    reference = ESTIMATORS[name](matrix)  # a plain tensor, multiplied by torch
    assert_same(estimate, reference)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_draws_keep_their_values(distribution):
    """The drawn columns are those of one ``random_vector`` call per column, in order."""
    A = TensorLinearOperator(torch.zeros(11, 11, dtype=DT))
    torch.manual_seed(2)
    drawn = draw(A, 11, 4, distribution, None)
    torch.manual_seed(2)
    expected = torch.stack([random_vector(11, distribution, "cpu", DT) for _ in range(4)], 1)
    assert torch.equal(drawn, expected)
    assert drawn.T.is_contiguous()
    gen = torch.Generator().manual_seed(3)
    again = draw(A, 11, 4, distribution, gen)
    gen = torch.Generator().manual_seed(3)
    expected = torch.stack(
        [random_vector(11, distribution, "cpu", DT, generator=gen) for _ in range(4)], 1
    )
    assert torch.equal(again, expected)


def test_eigsh_block_lanczos_multiplies_transposed_blocks():
    """Block Lanczos hands ``W.T`` blocks to the operator; eigenpairs as for a tensor."""
    matrix = _symmetric(50)
    A = _Recording(matrix)
    evals, evecs = eigsh(A, k=4, block_size=3, generator=torch.Generator().manual_seed(0))
    assert A.layouts and all(A.layouts)
    expected = torch.linalg.eigvalsh(matrix)[-4:]
    assert_same(evals, expected)
    residual = matrix @ evecs - evecs * evals
    assert residual.abs().max() < 1e-5 * expected.abs().max()
    again, _ = eigsh(matrix, k=4, block_size=3, generator=torch.Generator().manual_seed(0))
    assert_same(evals, again)


def test_eigsh_on_curvature_operator_same_as_contiguous_products():
    """``eigsh`` on the GGN: its transposed blocks give the eigenvalues of the dense GGN."""
    c = _mlp()
    G = GGNLinearOperator(*c.tensors())
    dense = G @ torch.eye(G.shape[1], dtype=DT)
    evals = eigsh(G, k=3, block_size=2, generator=torch.Generator().manual_seed(1))[0]
    assert_same(evals, torch.linalg.eigvalsh(dense)[-3:])


def test_report_products_in_transposed_layout():
    """The report's Hutchinson block is ``W.T``; its product comes back in that layout."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(5, 3, dtype=DT, generator=gen), torch.randint(0, 2, (5,), generator=gen))]
    A = GGNLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    terms = report._hutchinson_terms(A, A.shape[1], 6, torch.Generator().manual_seed(0))
    assert terms.T.is_contiguous()
    V = rademacher_columns(A.shape[1], 6, "cpu", DT, generator=torch.Generator().manual_seed(0))
    assert V.T.is_contiguous()
    assert_same(terms, V * (A @ V.contiguous()))


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_cg_iterates_on_transposed_blocks(transposed):
    """CG stacks its right-hand sides as ``W.T`` once, so every product in its loop gets
    that layout (no transposing copies per iteration), whatever the input's layout."""
    matrix = _symmetric(30)
    matrix = matrix @ matrix.T + 30 * torch.eye(30, dtype=matrix.dtype)
    A = _Recording(matrix)
    rhs = torch.randn(4, 30, dtype=matrix.dtype)
    B = rhs.T if transposed else rhs.T.contiguous()
    X = CGInverseLinearOperator(A, tolerance=1e-10, max_iter=500) @ B
    assert A.layouts and all(A.layouts)
    assert X.T.is_contiguous() == transposed and X.is_contiguous() != transposed
    torch.testing.assert_close(matrix @ X, B, rtol=1e-8, atol=1e-8)
