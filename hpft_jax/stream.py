"""Streaming input: batches gathered on the host, prefetched to the devices.

The on-device path (:func:`hpft_jax.steps.make_step_range`) keeps a whole
split on every device and gathers each batch by index inside one jitted
loop. When the data do not fit a device-memory budget, the streamed path
takes exactly the same steps instead:

* the batch indices are the on-device path's: epoch ``e``'s permutation is
  :func:`hpft_jax.steps.epoch_indices` ``(key, e, ...)`` (one key per
  vmapped run), computed by the same jitted function, and step ``i`` of
  epoch ``e`` gets :func:`hpft_jax.rng.step_key` ``(key, e, i)``;
* the host gathers those examples from its arrays (numpy arrays or
  ``np.load(..., mmap_mode="r")`` memory maps: only the rows read are
  touched) in a grain pipeline with reader threads, and a second grain stage
  places them on the devices ahead of the step that needs them;
* each process gathers only the rows its own devices hold
  (:func:`hpft_jax.parallel.local_block`) and the global batch is assembled with
  ``jax.make_array_from_process_local_data``; with one process that is the
  whole batch;
* one jitted step (vmapped over runs where there are several) runs per batch
  with the training state donated.

Device memory is then the training state plus ``prefetch`` batches instead
of the whole split; host memory is the arrays themselves (or the pages of a
memory map that were read) plus the reader's buffers.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hpft_jax import parallel, rng, steps

MODES = ("auto", "device", "stream")  # = hpft_jax.config.INPUTS


def auto_budget(device=None) -> int:
    """Half of one device's memory (``bytes_limit``), or a quarter of the
    host's RAM where the device reports none (CPU)."""
    device = jax.local_devices()[0] if device is None else device
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def nbytes(*arrays) -> int:
    """Bytes of host arrays (what the on-device path puts on every device)."""
    return int(sum(a.dtype.itemsize * int(np.prod(a.shape)) for a in arrays))


def example_bytes(*arrays) -> int:
    """Bytes of one example of each array, summed."""
    return int(sum(a.dtype.itemsize * int(np.prod(a.shape[1:])) for a in arrays))


