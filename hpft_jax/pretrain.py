"""Supervised pretraining of a backbone on the source data, cached on disk.

The checkpoint holds ``params``, ``batch_stats`` and, in ``meta.json``, the
config that produced it. It lives under ``<runs_dir>/pretrained/<key>/``,
where the key hashes every setting that changes the weights, so every sweep
with the same source and backbone reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax import checkpoint, config as config_lib, data as data_lib, errors, locks, parallel
from hpft_jax import steps, stream, tasks
from hpft_jax.models import make_classifier
from hpft_jax.progress import bar


def source_model_config(model_cfg: config_lib.ModelConfig) -> config_lib.ModelConfig:
    """The pretraining model: the same backbone with a linear head (a
    DeepLabV3 head stays: the source is a segmentation set then)."""
    head = model_cfg.head if model_cfg.head.startswith("deeplab") else "linear"
    return dataclasses.replace(model_cfg, head=head, reinit_blocks=0)


# The DataConfig fields that change the pretraining data or its training.
SOURCE_FIELDS = ("source", "data_dir", "image_size", "augment", "seed", "val_fraction",
                 "test_fraction")


def source_data_key(data: config_lib.DataConfig) -> dict:
    """The data settings pretraining depends on: the source side only, plus
    the downstream split when both read the same base set (pretraining then
    leaves out the originals of the downstream val/test images)."""
    key = {k: getattr(data, k) for k in SOURCE_FIELDS}
    if data.pipeline == "imagenet":  # only when set, so older cache keys stay valid
        key["pipeline"] = data.pipeline
    if data.flowers_split != "tfds" and "oxford_flowers102" in data.source:
        key["flowers_split"] = data.flowers_split
    if data_lib.parse_spec(data.source).same_base(data_lib.parse_spec(data.downstream)):
        key.update(downstream=data.downstream, per_class=data.per_class)
    return json.loads(json.dumps(key))


def cache_key(data: config_lib.DataConfig, model: config_lib.ModelConfig,
              pre: config_lib.PretrainConfig) -> str:
    m = source_model_config(model)
    blob = json.dumps({
        "data": source_data_key(data),
        "backbone": {k: getattr(m, k) for k in ("backbone", "width", "depth", "stem", "dtype")},
        "pretrain": {k: v for k, v in config_lib.to_dict(pre).items()
                     if k not in ("init_from", "init_sha256")},
    }, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    src = data.source.replace(":", "_").replace("/", "_")[-40:]
    return f"{model.backbone}-{src}-{digest}"


def pretrained_dir(runs_dir: str, data, model, pre) -> str:
    return os.path.join(runs_dir, "pretrained", cache_key(data, model, pre))


def input_choice(data_cfg, pre_cfg, source) -> dict:
    """:func:`hpft_jax.stream.decide` for pretraining on ``source``'s
    training split (``data_cfg.input``, ``data_cfg.data_budget``)."""
    train = (source.train.x, source.train.y)
    return stream.decide(data_cfg.input, data_cfg.data_budget, stream.nbytes(*train),
                         pre_cfg.batch_size * stream.example_bytes(*train), what="pretraining")


def train(data_cfg, model_cfg, pre_cfg, source, *, mesh=None, progress: bool = True,
          input: dict | None = None):
    """Train the source classifier; returns ``(variables, metrics)``.

    ``source``: a :class:`hpft_jax.data.Dataset`. Adam (or SGD) with a cosine
    schedule, cross-entropy, BatchNorm in train mode. ``input``:
    :func:`input_choice`; streamed, the splits stay on the host, batches are
    gathered there (:mod:`hpft_jax.stream`; the same steps as on device) and
    the final accuracies are computed in chunks.
    """
    streamed = bool(input) and input["input"] == "stream"
    mesh = parallel.data_mesh() if mesh is None else mesh
    model = make_classifier(source_model_config(model_cfg), source.num_classes, source.task,
                            source.input_norm)
    n = source.train.x.shape[0]
    data_lib.check_batch_size(n, pre_cfg.batch_size, what=f"pretraining set {data_cfg.source!r}")
    parallel.check_divisible(pre_cfg.batch_size, mesh, what="pretraining")
    nb = steps.num_batches(n, pre_cfg.batch_size)
    tx = steps.pretrain_optimizer(pre_cfg, pre_cfg.epochs * nb)
    key = jax.random.key(pre_cfg.seed)
    init_key, data_key = jax.random.split(key)
    vars_ = model.init(init_key, jnp.asarray(source.train.x[:2]), train=False)
    state = steps.init_state(vars_["params"], vars_.get("batch_stats", {}), tx)
    step = steps.make_train_step(model, tx, num_classes=source.num_classes, eta=1.0,
                                 mesh=mesh, augment=data_cfg.augment)
    if streamed:
        epoch_fn = _stream_epoch(step, source.train.x, source.train.y, pre_cfg.batch_size,
                                 mesh, input["prefetch"])
        xs, ys = None, None
    else:
        epoch_fn = jax.jit(steps.make_epoch(step, batch_size=pre_cfg.batch_size, num_examples=n),
                           donate_argnums=0)
        xs, ys = parallel.put_replicated((jnp.asarray(source.train.x),
                                          jnp.asarray(source.train.y)), mesh)
    state = parallel.put_replicated(state, mesh)
    pb = bar(pre_cfg.epochs, f"pretrain {data_cfg.source}", enabled=progress)
    for e in range(pre_cfg.epochs):
        state, m = epoch_fn(state, xs, ys, data_key, e)
        loss = np.asarray(m["loss"])
        errors.check_finite(loss, stage="pretraining", epoch=e, steps_per_epoch=nb)
        pb.set_postfix(loss=f"{loss.mean():.3f}", acc=f"{float(np.mean(m['acc'])):.3f}")
        pb.update()
    pb.close()
    out = {"params": state.params, "batch_stats": state.batch_stats}
    evaluate = jax.jit(lambda v, x: steps.predict(model, steps.variables(**v), x)[0])
    metrics = {}
    for name, split in (("train", source.train), ("val", source.val), ("test", source.test)):
        if split.x.shape[0]:
            logits = (stream.map_chunks(lambda xc: evaluate(out, xc), split.x,
                                        sharding=stream.rows_sharding(mesh))
                      if streamed else evaluate(out, jnp.asarray(split.x)))
            metrics[f"{name}_acc"] = float(tasks.of(model).metric(logits, jnp.asarray(split.y)))
    return jax.device_get(out), metrics


def get_or_train(data_cfg, model_cfg, pre_cfg, runs_dir: str, *, mesh=None,
                 progress: bool = True, log=None):
    """Load the cached pretrained checkpoint, or train and save it.

    Returns ``(variables, meta)``; ``meta`` holds the config and metrics.
    ``log(event, **fields)`` is called once with the outcome.
    """
    path = pretrained_dir(runs_dir, data_cfg, model_cfg, pre_cfg)
    # Concurrent shards: one trains, the others wait and read its checkpoint.
    with locks.stage(path, "pretraining", progress=progress):
        if checkpoint.exists(path):
            tree, meta = checkpoint.load_tree(path)
            reused = True
        else:
            checkpoint.remove_stale(path)
            source = data_lib.load_source(data_cfg)
            choice = input_choice(data_cfg, pre_cfg, source)
            tree, metrics = train(data_cfg, model_cfg, pre_cfg, source, mesh=mesh,
                                  progress=progress, input=choice)
            meta = {"data": config_lib.to_dict(data_cfg), "input": choice,
                    "model": config_lib.to_dict(source_model_config(model_cfg)),
                    "pretrain": config_lib.to_dict(pre_cfg),
                    "num_classes": int(source.num_classes), "metrics": metrics}
            checkpoint.save_tree(path, tree, meta)
            reused = False
        tree = {"params": tree["params"], "batch_stats": tree.get("batch_stats", {}) or {}}
        if log is not None:
            log("pretrain", path=path, reused=reused, **meta.get("metrics", {}))
    return tree, meta


def _stream_epoch(step, x, y, batch_size: int, mesh, prefetch: int):
    """``epoch(state, _, _, key, e) -> (state, per-step metrics)``: what
    :func:`hpft_jax.steps.make_epoch` computes, with streamed batches."""
    one = jax.jit(stream.keyed_step(step), donate_argnums=0)
    sharding = stream.batch_sharding(mesh, runs=False)
    nb = steps.num_batches(x.shape[0], batch_size)

    def epoch(state, _x, _y, key, e):
        per_step = []
        state = stream.run_range(one, state, (x, y), key, e * nb, (e + 1) * nb,
                                 batch_size=batch_size, num_examples=x.shape[0],
                                 sharding=sharding, prefetch=prefetch,
                                 on_step=lambda s, m: per_step.append(m))
        return state, jax.tree_util.tree_map(lambda *v: jnp.stack(v), *per_step)

    return epoch
