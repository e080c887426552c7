"""Task interface and ROC-AUC against independent computations (numpy, scikit-learn)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from hpft_jax import energy, metrics, tasks


def _multilabel(seed, n=40, t=5, missing=0.3, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, t)) < 0.4).astype(np.float32)
    y[rng.random((n, t)) < missing] = np.nan
    s = rng.normal(size=(n, t)).astype(np.float32)
    if ties:
        s = np.round(s * 2) / 2  # many tied scores
    return s, y


@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_matches_sklearn_per_task(ties):
    s, y = _multilabel(0, ties=ties)
    y[:, 4] = np.where(np.isnan(y[:, 4]), np.nan, 0.0)  # task 4: no positives
    per = np.asarray(metrics.roc_auc_per_task(s, y))
    for t in range(4):
        m = ~np.isnan(y[:, t])
        np.testing.assert_allclose(per[t], roc_auc_score(y[m, t], s[m, t]), rtol=1e-6)
    assert np.isnan(per[4])
    want = np.mean([roc_auc_score(y[~np.isnan(y[:, t]), t], s[~np.isnan(y[:, t]), t])
                    for t in range(4)])
    np.testing.assert_allclose(metrics.roc_auc_multilabel(s, y), want, rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(metrics.roc_auc_mean)(s, y)), want, rtol=1e-6)


def test_roc_auc_no_valid_task_raises():
    y = np.array([[1.0], [np.nan], [1.0]], np.float32)
    with pytest.raises(ValueError, match="no task has both"):
        metrics.roc_auc_multilabel(np.zeros((3, 1)), y)


def test_masked_bce_matches_numpy_with_smoothing():
    s, y = _multilabel(1)
    eta = 0.8
    got = float(tasks.get("multilabel").loss(jnp.asarray(s), jnp.asarray(y), eta))
    m = ~np.isnan(y)
    t = eta * y[m] + (1 - eta) / 2
    p = 1 / (1 + np.exp(-s[m].astype(np.float64)))
    want = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_missing_labels_change_nothing():
    """Scores at missing entries do not enter the loss, energy or metric."""
    s, y = _multilabel(2)
    s2 = np.where(np.isnan(y), 1e3, s).astype(np.float32)
    ml = tasks.get("multilabel")
    for f in (lambda a: ml.loss(a, y, 0.9), lambda a: ml.energy(a, y),
              lambda a: ml.metric(a, y), lambda a: ml.train_metric(a, y)):
        assert float(f(jnp.asarray(s))) == float(f(jnp.asarray(s2)))


def test_binary_energy_is_2class_aie_over_sqrt2():
    """‖e_y − softmax(0, q)‖₂ = √2 |y − σ(q)|: the multi-label energy is the
    paper's AIE of the equivalent 2-class problems divided by √2."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(30,)).astype(np.float32)
    y = rng.integers(0, 2, 30)
    two = jnp.stack([jnp.zeros_like(q), q], axis=1)
    aie2 = float(energy.aie(two, jnp.asarray(y)))
    ml = float(tasks.get("multilabel").energy(jnp.asarray(q[:, None]),
                                              jnp.asarray(y[:, None], jnp.float32)))
    np.testing.assert_allclose(ml * np.sqrt(2), aie2, rtol=1e-5)
    # p0 of the true label: the same values as the 2-class p_0[y]
    pt = np.asarray(tasks.get("multilabel").p_true(jnp.asarray(q[:, None]),
                                                   jnp.asarray(y[:, None], jnp.float32)))
    np.testing.assert_allclose(pt, np.asarray(energy.p_true(two, jnp.asarray(y))), rtol=1e-5)


def test_classification_task_is_the_old_expressions():
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(9, 4)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 4, 9))
    c = tasks.get("classification")
    from hpft_jax.losses import accuracy, cross_entropy, smooth_targets  # noqa: PLC0415 (the old path)
    assert float(c.loss(logits, y, 0.7)) == float(cross_entropy(logits, smooth_targets(y, 4, 0.7)))
    assert float(c.energy(logits, y)) == float(energy.aie(logits, y))
    assert float(c.metric(logits, y)) == float(accuracy(logits, y))


def test_histogram_drops_missing_entries():
    assert sum(energy.histogram(np.array([0.1, np.nan, 0.9, np.nan]))) == 2
