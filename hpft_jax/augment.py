"""Image transforms in pure JAX: jittable, vectorised over the batch.

All functions take images ``x`` of shape ``(N, H, W, C)`` and return the same
shape (except :func:`resize`). The random ones take a PRNG ``key`` as their
second argument; options are keyword-only Python values, checked eagerly,
and the kernels are jitted, so the functions can be called as they are or
inside a jitted training step.

* :func:`rotate_zoom` -- a deterministic per-sample rotation and zoom.
* :func:`distort` -- random rotation and zoom; the toy downstream shift of the
  paper (App. B, Fig. 7: "random rotation and zoom-in").
* :func:`flip_crop` -- random horizontal flip + padded random crop, the usual
  CIFAR augmentation (App. B "random flipping and cropping").
* :func:`resize` -- bilinear resize with :func:`jax.image.resize`.

Conventions of :func:`rotate_zoom` (checked in ``tests/test_augment.py``):

* Angles are in degrees, positive = counter-clockwise as the image is
  displayed (row 0 at the top), so a 90 degree rotation of a square image is
  ``np.rot90(x, k=1, axes=(1, 2))``.
* Rotation and zoom are about the image centre ``((H-1)/2, (W-1)/2)``.
* ``zoom > 1`` zooms in (the centre ``1/zoom`` of the image is upsampled to
  the full size, i.e. a centre crop); ``zoom < 1`` zooms out.
* Interpolation is bilinear (``map_coordinates(order=1)``); samples outside
  the image are 0. JAX's ``mode='constant'`` blends towards the 0 outside the
  border, which is SciPy's ``mode='grid-constant'`` (not SciPy's
  ``'constant'``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["rotate_zoom", "sample_rotate_zoom", "distort", "flip_crop", "resize"]


def _check_images(x, name: str = "x", *, floating: bool = False) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, H, W, C); got {x.shape}")
    if floating and not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array; got {x.dtype}")


def _check_rotate_zoom_options(max_rotation: float, zoom: tuple[float, float]) -> None:
    if not max_rotation >= 0:
        raise ValueError(f"max_rotation must be >= 0 degrees; got {max_rotation}")
    if len(zoom) != 2 or not 0 < zoom[0] <= zoom[1]:
        raise ValueError(f"zoom must be (lo, hi) with 0 < lo <= hi; got {zoom}")


def _rotate_zoom_one(img: jax.Array, angle: jax.Array, zoom: jax.Array) -> jax.Array:
    """(H, W, C), scalar degrees, scalar zoom -> (H, W, C)."""
    h, w, c = img.shape
    theta = jnp.deg2rad(angle)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    cr, cc = (h - 1) / 2.0, (w - 1) / 2.0
    dr, dc = jnp.meshgrid(jnp.arange(h, dtype=img.dtype) - cr,
                          jnp.arange(w, dtype=img.dtype) - cc, indexing="ij")
    # Output pixel (r, c) reads the input at R(-theta) (r, c) / zoom (centred).
    src_r = cr + (cos * dr + sin * dc) / zoom
    src_c = cc + (-sin * dr + cos * dc) / zoom

    def one_channel(plane):
        return jax.scipy.ndimage.map_coordinates(
            plane, [src_r, src_c], order=1, mode="constant", cval=0.0)

    return jax.vmap(one_channel, in_axes=2, out_axes=2)(img)


@jax.jit
def rotate_zoom(x: jax.Array, angle: jax.Array, zoom: jax.Array) -> jax.Array:
    """Rotate each image by ``angle`` degrees and zoom it by ``zoom``.

    x: (N, H, W, C) float; angle: (N,) degrees, counter-clockwise;
    zoom: (N,), > 1 zooms in. Returns (N, H, W, C), bilinear, 0 outside.
    """
    _check_images(x, floating=True)
    n = x.shape[0]
    if angle.shape != (n,) or zoom.shape != (n,):
        raise ValueError(
            f"angle and zoom must have shape ({n},); got {angle.shape}, {zoom.shape}")
    angle = jnp.asarray(angle, x.dtype)
    zoom = jnp.asarray(zoom, x.dtype)
    return jax.vmap(_rotate_zoom_one)(x, angle, zoom)


def sample_rotate_zoom(key: jax.Array, *, max_rotation: float,
                       zoom: tuple[float, float]) -> tuple[jax.Array, jax.Array]:
    """One (angle, zoom) pair: angle ~ U[-max, max] degrees, zoom ~ U[lo, hi].

    vmap it over a batch of keys to give each sample its own draw.
    """
    k_rot, k_zoom = jax.random.split(key)
    angle = jax.random.uniform(k_rot, (), minval=-max_rotation, maxval=max_rotation)
    z = jax.random.uniform(k_zoom, (), minval=zoom[0], maxval=zoom[1])
    return angle, z


def distort(x: jax.Array, key: jax.Array, *, max_rotation: float,
            zoom: tuple[float, float]) -> jax.Array:
    """Random per-sample rotation in [-max_rotation, max_rotation] degrees and
    zoom in [zoom[0], zoom[1]] (> 1 zooms in, a centre crop).

    x: (N, H, W, C) float; key: one PRNG key, split into N per-sample keys.
    Returns (N, H, W, C). Conventions as in :func:`rotate_zoom`. The options
    are checked as Python floats and enter the jitted kernel as values, so
    changing them does not recompile.
    """
    _check_images(x, floating=True)
    _check_rotate_zoom_options(max_rotation, zoom)
    return _distort(x, key, *(jnp.asarray(v, x.dtype) for v in (max_rotation, *zoom)))


@jax.jit
def _distort(x, key, max_rotation, zoom_lo, zoom_hi):
    keys = jax.random.split(key, x.shape[0])
    angle, z = jax.vmap(lambda k: sample_rotate_zoom(
        k, max_rotation=max_rotation, zoom=(zoom_lo, zoom_hi)))(keys)
    return rotate_zoom(x, angle, z)


def flip_crop(x: jax.Array, key: jax.Array, *, pad: int = 4,
              padding: str = "zero", flip_prob: float = 0.5) -> jax.Array:
    """Random horizontal flip, then a random (H, W) crop of the padded image.

    x: (N, H, W, C); each sample is flipped (left-right) with probability
    ``flip_prob`` and then cropped at a uniform offset in [0, 2 pad]^2 of the
    image padded by ``pad`` pixels on each side, with zeros (``padding='zero'``,
    torchvision's ``RandomCrop(32, padding=4)``) or by reflection
    (``'reflect'``, edge pixel not repeated). Returns (N, H, W, C).
    """
    _check_images(x)
    if pad < 0 or int(pad) != pad:
        raise ValueError(f"pad must be a non-negative integer; got {pad}")
    if padding not in ("zero", "reflect"):
        raise ValueError(f"padding must be 'zero' or 'reflect'; got {padding!r}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must lie in [0, 1]; got {flip_prob}")
    if padding == "reflect" and pad >= min(x.shape[1:3]):
        raise ValueError(f"reflect padding needs pad < image size; got pad={pad}, "
                         f"{x.shape[1]}x{x.shape[2]}")
    return _flip_crop(x, key, jnp.float32(flip_prob), pad=int(pad), padding=padding)


@functools.partial(jax.jit, static_argnames=("pad", "padding"))
def _flip_crop(x, key, flip_prob, *, pad: int, padding: str):
    n, h, w, c = x.shape
    k_flip, k_row, k_col = jax.random.split(key, 3)
    flip = jax.random.bernoulli(k_flip, flip_prob, (n,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    mode = "constant" if padding == "zero" else "reflect"
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    rows = jax.random.randint(k_row, (n,), 0, 2 * pad + 1)
    cols = jax.random.randint(k_col, (n,), 0, 2 * pad + 1)

    def crop(img, r, col):
        return jax.lax.dynamic_slice(img, (r, col, 0), (h, w, c))

    return jax.vmap(crop)(xp, rows, cols)


@functools.partial(jax.jit, static_argnames=("size",))
def resize(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Bilinear resize (antialiased when shrinking) of (N, H, W, C) to
    (N, size, size, C) or (N, *size, C), via :func:`jax.image.resize`."""
    _check_images(x)
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be a positive int or (H, W); got {size}")
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), method="bilinear")


