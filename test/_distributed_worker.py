"""One rank of the data-parallel tests (started by test_distributed.py, gloo on CPU).

Usage: ``python test/_distributed_worker.py SCENARIO RANK WORLD_SIZE PORT``. Every rank builds
the operators with ``process_group`` on its shard of a test problem's batches and compares them
with the single-process operators on all batches (1e-10 relative). Exits with status 1 and
prints the failed checks if any comparison fails.
"""

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cases import make_case  # noqa: E402

import curvlinops as cl  # noqa: E402
from curvlinops.diagonal.exact import (  # noqa: E402
    EFDiagonalLinearOperator,
    GGNDiagonalLinearOperator,
    ef_diagonal,
    ggn_diagonal,
)

FAILURES = []
RTOL = 1e-10


def check(what: str, actual, expected, rtol: float = RTOL):
    """Record a failure unless ``actual`` equals ``expected`` to ``rtol`` (relative norm)."""
    if isinstance(actual, (list, tuple)):
        actual = torch.cat([t.reshape(-1) for t in actual])
        expected = torch.cat([t.reshape(-1) for t in expected])
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    err = (actual - expected).norm() / max(expected.norm(), 1e-300)
    if actual.shape != expected.shape or not err <= rtol:
        FAILURES.append(f"{what}: relative error {float(err):.3e}")


def same_on_all_ranks(what: str, t):
    """Record a failure unless ``t`` is bit-identical on every rank."""
    if isinstance(t, (list, tuple)):
        t = torch.cat([x.reshape(-1) for x in t])
    t = torch.as_tensor(t).reshape(-1).double()
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    if not all(torch.equal(g, t) for g in gathered):
        FAILURES.append(f"{what}: differs between ranks")


def shard(data, rank: int, world: int):
    """Unequal shards: 2 ranks get batches (0, 2) and (1,), 3 ranks one batch each."""
    if world == 2:
        return [data[i] for i in ((0, 2), (1,))[rank]]
    return [data[rank]]


def products(name: str, A, B):
    """Vector, matrix and list products of ``A`` (distributed) and ``B`` (reference)."""
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(A.shape[1], generator=gen, dtype=torch.float64)
    M = torch.randn(A.shape[1], 3, generator=gen, dtype=torch.float64)
    check(f"{name} vector", A @ v, B @ v)
    check(f"{name} matrix", A @ M, B @ M)
    Ml = [m.reshape(*s, 3) for m, s in zip(M.split(A._in_shape_flat), A._in_shape)]
    check(f"{name} list", A @ Ml, B @ Ml)
    same_on_all_ranks(f"{name} matrix", A @ M)


