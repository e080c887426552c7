"""Neural-collapse metrics: NC1, CDNV and numerical rank (Li et al. 2023).

The companion paper (*Principled and efficient transfer learning of deep
models via neural collapse*) measures collapse of features ``h`` with
(its Eq. 4 and Appendix A)::

    NC1  = (1/K) tr(Sigma_W Sigma_B^+)
    CDNV = Avg_{i<j} (sigma_i^2 + sigma_j^2) / (2 ||mu_i - mu_j||^2)
    rank = (1/K) sum_k ||H_k||_F^2 / ||H_k||_2^2

Conventions (``docs/collapse.md`` gives the reasons and checks):

* ``mu_k`` is the mean of class k, ``mu_G`` the mean of the K class means.
* ``Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` is pooled by
  sample count, as in the reference NC code (``Sw /= sum(N)``); it equals the
  paper's ``1/(nK)`` form for balanced classes.
* ``Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T`` has rank <= K - 1.
  Its pseudo-inverse keeps the top ``min(K-1, d)`` eigenpairs above
  ``rtol * lambda_max`` and is computed in the span of the centred means: an
  SVD of the (d, K) mean matrix instead of an eigh of a (d, d) matrix.
* ``sigma_k^2 = (1/n_k) sum_{i in k} ||h_i - mu_k||^2``; the distance in CDNV
  is squared.
* ``H_k`` is the (n_k, d) matrix of raw (uncentred) class-k features, as the
  paper defines it, so perfectly collapsed classes have rank 1.
  ``center=True`` uses ``H_k - 1 mu_k^T`` instead. ``||H_k||_2`` comes from
  power iteration.

Everything is accumulated and reduced in float64 (under a local
``jax.enable_x64`` context; device features arrive in float32). Large data
sets stream in two passes over batches ``(features (B, d), labels (B,))``:
pass 1 sums class means, pass 2 accumulates centred second moments, so no
``E[hh^T] - mu mu^T`` cancellation occurs. The accumulators are optax-style
``init``/``update`` pairs on NamedTuple states, jitted with donated state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial.distance import pdist

from hpft_jax import images
from hpft_jax.models import Classifier

Batch = tuple[Any, Any]
Batches = Iterable[Batch] | Callable[[], Iterable[Batch]]

DEFAULT_RTOL = 1e-12


# --------------------------------------------------------------------------
# Validation


def _check_num_classes(num_classes: int, *, minimum: int = 1) -> None:
    if not isinstance(num_classes, (int, np.integer)) or num_classes < minimum:
        raise ValueError(
            f"num_classes must be an integer >= {minimum}; got {num_classes!r}")


def _check_batch(features, labels, *, dim: int | None = None) -> None:
    """Static (shape and dtype) checks; no device synchronisation."""
    f_shape, l_shape = np.shape(features), np.shape(labels)
    if len(f_shape) != 2:
        raise ValueError(f"features must be (N, d); got shape {f_shape}")
    if len(l_shape) != 1 or l_shape[0] != f_shape[0]:
        raise ValueError(
            f"labels must be (N,) with N={f_shape[0]} to match features; "
            f"got shape {l_shape}")
    dtype = labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"labels must be integer class indices; got dtype {dtype}")
    if dim is not None and f_shape[1] != dim:
        raise ValueError(
            f"features have width {f_shape[1]} but earlier batches had {dim}")


def _check_arrays(features, labels, num_classes: int) -> None:
    """Full checks for in-memory inputs (synchronises once)."""
    _check_batch(features, labels)
    _check_num_classes(num_classes)
    xp = jnp if isinstance(features, jax.Array) else np  # no host copy of device data
    nonfinite = int(xp.sum(~xp.isfinite(xp.asarray(features))))
    if nonfinite:
        raise ValueError(f"features contain {nonfinite} non-finite values")
    y = np.asarray(labels)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}); "
                         f"got values in [{y.min()}, {y.max()}]")
    empty = np.flatnonzero(np.bincount(y, minlength=num_classes) == 0)
    if empty.size:
        raise ValueError(f"classes {empty.tolist()} have no samples "
                         f"(num_classes={num_classes})")


# --------------------------------------------------------------------------
# Streaming accumulators (float64, jitted, donated state)


class MeanState(NamedTuple):
    """Pass 1: ``counts`` (K,), ``sums`` (K, d) and error counters ()."""

    counts: jax.Array
    sums: jax.Array
    nonfinite: jax.Array
    bad_labels: jax.Array


class ScatterState(NamedTuple):
    """Pass 2, around the pass-1 ``means`` (K, d).

    ``sq_dev`` (K,): sum over class k of ``||h - mu_k||^2``; ``scatter``
    (d, d): sum over all samples of ``(h - mu_y)(h - mu_y)^T``;
    ``class_scatter`` (K, d, d) or None: the same per class.
    """

    means: jax.Array
    counts: jax.Array
    sq_dev: jax.Array
    scatter: jax.Array
    class_scatter: jax.Array | None
    nonfinite: jax.Array
    bad_labels: jax.Array


class ClassStats(NamedTuple):
    """Host float64 statistics of one feature set; all metrics derive from it.

    counts (K,) int64, means (K, d), sq_dev (K,), scatter (d, d),
    class_scatter (K, d, d) or None (see :class:`ScatterState`).
    """

    counts: np.ndarray
    means: np.ndarray
    sq_dev: np.ndarray
    scatter: np.ndarray
    class_scatter: np.ndarray | None

    @property
    def within_cov(self) -> np.ndarray:
        """Sigma_W (d, d), pooled by sample count."""
        return self.scatter / self.counts.sum()


def _counts_and_errors(labels, features, num_classes):
    valid = (labels >= 0) & (labels < num_classes)
    counts = jax.ops.segment_sum(jnp.ones(labels.shape, jnp.int64), labels,
                                 num_classes)
    nonfinite = jnp.sum(~jnp.isfinite(features), dtype=jnp.int64)
    return counts, nonfinite, jnp.sum(~valid, dtype=jnp.int64)


@functools.partial(jax.jit, donate_argnums=0)
def _mean_update(state: MeanState, features, labels) -> MeanState:
    h = features.astype(jnp.float64)
    k = state.sums.shape[0]
    counts, nonfinite, bad = _counts_and_errors(labels, h, k)
    return MeanState(counts=state.counts + counts,
                     sums=state.sums + jax.ops.segment_sum(h, labels, k),
                     nonfinite=state.nonfinite + nonfinite,
                     bad_labels=state.bad_labels + bad)


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_update(state: ScatterState, features, labels) -> ScatterState:
    h = features.astype(jnp.float64)
    k = state.means.shape[0]
    counts, nonfinite, bad = _counts_and_errors(labels, h, k)
    c = h - state.means[jnp.clip(labels, 0, k - 1)]  # (B, d)
    new = state._replace(
        counts=state.counts + counts,
        sq_dev=state.sq_dev + jax.ops.segment_sum(jnp.sum(c * c, axis=1), labels, k),
        scatter=state.scatter + c.T @ c,
        nonfinite=state.nonfinite + nonfinite,
        bad_labels=state.bad_labels + bad)
    if state.class_scatter is not None:
        onehot = jax.nn.one_hot(labels, k, dtype=jnp.float64)  # (B, K)
        new = new._replace(class_scatter=state.class_scatter
                           + jnp.einsum("bk,bi,bj->kij", onehot, c, c))
    return new


def mean_init(num_classes: int, dim: int) -> MeanState:
    """Empty pass-1 state for K classes of d-dimensional features."""
    _check_num_classes(num_classes)
    with jax.enable_x64(True):
        return MeanState(counts=jnp.zeros((num_classes,), jnp.int64),
                         sums=jnp.zeros((num_classes, dim), jnp.float64),
                         nonfinite=jnp.zeros((), jnp.int64),
                         bad_labels=jnp.zeros((), jnp.int64))


def mean_update(state: MeanState, features, labels) -> MeanState:
    """Adds a batch ``features (B, d)``, ``labels (B,)`` to pass 1.

    The old ``state`` is donated. Label range and finiteness are counted on
    device and checked by :func:`scatter_init`.
    """
    _check_batch(features, labels, dim=state.sums.shape[1])
    with jax.enable_x64(True):
        return _mean_update(state, features, labels)


def _check_pass(name: str, nonfinite, bad_labels, num_classes: int) -> None:
    if int(nonfinite):
        raise ValueError(f"features: {int(nonfinite)} non-finite values "
                         f"seen in {name}")
    if int(bad_labels):
        raise ValueError(f"labels: {int(bad_labels)} labels outside "
                         f"[0, num_classes={num_classes}) seen in {name}")


def scatter_init(mean_state: MeanState, *, class_scatter: bool = False
                 ) -> ScatterState:
    """Checks pass 1 and starts pass 2 around its class means.

    ``class_scatter=True`` also keeps per-class (d, d) scatter, which
    :func:`numerical_rank_from_stats` needs: ``K d^2`` float64 numbers and
    ``O(B K d^2)`` work per batch.
    """
    k, d = mean_state.sums.shape
    _check_pass("pass 1", mean_state.nonfinite, mean_state.bad_labels, k)
    counts = np.asarray(mean_state.counts)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"classes {empty.tolist()} have no samples "
                         f"(num_classes={k})")
    with jax.enable_x64(True):
        return ScatterState(
            means=mean_state.sums / mean_state.counts[:, None].astype(jnp.float64),
            counts=jnp.zeros((k,), jnp.int64),
            sq_dev=jnp.zeros((k,), jnp.float64),
            scatter=jnp.zeros((d, d), jnp.float64),
            class_scatter=jnp.zeros((k, d, d), jnp.float64) if class_scatter else None,
            nonfinite=jnp.zeros((), jnp.int64),
            bad_labels=jnp.zeros((), jnp.int64))


def scatter_update(state: ScatterState, features, labels) -> ScatterState:
    """Adds a batch to pass 2; the old ``state`` is donated."""
    _check_batch(features, labels, dim=state.means.shape[1])
    with jax.enable_x64(True):
        return _scatter_update(state, features, labels)


def finalize(mean_state: MeanState, state: ScatterState) -> ClassStats:
    """Checks pass 2 against pass 1 and moves the statistics to the host."""
    k = state.means.shape[0]
    _check_pass("pass 2", state.nonfinite, state.bad_labels, k)
    counts = np.asarray(state.counts)
    if not np.array_equal(counts, np.asarray(mean_state.counts)):
        raise ValueError(
            "batches: the two passes saw different class counts "
            f"({np.asarray(mean_state.counts).tolist()} then {counts.tolist()}); "
            "both passes must yield the same samples (no random augmentation)")
    cs = None if state.class_scatter is None else np.asarray(state.class_scatter)
    return ClassStats(counts=counts, means=np.asarray(state.means),
                      sq_dev=np.asarray(state.sq_dev),
                      scatter=np.asarray(state.scatter), class_scatter=cs)


def _reiterable(batches: Batches) -> Callable[[], Iterable[Batch]]:
    if callable(batches):
        return batches
    if iter(batches) is batches:
        raise ValueError(
            "batches must be re-iterable (a list, or a function returning a "
            "fresh iterable) because it is read twice; got a one-shot iterator")
    return lambda: batches


def _two_passes(batches: Batches, num_classes: int,
                transform: Callable[[Any], tuple], *, class_scatter: bool
                ) -> list[ClassStats]:
    """Two passes over ``batches``; ``transform(x)`` gives feature tuples."""
    get = _reiterable(batches)
    means = None
    for x, y in get():
        feats, y = transform(x), jnp.asarray(y)
        if means is None:
            means = [mean_init(num_classes, np.shape(f)[-1]) for f in feats]
        means = [mean_update(s, f, y) for s, f in zip(means, feats)]
    if means is None:
        raise ValueError("batches yielded no batches")
    scat = [scatter_init(m, class_scatter=class_scatter) for m in means]
    for x, y in get():
        feats, y = transform(x), jnp.asarray(y)
        scat = [scatter_update(s, f, y) for s, f in zip(scat, feats)]
    return [finalize(m, s) for m, s in zip(means, scat)]


def stream_class_stats(batches: Batches, num_classes: int, *,
                       class_scatter: bool = False) -> ClassStats:
    """:class:`ClassStats` from two passes over ``(features, labels)`` batches.

    ``batches`` is a re-iterable (list, ``tf.data``-like object) or a
    function returning a fresh iterable; both passes must yield the same
    samples, in any order.
    """
    _check_num_classes(num_classes)
    return _two_passes(batches, num_classes, lambda f: (f,),
                       class_scatter=class_scatter)[0]


def class_stats(features, labels, num_classes: int, *,
                class_scatter: bool = False) -> ClassStats:
    """:class:`ClassStats` of in-memory ``features (N, d)``, ``labels (N,)``."""
    return stream_class_stats([(features, labels)], num_classes,
                              class_scatter=class_scatter)


# --------------------------------------------------------------------------
# Metrics from statistics (host float64)


def _sigma_b_eig(means: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Kept eigenpairs of Sigma_B: ``lam (r,)``, ``U (d, r)``, r <= K - 1.

    Sigma_B = M M^T / K with M (d, K) the centred means, so its nonzero
    eigenpairs are ``(s_j^2 / K, u_j)`` from the thin SVD of M: O(d K^2)
    instead of the O(d^3) eigh of Sigma_B.
    """
    k, d = means.shape
    m = (means - means.mean(axis=0)).T
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    r = min(k - 1, d)
    lam, u = s[:r] ** 2 / k, u[:, :r]
    if lam.size == 0 or not lam[0] > 0:
        raise ValueError("all class means coincide (Sigma_B = 0); NC1 and "
                         "CDNV are undefined")
    keep = lam > rtol * lam[0]
    return lam[keep], u[:, keep]


