"""``hpft autotau``: choose τ from the HP pass alone, then finetune only at τ̂.

One HP pass with a snapshot at every τ of ``--taus`` (exactly the sweep's,
:func:`hpft_jax.prepare.prepare`) gives the seed-mean average initial energy
AIE(τ) = E‖e_y − p_0‖₂ (Prop. 1) and the HP train accuracy at every τ. The
rule (:mod:`hpft_jax.autotau_signal`, reasoning in docs/autotau.md):

    spent(τ) = (A(τ_0) − A(τ)) / (A(τ_0) − min A)    direction proxy
    τ̂ = argmax_τ spent(τ) · A(τ)                     direction × energy left

one τ̂ shared by the seeds (the seed-mean curve), no constant to tune. FT
then runs only at τ̂, for every seed, with the sweep's early-stopped FT.
``runs/<name>/autotau.json`` holds τ̂, the signal per τ, FT validation and
test accuracy (mean, std over seeds) and the FT compute fraction;
``figures/autotau_signal.png`` the signal against τ with τ̂ marked.

``--validate`` runs, for each of ``--settings`` (a fixed table of data,
model and HP changes applied on top of the flags), the full sweep (τ* on
validation) and autotau, each in its own run directory under
``runs/<name>/<setting>/``, and writes the comparison table with the
baselines τ = 0, τ = max, the HP-train-acc early-stopping point and the
best fixed τ across settings chosen in hindsight (on test: an oracle).
Finished settings are skipped on a rerun, and sweeps resume.

    hpft autotau                                  # default digits setting
    hpft autotau --validate --name autotau_val    # the 7-setting table
    hpft autotau --report-only
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any

import numpy as np

from hpft_jax import autotau_signal as sig_lib, ft, prepare, steps
from hpft_jax.config import SweepConfig
from hpft_jax.experiment import Experiment, sweep_field
from hpft_jax.flags import option
from hpft_jax.outputs import STD_NOTE, mean_std, md_table, plt, save_figure
from hpft_jax.runlog import RunDir

# name -> (label, {section: {field: value}}) applied on top of the flags.
SETTINGS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "default": ("digits 0-2, ±30° + zoom (default)", {}),
    "rot0": ("no distortion (0°, no zoom)", {"data": {"distort": False}}),
    "rot15": ("±15° + zoom", {"data": {"max_rotation": 15.0}}),
    "rot45": ("±45° + zoom", {"data": {"max_rotation": 45.0}}),
    "unseen": ("pretrain on 3-9, transfer to 0-2",
               {"data": {"source": "digits:3,4,5,6,7,8,9", "downstream": "digits:0,1,2"}}),
    "mlp_head": ("MLP head", {"model": {"head": "mlp"}}),
    "hp_lr_1e-2": ("HP lr 1e-2 (10x)", {"hp": {"lr": 1e-2}}),
}


@dataclasses.dataclass(frozen=True)
class AutotauConfig:
    """``hpft autotau``; ``sweep`` supplies data, model, pretraining, HP (the τ
    grid), FT and seeds. ``ls_eta`` must be None (no lsHP run is needed)."""

    sweep: SweepConfig = sweep_field("autotau", ls_eta=None)
    validate: bool = option(False, "run the full sweep and autotau for every --settings entry "
                            "and write the comparison table")
    settings: tuple[str, ...] = option(tuple(SETTINGS), "settings for --validate, from: "
                                       + ", ".join(SETTINGS))

    def __post_init__(self):
        if self.sweep.ls_eta is not None:
            raise ValueError("hpft autotau runs no lsHP: ls_eta must be None "
                             f"(remove --ls-eta); got {self.sweep.ls_eta}")
        if not self.settings:
            raise ValueError("--settings is empty")
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad:
            raise ValueError(f"unknown --settings {bad}; known: {', '.join(SETTINGS)}")
        if len(set(self.settings)) != len(self.settings):
            raise ValueError(f"--settings repeats a name: {self.settings}")
        if len(self.sweep.hp.taus) < 2:
            raise ValueError(f"autotau needs at least two τ to choose from; got "
                             f"{self.sweep.hp.taus}")
        if self.sweep.shard != (0, 1):
            raise ValueError("hpft autotau does not shard (remove --shard)")


def setting_config(base: SweepConfig, setting: str, role: str, parent: str) -> SweepConfig:
    """``base`` with ``setting``'s changes, named ``parent/setting/role``."""
    changes = {sec: dataclasses.replace(getattr(base, sec), **fields)
               for sec, fields in SETTINGS[setting][1].items()}
    return dataclasses.replace(base, name=f"{parent}/{setting}/{role}", ls_eta=None, **changes)


