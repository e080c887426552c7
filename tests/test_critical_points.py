"""Critical points (Lemmas 2-3, Table 9) checked by brute force through
closed_form and real GD, never through the formulas under test."""

import jax
import numpy as np
import pytest

from theory import critical_points as cp
from theory import linear_model as lm

N, D, H = 10, 30, 50
GRID = np.linspace(-0.2, 1.2, 57)


def problem(seed=0, *, b=2.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D)) / np.sqrt(D)
    B0 = b * rng.normal(size=(H, D)) / np.sqrt(D)
    Y = rng.choice([-1.0, 1.0], size=N)
    direction = rng.normal(size=H)
    return X, B0, Y, direction


def heads(X, B0, Y, direction, norm, grid=GRID):
    """v0(a) with q0 = aY and ||v0|| = norm for every a (K0 fixed)."""
    return np.stack([lm.head_for_output(X, B0, a * Y, norm=norm,
                                        direction=direction) for a in grid])


def vertex(grid, values):
    """Brute force: vertex of the least-squares parabola through the grid
    values, after checking that the grid argmax is next to it."""
    c = np.polyfit(grid, values, 2)
    np.testing.assert_allclose(np.polyval(c, grid), values, rtol=1e-9,
                               atol=1e-9 * np.abs(values).max())
    top = -c[1] / (2 * c[0])
    assert abs(grid[np.argmax(values)] - top) <= grid[1] - grid[0]
    assert c[0] < 0                          # a maximum
    return top


def sweep(X, B0, Y, V, **time):
    return np.stack([lm.closed_form(X, B0, v, Y, **time)[0] for v in V])


@pytest.mark.parametrize("seed, norm", [(0, 3.0), (1, 2.5), (2, 6.0)])
def test_grid_argmax_of_traces_at_half_and_alpha(seed, norm):
    X, B0, Y, direction = problem(seed)
    V = heads(X, B0, Y, direction, norm)
    Bt = sweep(X, B0, Y, V)
    tr0t = np.einsum("hd,ahd->a", B0, Bt)
    trtt = np.einsum("ahd,ahd->a", Bt, Bt)
    assert abs(vertex(GRID, tr0t) - 0.5) < 1e-8                   # Lemma 2
    assert abs(vertex(GRID, trtt) - cp.alpha(X, B0, V[0], Y)) < 1e-8
    # The paper's K~ (head block) predicts a different maximum.
    assert abs(vertex(GRID, trtt)
               - cp.alpha(X, B0, V[0], Y, block="head")) > 0.02


def test_training_input_metrics_peak_at_half_and_alpha_features():
    X, B0, Y, direction = problem(3)
    X = X * np.linspace(0.5, 2.0, N)[:, None]    # rows of unequal norm
    V = heads(X, B0, Y, direction, 6.0)
    m = lm.feature_metrics(X, B0, sweep(X, B0, Y, V))
    assert abs(vertex(GRID, m.dot) - 0.5) < 1e-8
    a_f = cp.alpha_features(X, B0, V[0], Y)
    assert abs(vertex(GRID, m.norm_sq) - a_f) < 1e-8
    assert abs(a_f - cp.alpha(X, B0, V[0], Y)) > 5e-3   # they do differ
    # Euclidean change: a parabola with its minimum, zero, at q0 = Y.
    assert abs(vertex(GRID, -m.dist_sq) - 1.0) < 1e-8
    assert m.dist_sq[np.argmin(abs(GRID - 1.0))] < 1e-25


def test_alpha_at_finite_time():
    X, B0, Y, direction = problem(4)
    V = heads(X, B0, Y, direction, 3.0)
    lr = 0.9 / np.linalg.eigvalsh(lm.ntk(X, B0, V[0]))[-1]
    Bt = sweep(X, B0, Y, V, steps=5, lr=lr)
    trtt = np.einsum("ahd,ahd->a", Bt, Bt)
    got = cp.alpha(X, B0, V[0], Y, steps=5, lr=lr)
    assert abs(vertex(GRID, trtt) - got) < 1e-8
    assert abs(got - cp.alpha(X, B0, V[0], Y)) > 1e-3


