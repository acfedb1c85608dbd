"""Tests for ``curvlinops.inverse.KFACInverseLinearOperator``.

The references are dense matrices assembled in this file from the operator's factors (or
EKFAC's eigenvectors and corrected eigenvalues) with ``torch.kron`` and inverted with
``torch.linalg.inv``, independently of the block products of KFAC and of the inverse.
"""

import itertools
import math

import pytest
import torch
from kfac_cases import DT, regression_data, relu_mlp
from reference import assert_close, densify
from torch import nn

import curvlinops
import curvlinops._blocks as _blocks
import curvlinops.kfac_inverse as kfac_inverse
from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator
from curvlinops.examples import TensorLinearOperator


# ----------------------------------------------------------------------------- set-up
def conv_model():
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2), nn.Sigmoid(), nn.Linear(2, 3)
    ).to(DT)


def conv_data():
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(n, 2, 3, 3, dtype=DT, generator=gen),
            torch.randn(n, 3, dtype=DT, generator=gen),
        )
        for n in (3, 4)
    ]


def make_kfac(cls=KFACLinearOperator, model="mlp", separate=True, subset=False, **kwargs):
    """A small KFAC/EKFAC operator (type-2 by default, factors computed lazily)."""
    if model == "mlp":
        net, data = relu_mlp(), regression_data(d_out=3)
    else:
        net, data = conv_model(), conv_data()
    params = list(net.parameters())
    if subset:  # a weight without its bias, a bias without its weight, shuffled
        params = [params[-1], params[0]]
    kwargs.setdefault("fisher_type", "type-2")
    kwargs.setdefault("check_deterministic", False)
    return cls(net, nn.MSELoss(), params, data, separate_weight_and_bias=separate, **kwargs)


VARIANTS = [
    dict(model="mlp", separate=True),
    dict(model="mlp", separate=False),
    dict(model="conv", separate=True),
    dict(model="conv", separate=False),
    dict(model="mlp", separate=False, subset=True),
]
IDS = ["mlp", "mlp-joint", "conv", "conv-joint", "subset"]


def blocks(K):
    """``(name, kind, flat indices in block layout)`` per diagonal block of a KFAC operator.

    The block layout of a weight is its row-major ``[d_out, n]`` flattening (convolution
    weights flattened over their last three axes); a joint block appends the bias as column
    ``n``, so its indices interleave weight rows and bias entries.
    """
    offsets = [0, *itertools.accumulate(p.numel() for p in K._params)]
    result = []
    for name, entry in K._mapping.items():
        ranges = {kind: torch.arange(offsets[pos], offsets[pos + 1]) for kind, pos in entry.items()}
        if len(entry) == 2 and not K._separate_weight_and_bias:
            d_out = ranges["bias"].numel()
            weight = ranges["weight"].view(d_out, -1)
            result.append(
                (name, "joint", torch.cat([weight, ranges["bias"][:, None]], 1).flatten())
            )
        else:
            result.extend((name, kind, idx) for kind, idx in ranges.items())
    return result


def assemble(K, block_matrix):
    """Dense block-diagonal matrix with ``block_matrix(name, kind)`` on the blocks."""
    dense = torch.zeros(K.shape, dtype=DT)
    for name, kind, idx in blocks(K):
        dense[idx[:, None], idx[None, :]] = block_matrix(name, kind)
    return dense


def dense_kfac(K, delta_A=0.0, delta_G=0.0, invert=False):
    """KFAC from its factors (optionally damped and inverted factor-wise) per block."""

    def transform(M, delta):
        M = M + delta * torch.eye(M.shape[0], dtype=DT)
        return torch.linalg.inv(M) if invert else M

    def block(name, kind):
        dA = delta_A[name] if isinstance(delta_A, dict) else delta_A
        dG = delta_G[name] if isinstance(delta_G, dict) else delta_G
        G = transform(K._gradient_covariances[name], dG)
        return G if kind == "bias" else torch.kron(G, transform(K._input_covariances[name], dA))

    return assemble(K, block)


