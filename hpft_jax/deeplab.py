"""DeepLabV3 (Chen et al. 2017) in Flax, laid out as torchvision's
``deeplabv3_resnet50``; the paper's segmentation setting (App. B.3).

* **Backbone**: the classification :class:`hpft_jax.models.ResNet` with
  ``dilate`` (torchvision's ``replace_stride_with_dilation``) and
  ``pool=False``. Output stride 16 dilates stage 4 (``dilate=(F, F, T)``),
  output stride 8 stages 3 and 4 (``(F, T, T)``, torchvision's choice for
  ``deeplabv3_resnet50``). Dilation changes no parameter, so imported
  ImageNet weights (``hpft import-weights``) load unchanged, and stages
  1-3 (1-2 at stride 8) give the classification network's features
  exactly (tested, and against torch with torchvision's dilation).
* **Head** = the whole segmentation head, which is the task head HP trains
  (the backbone, its BN statistics included, stays frozen in HP):
  ASPP [1x1 conv; three 3x3 convs dilated by ``rates``; image pooling
  (global mean, 1x1 conv, broadcast back)], each conv + BN + ReLU with
  ``channels`` outputs; concatenation, 1x1 projection + BN + ReLU, dropout
  0.5; 3x3 conv + BN + ReLU; 1x1 classifier conv (with bias); bilinear
  upsampling by the output stride (``jax.image.resize``: half-pixel
  centres, torch's ``align_corners=False``). Rates (6, 12, 18) at output
  stride 16, doubled at 8 (torchvision's (12, 24, 36)).
* **Inputs** must have sides divisible by the output stride, so that the
  upsampled logits have the input's size (checked by the data reader).

:class:`Segmenter` returns ``(logits (N, H, W, K), z (N, C))`` with z the
backbone's feature map averaged over locations: the vector the adaptation
metrics (E‖z_T − z₀‖², ...) are computed on; :meth:`Segmenter.features`
gives the map itself.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hpft_jax.models import BottleneckBlock, Classifier, ResNet, _conv_norm

Dtype = Any

# head name -> output stride (``ModelConfig.head``)
HEADS = {"deeplab": 16, "deeplab_os8": 8}
DILATE = {16: (False, False, True), 8: (False, True, True)}


def _conv_bn_relu(x, conv, norm, ch, k, rate, name):
    pad = ((rate, rate), (rate, rate)) if k == 3 else ((0, 0), (0, 0))
    y = conv(ch, (k, k), padding=pad, kernel_dilation=(rate, rate), name=f"{name}_conv")(x)
    return nn.relu(norm(name=f"{name}_bn")(y))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling; (N, h, w, C) -> (N, h, w, channels)."""

    rates: Sequence[int] = (6, 12, 18)
    channels: int = 256
    dropout: float = 0.5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        conv, norm = _conv_norm(self.dtype, train)
        ch = self.channels
        branches = [_conv_bn_relu(x, conv, norm, ch, 1, 1, "b0")]
        branches += [_conv_bn_relu(x, conv, norm, ch, 3, r, f"b{i + 1}")
                     for i, r in enumerate(self.rates)]
        pooled = _conv_bn_relu(jnp.mean(x, axis=(1, 2), keepdims=True), conv, norm, ch, 1, 1,
                               "pool")
        branches.append(jnp.broadcast_to(pooled, branches[0].shape))  # bilinear from 1x1
        y = _conv_bn_relu(jnp.concatenate(branches, axis=-1), conv, norm, ch, 1, 1, "project")
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class DeepLabHead(nn.Module):
    """ASPP -> 3x3 conv+BN+ReLU -> 1x1 classifier -> bilinear x ``upsample``;
    feature map (N, h, w, C) -> logits (N, h·s, w·s, K)."""

    num_classes: int
    upsample: int = 16
    rates: Sequence[int] = (6, 12, 18)
    channels: int = 256
    dropout: float = 0.5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f, *, train: bool = False):
        conv, norm = _conv_norm(self.dtype, train)
        y = ASPP(self.rates, self.channels, self.dropout, self.dtype, name="aspp")(f, train=train)
        y = _conv_bn_relu(y, conv, norm, self.channels, 3, 1, "conv")
        y = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(y)
        n, h, w, k = y.shape
        y = y.astype(jnp.float32)
        return jax.image.resize(y, (n, h * self.upsample, w * self.upsample, k), "bilinear")


class Segmenter(Classifier):
    """A :class:`Classifier` whose head maps a feature map to per-pixel
    logits; z = the feature map's mean over locations (N, C)."""

    def __call__(self, x, *, train: bool = False):
        f = self.backbone(x, train=train)
        return self.head(f, train=train), jnp.mean(f, axis=(1, 2))

    def top(self, h, *, split: int, train: bool = False):
        f = self.backbone(h, train=train, start=split)
        return self.head(f, train=train), jnp.mean(f, axis=(1, 2))

    def features(self, x, *, train: bool = False):
        """The backbone's feature map (N, h, w, C)."""
        return self.backbone(x, train=train)

    def with_map(self, x, *, train: bool = False):
        """``(logits, z, f)``: the model's outputs and the feature map f (N, h,
        w, C) they come from (z = f's mean over locations); one forward pass."""
        f = self.backbone(x, train=train)
        return self.head(f, train=train), jnp.mean(f, axis=(1, 2)), f


def output_stride(backbone: ResNet) -> int:
    """Input side / feature-map side of a (dilated) ResNet."""
    s = 4 if backbone.stem == "imagenet" else 1
    for _, _, strides, _ in backbone._layout():
        s *= strides
    return s


def make_segmenter(cfg, num_classes: int, task: str = "segmentation",
                   input_norm=None) -> Segmenter:
    """DeepLabV3 from a :class:`hpft_jax.config.ModelConfig` whose ``head`` is
    one of :data:`HEADS`; the backbone must be a bottleneck ResNet."""
    if task != "segmentation":
        raise ValueError(f"head {cfg.head!r} predicts per-pixel classes; the data set's task "
                         f"is {task!r}")
    if cfg.backbone not in ("resnet50",):
        raise ValueError(f"DeepLabV3 needs a bottleneck ResNet backbone (resnet50); got "
                         f"{cfg.backbone!r}")
    os_ = HEADS[cfg.head]
    dtype = jnp.dtype(cfg.dtype)
    kw = {"width": cfg.width} if cfg.width is not None else {}
    backbone = ResNet(stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock, stem=cfg.stem,
                      dtype=dtype, dilate=DILATE[os_], pool=False, **kw)
    if cfg.reinit_blocks > backbone.num_blocks:
        raise ValueError(f"reinit_blocks={cfg.reinit_blocks} but {cfg.backbone} has only "
                         f"{backbone.num_blocks} blocks")
    rates = tuple(r * 16 // os_ for r in (6, 12, 18))
    channels = 4 * (cfg.width or 64)  # 256 at ResNet-50's width; narrower for tests
    head = DeepLabHead(num_classes, upsample=output_stride(backbone), rates=rates,
                       channels=channels, dtype=dtype)
    return Segmenter(backbone=backbone, head=head, task=task, input_norm=input_norm)
