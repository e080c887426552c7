"""Finetuning (FT) from HP snapshots, many runs batched with ``vmap``.

A batch of R runs (snapshots x seeds) shares one jitted program: every epoch
trains all R models on their own data order, evaluates them on the
validation and test sets, and updates each run's early-stopping state
(best parameters by validation accuracy, patience). A run that has stopped
keeps its parameters fixed, so the batched result equals R sequential runs.

At the start of FT the driver records, per run, the initial energy
(AIE = E||e_y - p_0||, Prop. 1) and the features z_0 on the unaugmented
training inputs in eval mode; at the end, z_T on the same inputs and the
four adaptation metrics (+ dist) twice: of the best-validation
(early-stopped) model (``adapt``) and of the model at the last epoch run
(``adapt_last``; equal when early stopping is off). With ``project=n``, the
first principal plane of z_0 on n fixed inputs and both z_T projected on it
(:func:`projection`; Fig. 3 middle, Fig. 11).
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax import checkpoint, data as data_lib, energy, errors, parallel, rng, steps, stream
from hpft_jax import tasks
from hpft_jax.params import merge, partition
from hpft_jax.progress import bar
from hpft_jax.rng import FT_DATA, seed_key

PROJECTION_STREAM = 11  # rng stream of the projected inputs
# Feature maps (segmentation): the per-location adaptation metrics use the
# first this many inputs of the adaptation set (z_0's maps are kept for them:
# DENSE_INPUTS·h·w·C floats per run).
DENSE_INPUTS = 64

Tree = Any


class FTCarry(NamedTuple):
    state: steps.TrainState
    best_params: Tree
    best_stats: Tree
    best_val: jax.Array  # () float32
    best_epoch: jax.Array  # () int32, -1 before the first epoch
    bad_epochs: jax.Array  # () int32, epochs without improvement
    stopped: jax.Array  # () bool


def _where(pred, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def init_carry(params, batch_stats, tx) -> FTCarry:
    """Early-stopping state. The best-so-far slots start as zeros (the first
    epoch always improves on best_val = -1); sharing the input buffers
    instead would donate one buffer twice."""
    state = steps.init_state(params, batch_stats, tx)
    zeros = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)  # noqa: E731
    return FTCarry(state, zeros(params), zeros(batch_stats), jnp.float32(-1.0),
                   jnp.int32(-1), jnp.int32(0), jnp.bool_(False))


def ft_tx(ft_cfg, num_train: int):
    """FT's optimizer: its cosine schedule spans ``ft_cfg.epochs`` epochs."""
    return steps.ft_optimizer(ft_cfg, ft_cfg.epochs * steps.num_batches(num_train,
                                                                        ft_cfg.batch_size))


def make_ft_step(model, ft_cfg, *, num_classes: int, num_train: int, mesh=None,
                 augment: str = "none"):
    """``(tx, step)``: FT's optimizer and train step; every FT in the library
    (early-stopped or fixed-length) is built from this pair."""
    tx = ft_tx(ft_cfg, num_train)
    return tx, steps.make_train_step(model, tx, num_classes=num_classes, eta=ft_cfg.eta,
                                     mesh=mesh, augment=augment)


class FTSteps(NamedTuple):
    """Fixed-length FT, step by step, without early stopping (drift, eq2).

    ``run(state, xs, ys, key, start, stop) -> (state, metrics of the last
    step)`` is jitted with the state donated and takes exactly the steps
    [start, stop) that :func:`finetune` takes (same optimizer, schedule,
    batches and keys; ``key = rng.seed_key(seed, FT_DATA)``);
    ``batch(key, s)`` gives step ``s``'s (B,) example indices.
    """

    tx: Any
    run: Any
    batch: Any
    num_batches: int
    total_steps: int


