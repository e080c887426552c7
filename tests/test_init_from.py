"""``--init-from``: a saved or imported backbone replaces pretraining."""

import json
import os

import pytest

from hpft_jax import pretrain
from hpft_jax.cli import main
from hpft_jax.runlog import RunDir

TINY = ["--width", "8", "--depth", "2", "--no-distort", "--batch-size", "64", "--hp-lr", "0.05",
        "--pretrain-epochs", "2", "--ft-epochs", "2", "--tau", "0,2", "--seeds", "0",
        "--ls-eta", "none", "--quiet", "--no-figures"]


def _ft(run_dir):
    return {(r["tau"], r["seed"]): (r["val_acc"], r["test_acc"], r["aie"], r["adapt"])
            for r in RunDir(run_dir).records("ft")}


def test_init_from_equals_the_cached_pretraining(tmp_path, capsys, monkeypatch):
    runs = str(tmp_path)
    assert main(["sweep", "--runs-dir", runs, "--name", "cached", *TINY]) == 0
    pre = [r for r in RunDir(os.path.join(runs, "cached")).records("pretrain")][0]
    # the same backbone through --init-from: no pretraining, identical FT results
    monkeypatch.setattr(pretrain, "train", lambda *a, **k: pytest.fail("must not pretrain"))
    assert main(["sweep", "--runs-dir", runs, "--name", "imported", "--init-from", pre["path"],
                 *TINY]) == 0
    assert _ft(os.path.join(runs, "imported")) == _ft(os.path.join(runs, "cached"))
    run = RunDir(os.path.join(runs, "imported"))
    (rec,) = run.records("pretrain")
    assert rec["imported"] and rec["path"] == pre["path"]
    with open(run.config_file) as f:
        cfg = json.load(f)
    assert cfg["pretrain"]["init_from"] == pre["path"] and len(cfg["pretrain"]["init_sha256"]) == 64


@pytest.mark.parametrize("extra, match", [
    (["--init-from", "/nonexistent/ckpt"], "no backbone checkpoint"),
    (["--width", "16"], "width 8 (config: 16)"),
])
def test_bad_init_from_exits_2_writing_nothing(tmp_path, capsys, extra, match):
    runs = str(tmp_path)
    assert main(["pretrain", "--runs-dir", runs, *TINY[:-1]]) == 0
    path = json.loads(capsys.readouterr().out)["path"]
    argv = ["sweep", "--runs-dir", runs, "--name", "bad", "--init-from", path, *TINY, *extra]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(os.path.join(runs, "bad"))
