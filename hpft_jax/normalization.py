"""Which input normalisation a run uses, decided without JAX (flags use it).

``DataConfig.pipeline``: ``dataset`` (each data set standardised with its
own train statistics; the default) or ``imagenet`` (torchvision's ImageNet
mean/std, resize + centre crop; :mod:`hpft_jax.pipeline`). An imported
backbone's ``meta.json`` records its normalisation
(:func:`hpft_jax.weights.import_weights`), and :func:`resolve` makes the
pipeline follow it when the config leaves it unset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

# torchvision's ImageNet statistics, for RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_imagenet(meta: dict) -> bool:
    """Whether a checkpoint's ``meta.json`` records the ImageNet mean/std."""
    norm = meta.get("normalization") or {}
    try:
        pairs = list(zip(norm["mean"], IMAGENET_MEAN, strict=True)) + \
            list(zip(norm["std"], IMAGENET_STD, strict=True))
        return all(math.isclose(a, b, abs_tol=1e-6) for a, b in pairs)
    except (KeyError, TypeError, ValueError):
        return False


def resolve(cfg):
    """``cfg`` (a SweepConfig) with ``data.pipeline`` filled in when None and
    a backbone is imported: ``imagenet`` if the ``--init-from`` meta.json
    records the ImageNet normalisation, else ``dataset``. An explicit value
    is kept; without ``--init-from`` None stays (= ``dataset``)."""
    if cfg.data.pipeline is not None or cfg.pretrain.init_from is None:
        return cfg
    choice = "dataset"
    meta_file = os.path.join(cfg.pretrain.init_from, "meta.json")
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            if is_imagenet(json.load(f)):
                choice = "imagenet"
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pipeline=choice))
