"""Peak memory of 16-column products, each measured in a fresh process, against the floors.

For each problem of ``bench_products.py`` and each method (curvlinops' Hessian, GGN, empirical
and Monte-Carlo Fisher and KFAC products; the plain-PyTorch floors of ``bench_products.py``),
a child process builds the problem and the operator (``check_deterministic=False``) or floor,
runs one warm-up product with 16 columns, then measures one more: the peak resident set size
during the product minus the resident set size before it. The high-water mark is reset right
before the product by writing ``5`` to ``/proc/self/clear_refs`` (Linux), and read from
``VmHWM`` in ``/proc/self/status`` after it, while the product's result is still alive, so both
curvlinops and the floors are charged for their outputs. Inputs are allocated before the
measurement; curvlinops gets them in the floors' columns-first layout (a ``[K, D]`` tensor seen
as ``[D, K]``, used without a copy). The ratio compares each curvlinops product with the best
(lowest) floor of the same structure: the Hessian floors for the Hessian, the GGN floors (the
same J^T (.) J structure) for the GGN, EF and MC-Fisher. Target of the benchmark issue: at most 1.1.

Builds (problems ``mlp``, ``cnn``, ``transformer``; KFAC over the parameters of
``bench_kfac.kfac_params``, default Fisher type ``'mc'`` with one sample, float32), measured the
same way after one warm-up build, with the built objects alive at the reading:

- ``kfac build``: a new ``KFACLinearOperator`` (``check_deterministic=False``) and its
  ``compute_kronecker_factors()``;
- ``ekfac build``: the same for ``EKFACLinearOperator`` plus its eigenbases and eigenvalue
  correction (2-d outputs only: not available on the transformer);
- ``inverse build (cholesky)`` / ``(exact)``: the first product of a new
  ``KFACInverseLinearOperator`` (damping 1e-2, ``use_exact_damping`` False / True) with one
  vector, which computes the Cholesky inverses / eigendecompositions of all factors (the
  KFAC factors are computed before the measurement).

Their floors, written here in plain PyTorch, are the factors (for EKFAC and the inverse
their eigenvectors or inverses), one batch's activations and backpropagated vectors, and one
chunk of temporaries: forward pre-hooks keep the layers' inputs, one ``autograd.grad`` call
from the output rows to the layers' outputs (gradient edges) gives their output gradients for
one sampled label per row (as many vectors as the MC Fisher with ``mc_samples=1``), then
``A += a^T a`` and ``G += g^T g`` in place, one example at a time (convolutions: patches by
``F.unfold``, transposed views); EKFAC adds a ``torch.linalg.eigh`` of each factor (in its
dtype), drops the factors, and runs one more forward/backward whose rows are rotated into the
eigenbases and turned into squared per-example gradients in chunks of at most ``2**24``
entries (``(g^2)^T (a^2)`` for one row per example); the inverse floors are a Cholesky
inverse of each damped factor (or its ``eigh``) and the per-layer product ``G^-1 V A^-1`` (or
in the eigenbasis). Ratio = curvlinops / floor, target at most 1.2; floors below 0.25 MiB
are under the resolution of the resident-set measurement and get no ratio.

Usage: ``python benchmarks/bench_memory.py [--quick]``; writes ``benchmarks/results/memory.json``.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
K = 16
OPERATOR_METHODS = ("hessian", "ggn", "ef", "mc_fisher", "kfac")
FLOOR_METHODS = {
    "hessian": ("double backward", "torch.func vmap(jvp(grad))"),
    "ggn": ("double-vjp, autograd", "torch.func vmap(jvp)+vmap(vjp)"),
}
FLOOR_OF = {"hessian": "hessian", "ggn": "ggn", "ef": "ggn", "mc_fisher": "ggn"}
TARGET = 1.1


def status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_of_second_call(problem: str, method: str, run, errors: tuple) -> dict:
    """Peak resident memory of ``run()`` above the memory before it, on its second call.

    The first call warms up (lazy initialisation, allocator pools) and may raise one of
    ``errors`` (a method that is not available), which is reported instead. The high-water
    mark is reset right before the measured call and read while its result is still alive.
    """
    import gc

    try:
        result = run()
    except errors as error:
        return {"problem": problem, "method": method, "error": str(error)[:120]}
    del result
    gc.collect()
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    result = run()
    peak = status_kib("VmHWM")
    del result
    return {"problem": problem, "method": method, "peak_extra_bytes": (peak - before) * 1024}


def child(problem: str, method: str) -> dict:
    """Build one method on one problem and measure one 16-column product (in this process)."""
    if method.removesuffix(" | floor") in BUILD_METHODS:
        return build_child(problem, method)
    import torch
    from bench_products import LOSSES, OPERATORS, PROBLEMS, make_floors

    from curvlinops import KFACLinearOperator

    torch.set_num_threads(1)
    model, X, y = PROBLEMS[problem]()
    loss_func = LOSSES[problem]()
    params = list(model.parameters())
    torch.manual_seed(1)
    D = sum(p.numel() for p in params)
    # columns first (a [K, D] tensor seen as [D, K]), the floors' layout, which products take
    # without a copy and answer in kind
    V = torch.randn(K, D).T
    if method in OPERATORS:
        op = OPERATORS[method](model, loss_func, params, [(X, y)], check_deterministic=False)
        run = lambda: op @ V  # noqa: E731
    elif method == "kfac":
        from bench_kfac import kfac_params

        kfac_p = kfac_params(model)
        op = KFACLinearOperator(model, loss_func, kfac_p, [(X, y)], check_deterministic=False)
        V = torch.randn(K, sum(p.numel() for p in kfac_p)).T
        run = lambda: op @ V  # noqa: E731
    else:
        kind, name = method.split(" | ")
        fn = make_floors(model, loss_func, X, y)[kind][name]
        blocks = V.split([p.numel() for p in params])
        V_list = [b.T.reshape(K, *p.shape).contiguous() for b, p in zip(blocks, params)]
        run = lambda: fn(V_list)  # noqa: E731
    # torch.func gaps of the floors are reported as not available
    return peak_of_second_call(problem, method, run, (RuntimeError, NotImplementedError))


# ----------------------------------------------------------------------------- builds
# Peak memory of building KFAC, EKFAC and the KFAC inverse, against plain-PyTorch floors.
BUILD_PROBLEMS = ("mlp", "cnn", "transformer")
BUILD_METHODS = ("kfac build", "ekfac build", "inverse build (cholesky)", "inverse build (exact)")
BUILD_TARGET = 1.2
#: Damping of the inverse builds.
DAMPING = 1e-2
#: Entries of one chunk of the floor's per-example temporaries in the EKFAC correction.
FLOOR_CHUNK_ENTRIES = 2**24
#: Floors below this many bytes are under the resolution of the resident-set measurement
#: (pages, small blocks on the heap): no ratio (e.g. the transformer's 32- and 64-dimensional
#: factors in the inverse builds).
MIN_FLOOR_BYTES = 2**18


def _floor_layers(model, kfac_p: list) -> dict:
    """``{name: module}`` of the modules owning the KFAC parameters (Linear/Conv2d)."""
    ids = {id(p) for p in kfac_p}
    return {
        name: m
        for name, m in model.named_modules()
        if any(id(p) in ids for p in m.parameters(recurse=False))
    }


def _floor_pass(model, X, y, layers: dict, generator):
    """One forward and one backward: the layers' inputs and output gradients (rows).

    Forward pre-hooks keep each layer's (detached) input; one ``autograd.grad`` call from the
    output rows to the layers' outputs (gradient edges, so the outputs themselves are not
    kept) backpropagates one Monte-Carlo gradient per output row (``mc_samples=1``).

    Returns:
        ``(inputs, grads)``: ``{name: input}`` and ``{name: output gradient}``.
    """
    import torch
    from torch.autograd.graph import get_gradient_edge

    inputs, edges = {}, {}

    def pre(name):
        def hook(module, args):
            inputs[name] = args[0].detach()

        return hook

    def post(name):
        def hook(module, args, output):
            edges[name] = get_gradient_edge(output)

        return hook

    handles = [m.register_forward_pre_hook(pre(n)) for n, m in layers.items()]
    handles += [m.register_forward_hook(post(n)) for n, m in layers.items()]
    output = model(X)
    for handle in handles:
        handle.remove()
    f = output.transpose(1, 2).flatten(0, 1) if output.ndim == 3 else output  # rows [R, C]
    with torch.no_grad():
        probs = f.softmax(-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        probs[torch.arange(f.shape[0]), labels] -= 1.0  # gradient of CE at the sampled labels
        vectors = probs.div_(f.shape[0])
    names = list(edges)
    grads = torch.autograd.grad(f, [edges[n] for n in names], vectors)
    del output, f, vectors
    return inputs, dict(zip(names, grads))


def _floor_rows(module, x):
    """A layer input as rows ``[B, S, d]`` (convolutions: patches by ``F.unfold``)."""
    import torch

    if isinstance(module, torch.nn.Conv2d):
        U = torch.nn.functional.unfold(
            x, module.kernel_size, module.dilation, module.padding, module.stride
        )
        return U.transpose(1, 2)  # a view
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _floor_grad_rows(module, g):
    """An output gradient as rows ``[B, S, d_out]`` (a view for convolutions)."""
    import torch

    if isinstance(module, torch.nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def floor_kfac(model, X, y, layers: dict, generator) -> tuple:
    """Plain KFAC factors: ``A += a^T a``, ``G += g^T g`` in place, per example (views)."""
    inputs, grads = _floor_pass(model, X, y, layers, generator)
    A, G = {}, {}
    for name, module in layers.items():
        a = _floor_rows(module, inputs.pop(name))
        A[name] = a.new_zeros(a.shape[-1], a.shape[-1])
        for a_n in a:  # [S, d]: no copy of all rows
            A[name].addmm_(a_n.T, a_n, alpha=1.0 / (X.shape[0] * a.shape[1]))
        del a
        g = _floor_grad_rows(module, grads.pop(name))
        G[name] = g.new_zeros(g.shape[-1], g.shape[-1])
        for g_n in g:
            G[name].addmm_(g_n.T, g_n)
        del g
    return A, G


def floor_ekfac(model, X, y, layers: dict, generator) -> tuple:
    """Plain EKFAC: KFAC's factors, ``eigh`` of each, then one correction pass.

    The correction rotates the rows of a chunk of examples into the eigenbases and sums the
    squared per-example gradients (for one row per example, ``(g^2)^T (a^2)`` without them).
    """
    import torch

    A, G = floor_kfac(model, X, y, layers, generator)
    Q_A, Q_G = {}, {}
    for name in layers:
        Q_A[name] = torch.linalg.eigh(A.pop(name))[1]
        Q_G[name] = torch.linalg.eigh(G.pop(name))[1]
    inputs, grads = _floor_pass(model, X, y, layers, generator)
    corrected = {}
    for name, module in layers.items():
        a = _floor_rows(module, inputs.pop(name))
        g = _floor_grad_rows(module, grads.pop(name))
        N, S, D2 = a.shape
        D1 = g.shape[-1]
        out = g.new_zeros(D1, D2)
        per_example = D1 * D2 + S * (D1 + D2)
        step = max(1, min(N, FLOOR_CHUNK_ENTRIES // per_example))
        for start in range(0, N, step):
            g_c = g[start : start + step] @ Q_G[name]
            a_c = a[start : start + step] @ Q_A[name]
            if S == 1:
                out += (g_c[:, 0] ** 2).T @ (a_c[:, 0] ** 2)
            else:
                gradients = torch.einsum("nsi,nsj->nij", g_c, a_c)
                out += gradients.square_().sum(0)
            del g_c, a_c
        corrected[name] = out
        del a, g
    return Q_A, Q_G, corrected


def _floor_inverse_product(layers: dict, A: dict, G: dict, v: list, exact: bool) -> tuple:
    """Plain damped KFAC inverse (Cholesky of each damped factor, or ``eigh``) and one product."""
    import torch

    def cholesky_inverse(F):
        damped = F.clone()
        damped.diagonal().add_(DAMPING)
        L = torch.linalg.cholesky(damped)
        del damped
        return torch.cholesky_inverse(L)

    parts, out = {}, []
    for name in layers:
        if exact:
            parts[name] = (torch.linalg.eigh(A[name]), torch.linalg.eigh(G[name]))
        else:
            parts[name] = (cholesky_inverse(A[name]), cholesky_inverse(G[name]))
    for name, (vw, vb) in zip(layers, v):
        W = vw.reshape(vw.shape[0], -1)
        if exact:
            (lam_A, Q_A), (lam_G, Q_G) = parts[name]
            rotated = Q_G.T @ W @ Q_A / (torch.outer(lam_G, lam_A) + DAMPING)
            out.append(Q_G @ rotated @ Q_A.T)
            out.append(Q_G @ ((Q_G.T @ vb) / (lam_G + DAMPING)))
        else:
            A_inv, G_inv = parts[name]
            out.append(G_inv @ W @ A_inv)
            out.append(G_inv @ vb)
    return parts, out


def build_child(problem: str, method: str) -> dict:
    """Measure one build (``method``, or its floor with the suffix ``" | floor"``) here."""
    import torch
    from bench_kfac import kfac_params
    from bench_products import LOSSES, PROBLEMS

    from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator

    torch.set_num_threads(1)
    model, X, y = PROBLEMS[problem]()
    loss_func = LOSSES[problem]()
    kfac_p = kfac_params(model)
    layers = _floor_layers(model, kfac_p)
    build, floor = method.removesuffix(" | floor"), method.endswith(" | floor")
    inverse = build.startswith("inverse")
    exact = build == "inverse build (exact)"
    if inverse:  # the factors exist before the measurement
        kfac = KFACLinearOperator(model, loss_func, kfac_p, [(X, y)], check_deterministic=False)
        kfac.compute_kronecker_factors()
        A, G = dict(kfac._input_covariances), dict(kfac._gradient_covariances)
        torch.manual_seed(1)
        v = torch.randn(sum(p.numel() for p in kfac_p))
        v_layers = [
            (m.weight.new_empty(m.weight.shape).normal_(), m.bias.new_empty(m.bias.shape).normal_())
            for m in layers.values()
        ]

    def run():
        generator = torch.Generator().manual_seed(2147483647)
        if floor and build == "kfac build":
            return floor_kfac(model, X, y, layers, generator)
        if floor and build == "ekfac build":
            return floor_ekfac(model, X, y, layers, generator)
        if floor:
            return _floor_inverse_product(layers, A, G, v_layers, exact)
        if build == "kfac build":
            op = KFACLinearOperator(model, loss_func, kfac_p, [(X, y)], check_deterministic=False)
            op.compute_kronecker_factors()
            return op
        if build == "ekfac build":
            op = EKFACLinearOperator(model, loss_func, kfac_p, [(X, y)], check_deterministic=False)
            op.compute_kronecker_factors()
            op._maybe_compute_ekfac()
            return op
        op = KFACInverseLinearOperator(kfac, damping=DAMPING, use_exact_damping=exact)
        return op, op @ v

    # e.g. EKFAC takes 2-d outputs only
    return peak_of_second_call(
        problem, method, run, (RuntimeError, NotImplementedError, ValueError)
    )


def build_rows(problems, methods) -> list:
    """Measure every build and its floor per problem (fresh processes); print the table."""
    rows = []
    print(f"\npeak extra memory of one build, each in a fresh process (target {BUILD_TARGET})")
    print(f"{'problem':12s} {'build':34s} {'MiB':>8s} {'floor':>8s} {'/ floor':>8s}  met")
    for problem in problems:
        for method in methods:
            ours = measure(problem, method)
            floor = measure(problem, f"{method} | floor")
            mine, base = ours.get("peak_extra_bytes"), floor.get("peak_extra_bytes")
            too_small = base is not None and base < MIN_FLOOR_BYTES
            ratio = None if mine is None or base is None or too_small else mine / base
            row = {
                **ours,
                "kind": "build",
                "peak_mib": None if mine is None else mine / 2**20,
                "floor_mib": None if base is None else base / 2**20,
                "value": ratio,
                "target": BUILD_TARGET if ratio is not None else None,
                "met": None if ratio is None else ratio <= BUILD_TARGET,
            }
            rows.append(row)
            if ratio is None:
                reason = ours.get("error") or floor.get("error")
                if too_small and mine is not None:
                    reason = f"floor below {MIN_FLOOR_BYTES / 2**20:.2f} MiB: not resolved"
                    print(
                        f"{problem:12s} {method:34s} {mine / 2**20:8.2f} {base / 2**20:8.2f} "
                        f"{'':8s}  ({reason})"
                    )
                    continue
                print(f"{problem:12s} {method:34s} {'n/a':>8s}  ({reason})")
                continue
            print(
                f"{problem:12s} {method:34s} {row['peak_mib']:8.1f} {row['floor_mib']:8.1f} "
                f"{ratio:8.2f}  {'yes' if row['met'] else 'NO'}"
            )
    return rows


def measure(problem: str, method: str) -> dict:
    """Run ``child`` in a fresh interpreter and parse its JSON line."""
    # A fixed mmap threshold makes glibc return every large freed block to the OS at once, so
    # the resident set follows the live tensors instead of the allocator's reuse decisions.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    output = subprocess.run(
        [sys.executable, __file__, "--child", problem, method],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the MLP's GGN and KFAC build only (about 15 s)"
    )
    parser.add_argument("--child", nargs=2, metavar=("PROBLEM", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    problems = ("mlp",) if args.quick else ("mlp", "cnn", "transformer", "regression")
    start = time.perf_counter()
    rows = []
    print(f"peak extra memory of one product with {K} columns, each in a fresh process")
    print(f"{'problem':12s} {'method':42s} {'MiB':>8s} {'/ floor':>8s} {'target':>7s}  met")
    for problem in problems:
        measured = {}
        methods = list(OPERATOR_METHODS) + [
            f"{kind} | {name}" for kind, names in FLOOR_METHODS.items() for name in names
        ]
        if args.quick:  # the GGN and its floors only
            methods = ["ggn"] + [f"ggn | {name}" for name in FLOOR_METHODS["ggn"]]
        for method in methods:
            measured[method] = measure(problem, method)
        floors = {}
        for kind, names in FLOOR_METHODS.items():
            values = [
                measured[f"{kind} | {n}"].get("peak_extra_bytes")
                for n in names
                if f"{kind} | {n}" in measured
            ]
            values = [v for v in values if v is not None]
            floors[kind] = min(values) if values else None
        for method, entry in measured.items():
            mib = entry.get("peak_extra_bytes")
            floor = floors.get(FLOOR_OF.get(method))
            ratio = None if mib is None or floor is None else mib / floor
            row = {
                **entry,
                "peak_mib": None if mib is None else mib / 2**20,
                "value": ratio,
                "target": TARGET if ratio is not None else None,
                "met": None if ratio is None else ratio <= TARGET,
            }
            rows.append(row)
            cells = (
                f"{row['peak_mib']:8.1f}" if mib is not None else f"{'n/a':>8s}",
                f"{ratio:8.2f}" if ratio is not None else f"{'':8s}",
                f"{TARGET:7.2f}" if ratio is not None else f"{'':7s}",
                {True: "yes", False: "NO", None: ""}[row["met"]],
            )
            print(f"{problem:12s} {method:42s} {cells[0]} {cells[1]} {cells[2]}  {cells[3]}")
    if args.quick:  # the MLP's KFAC build only
        rows += build_rows(("mlp",), ("kfac build",))
    else:
        rows += build_rows(BUILD_PROBLEMS, BUILD_METHODS)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"K": K, "rows": rows}, indent=1))
    print(f"\nwritten to {RESULTS} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
