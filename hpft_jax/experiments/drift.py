"""``hpft drift``: how fast the backbone's eNTK moves during FT (App. A, Fig. 6).

The analysis of Eq. 2 assumes that the backbone's empirical NTK

    κ_t(x_j, x_n) = ∇_B z_t^(j) (∇_B z_t^(n))ᵀ ∈ R^{h×h}

changes slowly during finetuning. Fig. 6 checks it on 50 probe inputs
(2,500 pairs) with k_norm_t = mean ‖κ_t‖_F and k_gap_t = mean ‖κ_{t+1} − κ_t‖_F,
where t+1 is one SGD step after t, for these settings (one FT run each):

* ``scratch`` ("Rnd backbone"): a randomly initialised backbone with the
  sweep's τ = 0 head (:func:`scratch_init`), finetuned on the downstream
  data (training from scratch);
* ``hp{τ}`` ("PT backbone HPτ"): the cached pretrained backbone with the
  head after τ epochs of HP, exactly as :mod:`hpft_jax.sweep` builds them
  (:func:`~hpft_jax.sweep.pretrained_for`, :func:`~hpft_jax.sweep.run_hp`,
  :func:`~hpft_jax.sweep.ft_inits`).

FT is the sweep's: :func:`hpft_jax.steps.make_train_step` with
:func:`hpft_jax.steps.ft_optimizer` and the sweep's FTConfig (SGD + momentum,
cosine schedule over the run, the same data order as :func:`hpft_jax.ft.finetune`),
but with no early stopping: every run trains ``ft.epochs`` epochs. The loop
is one pure jitted step (state donated, data on device); the host sees the
state only at probe points t = 0, s, 2s, ... (``every`` = s). There the
experiment takes the backbone's eval-mode eNTK factors before and after the
one SGD step t -> t+1 (:func:`theory.ntk.make_drift_fn`; factors are reused
when two probes are one step apart) and the eval-mode accuracy, loss and AIE
on the whole (unaugmented) downstream training set. The probe cost is timed
against the FT steps and reported.

Each finished setting is one ``drift`` event of ``metrics.jsonl`` (arrays
over the probe steps); a rerun skips settings already logged (an interrupted
setting restarts). :func:`report` rebuilds ``drift.md`` and
``figures/drift.png`` from the records alone.

    hpft drift                                  # scratch, HP0, HP16, HP1024 on digits
    hpft drift --taus 0,4,64 --every 2 --probes 30 --name drift_b
    hpft drift --report-only
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from typing import Any, Callable, NamedTuple

from hpft_jax import config as config_lib

Tree = Any
DEFAULT_TAUS = (0, 16, 1024)
TARGET_PROBES = 20  # probe points per setting when ``every`` is not given (cost: see docs)
PROBE_SEED = 0  # the probe samples are the same for every setting and seed


def _default_sweep() -> config_lib.SweepConfig:
    return config_lib.SweepConfig(name="drift", seeds=(0,), ls_eta=None,
                                  hp=config_lib.HPConfig(taus=DEFAULT_TAUS))


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    """The experiment; ``sweep`` supplies data, model, pretraining, HP, FT, seeds.

    ``sweep.hp.taus``: the HPτ settings (at least one);
    ``scratch``: also finetune a random backbone; ``probes``: probe samples
    (N, so N² pairs) drawn once from the downstream training set; ``every``:
    probe every this many FT steps (None: about :data:`TARGET_PROBES` probe
    points). ``sweep.ft.patience`` is unused (no early stopping), as are
    ``shard``, ``vmap`` and ``max_batch_runs``; ``ls_eta`` must be None.
    """

    sweep: config_lib.SweepConfig = dataclasses.field(default_factory=_default_sweep)
    scratch: bool = True
    probes: int = 50
    every: int | None = None

    def __post_init__(self):
        if isinstance(self.probes, bool) or int(self.probes) != self.probes or self.probes < 1:
            raise ValueError(f"probes must be a positive integer; got {self.probes!r}")
        if self.every is not None and (isinstance(self.every, bool)
                                       or int(self.every) != self.every or self.every < 1):
            raise ValueError(f"every must be a positive integer (FT steps between probes) "
                             f"or None; got {self.every!r}")
        if self.sweep.ls_eta is not None:
            raise ValueError("hpft drift runs no lsHP: ls_eta must be None "
                             f"(remove --ls-eta); got {self.sweep.ls_eta}")


class Setting(NamedTuple):
    name: str  # "scratch" | "hp{τ}"
    tau: int | None  # None for scratch

    @property
    def label(self) -> str:
        return "Rnd backbone (scratch)" if self.tau is None else f"PT backbone HP{self.tau}"


def settings(cfg: DriftConfig) -> list[Setting]:
    out = [Setting("scratch", None)] if cfg.scratch else []
    return out + [Setting(f"hp{t}", int(t)) for t in cfg.sweep.hp.taus]


def resolve_every(every: int | None, total_steps: int) -> int:
    """FT steps between probes; None gives about TARGET_PROBES probe points."""
    if every is None:
        return max(1, total_steps // TARGET_PROBES)
    if every < 1:
        raise ValueError(f"every must be >= 1; got {every}")
    return int(every)


def probe_steps(total_steps: int, every: int) -> list[int]:
    """Steps t at which κ_t and κ_{t+1} are taken: 0, s, 2s, ... < total_steps."""
    if total_steps < 1:
        raise ValueError(f"FT has no step to probe (total_steps={total_steps})")
    if every < 1:
        raise ValueError(f"every must be >= 1; got {every}")
    return list(range(0, total_steps, every))


def probe_indices(num_train: int, probes: int, seed: int = PROBE_SEED):
    """Sorted indices of ``probes`` distinct training samples (fixed by ``seed``)."""
    import numpy as np

    if probes < 1:
        raise ValueError(f"probes must be >= 1; got {probes}")
    if probes > num_train:
        raise ValueError(f"--probes {probes} is larger than the downstream training set "
                         f"({num_train} examples)")
    return np.sort(np.random.default_rng(seed).choice(num_train, probes, replace=False))


# --------------------------------------------------------------------------
# Programs


class _AOT:
    """A jitted function compiled ahead of time on its first call (timed);
    ``consts`` are appended to every call's arguments."""

    def __init__(self, fn: Callable, *consts):
        self.fn, self.consts, self.exe, self.compile_s = fn, consts, None, 0.0

    def __call__(self, *args):
        args = args + self.consts
        if self.exe is None:
            t0 = time.perf_counter()
            self.exe = self.fn.lower(*args).compile()
            self.compile_s = time.perf_counter() - t0
        return self.exe(*args)


