"""Every data set the library reads, offline by default.

Data specs (``DataConfig.source`` / ``DataConfig.downstream``)::

    digits              the 8x8 handwritten digits scikit-learn ships (1,797)
    NAME                a tensorflow-datasets image-classification set
                        (mnist, cifar10, cifar100, stl10, oxford_flowers102,
                        cars196, ...), read with ``tfds.data_source``
    idx:DIR             MNIST-format IDX files in DIR
                        (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte,
                        t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)
    npz:FILE            arrays x_train, y_train, x_test, y_test
                        (optionally x_val, y_val)
    ...:c1,c2,...       keep only these classes, relabelled 0..K-1 in this order

The toy setting of the paper (App. B: pretrain on all of MNIST; downstream on
classes 0, 1, 2 with random rotation and zoom) is mirrored offline by
``source="digits"``, ``downstream="digits:0,1,2"``, ``distort=True``.

Pipeline, in this order, all deterministic from ``cfg.seed``:

1. Load the whole base data set (N, H, W, C): uint8 images stay uint8
   (:mod:`hpft_jax.images`: 4x less memory on host and device); digits
   0..16 -> float32 /16, other dtypes float32 as stored. Grey images keep C = 1.
2. Resize to ``image_size`` (bilinear, :func:`jax.image.resize`; tfds sets
   whose images vary in size are resized with Pillow bilinear as they are
   decoded, and need ``image_size``).
3. Split (:func:`plan_splits`): data with an official test split keep it; the
   official validation split is used when the data has one (tfds
   ``validation``, npz ``x_val``), otherwise ``val_fraction`` of the train
   split is carved out, stratified by class. The digits have no split at all:
   ``test_fraction`` and ``val_fraction`` are carved, stratified by class.
   ``per_class`` caps the downstream examples per class in the pool that
   train (and carved val/test) come from.
4. Downstream only, when ``cfg.distorts()`` (``distort``; by default on only
   for the toy data: digits, mnist, idx:): a rotation in
   [-max_rotation, max_rotation] degrees and a zoom in ``zoom``, drawn from a
   key folded from ``cfg.seed`` and the example's position in the base data
   set, so each example's distortion is a fixed property of the data set.
5. Normalise: the digits stay in [0, 1]. Every other set is standardised per
   channel with the mean/std of its base data set's full official train split
   (all classes, after resizing, before subsetting and distortion; the same
   constants for source and downstream when they share a base set, like the
   usual published CIFAR/MNIST constants). Distortion fills with 0 (black)
   before standardisation. uint8 images are not standardised here: the
   constants travel as ``Dataset.input_norm`` and the model applies them
   inside the jitted programs; resizing and distortion of uint8 images round
   back to uint8 (at most 0.5/255 per pixel).

With ``cfg.pipeline == "imagenet"`` (:mod:`hpft_jax.pipeline`), step 2
resizes the shorter side and centre-crops instead of squashing (Pillow per
tfds image, JAX for arrays), grey images become RGB, and step 5 uses the
ImageNet mean/std for every data set. ``flowers_split="table4"`` reads
oxford_flowers102 as the paper's Table 4 (train on tfds' test split, test on
train + validation).

Leakage: when the source and the downstream come from the same base data set,
pretraining never sees the original images of the downstream val and test
splits (their distorted versions are what HP/FT are evaluated on). The
downstream train originals may be in the pretraining set, as in the paper.

Nothing here touches the network unless ``cfg.download`` is True:
``tfds.data_source`` is called with ``download=cfg.download``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gzip
import importlib.util
import os
import re
import struct

import jax
import numpy as np

from hpft_jax import augment, images, npzio, ogb, pipeline, voc
from hpft_jax.config import DataConfig

__all__ = [
    "DataSpec", "Split", "Dataset", "parse_spec", "load_source",
    "load_downstream", "check_batch_size", "plan_splits", "read_idx",
]

KINDS = ("digits", "tfds", "idx", "npz")
TRAIN, VAL, TEST = 0, 1, 2  # ``part`` codes: which official split an example is in
_SOURCE_STREAM, _DOWNSTREAM_STREAM, _DISTORT_STREAM = 0, 1, 2
_CHUNK = 1024  # images per chunk when decoding, resizing or distorting
_TFDS_HINT = 'tensorflow-datasets is not installed: pip install -e ".[tfds]"'


# --------------------------------------------------------------------------
# Public containers


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: compare by identity
class Split:
    """x: (N, H, W, C) float32, normalised, or uint8 raw pixels (normalised
    by the model with ``Dataset.input_norm``); y: (N,) int32 in [0, num_classes).

    ``origin``: (N,) int64 position of each example in its base data set
    (official train, then validation, then test, concatenated; the digits in
    scikit-learn's order), or None. It identifies the underlying original
    image, e.g. to check that splits are disjoint.
    """

    x: np.ndarray
    y: np.ndarray
    origin: np.ndarray | None = None

    def __post_init__(self):
        if self.x.ndim != 4:
            raise ValueError(f"Split.x must have shape (N, H, W, C); got {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"Split.y must have shape ({self.x.shape[0]},); got {self.y.shape}")
        if self.origin is not None and self.origin.shape != self.y.shape:
            raise ValueError(f"Split.origin must have shape {self.y.shape}; got {self.origin.shape}")

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclasses.dataclass(frozen=True, eq=False)
class GraphSplit(Split):
    """Molecules: x (N, V, C) int16 graph tables (:mod:`hpft_jax.gcn`),
    y (N, T) float32 binary labels with NaN for missing; origin: graph ids."""

    def __post_init__(self):
        if self.x.ndim != 3 or self.y.ndim != 2 or self.y.shape[0] != self.x.shape[0]:
            raise ValueError(f"GraphSplit needs x (N, V, C) and y (N, T); got {self.x.shape} "
                             f"and {self.y.shape}")


@dataclasses.dataclass(frozen=True, eq=False)
class SegSplit(Split):
    """Segmentation: x (N, H, W, 3) float32, y (N, H, W) int32 class per
    pixel, 255 = not labelled (:mod:`hpft_jax.voc`)."""

    def __post_init__(self):
        if self.x.ndim != 4 or self.y.shape != self.x.shape[:3]:
            raise ValueError(f"SegSplit needs x (N, H, W, C) and y (N, H, W); got "
                             f"{self.x.shape} and {self.y.shape}")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A data set split three ways. ``mean``/``std``: (C,) standardisation
    constants (x = (raw - mean) / std, raw in [0, 1]), None for digits:
    applied already to float images, applied by the model to uint8 ones."""

    name: str
    num_classes: int
    train: Split
    val: Split
    test: Split
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    task: str = "classification"  # hpft_jax.tasks kind; num_classes = its outputs

    @property
    def input_norm(self) -> images.Norm | None:
        """((C,) mean, (C,) std) for a model fed uint8 splits; None for float."""
        if self.train.x.dtype != np.uint8 or self.mean is None:
            return None
        return (tuple(map(float, self.mean)), tuple(map(float, self.std)))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(self.train.x.shape[1:])


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A parsed data spec. ``name``: 'digits', the tfds name, or the path."""

    kind: str
    name: str
    classes: tuple[int, ...] | None = None

    def same_base(self, other: "DataSpec") -> bool:
        """Whether both specs read the same underlying data (classes aside)."""
        return (self.kind, self.name) == (other.kind, other.name)

    def __str__(self) -> str:
        head = {"digits": "digits", "tfds": self.name}.get(self.kind, f"{self.kind}:{self.name}")
        return head if self.classes is None else f"{head}:{','.join(map(str, self.classes))}"


def check_batch_size(n: int, batch_size: int, *, what: str) -> None:
    """Raise a ValueError when ``batch_size`` is not in [1, n]."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1; got {batch_size} for {what}")
    if batch_size > n:
        raise ValueError(
            f"batch {batch_size} larger than the {n} training examples of {what}")


