"""Cost of curvlinops' matrix products relative to a gradient, and to plain-PyTorch floors.

Five deterministic synthetic problems in float32 on one CPU thread:

- ``mlp``: a 784-128-64-10 ReLU MLP on one batch of 128 MNIST-sized inputs (cross-entropy),
- ``cnn``: a two-layer CNN (conv 3->16, conv 16->32, max-pooling, linear) on one batch of 64
  CIFAR-sized inputs (cross-entropy),
- ``transformer``: a tiny causal language model (embedding, one transformer block, vocabulary
  head; 16 sequences of 32 tokens) with a sequence cross-entropy over ``[B, V, T]`` logits,
- ``transformer_math``: the same kind of model with the attention written out (matrix products
  and a softmax, pre-norm ``LayerNorm``); the forward-mode floors (``torch.func``
  vmap-of-jvp) run on both transformers (on ``transformer`` through the math attention
  kernel, like curvlinops' forward route),
- ``regression``: a 32-128-128-1 tanh MLP on 256 points with a mean squared error.

Floors that ``torch.func`` cannot evaluate on a model (forward-mode AD gaps in torch 2.13) are
reported as not available. For each problem the reference is the median time of one
loss and gradient by plain autograd; every other time is reported as a ratio to it:

- curvlinops' Hessian, GGN, empirical Fisher (EF) and Monte-Carlo Fisher products with 1 and
  16 columns (operators built once with ``check_deterministic=False`` on the single batch),
  given the columns in the floors' layout (a ``[K, D]`` tensor's transposed view, which the
  products use without copying and answer in the same layout, as curvlinops' estimators and
  eigensolvers allocate their blocks); with 16 columns also given a contiguous ``[D, K]``
  tensor (two transposing copies more);
- "floors", the same products written here directly in PyTorch: the Hessian by double
  backward (16 columns with ``is_grads_batched``) and by ``torch.func`` vmap-of-jvp-of-grad;
  the GGN by the double-vjp trick with plain autograd and by ``torch.func`` vmap-of-jvp plus
  vmap-of-vjp, both with the loss Hessian w.r.t. the output (double backward, resp. jvp of grad)
  in the middle;
- the GGN, EF and MC-Fisher products with each ``JVP_ROUTE`` forced: ``"reverse"`` (transposed
  pullback), ``"forward"`` (``torch.func`` vmap-of-jvp inside curvlinops) and ``"measure"`` (the
  faster, timed at the first product; the choice is logged); the default ``"auto"`` rule's
  choices are logged too;
- operator construction with the default determinism check;
- the same operators after ``A.compile()`` (``torch.compile`` with inductor of the mini-batch
  product; compilation happens during warm-up and is logged, not timed).

Each floor is checked against the corresponding curvlinops product. All timings are medians
over repeats after warm-up, measured in one process with the measurements interleaved (one call
of each method per round), so that drifts of a shared machine's speed affect all alike. Results
are printed as a table and written to ``benchmarks/results/products.json``.

Usage: ``python benchmarks/bench_products.py [--quick]`` (``make bench`` / ``make bench-quick``).
"""

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

# Measure the tree these benchmarks live in, not whichever curvlinops is installed: the
# scripts' own folder comes first on sys.path, so an editable install of another checkout would
# otherwise win.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import curvlinops  # noqa: E402
from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)

RESULTS = Path(__file__).resolve().parent / "results" / "products.json"
NUM_COLUMNS = (1, 16)


# ----------------------------------------------------------------------------- problems
def make_mlp() -> tuple[nn.Module, Tensor, Tensor]:
    """784-128-64-10 ReLU MLP and one batch of 128 MNIST-sized inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    X = torch.rand(128, 1, 28, 28)
    y = torch.randint(0, 10, (128,))
    return model, X, y


def make_cnn() -> tuple[nn.Module, Tensor, Tensor]:
    """Small CNN and one batch of 64 CIFAR-sized inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    X = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    return model, X, y


