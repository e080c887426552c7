"""hpft prop1 (Prop. 1, Sec. 4.1, App. A Eqs. 11-23): constants against
independent computations, the bound on a near-tight real FT run, end to end;
config.json holds every setting and a changed one is refused; bad input
raises ValueError, or exits 2 with nothing written."""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from _toy import init_vars, tiny_model
from hpft_jax import config as C, ft, rng, steps
from hpft_jax.cli import main
from hpft_jax.experiments import prop1
from hpft_jax.models import make_classifier
from hpft_jax.runlog import RunDir


# --------------------------------------------------------------------------
# C₁ and C₂ against explicit Jacobians and numpy


def _reference_kernel(model, params, x):
    """float64 κ (N, N, h, h) from jax.jacrev of the backbone w.r.t. the flat
    parameter vector, per sample; contracted in numpy."""
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params["backbone"])
        flat, unravel = ravel_pytree(p64)
        bb = model.backbone.clone(dtype=jnp.float64)
        one = jax.jacrev(lambda th, xi: bb.apply({"params": unravel(th)}, xi[None])[0])
        j = np.asarray(jax.vmap(one, in_axes=(None, 0))(flat, jnp.asarray(x, jnp.float64)))
    return np.einsum("icp,jdp->ijcd", j, j)  # j: (N, h, P)


def test_c1_and_c2_match_jacrev_and_numpy():
    model = tiny_model()
    x = np.random.default_rng(0).normal(size=(7, 4, 4, 1)).astype(np.float32)
    params = init_vars(model, x)["params"]
    kappa = _reference_kernel(model, params, x)
    spec = np.linalg.norm(kappa, ord=2, axis=(-2, -1))  # SVD per pair
    fro = np.linalg.norm(kappa, ord="fro", axis=(-2, -1))
    got, c2 = prop1.make_measure(model, x, spec_pairs=None)(params, {})
    assert got["spec_pairs"] == 7 * 6 // 2
    for name, ref in (("spec_sup", spec.max()), ("spec_mean", spec.mean()),
                      ("fro_sup", fro.max()), ("fro_mean", fro.mean()),
                      ("spec_diag_mean", np.diagonal(spec).mean())):
        np.testing.assert_allclose(got[name], ref, rtol=2e-5, err_msg=name)
    off = spec[np.triu_indices(7, 1)]
    np.testing.assert_allclose(got["spec_off_max"], off.max(), rtol=2e-5)
    # Cauchy-Schwarz: the sup over all pairs sits on the diagonal, in both norms
    assert spec.max() == pytest.approx(np.diagonal(spec).max(), rel=1e-12)
    assert fro.max() == pytest.approx(np.diagonal(fro).max(), rel=1e-12)
    assert off.max() < spec.max() and spec.max() < fro.max()  # ‖·‖₂ ≤ ‖·‖_F, strictly here
    kernel = np.asarray(params["head"]["out"]["kernel"], np.float64)  # (h, k)
    np.testing.assert_allclose(c2, np.linalg.norm(kernel.T, 2), rtol=1e-12)
    # a sampled subset of pairs: the sup is unchanged, the mean an estimate over them
    ii, jj = prop1.offdiag_pairs(7, 5, 3)
    sub = prop1.ntk_stats(prop1.gather_blocks(jnp.asarray(kappa, jnp.float32), ii, jj))
    assert sub["spec_pairs"] == 5 and sub["spec_sup"] == pytest.approx(spec.max(), rel=2e-5)
    est = (np.trace(spec) + 42 * spec[ii, jj].mean()) / 49
    np.testing.assert_allclose(sub["spec_mean"], est, rtol=2e-5)


def test_head_norm_of_mlp_head_is_product_of_layer_norms():
    rng = np.random.default_rng(1)
    w0, w1 = rng.normal(size=(5, 6)), rng.normal(size=(6, 3))
    head = {"hidden0": {"kernel": w0, "bias": np.ones(6)}, "out": {"kernel": w1, "bias": np.ones(3)}}
    assert prop1.head_norm(head) == pytest.approx(np.linalg.norm(w0, 2) * np.linalg.norm(w1, 2))
    # ... which bounds the head's Jacobian ∇_z q at any z (ReLU is 1-Lipschitz)
    for z in rng.normal(size=(5, 5)):
        jz = w1.T @ np.diag((z @ w0 > 0).astype(float)) @ w0.T  # (k, h)
        assert np.linalg.norm(jz, 2) <= prop1.head_norm(head) + 1e-12


