"""The τ sweep, the library's main job (Sec. 5.2, Table 1, Figs. 2-4).

1. Pretrain the backbone on the source data (cached across runs).
2. Head-probe once up to the largest τ, keeping the head at every τ; also an
   lsHP run (smoothed HP targets, η_HP = ``ls_eta``) at the largest τ.
3. Finetune from every snapshot and seed; batched with ``vmap`` by default.
4. Log everything to ``metrics.jsonl``; τ* is picked on *validation* accuracy.

Rerunning a killed sweep with the same run directory continues it: finished
FT runs are read back from ``metrics.jsonl``, HP snapshots from their
checkpoint, and an interrupted FT batch from its last epoch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax import checkpoint, config as config_lib, ft, hp, parallel, pretrain
from hpft_jax.models import make_classifier
from hpft_jax.params import is_head_path, head_block_names, load_pretrained, merge
from hpft_jax.runlog import RunDir

Tree = Any


class RunKey(NamedTuple):
    variant: str  # "hp" or "lshp"
    seed: int
    tau: int

    @property
    def label(self) -> str:
        return f"{self.variant} tau={self.tau} seed={self.seed}"


def variants(cfg: config_lib.SweepConfig) -> dict[str, float]:
    """HP variants and their η_HP: the main sweep and, optionally, lsHP."""
    out = {"hp": cfg.hp.eta}
    if cfg.ls_eta is not None:
        out["lshp"] = cfg.ls_eta
    return out


def plan(cfg: config_lib.SweepConfig) -> list[RunKey]:
    """Every FT run of the sweep, in order, restricted to this shard."""
    keys = [RunKey("hp", s, t) for t in cfg.hp.taus for s in cfg.seeds]
    if cfg.ls_eta is not None:
        keys += [RunKey("lshp", s, cfg.hp.taus[-1]) for s in cfg.seeds]
    i, n = cfg.shard
    return keys[i::n]


def warn_opposite_energy(cfg: config_lib.SweepConfig) -> None:
    for name, eta in variants(cfg).items():
        if eta > cfg.ft.eta:
            warnings.warn(
                f"η_HP={eta} ({name}) > η_FT={cfg.ft.eta}: the paper's 'opposite energy' case "
                "(Sec. 5.3): features move more but generalise worse; use η_HP <= η_FT",
                stacklevel=2)


def split_arrays(ds) -> dict:
    """``{train,val,test}_{x,y}`` host arrays of a :class:`hpft_jax.data.Dataset`."""
    return {f"{name}_{k}": getattr(getattr(ds, name), k)
            for name in ("train", "val", "test") for k in ("x", "y")}


def pretrained_for(cfg: config_lib.SweepConfig, run: RunDir, *, mesh=None,
                   progress: bool = True) -> dict:
    """The cached pretrained variables for ``cfg``; logged once per run."""
    logged = any(True for _ in run.records("pretrain"))
    pre_vars, _ = pretrain.get_or_train(cfg.data, cfg.model, cfg.pretrain, cfg.runs_dir,
                                        mesh=mesh, progress=progress,
                                        log=None if logged else run.log)
    return pre_vars


def base_variables(model, pretrained: dict, reinit_blocks: int, x_example) -> tuple[dict, list[str]]:
    """Fresh downstream model with the pretrained backbone loaded into it.

    The head (and the last ``reinit_blocks`` blocks) stay freshly initialised;
    every other leaf must match the checkpoint exactly.
    """
    fresh = jax.jit(lambda k: model.init(k, x_example, train=False))(jax.random.key(0))
    blocks = head_block_names(model, reinit_blocks)
    return load_pretrained(fresh, {k: v for k, v in pretrained.items() if v},
                           reinit=lambda p: is_head_path(p, blocks))


def batch_groups(todo: list[RunKey], cfg: config_lib.SweepConfig) -> list[list[RunKey]]:
    """FT runs per compiled program: all of them, at most ``max_batch_runs``,
    or one each with ``vmap=False``. Chunks follow the plan's order, so a
    resumed sweep re-forms the same unfinished groups."""
    size = 1 if not cfg.vmap else (cfg.max_batch_runs or max(len(todo), 1))
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def _group_id(keys: list[RunKey]) -> str:
    return hashlib.sha256(repr(sorted(keys)).encode()).hexdigest()[:12]


def _snapshot_tree(probe: hp.Probe) -> dict:
    return {f"{v}_tau{t}": {"params": p, "batch_stats": s}
            for (v, t), (p, s) in probe.snapshots.items()}


def run_hp(cfg, run: RunDir, model, base: dict, ds, *, mesh, progress: bool) -> hp.Probe:
    """HP snapshots, from the run's checkpoint when it exists."""
    path = run.checkpoints("hp")
    _, _, fparams, fstats, split = hp.split_head(model, base, cfg.model.reinit_blocks)
    if checkpoint.exists(path):
        tree, meta = checkpoint.load_tree(path)
        snaps = {}
        for key, val in tree.items():
            v, t = key.rsplit("_tau", 1)
            snaps[(v, int(t))] = (val["params"], val.get("batch_stats", {}) or {})
        probe = hp.Probe(split, fparams, fstats, snaps, meta["records"])
    else:
        probe = hp.probe(model, base, ds.train.x, ds.train.y, cfg.hp, seeds=list(cfg.seeds),
                         variants=variants(cfg), reinit_blocks=cfg.model.reinit_blocks,
                         num_classes=ds.num_classes, augment=cfg.data.augment, mesh=mesh,
                         progress=progress)
        checkpoint.save_tree(path, _drop_empty(_snapshot_tree(probe)), {"records": probe.records})
    logged = {(r["variant"], r["seed"], r["tau"]) for r in run.records("hp")}
    for rec in probe.records:
        if (rec["variant"], rec["seed"], rec["tau"]) not in logged:
            run.log("hp", **rec)
    return probe


