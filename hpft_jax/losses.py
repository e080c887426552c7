"""Smoothed targets, cross-entropy and accuracy.

The paper writes a smoothed target as ``eta * e_y + (1 - eta) * u`` with u the
uniform distribution over K classes (Sec. 5.3), so ``eta = 1`` is plain
one-hot. optax's ``smooth_labels(labels, alpha)`` is the same with
``alpha = 1 - eta``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def smooth_targets(labels: jax.Array, num_classes: int, eta: float | jax.Array) -> jax.Array:
    """(N,) int labels -> (N, K) targets ``eta * e_y + (1 - eta) / K``."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return optax.smooth_labels(onehot, 1.0 - jnp.asarray(eta, jnp.float32))


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
    """Mean (optionally weighted) softmax cross-entropy; logits, targets (N, K)."""
    per = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    if weights is None:
        return per.mean()
    return (per * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of argmax(logits) == labels; logits (N, K), labels (N,)."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
