"""hpft_jax.augment against numpy/scipy computations and hand-worked values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from hpft_jax import augment


def _images(n=3, h=8, w=8, c=2, seed=0):
    return np.random.default_rng(seed).random((n, h, w, c)).astype(np.float32)


def test_distort_identity_when_no_rotation_and_unit_zoom():
    x = _images()
    out = augment.distort(x, jax.random.key(0), max_rotation=0.0, zoom=(1.0, 1.0))
    np.testing.assert_allclose(np.asarray(out), x, atol=1e-6)


@pytest.mark.parametrize("angle,k", [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_rotation_matches_rot90(angle, k):
    # Positive angles turn the displayed image counter-clockwise, as np.rot90.
    x = _images(h=7, w=7)
    n = x.shape[0]
    out = augment.rotate_zoom(x, np.full(n, angle, np.float32), np.ones(n, np.float32))
    np.testing.assert_allclose(np.asarray(out), np.rot90(x, k=k, axes=(1, 2)), atol=1e-5)


def test_zoom_two_of_centred_block_by_hand():
    # 8x8 image, ones at rows/cols 3..4. Zoom 2 about the centre 3.5 reads the
    # input at 3.5 + (r - 3.5) / 2 = 1.75, 2.25, ..., 5.25; linear
    # interpolation of the profile [0, 0, 0, 1, 1, 0, 0, 0] there gives p.
    x = np.zeros((1, 8, 8, 1), np.float32)
    x[0, 3:5, 3:5, 0] = 1.0
    p = np.array([0, 0.25, 0.75, 1, 1, 0.75, 0.25, 0], np.float32)
    out = augment.rotate_zoom(x, np.zeros(1, np.float32), np.full(1, 2.0, np.float32))
    np.testing.assert_allclose(np.asarray(out)[0, :, :, 0], np.outer(p, p), atol=1e-6)


def test_zoom_of_linear_ramp_is_exact_crop_and_upsample():
    # Bilinear interpolation reproduces a linear function exactly, so zoom z
    # maps x[r, c] = r + 10 c to (cr + (r - cr)/z) + 10 (cc + (c - cc)/z).
    h, w, z = 6, 9, 1.5
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x = (r + 10.0 * c).astype(np.float32)[None, :, :, None]
    cr, cc = (h - 1) / 2, (w - 1) / 2
    expected = (cr + (r - cr) / z) + 10 * (cc + (c - cc) / z)
    out = augment.rotate_zoom(x, np.zeros(1, np.float32), np.full(1, z, np.float32))
    np.testing.assert_allclose(np.asarray(out)[0, :, :, 0], expected, atol=1e-4)


@pytest.mark.parametrize("angle,zoom", [(30.0, 1.0), (-17.0, 1.3), (50.0, 0.8)])
def test_rotate_zoom_matches_scipy_affine_transform(angle, zoom):
    # scipy maps output coordinate o to input M o + offset; JAX's 'constant'
    # mode is scipy's 'grid-constant' (0 blended in beyond the border).
    x = _images(n=2, h=9, w=11)
    t = np.deg2rad(angle)
    m = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]) / zoom
    centre = np.array([(9 - 1) / 2, (11 - 1) / 2])
    offset = centre - m @ centre
    expected = np.stack([
        np.stack([ndi.affine_transform(img[..., ch], m, offset=offset, order=1,
                                       mode="grid-constant", cval=0.0)
                  for ch in range(x.shape[-1])], axis=-1)
        for img in x])
    out = augment.rotate_zoom(x, np.full(2, angle, np.float32), np.full(2, zoom, np.float32))
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_distort_draws_per_sample_within_ranges_and_jits():
    keys = jax.random.split(jax.random.key(3), 2000)
    angle, z = jax.jit(jax.vmap(functools.partial(
        augment.sample_rotate_zoom, max_rotation=20.0, zoom=(0.9, 1.4))))(keys)
    angle, z = np.asarray(angle), np.asarray(z)
    assert angle.min() >= -20 and angle.max() <= 20
    assert angle.min() < -19 and angle.max() > 19  # the whole range is used
    assert z.min() >= 0.9 and z.max() <= 1.4
    # identical inputs, different per-sample draws -> different outputs
    x = np.repeat(_images(n=1), 3, axis=0)
    fn = functools.partial(augment.distort, max_rotation=20.0, zoom=(0.9, 1.4))
    out = np.asarray(fn(x, jax.random.key(1)))
    assert all(not np.allclose(out[0], out[i]) for i in range(1, 3))
    np.testing.assert_array_equal(np.asarray(fn(x, jax.random.key(1))), out)  # same key


def test_flip_crop_forced_flip_without_padding():
    x = _images(n=4, h=5, w=6)
    out = augment.flip_crop(x, jax.random.key(0), pad=0, flip_prob=1.0)
    np.testing.assert_array_equal(np.asarray(out), x[:, :, ::-1])
    out = augment.flip_crop(x, jax.random.key(0), pad=0, flip_prob=0.0)
    np.testing.assert_array_equal(np.asarray(out), x)


@pytest.mark.parametrize("padding,np_mode", [("zero", "constant"), ("reflect", "reflect")])
def test_flip_crop_is_a_window_of_the_padded_image(padding, np_mode):
    pad, n, h, w = 2, 64, 5, 6
    x = _images(n=n, h=h, w=w, c=1, seed=1)
    fn = jax.jit(functools.partial(augment.flip_crop, pad=pad, padding=padding))
    out = np.asarray(fn(x, jax.random.key(5)))
    found = set()
    for i in range(n):
        hits = []
        for flip in (False, True):
            img = x[i, :, ::-1] if flip else x[i]
            padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode=np_mode)
            for r in range(2 * pad + 1):
                for c in range(2 * pad + 1):
                    if np.array_equal(padded[r:r + h, c:c + w], out[i]):
                        hits.append((flip, r, c))
        assert hits, f"sample {i} is no window of its padded image"
        found.update(hits)
    # flips and all 25 offsets turn up in 64 samples (chance of missing one < 1e-3)
    assert {f for f, _, _ in found} == {False, True}
    assert len({(r, c) for _, r, c in found}) >= 20


def test_resize_matches_pillow_bilinear_upsampling():
    from PIL import Image

    x = _images(n=2, h=6, w=6, c=1)
    out = np.asarray(augment.resize(x, 12))
    expected = np.stack([np.asarray(Image.fromarray(img[..., 0]).resize((12, 12), Image.BILINEAR))
                         for img in x])[..., None]
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: augment.distort(np.zeros((2, 4, 4), np.float32), jax.random.key(0),
                             max_rotation=1.0, zoom=(1.0, 1.0)), r"\(N, H, W, C\)"),
    (lambda: augment.distort(np.zeros((2, 4, 4, 1), np.uint8), jax.random.key(0),
                             max_rotation=1.0, zoom=(1.0, 1.0)), "floating"),
    (lambda: augment.distort(np.zeros((2, 4, 4, 1), np.float32), jax.random.key(0),
                             max_rotation=1.0, zoom=(1.2, 1.0)), "zoom"),
    (lambda: augment.distort(np.zeros((2, 4, 4, 1), np.float32), jax.random.key(0),
                             max_rotation=-1.0, zoom=(1.0, 1.0)), "max_rotation"),
    (lambda: augment.flip_crop(np.zeros((2, 4, 4, 1)), jax.random.key(0), pad=-1), "pad"),
    (lambda: augment.flip_crop(np.zeros((2, 4, 4, 1)), jax.random.key(0), padding="edge"),
     "padding"),
    (lambda: augment.flip_crop(np.zeros((2, 4, 4, 1)), jax.random.key(0), pad=4,
                               padding="reflect"), "reflect"),
    (lambda: augment.rotate_zoom(np.zeros((2, 4, 4, 1), np.float32), jnp.zeros(3),
                                 jnp.ones(2)), "angle"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
