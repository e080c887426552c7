"""DeepLabV3: the dilated ResNet-50 against the classification one and
against torch with torchvision's dilation; head shapes and HP's split."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpft_jax import deeplab, hp, weights
from hpft_jax.config import ModelConfig
from hpft_jax.models import ResNet50, make_classifier

W = 8  # tiny ResNet-50 (bottleneck, 3-4-6-3 blocks)
STAGE3 = 3 + 4 + 6  # blocks through stage 3


def _dilate_like_torchvision(layer, dilation_first, dilation):
    """torchvision's _make_layer(dilate=True): stride 1, the first block keeps
    the previous dilation, the others get the new one (padding = dilation)."""
    layer[0].conv2.stride = (1, 1)
    layer[0].conv2.dilation = layer[0].conv2.padding = (dilation_first,) * 2
    layer[0].downsample[0].stride = (1, 1)
    for b in layer[1:]:
        b.conv2.dilation = b.conv2.padding = (dilation,) * 2


def _torch_map(net, x):
    import torch

    with torch.no_grad():
        h = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        h = net.maxpool(net.relu(net.bn1(net.conv1(h))))
        h = net.layer4(net.layer3(net.layer2(net.layer1(h))))
        return h.numpy().transpose(0, 2, 3, 1)


def _bb_vars(v):
    return {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}


@pytest.mark.slow  # ResNet-50 compiles: ~20 s per case on 2 shared cores
@pytest.mark.parametrize("os_", [16, 8])
def test_dilated_resnet50_matches_torch_and_classification_stages(tr, os_):
    net = tr.randomised("resnet50", width=W, seed=3)
    sd = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    variables, _, _ = weights.convert(sd, "resnet50", keep_fc=False)
    if os_ == 16:
        _dilate_like_torchvision(net.layer4, 1, 2)
    else:
        _dilate_like_torchvision(net.layer3, 1, 2)
        _dilate_like_torchvision(net.layer4, 2, 4)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    dil = ResNet50(width=W, stem="imagenet", dilate=deeplab.DILATE[os_], pool=False)
    assert deeplab.output_stride(dil) == os_
    got = np.asarray(jax.jit(dil.apply)(_bb_vars(variables), x))
    want = _torch_map(net, x)
    assert got.shape == want.shape == (2, 64 // os_, 64 // os_, 32 * W)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    # Same parameters as the classification ResNet-50; equal up to the first dilated stage.
    cls = ResNet50(width=W, stem="imagenet")
    same = STAGE3 if os_ == 16 else 3 + 4
    a = jax.jit(lambda v, x: dil.apply(v, x, stop=same))(_bb_vars(variables), x)
    b = jax.jit(lambda v, x: cls.apply(v, x, stop=same))(_bb_vars(variables), x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    shapes = lambda m: jax.tree_util.tree_map(  # noqa: E731
        jnp.shape, jax.eval_shape(m.init, jax.random.key(0), x))
    assert shapes(dil) == shapes(cls)


@pytest.mark.slow  # DeepLabV3 compiles: ~1 min on 2 shared cores
def test_segmenter_shapes_and_hp_trains_the_whole_head():
    cfg = ModelConfig(backbone="resnet50", width=W, stem="imagenet", head="deeplab")
    model = make_classifier(cfg, 5, "segmentation")
    x = jnp.ones((2, 32, 48, 3))
    v = jax.jit(model.init)(jax.random.key(0), x)  # jit: eager ResNet-50 is slow on CPU
    logits, z = jax.jit(model.apply)(v, x)
    assert logits.shape == (2, 32, 48, 5) and z.shape == (2, 32 * W)
    head = v["params"]["head"]
    assert set(head) == {"aspp", "conv_conv", "conv_bn", "classifier"}
    assert head["aspp"]["b1_conv"]["kernel"].shape == (3, 3, 32 * W, 4 * W)
    hp_params, hp_stats, fparams, fstats, split = hp.split_head(model, v, 0)
    assert split == 16 and set(hp_params) == {"head"} and set(hp_stats) == {"head"}
    assert set(fparams) == {"backbone"} and set(fstats) == {"backbone"}
    # top(trunk(x)) == the whole model (the HP path on cached feature maps).
    h = jax.jit(lambda v, x: model.apply(v, x, split=split, method=model.trunk))(v, x)
    l2, z2 = jax.jit(lambda v, h: model.apply(v, h, split=split, method=model.top))(v, h)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(z2), np.asarray(z), atol=1e-5)
    with pytest.raises(ValueError, match="per-pixel"):
        make_classifier(cfg, 5, "classification")


def test_bilinear_upsampling_matches_torch_align_corners_false(tr):
    import torch

    y = np.random.default_rng(1).normal(size=(1, 3, 4, 2)).astype(np.float32)
    got = jax.image.resize(y, (1, 48, 64, 2), "bilinear")
    want = torch.nn.functional.interpolate(torch.from_numpy(y.transpose(0, 3, 1, 2)),
                                           size=(48, 64), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-5)
