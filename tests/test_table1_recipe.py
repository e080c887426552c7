"""README "Reproduce Table 1", end to end, offline, at tiny scale.

The README's own commands run verbatim (read from the README), with flags
appended that make them tiny: a width-4 ResNet-50 in torchvision's format
with random weights saved as the file name the README downloads, STL10 from
``tfds.testing.mock_data``, 32-px images, τ ∈ {0, 1, 2}, one seed, 2 FT
epochs. Only the download and the tfds preparation (network) are not run.
"""

import json
import os
import re
import shlex
import sys

import numpy as np
import pytest

from hpft_jax import config as C, normalization, presets
from hpft_jax.cli import main
from hpft_jax.runlog import RunDir

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
TINY = ["--width", "4", "--image-size", "32", "--tau", "0,1,2", "--seeds", "0",
        "--ft-epochs", "2", "--batch-size", "8", "--quiet"]


def readme_commands() -> list[str]:
    """The ``hpft`` lines of the README's "Reproduce Table 1" code block."""
    with open(README) as f:
        text = f.read()
    section = text.split("## Reproduce Table 1", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines()
            if line.startswith("hpft ")]


@pytest.mark.slow  # ResNet-50 compiles (HP trunk, FT step, eval): ~4 min on a loaded 2-core CPU
def test_readme_recipe_end_to_end(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    tfds = pytest.importorskip("tensorflow_datasets")
    sys.path.insert(0, os.path.dirname(__file__))
    import _torch_resnet

    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["import-weights", "sweep"]
    ckpt_name = shlex.split(commands[0])[2]
    assert ckpt_name == "resnet50-0676ba61.pth"  # torchvision's IMAGENET1K_V1 file
    monkeypatch.chdir(tmp_path)
    net = _torch_resnet.randomised("resnet50", seed=3, width=4)
    torch.save(net.state_dict(), ckpt_name)  # what torchvision's file holds: a plain state dict

    assert main(shlex.split(commands[0])[1:]) == 0
    assert "prefix '' (detected)" in capsys.readouterr().out
    sweep = shlex.split(commands[1])[1:]
    runs = str(tmp_path / "runs")
    with tfds.testing.mock_data(num_examples=40):
        assert main(sweep + ["--print-config"] + TINY) == 0
        printed = json.loads(capsys.readouterr().out)
        assert not os.path.exists("runs")  # --print-config writes nothing
        assert main(sweep + TINY + ["--runs-dir", runs]) == 0

    name = sweep[sweep.index("--name") + 1]
    run = RunDir(os.path.join(runs, name))
    with open(run.config_file) as f:
        cfg = C.from_dict(C.SweepConfig, json.load(f))
    assert C.to_dict(cfg) == {**printed, "runs_dir": runs}
    # the preset's App. B.2 settings, the tiny overrides, the backbone's pipeline
    assert (cfg.hp.lr, cfg.ft.lr, cfg.ft.momentum, cfg.ft.schedule) == (1e-2, 3e-4, 0.9, "cosine")
    assert cfg.ft.early_stopping and cfg.model.head_hidden == 256
    assert (cfg.model.backbone, cfg.model.stem, cfg.model.width) == ("resnet50", "imagenet", 4)
    assert cfg.data.pipeline == "imagenet" and cfg.data.augment == "rrc_flip"
    assert not cfg.data.distorts()  # STL10 is not rotated
    assert cfg.hp.taus == (0, 1, 2) and cfg.data.image_size == 32
    (pre,) = run.records("pretrain")
    assert pre["imported"] and pre["path"] == os.path.abspath("ckpt/sup_in1k_resnet50")

    fts = list(run.records("ft"))
    assert sorted((r["variant"], r["tau"]) for r in fts) == [
        ("hp", 0), ("hp", 1), ("hp", 2), ("lshp", 2)]
    for r in fts:
        assert np.isfinite([r["aie"], r["val_acc"], r["test_acc"], *r["adapt"].values(),
                            *r["adapt_last"].values()]).all()
        assert r["epochs_run"] <= 2
    # the projection of the HP runs of the first seed, 100 inputs at most
    proj = {r["tau"]: r["projection"] for r in fts if "projection" in r}
    assert sorted(proj) == [0, 1, 2]
    assert len(proj[0]["z0"]) == len(proj[0]["y"]) == min(100, len(proj[0]["idx"]))
    with open(os.path.join(run.path, "report.md")) as f:
        report = f.read()
    assert "best-validation model" in report and "--zt last" in report
    assert os.path.exists(os.path.join(run.path, "figures", "projection.png"))


def test_the_presets_resolve_to_the_papers_numbers():
    """App. B.1 / B.2 as the presets encode them (the paper's text, by hand)."""
    base = C.SweepConfig()
    assert presets.apply(base, "toy-fast") == base  # the default, unchanged
    toy = presets.apply(base, "toy-paper")
    assert (toy.hp.lr, toy.ft.lr, toy.ft.epochs) == (1e-4, 1e-4, 50)
    assert (toy.ft.schedule, toy.ft.momentum, toy.ft.early_stopping) == ("constant", 0.0, False)
    assert toy.data == base.data and toy.data.distorts()  # the toy keeps its rotation/zoom
    for name, hp_lr in (("vision-in1k", 1e-2), ("vision-in1k-flowers", 5e-2),
                        ("vision-in1k-cifar", 5e-3)):
        v = presets.apply(base, name)
        assert (v.hp.lr, v.ft.lr, v.ft.batch_size, v.hp.batch_size) == (hp_lr, 3e-4, 128, 128)
        assert v.hp.taus == (0, 1, 2, 4, 8, 16, 32, 64, 128, 200)
        assert v.data.distort is False and v.data.pipeline == "imagenet"
    cifar = presets.apply(base, "vision-cifar")
    assert (cifar.hp.lr, cifar.ft.lr, cifar.ft.epochs) == (3e-2, 3e-3, 200)
    assert (cifar.pretrain.optimizer, cifar.pretrain.lr, cifar.pretrain.weight_decay) == \
        ("sgd", 1e-2, 5e-4)
    assert presets.apply(base, "vision-in1k-flowers").data.flowers_split == "table4"
    assert normalization.resolve(presets.apply(base, "vision-in1k")).data.pipeline == "imagenet"


def test_flags_override_a_preset_and_print_config(capsys):
    assert main(["sweep", "--preset", "toy-paper", "--ft-epochs", "7", "--ft-momentum", "0.5",
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["ft"]["epochs"] == 7 and cfg["ft"]["momentum"] == 0.5
    assert cfg["ft"]["lr"] == 1e-4 and cfg["hp"]["lr"] == 1e-4
    assert main(["drift", "--preset", "toy-paper", "--print-config"]) == 0
    drift = json.loads(capsys.readouterr().out)
    assert drift["sweep"]["ft"]["schedule"] == "constant" and drift["sweep"]["name"] == "drift"
    assert main(["sweep", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == C.to_dict(C.SweepConfig())


@pytest.mark.parametrize("argv, match", [
    (["--preset", "toy-papr"], "unknown preset 'toy-papr'. Did you mean toy-paper"),
    (["--preset", "vision"], "Known: toy-fast, toy-paper, vision-in1k"),
    (["--ft-schedule", "linear"], "ft.schedule must be 'cosine' or 'constant'"),
    (["--ft-momentum", "1.5"], "ft.momentum must lie in [0, 1)"),
    (["--pretrain-optimizer", "rmsprop"], "optimizer must be 'adam' or 'sgd'"),
    (["--pipeline", "inception"], "pipeline must be 'dataset' or 'imagenet'"),
    (["--flowers-split", "paper"], "flowers_split must be 'tfds' or 'table4'"),
    (["--augment", "mixup"], "augment must be one of"),
])
def test_bad_presets_and_flags_exit_2_writing_nothing(tmp_path, capsys, argv, match):
    for cmd in ("sweep", "eq2"):
        assert main([cmd, "--runs-dir", str(tmp_path), *argv, "--print-config"]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv", [["--early-stopping", "maybe"], ["--distort", "sometimes"],
                                  ["--print-config", "--bogus"]])
def test_unparseable_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", *argv])
    assert e.value.code == 2
