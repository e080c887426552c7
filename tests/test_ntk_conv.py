"""eNTK on convolutions (issue 15): every form and schedule against float64
``jax.jacrev`` of the batched model (flat parameter vector, numpy
contraction), plus the cost model's and the budget scheduler's numbers.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from hpft_jax.models import ResNetTiny
from theory import ntk_budget, ntk_cost, ntk_factors
from theory.ntk import empirical_ntk_fn, make_drift_fn, ntk_drift

TOL32 = 2e-5


@functools.partial(jax.jit, static_argnums=0)
def _jac64(f, params, x):
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    flat, unravel = ravel_pytree(params)
    return jax.jacrev(lambda th: f(unravel(th), x.astype(jnp.float64)))(flat)


def reference(f64, params, x1, x2=None):
    """float64 (n1, n2, h, h) = J₁J₂ᵀ from jacrev of the batched model."""
    with jax.enable_x64(True):
        j1 = np.asarray(_jac64(f64, params, x1))
        j2 = j1 if x2 is None else np.asarray(_jac64(f64, params, x2))
    return np.einsum("icp,jdp->ijcd", j1, j2)


def close(got, want, tol=TOL32):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = np.max(np.abs(want))
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


class ConvZoo(nn.Module):
    """Stride, SAME/VALID/explicit padding, kernel and input dilation, a
    grouped conv (no rule: explicit Jacobian), eval-mode BatchNorm, Dense."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = dict(dtype=self.dtype, param_dtype=self.dtype)
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME", **c)(x))
        x = nn.Conv(4, (2, 2), padding=[(1, 0), (0, 2)], kernel_dilation=2,
                    use_bias=False, **c)(x)
        x = nn.BatchNorm(use_running_average=True, **c)(x)
        x = nn.Conv(4, (3, 3), padding=[(0, 1), (1, 1)], input_dilation=(2, 1), **c)(jnp.tanh(x))
        x = nn.Conv(4, (1, 1), feature_group_count=2, **c)(x)
        return nn.Dense(3, **c)(jnp.mean(nn.relu(x), axis=(1, 2)))


def _draw(shapes, seed):
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']"):
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        scale = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.3
        return ((1.0 if name.endswith("['scale']") else 0.0)
                + scale * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def zoo(n=4):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((n, 7, 6, 2)), jnp.float32)
    m, m64 = ConvZoo(), ConvZoo(jnp.float64)
    v = _draw(jax.eval_shape(m.init, jax.random.key(0), x), 0)
    bs = v["batch_stats"]
    f = lambda p, x: m.apply({"params": p, "batch_stats": bs}, x)  # noqa: E731
    bs64 = jax.tree.map(lambda a: np.asarray(a, np.float64), bs)
    f64 = lambda p, x: m64.apply({"params": p, "batch_stats": bs64}, x)  # noqa: E731
    params = jax.tree.map(jnp.asarray, v["params"])
    return f, params, x, f64


@functools.lru_cache(maxsize=None)
def zoo_ref():
    f, params, x, f64 = zoo()
    return reference(f64, params, x)


def _budget_for(f, params, x, units, *, kind, sets=1, trace=False):
    """A memory_budget under which the scheduler holds about ``units`` outputs."""
    plan = ntk_factors.discover(f, params, x[0], n_samples=x.shape[0], trace=trace)
    u = ntk_budget.unit_bytes(plan)
    n, h = x.shape[0], plan.h
    out = {"trace": n * n, "full": n * n * h * h, "drift": 3 * n * n}[kind] * 4
    copies = ntk_budget.DRIFT_HELD_COPIES if kind == "drift" else ntk_budget.HELD_COPIES
    return int(ntk_budget.RUNTIME_BYTES + out + units * u["transient_unit"]
               + u["forward_sample"]
               + sets * n * (u["sample"] + copies * units * u["unit"])
               + ntk_budget.contract_bytes(plan, n, units, units, kind=kind)
               + ntk_budget.PROGRAM_BYTES + u["program"]) + 8


# --------------------------------------------------------------------------
# Every form, full and trace


