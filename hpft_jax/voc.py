"""PASCAL VOC 2012 segmentation from disk, and a generator of look-alikes.

:func:`read` reads the VOC2012 directory layout (``VOCdevkit/VOC2012`` of
the official tar)::

    JPEGImages/<id>.jpg                      RGB images
    SegmentationClass/<id>.png               palette PNGs: pixel = class index,
                                             0 background, 1..20 objects,
                                             255 object borders ("void", ignored)
    ImageSets/Segmentation/{train,val}.txt   one <id> per line

(SBD's augmented ``train_aug`` list is not read yet.) Checked, one line
each: a list file naming a missing image or mask, an image and mask of
different sizes, a mask value that is neither a class nor 255, a mask that
is not a palette/greyscale PNG.

**Transforms** (one fixed array per split, as every data set here): each
image and its mask are resized so the shorter side is ``size`` (image
bilinear, mask nearest neighbour, so labels stay labels) and centre-cropped
to ``size`` x ``size``; images are then scaled to [0, 1] and standardised
with ImageNet's mean and std (what the imported torchvision weights
expect). Evaluation uses exactly these arrays. Training may add, per step,
a random scale / crop / flip of image and mask together
(``--augment scale_crop_flip``, :func:`hpft_jax.augment.scale_crop_flip`,
applied to these arrays inside the jitted step). Splits: ``train`` is
``train.txt`` minus a seeded ``val_fraction`` held out for early stopping;
``test`` is VOC's ``val.txt`` (its test labels are not public), which is
the split papers report mIoU on.

:func:`generate` writes a tiny data set in the same layout: coloured
rectangles, ellipses and triangles (class = shape and colour) on noisy
gradient backgrounds, 255 on a one-pixel ring around each shape, for tests
and the offline demo.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

IGNORE = 255
CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
           "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
           "sheep", "sofa", "train", "tvmonitor")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def palette() -> np.ndarray:
    """(256, 3) uint8: VOC's colour map (bits of the index spread over R, G, B)."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


# --------------------------------------------------------------------------
# Reading


def _ids(root: str, split: str) -> list[str]:
    path = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VOC data set {root}: missing list ImageSets/Segmentation/"
                                f"{split}.txt (expected the VOC2012 layout; see docs/segmentation.md)")
    with open(path) as f:
        ids = [ln.strip() for ln in f if ln.strip()]
    if not ids:
        raise ValueError(f"VOC data set {root}: ImageSets/Segmentation/{split}.txt lists no image")
    return ids


def read_mask(path: str, num_classes: int) -> np.ndarray:
    """(H, W) uint8 class indices of a palette (or greyscale) PNG; checked."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"VOC mask {path} is a {im.mode} image; expected a palette PNG "
                             "whose pixel values are class indices")
        m = np.array(im)
    bad = (m >= num_classes) & (m != IGNORE)
    if bad.any():
        vals = sorted(set(np.unique(m[bad]).tolist()))
        raise ValueError(f"VOC mask {path}: values {vals[:5]} are neither a class "
                         f"(0..{num_classes - 1}) nor {IGNORE}")
    return m


def read_pair(root: str, id_: str, split: str, num_classes: int):
    """(image (H, W, 3) uint8, mask (H, W) uint8) of one id; checked."""
    img = os.path.join(root, "JPEGImages", f"{id_}.jpg")
    msk = os.path.join(root, "SegmentationClass", f"{id_}.png")
    for p in (img, msk):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"VOC data set {root}: ImageSets/Segmentation/{split}.txt "
                                    f"names {id_!r} but {os.path.relpath(p, root)} is missing")
    with Image.open(img) as im:
        x = np.array(im.convert("RGB"))
    m = read_mask(msk, num_classes)
    if x.shape[:2] != m.shape:
        raise ValueError(f"VOC data set {root}: image {id_} is {x.shape[1]}x{x.shape[0]} but "
                         f"its mask is {m.shape[1]}x{m.shape[0]}")
    return x, m


def resize_crop(x: np.ndarray, m: np.ndarray, size: int):
    """Shorter side -> ``size`` (image bilinear, mask nearest), centre crop."""
    h, w = m.shape
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = np.array(Image.fromarray(x).resize((nw, nh), Image.BILINEAR))
    m = np.array(Image.fromarray(m).resize((nw, nh), Image.NEAREST))
    t, l = (nh - size) // 2, (nw - size) // 2
    return x[t:t + size, l:l + size], m[t:t + size, l:l + size]


def read(root: str, split: str, size: int, num_classes: int = len(CLASSES)):
    """``(x (N, size, size, 3) float32 standardised, y (N, size, size) int32)``."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"VOC data set directory {root} does not exist")
    xs, ys = [], []
    for id_ in _ids(root, split):
        x, m = resize_crop(*read_pair(root, id_, split, num_classes), size)
        xs.append(x)
        ys.append(m)
    x = (np.stack(xs).astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return x.astype(np.float32), np.stack(ys).astype(np.int32)


# --------------------------------------------------------------------------
# A generated look-alike


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, box, fill):
    if kind == 0:
        draw.rectangle(box, fill=fill)
    elif kind == 1:
        draw.ellipse(box, fill=fill)
    else:
        x0, y0, x1, y1 = box
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)


def generate(root: str, *, num_train: int = 24, num_val: int = 8, num_classes: int = 4,
             min_side: int = 40, max_side: int = 56, seed: int = 0) -> None:
    """Write a tiny VOC-layout data set under ``root`` (see module docstring).

    Class k ≥ 1 is shape (k − 1) % 3 in colour k of a fixed list; 1-3 shapes
    per image; JPEG images, palette PNG masks with VOC's palette."""
    if not 2 <= num_classes <= 8:
        raise ValueError(f"num_classes must be in [2, 8] for generated data; got {num_classes}")
    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 200, 30), (200, 40, 200),
               (30, 200, 210), (250, 130, 20)]
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    pal = palette().reshape(-1).tolist()
    names = {"train": [], "val": []}
    for i in range(num_train + num_val):
        split = "train" if i < num_train else "val"
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = rng.uniform(40, 160, size=3)
        slope = rng.uniform(-60, 60, size=(2, 3))
        bg = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
        bg = bg + rng.normal(0, 12, size=bg.shape)
        img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        mask = Image.new("L", (w, h), 0)
        border = Image.new("L", (w, h), 0)
        di, dm, db = ImageDraw.Draw(img), ImageDraw.Draw(mask), ImageDraw.Draw(border)
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(1, num_classes))
            s = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
            x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            box = (x0, y0, x0 + s, y0 + s)
            _draw_shape(di, (k - 1) % 3, box, colours[k - 1])
            _draw_shape(dm, (k - 1) % 3, box, k)
            _draw_shape(db, (k - 1) % 3, box, 1)
        m = np.array(mask)
        b = np.array(border) > 0
        inner = b.copy()  # one-pixel ring: shape pixels next to a non-shape pixel
        inner[1:, :] &= b[:-1, :]
        inner[:-1, :] &= b[1:, :]
        inner[:, 1:] &= b[:, :-1]
        inner[:, :-1] &= b[:, 1:]
        m[b & ~inner] = IGNORE
        id_ = f"2007_{i:06d}"
        img.save(os.path.join(root, "JPEGImages", f"{id_}.jpg"), quality=95)
        p = Image.fromarray(m, mode="P")
        p.putpalette(pal)
        p.save(os.path.join(root, "SegmentationClass", f"{id_}.png"))
        names[split].append(id_)
    for split, ids in names.items():
        with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
