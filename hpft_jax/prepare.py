"""Shared setup: data and model, pretrained backbone, HP snapshots, FT inits.

Every job (the sweep and each analysis experiment) starts the same way:

1. :func:`load` reads the downstream data and builds the model. It checks
   everything that can be checked before a file is written (data specs,
   class ids, backbone names, batch sizes), so a rejected command leaves no
   ``config.json`` behind.
2. :func:`prepare` loads (or trains and caches) the pretrained backbone into
   the downstream model and, unless asked not to, runs HP once up to the
   largest τ (or reads its snapshots back from the run's checkpoint).
3. :meth:`Prepared.init` gives the FT starting point of a run
   (:class:`RunKey`: variant, seed, τ).

So every experiment finetunes from exactly the states the sweep finetunes
from, by construction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hpft_jax import checkpoint, config as config_lib, data as data_lib, hp, locks, parallel
from hpft_jax import normalization, pretrain, weights
from hpft_jax.flags import file_sha256
from hpft_jax.models import make_backbone, make_classifier
from hpft_jax.params import head_block_names, is_head_path, load_pretrained, merge
from hpft_jax.rng import HEAD_INIT, seed_key
from hpft_jax.runlog import RunDir

Tree = Any


class RunKey(NamedTuple):
    """One FT run of a sweep."""

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
    """Warn when η_HP > η_FT: the paper's 'opposite energy' case (Sec. 5.3)."""
    for name, eta in variants(cfg).items():
        if eta > cfg.ft.eta:
            warnings.warn(
                f"η_HP={eta} ({name}) > η_FT={cfg.ft.eta}: the paper's 'opposite energy' case "
                "(Sec. 5.3): features move more but generalise worse; use η_HP <= η_FT",
                stacklevel=2)


def split_arrays(ds: data_lib.Dataset) -> dict:
    """``{train,val,test}_{x,y}`` host arrays of a :class:`hpft_jax.data.Dataset`."""
    return {f"{name}_{k}": getattr(getattr(ds, name), k)
            for name in ("train", "val", "test") for k in ("x", "y")}


