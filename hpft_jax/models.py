"""Flax linen backbones f(x; B) and heads g(z; v) (Sec. 3.1 of the paper).

Every backbone is a chain ``stem -> blocks[0..n) -> pool`` and can run any
contiguous slice of it::

    backbone(x, train=...)                      # (N, ...) -> z: (N, h)
    backbone(x, train=..., stop=s)              # stem + blocks[:s]
    backbone(h, train=..., start=s)             # blocks[s:] + pool, h from above

``start=None`` (the default) means raw input: the stem runs first. With an
integer ``start`` the input is the output of block ``start - 1`` (the stem's
output for ``start = 0``) and the stem is skipped.

which is what head probing with a *partial backbone* needs: the last k blocks
are re-initialised and trained with the head, the first n-k stay frozen, and
the parameter tree is exactly the pretrained one (Sec. 5.3, Table 3).

:class:`Classifier` returns ``(logits, z)``, where ``z`` is the head's input
(the penultimate features), as big_vision does with its ``aux`` output.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from hpft_jax import images
from hpft_jax.gcn import GCN

Dtype = Any


def _refuse_bytes(x) -> None:
    """Raw uint8 pixels must be normalised first (a Classifier with
    ``input_norm`` does it); a backbone never silently reads 0..255."""
    if x.dtype == jnp.uint8:
        raise ValueError("backbone got uint8 images: normalise them first "
                         "(hpft_jax.images.normalize, or a Classifier with input_norm)")


# --------------------------------------------------------------------------
# MLP backbone: the paper's toy model (B.1), 4 x Dense(128) + ReLU.


class MLPBackbone(nn.Module):
    """Flatten, then ``depth`` Dense+ReLU blocks. z: (N, width)."""

    width: int = 128
    depth: int = 4
    dtype: Dtype = jnp.float32

    @property
    def num_blocks(self) -> int:
        return self.depth

    def block_name(self, i: int) -> str:
        return f"dense{i}"

    @nn.compact
    def __call__(self, x, *, train: bool = False, start: int | None = None,
                 stop: int | None = None):
        del train  # no normalisation layers
        stop = self.depth if stop is None else stop
        _refuse_bytes(x)
        h = x.reshape(x.shape[0], -1) if start is None else x  # stem: flatten
        h = h.astype(self.dtype)
        for i in range(start or 0, stop):
            h = nn.relu(nn.Dense(self.width, dtype=self.dtype,
                                 name=self.block_name(i))(h))
        return h


# --------------------------------------------------------------------------
# ResNets (He et al. 2016), laid out as torchvision's.
#
# Padding is explicit and equals torchvision's: 3x3 convs pad (1, 1) and 1x1
# convs pad 0, whatever the stride. ``padding="SAME"`` would pad a stride-2
# 3x3 conv on an even input by (0, 1), shifting every window by one pixel;
# pretrained torchvision weights then give different features. The blocks are
# the same under both stems, so a CIFAR-stem ResNet is a torchvision ResNet
# with only the stem changed.

_PAD1 = ((1, 1), (1, 1))
_PAD0 = ((0, 0), (0, 0))


def _conv_norm(dtype: Dtype, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=dtype)
    return conv, norm


def _shortcut(x, y, conv, norm, strides):
    """x, or its 1x1-conv + BN projection (``proj_conv``/``proj_bn``, torchvision's
    ``downsample``) when the block changes the shape."""
    if x.shape == y.shape:
        return x
    x = conv(y.shape[-1], (1, 1), strides, padding=_PAD0, name="proj_conv")(x)
    return norm(name="proj_bn")(x)


class _Block(nn.Module):
    """A residual block's settings: output ``filters`` (before expansion),
    ``strides`` of its strided conv, compute ``dtype``."""

    filters: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    dilation: int = 1  # of the 3x3 conv (torchvision's replace_stride_with_dilation)


class BasicBlock(_Block):
    """Two 3x3 convs, stride on the first; ResNet18/34 (torchvision's BasicBlock).

    Submodules in order: Conv_0, BatchNorm_0, Conv_1, BatchNorm_1 and, when the
    shape changes, proj_conv (1x1, stride s) and proj_bn (torchvision's
    ``downsample.0`` / ``downsample.1``).
    """

    @nn.compact
    def __call__(self, x, *, train: bool):
        if self.dilation != 1:  # as torchvision's BasicBlock
            raise NotImplementedError("dilation > 1 is not supported in BasicBlock")
        conv, norm = _conv_norm(self.dtype, train)
        s = (self.strides, self.strides)
        y = conv(self.filters, (3, 3), s, padding=_PAD1)(x)
        y = nn.relu(norm()(y))
        y = conv(self.filters, (3, 3), padding=_PAD1)(y)
        y = norm()(y)
        return nn.relu(_shortcut(x, y, conv, norm, s) + y)


class BottleneckBlock(_Block):
    """1x1 -> 3x3 (stride s) -> 1x1 (x4 expansion); ResNet50, torchvision's v1.5.

    Submodules: Conv_0..2, BatchNorm_0..2, and proj_conv / proj_bn.
    """

    @nn.compact
    def __call__(self, x, *, train: bool):
        conv, norm = _conv_norm(self.dtype, train)
        s = (self.strides, self.strides)
        y = nn.relu(norm()(conv(self.filters, (1, 1), padding=_PAD0)(x)))
        d = self.dilation  # padding = dilation keeps torchvision's geometry
        y = nn.relu(norm()(conv(self.filters, (3, 3), s, padding=((d, d), (d, d)),
                                kernel_dilation=(d, d))(y)))
        y = norm()(conv(self.filters * 4, (1, 1), padding=_PAD0)(y))
        return nn.relu(_shortcut(x, y, conv, norm, s) + y)


class ResNet(nn.Module):
    """ResNet backbone; z: (N, C) after global average pooling.

    Blocks are named ``layer{stage}_{index}`` counting from 1, so the paper's
    L4.3 of ResNet50 is ``layer4_3`` and ``reinit_blocks=3`` re-initialises
    L4.1, L4.2 and L4.3.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: Callable[..., nn.Module] = BasicBlock
    width: int = 64
    stem: str = "cifar"  # cifar: 3x3 conv, no max-pool; imagenet: 7x7/2 + 3x3/2 max-pool
    dtype: Dtype = jnp.float32
    # torchvision's ``replace_stride_with_dilation`` for stages 2, 3, 4 (() = none):
    # the stage keeps stride 1 and dilates its 3x3 convs instead; same parameters.
    dilate: tuple[bool, ...] = ()
    pool: bool = True  # False: z is the last feature map (N, h, w, C) (DeepLabV3)

    @property
    def num_blocks(self) -> int:
        return sum(self.stage_sizes)

    def _layout(self) -> list[tuple[int, int, int, int]]:
        """(stage, index-in-stage, strides, dilation) for every block, in order,
        as torchvision's ``_make_layer``: a dilated stage's first block keeps
        the previous dilation, the rest use it times the replaced stride."""
        out, dilation = [], 1
        for s, size in enumerate(self.stage_sizes):
            stride, first = (2 if s > 0 else 1), dilation
            if s > 0 and s - 1 < len(self.dilate) and self.dilate[s - 1]:
                dilation *= stride
                stride = 1
            for j in range(size):
                out.append((s, j, stride if j == 0 else 1, first if j == 0 else dilation))
        return out

    def block_name(self, i: int) -> str:
        s, j, _, _ = self._layout()[i]
        return f"layer{s + 1}_{j + 1}"

    @nn.compact
    def __call__(self, x, *, train: bool = False, start: int | None = None,
                 stop: int | None = None):
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet'; got {self.stem!r}")
        n = self.num_blocks
        stop = n if stop is None else stop
        _refuse_bytes(x)
        h = x.astype(self.dtype)
        if start is None:
            if h.ndim != 4:
                raise ValueError(
                    f"ResNet expects images (N, H, W, C); got shape {x.shape}")
            if self.stem == "cifar":
                h = nn.Conv(self.width, (3, 3), padding=_PAD1, use_bias=False,
                            dtype=self.dtype, name="stem_conv")(h)
            else:
                h = nn.Conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
                            use_bias=False, dtype=self.dtype, name="stem_conv")(h)
            h = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, name="stem_bn")(h)
            h = nn.relu(h)
            if self.stem == "imagenet":
                # torchvision's MaxPool2d(3, 2, padding=1); pads with -inf.
                h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=_PAD1)
        layout = self._layout()
        for i in range(start or 0, stop):
            s, _, strides, dil = layout[i]
            kw = {"dilation": dil} if dil != 1 else {}
            h = self.block_cls(filters=self.width * 2**s, strides=strides,
                               dtype=self.dtype, name=self.block_name(i), **kw)(
                                   h, train=train)
        if self.pool and stop == n and (start is None or start < n):  # start == n: h is pooled already
            h = jnp.mean(h, axis=(1, 2))
        return h


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
# For tests only: two stages of one block each, narrow.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, width=8)


