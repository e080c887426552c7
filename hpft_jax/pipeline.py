"""The ImageNet input pipeline, for backbones pretrained on ImageNet.

torchvision's recipe, which the published ResNet checkpoints expect:

* **eval:** resize the shorter side to 256 (bilinear, antialiased; PIL on
  uint8 images, as torchvision does on PIL images), centre-crop 224, scale
  to [0, 1], then ``(x - mean) / std`` with the ImageNet statistics
  (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`). For another crop size
  ``s`` the resize is ``round(s * 256 / 224)``; grey images are repeated to
  RGB. Images are resized and cropped, never squashed to a square.
* **train:** :func:`random_resized_crop_flip` inside the jitted step: a
  random box of 8–100 % of the area and aspect ratio 3/4–4/3 resized back to
  the image size, then a horizontal flip with probability 1/2. It crops the
  stored eval-size image (the 256-resize centre crop), not the full-size
  original as torchvision does: variable-size originals are not kept on
  the device.

The data side (decoding, statistics) is in :mod:`hpft_jax.data`;
``DataConfig.pipeline`` selects it, and
:func:`hpft_jax.normalization.resolve` fills a ``None`` from the
``--init-from`` backbone's ``meta.json`` normalisation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax.normalization import IMAGENET_MEAN, IMAGENET_STD

RESIZE_OVER_CROP = 256 / 224
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def resize_size(crop: int) -> int:
    """The shorter-side resize before a centre crop of ``crop``: 256 for 224."""
    return int(round(crop * RESIZE_OVER_CROP))


def resized_shape(h: int, w: int, short: int) -> tuple[int, int]:
    """(H', W') with the shorter side ``short``; the longer side as
    torchvision's ``Resize(int)`` computes it: ``int(short * long / short_in)``."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def crop_offsets(h: int, w: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop``: ``round((H - crop) / 2)``."""
    return int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))


def resize_center_crop_uint8(img: np.ndarray, crop: int) -> np.ndarray:
    """(H, W[, C]) uint8 -> (crop, crop, C) uint8 (C = 3 for RGB input, 1 for grey),
    PIL bilinear resize of the shorter side to :func:`resize_size` then centre crop."""
    from PIL import Image  # noqa: PLC0415 - pillow is only needed for tfds images

    grey = img.ndim == 2 or img.shape[-1] == 1
    pil = Image.fromarray(img.reshape(img.shape[:2]) if grey else img)
    h, w = img.shape[:2]
    nh, nw = resized_shape(h, w, resize_size(crop))
    out = np.asarray(pil.resize((nw, nh), Image.BILINEAR))
    top, left = crop_offsets(nh, nw, crop)
    out = out[top:top + crop, left:left + crop]
    return out[..., None] if grey else out


@functools.partial(jax.jit, static_argnames=("crop",))
def _resize_crop_chunk(x, crop: int):
    n, h, w, c = x.shape
    nh, nw = resized_shape(h, w, resize_size(crop))
    y = jax.image.resize(x, (n, nh, nw, c), method="bilinear")
    top, left = crop_offsets(nh, nw, crop)
    return y[:, top:top + crop, left:left + crop]


def resize_center_crop(x: np.ndarray, crop: int) -> np.ndarray:
    """(N, H, W, C) float -> (N, crop, crop, C): the eval transform for arrays
    (digits, idx:, npz:) in JAX (antialiased bilinear), chunked."""
    out = [np.asarray(_resize_crop_chunk(jnp.asarray(x[i:i + 1024]), crop))
           for i in range(0, len(x), 1024)]
    return np.concatenate(out) if out else x[:, :crop, :crop]


def to_rgb(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 1) -> (N, H, W, 3) by repetition; RGB unchanged."""
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def stats() -> tuple[np.ndarray, np.ndarray]:
    """ImageNet (mean, std) as (3,) float32."""
    return np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)


# --------------------------------------------------------------------------
# Train augmentation (inside the jitted step)


def rrc_boxes(key: jax.Array, n: int, h: int, w: int, *, scale=RRC_SCALE,
              ratio=RRC_RATIO) -> jax.Array:
    """(n, 4) float32 boxes (top, left, height, width) of random-resized-crop.

    Area fraction ~ U(scale), log aspect ratio (w/h) ~ U(log ratio); sides
    are clipped to the image (torchvision retries 10 times, then falls back to
    a centre crop; clipping keeps one draw and a fixed shape). Offsets are
    uniform over the positions that keep the box inside.
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = h * w * jax.random.uniform(k_area, (n,), minval=scale[0], maxval=scale[1])
    logr = jax.random.uniform(k_ratio, (n,), minval=np.log(ratio[0]), maxval=np.log(ratio[1]))
    r = jnp.exp(logr)
    bw = jnp.clip(jnp.round(jnp.sqrt(area * r)), 1, w)
    bh = jnp.clip(jnp.round(jnp.sqrt(area / r)), 1, h)
    top = jnp.floor(jax.random.uniform(k_top, (n,)) * (h - bh + 1))
    left = jnp.floor(jax.random.uniform(k_left, (n,)) * (w - bw + 1))
    return jnp.stack([top, left, bh, bw], axis=1).astype(jnp.float32)


def crop_resize(x: jax.Array, boxes: jax.Array) -> jax.Array:
    """(N, H, W, C), (N, 4) boxes (top, left, height, width) -> (N, H, W, C):
    each box resized to the full image size, bilinear (antialiased when
    shrinking), by :func:`jax.image.scale_and_translate`."""
    n, h, w, c = x.shape

    def one(img, box):
        top, left, bh, bw = box[0], box[1], box[2], box[3]
        scale = jnp.stack([h / bh, w / bw])
        trans = jnp.stack([-top * h / bh, -left * w / bw])
        return jax.image.scale_and_translate(img, (h, w, c), (0, 1), scale, trans,
                                             method="linear", antialias=True)

    return jax.vmap(one)(x, boxes)


def random_resized_crop_flip(x: jax.Array, key: jax.Array) -> jax.Array:
    """ImageNet train augmentation on (N, H, W, C): :func:`rrc_boxes` +
    :func:`crop_resize`, then a horizontal flip with probability 1/2."""
    k_box, k_flip = jax.random.split(key)
    n, h, w, _ = x.shape
    out = crop_resize(x, rrc_boxes(k_box, n, h, w))
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    return jnp.where(flip[:, None, None, None], out[:, :, ::-1, :], out)
