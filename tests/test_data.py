"""hpft_jax.data: specs, splits, leakage, IDX/npz/tfds readers.

Expected values come from independent sources: scikit-learn's
``load_digits``, arrays written to disk by the test itself, numpy formulas,
and the raw records of ``tfds.data_source``.
"""

import dataclasses
import gzip
import struct
import sys

import numpy as np
import pytest

from hpft_jax import data, images
from hpft_jax.config import DataConfig


def _seen(ds, split):
    """What the model computes on: uint8 splits normalised as the model does."""
    assert split.x.dtype == np.uint8  # byte images stay bytes (hpft_jax.images)
    return np.asarray(images.normalize(split.x, ds.input_norm))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target


def _origins(*splits):
    return [set(s.origin.tolist()) for s in splits]


# --------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize("spec,expected", [
    ("digits", data.DataSpec("digits", "digits", None)),
    ("digits:0,1,2", data.DataSpec("digits", "digits", (0, 1, 2))),
    ("mnist", data.DataSpec("tfds", "mnist", None)),
    ("cifar10:3,5", data.DataSpec("tfds", "cifar10", (3, 5))),
    ("idx:/some/dir", data.DataSpec("idx", "/some/dir", None)),
    ("idx:/some/dir:4,1", data.DataSpec("idx", "/some/dir", (4, 1))),
    ("npz:/a/b.npz", data.DataSpec("npz", "/a/b.npz", None)),
    ("npz:/a/b.npz:0,9", data.DataSpec("npz", "/a/b.npz", (0, 9))),
])
def test_parse_spec(spec, expected):
    parsed = data.parse_spec(spec)
    assert parsed == expected
    assert data.parse_spec(str(parsed)) == parsed


@pytest.mark.parametrize("spec,match", [
    ("mnst", "mnist"),  # unknown tfds name, with the close match
    ("Digits!", "known: 'digits'"),
    ("digits:a,b", "class list"),
    ("digits:1,1", "repeated"),
    ("digits:3", "fewer than 2"),
    ("", "non-empty"),
    ("idx:", "no path"),
])
def test_parse_spec_rejects(spec, match):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=match):
        data.parse_spec(spec)


def test_check_batch_size_message():
    with pytest.raises(ValueError, match="^batch 128 larger than the 37 training "
                                         "examples of digits:0,1,2$"):
        data.check_batch_size(37, 128, what="digits:0,1,2")
    with pytest.raises(ValueError, match="batch size"):
        data.check_batch_size(37, 0, what="x")
    data.check_batch_size(37, 37, what="x")


# --------------------------------------------------------------------------
# Digits: the offline default


def test_default_digits_source_and_downstream(digits):
    images, target = digits
    cfg = DataConfig(distort=False)
    src, down = data.load_source(cfg), data.load_downstream(cfg)
    assert (src.num_classes, down.num_classes) == (10, 3)
    for ds in (src, down):
        assert ds.mean is None and ds.std is None  # digits: [0, 1], no standardisation
        for s in (ds.train, ds.val, ds.test):
            assert s.x.dtype == np.float32 and s.y.dtype == np.int32
            assert s.x.shape[1:] == (8, 8, 1)
            np.testing.assert_array_equal(s.x[..., 0], images[s.origin])  # 0..16 -> /16
            np.testing.assert_array_equal(s.y, target[s.origin])  # 0, 1, 2 keep their labels
    # the downstream pool is every digit 0, 1, 2, split three ways
    tr, va, te = _origins(down.train, down.val, down.test)
    assert not (tr & va or tr & te or va & te)
    assert tr | va | te == set(np.flatnonzero(target < 3).tolist())
    # stratified: per class, round(0.2 n) to val and to test
    for c in range(3):
        n = int((target == c).sum())
        k = int(np.floor(0.2 * n + 0.5))
        assert (down.val.y == c).sum() == k and (down.test.y == c).sum() == k
        assert (down.train.y == c).sum() == n - 2 * k


def test_pretraining_never_sees_downstream_val_or_test_originals(digits):
    _, target = digits
    cfg = DataConfig(source="digits", downstream="digits:0,1,2", seed=4)
    src, down = data.load_source(cfg), data.load_downstream(cfg)
    held_out = set(down.val.origin.tolist()) | set(down.test.origin.tolist())
    s_tr, s_va, s_te = _origins(src.train, src.val, src.test)
    assert not (held_out & (s_tr | s_va | s_te))
    assert not (s_tr & s_va or s_tr & s_te or s_va & s_te)
    assert s_tr | s_va | s_te == set(range(len(target))) - held_out
    assert set(src.train.y.tolist()) == set(range(10))
    # the downstream train originals may be pretrained on, as in the paper
    assert set(down.train.origin.tolist()) <= s_tr | s_va | s_te