# --------------------------------------------------------------------------
# Heads


class LinearHead(nn.Module):
    """q = W z + b; (N, h) -> (N, K)."""

    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z, *, train: bool = False):
        del train
        return nn.Dense(self.num_classes, dtype=self.dtype, name="out")(z)


class MLPHead(nn.Module):
    """``depth`` Dense layers, ReLU between; (N, h) -> (N, K)."""

    num_classes: int
    hidden: int = 256
    depth: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z, *, train: bool = False):
        del train
        h = z
        for i in range(self.depth - 1):
            h = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name=f"hidden{i}")(h))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="out")(h)


# --------------------------------------------------------------------------
# Backbone + head


class Classifier(nn.Module):
    """``apply(vars, x, train=...) -> (logits (N, K), z (N, h))``.

    Parameters live under ``params/backbone`` and ``params/head``; BatchNorm
    statistics under ``batch_stats/backbone``. ``task``: the name of the
    :mod:`hpft_jax.tasks` kind its logits mean (loss, energy, metric).
    ``input_norm``: ((C,) mean, (C,) std) that uint8 images are standardised
    with on entry (:func:`hpft_jax.images.normalize`); float input is used
    as given. ``conv``: how training steps compute its convolutions
    (:mod:`hpft_jax.convs`: auto | lax | patches; the same parameters and
    results to float tolerance, speed only).
    """

    backbone: nn.Module
    head: nn.Module
    task: str = "classification"
    input_norm: images.Norm | None = None
    conv: str = "auto"

    def __call__(self, x, *, train: bool = False):
        z = self.backbone(images.model_input(x, self.input_norm), train=train)
        return self.head(z, train=train), z

    def trunk(self, x, *, split: int, train: bool = False):
        """The frozen part under a partial backbone: stem + blocks[:split]."""
        return self.backbone(images.model_input(x, self.input_norm), train=train, stop=split)

    def top(self, h, *, split: int, train: bool = False):
        """blocks[split:] + head, from the trunk's output: (logits, z)."""
        z = self.backbone(h, train=train, start=split)
        return self.head(z, train=train), z