# --------------------------------------------------------------------------
# Specs

_CLASSES_RE = re.compile(r"\d+(,\d+)*")
_TFDS_NAME_RE = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?")


def _parse_classes(text: str, spec: str) -> tuple[int, ...]:
    if not _CLASSES_RE.fullmatch(text):
        raise ValueError(
            f"bad class list {text!r} in data spec {spec!r}: expected "
            "comma-separated non-negative integers, e.g. 'mnist:0,1,2'")
    classes = tuple(int(c) for c in text.split(","))
    if len(set(classes)) != len(classes):
        raise ValueError(f"repeated class in data spec {spec!r}")
    if len(classes) < 2:
        raise ValueError(f"data spec {spec!r} keeps fewer than 2 classes")
    return classes


def _known_specs_text() -> str:
    return ("known: 'digits', 'idx:DIR', 'npz:FILE', or a tensorflow-datasets "
            "image-classification name (mnist, cifar10, cifar100, stl10, "
            "oxford_flowers102, cars196, ...), each optionally followed by "
            "':c1,c2,...'")


def _check_tfds_name(name: str, spec: str) -> None:
    """Unknown tfds names raise; skipped when tfds is not installed (loading
    then says how to install it). Offline and fast: community data sets,
    whose index lives on GCS, are not listed."""
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 (optional dependency: the [tfds] extra)
    except ImportError:
        return
    known = tfds.list_builders(with_community_datasets=False)
    base = name.split("/")[0]
    if base not in known:
        close = difflib.get_close_matches(base, known + ["digits"], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown data set {base!r} in data spec {spec!r}.{hint} "
                         f"{_known_specs_text()}")