def trace_of(X, B0, direction, norm, Y, which):
    """tr(B_t^T B_t) or tr(B0^T B_t) as a function of the full vector q0."""
    def f(q0):
        v0 = lm.head_for_output(X, B0, q0, norm=norm, direction=direction)
        Bt = lm.closed_form(X, B0, v0, Y)[0]
        return np.sum(Bt * Bt) if which == "tt" else np.sum(B0 * Bt)
    return f


def grad_fd(f, q, eps=1e-3):
    """Central differences: exact up to rounding for a quadratic."""
    e = np.eye(len(q))
    return np.array([(f(q + eps * e[i]) - f(q - eps * e[i])) / (2 * eps)
                     for i in range(len(q))])


def test_q_star_is_the_full_vector_maximum():
    X, B0, Y, direction = problem(5)
    norm = 8.0          # room for q0 off the ray at a fixed ||v0||
    v0 = lm.head_for_output(X, B0, 0.3 * Y, norm=norm, direction=direction)
    qs = cp.q_star(X, B0, v0, Y)
    f = trace_of(X, B0, direction, norm, Y, "tt")
    g = grad_fd(f, qs)
    assert np.abs(g).max() < 1e-7 * np.abs(grad_fd(f, 0 * qs)).max()
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert f(qs + 0.05 * rng.normal(size=N)) < f(qs)
    # Restricted to the ray q0 = aY, the maximum sits at alpha.
    a = cp.alpha(X, B0, v0, Y)
    ray = np.linspace(a - 0.01, a + 0.01, 3)
    vals = [f(t * Y) for t in ray]
    assert vals[1] > max(vals[0], vals[2])
    # Lemma 2 over the full vector: the gradient of tr(B0^T B_t) vanishes
    # at Y/2.
    f0 = trace_of(X, B0, direction, norm, Y, "0t")
    assert np.abs(grad_fd(f0, Y / 2)).max() < 1e-7 * np.abs(
        grad_fd(f0, 0 * Y)).max()


def test_backbone_block_bounds_and_limits():
    X, B0, Y, direction = problem(6)
    v0 = lm.head_for_output(X, B0, 0.2 * Y, norm=3.0, direction=direction)
    C1, C2 = cp.c_matrices(X, B0, v0)
    assert np.linalg.eigvalsh(C1 - C2)[0] > 0            # C2 <= C1
    assert np.linalg.eigvalsh(C2 - 2 * C1)[-1] < 0       # always a maximum
    assert 0 < cp.alpha(X, B0, v0, Y) < 0.5
    # Backbone much larger than the head: alpha -> 1/2 (the paper says 0).
    big_b = cp.alpha(X, 100 * B0, v0, Y)
    assert 0.49 < big_b < 0.5
    assert cp.alpha(X, 100 * B0, v0, Y, block="head") < 0.01
    # Head much larger than the backbone: alpha -> 0 (the paper says 1/2).
    big_v = cp.alpha(X, B0, 100 * v0, Y)
    assert 0 < big_v < 0.01
    assert cp.alpha(X, B0, 100 * v0, Y, block="head") > 0.49


@pytest.mark.parametrize("metric, inputs", [("features", "train"),
                                            ("trace", "pop")])
