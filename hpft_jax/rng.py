"""Random streams: every key and random index set the library draws.

A run's randomness comes from its integer seed, split into independent
streams by ``fold_in`` with a fixed tag, so a stage can be rerun or resumed
without replaying the others (big_vision's ``fold_in(rng, step)`` pattern:
keys are derived, never threaded through a loop).

* ``seed_key(seed, HEAD_INIT)``: the head's initialisation (τ = 0 head);
* ``seed_key(seed, HP_DATA)``: HP's data order;
* ``seed_key(seed, FT_DATA)``: FT's data order and per-step keys;
* ``epoch_key`` / ``step_key``: the key of batch ``i`` of ``epoch`` inside
  :func:`hpft_jax.steps.make_step_range` (augmentation, dropout);
* :func:`probe_indices`: fixed random subsets of a split (eNTK probes).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

# Tags folded into a seed's key, so each stage draws independent randomness.
HEAD_INIT, HP_DATA, FT_DATA = 0, 1, 2
DROPOUT = 3  # folded into a step key (dropout_key)


def seed_key(seed: int, tag: int) -> jax.Array:
    """The key of stream ``tag`` of ``seed``."""
    return jax.random.fold_in(jax.random.key(seed), tag)


def epoch_key(key: jax.Array, epoch) -> jax.Array:
    """The key an epoch's per-step keys are folded from (not its permutation's)."""
    return jax.random.fold_in(jax.random.fold_in(key, epoch), 1)


def step_key(key: jax.Array, epoch, i) -> jax.Array:
    """The key of batch ``i`` of ``epoch`` (augmentation and any step randomness)."""
    return jax.random.fold_in(epoch_key(key, epoch), i)


def dropout_key(step_key_: jax.Array) -> jax.Array:
    """The dropout key of a step (its own stream, so augmentation, which
    uses the step key itself, is unchanged by models with dropout)."""
    return jax.random.fold_in(step_key_, DROPOUT)


def probe_indices(pool: int, n: int, *, seed: int | Sequence[int] = 0,
                  what: str = "probes") -> np.ndarray:
    """Sorted indices of ``n`` distinct examples out of ``pool``, fixed by ``seed``.

    ``seed`` is anything ``numpy.random.default_rng`` takes; experiments that
    need a stream of their own pass ``[seed, tag]``.
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"{what} must be a positive integer; got {n!r}")
    if n > pool:
        raise ValueError(f"{n} {what} requested but the split has only {pool} examples")
    return np.sort(np.random.default_rng(seed).choice(pool, int(n), replace=False))
