"""``hpft tricks``: the advanced tricks of Sec. 5.3 (Tables 2, 3; App. C.2, Tables 5-8).

Every case head-probes at one τ (the largest of the ``--tau`` list, which
is all that ``config.json`` keeps: the paper's tables probe to convergence)
and then finetunes everything:

* ``baseline``  linear head, η_HP = η_FT = 1, the whole pretrained backbone;
* ``mlp_head``  a 2-layer MLP head (``--head-hidden`` wide) instead;
* lsHP, (η_HP, η_FT) with η = ``--ls-eta`` (default 0.9), Table 2:
  ``lshp`` (η, 1) "more energy", ``ls_both`` (η, η) "small energy",
  ``ls_ft`` (1, η) "opposite energy"; the baseline is the (1, 1) case;
* ``reinit{k}`` partial backbone: the last k blocks are re-initialised and
  join the head (HP trains them with it), Table 3 / Tables 5-8. On ResNets
  these are the paper's L4.x blocks (``reinit3`` on ResNet50 re-initialises
  L4.1-L4.3); on the MLP toy, the last k Dense layers.

Per case and seed it logs a ``trick`` event with HP-train-acc (eval mode,
at τ), 1 − E cos(z_T, z_0), E‖z_T − z_0‖², FT validation accuracy (early
stopping picks the epoch) and FT test accuracy (reported only), then writes
``tricks.md`` (mean ± std over seeds) and ``figures/tricks.png``.

What z is: always the classifier's penultimate features, the input of the
task head ``params/head``, on the unaugmented training inputs in eval mode.
With the MLP head that is the backbone output, not the MLP's hidden layer;
with a partial backbone it is the output of the *re-initialised* last
blocks, so z_0 is the feature of freshly initialised and head-probed blocks.

Runs that share an architecture and η_FT finetune together under ``vmap``
(baseline, lsHP with η_FT = 1 and every partial backbone are one program),
unless ``--sequential``. The pretrained backbone is the sweep's
(:func:`hpft_jax.prepare.pretrained_for`, :func:`hpft_jax.prepare.base_variables`);
HP runs once per head and partial backbone (:func:`hpft_jax.hp.probe`) and FT
is :func:`hpft_jax.ft.finetune`. Rerunning the same command skips logged runs.

    hpft tricks                         # the digits toy, default config
    hpft tricks --tau 64 --seeds 0,1    # probe 64 epochs instead
    hpft tricks --reinit 1,2 --name tricks_r12
"""

from __future__ import annotations

import dataclasses
import math
import shutil

import jax.numpy as jnp
import numpy as np

from hpft_jax import checkpoint, ft, hp, parallel, prepare, sweep
from hpft_jax.config import SweepConfig
from hpft_jax.experiment import Experiment, sweep_field
from hpft_jax.flags import option
from hpft_jax.models import make_classifier
from hpft_jax.outputs import mean_std, md_table, plt, save_figure
from hpft_jax.params import head_block_names
from hpft_jax.prepare import RunKey
from hpft_jax.runlog import RunDir


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the table."""

    name: str
    label: str
    head: str = "linear"  # linear | mlp
    eta_hp: float = 1.0
    eta_ft: float = 1.0
    reinit_blocks: int = 0


def make_cases(*, ls_eta: float = 0.9, reinit=(1, 2, 3)) -> list[Case]:
    """The table's rows, in order; the baseline appears once."""
    if not 0.0 < ls_eta < 1.0:
        raise ValueError(f"ls_eta must lie in (0, 1) for the lsHP cases; got {ls_eta}")
    if any(int(k) != k or k < 1 for k in reinit) or len(set(reinit)) != len(reinit):
        raise ValueError(f"reinit must be distinct positive block counts; got {tuple(reinit)}")
    e = ls_eta
    return [
        Case("baseline", "baseline (linear head, η_HP = η_FT = 1)"),
        Case("mlp_head", "2-layer MLP head", head="mlp"),
        Case("lshp", f"lsHP η_HP={e:g}, η_FT=1 (more energy)", eta_hp=e),
        Case("ls_both", f"η_HP = η_FT = {e:g} (small energy)", eta_hp=e, eta_ft=e),
        Case("ls_ft", f"η_HP=1, η_FT={e:g} (opposite energy)", eta_ft=e),
    ] + [Case(f"reinit{k}", f"partial backbone: last {k} block(s) re-initialised",
              reinit_blocks=int(k)) for k in reinit]


