"""The segmentation sweep end to end (App. B.3's path at tiny scale, offline).

Two generated VOC-layout sets (``hpft make-voc``) as source and downstream, a
width-4 ResNet-50 with random weights in torchvision's format imported with
``hpft import-weights`` (the ImageNet backbone's path), ``--preset
vision-voc`` with flags that make it tiny (32 px, τ ∈ {0, 2}, one seed, two
FT epochs). Checks records, the HP feature cache's logged size, the report's
mIoU labels and its figures, the predicted-mask figure included.
"""

import os
import sys

import numpy as np
import pytest

from hpft_jax.cli import main
from hpft_jax.runlog import RunDir

SIZE, WIDTH = 32, 4
TINY = ["--quiet", "--preset", "vision-voc", "--width", str(WIDTH), "--image-size", str(SIZE),
        "--tau", "0,2", "--ft-epochs", "2", "--seeds", "0", "--batch-size", "4",
        "--ls-eta", "none"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, os.path.dirname(__file__))
    import _torch_resnet

    root = tmp_path_factory.mktemp("seg")
    assert main(["make-voc", str(root / "src"), "--seed", "0"]) == 0
    assert main(["make-voc", str(root / "down"), "--seed", "1", "--classes", "3"]) == 0
    net = _torch_resnet.randomised("resnet50", seed=3, width=WIDTH)
    torch.save(net.state_dict(), root / "r50.pth")
    assert main(["import-weights", str(root / "r50.pth"), "--arch", "resnet50",
                 "--out", str(root / "w")]) == 0
    return root


@pytest.mark.slow  # ~2 min of CPU (4 min on a loaded 2-core CPU): ResNet-50 programs compile
def test_segmentation_sweep_end_to_end(setup, tmp_path, capsys):
    root = setup
    argv = ["sweep", *TINY, "--source", f"voc:{root / 'src'}", "--downstream",
            f"voc:{root / 'down'}", "--init-from", str(root / "w"), "--runs-dir",
            str(tmp_path), "--name", "seg"]
    assert main(argv) == 0
    run = RunDir(str(tmp_path / "seg"))
    ft = sorted(run.records("ft"), key=lambda r: r["tau"])
    assert [r["tau"] for r in ft] == [0, 2]
    for r in ft:
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1  # mIoU
        for k in ("adapt", "adapt_dense"):  # pooled vector; per location of the map
            assert set(r[k]) >= {"dist_sq", "cos"} and np.isfinite(r[k]["cos"])
    # HP cached the backbone's feature maps: N·h·w·C·4 bytes, from the config alone
    n = len((root / "down/ImageSets/Segmentation/train.txt").read_text().split())
    n_train = n - int(round(0.2 * n))  # train.txt minus the held-out validation part
    (cache,) = run.records("hp_cache")
    h = SIZE // 16
    assert cache["shape"] == [n_train, h, h, 2048 * WIDTH // 64]
    assert cache["bytes"] == n_train * h * h * (2048 * WIDTH // 64) * 4
    assert cache["steps_use_cache"]
    with open(os.path.join(run.path, "report.md")) as f:
        text = f.read()
    assert "test mIoU (%)" in text and "test accuracy" not in text
    assert "E cos(z_T, z_0) per location" in text and "E cos(z_T, z_0) pooled" in text
    for name in ("aie_vs_tau.png", "adaptation_vs_tau.png", "ft_acc_vs_tau.png",
                 "masks.png"):
        assert os.path.getsize(os.path.join(run.path, "figures", name)) > 1000
