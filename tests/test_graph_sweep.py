"""The graph sweep end to end on generated OGB-layout molecules; resume; bad input."""

import os

import numpy as np
import pytest

from hpft_jax import ogb
from hpft_jax.cli import main
from hpft_jax.runlog import RunDir

TINY = ["--quiet", "--preset", "gcn", "--width", "8", "--depth", "2", "--pretrain-epochs", "1",
        "--tau", "0,2", "--ft-epochs", "2", "--seeds", "0", "--batch-size", "8",
        "--ls-eta", "none"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mol")
    ogb.write(ogb.generate(60, 4, seed=0, nodes=(4, 10)), str(root / "src"))
    ogb.write(ogb.generate(50, 3, seed=1, task_offset=2, nodes=(4, 10)), str(root / "down"))
    return root


def _argv(data, runs, *extra):
    return ["sweep", *TINY, "--source", f"ogb:{data / 'src'}", "--downstream",
            f"ogb:{data / 'down'}", "--runs-dir", str(runs), *extra]


@pytest.mark.filterwarnings("ignore:data spec")  # tiny splits: one-class tasks
@pytest.mark.slow  # ~1 min on a shared 2-core CPU: three GCN programs compile
def test_graph_sweep_end_to_end_and_resume(data, tmp_path):
    assert main(_argv(data, tmp_path, "--name", "g")) == 0
    run = RunDir(str(tmp_path / "g"))
    ft = sorted(run.records("ft"), key=lambda r: r["tau"])
    assert [r["tau"] for r in ft] == [0, 2]
    for r in ft:
        assert 0 <= r["test_acc"] <= 1 and 0 < r["aie"] < 1  # ROC-AUC; |y - p0| energy
        assert sum(r["p0y_hist"]) > 0 and set(r["adapt"]) >= {"dist_sq", "cos"}
    hp = {r["tau"]: r for r in run.records("hp")}
    assert hp[2]["aie_hp"] < hp[0]["aie_hp"]  # HP removes energy
    with open(os.path.join(run.path, "report.md")) as f:
        assert "ROC-AUC" in f.read()
    for name in ("aie_vs_tau.png", "p0y_hist.png", "adaptation_vs_tau.png"):
        assert os.path.getsize(os.path.join(run.path, "figures", name)) > 1000
    before = [list(run.records(e)) for e in ("hp", "ft")]
    assert main(_argv(data, tmp_path, "--name", "g")) == 0  # rerun: everything read back
    assert [list(run.records(e)) for e in ("hp", "ft")] == before


@pytest.mark.filterwarnings("ignore:data spec")
def test_bad_graph_inputs_exit_2_and_write_nothing(data, tmp_path, capsys):
    code = main(_argv(data, tmp_path, "--name", "b", "--downstream", f"ogb:{data / 'down'}@3"))
    err = capsys.readouterr().err
    assert code == 2 and "over the node budget of 3" in err and "largest graph: 10" in err
    code = main(_argv(data, tmp_path, "--name", "b", "--downstream", f"ogb:{tmp_path / 'none'}"))
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "b")


def test_one_class_task_warns_and_is_excluded(tmp_path):
    mol = ogb.generate(40, 3, seed=2, nodes=(4, 8), missing=0.0, noise=0.0)
    mol.labels[mol.splits["valid"], 1] = 0.0  # task 1: no positive in valid
    ogb.write(mol, str(tmp_path / "m"))
    yv = mol.labels[mol.splits["valid"]]
    one_class = [t for t in range(3) if not ((yv[:, t] == 0).any() and (yv[:, t] == 1).any())]
    assert 1 in one_class
    with pytest.warns(UserWarning) as rec:
        _, parts = ogb.load_splits(str(tmp_path / "m"), None, "ogb:m")
    msgs = [str(w.message) for w in rec]
    assert (f"{len(one_class)} of 3 tasks have no positive or no negative label in the valid "
            f"split (tasks {one_class})") in " ".join(msgs)
    x, y, _ = parts["val"]
    assert x.shape[0] == y.shape[0] == len(mol.splits["valid"])