# --------------------------------------------------------------------------
# 1. Data and model, before anything is written


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The downstream data and the (uninitialised) downstream model;
    ``inputs``: the input path of HP and FT (:func:`input_choices`)."""

    ds: data_lib.Dataset
    model: Any  # hpft_jax.models.Classifier
    inputs: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.ds.num_classes

    @property
    def num_train(self) -> int:
        return int(self.ds.train.x.shape[0])

    def x_example(self) -> jax.Array:
        """(2, ...) training inputs, for ``init`` and shape inference."""
        return jnp.asarray(self.ds.train.x[:2])


def load(cfg: config_lib.SweepConfig) -> Loaded:
    """Read the downstream data and build the model; writes nothing.

    Raises ``ValueError``/``FileNotFoundError`` for anything a user can fix:
    unknown data sets or backbones, bad class ids, a batch larger than the
    training split, ``reinit_blocks`` beyond the backbone's depth.
    """
    # The input pipeline follows an imported backbone (ImageNet mean/std, crop).
    ds = data_lib.load_downstream(normalization.resolve(cfg).data)
    model = make_classifier(cfg.model, ds.num_classes, ds.task, ds.input_norm)
    n = ds.train.x.shape[0]
    for what, bs in (("HP", cfg.hp.batch_size), ("FT", cfg.ft.batch_size)):
        data_lib.check_batch_size(n, bs, what=f"the downstream training set ({what})")
    blocks = model.backbone.num_blocks
    if cfg.model.reinit_blocks > blocks:
        raise ValueError(f"reinit_blocks={cfg.model.reinit_blocks}: the {cfg.model.backbone} "
                         f"backbone has only {blocks} blocks")
    if cfg.pretrain.init_from is not None:
        check_init_from(cfg)
    return Loaded(ds, model, input_choices(cfg, ds))


def input_choices(cfg: config_lib.SweepConfig, ds: data_lib.Dataset) -> dict:
    """``{"hp": ..., "ft": ...}``: :func:`hpft_jax.stream.decide` for each
    stage from the bytes it would put on every device (HP: the training
    split; FT: every split) and its batch (seeds or runs x batch size)."""
    from hpft_jax import stream

    train = (ds.train.x, ds.train.y)
    every = train + (ds.val.x, ds.val.y, ds.test.x, ds.test.y)
    ex = stream.example_bytes(*train)
    num_runs = len(plan(cfg))
    runs = min(cfg.max_batch_runs or num_runs, num_runs) if cfg.vmap else 1
    return {
        "hp": stream.decide(cfg.data.input, cfg.data.data_budget, stream.nbytes(*train),
                            len(cfg.seeds) * cfg.hp.batch_size * ex, what="HP"),
        "ft": stream.decide(cfg.data.input, cfg.data.data_budget, stream.nbytes(*every),
                            max(runs, 1) * cfg.ft.batch_size * ex, what="FT"),
    }


def log_inputs(run: RunDir, inputs: dict) -> None:
    """One ``input`` record per stage (the path taken and why), once per run."""
    logged = {r.get("stage") for r in run.records("input")}
    for stage, choice in inputs.items():
        if stage not in logged:
            run.log("input", stage=stage, **choice)


def _arch(model_cfg: dict) -> tuple:
    bb = make_backbone(model_cfg["backbone"], width=model_cfg.get("width"),
                       depth=model_cfg.get("depth"), stem=model_cfg.get("stem", "cifar"))
    return (model_cfg["backbone"],) + tuple(getattr(bb, f, None) for f in ("width", "depth",
                                                                           "stem"))


def check_init_from(cfg: config_lib.SweepConfig) -> dict:
    """The ``meta.json`` of ``cfg.pretrain.init_from``, checked against the
    config: it exists, is unchanged (``init_sha256``) and holds the
    configured backbone. Returns the meta, with ``meta_sha256`` added."""
    path = cfg.pretrain.init_from
    meta_file = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(f"--init-from {path}: no backbone checkpoint there (no "
                                "meta.json); make one with `hpft import-weights`")
    digest = file_sha256(meta_file)
    if cfg.pretrain.init_sha256 is not None and digest != cfg.pretrain.init_sha256:
        raise ValueError(f"--init-from {path} changed since this run's config was written "
                         "(meta.json's SHA-256 differs); use another --name")
    with open(meta_file) as f:
        meta = json.load(f)
    if "model" not in meta:
        raise ValueError(f"--init-from {path}: meta.json has no 'model' entry; "
                         "not a backbone checkpoint")
    have = _arch(meta["model"])
    want = _arch(config_lib.to_dict(cfg.model))
    if have != want:
        names = ("backbone", "width", "depth", "stem")
        diff = ", ".join(f"{n} {a} (config: {b})" for n, a, b in zip(names, have, want) if a != b)
        raise ValueError(f"--init-from {path} holds another backbone: {diff}; "
                         "set --backbone/--width/--depth/--stem to match")
    return {**meta, "meta_sha256": digest}


# --------------------------------------------------------------------------
# 2. Pretrained backbone and HP snapshots


def pretrained_for(cfg: config_lib.SweepConfig, run: RunDir, *, mesh=None,
                   progress: bool = True) -> dict:
    """The pretrained variables for ``cfg``: imported (``init_from``) or
    pretrained and cached; logged once per run."""
    logged = any(True for _ in run.records("pretrain"))
    if not logged:  # checked again under pretraining's lock: concurrent shards log it once
        log = lambda *a, **kw: (None if any(True for _ in run.records("pretrain"))  # noqa: E731
                                else run.log(*a, **kw))
    if cfg.pretrain.init_from is not None:
        meta = check_init_from(cfg)
        variables, _ = weights.load_imported(cfg.pretrain.init_from)
        if not logged:
            run.log("pretrain", path=os.path.abspath(cfg.pretrain.init_from), reused=True,
                    imported=True, meta_sha256=meta["meta_sha256"], source=meta.get("source"))
        return variables
    pre_vars, _ = pretrain.get_or_train(cfg.data, cfg.model, cfg.pretrain, cfg.runs_dir,
                                        mesh=mesh, progress=progress,
                                        log=None if logged else log)
    return pre_vars


def base_variables(model, pretrained: dict, reinit_blocks: int, x_example) -> tuple[dict, list[str]]:
    """Fresh downstream model with the pretrained backbone loaded into it.

    The head (and the last ``reinit_blocks`` blocks) stay freshly initialised;
    every other leaf must match the checkpoint exactly.
    """
    blocks = head_block_names(model, reinit_blocks)
    reinit = lambda p: is_head_path(p, blocks)  # noqa: E731
    shapes = traverse_util.flatten_dict(jax.eval_shape(
        lambda k: model.init(k, x_example, train=False), jax.random.key(0)))
    # Only the head is initialised (hp.fresh_head_program); the other leaves
    # are shapes here and come from the checkpoint.
    head = hp.fresh_head_program(model, reinit_blocks)(jax.random.key(0), np.asarray(x_example))
    fresh = {**shapes, **head}
    return load_pretrained(traverse_util.unflatten_dict(fresh),
                           {k: v for k, v in pretrained.items() if v}, reinit=reinit)


def scratch_init(model, x_example, seed: int) -> tuple[Tree, Tree]:
    """``(params, batch_stats)`` of a whole random model: the one
    :func:`hpft_jax.hp.init_heads` draws ``seed``'s τ = 0 head from, so the
    head is the sweep's τ = 0 head and the backbone is random."""
    fresh = jax.jit(lambda k: model.init(k, x_example, train=False))(seed_key(seed, HEAD_INIT))
    return fresh["params"], fresh.get("batch_stats", {}) or {}


def drop_empty(tree):
    """``tree`` without empty sub-dicts (orbax cannot save them)."""
    if isinstance(tree, dict):
        return {k: drop_empty(v) for k, v in tree.items() if not (isinstance(v, dict) and not v)}
    return tree


