"""Data parallelism over the local devices with ``jax.sharding``.

One mesh axis, ``data``. Parameters and optimizer state are replicated; every
training batch is sharded along its leading axis with a sharding constraint
inside the jitted step, so XLA inserts the gradient all-reduce itself (the
``pmap``-free idiom). Whole data sets are kept on device, replicated, where
they fit; steps gather their batch from them by index.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


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
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{what} batch size {batch_size} is not divisible by the {n} devices")


def shard_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Inside jit: constrain a (B, ...) batch to be split over ``data``."""
    if mesh is None or mesh.devices.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharded(mesh))


def put_replicated(tree, mesh: Mesh | None):
    """Place a pytree of host arrays on every device of ``mesh``."""
    if mesh is None:
        return jax.device_put(tree)
    return jax.device_put(tree, replicated(mesh))