def test_splits_deterministic_in_seed():
    a = data.load_downstream(DataConfig(seed=1))
    b = data.load_downstream(DataConfig(seed=1))
    c = data.load_downstream(DataConfig(seed=2))
    for s, t in zip((a.train, a.val, a.test), (b.train, b.val, b.test)):
        np.testing.assert_array_equal(s.origin, t.origin)
        np.testing.assert_array_equal(s.x, t.x)
    assert not np.array_equal(a.val.origin, c.val.origin)


def test_class_subset_is_relabelled_in_the_given_order(digits):
    _, target = digits
    ds = data.load_downstream(DataConfig(downstream="digits:7,2,5", distort=False))
    for s in (ds.train, ds.val, ds.test):
        np.testing.assert_array_equal(np.array([7, 2, 5])[s.y], target[s.origin])
    assert ds.num_classes == 3


def test_per_class_cap():
    ds = data.load_downstream(DataConfig(per_class=20, distort=False))
    for c in range(3):
        counts = [(s.y == c).sum() for s in (ds.train, ds.val, ds.test)]
        assert counts == [12, 4, 4]


def test_distortion_is_fixed_per_original_image(digits):
    images, _ = digits
    cfg = DataConfig(max_rotation=40.0, zoom=(1.0, 1.5), seed=3)
    a = data.load_downstream(cfg)
    # other split fractions move originals between splits; each original keeps its distortion
    b = data.load_downstream(dataclasses.replace(cfg, val_fraction=0.3, test_fraction=0.1))
    xa = {o: x for s in (a.train, a.val, a.test) for o, x in zip(s.origin, s.x)}
    xb = {o: x for s in (b.train, b.val, b.test) for o, x in zip(s.origin, s.x)}
    assert xa.keys() == xb.keys()
    assert all(np.array_equal(xa[o], xb[o]) for o in xa)
    # it is a real distortion: most images change, and mass stays in [0, 1]
    changed = [not np.allclose(xa[o][..., 0], images[o], atol=1e-3) for o in xa]
    assert np.mean(changed) > 0.9
    x = np.stack(list(xa.values()))
    assert x.min() >= 0 and x.max() <= 1 + 1e-6
    # another seed draws other distortions
    c = data.load_downstream(dataclasses.replace(cfg, seed=4))
    xc = {o: x for s in (c.train, c.val, c.test) for o, x in zip(s.origin, s.x)}
    assert np.mean([not np.allclose(xa[o], xc[o]) for o in xa]) > 0.9


def test_zero_distortion_is_identity(digits):
    images, _ = digits
    ds = data.load_downstream(DataConfig(max_rotation=0.0, zoom=(1.0, 1.0)))
    np.testing.assert_allclose(ds.train.x[..., 0], images[ds.train.origin], atol=1e-6)


def test_image_size_resizes_bilinearly(digits):
    from PIL import Image

    images, _ = digits
    ds = data.load_source(DataConfig(image_size=16))
    assert ds.image_shape == (16, 16, 1)
    expected = np.stack([np.asarray(Image.fromarray(images[o]).resize((16, 16), Image.BILINEAR))
                         for o in ds.val.origin[:20]])
    np.testing.assert_allclose(ds.val.x[:20, ..., 0], expected, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(downstream="digits:0,10"), "class 10 does not exist"),
    (dict(per_class=0), "per_class"),
    (dict(zoom=(1.3, 1.0)), "zoom"),
    (dict(max_rotation=-5.0), "max_rotation"),
    (dict(image_size=0), "image_size"),
    (dict(seed=-1), "seed"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_downstream(DataConfig(**kwargs))


# --------------------------------------------------------------------------
# IDX and npz files written by the test


def _write_idx(path, array, code):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, (40, 5, 4), dtype=np.uint8), np.arange(40) % 4),
        "test": (rng.integers(0, 256, (12, 5, 4), dtype=np.uint8), np.arange(12) % 4),
    }
    for split, prefix, gz in (("train", "train", ".gz"), ("test", "t10k", "")):
        x, y = arrays[split]
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{gz}", x, 0x08)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{gz}", y.astype(np.uint8), 0x08)
    return tmp_path, arrays


@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B),
                                        (np.int32, 0x0C), (np.float32, 0x0D)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, dtype, code, suffix):
    a = (np.arange(60).reshape(3, 4, 5) * 3 - 7).astype(dtype)
    path = tmp_path / f"a-idx3{suffix}"
    _write_idx(path, a, code)
    out = data.read_idx(str(path))
    assert out.dtype == a.dtype and out.shape == a.shape
    np.testing.assert_array_equal(out, a)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(str(tmp_path / "bad"))
    _write_idx(tmp_path / "short", np.zeros((2, 3), np.uint8), 0x08)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        data.read_idx(str(tmp_path / "short"))