def dense_ekfac(E):
    """EKFAC from its eigenvectors and corrected eigenvalues per block."""

    def block(name, kind):
        Q = E._gradient_covariances_eigenvectors[name]
        stored = E._corrected_eigenvalues[name]
        if kind != "bias":
            Q = torch.kron(Q, E._input_covariances_eigenvectors[name])
        if kind == "joint":
            values = stored
        else:
            values = stored[E._mapping[name][kind]]
        return Q @ torch.diag(values.flatten()) @ Q.T

    return assemble(E, block)


def eye(n, dtype=DT):
    return torch.eye(n, dtype=dtype)


# ----------------------------------------------------------------------------- products
def test_exports():
    assert curvlinops.KFACInverseLinearOperator is KFACInverseLinearOperator
    assert curvlinops.inverse.KFACInverseLinearOperator is KFACInverseLinearOperator
    assert KFACInverseLinearOperator.SELF_ADJOINT is True


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_exact_damping_kfac(variant):
    K = make_kfac(**variant)
    delta = 0.1
    inv = KFACInverseLinearOperator(K, damping=delta, use_exact_damping=True)
    assert not K._input_covariances and not K._gradient_covariances
    inv_dense = densify(inv)  # the first product computes the factors
    dense = dense_kfac(K)
    assert_close(densify(K), dense)  # sanity check of the block layout used here
    D = K.shape[0]
    assert_close(inv_dense @ (dense + delta * eye(D)), eye(D), atol_scale=1e-10)
    assert_close(inv_dense, torch.linalg.inv(dense + delta * eye(D)))
    assert len(inv._inverse_input_covariances) == len(inv._inverse_gradient_covariances) > 0


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("damping", [0.1, (0.05, 0.3)], ids=["float", "tuple"])
def test_factor_damping(variant, damping):
    K = make_kfac(**variant)
    inv = KFACInverseLinearOperator(K, damping=damping)
    inv_dense = densify(inv)
    delta_A, delta_G = damping if isinstance(damping, tuple) else (damping, damping)
    expected = dense_kfac(K, delta_A, delta_G, invert=True)
    assert_close(inv_dense, expected)
    # it is not the inverse of KFAC + damping * I
    D = K.shape[0]
    assert (inv_dense - torch.linalg.inv(dense_kfac(K) + delta_G * eye(D))).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=IDS[:3])
def test_heuristic_damping(variant):
    K = make_kfac(**variant, fisher_type="empirical")
    K.compute_kronecker_factors()
    delta = 0.04
    pis = {}
    for name, G in K._gradient_covariances.items():
        if name in K._input_covariances:
            A = K._input_covariances[name]
            pis[name] = math.sqrt((A.trace() / A.shape[0] / (G.trace() / G.shape[0])).item())
    # a min_damping between the smallest and the largest heuristic damping clips some of them
    candidates = sorted(
        [p * math.sqrt(delta) for p in pis.values()] + [math.sqrt(delta) / p for p in pis.values()]
    )
    min_damping = 0.5 * (candidates[0] + candidates[1])
    delta_A = {n: max(p * math.sqrt(delta), min_damping) for n, p in pis.items()}
    delta_G = {n: max(math.sqrt(delta) / p, min_damping) for n, p in pis.items()}
    for name in K._gradient_covariances:  # bias-only modules: plain damping
        delta_G.setdefault(name, delta)
    assert min_damping in list(delta_A.values()) + list(delta_G.values())
    inv = KFACInverseLinearOperator(
        K, damping=delta, use_heuristic_damping=True, min_damping=min_damping
    )
    assert_close(densify(inv), dense_kfac(K, delta_A, delta_G, invert=True))


