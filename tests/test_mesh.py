"""The (runs, data) mesh: 8 vmapped FT runs on 4 forced host devices, 2 per
device, give the 1-device results; bad meshes are refused."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from hpft_jax import ft, hp, parallel
    from hpft_jax.config import HPConfig
    from hpft_jax.params import merge
    from _toy import FT, data_dict, init_vars, tiny_model
    data = data_dict(n=128)
    model = tiny_model()
    base = init_vars(model, data["train_x"])
    seeds = [0, 1, 2, 3]
    probe = hp.probe(model, base, data["train_x"], data["train_y"],
                     HPConfig(taus=(0, 2), lr=0.05, batch_size=32), seeds=seeds,
                     variants={{"hp": 1.0}}, reinit_blocks=0, num_classes=3, progress=False)
    inits, run_seeds = [], []
    for tau in (0, 2):
        for i, s in enumerate(seeds):
            head = jax.tree_util.tree_map(lambda a: a[i], probe.snapshots[("hp", tau)][0])
            inits.append((merge(probe.frozen_params, head), {{}}))
            run_seeds.append(s)
    out = {{"devices": jax.device_count()}}
    for spec in {specs!r}:
        mesh = parallel.parse_mesh(spec)
        n = {n_runs}
        res, final = ft.finetune(model, FT, inits[:n], run_seeds[:n], data, data["train_x"],
                                 data["train_y"], num_classes=3, mesh=mesh, progress=False)
        # The program's own output placement: one epoch on the placed carry.
        params0 = ft._stack([p for p, _ in parallel.pad_runs(inits[:n], mesh)])
        stats0 = ft._stack([s for _, s in parallel.pad_runs(inits[:n], mesh)])
        params0, stats0 = parallel.put_runs((params0, stats0), mesh)
        carry = ft._init_program(FT, 128)(params0, stats0)
        keys = parallel.put_runs(jax.random.split(jax.random.key(0), len(parallel.pad_runs(inits[:n], mesh))), mesh)
        dev = parallel.put_replicated({{k: jax.numpy.asarray(v) for k, v in data.items()}}, mesh)
        carry, _ = ft._epoch_program(model, FT, 3, 128, mesh, "none")(carry, dev, keys, 0, None)
        leaf = jax.tree_util.tree_leaves(carry.state.params)[-1]
        out[spec] = {{
            "shard_rows": sorted(int(sh.data.shape[0]) for sh in leaf.addressable_shards),
            "shard_devices": len({{sh.device for sh in leaf.addressable_shards}}),
            "spec": [str(a) for a in leaf.sharding.spec],
            "final_rows": int(jax.tree_util.tree_leaves(final)[0].shape[0]),
            "loss": [r["curves"]["loss"] for r in res],
            "val": [r["val_acc"] for r in res],
            "adapt": [r["adapt"]["dist_sq"] for r in res]}}
    print(json.dumps(out))
""")


def _run(n_devices: int, specs, n_runs=8) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), specs=list(specs),
                         n_runs=n_runs)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _same(a, b):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
    np.testing.assert_allclose(a["val"], b["val"], rtol=1e-6)
    np.testing.assert_allclose(a["adapt"], b["adapt"], rtol=1e-4)


@pytest.mark.slow
def test_eight_runs_on_four_devices_two_each_match_one_device():
    one = _run(1, ["data"])
    four = _run(4, ["runs", "2,2"])
    assert one["devices"] == 1 and four["devices"] == 4
    # every device holds 2 of the 8 runs' parameters (runs axis of size 4) ...
    assert four["runs"]["shard_rows"] == [2, 2, 2, 2] and four["runs"]["shard_devices"] == 4
    assert four["runs"]["spec"][:1] == ["runs"]
    # ... or 4 of them with a 2 x 2 (runs x data) mesh, batches split over data
    assert four["2,2"]["shard_rows"] == [4, 4, 4, 4]
    for spec in ("runs", "2,2"):
        _same(four[spec], one["data"])
    assert one["data"]["shard_rows"] == [8]


@pytest.mark.slow
def test_run_count_not_dividing_the_runs_axis_is_padded():
    six = _run(4, ["runs"], n_runs=6)
    ref = _run(1, ["data"], n_runs=6)
    assert six["runs"]["final_rows"] == 6 and len(six["runs"]["loss"]) == 6
    assert six["runs"]["shard_rows"] == [2, 2, 2, 2]  # 6 runs padded to 8
    _same(six["runs"], ref["data"])


@pytest.mark.parametrize("spec, msg", [("3,1", "do not divide the 1 devices"),
                                       ("1,2", "needs 2 devices; there are 1"),
                                       ("x", "expected data, runs or R,D")])
def test_bad_mesh_is_one_line_and_writes_nothing(tmp_path, capsys, spec, msg):
    from hpft_jax.cli import main
    assert main(["sweep", "--quiet", "--runs-dir", str(tmp_path), "--mesh", spec]) == 2
    assert msg in capsys.readouterr().err
    assert not os.listdir(tmp_path)