def parse_spec(spec: str) -> DataSpec:
    """Parse ``digits[:c,..]``, ``NAME[:c,..]``, ``idx:DIR[:c,..]``,
    ``npz:FILE[:c,..]``. Unknown kinds or names raise a ValueError."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data spec must be a non-empty string; got {spec!r}")
    spec = spec.strip()
    if spec.startswith("ogb:"):  # OGB molecules, ``ogb:DIR[@node budget]`` (docs/graphs.md)
        if not spec[4:]:
            raise ValueError(f"data spec {spec!r} names no path")
        ogb.parse_budget(spec[4:], spec)  # a bad budget fails here
        return DataSpec("ogb", os.path.expanduser(spec[4:]))
    if spec.startswith("voc:"):  # PASCAL VOC 2012 layout, ``voc:DIR`` (hpft_jax.voc)
        if not spec[4:]:
            raise ValueError(f"data spec {spec!r} names no path")
        return DataSpec("voc", os.path.expanduser(spec[4:]))
    for kind in ("idx", "npz"):
        if spec.startswith(kind + ":"):
            rest = spec[len(kind) + 1:]
            classes = None
            m = re.fullmatch(r"(.*):(\d+(?:,\d+)*)", rest)
            if m:
                rest, classes = m.group(1), _parse_classes(m.group(2), spec)
            if not rest:
                raise ValueError(f"data spec {spec!r} names no path")
            return DataSpec(kind, os.path.expanduser(rest), classes)
    name, _, cls_text = spec.partition(":")
    classes = _parse_classes(cls_text, spec) if cls_text else None
    if name == "digits":
        return DataSpec("digits", "digits", classes)
    if not _TFDS_NAME_RE.fullmatch(name):
        raise ValueError(f"unknown data spec {spec!r}; {_known_specs_text()}")
    _check_tfds_name(name, spec)
    return DataSpec("tfds", name, classes)


# --------------------------------------------------------------------------
# Base data sets: every official split, concatenated, as float32 images


@dataclasses.dataclass(frozen=True)
class _Base:
    x: np.ndarray  # (M, H, W, C) float32, or uint8 raw pixels
    y: np.ndarray  # (M,) int32
    part: np.ndarray  # (M,) int8: TRAIN, VAL or TEST
    num_classes: int
    standardize: bool


def _to_images(x: np.ndarray, what: str) -> np.ndarray:
    """(N, H, W[, C]) -> (N, H, W, C): uint8 as is (no copy), else float32."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{what} must have shape (N, H, W) or (N, H, W, C); got {x.shape}")
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f"{what} must be numeric; got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return x


def _check_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    if y.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},); got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} must be integers; got dtype {y.dtype}")
    if n and y.min() < 0:
        raise ValueError(f"{what} has negative labels")
    return y.astype(np.int32)


def _stack_parts(parts: list[tuple[int, np.ndarray, np.ndarray]], what: str,
                 stacked: np.ndarray | None = None) -> _Base:
    """[(part code, x, y), ...] -> _Base with num_classes = max label + 1;
    x already (N, H, W, C), uint8 or float32 (mixed: all to float32 [0, 1]).
    ``stacked``: the parts' x already concatenated (their x are its views)."""
    if stacked is None and len({p[1].dtype for p in parts}) > 1:
        parts = [(c, images.to_unit(x), y) for c, x, y in parts]
    shapes = {p[1].shape[1:] for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"{what}: image shapes differ between splits: {sorted(shapes)}")
    y = np.concatenate([p[2] for p in parts])
    if y.size == 0:
        raise ValueError(f"{what} holds no examples")
    k = int(y.max()) + 1
    return _Base(
        x=np.concatenate([p[1] for p in parts]) if stacked is None else stacked,
        y=y,
        part=np.concatenate([np.full(len(p[2]), p[0], np.int8) for p in parts]),
        num_classes=k,
        standardize=True,
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: images (1797, 8, 8) in 0..16, labels (1797,).

    Reads the CSV that scikit-learn ships (as ``load_digits`` does) without
    importing scikit-learn, which alone takes 1-2 s here; falls back to
    ``sklearn.datasets.load_digits`` if the file is not where it used to be.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                            "digits.csv.gz")
        if os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int32)
    from sklearn.datasets import load_digits  # noqa: PLC0415 (1-2 s to import; only the digits need it)

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int32)