def exact_operators(rank: int, world: int):
    """Every exact operator, gradient_and_loss, diagonals, KFAC family, solvers, estimators."""
    group = dist.group.WORLD
    for case_name, reduction in [("mlp_ce", "mean"), ("cnn_mse", "sum"), ("mlp_bce", "mean")]:
        c = make_case(case_name, reduction)
        mine = shard(c.data, rank, world)
        args = (c.model, c.loss_func, c.params)
        tag = f"{case_name}/{reduction}"
        for cls in (cl.HessianLinearOperator, cl.GGNLinearOperator, cl.EFLinearOperator):
            A = cls(*args, mine, process_group=group, **c.kwargs())
            B = cls(*args, c.data, **c.kwargs())
            products(f"{tag} {cls.__name__}", A, B)
            if cls is cl.GGNLinearOperator:
                gA, lA = A.gradient_and_loss()
                gB, lB = B.gradient_and_loss()
                check(f"{tag} gradient", gA, gB)
                check(f"{tag} loss", lA, lB)
                check(f"{tag} num_data", A._N_data, B._N_data, rtol=0)
                G_dist, G_ref = A, B
        # Monte-Carlo Fisher: own draws per rank; identical operator on every rank
        F = cl.FisherMCLinearOperator(*args, mine, process_group=group, **c.kwargs())
        same_on_all_ranks(f"{tag} FisherMC", F @ torch.ones(F.shape[1], dtype=torch.float64))
        for fn, op in (
            (ggn_diagonal, GGNDiagonalLinearOperator),
            (ef_diagonal, EFDiagonalLinearOperator),
        ):
            expected = fn(*args, c.data, **c.kwargs())
            check(
                f"{tag} {fn.__name__}", fn(*args, mine, process_group=group, **c.kwargs()), expected
            )
            D = op(*args, mine, process_group=group, **c.kwargs())
            check(f"{tag} {op.__name__}", D.diagonal, expected)
        kfac_family(tag, c, mine, group)
    # solvers and estimators on top of the last GGN
    v = torch.ones(G_dist.shape[1], dtype=torch.float64)
    check(
        "hutchinson_trace",
        cl.hutchinson_trace(G_dist, 6, generator=torch.Generator().manual_seed(3)),
        cl.hutchinson_trace(G_ref, 6, generator=torch.Generator().manual_seed(3)),
    )
    eA = cl.eigsh(
        G_dist, k=2, generator=torch.Generator().manual_seed(4), return_eigenvectors=False
    )
    eB = cl.eigsh(G_ref, k=2, generator=torch.Generator().manual_seed(4), return_eigenvectors=False)
    check("eigsh top-2", eA, eB)
    same_on_all_ranks("eigsh top-2", eA)
    dA = cl.CGInverseLinearOperator(G_dist + _scaled_identity(G_dist, 0.1), max_iter=50)
    dB = cl.CGInverseLinearOperator(G_ref + _scaled_identity(G_ref, 0.1), max_iter=50)
    check("CG solve", dA @ v, dB @ v, rtol=1e-9)
    for name, wrap in (
        ("LSMR solve", lambda A: cl.LSMRInverseLinearOperator(A + _scaled_identity(A, 0.1))),
        ("Neumann", lambda A: cl.NeumannInverseLinearOperator(A, num_terms=5, scale=0.1)),
        ("sub-matrix", lambda A: cl.SubmatrixLinearOperator(A, [0, 3, 5], list(range(A.shape[1])))),
    ):
        check(name, wrap(G_dist) @ v, wrap(G_ref) @ v, rtol=1e-9)
    gA = torch.Generator().manual_seed(5)
    gB = torch.Generator().manual_seed(5)
    gridA, densA = cl.lanczos_approximate_spectrum(G_dist, ncv=5, num_points=50, generator=gA)
    gridB, densB = cl.lanczos_approximate_spectrum(G_ref, ncv=5, num_points=50, generator=gB)
    check("spectral density grid", gridA, gridB, rtol=1e-8)
    check("spectral density", densA, densB, rtol=1e-8)


def _scaled_identity(A, scale: float):
    """``scale * I`` in ``A``'s spaces (through the diagonal operator)."""
    from curvlinops.diagonal.exact import DiagonalLinearOperator

    return DiagonalLinearOperator([torch.full(s, scale, dtype=torch.float64) for s in A._in_shape])


def kfac_family(tag: str, c, mine, group):
    """KFAC factors and products (all Fisher types but MC), EKFAC, the KFAC inverse."""
    args = (c.model, c.loss_func, c.params)
    for fisher_type in ("type-2", "empirical", "forward-only"):
        for approx in ("expand", "reduce"):
            kw = dict(fisher_type=fisher_type, kfac_approx=approx, **c.kwargs())
            A = cl.KFACLinearOperator(*args, mine, process_group=group, **kw)
            B = cl.KFACLinearOperator(*args, c.data, **kw)
            name = f"{tag} KFAC {fisher_type}/{approx}"
            for k in B._input_covariances:
                check(f"{name} A[{k}]", A._input_covariances[k], B._input_covariances[k])
            for k in B._gradient_covariances:
                check(f"{name} G[{k}]", A._gradient_covariances[k], B._gradient_covariances[k])
            products(name, A, B)
            check(f"{name} trace", A.trace, B.trace)
            check(f"{name} frobenius_norm", A.frobenius_norm, B.frobenius_norm)
            if bool(B.logdet.isfinite()) and float(B.logdet) > -30:  # singular factors: unstable
                check(f"{name} logdet", A.logdet, B.logdet, rtol=1e-9)
    A = cl.KFACLinearOperator(*args, mine, process_group=group, fisher_type="type-2", **c.kwargs())
    B = cl.KFACLinearOperator(*args, c.data, fisher_type="type-2", **c.kwargs())
    v = torch.ones(A.shape[1], dtype=torch.float64)
    check(
        f"{tag} KFAC inverse",
        cl.KFACInverseLinearOperator(A, damping=1e-2) @ v,
        cl.KFACInverseLinearOperator(B, damping=1e-2) @ v,
        rtol=1e-9,
    )
    E = cl.EKFACLinearOperator(*args, mine, process_group=group, fisher_type="type-2", **c.kwargs())
    F = cl.EKFACLinearOperator(*args, c.data, fisher_type="type-2", **c.kwargs())
    products(f"{tag} EKFAC", E, F)
    same_on_all_ranks(
        f"{tag} EKFAC eigenbases", list(E._gradient_covariances_eigenvectors.values())
    )
    # MC: own draws per rank, same operator on every rank
    M = cl.KFACLinearOperator(*args, mine, process_group=group, fisher_type="mc", **c.kwargs())
    same_on_all_ranks(f"{tag} KFAC-MC", M @ v)


