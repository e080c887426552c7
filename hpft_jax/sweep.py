"""The τ sweep, the library's main job (Sec. 5.2, Table 1, Figs. 2-4).

1. Pretrain the backbone on the source data (cached across runs).
2. Head-probe once up to the largest τ, keeping the head at every τ; also an
   lsHP run (smoothed HP targets, η_HP = ``ls_eta``) at the largest τ.
3. Finetune from every snapshot and seed; batched with ``vmap`` by default.
4. Log everything to ``metrics.jsonl``; τ* is picked on *validation* accuracy.

Steps 1-2 are :func:`hpft_jax.prepare.prepare`, shared with every analysis
experiment; :func:`finetune_runs` is step 3, which the head-exchange and
Prop. 1 experiments call too. Rerunning a killed sweep with the same run
directory continues it: finished FT runs are read back from
``metrics.jsonl``, HP snapshots from their checkpoint, and an interrupted FT
batch from its last epoch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax import checkpoint, config as config_lib, ft, masks, prepare as prep_lib
from hpft_jax.prepare import RunKey
from hpft_jax.runlog import RunDir


def batch_groups(todo: list[RunKey], cfg: config_lib.SweepConfig) -> list[list[RunKey]]:
    """FT runs per compiled program: all of them, at most ``max_batch_runs``,
    or one each with ``vmap=False``. Chunks follow the plan's order, so a
    resumed sweep re-forms the same unfinished groups."""
    size = 1 if not cfg.vmap else (cfg.max_batch_runs or max(len(todo), 1))
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def group_id(keys) -> str:
    """A short stable id of a group of FT runs (its checkpoint directory name)."""
    return hashlib.sha256(repr(sorted(keys)).encode()).hexdigest()[:12]


PROJECT_INPUTS = 100  # fixed inputs whose z_0/z_T projection is logged (Fig. 3 middle)


def projection_taus(taus, k: int = 4) -> tuple[int, ...]:
    """Up to ``k`` τ spread over the list (first and last included) whose HP
    runs of the first seed log the z_0/z_T projection."""
    taus = list(taus)
    picks = np.unique(np.round(np.linspace(0, len(taus) - 1, min(k, len(taus)))).astype(int))
    return tuple(taus[i] for i in picks)


def projected(key: RunKey, cfg: config_lib.SweepConfig) -> bool:
    """Whether FT run ``key`` logs the projection (:func:`hpft_jax.ft.projection`)."""
    return (key.variant == "hp" and key.seed == cfg.seeds[0]
            and key.tau in projection_taus(cfg.hp.taus))


def final_dir(run: RunDir, key: RunKey) -> str:
    """Where ``save_final`` keeps run ``key``'s finetuned variables."""
    return run.checkpoints("final", f"{key.variant}_tau{key.tau}_seed{key.seed}")


def finetune_runs(prep: prep_lib.Prepared, run: RunDir, *, progress: bool = True,
                  stop_after_epochs: int | None = None, stop_after_groups: int | None = None,
                  save_final: bool = False, ckpt_every_s: float = 30.0) -> None:
    """FT of every planned run not yet logged, as ``ft`` events of ``run``.

    ``stop_after_*`` interrupt the run as a kill would (used by the resume
    tests). ``ckpt_every_s``: FT checkpoint interval (0: every epoch).
    ``save_final`` keeps each run's finetuned variables (:func:`final_dir`).
    """
    finished = {(r["variant"], r["seed"], r["tau"]) for r in run.records("ft")}
    todo = [k for k in prep_lib.plan(prep.cfg) if tuple(k) not in finished]
    for gi, group in enumerate(g for g in batch_groups(todo, prep.cfg) if g):
        if stop_after_groups is not None and gi >= stop_after_groups:
            raise KeyboardInterrupt(f"stopped after {gi} FT groups (test hook)")
        for rec in finetune_group(prep, run, group, progress=progress,
                                  stop_after_epochs=stop_after_epochs,
                                  save_final=save_final, ckpt_every_s=ckpt_every_s):
            run.log("ft", **rec)
        shutil.rmtree(run.checkpoints("ft", group_id(group)), ignore_errors=True)


