"""theory.linear_model against explicit Jacobians, numpy GD loops and the
linearised model (float64 throughout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory import linear_model as lm

N, D, H = 8, 20, 30


def problem(seed=0, *, n=N, d=D, h=H, b=2.0, v=1.5):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) / np.sqrt(d)
    B0 = b * rng.normal(size=(h, d)) / np.sqrt(d)
    v0 = v * rng.normal(size=h) / np.sqrt(h)
    Y = rng.choice([-1.0, 1.0], size=n)
    return X, B0, v0, Y


def jacobians(X, B, v):
    """(grad_B q as (N, h*d), grad_v q as (N, h)) by jax.jacrev."""
    def q(B, v):
        return X @ (B.T @ v)
    JB, Jv = jax.jacrev(q, argnums=(0, 1))(jnp.asarray(B), jnp.asarray(v))
    return np.asarray(JB).reshape(len(X), -1), np.asarray(Jv)


def numpy_gd(X, B, v, Y, lr, steps, *, head_only=False):
    for _ in range(steps):
        r = X @ B.T @ v - Y
        gB = np.outer(v, X.T @ r)
        gv = B @ X.T @ r
        B, v = (B if head_only else B - lr * gB), v - lr * gv
    return B, v


def rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b)


# --------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------

def test_ntk_blocks_equal_explicit_jacobian_products(x64):
    X, B0, v0, _ = problem()
    JB, Jv = jacobians(X, B0, v0)
    np.testing.assert_allclose(lm.ntk(X, B0, v0, block="head"), Jv @ Jv.T,
                               rtol=1e-12)
    np.testing.assert_allclose(lm.ntk(X, B0, v0, block="backbone"),
                               JB @ JB.T, rtol=1e-12)
    J = np.concatenate([JB, Jv], axis=1)
    np.testing.assert_allclose(lm.ntk(X, B0, v0), J @ J.T, rtol=1e-12)
    # Lemma 1: grad_b q0 . vec(B0) = q0 (row-major vec, as jacrev lays out).
    np.testing.assert_allclose(JB @ B0.ravel(), X @ B0.T @ v0, rtol=1e-12)


# --------------------------------------------------------------------------
# closed form vs GD on the linearised and on the real model
# --------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 37, 400])
def test_closed_form_equals_linearised_gd(x64, steps):
    X, B0, v0, Y = problem(1)
    lr = 1.0 / np.linalg.eigvalsh(lm.ntk(X, B0, v0))[-1]
    Bt, vt = lm.closed_form(X, B0, v0, Y, steps=steps, lr=lr)
    run = lm.train_linearised_gd(X, B0, v0, Y, lr=lr, steps=steps)
    assert run.B.dtype == jnp.float64
    # Compare the changes, the strict test (B itself is dominated by B0).
    assert rel(np.asarray(run.B) - B0, Bt - B0) <= 1e-8
    assert rel(np.asarray(run.v) - v0, vt - v0) <= 1e-8


def test_closed_form_limit_and_rank_one_change(x64):
    X, B0, v0, Y = problem(2)
    lam = np.linalg.eigvalsh(lm.ntk(X, B0, v0))
    lr = 1.0 / lam[-1]
    steps = int(60 * lam[-1] / lam[0])     # (1 - lam0/lam1)^steps ~ e^-60
    Binf, vinf = lm.closed_form(X, B0, v0, Y)
    run = lm.train_linearised_gd(X, B0, v0, Y, lr=lr, steps=steps)
    assert rel(np.asarray(run.B) - B0, Binf - B0) <= 1e-8
    # The t -> infinity solution interpolates the targets (linearised).
    q_lin = X @ B0.T @ v0 + X @ (Binf - B0).T @ v0 + X @ B0.T @ (vinf - v0)
    np.testing.assert_allclose(q_lin, Y, atol=1e-10)
    # B_t - B0 is rank one along v0 (Eq. 31: row n of grad_B q is v0 x_n^T).
    U, s, _ = np.linalg.svd(Binf - B0)
    assert s[1] <= 1e-12 * s[0]
    assert abs(abs(U[:, 0] @ v0) / np.linalg.norm(v0) - 1) <= 1e-12


def test_flow_is_the_small_step_limit_of_gd(x64):
    X, B0, v0, Y = problem(3)
    lam_max = np.linalg.eigvalsh(lm.ntk(X, B0, v0))[-1]
    time = 3.0 / lam_max
    Bf, _ = lm.closed_form(X, B0, v0, Y, flow_time=time)
    errs = []
    for k in (10, 40, 160):
        lr = time / k
        Bk, _ = lm.closed_form(X, B0, v0, Y, steps=k, lr=lr)
        errs.append(rel(Bk - B0, Bf - B0))
    assert errs[0] > 3 * errs[1] > 9 * errs[2]       # first order in lr
    # Flow for a long time reaches the t -> infinity solution.
    Binf, _ = lm.closed_form(X, B0, v0, Y)
    Blong, _ = lm.closed_form(X, B0, v0, Y, flow_time=1e4 / lam_max)
    assert rel(Blong - B0, Binf - B0) <= 1e-10


def test_train_gd_matches_numpy_loop(x64):
    X, B0, v0, Y = problem(4)
    lr = 0.5 / np.linalg.eigvalsh(lm.ntk(X, B0, v0))[-1]
    run = lm.train_gd(X, B0, v0, Y, lr=lr, steps=25)
    Bn, vn = numpy_gd(X, B0, v0, Y, lr, 25)
    np.testing.assert_allclose(run.B, Bn, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(run.v, vn, rtol=1e-12, atol=1e-14)
    r0 = X @ B0.T @ v0 - Y
    np.testing.assert_allclose(run.losses[0], 0.5 * r0 @ r0, rtol=1e-13)
    assert np.all(np.diff(np.asarray(run.losses)) < 0)


def test_train_head_gd_freezes_backbone(x64):
    X, B0, v0, Y = problem(5)
    lr = 0.5 / np.linalg.eigvalsh(lm.ntk(X, B0, v0, block="head"))[-1]
    run = lm.train_head_gd(X, B0, v0, Y, lr=lr, steps=30)
    assert np.array_equal(np.asarray(run.B), B0)
    _, vn = numpy_gd(X, B0, v0, Y, lr, 30, head_only=True)
    np.testing.assert_allclose(run.v, vn, rtol=1e-12, atol=1e-14)


def test_gd_is_vmappable_and_does_not_retrace(x64):
    X, B0, v0, Y = problem(6)
    lr = 0.5 / np.linalg.eigvalsh(lm.ntk(X, B0, v0))[-1]
    V = np.stack([v0, 2 * v0, -v0])
    batched = jax.vmap(lambda v: lm.train_gd(X, B0, v, Y, lr=lr,
                                             steps=7).B)(V)
    for i, v in enumerate(V):
        np.testing.assert_allclose(batched[i], numpy_gd(X, B0, v, Y, lr,
                                                        7)[0], rtol=1e-12)
    lm.train_gd(X, B0, v0, Y, lr=lr, steps=7)
    size = lm._gd._cache_size()
    lm.train_gd(X, B0, 3 * v0, Y, lr=0.5 * lr, steps=7)
    assert lm._gd._cache_size() == size


def test_gradient_flow_conservation_law(x64):
    """Eq. 28: v v^T - B B^T is conserved by gradient flow; GD drifts O(lr)."""
    X, B0, v0, Y = problem(7)
    lam_max = np.linalg.eigvalsh(lm.ntk(X, B0, v0))[-1]
    c0 = np.outer(v0, v0) - B0 @ B0.T
    drifts = []
    for k in (1, 4):
        run = lm.train_gd(X, B0, v0, Y, lr=0.4 / (k * lam_max),
                          steps=100 * k)
        B, v = np.asarray(run.B), np.asarray(run.v)
        drifts.append(np.linalg.norm(np.outer(v, v) - B @ B.T - c0))
    assert drifts[1] < drifts[0] / 3


def test_real_gd_approaches_closed_form_as_scale_grows(x64):
    """Lazy regime: scale B0 and the null-space part of v0 by kappa, keep
    q0 and the step count fixed; the relative error falls like 1/kappa^2."""
    X, B1, _, Y = problem(8)
    direction = np.random.default_rng(0).normal(size=H)
    errs = []
    for kappa in (1.0, 4.0, 16.0):
        B0 = kappa * B1
        v0 = lm.head_for_output(X, B0, 0.3 * Y, norm=kappa,
                                direction=direction)
        lr = 1.0 / np.linalg.eigvalsh(lm.ntk(X, B0, v0))[-1]
        Bt, _ = lm.closed_form(X, B0, v0, Y, steps=300, lr=lr)
        run = lm.train_gd(X, B0, v0, Y, lr=lr, steps=300)
        errs.append(rel(np.asarray(run.B) - B0, Bt - B0))
    # Measured: 0.26, 0.031, 0.0019 (x16 per x4 in kappa once lazy).
    assert errs[1] < errs[0] / 6
    assert errs[2] < errs[1] / 12
    assert errs[2] < 1e-2


# --------------------------------------------------------------------------
# feature metrics and heads
# --------------------------------------------------------------------------

def test_feature_metrics_match_a_per_sample_loop():
    X, B0, _, _ = problem(9)
    rng = np.random.default_rng(1)
    Bts = B0 + 0.3 * rng.normal(size=(2, 3) + B0.shape)
    got = lm.feature_metrics(X, B0, Bts)
    assert got.cos.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            rows = []
            for x in X:
                z0, zt = B0 @ x, Bts[i, j] @ x
                rows.append([np.sum((zt - z0) ** 2), zt @ zt, zt @ z0,
                             zt @ z0 / np.linalg.norm(zt)
                             / np.linalg.norm(z0)])
            want = np.mean(rows, axis=0)
            np.testing.assert_allclose(
                [got.dist_sq[i, j], got.norm_sq[i, j], got.dot[i, j],
                 got.cos[i, j]], want, rtol=1e-12)
    single = lm.feature_metrics(X, B0, B0)
    assert single.dist_sq == 0.0 and abs(single.cos - 1) < 1e-15


def test_head_for_output_hits_q0_with_fixed_norm():
    X, B0, _, Y = problem(10)
    direction = np.random.default_rng(2).normal(size=H)
    for a in (-0.2, 0.0, 0.7, 1.2):
        v0 = lm.head_for_output(X, B0, a * Y, norm=5.0, direction=direction)
        np.testing.assert_allclose(X @ B0.T @ v0, a * Y, atol=1e-12)
        assert abs(np.linalg.norm(v0) - 5.0) < 1e-12
    with pytest.raises(ValueError, match="norm"):
        lm.head_for_output(X, B0, Y, norm=1e-3, direction=direction)


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------

@pytest.mark.parametrize("which, bad, match", [
    ("X", np.zeros((N, D + 1)), "B0"),
    ("B0", np.zeros((H, D, 1)), "B0"),
    ("v0", np.zeros(H + 1), "v0"),
    ("Y", np.zeros(N + 2), "Y"),
    ("Y", np.full(N, np.nan), "Y contains NaN"),
    ("X", np.full((N, D), np.inf), "X contains NaN"),
])
def test_closed_form_rejects_bad_input(which, bad, match):
    args = dict(zip(("X", "B0", "v0", "Y"), problem(11)))
    args[which] = bad
    with pytest.raises(ValueError, match=match):
        lm.closed_form(args["X"], args["B0"], args["v0"], args["Y"])


def test_singular_and_ill_conditioned_kernels():
    X, B0, v0, Y = problem(12)
    wide = problem(12, n=D + 1)
    with pytest.raises(ValueError, match="N=21 > d=20"):
        lm.closed_form(*wide)
    Xdup = X.copy()
    Xdup[1] = Xdup[0]                           # rank-deficient X
    with pytest.raises(ValueError, match="singular"):
        lm.closed_form(Xdup, B0, v0, Y)
    Xnear = X.copy()
    Xnear[1] = Xnear[0] + 1e-4 * Xnear[1]    # cond(K0) ~ 1e9
    with pytest.warns(lm.IllConditionedKernelWarning,
                      match="condition number"):
        lm.closed_form(Xnear, B0, v0, Y)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=3), "lr"),
    (dict(steps=3, lr=0.1, flow_time=1.0), "not both"),
    (dict(steps=-1, lr=0.1), "steps"),
    (dict(steps=2, lr=-0.1), "lr"),
    (dict(flow_time=float("nan")), "flow_time"),
    (dict(steps=2, lr=1e6), "diverges"),
])
def test_closed_form_rejects_bad_time(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lm.closed_form(*problem(13), **kwargs)


def test_ntk_and_gd_reject_bad_input(x64):
    X, B0, v0, Y = problem(14)
    with pytest.raises(ValueError, match="block"):
        lm.ntk(X, B0, v0, block="neck")
    with pytest.raises(ValueError, match="v must have shape"):
        lm.ntk(X, B0, v0[:-1])
    with pytest.raises(ValueError, match="Y must have shape"):
        lm.train_gd(X, B0, v0, Y[:-1], lr=0.1, steps=2)
    with pytest.raises(ValueError, match="v0 contains NaN"):
        lm.train_linearised_gd(X, B0, np.full(H, np.nan), Y, lr=0.1,
                               steps=2)
    with pytest.raises(ValueError, match="lr"):
        lm.train_head_gd(X, B0, v0, Y, lr=0.0, steps=2)
    with pytest.raises(ValueError, match="Bt must have shape"):
        lm.feature_metrics(X, B0, B0[:-1])