def nc1_from_stats(stats: ClassStats, *, rtol: float = DEFAULT_RTOL) -> float:
    """NC1 = (1/K) tr(Sigma_W Sigma_B^+) (Eq. 4).

    ``rtol``: eigenvalues of Sigma_B at or below ``rtol * lambda_max`` are
    treated as zero (besides the cut at K - 1).
    """
    k = stats.means.shape[0]
    _check_num_classes(k, minimum=2)
    lam, u = _sigma_b_eig(stats.means, rtol)
    sw_u = stats.scatter @ u / stats.counts.sum()  # Sigma_W U, (d, r)
    return float(np.sum(np.einsum("ij,ij->j", u, sw_u) / lam) / k)


def cdnv_from_stats(stats: ClassStats) -> float:
    """CDNV averaged over unordered class pairs (Appendix A)."""
    k = stats.means.shape[0]
    _check_num_classes(k, minimum=2)
    var = stats.sq_dev / stats.counts
    dist2 = pdist(stats.means, "sqeuclidean")  # pairs (i, j), i < j, row-major
    i, j = np.triu_indices(k, 1)
    if np.any(dist2 == 0):
        p = int(np.flatnonzero(dist2 == 0)[0])
        raise ValueError(f"classes {i[p]} and {j[p]} have identical means; "
                         "CDNV is undefined")
    return float(np.mean((var[i] + var[j]) / (2.0 * dist2)))


