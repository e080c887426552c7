"""Importing torchvision-format ResNets: equal to torch, loud on bad input.

The reference is tests/_torch_resnet.py, torchvision's ResNet in plain torch
with random weights and random BN statistics, in eval mode. Tests that need
torch skip without it; CI installs it through the ``dev`` extra.
"""

import argparse
import json
import os
import sys

import numpy as np
import pytest

from hpft_jax import checkpoint, features as features_lib, weights
from hpft_jax.commands import features as features_cmd, import_weights as import_cmd

TOL = 1e-4  # relative: max |jax - torch| / max |torch|


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def images(n, hw, seed=0):
    return np.random.default_rng(seed).normal(size=(n, hw, hw, 3)).astype(np.float32)


def reference(net, x):
    """torch features (N, h) and logits (N, K) of NHWC images ``x``."""
    import torch

    with torch.no_grad():
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        return net.features(xt).numpy(), net(xt).numpy()


def numpy_sd(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def logits_of(variables, z):
    head = variables["params"]["head"]["out"]
    return z @ np.asarray(head["kernel"]) + np.asarray(head["bias"])


def check_import(path, arch, out, x, net, **kw):
    z_ref, l_ref = reference(net, x)
    variables, meta = weights.import_weights(str(path), arch, str(out), keep_fc=True, **kw)
    z = features_lib.features(str(out), x)
    assert z.shape == z_ref.shape
    assert rel_err(z, z_ref) <= TOL
    assert rel_err(logits_of(variables, z), l_ref) <= TOL
    return meta


# --------------------------------------------------------------------------
# Equal to torch


@pytest.mark.parametrize("arch, stem, hw", [("resnet18", "imagenet", 64),
                                            ("resnet18", "cifar", 32),
                                            ("resnet50", "imagenet", 64)])
def test_pth_state_dict_matches_torch(tr, tmp_path, arch, stem, hw):
    import torch

    net = tr.randomised(arch, stem=stem, seed=1)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    meta = check_import(tmp_path / "w.pth", arch, tmp_path / "out", images(2, hw), net)
    assert meta["model"] == {**meta["model"], "backbone": arch, "stem": stem, "width": 64}
    assert meta["prefix"] == "" and meta["wrapper"] is None and meta["num_classes"] == 1000
    assert meta["source"]["sha256"] == weights.sha256(str(tmp_path / "w.pth"))
    assert meta["normalization"]["mean"] == [0.485, 0.456, 0.406]
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk["source"]["path"] == str(tmp_path / "w.pth")


def test_moco_file_detects_encoder_q_and_prefix_selects_encoder_k(tr, tmp_path):
    """MoCo: {"state_dict": {"module.encoder_q.*", "module.encoder_k.*", "module.queue"}}."""
    import torch

    q, k = tr.randomised("resnet50", seed=2), tr.randomised("resnet50", seed=3)
    sd = {f"module.encoder_q.{n}": t for n, t in q.state_dict().items()}
    sd |= {f"module.encoder_k.{n}": t for n, t in k.state_dict().items()}
    sd["module.queue"] = torch.randn(128, 16)
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": sd}, tmp_path / "moco.pth.tar")
    x = images(2, 64, seed=4)
    meta = check_import(tmp_path / "moco.pth.tar", "resnet50", tmp_path / "q", x, q)
    assert meta["prefix"] == "module.encoder_q." and meta["prefix_detected"]
    assert meta["wrapper"] == "state_dict"
    assert meta["ignored_keys"] == len(k.state_dict()) + 1
    v, meta = weights.import_weights(str(tmp_path / "moco.pth.tar"), "resnet50",
                                     str(tmp_path / "k"), prefix="module.encoder_k")
    assert meta["prefix"] == "module.encoder_k." and not meta["prefix_detected"]
    np.testing.assert_array_equal(v["params"]["backbone"]["layer4_3"]["Conv_2"]["kernel"],
                                  k.layer4[2].conv3.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["batch_stats"]["backbone"]["stem_bn"]["mean"],
                                  k.bn1.running_mean.numpy())


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_safetensors_and_npz_match_torch(tr, tmp_path, fmt):
    net = tr.randomised("resnet18", seed=5)
    sd = {f"backbone.{n}": v for n, v in numpy_sd(net).items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "npz":
        np.savez(path, **sd)
    else:
        safetensors_numpy = pytest.importorskip("safetensors.numpy")
        safetensors_numpy.save_file(sd, str(path))
    meta = check_import(path, "resnet18", tmp_path / "out", images(3, 64, seed=6), net)
    assert meta["prefix"] == "backbone." and meta["source"]["format"] == fmt


def test_dropping_fc_keeps_only_the_backbone(tr, tmp_path):
    net = tr.randomised("resnet18", seed=7, width=8)
    np.savez(tmp_path / "w.npz", **numpy_sd(net))
    variables, meta = weights.import_weights(str(tmp_path / "w.npz"), "resnet18", str(tmp_path / "o"))
    assert set(variables["params"]) == {"backbone"} and not meta["kept_fc"]
    loaded, meta2 = weights.load_imported(str(tmp_path / "o"))
    assert meta2 == meta and set(loaded["params"]) == {"backbone"}
    np.testing.assert_array_equal(
        loaded["batch_stats"]["backbone"]["layer2_1"]["proj_bn"]["var"],
        net.layer2[0].downsample[1].running_var.numpy())
    np.testing.assert_array_equal(
        loaded["params"]["backbone"]["layer1_2"]["Conv_1"]["kernel"],
        net.layer1[1].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_command_line_round_trip(tr, tmp_path):
    """import-weights then features through the command modules' functions."""
    import torch

    net = tr.randomised("resnet50", seed=8, width=16)
    torch.save({"state_dict": {f"module.{n}": t for n, t in net.state_dict().items()}},
               tmp_path / "w.pth")
    x = images(5, 64, seed=9)
    np.save(tmp_path / "x.npy", x)

    def run(cmd, argv):
        p = argparse.ArgumentParser()
        cmd.add_arguments(p)
        cmd.run(p.parse_args(argv))

    run(import_cmd, [str(tmp_path / "w.pth"), "--arch", "resnet50", "--out", str(tmp_path / "ck")])
    run(features_cmd, ["--init-from", str(tmp_path / "ck"), "--input", str(tmp_path / "x.npy"),
                       "--out", str(tmp_path / "z.npy"), "--chunk", "2"])  # 3 chunks, last padded
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (5, 16 * 8 * 4)
    assert rel_err(z, reference(net, x)[0]) <= TOL
    assert sorted(os.listdir(tmp_path)) == ["ck", "w.pth", "x.npy", "z.npy"]  # no temporaries

    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        run(features_cmd, ["--init-from", str(tmp_path / "nope"), "--input",
                           str(tmp_path / "x.npy"), "--out", str(tmp_path / "z2.npy")])
    np.save(tmp_path / "xi.npy", (x * 10).astype(np.int32))
    with pytest.raises(ValueError, match="normalised float images"):
        run(features_cmd, ["--init-from", str(tmp_path / "ck"), "--input",
                           str(tmp_path / "xi.npy"), "--out", str(tmp_path / "z2.npy")])
    assert not (tmp_path / "z2.npy").exists()


# --------------------------------------------------------------------------
# Bad input: one ValueError whose first line names the problem; nothing written


def expect_error(tmp_path, src, arch="resnet18", match="", **kw):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as err:
        weights.import_weights(str(src), arch, str(out), **kw)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    return str(err.value)


@pytest.mark.parametrize("name, content", [("w.npz", b"not a zip"),
                                           ("w.safetensors", b"\x00" * 12),
                                           ("w.txt", b"{}")])
def test_not_a_checkpoint(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    if name.endswith("safetensors"):
        pytest.importorskip("safetensors")
    msg = expect_error(tmp_path, tmp_path / name,
                       match="unknown checkpoint format" if name == "w.txt" else "is not a readable")
    assert "\n" not in msg


def test_not_a_torch_checkpoint(tr, tmp_path):
    (tmp_path / "w.pth").write_text("hello")
    msg = expect_error(tmp_path, tmp_path / "w.pth", match="not a readable PyTorch checkpoint")
    assert "\n" not in msg


def test_pth_without_torch_says_pip_install_torch(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"PK")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    expect_error(tmp_path, tmp_path / "w.pth", match="pip install torch")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "w.npz", a=np.array([{"x": 1}], dtype=object))
    expect_error(tmp_path, tmp_path / "w.npz", match="not a readable .npz")


@pytest.fixture
def small_npz(tr, tmp_path):
    """A width-8 torchvision resnet18 state dict as ``(dict, path)``."""
    sd = numpy_sd(tr.randomised("resnet18", seed=10, width=8))
    np.savez(tmp_path / "w.npz", **sd)
    return sd, tmp_path / "w.npz"


def test_unknown_architecture(small_npz, tmp_path):
    msg = expect_error(tmp_path, small_npz[1], arch="resnet101", match="unknown architecture 'resnet101'")
    assert "\n" not in msg


def test_other_depth_says_which_fits(small_npz, tmp_path):
    msg = expect_error(tmp_path, small_npz[1], arch="resnet50", match="holds resnet18")
    assert "use --arch resnet18" in msg and "\n" not in msg
    msg = expect_error(tmp_path, small_npz[1], arch="resnet34", match="not resnet34")
    assert "use --arch resnet18" in msg


def test_unsupported_depth_is_named(tr, tmp_path):
    np.savez(tmp_path / "w.npz", **numpy_sd(tr.randomised("resnet101", width=4)))
    msg = expect_error(tmp_path, tmp_path / "w.npz", arch="resnet50", match="holds resnet101")
    assert "--arch" not in msg


def test_prefix_that_matches_nothing(small_npz, tmp_path):
    msg = expect_error(tmp_path, small_npz[1], prefix="module.encoder_q",
                       match="prefix 'module.encoder_q.' matches no key")
    assert "\n" not in msg


def test_two_unknown_networks_ask_for_a_prefix(small_npz, tmp_path):
    sd = small_npz[0]
    np.savez(tmp_path / "two.npz", **{f"student.{k}": v for k, v in sd.items()},
             **{f"teacher.{k}": v for k, v in sd.items()})
    expect_error(tmp_path, tmp_path / "two.npz", match=r"\['student.', 'teacher.'\]; choose one with --prefix")


def test_every_missing_unexpected_and_misshapen_key_is_listed(small_npz, tmp_path):
    sd = dict(small_npz[0])
    del sd["layer2.1.bn2.running_var"], sd["layer4.0.conv1.weight"]
    sd["layer1.0.conv9.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    sd["layer3.0.se.fc.weight"] = np.zeros((4, 4), np.float32)
    sd["layer2.0.conv2.weight"] = np.zeros((16, 16, 5, 5), np.float32)
    np.savez(tmp_path / "bad.npz", **sd)
    msg = expect_error(tmp_path, tmp_path / "bad.npz", match="does not fit resnet18")
    assert "2 missing, 2 unexpected, 1 wrong-shape keys" in msg.splitlines()[0]
    for key in ("batch_stats/backbone/layer2_2/BatchNorm_1/var",
                "params/backbone/layer4_1/Conv_0/kernel",
                "layer1.0.conv9.weight", "layer3.0.se.fc.weight",
                "layer2.0.conv2.weight: (16, 16, 5, 5) in the file"):
        assert key in msg


def test_keep_fc_without_fc(small_npz, tmp_path):
    sd = {k: v for k, v in small_npz[0].items() if not k.startswith("fc.")}
    np.savez(tmp_path / "nofc.npz", **sd)
    expect_error(tmp_path, tmp_path / "nofc.npz", keep_fc=True, match="no fc.weight")


def test_out_dir_that_is_not_a_checkpoint_is_left_alone(small_npz, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a checkpoint"):
        weights.import_weights(str(small_npz[1]), "resnet18", str(out))
    assert os.listdir(out) == ["notes.txt"]


def test_reimport_replaces_a_checkpoint_atomically(small_npz, tmp_path):
    out = str(tmp_path / "ck")
    weights.import_weights(str(small_npz[1]), "resnet18", out, keep_fc=True)
    weights.import_weights(str(small_npz[1]), "resnet18", out)
    assert checkpoint.exists(out)
    v, meta = weights.load_imported(out)
    assert not meta["kept_fc"] and "head" not in v["params"]
    assert sorted(os.listdir(tmp_path)) == ["ck", "w.npz"]


def test_load_imported_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        weights.load_imported(str(tmp_path / "missing"))
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        weights.load_imported(str(tmp_path / "half"))
