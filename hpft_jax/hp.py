"""Head probing (HP): train the head on a frozen backbone, snapshot at every τ.

HP runs once, up to the largest τ, and keeps the head at every τ of the list
(τ = 0 is the fresh head). All seeds run together under ``vmap``: each seed
has its own head initialisation and data order.

With no augmentation the trunk's features are computed once, in eval mode,
and kept on device, so an HP epoch costs only the head. The backbone's
parameters and BatchNorm statistics are never updated.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hpft_jax import data as data_lib, energy, errors, parallel, steps, stream, tasks
from hpft_jax.params import head_block_names, is_head_path, merge, partition
from hpft_jax.progress import bar
from hpft_jax.rng import HEAD_INIT, HP_DATA, seed_key

Tree = Any

@dataclasses.dataclass
class Probe:
    """What HP hands to FT.

    ``snapshots[(variant, tau)] = (params, batch_stats)``, each stacked over
    seeds (leading axis S); ``records`` are the per-snapshot HP metrics.
    """

    split: int
    frozen_params: Tree
    frozen_stats: Tree
    snapshots: dict[tuple[str, int], tuple[Tree, Tree]]
    records: list[dict]
    cache: dict | None = None  # :func:`feature_cache` of a fresh HP run (None when read back)


def feature_cache(feats: jax.Array, augment: str) -> dict:
    """What HP holds of the trunk's features: shape, dtype, bytes =
    N·h·w·C·itemsize for a feature map (N·h·itemsize for a vector), and
    whether the steps read it (``--augment none``) or recompute the trunk on
    augmented inputs each step (it is then only used for HP's per-τ metrics
    on the unaugmented training inputs)."""
    return {"shape": [int(d) for d in feats.shape], "dtype": str(feats.dtype),
            "bytes": int(np.prod(feats.shape, dtype=np.int64)) * feats.dtype.itemsize,
            "formula": "N·" + "·".join("hwC"[-(feats.ndim - 1):]) + "·itemsize",
            "steps_use_cache": augment == "none"}


def describe_cache(c: dict) -> str:
    """One line for the log: the size of HP's feature cache and its formula."""
    how = ("HP steps read it" if c["steps_use_cache"] else
           "augmentation on: HP steps recompute the trunk each step; kept for the HP metrics")
    return (f"HP feature cache: {'x'.join(map(str, c['shape']))} {c['dtype']} = "
            f"{c['bytes'] / 2**20:.2f} MiB ({c['bytes']} bytes = {c['formula']}); {how}")


def split_head(model, variables: dict, reinit_blocks: int):
    """``(head_params, head_stats, frozen_params, frozen_stats, split)``."""
    blocks = head_block_names(model, reinit_blocks)
    pred = lambda p: is_head_path(p, blocks)  # noqa: E731
    hp_, fp = partition(variables["params"], pred)
    hs, fs = partition(variables.get("batch_stats", {}) or {}, pred)
    return hp_, hs, fp, fs, model.backbone.num_blocks - reinit_blocks


@functools.lru_cache(maxsize=8)
def fresh_head_program(model, reinit_blocks: int):
    """``jit(key, x) -> {path: leaf}``: the head's leaves (params and BN
    stats, paths with their collection) of ``model.init(key, x)``.

    Only the head's initialisers are compiled (XLA drops the rest of
    ``init``, whose random initialisers dominate compile time: minutes for a
    ResNet-50 on a 2-core CPU), and the values are the full init's. One
    program serves the sweep's fresh head and every seed's (cached)."""
    blocks = head_block_names(model, reinit_blocks)

    def fresh(key, x):
        flat = traverse_util.flatten_dict(model.init(key, x, train=False))
        return {p: v for p, v in flat.items() if is_head_path(p, blocks)}

    return jax.jit(fresh)


def init_heads(model, x_example, seeds, reinit_blocks: int):
    """Fresh head parameters (and head-block BN stats), stacked over seeds."""
    fresh = fresh_head_program(model, reinit_blocks)
    x_example = np.asarray(x_example)  # host: the same program as prepare.base_variables

    def one(key):
        v = traverse_util.unflatten_dict(fresh(key, x_example))
        return v.get("params", {}), v.get("batch_stats", {}) or {}

    heads = [one(seed_key(s, HEAD_INIT)) for s in seeds]  # jit: eager init is slow on CPU
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *heads)


