"""hpft eq2 (Eq. 2, App. A): the eNTK prediction against independent computations.

* The prediction (γ/N) Σ_n κ (∇_z q)ᵀ (target − p), built from
  theory.ntk's kernel, equals the JVP of the backbone features along the real
  update −γ∇_B L (jax.jvp, with a loss written here): kernel, direction,
  energy and the γ/N factor together.
* The error against a real SGD step is O(γ²): cutting γ 10x cuts the
  relative error ~10x.
* ∇_z q of an MLP head is the per-sample Jacobian (against the closed form
  and the diagonal blocks of a batched jacrev); of a linear head, the kernelᵀ.
* The FT state at step t is the sweep's FT (ft.make_ft_steps against
  steps.make_epoch).
* A tiny end-to-end run writes records, table and figure, and a rerun adds
  nothing. config.json holds every setting and a changed one is refused;
  bad input raises ValueError, or exits 2 with nothing written.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from _toy import blobs
from hpft_jax import config as C, ft, rng, steps
from hpft_jax.cli import main
from hpft_jax.experiments import eq2
from hpft_jax.models import make_classifier
from hpft_jax.runlog import RunDir

K = 3


def _model(head="linear", dtype="float64"):
    return make_classifier(C.ModelConfig(width=8, depth=2, head=head, head_hidden=6,
                                         dtype=dtype), K)


@functools.lru_cache(maxsize=None)
def _host_setup(head, seed=0):
    model = _model(head)
    x, y = blobs(16, k=K, shape=(2, 2, 1), seed=seed)
    with jax.enable_x64(True):  # the float64 model, traced only
        shapes = jax.eval_shape(lambda k: model.init(k, jnp.asarray(x[:2])), jax.random.key(0))
    rng = np.random.default_rng(seed)  # N(0, 1/fan_in) weights, small biases; no compile
    params = jax.tree_util.tree_map(
        lambda s: rng.normal(size=s.shape) / np.sqrt(s.shape[0]) if len(s.shape) == 2
        else 0.3 * rng.normal(size=s.shape), shapes["params"])
    return model, params, x[:6], x[6:], y[6:]


def _setup(head, seed=0):
    """float64 model, random float64 params, probes (6) and a batch (10)."""
    model, params, xp, xb, yb = _host_setup(head, seed)
    f64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
    return model, jax.tree_util.tree_map(f64, params), f64(xp), f64(xb), yb


def _ce(model, p, x, t):
    q, _ = model.apply({"params": p}, x)
    return jnp.mean(jax.nn.logsumexp(q, axis=1) - jnp.sum(t * q, axis=1))


@pytest.fixture(scope="module")
def checkers():
    with jax.enable_x64(True):
        yield {h: eq2.Checker(_model(h)) for h in ("linear", "mlp")}


@functools.partial(jax.jit, static_argnums=0)
def _jvp_prediction(model, params, x_probe, x_batch, t, gamma):
    """First-order Δz_j = ∇_B z_j · (−γ ∇_B L), by jax.jvp; L written here."""
    g = jax.grad(lambda p: _ce(model, p, x_batch, t))(params)["backbone"]
    step = jax.tree_util.tree_map(lambda a: -gamma * a, g)
    z = lambda b: model.backbone.apply({"params": b}, x_probe)  # noqa: E731
    return jax.jvp(z, (params["backbone"],), (step,))[1]


@pytest.mark.parametrize("head, eta", [("linear", 1.0), ("mlp", 1.0), ("linear", 0.8)])
def test_prediction_equals_jvp_along_the_real_update(x64, checkers, head, eta):
    model, params, xp, xb, yb = _setup(head)
    gamma = 0.037
    # two γ in every call of this module: one compiled check per head
    out = eq2.check_state(checkers[head], params, {}, xp, xb, yb, (gamma, 0.1), num_classes=K,
                          eta=eta, dtype="float64", arrays=True)
    t = jnp.asarray(eta * np.eye(K)[yb] + (1 - eta) / K)
    want = np.asarray(_jvp_prediction(model, params, xp, xb, t, gamma))
    assert want.shape == (6, 8) and np.abs(want).max() > 1e-3
    np.testing.assert_allclose(out["pred"][0], want, rtol=0, atol=1e-10 * np.abs(want).max())
    assert out["pred_norm"][0] == pytest.approx(np.linalg.norm(want, axis=1).mean(), rel=1e-10)
    # and the real step is close to it at this γ (a loose sanity bound)
    assert out["rel_err"][0] < 0.2


def test_logged_terms_match_explicit_jacobians(x64, checkers):
    """energy, direction, kernel and the Cauchy-Schwarz bound from J₁J₂ᵀ by hand."""
    model, params, xp, xb, yb = _setup("linear")
    out = eq2.check_state(checkers["linear"], params, {}, xp, xb, yb, (0.037, 0.1),
                          num_classes=K, eta=1.0, dtype="float64", arrays=True)
    flat, unravel = ravel_pytree(params["backbone"])
    jac = jax.jit(jax.jacrev(lambda th, x: model.backbone.apply({"params": unravel(th)}, x)))
    j1, j2 = np.asarray(jac(flat, xp)), np.asarray(jac(flat, xb))  # (n, h, P)
    kappa = np.einsum("icp,jdp->ijcd", j1, j2)
    w = np.asarray(params["head"]["out"]["kernel"])
    z = np.asarray(model.backbone.apply({"params": params["backbone"]}, xb))
    q = z @ w + np.asarray(params["head"]["out"]["bias"])
    p = np.exp(q - q.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = np.eye(K)[yb] - p
    kn = np.sqrt((kappa**2).sum(axis=(2, 3)))  # (P, N)
    assert out["energy"] == pytest.approx(np.linalg.norm(r, axis=1).mean(), rel=1e-12)
    assert out["direction"] == pytest.approx(np.linalg.norm(w), rel=1e-12)
    assert out["kernel"] == pytest.approx(kn.mean(), rel=1e-10)
    bound = (kn @ (np.linalg.norm(w) * np.linalg.norm(r, axis=1))).mean() / len(yb)
    assert out["cs_bound"] == pytest.approx(bound, rel=1e-10)
    # Eq. 2 with this κ, written out; and the bound holds
    pred = 0.037 * np.einsum("jncd,dk,nk->jc", kappa, w, r) / len(yb)
    np.testing.assert_allclose(out["pred"][0], pred, atol=1e-10 * np.abs(pred).max())
    assert out["drift_norm"] <= out["cs_bound"]


def test_error_drops_tenfold_when_gamma_drops_tenfold(x64, checkers):
    model, params, xp, xb, yb = _setup("linear")
    out = eq2.check_state(checkers["linear"], params, {}, xp, xb, yb, (1e-2, 1e-3),
                          num_classes=K, eta=1.0, dtype="float64")
    assert out["kink_probes"] == [0, 0]  # no ReLU flips: the expansion applies
    e1, e2_ = out["rel_err"]
    assert 0 < e2_ < e1 < 0.05
    assert 5 < e1 / e2_ < 20
    assert out["real_norm"][1] == pytest.approx(out["pred_norm"][1], rel=1e-2)
    assert out["slope"] == pytest.approx(np.log10(e1 / e2_))


def test_kink_flips_match_a_numpy_forward(x64, checkers):
    """At a large γ many ReLU inputs change sign; count them independently."""
    model, params, xp, xb, yb = _setup("linear")
    gamma = 3.0
    out = eq2.check_state(checkers["linear"], params, {}, xp, xb, yb, (gamma, 1.0), num_classes=K,
                          eta=1.0, dtype="float64", arrays=True)
    g = jax.jit(jax.grad(functools.partial(_ce, model)))(params, xb, jnp.asarray(np.eye(K)[yb]))

    def pre(p):
        h, out = np.asarray(xp).reshape(6, -1), []
        for i in range(2):
            a = h @ np.asarray(p[f"dense{i}"]["kernel"]) + np.asarray(p[f"dense{i}"]["bias"])
            out.append(a)
            h = np.maximum(a, 0)
        return out, h

    new = jax.tree_util.tree_map(lambda a, d: a - gamma * d, params, g)["backbone"]
    (a0, z0), (a1, z1) = pre(params["backbone"]), pre(new)
    want = sum(((u > 0) != (v > 0)).sum(axis=1) for u, v in zip(a0, a1))
    assert want.sum() > 0
    np.testing.assert_array_equal(out["kink_flips"][0], want)
    assert out["kink_probes"][0] == int((want > 0).sum())
    np.testing.assert_allclose(out["real"][0], z1 - z0, atol=1e-12)


def test_direction_mlp_head_is_per_sample_jacobian(x64):
    model, params, *_ = _setup("mlp")
    z = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8)))
    head = lambda p, zz: model.head.apply({"params": p}, zz)  # noqa: E731
    jac = np.asarray(jax.jit(eq2.direction, static_argnums=0)(head, params["head"], z))
    assert jac.shape == (5, K, 8)
    # the diagonal blocks of the batched Jacobian d q (5, K) / d z (5, h)
    full = np.asarray(jax.jit(jax.jacrev(lambda zz: head(params["head"], zz)))(z))
    np.testing.assert_allclose(jac, np.stack([full[n, :, n, :] for n in range(5)]), atol=1e-14)
    # closed form: W2ᵀ diag(relu'(z W1 + b1)) W1ᵀ
    hid = params["head"]["hidden0"]
    w1, b1 = np.asarray(hid["kernel"]), np.asarray(hid["bias"])
    w2 = np.asarray(params["head"]["out"]["kernel"])
    act = (np.asarray(z) @ w1 + b1 > 0).astype(float)
    closed = np.einsum("hm,nm,mk->nkh", w1, act, w2)
    np.testing.assert_allclose(jac, closed, atol=1e-14)
    assert np.abs(jac[0] - jac[1]).max() > 1e-6  # it depends on the sample


def test_direction_linear_head_is_kernel_transpose(x64):
    model, params, *_ = _setup("linear")
    z = jnp.asarray(np.random.default_rng(2).normal(size=(4, 8)))
    head = lambda p, zz: model.head.apply({"params": p}, zz)  # noqa: E731
    jac = np.asarray(jax.jit(eq2.direction, static_argnums=0)(head, params["head"], z))
    w = np.asarray(params["head"]["out"]["kernel"])  # (h, K)
    np.testing.assert_allclose(jac, np.broadcast_to(w.T, (4, K, 8)), atol=1e-15)


def test_ft_steps_match_the_sweeps_epochs():
    """t steps of ft.make_ft_steps (the FT eq2 runs) = the FT epochs of
    steps.make_epoch (same order, keys); step s's batch is its indices."""
    model = _model("linear", "float32")
    x, y = blobs(40, k=K, shape=(2, 2, 1))
    v = {"params": jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32),
                                          _host_setup("linear")[1])}
    ft_cfg = C.FTConfig(epochs=3, lr=0.05, batch_size=16)
    fts = ft.make_ft_steps(model, ft_cfg, num_classes=K, num_train=40)
    assert fts.num_batches == 2 and fts.total_steps == 6
    key = rng.seed_key(0, rng.FT_DATA)
    step = steps.make_train_step(model, fts.tx, num_classes=K, eta=1.0)
    epoch = jax.jit(steps.make_epoch(step, batch_size=16, num_examples=40))
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    want, _ = epoch(steps.init_state(v["params"], {}, fts.tx), xs, ys, key, 0)
    want, _ = epoch(want, xs, ys, key, 1)
    got, _ = fts.run(steps.init_state(v["params"], {}, fts.tx), xs, ys, key, 0, 3)
    got, _ = fts.run(got, xs, ys, key, 3, 4)  # 2 batches/epoch
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           got.params, want.params)
    np.testing.assert_array_equal(fts.batch(key, 3),
                                  np.asarray(steps.epoch_indices(key, 1, 40, 16))[1])


