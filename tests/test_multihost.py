"""Two CPU processes on 127.0.0.1 (jax.distributed, gloo) run a tiny sweep and
report what one process reports; a silent coordinator times out clearly."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from hpft_jax import multihost
from hpft_jax.cli import main
from hpft_jax.runlog import RunDir
from _subprocess import TINY, child_env



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tables(run):
    with open(os.path.join(run.path, "report.md")) as f:
        return f.read().split("\n", 1)[1]  # without the title, which names the directory


def _cli(*args):
    return [sys.executable, "-m", "hpft_jax.cli", *args]


@pytest.mark.slow
def test_two_processes_report_what_one_process_reports(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen(
        _cli("sweep", *TINY, "--runs-dir", str(tmp_path / "two"), "--name", "s",
             "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(i), "--init-timeout", "120"),
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    assert main(["sweep", *TINY, "--runs-dir", str(tmp_path / "one"), "--name", "s"]) == 0
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "# Sweep report" in outs[0][0] and "# Sweep report" not in outs[1][0]
    one, two = RunDir(str(tmp_path / "one" / "s")), RunDir(str(tmp_path / "two" / "s"))
    # only process 0 wrote logs: one metrics file, one record per run
    assert [f for f in os.listdir(two.path) if f.startswith("metrics")] == ["metrics.jsonl"]
    ft1 = {(r["variant"], r["tau"], r["seed"]): r for r in one.records("ft")}
    ft2 = {(r["variant"], r["tau"], r["seed"]): r for r in two.records("ft")}
    assert len(list(two.records("ft"))) == len(ft2) == len(ft1) == 8
    for k in ft1:
        for f in ("val_acc", "test_acc", "aie", "epochs_run"):
            np.testing.assert_allclose(ft2[k][f], ft1[k][f], rtol=1e-5, err_msg=f"{k} {f}")
    assert sorted(json.dumps(r, sort_keys=True) for r in two.records("hp")) == \
        sorted(json.dumps(r, sort_keys=True) for r in one.records("hp"))
    assert _tables(one) == _tables(two)
    assert not os.listdir(os.path.join(two.path, "checkpoints", "ft"))  # cleaned after logging


def test_silent_coordinator_times_out_with_a_clear_message(tmp_path):
    port = _free_port()  # nobody listens there
    t0 = time.monotonic()
    out = subprocess.run(
        _cli("sweep", "--quiet", "--runs-dir", str(tmp_path), "--coordinator",
             f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
             "--init-timeout", "2"),
        env=child_env(), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"coordinator 127.0.0.1:{port} did not answer within 2 s" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 60
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("argv, msg", [
    (["--coordinator", "127.0.0.1:1"], "go together"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "127.0.0.1:5", "--num-processes", "2", "--process-id", "2"],
     "not in [0, 2)"),
])
def test_bad_process_flags(tmp_path, capsys, argv, msg):
    assert main(["sweep", "--quiet", "--runs-dir", str(tmp_path), *argv]) == 2
    assert msg in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_cluster_detection():
    assert not multihost.cluster_detected({})
    assert not multihost.cluster_detected({"SLURM_NTASKS": "1"})  # a job-array task
    assert multihost.cluster_detected({"SLURM_NTASKS": "4"})
    assert multihost.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})