def finetune_group(prep: prep_lib.Prepared, run: RunDir, group: list[RunKey], *,
                   progress: bool = True, stop_after_epochs: int | None = None,
                   save_final: bool = False, ckpt_every_s: float = 30.0) -> list[dict]:
    """FT of one vmapped group of runs; returns their ``ft`` records (not logged)."""
    cfg, ds = prep.cfg, prep.ds
    etas = prep_lib.variants(cfg)
    results, final = ft.finetune(
        prep.model, cfg.ft, prep.inits(group), [k.seed for k in group], prep.arrays(),
        ds.train.x, ds.train.y, num_classes=ds.num_classes, augment=cfg.data.augment,
        mesh=prep.mesh, ckpt_dir=run.checkpoints("ft", group_id(group)),
        names=[k.label for k in group], progress=progress,
        stop_after_epochs=stop_after_epochs, ckpt_every_s=ckpt_every_s,
        project=PROJECT_INPUTS if any(projected(k, cfg) for k in group) else 0,
        input=prep.loaded.inputs.get("ft"))
    for k, res in zip(group, results):
        if not projected(k, cfg):
            res.pop("projection", None)
    if ds.task == "segmentation":
        save_masks(prep, run, group, final)
    if save_final:
        for r, k in enumerate(group):
            tree = jax.tree_util.tree_map(lambda a: np.asarray(a[r]), final)
            checkpoint.save_tree(final_dir(run, k), prep_lib.drop_empty(tree),
                                 {"key": list(k)})
    return [dict(variant=k.variant, seed=k.seed, tau=k.tau, eta_hp=etas[k.variant],
                 eta_ft=cfg.ft.eta, **res) for k, res in zip(group, results)]


def save_masks(prep: prep_lib.Prepared, run: RunDir, group: list[RunKey], final: dict) -> None:
    """Predicted masks of the first seed's HP runs on the first few test
    images (:mod:`hpft_jax.masks`), for the report's figure."""
    picked = [r for r, k in enumerate(group) if k.variant == "hp" and k.seed == prep.cfg.seeds[0]]
    if not picked:
        return
    ds = prep.ds
    x, y = ds.test.x[:masks.NUM_IMAGES], ds.test.y[:masks.NUM_IMAGES]
    masks.save_inputs(run, x, y, ds.mean, ds.std)
    variables = jax.tree_util.tree_map(lambda a: a[np.asarray(picked)], final)
    pred = jax.device_get(_mask_program(prep.model)(variables, jnp.asarray(x)))
    for i, r in enumerate(picked):
        k = group[r]
        masks.save_pred(run, k.variant, k.tau, k.seed, pred[i])


@functools.lru_cache(maxsize=4)
def _mask_program(model):
    """Jitted, vmapped over runs: eval-mode argmax labels (R, k, H, W)."""
    from hpft_jax import steps  # noqa: PLC0415

    def one(v, x):
        return jnp.argmax(steps.predict(model, steps.variables(v["params"], v["batch_stats"]),
                                        x)[0], axis=-1)

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


def run_dir(cfg: config_lib.SweepConfig) -> RunDir:
    """``runs_dir/name``, writing this shard's metrics file."""
    return RunDir(os.path.join(cfg.runs_dir, cfg.name), tuple(cfg.shard))


def run_sweep(cfg: config_lib.SweepConfig, *, progress: bool = True, mesh=None,
              **kwargs) -> RunDir:
    """Run (or continue) the sweep; returns its :class:`RunDir`.

    Data and model are checked before ``config.json`` is written; ``mesh``
    (default: data-parallel over the local devices) may carry a runs axis
    (:func:`hpft_jax.parallel.runs_mesh`); other keyword arguments go to
    :func:`finetune_runs`.
    """
    prep_lib.warn_opposite_energy(cfg)
    run = run_dir(cfg)
    loaded = prep_lib.load(cfg)
    run.write_config(cfg)
    prep = prep_lib.prepare(cfg, run, loaded=loaded, mesh=mesh, progress=progress)
    finetune_runs(prep, run, progress=progress, **kwargs)
    return run