# --------------------------------------------------------------------------
# Joint image + mask transforms (segmentation training)

SEG_SCALE = (0.5, 2.0)  # torchvision's VOC reference: RandomResize(0.5·base, 2·base)


def sample_scale_crop_flip(key: jax.Array, n: int, hw: tuple[int, int], *,
                           scale: tuple[float, float] = SEG_SCALE, flip_prob: float = 0.5):
    """Per-sample draws of :func:`scale_crop_flip_apply`: ``(s, top, left,
    flip)``, each (n,). s ~ U[scale]; the crop offset is uniform over the
    positions where the (H, W) window fits inside the scaled image (0 when
    the scaled side is shorter: the window then starts at the top/left and
    the rest is padding); flip ~ Bernoulli(flip_prob)."""
    h, w = hw
    k_s, k_t, k_l, k_f = jax.random.split(key, 4)
    s = jax.random.uniform(k_s, (n,), minval=scale[0], maxval=scale[1])
    sh, sw = _scaled(h, s), _scaled(w, s)
    top = jnp.floor(jax.random.uniform(k_t, (n,)) * (jnp.maximum(sh - h, 0) + 1))
    left = jnp.floor(jax.random.uniform(k_l, (n,)) * (jnp.maximum(sw - w, 0) + 1))
    flip = jax.random.bernoulli(k_f, flip_prob, (n,))
    return s, top.astype(jnp.int32), left.astype(jnp.int32), flip