def test_heuristic_damping_fallbacks():
    """Plain damping when pi = 0 (zero input factor) or the mean eigenvalue of G is <= 0."""
    K = make_kfac()
    K.compute_kronecker_factors()
    K._input_covariances["0"] = torch.zeros_like(K._input_covariances["0"])  # pi = 0
    K._gradient_covariances["2"] = -1e-3 * eye(3)  # mean eigenvalue < 0
    delta = 0.09
    inv = KFACInverseLinearOperator(K, damping=delta, use_heuristic_damping=True)
    A_inv, G_inv, _ = inv._compute_or_get_cached_inverse("0")
    assert_close(A_inv, eye(3) / delta)
    assert_close(G_inv, torch.linalg.inv(K._gradient_covariances["0"] + delta * eye(4)))
    A_inv, G_inv, _ = inv._compute_or_get_cached_inverse("2")
    assert_close(A_inv, torch.linalg.inv(K._input_covariances["2"] + delta * eye(4)))
    assert_close(G_inv, eye(3) / (delta - 1e-3))


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_exact_damping_ekfac(variant):
    E = make_kfac(EKFACLinearOperator, **variant)
    delta = 0.1
    inv = KFACInverseLinearOperator(E, damping=delta, use_exact_damping=True)
    inv_dense = densify(inv)
    dense = dense_ekfac(E)
    assert_close(densify(E), dense)  # sanity check of the block layout used here
    D = E.shape[0]
    assert_close(inv_dense @ (dense + delta * eye(D)), eye(D), atol_scale=1e-10)
    assert len(inv._inverse_input_covariances) == 0
    assert len(inv._inverse_gradient_covariances) == 0
    # EKFAC's eigenvalues are read live: editing them changes the next product
    for name, values in E._corrected_eigenvalues.items():
        if isinstance(values, dict):
            for pos in values:
                values[pos] = 2 * values[pos]
        else:
            E._corrected_eigenvalues[name] = 2 * values
    assert_close(densify(inv), torch.linalg.inv(2 * dense + delta * eye(D)))