# --------------------------------------------------------------------------
# Construction by name (the CLI's entry point)

BACKBONES = {
    "mlp": MLPBackbone,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet_tiny": ResNetTiny,
    "gcn": GCN,  # graph tables (hpft_jax.gcn); width = hidden (300), depth = layers
}


def make_backbone(name: str, *, width: int | None = None, depth: int | None = None,
                  stem: str = "cifar", dtype: Dtype = jnp.float32) -> nn.Module:
    """Backbone by name; ``width`` overrides the default width."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    kw: dict[str, Any] = {"dtype": dtype}
    if name in ("mlp", "gcn"):
        if width is not None:
            kw["width"] = width
        if depth is not None:
            kw["depth"] = depth
    else:
        kw["stem"] = stem
        if width is not None:
            kw["width"] = width
    return BACKBONES[name](**kw)


def make_classifier(cfg, num_classes: int, task: str = "classification",
                    input_norm: images.Norm | None = None) -> Classifier:
    """A :class:`Classifier` from a :class:`hpft_jax.config.ModelConfig`;
    ``num_classes``: the head's outputs (classes, or binary tasks);
    ``input_norm``: the data set's (:attr:`hpft_jax.data.Dataset.input_norm`)."""
    if cfg.head.startswith("deeplab"):
        from hpft_jax import deeplab  # noqa: PLC0415 (deeplab imports this module)

        return deeplab.make_segmenter(cfg, num_classes, task, input_norm)
    dtype = jnp.dtype(cfg.dtype)
    backbone = make_backbone(cfg.backbone, width=cfg.width, depth=cfg.depth,
                             stem=cfg.stem, dtype=dtype)
    if cfg.reinit_blocks > backbone.num_blocks:
        raise ValueError(
            f"reinit_blocks={cfg.reinit_blocks} but {cfg.backbone} has only "
            f"{backbone.num_blocks} blocks")
    if cfg.head == "linear":
        head = LinearHead(num_classes, dtype=dtype)
    else:
        head = MLPHead(num_classes, hidden=cfg.head_hidden, depth=cfg.head_depth,
                       dtype=dtype)
    return Classifier(backbone=backbone, head=head, task=task, input_norm=input_norm,
                      conv=cfg.conv)