class Programs(NamedTuple):
    """The compiled pieces of one experiment (shared by all its settings).

    * ``run(state, x, y, order, key, start, stop) -> (state, metrics)``: FT
      steps [start, stop) in a ``fori_loop`` (step s trains on batch
      ``order[s]``), and the last step's minibatch ``loss``/``acc``/...;
      state donated. One program serves stretches and single probe steps.
    * ``order(key) -> (total_steps, B)``: every step's batch indices, epoch by
      epoch as :func:`hpft_jax.steps.make_epoch` draws them.
    * ``factors(bb_params, bb_stats)``: the backbone's eNTK factors on the
      probe samples, eval mode; ``from_factors(F_t, F_next) -> {k_norm,
      k_norm_next, k_gap}`` (:class:`theory.ntk.NTKDrift`).
    * ``evaluate(params, stats, data) -> {train_acc, train_loss, aie,
      val_acc, test_acc}``: eval mode, unaugmented (NaN for an empty split).
    """

    run: _AOT
    order: Callable
    factors: _AOT
    from_factors: _AOT
    evaluate: _AOT
    tx: Any
    num_batches: int
    total_steps: int

    def compile_s(self) -> float:
        return sum(p.compile_s for p in (self.run, self.factors, self.from_factors,
                                         self.evaluate))


def backbone_of(params: Tree, batch_stats: Tree) -> tuple[Tree, Tree]:
    """(backbone params, backbone BatchNorm statistics or {})."""
    return params["backbone"], (batch_stats or {}).get("backbone", {})


