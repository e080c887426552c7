"""``hpft collapse``: Layer FT and SCL FT against linear probing and full FT.

The companion paper (Li et al., *Principled and efficient transfer learning
of deep models via neural collapse*, Sec. 3.3, Table 3, Fig. 10) compares
four ways to transfer a pretrained backbone, all from the same fresh linear
head (our τ = 0 head, so ``full_ft`` is the main sweep's HP0-FT):

* ``linear_probe``: only the head trains;
* ``layer_ft``: one block b and the head train, the rest is frozen (no
  gradients, no optimizer state);
* ``scl_ft``: as ``layer_ft``, and the head reads z = f(x) + zeropad(pool(h_b))
  (:class:`hpft_jax.scl.SCLClassifier`);
* ``full_ft``: everything trains.

All four go through :func:`hpft_jax.ft.finetune` with the same FTConfig,
seeds and early stopping on validation accuracy. BatchNorm runs in train
mode during every method, so running statistics update on the downstream
data in all four, linear probing included (companion paper, App. B.2).

For every method, block and seed the run logs (``metrics.jsonl``, event
``collapse_ft``) the accuracies, the number and percentage of parameters
trained, and, on the downstream *training* set in eval mode, the collapse
metrics of the head's input z (NC1, CDNV, numerical rank) and the NC1 of every
block's pooled output (layer-wise NC1). The pretrained backbone's metrics are
logged once (event ``nc_pretrained``). The pretrained backbone is the
sweep's (:func:`hpft_jax.prepare.prepare`, no HP). :func:`report` rebuilds
``collapse.md`` (the Table-3 layout) and the figures from ``metrics.jsonl``
alone.

    hpft collapse                            # every block of the toy MLP on digits
    hpft collapse --blocks dense1,dense2 --seeds 0,1
    hpft collapse --report-only              # tables and figures of runs/collapse
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax import ft, hp, neural_collapse as nc, prepare, scl
from hpft_jax.config import SweepConfig
from hpft_jax.experiment import Experiment, require_classification, sweep_field
from hpft_jax.flags import option
from hpft_jax.outputs import mean_std, md_table, plt, save_figure
from hpft_jax.params import count, is_head_path, merge, partition
from hpft_jax.runlog import RunDir

METHODS = ("linear_probe", "layer_ft", "scl_ft", "full_ft")
LABELS = {"linear_probe": "Linear probe", "layer_ft": "Layer FT", "scl_ft": "SCL FT",
          "full_ft": "Full FT"}
EVAL_CHUNK = 512  # examples per forward pass when measuring collapse


@dataclasses.dataclass(frozen=True)
class CollapseConfig:
    """``hpft collapse``; ``sweep`` supplies data, model, pretraining, FT and seeds.

    ``sweep.hp``, ``sweep.ls_eta`` and ``sweep.shard`` are not used (every
    method starts from the fresh τ = 0 head). ``blocks``: backbone block
    names to tune in Layer/SCL FT; empty means every block.
    """

    sweep: SweepConfig = sweep_field("collapse")
    blocks: tuple[str, ...] = option(
        (), "comma-separated block names to tune in Layer/SCL FT, e.g. dense2 or layer3_1; "
        "() = every block")
    methods: tuple[str, ...] = option(METHODS, "comma-separated subset of the methods")

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}; got {self.methods}")
        if len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"blocks has duplicates: {self.blocks}")
        if self.sweep.model.reinit_blocks:
            raise ValueError("hpft collapse needs the whole pretrained backbone: "
                             f"reinit_blocks must be 0; got {self.sweep.model.reinit_blocks}")


class Job(NamedTuple):
    method: str
    block: str | None  # None for linear_probe and full_ft

    @property
    def label(self) -> str:
        return LABELS[self.method] + ("" if self.block is None else f" {self.block}")


def block_names(model) -> list[str]:
    bb = model.backbone
    return [bb.block_name(i) for i in range(bb.num_blocks)]


def plan(cfg: CollapseConfig, model) -> list[Job]:
    """The FT runs, in order; unknown block names raise."""
    names = block_names(model)
    bad = [b for b in cfg.blocks if b not in names]
    if bad:
        raise ValueError(f"blocks {bad} are not blocks of {cfg.sweep.model.backbone}; "
                         f"choose from {names}")
    blocks = list(cfg.blocks) or names
    jobs = []
    for m in METHODS:
        if m in cfg.methods:
            jobs += [Job(m, b) for b in blocks] if m in ("layer_ft", "scl_ft") else [Job(m, None)]
    return jobs


def trainable(job: Job):
    """Path predicate of the trained parameters; None = everything."""
    if job.method == "full_ft":
        return None
    blocks = () if job.block is None else (job.block,)
    return lambda path: is_head_path(path, blocks)


def count_tuned(params, pred) -> tuple[int, int]:
    """(parameters trained, all parameters); BN scale/bias count, BN statistics do not.

    This convention reproduces the companion paper's percentages (Tables 3, 5,
    6: e.g. ResNet18, block 5 = ``layer3_1``, 10 classes: 8.27 %).
    """
    total = count(params)
    return (total if pred is None else count(partition(params, pred)[0])), total


# --------------------------------------------------------------------------
# Measuring collapse on the training set (eval mode)


class Meter:
    """Collapse metrics of trained variables on fixed inputs ``x (N, ...)``, ``y (N,)``.

    ``meter(model, variables)`` -> ``{"z": {nc1, cdnv, numerical_rank},
    "layer_nc1": {block name: NC1}}``: ``z`` is the head's input (for SCL
    the sum with the skip), ``layer_nc1`` the NC1 of every block's output
    after adaptive average pooling, streamed in two passes. Compiled
    functions are built once per model and reused across calls.
    """

    def __init__(self, plain_model, x, y, num_classes: int, *, chunk: int = EVAL_CHUNK):
        self.names = block_names(plain_model)
        self.blocks_fn = nc.block_features_fn(plain_model)  # same tree for SCL models
        self.k = num_classes
        self.chunks = [(x[i:i + chunk], y[i:i + chunk]) for i in range(0, len(x), chunk)]
        self.y = y
        self._z_fns: dict[Any, Any] = {}

    def _z(self, model, variables):
        if model not in self._z_fns:
            self._z_fns[model] = jax.jit(lambda v, x: model.apply(v, x, train=False)[1])
        fn = self._z_fns[model]
        return np.concatenate([np.asarray(fn(variables, xb)) for xb, _ in self.chunks])

    def _layer_stats(self, variables):
        means = None
        for xb, yb in self.chunks:
            fs, yb = self.blocks_fn(variables, jnp.asarray(xb)), jnp.asarray(yb)
            if means is None:
                means = [nc.mean_init(self.k, f.shape[-1]) for f in fs]
            means = [nc.mean_update(s, f, yb) for s, f in zip(means, fs)]
        scat = [nc.scatter_init(m) for m in means]
        for xb, yb in self.chunks:
            fs, yb = self.blocks_fn(variables, jnp.asarray(xb)), jnp.asarray(yb)
            scat = [nc.scatter_update(s, f, yb) for s, f in zip(scat, fs)]
        return [nc.finalize(m, s) for m, s in zip(means, scat)]

    def __call__(self, model, variables) -> dict:
        z = self._z(model, variables)
        layer = {n: nc.nc1_from_stats(s) for n, s in zip(self.names, self._layer_stats(variables))}
        return {"z": nc.collapse_metrics(z, self.y, self.k), "layer_nc1": layer}


# --------------------------------------------------------------------------
# The experiment


def _take(tree, i: int):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def finetune_job(model, job: Job, ft_cfg, inits, seeds, data: dict, *, num_classes: int,
                 augment: str = "none", mesh=None, progress: bool = True):
    """Finetune R runs of one method; ``(model used, results, final variables)``.

    ``model`` is the plain :class:`Classifier`; ``scl_ft`` wraps it with the
    skip. ``inits[r] = (params, batch_stats)``, ``data`` as for
    :func:`hpft_jax.ft.finetune` (AIE and the adaptation metrics use the
    training set). The final variables are stacked over the R runs.
    """
    m = scl.with_skip(model, job.block) if job.method == "scl_ft" else model
    results, final = ft.finetune(
        m, ft_cfg, inits, seeds, data, data["train_x"], data["train_y"], num_classes=num_classes,
        augment=augment, mesh=mesh, names=[f"{job.label} seed={s}" for s in seeds],
        progress=progress, trainable=trainable(job))
    return m, results, final


def check(cfg: CollapseConfig, loaded: prepare.Loaded) -> None:
    """Block names must be blocks of the backbone."""
    require_classification(loaded, "hpft collapse (neural-collapse metrics over classes)")
    plan(cfg, loaded.model)


def run(cfg: CollapseConfig, run: RunDir, loaded: prepare.Loaded, *,
        progress: bool = True) -> None:
    """Run (or continue) the experiment into ``run``.

    Finished (method, block, seed) runs are read back from ``metrics.jsonl``
    and skipped, so rerunning a killed run continues it.
    """
    sw = cfg.sweep
    ds, model, k = loaded.ds, loaded.model, loaded.num_classes
    jobs = plan(cfg, model)
    done = {(r["method"], r["block"], r["seed"]) for r in run.records("collapse_ft")}
    if any(True for _ in run.records("nc_pretrained")) and all(
            (j.method, j.block, s) in done for j in jobs for s in sw.seeds):
        return  # finished
    prep = prepare.prepare(sw, run, loaded=loaded, with_hp=False, progress=progress)
    base = prep.base
    meter = Meter(model, ds.train.x, ds.train.y, k)
    if not any(True for _ in run.records("nc_pretrained")):
        n_total = count_tuned(base["params"], None)[1]
        run.log("nc_pretrained", blocks=block_names(model), num_classes=k, n_params=n_total,
                **meter(model, base))

    seeds = list(sw.seeds)
    # the τ = 0 heads of the sweep
    heads, head_stats = hp.init_heads(model, loaded.x_example(), seeds, 0)
    _, _, fparams, fstats, _ = hp.split_head(model, base, 0)
    inits = [(merge(fparams, _take(heads, i)), merge(fstats, _take(head_stats, i)))
             for i in range(len(seeds))]
    data = prep.arrays()
    for job in jobs:
        todo = [i for i, s in enumerate(seeds) if (job.method, job.block, s) not in done]
        if not todo:
            continue
        for g in [todo] if sw.vmap else [[i] for i in todo]:
            m, results, final = finetune_job(
                model, job, sw.ft, [inits[i] for i in g], [seeds[i] for i in g], data,
                num_classes=k, augment=sw.data.augment, mesh=prep.mesh, progress=progress)
            n_tuned, n_total = count_tuned(base["params"], trainable(job))
            for r, (i, res) in enumerate(zip(g, results)):
                run.log("collapse_ft", method=job.method, block=job.block, seed=seeds[i],
                        n_tuned=n_tuned, n_params=n_total, pct_tuned=100.0 * n_tuned / n_total,
                        **meter(m, _take(final, r)), **res)


# --------------------------------------------------------------------------
# Report: Table-3 layout and figures, from metrics.jsonl alone


def summarize(run: RunDir) -> tuple[dict, dict | None]:
    """``({(method, block): row}, pretrained record or None)``; rows hold (mean, std)."""
    groups = collections.defaultdict(list)
    for r in run.records("collapse_ft"):
        groups[(r["method"], r["block"])].append(r)
    pre = next(iter(run.records("nc_pretrained")), None)
    out = {}
    for key, recs in groups.items():
        row = {"n_seeds": len(recs), "pct_tuned": recs[0]["pct_tuned"],
               "n_tuned": recs[0]["n_tuned"]}
        for name in ("test_acc", "val_acc", "train_acc", "best_epoch"):
            row[name] = mean_std(r[name] for r in recs)
        for name in ("nc1", "cdnv", "numerical_rank"):
            row[name] = mean_std(r["z"][name] for r in recs)
        row["layer_nc1"] = {b: mean_std(r["layer_nc1"][b] for r in recs)
                            for b in recs[0]["layer_nc1"]}
        out[key] = row
    order = {m: i for i, m in enumerate(METHODS)}
    blocks = pre["blocks"] if pre else []

    def pos(b):
        return -1 if b is None else (blocks.index(b) if b in blocks else len(blocks))

    return dict(sorted(out.items(), key=lambda kv: (order[kv[0][0]], pos(kv[0][1])))), pre


def _fmt(ms, scale=1.0, fmt="{:.2f}") -> str:
    m, s = ms
    if math.isnan(m):
        return "n/a"
    s = 0.0 if s <= 1e-9 * abs(m) else s  # float noise of identical runs
    return f"{fmt.format(scale * m)} ± {fmt.format(scale * s)}"


def table3(summary: dict, pre: dict | None) -> str:
    """Markdown in the companion paper's Table 3 layout, one row per method/block."""
    blocks = pre["blocks"] if pre else []
    head = ["method", "tuned block", "test acc (%)", "val acc (%)", "NC1(z)", "CDNV(z)",
            "num. rank(z)", "params tuned"]
    rows = []
    if pre is not None:
        z = pre["z"]
        rows.append(["pretrained, no FT", "–", "–", "–", f"{z['nc1']:.3g}", f"{z['cdnv']:.3g}",
                     f"{z['numerical_rank']:.3g}", "–"])
    for (m, b), row in summary.items():
        where = "–" if b is None else (f"{b} ({blocks.index(b) + 1}/{len(blocks)})"
                                       if b in blocks else b)
        rows.append([LABELS[m], where, _fmt(row["test_acc"], 100), _fmt(row["val_acc"], 100),
                     _fmt(row["nc1"], fmt="{:.3g}"), _fmt(row["cdnv"], fmt="{:.3g}"),
                     _fmt(row["numerical_rank"], fmt="{:.3g}"),
                     f"{row['pct_tuned']:.2f}% ({row['n_tuned']:,})"])
    return md_table(head, rows)


