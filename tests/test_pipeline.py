"""The ImageNet input pipeline (hpft_jax.pipeline, DataConfig.pipeline).

Expected values are computed independently here: torchvision's Resize(int)
+ CenterCrop arithmetic written out with Pillow and numpy on the raw tfds
records, the ImageNet statistics applied by hand, and Pillow resizes of
integer crop boxes for the random-resized-crop resampler.
"""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from hpft_jax import data, images, normalization, pipeline
from hpft_jax.config import DataConfig

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def _torchvision_eval(img: np.ndarray, crop: int) -> np.ndarray:
    """Resize(round(crop*256/224)) + CenterCrop(crop) on a PIL image, as
    torchvision does it, then ToTensor + Normalize(ImageNet); (crop, crop, 3)."""
    h, w = img.shape[:2]
    short = int(round(crop * 256 / 224))
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    out = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR), np.float64)
    top, left = int(round((nh - crop) / 2)), int(round((nw - crop) / 2))
    out = out[top:top + crop, left:left + crop] / 255.0
    return (out - MEAN) / STD


def test_eval_resize_crop_and_imagenet_stats_on_variable_size_images(tfds, tmp_path):
    cfg = DataConfig(source="oxford_flowers102", downstream="oxford_flowers102",
                     data_dir=str(tmp_path), image_size=12, pipeline="imagenet")
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_downstream(cfg)
        raw = tfds.data_source("oxford_flowers102", split="test")
        imgs = [np.asarray(raw[i]["image"]) for i in range(len(raw))]
        # the data set's own pipeline squashes instead: a different image
        own = data.load_downstream(DataConfig(source="oxford_flowers102",
                                              downstream="oxford_flowers102",
                                              data_dir=str(tmp_path), image_size=12))
    assert len({im.shape for im in imgs}) > 1  # the mock's sizes vary: no squashing
    np.testing.assert_allclose(ds.mean, MEAN, rtol=1e-6)
    np.testing.assert_allclose(ds.std, STD, rtol=1e-6)
    assert ds.test.x.shape[1:] == (12, 12, 3)
    assert ds.test.x.dtype == np.uint8  # stored as bytes, normalised by the model
    for x, i in zip(ds.test.x, ds.test.origin - ds.test.origin.min()):
        got = np.asarray(images.normalize(x[None], ds.input_norm))[0]
        np.testing.assert_allclose(got, _torchvision_eval(imgs[i], 12), atol=1e-5)
    assert not np.allclose(images.to_unit(own.test.x[0]), images.to_unit(ds.test.x[0]),
                           atol=1e-2)


def test_fixed_size_images_are_resized_and_cropped_too(tfds, tmp_path):
    cfg = DataConfig(source="stl10", downstream="stl10", data_dir=str(tmp_path),
                     image_size=32, pipeline="imagenet")
    with tfds.testing.mock_data(num_examples=4):
        ds = data.load_downstream(cfg)
        raw = tfds.data_source("stl10", split="test")
        img = np.asarray(raw[0]["image"])
    assert img.shape == (96, 96, 3)  # 96 -> resize 37 -> crop 32 (not a plain 96 -> 32)
    got = np.asarray(images.normalize(ds.test.x[:1], ds.input_norm))[0]
    np.testing.assert_allclose(got, _torchvision_eval(img, 32), atol=1e-5)


def test_array_data_resize_crop_and_grey_to_rgb():
    """Arrays (the digits): JAX resize of the shorter side + centre crop,
    grey repeated to RGB, ImageNet stats; checked against the same
    arithmetic on jax.image.resize of the raw digits."""
    from sklearn.datasets import load_digits

    ds = data.load_downstream(DataConfig(distort=False, image_size=7, pipeline="imagenet"))
    raw = load_digits().images.astype(np.float32)[ds.train.origin[:5]] / 16.0
    short = int(round(7 * 256 / 224))  # 8: the digits are already 8x8
    assert short == 8
    top = int(round((8 - 7) / 2))
    want = raw[:, top:top + 7, top:top + 7, None].repeat(3, axis=-1)
    np.testing.assert_allclose(ds.train.x[:5], (want - MEAN) / STD, atol=1e-5)


def test_resize_arithmetic_matches_torchvision_rules():
    assert pipeline.resize_size(224) == 256 and pipeline.resize_size(32) == 37
    assert pipeline.resized_shape(500, 375, 256) == (341, 256)  # int(256 * 500 / 375)
    assert pipeline.resized_shape(375, 500, 256) == (256, 341)
    assert pipeline.crop_offsets(256, 341, 224) == (16, 58)  # round(58.5) = 58 (half to even)


