"""In-process checks of the ``process_group`` keyword (no spawned processes)."""

import socket

import pytest
import torch
import torch.distributed as dist
from cases import make_case
from torch import nn

import curvlinops as cl
from curvlinops import _distributed


def test_process_group_without_initialised_distributed():
    """A group while torch.distributed is not initialised: RuntimeError saying what to do."""
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    c = make_case("mlp_ce", "mean")
    with pytest.raises(RuntimeError, match="init_process_group"):
        cl.GGNLinearOperator(c.model, c.loss_func, c.params, c.data, process_group=object())


def test_sharded_model_is_refused():
    """FSDP-style modules raise NotImplementedError naming what is unsupported."""
    fsdp_linear = type("FSDPLinear", (nn.Linear,), {})
    model = nn.Sequential(fsdp_linear(3, 2)).double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="Sharded parameters"):
        cl.GGNLinearOperator(model, nn.MSELoss(), list(model.parameters()), [(X, y)])


def test_rank_seed():
    """Rank 0 keeps the seed (single-process draws on its shard); no group: the seed."""
    assert _distributed.rank_seed(42, None) == 42


def test_signature_shows_process_group():
    """Every operator's constructor lists the keyword (keyword-only, default None)."""
    import inspect

    for cls in (cl.HessianLinearOperator, cl.FisherMCLinearOperator, cl.KFACLinearOperator):
        parameter = inspect.signature(cls.__init__).parameters["process_group"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is None


@pytest.fixture
def single_rank_group():
    """A gloo group of one process (torch.distributed torn down afterwards)."""
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_one_rank_equals_no_group(single_rank_group):
    """With one rank, every reduction is the identity: same operators, bad group type raises."""
    c = make_case("cnn_mse", "sum")
    args = (c.model, c.loss_func, c.params, c.data)
    v = torch.ones(sum(p.numel() for p in c.params), dtype=torch.float64)
    G = cl.GGNLinearOperator(*args, process_group=single_rank_group)
    torch.testing.assert_close(G @ v, cl.GGNLinearOperator(*args) @ v, rtol=1e-12, atol=0)
    E = cl.EKFACLinearOperator(*args, fisher_type="type-2", process_group=single_rank_group)
    torch.testing.assert_close(
        E @ v, cl.EKFACLinearOperator(*args, fisher_type="type-2") @ v, rtol=1e-10, atol=1e-14
    )
    with pytest.raises(ValueError, match="process_group must be"):
        cl.GGNLinearOperator(*args, process_group="WORLD")