def probe(model, base_vars: dict, train_x, train_y, hp_cfg, *, seeds, variants: dict[str, float],
          reinit_blocks: int, num_classes: int, augment: str = "none", mesh=None,
          progress: bool = True, input: dict | None = None) -> Probe:
    """Run HP for every variant (name -> η_HP) and return the snapshots.

    ``base_vars`` holds the pretrained backbone (its head entries are unused);
    train_x (N, ...), train_y (N,). ``variants['hp']`` snapshots at every τ
    of ``hp_cfg.taus``; any other variant (lsHP) only at the largest τ.
    ``input``: :func:`hpft_jax.stream.decide`'s choice; streamed, the
    inputs stay on the host: the trunk's features are computed in chunks and
    kept on the host, and every HP batch (features, or raw inputs with
    augmentation) is gathered there (:mod:`hpft_jax.stream`).
    """
    mesh = parallel.data_mesh() if mesh is None else mesh
    n = train_x.shape[0]
    data_lib.check_batch_size(n, hp_cfg.batch_size, what="the downstream training set (HP)")
    parallel.check_divisible(hp_cfg.batch_size, mesh, what="HP")
    _, _, fparams, fstats, split = split_head(model, base_vars, reinit_blocks)
    frozen = parallel.put_replicated((fparams, fstats), mesh)
    streamed = bool(input) and input["input"] == "stream"
    trunk = jax.jit(lambda fr, xx: steps.predict(
        model, steps.variables(*fr), xx, method=model.trunk, split=split))
    if streamed:  # features on the host, computed in chunks
        feats = np.asarray(stream.map_chunks(lambda xc: trunk(frozen, xc), train_x,
                                             sharding=stream.rows_sharding(mesh)))
        train_inputs, y = (feats if augment == "none" else train_x), np.asarray(train_y)
    else:
        x = parallel.put_replicated(jnp.asarray(train_x), mesh)
        y = parallel.put_replicated(jnp.asarray(train_y), mesh)
        feats = trunk(frozen, x)  # eval mode, (N, ...): cached once
        train_inputs = feats if augment == "none" else x
    cache = feature_cache(feats, augment)
    if progress:
        print(describe_cache(cache), file=sys.stderr, flush=True)

    heads0 = init_heads(model, jnp.asarray(train_x[:2]), seeds, reinit_blocks)
    tx = steps.hp_optimizer(hp_cfg)
    nb = steps.num_batches(n, hp_cfg.batch_size)
    hp_keys = jnp.stack([seed_key(s, HP_DATA) for s in seeds])

    task = tasks.of(model)

    def evaluate(params, stats, fr, eta):
        full = steps.variables(merge(fr[0], params), merge(fr[1], stats))
        logits, _ = steps.predict(model, full, feats, method=model.top, split=split)
        return _scores(task, logits, y, eta)

    eval_fn = (_stream_eval(model, split, feats, y, mesh) if streamed
               else jax.jit(jax.vmap(evaluate, in_axes=(0, 0, None, None))))
    taus = list(hp_cfg.taus)
    snapshots: dict[tuple[str, int], tuple[Tree, Tree]] = {}
    records: list[dict] = []
    total = sum(taus[-1] for _ in variants)
    pb = bar(total, "head probing", enabled=progress)
    step = steps.make_hp_step(model, tx, num_classes=num_classes, split=split, mesh=mesh,
                              augment=augment)
    step_range = steps.make_step_range(step, batch_size=hp_cfg.batch_size, num_examples=n,
                                       reduce=steps.discard())

    def epochs(state, h, yy, key, start, stop, fr, eta):
        """HP epochs [start, stop): one program for every stretch between snapshots."""
        return step_range(state, h, yy, key, start * nb, stop * nb, fr, eta)[0]

    if streamed:
        run = _stream_run(step, train_inputs, y, batch_size=hp_cfg.batch_size, nb=nb,
                          sharding=stream.batch_sharding(mesh, runs=True),
                          prefetch=input["prefetch"])
    else:
        run = jax.jit(jax.vmap(epochs, in_axes=(0, None, None, 0, None, None, None, None)),
                      donate_argnums=0)
    for variant, eta in variants.items():
        eta_arr = jnp.float32(eta)
        # Fresh buffers per variant: ``run`` donates the state, and the vmap
        # below forwards heads0's own arrays into it.
        params, stats = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), heads0)
        state = jax.vmap(lambda p, s: steps.HPState(p, s, tx.init(p), jnp.zeros((), jnp.int32)))(
            params, stats)
        state = parallel.put_replicated(state, mesh)  # same sharding as the outputs: no retrace
        wanted = taus if variant == "hp" else [taus[-1]]
        done = 0
        for tau in wanted:
            if tau > done:
                state = run(state, train_inputs, y, hp_keys, done, tau, frozen, eta_arr)
                pb.update(tau - done)
                done = tau
            m = jax.device_get(eval_fn(state.params, state.batch_stats, frozen, eta_arr))
            errors.check_finite(np.asarray(m["loss"])[:, None], stage=f"HP ({variant})",
                                epoch=tau, steps_per_epoch=nb,
                                runs=[f"seed {s}" for s in seeds])
            snapshots[(variant, tau)] = jax.device_get((state.params, state.batch_stats))
            for i, seed in enumerate(seeds):
                records.append({
                    "variant": variant, "seed": int(seed), "tau": int(tau), "eta_hp": float(eta),
                    "hp_train_acc": float(m["acc"][i]), "hp_train_loss": float(m["loss"][i]),
                    "aie_hp": float(m["aie"][i]),
                    "p0y_hist": energy.histogram(m["p_true"][i]),
                })
        pb.update(taus[-1] - done)
    pb.close()
    return Probe(split, jax.device_get(fparams), jax.device_get(fstats), snapshots, records,
                 cache)


