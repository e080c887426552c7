"""``hpft tricks``: the advanced tricks of Sec. 5.3 (Tables 2, 3; App. C.2, Tables 5-8).

Every case head-probes at one τ (the largest of the configured list: the
paper's tables probe to convergence) and then finetunes everything:

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
unless ``--sequential``. Rerunning the same command skips logged runs.

    hpft tricks                         # the digits toy, default config
    hpft tricks --tau 64 --seeds 0,1    # probe 64 epochs instead
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import shutil
from typing import Any

import numpy as np

Tree = Any


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


def tricks_config(cfg, *, tau: int | None = None):
    """``cfg`` with HP at one τ (default: the largest of ``cfg.hp.taus``)."""
    tau = cfg.hp.taus[-1] if tau is None else int(tau)
    return dataclasses.replace(cfg, hp=dataclasses.replace(cfg.hp, taus=(tau,)))


def check_config(cfg) -> None:
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
    if len(cfg.hp.taus) != 1:
        bad.append(f"several τ {cfg.hp.taus} (use tricks_config)")
    if bad:
        raise ValueError("hpft tricks sets these per case; remove: " + "; ".join(bad))


def _variant(eta: float) -> str:
    return f"eta={eta:g}"


def _probe(cfg, run, model, skeleton, pre_vars, ds, k: int, etas, *, mesh, progress):
    """HP snapshots at τ for a partial backbone of k blocks and each η_HP;
    saved under ``checkpoints/hp/<head>_reinit<k>`` and read back on reruns."""
    from hpft_jax import checkpoint, hp
    from hpft_jax.params import head_block_names, is_head_path, load_pretrained

    blocks = head_block_names(model, k)
    base, _ = load_pretrained(skeleton, {n: v for n, v in pre_vars.items() if v},
                              reinit=lambda p: is_head_path(p, blocks))
    path = run.checkpoints("hp", f"{cfg.model.head}_reinit{k}")
    _, _, fparams, fstats, split = hp.split_head(model, base, k)
    variants = {_variant(e): e for e in sorted(set(etas))}
    if checkpoint.exists(path):
        tree, meta = checkpoint.load_tree(path)
        if sorted(tree) == sorted(variants):
            snaps = {(v, cfg.hp.taus[-1]): (t["params"], t.get("batch_stats", {}) or {})
                     for v, t in tree.items()}
            return hp.Probe(split, fparams, fstats, snaps, meta["records"])
    probe = hp.probe(model, base, ds.train.x, ds.train.y, cfg.hp, seeds=list(cfg.seeds),
                     variants=variants, reinit_blocks=k, num_classes=ds.num_classes,
                     augment=cfg.data.augment, mesh=mesh, progress=progress)
    tree = {v: {"params": p, **({"batch_stats": s} if s else {})}
            for (v, _), (p, s) in probe.snapshots.items()}
    checkpoint.save_tree(path, tree, {"records": probe.records, "blocks": list(blocks)})
    return probe


def _init(probe, variant: str, tau: int, seed_index: int):
    import jax

    from hpft_jax.params import merge

    p, s = probe.snapshots[(variant, tau)]
    take = lambda t: jax.tree_util.tree_map(lambda a: a[seed_index], t)  # noqa: E731
    return merge(probe.frozen_params, take(p)), merge(probe.frozen_stats, take(s))


def run_tricks(cfg, *, reinit=(1, 2, 3), progress: bool = True):
    """Run (or continue) every case; ``cfg`` from :func:`tricks_config`.
    Returns the :class:`~hpft_jax.runlog.RunDir` (``runs/<name>``)."""
    import jax.numpy as jnp

    from hpft_jax import data as data_lib, ft, parallel, sweep
    from hpft_jax.models import make_classifier
    from hpft_jax.params import head_block_names
    from hpft_jax.runlog import RunDir

    check_config(cfg)
    cases = make_cases(ls_eta=cfg.ls_eta, reinit=tuple(reinit))
    n_blocks = make_classifier(cfg.model, 2).backbone.num_blocks
    if max(reinit, default=0) > n_blocks:
        raise ValueError(f"--reinit {tuple(reinit)}: the {cfg.model.backbone} backbone has "
                         f"only {n_blocks} blocks")
    run = RunDir(os.path.join(cfg.runs_dir, cfg.name))
    run.write_config(cfg)
    tau, seeds = cfg.hp.taus[-1], list(cfg.seeds)
    done = {(r["case"], r["seed"]) for r in run.records("trick") if r["tau"] == tau}
    todo = [(c, s) for c in cases for s in seeds if (c.name, s) not in done]
    if not todo:
        return run

    mesh = parallel.data_mesh()
    ds = data_lib.load_downstream(cfg.data)
    pre_vars = sweep.pretrained_for(cfg, run, mesh=mesh, progress=progress)
    data = sweep.split_arrays(ds)
    order = {c.name: i for i, c in enumerate(cases)}
    for head in ("linear", "mlp"):
        mcfg = dataclasses.replace(cfg.model, head=head)
        hcfg = dataclasses.replace(cfg, model=mcfg)
        model = make_classifier(mcfg, ds.num_classes)
        mine = [(c, s) for c, s in todo if c.head == head]
        if not mine:
            continue
        skeleton = _skeleton(model, jnp.asarray(ds.train.x[:2]))
        probes = {}
        for k in sorted({c.reinit_blocks for c, _ in mine}):
            etas = [c.eta_hp for c in cases if c.head == head and c.reinit_blocks == k]
            probes[k] = _probe(hcfg, run, model, skeleton, pre_vars, ds, k, etas, mesh=mesh,
                               progress=progress)
        for eta_ft in sorted({c.eta_ft for c, _ in mine}, reverse=True):
            group = [(c, s) for c, s in mine if c.eta_ft == eta_ft]
            batches = [group] if cfg.vmap else [[r] for r in group]
            ft_cfg = dataclasses.replace(cfg.ft, eta=eta_ft)
            for batch in batches:
                inits = [_init(probes[c.reinit_blocks], _variant(c.eta_hp), tau, seeds.index(s))
                         for c, s in batch]
                gid = hashlib.sha256(repr([(c.name, s) for c, s in batch]).encode()).hexdigest()[:12]
                results, _ = ft.finetune(
                    model, ft_cfg, inits, [s for _, s in batch], data, ds.train.x, ds.train.y,
                    num_classes=ds.num_classes, augment=cfg.data.augment, mesh=mesh,
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
    return run


def _skeleton(model, x_example):
    """The model's variables as zeros: only their structure matters, since
    head probing replaces every re-initialised leaf with its own fresh,
    seeded initialisation (:func:`hpft_jax.hp.init_heads`). Tracing only,
    no compilation."""
    import jax

    shapes = jax.eval_shape(lambda k: model.init(k, x_example, train=False), jax.random.key(0))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# --------------------------------------------------------------------------
# Report

COLUMNS = (  # (key, header, scale, format)
    ("hp_train_acc", "HP-train-acc (%)", 100.0, "{:.2f}"),
    ("one_minus_cos", "1 − E cos(z_T, z_0)", 1.0, "{:.4f}"),
    ("dist_sq", "E‖z_T − z_0‖²", 1.0, "{:.4g}"),
    ("val_acc", "FT-val-acc (%)", 100.0, "{:.2f}"),
    ("test_acc", "FT-test-acc (%)", 100.0, "{:.2f}"),
)


def _ms(xs) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None], dtype=float)
    return (math.nan, math.nan) if a.size == 0 else (float(a.mean()), float(a.std()))


def summarize(run, tau: int | None = None) -> dict[str, dict]:
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
        row["hp_train_acc"] = _ms(r["hp_train_acc"] for r in rs)
        row["one_minus_cos"] = _ms(1.0 - r["adapt"]["cos"] for r in rs)
        row["dist_sq"] = _ms(r["adapt"]["dist_sq"] for r in rs)
        row["val_acc"] = _ms(r["val_acc"] for r in rs)
        row["test_acc"] = _ms(r["test_acc"] for r in rs)
        row["aie"] = _ms(r["aie"] for r in rs)
        out[name] = row
    return out


def table(summary: dict) -> str:
    """Markdown: one row per case, mean ± std over seeds."""
    head = ["case", "head", "η_HP", "η_FT", "re-initialised"] + [h for _, h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary.items():
        cells = [name, row["head"], f"{row['eta_hp']:g}", f"{row['eta_ft']:g}",
                 ", ".join(row["reinit_names"]) or "–"]
        for key, _, scale, fmt in COLUMNS:
            m, s = row[key]
            cells.append("n/a" if math.isnan(m) else
                         f"{fmt.format(scale * m)} ± {fmt.format(scale * s)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(run, summary: dict) -> str:
    """Grouped bars, one panel per table column; returns the path."""
    from hpft_jax.report import _plt

    plt = _plt()
    names = list(summary)
    fig, axes = plt.subplots(1, 4, figsize=(3.2 * 4, 3.6))
    colors = plt.cm.tab10(np.arange(len(names)) % 10)
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
    fig.tight_layout()
    path = run.figures("tricks.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(run, *, write_figures: bool = True, out=print) -> str:
    """Print and write ``tricks.md`` (and the figure) from the records."""
    summary = summarize(run)
    tau = next(iter(summary.values()))["tau"]
    text = (f"# Advanced tricks: {run.path}\n\nHP for τ = {tau} epochs, then FT; "
            "mean ± std over seeds; τ and every FT setting shared by all rows. "
            "z is the head's input (penultimate features) on the training inputs.\n\n"
            + table(summary))
    if write_figures:
        text += "\n\nFigure: " + os.path.relpath(figure(run, summary), run.path)
    with open(os.path.join(run.path, "tricks.md"), "w") as f:
        f.write(text + "\n")
    out(text)
    return text


# --------------------------------------------------------------------------
# CLI


def _cmd(args: argparse.Namespace) -> None:
    from hpft_jax import cli

    cfg = cli.config_from_args(args)
    cfg = tricks_config(dataclasses.replace(cfg, name=getattr(args, "name", None) or "tricks"))
    run = run_tricks(cfg, reinit=args.reinit, progress=not args.quiet)
    report(run, write_figures=not args.no_figures)


def add_parser(subparsers) -> None:
    from hpft_jax import cli

    p = subparsers.add_parser(
        "tricks", help="MLP head, lsHP (η_HP, η_FT) cases, partial backbone (Tables 2, 3, 5-8)",
        description=__doc__.split("\n\n")[0])
    cli.add_config_flags(p)
    p.add_argument("--reinit", type=cli._ints, default=(1, 2, 3),
                   help="partial-backbone cases: re-initialise the last k blocks, e.g. 1,2,3")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(fn=_cmd)
