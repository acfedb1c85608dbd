r"""Data parallelism over ``torch.distributed``: the helpers every reduction point uses.

An operator built with ``process_group=group`` represents, on every rank of ``group``, the
single-process operator on the union of all ranks' data shards. Each rank passes over its own
shard; what is a sum over the data (``num_data``, products, gradient and loss, Kronecker
factors, the EKFAC eigenvalue correction, exact diagonals) is summed over the ranks with one
``all_reduce`` of the result, and eigenbases are computed on the group's first rank and
broadcast, so that all ranks hold bit-identical ones.

**No rank waits forever for a failed one.** Every collective here is preceded by a status
agreement: a tiny ``all_reduce`` of one flag per rank. A rank whose local work raised takes part
in that agreement (flag set) and re-raises its own error; every other rank then raises a
``RuntimeError`` naming the failed rank(s), instead of waiting in the payload collective. An
exception marks itself as agreed, so that enclosing entry points (e.g. a construction around
a product) do not agree a second time. Rules that keep the collectives matched: every rank
runs the same sequence of entry points (same calls in the same order), and nothing here
communicates inside a loop over the local batches (shards may differ in their number of
batches).
"""

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Union

import torch
from torch import Tensor, nn

_AGREED = "_curvlinops_ranks_agreed"
#: Whether any operator in this process was given a process group (single-process products
#: then skip looking for one).
_GROUP_USED = False


def _dist():
    import torch.distributed as dist

    return dist


def check_process_group(group) -> Optional[object]:
    """Validate a ``process_group`` argument (``None``: no communication).

    Args:
        group: ``None``, ``torch.distributed.group.WORLD`` or a group from ``new_group``.

    Returns:
        The group.

    Raises:
        ValueError: If ``group`` is not a process group.
        RuntimeError: If ``torch.distributed`` is not initialised.
    """
    global _GROUP_USED
    if group is None:
        return None
    _GROUP_USED = True
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("process_group needs torch.distributed, which this torch lacks.")
    if not dist.is_initialized():
        raise RuntimeError(
            "process_group was given, but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment), "
            "or pass process_group=None for a single-process operator."
        )
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(
            f"process_group must be a torch.distributed ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD) or None, got {type(group).__name__}."
        )
    return group


def rank(group) -> int:
    """This process's rank within ``group`` (0 without a group)."""
    return 0 if group is None else _dist().get_rank(group)


def world_size(group) -> int:
    """Number of processes in ``group`` (1 without a group)."""
    return 1 if group is None else _dist().get_world_size(group)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where the collectives' buffers live: CUDA for NCCL, the CPU for gloo."""
    backend = str(_dist().get_backend(group)).lower()
    if backend == "nccl":
        return device if device.type == "cuda" else torch.device("cuda")
    return torch.device("cpu")


def _agree(group, failed: bool, what: str):
    """All-reduce one flag per rank; raise (marked as agreed) if another rank failed."""
    dist = _dist()
    flags = torch.zeros(world_size(group), dtype=torch.int64)
    flags = flags.to(_comm_device(group, torch.device("cpu")))
    flags[rank(group)] = int(failed)
    dist.all_reduce(flags, group=group)
    failed_ranks = [r for r, f in enumerate(flags.tolist()) if f]
    if failed_ranks and not failed:
        error = RuntimeError(
            f"{what} failed on rank {', '.join(map(str, failed_ranks))} of the process group "
            f"(this is rank {rank(group)}): all ranks stop. See the error on the failed rank."
        )
        setattr(error, _AGREED, True)
        raise error


@contextmanager
def agreement(group, what: str) -> Iterator[None]:
    """Run a block of local work; all ranks agree on its success at the end.

    On an exception in the block, this rank tells the others (unless the exception was agreed
    on already) and re-raises; otherwise it learns whether another rank failed and then
    raises a ``RuntimeError`` naming it. Without a group, the block runs as is.

    Args:
        group: The process group, or ``None``.
        what: What the block does (for the message).
    """
    if group is None:
        yield
        return
    try:
        yield
    except BaseException as error:
        if not getattr(error, _AGREED, False):
            try:
                setattr(error, _AGREED, True)
            except AttributeError:  # exceptions without a __dict__ cannot be marked
                pass
            _agree(group, True, what)
        raise
    _agree(group, False, what)


def all_reduce_(tensors: List[Tensor], group, what: str) -> List[Tensor]:
    """Sum tensors over the ranks in place, with one ``all_reduce`` of their concatenation.

    Preceded by the status agreement (see the module docstring). Without a group, the tensors
    are returned unchanged.

    Args:
        tensors: The tensors (any shapes, one dtype and device).
        group: The process group, or ``None``.
        what: What is reduced (for messages).

    Returns:
        ``tensors``, now holding the sums.
    """
    return _collective(tensors, group, what, lambda flat: _dist().all_reduce(flat, group=group))


def _collective(tensors: List[Tensor], group, what: str, communicate) -> List[Tensor]:
    """Agree on the status, then run ``communicate`` on the tensors' concatenation in place."""
    if group is None or not tensors:
        return tensors
    _agree(group, False, what)
    device = tensors[0].device
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(_comm_device(group, device))
    communicate(flat)
    flat = flat.to(device)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view(t.shape))
        offset += n
    return tensors