def make_programs(model, ft_cfg, *, num_classes: int, num_train: int, x_probe, mesh=None,
                  augment: str = "none") -> Programs:
    """Build (not yet compile) the FT and probe programs; see :class:`Programs`.

    x_probe: (N, ...) probe inputs. A run is ``ft_cfg.epochs`` epochs, which
    is also the cosine schedule's horizon (as in the sweep).
    """
    import jax
    import jax.numpy as jnp

    from hpft_jax import energy, steps
    from hpft_jax.losses import accuracy, cross_entropy
    from theory.ntk import make_drift_fn

    epochs = ft_cfg.epochs
    nb = steps.num_batches(num_train, ft_cfg.batch_size)
    if nb < 1:
        raise ValueError(f"FT batch {ft_cfg.batch_size} is larger than the {num_train} "
                         "training examples")
    total = epochs * nb
    tx = steps.ft_optimizer(ft_cfg, total)
    train_step = steps.make_train_step(model, tx, num_classes=num_classes, eta=ft_cfg.eta,
                                       mesh=mesh, augment=augment)

    def step_at(state, x, y, order, key, s):
        ix = order[s]
        return train_step(state, x[ix], y[ix], steps.step_key(key, s // nb, s % nb))

    def run(state, x, y, order, key, start, stop):
        m0 = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
            step_at, state, x, y, order, key, start)[1])
        return jax.lax.fori_loop(start, stop, lambda s, c: step_at(c[0], x, y, order, key, s),
                                 (state, m0))

    @jax.jit
    def order(key):
        idx = jax.vmap(lambda e: steps.epoch_indices(key, e, num_train, ft_cfg.batch_size))(
            jnp.arange(epochs))
        return idx.reshape(total, ft_cfg.batch_size)

    x_probe = jnp.asarray(x_probe)

    def backbone_fn(bb_stats):
        return lambda p, x: model.backbone.apply(steps.variables(p, bb_stats), x, train=False)

    # BatchNorm statistics change during FT but are not differentiated: they
    # enter f by closure, inside this jit (so one program serves every probe).
    # x_probe is an argument too: make_drift_fn checks concrete inputs eagerly.
    factors = jax.jit(lambda p, s, xp: make_drift_fn(backbone_fn(s), xp).factors(p))
    from_factors = make_drift_fn(backbone_fn({}), x_probe).from_factors

    def evaluate(params, stats, data):
        v = steps.variables(params, stats)
        logits, _ = steps.predict(model, v, data["train_x"])
        y = data["train_y"]
        out = {"train_acc": accuracy(logits, y),
               "train_loss": cross_entropy(logits, jax.nn.one_hot(y, num_classes)),
               "aie": energy.aie(logits, y)}
        for split in ("val", "test"):
            xs = data[f"{split}_x"]
            out[f"{split}_acc"] = (accuracy(steps.predict(model, v, xs)[0], data[f"{split}_y"])
                                   if xs.shape[0] else jnp.float32(jnp.nan))
        return out

    return Programs(_AOT(jax.jit(run, donate_argnums=0)), order, _AOT(factors, x_probe),
                    _AOT(from_factors), _AOT(jax.jit(evaluate)), tx, nb, total)


# --------------------------------------------------------------------------
# One FT run with probes