def test_idx_directory_loads_standardised(idx_dir):
    path, arrays = idx_dir
    cfg = DataConfig(source=f"idx:{path}", downstream="digits:0,1", val_fraction=0.25)
    ds = data.load_source(cfg)
    x_tr, y_tr = arrays["train"]
    x_te, y_te = arrays["test"]
    raw = x_tr.astype(np.float64) / 255
    mean, std = raw.mean(), raw.std()
    np.testing.assert_allclose(ds.mean, [mean], rtol=1e-6)
    np.testing.assert_allclose(ds.std, [std], rtol=1e-6)
    assert ds.num_classes == 4
    # official test split kept whole and in order; origins count train first
    np.testing.assert_array_equal(ds.test.origin, 40 + np.arange(12))
    np.testing.assert_allclose(_seen(ds, ds.test)[..., 0], (x_te / 255 - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(ds.test.y, y_te)
    # val: a quarter of each class of train, disjoint from train
    assert len(ds.val) == 12 and sorted(np.bincount(ds.val.y)) == [3, 3, 3, 3]
    assert not set(ds.train.origin) & set(ds.val.origin)
    assert set(ds.train.origin) | set(ds.val.origin) == set(range(40))
    np.testing.assert_allclose(_seen(ds, ds.train)[..., 0], (x_tr[ds.train.origin] / 255 - mean) / std,
                               atol=1e-5)
    np.testing.assert_array_equal(ds.train.y, y_tr[ds.train.origin])


def test_idx_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_source(DataConfig(source=f"idx:{tmp_path}"))


def test_same_base_idx_excludes_downstream_val_from_pretraining(idx_dir):
    path, _ = idx_dir
    cfg = DataConfig(source=f"idx:{path}", downstream=f"idx:{path}:2,0", distort=False)
    src, down = data.load_source(cfg), data.load_downstream(cfg)
    assert not set(src.train.origin) & set(down.val.origin)
    assert not set(src.val.origin) & set(down.val.origin)
    assert set(down.test.origin) == set(40 + np.flatnonzero(np.arange(12) % 4 % 2 == 0))
    # the official test split is only evaluated on: pretraining keeps all of it
    np.testing.assert_array_equal(src.test.origin, 40 + np.arange(12))
    assert len(src.train) + len(src.val) == 40 - len(down.val)
    np.testing.assert_array_equal(src.mean, down.mean)  # one base set, one normalisation


@pytest.fixture
def npz_file(tmp_path):
    rng = np.random.default_rng(1)
    arrays = dict(
        x_train=rng.integers(0, 256, (30, 6, 6, 3), dtype=np.uint8), y_train=np.arange(30) % 5,
        x_test=rng.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8), y_test=np.arange(10) % 5,
    )
    np.savez(tmp_path / "d.npz", **arrays)
    return tmp_path / "d.npz", arrays


def test_npz_per_channel_standardisation_and_subset(npz_file):
    path, a = npz_file
    ds = data.load_downstream(DataConfig(downstream=f"npz:{path}:4,1", distort=False))
    raw = a["x_train"].astype(np.float64) / 255
    mean, std = raw.mean(axis=(0, 1, 2)), raw.std(axis=(0, 1, 2))
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(ds.std, std, rtol=1e-6)
    keep = np.flatnonzero(np.isin(a["y_test"], [4, 1]))
    np.testing.assert_array_equal(ds.test.origin, 30 + keep)
    np.testing.assert_array_equal(ds.test.y, (a["y_test"][keep] == 1).astype(np.int32))
    np.testing.assert_allclose(_seen(ds, ds.test), (a["x_test"][keep] / 255 - mean) / std, atol=1e-5)


def test_npz_official_val_and_missing_arrays(tmp_path, npz_file):
    path, a = npz_file
    np.savez(tmp_path / "v.npz", **a, x_val=a["x_test"][:5], y_val=a["y_test"][:5])
    ds = data.load_source(DataConfig(source=f"npz:{tmp_path / 'v.npz'}"))
    np.testing.assert_array_equal(ds.val.origin, 30 + np.arange(5))  # used as is
    assert len(ds.train) == 30 and len(ds.test) == 10
    np.savez(tmp_path / "bad.npz", x_train=a["x_train"], y_train=a["y_train"])
    with pytest.raises(ValueError, match=r"lacks arrays \['x_test', 'y_test'\]"):
        data.load_source(DataConfig(source=f"npz:{tmp_path / 'bad.npz'}"))


# --------------------------------------------------------------------------
# tensorflow-datasets


@pytest.fixture
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def _raw_tfds(tfds, name, split):
    ds = tfds.data_source(name, split=split)
    x = np.stack([np.asarray(ds[i]["image"]) for i in range(len(ds))])
    return x, np.array([int(ds[i]["label"]) for i in range(len(ds))])


def test_tfds_mock_cifar_subset(tfds, tmp_path):
    cfg = DataConfig(source="cifar10", downstream="cifar10:3,5", data_dir=str(tmp_path),
                     distort=False)
    with tfds.testing.mock_data(num_examples=40):
        ds = data.load_downstream(cfg)
        x_tr, y_tr = _raw_tfds(tfds, "cifar10", "train")
        x_te, y_te = _raw_tfds(tfds, "cifar10", "test")
    raw = x_tr.astype(np.float64) / 255
    mean, std = raw.mean(axis=(0, 1, 2)), raw.std(axis=(0, 1, 2))
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-5)
    assert ds.num_classes == 2 and ds.image_shape == (32, 32, 3)
    keep = np.flatnonzero(np.isin(y_te, [3, 5]))
    np.testing.assert_array_equal(ds.test.origin - 40, keep)
    np.testing.assert_array_equal(ds.test.y, (y_te[keep] == 5).astype(np.int32))
    np.testing.assert_allclose(_seen(ds, ds.test), (x_te[keep] / 255 - mean) / std, atol=1e-4)
    tr = ds.train.origin
    np.testing.assert_allclose(_seen(ds, ds.train), (x_tr[tr] / 255 - mean) / std, atol=1e-4)
    np.testing.assert_array_equal(ds.train.y, (y_tr[tr] == 5).astype(np.int32))


