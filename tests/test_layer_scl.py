"""Layer FT and SCL FT (companion paper, Sec. 3.3) and ``hpft collapse``.

* The SCL skip against plain numpy sums and explicit pooling + zero-padding.
* Layer/SCL FT leave every other parameter bit-identical, train every leaf
  of the chosen block and the head, and update all BN statistics.
* The % of parameters tuned against a hand count and the companion paper's
  own Tables 3 and 5.
* The command end to end on the digits, with invariants that follow from a
  frozen backbone and an independent numpy NC1.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hpft_jax import checkpoint, config as C, data as data_lib, pretrain, scl
from hpft_jax.cli import build_parser, main
from hpft_jax.experiments import collapse as exp
from hpft_jax.models import Classifier, LinearHead, MLPBackbone, ResNetTiny, make_classifier
from hpft_jax.runlog import RunDir

from _toy import FT, data_dict


def _random_vars(model, x, seed=0):
    """Random-normal variables of ``model.init``'s structure (BN: mean 0, var 1).

    ``init`` itself is not run: its samplers take many seconds to compile on a CPU.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name:
            return (np.ones if "var" in name else np.zeros)(leaf.shape, leaf.dtype)
        fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _np_mlp(params, x, depth):
    """Numpy forward of MLPBackbone: every block's output."""
    h, outs = np.asarray(x).reshape(len(x), -1), []
    for i in range(depth):
        p = params[f"dense{i}"]
        h = np.maximum(h @ np.asarray(p["kernel"]) + np.asarray(p["bias"]), 0.0)
        outs.append(h)
    return outs


# --------------------------------------------------------------------------
# The skip connection


def test_scl_is_the_plain_sum_when_widths_match():
    model = Classifier(MLPBackbone(width=8, depth=3), LinearHead(3))
    x = np.random.default_rng(0).normal(size=(5, 4, 4, 1)).astype(np.float32)
    v = _random_vars(model, x)
    outs = _np_mlp(v["params"]["backbone"], x, 3)
    head = v["params"]["head"]["out"]
    for i in range(3):  # the last block adds the features to themselves
        logits, z = jax.jit(scl.with_skip(model, i).apply)(v, x)
        want = outs[i] + outs[-1]
        np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6, err_msg=f"block {i}")
        want_logits = want @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
    # the skip holds no parameters: exactly the plain tree, so pretrained weights load unchanged
    shapes = jax.eval_shape(scl.with_skip(model, 1).init, jax.random.key(0), x)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(v)
    assert [a.shape for a in jax.tree_util.tree_leaves(shapes)] == \
        [a.shape for a in jax.tree_util.tree_leaves(v)]


def _apply(module, v, x, train, **kw):
    """``(output, updated batch_stats or None)``."""
    if train:
        return module.apply(v, x, train=True, mutable=["batch_stats"], **kw)
    return module.apply(v, x, train=False, **kw), None


def test_scl_pools_and_zero_pads_a_narrower_block():
    model = Classifier(ResNetTiny(), LinearHead(3))  # block widths 8, 16
    x = np.random.default_rng(1).normal(size=(4, 6, 6, 2)).astype(np.float32)
    v = _random_vars(model, x)
    sm = scl.with_skip(model, "layer1_1")

    @functools.partial(jax.jit, static_argnums=2)
    def parts(v, x, train):
        bb = {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}
        h0, _ = _apply(model.backbone, bb, x, train, stop=1)  # (4, 6, 6, 8), unpooled
        f, _ = _apply(model.backbone, bb, x, train)  # (4, 16)
        (_, z), stats = _apply(sm, v, x, train)
        _, plain_stats = _apply(model, v, x, train)
        return h0, f, z, stats, plain_stats

    for train in (False, True):
        h0, f, z, stats, plain_stats = parts(v, x, train)
        assert h0.shape == (4, 6, 6, 8) and f.shape == (4, 16)
        skip = np.concatenate([np.asarray(h0).mean(axis=(1, 2)), np.zeros((4, 8), np.float32)], 1)
        np.testing.assert_allclose(z, np.asarray(f) + skip, rtol=1e-5, atol=1e-5,
                                   err_msg=f"train={train}")
        # every block runs once, so BN statistics update exactly as in the plain model
        for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(plain_stats)):
            np.testing.assert_array_equal(a, b)


