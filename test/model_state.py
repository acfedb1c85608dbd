"""A snapshot of everything a call must leave unchanged in a user's model, and its check.

``snapshot(model)`` records, per module, the parameter objects and values and
``requires_grad``, the buffer objects and values, every hook registry (and torch's global module
hooks), the ``.grad`` objects and values, the ``training`` flags, and the global torch RNG state;
``changes(before, model)`` lists every difference in words (empty: unchanged). Unchanged means
bit for bit: the same tensors in the same process, nothing recomputed. Shared by the tests of
state preservation and misuse.
"""

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.modules import module as torch_module


def hook_dicts(module: nn.Module) -> dict:
    """Every hook registry of ``module`` (forward, pre-forward, backward, state-dict, ...)."""
    return {
        name: list(value.items())
        for name, value in vars(module).items()
        if "hooks" in name and isinstance(value, (dict, OrderedDict))
    }


GLOBAL_HOOKS = [
    name
    for name, value in vars(torch_module).items()
    if name.startswith("_global_") and "hook" in name and isinstance(value, dict)
]


def snapshot(model: nn.Module) -> dict:
    return {
        "parameters": {
            name: {
                key: (p, None if p is None else p.detach().clone())
                for key, p in m._parameters.items()
            }
            for name, m in model.named_modules()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: (b, b.detach().clone()) for n, b in model.named_buffers()},
        "hooks": {name: hook_dicts(m) for name, m in model.named_modules()},
        "global_hooks": {name: list(getattr(torch_module, name).items()) for name in GLOBAL_HOOKS},
        "grads": {
            n: (p.grad, None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()
        },
        "training": {name: m.training for name, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def same_entries(before: list, after: list) -> bool:
    return len(before) == len(after) and all(
        k1 == k2 and v1 is v2 for (k1, v1), (k2, v2) in zip(before, after)
    )


def changes(before: dict, model: nn.Module) -> list:
    """Everything in ``model`` (and the global state) that differs from the snapshot."""
    found = []
    modules = dict(model.named_modules())
    for name, params in before["parameters"].items():
        now = modules[name]._parameters
        if list(now) != list(params):
            found.append(f"parameter names of module {name!r}: {list(params)} -> {list(now)}")
            continue
        for key, (p, value) in params.items():
            if now[key] is not p:
                found.append(f"parameter {name}.{key} was replaced by another object")
            elif p is not None and not torch.equal(p.detach(), value):
                found.append(f"parameter {name}.{key} changed its values")
    now_rg = {n: p.requires_grad for n, p in model.named_parameters()}
    if now_rg != before["requires_grad"]:
        found.append(f"requires_grad: {before['requires_grad']} -> {now_rg}")
    buffers = dict(model.named_buffers())
    if list(buffers) != list(before["buffers"]):
        found.append(f"buffer names: {list(before['buffers'])} -> {list(buffers)}")
    for n, (b, value) in before["buffers"].items():
        if n not in buffers:
            continue
        if buffers[n] is not b:
            found.append(f"buffer {n} was replaced by another tensor")
        elif buffers[n].dtype != value.dtype or not torch.equal(buffers[n].detach(), value):
            found.append(f"buffer {n}: {value.tolist()} -> {buffers[n].tolist()}")
    for name, dicts in before["hooks"].items():
        now = hook_dicts(modules[name])
        for attr, entries in dicts.items():
            if not same_entries(entries, now.get(attr, [])):
                found.append(
                    f"{attr} of module {name!r}: {len(entries)} -> {len(now.get(attr, []))}"
                )
    for name, entries in before["global_hooks"].items():
        if not same_entries(entries, list(getattr(torch_module, name).items())):
            found.append(f"torch's global hooks {name} changed")
    for n, p in model.named_parameters():
        grad, value = before["grads"][n]
        if p.grad is not grad:
            found.append(
                f"{n}.grad was replaced ({'None' if grad is None else 'a tensor'} -> "
                f"{'None' if p.grad is None else 'another tensor'})"
            )
        elif grad is not None and not torch.equal(grad, value):
            found.append(f"{n}.grad changed its values")
    training = {name: m.training for name, m in model.named_modules()}
    if training != before["training"]:
        found.append(f"training flags: {before['training']} -> {training}")
    if not torch.equal(torch.get_rng_state(), before["rng"]):
        found.append("the global torch RNG state changed")
    return found
