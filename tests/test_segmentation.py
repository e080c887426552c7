"""Segmentation task and mIoU against independent numpy computations."""

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax import metrics, tasks


def _maps(seed, n=3, h=5, w=7, k=6, ignore=0.2):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, k, size=(n, h, w))
    label[rng.random(label.shape) < ignore] = 255
    logits = rng.normal(size=(n, h, w, k)).astype(np.float32)
    return logits, label


def _np_miou(pred, label, k):
    """Per class |P ∩ L| / |P ∪ L| over labelled pixels, mean over classes seen."""
    valid = label != 255
    ious = []
    for c in range(k):
        p, t = (pred == c) & valid, (label == c) & valid
        union = (p | t).sum()
        if union:
            ious.append((p & t).sum() / union)
    return np.mean(ious)


def test_mean_iou_matches_numpy_with_absent_classes():
    k = 8
    _, label = _maps(0, k=5)
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 6, size=label.shape)  # class 5: predicted, never labelled
    pred[pred == 3] = 2  # class 3: labelled, never predicted; 6, 7: absent from both
    got = float(metrics.mean_iou(pred, label, k))
    np.testing.assert_allclose(got, _np_miou(pred, label, k), rtol=1e-6)
    iou = np.asarray(metrics.iou_per_class(metrics.confusion_matrix(pred, label, k)))
    assert np.isnan(iou[6]) and np.isnan(iou[7]) and iou[3] == 0 and iou[5] == 0
    # The ignored pixels' predictions do not matter.
    pred2 = np.where(label == 255, 7, pred)
    np.testing.assert_allclose(float(metrics.mean_iou(pred2, label, k)), got, rtol=1e-6)


def test_confusion_matrix_accumulates_over_batches():
    logits, label = _maps(2, n=6)
    pred = logits.argmax(-1)
    cm = sum(np.asarray(metrics.confusion_matrix(pred[i:i + 2], label[i:i + 2], 6))
             for i in range(0, 6, 2))
    want = np.zeros((6, 6), np.int64)
    v = label != 255
    np.add.at(want, (label[v], pred[v]), 1)
    np.testing.assert_array_equal(cm, want)
    np.testing.assert_allclose(float(metrics.mean_iou_from_confusion(cm)),
                               _np_miou(pred, label, 6), rtol=1e-6)


def test_segmentation_loss_energy_ignore_255():
    logits, label = _maps(3)
    seg = tasks.get("segmentation")
    eta = 0.8
    v = label != 255
    q = logits[v].astype(np.float64)
    logp = q - np.log(np.exp(q).sum(-1, keepdims=True))
    t = np.full(q.shape, (1 - eta) / 6) + eta * np.eye(6)[label[v]]
    np.testing.assert_allclose(float(seg.loss(logits, label, eta)),
                               -(t * logp).sum(-1).mean(), rtol=1e-5)
    p = np.exp(logp)
    np.testing.assert_allclose(float(seg.energy(logits, label)),
                               np.linalg.norm(np.eye(6)[label[v]] - p, axis=-1).mean(), rtol=1e-5)
    pt = np.asarray(seg.p_true(logits, label))
    np.testing.assert_allclose(pt[v.reshape(-1)], p[np.arange(len(p)), label[v]], rtol=1e-5)
    assert np.isnan(pt[~v.reshape(-1)]).all()
    np.testing.assert_allclose(float(seg.train_metric(logits, label)),
                               (logits.argmax(-1)[v] == label[v]).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(seg.metric)(logits, label)),
                               _np_miou(logits.argmax(-1), label, 6), rtol=1e-6)
    # Logits at ignored pixels change nothing.
    wild = np.where(v[..., None], logits, 1e3).astype(np.float32)
    for f in (lambda a: seg.loss(a, label, eta), lambda a: seg.energy(a, label),
              lambda a: seg.metric(a, label), lambda a: seg.train_metric(a, label)):
        np.testing.assert_allclose(float(f(wild)), float(f(logits)), rtol=1e-6)


def test_segmentation_loss_gradient_is_zero_at_ignored_pixels():
    logits, label = _maps(4)
    g = jax.grad(lambda a: tasks.get("segmentation").loss(a, label, 1.0))(jnp.asarray(logits))
    assert np.all(np.asarray(g)[label == 255] == 0)
    assert np.abs(np.asarray(g)[label != 255]).sum() > 0


def test_dense_adaptation_per_location_against_numpy():
    from hpft_jax import energy

    r = np.random.default_rng(4)
    f0 = r.normal(size=(3, 2, 5, 7)).astype(np.float32)
    ft = (f0 + 0.5 * r.normal(size=f0.shape)).astype(np.float32)
    got = {k: float(v) for k, v in energy.adaptation_dense(jnp.asarray(f0), jnp.asarray(ft)).items()}
    d2, nt, dot, cos = [], [], [], []
    for n in range(3):  # every (input, location) pair is one z
        for i in range(2):
            for j in range(5):
                a, b = f0[n, i, j].astype(np.float64), ft[n, i, j].astype(np.float64)
                d2.append(((b - a) ** 2).sum())
                nt.append((b ** 2).sum())
                dot.append(a @ b)
                cos.append(a @ b / np.sqrt((a ** 2).sum() * (b ** 2).sum()))
    want = {"dist_sq": np.mean(d2), "norm_sq": np.mean(nt), "dot": np.mean(dot),
            "cos": np.mean(cos), "dist": np.mean(np.sqrt(d2))}
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5)
    pooled = {k: float(v) for k, v in energy.adaptation(jnp.asarray(f0.mean((1, 2))),
                                                        jnp.asarray(ft.mean((1, 2)))).items()}
    assert abs(pooled["cos"] - got["cos"]) > 1e-3  # the two definitions differ