def test_tfds_mock_grey_and_variable_size(tfds, tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        mnist = data.load_source(DataConfig(source="mnist", data_dir=str(tmp_path),
                                            image_size=14))
        assert mnist.image_shape == (14, 14, 1) and mnist.num_classes == 10
        flowers = data.load_source(DataConfig(source="oxford_flowers102",
                                              data_dir=str(tmp_path), image_size=16))
        assert flowers.image_shape == (16, 16, 3) and flowers.num_classes == 102
        with pytest.raises(ValueError, match="vary in size; set image_size"):
            data.load_source(DataConfig(source="oxford_flowers102", data_dir=str(tmp_path)))


def test_tfds_unprepared_data_fails_fast_and_says_where(tfds, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not prepared.*--download.*tensorflow-cpu"):
        data.load_source(DataConfig(source="mnist", data_dir=str(tmp_path)))


def test_tfds_real_array_record_round_trip(tfds, tmp_path):
    """A tiny data set prepared for real (array_record, no TensorFlow needed
    for Tensor features), then read back by name with a validation split."""
    rng = np.random.default_rng(2)
    splits = {s: (rng.integers(0, 256, (n, 4, 3, 3), dtype=np.uint8), np.arange(n) % 3)
              for s, n in (("train", 9), ("validation", 6), ("test", 6))}

    class HpftTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, supervised_keys=("pixels", "digit"),
                features=tfds.features.FeaturesDict({
                    "pixels": tfds.features.Tensor(shape=(4, 3, 3), dtype=np.uint8),
                    "digit": tfds.features.ClassLabel(num_classes=3),
                    "index": tfds.features.Scalar(dtype=np.int64)}))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in splits}

        def _generate_examples(self, split):
            x, y = splits[split]
            for i in range(len(y)):
                yield i, {"pixels": x[i], "digit": int(y[i]), "index": i}

    HpftTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ds = data.load_source(DataConfig(source="hpft_tiny_images", data_dir=str(tmp_path)))
    raw = splits["train"][0] / 255.0
    mean, std = raw.mean(axis=(0, 1, 2)), raw.std(axis=(0, 1, 2))
    for split, got, offset in (("train", ds.train, 0), ("validation", ds.val, 9),
                               ("test", ds.test, 15)):
        x, y = splits[split]
        # preparation shuffles the records: read their order back independently
        records = tfds.data_source("hpft_tiny_images", split=split, data_dir=str(tmp_path))
        order = np.array([int(records[i]["index"]) for i in range(len(records))])
        assert sorted(order) == list(range(len(y)))
        np.testing.assert_array_equal(got.origin, offset + np.arange(len(y)))
        np.testing.assert_allclose(_seen(ds, got), (x[order] / 255 - mean) / std, atol=1e-5)
        np.testing.assert_array_equal(got.y, y[order])


def test_missing_tfds_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises
    assert data.parse_spec("mnist") == data.DataSpec("tfds", "mnist", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[tfds\]"'):
        data.load_source(DataConfig(source="mnist"))