# --------------------------------------------------------------------------
# Running


def run(cfg: AutotauConfig, run: RunDir, loaded: prepare.Loaded, *,
        progress: bool = True) -> None:
    if cfg.validate:
        return validate(cfg, run, progress=progress)
    sw = cfg.sweep
    prep = prepare.prepare(sw, run, loaded=loaded, progress=progress)
    if not any(True for _ in run.records("signal")):
        run.log("signal", **sig_lib.signal(prep.probe.records, sw.seeds))
    tau = next(run.records("signal"))["tau_hat"]
    done = {r["seed"] for r in run.records("ft") if r["tau"] == tau}
    todo = [s for s in sw.seeds if s not in done]
    if not todo:
        return
    ds = loaded.ds
    keys = [prepare.RunKey("hp", s, tau) for s in todo]
    nb = steps.num_batches(loaded.num_train, sw.ft.batch_size)
    t0 = time.perf_counter()
    results, _ = ft.finetune(loaded.model, sw.ft, prep.inits(keys), todo, prep.arrays(),
                             ds.train.x, ds.train.y, num_classes=ds.num_classes,
                             augment=sw.data.augment, mesh=prep.mesh,
                             ckpt_dir=run.checkpoints("ft", f"tau{tau}"),
                             names=[k.label for k in keys], progress=progress)
    wall = time.perf_counter() - t0
    for k, res in zip(keys, results):
        run.log("ft", variant="hp", seed=k.seed, tau=tau, eta_hp=sw.hp.eta, eta_ft=sw.ft.eta,
                steps_per_epoch=nb, batch_wall_s=wall, **res)
    shutil.rmtree(run.checkpoints("ft", f"tau{tau}"), ignore_errors=True)


def validate(cfg: AutotauConfig, run: RunDir, *, progress: bool = True) -> None:
    """Full sweep + autotau per setting; one ``setting`` event each."""
    from hpft_jax import report as report_lib, sweep as sweep_lib  # noqa: PLC0415

    done = {r["setting"] for r in run.records("setting")}
    parent = cfg.sweep.name
    for name in cfg.settings:
        if name in done:
            continue
        scfg = setting_config(cfg.sweep, name, "sweep", parent)
        t0 = time.perf_counter()
        srun = sweep_lib.run_sweep(scfg, progress=progress)
        sweep_wall = time.perf_counter() - t0
        acfg = dataclasses.replace(cfg, validate=False,
                                   sweep=setting_config(cfg.sweep, name, "autotau", parent))
        t0 = time.perf_counter()
        arun = EXPERIMENT.execute(acfg, progress=progress)
        auto_wall = time.perf_counter() - t0
        EXPERIMENT.report(arun, figures=True, out=lambda _s: None)
        with open(os.path.join(arun.path, "autotau.json")) as f:
            auto = json.load(f)
        summ = report_lib.summarize(srun)
        taus = sorted(t for v, t in summ if v == "hp")
        ft_recs = [r for r in srun.records("ft") if r["variant"] == "hp"]
        run.log("setting", setting=name, label=SETTINGS[name][0], taus=taus,
                tau_star=report_lib.pick_tau_star(summ),
                tau_hat=auto["tau_hat"], tau_hp_es=auto["tau_hp_es"],
                test=[list(summ[("hp", t)]["test_acc"]) for t in taus],
                val=[list(summ[("hp", t)]["val_acc"]) for t in taus],
                auto_test=auto["ft_test_acc"], auto_val=auto["ft_val_acc"],
                auto_epochs=sum(auto["ft_epochs_run"]),
                sweep_epochs=sum(r["epochs_run"] for r in ft_recs), sweep_runs=len(ft_recs),
                compute_bound=auto["ft_compute_fraction"],
                sweep_wall_s=sweep_wall, autotau_wall_s=auto_wall,
                sweep_dir=srun.path, autotau_dir=arun.path)


# --------------------------------------------------------------------------
# Report