# --------------------------------------------------------------------------
# γ·T: the schedule and the momentum weight against optax itself


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_step_sizes_and_lr_sum_match_the_ft_optimizer(momentum):
    cfg = C.FTConfig(epochs=3, lr=0.05, momentum=momentum, batch_size=10)
    n, T = 40, 9  # 4 steps per epoch, 12 in all; T steps to a best epoch
    tx = steps.ft_optimizer(cfg, cfg.epochs * steps.num_batches(n, cfg.batch_size))
    p = jnp.zeros(())
    state = tx.init(p)
    moves = []
    for _ in range(T):  # a unit gradient every step: the update is the weight sum
        u, state = tx.update(jnp.ones(()), state, p)
        moves.append(-float(u))
    g = prop1.step_sizes(cfg, n, T)
    if momentum == 0.0:
        np.testing.assert_allclose(moves, g, rtol=1e-6)
    np.testing.assert_allclose(sum(moves), prop1.lr_sum(g, momentum), rtol=1e-6)
    sums = prop1.lr_sums(cfg, n, best_epoch=1)
    assert sums["T"] == 8 and sums["steps_per_epoch"] == 4
    assert sums["gT_plain"] == pytest.approx(0.05 * 8) and sums["gT_epochs"] == pytest.approx(0.1)
    assert sums["gT_sched"] == pytest.approx(np.sum(g[:8]))
    assert sums["gT_eff"] == pytest.approx(prop1.lr_sum(g[:8], momentum))


# --------------------------------------------------------------------------
# The bound on a real FT run, in a near-tight setting


def _tight_problem():
    """One class of K = 2, near-identical inputs, h = 1 and an antisymmetric
    head v = (a, −a): every Cauchy-Schwarz step of Eqs. 16-21 is nearly an
    equality, so measured / bound is close to 1 and wrong constants show."""
    rng = np.random.default_rng(0)
    x = (1.0 + 0.01 * rng.normal(size=(48, 4))).astype(np.float32)
    y = np.zeros(48, np.int32)
    model = make_classifier(C.ModelConfig(width=1, depth=1), 2)
    v = init_vars(model, x)
    params = {"backbone": {"dense0": {"kernel": jnp.full((4, 1), 0.2), "bias": jnp.full((1,), 0.5)}},
              "head": {"out": {"kernel": jnp.asarray([[0.3, -0.3]]), "bias": jnp.zeros(2)}}}
    assert jax.tree.structure(params) == jax.tree.structure(v["params"])
    data = {"train_x": x[:32], "train_y": y[:32], "val_x": x[32:40], "val_y": y[32:40],
            "test_x": x[40:], "test_y": y[40:]}
    return model, params, data


@pytest.fixture(scope="module")
def tight():
    """The problem and its measuring functions, compiled once for both cases."""
    model, params, data = _tight_problem()
    return (model, params, data, prop1.make_measure(model, data["train_x"][:10]),
            prop1.make_features(model))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_bound_holds_and_is_nearly_tight_on_a_real_ft_run(tight, momentum):
    model, params, data, measure, features = tight
    # 4 steps per epoch; the validation accuracy never improves on epoch 0,
    # so early stopping keeps the model after T = 4 steps
    cfg = C.FTConfig(epochs=4, lr=2e-3, momentum=momentum, batch_size=8, patience=1,
                     direction_steps=1)
    (res,), final = ft.finetune(model, cfg, [(params, {})], [0], data, data["train_x"],
                                data["train_y"], num_classes=2, progress=False)
    end = (jax.tree.map(lambda a: a[0], final["params"]), {})
    m = prop1.measure_run(measure, features, (params, {}), end,
                          jnp.asarray(data["train_x"]), jnp.asarray(data["train_y"]))
    rec = {"aie": res["aie"], "dist": res["adapt"]["dist"], **m,
           **prop1.lr_sums(cfg, 32, res["best_epoch"])}
    assert rec["T"] == 4
    assert rec["dist"] == pytest.approx(m["dist_models"], rel=1e-5)
    assert rec["aie"] == pytest.approx(m["aie_models"], rel=1e-5)
    c = prop1.constants(rec)
    assert c["C1_spec"] == pytest.approx(c["C1_fro"])  # h = 1
    assert 0.9 < c["ratio_spec"] <= 1.0, c["ratio_spec"]
    # T read as epochs (1 here) under-counts the 4 updates: the bound fails
    assert rec["dist"] > rec["gT_epochs"] * c["C1_spec"] * c["C2"] * rec["aie"]
    if momentum:  # without the momentum weight Σγ_t(1−β^(t+1))/(1−β) it fails too
        assert rec["dist"] > c["c_paper"] * rec["aie"]
    else:
        assert rec["gT_eff"] == pytest.approx(rec["gT_sched"])


