"""Products under ``torch.compile``: one operator of each family, against dense references.

``compile(fullgraph=True)`` makes any graph break an error, so a passing test shows that the
whole mini-batch product (or, for KFAC and its relatives, the whole product) was captured by
dynamo. A counting backend keeps the tests fast (it runs the captured graph as it is); one test
goes through AOT autograd as the default backend does.
"""

import pytest
import torch
from cases import make_case
from reference import assert_close, block_diagonal, cached_reference, densify

from curvlinops import (
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    TransposedJacobianLinearOperator,
)


class CountingBackend:
    """A ``torch.compile`` backend that records every captured graph and runs it unchanged."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def columns(op, K: int = 3) -> torch.Tensor:
    return torch.randn(op.shape[1], K, dtype=op.dtype, generator=torch.Generator().manual_seed(0))


def compile_counting(op):
    backend = CountingBackend()
    assert op.compile(backend=backend, fullgraph=True) is op
    return backend


@pytest.mark.parametrize(
    "operator, kind, name",
    [
        (HessianLinearOperator, "hessian", "transformer_ce"),
        (HessianLinearOperator, "hessian", "dict_ce"),
        (GGNLinearOperator, "ggn", "cnn_mse"),
        (GGNLinearOperator, "ggn", "transformer_ce"),
        (EFLinearOperator, "ef", "seq_bce"),
        (EFLinearOperator, "ef", "mlp_ce"),
    ],
)
def test_compiled_products_match_reference(operator, kind, name):
    c = make_case(name, "mean")
    A = operator(*c.tensors(), **c.kwargs())
    M = columns(A)
    backend = compile_counting(A)
    assert_close(A @ M, cached_reference(kind, name, "mean") @ M)
    assert backend.graphs >= 1


def test_compiled_hessian_blocks():
    c = make_case("mlp_ce", "sum")
    H = HessianLinearOperator(*c.tensors(), block_sizes=[2, 2])
    compile_counting(H)
    expected = block_diagonal(cached_reference("hessian", "mlp_ce", "sum"), c.params, [2, 2])
    M = columns(H)
    assert_close(H @ M, expected @ M)


@pytest.mark.parametrize("name", ["seq_mse", "mlp_ce"])
def test_compiled_mc_fisher_draws_the_eager_samples(name):
    c = make_case(name, "mean")
    eager = FisherMCLinearOperator(*c.tensors(), mc_samples=2, seed=3, **c.kwargs())
    compiled = FisherMCLinearOperator(*c.tensors(), mc_samples=2, seed=3, **c.kwargs())
    M = columns(eager)
    backend = compile_counting(compiled)
    assert_close(compiled @ M, eager @ M)
    assert backend.graphs >= 1


def test_compiled_jacobians():
    c = make_case("cnn_mse", "mean")
    J = JacobianLinearOperator(c.model, c.params, c.data)
    JT = TransposedJacobianLinearOperator(c.model, c.params, c.data)
    compile_counting(J)
    compile_counting(JT)
    expected = cached_reference("jacobian", "cnn_mse", "mean")
    M, V = columns(J), columns(JT)
    assert_close(J @ M, expected @ M)
    assert_close(JT @ V, expected.T @ V)


def test_compiled_kfac_family():
    c = make_case("mlp_ce", "mean")
    for make in (
        lambda: KFACLinearOperator(*c.tensors()),
        lambda: EKFACLinearOperator(*c.tensors()),
        lambda: KFACInverseLinearOperator(KFACLinearOperator(*c.tensors()), damping=1e-2),
    ):
        eager, compiled = make(), make()
        backend = compile_counting(compiled)
        assert_close(densify(compiled), densify(eager))
        assert backend.graphs >= 1


def test_compiled_through_aot_autograd():
    """The default backend's front end (AOT autograd) handles the double differentiation."""
    c = make_case("mlp_ce", "mean")
    G = GGNLinearOperator(*c.tensors()).compile(backend="aot_eager", fullgraph=True)
    H = HessianLinearOperator(*c.tensors()).compile(backend="aot_eager", fullgraph=True)
    M = columns(G, K=1)
    assert_close(G @ M, cached_reference("ggn", "mlp_ce", "mean") @ M)
    assert_close(H @ M, cached_reference("hessian", "mlp_ce", "mean") @ M)


def test_compiling_composites_inverses_and_submatrices_compiles_their_operands():
    from curvlinops import CGInverseLinearOperator, SubmatrixLinearOperator
    from curvlinops.examples import IdentityLinearOperator

    c = make_case("mlp_ce", "mean")
    G = GGNLinearOperator(*c.tensors())
    identity = IdentityLinearOperator([p.shape for p in c.params], G.device, G.dtype)
    expected = cached_reference("ggn", "mlp_ce", "mean")
    damped_dense = expected + 0.5 * torch.eye(G.shape[0], dtype=G.dtype)
    M = columns(G)

    backend = CountingBackend()
    damped = (G + 0.5 * identity).compile(backend=backend, fullgraph=True)
    assert_close(damped @ M, damped_dense @ M)
    assert G._compiled_batch_product is not None and backend.graphs >= 1

    torch._dynamo.reset()  # each operator compiles its own graphs; stay below the recompile limit
    inverse = CGInverseLinearOperator(GGNLinearOperator(*c.tensors()) + 0.5 * identity)
    inverse.compile(backend=CountingBackend(), fullgraph=True)
    inverse._hp.update(tolerance=1e-10, max_iter=200)
    assert_close(inverse @ M, torch.linalg.solve(damped_dense, M), rtol=1e-8, atol_scale=1e-10)

    torch._dynamo.reset()
    rows, cols = [0, 3, 5], [1, 2, 7, 9]
    S = SubmatrixLinearOperator(GGNLinearOperator(*c.tensors()), rows, cols)
    S.compile(backend=CountingBackend(), fullgraph=True)
    V = torch.randn(len(cols), 2, dtype=torch.float64)
    assert_close(S @ V, expected[rows][:, cols] @ V)


@pytest.mark.parametrize(
    "operator", [HessianLinearOperator, GGNLinearOperator, EFLinearOperator, FisherMCLinearOperator]
)
def test_compiling_before_any_eager_product_traces_one_graph(operator):
    """Without the determinism check, nothing was computed eagerly before compiling: what
    the products build lazily (e.g. the EF's sum-reduced loss, a cached property whose lock
    ``torch.compile`` cannot trace) must be built by ``compile``, not inside the traced code
    (a graph break there made inductor fail on functorch-wrapped graph outputs)."""
    c = make_case("mlp_ce", "mean")
    A = operator(*c.tensors(), check_deterministic=False, **c.kwargs())
    M = columns(A)
    reference = operator(*c.tensors(), check_deterministic=False, **c.kwargs()) @ M
    compile_counting(A)  # fullgraph=True: a graph break raises
    assert_close(A @ M, reference)
