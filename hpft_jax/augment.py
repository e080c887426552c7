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
