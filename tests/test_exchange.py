"""Head exchange (Fig. 3, right): the matrices against independent forward passes."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpft_jax import checkpoint, config as C, data as data_lib, steps
from hpft_jax.cli import build_parser, main
from hpft_jax.experiments.exchange import EXPERIMENT, ExchangeConfig, select_taus
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
        cfg = C.from_dict(ExchangeConfig, json.load(f)).sweep
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
        full = C.from_dict(ExchangeConfig, json.load(f))
    cfg = full.sweep
    assert full.n_taus is None and cfg.name == "exchange"
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


def test_config_defaults_and_n_taus():
    cfg = ExchangeConfig()
    assert cfg.sweep.hp.taus == (0, 2, 8, 32, 64, 256, 1024)  # 7 of the 2^n list
    assert cfg.sweep.seeds == (0,) and cfg.sweep.ls_eta is None and cfg.n_taus is None
    sweep = dataclasses.replace(cfg.sweep, hp=C.HPConfig(taus=(0, 1, 2, 4, 8)))
    picked = ExchangeConfig(sweep=sweep, n_taus=2)
    assert picked.sweep.hp.taus == (0, 8) and picked.n_taus == 2
    # config.json round trip: the kept list is stable under the same n_taus
    assert C.from_dict(ExchangeConfig, C.to_dict(picked)) == picked
    assert ExchangeConfig(sweep=sweep).sweep.hp.taus == (0, 1, 2, 4, 8)
    with pytest.raises(ValueError, match="HP only"):
        ExchangeConfig(sweep=dataclasses.replace(cfg.sweep, ls_eta=0.9))
    with pytest.raises(ValueError, match="n_taus"):
        ExchangeConfig(n_taus=0)


def test_cli_n_taus_and_bad_input(tmp_path, capsys):
    """``--n-taus`` reaches config.json; a rejected command writes nothing,
    and a changed ``--n-taus`` under the same name is refused."""
    runs = tmp_path / "runs"
    base = ["exchange", "--runs-dir", str(runs), "--name", "e", "--quiet"]
    assert main(base + ["--ls-eta", "0.9"]) == 2
    assert "HP only" in capsys.readouterr().err
    assert main(base + ["--downstream", "digits:0,11"]) == 2
    assert not os.path.exists(runs / "e")
    cfg = EXPERIMENT.config_from_args(build_parser(["exchange"]).parse_args(
        base + ["--taus", "0,1,2,4,8", "--n-taus", "3"]))
    assert cfg.sweep.hp.taus == (0, 2, 8) and cfg.n_taus == 3
    RunDir(str(runs / "e")).write_config(cfg)
    assert main(base + ["--taus", "0,1,2,4,8", "--n-taus", "2"]) == 2
    assert "different config" in capsys.readouterr().err


def test_exchange_metric_follows_the_task():
    """Multi-label heads are scored by ROC-AUC per (head, backbone) pair, per
    split, as scikit-learn computes it; classification by accuracy."""
    from sklearn.metrics import roc_auc_score

    from hpft_jax import tasks
    from hpft_jax.experiments.exchange import exchange_accuracy

    rng = np.random.default_rng(0)
    n, N, T = 2, 30, 3
    logits = rng.normal(size=(n, n, N, T)).astype(np.float32)
    y = (rng.random((N, T)) < 0.4).astype(np.float32)
    y[::7, 1] = np.nan  # missing labels
    x = np.arange(N, dtype=np.float32)[:, None]
    fn = lambda variables, xs: jnp.asarray(logits)[:, :, np.asarray(xs[:, 0], int)]  # noqa: E731
    got = exchange_accuracy(fn, None, {"a": (x[:20], y[:20]), "b": (x[20:], y[20:])},
                            task=tasks.get("multilabel"))
    for name, sl in (("a", slice(0, 20)), ("b", slice(20, N))):
        for j in range(n):
            for i in range(n):
                ys, ss = y[sl], logits[j, i, sl]
                want = np.mean([roc_auc_score(ys[~np.isnan(ys[:, t]), t],
                                              ss[~np.isnan(ys[:, t]), t]) for t in range(T)
                                if len(set(ys[~np.isnan(ys[:, t]), t])) == 2])
                np.testing.assert_allclose(got[name][j, i], want, rtol=1e-5)
    labels = rng.integers(0, T, size=N)
    acc = exchange_accuracy(fn, None, {"all": (x, labels)}, task=tasks.get("classification"))
    np.testing.assert_allclose(acc["all"], (logits.argmax(-1) == labels).mean(-1), rtol=1e-6)