def _load_digits() -> _Base:
    images, y = _digits_arrays()
    x = (images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1) in [0, 1]
    return _Base(x=x, y=y, part=np.full(len(y), TRAIN, np.int8),
                 num_classes=10, standardize=False)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32,
               0x0D: np.float32, 0x0E: np.float64}
_IDX_FILES = {
    TRAIN: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    TEST: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into an array of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (header {data[:4]!r})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]]).newbyteorder(">")
    count = int(np.prod(dims))
    offset = 4 + 4 * ndim
    if len(data) != offset + count * dtype.itemsize:
        raise ValueError(f"{path}: header says shape {dims} but the file holds "
                         f"{len(data) - offset} data bytes")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(dims).astype(dtype.newbyteorder("="))


def _find_file(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no {stem}[.gz] in {directory!r} (an idx: spec needs "
                            f"{', '.join(s for pair in _IDX_FILES.values() for s in pair)})")


def _load_idx(directory: str) -> _Base:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"idx: directory {directory!r} does not exist")
    parts = []
    for code, (images, labels) in _IDX_FILES.items():
        path = _find_file(directory, images)
        x = _to_images(read_idx(path), path)
        y = _check_labels(read_idx(_find_file(directory, labels)), len(x), labels)
        parts.append((code, x, y))
    return _stack_parts(parts, f"idx:{directory}")


def _load_npz(path: str) -> _Base:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz: file {path!r} does not exist")
    with np.load(path, allow_pickle=False) as f:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)} (has {sorted(f.files)})")
        names = [(TRAIN, "train"), (TEST, "test")]
        if ("x_val" in f.files) != ("y_val" in f.files):
            raise ValueError(f"{path} has only one of x_val, y_val")
        if "x_val" in f.files:
            names.insert(1, (VAL, "val"))
        read = npzio.read_stacked(path, [f"x_{split}" for _, split in names])
        stacked = None
        if read is not None and read[0].dtype == np.uint8 and read[0].ndim in (3, 4):
            # uint8 read in place: each split is a view of one array, no concatenation
            stacked = _to_images(read[0], f"{path}: x")
            bounds = np.cumsum([0] + read[1])
        parts = []
        for i, (code, split) in enumerate(names):
            x = (_to_images(f[f"x_{split}"], f"{path}: x_{split}") if stacked is None
                 else stacked[bounds[i]:bounds[i + 1]])
            parts.append((code, x, _check_labels(f[f"y_{split}"], len(x), f"{path}: y_{split}")))
    return _stack_parts(parts, f"npz:{path}", stacked)


# tfds ---------------------------------------------------------------------


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 (optional dependency: the [tfds] extra)
    except ImportError as e:
        raise ImportError(_TFDS_HINT) from e
    return tfds


def _tfds_keys(tfds, info, name: str) -> tuple[str, str]:
    """(image key, label key) from the features (supervised keys if given)."""
    sk = info.supervised_keys
    if isinstance(sk, tuple) and len(sk) == 2 and all(isinstance(k, str) for k in sk):
        image_key, label_key = sk
    else:
        image_key, label_key = "image", "label"
    feats = info.features
    ok = (image_key in feats and label_key in feats
          and isinstance(feats[label_key], tfds.features.ClassLabel)
          and len(feats[image_key].shape) in (2, 3))
    if not ok:
        raise ValueError(f"tfds data set {name!r} is not an image-classification "
                         f"set (features: {feats})")
    return image_key, label_key


def _read_chunk(ds, keys: list[int]) -> list:
    try:
        return ds.__getitems__(keys)  # batched array_record reads: ~2x faster
    except TypeError:
        # tfds.testing.mock_data (tfds 4.9.10) installs an unbound __getitems__.
        return [ds[k] for k in keys]