def test_scl_rejects_bad_blocks_and_wider_skips():
    model = make_classifier(C.ModelConfig(backbone="mlp", width=8, depth=2), 3)
    with pytest.raises(ValueError, match="block 'dense7'"):
        scl.with_skip(model, "dense7")
    with pytest.raises(ValueError, match="block must lie in"):
        scl.with_skip(model, 2)
    with pytest.raises(ValueError, match="zero-padding"):
        scl.zero_pad(jnp.ones((2, 5)), 4)


# --------------------------------------------------------------------------
# Percentage of parameters tuned


def test_pct_tuned_matches_a_hand_count():
    model = make_classifier(C.ModelConfig(backbone="mlp", width=8, depth=2), 3)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
    dense0, dense1, head = 16 * 8 + 8, 8 * 8 + 8, 8 * 3 + 3
    total = dense0 + dense1 + head
    got = {j: exp.count_tuned(params, exp.trainable(j)) for j in
           (exp.Job("linear_probe", None), exp.Job("layer_ft", "dense0"),
            exp.Job("scl_ft", "dense1"), exp.Job("full_ft", None))}
    assert got == {exp.Job("linear_probe", None): (head, total),
                   exp.Job("layer_ft", "dense0"): (dense0 + head, total),
                   exp.Job("scl_ft", "dense1"): (dense1 + head, total),
                   exp.Job("full_ft", None): (total, total)}


@pytest.mark.parametrize("k, want", [
    # Table 3, ResNet18 on Cifar-10: linear probe 0.05 %, Layer/SCL FT of Block 5 8.27 %
    (10, {None: 0.05, "layer3_1": 8.27}),
    # Table 5 (50 classes assumed): Blocks 1, 3, 5, 7 and the linear probe
    (50, {None: 0.23, "layer1_1": 0.89, "layer2_1": 2.28, "layer3_1": 8.43, "layer4_1": 33.02}),
])
def test_pct_tuned_reproduces_the_companion_papers_tables(k, want):
    model = make_classifier(C.ModelConfig(backbone="resnet18", stem="imagenet"), k)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    for block, pct in want.items():
        job = exp.Job("linear_probe" if block is None else "layer_ft", block)
        n, total = exp.count_tuned(params, exp.trainable(job))
        assert round(100 * n / total, 2) == pct, block


# --------------------------------------------------------------------------
# Layer FT and SCL FT train exactly the chosen block and the head


def _finetune(model, job, v, data):
    cfg = dataclasses.replace(FT, epochs=2, patience=10)
    _, (res,), final = exp.finetune_job(model, job, cfg, [(v["params"], v.get("batch_stats", {}))],
                                        [0], data, num_classes=3, progress=False)
    assert res["epochs_run"] == 2
    return jax.tree_util.tree_map(lambda a: a[0], final)


def _check_only_block_and_head_moved(before, after, block):
    before, after = traverse_util.flatten_dict(before), traverse_util.flatten_dict(after)
    assert before.keys() == after.keys()
    tuned = {p for p in before if p[0] == "head" or p[1] == block}
    assert len(tuned) >= 4
    for p in before:
        if p in tuned:
            assert not np.array_equal(after[p], before[p]), p
        else:
            np.testing.assert_array_equal(after[p], before[p], err_msg=str(p))


def test_scl_ft_trains_only_the_chosen_block():
    data = data_dict()
    model = Classifier(MLPBackbone(width=8, depth=3), LinearHead(3))
    v = _random_vars(model, data["train_x"][:2])
    final = _finetune(model, exp.Job("scl_ft", "dense1"), v, data)
    _check_only_block_and_head_moved(v["params"], final["params"], "dense1")


def test_layer_ft_trains_only_the_chosen_block_and_updates_every_bn_statistic():
    """Companion paper App. B.2: BN statistics follow the downstream data in
    every method, frozen blocks included; their parameters stay put."""
    data = data_dict()
    model = Classifier(ResNetTiny(), LinearHead(3))
    v = _random_vars(model, data["train_x"][:2])
    final = _finetune(model, exp.Job("layer_ft", "layer1_1"), v, data)
    _check_only_block_and_head_moved(v["params"], final["params"], "layer1_1")
    s0 = traverse_util.flatten_dict(v["batch_stats"])
    s1 = traverse_util.flatten_dict(final["batch_stats"])
    assert any(p[1] == "layer2_1" for p in s0) and any(p[1] == "stem_bn" for p in s0)
    for p in s0:
        assert not np.array_equal(s1[p], s0[p]), p