def check_sweep(cfg: SweepConfig) -> None:
    """The baseline row must be the plain setting; the cases vary it."""
    bad = []
    if cfg.model.head != "linear":
        bad.append(f"--head {cfg.model.head} (the mlp_head case varies the head)")
    if cfg.model.reinit_blocks:
        bad.append(f"--reinit-blocks {cfg.model.reinit_blocks} (use --reinit for the cases)")
    if cfg.hp.eta != 1.0 or cfg.ft.eta != 1.0:
        bad.append("--eta-hp/--eta-ft other than 1 (set the smoothed η with --ls-eta)")
    if cfg.ls_eta is None:
        bad.append("--ls-eta none (the lsHP cases need η < 1)")
    if bad:
        raise ValueError("hpft tricks sets these per case; remove: " + "; ".join(bad))


@dataclasses.dataclass(frozen=True)
class TricksConfig:
    """``hpft tricks``; ``sweep`` supplies data, model, pretraining, HP, FT, seeds.

    HP runs at one τ: the largest of ``sweep.hp.taus``, which is all the
    config keeps. ``sweep.ls_eta`` is the smoothed η of the lsHP cases; the
    head, ``reinit_blocks`` and the η's are set per case (the sweep's must be
    the plain baseline). ``reinit``: the partial-backbone cases.
    """

    sweep: SweepConfig = sweep_field("tricks")
    reinit: tuple[int, ...] = option(
        (1, 2, 3), "partial-backbone cases: re-initialise the last k blocks, e.g. 1,2,3",
        flag="--reinit")

    def __post_init__(self):
        check_sweep(self.sweep)
        make_cases(ls_eta=self.sweep.ls_eta, reinit=self.reinit)  # raises on bad values
        taus = self.sweep.hp.taus
        if len(taus) > 1:
            hp_cfg = dataclasses.replace(self.sweep.hp, taus=(taus[-1],))
            object.__setattr__(self, "sweep", dataclasses.replace(self.sweep, hp=hp_cfg))


def cases(cfg: TricksConfig) -> list[Case]:
    return make_cases(ls_eta=cfg.sweep.ls_eta, reinit=cfg.reinit)


def check(cfg: TricksConfig, loaded: prepare.Loaded) -> None:
    """Every ``--reinit`` count must fit the backbone."""
    n_blocks = loaded.model.backbone.num_blocks
    if max(cfg.reinit, default=0) > n_blocks:
        raise ValueError(f"--reinit {cfg.reinit}: the {cfg.sweep.model.backbone} backbone has "
                         f"only {n_blocks} blocks")


def _variant(eta: float) -> str:
    return f"eta={eta:g}"


def _probe(sw: SweepConfig, run: RunDir, model, pre_vars, ds, k: int, etas, *, mesh, progress):
    """HP snapshots at τ for a partial backbone of k blocks and each η_HP;
    saved under ``checkpoints/hp/<head>_reinit<k>`` and read back on reruns."""
    base, _ = prepare.base_variables(model, pre_vars, k, jnp.asarray(ds.train.x[:2]))
    path = run.checkpoints("hp", f"{sw.model.head}_reinit{k}")
    _, _, fparams, fstats, split = hp.split_head(model, base, k)
    variants = {_variant(e): e for e in sorted(set(etas))}
    if checkpoint.exists(path):
        tree, meta = checkpoint.load_tree(path)
        if sorted(tree) == sorted(variants):
            snaps = {(v, sw.hp.taus[-1]): (t["params"], t.get("batch_stats", {}) or {})
                     for v, t in tree.items()}
            return hp.Probe(split, fparams, fstats, snaps, meta["records"])
    probe = hp.probe(model, base, ds.train.x, ds.train.y, sw.hp, seeds=list(sw.seeds),
                     variants=variants, reinit_blocks=k, num_classes=ds.num_classes,
                     augment=sw.data.augment, mesh=mesh, progress=progress)
    tree = {v: {"params": p, "batch_stats": s} for (v, _), (p, s) in probe.snapshots.items()}
    checkpoint.save_tree(path, prepare.drop_empty(tree),
                         {"records": probe.records, "blocks": list(head_block_names(model, k))})
    return probe