def _drop_empty(tree):
    if isinstance(tree, dict):
        return {k: _drop_empty(v) for k, v in tree.items() if not (isinstance(v, dict) and not v)}
    return tree


def ft_inits(probe: hp.Probe, keys: list[RunKey], seeds: list[int]) -> list[tuple[Tree, Tree]]:
    """(params, batch_stats) at the start of FT for each run."""
    out = []
    for k in keys:
        p, s = probe.snapshots[(k.variant, k.tau)]
        i = seeds.index(k.seed)
        take = lambda t: jax.tree_util.tree_map(lambda a: a[i], t)  # noqa: E731
        out.append((merge(probe.frozen_params, take(p)), merge(probe.frozen_stats, take(s))))
    return out


def run_sweep(cfg: config_lib.SweepConfig, *, progress: bool = True,
              stop_after_epochs: int | None = None, stop_after_groups: int | None = None,
              save_final: bool = False, ckpt_every_s: float = 30.0) -> RunDir:
    """Run (or continue) the sweep; returns its :class:`RunDir`.

    ``stop_after_*`` interrupt the run as a kill would (used by the resume
    tests). ``ckpt_every_s``: FT checkpoint interval (0: every epoch).
    ``save_final`` keeps each run's finetuned variables under
    ``checkpoints/final/`` (for head exchange).
    """
    from hpft_jax import data as data_lib

    warn_opposite_energy(cfg)
    run = RunDir(os.path.join(cfg.runs_dir, cfg.name), tuple(cfg.shard))
    run.write_config(cfg)
    mesh = parallel.data_mesh()
    ds = data_lib.load_downstream(cfg.data)
    pre_vars = pretrained_for(cfg, run, mesh=mesh, progress=progress)
    model = make_classifier(cfg.model, ds.num_classes)
    base, _ = base_variables(model, pre_vars, cfg.model.reinit_blocks, jnp.asarray(ds.train.x[:2]))
    probe = run_hp(cfg, run, model, base, ds, mesh=mesh, progress=progress)

    finished = {(r["variant"], r["seed"], r["tau"]) for r in run.records("ft")}
    todo = [k for k in plan(cfg) if tuple(k) not in finished]
    groups = batch_groups(todo, cfg)
    data = split_arrays(ds)
    etas = variants(cfg)
    for gi, group in enumerate(g for g in groups if g):
        if stop_after_groups is not None and gi >= stop_after_groups:
            raise KeyboardInterrupt(f"stopped after {gi} FT groups (test hook)")
        gid = _group_id(group)
        results, final = ft.finetune(
            model, cfg.ft, ft_inits(probe, group, list(cfg.seeds)), [k.seed for k in group], data,
            ds.train.x, ds.train.y, num_classes=ds.num_classes, augment=cfg.data.augment,
            mesh=mesh, ckpt_dir=run.checkpoints("ft", gid), names=[k.label for k in group],
            progress=progress, stop_after_epochs=stop_after_epochs, ckpt_every_s=ckpt_every_s)
        if save_final:
            for r, k in enumerate(group):
                tree = jax.tree_util.tree_map(lambda a: np.asarray(a[r]), final)
                checkpoint.save_tree(run.checkpoints("final", f"{k.variant}_tau{k.tau}_seed{k.seed}"),
                                     _drop_empty(tree), {"key": list(k)})
        for k, res in zip(group, results):
            run.log("ft", variant=k.variant, seed=k.seed, tau=k.tau, eta_hp=etas[k.variant],
                    eta_ft=cfg.ft.eta, **res)
        shutil.rmtree(run.checkpoints("ft", gid), ignore_errors=True)
    return run
