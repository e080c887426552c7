"""Task kinds: what the head's outputs mean, for every part of HP and FT.

A task turns the head's logits and the labels into everything the library
needs, so the training steps, HP, FT and the energy code never look at the
label format themselves:

===================  =================================  ==============================
method               ``classification`` (y: (N,) int)   ``multilabel`` (y: (N, T) float,
                                                        NaN = missing label)
===================  =================================  ==============================
``loss``             softmax CE on η-smoothed targets   masked BCE on η-smoothed binary
                                                        targets, mean over labelled entries
``probs``            softmax                            sigmoid
``energy``           E_n ‖e_y − p₀‖₂ (AIE, Prop. 1)     mean over labelled entries |y − p₀|
``p_true``           p₀[y] per example                  p₀ of the true label per entry
                                                        (NaN where missing)
``train_metric``     accuracy                           binary accuracy over labelled entries
``metric``           accuracy                           ROC-AUC averaged over tasks with
                                                        both classes (OGB's evaluator)
``predict``          argmax                             p > ½
===================  =================================  ==============================

Every method works on one "labelled unit" axis layout: an example
(classification), a (molecule, task) entry (multi-label), a pixel
(segmentation: logits (N, H, W, K), labels (N, H, W) with an ignore value;
the same masked means apply, and its metric is mIoU). A new kind subclasses
:class:`Task` and registers in :data:`TASKS`; models carry the task's name
(``Classifier.task``) and :func:`of` finds it.

**Energy for binary targets (docs/graphs.md).** A binary task is a 2-class
softmax with logits (0, q): p = (1 − σ(q), σ(q)) and, for y ∈ {0, 1},
‖e_y − p‖₂ = √2 |y − σ(q)|. The multi-label energy drops the constant √2 so
that it lies in [0, 1] like a probability gap; it is the paper's AIE of the
equivalent 2-class problems divided by √2 (tested).

**Label smoothing** follows the paper's η (weight on the true label, Sec.
5.3): K classes get η e_y + (1 − η)/K; a binary target gets
η y + (1 − η)/2, i.e. K = 2 per binary task.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from hpft_jax import energy, metrics
from hpft_jax.losses import accuracy, cross_entropy, smooth_targets


@dataclasses.dataclass(frozen=True)
class Task:
    """Interface; see the module docstring. All methods are jittable."""

    name: str = "task"
    metric_name: str = "metric"  # what ``metric`` measures, for reports

    def loss(self, logits, y, eta):
        raise NotImplementedError

    def probs(self, logits):
        raise NotImplementedError

    def energy(self, logits, y):
        raise NotImplementedError

    def p_true(self, logits, y):
        raise NotImplementedError

    def train_metric(self, logits, y):
        raise NotImplementedError

    def metric(self, logits, y):
        raise NotImplementedError

    def predict(self, logits):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Classification(Task):
    """Single-label K-way classification; the library's original path,
    expression for expression (so the default sweep is bit-identical)."""

    name: str = "classification"
    metric_name: str = "accuracy"

    def loss(self, logits, y, eta):
        return cross_entropy(logits, smooth_targets(y, logits.shape[-1], eta))

    def probs(self, logits):
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    def energy(self, logits, y):
        return energy.aie(logits, y)

    def p_true(self, logits, y):
        return energy.p_true(logits, y)

    def train_metric(self, logits, y):
        return accuracy(logits, y)

    def metric(self, logits, y):
        return accuracy(logits, y)

    def predict(self, logits):
        return jnp.argmax(logits, axis=-1)


def smooth_binary(y: jax.Array, eta) -> jax.Array:
    """η y + (1 − η)/2 (K = 2 per binary task); NaN (missing) stays NaN."""
    eta = jnp.asarray(eta, jnp.float32)
    return eta * y + (1.0 - eta) * 0.5


@dataclasses.dataclass(frozen=True)
class MultiLabel(Task):
    """T independent binary tasks with missing labels; logits, y (N, T)."""

    name: str = "multilabel"
    metric_name: str = "ROC-AUC"

    @staticmethod
    def labelled(y):
        return ~jnp.isnan(y)

    def loss(self, logits, y, eta):
        """Mean BCE over labelled entries (OGB's ``criterion(pred[is_labeled],
        y[is_labeled])``) on smoothed targets."""
        m = self.labelled(y)
        t = jnp.where(m, smooth_binary(y, eta), 0.0)
        per = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), t)
        return jnp.where(m, per, 0.0).sum() / jnp.maximum(m.sum(), 1)

    def probs(self, logits):
        return jax.nn.sigmoid(logits.astype(jnp.float32))

    def energy(self, logits, y):
        m = self.labelled(y)
        gap = jnp.abs(jnp.where(m, y, 0.0) - self.probs(logits))
        return jnp.where(m, gap, 0.0).sum() / jnp.maximum(m.sum(), 1)

    def p_true(self, logits, y):
        p = self.probs(logits)
        return jnp.where(self.labelled(y), jnp.where(y == 1, p, 1.0 - p), jnp.nan).reshape(-1)

    def train_metric(self, logits, y):
        m = self.labelled(y)
        hit = (logits > 0) == (y == 1)
        return jnp.where(m, hit, False).sum() / jnp.maximum(m.sum(), 1)

    def metric(self, logits, y):
        return metrics.roc_auc_mean(logits, y)

    def predict(self, logits):
        return logits > 0


IGNORE = 255  # the "not labelled" pixel value (PASCAL VOC's object borders)


@dataclasses.dataclass(frozen=True)
class Segmentation(Task):
    """Per-pixel K-way classification; logits (N, H, W, K), y (N, H, W) int
    with :data:`IGNORE` for unlabelled pixels. Loss, energy, p₀[y] and pixel
    accuracy are the classification ones over labelled pixels; ``metric`` is
    mIoU from the confusion matrix of the whole set (:func:`metrics.mean_iou`)."""

    name: str = "segmentation"
    metric_name: str = "mIoU"

    @staticmethod
    def labelled(y):
        return y != IGNORE

    @staticmethod
    def _safe(y, k):
        return jnp.where((y >= 0) & (y < k), y, 0)

    def _masked_mean(self, per, y):
        m = self.labelled(y)
        return jnp.where(m, per, 0.0).sum() / jnp.maximum(m.sum(), 1)

    def loss(self, logits, y, eta):
        k = logits.shape[-1]
        t = smooth_targets(self._safe(y, k), k, eta)
        per = optax.softmax_cross_entropy(logits.astype(jnp.float32), t)
        return self._masked_mean(per, y)

    def probs(self, logits):
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    def energy(self, logits, y):
        k = logits.shape[-1]
        e = jax.nn.one_hot(self._safe(y, k), k, dtype=jnp.float32)
        return self._masked_mean(jnp.linalg.norm(e - self.probs(logits), axis=-1), y)

    def p_true(self, logits, y):
        k = logits.shape[-1]
        p = jnp.take_along_axis(self.probs(logits), self._safe(y, k)[..., None], axis=-1)[..., 0]
        return jnp.where(self.labelled(y), p, jnp.nan).reshape(-1)

    def train_metric(self, logits, y):
        return self._masked_mean((self.predict(logits) == y).astype(jnp.float32), y)

    def metric(self, logits, y):
        return metrics.mean_iou(self.predict(logits), y, logits.shape[-1], IGNORE)

    def predict(self, logits):
        return jnp.argmax(logits, axis=-1)


TASKS: dict[str, Task] = {"classification": Classification(), "multilabel": MultiLabel(),
                          "segmentation": Segmentation()}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


def of(model) -> Task:
    """The task of a model (``model.task``; classification if it has none)."""
    return get(getattr(model, "task", "classification"))