def _leaves(tree: Union[Dict, Tensor]) -> List[Tensor]:
    """The tensors of (nested) dicts, in sorted-key order (the same order on every rank)."""
    if isinstance(tree, Tensor):
        return [tree]
    return [leaf for key in sorted(tree, key=repr) for leaf in _leaves(tree[key])]


def all_reduce_dict_(tree: Dict, group, what: str) -> Dict:
    """Sum the tensors of a (nested) dict over the ranks in place (one ``all_reduce``).

    All ranks must hold the same keys and shapes (they do for factors of the same layers).
    """
    all_reduce_(_leaves(tree), group, what)
    return tree


def all_reduce_int(value: int, group, what: str) -> int:
    """Sum an integer over the ranks."""
    if group is None:
        return value
    total = torch.tensor([value], dtype=torch.int64)
    return int(all_reduce_([total], group, what)[0].item())


def check_same_int(value: int, group, name: str):
    """Raise unless ``value`` is the same on every rank (``ValueError`` where it differs).

    Args:
        value: This rank's value.
        group: The process group, or ``None`` (nothing to check).
        name: The argument's name (for the message).
    """
    if group is None:
        return
    first = broadcast_([torch.tensor([int(value)], dtype=torch.int64)], group, f"Checking {name}")
    with agreement(group, f"Checking {name}"):
        if int(first[0].item()) != int(value):
            raise ValueError(
                f"{name}={value} on rank {rank(group)}, but {int(first[0].item())} on rank 0. "
                f"With process_group, {name} is the total over all ranks' shards and must be "
                "the same on every rank; pass None to count (one pass, summed over ranks)."
            )


def broadcast_(tensors: List[Tensor], group, what: str, src_rank: int = 0) -> List[Tensor]:
    """Overwrite ``tensors`` with those of the group's rank ``src_rank`` (in place).

    Used for eigenbases and random vectors, which must be bit-identical on all ranks.
    """
    dist = _dist()

    def communicate(flat: Tensor):
        dist.broadcast(flat, src=dist.get_global_rank(group, src_rank), group=group)

    return _collective(tensors, group, what, communicate)


def broadcast_dict_(tree: Dict, group, what: str) -> Dict:
    """Overwrite the tensors of a (nested) dict with rank 0's (one ``broadcast``)."""
    broadcast_(_leaves(tree), group, what)
    return tree


def rank_seed(seed: int, group) -> int:
    """The seed of this rank's Monte-Carlo draws: ``seed`` on rank 0, a mix of both elsewhere.

    Ranks draw different, reproducible samples, so the distributed Monte-Carlo operators equal
    the single-process ones in distribution (not bit for bit).
    """
    r = rank(group)
    if r == 0:
        return int(seed)
    return (int(seed) * 6364136223846793005 + r * 1442695040888963407) % (2**63 - 1)


def unwrap_model(model, group):
    """The module a ``DistributedDataParallel`` wraps; sharded-parameter setups raise.

    DDP's gradient hooks never fire: the operators differentiate with ``torch.autograd.grad``
    and ``torch.func`` through the wrapped module, never through DDP's ``forward``.

    Raises:
        NotImplementedError: For ``FullyShardedDataParallel`` or ``DTensor`` (tensor
            parallel) parameters.
    """
    if not isinstance(model, nn.Module):
        return model
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return model
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if _is_sharded(model):
        raise NotImplementedError(
            "Sharded parameters (FullyShardedDataParallel, fully_shard or tensor-parallel "
            "DTensor parameters) are not supported: the operators need every parameter whole "
            "on every rank. Gather the full model (e.g. FSDP's full state dict) into an "
            "unsharded copy and pass that with process_group; see docs/scaling.rst."
        )
    return model


def _is_sharded(model: nn.Module) -> bool:
    """Whether the model holds FSDP wrappers or ``DTensor`` parameters."""
    names = {type(m).__name__ for m in model.modules()}
    if names & {"FullyShardedDataParallel", "FSDPModule"} or any(
        n.startswith("FSDP") for n in names
    ):
        return True
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def operator_group(A) -> Optional[object]:
    """The process group of an operator or of an operator it holds (``None`` if none).

    Composites, inverses and sub-matrices hold their data-driven operators as attributes.
    """
    if not _GROUP_USED:  # the common case costs nothing
        return None
    stack, seen = [A], set()
    while stack:
        op = stack.pop()
        if id(op) in seen or not hasattr(op, "__dict__"):
            continue
        seen.add(id(op))
        group = vars(op).get("_process_group", getattr(type(op), "_process_group", None))
        if group is not None:
            return group
        for name, value in vars(op).items():
            if hasattr(value, "_matmat"):
                stack.append(value)
            elif type(value) in (list, tuple) and name not in ("_data", "_params"):
                stack.extend(v for v in value if hasattr(v, "_matmat"))
    return None


def shared_draw(A, tensor: Tensor) -> Tensor:
    """Random numbers drawn for ``A``, made identical on all ranks (rank 0's are broadcast).

    Iterative methods on a data-parallel operator then take the same path on every rank (same
    products, same number of collectives). Without a process group, ``tensor`` is returned.
    """
    group = operator_group(A)
    if group is None:
        return tensor
    return broadcast_([tensor], group, "Sharing random vectors")[0]