def drift_run(progs: Programs, params: Tree, batch_stats: Tree, data: dict, key, *,
              every: int, mesh=None, on_probe: Callable | None = None,
              progress: bool = True, desc: str = "drift") -> dict:
    """Finetune from ``(params, batch_stats)`` for ``progs.total_steps`` steps, probing.

    ``data``: on-device ``train_x, train_y, val_x, val_y, test_x, test_y``;
    ``key``: the FT data-order key (``hp.seed_key(seed, hp.FT_DATA)``).
    At t = 0, every, 2·every, ...: eval-mode metrics at θ_t, then FT step t,
    then the drift between θ_t and θ_{t+1}. ``on_probe(t, state_t,
    state_next)`` (host copies) is for tests.

    Returns lists over probe points: ``steps``, ``k_norm``, ``k_norm_next``,
    ``k_gap``, ``rel_gap``; eval-mode ``train_acc``, ``train_loss``, ``aie``
    (training set), ``val_acc``, ``test_acc``; ``step_loss``, ``step_acc``
    (step t's minibatch, train mode). Also ``final`` (the same eval metrics
    after the last step), ``final_state`` and ``timing`` (seconds, net of
    compilation: ``train_s``, ``factors_s``, ``contract_s``, ``probe_s`` =
    their sum, ``eval_s``, ``compile_s``, ``wall_s``; ``step_s`` per FT step,
    ``probe_over_step`` = one probe in FT steps, ``probe_frac`` = probing's
    share of ``wall_s``).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hpft_jax import errors, parallel, steps
    from hpft_jax.progress import bar

    t_start = time.perf_counter()
    compile0 = progs.compile_s()
    total = progs.total_steps
    at = probe_steps(total, every)
    x, y = data["train_x"], data["train_y"]
    order = progs.order(key)
    state = parallel.put_replicated(steps.init_state(params, batch_stats, progs.tx), mesh)
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731

    out = {k: [] for k in ("steps", "k_norm", "k_norm_next", "k_gap", "rel_gap", "train_acc",
                           "train_loss", "aie", "val_acc", "test_acc", "step_loss", "step_acc")}
    secs = {"train": 0.0, "factors": 0.0, "contract": 0.0, "eval": 0.0}

    def clock(kind, thunk):
        """Run ``thunk`` to completion; add its time, net of compilation, to ``kind``."""
        c0, t0 = progs.compile_s(), time.perf_counter()
        r = jax.block_until_ready(thunk())
        secs[kind] += time.perf_counter() - t0 - (progs.compile_s() - c0)
        return r

    cached = None  # (step, factors at that step)
    cur = 0
    pb = bar(total, desc, enabled=progress, unit="step")
    for t in at:
        if t > cur:
            state, _ = clock("train", lambda: progs.run(state, x, y, order, key, i32(cur), i32(t)))
            pb.update(t - cur)
            cur = t
        ev = jax.device_get(clock("eval", lambda: progs.evaluate(state.params, state.batch_stats,
                                                                 data)))
        if not np.isfinite(ev["train_loss"]):
            raise errors.NonFiniteLossError(
                f"{desc}: the training loss is not finite at FT step {t}; lower the FT lr")
        before = jax.device_get(state) if on_probe is not None else None
        f_t = cached[1] if cached is not None and cached[0] == t else clock(
            "factors", lambda: progs.factors(*backbone_of(state.params, state.batch_stats)))
        state, m = clock("train", lambda: progs.run(state, x, y, order, key, i32(t), i32(t + 1)))
        m = jax.device_get(m)
        cur = t + 1
        pb.update(1)
        f_next = clock("factors", lambda: progs.factors(*backbone_of(state.params,
                                                                   state.batch_stats)))
        d = jax.device_get(clock("contract", lambda: progs.from_factors(f_t, f_next)))
        cached = (t + 1, f_next)

        if on_probe is not None:
            on_probe(t, before, jax.device_get(state))
        kn, kg = float(d["k_norm"]), float(d["k_gap"])
        for name, v in (("steps", t), ("k_norm", kn), ("k_norm_next", float(d["k_norm_next"])),
                        ("k_gap", kg), ("rel_gap", kg / kn if kn > 0 else math.nan),
                        ("step_loss", float(m["loss"])), ("step_acc", float(m["acc"]))) + tuple(
                            (k, float(ev[k])) for k in ("train_acc", "train_loss", "aie",
                                                        "val_acc", "test_acc")):
            out[name].append(v)
        pb.set_postfix(k_gap=f"{kg:.3g}", acc=f"{float(ev['train_acc']):.3f}")
    if cur < total:
        state, _ = clock("train", lambda: progs.run(state, x, y, order, key, i32(cur),
                                                    i32(total)))
        pb.update(total - cur)
    pb.close()

    ev = jax.device_get(progs.evaluate(state.params, state.batch_stats, data))
    final = {k: float(ev[k]) for k in ("train_acc", "train_loss", "aie", "val_acc", "test_acc")}
    wall = time.perf_counter() - t_start
    step_s, probe_s, n = secs["train"] / total, secs["factors"] + secs["contract"], len(at)
    out["final"] = final
    out["timing"] = {
        "wall_s": wall, "compile_s": progs.compile_s() - compile0, "train_s": secs["train"],
        "step_s": step_s, "probe_s": probe_s, "probe_calls": n, "probe_s_each": probe_s / n,
        "factors_s": secs["factors"], "contract_s": secs["contract"], "eval_s": secs["eval"],
        "probe_over_step": (probe_s / n) / step_s if step_s > 0 else math.inf,
        "probe_frac": probe_s / wall,
    }
    out["final_state"] = state
    return out


# --------------------------------------------------------------------------
# The experiment


def scratch_init(model, x_example, seed: int) -> tuple[Tree, Tree]:
    """(params, batch_stats) of the scratch setting: the whole model that
    :func:`hpft_jax.hp.init_heads` draws ``seed``'s τ = 0 head from, so the
    head is the sweep's τ = 0 head and the backbone is random."""
    import jax

    from hpft_jax import hp

    fresh = jax.jit(lambda k: model.init(k, x_example, train=False))(
        hp.seed_key(seed, hp.HEAD_INIT))
    return fresh["params"], fresh.get("batch_stats", {}) or {}


