"""Tiny synthetic problems shared by the training tests (not a test module)."""

import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax.config import FTConfig, HPConfig, ModelConfig
from hpft_jax.models import make_classifier


def blobs(n=96, k=3, shape=(4, 4, 1), seed=0, scale=1.0):
    """k Gaussian classes in R^prod(shape); x (n, *shape) float32, y (n,) int32."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    means = rng.normal(size=(k, d)) * 2.0
    y = np.arange(n) % k
    x = means[y] + rng.normal(size=(n, d)) * scale
    return x.reshape((n,) + shape).astype(np.float32), y.astype(np.int32)


def data_dict(seed=0, n=96, shape=(4, 4, 1)):
    x, y = blobs(n + 48, shape=shape, seed=seed)
    return {"train_x": x[:n], "train_y": y[:n], "val_x": x[n:n + 24], "val_y": y[n:n + 24],
            "test_x": x[n + 24:], "test_y": y[n + 24:]}


def tiny_model(backbone="mlp", reinit_blocks=0, k=3):
    cfg = ModelConfig(backbone=backbone, width=8 if backbone == "mlp" else None, depth=2,
                      reinit_blocks=reinit_blocks)
    return make_classifier(cfg, k)


def init_vars(model, x, seed=0):
    return model.init(jax.random.key(seed), jnp.asarray(x[:2]), train=False)


HP = HPConfig(taus=(0, 1, 3), lr=0.05, batch_size=32)
FT = FTConfig(epochs=4, lr=0.02, batch_size=32, patience=2, direction_steps=5)