def three_ranks(rank: int, world: int):
    """Three ranks, one batch each: GGN products, KFAC, unseeded random draws shared."""
    group = dist.group.WORLD
    c = make_case("mlp_ce", "mean")
    mine = shard(c.data, rank, world)
    args = (c.model, c.loss_func, c.params)
    G = cl.GGNLinearOperator(*args, mine, process_group=group)
    products("3 ranks GGN", G, cl.GGNLinearOperator(*args, c.data))
    products(
        "3 ranks KFAC",
        cl.KFACLinearOperator(*args, mine, process_group=group, fisher_type="type-2"),
        cl.KFACLinearOperator(*args, c.data, fisher_type="type-2"),
    )
    # no generator and different global seeds: the draws are still shared, so iterative
    # methods on composites take the same path everywhere
    torch.manual_seed(100 + rank)
    damped = G + _scaled_identity(G, 0.5)
    same_on_all_ranks("unseeded hutchinson_trace", cl.hutchinson_trace(damped, 4))
    same_on_all_ranks("unseeded eigsh", cl.eigsh(damped, k=2, return_eigenvectors=False))
    same_on_all_ranks(
        "unseeded spectrum", cl.lanczos_approximate_spectrum(damped, ncv=4, num_points=20)[1]
    )


def errors(rank: int, world: int):
    """An error on one rank makes every rank raise, naming it; DDP; Jacobians refused."""
    group = dist.group.WORLD
    c = make_case("mlp_ce", "mean")
    mine = shard(c.data, rank, world)
    args = (c.model, c.loss_func, c.params)
    # 1) a bad batch on rank 1 at construction
    bad = [(X, y) for X, y in mine]
    if rank == 1:
        bad = [(torch.full_like(bad[0][0], float("nan")), bad[0][1])]
    start = time.time()
    try:
        cl.GGNLinearOperator(*args, bad, process_group=group)
        FAILURES.append("construction with a bad batch on rank 1 did not raise")
    except ValueError as e:
        if rank != 1 or "NaN" not in str(e):
            FAILURES.append(f"unexpected ValueError on rank {rank}: {e}")
    except RuntimeError as e:
        if rank == 1 or "rank 1" not in str(e):
            FAILURES.append(f"unexpected RuntimeError on rank {rank}: {e}")
    if time.time() - start > 10:
        FAILURES.append("raising took more than 10 s")
    # 2) the data go bad on rank 0 after construction: the next product raises everywhere
    data = [(X.clone(), y.clone()) for X, y in mine]
    G = cl.GGNLinearOperator(*args, data, process_group=group)
    if rank == 0:
        data[0][0].fill_(float("inf"))
    try:
        G @ torch.ones(G.shape[1], dtype=torch.float64)
        FAILURES.append("product with bad data on rank 0 did not raise")
    except (ValueError, RuntimeError) as e:
        if rank == 1 and "rank 0" not in str(e):
            FAILURES.append(f"rank 1 raised without naming rank 0: {e}")
    # 3) a wrong input on rank 1 only (user error before any product work)
    G = cl.GGNLinearOperator(*args, mine, process_group=group)
    v = torch.ones(G.shape[1] + (rank == 1), dtype=torch.float64)
    start = time.time()
    try:
        G @ v
        FAILURES.append("product with a wrong input on rank 1 did not raise")
    except ValueError as e:
        if rank != 1:
            FAILURES.append(f"unexpected ValueError on rank {rank}: {e}")
    except RuntimeError as e:
        if rank == 1 or "rank 1" not in str(e):
            FAILURES.append(f"unexpected RuntimeError on rank {rank}: {e}")
    if time.time() - start > 10:
        FAILURES.append("raising took more than 10 s")
    # the ranks are still in step: a healthy product afterwards works
    G2 = cl.GGNLinearOperator(*args, mine, process_group=group)
    check(
        "product after errors",
        G2 @ torch.ones(G2.shape[1], dtype=torch.float64),
        cl.GGNLinearOperator(*args, c.data) @ torch.ones(G2.shape[1], dtype=torch.float64),
    )
    # num_data given: the union's total, the same on every rank (else ValueError there)
    ones = torch.ones(G2.shape[1], dtype=torch.float64)
    G3 = cl.GGNLinearOperator(*args, mine, process_group=group, num_data=c.num_data)
    check("given num_data", G3 @ ones, cl.GGNLinearOperator(*args, c.data) @ ones)
    try:
        cl.GGNLinearOperator(*args, mine, process_group=group, num_data=c.num_data + rank)
        FAILURES.append("num_data differing between ranks did not raise")
    except ValueError as e:
        if rank != 1 or "num_data" not in str(e):
            FAILURES.append(f"unexpected ValueError on rank {rank}: {e}")
    except RuntimeError as e:
        if rank != 0 or "rank 1" not in str(e):
            FAILURES.append(f"unexpected RuntimeError on rank {rank}: {e}")
    # 4) a DDP-wrapped model gives the same operator, without firing DDP's hooks
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(c.model)
    H = cl.HessianLinearOperator(
        ddp, c.loss_func, list(ddp.parameters()), mine, process_group=group
    )
    products("DDP Hessian", H, cl.HessianLinearOperator(*args, c.data))
    if any(p.grad is not None for p in c.model.parameters()):
        FAILURES.append("DDP: .grad fields were written")
    # 5) Jacobians are not sums over the data: clear NotImplementedError
    for cls in (cl.JacobianLinearOperator, cl.TransposedJacobianLinearOperator):
        try:
            cls(c.model, c.params, mine, process_group=group)
            FAILURES.append(f"{cls.__name__} accepted process_group")
        except NotImplementedError as e:
            if "process_group" not in str(e):
                FAILURES.append(f"{cls.__name__} error does not say why: {e}")
    # 6) KFAC computing its factors lazily (first product) with bad data on rank 1
    data = [(X.clone(), y.clone()) for X, y in mine]
    K = cl.KFACLinearOperator(
        *args, data, process_group=group, fisher_type="type-2", check_deterministic=False
    )
    if rank == 1:
        data[0][0].fill_(float("nan"))
    try:
        K @ torch.ones(K.shape[1], dtype=torch.float64)
        FAILURES.append("KFAC factors with bad data on rank 1 did not raise")
    except ValueError as e:
        if rank != 1:
            FAILURES.append(f"unexpected ValueError on rank {rank}: {e}")
    except RuntimeError as e:
        if rank != 0 or "rank 1" not in str(e):
            FAILURES.append(f"unexpected RuntimeError on rank {rank}: {e}")
    # 7) Monte-Carlo Fisher: own draws per rank, the union's Fisher in distribution (many
    # samples approach the GGN, which equals the Fisher for cross-entropy)
    F = cl.FisherMCLinearOperator(*args, mine, process_group=group, mc_samples=400)
    G = cl.GGNLinearOperator(*args, c.data)
    v = torch.ones(G.shape[1], dtype=torch.float64)
    check("MC-Fisher (400 samples) vs GGN", F @ v, G @ v, rtol=0.1)