def _decode_images(images: list[np.ndarray], size: int | None, name: str, *,
                   crop: bool = False) -> np.ndarray:
    """Stack one chunk as (n, H, W, C), uint8 as stored (else float32).

    With ``size``, every image is first resized to (size, size) with Pillow
    bilinear (for data sets whose images vary in size); with ``crop`` too,
    resized (shorter side) and centre-cropped instead, the ImageNet eval
    transform (:func:`hpft_jax.pipeline.resize_center_crop_uint8`).
    """
    if size is not None and crop:
        images = [pipeline.resize_center_crop_uint8(np.asarray(im, np.uint8), size)
                  for im in images]
    elif size is not None:
        from PIL import Image  # noqa: PLC0415 (optional: only decoding tfds images needs it)

        def pil_resize(im):
            grey = im.ndim == 3 and im.shape[-1] == 1
            out = np.asarray(Image.fromarray(im[..., 0] if grey else im)
                             .resize((size, size), Image.BILINEAR))
            return out[..., None] if grey else out

        images = [pil_resize(im) for im in images]
    elif len({im.shape for im in images}) > 1:
        raise ValueError(f"images of tfds data set {name!r} vary in size; "
                         "set image_size to resize them")
    return _to_images(np.stack(images), f"tfds {name!r} images")


def _load_tfds(name: str, cfg: DataConfig) -> _Base:
    tfds = _import_tfds()
    fmt = {"file_format": "array_record"}  # tfds.data_source needs random access
    builder = tfds.builder(name, data_dir=cfg.data_dir, **fmt)
    image_key, label_key = _tfds_keys(tfds, builder.info, name)
    num_classes = builder.info.features[label_key].num_classes
    variable = None in builder.info.features[image_key].shape[:2]
    if variable and cfg.image_size is None:
        raise ValueError(f"images of tfds data set {name!r} vary in size; "
                         "set image_size to resize them")
    known = set(builder.info.splits.keys())  # empty until prepared (and in mocks)
    if name == "oxford_flowers102" and cfg.flowers_split == "table4":
        # Table 4: train on the 6,149 test images, test on train + val (2,040).
        splits = [(TRAIN, "test"), (TEST, "train"), (TEST, "validation")]
    elif not known or "test" in known:
        splits = [(TRAIN, "train")] + ([(VAL, "validation")] if "validation" in known else []) \
            + [(TEST, "test")]
    elif "validation" in known:
        splits = [(TRAIN, "train"), (TEST, "validation")]
    else:
        raise ValueError(f"tfds data set {name!r} has splits {sorted(known)}; "
                         "need 'train' and 'test' (or 'validation')")
    xs, ys, codes = [], [], []
    crop = imagenet_pipeline(cfg) and cfg.image_size is not None
    size = cfg.image_size if variable or crop else None
    for code, split in splits:
        try:
            ds = tfds.data_source(name, split=split, data_dir=cfg.data_dir,
                                  download=cfg.download, builder_kwargs=dict(fmt))
        except ModuleNotFoundError as e:
            if (e.name or "").startswith("tensorflow"):
                raise ImportError(
                    f"preparing tfds {name!r} needs TensorFlow: pip install tensorflow-cpu "
                    "(about 1.3 GB; reading prepared data does not)") from e
            raise
        except (KeyError, NotImplementedError, FileNotFoundError, AssertionError) as e:
            if cfg.download:
                raise
            raise FileNotFoundError(
                f"tfds data set {name!r} (split {split!r}) is not prepared in array_record "
                f"format under {builder.data_dir}. Prepare it once with internet access by "
                "running with --download (DataConfig(download=True)); preparing "
                "MNIST/CIFAR/STL10 also needs `pip install tensorflow-cpu`. "
                f"tfds said: {e}") from e
        n = len(ds)
        if n == 0:
            raise ValueError(f"tfds data set {name!r} split {split!r} is empty")
        codes.append(np.full(n, code, np.int8))
        for start in range(0, n, _CHUNK):
            examples = _read_chunk(ds, list(range(start, min(start + _CHUNK, n))))
            xs.append(_decode_images([np.asarray(e[image_key]) for e in examples], size, name,
                                     crop=crop))
            ys.append(np.asarray([e[label_key] for e in examples], np.int64))
    if len({x.shape[1:] for x in xs}) > 1:
        raise ValueError(f"images of tfds data set {name!r} vary in size; "
                         "set image_size to resize them")
    x = np.concatenate(xs)  # one copy of the whole data set
    del xs
    y = _check_labels(np.concatenate(ys), len(x), f"{name} labels")
    if y.max() >= num_classes:
        raise ValueError(f"tfds {name!r}: label {y.max()} >= num_classes {num_classes}")
    return _Base(x=x, y=y, part=np.concatenate(codes), num_classes=num_classes,
                 standardize=True)


