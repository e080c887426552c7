"""uint8 images end to end: stored raw on host and device, normalised inside
the jitted programs; the same numbers as normalising on the host."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpft_jax import config as C
from hpft_jax import data, images, parallel, steps
from hpft_jax.models import make_classifier
from hpft_jax.sweep import run_sweep


@pytest.fixture
def npz_file(tmp_path):
    rng = np.random.default_rng(3)
    y_tr, y_te = np.arange(96) % 3, np.arange(24) % 3
    # class-dependent brightness so that training learns something
    x_tr = np.clip(rng.normal(60 + 60 * y_tr[:, None, None, None], 40, (96, 6, 6, 3)), 0, 255)
    x_te = np.clip(rng.normal(60 + 60 * y_te[:, None, None, None], 40, (24, 6, 6, 3)), 0, 255)
    a = dict(x_train=x_tr.astype(np.uint8), y_train=y_tr, x_test=x_te.astype(np.uint8),
             y_test=y_te)
    np.savez(tmp_path / "d.npz", **a)
    return str(tmp_path / "d.npz"), a


def _host_normalised(ds, split):
    """The float path, in numpy: (x / 255 - mean) / std per channel, float32."""
    x = split.x.astype(np.float32) / np.float32(255)
    return (x - ds.mean) / ds.std


def test_images_stay_uint8_and_norm_is_the_train_statistics(npz_file):
    path, a = npz_file
    ds = data.load_downstream(C.DataConfig(downstream=f"npz:{path}", distort=False))
    for s in (ds.train, ds.val, ds.test):
        assert s.x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train.x, a["x_train"][ds.train.origin])
    raw = a["x_train"].astype(np.float64) / 255
    mean, std = ds.input_norm
    np.testing.assert_allclose(mean, raw.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, raw.std(axis=(0, 1, 2)), rtol=1e-6)
    digits = data.load_downstream(C.DataConfig())  # the toy: float32, no norm
    assert digits.train.x.dtype == np.float32 and digits.input_norm is None


@pytest.mark.parametrize("backbone", ["mlp", pytest.param("resnet_tiny", marks=pytest.mark.slow)])
def test_uint8_logits_equal_host_normalised_logits(npz_file, backbone):
    path, _ = npz_file
    ds = data.load_downstream(C.DataConfig(downstream=f"npz:{path}", distort=False))
    cfg = C.ModelConfig(backbone=backbone, width=8, depth=2)
    m8 = make_classifier(cfg, 3, input_norm=ds.input_norm)
    mf = make_classifier(cfg, 3)
    xf = _host_normalised(ds, ds.test)
    v = mf.init(jax.random.key(0), jnp.asarray(xf[:2]))
    l8, z8 = jax.jit(lambda v, x: m8.apply(v, x))(v, jnp.asarray(ds.test.x))
    lf, zf = jax.jit(lambda v, x: mf.apply(v, x))(v, jnp.asarray(xf))
    np.testing.assert_allclose(l8, lf, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z8, zf, rtol=1e-5, atol=1e-5)
    t8 = m8.apply(v, jnp.asarray(ds.test.x), split=1, method=m8.trunk)
    tf = mf.apply(v, jnp.asarray(xf), split=1, method=mf.trunk)
    np.testing.assert_allclose(t8, tf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["mlp", "resnet_tiny"])
def test_backbone_refuses_raw_bytes(backbone):
    bb = make_classifier(C.ModelConfig(backbone=backbone, width=8, depth=1), 2).backbone
    with pytest.raises(ValueError, match="uint8 images: normalise them first"):
        bb.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1), jnp.uint8))


def test_flip_crop_step_sees_normalised_images(npz_file):
    """Augmentation pads the normalised image (as the float path did), not raw black."""
    path, _ = npz_file
    ds = data.load_downstream(C.DataConfig(downstream=f"npz:{path}", distort=False))
    cfg = C.ModelConfig(backbone="mlp", width=8, depth=2)
    m8, mf = make_classifier(cfg, 3, input_norm=ds.input_norm), make_classifier(cfg, 3)
    x8 = jnp.asarray(ds.train.x[:16])
    xf = jnp.asarray(_host_normalised(ds, ds.train)[:16])
    y = jnp.asarray(ds.train.y[:16])
    v = mf.init(jax.random.key(0), xf[:2])
    tx = steps.ft_optimizer(C.FTConfig(lr=0.1), 10)
    out = []
    for m, x in ((m8, x8), (mf, xf)):
        step = jax.jit(steps.make_train_step(m, tx, num_classes=3, eta=1.0, augment="flip_crop"))
        st = steps.init_state(v["params"], {}, tx)
        st, met = step(st, x, y, jax.random.key(5))
        out.append((met["loss"], st.params))
    assert v.get("batch_stats") is None  # an MLP: v["batch_stats"] below is {}
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           out[0][1], out[1][1])


def test_distortion_and_resize_round_to_uint8(npz_file):
    """Within one grey level of the float path (the same code on x / 255): the
    resize and the distortion each round to the nearest level (<= 0.5 / 255),
    and bilinear interpolation does not grow the first rounding error."""
    path, a = npz_file
    cfg = C.DataConfig(downstream=f"npz:{path}", distort=True, image_size=9)
    ds = data.load_downstream(cfg)
    assert ds.train.x.dtype == np.uint8 and ds.image_shape == (9, 9, 3)
    raw = np.concatenate([a["x_train"], a["x_test"]]).astype(np.float32) / np.float32(255)
    origin = ds.train.origin
    ref = data._distort_fixed(data._resize(raw, 9)[origin], origin, cfg)  # float path
    assert np.abs(ds.train.x / 255.0 - ref).max() <= 1 / 255 + 1e-6
    assert np.abs(ds.train.x / 255.0 - ref).max() > 0  # it did interpolate


@pytest.mark.slow
def test_sweep_on_uint8_equals_sweep_on_host_normalised(npz_file, tmp_path, monkeypatch):
    """A whole tiny sweep: same HP and FT records; the data on device are uint8."""
    path, _ = npz_file
    cfg = C.SweepConfig(
        name="u8", runs_dir=str(tmp_path / "runs"),
        data=C.DataConfig(source=f"npz:{path}", downstream=f"npz:{path}:0,1,2", distort=False),
        model=C.ModelConfig(backbone="mlp", width=16, depth=2),
        pretrain=C.PretrainConfig(epochs=2, batch_size=32),
        hp=C.HPConfig(taus=(0, 2), lr=0.01, batch_size=32),
        ft=C.FTConfig(epochs=2, lr=0.01, batch_size=32, patience=5, direction_steps=2),
        seeds=(0,))
    put = parallel.put_replicated
    images_on_device = []

    def spy(tree, mesh):
        out = put(tree, mesh)
        images_on_device.extend(a.dtype for a in jax.tree_util.tree_leaves(out)
                                if getattr(a, "ndim", 0) == 4)
        return out

    monkeypatch.setattr(parallel, "put_replicated", spy)
    r8 = run_sweep(cfg, progress=False)
    assert images_on_device and set(images_on_device) == {np.dtype(np.uint8)}

    def as_float(ds):
        f = lambda s: dataclasses.replace(s, x=_host_normalised(ds, s))  # noqa: E731
        return dataclasses.replace(ds, train=f(ds.train), val=f(ds.val), test=f(ds.test))

    for name in ("load_source", "load_downstream"):
        monkeypatch.setattr(data, name, lambda c, _f=getattr(data, name): as_float(_f(c)))
    images_on_device.clear()
    rf = run_sweep(dataclasses.replace(cfg, name="f32"), progress=False)
    assert set(images_on_device) == {np.dtype(np.float32)}
    for kind in ("hp", "ft"):
        a = sorted(json.dumps(r, sort_keys=True) for r in r8.records(kind))
        b = sorted(json.dumps(r, sort_keys=True) for r in rf.records(kind))
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b):
            _assert_close(json.loads(ra), json.loads(rb))


def _assert_close(a, b, atol=1e-6):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("time_s", "wall_s", "t"):
                # the z0/zT projection is logged rounded to 5 decimals: one unit
                # of the last place may differ
                _assert_close(a[k], b[k], atol=1.5e-5 if k == "projection" else atol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_close(u, v, atol)
    elif isinstance(a, float):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)
    else:
        assert a == b


@pytest.mark.parametrize("n,m", [(1, 1), (7, 0), (7, 3), (7, 4), (40, 40), (301, 200)])
def test_take_rows_equals_fancy_indexing(n, m):
    rng = np.random.default_rng(n + m)
    x = rng.integers(0, 256, (n, 3, 2, 1), dtype=np.uint8)
    idx = rng.permutation(n)[:m]
    expected = x[idx].copy()
    got = images.take_rows(x, idx)
    np.testing.assert_array_equal(got, expected)
    assert (np.shares_memory(got, x)) == (2 * m > n)  # in place only when it saves memory


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_read_stacked_equals_concatenate(tmp_path, save):
    from hpft_jax import npzio

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 4, 3), dtype=np.uint8)
    save(tmp_path / "s.npz", a=a, b=b, c=b.astype(np.float32))
    out, lengths = npzio.read_stacked(str(tmp_path / "s.npz"), ["a", "b"])
    np.testing.assert_array_equal(out, np.concatenate([a, b]))
    assert lengths == [5, 2] and out.dtype == np.uint8
    assert npzio.read_stacked(str(tmp_path / "s.npz"), ["a", "c"]) is None  # dtypes differ