def _snapshot_tree(probe: hp.Probe) -> dict:
    return {f"{v}_tau{t}": {"params": p, "batch_stats": s}
            for (v, t), (p, s) in probe.snapshots.items()}


def load_or_probe(cfg: config_lib.SweepConfig, run: RunDir, model, base: dict,
                  ds: data_lib.Dataset, *, mesh, progress: bool,
                  inputs: dict | None = None) -> hp.Probe:
    """HP snapshots of every variant and τ, from the run's checkpoint when it
    exists (then HP is not rerun); HP records are logged once."""
    path = run.checkpoints("hp")
    # Concurrent shards: one probes and logs, the others wait and read the snapshots.
    with locks.stage(path, "head probing", progress=progress):
        return _load_or_probe(cfg, run, model, base, ds, path, mesh=mesh, progress=progress,
                              inputs=inputs or {})


def _load_or_probe(cfg, run, model, base, ds, path, *, mesh, progress, inputs) -> hp.Probe:
    _, _, fparams, fstats, split = hp.split_head(model, base, cfg.model.reinit_blocks)
    if checkpoint.exists(path):
        tree, meta = checkpoint.load_tree(path)
        snaps = {}
        for key, val in tree.items():
            v, t = key.rsplit("_tau", 1)
            snaps[(v, int(t))] = (val["params"], val.get("batch_stats", {}) or {})
        probe = hp.Probe(split, fparams, fstats, snaps, meta["records"])
    else:
        checkpoint.remove_stale(path)
        probe = hp.probe(model, base, ds.train.x, ds.train.y, cfg.hp, seeds=list(cfg.seeds),
                         variants=variants(cfg), reinit_blocks=cfg.model.reinit_blocks,
                         num_classes=ds.num_classes, augment=cfg.data.augment, mesh=mesh,
                         progress=progress, input=inputs.get("hp"))
        checkpoint.save_tree(path, drop_empty(_snapshot_tree(probe)), {"records": probe.records})
        if not any(True for _ in run.records("hp_cache")):
            run.log("hp_cache", **probe.cache)
    logged = {(r["variant"], r["seed"], r["tau"]) for r in run.records("hp")}
    for rec in probe.records:
        if (rec["variant"], rec["seed"], rec["tau"]) not in logged:
            run.log("hp", **rec)
    return probe


def ft_inits(probe: hp.Probe, keys: list[RunKey], seeds: list[int]) -> list[tuple[Tree, Tree]]:
    """(params, batch_stats) at the start of FT for each run."""
    out = []
    for k in keys:
        p, s = probe.snapshots[(k.variant, k.tau)]
        i = seeds.index(k.seed)
        take = lambda t: jax.tree_util.tree_map(lambda a: a[i], t)  # noqa: E731
        out.append((merge(probe.frozen_params, take(p)), merge(probe.frozen_stats, take(s))))
    return out


@dataclasses.dataclass
class Prepared:
    """Everything a job needs before FT (see the module docstring).

    ``base``: the downstream model's variables with the pretrained backbone
    and a fresh head; ``probe``: the HP snapshots (None with ``with_hp=False``).
    """

    cfg: config_lib.SweepConfig
    loaded: Loaded
    mesh: Any
    base: dict
    probe: hp.Probe | None

    @property
    def ds(self) -> data_lib.Dataset:
        return self.loaded.ds

    @property
    def model(self):
        return self.loaded.model

    def arrays(self) -> dict:
        """The splits as host arrays (:func:`split_arrays`)."""
        return split_arrays(self.ds)

    def init(self, key: RunKey) -> tuple[Tree, Tree]:
        """(params, batch_stats) at the start of FT of run ``key``."""
        return self.inits([key])[0]

    def inits(self, keys: list[RunKey]) -> list[tuple[Tree, Tree]]:
        if self.probe is None:
            raise ValueError("prepare(..., with_hp=False) ran no HP: there are no FT inits")
        return ft_inits(self.probe, keys, list(self.cfg.seeds))


def prepare(cfg: config_lib.SweepConfig, run: RunDir, *, loaded: Loaded | None = None,
            with_hp: bool = True, mesh=None, progress: bool = True) -> Prepared:
    """Pretrained backbone (cached) and, with ``with_hp``, the HP snapshots."""
    loaded = load(cfg) if loaded is None else loaded
    mesh = parallel.data_mesh() if mesh is None else mesh
    pre_vars = pretrained_for(cfg, run, mesh=parallel.flat(mesh), progress=progress)
    base, _ = base_variables(loaded.model, pre_vars, cfg.model.reinit_blocks,
                             loaded.x_example())
    log_inputs(run, loaded.inputs)
    probe = (load_or_probe(cfg, run, loaded.model, base, loaded.ds, mesh=parallel.flat(mesh),
                           progress=progress, inputs=loaded.inputs)
             if with_hp else None)
    return Prepared(cfg, loaded, mesh, base, probe)
