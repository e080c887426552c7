"""Data and run parallelism over the devices with ``jax.sharding``.

The default mesh has one axis, ``data``. Parameters and optimizer state are
replicated; every training batch is sharded along its leading axis with a
sharding constraint inside the jitted step, so XLA inserts the gradient
all-reduce itself (the ``pmap``-free idiom). Whole data sets are kept on
device, replicated, where they fit; steps gather their batch from them by
index.

:func:`runs_mesh` adds a ``runs`` axis for the vmapped FT runs: a
``(runs, data)`` mesh splits the R runs of a batch over ``runs`` (R/n per
device; runs need no communication) and each run's batch over ``data``.
Pretraining and HP then use :func:`flat` (every device on ``data``).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
RUNS = "runs"


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over devices, the rest replicated."""
    return NamedSharding(mesh, P(AXIS))


def check_divisible(batch_size: int, mesh: Mesh, *, what: str) -> None:
    n = mesh.shape.get(AXIS, 1)
    if batch_size % n:
        raise ValueError(
            f"{what} batch size {batch_size} is not divisible by the {n} devices")


def shard_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Inside jit: constrain a (B, ...) batch to be split over ``data``."""
    if mesh is None or mesh.shape.get(AXIS, 1) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharded(mesh))


def put_replicated(tree, mesh: Mesh | None):
    """Place a pytree of host arrays on every device of ``mesh``."""
    if mesh is None:
        return jax.device_put(tree)
    return put(tree, replicated(mesh))


def put(tree, sharding: NamedSharding):
    """``jax.device_put(tree, sharding)``; on a mesh spanning several
    processes (every process passing the same values), each process places
    only the block its devices hold (``jax.make_array_from_process_local_data``)."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(a):
        if jax.dtypes.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(a)),
                                            impl=jax.random.key_impl(a))
        a = np.asarray(a)
        return jax.make_array_from_process_local_data(
            sharding, a[local_block(sharding, a.shape)], a.shape)

    return jax.tree_util.tree_map(one, tree)


def local_block(sharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The block of a global array of ``shape`` that this process's devices
    hold under ``sharding`` (one slice per axis; a process's devices hold a
    contiguous block on a mesh laid out process by process)."""
    idx = list(sharding.addressable_devices_indices_map(tuple(shape)).values())
    out = []
    for ax, n in enumerate(shape):
        spans = [i[ax].indices(n) if ax < len(i) else (0, n, 1) for i in idx]
        out.append(slice(min(sp[0] for sp in spans), max(sp[1] for sp in spans)))
    return tuple(out)


# --------------------------------------------------------------------------
# The runs axis (vmapped FT runs split over devices)


def runs_mesh(runs: int, data: int | None = None, devices=None) -> Mesh:
    """A ``(runs, data)`` mesh over ``devices`` (default: the local devices);
    ``data`` defaults to the devices left over by ``runs``."""
    devices = jax.local_devices() if devices is None else list(devices)
    n = len(devices)
    if runs < 1 or n % runs:
        raise ValueError(f"--mesh: {runs} run groups do not divide the {n} devices")
    data = n // runs if data is None else data
    if runs * data != n:
        raise ValueError(f"--mesh {runs},{data} needs {runs * data} devices; there are {n}")
    return Mesh(np.asarray(devices).reshape(runs, data), (RUNS, AXIS))


def parse_mesh(spec: str, devices=None) -> Mesh:
    """``data`` (default: 1-D over the devices), ``runs`` (every device on the
    runs axis) or ``R,D`` (R·D = the local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    if spec == "data":
        return Mesh(np.asarray(devices), (AXIS,))
    if spec == "runs":
        return runs_mesh(len(devices), 1, devices)
    try:
        r, d = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--mesh: expected data, runs or R,D; got {spec!r}") from None
    return runs_mesh(r, d, devices)


def runs_size(mesh: Mesh | None) -> int:
    """Devices along the runs axis (1 without one)."""
    return 1 if mesh is None else mesh.shape.get(RUNS, 1)


def flat(mesh: Mesh | None) -> Mesh | None:
    """Every device of ``mesh`` on one ``data`` axis (pretraining, HP)."""
    if mesh is None or RUNS not in mesh.axis_names:
        return mesh
    return Mesh(mesh.devices.reshape(-1), (AXIS,))


def spmd_axis(mesh: Mesh | None) -> str | None:
    """``vmap``'s ``spmd_axis_name`` over runs: the runs axis, if any."""
    return RUNS if runs_size(mesh) > 1 else None


def put_runs(tree, mesh: Mesh | None):
    """Place a pytree stacked over runs (leading axis R): split over the runs
    axis when ``mesh`` has one (R must be a multiple of its size), else
    replicated."""
    if runs_size(mesh) == 1:
        return put_replicated(tree, mesh)
    return put(tree, NamedSharding(mesh, P(RUNS)))


def pad_runs(items: list, mesh: Mesh | None) -> list:
    """``items`` (one per run) padded with copies of the last to a multiple
    of the runs axis; the padded runs' results are dropped."""
    k = runs_size(mesh)
    return list(items) + [items[-1]] * (-len(items) % k)
