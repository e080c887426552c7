"""hpft drift (App. A, Fig. 6): probes against explicit Jacobians and direct FT steps.

One tiny ``hpft drift`` run on the embedded digits (scratch, HP0, HP2;
probed at every step) serves every test; a hook keeps the train states
around each probe. The reference eNTK differentiates the backbone one sample
at a time with ``jax.jacrev`` of the flat parameter vector, in float64, and
forms every J_j J_nᵀ block in numpy; the reference FT step is a fresh
``steps.make_train_step`` fed the batch and key that ``steps.make_epoch``
would use (``epoch_indices`` and ``fold_in(fold_in(fold_in(key, e), 1), i)``),
so the probed run follows the sweep's FT trajectory step by step.

Pretraining is replaced by a random "pretrained" backbone written to the
cache through ``pretrain.get_or_train`` (pretraining has its own tests; here
it would cost most of the time budget).
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from hpft_jax import config as C, data as data_lib, prepare, pretrain, rng, steps
from hpft_jax.cli import main
from hpft_jax.experiments import drift as D
from hpft_jax.models import MLPBackbone, make_backbone, make_classifier
from hpft_jax.runlog import RunDir

WIDTH, DEPTH = 8, 2
FLAGS = ["--width", str(WIDTH), "--depth", str(DEPTH), "--no-distort", "--batch-size", "64",
         "--ft-epochs", "2", "--hp-lr", "0.05", "--quiet"]


def _argv(runs, *extra):
    return ["drift", "--runs-dir", str(runs), "--name", "d", "--taus", "0,2", "--probes", "6",
            "--every", "1", *FLAGS, *extra]


def _fake_pretrain(data_cfg, model_cfg, pre_cfg, source, **_):
    """Random "pretrained" variables of the source model (no compilation)."""
    model = make_classifier(pretrain.source_model_config(model_cfg), source.num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), source.train.x[:2]))
    rng = np.random.default_rng(7)
    return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), shapes), {}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    runs = tmp_path_factory.mktemp("drift_runs")
    seen = {}
    real = D.drift_run

    def capturing(*a, **k):
        name = k["desc"].split()[1]
        seen[name] = {}
        return real(*a, **{**k, "on_probe": lambda t, s0, s1: seen[name].__setitem__(t, (s0, s1))})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "train", _fake_pretrain)
        mp.setattr(D, "drift_run", capturing)
        assert main(_argv(runs)) == 0
    run = RunDir(str(runs / "d"))
    with open(run.config_file) as f:
        cfg = C.from_dict(D.DriftConfig, json.load(f))
    recs = {r["setting"]: r for r in run.records("drift")}
    return runs, run, cfg, recs, seen


@jax.jit
def _jacobians(params, x):
    """(N, h, P): per-sample d z_j / d ravel(backbone params), float64."""
    flat, unravel = ravel_pytree(jax.tree.map(lambda a: a.astype(jnp.float64), params))
    bb = MLPBackbone(width=WIDTH, depth=DEPTH, dtype=jnp.float64)
    one = lambda th, xi: bb.apply({"params": unravel(th)}, xi[None])[0]  # noqa: E731
    return jax.vmap(jax.jacrev(one), in_axes=(None, 0))(flat, x.astype(jnp.float64))


def reference_drift(params_t, params_next, x):
    """(k_norm_t, k_norm_next, k_gap) from explicit J_j J_nᵀ blocks, float64."""
    with jax.enable_x64(True):
        jt, jn = (np.asarray(_jacobians(p, jnp.asarray(x))) for p in (params_t, params_next))
    kt = np.einsum("icp,jdp->ijcd", jt, jt)
    kn = np.einsum("icp,jdp->ijcd", jn, jn)
    fro = lambda k: np.sqrt((k ** 2).sum(axis=(2, 3))).mean()  # noqa: E731
    return fro(kt), fro(kn), fro(kn - kt)


def test_probe_equals_explicit_jacobians(e2e):
    _, _, cfg, recs, seen = e2e
    ds = data_lib.load_downstream(cfg.sweep.data)
    for name, r in recs.items():
        x_probe = ds.train.x[np.asarray(r["probe_idx"])]
        assert r["steps"] == list(range(10)) and sorted(seen[name]) == r["steps"]
        for i, t in enumerate(r["steps"]):
            a, b = seen[name][t]
            kt, kn, gap = reference_drift(a.params["backbone"], b.params["backbone"], x_probe)
            assert gap > 1e-5 * kt  # the step moved the kernel (float32 noise: ~1e-7)
            np.testing.assert_allclose(r["k_norm"][i], kt, rtol=2e-5)
            np.testing.assert_allclose(r["k_norm_next"][i], kn, rtol=2e-5)
            np.testing.assert_allclose(r["k_gap"][i], gap, rtol=2e-3, atol=2e-6 * kt)
            np.testing.assert_allclose(r["rel_gap"][i], r["k_gap"][i] / r["k_norm"][i])
        assert max(r["rel_gap"]) > 1e-2  # so a wrong θ_{t+1} would show
        # every = 1 reuses the factors of θ_{t+1} as those of the next probe's θ_t
        np.testing.assert_allclose(r["k_norm"][1:], r["k_norm_next"][:-1], rtol=1e-6)


def test_probe_states_are_one_ft_step_apart(e2e):
    _, _, cfg, recs, seen = e2e
    ds = data_lib.load_downstream(cfg.sweep.data)
    x, y = ds.train.x, ds.train.y
    n, bs, ft = x.shape[0], cfg.sweep.ft.batch_size, cfg.sweep.ft
    nb = n // bs
    model = make_classifier(cfg.sweep.model, ds.num_classes)
    tx = steps.ft_optimizer(ft, ft.epochs * nb)
    step = jax.jit(steps.make_train_step(model, tx, num_classes=ds.num_classes, eta=ft.eta))
    key = rng.seed_key(0, rng.FT_DATA)
    states = seen["hp2"]
    order = np.stack([steps.epoch_indices(key, jnp.int32(e), n, bs) for e in range(ft.epochs)])
    for t, (a, b) in states.items():
        assert int(a.step) == t and int(b.step) == t + 1
        e, i = divmod(t, nb)
        idx = order[e][i]
        k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, e), 1), i)
        want, m = jax.device_get(step(a, x[idx], y[idx], k))
        moved = max(np.abs(p - q).max()
                    for p, q in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
        assert moved > 1e-5
        for p, q in zip(jax.tree.leaves(want.params), jax.tree.leaves(b.params)):
            np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(recs["hp2"]["step_loss"][t], m["loss"], rtol=1e-5)
        if t + 1 in states:  # one trajectory: the next probe starts where this step ended
            for p, q in zip(jax.tree.leaves(b), jax.tree.leaves(states[t + 1][0])):
                np.testing.assert_array_equal(p, q)


def test_records_table_and_figure(e2e):
    _, run, _, recs, seen = e2e
    assert sorted(recs) == ["hp0", "hp2", "scratch"]
    for r in recs.values():
        assert r["total_steps"] == 10 and r["every"] == 1 and len(r["probe_idx"]) == 6
        assert len(r["k_gap"]) == len(r["train_acc"]) == len(r["val_acc"]) == 10
        tm = r["timing"]
        assert tm["probe_calls"] == 10
        assert tm["probe_s"] == pytest.approx(tm["factors_s"] + tm["contract_s"])
        assert 0 < tm["probe_frac"] < 1 and tm["step_s"] > 0
        assert tm["train_s"] + tm["probe_s"] + tm["eval_s"] <= tm["wall_s"]
    assert recs["scratch"]["timing"]["compile_s"] > 0  # the first setting compiles
    # The head does not enter the backbone's kernel: same pretrained backbone, same κ_0.
    assert recs["hp0"]["k_norm"][0] == pytest.approx(recs["hp2"]["k_norm"][0], rel=1e-6)
    assert recs["scratch"]["k_norm"][0] != pytest.approx(recs["hp0"]["k_norm"][0], rel=1e-2)
    assert recs["hp2"]["aie"][0] < recs["hp0"]["aie"][0]  # HP lowers the energy
    # scratch: the τ = 0 head of the sweep on a backbone that is not the pretrained one
    s0, h0 = seen["scratch"][0][0].params, seen["hp0"][0][0].params
    for p, q in zip(jax.tree.leaves(s0["head"]), jax.tree.leaves(h0["head"])):
        np.testing.assert_array_equal(p, q)
    assert not np.allclose(s0["backbone"]["dense0"]["kernel"], h0["backbone"]["dense0"]["kernel"])
    assert {(r["tau"], r["seed"]) for r in run.records("hp")} == {(0, 0), (2, 0)}
    assert os.path.getsize(run.figures("drift.png")) > 1000
    with open(os.path.join(run.path, "drift.md")) as f:
        text = f.read()
    assert "PT backbone HP2" in text and "probe / FT step" in text


def test_rerun_skips_finished_settings(e2e, monkeypatch):
    runs, run, cfg, _, _ = e2e
    calls = []
    monkeypatch.setattr(D, "drift_run",
                        lambda *a, **k: calls.append(k["desc"]) or {"final_state": None})
    monkeypatch.setattr(prepare, "scratch_init", lambda *a: (None, None))  # no init to compile
    assert main(_argv(runs, "--no-figures")) == 0  # everything logged: nothing runs
    assert calls == []
    with open(run.metrics_file) as f:
        lines = f.readlines()
    try:  # without the scratch record, exactly that setting runs again
        with open(run.metrics_file, "w") as f:
            f.writelines(ln for ln in lines if json.loads(ln).get("setting") != "scratch")
        D.EXPERIMENT.execute(cfg, progress=False)
        assert calls == ["drift scratch seed=0"]
    finally:
        with open(run.metrics_file, "w") as f:
            f.writelines(lines)


# --------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kw, match", [
    ({"probes": 0}, "probes must be a positive"),
    ({"every": 0}, "every must be a positive"),
    ({"sweep": C.SweepConfig(ls_eta=0.9)}, "ls_eta must be None"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        D.DriftConfig(**kw)


def test_schedule_and_probe_indices():
    with pytest.raises(ValueError, match="only 10 examples"):
        rng.probe_indices(10, 11)
    with pytest.raises(ValueError, match="every must be >= 1"):
        D.probe_steps(10, 0)
    assert D.probe_steps(10, 4) == [0, 4, 8]
    assert D.resolve_every(None, 100) == 100 // D.TARGET_PROBES and D.resolve_every(None, 7) == 1
    idx = rng.probe_indices(100, 50, seed=D.PROBE_SEED)
    assert len(set(idx.tolist())) == 50 and list(idx) == sorted(idx)


@pytest.mark.parametrize("extra, match", [
    (["--probes", "100000"], "100000 --probes requested"),
    (["--every", "0"], "every must be a positive"),
    (["--taus", ""], "the tau list is empty"),
    (["--memory-budget", "1k"], "below what the experiment keeps resident"),
    (["--memory-budget", "0.2G"], "is too small for drift"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, extra, match):
    assert main(_argv(tmp_path, *extra)) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")


# --------------------------------------------------------------------------
# ResNet18 backbone under --memory-budget (issue 15)

R18 = ["--backbone", "resnet18", "--width", "2", "--no-scratch", "--taus", "0", "--probes", "4",
       "--every", "3", "--ft-epochs", "1", "--batch-size", "32", "--per-class", "60",
       "--no-distort", "--quiet", "--no-figures"]


def _fake_pretrain_resnet(data_cfg, model_cfg, pre_cfg, source, **_):
    """Random "pretrained" ResNet variables: He-scaled kernels, BatchNorm
    statistics that differ from the identity (positive variances)."""
    model = make_classifier(pretrain.source_model_config(model_cfg), source.num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), source.train.x[:2]))
    gen = np.random.default_rng(7)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']"):
            return gen.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        if name.endswith("['kernel']"):
            return (gen.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
        return ((name.endswith("['scale']")) + 0.1 * gen.normal(size=s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes), {}


def _r18_budget(runs):
    """A --memory-budget under which the probe holds output chunks of 2 (not
    all h): resident bytes (from probe_budget) + the scheduler's own need."""
    from tests.test_ntk_conv import _budget_for

    ap = argparse.ArgumentParser()
    D.EXPERIMENT.add_arguments(ap)
    cfg = D.EXPERIMENT.config_from_args(ap.parse_args(["--runs-dir", str(runs), "--name", "r",
                                                       *R18]))
    loaded = prepare.load(cfg.sweep)
    big = 10**13
    resident = big - D.probe_budget(D.DriftConfig(sweep=cfg.sweep, memory_budget=big), loaded)
    shapes = jax.eval_shape(lambda: loaded.model.init(jax.random.key(0), loaded.x_example(),
                                                      train=False))
    bb, st = D.backbone_of(shapes["params"], shapes["batch_stats"])
    st = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), st)
    f = lambda p, x: loaded.model.backbone.apply({"params": p, "batch_stats": st}, x,  # noqa
                                                 train=False)
    idx = rng.probe_indices(loaded.num_train, 4, seed=D.PROBE_SEED)
    x = jnp.asarray(loaded.ds.train.x[idx])
    return resident + _budget_for(f, bb, x, 2, kind="drift", sets=2), x