class TinyCausalLM(nn.Module):
    """Embedding, one causal transformer block, and a vocabulary head: logits ``[B, V, T]``."""

    def __init__(self, vocab: int = 64, width: int = 32, length: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.block = nn.TransformerEncoderLayer(
            width, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.block(self.embed(tokens), src_mask=self.mask, is_causal=True)
        return self.head(hidden).transpose(1, 2)  # class axis 1 for CrossEntropyLoss


def make_transformer() -> tuple[nn.Module, Tensor, Tensor]:
    """Tiny causal language model, 16 sequences of 32 tokens, next-token targets."""
    torch.manual_seed(0)
    model = TinyCausalLM()  # train mode (dropout 0): the fused eval fast path has no autodiff
    tokens = torch.randint(0, 64, (16, 33))
    return model, tokens[:, :-1], tokens[:, 1:]


class HandAttentionCausalLM(nn.Module):
    """Like :class:`TinyCausalLM`, with the attention written out (pre-norm block).

    Plain matrix products and a softmax instead of PyTorch's fused attention, so that forward
    mode (``torch.func.jvp``) runs and the forward-mode floors exist for a transformer.
    """

    def __init__(self, vocab: int = 64, width: int = 32, length: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 64), nn.GELU(), nn.Linear(64, width))
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        B, T, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + self.mask[:T, :T]
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, W)
        x = x + self.proj(attended)
        x = x + self.mlp(self.norm2(x))
        return self.head(x).transpose(1, 2)  # class axis 1 for CrossEntropyLoss


def make_transformer_math() -> tuple[nn.Module, Tensor, Tensor]:
    """Causal LM with hand-written attention, 16 sequences of 32 tokens, next-token targets."""
    torch.manual_seed(0)
    model = HandAttentionCausalLM()
    tokens = torch.randint(0, 64, (16, 33))
    return model, tokens[:, :-1], tokens[:, 1:]


def make_regression() -> tuple[nn.Module, Tensor, Tensor]:
    """32-128-128-1 tanh regression MLP, batch 256, mean squared error."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1)
    )
    X = torch.randn(256, 32)
    return model, X, X[:, :1].sin() + 0.1 * torch.randn(256, 1)


PROBLEMS = {
    "mlp": make_mlp,
    "cnn": make_cnn,
    "transformer": make_transformer,
    "transformer_math": make_transformer_math,
    "regression": make_regression,
}
# The classifiers built only from Linear/Conv layers (used by the KFAC, diagonal, eigsh and
# estimator benchmarks).
CLASSIFIERS = {"mlp": make_mlp, "cnn": make_cnn}
LOSSES = {
    "mlp": nn.CrossEntropyLoss,
    "cnn": nn.CrossEntropyLoss,
    "transformer": nn.CrossEntropyLoss,
    "transformer_math": nn.CrossEntropyLoss,
    "regression": nn.MSELoss,
}


# ----------------------------------------------------------------------------- timing
def time_round_robin(fns: list, repeats: list, warmup: int) -> list:
    """Wall times of every ``fns[i]()`` over ``repeats[i]`` calls, interleaved.

    Every callable is warmed up ``warmup`` times, then the callables are timed in turns (one call
    each per round), so that slow drifts of the machine's speed affect all of them alike.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list = [[] for _ in fns]
    for round_ in range(max(repeats)):
        for fn, rep, t in zip(fns, repeats, times):
            if round_ < rep:
                start = time.perf_counter()
                fn()
                t.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------- floors