def test_gd_peaks_match_real_gd(x64, metric, inputs):
    """Real GD's dot/norm maxima leave 1/2 and alpha at every scale; the
    second-order prediction follows them, closer as the scale grows."""
    X, B1, Y, direction = problem(7)
    grid = np.linspace(0.0, 1.0, 11)
    errs = []
    for kappa in (1.0, 4.0):
        B0 = 1.5 * kappa * B1
        V = heads(X, B0, Y, direction, 3.0 * kappa, grid)
        lam = np.linalg.eigvalsh(lm.ntk(X, B0, V[0]))
        lr = 1.0 / lam[-1]
        steps = int(40 * lam[-1] / lam[0])
        Bt = np.asarray(jax.vmap(lambda v: lm.train_gd(
            X, B0, v, Y, lr=lr, steps=steps).B)(V))
        if inputs == "train":
            m = lm.feature_metrics(X, B0, Bt)
            dot, norm = m.dot, m.norm_sq
        else:
            dot = np.einsum("hd,ahd->a", B0, Bt)
            norm = np.einsum("ahd,ahd->a", Bt, Bt)
        # Real GD is not exactly quadratic in a: fit, do not require 1e-9.
        got = [-np.polyfit(grid, f, 2)[1] / (2 * np.polyfit(grid, f, 2)[0])
               for f in (dot, norm)]
        want = cp.gd_peaks(X, B0, V[0], Y, metric=metric, lr=lr)
        errs.append(np.abs(np.subtract(got, want)).max())
        assert abs(got[0] - 0.5) > 0.03          # not the closed form's 1/2
    assert errs[1] < errs[0] / 8 and errs[1] < 2e-3


def test_gradient_flow_norm_peaks_at_zero():
    """Flow + trace weight: tr(B_t^T B_t) - |B0|^2 = a1 (1 - a^2) (Eq. 28)."""
    X, B0, Y, direction = problem(8)
    v0 = lm.head_for_output(X, B0, 0.0 * Y, norm=3.0, direction=direction)
    a1, a2 = cp.ray_coefficients(X, B0, v0, Y)
    assert abs(2 * cp.gd_correction(X, B0, v0, Y) - (a1 - a2)) < 1e-12 * a1
    dot, norm = cp.gd_peaks(X, B0, v0, Y)
    assert abs(norm) < 1e-12 and abs(dot - a2 / (a1 + a2)) < 1e-12
    # a2/(a1 + a2) is exactly the paper's head-block formula for alpha.
    assert abs(dot - cp.alpha(X, B0, v0, Y, block="head")) < 1e-12
    # The small-step GD correction tends to the flow one.
    lam_max = np.linalg.eigvalsh(lm.ntk(X, B0, v0))[-1]
    m_flow = cp.gd_correction(X, B0, v0, Y)
    gaps = [abs(cp.gd_correction(X, B0, v0, Y, lr=s / lam_max) - m_flow)
            for s in (0.1, 0.01)]
    assert gaps[1] < gaps[0] / 5


def test_phase_table_matches_closed_form_directions():
    X, B0, Y, direction = problem(9)
    grid = np.linspace(0.0, 1.0, 401)
    V = heads(X, B0, Y, direction, 3.0, grid)
    m = lm.feature_metrics(X, B0, sweep(X, B0, Y, V))
    alpha_f = cp.alpha_features(X, B0, V[0], Y)
    phases = cp.phase_table(alpha_f)
    assert [p.label for p in phases] == ["Y -> Y/2", "Y/2 -> aY", "aY -> 0"]
    for ph in phases:
        i0 = np.argmin(abs(grid - ph.start))
        i1 = np.argmin(abs(grid - ph.end))
        for name in ("dist_sq", "dot", "norm_sq"):
            f = getattr(m, name)
            seen = "↑" if f[i1] > f[i0] else "↓"
            assert ph.directions[name] == seen, (ph.label, name)
    text = cp.format_phase_table(phases)
    assert text.count("\n") == 5 and "Y/2 -> aY" in text


def test_bad_input():
    X, B0, Y, direction = problem(10)
    v0 = lm.head_for_output(X, B0, 0.5 * Y, norm=3.0, direction=direction)
    with pytest.raises(ValueError, match="block"):
        cp.alpha(X, B0, v0, Y, block="tail")
    with pytest.raises(ValueError, match="metric"):
        cp.ray_coefficients(X, B0, v0, Y, metric="cosine")
    with pytest.raises(ValueError, match="Y must have shape"):
        cp.q_star(X, B0, v0, Y[:-1])
    with pytest.raises(ValueError, match="v0 contains NaN"):
        cp.alpha_features(X, B0, np.full(H, np.nan), Y)
    with pytest.raises(ValueError, match="alpha_value"):
        cp.phase_table(0.7)
    with pytest.raises(ValueError, match="lr"):
        cp.gd_peaks(X, B0, v0, Y, lr=1e9)