def decide(mode: str, budget: int | None, data_bytes: int, batch_bytes: int, *,
           what: str) -> dict:
    """Whether ``what`` streams: ``{"input": "device"|"stream", "budget",
    "data_bytes", "batch_bytes", "prefetch"}``.

    ``device``/``stream`` force the path; ``auto`` streams when the data
    exceed the budget (None: :func:`auto_budget`). A budget smaller than one
    batch is a ``ValueError`` (unless the path is forced to ``device``).
    """
    if mode not in MODES:
        raise ValueError(f"--input must be one of {', '.join(MODES)}; got {mode!r}")
    out = {"input": "device", "data_bytes": int(data_bytes), "batch_bytes": int(batch_bytes),
           "budget": None, "prefetch": 0}
    if mode == "device":
        return out
    budget = auto_budget() if budget is None else int(budget)
    out["budget"] = budget
    if batch_bytes > budget:
        raise ValueError(f"--data-budget {budget} bytes is smaller than one {what} batch "
                         f"({batch_bytes} bytes); raise it or lower the batch size")
    if mode == "stream" or data_bytes > budget:
        if importlib.util.find_spec("grain") is None:
            raise ValueError(f"{what} would stream its input (--input {mode}), which needs "
                             "grain: pip install 'hpft-jax[stream]'")
        out.update(input="stream", prefetch=int(max(1, min(2, budget // batch_bytes - 1))))
    return out


# --------------------------------------------------------------------------
# Indices: the on-device path's permutation, on the host


@functools.partial(jax.jit, static_argnums=(2, 3))
def _epoch_indices(keys, epoch, num_examples: int, batch_size: int):
    one = lambda k: steps.epoch_indices(k, epoch, num_examples, batch_size)  # noqa: E731
    return jax.vmap(one)(keys) if keys.ndim else one(keys)


def epoch_indices(keys, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Host (nb, B) indices of ``epoch`` for one key, (nb, R, B) for keys (R,):
    those :func:`hpft_jax.steps.make_step_range` gathers."""
    idx = np.asarray(_epoch_indices(keys, jnp.int32(epoch), num_examples, batch_size))
    return idx if idx.ndim == 2 else idx.transpose(1, 0, 2)


# --------------------------------------------------------------------------
# Per-process slices and the batch pipeline


def batch_sharding(mesh, runs: bool):
    """Batches (R, B, ...) split over (runs, data), or (B, ...) over data."""
    if not runs:
        return NamedSharding(mesh, P(parallel.AXIS))
    return NamedSharding(mesh, P(parallel.RUNS if parallel.runs_size(mesh) > 1 else None,
                                 parallel.AXIS))


def batches(arrays: Sequence[Any], idx: np.ndarray, sharding, *, prefetch: int = 2,
            threads: int = 2) -> Iterator[tuple]:
    """Device batches ``tuple(a[idx[s]] for a in arrays)`` for each step ``s``
    of ``idx`` ((steps, B) or (steps, R, B)), assembled from this process's
    block only, ``prefetch`` steps ahead (reader threads gather on the host,
    a second stage copies to the devices)."""
    import grain

    block = parallel.local_block(sharding, idx.shape[1:])
    local = idx[(slice(None),) + block]

    def gather(s):
        return tuple(np.asarray(a[local[s]]) for a in arrays)

    def place(host):
        return tuple(jax.make_array_from_process_local_data(
            sharding, h, idx.shape[1:] + tuple(a.shape[1:])) for h, a in zip(host, arrays))

    ds = grain.MapDataset.range(len(idx)).map(gather).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, 1)))
    ds = grain.experimental.ThreadPrefetchIterDataset(ds.map(place),
                                                      prefetch_buffer_size=max(prefetch, 1))
    return iter(ds)


def keyed_step(step):
    """``one(state, x, y, key, epoch, i, *consts)``: ``step`` with the key of
    batch ``i`` of ``epoch`` (:func:`hpft_jax.rng.step_key`), as
    :func:`hpft_jax.steps.make_step_range` gives it."""

    def one(state, x, y, key, epoch, i, *consts):
        return step(state, x, y, rng.step_key(key, epoch, i), *consts)

    return one


def run_range(step_fn, state, arrays, keys, start: int, stop: int, *, batch_size: int,
              num_examples: int, sharding, consts: tuple = (), prefetch: int = 2,
              on_step=None):
    """Steps [start, stop) with streamed batches: ``step_fn(state, x, y, keys,
    epoch, i, *consts) -> (state, metrics)`` (jitted, state donated) on the
    batches :func:`hpft_jax.steps.make_step_range` would gather.
    ``on_step(s, metrics)`` sees each step's (device) metrics.
    Returns the final state."""
    nb = steps.num_batches(num_examples, batch_size)
    for e in range(start // nb, -(-stop // nb)):
        lo, hi = max(start - e * nb, 0), min(stop - e * nb, nb)
        idx = epoch_indices(keys, e, num_examples, batch_size)[lo:hi]
        e_arr = jnp.int32(e)
        for i, (x, y) in enumerate(batches(arrays, idx, sharding, prefetch=prefetch), lo):
            state, m = step_fn(state, x, y, keys, e_arr, jnp.int32(i), *consts)
            if on_step is not None:
                on_step(e * nb + i, m)
    return state


def chunks(x, chunk: int, sharding=None) -> Iterator:
    """Device copies of ``x`` (host) in chunks of ``chunk`` rows (the last
    padded with zeros to the same shape, so one program serves every chunk);
    yields (device chunk, number of real rows). With ``sharding`` (rows split
    over the data axis, padded to a multiple of it), each process reads only
    the rows its devices hold."""
    n = x.shape[0]
    for lo in range(0, n, chunk):
        real = min(chunk, n - lo)
        size = chunk if n > chunk else real
        if sharding is None:
            part = np.asarray(x[lo:lo + real])
            if real < size:
                part = np.concatenate([part, np.zeros((size - real,) + part.shape[1:],
                                                      part.dtype)])
            yield jax.device_put(part), real
            continue
        d = sharding.mesh.shape.get(sharding.spec[0], 1) if sharding.spec else 1
        size = -(-size // d) * d
        shape = (size,) + tuple(x.shape[1:])
        rows = np.arange(size)[parallel.local_block(sharding, shape)[0]]
        part = np.zeros((len(rows),) + shape[1:], x.dtype)
        valid = rows < real
        part[valid] = x[lo + rows[valid]]
        yield jax.make_array_from_process_local_data(sharding, part, shape), real


def map_chunks(fn, x, *, chunk: int = steps.EVAL_CHUNK, sharding=None, axis: int = 0):
    """``fn(device chunk)`` over the host array ``x`` in chunks, outputs
    concatenated on device along ``axis`` (a pytree), padding rows dropped.
    With ``sharding`` (see :func:`chunks`) the outputs come back replicated
    over its mesh."""
    outs = []
    for xc, real in chunks(x, chunk, sharding):
        out = fn(xc)
        outs.append(jax.tree_util.tree_map(
            lambda o, r=real: jax.lax.slice_in_dim(o, 0, r, axis=axis), out))
    out = jax.tree_util.tree_map(lambda *o: jnp.concatenate(o, axis=axis), *outs)
    if sharding is not None:
        out = _replicate(sharding.mesh)(out)
    return out


@functools.lru_cache(maxsize=8)
def _replicate(mesh):
    return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))


def rows_sharding(mesh):
    """Eval chunks (c, ...): rows split over the data axis."""
    return NamedSharding(mesh, P(parallel.AXIS))
