"""uint8 images: stored raw on host and device, normalised where consumed.

Image data sets whose pixels are stored as bytes (tfds, IDX, npz uint8)
stay uint8 (N, H, W, C) end to end, 4x less memory than float32. The
per-channel standardisation ``(x / 255 - mean) / std`` runs inside the
jitted programs, where the model consumes its input
(:class:`hpft_jax.models.Classifier` with ``input_norm``). Float inputs
(the digits, trunk features, already normalised images) pass unchanged.

Host-side transforms that interpolate (resize, the fixed rotation + zoom)
work in float on [0, 1] and round back to uint8 (:func:`quantize`): an error
of at most 0.5 / 255 per pixel, as any 8-bit image pipeline has.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["Norm", "normalize", "model_input", "to_unit", "quantize", "take_rows"]

Norm = tuple[tuple[float, ...], tuple[float, ...]]  # ((C,) mean, (C,) std)


def normalize(x, norm: Norm | None):
    """uint8 (N, H, W, C) -> float32 ``(x / 255 - mean) / std``; norm None: x / 255.

    The same float32 operations, in the same order, as the host-side float
    pipeline, so both give the same values.
    """
    x = x.astype(jnp.float32) / jnp.float32(255)
    if norm is None:
        return x
    shape = (1,) * (x.ndim - 1) + (-1,)  # channels last
    mean, std = (jnp.asarray(v, jnp.float32).reshape(shape) for v in norm)
    return (x - mean) / std


def model_input(x, norm: Norm | None):
    """What the model computes on: uint8 images normalised, anything else as is."""
    return normalize(x, norm) if x.dtype == jnp.uint8 else x


def to_unit(x):
    """uint8 -> float32 in [0, 1] (x / 255); float passes unchanged. jnp or np."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255)
    return x


def quantize(x):
    """float in [0, 1] -> uint8, rounded to nearest, clipped. jnp or np."""
    xp = jnp if isinstance(x, jnp.ndarray) and not isinstance(x, np.ndarray) else np
    return xp.clip(xp.round(x * 255), 0, 255).astype(xp.uint8)


def take_rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``x[idx]`` for distinct ``idx``, with at most 1.5x the memory of ``x``.

    When ``idx`` keeps more than half the rows, ``x`` itself is reordered in
    place (cycle by cycle, one row of scratch) and the first ``len(idx)``
    rows are returned as a view; otherwise the rows are copied. Either way
    ``x`` is consumed: do not read it afterwards.
    """
    m, n = len(idx), len(x)
    if 2 * m <= n or not x.flags.writeable:
        return x[idx]
    rest = np.ones(n, bool)
    rest[idx] = False
    perm = np.concatenate([idx, np.flatnonzero(rest)])  # new row i = old row perm[i]
    done = np.zeros(n, bool)
    for start in range(n):
        if done[start] or perm[start] == start:
            continue
        tmp = x[start].copy()
        i = start
        while perm[i] != start:
            x[i] = x[perm[i]]
            done[i] = True
            i = perm[i]
        x[i] = tmp
        done[i] = True
    return x[:m]