def _scaled(side: int, s):
    """The scaled side ``round(side · s)`` (at least 1), int32."""
    return jnp.maximum(jnp.round(side * s), 1).astype(jnp.int32)


def _scale_crop_flip_one(img, mask, s, top, left, flip, ignore):
    """(H, W, C) float, (H, W) int -> the same shapes; see scale_crop_flip_apply."""
    h, w, _ = img.shape
    sh, sw = _scaled(h, s), _scaled(w, s)
    r = jnp.arange(h) + top  # rows / columns of the scaled image in the window
    c = jnp.arange(w) + left
    inside = (r < sh)[:, None] & (c < sw)[None, :]
    fy, fx = h / sh, w / sw  # scaled -> source pixel size
    # Image: bilinear, half-pixel centres, clamped at the edges (PIL/torch for upscaling).
    sr = jnp.clip((r + 0.5) * fy - 0.5, 0, h - 1)
    sc = jnp.clip((c + 0.5) * fx - 0.5, 0, w - 1)
    r0, c0 = jnp.floor(sr).astype(jnp.int32), jnp.floor(sc).astype(jnp.int32)
    r1, c1 = jnp.minimum(r0 + 1, h - 1), jnp.minimum(c0 + 1, w - 1)
    wr, wc = (sr - r0)[:, None, None], (sc - c0)[None, :, None]
    g = lambda rr, cc: img[rr[:, None], cc[None, :]]  # noqa: E731
    out = ((1 - wr) * ((1 - wc) * g(r0, c0) + wc * g(r0, c1))
           + wr * ((1 - wc) * g(r1, c0) + wc * g(r1, c1)))
    out = jnp.where(inside[..., None], out, 0).astype(img.dtype)
    # Mask: nearest neighbour, source = floor((i + 0.5) · in/out) in exact integer
    # arithmetic (PIL's NEAREST up to its float rounding at exact ties).
    mr = jnp.minimum((2 * r + 1) * h // (2 * sh), h - 1)
    mc = jnp.minimum((2 * c + 1) * w // (2 * sw), w - 1)
    m = jnp.where(inside, mask[mr[:, None], mc[None, :]], ignore).astype(mask.dtype)
    out = jnp.where(flip, out[:, ::-1], out)
    m = jnp.where(flip, m[:, ::-1], m)
    return out, m


@functools.partial(jax.jit, static_argnames=("ignore",))
def scale_crop_flip_apply(x, y, s, top, left, flip, *, ignore: int = 255):
    """Scale, crop and flip images and masks with the same per-sample draws.

    x: (N, H, W, C) float; y: (N, H, W) int labels; s (N,) scale factors;
    top, left (N,) int offsets of the (H, W) window in the scaled image
    (round(H s) × round(W s)); flip (N,) bool, left-right after the crop.
    The image is resampled bilinearly (half-pixel centres), the mask by
    nearest neighbour, so the mask holds only labels it held before; where
    the window leaves the scaled image the image is 0 and the mask
    ``ignore`` (torchvision's reference pads with 0 and 255). Returns
    (x', y') of the input shapes.
    """
    _check_images(x, floating=True)
    if y.shape != x.shape[:3]:
        raise ValueError(f"masks must have shape {x.shape[:3]}; got {y.shape}")
    return jax.vmap(_scale_crop_flip_one, in_axes=(0, 0, 0, 0, 0, 0, None))(
        x, y, s, top, left, flip, ignore)


def scale_crop_flip(x, y, key, *, scale: tuple[float, float] = SEG_SCALE,
                    flip_prob: float = 0.5, ignore: int = 255):
    """Random joint scale (U[scale]), (H, W) crop and horizontal flip of
    images x (N, H, W, C) and masks y (N, H, W); the segmentation train
    augmentation (``--augment scale_crop_flip``). Draws:
    :func:`sample_scale_crop_flip`; transform: :func:`scale_crop_flip_apply`."""
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi; got {scale}")
    draws = sample_scale_crop_flip(key, x.shape[0], x.shape[1:3], scale=scale,
                                   flip_prob=flip_prob)
    return scale_crop_flip_apply(x, y, *draws, ignore=ignore)
