"""Energy and feature-adaptation metrics (Sec. 4.1-4.2, Prop. 1, App. D.1).

* AIE = E_n ||e_{y_n} - p_0^{(n)}||_2, with p_0 the softmax prediction at the
  start of FT (after HP), on unaugmented training inputs in eval mode.
  A uniform predictor has AIE = sqrt(1 - 1/K).
* The four adaptation quantities compare features z_0 at the start of FT with
  z_T after FT, sample by sample, on one fixed input set:
  E||z_T - z_0||^2, E||z_T||^2, E z_T^T z_0 and E cos(z_T, z_0).
  The distance is *squared* (the authors' code logged it unsquared).
  Beside them, ``dist`` = E||z_T - z_0||_2 (unsquared, mean over samples) is
  the left-hand side of Prop. 1 (``hpft prop1``); by Jensen,
  dist <= sqrt(dist_sq).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

P0Y_BINS = 20  # histogram of p_0[y] over [0, 1]


def energy_per_sample(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """||e_y - softmax(q)||_2 per sample; logits (N, K), labels (N,) -> (N,)."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    e = jax.nn.one_hot(labels, logits.shape[-1], dtype=p.dtype)
    return jnp.linalg.norm(e - p, axis=-1)


def aie(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Average initial energy E||e_y - p_0||_2 (Prop. 1)."""
    return energy_per_sample(logits, labels).mean()


def p_true(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """p_0[y] per sample (Fig. 2, left): (N,)."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(p, labels[:, None], axis=-1)[:, 0]


def histogram(p_true_values, bins: int = P0Y_BINS) -> list[int]:
    """Counts of p_0[y] values (N,) in ``bins`` equal bins over [0, 1] (host side)."""
    v = np.asarray(p_true_values).reshape(-1)
    v = v[np.isfinite(v)]  # NaN: a missing multi-label entry (hpft_jax.tasks)
    counts, _ = np.histogram(v, bins=bins, range=(0.0, 1.0))
    return counts.tolist()


def p_true_histogram(logits, labels, bins: int = P0Y_BINS) -> list[int]:
    """Counts of p_0[y] in ``bins`` equal bins over [0, 1] (host side)."""
    return histogram(p_true(logits, labels), bins)


def adaptation(z0: jax.Array, zt: jax.Array, eps: float = 1e-12) -> dict[str, jax.Array]:
    """The four averaged feature metrics and Prop. 1's distance; z0, zt (N, h).

    Returns ``dist_sq`` = E||z_T - z_0||^2, ``norm_sq`` = E||z_T||^2,
    ``dot`` = E z_T^T z_0, ``cos`` = E cos(z_T, z_0) and ``dist`` =
    E||z_T - z_0||_2 (Prop. 1's left-hand side), all scalars.
    """
    if z0.shape != zt.shape or z0.ndim != 2:
        raise ValueError(f"z0 and zt must both be (N, h); got {z0.shape} and {zt.shape}")
    z0 = z0.astype(jnp.float32)
    zt = zt.astype(jnp.float32)
    dot = jnp.sum(zt * z0, axis=-1)
    n0 = jnp.linalg.norm(z0, axis=-1)
    nt = jnp.linalg.norm(zt, axis=-1)
    d2 = jnp.sum((zt - z0) ** 2, axis=-1)
    return {
        "dist_sq": jnp.mean(d2),
        "norm_sq": jnp.mean(nt**2),
        "dot": jnp.mean(dot),
        "cos": jnp.mean(dot / jnp.maximum(n0 * nt, eps)),
        "dist": jnp.mean(jnp.sqrt(d2)),
    }


def adaptation_dense(f0: jax.Array, ft: jax.Array) -> dict[str, jax.Array]:
    """:func:`adaptation` per location of feature maps f0, ft (N, h, w, C):
    every (input, location) pair is one C-vector z, and the metrics are
    averaged over inputs and locations, e.g. ``dist_sq`` = mean over n, i, j
    of ||f_T[n, i, j] − f_0[n, i, j]||²."""
    if f0.shape != ft.shape or f0.ndim != 4:
        raise ValueError(f"f0 and ft must both be (N, h, w, C); got {f0.shape} and {ft.shape}")
    c = f0.shape[-1]
    return adaptation(f0.reshape(-1, c), ft.reshape(-1, c))