# ----------------------------------------------------------------- KFAC extras
class _NormNet(torch.nn.Module):
    """Linear -> tanh -> free scale -> LayerNorm -> tanh -> Linear.

    The LayerNorm parameters and the scale fall back; the order keeps both Kronecker
    factors of both layers non-singular (for MSE), so the log-determinant is finite.
    """

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(3, 4)
        self.scale = torch.nn.Parameter(torch.randn(4))
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(torch.tanh(self.first(x)) * self.scale)))


class _TinyTransformer(torch.nn.Module):
    """Embedding + position tensor, one ``TransformerEncoderLayer``, head: logits [N, C, T].

    ``flat=True`` returns 2-d logits ``[N * T, C]`` (EKFAC needs 2-d outputs).
    """

    def __init__(self, vocab=5, d=4, flat=False):
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, d)
        self.positions = torch.nn.Parameter(0.3 * torch.randn(3, d))
        self.encoder = torch.nn.TransformerEncoderLayer(
            d, 2, dim_feedforward=6, dropout=0.0, batch_first=True
        )
        self.head = torch.nn.Linear(d, vocab)
        self.flat = flat

    def forward(self, tokens):  # [N, T]
        x = self.encoder(self.tokens(tokens) + self.positions[: tokens.shape[1]])
        logits = self.head(x)
        return logits.flatten(0, 1) if self.flat else logits.transpose(1, 2)