def test_vectors_lists_and_batched_columns(monkeypatch):
    """All input formats agree; the number of block products does not grow with K."""
    K = make_kfac(separate=False)
    inv = KFACInverseLinearOperator(K, damping=0.1)
    inv_dense = densify(inv)
    X = torch.randn(K.shape[1], 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert_close(inv @ X, inv_dense @ X)
    assert_close(inv @ X[:, 0], inv_dense @ X[:, 0])
    shapes = [p.shape for p in K._params]
    X_list = [x.reshape(*s, 5) for x, s in zip(X.split([p.numel() for p in K._params]), shapes)]
    out = inv @ X_list
    assert_close(torch.cat([o.reshape(-1, 5) for o in out]), inv_dense @ X)
    calls = []
    block_left = _blocks.block_left
    monkeypatch.setattr(
        _blocks, "block_left", lambda L, V: calls.append(V.shape) or block_left(L, V)
    )
    inv @ X[:, :1]
    one = len(calls)
    inv @ X
    assert len(calls) == 2 * one and calls[-1][-1] == 5


# ----------------------------------------------------------------------------- cache
@pytest.mark.parametrize("exact", [False, True], ids=["factor", "exact"])
def test_cache_semantics(exact):
    K = make_kfac()
    delta = 0.1
    v = torch.linspace(-1, 1, K.shape[1], dtype=DT)
    inv = KFACInverseLinearOperator(K, damping=delta, cache=False, use_exact_damping=exact)
    before = inv @ v
    assert len(inv._inverse_input_covariances) == 0
    assert len(inv._inverse_gradient_covariances) == 0
    A_part, G_part, evals = inv._compute_or_get_cached_inverse("0")
    assert len(inv._inverse_gradient_covariances) == 0
    if exact:
        (Q_A, lam_A), (Q_G, lam_G) = A_part, G_part
        assert_close(Q_A @ torch.diag(lam_A) @ Q_A.T, K._input_covariances["0"])
        assert_close(Q_G @ torch.diag(lam_G) @ Q_G.T, K._gradient_covariances["0"])
        assert_close(evals["weight"], 1 / (torch.outer(lam_G, lam_A) + delta))
        assert_close(evals["bias"], 1 / (lam_G[:, None] + delta))
    else:
        assert evals is None
        assert_close(A_part, torch.linalg.inv(K._input_covariances["0"] + delta * eye(3)))
        assert_close(G_part, torch.linalg.inv(K._gradient_covariances["0"] + delta * eye(4)))

    cached = KFACInverseLinearOperator(K, damping=delta, use_exact_damping=exact)
    cached._compute_or_get_cached_inverse("2")  # pre-computation of one module
    assert list(cached._inverse_gradient_covariances) == ["2"]
    assert_close(cached @ v, before)
    assert sorted(cached._inverse_input_covariances) == ["0", "2"]
    assert cached._compute_or_get_cached_inverse("0")[0] is cached._inverse_input_covariances["0"]

    # factors edited later: the cache keeps the old inverse, the uncached inverse sees the edit
    K._gradient_covariances["0"] = 2 * K._gradient_covariances["0"]
    assert_close(cached @ v, before)
    assert (inv @ v - before).abs().max() > 1e-3

    with pytest.raises(ValueError, match="Unknown module name 'nope'"):
        cached._compute_or_get_cached_inverse("nope")


def test_missing_input_factor_is_none():
    K = make_kfac(subset=True)  # module "0": weight only, module "2": bias only
    inv = KFACInverseLinearOperator(K, damping=0.1)
    densify(inv)
    assert inv._inverse_input_covariances["2"] is None
    assert inv._inverse_input_covariances["0"] is not None
    inv = KFACInverseLinearOperator(K, damping=0.1, use_exact_damping=True)
    A_part, G_part, evals = inv._compute_or_get_cached_inverse("2")
    assert A_part is None and set(evals) == {"bias"}


# ----------------------------------------------------------------------------- Cholesky
def float32_kfac():
    model = relu_mlp().float()
    data = [(x.float(), y.float()) for x, y in regression_data(d_out=3)]
    return KFACLinearOperator(
        model, nn.MSELoss(), list(model.parameters()), data, check_deterministic=False
    )


def test_cholesky_retry_in_float64(monkeypatch):
    K = float32_kfac()
    v = torch.linspace(-1, 1, K.shape[1])
    expected = KFACInverseLinearOperator(K, damping=0.1) @ v
    real = torch.linalg.cholesky
    dtypes = []

    def fail_in_float32(M):
        dtypes.append(M.dtype)
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("not positive-definite")
        return real(M)

    monkeypatch.setattr(torch.linalg, "cholesky", fail_in_float32)
    inv = KFACInverseLinearOperator(K, damping=0.1)
    with pytest.warns(UserWarning, match=r"failed in torch.float32.*retrying in float64"):
        result = inv @ v
    assert result.dtype == torch.float32
    assert dtypes == [torch.float32, torch.float64] * 4  # 2 modules x 2 factors
    assert all(M.dtype == torch.float32 for M in inv._inverse_gradient_covariances.values())
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)

    inv = KFACInverseLinearOperator(K, damping=0.1, retry_double_precision=False)
    with pytest.raises(RuntimeError, match="pass retry_double_precision=True"):
        inv @ v

    monkeypatch.setattr(
        torch.linalg, "cholesky", lambda M: (_ for _ in ()).throw(torch.linalg.LinAlgError("no"))
    )
    inv = KFACInverseLinearOperator(K, damping=0.1)
    with (
        pytest.warns(UserWarning, match="retrying"),
        pytest.raises(torch.linalg.LinAlgError, match="failed in torch.float32 and in float64"),
    ):
        inv @ v