def make_ft_steps(model, ft_cfg, *, num_classes: int, num_train: int, mesh=None,
                  augment: str = "none") -> FTSteps:
    """:class:`FTSteps` for ``ft_cfg.epochs`` epochs of ``num_train`` examples."""
    nb = steps.num_batches(num_train, ft_cfg.batch_size)
    if nb < 1:
        raise ValueError(f"FT batch {ft_cfg.batch_size} is larger than the {num_train} "
                         "training examples")
    tx, step = make_ft_step(model, ft_cfg, num_classes=num_classes, num_train=num_train,
                            mesh=mesh, augment=augment)
    run = steps.make_step_range(step, batch_size=ft_cfg.batch_size, num_examples=num_train)

    def batch(key, s):
        return steps.epoch_indices(key, s // nb, num_train, ft_cfg.batch_size)[s % nb]

    return FTSteps(tx, jax.jit(run, donate_argnums=0), jax.jit(batch), nb, ft_cfg.epochs * nb)


def make_ft_epoch(model, ft_cfg, *, num_classes: int, num_train: int, mesh=None,
                  augment: str = "none"):
    """``ft_epoch(carry, data, key, epoch[, frozen]) -> (carry, metrics)``, one run.

    ``data``: dict of on-device arrays ``train_x, train_y, val_x, val_y,
    test_x, test_y``; ``frozen``: parameters held fixed (Layer FT), or None.
    Metrics: per-step ``loss`` and ``grad_v_norm``
    (num_batches,), and scalars ``train_acc`` (running, over the epoch's
    batches), ``val_acc``, ``test_acc`` (eval mode) and ``active``.
    """
    _, step = make_ft_step(model, ft_cfg, num_classes=num_classes, num_train=num_train,
                           mesh=mesh, augment=augment)
    epoch = steps.make_epoch(step, batch_size=ft_cfg.batch_size, num_examples=num_train)
    task = tasks.of(model)

    def evaluate(state, frozen, x, y):
        """(the task's metric, its loss with unsmoothed targets) in eval mode."""
        if x.shape[0] == 0:
            return jnp.float32(jnp.nan), jnp.float32(jnp.nan)
        params = merge(frozen, state.params) if frozen else state.params
        logits, _ = steps.predict(model, steps.variables(params, state.batch_stats), x)
        return _scores(task, logits, y)

    def ft_epoch(carry: FTCarry, data, key, e, frozen=None):
        consts = (frozen,) if frozen else ()
        new_state, m = epoch(carry.state, data["train_x"], data["train_y"], key, e, *consts)
        state = _where(carry.stopped, carry.state, new_state)
        val_acc, val_loss = evaluate(state, frozen, data["val_x"], data["val_y"])
        test_acc, _ = evaluate(state, frozen, data["test_x"], data["test_y"])
        return _early_stop(ft_cfg, carry, state, m, val_acc, val_loss, test_acc, e)

    return ft_epoch


def _scores(task, logits, y):
    """(the task's metric, its loss with unsmoothed targets)."""
    return task.metric(logits, y), task.loss(logits, y, 1.0)


def _early_stop(ft_cfg, carry: FTCarry, state, m, val_acc, val_loss, test_acc, e):
    """The carry after epoch ``e`` (``state``: its trained state, ``m``: its
    per-step metrics) and the epoch's metrics; one run."""
    improved = (val_acc > carry.best_val) & ~carry.stopped
    if not ft_cfg.early_stopping:  # the last epoch's model is the one kept
        improved = ~carry.stopped
    bad = jnp.where(improved, 0, carry.bad_epochs + jnp.where(carry.stopped, 0, 1))
    new = FTCarry(
        state,
        _where(improved, state.params, carry.best_params),
        _where(improved, state.batch_stats, carry.best_stats),
        jnp.where(improved, val_acc, carry.best_val),
        jnp.where(improved, e, carry.best_epoch).astype(jnp.int32),
        bad.astype(jnp.int32),
        carry.stopped | (bad >= ft_cfg.patience),
    )
    metrics = {"loss": m["loss"], "grad_v_norm": m["grad_v_norm"],
               "train_acc": m["acc"].mean(), "val_acc": val_acc, "val_loss": val_loss,
               "test_acc": test_acc,
               "active": ~carry.stopped}
    return new, metrics


@functools.lru_cache(maxsize=16)
def _epoch_program(model, ft_cfg, num_classes: int, num_train: int, mesh, augment: str):
    """The jitted, vmapped FT epoch; cached so that sequential runs (one
    ``finetune`` call per τ) reuse one compiled program."""
    epoch = make_ft_epoch(model, ft_cfg, num_classes=num_classes, num_train=num_train,
                          mesh=mesh, augment=augment)
    return jax.jit(jax.vmap(epoch, in_axes=(0, None, 0, None, 0),
                            spmd_axis_name=parallel.spmd_axis(mesh)), donate_argnums=0)


class StreamProgram(NamedTuple):
    """The streamed FT epoch's jitted, vmapped pieces (see :func:`finetune`).

    ``step(state, x, y, keys, epoch, i, stopped, frozen)``: one step of every
    run on its (B, ...) batch (stopped runs keep their state; state donated);
    ``logits(state, frozen, x)``: eval-mode logits (R, c, ...) of a chunk;
    ``finish(carry, m, val_logits, val_y, test_logits, test_y, epoch)``: the
    early-stopping update of :func:`make_ft_epoch` (carry donated).
    """

    step: Any
    logits: Any
    finish: Any


@functools.lru_cache(maxsize=16)
def _stream_program(model, ft_cfg, num_classes: int, num_train: int, mesh,
                    augment: str) -> StreamProgram:
    _, step = make_ft_step(model, ft_cfg, num_classes=num_classes, num_train=num_train,
                           mesh=mesh, augment=augment)
    keyed = stream.keyed_step(step)
    task = tasks.of(model)
    spmd = parallel.spmd_axis(mesh)

    def one(state, x, y, key, e, i, stopped, frozen=None):
        new, m = keyed(state, x, y, key, e, i, *((frozen,) if frozen else ()))
        return _where(stopped, state, new), m

    def logits(state, frozen, x):
        params = merge(frozen, state.params) if frozen else state.params
        return steps.predict(model, steps.variables(params, state.batch_stats), x)[0]

    def finish(carry, m, val_logits, val_y, test_logits, test_y, e):
        nan = (jnp.float32(jnp.nan), jnp.float32(jnp.nan))
        val_acc, val_loss = _scores(task, val_logits, val_y) if val_y.shape[0] else nan
        test_acc, _ = _scores(task, test_logits, test_y) if test_y.shape[0] else nan
        return _early_stop(ft_cfg, carry, carry.state, m, val_acc, val_loss, test_acc, e)

    return StreamProgram(
        jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None, None, 0, 0), spmd_axis_name=spmd),
                donate_argnums=0),
        jax.jit(jax.vmap(logits, in_axes=(0, 0, None), spmd_axis_name=spmd)),
        jax.jit(jax.vmap(finish, in_axes=(0, 0, 0, None, 0, None, None), spmd_axis_name=spmd),
                donate_argnums=0))


