"""Skip-connection-layer (SCL) classifier of the companion paper (Sec. 3.3).

SCL FT (Li et al., *Principled and efficient transfer learning of deep
models via neural collapse*, Sec. 3.3, Fig. 8 right, App. B.2) finetunes one
block b of the backbone, plus the linear head, and feeds the head

    z = pool(f(x)) + zeropad(pool(h_b(x)))            (N, C)

where ``f(x)`` is the plain backbone's output (N, C), ``h_b(x)`` the output
of block b, ``pool`` adaptive average pooling to one value per channel (the
identity on (N, d) MLP activations) and ``zeropad`` pads the channels with
zeros at the end, up to the penultimate width C.

:class:`SCLClassifier` has exactly the parameter tree of
:class:`hpft_jax.models.Classifier` (the skip holds no parameters), so
pretrained weights and HP heads load unchanged, and it returns
``(logits, z)`` like ``Classifier``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from hpft_jax import images
from hpft_jax.neural_collapse import global_avg_pool
from hpft_jax.models import Classifier


def block_index(backbone, block: int | str) -> int:
    """0-based index of ``block`` (an index or a name such as ``layer3_1``)."""
    n = backbone.num_blocks
    names = [backbone.block_name(i) for i in range(n)]
    if isinstance(block, str):
        if block not in names:
            raise ValueError(f"block {block!r} is not a block of this backbone; "
                             f"choose from {names}")
        return names.index(block)
    if not 0 <= int(block) < n:
        raise ValueError(f"block must lie in [0, {n}) (or be one of {names}); got {block}")
    return int(block)


def zero_pad(h: jnp.ndarray, width: int) -> jnp.ndarray:
    """(N, c) -> (N, width): zeros appended to the channels; c <= width."""
    c = h.shape[-1]
    if c > width:
        raise ValueError(f"block output has {c} channels, more than the penultimate "
                         f"width {width}: zero-padding cannot match them")
    return jnp.pad(h, ((0, 0), (0, width - c))) if c < width else h


class SCLClassifier(nn.Module):
    """``apply(vars, x, train=...) -> (logits (N, K), z (N, C))`` with the skip.

    ``block`` is the 0-based index of the tuned block. For the last block the
    skip adds the penultimate features to themselves (z = 2 f(x)).
    """

    backbone: nn.Module
    head: nn.Module
    block: int
    input_norm: images.Norm | None = None  # as Classifier's

    def __call__(self, x, *, train: bool = False):
        n = self.backbone.num_blocks
        if not 0 <= self.block < n:
            raise ValueError(f"block must lie in [0, {n}); got {self.block}")
        x = images.model_input(x, self.input_norm)
        h = self.backbone(x, train=train, stop=self.block + 1)
        z = self.backbone(h, train=train, start=self.block + 1)
        z = z + zero_pad(global_avg_pool(h), z.shape[-1]).astype(z.dtype)
        return self.head(z, train=train), z


def with_skip(model: Classifier, block: int | str) -> SCLClassifier:
    """The SCL version of a plain :class:`Classifier` (same parameters)."""
    if not isinstance(model, Classifier):
        raise TypeError(f"model must be a hpft_jax.models.Classifier; got {type(model).__name__}")
    return SCLClassifier(backbone=model.backbone, head=model.head,
                         block=block_index(model.backbone, block), input_norm=model.input_norm)