def run_drift(cfg: DriftConfig, *, progress: bool = True, on_probe: Callable | None = None):
    """Run (or continue) the experiment; returns its :class:`~hpft_jax.runlog.RunDir`.

    Settings already logged (event ``drift``, by setting and seed) are skipped.
    ``on_probe(setting, seed, t, state_t, state_next)`` is for tests.
    """
    import jax.numpy as jnp

    from hpft_jax import data as data_lib, hp, parallel
    from hpft_jax.models import make_classifier
    from hpft_jax.runlog import RunDir
    from hpft_jax.sweep import RunKey, base_variables, ft_inits, pretrained_for, run_hp, split_arrays

    sw = cfg.sweep
    run = RunDir(os.path.join(sw.runs_dir, sw.name))
    done = {(r["setting"], r["seed"]) for r in run.records("drift")}
    todo = [(s, seed) for s in settings(cfg) for seed in sw.seeds if (s.name, seed) not in done]
    if not todo and os.path.exists(run.config_file):
        run.write_config(cfg)  # raises if the logged run had another config
        return run
    ds = data_lib.load_downstream(sw.data)
    n = ds.train.x.shape[0]
    data_lib.check_batch_size(n, sw.ft.batch_size, what="the downstream training set (FT)")
    idx = probe_indices(n, cfg.probes)
    run.write_config(cfg)
    mesh = parallel.data_mesh()
    parallel.check_divisible(sw.ft.batch_size, mesh, what="FT")
    k = ds.num_classes
    model = make_classifier(sw.model, k)
    x2 = jnp.asarray(ds.train.x[:2])
    seeds = list(sw.seeds)
    probe = None
    if any(s.tau is not None for s, _ in todo):
        pre_vars = pretrained_for(sw, run, mesh=mesh, progress=progress)
        base, _ = base_variables(model, pre_vars, sw.model.reinit_blocks, x2)
        probe = run_hp(sw, run, model, base, ds, mesh=mesh, progress=progress)

    progs = make_programs(model, sw.ft, num_classes=k, num_train=n, x_probe=ds.train.x[idx],
                          mesh=mesh, augment=sw.data.augment)
    every = resolve_every(cfg.every, progs.total_steps)
    dev = parallel.put_replicated({kk: jnp.asarray(v) for kk, v in split_arrays(ds).items()},
                                  mesh)
    for s, seed in todo:
        if s.tau is None:
            params, stats = scratch_init(model, x2, seed)
        else:
            ((params, stats),) = ft_inits(probe, [RunKey("hp", seed, s.tau)], seeds)
        hook = None if on_probe is None else (
            lambda t, a, b, _s=s.name, _seed=seed: on_probe(_s, _seed, t, a, b))
        res = drift_run(progs, params, stats, dev, hp.seed_key(seed, hp.FT_DATA), every=every,
                        mesh=mesh, on_probe=hook, progress=progress,
                        desc=f"drift {s.name} seed={seed}")
        res.pop("final_state")
        run.log("drift", setting=s.name, label=s.label, tau=s.tau, seed=seed,
                epochs=sw.ft.epochs, total_steps=progs.total_steps,
                steps_per_epoch=progs.num_batches, every=every, probes=cfg.probes,
                probe_idx=idx, **res)
    return run


# --------------------------------------------------------------------------
# Report, from metrics.jsonl alone