def summary(run: RunDir) -> dict:
    """autotau.json's content, from the logged events alone."""
    cfg = run.read_config(AutotauConfig)
    sig = next(run.records("signal"), None)
    if sig is None:
        raise FileNotFoundError(f"{run.path} holds no autotau signal yet: run hpft autotau")
    sig = {k: v for k, v in sig.items() if k != "event"}
    tau = sig["tau_hat"]
    fts = {r["seed"]: r for r in run.records("ft") if r["tau"] == tau}
    fts = [fts[s] for s in sorted(fts)]
    sw = cfg.sweep
    nb = fts[0]["steps_per_epoch"] if fts else None
    epochs = [r["epochs_run"] for r in fts]
    return {
        "tau_hat": tau,
        "rule": "argmax_tau spent(tau) * AIE(tau), seed-mean AIE, ties to smaller tau",
        "tau_hp_es": sig["tau_hp_es"],
        "signal": {k: sig[k] for k in ("taus", "aie", "aie_std", "spent", "score",
                                       "hp_train_acc", "hp_train_acc_std", "hp_train_loss",
                                       "p0y_hist")},
        "spent_target": sig["spent_target"],
        "seeds": [r["seed"] for r in fts],
        "ft_val_acc": list(mean_std(r["val_acc"] for r in fts)),
        "ft_test_acc": list(mean_std(r["test_acc"] for r in fts)),
        "ft_val_acc_per_seed": [r["val_acc"] for r in fts],
        "ft_test_acc_per_seed": [r["test_acc"] for r in fts],
        "ft_epochs_run": epochs,
        "ft_steps_used": None if nb is None else int(sum(epochs) * nb),
        "ft_steps_sweep_max": None if nb is None else int(
            len(sw.hp.taus) * len(sw.seeds) * sw.ft.epochs * nb),
        "ft_compute_fraction": sig_lib.compute_fraction_bound(len(sw.seeds), len(sw.hp.taus),
                                                              len(sw.seeds)),
        "ft_compute_fraction_kind": (
            "bound at max epochs: autotau's FT runs / the sweep's FT runs "
            "(len(taus) x seeds, lsHP not counted), both at --ft-epochs; the measured ratio "
            "with early stopping is in hpft autotau --validate"),
    }