def _compare_kfac(name: str, A, B, logdet: bool):
    """Factors, fallback diagonals, products, trace, norm (and logdet) of ``A`` and ``B``."""
    A.compute_kronecker_factors()
    B.compute_kronecker_factors()
    for k in B._input_covariances:
        check(f"{name} A[{k}]", A._input_covariances[k], B._input_covariances[k])
    for k in B._gradient_covariances:
        check(f"{name} G[{k}]", A._gradient_covariances[k], B._gradient_covariances[k])
    if set(A._fallback_diagonals) != set(B._fallback_diagonals) or not B._fallback_diagonals:
        FAILURES.append(f"{name}: fallback parameters {set(A._fallback_diagonals)}")
    for k in B._fallback_diagonals:
        check(f"{name} fallback[{k}]", A._fallback_diagonals[k], B._fallback_diagonals[k])
    products(name, A, B)
    check(f"{name} trace", A.trace, B.trace)
    check(f"{name} frobenius_norm", A.frobenius_norm, B.frobenius_norm)
    if logdet:  # only where all factors are non-singular (else -inf or NaN)
        if not bool(B.logdet.isfinite()):
            FAILURES.append(f"{name}: reference logdet {float(B.logdet)} is not finite")
        check(f"{name} logdet", A.logdet, B.logdet, rtol=1e-9)


