"""Joint image/mask scale-crop-flip (segmentation training) against PIL/numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hpft_jax import augment

H, W = 12, 16


def _data(seed=0, n=3):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, H, W, 3)).astype(np.float32)
    y = r.integers(0, 5, size=(n, H, W)).astype(np.int32)
    y[:, 0, :3] = 255
    return x, y


def _nearest(y, sh, sw):
    """Nearest-neighbour resize, source = floor((i + 1/2) in/out) in integers."""
    rows = (2 * np.arange(sh) + 1) * y.shape[0] // (2 * sh)
    cols = (2 * np.arange(sw) + 1) * y.shape[1] // (2 * sw)
    return y[rows][:, cols]


def _reference(x, y, s, top, left, flip):
    """Resize to (round(H s), round(W s)) (image: PIL bilinear per channel in
    mode F; mask: nearest in integers), pad bottom/right with 0 / 255, crop, flip."""
    sh, sw = max(round(H * s), 1), max(round(W * s), 1)
    m = _nearest(y, sh, sw)
    im = np.stack([np.array(Image.fromarray(x[..., k]).resize((sw, sh), Image.BILINEAR))
                   for k in range(x.shape[-1])], -1)
    ph, pw = max(H + top - sh, 0), max(W + left - sw, 0)
    m = np.pad(m, ((0, ph), (0, pw)), constant_values=255)[top:top + H, left:left + W]
    im = np.pad(im, ((0, ph), (0, pw), (0, 0)))[top:top + H, left:left + W]
    return (im[:, ::-1], m[:, ::-1]) if flip else (im, m)


@pytest.mark.parametrize("s,top,left", [(1.5, 2, 5), (2.0, 12, 16), (1.25, 0, 3), (0.5, 0, 0),
                                        (0.75, 0, 0), (1.0, 0, 0)])
@pytest.mark.parametrize("flip", [False, True])
def test_apply_matches_pil(s, top, left, flip):
    x, y = _data()
    n = x.shape[0]
    args = (jnp.full((n,), s), jnp.full((n,), top), jnp.full((n,), left), jnp.full((n,), flip))
    ox, oy = jax.device_get(augment.scale_crop_flip_apply(jnp.asarray(x), jnp.asarray(y), *args))
    for i in range(n):
        rx, ry = _reference(x[i], y[i], s, top, left, flip)
        np.testing.assert_array_equal(oy[i], ry)  # nearest: exact
        if s >= 1:  # PIL antialiases when shrinking; bilinear upscaling is the same filter
            np.testing.assert_allclose(ox[i], rx, atol=1e-5)
        else:  # the padded part is 0, the rest is inside the value range
            outside = np.zeros((H, W), bool)
            sh, sw = round(H * s), round(W * s)
            outside[sh:, :] = True
            outside[:, sw:] = True
            if flip:
                outside = outside[:, ::-1]
            assert np.all(ox[i][outside] == 0) and np.all(ry[outside] == 255)


@pytest.mark.parametrize("s,everywhere", [(2.0, True), (0.5, True), (1.5, False)])
def test_nearest_reference_is_pils_away_from_ties(s, everywhere):
    """The integer rule is PIL's NEAREST (PIL differs only at exact ties by
    float rounding, e.g. 12 -> 18 px: 4.5 · 12/18 = 3 is 2.999... in PIL)."""
    y = _data()[1][0].astype(np.uint8)
    sh, sw = round(H * s), round(W * s)
    pil = np.array(Image.fromarray(y).resize((sw, sh), Image.NEAREST))
    ours = _nearest(y, sh, sw)
    ties_r = ((2 * np.arange(sh) + 1) * H) % (2 * sh) == 0
    ties_c = ((2 * np.arange(sw) + 1) * W) % (2 * sw) == 0
    ok = (~ties_r[:, None] & ~ties_c[None, :]) | everywhere
    np.testing.assert_array_equal(ours[ok], pil[ok])
    assert ok.mean() > 0.4


def test_random_draws_joint_and_labels_kept():
    x, y = _data(1, n=16)
    # the image carries the mask in a channel: nearest resampling of the
    # image channel would equal the mask; bilinear cannot invent far values
    ox, oy = jax.device_get(augment.scale_crop_flip(jnp.asarray(x), jnp.asarray(y),
                                                    jax.random.key(3)))
    assert ox.shape == x.shape and oy.shape == y.shape
    assert set(np.unique(oy)) <= set(np.unique(y)) | {255}
    s, top, left, flip = jax.device_get(augment.sample_scale_crop_flip(
        jax.random.key(3), 16, (H, W)))
    assert 0.5 <= s.min() and s.max() <= 2.0 and flip.any() and (~flip).any()
    for i in range(16):  # the draws are the ones applied, to image and mask alike
        rx, ry = _reference(x[i], y[i], float(s[i]), int(top[i]), int(left[i]), bool(flip[i]))
        np.testing.assert_array_equal(oy[i], ry)
        sh, sw = round(H * float(s[i])), round(W * float(s[i]))
        assert 0 <= top[i] <= max(sh - H, 0) and 0 <= left[i] <= max(sw - W, 0)
        if s[i] >= 1:
            np.testing.assert_allclose(ox[i], rx, atol=1e-4)


def test_bad_masks_rejected():
    x, y = _data()
    with pytest.raises(ValueError, match="masks must have shape"):
        augment.scale_crop_flip(jnp.asarray(x), jnp.asarray(y[:, :, :-1]), jax.random.key(0))


def test_train_step_moves_masks_with_images():
    """The step's loss is the loss on scale_crop_flip(x, y, key) done by hand
    (a per-pixel linear model, so any mismatch of image and mask shows)."""
    import flax.linen as nn
    import optax

    from hpft_jax import steps, tasks

    class PixelModel(nn.Module):
        task: str = "segmentation"

        @nn.compact
        def __call__(self, x, *, train=False):
            return nn.Dense(4)(x), jnp.mean(x, axis=(1, 2))

    x, y = _data(2, n=4)
    y = np.where(y == 255, 255, y % 4)
    model = PixelModel()
    params = model.init(jax.random.key(0), jnp.asarray(x))["params"]
    tx = optax.sgd(0.0)
    step = steps.make_train_step(model, tx, num_classes=4, eta=1.0, augment="scale_crop_flip")
    key = jax.random.key(7)
    _, m = jax.jit(step)(steps.init_state(params, {}, tx), jnp.asarray(x), jnp.asarray(y), key)
    ax, ay = augment.scale_crop_flip(jnp.asarray(x), jnp.asarray(y), key)
    want = tasks.of(model).loss(model.apply({"params": params}, ax)[0], ay, 1.0)
    np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-6)
    unmoved = tasks.of(model).loss(model.apply({"params": params}, ax)[0], jnp.asarray(y), 1.0)
    assert abs(float(unmoved) - float(want)) > 1e-4  # masks left alone would differ