def test_crop_resize_matches_pillow_on_integer_boxes():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (3, 20, 24, 3)).astype(np.float32)
    boxes = np.array([[2, 3, 10, 12], [0, 0, 20, 24], [5, 1, 15, 8]], np.float32)
    out = np.asarray(pipeline.crop_resize(x, boxes))
    for img, (t, l, bh, bw), o in zip(x, boxes.astype(int), out):
        want = np.stack([np.asarray(Image.fromarray(img[t:t + bh, l:l + bw, c], mode="F")
                                    .resize((24, 20), Image.BILINEAR)) for c in range(3)], -1)
        # the whole-image box is the identity; upsampled boxes match Pillow's
        # bilinear to float round-off, away from the border (Pillow clamps
        # its edge weights differently)
        np.testing.assert_allclose(o[2:-2, 2:-2], want[2:-2, 2:-2], atol=2e-5)
    np.testing.assert_allclose(out[1], x[1], atol=1e-6)


def test_rrc_boxes_stay_inside_with_torchvision_ranges():
    boxes = np.asarray(pipeline.rrc_boxes(jax.random.key(0), 4000, 32, 40))
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= 32).all() and (left + bw <= 40).all() and (bh >= 1).all()
    frac = bh * bw / (32 * 40)
    assert frac.max() <= 1.0 and np.quantile(frac, 0.02) < 0.12 and np.median(frac) > 0.3
    unclipped = (bh < 32) & (bw < 40)
    ratio = bw[unclipped] / bh[unclipped]
    assert ratio.min() > 0.6 and ratio.max() < 1.6  # 3/4..4/3 up to rounding
    assert np.unique(top).size > 10 and np.unique(left).size > 10


def test_random_resized_crop_flip_jits_and_flips_about_half():
    x = jax.numpy.broadcast_to(jax.numpy.arange(16.0)[None, None, :, None], (400, 16, 16, 1))
    out = np.asarray(jax.jit(pipeline.random_resized_crop_flip)(x, jax.random.key(1)))
    assert out.shape == x.shape
    increasing = (np.diff(out[:, 8, :, 0], axis=1) >= -1e-5).all(axis=1)
    assert 0.4 < increasing.mean() < 0.6  # a column ramp: flipped ones decrease


def test_pipeline_follows_the_imported_backbones_metadata(tmp_path):
    from hpft_jax import config as C

    imported, own = tmp_path / "in1k", tmp_path / "own"
    for d, norm in ((imported, {"mean": list(MEAN), "std": list(STD)}), (own, None)):
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"model": {}, **({"normalization": norm}
                                                                 if norm else {})}))
    base = C.SweepConfig()
    with_init = lambda p, **d: C.SweepConfig(  # noqa: E731
        pretrain=C.PretrainConfig(init_from=str(p)), data=C.DataConfig(**d))
    assert normalization.resolve(base).data.pipeline is None  # no import: the data set's own
    assert normalization.resolve(with_init(imported)).data.pipeline == "imagenet"
    assert normalization.resolve(with_init(own)).data.pipeline == "dataset"
    assert normalization.resolve(with_init(imported, pipeline="dataset")).data.pipeline \
        == "dataset"  # an explicit choice is kept


def test_distortion_only_on_toy_data_by_default():
    assert DataConfig().distorts()  # digits:0,1,2, the toy default
    assert DataConfig(downstream="mnist:0,1,2").distorts()
    assert DataConfig(downstream="idx:/x").distorts()
    assert not DataConfig(downstream="stl10").distorts()
    assert not DataConfig(downstream="oxford_flowers102").distorts()
    assert DataConfig(downstream="stl10", distort=True).distorts()
    assert not DataConfig(distort=False).distorts()


def test_flowers_table4_split(tfds, tmp_path):
    """Table 4: train (and carved val) from tfds' test split, test = train + val."""
    cfg = DataConfig(downstream="oxford_flowers102", data_dir=str(tmp_path), image_size=8,
                     flowers_split="table4", val_fraction=0.25)
    with tfds.testing.mock_data(num_examples=8):
        ds = data.load_downstream(cfg)
        tfds_split = data.load_downstream(DataConfig(
            downstream="oxford_flowers102", data_dir=str(tmp_path), image_size=8))
    # the base order is test (8), train (8), validation (8)
    pool = np.concatenate([ds.train.origin, ds.val.origin])
    assert sorted(pool.tolist()) == list(range(8))
    assert ds.test.origin.tolist() == list(range(8, 24))
    # the tfds split (the mock lists no splits, so no validation is read):
    # train from tfds' train, test = tfds' test
    assert sorted(np.concatenate([tfds_split.train.origin, tfds_split.val.origin]).tolist()) \
        == list(range(8))
    assert tfds_split.test.origin.tolist() == list(range(8, 16))
