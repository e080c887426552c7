"""Data parallelism: 4 (forced host) devices give the 1-device results."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax
    from hpft_jax import ft, hp
    from hpft_jax.config import HPConfig
    from _toy import FT, data_dict, init_vars, tiny_model
    data = data_dict(n=128)
    model = tiny_model()
    base = init_vars(model, data["train_x"])
    probe = hp.probe(model, base, data["train_x"], data["train_y"],
                     HPConfig(taus=(0, 2), lr=0.05, batch_size=32), seeds=[0],
                     variants={{"hp": 1.0}}, reinit_blocks=0, num_classes=3, progress=False)
    head = jax.tree_util.tree_map(lambda a: a[0], probe.snapshots[("hp", 2)][0])
    from hpft_jax.params import merge
    res, _ = ft.finetune(model, FT, [(merge(probe.frozen_params, head), {{}})], [0], data,
                         data["train_x"], data["train_y"], num_classes=3, progress=False)
    print(json.dumps({{"devices": jax.device_count(), "hp": probe.records[-1]["hp_train_loss"],
                      "loss": res[0]["curves"]["loss"], "adapt": res[0]["adapt"]}}))
""")


def _run(n_devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_four_devices_match_one():
    one, four = _run(1), _run(4)
    assert one["devices"] == 1 and four["devices"] == 4
    np.testing.assert_allclose(four["hp"], one["hp"], rtol=1e-5)
    np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-4)
    for k in one["adapt"]:
        np.testing.assert_allclose(four["adapt"][k], one["adapt"][k], rtol=1e-4, err_msg=k)
