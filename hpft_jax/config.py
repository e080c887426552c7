"""Frozen configuration dataclasses, filled by the CLI and written as JSON.

Every run directory holds ``config.json``, produced by :func:`to_dict`, and
:func:`from_dict` rebuilds the exact dataclass from it, so a run can be
resumed or re-reported without the original command line.

Conventions taken from the paper (Ren et al., ICLR 2023):

* ``eta`` is the weight on the one-hot label in a smoothed target
  ``eta * e_y + (1 - eta) * u`` (Sec. 5.3), so ``eta = 1`` means no smoothing.
  optax's ``smooth_labels(labels, alpha)`` uses ``alpha = 1 - eta``.
* ``taus`` are head-probing epochs; 0 means a freshly initialised head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any


def _check_eta(name: str, eta: float) -> None:
    if not (0.0 < eta <= 1.0) or math.isnan(eta):
        raise ValueError(
            f"{name} must lie in (0, 1] (1 = no label smoothing); got {eta}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive; got {value}")


def default_taus(max_exp: int = 10) -> tuple[int, ...]:
    """``(0, 1, 2, 4, ..., 2**max_exp)``: the paper's 2^n sweep."""
    return (0,) + tuple(2**k for k in range(max_exp + 1))


AUGMENTS = ("none", "flip_crop", "rrc_flip", "scale_crop_flip")  # the last: segmentation
INPUTS = ("auto", "device", "stream")  # hpft_jax/stream.py
TOY_DOWNSTREAM = ("digits", "mnist", "idx")  # data whose downstream is distorted by default


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data, how it is split and distorted.

    ``source`` and ``downstream`` are data specs: ``digits`` (the 8x8 digits
    scikit-learn ships), ``NAME`` for a tensorflow-datasets image data set
    (``mnist``, ``cifar10``, ``stl10``, ...), ``idx:DIR`` for MNIST-format IDX
    files, ``npz:FILE`` for arrays ``x_train, y_train, x_test, y_test``.
    A ``:c1,c2,...`` suffix keeps only those classes, relabelled 0..K-1.
    """

    source: str = "digits"
    downstream: str = "digits:0,1,2"
    data_dir: str | None = None
    # rotation + zoom fixed per sample (the toy setting's shift). None: on
    # for the toy downstream data (digits, mnist, idx:) only; see distorts().
    distort: bool | None = None
    max_rotation: float = 30.0  # degrees, uniform in [-max, max]
    zoom: tuple[float, float] = (1.0, 1.3)
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    per_class: int | None = None  # cap on downstream samples per class
    image_size: int | None = None  # resize to this square size
    augment: str = "none"  # none | flip_crop | rrc_flip | scale_crop_flip (random, per step)
    # Input pipeline: "dataset" (squash to image_size, standardise with the
    # data set's own statistics) or "imagenet" (ImageNet mean/std, eval
    # resize of the shorter side to image_size*256/224 + centre crop; see
    # hpft_jax/pipeline.py). None: "imagenet" when the backbone's
    # --init-from metadata records ImageNet normalisation, else "dataset".
    pipeline: str | None = None
    # oxford_flowers102 split: "tfds" (train 1,020 / val 1,020 / test 6,149)
    # or "table4" (train on tfds' test 6,149, test on train+val 2,040; val
    # carved from the training pool by val_fraction).
    flowers_split: str = "tfds"
    download: bool = False  # let tfds reach the network
    seed: int = 0
    # Input path (hpft_jax/stream.py): "device" keeps each split on every
    # device, "stream" gathers batches on the host and prefetches them;
    # "auto" streams a stage whose data exceed data_budget bytes per device
    # (None: half the device's memory, a quarter of the RAM on CPU).
    input: str = "auto"
    data_budget: int | None = None

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("val_fraction and test_fraction must lie in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}; got {self.augment!r}")
        if self.pipeline not in (None, "dataset", "imagenet"):
            raise ValueError(f"pipeline must be 'dataset' or 'imagenet'; got {self.pipeline!r}")
        if self.flowers_split not in ("tfds", "table4"):
            raise ValueError(
                f"flowers_split must be 'tfds' or 'table4'; got {self.flowers_split!r}")
        if int(self.seed) != self.seed or not 0 <= self.seed < 2**32:
            raise ValueError(f"data seed must be an integer in [0, 2**32); got {self.seed}")
        if not self.max_rotation >= 0:
            raise ValueError(f"max_rotation must be >= 0 degrees; got {self.max_rotation}")
        if len(self.zoom) != 2 or not 0 < self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"zoom must be (lo, hi) with 0 < lo <= hi; got {self.zoom}")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"per_class must be >= 1 or None; got {self.per_class}")
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {', '.join(INPUTS)}; got {self.input!r}")
        if self.data_budget is not None and self.data_budget < 1:
            raise ValueError(f"data_budget must be a positive number of bytes or None (auto); "
                             f"got {self.data_budget}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1 or None; got {self.image_size}")

    def distorts(self) -> bool:
        """Whether the downstream data are rotated and zoomed: ``distort``
        when set, else on only for the toy data (:data:`TOY_DOWNSTREAM`:
        the digits, MNIST and MNIST-format IDX files)."""
        if self.distort is not None:
            return bool(self.distort)
        base = self.downstream.split(":", 1)[0]
        return base in TOY_DOWNSTREAM


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone f(x; B) and head g(z; v) (Sec. 3.1)."""

    backbone: str = "mlp"  # mlp | resnet18 | resnet34 | resnet50 | resnet_tiny
    width: int | None = None  # None: 128 for the MLP, 64 for ResNets
    depth: int = 4  # MLP backbone depth (Dense layers)
    stem: str = "cifar"  # ResNet stem: cifar (3x3, no max-pool) | imagenet
    head: str = "linear"  # linear | mlp | deeplab | deeplab_os8 (hpft_jax.deeplab)
    head_hidden: int = 256
    head_depth: int = 2  # Dense layers in the MLP head
    reinit_blocks: int = 0  # partial backbone: last k blocks join the head
    dtype: str = "float32"  # compute dtype; params stay float32
    # Training's convolutions (hpft_jax.convs): auto (patches + matmul on CPU,
    # XLA's convolution elsewhere) | lax | patches. Speed only.
    conv: str = "auto"

    def __post_init__(self):
        if self.conv not in ("auto", "lax", "patches"):
            raise ValueError(f"conv must be 'auto', 'lax' or 'patches'; got {self.conv!r}")
        if self.reinit_blocks < 0:
            raise ValueError(f"reinit_blocks must be >= 0; got {self.reinit_blocks}")
        if self.head not in ("linear", "mlp", "deeplab", "deeplab_os8"):
            raise ValueError(f"head must be 'linear', 'mlp', 'deeplab' or 'deeplab_os8'; "
                             f"got {self.head!r}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Supervised cross-entropy pretraining on the source data.

    ``init_from``: a backbone checkpoint directory (``hpft import-weights``
    or a pretraining cache entry) used instead of pretraining; its
    ``init_sha256`` (of its ``meta.json``, filled in from the directory when
    the config is built from flags) pins the exact file, so a rerun against
    a changed checkpoint is refused.
    """

    epochs: int = 60
    lr: float = 1e-3
    batch_size: int = 128
    optimizer: str = "adam"  # adam | sgd (momentum 0.9)
    weight_decay: float = 0.0
    seed: int = 0
    init_from: str | None = None
    init_sha256: str | None = None

    def __post_init__(self):
        _check_positive("pretrain.lr", self.lr)
        _check_positive("pretrain.batch_size", self.batch_size)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {self.optimizer!r}")


@dataclasses.dataclass(frozen=True)
class HPConfig:
    """Head probing: SGD on the head only, constant learning rate."""

    taus: tuple[int, ...] = dataclasses.field(default_factory=default_taus)
    lr: float = 1e-3
    batch_size: int = 128
    eta: float = 1.0
    momentum: float = 0.0  # 0: plain SGD (the library's HP); App. B.3 uses 0.9

    def __post_init__(self):
        taus = tuple(self.taus)
        if not taus:
            raise ValueError("the tau list is empty")
        if any(int(t) != t or t < 0 for t in taus):
            raise ValueError(f"taus must be non-negative integers; got {taus}")
        if list(taus) != sorted(set(taus)):
            raise ValueError(f"taus must be strictly increasing; got {taus}")
        _check_eta("hp.eta", self.eta)
        _check_positive("hp.lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"hp.momentum must lie in [0, 1); got {self.momentum}")
        _check_positive("hp.batch_size", self.batch_size)


@dataclasses.dataclass(frozen=True)
class FTConfig:
    """Finetuning: all parameters, SGD (+ momentum), cosine or constant lr.

    ``early_stopping``: stop after ``patience`` epochs without a better
    validation accuracy and keep the best-validation model; off, every run
    trains ``epochs`` epochs and the model at the last epoch is the one
    evaluated (the paper's toy setting, App. B.1).
    """

    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine (to 0 over epochs) | constant
    early_stopping: bool = True
    weight_decay: float = 0.0
    eta: float = 1.0
    patience: int = 10  # early stopping on validation accuracy
    batch_size: int = 128
    direction_steps: int = 30  # record ||grad_v L|| for this many first steps

    def __post_init__(self):
        _check_eta("ft.eta", self.eta)
        _check_positive("ft.lr", self.lr)
        _check_positive("ft.epochs", self.epochs)
        _check_positive("ft.batch_size", self.batch_size)
        if self.patience < 1:
            raise ValueError(f"ft.patience must be >= 1; got {self.patience}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"ft.schedule must be 'cosine' or 'constant'; got {self.schedule!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"ft.momentum must lie in [0, 1); got {self.momentum}")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The main job: pretrain (cached), HP snapshots, FT from every snapshot."""

    name: str = "toy"
    runs_dir: str = "runs"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    hp: HPConfig = dataclasses.field(default_factory=HPConfig)
    ft: FTConfig = dataclasses.field(default_factory=FTConfig)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ls_eta: float | None = 0.9  # extra lsHP run at max tau; None to skip
    vmap: bool = True  # batch FT runs over snapshots and seeds
    max_batch_runs: int | None = None  # cap on runs per vmapped program (memory)
    shard: tuple[int, int] = (0, 1)  # (i, n): run the i-th of n slices

    def __post_init__(self):
        if self.ls_eta is not None:
            _check_eta("ls_eta", self.ls_eta)
        i, n = self.shard
        if not 0 <= i < n:
            raise ValueError(f"shard must be i/n with 0 <= i < n; got {i}/{n}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if self.max_batch_runs is not None and self.max_batch_runs < 1:
            raise ValueError(f"max_batch_runs must be >= 1; got {self.max_batch_runs}")


# --------------------------------------------------------------------------
# JSON round trip


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples become lists) suitable for ``json.dump``."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin is tuple and value is not None:
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value)
    return value


def from_dict(cls: type, data: dict) -> Any:
    """Inverse of :func:`to_dict`; unknown keys raise a ``ValueError``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**{k: _coerce(hints[k], v) for k, v in data.items()})


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