def signal_figure(run: RunDir, s: dict) -> str:
    sig = s["signal"]
    t = np.asarray(sig["taus"], dtype=float)
    x = np.where(t > 0, t, 0.5)  # τ = 0 drawn at 0.5 on the log axis
    fig, axes = plt().subplots(1, 3, figsize=(14, 3.8))
    axes[0].errorbar(x, sig["aie"], yerr=sig["aie_std"], marker="o", capsize=3)
    axes[0].set_ylabel("AIE(τ) = E‖e_y − p₀‖₂ (seed mean)")
    sc = [np.nan if v is None else v for v in sig["score"]]
    sp = [np.nan if v is None else v for v in sig["spent"]]
    axes[1].plot(x, sc, marker="o", label="score = spent · AIE")
    axes[1].plot(x, sp, marker=".", ls="--", label="spent (direction proxy)")
    axes[1].legend(fontsize=8)
    axes[1].set_ylabel("autotau signal")
    axes[2].errorbar(x, 100 * np.asarray(sig["hp_train_acc"]),
                     yerr=100 * np.asarray(sig["hp_train_acc_std"]), marker="o", capsize=3)
    axes[2].set_ylabel("HP train accuracy (%)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("HP epochs τ (τ = 0 drawn at 0.5)")
        ax.axvline(max(s["tau_hat"], 0.5), color="r", ls="-", label="τ̂")
        ax.axvline(max(s["tau_hp_es"], 0.5), color="gray", ls=":", label="HP-acc early stop")
        ax.grid(alpha=0.3)
    axes[0].legend(["τ̂ = %d" % s["tau_hat"], "HP-acc stop = %d" % s["tau_hp_es"]], fontsize=8)
    fig.suptitle(f"autotau: τ̂ = {s['tau_hat']} (error bars: {STD_NOTE})", fontsize=10)
    return save_figure(run, fig, "autotau_signal.png")


def _pct(ms) -> str:
    m, sd = ms
    return "n/a" if m is None or math.isnan(m) else f"{100 * m:.2f} ± {100 * sd:.2f}"


def single_report(run: RunDir, figures: bool) -> tuple[list[str], list[str]]:
    s = summary(run)
    with open(os.path.join(run.path, "autotau.json"), "w") as f:
        json.dump(s, f, indent=2)
    sig = s["signal"]
    rows = [[t, f"{a:.3f} ± {sd:.3f}", "n/a" if p is None else f"{p:.3f}",
             "n/a" if c is None else f"{c:.4f}", f"{100 * h:.1f}",
             ("**τ̂**" if t == s["tau_hat"] else "") + (" HP-acc stop" if t == s["tau_hp_es"]
                                                      else "")]
            for t, a, sd, p, c, h in zip(sig["taus"], sig["aie"], sig["aie_std"], sig["spent"],
                                         sig["score"], sig["hp_train_acc"])]
    parts = [
        "# hpft autotau",
        f"τ̂ = **{s['tau_hat']}** (rule: {s['rule']}); HP-train-acc early stop at "
        f"τ = {s['tau_hp_es']}.",
        md_table(["τ", "AIE", "spent", "score", "HP train acc (%)", ""], rows),
        f"FT at τ̂ over seeds {s['seeds']} ({STD_NOTE}): validation "
        f"{_pct(s['ft_val_acc'])} %, test {_pct(s['ft_test_acc'])} %; epochs run "
        f"{s['ft_epochs_run']}.",
        f"FT compute fraction {100 * s['ft_compute_fraction']:.1f} % "
        f"({s['ft_compute_fraction_kind']}); FT steps used {s['ft_steps_used']} of at most "
        f"{s['ft_steps_sweep_max']} for the sweep.",
    ]
    paths = [signal_figure(run, s)] if figures and s["seeds"] else []
    return parts, paths


def validation_table(recs: list[dict]) -> dict:
    """Rows of the validation table and its summary, from ``setting`` events."""
    common = sorted(set.intersection(*(set(r["taus"]) for r in recs))) if recs else []
    acc = lambda r, t: r["test"][r["taus"].index(t)][0]  # noqa: E731
    # Best fixed τ across settings, chosen in hindsight on test (an oracle baseline).
    fixed = (max(common, key=lambda t: (np.mean([acc(r, t) for r in recs]), -t))
             if common else None)
    rows = []
    for r in recs:
        a_star, a_hat = acc(r, r["tau_star"]), r["auto_test"][0]
        a0, amax = acc(r, r["taus"][0]), acc(r, r["taus"][-1])
        rows.append({
            "setting": r["setting"], "label": r["label"], "tau_star": r["tau_star"],
            "tau_hat": r["tau_hat"], "tau_hp_es": r["tau_hp_es"], "acc_star": a_star,
            "acc_hat": a_hat, "acc_hat_std": r["auto_test"][1],
            "acc_hat_in_sweep": acc(r, r["tau_hat"]), "acc_0": a0, "acc_max": amax,
            "acc_hp_es": acc(r, r["tau_hp_es"]),
            "acc_fixed": None if fixed is None else acc(r, fixed),
            "regret": a_star - a_hat, "vs_best_extreme": max(a0, amax) - a_hat,
            "compute_actual": r["auto_epochs"] / r["sweep_epochs"],
            "compute_bound": r["compute_bound"],
            "sweep_wall_s": r["sweep_wall_s"], "autotau_wall_s": r["autotau_wall_s"]})
    mean = lambda k: float(np.mean([row[k] for row in rows])) if rows else math.nan  # noqa: E731
    regrets = {k: mean("acc_star") - mean(k) for k in
               ("acc_hat", "acc_0", "acc_max", "acc_hp_es", "acc_fixed")} if rows else {}
    return {"rows": rows, "fixed_tau": fixed, "mean_regret": mean("regret"),
            "mean_regret_by_method": regrets,
            "max_vs_best_extreme": max((row["vs_best_extreme"] for row in rows), default=None),
            "mean_compute_actual": mean("compute_actual"),
            "max_compute_actual": max((row["compute_actual"] for row in rows), default=None)}


def _pts(x, fmt: str = "+.2f") -> str:
    return "n/a" if x is None else format(100 * x, fmt)


def validate_report(run: RunDir, figures: bool) -> tuple[list[str], list[str]]:
    by = {}
    for r in run.records("setting"):
        by[r["setting"]] = r
    cfg = run.read_config(AutotauConfig)
    recs = [by[s] for s in cfg.settings if s in by]
    v = validation_table(recs)
    with open(os.path.join(run.path, "autotau_validate.json"), "w") as f:
        json.dump(v, f, indent=2)
    p = lambda x: "n/a" if x is None else f"{100 * x:.2f}"  # noqa: E731
    rows = [[r["setting"], r["tau_star"], r["tau_hat"],
             p(r["acc_star"]), f"{p(r['acc_hat'])} ± {p(r['acc_hat_std'])}",
             f"{100 * r['regret']:+.2f}", p(r["acc_0"]), p(r["acc_max"]),
             f"{p(r['acc_hp_es'])} (τ={r['tau_hp_es']})", p(r["acc_fixed"]),
             f"{100 * r['vs_best_extreme']:+.2f}",
             f"{100 * r['compute_actual']:.1f} % ({100 * r['compute_bound']:.1f} %)"]
            for r in v["rows"]]
    head = ["setting", "τ*", "τ̂", "acc(τ*)", "acc(τ̂)", "regret", "τ=0", "τ=max",
            "HP-acc stop", f"fixed τ={v['fixed_tau']} (hindsight)",
            "max(τ=0, τ=max) − acc(τ̂)", "FT compute measured (bound)"]
    mr = v["mean_regret_by_method"]
    parts = [
        "# hpft autotau --validate",
        f"Settings done: {len(recs)} of {len(cfg.settings)}. Test accuracy (%) at each τ, "
        f"mean over seeds {list(cfg.sweep.seeds)}; τ* picked on validation by the sweep; "
        "acc(τ̂) from autotau's own FT runs (± std over seeds); the other columns from the "
        "sweep's FT runs.",
        md_table(head, rows),
        "Mean regret acc(τ*) − acc(method), points: " + ", ".join(
            f"{k.replace('acc_', '')}: {100 * x:+.2f}" for k, x in mr.items()) +
        f". Worst max(τ=0, τ=max) − acc(τ̂): {_pts(v['max_vs_best_extreme'])}; FT compute "
        f"measured mean {100 * v['mean_compute_actual']:.1f} %, max "
        f"{_pts(v['max_compute_actual'], '.1f')} %.",
        md_table(["setting", "description", "sweep wall (s)", "autotau wall (s)",
                  "acc(τ̂) in the sweep's runs"],
                 [[r["setting"], r["label"], f"{r['sweep_wall_s']:.0f}",
                   f"{r['autotau_wall_s']:.0f}", p(r["acc_hat_in_sweep"])] for r in v["rows"]]),
    ]
    paths = [validation_figure(run, recs, v)] if figures and recs else []
    return parts, paths


def validation_figure(run: RunDir, recs: list[dict], v: dict) -> str:
    n = len(recs)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt().subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, r in zip(axes.flat, recs):
        t = np.asarray(r["taus"], dtype=float)
        x = np.where(t > 0, t, 0.5)
        m = 100 * np.asarray([a[0] for a in r["test"]])
        s = 100 * np.asarray([a[1] for a in r["test"]])
        ax.errorbar(x, m, yerr=s, marker="o", capsize=2, label="sweep test")
        ax.plot(x, 100 * np.asarray([a[0] for a in r["val"]]), ls="--", label="sweep val")
        ax.axvline(max(r["tau_star"], 0.5), color="g", label=f"τ*={r['tau_star']}")
        ax.axvline(max(r["tau_hat"], 0.5), color="r", ls="-.", label=f"τ̂={r['tau_hat']}")
        ax.set_xscale("log", base=2)
        ax.set_title(r["setting"], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("FT accuracy (%) vs τ per setting (τ = 0 drawn at 0.5)", fontsize=10)
    return save_figure(run, fig, "autotau_validate.png")


def report(run: RunDir, *, figures: bool = True) -> tuple[list[str], list[str]]:
    cfg = run.read_config(AutotauConfig)
    return validate_report(run, figures) if cfg.validate else single_report(run, figures)


EXPERIMENT = Experiment("autotau", AutotauConfig, run, report,
                        help="choose τ from the HP pass alone (energy rule), FT only at τ̂; "
                             "--validate against the swept τ*",
                        doc=__doc__)
