"""``hpft drift``: how fast the backbone's eNTK moves during FT (App. A, Fig. 6).

The analysis of Eq. 2 assumes that the backbone's empirical NTK

    κ_t(x_j, x_n) = ∇_B z_t^(j) (∇_B z_t^(n))ᵀ ∈ R^{h×h}

changes slowly during finetuning. Fig. 6 checks it on 50 probe inputs
(2,500 pairs) with k_norm_t = mean ‖κ_t‖_F and k_gap_t = mean ‖κ_{t+1} − κ_t‖_F,
where t+1 is one SGD step after t, for these settings (one FT run each):

* ``scratch`` ("Rnd backbone"): a randomly initialised backbone with the
  sweep's τ = 0 head (:func:`hpft_jax.prepare.scratch_init`), finetuned on the downstream
  data (training from scratch);
* ``hp{τ}`` ("PT backbone HPτ"): the cached pretrained backbone with the
  head after τ epochs of HP, exactly as :mod:`hpft_jax.sweep` builds them
  (:func:`hpft_jax.prepare.prepare`).

FT is the sweep's, run by :func:`hpft_jax.ft.make_ft_steps` (the same steps,
optimizer, schedule, batches and keys as :func:`hpft_jax.ft.finetune`) but
with no early stopping: every run trains ``ft.epochs`` epochs. The loop is
one jitted step range (state donated, data on device); the host sees the
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
    hpft drift --backbone resnet18 --memory-budget 8G   # recompute factors if needed

``--memory-budget`` (bytes for the whole process) goes to the eNTK
scheduler (:mod:`theory.ntk_budget`) after subtracting what the experiment
keeps resident (the data, host and device copies, and the FT state): the
probe then stores both states' per-sample factors when they fit, and
otherwise recomputes output-chunk factors tile by tile, each state with its
own BatchNorm statistics.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax import convs, errors, ft, parallel, prepare, steps, tasks
from hpft_jax.config import SweepConfig
from hpft_jax.experiment import Experiment, sweep_field
from hpft_jax.flags import option
from hpft_jax.outputs import md_table, plt, save_figure
from hpft_jax.progress import bar
from hpft_jax.rng import FT_DATA, probe_indices, seed_key
from hpft_jax.runlog import RunDir
from theory.ntk import make_drift_fn

Tree = Any
DEFAULT_TAUS = (0, 16, 1024)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
TARGET_PROBES = 20  # probe points per setting when ``every`` is not given (cost: see docs)
PROBE_SEED = 0  # the probe samples are the same for every setting and seed


def memory_size(text: str) -> int:
    """'8e9', '8G', '8GB', '7.5GiB', '500M' -> bytes (G = 10⁹, GiB = 2³⁰)."""
    t = str(text).strip().upper().replace(" ", "")
    t = t[:-1] if t.endswith("B") and not t.endswith("IB") else t
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"a memory size must look like 8e9, 8G, 7.5GiB or 500M; "
                         f"got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"a memory size must be at least 1 byte; got {text!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    """``hpft drift``; ``sweep`` supplies data, model, pretraining, HP, FT, seeds.

    ``sweep.hp.taus``: the HPτ settings (at least one); ``sweep.ft.patience``
    is unused (no early stopping), as are ``shard``, ``vmap`` and
    ``max_batch_runs``; ``ls_eta`` must be None.
    """

    sweep: SweepConfig = sweep_field("drift", seeds=(0,), taus=DEFAULT_TAUS, ls_eta=None)
    scratch: bool = option(True, "skip the random-backbone (training from scratch) setting",
                           flag="--no-scratch")
    probes: int = option(50, "probe samples from the downstream training set (N² pairs)")
    every: int | None = option(
        None, f"probe every this many FT steps (default None: about {TARGET_PROBES} probe "
        "points per run); the FT length is --ft-epochs")
    memory_budget: int | None = option(
        None, "bytes for the whole process, e.g. 8G (= 8e9) or 7.5GiB; the eNTK probe "
        "recomputes output-chunk factors when stored ones do not fit (default None: no limit)",
        parse=memory_size)

    def __post_init__(self):
        if isinstance(self.probes, bool) or int(self.probes) != self.probes or self.probes < 1:
            raise ValueError(f"probes must be a positive integer; got {self.probes!r}")
        if self.every is not None and (isinstance(self.every, bool)
                                       or int(self.every) != self.every or self.every < 1):
            raise ValueError(f"every must be a positive integer (FT steps between probes) "
                             f"or None; got {self.every!r}")
        if self.memory_budget is not None and (
                isinstance(self.memory_budget, bool) or int(self.memory_budget)
                != self.memory_budget or self.memory_budget < 1):
            raise ValueError(f"memory_budget must be a positive number of bytes or None; "
                             f"got {self.memory_budget!r}")
        if self.sweep.ls_eta is not None:
            raise ValueError("hpft drift runs no lsHP: ls_eta must be None "
                             f"(remove --ls-eta); got {self.sweep.ls_eta}")


def _tree_bytes(tree) -> int:
    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize
                   for a in jax.tree_util.tree_leaves(tree)))


def probe_budget(cfg: "DriftConfig", loaded: prepare.Loaded) -> int | None:
    """Bytes left for the eNTK probe out of ``cfg.memory_budget``: minus the
    data (host and device copies) and the FT state (parameters, BatchNorm
    statistics, momentum, and the step's new state). None: no limit."""
    if cfg.memory_budget is None:
        return None
    shapes = jax.eval_shape(lambda: loaded.model.init(jax.random.key(0), loaded.x_example(),
                                                      train=False))
    data = sum(a.nbytes for a in prepare.split_arrays(loaded.ds).values())
    resident = 2 * data + 3 * _tree_bytes(shapes)
    left = cfg.memory_budget - resident
    if left <= 0:
        raise ValueError(f"--memory-budget {cfg.memory_budget} B is below what the experiment "
                         f"keeps resident (data and FT state: {resident} B)")
    return left


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

    * ``ft``: :func:`hpft_jax.ft.make_ft_steps`, the sweep's FT taken step
      by step without early stopping; ``run(state, x, y, key, start, stop) ->
      (state, metrics of the last step)``, state donated. One program serves
      stretches and single probe steps.
    * ``factors(bb_params, bb_stats)``: the backbone's eNTK factors on the
      probe samples, eval mode; ``from_factors(F_t, F_next) -> {k_norm,
      k_norm_next, k_gap}`` (:class:`theory.ntk.NTKDrift`).
    * ``evaluate(params, stats, data) -> {train_acc, train_loss, aie,
      val_acc, test_acc}``: eval mode, unaugmented (NaN for an empty split).
    * ``schedule(bb_params, bb_stats)``: the probe's chunk schedule (a dict:
      mode "stored" or "outputs", panel k, stream s, factor passes, the
      estimated peak bytes; :class:`theory.ntk_budget.Schedule`).
    """

    ft: ft.FTSteps
    run: _AOT
    factors: _AOT
    from_factors: _AOT
    evaluate: _AOT
    schedule: Callable[[Tree, Tree], dict]

    @property
    def tx(self):
        return self.ft.tx

    @property
    def num_batches(self) -> int:
        return self.ft.num_batches

    @property
    def total_steps(self) -> int:
        return self.ft.total_steps

    def compile_s(self) -> float:
        return sum(p.compile_s for p in (self.run, self.factors, self.from_factors,
                                         self.evaluate))


def backbone_of(params: Tree, batch_stats: Tree) -> tuple[Tree, Tree]:
    """(backbone params, backbone BatchNorm statistics or {})."""
    return params["backbone"], (batch_stats or {}).get("backbone", {})


def make_programs(model, ft_cfg, *, num_classes: int, num_train: int, x_probe, mesh=None,
                  augment: str = "none", memory_budget: int | None = None) -> Programs:
    """Build (not yet compile) the FT and probe programs; see :class:`Programs`.

    x_probe: (N, ...) probe inputs. A run is ``ft_cfg.epochs`` epochs, which
    is also the cosine schedule's horizon (as in the sweep). memory_budget:
    bytes for the probe (:func:`probe_budget`), passed to
    :func:`theory.ntk.make_drift_fn`.
    """
    ft_steps = ft.make_ft_steps(model, ft_cfg, num_classes=num_classes, num_train=num_train,
                                mesh=mesh, augment=augment)
    x_probe = jnp.asarray(x_probe)

    def backbone_fn(p, x, bb_stats):
        return model.backbone.apply(steps.variables(p, bb_stats), x, train=False)

    # BatchNorm statistics change during FT but are not differentiated: they
    # are f's third argument (one program serves every probe). Under a memory
    # budget that the factors do not fit, ``factors`` returns (params, stats)
    # and ``from_factors`` recomputes output chunks of each state with its
    # own statistics. x_probe is an argument, not a constant of the programs.
    def drift_fn(xp):
        return make_drift_fn(backbone_fn, xp, memory_budget=memory_budget,
                             conv=convs.for_ntk(model.conv))

    factors = jax.jit(lambda p, s, xp: drift_fn(xp).factors(p, s))
    from_factors = jax.jit(lambda ft, fn, xp: drift_fn(xp).from_factors(ft, fn))

    task = tasks.of(model)

    def evaluate(params, stats, data):
        """Eval mode; ``*_acc`` is the task's metric (accuracy, or ROC-AUC)."""
        v = steps.variables(params, stats)
        logits, _ = steps.predict(model, v, data["train_x"])
        y = data["train_y"]
        out = {"train_acc": task.metric(logits, y), "train_loss": task.loss(logits, y, 1.0),
               "aie": task.energy(logits, y)}
        for split in ("val", "test"):
            xs = data[f"{split}_x"]
            out[f"{split}_acc"] = (task.metric(steps.predict(model, v, xs)[0], data[f"{split}_y"])
                                   if xs.shape[0] else jnp.float32(jnp.nan))
        return out

    def schedule(bb_params, bb_stats):
        return drift_fn(x_probe).plan(bb_params, bb_stats)["schedule"]

    return Programs(ft_steps, _AOT(ft_steps.run), _AOT(factors, x_probe),
                    _AOT(from_factors, x_probe), _AOT(jax.jit(evaluate)), schedule)