def run(cfg: TricksConfig, run: RunDir, loaded: prepare.Loaded, *,
        progress: bool = True) -> None:
    """Run (or continue) every case into ``run``; logged (case, seed) pairs are skipped."""
    sw = cfg.sweep
    all_cases = cases(cfg)
    tau, seeds = sw.hp.taus[-1], list(sw.seeds)
    done = {(r["case"], r["seed"]) for r in run.records("trick") if r["tau"] == tau}
    todo = [(c, s) for c in all_cases for s in seeds if (c.name, s) not in done]
    if not todo:
        return

    mesh = parallel.data_mesh()
    ds = loaded.ds
    pre_vars = prepare.pretrained_for(sw, run, mesh=mesh, progress=progress)
    data = prepare.split_arrays(ds)
    order = {c.name: i for i, c in enumerate(all_cases)}
    for head in ("linear", "mlp"):
        mcfg = dataclasses.replace(sw.model, head=head)
        hcfg = dataclasses.replace(sw, model=mcfg)
        model = make_classifier(mcfg, ds.num_classes)
        mine = [(c, s) for c, s in todo if c.head == head]
        if not mine:
            continue
        probes = {}
        for k in sorted({c.reinit_blocks for c, _ in mine}):
            etas = [c.eta_hp for c in all_cases if c.head == head and c.reinit_blocks == k]
            probes[k] = _probe(hcfg, run, model, pre_vars, ds, k, etas, mesh=mesh,
                               progress=progress)
        for eta_ft in sorted({c.eta_ft for c, _ in mine}, reverse=True):
            group = [(c, s) for c, s in mine if c.eta_ft == eta_ft]
            batches = [group] if sw.vmap else [[r] for r in group]
            ft_cfg = dataclasses.replace(sw.ft, eta=eta_ft)
            for batch in batches:
                inits = [prepare.ft_inits(probes[c.reinit_blocks],
                                          [RunKey(_variant(c.eta_hp), s, tau)], seeds)[0]
                         for c, s in batch]
                gid = sweep.group_id([(c.name, s) for c, s in batch])
                results, _ = ft.finetune(
                    model, ft_cfg, inits, [s for _, s in batch], data, ds.train.x, ds.train.y,
                    num_classes=ds.num_classes, augment=sw.data.augment, mesh=mesh,
                    ckpt_dir=run.checkpoints("ft", gid), progress=progress,
                    names=[f"{c.name} seed={s}" for c, s in batch])
                for (c, s), res in zip(batch, results):
                    hp_rec = next(r for r in probes[c.reinit_blocks].records
                                  if r["variant"] == _variant(c.eta_hp) and r["seed"] == s
                                  and r["tau"] == tau)
                    res = {k: v for k, v in res.items() if k not in ("curves", "p0y_hist")}
                    run.log("trick", case=c.name, label=c.label, order=order[c.name], seed=s,
                            tau=tau, head=c.head, eta_hp=c.eta_hp, eta_ft=c.eta_ft,
                            reinit_blocks=c.reinit_blocks,
                            reinit_names=list(head_block_names(model, c.reinit_blocks)),
                            hp_train_acc=hp_rec["hp_train_acc"],
                            hp_train_loss=hp_rec["hp_train_loss"], aie_hp=hp_rec["aie_hp"],
                            **res)
                shutil.rmtree(run.checkpoints("ft", gid), ignore_errors=True)


# --------------------------------------------------------------------------
# Report

COLUMNS = (  # (key, header, scale, format)
    ("hp_train_acc", "HP-train-acc (%)", 100.0, "{:.2f}"),
    ("one_minus_cos", "1 − E cos(z_T, z_0)", 1.0, "{:.4f}"),
    ("dist_sq", "E‖z_T − z_0‖²", 1.0, "{:.4g}"),
    ("val_acc", "FT-val-acc (%)", 100.0, "{:.2f}"),
    ("test_acc", "FT-test-acc (%)", 100.0, "{:.2f}"),
)


