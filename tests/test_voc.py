"""VOC layout reader, generated look-alike data, and bad input."""

import os

import numpy as np
import pytest
from PIL import Image

from hpft_jax import data, voc
from hpft_jax.config import DataConfig


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("voc"))
    voc.generate(r, num_train=10, num_val=4, num_classes=4)
    return r


def test_palette_is_vocs():
    pal = voc.palette()
    assert tuple(pal[0]) == (0, 0, 0) and tuple(pal[1]) == (128, 0, 0)
    assert tuple(pal[2]) == (0, 128, 0) and tuple(pal[15]) == (192, 128, 128)  # person
    assert tuple(pal[255]) == (224, 224, 192)  # void / borders


def test_voc_spec_loads_splits_and_masks(root):
    ds = data.load_downstream(DataConfig(source="digits", downstream=f"voc:{root}",
                                         image_size=32, val_fraction=0.2))
    assert ds.task == "segmentation" and ds.num_classes == 21
    assert len(ds.train) == 8 and len(ds.val) == 2 and len(ds.test) == 4
    assert ds.train.x.shape == (8, 32, 32, 3) and ds.train.y.shape == (8, 32, 32)
    assert set(np.unique(ds.train.y)) <= {0, 1, 2, 3, 255}
    assert set(ds.train.origin) | set(ds.val.origin) == set(range(10))
    # Independent: the PNG's indices, resized by nearest neighbour and centre-cropped.
    ids = _ids(root, "val")
    m = _png(os.path.join(root, "SegmentationClass", ids[0] + ".png"))
    h, w = m.shape
    s = 32 / min(h, w)
    nh, nw = max(32, round(h * s)), max(32, round(w * s))
    rows = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(int), h - 1)
    cols = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(int), w - 1)
    t, l = (nh - 32) // 2, (nw - 32) // 2
    want = m[rows][:, cols][t:t + 32, l:l + 32]
    np.testing.assert_array_equal(ds.test.y[0], want)
    # Standardised with ImageNet's constants.
    with Image.open(os.path.join(root, "JPEGImages", ids[0] + ".jpg")) as im:
        img = np.array(im.convert("RGB"))
    x0 = (np.array(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))[t:t + 32, l:l + 32]
          / 255.0 - voc.IMAGENET_MEAN) / voc.IMAGENET_STD
    np.testing.assert_allclose(ds.test.x[0], x0, atol=1e-5)


def _ids(r, split):
    with open(os.path.join(r, "ImageSets/Segmentation", split + ".txt")) as f:
        return f.read().split()


def _png(path):
    with Image.open(path) as im:
        return np.array(im)


def _copy(root, tmp_path):
    import shutil

    dst = str(tmp_path / "bad")
    shutil.copytree(root, dst)
    return dst


def test_bad_mask_value(root, tmp_path):
    r = _copy(root, tmp_path)
    ids = _ids(r, "train")
    path = os.path.join(r, "SegmentationClass", ids[3] + ".png")
    m = _png(path)
    m[0, 0] = 30
    p = Image.fromarray(m, mode="P")
    p.putpalette(voc.palette().reshape(-1).tolist())
    p.save(path)
    with pytest.raises(ValueError, match=r"values \[30\] are neither a class \(0..20\) nor 255"):
        voc.read(r, "train", 32)


def test_size_mismatch_and_missing_image(root, tmp_path):
    r = _copy(root, tmp_path)
    ids = _ids(r, "train")
    Image.new("RGB", (7, 9)).save(os.path.join(r, "JPEGImages", ids[1] + ".jpg"))
    with pytest.raises(ValueError, match=f"image {ids[1]} is 7x9 but its mask is"):
        voc.read(r, "train", 32)
    with open(os.path.join(r, "ImageSets/Segmentation/val.txt"), "a") as f:
        f.write("2008_999999\n")
    with pytest.raises(FileNotFoundError, match="names '2008_999999' but JPEGImages/2008_999999"):
        voc.read(r, "val", 32)


def test_size_must_suit_the_output_stride(root):
    with pytest.raises(ValueError, match="multiple of 16"):
        data.load_downstream(DataConfig(downstream=f"voc:{root}", image_size=40))


def test_augment_must_move_masks_for_voc_and_only_for_voc(root):
    with pytest.raises(ValueError, match="moves images but not masks"):
        data.load_downstream(DataConfig(downstream=f"voc:{root}", image_size=32,
                                        augment="flip_crop"))
    with pytest.raises(ValueError, match="moves segmentation masks"):
        data.load_downstream(DataConfig(downstream="digits:0,1", augment="scale_crop_flip"))
    ds = data.load_downstream(DataConfig(downstream=f"voc:{root}", image_size=32,
                                         augment="scale_crop_flip"))
    assert ds.train.x.shape == (8, 32, 32, 3)  # the stored arrays stay the eval transform