# --------------------------------------------------------------------------
# The command end to end


def _nc1_numpy(h, y, k):
    """NC1 = tr(Sigma_W Sigma_B^+)/K with plain numpy, float64."""
    h = np.asarray(h, np.float64)
    mu = np.stack([h[y == c].mean(0) for c in range(k)])
    c = h - mu[y]
    sw = c.T @ c / len(h)
    m = mu - mu.mean(0)
    sb = m.T @ m / k
    return float(np.trace(sw @ np.linalg.pinv(sb, rcond=1e-10, hermitian=True)) / k)


def test_collapse_command_end_to_end(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    argv = ["collapse", "--runs-dir", runs, "--name", "t", "--width", "16", "--depth", "2",
            "--ft-epochs", "2", "--batch-size", "64", "--seeds", "0", "--quiet",
            "--blocks", "dense1", "--methods", "scl_ft"]
    assert main(argv[:-4] + ["--blocks", "dense9"]) == 2  # checked before anything is written
    assert "blocks ['dense9'] are not blocks of mlp" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(runs, "t"))
    # A stand-in "pretrained" backbone in the cache (pretraining itself is tested with the sweep).
    cfg = exp.EXPERIMENT.config_from_args(build_parser(["collapse"]).parse_args(argv))
    assert (cfg.blocks, cfg.methods) == (("dense1",), ("scl_ft",))
    ds = data_lib.load_downstream(cfg.sweep.data)
    src = make_classifier(pretrain.source_model_config(cfg.sweep.model), 10)
    pre_vars = _random_vars(src, ds.train.x[:2], seed=3)
    checkpoint.save_tree(pretrain.pretrained_dir(runs, cfg.sweep.data, cfg.sweep.model,
                                                 cfg.sweep.pretrain), pre_vars, {"metrics": {}})
    assert main(argv) == 0
    run = RunDir(os.path.join(runs, "t"))
    assert next(run.records("pretrain"))["reused"]
    (sc,) = run.records("collapse_ft")
    assert (sc["method"], sc["block"], sc["seed"]) == ("scl_ft", "dense1", 0)
    (pre,) = run.records("nc_pretrained")

    # % tuned: 64 -> 16 -> 16 -> 3
    d0, d1, hd = 64 * 16 + 16, 16 * 16 + 16, 16 * 3 + 3
    assert (sc["n_tuned"], sc["n_params"]) == (d1 + hd, d0 + d1 + hd)
    assert sc["pct_tuned"] == pytest.approx(100 * (d1 + hd) / (d0 + d1 + hd))

    # NC1 of the pretrained backbone on the downstream training set, against numpy
    outs = _np_mlp(pre_vars["params"]["backbone"], ds.train.x, 2)
    for name, h in zip(("dense0", "dense1"), outs):
        assert pre["layer_nc1"][name] == pytest.approx(_nc1_numpy(h, ds.train.y, 3), rel=1e-4)
    # SCL FT of the last block: z = 2 h_last, and NC1 is scale-invariant; dense0 stays frozen
    assert sc["z"]["nc1"] == pytest.approx(sc["layer_nc1"]["dense1"], rel=1e-6)
    assert sc["layer_nc1"]["dense0"] == pytest.approx(pre["layer_nc1"]["dense0"], rel=1e-6)
    assert sc["z"]["nc1"] != pytest.approx(pre["z"]["nc1"], rel=1e-6)  # dense1 did train
    for name in ("layerwise_nc1.png", "by_block.png"):
        assert os.path.getsize(run.figures(name)) > 1000
    with open(os.path.join(run.path, "collapse.md")) as f:
        assert "| SCL FT | dense1 (2/2) |" in f.read()
    with open(run.config_file) as f:
        assert C.from_dict(exp.CollapseConfig, json.load(f)) == cfg

    # a rerun continues (nothing left to do); --report-only never trains
    n = len(list(run.records()))
    assert main(argv + ["--no-figures"]) == 0
    assert main(argv + ["--report-only", "--no-figures"]) == 0
    assert len(list(run.records())) == n
    # a changed extra under the same --name is refused, and nothing is written
    capsys.readouterr()
    assert main(argv[:-1] + ["layer_ft"]) == 2
    assert "differs in ['methods']" in capsys.readouterr().err
    assert run.read_config(exp.CollapseConfig) == cfg
    assert len(list(run.records())) == n
