"""Advanced tricks (Tables 2, 3, 5-8): every row, smoothing per stage, re-initialisation.

The checks recompute HP-train accuracy and loss with a plain numpy forward
pass of the MLP from the saved HP snapshots and the pretrained weights.
"""

import json
import math
import os

import jax
import numpy as np
import pytest

from hpft_jax import checkpoint, config as C, data as data_lib, pretrain, rng
from hpft_jax.cli import build_parser, main
from hpft_jax.experiments.tricks import EXPERIMENT, TricksConfig, make_cases
from hpft_jax.models import make_classifier
from hpft_jax.runlog import RunDir

TAU = 2
CASES = ("baseline", "mlp_head", "lshp", "ls_both", "ls_ft", "reinit2")
# Same model and pretraining flags as tests/test_exchange.py (shared cache).
FLAGS = ["--width", "16", "--depth", "4", "--pretrain-epochs", "10", "--pretrain-lr", "0.01",
         "--batch-size", "64", "--ft-epochs", "3", "--ft-lr", "0.05", "--patience", "5",
         "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    runs = tmp_path_factory.getbasetemp() / "hpft_runs"
    # one partial-backbone case keeps the test fast; k = 2 re-initialises two blocks
    argv = ["tricks", "--runs-dir", str(runs), "--name", "tricks", "--tau", str(TAU),
            "--hp-lr", "0.01", "--seeds", "0,1", "--reinit", "2"] + FLAGS
    assert main(argv) == 0
    return RunDir(str(runs / "tricks"))


@pytest.fixture(scope="module")
def ctx(run):
    with open(run.config_file) as f:
        full = C.from_dict(TricksConfig, json.load(f))
    assert full.reinit == (2,) and full.sweep.hp.taus == (TAU,)
    cfg = full.sweep
    ds = data_lib.load_downstream(cfg.data)
    pre, _ = pretrain.get_or_train(cfg.data, cfg.model, cfg.pretrain, cfg.runs_dir,
                                   progress=False)
    recs = {(r["case"], r["seed"]): r for r in run.records("trick")}
    return cfg, ds, pre["params"]["backbone"], recs


def _snapshot(run, name):
    tree, _ = checkpoint.load_tree(run.checkpoints("hp", name))
    return tree


def _mlp(x, blocks):
    """Plain numpy: flatten, then ReLU(h W + b) for each Dense block."""
    h = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    for p in blocks:
        h = np.maximum(h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"]), 0.0)
    return h


def _hp_metrics(z, head, y, eta, k=3):
    logits = z @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    target = eta * np.eye(k)[y] + (1 - eta) / k  # the paper's η·e_y + (1 − η)·u
    return float(np.mean(logits.argmax(1) == y)), float(np.mean(-(target * logp).sum(1)))


def _seed(tree, i):
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[i], tree)


def test_every_row_is_logged_with_finite_numbers(run):
    recs = list(run.records("trick"))
    assert sorted((r["case"], r["seed"]) for r in recs) == sorted(
        (c, s) for c in CASES for s in (0, 1))
    for r in recs:
        assert r["tau"] == TAU
        vals = [r["hp_train_acc"], r["val_acc"], r["test_acc"], r["adapt"]["cos"],
                r["adapt"]["dist_sq"], r["aie"]]
        assert all(math.isfinite(v) for v in vals), r["case"]
        assert 0 <= r["hp_train_acc"] <= 1 and 0 <= r["val_acc"] <= 1
    with open(os.path.join(run.path, "tricks.md")) as f:
        text = f.read()
    for c in CASES:
        assert text.count(f"| {c} |") == 1  # the baseline appears once
    assert os.path.getsize(run.figures("tricks.png")) > 5000


def test_hp_stage_uses_the_smoothed_targets(run, ctx):
    cfg, ds, pre, recs = ctx
    z = _mlp(ds.train.x, [pre[f"dense{i}"] for i in range(4)])
    snap = _snapshot(run, "linear_reinit0")
    assert set(snap) == {"eta=1", "eta=0.9"}
    for i, s in enumerate(cfg.seeds):
        heads = {v: _seed(snap[v]["params"]["head"]["out"], i) for v in snap}
        # same init and data order, only the HP targets differ
        assert not np.allclose(heads["eta=1"]["kernel"], heads["eta=0.9"]["kernel"])
        for case, variant, eta in (("baseline", "eta=1", 1.0), ("ls_ft", "eta=1", 1.0),
                                   ("lshp", "eta=0.9", 0.9), ("ls_both", "eta=0.9", 0.9)):
            acc, loss = _hp_metrics(z, heads[variant], ds.train.y, eta)
            r = recs[(case, s)]
            assert (r["eta_hp"], r["hp_train_acc"]) == (eta, pytest.approx(acc, abs=1e-6))
            assert r["hp_train_loss"] == pytest.approx(loss, rel=1e-4), case
        # the logged loss is not the one-hot loss: smoothing really entered HP
        _, onehot = _hp_metrics(z, heads["eta=0.9"], ds.train.y, 1.0)
        assert abs(recs[("lshp", s)]["hp_train_loss"] - onehot) > 1e-3


def test_ft_stage_uses_its_own_eta(ctx):
    _, _, _, recs = ctx
    for s in (0, 1):
        base, ls_ft = recs[("baseline", s)], recs[("ls_ft", s)]
        lshp, ls_both = recs[("lshp", s)], recs[("ls_both", s)]
        assert (base["eta_ft"], ls_ft["eta_ft"], lshp["eta_ft"], ls_both["eta_ft"]) == (
            1.0, 0.9, 1.0, 0.9)
        # same HP head, so the same energy at the start of FT ...
        # (batches of another size under vmap: equal up to rounding)
        assert ls_ft["aie"] == pytest.approx(base["aie"], rel=1e-6)
        assert ls_both["aie"] == pytest.approx(lshp["aie"], rel=1e-6)
        assert lshp["aie"] != base["aie"]
        # ... but FT with other targets moves the features differently
        assert ls_ft["adapt"]["dist_sq"] != base["adapt"]["dist_sq"]
        assert ls_both["adapt"]["dist_sq"] != lshp["adapt"]["dist_sq"]


def test_partial_backbone_starts_from_reinitialised_blocks(run, ctx):
    cfg, ds, pre, recs = ctx
    snap = _snapshot(run, "linear_reinit2")["eta=1"]["params"]
    assert set(snap["backbone"]) == {"dense2", "dense3"} and set(snap) == {"backbone", "head"}
    model = make_classifier(cfg.model, ds.num_classes)
    for i, s in enumerate(cfg.seeds):
        fresh = model.init(rng.seed_key(s, rng.HEAD_INIT), ds.train.x[:2], train=False)["params"]
        mine = _seed(snap, i)
        for b in ("dense2", "dense3"):
            w, w0, wp = (np.asarray(t[b]["kernel"]) for t in (mine["backbone"], fresh["backbone"], pre))
            # HP (10 small steps) moved the fresh blocks a little; the pretrained
            # weights are far away
            assert np.linalg.norm(w - w0) < 0.1 * np.linalg.norm(wp - w0), (s, b)
        # HP-train-acc: pretrained dense0-1, then the probed dense2-3 and head
        z = _mlp(ds.train.x, [pre["dense0"], pre["dense1"], mine["backbone"]["dense2"],
                              mine["backbone"]["dense3"]])
        acc, _ = _hp_metrics(z, mine["head"]["out"], ds.train.y, 1.0)
        assert recs[("reinit2", s)]["hp_train_acc"] == pytest.approx(acc, abs=1e-6)
        assert recs[("reinit2", s)]["reinit_names"] == ["dense2", "dense3"]


@pytest.mark.parametrize("argv, msg", [
    (["--head", "mlp"], "--head mlp"),
    (["--eta-hp", "0.9"], "--eta-hp"),
    (["--reinit-blocks", "1"], "--reinit-blocks 1"),
    (["--ls-eta", "none"], "--ls-eta none"),
    (["--reinit", "0"], "positive block counts"),
    (["--reinit", "1,5", "--depth", "4"], "has only 4 blocks"),
])
def test_cli_rejects_settings_the_cases_own(tmp_path, capsys, argv, msg):
    assert main(["tricks", "--runs-dir", str(tmp_path), "--name", "t", "--quiet"] + argv) == 2
    assert msg in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "t")  # nothing written, config.json included