@pytest.mark.parametrize("forms", [None, "gram", "jac"])
@pytest.mark.parametrize("trace", [False, True])
def test_every_form_matches_jacrev(x64, forms, trace):
    f, params, x, _ = zoo()
    ntk = empirical_ntk_fn(f, trace=trace, forms=forms, method="structured")
    plan = ntk.plan(params, x)
    convs = [l for l in plan["layers"] if l["kind"] == "conv"]
    assert len(convs) == 3                      # the grouped conv has no rule
    if forms is not None:
        assert {l["form"] for l in plan["layers"]} == {forms}
    want = zoo_ref()
    close(ntk(params, x), np.trace(want, axis1=2, axis2=3) if trace else want)


def test_forms_by_layer_and_bad_forms(x64):
    f, params, x, _ = zoo()
    ntk = empirical_ntk_fn(f, forms={"Conv_0": "gram", "Conv_2": "jac"})
    by = {l["path"]: l["form"] for l in ntk.plan(params, x)["layers"]}
    assert by["Conv_0"] == "gram" and by["Conv_2"] == "jac"
    close(ntk(params, x), zoo_ref())
    with pytest.raises(ValueError, match="unknown layers"):
        empirical_ntk_fn(f, forms={"nope": "jac"})(params, x)
    with pytest.raises(ValueError, match="forms must map"):
        empirical_ntk_fn(f, forms="diag")(params, x)


@pytest.mark.parametrize("trace", [False, True])
def test_gemm_gradient_convs_and_column_blocks_match_jacrev(x64, monkeypatch, trace):
    """Backward passes through ``conv_patches`` (GEMM gradients; lax for the
    input-dilated conv), and J's long axis contracted in column blocks of 5
    with a ragged rest: both equal float64 jacrev."""
    from hpft_jax.convs import conv_patches
    from theory import ntk_contract
    monkeypatch.setattr(ntk_contract, "COL_BLOCK", 5)
    f, params, x, _ = zoo()
    used = []

    def conv(*args, **kwargs):     # counts the rule-covered calls it serves
        used.append(args[1].shape)
        return conv_patches(*args, **kwargs)

    ntk = empirical_ntk_fn(f, trace=trace, forms="jac", method="structured", conv=conv)
    want = zoo_ref()
    close(ntk(params, x), np.trace(want, axis1=2, axis2=3) if trace else want)
    assert len(set(used)) == 3     # the three rule-covered convs' kernels
    with pytest.raises(TypeError, match="conv must be"):
        empirical_ntk_fn(f, conv="patches")


def test_long_contract_blocks():
    from theory.ntk_contract import long_contract
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4, 23)), rng.standard_normal((2, 5, 23))
    for block in (5, 11, 23, 64):     # ragged rest, two blocks, one, fewer than one
        got = long_contract("icD,jdD->icjd", jnp.asarray(a), jnp.asarray(b), block=block)
        np.testing.assert_allclose(got, np.einsum("icD,jdD->icjd", a, b), rtol=1e-5,
                                   atol=1e-5)


# --------------------------------------------------------------------------
# Output-chunked schedules (memory_budget)


@pytest.mark.parametrize("trace", [False, True])
def test_output_chunks_match_jacrev(x64, trace):
    f, params, x, f64 = zoo()
    kind = "trace" if trace else "full"
    ntk = empirical_ntk_fn(f, trace=trace, chunk_size=3,
                           memory_budget=_budget_for(f, params, x, 2, kind=kind,
                                                     trace=trace))
    sched = ntk.plan(params, x)["schedule"]
    assert sched["mode"] == "outputs" and sched["k"] < 3   # h = 3, padded
    want = zoo_ref()
    close(ntk(params, x), np.trace(want, axis1=2, axis2=3) if trace else want)


@pytest.mark.slow
@pytest.mark.parametrize("trace", [False, True])
def test_output_chunks_cross_kernel(x64, trace):
    f, params, x, f64 = zoo()
    kind = "trace" if trace else "full"
    x2 = x[:3] * 0.5 + 0.1
    cross = empirical_ntk_fn(f, trace=trace, chunk_size=2, memory_budget=_budget_for(
        f, params, x, 2, kind=kind, sets=2, trace=trace))
    want2 = reference(f64, params, x, x2)
    close(cross(params, x, x2), np.trace(want2, axis1=2, axis2=3) if trace else want2)