def _map_chunks(fn, x: np.ndarray, *extra: np.ndarray) -> np.ndarray:
    """Apply a jitted ``fn(x_chunk, *extra_chunks)`` over leading-axis chunks.

    Chunks are padded to one fixed size (the next power of two, at most
    ``_CHUNK``) so that ``fn`` compiles once; the padding is cut off again.
    """
    n = len(x)
    if n == 0:
        return x
    size = min(_CHUNK, 1 << (n - 1).bit_length())
    out = None  # filled chunk by chunk: no list of chunks to concatenate
    for i in range(0, n, size):
        chunks = [a[i:i + size] for a in (x, *extra)]
        m = len(chunks[0])
        if m < size:
            chunks = [np.concatenate([c, np.repeat(c[-1:], size - m, axis=0)]) for c in chunks]
        y = np.asarray(fn(*chunks))[:m]
        if out is None:
            out = np.empty((n,) + y.shape[1:], y.dtype)
        out[i:i + m] = y
    return out


@functools.partial(jax.jit, static_argnums=1)
def _resize_chunk(x, size):
    out = augment.resize(images.to_unit(x), size)
    return images.quantize(out) if x.dtype == np.uint8 else out


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) -> (N, size, size, C), bilinear."""
    if x.shape[1:3] == (size, size):
        return x
    return _map_chunks(lambda c: _resize_chunk(c, size), x)


def _load_base(spec: DataSpec, cfg: DataConfig) -> _Base:
    if spec.kind == "digits":
        base = _load_digits()
    elif spec.kind == "idx":
        base = _load_idx(spec.name)
    elif spec.kind == "npz":
        base = _load_npz(spec.name)
    elif spec.kind == "tfds":
        base = _load_tfds(spec.name, cfg)
    else:  # DataSpec built by hand
        raise ValueError(f"unknown data kind {spec.kind!r}; known: {KINDS}")
    if spec.classes is not None and max(spec.classes) >= base.num_classes:
        raise ValueError(f"data spec {str(spec)!r}: class {max(spec.classes)} does not "
                         f"exist ({base.num_classes} classes)")
    if imagenet_pipeline(cfg):
        x = base.x
        if cfg.image_size is not None and x.shape[1:3] != (cfg.image_size,) * 2:
            x = pipeline.resize_center_crop(x, cfg.image_size)  # arrays: resize + crop
        return dataclasses.replace(base, x=pipeline.to_rgb(x))
    if cfg.image_size is not None:
        base = dataclasses.replace(base, x=_resize(base.x, cfg.image_size))
    return base


def imagenet_pipeline(cfg: DataConfig) -> bool:
    """Whether ``cfg`` reads data through the ImageNet pipeline (resize + centre
    crop, ImageNet mean/std; :mod:`hpft_jax.pipeline`)."""
    return cfg.pipeline == "imagenet"


# --------------------------------------------------------------------------
# Splitting


def _n_of(fraction: float, n: int) -> int:
    return int(np.floor(fraction * n + 0.5))


def plan_splits(y: np.ndarray, part: np.ndarray, classes: tuple[int, ...] | None, *,
                num_classes: int, val_fraction: float, test_fraction: float,
                per_class: int | None, exclude: np.ndarray | None,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) into a base data set, each sorted.

    y: (M,) labels; part: (M,) official split codes (TRAIN/VAL/TEST). Keeps
    ``classes`` (all if None). The pool is the official train split minus
    ``exclude``. Per class, the pool is shuffled, capped at ``per_class``, and
    (when the data has no official test / validation split) its first
    round(test_fraction n) go to test and the next round(val_fraction n) to
    val: stratified by class. Official val/test splits are kept whole.
    """
    keep = np.ones(len(y), bool) if classes is None else np.isin(y, classes)
    in_pool = keep & (part == TRAIN)
    if exclude is not None and len(exclude):
        in_pool[exclude] = False
    has_val, has_test = bool((part == VAL).any()), bool((part == TEST).any())
    pool = np.flatnonzero(in_pool)
    train, val, test = [], [], []
    for c in (range(num_classes) if classes is None else classes):
        idx = rng.permutation(pool[y[pool] == c])
        if per_class is not None:
            idx = idx[:per_class]
        n_test = 0 if has_test else _n_of(test_fraction, len(idx))
        n_val = 0 if has_val else _n_of(val_fraction, len(idx))
        test.append(idx[:n_test])
        val.append(idx[n_test:n_test + n_val])
        train.append(idx[n_test + n_val:])
    if has_test:
        test = [np.flatnonzero(keep & (part == TEST))]
    if has_val:
        val = [np.flatnonzero(keep & (part == VAL))]
    return tuple(np.sort(np.concatenate(s)).astype(np.int64) for s in (train, val, test))


