"""Convolutions as patches + matmul (hpft_jax/convs.py, issue 14).

* ``conv_patches`` against torch's float64 conv2d (forward and both
  gradients, through torch autograd) and against ``lax.conv_general_dilated``
  on strided, asymmetrically padded, dilated, 1x1 and 'SAME' convolutions.
* The switch: ResNet training with ``conv="patches"`` (the custom VJP in the
  program) trains the same parameters as ``conv="lax"`` (float tolerance)
  inside the library's epoch loop; ``auto`` resolves by backend.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hpft_jax import convs, models, steps
from hpft_jax.config import FTConfig, ModelConfig
from hpft_jax.models import Classifier, LinearHead, ResNetTiny

DN = ("NHWC", "HWIO", "NHWC")
# (input H, W, C), kernel (kh, kw, O), strides, padding, kernel dilation
CASES = [
    ((9, 8, 3), (3, 3, 5), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((9, 9, 2), (3, 2, 4), (2, 1), ((1, 2), (0, 1)), (1, 1)),
    ((8, 8, 3), (1, 1, 6), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    ((10, 10, 2), (3, 3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((9, 9, 3), (3, 3, 4), (1, 1), ((1, 2), (1, 0)), (1, 1)),
]


def _inputs(case, seed=0):
    (h, w, c), (kh, kw, o), *_ = case
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, h, w, c)), rng.standard_normal((kh, kw, c, o)))


def _torch_ref(x, k, strides, padding, dil, r):
    """float64 conv2d (NCHW) and d<out, r>/dx, /dk by torch autograd."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    kt = torch.tensor(k.transpose(3, 2, 0, 1), requires_grad=True)
    (pt, pb), (pl, pr) = padding
    y = F.conv2d(F.pad(xt, (pl, pr, pt, pb)), kt, stride=strides, dilation=dil)
    if r is None:
        return (y.detach().numpy().transpose(0, 2, 3, 1),)
    (y * torch.tensor(r.transpose(0, 3, 1, 2))).sum().backward()
    return (y.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1),
            kt.grad.numpy().transpose(2, 3, 1, 0))


def _jax(fn, x, k, strides, padding, dil, r):
    f = lambda x, k: fn(x, k, strides, padding, rhs_dilation=dil,  # noqa: E731
                        dimension_numbers=DN)
    y, vjp = jax.vjp(f, jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32))
    return (y, *vjp(jnp.asarray(r, jnp.float32)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}")
def test_patches_conv_matches_float64_torch_and_lax(case):
    x, k = _inputs(case)
    _, _, strides, padding, dil = case
    y64 = _torch_ref(x, k, strides, padding, dil, None)[0]
    r = np.random.default_rng(1).standard_normal(y64.shape)
    ref = _torch_ref(x, k, strides, padding, dil, r)
    got = _jax(convs.conv_patches, x, k, strides, padding, dil, r)
    xla = _jax(lax.conv_general_dilated, x, k, strides, padding, dil, r)
    for name, a, b, c in zip(("out", "d/dx", "d/dkernel"), got, ref, xla):
        assert a.shape == b.shape, name
        scale = np.abs(b).max()
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=2e-6 * scale, err_msg=name)
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=2e-6 * scale,
                                   err_msg=name)


def test_patches_conv_same_padding_and_fallback():
    x, k = (jnp.asarray(a, jnp.float32) for a in _inputs(CASES[1]))
    for pad in ("SAME", "VALID"):
        a = convs.conv_patches(x, k, (2, 2), pad, dimension_numbers=DN)
        b = lax.conv_general_dilated(x, k, (2, 2), pad, dimension_numbers=DN)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # grouped convolutions fall back to lax: same result, a conv op in the program
    k2 = k[:, :, :1, :4]  # (3, 3, 1, 4): 2 input channels in 2 groups of 1
    x2 = x[..., :2]
    f = lambda x, k: convs.conv_patches(x, k, (1, 1), "SAME", dimension_numbers=DN,  # noqa: E731
                                        feature_group_count=2)
    np.testing.assert_allclose(f(x2, k2), lax.conv_general_dilated(
        x2, k2, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2), atol=1e-5)
    assert "conv_general_dilated" in str(jax.make_jaxpr(f)(x2, k2))


def test_resolve_and_config():
    assert convs.resolve("auto", "cpu") == "patches"
    assert convs.resolve("auto", "gpu") == "lax" and convs.resolve("auto", "tpu") == "lax"
    assert convs.resolve("lax", "cpu") == "lax" and convs.resolve("patches", "gpu") == "patches"
    with pytest.raises(ValueError, match="conv must be"):
        convs.resolve("fast")
    with pytest.raises(ValueError, match="conv must be"):
        ModelConfig(conv="fast")
    cfg = ModelConfig(backbone="resnet_tiny", conv="lax")
    assert models.make_classifier(cfg, 3).conv == "lax"
    assert models.make_classifier(ModelConfig(backbone="resnet_tiny"), 3).conv == "auto"


def _train(conv):
    model = Classifier(ResNetTiny(), LinearHead(3), conv=conv)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((24, 10, 10, 3)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 3, 24), jnp.int32)
    v = model.init(jax.random.key(0), xs[:2])
    tx = steps.ft_optimizer(FTConfig(lr=0.05), 6)
    state = steps.init_state(v["params"], v["batch_stats"], tx)
    init = v["params"]
    step = steps.make_train_step(model, tx, num_classes=3, eta=1.0)
    key = jax.random.key(3)
    jaxpr = str(jax.make_jaxpr(step)(state, xs[:8], ys[:8], key))
    run = jax.jit(steps.make_epoch(step, batch_size=8, num_examples=24))
    for e in range(2):  # the library's in-program loop, 2 epochs of 3 steps
        state, _ = run(state, xs, ys, key, e)
    return state, jaxpr, init


@pytest.mark.slow
def test_switch_trains_the_same_parameters():
    """2 epochs of 3 steps in the library's loop: conv="patches" (custom VJP,
    GEMM gradients) gives conv="lax"'s parameters and BatchNorm statistics."""
    a, ja, init = _train("lax")
    b, jb, _ = _train("patches")
    # patches: the kernels' gradients are GEMMs, not convolutions
    assert jb.count("conv_general_dilated") < ja.count("conv_general_dilated")
    assert jb.count("dot_general") > ja.count("dot_general")
    for tree_a, tree_b in ((a.params, b.params), (a.batch_stats, b.batch_stats)):
        for u, w in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
            np.testing.assert_allclose(u, w, rtol=0, atol=2e-5 * max(1.0, float(jnp.abs(u).max())))
    moved = max(float(jnp.abs(u - w).max()) for u, w in zip(jax.tree.leaves(a.params),
                                                                jax.tree.leaves(init)))
    assert moved > 1e-3  # training moved the parameters: the comparison is not trivial


def test_run_directory_from_before_the_switch_resumes(tmp_path):
    """A config.json written before ModelConfig.conv existed reads as conv='auto'."""
    import json

    from hpft_jax import config as config_lib
    from hpft_jax.runlog import RunDir

    cfg = config_lib.SweepConfig()
    old = config_lib.to_dict(cfg)
    del old["model"]["conv"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    RunDir(str(tmp_path)).write_config(cfg)  # same run: accepted
    with pytest.raises(ValueError, match="different config"):
        RunDir(str(tmp_path)).write_config(
            config_lib.SweepConfig(model=config_lib.ModelConfig(conv="lax")))