# --------------------------------------------------------------------------
# Correlations


def test_correlations_against_scipy_free_formulas():
    rng = np.random.default_rng(2)
    a = rng.uniform(0.1, 0.8, 12)
    d = 3 * a + 1 + 0.05 * rng.normal(size=12)
    co = prop1.correlations(a, d)
    assert co["pearson"] == pytest.approx(np.corrcoef(a, d)[0, 1])
    ra, rd = np.argsort(np.argsort(a)), np.argsort(np.argsort(d))
    assert co["spearman"] == pytest.approx(np.corrcoef(ra, rd)[0, 1])
    assert co["c_fit"] == pytest.approx(np.sum(a * d) / np.sum(a * a))
    assert co["slope"] == pytest.approx(3, abs=0.2) and co["intercept"] == pytest.approx(1, abs=0.1)
    with pytest.raises(ValueError, match="matching 1-D"):
        prop1.correlations(a, d[:3])


# --------------------------------------------------------------------------
# End to end through the CLI; resume; bad input

# The model and pretraining flags of tests/test_exchange.py and test_tricks.py, so
# that one pytest session pretrains once (the cache lives in the session's temp dir).
FLAGS = ["--width", "16", "--depth", "4", "--pretrain-epochs", "10", "--pretrain-lr", "0.01",
         "--batch-size", "64", "--ft-epochs", "3", "--ft-lr", "0.05", "--patience", "5",
         "--quiet"]


@pytest.mark.slow
def test_end_to_end_writes_records_and_figure_and_rerun_skips(tmp_path_factory):
    runs = tmp_path_factory.getbasetemp() / "hpft_runs"
    argv = ["prop1", "--runs-dir", str(runs), "--name", "prop1", "--tau", "0,4",
            "--seeds", "0", "--hp-lr", "0.05", "--n-probes", "8", "--spec-pairs", "6"] + FLAGS
    assert main(argv) == 0
    run = RunDir(str(runs / "prop1"))
    recs = list(run.records("prop1"))
    ft_recs = {r["tau"]: r for r in run.records("ft")}
    assert sorted(r["tau"] for r in recs) == [0, 4]
    for r in recs:
        f = ft_recs[r["tau"]]
        assert r["dist_source"] == "ft record" and r["dist"] == f["adapt"]["dist"]
        # the saved final model is the one the FT record describes
        assert r["dist_models"] == pytest.approx(r["dist"], rel=1e-4)
        assert r["aie_models"] == pytest.approx(r["aie"], rel=1e-4)
        assert r["T"] == (f["best_epoch"] + 1) * r["steps_per_epoch"]
        assert len(r["probe_idx"]) == 8 and r["ntk_end"]["spec_pairs"] == 6
        c = prop1.constants(r)
        assert c["bound_spec"] < c["bound_fro"] and c["ratio_spec"] > 0
    # the two runs share the pretrained backbone at the start of FT
    assert recs[0]["ntk_start"] == recs[1]["ntk_start"]
    assert os.path.getsize(run.figures("prop1.png")) > 5000
    with open(os.path.join(run.path, "prop1.md")) as f:
        text = f.read()
    assert text.count("\n| 0 | 1 |") == 1 and "holds in" in text
    assert main(argv) == 0  # rerun: nothing new is measured
    assert len(list(run.records("prop1"))) == 2