def make_floors(model: nn.Module, loss_func: nn.Module, X: Tensor, y: Tensor) -> dict:
    """Plain-PyTorch Hessian and GGN products ``name -> fn(V) -> list of tensors``.

    ``V`` is a list shaped like the parameters, with a leading column axis of size ``K`` if
    ``K > 1`` (then the result has it too): the columns first, the layout in which the
    curvlinops rows get their inputs (as a transposed view).
    """
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    param_dict = {n: p.detach() for n, p in model.named_parameters()}

    def f(p: dict) -> Tensor:
        return functional_call(model, p, (X,))

    def loss_of(p: dict) -> Tensor:
        return loss_func(f(p), y)

    def hessian_double_backward(V: list) -> list:
        batched = V[0].shape != params[0].shape
        loss = loss_func(model(X), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        return list(torch.autograd.grad(g, params, V, is_grads_batched=batched))

    grad_fn = grad(loss_of)

    def hessian_func(V: list) -> list:
        batched = V[0].shape != params[0].shape

        def hvp(v: list) -> list:
            tangent = dict(zip(names, v))
            out = jvp(grad_fn, (param_dict,), (tangent,))[1]
            return [out[n] for n in names]

        return vmap(hvp)(V) if batched else hvp(V)

    def output_hessian(out: Tensor, U: Tensor, batched: bool) -> Tensor:
        """The loss Hessian w.r.t. the output applied to ``U``, by double backward."""
        leaf = out.detach().requires_grad_()
        (g,) = torch.autograd.grad(loss_func(leaf, y), leaf, create_graph=True)
        return torch.autograd.grad(g, leaf, U, is_grads_batched=batched)[0]

    def ggn_double_vjp(V: list) -> list:
        batched = V[0].shape != params[0].shape
        out = model(X)
        dummy = torch.zeros_like(out, requires_grad=True)
        Jt_dummy = torch.autograd.grad(out, params, dummy, create_graph=True)
        (JV,) = torch.autograd.grad(Jt_dummy, dummy, V, is_grads_batched=batched)
        HJV = output_hessian(out, JV, batched)
        return list(torch.autograd.grad(out, params, HJV, is_grads_batched=batched))

    def ggn_func(V: list) -> list:
        batched = V[0].shape != params[0].shape
        out, vjp_fn = vjp(f, param_dict)

        def jvp_one(v: list) -> Tensor:
            return jvp(f, (param_dict,), (dict(zip(names, v)),))[1]

        JV = vmap(jvp_one)(V) if batched else jvp_one(V)
        loss_grad = grad(lambda o: loss_func(o, y))

        def hessian_one(u: Tensor) -> Tensor:
            return jvp(loss_grad, (out,), (u,))[1]

        HJV = vmap(hessian_one)(JV) if batched else hessian_one(JV)
        result = vmap(vjp_fn)(HJV)[0] if batched else vjp_fn(HJV)[0]
        return [result[n] for n in names]

    def math_attention(fn):
        """Run through the math SDPA kernel, as curvlinops does for second and forward mode."""

        def wrapped(V: list) -> list:
            with sdpa_kernel([SDPBackend.MATH]):
                return fn(V)

        return wrapped

    # The math kernel also has forward-mode rules (the fused CPU kernel has none), so the
    # torch.func floors run on the fused-attention transformer too, as curvlinops' forward route.
    hessian_double_backward = math_attention(hessian_double_backward)
    ggn_double_vjp = math_attention(ggn_double_vjp)
    hessian_func = math_attention(hessian_func)
    ggn_func = math_attention(ggn_func)
    return {
        "hessian": {
            "double backward": hessian_double_backward,
            "torch.func vmap(jvp(grad))": hessian_func,
        },
        "ggn": {
            "double-vjp, autograd": ggn_double_vjp,
            "torch.func vmap(jvp)+vmap(vjp)": ggn_func,
        },
    }


# ----------------------------------------------------------------------------- benchmark
OPERATORS = {
    "hessian": HessianLinearOperator,
    "ggn": GGNLinearOperator,
    "ef": EFLinearOperator,
    "mc_fisher": FisherMCLinearOperator,
}


def relative_error(a: list, b: list) -> float:
    """Relative Euclidean distance of two lists of tensors."""
    diff = sum((x - z).square().sum() for x, z in zip(a, b)).sqrt()
    return (diff / sum(z.square().sum() for z in b).sqrt()).item()


def bench_problem(
    name: str, repeats: int, warmup: int, log: Callable[[str], None], compiled: str = "all"
) -> dict:
    """Time everything for one problem (interleaved); return the JSON-ready results.

    ``compiled`` is ``"all"`` (every operator also under ``torch.compile``), ``"ggn"`` or
    ``"none"``.
    """
    model, X, y = PROBLEMS[name]()
    loss_func = LOSSES[name]()
    params = list(model.parameters())
    data = [(X, y)]
    D = sum(p.numel() for p in params)
    log(f"{name}: {D} parameters, batch {X.shape[0]}, input {tuple(X.shape[1:])}")
    result = {"num_params": D, "batch_size": X.shape[0], "input_shape": list(X.shape[1:])}
    entries = result["timings"] = []
    fns, reps = [], []

    def add(kind: str, method: str, K, fn: Callable[[], object], rep: int = repeats):
        entries.append({"kind": kind, "method": method, "K": K})
        fns.append(fn)
        reps.append(rep)

    def loss_and_gradient():
        loss = loss_func(model(X), y)
        return torch.autograd.grad(loss, params)

    add("gradient", "plain autograd", "-", loss_and_gradient)

    torch.manual_seed(1)
    columns = {K: torch.randn(D, K) for K in NUM_COLUMNS}
    # The floors take and return the columns first; curvlinops' products take the same layout
    # as a transposed view (``[K, D]`` contiguous, seen as ``[D, K]``), which they use without
    # a copy and answer in kind. A plain contiguous ``[D, K]`` input costs two transposing
    # copies more (its own row).
    columns_first = {K: columns[K].T.contiguous().T for K in NUM_COLUMNS}
    operators = {
        kind: cls(model, loss_func, params, data, check_deterministic=False)
        for kind, cls in OPERATORS.items()
    }
    products = {}
    for kind, op in operators.items():
        for K in NUM_COLUMNS:
            V = columns_first[K].squeeze(-1) if K == 1 else columns_first[K]
            products[kind, K] = op @ V
            add(kind, "curvlinops", K, lambda op=op, V=V: op @ V)
        V = columns[16]
        torch.testing.assert_close(op @ V, products[kind, 16], rtol=1e-4, atol=1e-5)
        add(kind, "curvlinops, contiguous [D, K] input", 16, lambda op=op, V=V: op @ V)

    # the GGN family with each route for J V forced (the default "auto" is the rule of
    # curvlinops._autodiff.prefers_forward_route) and with the route timed at the first
    # product ("measure")
    for kind, route in itertools.product(
        ("ggn", "ef", "mc_fisher"), ("reverse", "forward", "measure")
    ):
        op = OPERATORS[kind](model, loss_func, params, data, check_deterministic=False)
        op.JVP_ROUTE = route
        for K in NUM_COLUMNS:
            V = columns_first[K].squeeze(-1) if K == 1 else columns_first[K]
            try:
                out = op @ V
            except (RuntimeError, NotImplementedError) as error:  # forward-mode gaps
                log(f"  {kind} {route} route, K={K}: not available ({str(error)[:80]})")
                continue
            difference = relative_error([out], [products[kind, K]])
            result.setdefault("jvp_route_relative_errors", {})[f"{kind} | {route} | K={K}"] = (
                difference
            )
            if route == "measure":
                chosen = op._jvp_route_choices["measure"].choices[K]
                log(f"  {kind}, K={K}: measured route {chosen}")
            add(kind, f"curvlinops JVP_ROUTE={route}", K, lambda op=op, V=V: op @ V)
    for kind in ("ggn", "ef", "mc_fisher"):
        chosen = operators[kind]._jvp_route_choices["auto"].choices
        log(f"  {kind}: default route (auto rule) {chosen}")

    # compiled products (inductor), each shape compiled during the warm-up
    compiled_kinds = OPERATORS if compiled == "all" else {"ggn": OPERATORS["ggn"]}
    if compiled != "none":
        for kind, cls in compiled_kinds.items():
            op = cls(model, loss_func, params, data, check_deterministic=False).compile()
            for K in NUM_COLUMNS:
                V = columns[K].squeeze(-1) if K == 1 else columns[K]
                start = time.perf_counter()
                out = op @ V
                log(f"  compiled {kind}, K={K}: {time.perf_counter() - start:.1f} s to compile")
                difference = relative_error([out], [products[kind, K]])
                result.setdefault("compiled_relative_errors", {})[f"{kind} | K={K}"] = difference
                add(kind, "curvlinops compiled", K, lambda op=op, V=V: op @ V)

    floors = make_floors(model, loss_func, X, y)
    errors = result["floor_relative_errors"] = {}
    for kind, methods in floors.items():
        for method, fn in methods.items():
            for K in NUM_COLUMNS:
                blocks = columns[K].split([p.numel() for p in params])
                if K == 1:
                    V = [b.reshape(p.shape) for b, p in zip(blocks, params)]
                else:
                    V = [b.T.reshape(K, *p.shape) for b, p in zip(blocks, params)]
                try:
                    out = fn(V)
                except (RuntimeError, NotImplementedError) as error:  # torch.func gaps
                    log(f"  {kind} floor {method!r}, K={K}: not available ({str(error)[:80]})")
                    continue
                flat = torch.cat([o.reshape(K, -1) for o in out], dim=1).T.squeeze(-1)
                errors[f"{kind} | {method} | K={K}"] = relative_error([flat], [products[kind, K]])
                add(kind, method, K, lambda fn=fn, V=V: fn(V))

    for kind, cls in OPERATORS.items():
        add(
            kind,
            "construction (determinism check)",
            "-",
            lambda cls=cls: cls(model, loss_func, params, data),
            rep=max(3, repeats // 3),
        )

    for entry, times in zip(entries, time_round_robin(fns, reps, warmup)):
        entry["median_s"] = statistics.median(times)
        entry["times_s"] = times
    reference = entries[0]["median_s"]
    for entry in entries:
        entry["ratio_to_gradient"] = entry["median_s"] / reference
    return result


def format_table(results: dict) -> str:
    """Ratios to the gradient, one row per (kind, method), columns K=1 and K=16."""
    lines = []
    for name, result in results.items():
        entries = result["timings"]
        reference = entries[0]["median_s"]
        lines.append(
            f"\n{name}: {result['num_params']} parameters, batch {result['batch_size']}; "
            f"loss + gradient (plain autograd) = {1e3 * reference:.2f} ms = 1.0"
        )
        header = f"  {'product':10s} {'method':34s} {'K=1':>8s} {'K=16':>8s} {'K=16/col':>9s}"
        lines += [header, "  " + "-" * (len(header) - 2)]
        rows: dict = {}
        for entry in entries[1:]:
            rows.setdefault((entry["kind"], entry["method"]), {})[entry["K"]] = entry
        for (kind, method), by_K in rows.items():
            if "-" in by_K:
                ratio = by_K["-"]["ratio_to_gradient"]
                lines.append(f"  {kind:10s} {method:34s} {ratio:8.2f} {'':>8s} {'':>9s}")
                continue
            cells = [
                f"{by_K[K]['ratio_to_gradient']:8.2f}" if K in by_K else f"{'n/a':>8s}"
                for K in (1, 16)
            ]
            per_column = f"{by_K[16]['ratio_to_gradient'] / 16:9.2f}" if 16 in by_K else ""
            lines.append(f"  {kind:10s} {method:34s} {cells[0]} {cells[1]} {per_column}")
        worst = max(result["floor_relative_errors"].values())
        lines.append(f"  (largest relative difference floor vs. curvlinops: {worst:.1e})")
    return "\n".join(lines)


def compiled_default(name: str, quick: bool) -> str:
    """Which operators to compile: all; in quick mode only the MLP's GGN (compiling is slow)."""
    if not quick:
        return "all"
    return "ggn" if name == "mlp" else "none"


def main():
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (under a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per product")
    parser.add_argument(
        "--problems",
        nargs="+",
        choices=list(PROBLEMS),
        default=None,
        help="default: all; quick: the problems with targets (not the regression MLP)",
    )
    parser.add_argument(
        "--compiled",
        choices=["all", "ggn", "none"],
        default=None,
        help="operators also timed under torch.compile (default: all; quick: the MLP's GGN)",
    )
    args = parser.parse_args()
    if args.problems is None:
        args.problems = (
            ["mlp", "cnn", "transformer", "transformer_math"] if args.quick else list(PROBLEMS)
        )
    repeats = args.repeats or (2 if args.quick else 15)
    warmup = 1 if args.quick else 2

    torch.set_num_threads(1)
    print(
        f"curvlinops {curvlinops.__version__}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, 1 thread, float32, "
        f"median of {repeats} runs after {warmup} warm-up run(s)"
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Raised by torch.func.jvp (forward-AD decompositions) in the floors, not by curvlinops.
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
        results = {
            name: bench_problem(
                name,
                repeats,
                warmup,
                log=print,
                compiled=args.compiled or compiled_default(name, args.quick),
            )
            for name in args.problems
        }
    print(format_table(results))
    messages = sorted(
        {f"{w.category.__name__} ({Path(w.filename).name}:{w.lineno}): {w.message}" for w in caught}
    )
    if messages:
        print("\nWarnings raised while benchmarking:")
        for message in messages:
            print(f"  {message}")
    elapsed = time.perf_counter() - start
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "curvlinops": curvlinops.__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "quick": args.quick,
        "repeats": repeats,
        "warmup": warmup,
        "wall_time_s": elapsed,
        "warnings": messages,
    }
    RESULTS.write_text(json.dumps({"meta": meta, "problems": results}, indent=2))
    print(f"\nWrote {RESULTS} ({elapsed:.1f} s)")


if __name__ == "__main__":
    main()