def _stream_eval(prog: StreamProgram, state, frozen, x, y, *, num_runs: int, chunk: int,
                 mesh):
    """Logits (R, N, ...) of host ``x`` in chunks (each process reading only
    its rows), and ``y``, replicated over ``mesh``."""
    yd = parallel.put_replicated(np.asarray(y), mesh)
    if x.shape[0] == 0:
        return jnp.zeros((num_runs, 0), jnp.float32), yd
    return (stream.map_chunks(lambda xc: prog.logits(state, frozen, xc), x, chunk=chunk,
                              sharding=stream.rows_sharding(mesh), axis=1), yd)


def _stream_epoch(prog: StreamProgram, carry: FTCarry, data: dict, keys, e: int, frozen, *,
                  batch_size: int, sharding, prefetch: int, chunk: int, mesh):
    """One FT epoch of every run with streamed batches: what the on-device
    epoch program computes, step by step."""
    n = data["train_x"].shape[0]
    nb = steps.num_batches(n, batch_size)
    per_step = []
    state = stream.run_range(
        prog.step, carry.state, (data["train_x"], data["train_y"]), keys, e * nb, (e + 1) * nb,
        batch_size=batch_size, num_examples=n, sharding=sharding,
        consts=(carry.stopped, frozen), prefetch=prefetch,
        on_step=lambda s, m: per_step.append(m))
    m = jax.tree_util.tree_map(lambda *v: jnp.stack(v, axis=1), *per_step)  # (R, nb)
    r = jax.tree_util.tree_leaves(state)[0].shape[0]
    vl, vy = _stream_eval(prog, state, frozen, data["val_x"], data["val_y"], num_runs=r,
                          chunk=chunk, mesh=mesh)
    tl, ty = _stream_eval(prog, state, frozen, data["test_x"], data["test_y"], num_runs=r,
                          chunk=chunk, mesh=mesh)
    return prog.finish(carry._replace(state=state), m, vl, vy, tl, ty, jnp.int32(e))


