"""Jitted, pure training steps and epochs for pretraining, HP and FT.

Everything here is a function of arrays and returns new arrays; the drivers
(:mod:`hpft_jax.pretrain`, :mod:`hpft_jax.hp`, :mod:`hpft_jax.ft`) own the
loops, checkpoints and logging.

* :func:`make_step_range` is the one training loop: steps [start, stop) in a
  ``fori_loop``, step ``s`` on batch ``s % nb`` of the permutation drawn from
  ``fold_in(key, s // nb)``; data stay on device and every batch is gathered
  by index, so no host round-trip happens inside a range. An epoch
  (:func:`make_epoch`) is the range of its steps.
* Head probing differentiates only the head (``jax.value_and_grad`` w.r.t. the
  head's parameters), on features the frozen trunk produced once in eval mode.
  No backward pass runs through the backbone, and its BatchNorm statistics
  are never touched.
* FT epochs carry early-stopping state (best parameters, patience counter), so
  that many FT runs can be ``vmap``-ed into one program and still stop at
  the epoch a sequential run would have stopped at.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from hpft_jax import augment, convs, images, parallel, pipeline, rng, tasks
from hpft_jax.params import merge, partition

Tree = Any


class TrainState(NamedTuple):
    params: Tree
    batch_stats: Tree  # {} for models without BatchNorm
    opt_state: Tree
    step: jax.Array


def variables(params: Tree, batch_stats: Tree) -> dict:
    """The ``apply`` variables dict; omits empty ``batch_stats``."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def init_state(params: Tree, batch_stats: Tree, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(params, batch_stats, tx.init(params), jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------
# Optimizers


def pretrain_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """Adam (or SGD+momentum) with a cosine schedule; ``cfg``: PretrainConfig."""
    lr = optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1))
    if cfg.optimizer == "adam":
        return optax.adamw(lr, weight_decay=cfg.weight_decay)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(lr, momentum=0.9))


def hp_optimizer(cfg) -> optax.GradientTransformation:
    """SGD at a constant learning rate (+ ``cfg.momentum``; 0 = plain SGD,
    the optimizer HP always had); ``cfg``: HPConfig."""
    return optax.sgd(cfg.lr, momentum=getattr(cfg, "momentum", 0.0) or None)


def ft_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """SGD (+ ``cfg.momentum``; 0 = plain SGD), cosine schedule over
    ``total_steps`` or constant lr (``cfg.schedule``), optional weight decay;
    FTConfig."""
    lr = (optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1)) if cfg.schedule == "cosine"
          else cfg.lr)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(lr, momentum=cfg.momentum or None))


# --------------------------------------------------------------------------
# Batching