def test_changed_reinit_under_the_same_name_is_refused(tmp_path, capsys):
    argv = ["tricks", "--runs-dir", str(tmp_path), "--name", "t", "--quiet", "--depth", "4"]
    cfg = EXPERIMENT.config_from_args(build_parser(["tricks"]).parse_args(argv + ["--reinit", "1"]))
    assert cfg.reinit == (1,)
    run = RunDir(str(tmp_path / "t"))
    run.write_config(cfg)  # as a started run would have
    assert main(argv + ["--reinit", "2"]) == 2
    assert "different config (differs in ['reinit'])" in capsys.readouterr().err
    assert run.read_config(TricksConfig) == cfg  # unchanged


def test_make_cases_and_config():
    names = [c.name for c in make_cases(ls_eta=0.8, reinit=(1, 3))]
    assert names == ["baseline", "mlp_head", "lshp", "ls_both", "ls_ft", "reinit1", "reinit3"]
    pairs = {c.name: (c.eta_hp, c.eta_ft) for c in make_cases(ls_eta=0.8)}
    assert pairs["lshp"] == (0.8, 1.0) and pairs["ls_both"] == (0.8, 0.8)
    assert pairs["ls_ft"] == (1.0, 0.8) and pairs["baseline"] == (1.0, 1.0)
    with pytest.raises(ValueError, match="ls_eta"):
        make_cases(ls_eta=1.0)
    # HP at one τ: the largest of the list, which is all the config keeps
    cfg = TricksConfig()
    assert cfg.sweep.name == "tricks" and cfg.reinit == (1, 2, 3)
    assert cfg.sweep.hp.taus == (C.SweepConfig().hp.taus[-1],)
    cfg = TricksConfig(sweep=C.SweepConfig(hp=C.HPConfig(taus=(0, 4, 64))))
    assert cfg.sweep.hp.taus == (64,)
    assert C.from_dict(TricksConfig, C.to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="--ls-eta none"):
        TricksConfig(sweep=C.SweepConfig(ls_eta=None))
