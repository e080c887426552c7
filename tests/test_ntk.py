"""theory.ntk against explicit float64 Jacobians J₁J₂ᵀ (Eq. 2, footnote 2, Fig. 6).

The reference differentiates the *batched* model with respect to the flat
parameter vector (``jax.jacrev`` of ``ravel_pytree``), in float64, and
contracts in numpy; it shares no code with the methods under test.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from hpft_jax.models import MLPBackbone, ResNetTiny
from theory import ntk_contract, ntk_factors
from theory.ntk import auto_tile, empirical_ntk_fn, make_drift_fn, ntk_drift

METHODS = ["auto", "structured", "vjp_jvp", "jacobian"]


def _tol(dtype):
    return 2e-5 if jnp.dtype(dtype) == jnp.float32 else 1e-11


@functools.partial(jax.jit, static_argnums=0)
def _batched_jacobian(f, params, x):
    """(n, h, P): d f(params, x) / d ravel(params), for the whole batch at once."""
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    flat, unravel = ravel_pytree(params)
    return jax.jacrev(lambda th: f(unravel(th), x.astype(jnp.float64)))(flat)


def reference_ntk(f, params, x1, x2=None):
    """float64 (n1, n2, h, h) from explicit Jacobians of the batched model.

    ``f`` must compute in the dtype of its inputs (the models below are
    rebuilt with dtype=float64 for this).
    """
    with jax.enable_x64(True):
        j1 = np.asarray(_batched_jacobian(f, params, x1))
        j2 = j1 if x2 is None else np.asarray(_batched_jacobian(f, params, x2))
    return np.einsum("icp,jdp->ijcd", j1, j2)


def assert_close(got, want, dtype):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = np.max(np.abs(want))
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=_tol(dtype) * scale)


# --------------------------------------------------------------------------
# Models


# Each factory returns (f, params, x, f64): f64 is the same model computing
# in float64, for the reference. Variables are drawn with numpy from the
# shapes Flax reports (jax.eval_shape): compiling a jitted init takes ~10 s
# of CPU here, far more than the NTKs under test.


def _init(model, x, seed):
    """Random variables of ``model``'s shapes: N(0, 1/fan_in) weights, nonzero
    biases/scales, running statistics as after training."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']"):
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        scale = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.3
        base = 1.0 if name.endswith("['scale']") else 0.0
        return (base + scale * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _np_map(fn, tree):
    """tree_map on the host (eager jnp ops each compile a kernel)."""
    return jax.tree.map(lambda a: jnp.asarray(fn(np.asarray(a))), tree)


def _cached(factory):
    """Cache a factory; its arrays carry explicit dtypes, so x64 mode is moot."""
    return functools.lru_cache(maxsize=None)(factory)


def _x(shape, seed, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@_cached
def mlp(dtype=jnp.float32, width=6, depth=3, n=5, d=(2, 4), seed=0):
    model = MLPBackbone(width=width, depth=depth, dtype=dtype)
    m64 = MLPBackbone(width=width, depth=depth, dtype=jnp.float64)
    x = _x((n,) + d, seed + 1, dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), _init(model, x, seed)["params"])
    return ((lambda p, x: model.apply({"params": p}, x)), params, x,
            (lambda p, x: m64.apply({"params": p}, x)))


class SmallCNN(nn.Module):
    """Conv rules under several paddings, strides and dilations, an eval-mode
    BatchNorm (leaves without a rule), then Dense per pixel and on vectors."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = dict(dtype=self.dtype, param_dtype=self.dtype)
        x = nn.relu(nn.Conv(3, (3, 3), strides=2, padding="SAME", **c)(x))
        x = nn.Conv(4, (2, 2), padding="VALID", use_bias=False, **c)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, **c)(x))
        x = nn.tanh(nn.Conv(4, (3, 3), padding="CIRCULAR", kernel_dilation=2, **c)(x))
        x = nn.Dense(5, **c)(x)          # Dense applied per pixel: P > 1
        return nn.Dense(4, **c)(x.reshape(x.shape[0], -1))


@_cached
def cnn(dtype=jnp.float32, n=4):
    model, m64 = SmallCNN(dtype=dtype), SmallCNN(dtype=jnp.float64)
    x = _x((n, 7, 7, 2), 3, dtype)
    v = jax.tree.map(lambda a: jnp.asarray(a, dtype), _init(model, x, 4))
    bs = v["batch_stats"]
    return ((lambda p, x: model.apply({"params": p, "batch_stats": bs}, x)), v["params"], x,
            (lambda p, x: m64.apply(
                {"params": p, "batch_stats": jax.tree.map(
                    lambda a: a.astype(jnp.float64), bs)}, x)))


@_cached
def resnet(n=3):
    model, m64 = ResNetTiny(width=4), ResNetTiny(width=4, dtype=jnp.float64)
    x = _x((n, 6, 6, 3), 5)
    v = jax.tree.map(jnp.asarray, _init(model, x, 6))
    bs = v["batch_stats"]

    def f64(p, x):
        bs64 = jax.tree.map(lambda a: a.astype(jnp.float64), bs)
        return m64.apply({"params": p, "batch_stats": bs64}, x, train=False)

    return (lambda p, x: model.apply({"params": p, "batch_stats": bs}, x, train=False),
            v["params"], x, f64)


# --------------------------------------------------------------------------
# Agreement with J₁J₂ᵀ


@pytest.mark.parametrize("method, dtype", [(m, jnp.float32) for m in METHODS]
                         + [("structured", jnp.float64)])
def test_mlp_matches_explicit_jacobians(x64, method, dtype):
    f, params, x, f64 = mlp(dtype)
    got = empirical_ntk_fn(f, method=method)(params, x)
    assert got.dtype == dtype and got.shape == (5, 5, 6, 6)
    want = reference_ntk(f64, params, x)
    assert_close(got, want, dtype)
    if dtype == jnp.float32:      # true trace, not the mean
        tr = empirical_ntk_fn(f, method=method, trace=True)(params, x)
        assert_close(tr, np.trace(want, axis1=2, axis2=3), dtype)


MODELS = {"cnn": cnn, "resnet": resnet}


@functools.lru_cache(maxsize=None)
def kernel_of(model: str, method: str, trace: bool = False) -> np.ndarray:
    """One compile per (model, method, trace), shared by the tests below."""
    f, params, x, _ = MODELS[model]()
    return np.asarray(empirical_ntk_fn(f, method=method, trace=trace)(params, x))


@pytest.mark.parametrize("model, method", [("cnn", "structured"), ("cnn", "vjp_jvp"),
                                           ("resnet", "structured")])
def test_cnn_matches_explicit_jacobians(x64, model, method):
    _, params, x, f64 = MODELS[model]()
    assert_close(kernel_of(model, method), reference_ntk(f64, params, x), jnp.float32)


def test_cnn_float64(x64):
    f, params, x, _ = cnn(jnp.float64)
    assert_close(empirical_ntk_fn(f)(params, x), reference_ntk(f, params, x), jnp.float64)


@pytest.mark.parametrize("form", ["gram", "jac"])
def test_both_conv_contraction_orders_are_exact(x64, form):
    """Force every layer into one exact order of (*) and compare."""
    f, params, x, f64 = cnn()
    plan = ntk_factors.discover(f, params, x[0], n_samples=x.shape[0])
    assert {l.kind for l in plan.layers} == {"conv", "dense"}
    assert max(l.n_pos for l in plan.layers) > 1 and len(plan.fallback) == 2  # BN
    plan = dataclasses.replace(
        plan, layers=tuple(dataclasses.replace(l, form=form) for l in plan.layers))

    @jax.jit
    def full(params, x):
        fac = ntk_factors.batch_factors(plan, f, params, x, chunk_size=None,
                                        out_chunk_size=None)
        return ntk_contract.kernel(fac, None, trace=False, chunk_size=None)

    assert_close(full(params, x), reference_ntk(f64, params, x), jnp.float32)


@pytest.mark.parametrize("method, cs, ocs", [("structured", None, None),
                                             ("structured", 3, 4), ("vjp_jvp", 2, 5)])
def test_cross_kernel_chunked_and_padded(x64, method, cs, ocs):
    """x2 given; sample and output chunks that do not divide n or h."""
    f, params, x1, f64 = mlp(n=7)
    x2 = x1[:4] * 0.5 + 0.1
    got = empirical_ntk_fn(f, method=method, chunk_size=cs, out_chunk_size=ocs)(
        params, x1, x2)
    assert got.shape == (7, 4, 6, 6)
    assert_close(got, reference_ntk(f64, params, x1, x2), jnp.float32)


@pytest.mark.parametrize("cs", [1, 4])
def test_symmetric_tiles(x64, cs):
    f, params, x, f64 = mlp(n=9)
    assert_close(empirical_ntk_fn(f, chunk_size=cs)(params, x),
                 reference_ntk(f64, params, x), jnp.float32)


# --------------------------------------------------------------------------
# Structure


@pytest.mark.parametrize("method", ["structured", "vjp_jvp"])
def test_symmetric_psd_and_true_trace(method):
    """(The trace of every method is also checked on the MLP above.)"""
    k = kernel_of("cnn", method).astype(np.float64)
    n, _, h, _ = k.shape
    mat = k.transpose(0, 2, 1, 3).reshape(n * h, n * h)
    np.testing.assert_allclose(mat, mat.T, atol=1e-5 * np.abs(mat).max())
    assert np.linalg.eigvalsh((mat + mat.T) / 2).min() > -1e-5 * np.abs(mat).max()
    if method == "structured":
        tr = kernel_of("cnn", method, trace=True)
        assert tr.shape == (n, n)
        np.testing.assert_allclose(tr, np.trace(k, axis1=2, axis2=3), rtol=0,
                                   atol=2e-5 * np.abs(tr).max())


def test_linear_backbone_footnote_2(x64):
    """z = Bx: κ(x_j, x_n) = x_jᵀx_n·I, through the Dense rule and through a
    plain (non-Flax) function; with a bias it is (x_jᵀx_n + 1)·I."""
    x = _x((4, 5), 0)
    gram = np.asarray(x, np.float64) @ np.asarray(x, np.float64).T
    eye = np.eye(3)
    for use_bias in (False, True):
        dense = nn.Dense(3, use_bias=use_bias)
        p = jax.tree.map(jnp.asarray, _init(dense, x, 1)["params"])
        f = lambda p, x: dense.apply({"params": p}, x)  # noqa: E731
        plan = ntk_factors.discover(f, p, x[0], n_samples=4)
        assert plan.fallback == () and len(plan.layers) == 1
        want = (gram + use_bias)[:, :, None, None] * eye
        assert_close(empirical_ntk_fn(f)(p, x), want, jnp.float32)
    b = _x((3, 5), 2)
    plain = lambda p, x: x @ p["B"].T  # noqa: E731
    for method in METHODS:
        got = empirical_ntk_fn(plain, method=method)({"B": b}, x)
        assert_close(got, gram[:, :, None, None] * eye, jnp.float32)


def test_leaf_coverage_and_wrapped_params():
    """Rules cover every conv kernel, BatchNorm leaves fall back; params may be
    nested inside a bigger tree by f (matching is by identity, not by path)."""
    f, params, x, _ = resnet()
    plan = ntk_factors.discover(f, params, x[0], n_samples=3)
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]
    covered = {l.kernel for l in plan.layers} | {l.bias for l in plan.layers} - {None}
    assert covered | set(plan.fallback) == set(range(len(paths)))
    assert not covered & set(plan.fallback)
    assert all("kernel" in paths[l.kernel] for l in plan.layers)
    assert all(("scale" in paths[k]) or ("bias" in paths[k]) for k in plan.fallback)
    assert all("BatchNorm" in paths[k] or "bn" in paths[k] for k in plan.fallback)

    model = MLPBackbone(width=4, depth=2)
    xm = jnp.ones((2, 3))
    pm = jax.tree.map(jnp.asarray, _init(model, xm, 0)["params"])
    head = {"kernel": jnp.ones((4, 2))}
    wrapped = lambda p, x: (model.apply({"params": p}, x) @ head["kernel"])  # noqa: E731
    plan = ntk_factors.discover(wrapped, pm, xm[0], n_samples=2)
    assert plan.rule_fraction == 1.0


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(4)
        return d(nn.relu(d(x)))


def test_shared_weights_fall_back_exactly(x64):
    model = Shared()
    x = _x((3, 4), 0)
    p = jax.tree.map(jnp.asarray, _init(model, x, 1)["params"])
    f = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    plan = ntk_factors.discover(f, p, x[0], n_samples=3)
    assert plan.layers == () and len(plan.fallback) == 2
    for method in ["structured", "auto"]:
        assert_close(empirical_ntk_fn(f, method=method)(p, x),
                     reference_ntk(f, p, x), jnp.float32)


def test_no_retrace_between_calls():
    traces = []
    model = MLPBackbone(width=4, depth=2)

    def f(p, x):
        traces.append(1)
        return model.apply({"params": p}, x)

    x = jnp.ones((3, 5))
    p = jax.tree.map(jnp.asarray, _init(model, x, 0)["params"])
    ntk = empirical_ntk_fn(f)
    ntk(p, x)
    n = len(traces)
    ntk(_np_map(lambda a: a + 1.0, p), jnp.asarray(np.asarray(x) + 1.0))
    assert len(traces) == n


def test_auto_tile():
    assert auto_tile(1) == 1 and auto_tile(12) == 12
    assert auto_tile(50) == 10 and auto_tile(64) == 8


# --------------------------------------------------------------------------
# Drift (Fig. 6)


def _drift_reference(f64, p_t, p_n, x):
    kt = reference_ntk(f64, p_t, x)
    kn = reference_ntk(f64, p_n, x)
    fro = lambda k: np.sqrt((k ** 2).sum(axis=(2, 3))).mean()  # noqa: E731
    return fro(kt), fro(kn), fro(kn - kt)


@pytest.mark.parametrize("cs", [None, 3])
def test_drift_matches_full_kernels(x64, cs):
    f, p_t, x, f64 = mlp(n=7)
    rng = np.random.default_rng(0)
    p_n = jax.tree.map(lambda a: jnp.asarray(
        np.asarray(a) + 1e-3 * rng.standard_normal(a.shape).astype(np.float32)), p_t)
    want = _drift_reference(f64, p_t, p_n, x)
    out = make_drift_fn(f, x, chunk_size=cs)(p_t, p_n)
    got = (out["k_norm"], out["k_norm_next"], out["k_gap"])
    assert 0 < want[2] < 0.01 * want[0]         # a small move, as in FT
    np.testing.assert_allclose(got[:2], want[:2], rtol=1e-5)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4)


def test_drift_with_fallback_leaves_and_sequence(x64):
    f, p0, x, f64 = cnn()
    seq = [_np_map(lambda a: a * np.float32(1 + 0.02 * k), p0) for k in range(3)]
    out = ntk_drift(f, seq, x, chunk_size=2)
    assert out["k_norm"].shape == (3,) and out["k_gap"].shape == (2,)
    for t in range(2):
        kn, _, kg = _drift_reference(f64, seq[t], seq[t + 1], x)
        np.testing.assert_allclose([out["k_norm"][t], out["k_gap"][t]], [kn, kg],
                                   rtol=5e-5)
    np.testing.assert_allclose(out["k_norm"][2], _drift_reference(f64, seq[2], seq[2], x)[0],
                               rtol=5e-5)
    one = ntk_drift(f, seq[:1], x)
    assert one["k_norm"].shape == (1,) and one["k_gap"].shape == (0,)


def test_drift_gap_is_exact_for_tiny_moves(x64):
    """k_gap from the difference stays accurate where the expansion
    ‖A‖² + ‖B‖² − 2⟨A, B⟩ would lose it to float32 cancellation."""
    f, p_t, x, f64 = mlp(n=4)
    p_n = _np_map(lambda a: a * np.float32(1 + 1e-4), p_t)
    want = _drift_reference(f64, p_t, p_n, x)
    got = make_drift_fn(f, x)(p_t, p_n)["k_gap"]
    np.testing.assert_allclose(got, want[2], rtol=1e-2)


# --------------------------------------------------------------------------
# Bad input


def test_bad_input_names_the_argument():
    f, params, x, _ = mlp()
    cases = [
        (lambda: empirical_ntk_fn(f, method="naive"), "method"),
        (lambda: empirical_ntk_fn(f, trace="yes"), "trace"),
        (lambda: empirical_ntk_fn(f, chunk_size=0), "chunk_size"),
        (lambda: empirical_ntk_fn(f, out_chunk_size=2.5), "out_chunk_size"),
        (lambda: empirical_ntk_fn("f"), "f"),
        (lambda: empirical_ntk_fn(f)(params, x, x[:, :1]), "x2"),
        (lambda: empirical_ntk_fn(f)(params, x.at[0, 0, 0].set(jnp.nan)), "x1"),
        (lambda: empirical_ntk_fn(f)(params, jnp.zeros((0, 2, 4))), "x1"),
        (lambda: empirical_ntk_fn(lambda p, x: f(p, x)[:, :, None])(params, x), "f"),
        (lambda: empirical_ntk_fn(f)({"a": jnp.ones(3, jnp.int32)}, x), "params"),
        (lambda: make_drift_fn(f, x.at[1].set(jnp.inf)), "x_probe"),
        (lambda: ntk_drift(f, [], x), "params_seq"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
