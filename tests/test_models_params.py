"""Backbone slicing, heads, parameter partition and loud checkpoint loading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpft_jax.config import ModelConfig
from hpft_jax.models import make_backbone, make_classifier
from hpft_jax.params import (CheckpointMismatchError, head_block_names, head_mask,
                             is_head_path, load_pretrained, merge, partition)


@pytest.mark.parametrize("backbone, shape", [("mlp", (2, 8, 8, 1)), ("resnet_tiny", (2, 8, 8, 3))])
def test_trunk_then_top_equals_full_model(backbone, shape):
    model = make_classifier(ModelConfig(backbone=backbone, width=8 if backbone == "mlp" else None), 3)
    x = jax.random.normal(jax.random.key(0), shape)
    v = model.init(jax.random.key(1), x)
    logits, z = model.apply(v, x)
    assert logits.shape == (2, 3) and z.ndim == 2
    for split in range(model.backbone.num_blocks + 1):
        h = model.apply(v, x, split=split, method=model.trunk)
        l2, z2 = model.apply(v, h, split=split, method=model.top)
        np.testing.assert_allclose(l2, logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z2, z, rtol=1e-5, atol=1e-6)


def test_resnet50_block_names_follow_the_paper():
    bb = make_backbone("resnet50")
    assert bb.num_blocks == 16
    m = make_classifier(ModelConfig(backbone="resnet50", reinit_blocks=3), 10)
    assert head_block_names(m, 3) == ("layer4_1", "layer4_2", "layer4_3")


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        make_backbone("vgg")
    with pytest.raises(ValueError, match="head"):
        ModelConfig(head="transformer")
    with pytest.raises(ValueError, match="only 4 blocks"):
        make_classifier(ModelConfig(backbone="mlp", reinit_blocks=5), 3)


def test_head_mask_and_partition():
    m = make_classifier(ModelConfig(backbone="mlp", width=4, depth=3, reinit_blocks=1), 3)
    v = m.init(jax.random.key(0), jnp.ones((1, 5)))
    blocks = head_block_names(m, 1)
    assert blocks == ("dense2",)
    mask = head_mask(v["params"], blocks)
    assert mask["head"]["out"]["kernel"] and mask["backbone"]["dense2"]["kernel"]
    assert not mask["backbone"]["dense0"]["kernel"]
    a, b = partition(v["params"], lambda p: is_head_path(p, blocks))
    assert set(a) == {"head", "backbone"} and set(a["backbone"]) == {"dense2"}
    assert set(b["backbone"]) == {"dense0", "dense1"}
    back = merge(a, b)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(v["params"])
    with pytest.raises(ValueError, match="duplicate"):
        merge(a, a)


def test_load_pretrained_copies_backbone_and_keeps_fresh_head():
    src = make_classifier(ModelConfig(backbone="mlp", width=4, depth=2), 10)
    dst = make_classifier(ModelConfig(backbone="mlp", width=4, depth=2), 3)
    x = jnp.ones((1, 6))
    pre = src.init(jax.random.key(0), x)
    fresh = dst.init(jax.random.key(1), x)
    out, not_loaded = load_pretrained(fresh, pre, reinit=lambda p: is_head_path(p, ()))
    np.testing.assert_array_equal(out["params"]["backbone"]["dense1"]["kernel"],
                                  pre["params"]["backbone"]["dense1"]["kernel"])
    np.testing.assert_array_equal(out["params"]["head"]["out"]["kernel"],
                                  fresh["params"]["head"]["out"]["kernel"])
    assert not_loaded == ["params/head/out/bias", "params/head/out/kernel"]


def test_load_pretrained_lists_every_mismatch():
    a = make_classifier(ModelConfig(backbone="mlp", width=4, depth=2), 3)
    b = make_classifier(ModelConfig(backbone="mlp", width=5, depth=3), 3)
    x = jnp.ones((1, 6))
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(a.init(jax.random.key(0), x), b.init(jax.random.key(0), x),
                        reinit=lambda p: is_head_path(p, ()))
    msg = str(err.value)
    assert "params/backbone/dense2/kernel" in msg  # unexpected
    assert "params/backbone/dense0/kernel: model (6, 4) vs checkpoint (6, 5)" in msg
