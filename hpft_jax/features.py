"""Penultimate features z of a saved backbone: how to check an import.

    z = features("imported/r50", x)     # x: (N, H, W, C) normalised, z: (N, h)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax import weights


def make_feature_fn(backbone, variables: dict, *, chunk: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """``f(x (N, H, W, C)) -> z (N, h)``: eval mode, jitted, ``chunk`` images at a time.

    ``variables`` holds the backbone's own ``params`` / ``batch_stats``
    (no ``backbone`` level). The last chunk is zero-padded, so every call
    with the same image size reuses one compiled program.
    """
    apply = jax.jit(lambda v, x: backbone.apply(v, x, train=False))

    def f(x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        c = max(1, min(chunk, n))
        out = []
        for i in range(0, n, c):
            xb = x[i:i + c]
            pad = c - xb.shape[0]
            if pad:
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            out.append(np.asarray(apply(variables, jnp.asarray(xb)))[:c - pad])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return f


def check_images(x: np.ndarray, in_channels: int) -> np.ndarray:
    """``x`` as float32 (N, H, W, C); a clear ValueError otherwise."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected images (N, H, W, C); got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected normalised float images; got dtype {x.dtype} "
                         "(scale to [0, 1] and standardise with the checkpoint's mean/std)")
    if x.shape[-1] != in_channels:
        raise ValueError(f"expected {in_channels} channels last (N, H, W, C); got shape {x.shape}")
    return x.astype(np.float32, copy=False)


def features(init_dir: str, x: np.ndarray, *, chunk: int = 64) -> np.ndarray:
    """Backbone features z (N, h) of images x (N, H, W, C), already normalised."""
    variables, meta = weights.load_imported(init_dir)
    bb_vars = {"params": variables["params"]["backbone"]}
    if variables["batch_stats"]:
        bb_vars["batch_stats"] = variables["batch_stats"]["backbone"]
    stem = bb_vars["params"].get("stem_conv")
    if stem is not None:  # ResNet: check the image layout against the stem
        x = check_images(x, int(stem["kernel"].shape[2]))
    else:
        x = np.asarray(x, np.float32)
    return make_feature_fn(weights.backbone_of(meta), bb_vars, chunk=chunk)(x)
