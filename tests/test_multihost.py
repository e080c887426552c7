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


@pytest.mark.slow
def test_two_processes_each_read_only_their_slice_of_every_batch(tmp_path):
    """Streamed FT on a data mesh over both processes' devices: each process
    gathers only the rows its device holds (half of every batch and eval
    chunk), and the results equal one process reading everything."""
    port = _free_port()
    worker = os.path.join(os.path.dirname(__file__), "_stream_worker.py")
    env = child_env()
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + env["PYTHONPATH"]
    procs = [subprocess.Popen([sys.executable, worker, str(tmp_path / f"p{i}.json"), str(port),
                               "2", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one.json")], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    outs = [p.communicate(timeout=600) for p in procs]
    assert one.returncode == 0, one.stderr[-3000:]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    res = []
    for name in ("one.json", "p0.json", "p1.json"):
        with open(tmp_path / name) as f:
            res.append(json.load(f))
    assert [r["process_count"] for r in res] == [1, 2, 2]
    rows = [np.asarray(r["rows"]) for r in res]
    # each process read exactly half of the rows one process read, and together all of them
    assert len(rows[1]) == len(rows[2]) == len(rows[0]) // 2
    np.testing.assert_array_equal(np.bincount(rows[1], minlength=96) +
                                  np.bincount(rows[2], minlength=96),
                                  np.bincount(rows[0], minlength=96))
    for r in range(2):
        a, b, c = (x["results"][r] for x in res)
        assert b == c  # both processes hold the same (replicated) results
        for k in ("val_acc", "test_acc", "aie"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=k)
        np.testing.assert_allclose(b["curves"]["loss"], a["curves"]["loss"], rtol=1e-5)
        for k in a["adapt"]:
            np.testing.assert_allclose(b["adapt"][k], a["adapt"][k], rtol=1e-5, err_msg=k)


def test_check_layout():
    multihost.check_layout(8, 4, 2)
    for devices, local in ((3, 1), (4, 1)):
        with pytest.raises(ValueError, match=rf"2 processes do not divide the {devices} "
                                             rf"devices evenly \(this process has {local}\)"):
            multihost.check_layout(devices, 2, local)


@pytest.mark.slow
def test_processes_with_unequal_devices_stop_with_one_line(tmp_path):
    """Process 0 with 2 CPU devices, process 1 with 1: 3 devices, 2 processes."""
    port = _free_port()
    procs = []
    for i, ndev in enumerate((2, 1)):
        env = child_env()
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
        procs.append(subprocess.Popen(
            _cli("sweep", "--quiet", "--runs-dir", str(tmp_path), "--coordinator",
                 f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                 "--init-timeout", "60"),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = []
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, err, ndev in zip(procs, errs, (2, 1)):
        assert p.returncode == 2, err[-2000:]
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[Gloo]")]
        assert lines == [f"hpft sweep: error: 2 processes do not divide the 3 devices evenly (this "
                         f"process has {ndev}); start every process with the same number of "
                         "devices"], err[-2000:]
    assert not os.listdir(tmp_path)