def _downstream_plan(base: _Base, spec: DataSpec, cfg: DataConfig):
    return plan_splits(base.y, base.part, spec.classes, num_classes=base.num_classes,
                       val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                       per_class=cfg.per_class, exclude=None,
                       rng=np.random.default_rng([cfg.seed, _DOWNSTREAM_STREAM]))


# --------------------------------------------------------------------------
# Assembling a Dataset


@jax.jit
def _distort_by_origin(x, origin, seed, max_rotation, zoom_lo, zoom_hi):
    """x: (n, H, W, C); origin: (n,) uint32. Key of example i:
    fold_in(fold_in(key(seed), _DISTORT_STREAM), origin[i]). The options are
    traced values: one compilation serves every seed and setting. uint8 in,
    uint8 out (distorted in [0, 1], rounded)."""
    key = jax.random.fold_in(jax.random.key(seed), _DISTORT_STREAM)
    angle, z = jax.vmap(lambda i: augment.sample_rotate_zoom(
        jax.random.fold_in(key, i), max_rotation=max_rotation, zoom=(zoom_lo, zoom_hi)))(origin)
    out = augment.rotate_zoom(images.to_unit(x), angle, z)
    return images.quantize(out) if x.dtype == np.uint8 else out


def _distort_fixed(x: np.ndarray, origin: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Rotation + zoom drawn from the seed and each example's origin, so an
    example is distorted the same way whichever split it lands in."""
    opts = [np.float32(v) for v in (cfg.max_rotation, *cfg.zoom)]
    fn = functools.partial(_distort_by_origin, seed=np.uint32(cfg.seed),
                           max_rotation=opts[0], zoom_lo=opts[1], zoom_hi=opts[2])
    return _map_chunks(fn, x, origin.astype(np.uint32))


def _stats(base: _Base) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over the official train split, in float64."""
    train = np.flatnonzero(base.part == TRAIN) if (base.part != TRAIN).any() \
        else np.arange(len(base.x))
    c = base.x.shape[-1]
    total, sq, count = np.zeros(c), np.zeros(c), 0
    # Chunks of at most 2**22 values, gathered one at a time: ~80 MB of
    # temporaries whatever the image size (at most 4 * _CHUNK images).
    rows = max(1, min(4 * _CHUNK, 2**22 // int(np.prod(base.x.shape[1:]))))
    for i in range(0, len(train), rows):
        chunk = images.to_unit(base.x[train[i:i + rows]]).reshape(-1, c).astype(np.float64)
        total += chunk.sum(0)
        sq += (chunk**2).sum(0)
        count += len(chunk)
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def _assemble(spec: DataSpec, name: str, base: _Base, plan, *, distort: bool,
              cfg: DataConfig) -> Dataset:
    if spec.classes is None:
        lookup, k = np.arange(base.num_classes, dtype=np.int32), base.num_classes
    else:
        lookup = np.full(base.num_classes, -1, np.int32)
        lookup[list(spec.classes)] = np.arange(len(spec.classes), dtype=np.int32)
        k = len(spec.classes)
    if len(plan[0]) == 0:
        raise ValueError(f"data spec {name!r} leaves no training examples")
    if imagenet_pipeline(cfg):
        mean, std = pipeline.stats()
    else:
        mean, std = _stats(base) if base.standardize else (None, None)
    every = np.concatenate(plan)
    x_all = images.take_rows(base.x, every)  # consumes base.x (reorders it in place)
    if distort:
        x_all = _distort_fixed(x_all, every, cfg)  # one pass: one compilation
    if mean is not None and x_all.dtype != np.uint8:  # uint8: the model normalises
        x_all -= mean  # in place: x_all is a fresh copy
        x_all /= std
    splits, start = [], 0
    for idx in plan:
        x = x_all[start:start + len(idx)]
        start += len(idx)
        splits.append(Split(x=np.ascontiguousarray(x), y=lookup[base.y[idx]],
                            origin=idx))
    return Dataset(name=name, num_classes=k, train=splits[0], val=splits[1],
                   test=splits[2], mean=mean, std=std)


def load_graphs(spec: DataSpec, cfg: DataConfig) -> Dataset:
    """An ``ogb:DIR[@V]`` data set with its own (scaffold) split; multi-label."""
    if cfg.augment != "none":
        raise ValueError(f"data spec {str(spec)!r}: augmentation {cfg.augment!r} is for images; "
                         "graphs take --augment none")
    path, budget = ogb.parse_budget(spec.name, str(spec))
    t, parts = ogb.load_splits(path, budget, str(spec))
    splits = [GraphSplit(x, y, origin=idx) for x, y, idx in
              (parts[k] for k in ("train", "val", "test"))]
    if len(splits[0]) == 0:
        raise ValueError(f"data spec {str(spec)!r} leaves no training graphs")
    return Dataset(name=str(spec), num_classes=t, train=splits[0], val=splits[1],
                   test=splits[2], task="multilabel")


VOC_SIZE = 480  # crop side for ``voc:`` when --image-size is not given (torchvision's)


def load_voc(spec: DataSpec, cfg: DataConfig) -> Dataset:
    """A ``voc:DIR`` data set: train.txt minus a seeded val part, test = val.txt."""
    if cfg.augment not in ("none", "scale_crop_flip"):
        raise ValueError(f"data spec {str(spec)!r}: augmentation {cfg.augment!r} moves images "
                         "but not masks; segmentation takes --augment none or scale_crop_flip")
    size = cfg.image_size or VOC_SIZE
    if size % 16:
        raise ValueError(f"data spec {str(spec)!r}: image size {size} must be a multiple of 16 "
                         "(DeepLabV3's output stride)")
    x, y = voc.read(spec.name, "train", size)
    tx, ty = voc.read(spec.name, "val", size)
    perm = np.random.default_rng([cfg.seed, _DOWNSTREAM_STREAM]).permutation(len(x))
    nv = int(round(cfg.val_fraction * len(x)))
    vi, ti = np.sort(perm[:nv]), np.sort(perm[nv:])
    if len(ti) == 0:
        raise ValueError(f"data spec {str(spec)!r} leaves no training images")
    return Dataset(name=str(spec), num_classes=len(voc.CLASSES),
                   train=SegSplit(x[ti], y[ti], origin=ti), val=SegSplit(x[vi], y[vi], origin=vi),
                   test=SegSplit(tx, ty, origin=np.arange(len(tx)) + len(x)),
                   mean=voc.IMAGENET_MEAN, std=voc.IMAGENET_STD, task="segmentation")


def _check_image_augment(spec: DataSpec, cfg: DataConfig) -> None:
    if cfg.augment == "scale_crop_flip":
        raise ValueError(f"data spec {str(spec)!r}: augmentation 'scale_crop_flip' moves "
                         "segmentation masks with their images (voc: data); classification "
                         "takes none, flip_crop or rrc_flip")


def load_source(cfg: DataConfig) -> Dataset:
    """Pretraining data ``cfg.source``: undistorted, all its classes.

    If ``cfg.downstream`` reads the same base data set, the originals of the
    downstream val and test splits are removed first (no leakage).
    """
    spec, down = parse_spec(cfg.source), parse_spec(cfg.downstream)
    if spec.kind == "ogb":
        return load_graphs(spec, cfg)
    if spec.kind == "voc":
        return load_voc(spec, cfg)
    _check_image_augment(spec, cfg)
    base = _load_base(spec, cfg)
    exclude = None
    if spec.same_base(down):
        _, d_val, d_test = _downstream_plan(base, down, cfg)
        exclude = np.concatenate([d_val, d_test])
    plan = plan_splits(base.y, base.part, spec.classes, num_classes=base.num_classes,
                       val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                       per_class=None, exclude=exclude,
                       rng=np.random.default_rng([cfg.seed, _SOURCE_STREAM]))
    return _assemble(spec, cfg.source, base, plan, distort=False, cfg=cfg)


def load_downstream(cfg: DataConfig) -> Dataset:
    """HP/FT data ``cfg.downstream``, rotated and zoomed if ``cfg.distorts()``."""
    spec = parse_spec(cfg.downstream)
    if spec.kind == "ogb":
        return load_graphs(spec, cfg)  # no distortion: it is for images
    if spec.kind == "voc":
        return load_voc(spec, cfg)  # no distortion: it would move masks too
    _check_image_augment(spec, cfg)
    base = _load_base(spec, cfg)
    plan = _downstream_plan(base, spec, cfg)
    return _assemble(spec, cfg.downstream, base, plan, distort=cfg.distorts(), cfg=cfg)
