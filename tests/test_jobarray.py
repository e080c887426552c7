"""Job arrays: locked run-once stages, atomic checkpoints, shards merged by report."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from hpft_jax import checkpoint, locks
from hpft_jax.cli import main
from hpft_jax.runlog import RunDir
from _subprocess import TINY, child_env



def test_save_tree_replaces_atomically_and_survives_a_failed_write(tmp_path, monkeypatch):
    path = str(tmp_path / "ck")
    checkpoint.save_tree(path, {"w": np.arange(3.0)}, {"v": 1})
    checkpoint.save_tree(path, {"w": np.arange(4.0)}, {"v": 2})  # replace
    tree, meta = checkpoint.load_tree(path)
    np.testing.assert_array_equal(tree["w"], np.arange(4.0))
    assert meta == {"v": 2}

    def killed(p, tree, meta):  # a writer killed after writing part of the tree
        os.makedirs(os.path.join(p, "tree"))
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoint, "_write_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_tree(path, {"w": np.zeros(9)}, {"v": 3})
    tree, meta = checkpoint.load_tree(path)  # the old checkpoint, untouched
    np.testing.assert_array_equal(tree["w"], np.arange(4.0))
    assert meta == {"v": 2}
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_half_written_directory_is_never_read_and_stale_temps_are_removed(tmp_path):
    path = str(tmp_path / "hp")
    os.makedirs(os.path.join(path, "tree"))  # an old-style write killed before meta.json
    os.makedirs(path + ".tmp-host-123/tree")  # a killed atomic write
    assert not checkpoint.exists(path)
    with pytest.raises(checkpoint.CheckpointError, match="incomplete|no complete"):
        checkpoint.load_tree(path)
    assert checkpoint.remove_stale(path) == [path + ".tmp-host-123"]
    checkpoint.save_tree(path, {"w": np.ones(2)}, {})
    assert checkpoint.exists(path) and sorted(os.listdir(tmp_path)) == ["hp"]


def test_stage_lock_excludes_other_processes_and_times_out(tmp_path):
    path = str(tmp_path / "stage")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hpft_jax import locks\n"
         f"with locks.stage({path!r}, 'x', progress=False):\n"
         "    print('held', flush=True); time.sleep(60)"],
        env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="held .*stage.lock for more than 0.5 s"):
            with locks.stage(path, "test stage", progress=False, timeout=0.5):
                pass
        assert time.monotonic() - t0 >= 0.5
    finally:
        holder.kill()  # a killed holder releases the lock (flock)
        holder.wait()
        holder.stdout.close()
    with locks.stage(path, "test stage", progress=False, timeout=5):
        pass


def _ft(run):
    out = {}
    for r in run.records("ft"):
        out[(r["variant"], r["tau"], r["seed"])] = r
    return out


def _tables(path):
    with open(path) as f:
        return f.read().split("\n", 1)[1]  # without the title line, which names the directory


@pytest.mark.slow
def test_three_concurrent_shards_then_report_equal_an_unsharded_run(tmp_path):
    shards = [subprocess.Popen(
        [sys.executable, "-m", "hpft_jax.cli", "sweep", *TINY, "--runs-dir",
         str(tmp_path / "sharded"), "--name", "s", "--shard", f"{i}/3"],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(3)]
    assert main(["sweep", *TINY, "--runs-dir", str(tmp_path / "one"), "--name", "s"]) == 0
    for p in shards:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        assert "when every shard is done: hpft report" in out
    sharded = RunDir(str(tmp_path / "sharded" / "s"))
    assert not os.path.exists(os.path.join(sharded.path, "report.md"))  # no partial reports
    assert main(["report", "--no-figures", sharded.path]) == 0

    one = RunDir(str(tmp_path / "one" / "s"))
    # pretraining and HP ran once: one fresh pretraining, no duplicated HP record
    fresh = [r for r in sharded.records("pretrain") if not r["reused"]]
    assert len(fresh) == 1 and len(list(sharded.records("pretrain"))) == 1
    hp = [(r["variant"], r["tau"], r["seed"]) for r in sharded.records("hp")]
    assert sorted(hp) == sorted((r["variant"], r["tau"], r["seed"]) for r in one.records("hp"))
    a, b = _ft(one), _ft(sharded)
    assert sorted(a) == sorted(b) and len(a) == 8
    for k in a:  # other vmap group sizes: equal to float tolerance
        for f in ("val_acc", "test_acc", "aie", "epochs_run", "best_epoch"):
            np.testing.assert_allclose(b[k][f], a[k][f], rtol=1e-5, err_msg=f"{k} {f}")
        np.testing.assert_allclose(b[k]["curves"]["loss"], a[k]["curves"]["loss"], rtol=1e-5)
    assert _tables(os.path.join(sharded.path, "report.md")) == \
        _tables(os.path.join(one.path, "report.md"))
    # every shard logged only its own runs
    for i in range(3):
        with open(os.path.join(sharded.path, f"metrics-{i}-of-3.jsonl")) as f:
            ft = [json.loads(line) for line in f if '"event": "ft"' in line]
        assert len(ft) == (3, 3, 2)[i]


def test_report_notes_missing_shards(tmp_path, capsys):
    run = RunDir(str(tmp_path / "r"))
    from hpft_jax import config as C
    run.write_config(C.SweepConfig(name="r", seeds=(0,), ls_eta=None, shard=(1, 2),
                                   hp=C.HPConfig(taus=(0, 1))))
    run.log("hp", variant="hp", seed=0, tau=0, hp_train_acc=0.5, aie_hp=0.1)
    from hpft_jax import jobarray
    assert [tuple(k) for k in jobarray.missing(run)] == [("hp", 0, 0), ("hp", 0, 1)]


def test_a_record_torn_by_a_kill_is_skipped_and_the_next_record_is_kept(tmp_path):
    """A shard killed while appending to metrics.jsonl leaves a torn last
    line: it is never read, and the record the next run appends (the redone
    FT run) is not glued to it."""
    run = RunDir(str(tmp_path / "r"))
    run.log("ft", tau=0, seed=0)
    with open(run.metrics_file, "a") as f:
        f.write('{"event": "ft", "tau": 1, "se')  # killed mid-write
    assert [r["tau"] for r in run.records("ft")] == [0]  # tau 1 is not done: it is redone
    run.log("ft", tau=1, seed=0)
    run.log("ft", tau=2, seed=0)
    assert [r["tau"] for r in run.records("ft")] == [0, 1, 2]
