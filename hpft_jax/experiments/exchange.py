"""``hpft exchange``: the head-exchange matrices of Fig. 3 (right), Sec. 4.2.

1. HPτ-FT for the τ values of ``sweep.hp.taus`` (default: 7 values spread
   over the 2^n list, τ = 0, 2, 8, 32, 64, 256, 1024; ``--n-taus N`` keeps N
   of the given list, spread by position), one seed by default, no lsHP.
   Setup is :func:`hpft_jax.prepare.prepare` and FT is
   :func:`hpft_jax.sweep.finetune_runs` with ``save_final=True``, exactly the
   sweep's: every converged (early-stopped) model is kept under
   ``checkpoints/final/``, and a killed run continues where it stopped.
2. Pair the backbone of run i with the head of run j, with no further
   tuning, for all n x n pairs, and measure train / validation / test
   accuracy in eval mode.

The matrices are logged as ``exchange`` events of ``metrics.jsonl``, one per
seed, as ``acc[head j][backbone i]``: rows are heads, columns backbones, as
in the paper's figure ("for the strong adapted backbones (the first two
columns), the heads from other cases are not compatible"). The diagonal is
each finetuned model's own accuracy. :func:`report` rebuilds ``exchange.md``
and ``figures/exchange.png`` from the records alone.

"Head" is what head probing trains: ``params/head`` and, under a partial
backbone (``--reinit-blocks k``), the last k backbone blocks; the backbone is
everything else, BatchNorm statistics included.

    hpft exchange                      # 7 τ from the default list, seed 0
    hpft exchange --taus 0,4,64,1024 --seeds 0,1 --name exchange_s2
    hpft exchange --taus 0,1,2,4,8,16,32 --n-taus 3     # τ = 0, 4, 32
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax import checkpoint, hp, prepare, steps, sweep, tasks
from hpft_jax.config import SweepConfig, default_taus
from hpft_jax.experiment import Experiment, sweep_field
from hpft_jax.flags import option
from hpft_jax.outputs import md_table, plt, save_figure
from hpft_jax.params import merge
from hpft_jax.prepare import RunKey
from hpft_jax.runlog import RunDir

Tree = Any
SPLITS = ("train", "val", "test")


def select_taus(taus, n: int) -> tuple[int, ...]:
    """``n`` values of ``taus`` evenly spread by position, both ends kept.

    ``taus`` is increasing (e.g. the 2^n sweep); with ``n >= len(taus)`` all
    of them are used.
    """
    taus = tuple(int(t) for t in taus)
    if n < 1:
        raise ValueError(f"n_taus must be >= 1; got {n}")
    if n >= len(taus):
        return taus
    if n == 1:
        return (taus[-1],)
    idx = np.round(np.linspace(0, len(taus) - 1, n)).astype(int)
    return tuple(taus[i] for i in idx)


DEFAULT_TAUS = select_taus(default_taus(), 7)  # 0, 2, 8, 32, 64, 256, 1024


@dataclasses.dataclass(frozen=True)
class ExchangeConfig:
    """``hpft exchange``; ``sweep`` supplies data, model, pretraining, HP, FT, seeds.

    ``sweep.hp.taus``: the exchange's τ values; ``sweep.ls_eta`` must be None
    (HP only). ``n_taus``: None uses the whole τ list; N keeps N values of it
    spread by position, both ends kept (:func:`select_taus`), and the kept
    list is what ``sweep.hp.taus`` (and ``config.json``) holds.
    """

    sweep: SweepConfig = sweep_field("exchange", seeds=(0,), taus=DEFAULT_TAUS, ls_eta=None)
    n_taus: int | None = option(
        None, "keep this many τ of the --tau list, spread by position (both ends kept); "
        "None: the whole list")

    def __post_init__(self):
        if self.sweep.ls_eta is not None:
            raise ValueError("hpft exchange runs HP only: ls_eta must be None "
                             f"(remove --ls-eta); got {self.sweep.ls_eta}")
        if self.n_taus is not None:
            chosen = select_taus(self.sweep.hp.taus, self.n_taus)
            hp_cfg = dataclasses.replace(self.sweep.hp, taus=chosen)
            object.__setattr__(self, "sweep", dataclasses.replace(self.sweep, hp=hp_cfg))


def make_exchange_fn(model, *, reinit_blocks: int = 0, chunk: int = 512):
    """``fn(variables, x) -> logits`` (n, n, N, ...), ``logits[j, i]`` being
    head j's output on backbone i's features of the examples x (N, ...).

    ``variables = {"params", "batch_stats"}`` stacked over n finetuned runs
    (leading axis n). Each backbone's trunk features are computed once
    (``lax.map`` over backbones bounds memory to one backbone's features);
    all heads then run on them under ``vmap``. Jitted.
    """

    def fn(variables, x):
        head_p, head_s, body_p, body_s, split = hp.split_head(model, variables, reinit_blocks)

        def one_head(bp, bs, h, hp_, hs):
            v = steps.variables(merge(bp, hp_), merge(bs, hs))
            return steps.predict(model, v, h, method=model.top, split=split, chunk=chunk)[0]

        def one_backbone(args):
            bp, bs = args
            h = steps.predict(model, steps.variables(bp, bs), x, method=model.trunk,
                              split=split, chunk=chunk)
            return jax.vmap(one_head, in_axes=(None, None, None, 0, 0))(bp, bs, h, head_p, head_s)

        by_backbone = jax.lax.map(one_backbone, (body_p, body_s))  # (n_backbone, n_head, N, ...)
        return jnp.swapaxes(by_backbone, 0, 1)

    return jax.jit(fn)


def exchange_accuracy(fn, variables, splits: dict, task=None) -> dict[str, np.ndarray]:
    """``{name: metric (n_head, n_backbone)}`` for ``splits = {name: (x, y)}``:
    the task's evaluation metric (accuracy; ROC-AUC for multi-label tasks) of
    every head on every backbone, all splits in one call of ``fn``
    (:func:`make_exchange_fn`)."""
    task = tasks.get("classification") if task is None else task
    names = [k for k, (x, _) in splits.items() if x.shape[0]]
    if not names:
        raise ValueError("every split is empty")
    x = np.concatenate([splits[k][0] for k in names])
    logits = fn(variables, jnp.asarray(x))
    metric = jax.jit(jax.vmap(jax.vmap(task.metric, in_axes=(0, None)), in_axes=(0, None)))
    bounds = np.cumsum([0] + [splits[k][0].shape[0] for k in names])
    return {k: np.asarray(metric(logits[:, :, a:b], jnp.asarray(splits[k][1])))
            for k, a, b in zip(names, bounds[:-1], bounds[1:])}


def load_finals(run: RunDir, taus, seed: int) -> dict:
    """The finetuned variables of ``seed`` at every τ, stacked over τ."""
    trees = []
    for t in taus:
        path = sweep.final_dir(run, RunKey("hp", seed, t))
        if not checkpoint.exists(path):
            raise FileNotFoundError(
                f"no finetuned model for τ={t}, seed={seed} at {path}: the FT runs of "
                f"{run.path} finished without saving it; delete the directory and rerun")
        tree, _ = checkpoint.load_tree(path)
        trees.append({"params": tree["params"], "batch_stats": tree.get("batch_stats", {}) or {}})
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *trees)


def run(cfg: ExchangeConfig, run: RunDir, loaded: prepare.Loaded, *,
        progress: bool = True) -> None:
    """Run (or continue) the exchange into ``run``: the sweep's HPτ-FT with
    every final model saved, then one ``exchange`` event per seed not yet logged."""
    sw = cfg.sweep
    taus = list(sw.hp.taus)
    done = {r["seed"] for r in run.records("exchange") if r["taus"] == taus}
    prepare.warn_opposite_energy(sw)
    prep = prepare.prepare(sw, run, loaded=loaded, progress=progress)
    sweep.finetune_runs(prep, run, progress=progress, save_final=True)
    ds = loaded.ds
    fn = make_exchange_fn(loaded.model, reinit_blocks=sw.model.reinit_blocks)
    for seed in sw.seeds:
        if seed in done:
            continue
        finals = load_finals(run, taus, seed)
        mats = exchange_accuracy(fn, finals, task=tasks.of(loaded.model),
                                 splits={name: (s.x, s.y) for name, s in
                                         zip(SPLITS, (ds.train, ds.val, ds.test))})
        run.log("exchange", seed=int(seed), taus=taus, rows="head", cols="backbone",
                **{f"{k}_acc": v.tolist() for k, v in mats.items()})


# --------------------------------------------------------------------------
# Report


def matrices(run: RunDir, taus=None) -> dict[str, Any]:
    """Seed-averaged ``{split: acc (n, n)}`` from the logged ``exchange``
    events (the latest τ list, or ``taus``), plus ``taus`` and ``seeds``."""
    recs = [r for r in run.records("exchange") if taus is None or r["taus"] == list(taus)]
    if not recs:
        raise ValueError(f"{run.path} has no exchange records yet")
    taus = recs[-1]["taus"]
    recs = {r["seed"]: r for r in recs if r["taus"] == taus}  # one per seed
    out: dict[str, Any] = {"taus": taus, "seeds": sorted(recs)}
    for s in SPLITS:
        key = f"{s}_acc"
        mats = [r[key] for r in recs.values() if key in r]
        if mats:
            out[s] = np.mean(np.asarray(mats, dtype=float), axis=0)
    return out


def markdown(mats: dict) -> str:
    """One markdown table per split: rows = head τ, columns = backbone τ (%)."""
    taus = mats["taus"]
    parts = [f"Head exchange, accuracy (%), mean over seeds {mats['seeds']}. "
             "Rows: the head of HPτ-FT; columns: the backbone of HPτ-FT."]
    for s in SPLITS:
        if s in mats:
            rows = ([f"τ={t}"] + [f"{100 * v:.1f}" for v in mats[s][j]]
                    for j, t in enumerate(taus))
            parts.append(f"**{s}**\n\n" + md_table(
                ["head \\ backbone"] + [f"τ={t}" for t in taus], rows))
    return "\n\n".join(parts)


def heatmaps(run: RunDir, mats: dict) -> str:
    """Train and validation heat maps, annotated; returns the figure's path."""
    taus = mats["taus"]
    names = [s for s in ("train", "val") if s in mats]
    n = len(taus)
    fig, axes = plt().subplots(1, len(names),
                               figsize=(0.75 * n * len(names) + 2.5, 0.7 * n + 1.6),
                               squeeze=False)
    for ax, s in zip(axes[0], names):
        a = 100 * mats[s]
        lo, hi = np.nanmin(a), max(np.nanmax(a), np.nanmin(a) + 1e-3)
        im = ax.imshow(a, cmap="viridis", vmin=lo, vmax=hi, origin="upper")
        for j in range(n):
            for i in range(n):
                ax.text(i, j, f"{a[j, i]:.1f}", ha="center", va="center", fontsize=7,
                        color="w" if a[j, i] < (lo + hi) / 2 else "k")
        ax.set_xticks(range(n), [str(t) for t in taus])
        ax.set_yticks(range(n), [str(t) for t in taus])
        ax.set_xlabel("backbone from HPτ-FT (τ)")
        ax.set_ylabel("head from HPτ-FT (τ)")
        ax.set_title(f"{'training' if s == 'train' else 'validation'} accuracy (%)")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Head exchange (no further tuning); diagonal = original models")
    return save_figure(run, fig, "exchange.png")


def report(run: RunDir, *, figures: bool = True) -> tuple[list[str], list[str]]:
    """``exchange.md``'s parts and ``figures/exchange.png``, from the records alone."""
    mats = matrices(run)
    return ([f"# Head exchange: {run.path}", markdown(mats)],
            [heatmaps(run, mats)] if figures else [])


EXPERIMENT = Experiment("exchange", ExchangeConfig, run, report, doc=__doc__,
                        help="head-exchange matrices between HPτ-FT models (Fig. 3, right)")