def _drift_ref(f64, p, q, x):
    kt, kn = reference(f64, p, x), reference(f64, q, x)
    fro = lambda k: np.mean(np.sqrt(np.sum(k * k, axis=(2, 3))))  # noqa: E731
    return {"k_norm": fro(kt), "k_norm_next": fro(kn), "k_gap": fro(kn - kt)}


def test_drift_output_chunks_match_jacrev(x64):
    f, params, x, f64 = zoo()
    rng = np.random.default_rng(3)
    q = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype),
                     params)
    budget = _budget_for(f, params, x, 2, kind="drift", sets=2)
    d = make_drift_fn(f, x, chunk_size=3, memory_budget=budget)
    sched = d.plan(params)["schedule"]
    assert sched["mode"] == "outputs" and sched["passes"] > 1
    want = _drift_ref(f64, params, q, x)
    got = d(params, q)
    for key in want:
        assert abs(float(got[key]) - want[key]) <= TOL32 * want["k_norm"], key


@pytest.mark.slow
def test_drift_sequence_output_chunks(x64):
    f, params, x, f64 = zoo()
    rng = np.random.default_rng(3)
    q = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype),
                     params)
    budget = _budget_for(f, params, x, 2, kind="drift", sets=2)
    want = _drift_ref(f64, params, q, x)
    seq = ntk_drift(f, [params, q, params], x, memory_budget=budget)
    np.testing.assert_allclose(np.asarray(seq["k_gap"]), [want["k_gap"]] * 2,
                               rtol=1e-5)


@pytest.mark.slow
def test_resnet_backbone_eval_bn_drift_and_traces(x64):
    """hpft_jax.models ResNet (eval-mode BatchNorm, backbone params only)."""
    m, m64 = ResNetTiny(width=2), ResNetTiny(width=2, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 6, 6, 3)), jnp.float32)
    v = _draw(jax.eval_shape(functools.partial(m.init, train=False),
                             jax.random.key(0), x), 2)
    bs = v["batch_stats"]
    f = lambda p, x: m.apply({"params": p, "batch_stats": bs}, x, train=False)  # noqa
    f64 = lambda p, x: m64.apply({"params": p, "batch_stats": bs}, x, train=False)  # noqa
    p = v["params"]
    q = jax.tree.map(lambda a: a * 1.01, p)
    ntk = empirical_ntk_fn(f, trace=True, memory_budget=_budget_for(
        f, p, x, 1, kind="trace", trace=True))
    assert ntk.plan(p, x)["schedule"]["mode"] == "outputs"
    close(ntk(p, x), np.trace(reference(f64, p, x), axis1=2, axis2=3))
    d = make_drift_fn(f, x, memory_budget=_budget_for(f, p, x, 2, kind="drift", sets=2))
    want, got = _drift_ref(f64, p, q, x), d(p, q)
    for key in want:
        assert abs(float(got[key]) - want[key]) <= TOL32 * want["k_norm"], key


# --------------------------------------------------------------------------
# Cost model and scheduler (pure arithmetic)


def test_layer_flops_by_hand():
    # P=4, K=3, c_out=2, h=5, n=2
    fl = ntk_cost.layer_flops(4, 3, 2, 5, 2, trace=False)
    assert fl == {"gram": 4 * (16 * 3 + 16 * 5 * 2 + 4 * 25 * 2),
                  "jac": 2 * 4 * 3 * 5 * 2 + 4 * 25 * 3 * 2}
    tr = ntk_cost.layer_flops(4, 3, 2, 5, 2, trace=True)
    assert tr == {"gram": 4 * (16 * 3 + 16 * 5 * 2), "jac": 2 * 4 * 3 * 5 * 2 + 4 * 5 * 3 * 2}
    assert ntk_cost.layer_flops(1, 129, 128, 128, 50, trace=False)["gram"] == 2500 * 128**3


