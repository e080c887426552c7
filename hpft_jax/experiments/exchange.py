"""``hpft exchange``: the head-exchange matrices of Fig. 3 (right), Sec. 4.2.

1. HPτ-FT for n values of τ (default: 7 spread over the configured τ list),
   one seed by default. This is :func:`hpft_jax.sweep.run_sweep` with
   ``save_final=True``: every converged (early-stopped) model is kept under
   ``checkpoints/final/``, and a killed run continues where it stopped.
2. Pair the backbone of run i with the head of run j, with no further
   tuning, for all n x n pairs, and measure train / validation / test
   accuracy in eval mode.

The matrices are logged as ``exchange`` events of ``metrics.jsonl``, one per
seed, as ``acc[head j][backbone i]``: rows are heads, columns backbones, as
in the paper's figure ("for the strong adapted backbones (the first two
columns), the heads from other cases are not compatible"). The diagonal is
each finetuned model's own accuracy.

"Head" is what head probing trains: ``params/head`` and, under a partial
backbone (``--reinit-blocks k``), the last k backbone blocks; the backbone is
everything else, BatchNorm statistics included.

    hpft exchange                      # 7 τ from the default list, seed 0
    hpft exchange --taus 0,4,64,1024 --seeds 0,1 --name exchange_s2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import numpy as np

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


def exchange_config(cfg, *, taus=None, n_taus: int = 7):
    """The sweep configuration that the exchange runs: only HP (no lsHP) at
    the exchange's τ values (``taus``, or ``n_taus`` picked by
    :func:`select_taus` from ``cfg.hp.taus``)."""
    chosen = tuple(taus) if taus is not None else select_taus(cfg.hp.taus, n_taus)
    return dataclasses.replace(cfg, hp=dataclasses.replace(cfg.hp, taus=chosen), ls_eta=None)


def make_exchange_fn(model, *, reinit_blocks: int = 0, chunk: int = 512):
    """``fn(variables, x, y) -> correct`` (n, n, N) bool, ``correct[j, i, m]``
    telling whether head j on backbone i classifies example m right.

    ``variables = {"params", "batch_stats"}`` stacked over n finetuned runs
    (leading axis n); x (N, ...), y (N,). Each backbone's trunk features are
    computed once (``lax.map`` over backbones bounds memory to one backbone's
    features); all heads then run on them under ``vmap``. Jitted. Averaging
    over m gives the accuracy matrix; several splits can go in one call.
    """
    import jax
    import jax.numpy as jnp

    from hpft_jax import hp, steps
    from hpft_jax.params import merge

    def fn(variables, x, y):
        head_p, head_s, body_p, body_s, split = hp.split_head(model, variables, reinit_blocks)

        def one_head(bp, bs, h, hp_, hs):
            v = steps.variables(merge(bp, hp_), merge(bs, hs))
            logits, _ = steps.predict(model, v, h, method=model.top, split=split, chunk=chunk)
            return jnp.argmax(logits, axis=-1) == y

        def one_backbone(args):
            bp, bs = args
            h = steps.predict(model, steps.variables(bp, bs), x, method=model.trunk,
                              split=split, chunk=chunk)
            return jax.vmap(one_head, in_axes=(None, None, None, 0, 0))(bp, bs, h, head_p, head_s)

        by_backbone = jax.lax.map(one_backbone, (body_p, body_s))  # (n_backbone, n_head, N)
        return jnp.swapaxes(by_backbone, 0, 1)

    return jax.jit(fn)


def exchange_accuracy(fn, variables, splits: dict) -> dict[str, np.ndarray]:
    """``{name: acc (n_head, n_backbone)}`` for ``splits = {name: (x, y)}``,
    all evaluated in one call of ``fn`` (:func:`make_exchange_fn`)."""
    import jax.numpy as jnp

    names = [k for k, (x, _) in splits.items() if x.shape[0]]
    if not names:
        raise ValueError("every split is empty")
    x = np.concatenate([splits[k][0] for k in names])
    y = np.concatenate([splits[k][1] for k in names])
    correct = np.asarray(fn(variables, jnp.asarray(x), jnp.asarray(y)))
    bounds = np.cumsum([0] + [splits[k][0].shape[0] for k in names])
    return {k: correct[..., a:b].mean(axis=-1) for k, a, b in zip(names, bounds[:-1], bounds[1:])}


def _final_name(tau: int, seed: int) -> str:
    return f"hp_tau{tau}_seed{seed}"


def load_finals(run, taus, seed: int) -> dict:
    """The finetuned variables of ``seed`` at every τ, stacked over τ."""
    import jax

    from hpft_jax import checkpoint

    trees = []
    for t in taus:
        path = run.checkpoints("final", _final_name(t, seed))
        if not checkpoint.exists(path):
            raise FileNotFoundError(
                f"no finetuned model for τ={t}, seed={seed} at {path}: the FT runs of "
                f"{run.path} finished without saving it; delete the directory and rerun")
        tree, _ = checkpoint.load_tree(path)
        trees.append({"params": tree["params"], "batch_stats": tree.get("batch_stats", {}) or {}})
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *trees)


def run_exchange(cfg, *, progress: bool = True):
    """Run (or continue) the exchange for ``cfg`` (see :func:`exchange_config`);
    returns the :class:`~hpft_jax.runlog.RunDir`."""
    from hpft_jax import data as data_lib
    from hpft_jax.models import make_classifier
    from hpft_jax.sweep import run_sweep

    if cfg.ls_eta is not None:
        raise ValueError("the exchange runs HP only: use exchange_config(cfg), which sets ls_eta=None")
    run = run_sweep(cfg, progress=progress, save_final=True)
    ds = data_lib.load_downstream(cfg.data)
    model = make_classifier(cfg.model, ds.num_classes)
    fn = make_exchange_fn(model, reinit_blocks=cfg.model.reinit_blocks)
    taus = list(cfg.hp.taus)
    done = {r["seed"] for r in run.records("exchange") if r["taus"] == taus}
    for seed in cfg.seeds:
        if seed in done:
            continue
        finals = load_finals(run, taus, seed)
        mats = exchange_accuracy(fn, finals, {name: (s.x, s.y) for name, s in
                                              zip(SPLITS, (ds.train, ds.val, ds.test))})
        run.log("exchange", seed=int(seed), taus=taus, rows="head", cols="backbone",
                **{f"{k}_acc": v.tolist() for k, v in mats.items()})
    return run


# --------------------------------------------------------------------------
# Report


def matrices(run, taus=None) -> dict[str, np.ndarray]:
    """Seed-averaged ``{split: acc (n, n)}`` from the logged ``exchange``
    events (the latest τ list, or ``taus``), plus ``seeds``."""
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
        if s not in mats:
            continue
        a = mats[s]
        head = "| head \\ backbone | " + " | ".join(f"τ={t}" for t in taus) + " |"
        lines = [f"**{s}**", "", head, "|" + "---|" * (len(taus) + 1)]
        for j, t in enumerate(taus):
            lines.append(f"| τ={t} | " + " | ".join(f"{100 * v:.1f}" for v in a[j]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def heatmaps(run, mats: dict) -> str:
    """Train and validation heat maps, annotated; returns the figure's path."""
    from hpft_jax.report import _plt

    plt = _plt()
    taus = mats["taus"]
    names = [s for s in ("train", "val") if s in mats]
    n = len(taus)
    fig, axes = plt.subplots(1, len(names), figsize=(0.75 * n * len(names) + 2.5, 0.7 * n + 1.6),
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
    fig.tight_layout()
    path = run.figures("exchange.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(run, *, write_figures: bool = True, out=print) -> str:
    """Print and write ``exchange.md`` (and the heat maps) from the records."""
    mats = matrices(run)
    text = "# Head exchange: " + run.path + "\n\n" + markdown(mats)
    if write_figures:
        text += "\n\nFigure: " + os.path.relpath(heatmaps(run, mats), run.path)
    with open(os.path.join(run.path, "exchange.md"), "w") as f:
        f.write(text + "\n")
    out(text)
    return text


# --------------------------------------------------------------------------
# CLI


def _cmd(args: argparse.Namespace) -> None:
    from hpft_jax import cli

    cfg = cli.config_from_args(args)
    cfg = dataclasses.replace(cfg, name=getattr(args, "name", None) or "exchange",
                              seeds=cfg.seeds if hasattr(args, "seeds") else (0,))
    cfg = exchange_config(cfg, taus=args.taus, n_taus=args.n_taus)
    run = run_exchange(cfg, progress=not args.quiet)
    report(run, write_figures=not args.no_figures)


def add_parser(subparsers) -> None:
    from hpft_jax import cli

    p = subparsers.add_parser(
        "exchange", help="head-exchange matrices between HPτ-FT models (Fig. 3, right)",
        description=__doc__.split("\n\n")[0])
    cli.add_config_flags(p)
    p.add_argument("--taus", type=cli._ints, default=None,
                   help="the exchange's τ values, e.g. 0,4,64,1024 (default: N_TAUS values "
                        "spread over the --tau list); overrides --tau")
    p.add_argument("--n-taus", type=int, default=7,
                   help="how many τ to take from the --tau list when --taus is not given")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(fn=_cmd)
