"""The paper's settings as config: FT schedule, momentum and early stopping,
z_T at the last and the best epoch, the z_0/z_T projection, rrc_flip in a
sweep. Expected values: hand-written SGD updates, scikit-learn's PCA."""

import json
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hpft_jax import config as C, ft, report, steps, sweep
from hpft_jax.cli import main
from hpft_jax.prepare import RunKey
from hpft_jax.runlog import RunDir

TINY = ["--width", "8", "--depth", "2", "--batch-size", "64", "--pretrain-epochs", "2",
        "--tau", "0,1,2,4", "--seeds", "0,1", "--ls-eta", "none", "--quiet"]


def test_constant_plain_sgd_is_the_hand_update():
    cfg = C.FTConfig(lr=0.1, momentum=0.0, schedule="constant")
    tx = steps.ft_optimizer(cfg, total_steps=3)
    p = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(p)
    for g in ([0.5, 1.0], [-1.0, 2.0], [3.0, 0.0]):
        want = np.asarray(p["w"]) - 0.1 * np.asarray(g)
        upd, state = tx.update({"w": jnp.array(g)}, state, p)
        p = optax.apply_updates(p, upd)
        np.testing.assert_allclose(p["w"], want, rtol=1e-6)


def test_cosine_momentum_is_the_hand_update():
    cfg = C.FTConfig(lr=0.1, momentum=0.9)  # the default schedule
    tx = steps.ft_optimizer(cfg, total_steps=4)
    p, buf = {"w": jnp.array([1.0])}, 0.0
    state = tx.init(p)
    w = 1.0
    for t, g in enumerate([1.0, 2.0, -1.0]):
        buf = 0.9 * buf + g
        w -= 0.1 * 0.5 * (1 + np.cos(np.pi * t / 4)) * buf
        upd, state = tx.update({"w": jnp.array([g])}, state, p)
        p = optax.apply_updates(p, upd)
        np.testing.assert_allclose(p["w"], [w], rtol=1e-6)


def test_projection_equals_sklearn_pca():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    z0 = rng.normal(size=(50, 6)) @ np.diag([5, 3, 1, 0.5, 0.2, 0.1])
    zb, zl = z0 + 0.3 * rng.normal(size=z0.shape), z0 + rng.normal(size=z0.shape)
    out = ft.projection(z0, zb, zl, np.arange(50) % 3, np.arange(50))
    pca = PCA(2).fit(z0)
    for key, z in (("z0", z0), ("zt_best", zb), ("zt_last", zl)):
        got, want = np.asarray(out[key]), pca.transform(z)
        sign = np.sign((got * want).sum(0))  # PCA's sign is arbitrary
        np.testing.assert_allclose(got, want * sign, atol=2e-5)
    np.testing.assert_allclose(out["explained"], pca.explained_variance_ratio_, rtol=1e-9)
    assert out["y"][:4] == [0, 1, 2, 0]


def test_projection_of_multilabel_targets_has_no_classes():
    z = np.random.default_rng(1).normal(size=(6, 4))
    y = np.array([[1.0, np.nan], [0.0, 1.0]] * 3)  # graph tasks: (P, T), NaN = missing
    out = ft.projection(z, z, z, y, np.arange(6))
    assert out["y"] is None and out["z0"] == out["zt_last"]


def test_projection_taus_pick_the_ends_and_spread():
    assert sweep.projection_taus((0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)) == (
        0, 8, 64, 1024)  # indices round(linspace(0, 11, 4)) = 0, 4, 7, 11
    assert sweep.projection_taus((0, 2)) == (0, 2)
    cfg = C.SweepConfig(seeds=(3, 4), hp=C.HPConfig(taus=(0, 2)))
    assert sweep.projected(RunKey("hp", 3, 2), cfg)
    assert not sweep.projected(RunKey("hp", 4, 2), cfg)  # the first seed only
    assert not sweep.projected(RunKey("lshp", 3, 2), cfg)


@pytest.fixture(scope="module")
def toy_paper_run(tmp_path_factory):
    """A tiny `--preset toy-paper` sweep (no early stopping) with rrc_flip."""
    runs = str(tmp_path_factory.mktemp("runs"))
    assert main(["sweep", "--preset", "toy-paper", "--runs-dir", runs, "--name", "paper",
                 "--ft-epochs", "3", "--augment", "rrc_flip", *TINY]) == 0
    return RunDir(os.path.join(runs, "paper")), runs