def num_batches(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped, reshuffled each epoch)."""
    return num_examples // batch_size


def epoch_indices(key: jax.Array, epoch: jax.Array, num_examples: int,
                  batch_size: int) -> jax.Array:
    """(num_batches, batch_size) indices of a fresh permutation for ``epoch``."""
    nb = num_batches(num_examples, batch_size)
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return perm[: nb * batch_size].reshape(nb, batch_size)


def _augment_fn(kind: str, model=None) -> Callable | None:
    """``aug(x, y, key) -> (x, y)``; uint8 images are normalised first with
    the model's ``input_norm``, so that augmentation sees what the float path
    saw. Image-only kinds leave y alone; ``scale_crop_flip`` moves
    segmentation masks y (N, H, W) with their images."""
    if kind == "none":
        return None
    norm = getattr(model, "input_norm", None)
    if kind == "flip_crop":
        return lambda x, y, k: (augment.flip_crop(images.model_input(x, norm), k), y)
    if kind == "rrc_flip":
        return lambda x, y, k: (pipeline.random_resized_crop_flip(images.model_input(x, norm),
                                                                  k), y)
    if kind == "scale_crop_flip":
        return lambda x, y, k: augment.scale_crop_flip(images.model_input(x, norm), y, k)
    raise ValueError(f"unknown augmentation {kind!r}")


# --------------------------------------------------------------------------
# Inference


EVAL_CHUNK = 512  # rows per evaluation chunk: predict in a program, stream.map_chunks on the host


def predict(model, vars_: dict, x: jax.Array, *, chunk: int = EVAL_CHUNK,
            method: Callable | None = None, **kwargs) -> Any:
    """Eval-mode ``model.apply`` over ``x`` (N, ...) in chunks, inside jit.

    The chunks run under ``lax.map`` so peak memory is one chunk's
    activations. Returns what ``apply`` returns, with leading axis N.
    """
    n = x.shape[0]
    c = min(chunk, n)
    nb = math.ceil(n / c)
    pad = nb * c - n
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    xs = x.reshape((nb, c) + x.shape[1:])

    def one(xb):
        return model.apply(vars_, xb, train=False, method=method, **kwargs)

    out = jax.lax.map(one, xs)
    return jax.tree_util.tree_map(lambda o: o.reshape((nb * c,) + o.shape[2:])[:n], out)


# --------------------------------------------------------------------------
# Full-model training (pretraining and FT)


def make_train_step(model, tx, *, num_classes: int, eta: float | jax.Array,
                    mesh=None, augment: str = "none"):
    """``step(state, x, y, key[, frozen]) -> (state, metrics)``.

    Trains ``state.params``: every parameter, or, when ``frozen`` (the
    remaining parameters, a disjoint tree) is given, only that subset. Frozen
    parameters get no gradient computation and no optimizer state; they enter
    the forward pass as arguments. BatchNorm runs in train mode throughout.

    x: (B, ...) inputs, y: (B,) labels. Metrics: ``loss``, ``acc`` and
    ``grad_v_norm`` = ||grad of the loss w.r.t. params/head|| (the direction
    term's change, Fig. 2 right; 0 if the head is frozen).
    Convolutions compute as the model's ``conv`` field says (:mod:`hpft_jax.convs`).
    """
    aug = _augment_fn(augment, model)
    task = tasks.of(model)
    conv = getattr(model, "conv", "auto")
    del num_classes  # the logits' last axis (kept for callers)

    @convs.wrap(conv)
    def loss_fn(params, frozen, batch_stats, x, y, rngs):
        full = merge(frozen, params) if frozen else params
        if batch_stats:
            (logits, _), upd = model.apply(variables(full, batch_stats), x,
                                           train=True, mutable=["batch_stats"], rngs=rngs)
            new_bs = upd["batch_stats"]
        else:
            logits, _ = model.apply({"params": full}, x, train=True, rngs=rngs)
            new_bs = batch_stats
        return task.loss(logits, y, eta), (new_bs, logits)

    def step(state: TrainState, x, y, key, frozen=None):
        x = parallel.shard_batch(x, mesh)
        if aug is not None:
            x, y = aug(x, y, key)
        (loss, (new_bs, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, state.batch_stats, x, y, dropout_rngs(key))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        gv = optax.tree.norm(grads["head"]) if "head" in grads else jnp.float32(0.0)
        metrics = {"loss": loss, "acc": task.train_metric(logits, y), "grad_v_norm": gv}
        return TrainState(params, new_bs, opt_state, state.step + 1), metrics

    return step


class Reduce(NamedTuple):
    """How a step range folds its per-step metrics (an optax-style pair).

    ``init(metric_shapes, start) -> acc`` and ``update(acc, s, metrics) -> acc``,
    where ``s`` is the global step number and ``metric_shapes`` the
    ``jax.ShapeDtypeStruct`` tree of one step's metrics.
    """

    init: Callable
    update: Callable


def discard() -> Reduce:
    """Keep no metrics (XLA may then skip computing them)."""
    return Reduce(lambda shapes, start: (), lambda acc, s, m: acc)


def last_step() -> Reduce:
    """Keep the metrics of the last step run (zeros if none ran)."""
    return Reduce(
        lambda shapes, start: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes),
        lambda acc, s, m: m)


def per_step(length: int) -> Reduce:
    """Stack the metrics of steps ``[start, start + length)``: arrays (length, ...)."""

    def init(shapes, start):
        return jax.tree_util.tree_map(
            lambda a: jnp.zeros((length,) + a.shape, a.dtype), shapes), start

    def update(acc, s, m):
        buf, start = acc
        return jax.tree_util.tree_map(lambda b, v: b.at[s - start].set(v), buf, m), start

    return Reduce(init, update)


def make_step_range(step, *, batch_size: int, num_examples: int, reduce: Reduce | None = None):
    """``run(state, xs, ys, key, start, stop, *consts) -> (state, acc)``: steps [start, stop).

    The one training loop of the library: pretraining, HP, early-stopped FT
    and the fixed-length FT of the analysis experiments all run through it,
    so they take the same steps by construction. Global step ``s`` trains on
    batch ``s % nb`` of the permutation of epoch ``s // nb`` (drawn from
    ``fold_in(key, epoch)``; nb = full batches per epoch) with the key
    :func:`hpft_jax.rng.step_key` ``(key, epoch, batch)``. Data stay on
    device and every batch is gathered by index, so no host round-trip
    happens inside the range. ``start``/``stop`` may be traced: one compiled
    program serves every stretch. ``consts`` are passed to every ``step``
    call unchanged (frozen parameters, as arguments rather than constants
    baked into the program). ``reduce`` folds the per-step metrics
    (default :func:`last_step`).
    """
    nb = num_batches(num_examples, batch_size)
    if nb < 1:
        raise ValueError(
            f"batch size {batch_size} is larger than the {num_examples} training examples")
    reduce = last_step() if reduce is None else reduce

    def run(state, xs, ys, key, start, stop, *consts):
        start = jnp.asarray(start, jnp.int32)
        stop = jnp.asarray(stop, jnp.int32)
        shapes = jax.eval_shape(lambda st: step(st, xs[:batch_size], ys[:batch_size], key,
                                                *consts)[1], state)

        def epoch_body(e, carry):
            idx = epoch_indices(key, e, num_examples, batch_size)
            ekey = rng.epoch_key(key, e)

            def body(i, carry):
                st, acc = carry
                ix = idx[i]
                st, m = step(st, xs[ix], ys[ix], jax.random.fold_in(ekey, i), *consts)
                return st, reduce.update(acc, e * nb + i, m)

            lo = jnp.maximum(start - e * nb, 0)
            hi = jnp.minimum(stop - e * nb, nb)
            return jax.lax.fori_loop(lo, hi, body, carry)

        return jax.lax.fori_loop(start // nb, (stop + nb - 1) // nb, epoch_body,
                                 (state, reduce.init(shapes, start)))

    return run


def make_epoch(step, *, batch_size: int, num_examples: int):
    """``epoch(state, x, y, key, epoch, *consts) -> (state, per-step metrics)``.

    The steps of one epoch through :func:`make_step_range`; per-step metrics
    come back stacked, shape (num_batches,).
    """
    nb = num_batches(num_examples, batch_size)
    run = make_step_range(step, batch_size=batch_size, num_examples=num_examples,
                          reduce=per_step(max(nb, 1)))

    def epoch(state, xs, ys, key, epoch, *consts):
        e = jnp.asarray(epoch, jnp.int32)
        state, (metrics, _) = run(state, xs, ys, key, e * nb, (e + 1) * nb, *consts)
        return state, metrics

    return epoch


# --------------------------------------------------------------------------
# Head probing on cached trunk features


class HPState(NamedTuple):
    """Only what HP trains: the head (plus re-initialised blocks)."""

    params: Tree  # the head's parameters, a subtree of the model's params
    batch_stats: Tree  # BatchNorm statistics of re-initialised blocks ({} if none)
    opt_state: Tree
    step: jax.Array


def make_hp_step(model, tx, *, num_classes: int, split: int, mesh=None,
                 augment: str = "none"):
    """``step(state, h, y, key, frozen, eta) -> (state, metrics)`` on trunk features h.

    ``frozen = (frozen_params, frozen_stats)``: everything HP does not train;
    ``eta``: the HP label-smoothing weight (an argument, so that HP and lsHP
    share one compiled program).

    Without augmentation, h: (B, ...) = ``model.trunk(x, split=split)``
    computed once in eval mode (the features are cached). With augmentation,
    h is the raw batch x; it is augmented and passed through the frozen trunk
    in eval mode inside the step (forward only).
    Gradients are taken w.r.t. ``state.params`` only; ``frozen_params`` enter
    the forward pass as constants, so no backward pass runs through them.
    """
    aug = _augment_fn(augment, model)
    task = tasks.of(model)
    conv = getattr(model, "conv", "auto")
    del num_classes  # the logits' last axis (kept for callers)

    @convs.wrap(conv)
    def loss_fn(params, batch_stats, h, y, frozen_params, frozen_stats, eta, rngs):
        full = merge(frozen_params, params)
        if batch_stats:
            (logits, _), upd = model.apply(
                variables(full, merge(frozen_stats, batch_stats)), h, split=split,
                train=True, method=model.top, mutable=["batch_stats"], rngs=rngs)
            new_bs, _ = partition(upd["batch_stats"], _in_tree(batch_stats))
        else:
            logits, _ = model.apply(variables(full, frozen_stats), h, split=split,
                                    train=False, method=model.top)
            new_bs = batch_stats
        return task.loss(logits, y, eta), (new_bs, logits)

    def step(state: HPState, h, y, key, frozen, eta):
        frozen_params, frozen_stats = frozen
        h = parallel.shard_batch(h, mesh)
        if aug is not None:
            h, y = aug(h, y, key)
            h = model.apply(variables(frozen_params, frozen_stats), h,
                            split=split, train=False, method=model.trunk)
            h = jax.lax.stop_gradient(h)
        (loss, (new_bs, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, h, y, frozen_params, frozen_stats, eta,
            dropout_rngs(key))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return HPState(params, new_bs, opt_state, state.step + 1), {
            "loss": loss, "acc": task.train_metric(logits, y)}

    return step


def dropout_rngs(key: jax.Array) -> dict:
    """The ``rngs`` of a train-mode ``apply``: dropout draws from its own
    stream of the step key (models without dropout never read it)."""
    return {"dropout": rng.dropout_key(key)}


def _in_tree(tree: Tree) -> Callable[[tuple], bool]:
    keys = set(traverse_util.flatten_dict(tree))
    return lambda path: path in keys