@pytest.mark.slow
def test_resnet18_drift_under_memory_budget_matches_jacrev(tmp_path):
    """``hpft drift --backbone resnet18 --memory-budget B``: output chunks
    recomputed with each state's BatchNorm statistics; k_norm and k_gap
    equal float64 explicit-Jacobian products."""
    budget, x = _r18_budget(tmp_path)
    seen = {}
    real = D.drift_run

    def capturing(*a, **k):
        return real(*a, **{**k, "on_probe": lambda t, s0, s1: seen.__setitem__(t, (s0, s1))})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "train", _fake_pretrain_resnet)
        mp.setattr(D, "drift_run", capturing)
        assert main(["drift", "--runs-dir", str(tmp_path), "--name", "r", *R18,
                     "--memory-budget", str(budget)]) == 0
    (r,) = RunDir(str(tmp_path / "r")).records("drift")
    sched = r["probe_schedule"]
    assert r["memory_budget"] == budget
    assert sched["mode"] == "outputs" and sched["k"] < 16 and sched["passes"] > 1
    bb = make_backbone("resnet18", width=2, dtype=jnp.float64)
    for i, t in enumerate(r["steps"]):
        a, b = seen[t]
        moved = max(np.abs(p - q).max() for p, q in zip(
            jax.tree.leaves(a.batch_stats), jax.tree.leaves(b.batch_stats)))
        assert moved > 1e-4       # each state needs its own statistics
        kt, kn, gap = _r18_reference(bb, a, b, x)
        np.testing.assert_allclose(r["k_norm"][i], kt, rtol=2e-5)
        np.testing.assert_allclose(r["k_norm_next"][i], kn, rtol=2e-5)
        np.testing.assert_allclose(r["k_gap"][i], gap, rtol=1e-3, atol=1e-5 * kt)
    with open(tmp_path / "r" / "drift.md") as f:
        assert f"output panels of {sched['k']} and streams" in f.read()


def _r18_reference(bb, a, b, x):
    """(k_norm_t, k_norm_next, k_gap), float64 jacrev of the batched backbone
    (eval mode, each state's statistics), every J_i J_jᵀ block in numpy."""
    @jax.jit
    def jac(params, stats):
        flat, unravel = ravel_pytree(params)
        g = lambda th: bb.apply({"params": unravel(th), "batch_stats": stats},  # noqa: E731
                                jnp.asarray(x, jnp.float64), train=False)
        return jax.jacrev(g)(flat)

    f64 = lambda t: jax.tree.map(lambda v: np.asarray(v, np.float64), t)  # noqa: E731
    with jax.enable_x64(True):
        jt, jn = (np.asarray(jac(f64(s.params["backbone"]), f64(s.batch_stats["backbone"])))
                  for s in (a, b))
    kt = np.einsum("icp,jdp->ijcd", jt, jt)
    kn = np.einsum("icp,jdp->ijcd", jn, jn)
    fro = lambda k: np.sqrt((k ** 2).sum(axis=(2, 3))).mean()  # noqa: E731
    return fro(kt), fro(kn), fro(kn - kt)
