"""Streaming input: the streamed path takes the on-device path's steps on the
same examples, so pretraining, HP and FT agree; the choice and its errors."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpft_jax import data as data_lib, ft, hp, pretrain, steps, stream
from hpft_jax.cli import main
from hpft_jax.config import DataConfig, ModelConfig, PretrainConfig
from hpft_jax.flags import byte_size

from _toy import FT, HP, data_dict, init_vars, tiny_model

STREAM = {"input": "stream", "prefetch": 2}


def _leaves_close(a, b, **kw):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw)


def _id_step(state, x, y, key):
    """A 'training step' that only records which examples it saw (x = ids)."""
    return state + 1, {"ids": x, "key": jax.random.key_data(key)}


def test_same_examples_and_keys_per_step_as_on_device():
    n, b, nb = 21, 4, 5  # 1 example dropped per epoch, a different one each time
    ids = np.arange(n, dtype=np.int32)
    keys = jnp.stack([jax.random.key(s) for s in (3, 4)])
    # on device: the library's loop, vmapped over two keys, epochs 0..1
    run = steps.make_step_range(_id_step, batch_size=b, num_examples=n,
                                reduce=steps.per_step(2 * nb))
    run = jax.vmap(run, in_axes=(0, None, None, 0, None, None))
    _, (dev, _) = run(jnp.zeros(2, jnp.int32), jnp.asarray(ids), jnp.asarray(ids), keys, 0, 2 * nb)
    # streamed: the host gathers, one jitted (vmapped) step per batch
    seen = []
    one = jax.jit(jax.vmap(stream.keyed_step(_id_step), in_axes=(0, 0, 0, 0, None, None)))
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
    state = stream.run_range(one, jnp.zeros(2, jnp.int32), (ids, ids), keys, 0, 2 * nb,
                             batch_size=b, num_examples=n,
                             sharding=stream.batch_sharding(mesh, runs=True),
                             on_step=lambda s, m: seen.append(jax.device_get(m)))
    assert np.asarray(state).tolist() == [2 * nb, 2 * nb]
    got_ids = np.stack([m["ids"] for m in seen], axis=1)  # (2, steps, B)
    np.testing.assert_array_equal(got_ids, np.asarray(dev["ids"]))
    np.testing.assert_array_equal(np.stack([m["key"] for m in seen], axis=1),
                                  np.asarray(dev["key"]))
    for r in range(2):  # each epoch: nb*b distinct examples, reshuffled every epoch
        per_epoch = got_ids[r].reshape(2, nb * b)
        assert all(len(set(e)) == nb * b for e in per_epoch.tolist())
        assert per_epoch[0].tolist() != per_epoch[1].tolist()


@pytest.fixture(scope="module")
def toy():
    data = data_dict(n=100)  # 100 % 32 != 0: a partial batch is dropped
    model = tiny_model()
    inits = [(init_vars(model, data["train_x"], seed=s)["params"], {}) for s in (0, 1)]
    return model, data, inits


def test_streamed_ft_equals_on_device(toy):
    model, data, inits = toy
    cfg = dataclasses.replace(FT, epochs=4, patience=1, lr=0.05)
    out = [ft.finetune(model, cfg, inits, [0, 1], data, data["train_x"], data["train_y"],
                       num_classes=3, progress=False, input=inp, project=10)
           for inp in (None, STREAM)]
    (dev, fin_dev), (st, fin_st) = out
    assert any(r["epochs_run"] < cfg.epochs for r in dev)  # early stopping is exercised
    for a, b in zip(dev, st):
        assert (a["best_epoch"], a["epochs_run"]) == (b["best_epoch"], b["epochs_run"])
        for k in ("val_acc", "test_acc", "train_acc", "aie"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)
        for k in a["curves"]:
            np.testing.assert_allclose(a["curves"][k], b["curves"][k], rtol=1e-6, err_msg=k)
        for k in a["adapt"]:
            np.testing.assert_allclose(a["adapt"][k], b["adapt"][k], rtol=1e-6, err_msg=k)
        np.testing.assert_allclose(a["projection"]["zt_best"], b["projection"]["zt_best"],
                                   atol=1e-5)
    _leaves_close(fin_dev, fin_st, rtol=1e-6, atol=1e-7)


def test_streamed_hp_equals_on_device(toy):
    model, data, _ = toy
    x, y = data["train_x"], data["train_y"]
    base = init_vars(model, x)
    kw = dict(seeds=[0, 1], variants={"hp": 0.9}, reinit_blocks=0,
              num_classes=3, progress=False)
    dev = hp.probe(model, base, x, y, HP, **kw)
    st = hp.probe(model, base, x, y, HP, input=STREAM, **kw)
    assert dev.snapshots.keys() == st.snapshots.keys()
    for k in dev.snapshots:
        _leaves_close(dev.snapshots[k], st.snapshots[k], rtol=1e-6, atol=1e-7)
    for a, b in zip(dev.records, st.records, strict=True):
        assert (a["variant"], a["tau"], a["seed"]) == (b["variant"], b["tau"], b["seed"])
        for k in ("hp_train_acc", "hp_train_loss", "aie_hp"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)
    assert dev.records[-1]["hp_train_loss"] != dev.records[0]["hp_train_loss"]  # HP trained


def test_streamed_pretraining_equals_on_device():
    d = data_dict(n=96)
    src = data_lib.Dataset("toy", 3, data_lib.Split(d["train_x"], d["train_y"]),
                           data_lib.Split(d["val_x"], d["val_y"]),
                           data_lib.Split(d["test_x"][:0], d["test_y"][:0]))
    args = (DataConfig(), ModelConfig(backbone="mlp", width=8, depth=2),
            PretrainConfig(epochs=1, batch_size=32), src)
    a, ma = pretrain.train(*args, progress=False)
    b, mb = pretrain.train(*args, progress=False, input=STREAM)
    assert ma == pytest.approx(mb, rel=1e-6)
    _leaves_close(a, b, rtol=1e-6, atol=1e-7)


def test_decide():
    d = stream.decide("auto", 1000, 999, 100, what="FT")
    assert d["input"] == "device" and d["budget"] == 1000
    d = stream.decide("auto", 1000, 1001, 100, what="FT")
    assert d["input"] == "stream" and d["prefetch"] == 2
    assert stream.decide("auto", 250, 1001, 100, what="FT")["prefetch"] == 1
    assert stream.decide("stream", 1000, 10, 100, what="FT")["input"] == "stream"
    assert stream.decide("device", 10, 10**9, 100, what="FT")["input"] == "device"
    with pytest.raises(ValueError, match=r"--data-budget 99 bytes is smaller than one FT "
                                         r"batch \(100 bytes\)"):
        stream.decide("auto", 99, 10**9, 100, what="FT")
    assert byte_size("auto") is None and byte_size("2K") == 2048 and byte_size("1.5GiB") == 3 * 2**29
    assert byte_size("512") == 512


def test_budget_smaller_than_a_batch_is_one_line_and_exit_2(tmp_path, capsys):
    argv = ["sweep", "--quiet", "--runs-dir", str(tmp_path), "--backbone", "mlp",
            "--width", "8", "--depth", "2", "--batch-size", "64"]
    assert main(argv + ["--data-budget", "1K"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--data-budget 1024 bytes is smaller than one HP batch" in err
    assert not os.listdir(tmp_path)  # rejected before config.json
    with pytest.raises(SystemExit) as bad:
        main(argv + ["--data-budget", "lots"])
    assert bad.value.code == 2 and "expected BYTES" in capsys.readouterr().err


_MESH_SCRIPT = """
import dataclasses, json, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from hpft_jax import ft, parallel
from _toy import FT, data_dict, init_vars, tiny_model
data = data_dict(n=128)
model = tiny_model()
inits = [(init_vars(model, data["train_x"], seed=s)["params"], {}) for s in range(4)]
cfg = dataclasses.replace(FT, epochs=2)
out = {"devices": jax.device_count()}
for name, inp in (("device", None), ("stream", {"input": "stream", "prefetch": 2})):
    mesh = parallel.parse_mesh("2,2")
    res, _ = ft.finetune(model, cfg, inits, [0, 1, 2, 3], data, data["train_x"],
                         data["train_y"], num_classes=3, mesh=mesh, progress=False, input=inp)
    out[name] = [[r["curves"]["loss"], r["val_acc"], r["adapt"]["dist_sq"]] for r in res]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_streamed_ft_on_a_runs_by_data_mesh_equals_on_device():
    """4 forced devices, mesh (runs 2, data 2): streamed batches (R, B, ...)
    split over both axes give the on-device results (which equal one
    device's: tests/test_mesh.py)."""
    import json
    import subprocess
    import sys

    from _subprocess import child_env
    env = child_env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    out = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, os.path.dirname(__file__)],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4
    for got, want in zip(res["stream"], res["device"], strict=True):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