def records(run) -> list[dict]:
    """``drift`` records, scratch first, then by τ and seed (last one wins)."""
    by = {}
    for r in run.records("drift"):
        by[(r["setting"], r["seed"])] = r
    return sorted(by.values(), key=lambda r: (r["tau"] is not None, r["tau"] or 0, r["seed"]))


def _mean(xs) -> float:
    import numpy as np

    a = np.asarray([v for v in xs if v is not None], dtype=float)
    return float(a.mean()) if a.size else math.nan


def table(recs: list[dict]) -> str:
    """Markdown: one row per setting and seed."""
    head = ["setting", "seed", "AIE at t=0", "k_norm t=0", "k_norm end", "mean k_gap",
            "k_gap/k_norm t=0", "mean k_gap/k_norm", "train acc end", "val acc end"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in recs:
        lines.append("| " + " | ".join([
            r["label"], str(r["seed"]), f"{r['aie'][0]:.3f}", f"{r['k_norm'][0]:.4g}",
            f"{r['k_norm_next'][-1]:.4g}", f"{_mean(r['k_gap']):.3g}", f"{r['rel_gap'][0]:.3g}",
            f"{_mean(r['rel_gap']):.3g}", f"{100 * r['final']['train_acc']:.1f}%",
            f"{100 * r['final']['val_acc']:.1f}%"]) + " |")
    return "\n".join(lines)


def timing_table(recs: list[dict]) -> str:
    head = ["setting", "seed", "FT steps", "probes", "FT step (ms)", "probe (s)",
            "of which factors (s)", "probe / FT step", "probing share of wall", "wall (s)",
            "compile (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in recs:
        tm = r["timing"]
        lines.append("| " + " | ".join([
            r["label"], str(r["seed"]), str(r["total_steps"]), str(tm["probe_calls"]),
            f"{1e3 * tm['step_s']:.2f}", f"{tm['probe_s_each']:.3f}",
            f"{tm.get('factors_s', math.nan) / tm['probe_calls']:.3f}",
            f"{tm['probe_over_step']:.0f}x", f"{100 * tm['probe_frac']:.0f}%",
            f"{tm['wall_s']:.1f}", f"{tm['compile_s']:.1f}"]) + " |")
    return "\n".join(lines)


def timing_summary(recs: list[dict]) -> str:
    wall = sum(r["timing"]["wall_s"] for r in recs)
    probe = sum(r["timing"]["probe_s"] for r in recs)
    calls = sum(r["timing"]["probe_calls"] for r in recs)
    train = sum(r["timing"]["train_s"] for r in recs)
    nsteps = sum(r["total_steps"] for r in recs)
    if not recs or calls == 0:
        return "no timing"
    each, step = probe / calls, train / nsteps
    return (f"probing: {probe:.1f} s of {wall:.1f} s FT-run wall time ({100 * probe / wall:.0f}%); "
            f"one probe {each:.3f} s = {each / step:.0f} FT steps of {1e3 * step:.2f} ms")


def figure(run, recs: list[dict]) -> str:
    """``figures/drift.png`` over FT steps: train accuracy, k_norm, k_gap (the
    three panels of Fig. 6) and k_gap / k_norm."""
    import numpy as np

    from hpft_jax.report import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    multi_seed = len({r["seed"] for r in recs}) > 1
    taus = sorted({r["tau"] for r in recs if r["tau"] is not None})
    cmap = plt.cm.viridis(np.linspace(0.0, 0.85, max(len(taus), 1)))
    for r in recs:
        color = "k" if r["tau"] is None else cmap[taus.index(r["tau"])]
        ls = "--" if r["tau"] is None else "-"
        label = r["label"] + (f" s{r['seed']}" if multi_seed else "")
        t = np.asarray(r["steps"])
        axes[0].plot(t, 100 * np.asarray(r["train_acc"]), color=color, ls=ls, label=label)
        axes[1].plot(t, r["k_norm"], color=color, ls=ls, label=label)
        axes[2].plot(t, r["k_gap"], color=color, ls=ls, label=label)
        axes[3].plot(t, r["rel_gap"], color=color, ls=ls, label=label)
    axes[0].set_ylabel("train accuracy (%, eval mode)")
    axes[1].set_ylabel(r"$k_{norm}$ = mean $\|\kappa_t\|_F$")
    axes[2].set_ylabel(r"$k_{gap}$ = mean $\|\kappa_{t+1}-\kappa_t\|_F$")
    axes[3].set_ylabel(r"$k_{gap}\,/\,k_{norm}$ (relative one-step change)")
    for ax in axes[1:]:
        ax.set_yscale("log")
    for ax in axes:
        ax.set_xlabel("FT step t")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    n = recs[0]["probes"] if recs else 0
    fig.suptitle(f"Backbone eNTK during FT on {n} probe samples ({n * n:,} pairs); "
                 "t+1 is one SGD step after t (paper Fig. 6)", fontsize=10)
    fig.tight_layout()
    path = run.figures("drift.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(run_dir: str, *, write_figures: bool = True, out=print) -> str:
    """Print and write ``drift.md`` (and the figure); returns the text."""
    from hpft_jax.runlog import RunDir

    run = RunDir(run_dir)
    if not os.path.isdir(run.path):
        raise FileNotFoundError(f"no run directory at {run.path}")
    recs = records(run)
    if not recs:
        raise ValueError(f"{run.path} has no drift records in metrics*.jsonl yet")
    r0 = recs[0]
    text = "\n\n".join([
        f"# eNTK drift during FT: {run.path}",
        (f"{r0['probes']} probe samples ({r0['probes'] ** 2:,} pairs) from the downstream "
         f"training set; {r0['total_steps']} FT steps ({r0['epochs']} epochs x "
         f"{r0['steps_per_epoch']}), probed every {r0['every']} steps; k_gap/k_norm is the "
         "relative one-step kernel change. Accuracies and AIE: eval mode, training set."),
        table(recs),
        "## Cost of the probe",
        timing_table(recs),
        timing_summary(recs),
    ])
    if write_figures:
        text += "\n\nFigure: " + os.path.relpath(figure(run, recs), run.path)
    with open(os.path.join(run.path, "drift.md"), "w") as f:
        f.write(text + "\n")
    out(text)
    return text


# --------------------------------------------------------------------------
# Command line


def config_from_args(args: argparse.Namespace) -> DriftConfig:
    from hpft_jax import cli

    sw = cli.config_from_args(args)
    taus = args.taus if args.taus is not None else (
        sw.hp.taus if hasattr(args, "tau") else DEFAULT_TAUS)
    sw = dataclasses.replace(
        sw, name=getattr(args, "name", None) or "drift",
        seeds=sw.seeds if hasattr(args, "seeds") else (0,),
        ls_eta=sw.ls_eta if hasattr(args, "ls_eta") else None)
    if not taus:
        raise ValueError("--taus needs at least one τ, e.g. 0,16,1024")
    sw = dataclasses.replace(sw, hp=dataclasses.replace(sw.hp, taus=tuple(taus)))
    return DriftConfig(sweep=sw, scratch=not args.no_scratch, probes=args.probes,
                       every=args.every)


def _cmd(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    path = os.path.join(cfg.sweep.runs_dir, cfg.sweep.name)
    t0 = time.perf_counter()
    if not args.report_only:
        path = run_drift(cfg, progress=not args.quiet).path
    report(path, write_figures=not args.no_figures)
    if not args.report_only:
        print(f"\nwall time of this command: {time.perf_counter() - t0:.1f} s")


def add_parser(subparsers) -> None:
    from hpft_jax import cli

    p = subparsers.add_parser(
        "drift", help="eNTK drift (k_norm, k_gap) during FT: scratch vs pretrained + HPτ "
        "(App. A, Fig. 6)", description=__doc__.split("\n\n")[0])
    cli.add_config_flags(p)
    p.add_argument("--taus", type=cli._ints, default=None,
                   help="HPτ settings, e.g. 0,16,1024 (default; overrides --tau)")
    p.add_argument("--no-scratch", action="store_true",
                   help="skip the random-backbone (training from scratch) setting")
    p.add_argument("--probes", type=int, default=50,
                   help="probe samples from the downstream training set (N² pairs)")
    p.add_argument("--every", type=int, default=None,
                   help=f"probe every this many FT steps (default: about {TARGET_PROBES} "
                        "probe points per run); the FT length is --ft-epochs")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild drift.md and the figure from metrics.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(fn=_cmd)