# --------------------------------------------------------------------------
# One FT run with probes


def drift_run(progs: Programs, params: Tree, batch_stats: Tree, data: dict, key, *,
              every: int, mesh=None, on_probe: Callable | None = None,
              progress: bool = True, desc: str = "drift") -> dict:
    """Finetune from ``(params, batch_stats)`` for ``progs.total_steps`` steps, probing.

    ``data``: on-device ``train_x, train_y, val_x, val_y, test_x, test_y``;
    ``key``: the FT data-order key (``rng.seed_key(seed, FT_DATA)``).
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
    t_start = time.perf_counter()
    compile0 = progs.compile_s()
    total = progs.total_steps
    at = probe_steps(total, every)
    x, y = data["train_x"], data["train_y"]
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
            state, _ = clock("train", lambda: progs.run(state, x, y, key, i32(cur), i32(t)))
            pb.update(t - cur)
            cur = t
        ev = jax.device_get(clock("eval", lambda: progs.evaluate(state.params, state.batch_stats,
                                                                 data)))
        if not np.isfinite(ev["train_loss"]):
            raise errors.NonFiniteLossError(
                f"{desc}: the training loss is not finite at FT step {t}; lower the FT lr")
        before = jax.device_get(state) if on_probe is not None else None
        if cached is not None and cached[0] != t:
            cached = None   # free the stale factors first: two sets at most are held
        f_t = cached[1] if cached is not None else clock(
            "factors", lambda: progs.factors(*backbone_of(state.params, state.batch_stats)))
        cached = None
        state, m = clock("train", lambda: progs.run(state, x, y, key, i32(t), i32(t + 1)))
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
        state, _ = clock("train", lambda: progs.run(state, x, y, key, i32(cur), i32(total)))
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


def check(cfg: DriftConfig, loaded: prepare.Loaded) -> None:
    """The probe count must fit the downstream training set, and the probe
    must fit ``--memory-budget`` (the scheduler says so from shapes alone)."""
    idx = probe_indices(loaded.num_train, cfg.probes, seed=PROBE_SEED, what="--probes")
    budget = probe_budget(cfg, loaded)
    if budget is not None:
        shapes = jax.eval_shape(lambda: loaded.model.init(
            jax.random.key(0), loaded.x_example(), train=False))
        bb, stats = backbone_of(shapes["params"], shapes.get("batch_stats", {}))
        stats = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), stats)  # small; f closes over it
        f = lambda p, x, s: loaded.model.backbone.apply(  # noqa: E731
            steps.variables(p, s), x, train=False)
        x_probe = jnp.asarray(loaded.ds.train.x[idx])
        make_drift_fn(f, x_probe, memory_budget=budget,
                      conv=convs.for_ntk(loaded.model.conv)).plan(bb, stats)


def run(cfg: DriftConfig, run: RunDir, loaded: prepare.Loaded, *, progress: bool = True,
        on_probe: Callable | None = None) -> None:
    """Run (or continue) the experiment into ``run``.

    Settings already logged (event ``drift``, by setting and seed) are skipped.
    ``on_probe(setting, seed, t, state_t, state_next)`` is for tests.
    """
    sw = cfg.sweep
    done = {(r["setting"], r["seed"]) for r in run.records("drift")}
    todo = [(s, seed) for s in settings(cfg) for seed in sw.seeds if (s.name, seed) not in done]
    if not todo:
        return
    ds, model = loaded.ds, loaded.model
    idx = probe_indices(loaded.num_train, cfg.probes, seed=PROBE_SEED, what="--probes")
    prep = prepare.prepare(sw, run, loaded=loaded, progress=progress,
                           with_hp=any(s.tau is not None for s, _ in todo))
    parallel.check_divisible(sw.ft.batch_size, prep.mesh, what="FT")
    progs = make_programs(model, sw.ft, num_classes=loaded.num_classes,
                          num_train=loaded.num_train, x_probe=ds.train.x[idx], mesh=prep.mesh,
                          augment=sw.data.augment, memory_budget=probe_budget(cfg, loaded))
    every = resolve_every(cfg.every, progs.total_steps)
    dev = parallel.put_replicated({k: jnp.asarray(v) for k, v in prep.arrays().items()},
                                  prep.mesh)
    for s, seed in todo:
        if s.tau is None:
            params, stats = prepare.scratch_init(model, loaded.x_example(), seed)
        else:
            params, stats = prep.init(prepare.RunKey("hp", seed, s.tau))
        hook = None if on_probe is None else (
            lambda t, a, b, _s=s.name, _seed=seed: on_probe(_s, _seed, t, a, b))
        res = drift_run(progs, params, stats, dev, seed_key(seed, FT_DATA), every=every,
                        mesh=prep.mesh, on_probe=hook, progress=progress,
                        desc=f"drift {s.name} seed={seed}")
        res.pop("final_state")
        sched = (None if cfg.memory_budget is None
                 else progs.schedule(*backbone_of(params, stats)))
        run.log("drift", setting=s.name, label=s.label, tau=s.tau, seed=seed,
                memory_budget=cfg.memory_budget, probe_schedule=sched,
                epochs=sw.ft.epochs, total_steps=progs.total_steps,
                steps_per_epoch=progs.num_batches, every=every, probes=cfg.probes,
                probe_idx=idx, **res)


# --------------------------------------------------------------------------
# Report, from metrics.jsonl alone


def records(run) -> list[dict]:
    """``drift`` records, scratch first, then by τ and seed (last one wins)."""
    by = {}
    for r in run.records("drift"):
        by[(r["setting"], r["seed"])] = r
    return sorted(by.values(), key=lambda r: (r["tau"] is not None, r["tau"] or 0, r["seed"]))


def _mean(xs) -> float:
    a = np.asarray([v for v in xs if v is not None], dtype=float)
    return float(a.mean()) if a.size else math.nan


def table(recs: list[dict]) -> str:
    """Markdown: one row per setting and seed."""
    head = ["setting", "seed", "AIE at t=0", "k_norm t=0", "k_norm end", "mean k_gap",
            "k_gap/k_norm t=0", "mean k_gap/k_norm", "train acc end", "val acc end"]
    return md_table(head, ([
        r["label"], r["seed"], f"{r['aie'][0]:.3f}", f"{r['k_norm'][0]:.4g}",
        f"{r['k_norm_next'][-1]:.4g}", f"{_mean(r['k_gap']):.3g}", f"{r['rel_gap'][0]:.3g}",
        f"{_mean(r['rel_gap']):.3g}", f"{100 * r['final']['train_acc']:.1f}%",
        f"{100 * r['final']['val_acc']:.1f}%"] for r in recs))


def timing_table(recs: list[dict]) -> str:
    head = ["setting", "seed", "FT steps", "probes", "FT step (ms)", "probe (s)",
            "of which factors (s)", "probe / FT step", "probing share of wall", "wall (s)",
            "compile (s)"]

    def row(r):
        tm = r["timing"]
        return [r["label"], r["seed"], r["total_steps"], tm["probe_calls"],
                f"{1e3 * tm['step_s']:.2f}", f"{tm['probe_s_each']:.3f}",
                f"{tm.get('factors_s', math.nan) / tm['probe_calls']:.3f}",
                f"{tm['probe_over_step']:.0f}x", f"{100 * tm['probe_frac']:.0f}%",
                f"{tm['wall_s']:.1f}", f"{tm['compile_s']:.1f}"]

    return md_table(head, (row(r) for r in recs))


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


def schedule_lines(recs: list[dict]) -> list[str]:
    """How the probe was chunked (records from before --memory-budget: none)."""
    r = next((r for r in recs if r.get("probe_schedule")), None)
    if r is None:
        return []
    s = r["probe_schedule"]
    budget = ("no memory budget" if r.get("memory_budget") is None
              else f"--memory-budget {r['memory_budget'] / 1e9:.3g} GB")
    how = ("per-sample factors of both states stored" if s["mode"] == "stored" else
           f"output panels of {s['k']} and streams of {s['s']} recomputed, "
           f"{s['passes']:.2f} factor passes per state")
    return [f"eNTK probe ({budget}): {how}; estimated peak of the probe "
            f"{s['est_bytes'] / 1e9:.2f} GB."]


def figure(run, recs: list[dict]) -> str:
    """``figures/drift.png`` over FT steps: train accuracy, k_norm, k_gap (the
    three panels of Fig. 6) and k_gap / k_norm."""
    fig, axes = plt().subplots(1, 4, figsize=(17, 3.6))
    multi_seed = len({r["seed"] for r in recs}) > 1
    taus = sorted({r["tau"] for r in recs if r["tau"] is not None})
    cmap = plt().cm.viridis(np.linspace(0.0, 0.85, max(len(taus), 1)))
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
    return save_figure(run, fig, "drift.png")


def report(run: RunDir, *, figures: bool = True) -> tuple[list[str], list[str]]:
    """``drift.md``'s parts and ``figures/drift.png``, from the records alone."""
    recs = records(run)
    if not recs:
        raise ValueError(f"{run.path} has no drift records in metrics*.jsonl yet")
    r0 = recs[0]
    parts = [
        f"# eNTK drift during FT: {run.path}",
        (f"{r0['probes']} probe samples ({r0['probes'] ** 2:,} pairs) from the downstream "
         f"training set; {r0['total_steps']} FT steps ({r0['epochs']} epochs x "
         f"{r0['steps_per_epoch']}), probed every {r0['every']} steps; k_gap/k_norm is the "
         "relative one-step kernel change. Accuracies and AIE: eval mode, training set."),
        table(recs),
        "## Cost of the probe",
        timing_table(recs),
        timing_summary(recs),
    ] + schedule_lines(recs)
    return parts, [figure(run, recs)] if figures else []


EXPERIMENT = Experiment("drift", DriftConfig, run, report, check=check, doc=__doc__,
                        help="eNTK drift (k_norm, k_gap) during FT: scratch vs pretrained + HPτ "
                             "(App. A, Fig. 6)")
