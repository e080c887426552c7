"""NC1, CDNV, numerical rank and their streaming/layer-wise versions.

Every metric is checked against a plain-numpy transcription of its
definition (per-class loops, explicit outer products, ``np.linalg.eigh`` /
``np.linalg.norm(H, 2)``), written independently of ``hpft_jax.collapse``.
"""

import jax
import numpy as np
import pytest

from hpft_jax import neural_collapse as nc
from hpft_jax.models import Classifier, LinearHead, MLPBackbone, ResNetTiny


# --------------------------------------------------------------------------
# Data and plain-numpy references


def clusters(counts, dim, *, seed=0, spread=3.0, dtype=np.float64):
    """Gaussian clusters with class sizes ``counts``; returns (X, y, K)."""
    rng = np.random.default_rng(seed)
    k = len(counts)
    y = rng.permutation(np.repeat(np.arange(k), counts))
    mu = spread * rng.normal(size=(k, dim))
    scales = rng.uniform(0.5, 2.0, size=k)  # classes differ in spread
    x = mu[y] + scales[y][:, None] * rng.normal(size=(len(y), dim))
    return x.astype(dtype), y, k


def ref_class_means(x, y, k):
    return np.stack([x[y == c].mean(axis=0) for c in range(k)])


def ref_nc1(x, y, k, *, pooled=True, center="class_means"):
    """(1/K) tr(Sw Sb^+), Sb^+ from the top K-1 eigenpairs of Sb."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    means = ref_class_means(x, y, k)
    sw = np.zeros((d, d))
    for c in range(k):
        dev = x[y == c] - means[c]  # rows h - mu_c
        sw += dev.T @ dev / (n if pooled else k * len(dev))
    mu_g = means.mean(axis=0) if center == "class_means" else x.mean(axis=0)
    sb = sum(np.outer(m - mu_g, m - mu_g) for m in means) / k
    w, v = np.linalg.eigh(sb)
    top = np.argsort(w)[::-1][: min(k - 1, d)]
    top = top[w[top] > 1e-12 * w[top[0]]]
    sb_pinv = sum(np.outer(v[:, j], v[:, j]) / w[j] for j in top)
    return np.trace(sw @ sb_pinv) / k


def ref_cdnv(x, y, k):
    x = np.asarray(x, np.float64)
    means = ref_class_means(x, y, k)
    var = [np.mean(np.sum((x[y == c] - means[c]) ** 2, axis=1)) for c in range(k)]
    vals = [(var[i] + var[j]) / (2 * np.sum((means[i] - means[j]) ** 2))
            for i in range(k) for j in range(i + 1, k)]
    return np.mean(vals)


def ref_rank(x, y, k, *, center=False):
    x = np.asarray(x, np.float64)
    out = []
    for c in range(k):
        h = x[y == c]
        if center:
            h = h - h.mean(axis=0)
        out.append(np.linalg.norm(h, "fro") ** 2 / np.linalg.norm(h, 2) ** 2)
    return np.mean(out)


BALANCED = (40, 40, 40, 40, 40)
UNBALANCED = (10, 80, 25, 150, 35)


# --------------------------------------------------------------------------
# NC1


@pytest.mark.parametrize("counts,dim", [(BALANCED, 12), (UNBALANCED, 12),
                                        (UNBALANCED, 3), ((30, 50, 20), 1)])
def test_nc1_matches_numpy(counts, dim):
    x, y, k = clusters(counts, dim)
    assert nc.nc1(x, y, k) == pytest.approx(ref_nc1(x, y, k), rel=1e-10)


def test_nc1_conventions_matter_for_unbalanced_classes():
    """The unbalanced case really pins the two documented choices."""
    x, y, k = clusters(UNBALANCED, 12)
    got = nc.nc1(x, y, k)
    assert abs(got / ref_nc1(x, y, k, pooled=False) - 1) > 1e-2
    assert abs(got / ref_nc1(x, y, k, center="samples") - 1) > 1e-2


def test_nc1_span_equals_direct_formula_wide_features():
    x, y, k = clusters((30, 20, 45, 25, 30, 50, 20, 30), 512, seed=3, spread=0.2)
    assert nc.nc1(x, y, k) == pytest.approx(ref_nc1(x, y, k), rel=1e-9)


def test_nc1_from_float32_features():
    x, y, k = clusters(UNBALANCED, 12, dtype=np.float32)
    assert nc.nc1(x, y, k) == pytest.approx(ref_nc1(x, y, k), rel=1e-10)


def test_nc1_zero_when_perfectly_collapsed():
    x, y, k = clusters(UNBALANCED, 12)
    collapsed = ref_class_means(x, y, k)[y]
    assert nc.nc1(collapsed, y, k) <= 1e-10
    assert nc.cdnv(collapsed, y, k) <= 1e-10
    assert nc.nc1(x, y, k) > 1e-2


def test_nc1_invariant_to_rotation_and_scale():
    x, y, k = clusters(UNBALANCED, 12, seed=1)
    q, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(12, 12)))
    base = nc.nc1(x, y, k)
    assert nc.nc1(x @ q, y, k) == pytest.approx(base, rel=1e-9)
    assert nc.nc1(7.3 * x, y, k) == pytest.approx(base, rel=1e-9)
    assert nc.nc1(x + 5.0, y, k) == pytest.approx(base, rel=1e-9)


def test_nc1_rank_cut_at_k_minus_1_without_tolerance():
    """Centring leaves a K-th direction of numerical noise; it must go."""
    x, y, k = clusters(UNBALANCED, 12, seed=11)
    assert nc.nc1(x, y, k, rtol=0.0) == pytest.approx(ref_nc1(x, y, k), rel=1e-10)


def test_nc1_pseudo_inverse_drops_missing_directions():
    """Collinear class means: Sigma_B has rank 1 < K - 1."""
    rng = np.random.default_rng(4)
    k, per = 4, 30
    y = np.repeat(np.arange(k), per)
    direction = np.array([1.0, 2.0, -1.0])
    x = np.arange(k)[y][:, None] * direction + rng.normal(size=(k * per, 3))
    means = ref_class_means(x, y, k)
    sw = sum(np.outer(h - means[c], h - means[c]) for h, c in zip(x, y)) / len(y)
    mc = means - means.mean(axis=0)
    sb = mc.T @ mc / k
    want = np.trace(sw @ np.linalg.pinv(sb, rcond=1e-10, hermitian=True)) / k
    assert nc.nc1(x, y, k) == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------
# CDNV


@pytest.mark.parametrize("counts,dim", [(BALANCED, 6), (UNBALANCED, 6), ((5, 9), 4)])
def test_cdnv_matches_numpy(counts, dim):
    x, y, k = clusters(counts, dim, seed=2)
    assert nc.cdnv(x, y, k) == pytest.approx(ref_cdnv(x, y, k), rel=1e-10)


def test_cdnv_hand_example():
    # class 0: (+-1, 0) around (0, 0), var 1; class 1: (3, +-2) around (3, 0),
    # var 4; squared distance 9: (1 + 4) / (2 * 9).
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [3.0, 2.0], [3.0, -2.0]])
    y = np.array([0, 0, 1, 1])
    assert nc.cdnv(x, y, 2) == pytest.approx(5 / 18, rel=1e-14)


# --------------------------------------------------------------------------
# Numerical rank


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("counts,dim", [(UNBALANCED, 8), ((12, 7, 30), 20)])
def test_numerical_rank_matches_numpy(counts, dim, center):
    x, y, k = clusters(counts, dim, seed=5, spread=1.0)
    want = ref_rank(x, y, k, center=center)
    assert nc.numerical_rank(x, y, k, center=center) == pytest.approx(want, rel=1e-8)
    stats = nc.class_stats(x, y, k, class_scatter=True)
    assert nc.numerical_rank_from_stats(stats, center=center) == pytest.approx(
        want, rel=1e-8)


def test_numerical_rank_rank_one_and_isotropic_classes():
    rng = np.random.default_rng(6)
    d = 8
    rank_one = np.outer(rng.normal(size=50), rng.normal(size=d))  # class 0
    iso = rng.normal(size=(4000, d))  # class 1: zero mean, identity covariance
    x = np.concatenate([rank_one, iso])
    y = np.repeat([0, 1], [50, 4000])
    r1 = nc.numerical_rank(x[y == 0], y[y == 0], 1)
    assert r1 == pytest.approx(1.0, abs=1e-10)
    r_iso = nc.numerical_rank(x[y == 1], y[y == 1] - 1, 1)
    assert 0.8 * d < r_iso <= d
    assert r_iso == pytest.approx(ref_rank(iso, np.zeros(4000, int), 1), rel=1e-8)
    assert nc.numerical_rank(x, y, 2) == pytest.approx((1 + r_iso) / 2, rel=1e-10)


# --------------------------------------------------------------------------
# Streaming


def batched(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def test_streaming_equals_in_memory():
    x, y, k = clusters(UNBALANCED, 10, seed=8, dtype=np.float32)
    whole = nc.class_stats(x, y, k, class_scatter=True)
    parts = batched(x, y, 17)  # ragged last batch
    streamed = nc.stream_class_stats(parts, k, class_scatter=True)
    for a, b in zip(whole, streamed):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    from_fn = nc.stream_class_stats(lambda: iter(parts[::-1]), k)
    assert nc.nc1_from_stats(from_fn) == pytest.approx(nc.nc1(x, y, k), rel=1e-10)
    got = nc.metrics_from_stats(streamed)
    want = nc.collapse_metrics(x, y, k)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-10), name
    assert want["nc1"] == pytest.approx(ref_nc1(x, y, k), rel=1e-10)


def test_streaming_compiles_once_per_shape():
    x, y, k = clusters((26, 26, 26), 13, seed=9, dtype=np.float32)
    before = (nc._mean_update._cache_size(), nc._scatter_update._cache_size())
    nc.stream_class_stats(batched(x, y, 13), k)  # six equal batches
    after = (nc._mean_update._cache_size(), nc._scatter_update._cache_size())
    assert after[0] - before[0] <= 1 and after[1] - before[1] <= 1
    assert jax.numpy.zeros(1).dtype == np.float32  # x64 stayed local


# --------------------------------------------------------------------------
# Validation


def _x_y():
    x, y, k = clusters((5, 6, 7), 4)
    return x, y, k


@pytest.mark.parametrize("mutate,match", [
    (lambda x, y: (x[:, :, None], y), "features must be"),
    (lambda x, y: (x, y[:-1]), "labels must be"),
    (lambda x, y: (x, y.astype(np.float32)), "integer"),
    (lambda x, y: (x, np.where(y == 2, 3, y)), "labels"),
    (lambda x, y: (x, np.where(y == 2, -1, y)), "labels"),
    (lambda x, y: (np.where(y[:, None] == 0, np.nan, x), y), "non-finite"),
])
def test_bad_inputs_raise(mutate, match):
    x, y, k = _x_y()
    bx, by = mutate(x, y)
    for fn in (nc.nc1, nc.cdnv, nc.numerical_rank):
        with pytest.raises(ValueError, match=match):
            fn(bx, by, k)


def test_degenerate_inputs_raise():
    x, y, k = _x_y()
    with pytest.raises(ValueError, match=r"classes \[3\] have no samples"):
        nc.nc1(x, y, 4)
    with pytest.raises(ValueError, match="num_classes"):
        nc.nc1(x[y == 0], y[y == 0], 1)
    same = np.zeros_like(x)
    with pytest.raises(ValueError, match="coincide"):
        nc.nc1(same, y, k)
    with pytest.raises(ValueError, match="identical means"):
        nc.cdnv(same, y, k)
    with pytest.raises(ValueError, match="class_scatter"):
        nc.numerical_rank_from_stats(nc.class_stats(x, y, k))


def test_streaming_rejects_one_shot_and_inconsistent_batches():
    x, y, k = _x_y()
    with pytest.raises(ValueError, match="re-iterable"):
        nc.stream_class_stats(iter(batched(x, y, 4)), k)
    with pytest.raises(ValueError, match="no batches"):
        nc.stream_class_stats([], k)
    calls = []

    def shrinking():
        calls.append(None)
        return batched(x, y, 4)[: 5 - len(calls)]

    with pytest.raises(ValueError, match="different class counts"):
        nc.stream_class_stats(shrinking, k)
    with pytest.raises(ValueError, match="width"):
        nc.stream_class_stats([(x, y), (x[:, :2], y)], k)


# --------------------------------------------------------------------------
# Layer-wise NC1


def _images(seed, k=3, per=8, size=8):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), per)
    base = rng.normal(size=(k, size, size, 3))
    x = base[y] + 0.5 * rng.normal(size=(len(y), size, size, 3))
    return x.astype(np.float32), y, k


def random_variables(module, x, *, seed=0):
    """Random-normal weights of ``module.init``'s structure; BN var = 1.

    Skips ``init`` itself, whose truncated-normal sampler takes seconds to
    compile on a CPU.
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name:
            return np.ones(leaf.shape, leaf.dtype) if "var" in name else \
                np.zeros(leaf.shape, leaf.dtype)
        fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("make", [
    lambda: ResNetTiny(),
    lambda: MLPBackbone(width=16, depth=3),
    lambda: Classifier(backbone=ResNetTiny(), head=LinearHead(3)),
])
def test_layerwise_nc1_matches_per_block_features(make):
    module = make()
    x, y, k = _images(10)
    variables = random_variables(module, x[:2])
    got = nc.layerwise_nc1(module, variables, batched(x, y, 8), k)
    bb = module.backbone if isinstance(module, Classifier) else module
    assert list(got) == [bb.block_name(i) for i in range(bb.num_blocks)]
    for s, name in enumerate(got, start=1):
        if isinstance(module, Classifier):
            h = module.apply(variables, x, split=s, method=Classifier.trunk)
        else:
            h = module.apply(variables, x, train=False, stop=s)
        z = np.asarray(h).reshape(len(y), -1, np.shape(h)[-1]).mean(axis=1)
        assert got[name] == pytest.approx(ref_nc1(z, y, k), rel=1e-5), name