def kfac_extras(rank: int, world: int):
    """KFAC/EKFAC with ``fallback="diagonal"`` and KFAC on a tiny transformer (2 ranks)."""
    group = dist.group.WORLD
    dt = torch.float64
    # 1) fallback="diagonal" on LayerNorm parameters and a free tensor, unequal batches
    torch.manual_seed(0)
    model = _NormNet().to(dt)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=gen, dtype=dt)
    labels = torch.randint(3, (12,), generator=gen)
    targets = torch.randn(12, 3, generator=gen, dtype=dt)
    params = list(model.parameters())
    # CE (mean): G of the head is singular, no logdet; MSE (sum): all factors non-singular
    for loss, y, logdet in (
        (torch.nn.CrossEntropyLoss(), labels, False),
        (torch.nn.MSELoss(reduction="sum"), targets, True),
    ):
        data = [(X[:5], y[:5]), (X[5:8], y[5:8]), (X[8:], y[8:])]
        mine = shard(data, rank, world)
        args = (model, loss, params)
        tag = f"fallback {type(loss).__name__}"
        for fisher_type in ("type-2", "empirical"):
            for approx in ("expand", "reduce"):
                kw = dict(fisher_type=fisher_type, kfac_approx=approx, fallback="diagonal")
                A = cl.KFACLinearOperator(*args, mine, process_group=group, **kw)
                B = cl.KFACLinearOperator(*args, data, **kw)
                _compare_kfac(f"{tag} KFAC {fisher_type}/{approx}", A, B, logdet)
        kw = dict(fisher_type="type-2", fallback="diagonal")
        A = cl.KFACLinearOperator(*args, mine, process_group=group, **kw)
        B = cl.KFACLinearOperator(*args, data, **kw)
        v = torch.ones(A.shape[1], dtype=dt)
        check(
            f"{tag} KFAC inverse",
            cl.KFACInverseLinearOperator(A, damping=1e-2) @ v,
            cl.KFACInverseLinearOperator(B, damping=1e-2) @ v,
            rtol=1e-9,
        )
        E = cl.EKFACLinearOperator(*args, mine, process_group=group, **kw)
        F = cl.EKFACLinearOperator(*args, data, **kw)
        products(f"{tag} EKFAC", E, F)
        check(f"{tag} EKFAC trace", E.trace, F.trace)
        # MC: own draws per rank, the same operator (fallback included) on every rank
        kw["fisher_type"] = "mc"
        M = cl.KFACLinearOperator(*args, mine, process_group=group, **kw)
        same_on_all_ranks(f"{tag} KFAC-MC", M @ v)
    # 2) a tiny transformer: sequence outputs, attention in-/out-projections, MLP, embedding;
    # LayerNorms and the position tensor fall back. Padding (ignore_index) differs per batch,
    # so 'mean' normalises each batch by its own count of kept positions.
    torch.manual_seed(2)
    model = _TinyTransformer().to(dt)
    gen = torch.Generator().manual_seed(3)
    data = []
    for B_size in (3, 2, 2):
        tokens = torch.randint(5, (B_size, 3), generator=gen)
        labels = torch.randint(5, (B_size, 3), generator=gen)
        labels[0, -1] = -100
        if B_size == 2:
            labels[1, 1:] = -100
        data.append((tokens, labels))
    mine = shard(data, rank, world)
    params = list(model.parameters())
    for reduction in ("mean", "sum"):
        loss = torch.nn.CrossEntropyLoss(reduction=reduction, ignore_index=-100)
        args = (model, loss, params)
        for fisher_type in ("type-2", "empirical"):
            kw = dict(fisher_type=fisher_type, fallback="diagonal")
            A = cl.KFACLinearOperator(*args, mine, process_group=group, **kw)
            B = cl.KFACLinearOperator(*args, data, **kw)
            # the head input follows a LayerNorm: A is singular, no logdet
            _compare_kfac(f"transformer {reduction} KFAC {fisher_type}", A, B, False)
        kw = dict(fisher_type="mc", fallback="diagonal")
        M = cl.KFACLinearOperator(*args, mine, process_group=group, **kw)
        same_on_all_ranks(f"transformer {reduction} KFAC-MC", M @ torch.ones(M.shape[1], dtype=dt))
    # the blocks this case is meant to exercise (attention, MLP, embedding; the rest falls back)
    units = {"encoder.self_attn.in_proj", "encoder.self_attn.out_proj", "encoder.linear1", "tokens"}
    if not units <= set(B._mapping) or "positions" not in B._fallback_diagonals:
        FAILURES.append(f"transformer blocks: {list(B._mapping)}, {list(B._fallback_diagonals)}")
    # EKFAC on the same network with 2-d logits
    flat = _TinyTransformer(flat=True).to(dt)
    flat.load_state_dict(model.state_dict())
    flat_data = [(X, y.reshape(-1)) for X, y in data]
    flat_mine = shard(flat_data, rank, world)
    args = (flat, torch.nn.CrossEntropyLoss(ignore_index=-100), list(flat.parameters()))
    kw = dict(fisher_type="type-2", fallback="diagonal", batch_size_fn=lambda X: X.shape[0])
    E = cl.EKFACLinearOperator(*args, flat_mine, process_group=group, **kw)
    F = cl.EKFACLinearOperator(*args, flat_data, **kw)
    products("transformer EKFAC", E, F)
    check("transformer EKFAC trace", E.trace, F.trace)


SCENARIOS = {
    "exact": exact_operators,
    "three": three_ranks,
    "errors": errors,
    "kfac_extras": kfac_extras,
}


def main():
    scenario, rank, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        SCENARIOS[scenario](rank, world)
    finally:
        dist.destroy_process_group()
    if FAILURES:
        print(f"rank {rank}: {len(FAILURES)} failed checks", *FAILURES, sep="\n")
        sys.exit(1)
    print(f"rank {rank}: ok")


if __name__ == "__main__":
    main()
