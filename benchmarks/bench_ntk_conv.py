"""eNTK on convolutional backbones (issue 15): small CNN and ResNet18.

    PYTHONPATH=$PWD python -m benchmarks.bench_ntk_conv                 # all cases
    PYTHONPATH=$PWD python -m benchmarks.bench_ntk_conv --cases cnn:trace

Each case runs in its own child process (``--case``), so peak RSS
(``ru_maxrss``) is that case's alone; it is reported against the case's
``memory_budget``. Small CNN: Conv32 → Conv64/s2 → Conv64/s2 (3×3, ReLU),
global average pool, Dense128; 50 inputs 32×32×3; full (50, 50, 128, 128)
blocks and traces. ResNet18: ``hpft_jax.models.ResNet18`` at full width,
CIFAR stem, eval-mode BatchNorm, backbone params only (h = 512), 32×32
inputs; traces under a 7 GB budget (headroom under the 8 GB target) for
``--resnet-probes`` probes, and the plan (FLOPs, schedule) for 50 probes
with one drift probe under 8 GB.
MACs are the cost model's (:mod:`theory.ntk_cost`); FLOPs = 2 × MACs.
``resnet18:chunk`` times one output chunk of the trace schedule (factors,
contraction) with its RSS growth against XLA's buffers, and projects the
whole run (chunks × per chunk). ``--conv`` picks the convolutions of the
backward passes (auto: GEMM gradients for stride-1 convs on CPU,
:func:`hpft_jax.convs.for_ntk`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

from benchmarks._timing import timed

GB = 10**9
CASES = ["dot", "cnn:full", "cnn:trace", "cnn:trace@3.6", "cnn:full@5.8",
         "resnet18:trace@7", "resnet18:plan"]
# not in the default list (hours on a 2-core CPU at 50 probes): one drift
# probe, k_norm and k_gap between two parameter sets, e.g.
#   --case resnet18:drift@8 --resnet-probes 50 --reps 0


def _cnn():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    class SmallCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(32, (3, 3))(x))
            x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
            x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
            return nn.Dense(128)(jnp.mean(x, axis=(1, 2)))

    m = SmallCNN()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((50, 32, 32, 3)), jnp.float32)
    params = jax.jit(m.init)(jax.random.key(0), x)["params"]
    return (lambda p, x: m.apply({"params": p}, x)), params, x


def _resnet(n):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hpft_jax.models import ResNet18

    m = ResNet18()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, 32, 32, 3)), jnp.float32)
    v = jax.jit(lambda k, x: m.init(k, x, train=False))(jax.random.key(0), x)
    bs = v["batch_stats"]
    return (lambda p, x: m.apply({"params": p, "batch_stats": bs}, x, train=False)), \
        v["params"], x


def child(case: str, reps: int, outdir: str, resnet_probes: int, conv_impl: str = "auto") -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from hpft_jax import convs
    from theory import ntk

    conv = convs.for_ntk(conv_impl)   # GEMM-gradient backward passes on CPU (auto)
    empirical_ntk_fn = functools.partial(ntk.empirical_ntk_fn, conv=conv)
    make_drift_fn = functools.partial(ntk.make_drift_fn, conv=conv)
    res: dict = {"case": case, "load_start": os.getloadavg(), "conv": convs.resolve(conv_impl)}
    name, _, budget = case.partition("@")
    budget = int(float(budget) * GB) if budget else None
    res["memory_budget"] = budget
    if name == "dot":
        a = jnp.ones((2048, 2048), jnp.float32)
        dot = jax.jit(jnp.dot)
        _, t = timed(lambda: dot(a, a), 10)
        res.update(t, gflops_per_s=2 * 2048**3 / t["median_s"] / 1e9)
    elif name.startswith("nt-cnn:"):       # neural-tangents, side venv (--vs-nt)
        from benchmarks import _ntside
        _, params, x = _cnn()
        res.update(_ntside.child_case(
            "cnn", params, x, trace=name.endswith("trace"), reps=reps,
            out_npy=os.path.join(outdir, case.replace(":", "_") + ".npy")))
        res["load_end"] = os.getloadavg()   # peak RSS is the side process's
        return res
    elif name.startswith("cnn:"):
        f, params, x = _cnn()
        trace = name.endswith("trace")
        ntk = empirical_ntk_fn(f, trace=trace, method="structured", memory_budget=budget)
        res["plan"] = ntk.explain(params, x)
        res["macs"] = ntk.plan(params, x)["totals"]["structured_macs"]
        out, t = timed(lambda: ntk(params, x), reps)
        res.update(t)
        np.save(os.path.join(outdir, case.replace(":", "_") + ".npy"), np.asarray(out))
    elif name == "resnet18:trace":
        f, params, x = _resnet(resnet_probes)
        ntk = empirical_ntk_fn(f, trace=True, method="structured", memory_budget=budget)
        res["plan"] = ntk.explain(params, x)
        res["macs"] = ntk.plan(params, x)["totals"]["structured_macs"]
        res["probes"] = resnet_probes
        mem = ntk.lower(params, x).compile().memory_analysis()
        res["xla_gb"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / GB
        out, t = timed(lambda: ntk(params, x), 0)
        res.update(t)
        np.save(os.path.join(outdir, case.replace(":", "_") + ".npy"), np.asarray(out))
    elif name == "resnet18:chunk":     # one output chunk of the trace schedule, in parts
        res.update(_chunk(budget or 8 * GB, resnet_probes, conv, reps))
    elif name == "resnet18:drift":      # one drift probe between two parameter sets
        f, params, x = _resnet(resnet_probes)
        q = jax.tree.map(lambda a: a * 1.001, params)
        d = make_drift_fn(f, x, memory_budget=budget)
        res["plan"] = d.explain(params)
        p = d.plan(params)
        tot, sch = p["totals"], p["schedule"]
        res["schedule"], res["probes"] = sch, resnet_probes
        # both parameter sets: the factor passes, then full h x h blocks
        res["macs"] = 2 * (sch["passes"] * tot["factor_macs"] + tot["contract_macs"])
        mem = d._both.lower(params, q).compile().memory_analysis()
        res["xla_gb"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / GB
        out, t = timed(lambda: d(params, q), 0)
        res.update(t, **{k: float(v) for k, v in out.items()})
    elif name == "resnet18:plan":       # 50 probes: plans only, nothing run
        f, params, x = _resnet(50)
        tr = empirical_ntk_fn(f, trace=True, method="structured", memory_budget=8 * GB)
        d = make_drift_fn(f, x, memory_budget=8 * GB)
        res["trace_plan"] = tr.explain(params, x)
        res["drift_plan"] = d.explain(params)
        res["trace_macs"] = tr.plan(params, x)["totals"]["structured_macs"]
        dp = d.plan(params)
        res["drift_schedule"] = dp["schedule"]
        res["drift_macs_per_pass"] = dp["totals"]
    res["load_end"] = os.getloadavg()
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return res


def _chunk(budget, n, conv, reps):
    """ResNet18 traces: one output chunk (the schedule's k under ``budget``):
    its factors (forward, backward passes, patches, per-sample Jacobians) and
    its contraction, each timed and with its RSS growth against XLA's buffers."""
    import threading
    import time

    import jax
    import jax.numpy as jnp

    from theory import ntk_budget, ntk_contract
    from theory.ntk import _plan, empirical_ntk_fn

    f, params, x = _resnet(n)
    sched = empirical_ntk_fn(f, trace=True, memory_budget=budget, conv=conv).plan(
        params, x)["schedule"]
    k, sc, tile = sched["k"], sched["sample_chunk"], sched["tile"]
    plan = _plan(f, params, x, trace=True, conv=conv)
    rows = jnp.eye(plan.h, dtype=jnp.float32)[:k]
    hi = jax.default_matmul_precision("highest")

    def facs(p, x):
        with hi:
            return ntk_budget._facs(plan, f, p, x, rows, sc)

    def contract(fac):
        with hi:
            return ntk_contract.kernel(fac, None, trace=True,
                                       chunk_size=None if tile >= n else tile)

    peak = [0.0]

    def rss():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS"))

    def sample(stop):
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.05)

    out = {"k": k, "chunks": sched["hp"] // k, "sample_chunk": sc, "tile": tile}
    fac = None
    for part, fn, args in (("factors", facs, (params, x)), ("contraction", contract, None)):
        c = jax.jit(fn).lower(*(args or (fac,))).compile()
        m = c.memory_analysis()
        base, stop = rss(), threading.Event()
        peak[0] = base
        th = threading.Thread(target=sample, args=(stop,), daemon=True)
        th.start()
        r, t = timed(lambda: c(*(args or (fac,))), reps)
        stop.set()
        th.join()
        xla = m.temp_size_in_bytes + m.output_size_in_bytes
        out[part] = {**t, "xla_gb": xla / GB, "rss_growth_gb": (peak[0] - base) / GB,
                     "outside_xla_gb": (peak[0] - base - xla) / GB}
        fac = r if part == "factors" else fac
    out["per_chunk_s"] = out["factors"]["median_s"] + out["contraction"]["median_s"]
    out["projected_s"] = out["per_chunk_s"] * out["chunks"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case")
    ap.add_argument("--cases", nargs="*", default=CASES)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--resnet-probes", type=int, default=10)
    ap.add_argument("--outdir", default=None)
    ap.add_argument("--conv", default="auto", choices=("auto", "lax", "patches"),
                    help="convolutions of the eNTK's backward passes (hpft_jax.convs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--vs-nt", action="store_true",
                    help="also run neural-tangents 0.6.5 on the small CNN in a side venv "
                         "(benchmarks/_ntside.py)")
    a = ap.parse_args(argv)
    if a.case:
        print(json.dumps(child(a.case, a.reps, a.outdir, a.resnet_probes, a.conv)))
        return
    outdir = a.outdir or tempfile.mkdtemp(prefix="bench_ntk_conv_")
    os.makedirs(outdir, exist_ok=True)
    results = []
    for case in list(a.cases) + (["nt-cnn:full", "nt-cnn:trace"] if a.vs_nt else []):
        cmd = [sys.executable, "-m", "benchmarks.bench_ntk_conv", "--case", case,
               "--reps", str(a.reps), "--outdir", outdir,
               "--resnet-probes", str(a.resnet_probes), "--conv", a.conv]
        p = subprocess.run(cmd, capture_output=True, text=True)
        r = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0
             else {"case": case, "error": p.stderr[-3000:]})
        print(json.dumps({k: v for k, v in r.items() if k not in ("runs_s",)}), flush=True)
        results.append(r)
    _consistency(outdir)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


def _consistency(outdir):
    """Traces and budgeted runs against the unbudgeted full kernel."""
    import numpy as np
    p = lambda c: os.path.join(outdir, c.replace(":", "_") + ".npy")  # noqa: E731
    if not os.path.exists(p("cnn:full")):
        return
    full = np.load(p("cnn:full")).astype(np.float64)
    tr = np.trace(full, axis1=2, axis2=3)
    for c, ref in (("cnn:trace", tr), ("cnn:trace@3.6", tr), ("cnn:full@5.8", full),
                   ("nt-cnn:full", full), ("nt-cnn:trace", tr)):
        if os.path.exists(p(c)):
            k = np.load(p(c)).astype(np.float64)
            print(f"{c} vs cnn:full: max rel err "
                  f"{np.abs(k - ref).max() / np.abs(ref).max():.1e}")


if __name__ == "__main__":
    main()