def figure_files(run: RunDir, summary: dict, pre: dict | None) -> list[str]:
    """``layerwise_nc1.png`` (Fig. 10 layout) and ``by_block.png``; returns paths."""
    paths = []
    if not summary:
        return paths
    names = pre["blocks"] if pre else list(next(iter(summary.values()))["layer_nc1"])
    tuned = [b for b in names if any(bb == b for _, bb in summary)]
    panels = tuned or [None]
    xs = np.arange(len(names) + 1)
    ticks = names + ["z"]
    style = {"linear_probe": ("C0", "o"), "layer_ft": ("C1", "s"), "scl_ft": ("C2", "^"),
             "full_ft": ("C3", "D")}

    def curve(row):
        return [row["layer_nc1"][n][0] for n in names] + [row["nc1"][0]]

    fig, axes = plt().subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, b in zip(axes[0], panels):
        for (m, bb), row in summary.items():
            if bb is None or bb == b:
                c, mk = style[m]
                ax.plot(xs, curve(row), color=c, marker=mk, label=LABELS[m])
        if pre is not None:  # on top: a frozen MLP's linear probe hides it otherwise
            ax.plot(xs, [pre["layer_nc1"][n] for n in names] + [pre["z"]["nc1"]],
                    color="k", ls=":", marker=".", label="pretrained (no FT)")
        ax.set_yscale("log")
        ax.set_xticks(xs, ticks, rotation=45, fontsize=7)
        ax.set_title("no block tuned" if b is None else f"tuned block: {b}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("NC1 (train, eval mode)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Layer-wise NC1 on the training set after each method (companion paper "
                 "Fig. 10); z = the head's input", fontsize=10)
    paths.append(save_figure(run, fig, "layerwise_nc1.png"))

    if tuned:
        fig, (a1, a2) = plt().subplots(1, 2, figsize=(8, 3.4))
        pos = np.arange(len(tuned))
        for m in ("layer_ft", "scl_ft"):
            rows = [summary.get((m, b)) for b in tuned]
            if all(r is not None for r in rows):
                c, mk = style[m]
                a1.errorbar(pos, [100 * r["test_acc"][0] for r in rows],
                            yerr=[100 * r["test_acc"][1] for r in rows], color=c, marker=mk,
                            capsize=3, label=LABELS[m])
                a2.plot(pos, [r["nc1"][0] for r in rows], color=c, marker=mk, label=LABELS[m])
        for m in ("linear_probe", "full_ft"):
            if (m, None) in summary:
                r = summary[(m, None)]
                a1.axhline(100 * r["test_acc"][0], color=style[m][0], ls="--", label=LABELS[m])
                a2.axhline(r["nc1"][0], color=style[m][0], ls="--", label=LABELS[m])
        for ax, yl in ((a1, "test accuracy (%)"), (a2, "NC1 of z (train)")):
            ax.set_xticks(pos, tuned, rotation=45, fontsize=7)
            ax.set_xlabel("tuned block")
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
        a2.set_yscale("log")
        a1.legend(fontsize=7)
        paths.append(save_figure(run, fig, "by_block.png"))
    return paths


def report(run: RunDir, *, figures: bool = True) -> tuple[list[str], list[str]]:
    """``collapse.md``'s parts and the figures, from the records alone."""
    summary, pre = summarize(run)
    if not summary and pre is None:
        raise ValueError(f"{run.path} has no collapse records in metrics*.jsonl yet")
    n = max((row["n_seeds"] for row in summary.values()), default=0)
    parts = [f"# Collapse report: {run.path}",
             (f"## Table 3 layout (mean ± std over {n} seeds; NC1, CDNV, rank of the head's "
              "input z on the training set, eval mode)"),
             table3(summary, pre)]
    return parts, figure_files(run, summary, pre) if figures else []


EXPERIMENT = Experiment(
    "collapse", CollapseConfig, run, report, check=check, doc=__doc__,
    help="linear probe, Layer FT, SCL FT, full FT: accuracy, % tuned, NC1 "
         "(companion paper Table 3, Fig. 10)")