def test_choose_form_on_resnet18_shapes():
    """CIFAR ResNet18 at h = 512, 50 probes: big-P, small-K convs go "jac";
    late small-P convs go "gram"; Dense layers always "gram"."""
    n, h = 50, 512
    assert ntk_cost.choose_form(1024, 576, 64, h, n) == "jac"       # layer1 conv
    assert ntk_cost.choose_form(16, 4608, 512, h, n) == "gram"      # layer4 conv
    assert ntk_cost.choose_form(1, 129, 128, 128, n, trace=True) == "gram"  # Dense
    # layer2 conv: gram is cheaper for full blocks, jac ~10x cheaper for traces
    assert ntk_cost.choose_form(256, 1152, 128, h, n, trace=False) == "gram"
    assert ntk_cost.choose_form(256, 1152, 128, h, n, trace=True) == "jac"


@pytest.mark.parametrize("kind, sets", [("trace", 1), ("full", 1), ("drift", 2)])
def test_schedule_estimate_within_budget(kind, sets):
    f, params, x, _ = zoo(n=4)
    plan = ntk_factors.discover(f, params, x[0], n_samples=4)
    u = ntk_budget.unit_bytes(plan)
    for units in (1, 2, 3, 50):
        budget = _budget_for(f, params, x, max(units, 2 if kind != "trace" else 1),
                             kind=kind, sets=sets)
        s = ntk_budget.schedule(plan, 4, kind=kind, memory_budget=budget, sets=sets)
        assert s.est_bytes <= budget
        held = sets * 4 * (s.k + (0 if kind == "trace" or s.mode == "stored" else s.s))
        assert held * u["unit"] <= budget - ntk_budget.RUNTIME_BYTES
        assert s.hp % s.k == 0 and s.k % s.s == 0 and s.hp >= plan.h
    with pytest.raises(ValueError, match="too small"):
        ntk_budget.schedule(plan, 4, kind=kind, memory_budget=ntk_budget.RUNTIME_BYTES
                            + 16 * 9 * 4 + 64, sets=sets)


def test_trace_never_holds_more_than_full():
    """With no budget, a trace plan whose forms store more per unit than the
    full plan's is chunked over outputs down to the full plan's bytes."""
    f, params, x, _ = zoo()
    full_plan = ntk_factors.discover(f, params, x[0], n_samples=4, forms="gram")
    tr_plan = ntk_factors.discover(f, params, x[0], n_samples=4, forms="jac")
    cap = full_plan.h * ntk_budget.unit_bytes(full_plan)["unit"]
    unit = ntk_budget.unit_bytes(tr_plan)["unit"]
    assert full_plan.h * unit > cap          # all outputs at once would hold more
    s = ntk_budget.schedule(tr_plan, 4, kind="trace", memory_budget=None, cap_unit_bytes=cap)
    assert s.mode == "outputs" and s.k * unit <= cap


@pytest.mark.slow
def test_estimate_bounds_xla_buffers():
    """The scheduler's estimate (less the runtime) bounds the bytes XLA's
    buffer assignment gives the compiled program (temporaries, arguments,
    outputs): traces of a width-8 ResNet18 in output chunks of 1 (the drift
    program's margin was checked the same way; docs/ntk_conv.md)."""
    from hpft_jax.models import ResNet18

    m = ResNet18(width=8)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)
    v = _draw(jax.eval_shape(functools.partial(m.init, train=False), jax.random.key(0), x), 4)
    bs = v["batch_stats"]
    f = lambda p, x: m.apply({"params": p, "batch_stats": bs}, x, train=False)  # noqa: E731
    ntk = empirical_ntk_fn(f, trace=True, memory_budget=_budget_for(
        f, v["params"], x, 1, kind="trace", trace=True))
    sched = ntk.plan(v["params"], x)["schedule"]
    assert sched["mode"] == "outputs" and sched["k"] == 1
    mem = ntk.lower(v["params"], x).compile().memory_analysis()
    xla = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    assert xla <= sched["est_bytes"] - ntk_budget.RUNTIME_BYTES
    # ResNet convs take their patches as slices: no identity-kernel constants
    # (before, they were most of this program), and the estimate stays tight
    plan = ntk_factors.discover(f, v["params"], x[0], n_samples=4, trace=True)
    assert ntk_budget.unit_bytes(plan)["program"] == 0
    assert xla > 0.25 * (sched["est_bytes"] - ntk_budget.RUNTIME_BYTES)