@functools.lru_cache(maxsize=16)
def _init_program(ft_cfg, num_train: int):
    tx = ft_tx(ft_cfg, num_train)
    return jax.jit(jax.vmap(lambda p, s: init_carry(p, s, tx)))


@functools.lru_cache(maxsize=16)
def _features_program(model):
    """Jitted, vmapped over runs, eval mode on the fixed set (x, y):
    ``(params, stats, x, y[, z0]) -> {z, aie, p_true, acc[, adapt]}``."""

    task = tasks.of(model)
    dense = hasattr(model, "with_map")  # segmentation: z is the pooled feature map

    def one(p, s, x, y, z0=None, f0=None):
        if dense:
            logits, z, f = steps.predict(model, steps.variables(p, s), x, method=model.with_map)
            f = f[:DENSE_INPUTS]
        else:
            logits, z = steps.predict(model, steps.variables(p, s), x)
        out = _feature_scores(task, logits, z, y, z0)
        if dense:
            out["zmap"] = f
            if z0 is not None:
                out["adapt_dense"] = energy.adaptation_dense(f0, f)
        return out

    start = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))
    end = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, 0, 0 if dense else None)))
    return lambda p, s, x, y, z0=None, f0=None: (start(p, s, x, y) if z0 is None
                                                 else end(p, s, x, y, z0, f0))


def _feature_scores(task, logits, z, y, z0=None) -> dict:
    out = {"z": z, "aie": task.energy(logits, y), "p_true": task.p_true(logits, y),
           "acc": task.metric(logits, y)}
    if z0 is not None:
        out["adapt"] = energy.adaptation(z0, z)
    return out


@functools.lru_cache(maxsize=16)
def _stream_features_program(model, chunk: int, mesh):
    """:func:`_features_program` on host inputs, in chunks of ``chunk`` rows:
    only the logits and features (R, N, ...) are held on device."""
    task = tasks.of(model)
    fwd = jax.jit(jax.vmap(lambda p, s, xc: steps.predict(model, steps.variables(p, s), xc),
                           in_axes=(0, 0, None)))
    start = jax.jit(jax.vmap(lambda lg, z, y: _feature_scores(task, lg, z, y),
                             in_axes=(0, 0, None)))
    end = jax.jit(jax.vmap(lambda lg, z, y, z0: _feature_scores(task, lg, z, y, z0),
                           in_axes=(0, 0, None, 0)))

    def run(p, s, x, y, z0=None, f0=None):
        del f0  # per-location maps are not kept on the streamed path
        logits, z = stream.map_chunks(lambda xc: fwd(p, s, xc), x, chunk=chunk,
                                      sharding=stream.rows_sharding(mesh), axis=1)
        y = parallel.put_replicated(np.asarray(y), mesh)
        z0 = None if z0 is None else parallel.put_replicated(np.asarray(z0), mesh)
        return start(logits, z, y) if z0 is None else end(logits, z, y, z0)

    return run


