"""Training benchmarks (issue 3): FT steps vs PyTorch, cached-feature HP, the sweep.

    PYTHONPATH=$PWD python -m benchmarks.bench_train                 # everything
    PYTHONPATH=$PWD python -m benchmarks.bench_train --parts dot,ft --models mlp
    PYTHONPATH=$PWD python -m benchmarks.bench_train --parts hp,sweep

The driver runs every case in its own child process (``--case NAME``), one
after another, so each peak-RSS figure (``ru_maxrss`` at the child's end) is
that case's alone, torch's thread setting cannot leak into JAX, and every
ratio compares numbers measured in the same run. Each row records the load
average at its start and end.

Parts:

* ``dot``: the float32 matmul rate, ``jax.jit(jnp.dot)`` on 2048 x 2048.
* ``ft``: one FT train step (SGD + momentum 0.9, cosine schedule as in
  :func:`hpft_jax.steps.ft_optimizer`, cross-entropy, batch 128) of the toy
  MLP (784 -> 4 x Dense(128) + ReLU -> 10) and of ResNet18-CIFAR (32x32x3,
  10 classes). JAX: :func:`steps.make_train_step` inside
  :func:`steps.make_epoch` (one ``lax.scan`` over batches gathered on device;
  how the library trains) and the same step jitted alone. PyTorch: the same
  layer shapes as an ``nn.Module``, a plain ``for`` loop over a fresh
  permutation of tensors held in memory, with 1 and with 2 threads.
  FLOPs per step come from XLA's ``cost_analysis`` of the compiled JAX step.
  ``--resnet-variants ynn`` adds a JAX ResNet18 row with YNNPACK convolutions
  (``--xla_cpu_experimental_ynn_fusion_type=+individual_convolution``).
* ``hp``: head probing on the digits-sized set (323 train samples, 28x28, 3
  classes, batch 128; synthetic values), E epochs in one ``fori_loop`` as
  :func:`hpft_jax.hp.probe` runs them. ``cached``: the library's
  :func:`steps.make_hp_step` on trunk features computed once.
  ``backprop``: the naive step, full forward + backward through the frozen
  backbone every step (the gradient w.r.t. every parameter; only the head's
  is applied; the gradients' global norm is logged, as a naive loop would,
  and carried through the loop, so XLA must compute them all). ``pruned``: the same naive step without
  that log; XLA then drops the unused backbone gradients, leaving the trunk's
  forward pass each step. Also for a narrow ResNet18 (``--hp-resnet-width``).
* ``sweep``: ``hpft sweep`` with every default, end to end, as a subprocess:
  ``cold`` from an empty runs directory (pretraining included), ``warm``
  again with the pretrained cache kept (the run directory removed).

Times are medians over repetitions after a first call; "compile" is the
first call minus the median (for the ResNet rows, which run a single
measured epoch, the AOT compile time instead).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks._timing import flops as _flops, timed as _timed

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
BATCH = 128
NUM_CLASSES = 10
HP_N, HP_CLASSES = 323, 3  # the default digits downstream: 323 train samples, 3 classes

SIZE_FLAGS = ("mlp_steps", "mlp_reps", "resnet_steps", "resnet_warmup", "resnet_width",
              "resnet_image", "resnet_epoch_width", "resnet_epoch_image", "hp_epochs", "hp_naive_epochs", "hp_resnet_epochs",
              "hp_resnet_naive_epochs", "hp_resnet_width", "hp_resnet_image", "hp_reps")


# --------------------------------------------------------------------------
# Child side: shared helpers




def _jax_model(name: str, args):
    from hpft_jax.models import Classifier, LinearHead, MLPBackbone, ResNet18

    if name == "mlp":
        return Classifier(MLPBackbone(), LinearHead(NUM_CLASSES)), (28, 28, 1)
    if name == "resnet18":
        s = args.resnet_image
        return (Classifier(ResNet18(width=args.resnet_width, stem="cifar"),
                           LinearHead(NUM_CLASSES)), (s, s, 3))
    raise ValueError(f"unknown model {name!r}")


def _n_steps(name, args):
    return args.mlp_steps if name == "mlp" else args.resnet_steps


# --------------------------------------------------------------------------
# FT step, JAX


def _ft_jax_measure(model, shape, nb: int, *, step_reps: int, warmup: int,
                    epoch_reps: int | None, budget_s: float) -> dict:
    """One jitted step, then (unless ``epoch_reps`` is None) the library's epoch.

    ``epoch_reps=0``: a single measured epoch after its AOT compile (the
    process is already warm from the single steps). Timed repetitions stop
    early once ``budget_s`` of them have run (at least one runs).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hpft_jax import params as params_lib, steps
    from hpft_jax.config import FTConfig

    n = nb * BATCH
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((n,) + shape), jnp.float32)
    ys = jnp.asarray(rng.integers(0, NUM_CLASSES, n), jnp.int32)
    v = jax.jit(lambda k: model.init(k, xs[:2], train=False))(jax.random.key(0))
    p, bs = v["params"], v.get("batch_stats", {})
    cfg = FTConfig()
    tx = steps.ft_optimizer(cfg, cfg.epochs * nb)
    step = steps.make_train_step(model, tx, num_classes=NUM_CLASSES, eta=cfg.eta)
    key = jax.random.key(1)
    res = {"n_params": params_lib.count(p), "steps_per_epoch": nb, "input": list(shape)}
    fresh = lambda: steps.init_state(*jax.tree.map(  # noqa: E731  (own buffers: donated)
        lambda a: jnp.array(a, copy=True), (p, bs)), tx)

    # One jitted step (reference); FLOPs from the compiled program.
    state = fresh()
    xb, yb = xs[:BATCH], ys[:BATCH]
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, xb, yb, key).compile()
    res["step_aot_compile_s"] = time.perf_counter() - t0
    res["flops_per_step"] = _flops(compiled)
    box = [state]

    def one():
        box[0], m = compiled(box[0], xb, yb, key)
        return m["loss"]

    loss, res["step"] = _timed(one, step_reps, warmup, budget_s)
    res["step_loss"] = float(loss)
    res["step_steps_per_s"] = 1.0 / res["step"]["median_s"]
    if epoch_reps is None:
        return res

    # The library's epoch: lax.scan over nb gathered batches.
    epoch = jax.jit(steps.make_epoch(step, batch_size=BATCH, num_examples=n),
                    donate_argnums=0)
    ebox = [fresh(), 0]
    t0 = time.perf_counter()
    ecomp = epoch.lower(ebox[0], xs, ys, key, 0).compile()
    res["epoch_aot_compile_s"] = time.perf_counter() - t0

    def one_epoch():
        ebox[0], m = ecomp(ebox[0], xs, ys, key, ebox[1])
        ebox[1] += 1
        return m["loss"]

    losses, te = _timed(one_epoch, epoch_reps)
    if not epoch_reps:
        te["compile_s"], te["runs_s"] = 0.0, [te["first_s"]]
    res["epoch"] = te
    res["epoch_loss_last"] = float(np.asarray(losses)[-1])
    res["steps_per_s"] = nb / te["median_s"]
    return res