def summarize(run: RunDir, tau: int | None = None) -> dict[str, dict]:
    """Per case (table order): its settings and mean/std over seeds."""
    recs = [r for r in run.records("trick") if tau is None or r["tau"] == tau]
    if not recs:
        raise ValueError(f"{run.path} has no trick records yet")
    tau = recs[-1]["tau"] if tau is None else tau
    by: dict[str, list[dict]] = {}
    for r in sorted((r for r in recs if r["tau"] == tau), key=lambda r: (r["order"], r["seed"])):
        by.setdefault(r["case"], []).append(r)
    out = {}
    for name, rs in by.items():
        row = {k: rs[0][k] for k in ("label", "head", "eta_hp", "eta_ft", "reinit_blocks",
                                     "reinit_names", "tau")}
        row["seeds"] = [r["seed"] for r in rs]
        row["hp_train_acc"] = mean_std(r["hp_train_acc"] for r in rs)
        row["one_minus_cos"] = mean_std(1.0 - r["adapt"]["cos"] for r in rs)
        row["dist_sq"] = mean_std(r["adapt"]["dist_sq"] for r in rs)
        row["val_acc"] = mean_std(r["val_acc"] for r in rs)
        row["test_acc"] = mean_std(r["test_acc"] for r in rs)
        row["aie"] = mean_std(r["aie"] for r in rs)
        out[name] = row
    return out


def table(summary: dict) -> str:
    """Markdown: one row per case, mean ± std over seeds."""
    head = ["case", "head", "η_HP", "η_FT", "re-initialised"] + [h for _, h, _, _ in COLUMNS]

    def row(name, r):
        cells = [name, r["head"], f"{r['eta_hp']:g}", f"{r['eta_ft']:g}",
                 ", ".join(r["reinit_names"]) or "–"]
        for key, _, scale, fmt in COLUMNS:
            m, s = r[key]
            cells.append("n/a" if math.isnan(m) else
                         f"{fmt.format(scale * m)} ± {fmt.format(scale * s)}")
        return cells

    return md_table(head, (row(n, r) for n, r in summary.items()))


def figure(run: RunDir, summary: dict) -> str:
    """Grouped bars, one panel per table column; returns the path."""
    names = list(summary)
    fig, axes = plt().subplots(1, 4, figsize=(3.2 * 4, 3.6))
    colors = plt().cm.tab10(np.arange(len(names)) % 10)
    for ax, (key, header, scale, _) in zip(axes, COLUMNS[:4]):
        m = np.array([summary[n][key][0] for n in names]) * scale
        s = np.array([summary[n][key][1] for n in names]) * scale
        ax.bar(range(len(names)), m, yerr=s, color=colors, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(header, fontsize=10)
        if scale == 100.0:
            lo = np.nanmin(m - s)
            ax.set_ylim(max(0.0, lo - 0.1 * (100 - lo) - 1), 100.5)
        ax.grid(axis="y", alpha=0.3)
    tau = next(iter(summary.values()))["tau"]
    fig.suptitle(f"Advanced tricks: HP τ = {tau} epochs, then FT (mean ± std over seeds)")
    return save_figure(run, fig, "tricks.png")


def report(run: RunDir, *, figures: bool = True) -> tuple[list[str], list[str]]:
    """``tricks.md``'s parts and ``figures/tricks.png``, from the records alone."""
    summary = summarize(run)
    tau = next(iter(summary.values()))["tau"]
    parts = [f"# Advanced tricks: {run.path}",
             (f"HP for τ = {tau} epochs, then FT; mean ± std over seeds; τ and every FT "
              "setting shared by all rows. z is the head's input (penultimate features) on "
              "the training inputs."),
             table(summary)]
    return parts, [figure(run, summary)] if figures else []


EXPERIMENT = Experiment("tricks", TricksConfig, run, report, check=check, doc=__doc__,
                        help="MLP head, lsHP (η_HP, η_FT) cases, partial backbone "
                             "(Tables 2, 3, 5-8)")