def projection_indices(n: int, k: int) -> np.ndarray:
    """The ``min(k, n)`` fixed inputs (sorted indices of the adaptation set)
    whose features :func:`projection` records; the same for every run."""
    return rng.probe_indices(n, min(k, n), seed=[0, PROJECTION_STREAM], what="projected inputs")


def projection(z0: np.ndarray, zt_best: np.ndarray, zt_last: np.ndarray, y: np.ndarray,
               idx: np.ndarray) -> dict:
    """z_0 and z_T of P fixed inputs in z_0's first principal plane.

    z0, zt_*: (P, h). The plane is PCA of z_0 (centred at its mean, the top
    two right singular vectors, each signed so that its largest-magnitude
    component is positive); all three sets are centred at z_0's mean and
    projected on it, so the figure shows how far z_T moved from z_0 in z_0's
    coordinates. Returns JSON-ready lists: ``z0``, ``zt_best``, ``zt_last``
    (P, 2), ``y`` (P,), ``idx`` (P,), ``explained`` (2,) variance fractions
    of z_0.
    """
    z0, zb, zl = (np.asarray(a, np.float64) for a in (z0, zt_best, zt_last))
    mu = z0.mean(0)
    _, sv, vt = np.linalg.svd(z0 - mu, full_matrices=False)
    basis = vt[:2]
    basis *= np.sign(basis[np.arange(len(basis)), np.argmax(np.abs(basis), axis=1)])[:, None]
    total = float((sv**2).sum()) or 1.0
    y = np.asarray(y)
    labels = y.astype(int).tolist() if y.ndim == 1 else None  # multi-label (graphs): none
    proj = lambda z: ((z - mu) @ basis.T).round(5).tolist()  # noqa: E731
    return {"z0": proj(z0), "zt_best": proj(zb), "zt_last": proj(zl),
            "y": labels, "idx": np.asarray(idx).astype(int).tolist(),
            "explained": [float(v) for v in (sv[:2]**2 / total)]}


def _stack(trees):
    """Stack host or device trees along a new leading axis, on the host."""
    return jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(v) for v in a]), *trees)


