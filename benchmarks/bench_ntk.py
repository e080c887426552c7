"""eNTK benchmark: the toy backbone (784 -> 4 x Dense(128) + ReLU), 50 probes.

    PYTHONPATH=$PWD python -m benchmarks.bench_ntk            # everything
    PYTHONPATH=$PWD python -m benchmarks.bench_ntk --skip-naive-full

The driver runs every case in its own child process
(``--case METHOD:MODE``), so each peak-memory figure (``ru_maxrss`` at the
child's end) is that method's alone, and compares the kernels the children
save. Per case: compile time (first call minus the median call), median of
``--reps`` calls after compilation, peak RSS, FLOPs, and the max error
relative to max|κ| against a float64 run of the structured method and
against naive float32 ``jax.jacrev`` + einsum.

FLOPs come from XLA's ``cost_analysis`` of programs without loops (XLA
counts a loop body once): the naive and NTK-vector-product programs are
lowered with every sample in one batch; the structured count is its factor
stage plus (number of tile pairs) x (one tile pair).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks._timing import flops as _flops, timed as _timed

N_PROBES = 50
CASES = ["dot", "ftstep", "structured:full", "structured:trace", "vjp_jvp:full",
         "vjp_jvp:trace", "jacobian:trace", "drift", "structured64:full",
         "jacobian:full"]


# --------------------------------------------------------------------------
# Child side


def _setup():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hpft_jax.models import MLPBackbone

    model = MLPBackbone()                       # the paper's toy backbone (B.1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N_PROBES, 28, 28)), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    return model, params, x




def _structured_flops(f, params, x, trace):
    """Factor stage + (#tile pairs) x (one tile pair), from XLA's counts."""
    import jax
    import numpy as np

    from theory import ntk_contract, ntk_factors
    from theory.ntk import auto_tile

    plan = ntk_factors.discover(f, params, x[0], n_samples=x.shape[0])
    fac = jax.jit(lambda p, x: ntk_factors.batch_factors(
        plan, f, p, x, chunk_size=None, out_chunk_size=None))
    total = _flops(fac.lower(params, x))
    facs = jax.eval_shape(fac, params, x)
    n = x.shape[0]
    t = n if trace else auto_tile(n)
    nb = -(-n // t)
    pairs = 1 if t == n else nb * (nb + 1) // 2
    tile = jax.tree.map(lambda s: jax.ShapeDtypeStruct((t,) + s.shape[1:], s.dtype), facs)
    blk = jax.jit(lambda a, b: ntk_contract.pair_block(a, b, trace=trace))
    total += pairs * _flops(blk.lower(tile, tile))
    return total, {"tile": t, "tile_pairs": pairs,
                   "layers": [(l.path, l.form) for l in plan.layers],
                   "fallback_leaves": len(plan.fallback)}


def child(case: str, reps: int, outdir: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    res: dict = {"case": case, "load_start": os.getloadavg()}
    if case == "dot":
        a = jnp.ones((2048, 2048), jnp.float32)
        dot = jax.jit(jnp.dot)
        _, t = _timed(lambda: dot(a, a), max(reps, 10))
        res.update(t, flops=2 * 2048**3, gflops_per_s=2 * 2048**3 / t["median_s"] / 1e9)
    elif case == "ftstep":
        res.update(_ft_step(reps))
    elif case == "drift":
        res.update(_drift(reps))
    elif case.startswith("nt:"):           # neural-tangents, side venv (--vs-nt)
        from benchmarks import _ntside
        _, params, x = _setup()
        res.update(_ntside.child_case(
            "mlp", params, x, trace=case == "nt:trace", reps=reps,
            out_npy=os.path.join(outdir, f"{case.replace(':', '_')}.npy")))
        res["load_end"] = os.getloadavg()   # peak RSS is the side process's
        return res
    else:
        method, mode = case.split(":")
        x64 = method.endswith("64")
        method = method.removesuffix("64")
        trace = mode == "trace"
        from theory.ntk import empirical_ntk_fn
        ctx = jax.enable_x64(True) if x64 else _null()
        with ctx:
            model, params, x = _setup()
            if x64:
                params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
                x = x.astype(jnp.float64)
                model = model.clone(dtype=jnp.float64)
            f = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
            ntk = empirical_ntk_fn(f, method=method, trace=trace)
            out, t = _timed(lambda: ntk(params, x), reps)
            res.update(t)
            if not x64:
                if method == "structured":
                    res["flops"], res["plan"] = _structured_flops(f, params, x, trace)
                else:
                    kw = {"chunk_size": N_PROBES} if method == "vjp_jvp" else {}
                    core = empirical_ntk_fn(f, method=method, trace=trace, **kw)
                    res["flops"] = _flops(core.lower(params, x))
            np.save(os.path.join(outdir, f"{case.replace(':', '_')}.npy"),
                    np.asarray(out))
    res["load_end"] = os.getloadavg()
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return res


def _null():
    import contextlib
    return contextlib.nullcontext()


def _drift(reps):
    """One drift probe (Fig. 6) between two parameter sets: factors + tiles."""
    import jax
    import numpy as np

    from theory.ntk import make_drift_fn

    model, params, x = _setup()
    f = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    rng = np.random.default_rng(1)
    p2 = jax.tree.map(lambda a: a + 1e-3 * rng.standard_normal(a.shape).astype(a.dtype),
                      params)
    d = make_drift_fn(f, x)
    out, t = _timed(lambda: d(params, p2), reps)
    fac, tf = _timed(lambda: d.factors(params), reps)
    fac2 = d.factors(p2)
    _, tc = _timed(lambda: d.from_factors(fac, fac2), reps)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(fac))
    return {**t, "factors_median_s": tf["median_s"], "from_factors_median_s": tc["median_s"],
            "factor_mb": nbytes / 1e6, "values": {k: float(v) for k, v in out.items()}}


def _ft_step(reps):
    """A toy FT step (MLP + linear head, SGD, batch 128), for scale."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from hpft_jax.models import Classifier, LinearHead, MLPBackbone

    model = Classifier(MLPBackbone(), LinearHead(3))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, 28, 28)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 128))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    opt = optax.sgd(1e-4)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits, _ = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        g = jax.grad(loss)(params)
        upd, state = opt.update(g, state)
        return optax.apply_updates(params, upd), state

    _, t = _timed(lambda: step(params, state), max(reps, 50))
    return t


# --------------------------------------------------------------------------
# Driver


def run_child(case, reps, outdir):
    cmd = [sys.executable, "-m", "benchmarks.bench_ntk", "--case", case,
           "--reps", str(reps), "--outdir", outdir]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"case": case, "error": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _errors(outdir, results):
    import numpy as np
    path = lambda c: os.path.join(outdir, f"{c.replace(':', '_')}.npy")  # noqa: E731
    ref_full = np.load(path("structured64:full")) if os.path.exists(
        path("structured64:full")) else None
    naive_full = np.load(path("jacobian:full")) if os.path.exists(
        path("jacobian:full")) else None
    for r in results:
        c = r["case"]
        if ":" not in c or not os.path.exists(path(c)) or c.startswith("structured64"):
            continue
        k = np.load(path(c)).astype(np.float64)
        for name, ref in (("err_vs_f64", ref_full), ("err_vs_naive", naive_full)):
            if ref is None:
                continue
            ref = ref.astype(np.float64)
            if c.endswith(":trace"):
                ref = np.trace(ref, axis1=2, axis2=3)
            r[name] = float(np.abs(k - ref).max() / np.abs(ref).max())


def table(results) -> str:
    by = {r["case"]: r for r in results}
    dot = by.get("dot", {}).get("gflops_per_s", float("nan"))
    lines = ["| method | mode | median (s) | compile (s) | peak RSS (GB) | GFLOP "
             "| floor at jnp.dot rate (s) | max err vs f64 | max err vs naive | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if ":" not in r["case"] or "error" in r:
            continue
        m, mode = r["case"].split(":")
        gf = r.get("flops", float("nan")) / 1e9
        lines.append(
            f"| {m} | {mode} | {r['median_s']:.3g} | {r['compile_s']:.2g} | "
            f"{r['peak_rss_gb']:.2f} | {gf:.4g} | {gf / dot:.3g} | "
            f"{r.get('err_vs_f64', float('nan')):.1e} | "
            f"{r.get('err_vs_naive', float('nan')):.1e} | "
            f"{r['load_start'][0]:.1f}–{r['load_end'][0]:.1f} |")
    return "\n".join(lines)


def vs_nt(results) -> str:
    """Structured vs neural-tangents lines: time, memory, kernel difference."""
    by = {r["case"]: r for r in results}
    lines = []
    for mode in ("full", "trace"):
        s, n = by.get(f"structured:{mode}"), by.get(f"nt:{mode}")
        if not s or not n or "error" in s or "error" in n:
            continue
        lines.append(
            f"structured vs neural-tangents, {mode}: {n['median_s'] / s['median_s']:.2f}x time "
            f"({s['median_s']:.3g} s vs {n['median_s']:.3g} s), peak RSS "
            f"{s['peak_rss_gb']:.2f} vs {n['peak_rss_gb']:.2f} GB, n-t max err vs f64 "
            f"{n.get('err_vs_f64', float('nan')):.1e}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", help="run one case in this process (child mode)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--naive-reps", type=int, default=5,
                    help="reps for the naive full kernel (minutes each)")
    ap.add_argument("--outdir", default=None)
    ap.add_argument("--skip-naive-full", action="store_true")
    ap.add_argument("--json", default=None, help="also write all results here")
    ap.add_argument("--vs-nt", action="store_true",
                    help="also run neural-tangents 0.6.5 in a side venv (benchmarks/_ntside.py; "
                         "builds it on first use from the package index)")
    ap.add_argument("--cases", nargs="*", default=None, help=f"subset of {CASES}")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(child(args.case, args.reps, args.outdir)))
        return
    outdir = args.outdir or tempfile.mkdtemp(prefix="bench_ntk_")
    os.makedirs(outdir, exist_ok=True)
    results = []
    cases = list(args.cases or CASES) + (["nt:full", "nt:trace"] if args.vs_nt else [])
    for case in cases:
        if case == "jacobian:full" and args.skip_naive_full:
            continue
        reps = args.naive_reps if case == "jacobian:full" else args.reps
        r = run_child(case, reps, outdir)
        print(json.dumps({k: v for k, v in r.items() if k != "runs_s"}), flush=True)
        results.append(r)
    _errors(outdir, results)
    by = {r["case"]: r for r in results}
    print()
    print(table(results))
    if "jacobian:full" in by and "structured:full" in by and "error" not in by[
            "jacobian:full"]:
        for mode in ("full", "trace"):
            s, n = by.get(f"structured:{mode}"), by.get(f"jacobian:{mode}")
            if s and n:
                print(f"naive / structured, {mode}: {n['median_s'] / s['median_s']:.0f}x "
                      f"time, {n['flops'] / s['flops']:.0f}x FLOPs")
    if args.vs_nt:
        print(vs_nt(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
