"""Head exchange (Fig. 3, right): the matrices against independent forward passes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpft_jax import checkpoint, config as C, data as data_lib, steps
from hpft_jax.cli import main
from hpft_jax.experiments.exchange import exchange_config, select_taus
from hpft_jax.losses import accuracy
from hpft_jax.models import make_classifier
from hpft_jax.runlog import RunDir

TAUS = (0, 2, 8)
# The same model and pretraining flags as tests/test_tricks.py, so that one
# pytest session pretrains once (the cache lives in the session's temp dir).
FLAGS = ["--width", "16", "--depth", "4", "--pretrain-epochs", "10", "--pretrain-lr", "0.01",
         "--batch-size", "64", "--ft-epochs", "3", "--ft-lr", "0.05", "--patience", "5",
         "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    runs = tmp_path_factory.getbasetemp() / "hpft_runs"
    argv = ["exchange", "--runs-dir", str(runs), "--name", "exchange",
            "--taus", ",".join(map(str, TAUS)), "--hp-lr", "0.05"] + FLAGS
    assert main(argv) == 0
    return RunDir(str(runs / "exchange"))


@pytest.fixture(scope="module")
def finals(run):
    """Each finetuned model, read back from its checkpoint, and the data."""
    with open(run.config_file) as f:
        cfg = C.from_dict(C.SweepConfig, json.load(f))
    ds = data_lib.load_downstream(cfg.data)
    out = []
    for t in TAUS:
        tree, _ = checkpoint.load_tree(run.checkpoints("final", f"hp_tau{t}_seed0"))
        out.append(tree)
    return cfg, ds, out


def _acc_fn(model):
    return jax.jit(lambda v, x, y: accuracy(steps.predict(model, v, x)[0], y))


def test_config_and_records(run):
    with open(run.config_file) as f:
        cfg = C.from_dict(C.SweepConfig, json.load(f))
    assert cfg.hp.taus == TAUS and cfg.seeds == (0,) and cfg.ls_eta is None
    (rec,) = list(run.records("exchange"))
    assert rec["taus"] == list(TAUS) and (rec["rows"], rec["cols"]) == ("head", "backbone")
    for split in ("train", "val", "test"):
        a = np.asarray(rec[f"{split}_acc"])
        assert a.shape == (len(TAUS), len(TAUS))
        assert np.all(np.isfinite(a)) and np.all((0 <= a) & (a <= 1))
    assert len(list(run.records("ft"))) == len(TAUS)
    assert os.path.getsize(run.figures("exchange.png")) > 5000
    with open(os.path.join(run.path, "exchange.md")) as f:
        rows = [ln for ln in f.read().splitlines() if ln.startswith("| τ=")]
    assert len(rows) == 3 * len(TAUS)  # train, val, test: one row per head


def test_diagonal_equals_each_original_model(run, finals):
    cfg, ds, trees = finals
    model = make_classifier(cfg.model, ds.num_classes)
    acc = _acc_fn(model)
    (rec,) = list(run.records("exchange"))
    ft = {r["tau"]: r for r in run.records("ft")}
    for i, (t, tree) in enumerate(zip(TAUS, trees)):
        v = {"params": tree["params"]}
        for split, logged in (("train", "train_acc"), ("val", "val_acc")):
            s = getattr(ds, split)
            own = float(acc(v, jnp.asarray(s.x), jnp.asarray(s.y)))
            assert rec[f"{split}_acc"][i][i] == pytest.approx(own, abs=1e-6), (t, split)
            # and the FT run's own logged accuracy of its early-stopped model
            assert ft[t][logged] == pytest.approx(own, abs=1e-6), (t, split)


def test_every_cell_pairs_head_row_with_backbone_column(run, finals):
    """Swap params/head by hand and run the plain full forward pass."""
    cfg, ds, trees = finals
    model = make_classifier(cfg.model, ds.num_classes)
    acc = _acc_fn(model)
    (rec,) = list(run.records("exchange"))
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    got = np.zeros((len(TAUS), len(TAUS)))
    for j, head_tree in enumerate(trees):
        for i, body_tree in enumerate(trees):
            params = {"backbone": body_tree["params"]["backbone"],
                      "head": head_tree["params"]["head"]}
            got[j, i] = float(acc({"params": params}, x, y))
    np.testing.assert_allclose(np.asarray(rec["train_acc"]), got, atol=1e-6)
    # the finetuned models differ, so the matrix is not constant along rows
    assert len({round(v, 6) for v in got.ravel()}) > 1


@pytest.mark.parametrize("taus, n, expected", [
    ((0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), 7, (0, 2, 8, 32, 64, 256, 1024)),
    ((0, 1, 2, 4), 7, (0, 1, 2, 4)),
    ((0, 1, 2, 4, 8), 2, (0, 8)),
    ((0, 1, 2, 4, 8), 1, (8,)),
    ((0, 4, 16), 3, (0, 4, 16)),
])
def test_select_taus(taus, n, expected):
    assert select_taus(taus, n) == expected


def test_select_taus_rejects_n_below_one():
    with pytest.raises(ValueError, match="n_taus"):
        select_taus((0, 1), 0)


def test_exchange_config_drops_lshp_and_keeps_given_taus():
    cfg = exchange_config(C.SweepConfig(), taus=(0, 16))
    assert cfg.hp.taus == (0, 16) and cfg.ls_eta is None
    cfg = exchange_config(C.SweepConfig(hp=C.HPConfig(taus=(0, 1, 2))), n_taus=7)
    assert cfg.hp.taus == (0, 1, 2)