def finetune(model, ft_cfg, inits: list[tuple[Tree, Tree]], seeds: list[int], data: dict,
             adapt_x, adapt_y, *, num_classes: int, augment: str = "none", mesh=None,
             ckpt_dir: str | None = None, names: list[str] | None = None,
             progress: bool = True, stop_after_epochs: int | None = None,
             trainable=None, ckpt_every_s: float = 30.0,
             project: int = 0, input: dict | None = None) -> tuple[list[dict], dict]:
    """Finetune R runs together; returns one result dict per run.

    ``inits[r] = (params, batch_stats)`` at the start of FT (pretrained
    backbone + HP head); ``seeds[r]`` picks the FT data order. ``data`` holds
    host arrays ``train_x, train_y, val_x, val_y, test_x, test_y``;
    ``adapt_x, adapt_y`` the fixed, unaugmented set for AIE and the
    adaptation metrics. With ``ckpt_dir`` the batch resumes from its last
    checkpointed epoch (written at most every ``ckpt_every_s`` seconds of
    training, so a kill loses at most that much; 0 saves every epoch).
    ``stop_after_epochs`` interrupts (for tests) after that
    many epochs of this call, as a kill would. ``trainable(path) -> bool``
    restricts training to a subset of the parameters (Layer FT); the rest
    get no gradients and no optimizer state. ``project``: record each run's
    :func:`projection` on that many fixed inputs of the adaptation set.
    ``input``: :func:`hpft_jax.stream.decide`'s choice; with
    ``input["input"] == "stream"`` the data stay on the host and every
    batch is gathered there and prefetched (:mod:`hpft_jax.stream`): the
    same steps on the same examples as the on-device path, evaluation in
    chunks of :data:`hpft_jax.steps.EVAL_CHUNK` rows.

    Returns the per-run results and the final (best) variables, stacked
    over runs.
    """
    mesh = parallel.data_mesh() if mesh is None else mesh
    n = data["train_x"].shape[0]
    data_lib.check_batch_size(n, ft_cfg.batch_size, what="the downstream training set (FT)")
    parallel.check_divisible(ft_cfg.batch_size, mesh, what="FT")
    if data["val_x"].shape[0] == 0:
        raise ValueError("FT early-stops on validation accuracy: the validation split is empty "
                         "(set val_fraction > 0)")
    nb = steps.num_batches(n, ft_cfg.batch_size)
    names = names or [f"run {i}" for i in range(len(inits))]
    num_runs = len(inits)  # padded to a multiple of the mesh's runs axis:
    inits, seeds, names = (parallel.pad_runs(v, mesh) for v in (inits, seeds, names))
    streamed = bool(input) and input["input"] == "stream"
    if streamed:
        sprog = _stream_program(model, ft_cfg, num_classes, n, mesh, augment)
        sharding = stream.batch_sharding(mesh, runs=True)
    else:
        dev = parallel.put_replicated({k: jnp.asarray(v) for k, v in data.items()}, mesh)
    keys = parallel.put_runs(jnp.stack([seed_key(s, FT_DATA) for s in seeds]), mesh)

    params0, stats0 = _stack([p for p, _ in inits]), _stack([s for _, s in inits])
    if trainable is not None:
        train0, frozen = partition(params0, trainable)
        if not jax.tree_util.tree_leaves(train0):
            raise ValueError("trainable selects no parameter")
        frozen = parallel.put_runs(frozen, mesh)
    else:
        train0, frozen = params0, None
    train0, stats0 = parallel.put_runs((train0, stats0), mesh)
    carry = _init_program(ft_cfg, n)(train0, stats0)
    full = (lambda p: merge(frozen, p)) if frozen else (lambda p: p)  # noqa: E731

    # Energy and z_0 at the start of FT, eval mode, unaugmented inputs.
    if streamed:  # no per-location maps (adapt_dense) on the streamed path
        ax, ay = adapt_x, adapt_y
        feats = _stream_features_program(model, steps.EVAL_CHUNK, mesh)
    else:
        ax, ay = parallel.put_replicated((jnp.asarray(adapt_x), jnp.asarray(adapt_y)), mesh)
        feats = _features_program(model)
    at_start = feats(full(train0), stats0, ax, ay)
    f0 = at_start.pop("zmap", None)  # segmentation: feature maps, kept on device
    at_start = jax.device_get(at_start)
    z0 = at_start["z"]

    if streamed:
        fn = functools.partial(_stream_epoch, sprog, batch_size=ft_cfg.batch_size,
                               sharding=sharding, prefetch=input["prefetch"],
                               chunk=steps.EVAL_CHUNK, mesh=mesh)
        dev = data
    else:
        fn = _epoch_program(model, ft_cfg, num_classes, n, mesh, augment)
    history = {k: [] for k in ("loss", "train_acc", "val_acc", "val_loss", "test_acc", "active")}
    direction: list[np.ndarray] = []
    start = 0
    ckpt = checkpoint.EpochCheckpointer(ckpt_dir) if ckpt_dir else None
    if ckpt is not None:
        restored = ckpt.restore(carry)
        if restored is not None:
            start, carry, meta = restored
            start += 1
            carry = parallel.put_runs(carry, mesh)
            history = {k: [np.asarray(v) for v in vs] for k, vs in meta["history"].items()}
            direction = [np.asarray(v) for v in meta["direction"]]

    pb = bar(ft_cfg.epochs, f"finetune x{len(inits)}", enabled=progress)
    pb.update(start)
    ran = 0
    last_save = time.monotonic()
    for e in range(start, ft_cfg.epochs):
        if bool(np.all(np.asarray(carry.stopped))):
            break
        if stop_after_epochs is not None and ran >= stop_after_epochs:
            if ckpt is not None:
                ckpt.close()
            raise KeyboardInterrupt(f"stopped after {ran} FT epochs (test hook)")
        t0 = time.perf_counter()
        carry, m = fn(carry, dev, keys, e, frozen)
        m = jax.device_get(m)
        errors.check_finite(m["loss"], stage="FT", epoch=e, steps_per_epoch=nb, runs=names)
        history["loss"].append(m["loss"].mean(axis=1))
        for k in ("train_acc", "val_acc", "val_loss", "test_acc", "active"):
            history[k].append(m[k])
        if sum(d.shape[1] for d in direction) < ft_cfg.direction_steps:
            direction.append(m["grad_v_norm"])
        if ckpt is not None and time.monotonic() - last_save >= ckpt_every_s:
            last_save = time.monotonic()
            ckpt.save(e, carry, {"history": {k: [v.tolist() for v in vs] for k, vs in history.items()},
                                 "direction": [d.tolist() for d in direction]})
        ran += 1
        pb.set_postfix(val=f"{np.nanmean(m['val_acc']):.3f}",
                       active=int(np.sum(m["active"])), s_per_ep=f"{time.perf_counter() - t0:.2f}")
        pb.update()
    pb.close()

    end = jax.device_get(feats(full(carry.best_params), carry.best_stats, ax, ay, z0, f0))
    last = jax.device_get(feats(full(carry.state.params), carry.state.batch_stats, ax, ay, z0,
                                f0))
    adapt, train_acc_t = end["adapt"], end["acc"]
    proj_idx = projection_indices(len(adapt_y), project) if project else None
    best_epoch = np.asarray(carry.best_epoch)
    hist = {k: np.stack(v, axis=1) for k, v in history.items()}  # (R, epochs)
    dirn = np.concatenate(direction, axis=1)[:, : ft_cfg.direction_steps] if direction else None
    results = []
    for r in range(num_runs):
        be = int(best_epoch[r])
        results.append({
            "epochs_run": int(hist["active"][r].sum()),
            "best_epoch": be,
            "val_acc": float(hist["val_acc"][r, be]),
            "val_loss": float(hist["val_loss"][r, be]),
            "test_acc": float(hist["test_acc"][r, be]),
            "train_acc": float(train_acc_t[r]),
            "aie": float(at_start["aie"][r]),
            "p0y_hist": energy.histogram(at_start["p_true"][r]),
            "adapt": {k: float(v[r]) for k, v in adapt.items()},
            "adapt_last": {k: float(v[r]) for k, v in last["adapt"].items()},
            **({"adapt_dense": {k: float(v[r]) for k, v in end["adapt_dense"].items()},
                "adapt_last_dense": {k: float(v[r]) for k, v in last["adapt_dense"].items()}}
               if "adapt_dense" in end else {}),
            "train_acc_last": float(last["acc"][r]),
            "grad_v_norm": None if dirn is None else dirn[r].tolist(),
            "curves": {k: hist[k][r, :int(hist["active"][r].sum())].tolist()
                       for k in ("loss", "train_acc", "val_acc", "val_loss", "test_acc")},
        })
    if proj_idx is not None:
        for r, res in enumerate(results):
            res["projection"] = projection(z0[r][proj_idx], end["z"][r][proj_idx],
                                           last["z"][r][proj_idx], np.asarray(adapt_y)[proj_idx],
                                           proj_idx)
    final = {"params": full(carry.best_params), "batch_stats": carry.best_stats}
    if ckpt is not None:
        ckpt.close()
    return results, jax.tree_util.tree_map(lambda a: a[:num_runs], jax.device_get(final))