def _scores(task, logits, y, eta) -> dict:
    loss = task.loss(logits, y, eta)
    return {"acc": task.metric(logits, y), "loss": loss,
            "p_true": task.p_true(logits, y), "aie": task.energy(logits, y)}


def _stream_eval(model, split: int, feats: np.ndarray, y: np.ndarray, mesh):
    """``eval_fn(params, stats, frozen, eta)`` of :func:`probe` on host
    features: logits (S, N, ...) in chunks, then the same scores."""
    task = tasks.of(model)

    def logits(params, stats, fr, hc):
        full = steps.variables(merge(fr[0], params), merge(fr[1], stats))
        return steps.predict(model, full, hc, method=model.top, split=split)[0]

    lg = jax.jit(jax.vmap(logits, in_axes=(0, 0, None, None)))
    sc = jax.jit(jax.vmap(lambda l, yy, eta: _scores(task, l, yy, eta), in_axes=(0, None, None)))
    yd = parallel.put_replicated(np.asarray(y), mesh)

    def eval_fn(params, stats, fr, eta):
        out = stream.map_chunks(lambda hc: lg(params, stats, fr, hc), feats,
                                sharding=stream.rows_sharding(mesh), axis=1)
        return sc(out, yd, eta)

    return eval_fn


def _stream_run(step, xs, ys, *, batch_size: int, nb: int, sharding, prefetch: int):
    """``run(state, _, _, keys, start, stop, frozen, eta)`` of :func:`probe`
    with streamed batches of the host arrays ``xs, ys``: HP epochs
    [start, stop) of every seed."""
    one = jax.jit(jax.vmap(stream.keyed_step(step), in_axes=(0, 0, 0, 0, None, None, None, None)),
                  donate_argnums=0)

    def run(state, _x, _y, keys, start, stop, fr, eta):
        return stream.run_range(one, state, (xs, ys), keys, start * nb, stop * nb,
                                batch_size=batch_size, num_examples=xs.shape[0],
                                sharding=sharding, consts=(fr, eta), prefetch=prefetch)

    return run