@pytest.mark.parametrize("call, match", [
    (lambda: prop1.Prop1Config(n_probes=0), "n_probes must be a positive integer"),
    (lambda: prop1.check(prop1.Prop1Config(n_probes=11), types.SimpleNamespace(num_train=10, model=None)),
     "n_probes=11 exceeds the 10 training samples"),
    (lambda: prop1.Prop1Config(spec_pairs=-1), "spec_pairs"),
    (lambda: prop1.Prop1Config(sweep=C.SweepConfig(ls_eta=0.9)), "HP only"),
    (lambda: prop1.Prop1Config(sweep=dataclasses.replace(C.SweepConfig(ls_eta=None),
                                                         shard=(0, 2))), "unsharded"),
    (lambda: prop1.offdiag_pairs(5, -1), "spec_pairs"),
    (lambda: prop1.lr_sum([0.1, 0.1], 1.0), "momentum"),
    (lambda: prop1.lr_sums(C.FTConfig(), 100, -1), "best_epoch"),
    (lambda: prop1.gather_blocks(jnp.zeros((3, 2, 4, 4)), [], []), r"\(N, N, h, h\)"),
    (lambda: prop1.head_norm({"out": {"bias": np.zeros(2)}}), "no Dense kernel"),
])
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_probe_draw_is_the_seeded_subset():
    """The probes are rng.probe_indices(seed=probe_seed): the numbers of the
    draw prop1 made before the framework (default_rng(seed).choice, sorted)."""
    want = np.sort(np.random.default_rng(3).choice(100, 8, replace=False))
    np.testing.assert_array_equal(rng.probe_indices(100, 8, seed=3, what="n_probes"), want)


# --------------------------------------------------------------------------
# Configuration: every setting in config.json; bad flags write nothing

EXTRAS = ["--n-probes", "7", "--probe-seed", "3", "--spec-pairs", "all",
          "--ntk-method", "jacobian"]


@pytest.fixture
def stub(monkeypatch):
    """``hpft prop1`` with the experiment itself replaced by a recorder: the
    framework's flags, checks and config.json stay real."""
    calls = []
    monkeypatch.setattr(prop1, "EXPERIMENT", dataclasses.replace(
        prop1.EXPERIMENT, runner=lambda cfg, run, loaded, **kw: calls.append(cfg),
        reporter=lambda run, **kw: (["stub"], [])))
    return calls


def test_config_json_round_trips_the_extras_and_a_changed_one_is_refused(
        tmp_path, stub, capsys):
    argv = ["prop1", "--runs-dir", str(tmp_path), "--name", "p", "--tau", "0,4", "--quiet",
            "--no-figures"]
    assert main(argv + EXTRAS) == 0
    (cfg,) = stub
    assert (cfg.n_probes, cfg.probe_seed, cfg.spec_pairs, cfg.ntk_method) == (7, 3, None,
                                                                               "jacobian")
    assert cfg.sweep.hp.taus == (0, 4) and cfg.sweep.seeds == (0, 1) and cfg.sweep.ls_eta is None
    path = tmp_path / "p" / "config.json"
    saved = json.loads(path.read_text())
    assert saved["n_probes"] == 7 and saved["spec_pairs"] is None
    assert C.from_dict(prop1.Prop1Config, saved) == cfg
    # --config alone reproduces the run's config (and continuing it is allowed)
    assert main(["prop1", "--config", str(path), "--quiet", "--no-figures"]) == 0
    assert stub[1] == cfg
    # the same --name with --n-probes changed is refused, and nothing runs
    changed = [("9" if a == "7" else a) for a in EXTRAS]
    assert main(argv + changed) == 2
    assert "different config" in capsys.readouterr().err and len(stub) == 2
    assert json.loads(path.read_text()) == saved


@pytest.mark.parametrize("extra, match", [
    (["--n-probes", "0"], "n_probes must be a positive integer"),
    (["--n-probes", "100000"], "n_probes=100000 exceeds the"),
    (["--spec-pairs", "-1"], "spec_pairs"),
    (["--ls-eta", "0.9"], "HP only"),
    (["--shard", "0/2"], "unsharded"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, stub, capsys, extra, match):
    assert main(["prop1", "--runs-dir", str(tmp_path), "--name", "p", "--quiet", *extra]) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p") and stub == []


def test_cli_unparsable_spec_pairs_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prop1", "--runs-dir", str(tmp_path), "--spec-pairs", "many"])
    assert e.value.code == 2 and "an integer or 'all'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