def _power_iteration(matvec, v0, max_iters: int, tol: float):
    """Largest eigenvalue of K PSD operators at once. v0 (K, d) -> (K,).

    Stops when every Rayleigh quotient changes by at most ``tol`` (relative)
    or after ``max_iters`` products. The estimate is a lower bound of the
    true eigenvalue, with error of order ``(lambda_2/lambda_1)^(2t)``.
    """
    def normed(w):
        n = jnp.linalg.norm(w, axis=1, keepdims=True)
        return jnp.where(n > 0, w / jnp.where(n > 0, n, 1.0), 0.0)

    def cond(carry):
        it, _, lam, prev = carry
        return (it < max_iters) & jnp.any(jnp.abs(lam - prev) > tol * jnp.abs(lam))

    def body(carry):
        it, v, lam, _ = carry
        w = matvec(v)
        return it + 1, normed(w), jnp.sum(v * w, axis=1), lam

    k = v0.shape[0]
    init = (0, normed(v0), jnp.zeros((k,), v0.dtype), jnp.full((k,), -jnp.inf, v0.dtype))
    return jax.lax.while_loop(cond, body, init)[2]


@functools.partial(jax.jit, static_argnames=("max_iters",))
def _rank_from_grams(grams, v0, max_iters: int, tol):
    lam = _power_iteration(lambda v: jnp.einsum("kij,kj->ki", grams, v),
                           v0, max_iters, tol)
    fro2 = jnp.trace(grams, axis1=1, axis2=2)
    return jnp.where(lam > 0, fro2 / jnp.where(lam > 0, lam, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iters"))
def _rank_from_data(h, labels, offsets, v0, num_classes: int, max_iters: int, tol):
    c = h.astype(jnp.float64) - offsets[labels]  # (N, d), rows of the H_k

    def matvec(v):  # v (K, d) -> H_k^T H_k v_k (K, d)
        u = jnp.sum(c * v[labels], axis=1)
        return jax.ops.segment_sum(c * u[:, None], labels, num_classes)

    lam = _power_iteration(matvec, v0, max_iters, tol)
    fro2 = jax.ops.segment_sum(jnp.sum(c * c, axis=1), labels, num_classes)
    return jnp.where(lam > 0, fro2 / jnp.where(lam > 0, lam, 1.0), 0.0)


def _start_vectors(seed: int, k: int, d: int) -> np.ndarray:
    """Gaussian power-iteration starts (K, d); host RNG, nothing to compile."""
    return np.random.default_rng(seed).normal(size=(k, d))


def numerical_rank_from_stats(stats: ClassStats, *, center: bool = False,
                              max_iters: int = 1000, tol: float = 1e-12,
                              seed: int = 0) -> float:
    """(1/K) sum_k ||H_k||_F^2 / ||H_k||_2^2 from per-class scatter.

    Needs ``stats.class_scatter`` (``class_scatter=True``). The Gram matrix
    is ``H_k^T H_k = S_k + n_k mu_k mu_k^T`` (or ``S_k`` if ``center``); a
    class whose H_k is zero counts as rank 0. ``seed`` seeds the Gaussian
    start vectors.
    """
    if stats.class_scatter is None:
        raise ValueError("stats has no class_scatter; build it with "
                         "class_scatter=True")
    grams = stats.class_scatter
    if not center:
        grams = grams + stats.counts[:, None, None] * np.einsum(
            "ki,kj->kij", stats.means, stats.means)
    k, d = stats.means.shape
    with jax.enable_x64(True):
        ranks = _rank_from_grams(jnp.asarray(grams), _start_vectors(seed, k, d),
                                 max_iters, tol)
        return float(jnp.mean(ranks))


def metrics_from_stats(stats: ClassStats, *, rtol: float = DEFAULT_RTOL,
                       **rank_kw) -> dict[str, float]:
    """``{"nc1", "cdnv"}``, plus ``"numerical_rank"`` if class scatter is kept."""
    out = {"nc1": nc1_from_stats(stats, rtol=rtol), "cdnv": cdnv_from_stats(stats)}
    if stats.class_scatter is not None:
        out["numerical_rank"] = numerical_rank_from_stats(stats, **rank_kw)
    return out


# --------------------------------------------------------------------------
# In-memory metrics


def nc1(features, labels, num_classes: int, *, rtol: float = DEFAULT_RTOL) -> float:
    """NC1 of ``features (N, d)`` with ``labels (N,)`` in [0, K) (Eq. 4)."""
    _check_num_classes(num_classes, minimum=2)
    return nc1_from_stats(class_stats(features, labels, num_classes), rtol=rtol)


def cdnv(features, labels, num_classes: int) -> float:
    """Class-distance normalised variance, averaged over class pairs."""
    _check_num_classes(num_classes, minimum=2)
    return cdnv_from_stats(class_stats(features, labels, num_classes))


def numerical_rank(features, labels, num_classes: int, *, center: bool = False,
                   max_iters: int = 1000, tol: float = 1e-12,
                   seed: int = 0) -> float:
    """(1/K) sum_k ||H_k||_F^2 / ||H_k||_2^2 (Appendix A).

    Power iteration runs on the (n_k, d) blocks H_k directly, all classes at
    once, with O(N d) work per step and no (d, d) matrix.
    """
    _check_arrays(features, labels, num_classes)
    n, d = np.shape(features)
    with jax.enable_x64(True):
        h = jnp.asarray(features)
        y = jnp.asarray(labels)
        if center:
            offsets = jax.ops.segment_sum(h.astype(jnp.float64), y, num_classes)
            offsets = offsets / jnp.bincount(y, length=num_classes)[:, None]
        else:
            offsets = jnp.zeros((num_classes, d), jnp.float64)
        ranks = _rank_from_data(h, y, offsets, _start_vectors(seed, num_classes, d),
                                num_classes, max_iters, tol)
        return float(jnp.mean(ranks))


def collapse_metrics(features, labels, num_classes: int, *,
                     rtol: float = DEFAULT_RTOL, **rank_kw) -> dict[str, float]:
    """``{"nc1", "cdnv", "numerical_rank"}`` of in-memory features."""
    _check_num_classes(num_classes, minimum=2)
    stats = class_stats(features, labels, num_classes)
    return {"nc1": nc1_from_stats(stats, rtol=rtol),
            "cdnv": cdnv_from_stats(stats),
            "numerical_rank": numerical_rank(features, labels, num_classes, **rank_kw)}


# --------------------------------------------------------------------------
# Layer-wise NC1 (Sec. 2.4, 3.3; Appendix B, Fig. 9)


def global_avg_pool(h: jax.Array) -> jax.Array:
    """Adaptive average pooling to one value per channel: (N, ..., C) -> (N, C)."""
    if h.ndim <= 2:
        return h
    return jnp.mean(h.reshape(h.shape[0], -1, h.shape[-1]), axis=1)


def block_features_fn(module) -> Callable[[Any, jax.Array], tuple[jax.Array, ...]]:
    """Jitted ``(variables, x) -> (z_1, ..., z_n)``, pooled block outputs.

    ``module`` is a backbone (``__call__(x, train, start, stop)``, e.g.
    :class:`hpft_jax.models.ResNet`) or a :class:`Classifier`, whose
    ``backbone`` is used. Eval mode (BatchNorm running averages); one
    forward pass yields every block's output, ``z_s`` of shape (N, C_s).
    """
    is_clf = isinstance(module, Classifier)
    n = (module.backbone if is_clf else module).num_blocks

    def chain(m, x):
        bb = m.backbone if is_clf else m
        outs, h = [], images.model_input(x, m.input_norm) if is_clf else x
        for s in range(n):
            h = bb(h, train=False, start=None if s == 0 else s, stop=s + 1)  # None: stem first
            outs.append(global_avg_pool(h))
        return tuple(outs)

    return jax.jit(lambda variables, x: module.apply(variables, x, method=chain))


def layerwise_stats(module, variables, batches: Batches, num_classes: int
                    ) -> dict[str, ClassStats]:
    """:class:`ClassStats` after each block, streamed over ``(x, y)`` batches.

    Keys are the backbone's block names in order (``layer1_1``, ``dense0``).
    """
    _check_num_classes(num_classes)
    bb = module.backbone if isinstance(module, Classifier) else module
    fn = block_features_fn(module)
    stats = _two_passes(batches, num_classes, lambda x: fn(variables, x),
                        class_scatter=False)
    return {bb.block_name(i): s for i, s in enumerate(stats)}


def layerwise_nc1(module, variables, batches: Batches, num_classes: int, *,
                  rtol: float = DEFAULT_RTOL) -> dict[str, float]:
    """NC1 of the pooled output of every block (companion paper, Fig. 9/10)."""
    _check_num_classes(num_classes, minimum=2)
    return {name: nc1_from_stats(s, rtol=rtol) for name, s in
            layerwise_stats(module, variables, batches, num_classes).items()}
