"""Evaluation metrics beyond accuracy: ROC-AUC over many binary tasks.

:func:`roc_auc_per_task` runs on device (inside jit, for FT's early
stopping); :func:`roc_auc_multilabel` is the host-side entry point with
OGB's evaluator semantics (``ogb.graphproppred.Evaluator`` for ``rocauc``):
ROC-AUC per task over its labelled entries, averaged over the tasks that
have both classes.

The AUC is the Mann-Whitney statistic, ties counted one half, which is
what scikit-learn's trapezoidal ``roc_auc_score`` computes. Each positive
adds (#negatives below it + ½ #negatives tied with it) / #negatives; no
rank sums, so float32 stays exact to ~1e-6 for any N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _auc_one(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """ROC-AUC of one task; scores, labels (N,), NaN label = missing. NaN if
    the labelled entries lack either class."""
    pos = labels == 1
    neg = labels == 0
    n_pos = pos.sum()
    n_neg = neg.sum()
    neg_sorted = jnp.sort(jnp.where(neg, scores, jnp.inf))  # finite negatives first
    lo = jnp.searchsorted(neg_sorted, scores, side="left")
    hi = jnp.searchsorted(neg_sorted, scores, side="right")
    # hi counts the +inf fillers only for scores that are +inf themselves.
    hi = jnp.minimum(hi, n_neg)
    lo = jnp.minimum(lo, n_neg)
    credit = (lo + hi).astype(jnp.float32) * 0.5 / jnp.maximum(n_neg, 1)
    auc = jnp.where(pos, credit, 0.0).sum() / jnp.maximum(n_pos, 1)
    return jnp.where((n_pos > 0) & (n_neg > 0), auc, jnp.nan)


def roc_auc_per_task(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """(T,) ROC-AUC per task; scores (N, T) (logits or probabilities), labels
    (N, T) in {0, 1} with NaN for missing. NaN for a task without both classes."""
    scores = jnp.asarray(scores, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    return jax.vmap(_auc_one, in_axes=(1, 1))(scores, labels)


def roc_auc_mean(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean ROC-AUC over the tasks with both classes (NaN if none); jittable."""
    per = roc_auc_per_task(scores, labels)
    ok = ~jnp.isnan(per)
    return jnp.where(ok.any(), jnp.where(ok, per, 0.0).sum() / jnp.maximum(ok.sum(), 1), jnp.nan)


def roc_auc_multilabel(scores, labels) -> float:
    """OGB's ``rocauc``: mean over tasks with both classes among the labelled
    entries; scores, labels (N, T) host or device arrays, NaN label = missing.
    Raises ``ValueError`` when no task has both classes (OGB's
    ``RuntimeError``)."""
    scores = np.asarray(scores, np.float32)
    labels = np.asarray(labels, np.float32)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores and labels must both be (N, T); got {scores.shape} and "
                         f"{labels.shape}")
    per = np.asarray(roc_auc_per_task(scores, labels))
    if np.all(np.isnan(per)):
        raise ValueError("no task has both positive and negative labels: ROC-AUC is undefined")
    return float(np.nanmean(per))


# --------------------------------------------------------------------------
# Segmentation: mean IoU from an accumulated confusion matrix.
#
# IoU_k = C[k, k] / (Σ_j C[k, j] + Σ_i C[i, k] − C[k, k]) with C[label, pred]
# counted over labelled pixels (label ≠ ignore_index). A class absent from
# both the labels and the predictions has 0 / 0: it is NaN and left out of
# the mean (mmsegmentation's ``nanmean``); a class that is only predicted,
# or only labelled, has IoU 0 and counts.


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int,
                     ignore_index: int = 255) -> jax.Array:
    """(K, K) int32 counts C[label, pred] over pixels whose label is in
    [0, K) (so ``ignore_index`` drops out); pred, label: any equal shapes.
    Sums of these over batches give the data set's matrix. Jittable."""
    pred = jnp.asarray(pred).reshape(-1).astype(jnp.int32)
    label = jnp.asarray(label).reshape(-1).astype(jnp.int32)
    ok = (label >= 0) & (label < num_classes) & (label != ignore_index)
    idx = jnp.where(ok, label * num_classes + jnp.clip(pred, 0, num_classes - 1), 0)
    counts = jnp.bincount(idx, weights=ok.astype(jnp.int32), length=num_classes * num_classes)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def iou_per_class(cm: jax.Array) -> jax.Array:
    """(K,) IoU per class from a confusion matrix; NaN where the union is empty."""
    cm = jnp.asarray(cm, jnp.float32)
    tp = jnp.diagonal(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    return jnp.where(union > 0, tp / jnp.maximum(union, 1.0), jnp.nan)


def mean_iou_from_confusion(cm: jax.Array) -> jax.Array:
    """Mean IoU over classes with a non-empty union (NaN if none); jittable."""
    iou = iou_per_class(cm)
    ok = ~jnp.isnan(iou)
    return jnp.where(ok.any(), jnp.where(ok, iou, 0.0).sum() / jnp.maximum(ok.sum(), 1), jnp.nan)


def mean_iou(pred, label, num_classes: int, ignore_index: int = 255) -> jax.Array:
    """mIoU of predicted class maps ``pred`` against ``label`` (same shapes,
    e.g. (N, H, W)); pixels labelled ``ignore_index`` are not counted."""
    return mean_iou_from_confusion(confusion_matrix(pred, label, num_classes, ignore_index))