def test_no_early_stopping_trains_every_epoch_and_keeps_the_last(toy_paper_run):
    run, _ = toy_paper_run
    with open(run.config_file) as f:
        cfg = json.load(f)
    assert cfg["ft"]["early_stopping"] is False and cfg["data"]["augment"] == "rrc_flip"
    fts = list(run.records("ft"))
    assert len(fts) == 8
    for r in fts:
        assert r["epochs_run"] == 3 and r["best_epoch"] == 2
        assert r["adapt"] == r["adapt_last"] and r["train_acc"] == r["train_acc_last"]
        assert r["test_acc"] == r["curves"]["test_acc"][-1]  # the last epoch is reported
    # the projection: first seed, the spread τ, 100 fixed inputs, the same inputs and z_0
    proj = {r["tau"]: r["projection"] for r in fts if "projection" in r}
    assert sorted(proj) == [0, 1, 2, 4] and {r["seed"] for r in fts if "projection" in r} == {0}
    assert all(len(p["z0"]) == 100 and p["idx"] == proj[0]["idx"] for p in proj.values())
    assert all(p["z0"] == proj[0]["z0"] for p in proj.values())  # one shared backbone
    assert proj[4]["zt_best"] == proj[4]["zt_last"]
    assert os.path.exists(os.path.join(run.path, "figures", "projection.png"))


def test_early_stopping_logs_both_zT_and_report_says_which(toy_paper_run, capsys):
    _, runs = toy_paper_run
    assert main(["sweep", "--runs-dir", runs, "--name", "es", "--ft-epochs", "6",
                 "--patience", "1", "--no-figures", *TINY]) == 0
    run = RunDir(os.path.join(runs, "es"))
    fts = list(run.records("ft"))
    stopped = [r for r in fts if r["best_epoch"] < r["epochs_run"] - 1]
    assert stopped  # patience 1 stops runs after a worse epoch
    assert any(r["adapt"] != r["adapt_last"] for r in stopped)
    capsys.readouterr()
    assert main(["report", run.path, "--zt", "last", "--no-figures"]) == 0
    text = capsys.readouterr().out
    assert "z_T of the model at the last FT epoch run (`adapt_last`)" in text
    last = report.summarize(run, zt="last")
    best = report.summarize(run, zt="best")
    for (v, t), row in last.items():
        recs = [r for r in fts if (r["variant"], r["tau"]) == (v, t)]
        assert row["cos"][0] == pytest.approx(np.mean([r["adapt_last"]["cos"] for r in recs]))
        assert best[(v, t)]["cos"][0] == pytest.approx(np.mean([r["adapt"]["cos"] for r in recs]))
    assert "best-validation model" in report.report(run.path, write_figures=False,
                                                    out=lambda s: None)


def test_hp_momentum_is_the_hand_update_and_zero_is_plain_sgd():
    p = {"w": jnp.array([1.0, -2.0])}
    grads = ([0.5, 1.0], [-1.0, 2.0], [3.0, 0.0])
    for mom in (0.0, 0.9):
        tx = steps.hp_optimizer(C.HPConfig(lr=0.3, momentum=mom))
        q, state, buf = p, tx.init(p), np.zeros(2)
        for g in grads:
            buf = mom * buf + np.asarray(g)  # torch/optax heavy-ball: v = μv + g, w -= lr v
            want = np.asarray(q["w"]) - 0.3 * buf
            upd, state = tx.update({"w": jnp.array(g)}, state, q)
            q = optax.apply_updates(q, upd)
            np.testing.assert_allclose(q["w"], want, rtol=1e-6)


def test_vision_voc_preset_is_app_b3(capsys):
    assert main(["sweep", "--preset", "vision-voc", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["hp"]["lr"] == 0.3 and cfg["hp"]["momentum"] == 0.9
    assert cfg["hp"]["batch_size"] == cfg["ft"]["batch_size"] == 16
    assert max(cfg["hp"]["taus"]) == 200 and cfg["ft"]["epochs"] == 200
    assert cfg["ft"]["momentum"] == 0.9 and cfg["ft"]["weight_decay"] == 0.0
    assert cfg["ft"]["schedule"] == "constant" and cfg["model"]["head"] == "deeplab"
    assert cfg["model"]["stem"] == "imagenet" and cfg["data"]["distort"] is False
    assert cfg["data"]["image_size"] == 272 and 272 // 16 == 17  # the paper's 17 x 17
    assert cfg["data"]["downstream"].startswith("voc:")