def test_relative_errors_and_slope():
    real = np.ones((2, 3, 4))
    pred = real + np.stack([0.1 * np.ones((3, 4)), 0.01 * np.ones((3, 4))])
    agg, mean, cos = eq2.relative_errors(pred, real)
    np.testing.assert_allclose(agg, [0.1, 0.01])
    np.testing.assert_allclose(mean, [0.1, 0.01])
    np.testing.assert_allclose(cos, 1.0)
    g = np.array([1e-1, 1e-2, 1e-3])
    assert eq2.fit_slope(g, 3 * g**1.5)[0] == pytest.approx(1.5)
    flips = np.array([[1, 0, 0], [0, 0, 0]])
    pred[0, 0] += 5.0  # the flipped probe is left out of the smooth error
    np.testing.assert_allclose(eq2.smooth_errors(pred, real, flips), [0.1, 0.01])


@pytest.mark.parametrize("kw, match", [
    (dict(at_steps=()), "step list is empty"),
    (dict(at_steps=(3, 1)), "strictly increasing"),
    (dict(at_steps=(-1, 2)), "non-negative"),
    (dict(at_steps=(0.5,)), "non-negative integers"),
    (dict(gammas=(1e-2, 0.0)), "γ must be"),
    (dict(gammas=(-1e-3,)), "γ must be"),
    (dict(gammas=(float("nan"),)), "γ must be"),
    (dict(gammas=()), "γ list is empty"),
    (dict(n_probe=0), "n_probe"),
    (dict(probe_split="holdout"), "probe_split"),
    (dict(check_dtype="float16"), "'float64' or 'float32'"),
    (dict(sweep=C.SweepConfig(ls_eta=0.9)), "ls_eta must be None"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        eq2.Eq2Config(**kw)


def test_bad_sizes_raise():
    ft_cfg = C.FTConfig(epochs=2, batch_size=16)
    with pytest.raises(ValueError, match="n_probe=50 probes requested but the train split has "
                                         "only 40"):
        eq2.check_sizes(eq2.Eq2Config(n_probe=50, at_steps=(0,)), ft_cfg, num_train=40,
                        num_probe_pool=40)
    with pytest.raises(ValueError, match=r"FT steps \[4\] are past the FT schedule"):
        eq2.check_sizes(eq2.Eq2Config(at_steps=(0, 4)), ft_cfg, num_train=40, num_probe_pool=40)
    with pytest.raises(ValueError, match="exceeds the FT batch size"):
        eq2.check_sizes(eq2.Eq2Config(at_steps=(0,), n_batch=17), ft_cfg, num_train=40,
                        num_probe_pool=40)
    assert eq2.check_sizes(eq2.Eq2Config(at_steps=(0, 3)), ft_cfg, num_train=40,
                           num_probe_pool=40) == 16


# --------------------------------------------------------------------------
# End to end on the digits (tiny)

# Same model and pretraining flags as tests/test_tricks.py and test_exchange.py
# (one pretraining per pytest session).
FLAGS = ["--width", "16", "--depth", "4", "--pretrain-epochs", "10", "--pretrain-lr", "0.01",
         "--batch-size", "64", "--ft-epochs", "3", "--ft-lr", "0.05", "--quiet"]


@pytest.mark.slow  # ~30-60 s on the loaded 2-core machine, mostly the shared pipeline's compiles
def test_end_to_end_writes_records_and_figure_and_resumes(tmp_path_factory):
    runs = tmp_path_factory.getbasetemp() / "hpft_runs"
    argv = ["eq2", "--runs-dir", str(runs), "--name", "eq2", "--tau", "0,2", "--hp-lr", "0.05",
            "--at-steps", "0,2", "--gammas", "1e-2,1e-3,1e-4", "--n-probe", "4"] + FLAGS
    assert main(argv) == 0
    run = RunDir(str(runs / "eq2"))
    recs = list(run.records("eq2"))
    assert sorted((r["tau"], r["step"]) for r in recs) == [(0, 0), (0, 2), (2, 0), (2, 2)]
    for r in recs:
        assert r["dtype"] == "float64" and r["n_probe"] == 4 and r["n_batch"] == 64
        assert len(r["rel_err"]) == 3 and all(0 < e < 1 for e in r["rel_err"])
        assert r["rel_err_smooth"][-1] < 1e-2  # γ = 1e-4: first order
        assert r["energy"] > 0 and r["direction"] > 0 and r["kernel"] > 0
    # the check's batch is FT step t's batch (the run's FT data key, 3 batches/epoch)
    key = rng.seed_key(0, rng.FT_DATA)
    for r in recs:
        e, i = divmod(r["step"], r["n_batches_per_epoch"])
        want = np.asarray(steps.epoch_indices(key, e, r["n_train"], 64))[i]
        np.testing.assert_array_equal(r["batch_indices"], want)
    s0 = {r["tau"]: r for r in recs if r["step"] == 0}
    assert s0[0]["kernel"] == pytest.approx(s0[2]["kernel"])  # same backbone before FT
    assert s0[0]["energy"] != pytest.approx(s0[2]["energy"])  # different heads
    assert (runs / "eq2" / "figures" / "eq2.png").stat().st_size > 5000
    text = (runs / "eq2" / "eq2.md").read_text()
    assert "Pooled slopes" in text and text.count("| float64 | 2 | 0 | 2 |") == 3
    n = len(list(run.records()))
    assert main(argv + ["--no-figures"]) == 0  # rerun: nothing new is logged
    assert len(list(run.records())) == n


# --------------------------------------------------------------------------
# Configuration: every setting in config.json; bad flags write nothing

EXTRAS = ["--at-steps", "0,3", "--gammas", "1e-2,1e-3", "--n-probe", "5", "--n-batch", "8",
          "--probe-split", "val", "--check-dtype", "float32", "--ntk-method", "jacobian"]


@pytest.fixture
def stub(monkeypatch):
    """``hpft eq2`` with the experiment itself replaced by a recorder: the
    framework's flags, checks and config.json stay real."""
    calls = []
    monkeypatch.setattr(eq2, "EXPERIMENT", dataclasses.replace(
        eq2.EXPERIMENT, runner=lambda cfg, run, loaded, **kw: calls.append(cfg),
        reporter=lambda run, **kw: (["stub"], [])))
    return calls


def test_config_json_round_trips_the_extras_and_a_changed_one_is_refused(
        tmp_path, stub, capsys):
    argv = ["eq2", "--runs-dir", str(tmp_path), "--name", "e", "--tau", "0,2", "--quiet",
            "--no-figures"]
    assert main(argv + EXTRAS) == 0
    (cfg,) = stub
    assert (cfg.at_steps, cfg.gammas, cfg.n_probe, cfg.n_batch, cfg.probe_split,
            cfg.check_dtype, cfg.ntk_method) == ((0, 3), (1e-2, 1e-3), 5, 8, "val", "float32",
                                                 "jacobian")
    assert cfg.sweep.hp.taus == (0, 2) and cfg.sweep.seeds == (0,) and cfg.sweep.ls_eta is None
    path = tmp_path / "e" / "config.json"
    saved = json.loads(path.read_text())
    assert saved["n_probe"] == 5 and saved["check_dtype"] == "float32"
    assert C.from_dict(eq2.Eq2Config, saved) == cfg
    # --config alone reproduces the run's config (and continuing it is allowed)
    assert main(["eq2", "--config", str(path), "--quiet", "--no-figures"]) == 0
    assert stub[1] == cfg
    # the same --name with one extra changed is refused, and nothing runs
    changed = [("6" if a == "5" else a) for a in EXTRAS]
    assert main(argv + changed) == 2
    assert "different config" in capsys.readouterr().err and len(stub) == 2
    assert json.loads(path.read_text()) == saved


@pytest.mark.parametrize("extra, match", [
    (["--gammas", "1e-2,0"], "γ must be a finite number > 0"),
    (["--at-steps", "2,1"], "strictly increasing"),
    (["--n-probe", "100000"], "n_probe=100000 probes requested"),
    (["--at-steps", "0,100000"], "past the FT schedule"),
    (["--n-batch", "100000"], "exceeds the FT batch size"),
    (["--probe-split", "holdout"], "probe_split must be one of"),
    (["--check-dtype", "float16"], "'float64' or 'float32'"),
    (["--ls-eta", "0.9"], "ls_eta must be None"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, stub, capsys, extra, match):
    assert main(["eq2", "--runs-dir", str(tmp_path), "--name", "e", "--quiet", *extra]) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "e") and stub == []


def test_cli_unparsable_flag_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eq2", "--runs-dir", str(tmp_path), "--gammas", "big"])
    assert e.value.code == 2 and "comma-separated numbers" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