def ft_jax(name: str, args) -> dict:
    """steps/s of the library's scan epoch and of one jitted step.

    ResNet18 at full width: single jitted steps only (inside the epoch's
    ``lax.scan`` its backward convolutions are an order of magnitude slower
    on XLA:CPU; an epoch would take many minutes). The scan-vs-step ratio is
    measured on a narrow ResNet18 (``--resnet-epoch-width``) instead.
    """
    import jax

    from hpft_jax.models import ResNet18

    model, shape = _jax_model(name, args)
    res = {"backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if name == "mlp":
        res.update(_ft_jax_measure(model, shape, args.mlp_steps, step_reps=args.mlp_reps * 10,
                                   warmup=1, epoch_reps=args.mlp_reps, budget_s=60))
        return res
    res.update(_ft_jax_measure(model, shape, args.resnet_steps, step_reps=args.resnet_steps,
                               warmup=args.resnet_warmup, epoch_reps=None, budget_s=90))
    if args.resnet_epoch_width:
        s = args.resnet_epoch_image
        narrow = type(model)(ResNet18(width=args.resnet_epoch_width), model.head)
        res["narrow"] = _ft_jax_measure(narrow, (s, s, 3), 2, step_reps=3, warmup=1,
                                        epoch_reps=0, budget_s=60)
    return res


# --------------------------------------------------------------------------
# FT step, PyTorch


def _torch_model(name: str, args):
    import torch
    from torch import nn

    if name == "mlp":
        layers = [nn.Flatten()]
        d = 28 * 28
        for _ in range(4):
            layers += [nn.Linear(d, 128), nn.ReLU()]
            d = 128
        layers.append(nn.Linear(128, NUM_CLASSES))
        return nn.Sequential(*layers), (1, 28, 28)

    class Block(nn.Module):
        """hpft_jax.models.BasicBlock: two 3x3 convs, 1x1 projection."""

        def __init__(self, cin, cout, stride):
            super().__init__()
            bn = lambda c: nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)  # noqa: E731
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), bn(cout)
            self.proj = None
            if stride != 1 or cin != cout:
                self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return torch.relu((x if self.proj is None else self.proj(x)) + y)

    w = args.resnet_width
    layers = [nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
    cin = w
    for s in range(4):
        for j in range(2):
            cout = w * 2**s
            layers.append(Block(cin, cout, 2 if (s > 0 and j == 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, NUM_CLASSES)]
    s = args.resnet_image
    return nn.Sequential(*layers), (3, s, s)


def ft_torch(name: str, threads: int, args) -> dict:
    import torch
    import torch.nn.functional as F

    from hpft_jax.config import FTConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, shape = _torch_model(name, args)
    model.train()
    nb = _n_steps(name, args)
    n = nb * BATCH
    g = torch.Generator().manual_seed(0)
    X = torch.randn((n,) + shape, generator=g)
    Y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    cfg = FTConfig()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * nb)
    res = {"n_params": sum(p.numel() for p in model.parameters()), "threads": threads,
           "steps_per_epoch": nb, "torch": torch.__version__}

    def step(idx):
        xb, yb = X[idx], Y[idx]
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        sched.step()
        return loss

    def epoch():
        perm = torch.randperm(n, generator=g)
        for i in range(nb):
            loss = step(perm[i * BATCH:(i + 1) * BATCH])
        return float(loss)

    # single steps (reference), then epochs (MLP only), as on the JAX side
    idx = torch.arange(BATCH)
    reps = args.mlp_reps * 10 if name == "mlp" else args.resnet_steps
    warm = 1 if name == "mlp" else args.resnet_warmup
    for _ in range(warm):
        step(idx)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(idx)
        ts.append(time.perf_counter() - t0)
        if sum(ts) > 90:  # 2 threads under load can take minutes a step
            break
    ts.sort()
    res["step"] = {"median_s": ts[len(ts) // 2], "runs_s": ts}
    res["step_steps_per_s"] = 1.0 / res["step"]["median_s"]
    if name == "mlp":
        epoch()  # warm-up epoch
        te = []
        for _ in range(args.mlp_reps):
            t0 = time.perf_counter()
            res["epoch_loss_last"] = epoch()
            te.append(time.perf_counter() - t0)
        te.sort()
        res["epoch"] = {"median_s": te[len(te) // 2], "runs_s": te}
        res["steps_per_s"] = nb / res["epoch"]["median_s"]
    return res


# --------------------------------------------------------------------------
# HP: cached features vs the naive step through the frozen backbone


def hp_case(kind: str, name: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from hpft_jax import hp, steps
    from hpft_jax.config import HPConfig
    from hpft_jax.losses import cross_entropy, smooth_targets
    from hpft_jax.models import Classifier, LinearHead, MLPBackbone, ResNet18
    from hpft_jax.params import merge, partition

    if name == "mlp":
        model, shape = Classifier(MLPBackbone(), LinearHead(HP_CLASSES)), (28, 28, 1)
        epochs = args.hp_epochs if kind == "cached" else args.hp_naive_epochs
    else:
        s = args.hp_resnet_image
        model = Classifier(ResNet18(width=args.hp_resnet_width), LinearHead(HP_CLASSES))
        shape = (s, s, 3)
        epochs = args.hp_resnet_epochs if kind == "cached" else args.hp_resnet_naive_epochs
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((HP_N,) + shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, HP_CLASSES, HP_N), jnp.int32)
    v = jax.jit(lambda k: model.init(k, x[:2], train=False))(jax.random.key(0))
    head_p, head_s, fp, fs, split = hp.split_head(model, v, 0)
    cfg = HPConfig()
    tx = steps.hp_optimizer(cfg)
    key = jax.random.key(1)
    eta = jnp.float32(1.0)
    res = {"epochs": epochs, "steps_per_epoch": steps.num_batches(HP_N, BATCH),
           "n_params": sum(a.size for a in jax.tree.leaves((head_p, fp)))}

    if kind == "cached":
        trunk = jax.jit(lambda fr, xx: steps.predict(
            model, steps.variables(*fr), xx, method=model.trunk, split=split))
        inputs, tc = _timed(lambda: trunk((fp, fs), x), 3)
        res["cache"] = tc
        step = steps.make_hp_step(model, tx, num_classes=HP_CLASSES, split=split)
    else:
        keep = kind == "backprop"
        head_keys = {k for k in head_p}

        def loss_all(full, stats, xb, yb, eta):
            logits, _ = model.apply(steps.variables(full, stats), xb, train=False)
            return cross_entropy(logits, smooth_targets(yb, HP_CLASSES, eta))

        def step(state, xb, yb, key, frozen, eta):
            del key
            fparams, fstats = frozen
            full = merge(fparams, state.params)
            loss, grads = jax.value_and_grad(loss_all)(full, fstats, xb, yb, eta)
            g_head, _ = partition(grads, lambda path: path[0] in head_keys)  # discard the rest
            updates, opt_state = tx.update(g_head, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            m = {"loss": loss}
            if keep:  # a naive loop's logged global gradient norm: all gradients are used
                m["grad_norm"] = optax.tree.norm(grads)
            return steps.HPState(params, state.batch_stats, opt_state, state.step + 1), m

        inputs = x
    frozen = (fp, fs)
    state0 = steps.HPState(head_p, head_s, tx.init(head_p), jnp.zeros((), jnp.int32))
    cstep = jax.jit(step).lower(state0, inputs[:BATCH], y[:BATCH], key, frozen, eta).compile()
    res["flops_per_step"] = _flops(cstep)
    nb = HP_N // BATCH
    if kind == "backprop":
        # HP's step range discards per-step metrics, and XLA would then drop
        # the backbone gradients too; sum their norm out of the loop so that
        # they are computed.
        reduce = steps.Reduce(lambda shapes, start: jnp.float32(0.0),
                              lambda acc, s, m: acc + m["grad_norm"])
    else:
        reduce = steps.discard()  # as hpft_jax.hp runs it
    step_range = steps.make_step_range(step, batch_size=BATCH, num_examples=HP_N, reduce=reduce)

    def run_fn(state, hs, ys, key, start, stop, *consts):
        state, acc = step_range(state, hs, ys, key, start * nb, stop * nb, *consts)
        return (state, acc) if kind == "backprop" else state

    run = jax.jit(run_fn)
    out, t = _timed(lambda: run(state0, inputs, y, key, 0, epochs, frozen, eta), args.hp_reps)
    if kind == "backprop":
        out, acc = out
        res["grad_norm_sum"] = float(acc)
    res["run"] = t
    res["epochs_per_s"] = epochs / t["median_s"]
    res["head_checksum"] = float(sum(jnp.sum(a) for a in jax.tree.leaves(out.params)))
    return res


# --------------------------------------------------------------------------
# The default sweep, end to end


def sweep_case(kind: str, args) -> dict:
    root = os.path.join(args.outdir, "sweep_runs")
    if kind == "cold" and os.path.exists(root):
        shutil.rmtree(root)
    if kind == "warm":
        if not os.path.isdir(os.path.join(root, "pretrained")):
            raise RuntimeError("sweep:warm needs sweep:cold first (its pretrained cache)")
        for entry in os.listdir(root):  # keep only the pretrained cache
            if entry != "pretrained":
                shutil.rmtree(os.path.join(root, entry))
    cmd = [sys.executable, "-m", "hpft_jax.cli", "sweep", "--runs-dir", root, "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("| HP")]
    return {"wall_s": wall, "command": " ".join(cmd[1:]), "table1": lines,
            "peak_rss_gb_sweep": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6}


# --------------------------------------------------------------------------
# Child dispatch


def child(case: str, args) -> dict:
    res: dict = {"case": case, "load_start": os.getloadavg()}
    part, *rest = case.split(":")
    if part == "dot":
        import jax
        import jax.numpy as jnp
        a = jnp.ones((2048, 2048), jnp.float32)
        dot = jax.jit(jnp.dot)
        _, t = _timed(lambda: dot(a, a), 10)
        res.update(t, flops=2 * 2048**3, gflops_per_s=2 * 2048**3 / t["median_s"] / 1e9)
    elif part == "ft":
        impl, name = rest
        if impl.startswith("torch"):
            res.update(ft_torch(name, int(impl.removeprefix("torch")), args))
        else:
            res.update(ft_jax(name, args))
    elif part == "hp":
        res.update(hp_case(rest[0], rest[1], args))
    elif part == "sweep":
        res.update(sweep_case(rest[0], args))
    else:
        raise ValueError(f"unknown case {case!r}")
    res["load_end"] = os.getloadavg()
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return res


# --------------------------------------------------------------------------
# Driver


def cases(args) -> list[str]:
    parts = args.parts.split(",")
    models = args.models.split(",")
    out = []
    if "dot" in parts:
        out.append("dot")
    if "ft" in parts:
        for m in models:
            out.append(f"ft:jax:{m}")
            if m == "resnet18":
                out += [f"ft:jax-{v}:{m}" for v in args.resnet_variants.split(",") if v]
            out += [f"ft:torch1:{m}", f"ft:torch2:{m}"]
    if "hp" in parts:
        for m in args.hp_models.split(","):
            out += [f"hp:cached:{m}", f"hp:pruned:{m}", f"hp:backprop:{m}"]
    if "sweep" in parts:
        out += ["sweep:cold", "sweep:warm"]
    return out


def run_child(case: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--case", case,
           "--outdir", args.outdir]
    for f in SIZE_FLAGS:
        cmd += [f"--{f.replace('_', '-')}", str(getattr(args, f))]
    env = dict(os.environ)
    if ":jax-ynn:" in case:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + YNN_FLAG).strip()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"case": case, "error": p.stderr[-3000:]}
    return {**json.loads(p.stdout.strip().splitlines()[-1]),
            "child_wall_s": time.perf_counter() - t0}


def _load(r) -> str:
    return f"{r['load_start'][0]:.1f}–{r['load_end'][0]:.1f}"


def tables(results) -> str:
    by = {r["case"]: r for r in results if "error" not in r}
    dot = by.get("dot", {}).get("gflops_per_s", float("nan"))
    out = []
    if "dot" in by:
        d = by["dot"]
        out.append(f"jnp.dot 2048² float32: {dot:.0f} GFLOP/s (median of 10, "
                   f"load {_load(d)})\n")
    ft = [r for r in results if r["case"].startswith("ft:") and "error" not in r]
    if ft:
        out += ["| model | implementation | params | epoch steps/s | single-step steps/s "
                "| compile (s) | GFLOP/step | GFLOP/s | of jnp.dot | peak RSS (GB) | load |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in ft:
            _, impl, name = r["case"].split(":")
            jr = by.get(f"ft:jax:{name}", {})
            fl = r.get("flops_per_step", jr.get("flops_per_step", float("nan")))
            rate = r.get("steps_per_s", r["step_steps_per_s"])
            gfs = fl * rate / 1e9
            comp = r.get("epoch_aot_compile_s", r.get("step_aot_compile_s"))
            label = {"jax": "JAX (make_epoch scan)" if "steps_per_s" in r else "JAX (jitted step)",
                     "jax-ynn": "JAX, YNNPACK convs (XLA flag)",
                     "torch1": "PyTorch, 1 thread", "torch2": "PyTorch, 2 threads"}[impl]
            ep = f"{r['steps_per_s']:.3g}" if "steps_per_s" in r else "–"
            out.append(
                f"| {name} | {label} | {r['n_params']:,} | {ep} | "
                f"{r['step_steps_per_s']:.3g} | {'–' if comp is None else f'{comp:.2g}'} | "
                f"{fl / 1e9:.3g} | {gfs:.3g} | {gfs / dot:.2f} | {r['peak_rss_gb']:.2f} | "
                f"{_load(r)} |")
        out.append("")
        for name in ("mlp", "resnet18"):
            j = by.get(f"ft:jax:{name}")
            ts = [by[c] for c in (f"ft:torch1:{name}", f"ft:torch2:{name}") if c in by]
            if j and ts:
                best = max(ts, key=lambda r: r["step_steps_per_s"])
                same = "same" if best["n_params"] == j["n_params"] else "DIFFERENT"
                line = f"- {name}: parameter counts {same} ({j['n_params']:,} vs " \
                       f"{best['n_params']:,}); "
                if "steps_per_s" in j and all("steps_per_s" in t for t in ts):
                    be = max(ts, key=lambda r: r["steps_per_s"])
                    line += (f"JAX epoch / best PyTorch epoch ({be['threads']} thread(s)) = "
                             f"{j['steps_per_s'] / be['steps_per_s']:.2f}x; ")
                line += (f"JAX jitted step / best PyTorch step ({best['threads']} thread(s)) "
                         f"= {j['step_steps_per_s'] / best['step_steps_per_s']:.2f}x")
                out.append(line)
            y = by.get(f"ft:jax-ynn:{name}")
            if j and y:
                out.append(f"- {name}: YNNPACK convs / default JAX, jitted step = "
                           f"{y['step_steps_per_s'] / j['step_steps_per_s']:.2f}x")
            for r in (j, y):
                if r and "narrow" in r:
                    nr = r["narrow"]
                    out.append(
                        f"- {r['case']}, narrow ResNet18 ({nr['n_params']:,} params, input "
                        f"{'x'.join(map(str, nr['input']))}): library epoch "
                        f"{nr['steps_per_s']:.3g} steps/s vs jitted step "
                        f"{nr['step_steps_per_s']:.3g} steps/s: the scan is "
                        f"{nr['step_steps_per_s'] / nr['steps_per_s']:.1f}x slower per step")
        out.append("")
    hp_rows = [r for r in results if r["case"].startswith("hp:") and "error" not in r]
    if hp_rows:
        out += ["| model | HP step | epochs | epochs/s | compile (s) | GFLOP/epoch "
                "| GFLOP/s | of jnp.dot | peak RSS (GB) | load |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in hp_rows:
            _, kind, name = r["case"].split(":")
            gfe = r["flops_per_step"] * r["steps_per_epoch"] / 1e9
            gfs = gfe * r["epochs_per_s"]
            label = {"cached": "library: cached features",
                     "pruned": "naive, unused grads (XLA prunes them)",
                     "backprop": "naive: backprop through backbone"}[kind]
            out.append(f"| {name} | {label} | {r['epochs']} | {r['epochs_per_s']:.4g} | "
                       f"{r['run']['compile_s']:.2g} | {gfe:.3g} | {gfs:.3g} | "
                       f"{gfs / dot:.3f} | {r['peak_rss_gb']:.2f} | {_load(r)} |")
        out.append("")
        for name in ("mlp", "resnet"):
            c = by.get(f"hp:cached:{name}")
            if not c:
                continue
            cache = c["cache"]["median_s"]
            for kind in ("backprop", "pruned"):
                b = by.get(f"hp:{kind}:{name}")
                if b:
                    e = 1024
                    tot_c = cache + e / c["epochs_per_s"]
                    tot_b = e / b["epochs_per_s"]
                    out.append(
                        f"- {name}: cached / {kind} = "
                        f"{c['epochs_per_s'] / b['epochs_per_s']:.0f}x per epoch; "
                        f"for {e} epochs including the one-off feature pass "
                        f"({cache * 1e3:.3g} ms): {tot_b / tot_c:.0f}x")
        out.append("")
    sw = [r for r in results if r["case"].startswith("sweep:") and "error" not in r]
    if sw:
        out += ["| sweep | wall (s) | peak RSS of the sweep (GB) | load |", "|---|---|---|---|"]
        for r in sw:
            out.append(f"| {r['case'].split(':')[1]} | {r['wall_s']:.1f} | "
                       f"{r['peak_rss_gb_sweep']:.2f} | {_load(r)} |")
        out.append("")
    for r in results:
        if "error" in r:
            out.append(f"- {r['case']}: ERROR {r['error'][-300:]}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", help="run one case in this process (child mode)")
    ap.add_argument("--parts", default="dot,ft,hp,sweep",
                    help="comma-separated: dot, ft, hp, sweep")
    ap.add_argument("--models", default="mlp,resnet18", help="FT models: mlp, resnet18")
    ap.add_argument("--hp-models", default="mlp,resnet", help="HP models: mlp, resnet")
    ap.add_argument("--resnet-variants", default="",
                    help="extra JAX ResNet18 rows: 'ynn' (YNNPACK convolutions)")
    ap.add_argument("--mlp-steps", type=int, default=50, help="MLP steps per epoch")
    ap.add_argument("--mlp-reps", type=int, default=5,
                    help="MLP epochs timed (single steps: 10x as many)")
    ap.add_argument("--resnet-steps", type=int, default=3,
                    help="ResNet18 steps timed (single steps; also steps per epoch)")
    ap.add_argument("--resnet-warmup", type=int, default=1)
    ap.add_argument("--resnet-width", type=int, default=64)
    ap.add_argument("--resnet-image", type=int, default=32)
    ap.add_argument("--resnet-epoch-width", type=int, default=16,
                    help="narrow ResNet18 for the scan-epoch vs single-step ratio (0: skip)")
    ap.add_argument("--resnet-epoch-image", type=int, default=16)
    ap.add_argument("--hp-epochs", type=int, default=1024, help="cached HP epochs (MLP)")
    ap.add_argument("--hp-naive-epochs", type=int, default=64, help="naive HP epochs (MLP)")
    ap.add_argument("--hp-resnet-epochs", type=int, default=1024)
    ap.add_argument("--hp-resnet-naive-epochs", type=int, default=2)
    ap.add_argument("--hp-resnet-width", type=int, default=16)
    ap.add_argument("--hp-resnet-image", type=int, default=32)
    ap.add_argument("--hp-reps", type=int, default=3)
    ap.add_argument("--outdir", default=None)
    ap.add_argument("--json", default=None, help="also write all results here")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(child(args.case, args)))
        return
    args.outdir = args.outdir or tempfile.mkdtemp(prefix="bench_train_")
    os.makedirs(args.outdir, exist_ok=True)
    results = []
    t0 = time.perf_counter()
    for case in cases(args):
        r = run_child(case, args)
        print(json.dumps({k: v for k, v in r.items() if k not in ("runs_s",)}), flush=True)
        results.append(r)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n")
    print(tables(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
