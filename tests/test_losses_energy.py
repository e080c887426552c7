"""Smoothed targets, AIE, the four adaptation metrics and Prop. 1's distance against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from hpft_jax import energy
from hpft_jax.losses import accuracy, cross_entropy, smooth_targets


@pytest.mark.parametrize("eta", [1.0, 0.9, 0.5, 0.01])
@pytest.mark.parametrize("k", [2, 3, 10])
def test_smooth_targets_formula_and_sum(eta, k):
    y = jnp.array([0, k - 1, 1 % k])
    t = np.asarray(smooth_targets(y, k, eta))
    expect = eta * np.eye(k)[np.asarray(y)] + (1 - eta) / k
    np.testing.assert_allclose(t, expect, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=1e-6)


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 4)).astype(np.float32)
    y = rng.integers(0, 4, 7)
    t = np.asarray(smooth_targets(jnp.asarray(y), 4, 0.8))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(float(cross_entropy(jnp.asarray(logits), jnp.asarray(t))),
                               -(t * logp).sum(1).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(accuracy(jnp.asarray(logits), jnp.asarray(y))),
                               np.mean(logits.argmax(1) == y), rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 10, 100])
def test_aie_of_uniform_predictor(k):
    logits = jnp.zeros((5, k))
    y = jnp.arange(5) % k
    np.testing.assert_allclose(float(energy.aie(logits, y)), np.sqrt(1 - 1 / k), rtol=1e-6)


def test_aie_matches_numpy_and_p_true():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(9, 3)) * 3
    y = rng.integers(0, 3, 9)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    e = np.eye(3)[y]
    np.testing.assert_allclose(float(energy.aie(jnp.asarray(logits), jnp.asarray(y))),
                               np.linalg.norm(e - p, axis=1).mean(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(energy.p_true(jnp.asarray(logits), jnp.asarray(y))),
                               p[np.arange(9), y], rtol=1e-5)
    assert sum(energy.p_true_histogram(jnp.asarray(logits), jnp.asarray(y))) == 9


def test_adaptation_metrics_match_numpy():
    rng = np.random.default_rng(2)
    z0 = rng.normal(size=(11, 6))
    zt = z0 + 0.3 * rng.normal(size=(11, 6))
    got = {k: float(v) for k, v in energy.adaptation(jnp.asarray(z0), jnp.asarray(zt)).items()}
    ref = {
        "dist_sq": np.mean([np.sum((a - b) ** 2) for a, b in zip(zt, z0)]),
        "norm_sq": np.mean([a @ a for a in zt]),
        "dot": np.mean([a @ b for a, b in zip(zt, z0)]),
        "cos": np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(zt, z0)]),
        "dist": np.mean([np.sqrt(np.sum((a - b) ** 2)) for a, b in zip(zt, z0)]),
    }
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, err_msg=k)
    same = energy.adaptation(jnp.asarray(z0), jnp.asarray(z0))
    assert float(same["dist_sq"]) == 0.0 and float(same["dist"]) == 0.0
    # the mean of norms, not the root of the mean square (Jensen: strictly below)
    assert got["dist"] < np.sqrt(got["dist_sq"]) * (1 - 1e-3)
    np.testing.assert_allclose(float(same["cos"]), 1.0, rtol=1e-6)


def test_adaptation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="z0 and zt"):
        energy.adaptation(jnp.zeros((3, 4)), jnp.zeros((3, 5)))