def test_cholesky_failure_float64():
    """A singular factor without damping: a real Cholesky failure with a clear message."""
    K = make_kfac()
    K.compute_kronecker_factors()
    K._input_covariances["0"] = torch.zeros_like(K._input_covariances["0"])
    inv = KFACInverseLinearOperator(K, damping=0.0)
    with pytest.raises(
        RuntimeError, match=r"damped input factor of module '0'.*Increase the damping"
    ):
        inv @ torch.ones(K.shape[1], dtype=DT)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (KFACLinearOperator, dict(damping=(0.1, 0.2))),
        (KFACLinearOperator, dict(damping=0.1, use_heuristic_damping=True, min_damping=1e-3)),
        (KFACLinearOperator, dict(damping=0.1, use_exact_damping=True, cache=False)),
        (EKFACLinearOperator, dict(damping=0.1, use_exact_damping=True)),
    ],
    ids=["tuple", "heuristic", "exact-nocache", "ekfac"],
)
def test_checkpoint_round_trip(cls, kwargs, tmp_path):
    K = make_kfac(cls, separate=False)
    inv = KFACInverseLinearOperator(K, **kwargs)
    expected = densify(inv)
    torch.save(inv.state_dict(), tmp_path / "inv.pt")
    state = torch.load(tmp_path / "inv.pt", weights_only=False)
    assert set(state) == set(kfac_inverse._STATE_KEYS)

    # a different model (other parameters and data): everything comes from the checkpoint
    model = relu_mlp(seed=5)
    K2 = cls(
        model,
        nn.MSELoss(),
        list(model.parameters()),
        regression_data(d_out=3, seed=7),
        fisher_type="type-2",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    with pytest.warns(UserWarning, match="will overwrite"):
        inv2 = KFACInverseLinearOperator.from_state_dict(state, K2)
    for key, value in kwargs.items():
        assert getattr(inv2, f"_{key}") == value
    assert sorted(inv2._inverse_input_covariances) == sorted(inv._inverse_input_covariances)
    if cls is KFACLinearOperator and kwargs.get("cache", True):
        # the restored cache is used: factors changed after loading do not matter
        for name in K2._gradient_covariances:
            K2._gradient_covariances[name] = 3 * K2._gradient_covariances[name]
    assert_close(densify(inv2), expected)

    # load_state_dict into an existing inverse
    inv3 = KFACInverseLinearOperator(
        make_kfac(cls, separate=False),
        damping=0.5,
        **({"use_exact_damping": True} if cls is EKFACLinearOperator else {}),
    )
    with pytest.warns(UserWarning, match="will overwrite"):
        inv3.load_state_dict(state)
    assert_close(densify(inv3), expected)


def test_checkpoint_errors():
    K = make_kfac()
    inv = KFACInverseLinearOperator(K, damping=0.1)
    densify(inv)
    state = inv.state_dict()
    incomplete = {k: v for k, v in state.items() if k != "min_damping"}
    with pytest.raises(ValueError, match=r"missing keys \['min_damping'\]"):
        inv.load_state_dict(incomplete)
    with pytest.raises(ValueError, match=r"missing keys \['min_damping'\]"):
        KFACInverseLinearOperator.from_state_dict(incomplete, K)
    bad_cache = dict(state, inverse_gradient_covariances={"9": eye(2)})
    with (
        pytest.warns(UserWarning, match="will overwrite"),
        pytest.raises(ValueError, match=r"inverse_gradient_covariances has modules \['9'\]"),
    ):
        inv.load_state_dict(bad_cache)
    bad_damping = dict(state, damping=-1.0)
    with (
        pytest.warns(UserWarning, match="will overwrite"),
        pytest.raises(ValueError, match="damping must be a non-negative"),
    ):
        inv.load_state_dict(bad_damping)
    E = make_kfac(EKFACLinearOperator)
    with pytest.raises(ValueError, match="pass use_exact_damping=True"):
        KFACInverseLinearOperator.from_state_dict(state, E)


# ----------------------------------------------------------------------------- errors
def test_constructor_errors():
    K = make_kfac()
    with pytest.raises(ValueError, match="needs a KFACLinearOperator"):
        KFACInverseLinearOperator(TensorLinearOperator(torch.zeros(2, 3, dtype=DT)))
    with pytest.raises(ValueError, match="needs a KFACLinearOperator"):
        KFACInverseLinearOperator(torch.eye(3))
    non_square = make_kfac()
    non_square._out_shape = non_square._out_shape[:1]
    with pytest.raises(ValueError, match="identical input and output spaces"):
        KFACInverseLinearOperator(non_square, use_heuristic_damping=True, use_exact_damping=True)
    # order: both flags before the tuple check before the EKFAC check
    with pytest.raises(ValueError, match="Either use heuristic damping or exact damping"):
        KFACInverseLinearOperator(
            K, damping=(0.1, 0.1), use_heuristic_damping=True, use_exact_damping=True
        )
    for flag in ("use_heuristic_damping", "use_exact_damping"):
        with pytest.raises(
            ValueError, match="Heuristic and exact damping require a single damping value."
        ):
            KFACInverseLinearOperator(K, damping=(0.1, 0.1), **{flag: True})
    E = make_kfac(EKFACLinearOperator)
    with pytest.raises(ValueError, match="Either use heuristic damping or exact damping"):
        KFACInverseLinearOperator(E, use_heuristic_damping=True, use_exact_damping=True)
    with pytest.raises(
        ValueError, match="Heuristic and exact damping require a single damping value."
    ):
        KFACInverseLinearOperator(E, damping=(0.1, 0.1), use_heuristic_damping=True)
    with pytest.raises(ValueError, match="pass use_exact_damping=True"):
        KFACInverseLinearOperator(E, damping=-1.0)
    for bad in (
        -0.1,
        (0.1, -1.0),
        (-1.0, 0.1),
        (0.1, 0.2, 0.3),
        (0.1,),
        "0.1",
        [0.1, 0.2],
        float("nan"),
        float("inf"),
        True,
        None,
        torch.tensor(0.1),
    ):
        with pytest.raises(ValueError, match="damping must be a non-negative finite float"):
            KFACInverseLinearOperator(K, damping=bad)
    for bad in (-1e-8, float("nan"), None):
        with pytest.raises(ValueError, match="min_damping must be a non-negative finite float"):
            KFACInverseLinearOperator(K, damping=0.1, min_damping=bad)
    # valid corner cases
    KFACInverseLinearOperator(K, damping=0)
    KFACInverseLinearOperator(K, damping=(0, 1))
    KFACInverseLinearOperator(K, damping=0.0, use_heuristic_damping=True, min_damping=0)
    KFACInverseLinearOperator(E, damping=0.1, use_exact_damping=True)


@pytest.mark.parametrize("cache", [True, False])
def test_compiled_exact_damping(cache):
    """Compiled exact-damping inverses (fullgraph) equal eager ones; the singularity check
    runs eagerly when compiling with a cache."""
    for cls in (KFACLinearOperator, EKFACLinearOperator):
        eager = KFACInverseLinearOperator(make_kfac(cls), damping=1e-2, use_exact_damping=True)
        compiled = KFACInverseLinearOperator(
            make_kfac(cls), damping=1e-2, use_exact_damping=True, cache=cache
        )
        compiled.compile(backend="eager", fullgraph=True)
        assert_close(densify(compiled), densify(eager), rtol=1e-8)
    model = relu_mlp()
    K = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        [(torch.randn(1, 3, dtype=DT), torch.tensor([1]))],
    )
    singular = KFACInverseLinearOperator(K, damping=0.0, use_exact_damping=True)
    with pytest.raises(RuntimeError, match="damping"):
        singular.compile(backend="eager", fullgraph=True)
