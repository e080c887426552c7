"""Head probing: backbone untouched, head only, snapshots consistent, one trace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hpft_jax import hp, steps
from hpft_jax.config import HPConfig
from hpft_jax.params import head_block_names, is_head_path
from hpft_jax.prepare import RunKey, ft_inits

from _toy import HP, blobs, init_vars, tiny_model


def _probe(model, base, x, y, cfg=HP, reinit=0, variants=None, **kw):
    return hp.probe(model, base, x, y, cfg, seeds=[0, 1], variants=variants or {"hp": 1.0},
                    reinit_blocks=reinit, num_classes=3, progress=False, **kw)


@pytest.mark.parametrize("backbone, reinit", [("mlp", 0), ("mlp", 1), ("resnet_tiny", 1)])
def test_backbone_bit_identical_after_hp(backbone, reinit):
    shape = (4, 4, 1) if backbone == "mlp" else (6, 6, 3)
    x, y = blobs(64, shape=shape)
    model = tiny_model(backbone, reinit)
    base = init_vars(model, x)
    probe = _probe(model, base, x, y, reinit=reinit)
    blocks = head_block_names(model, reinit)
    keys = [RunKey("hp", s, t) for t in HP.taus for s in (0, 1)]
    for key, (params, stats) in zip(keys, ft_inits(probe, keys, [0, 1])):
        full = traverse_util.flatten_dict({"params": params, "batch_stats": stats})
        ref = traverse_util.flatten_dict(base)
        assert set(full) == set(ref)
        for path, val in full.items():
            if not is_head_path(path, blocks):
                assert np.array_equal(np.asarray(val), np.asarray(ref[path])), (key, path)
    # and HP did train the head
    p0 = probe.snapshots[("hp", 0)][0]
    p3 = probe.snapshots[("hp", 3)][0]
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(p3))]
    assert all(moved)


def test_hp_step_never_touches_the_trunk():
    """With cached features the HP step contains no convolution at all."""
    x, y = blobs(32, shape=(6, 6, 3))
    model = tiny_model("resnet_tiny", 0)
    base = init_vars(model, x)
    hparams, hstats, fparams, fstats, split = hp.split_head(model, base, 0)
    feats = model.apply(base, jnp.asarray(x), split=split, method=model.trunk)
    tx = steps.hp_optimizer(HP)
    step = steps.make_hp_step(model, tx, num_classes=3, split=split)
    state = steps.HPState(hparams, hstats, tx.init(hparams), jnp.int32(0))
    jaxpr = str(jax.make_jaxpr(step)(state, feats[:8], jnp.asarray(y[:8]), jax.random.key(0),
                                     (fparams, fstats), jnp.float32(1.0)))
    assert "conv_general_dilated" not in jaxpr
    assert "dot_general" in jaxpr  # the linear head is there


def test_snapshots_do_not_depend_on_the_tau_list():
    x, y = blobs(64)
    model = tiny_model()
    base = init_vars(model, x)
    a = _probe(model, base, x, y, cfg=HPConfig(taus=(0, 2, 5), lr=0.05, batch_size=32))
    b = _probe(model, base, x, y, cfg=HPConfig(taus=(5,), lr=0.05, batch_size=32))
    for u, v in zip(jax.tree_util.tree_leaves(a.snapshots[("hp", 5)]),
                    jax.tree_util.tree_leaves(b.snapshots[("hp", 5)])):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_hp_learns_and_records_energy():
    x, y = blobs(96)
    model = tiny_model()
    probe = _probe(model, init_vars(model, x), x, y,
                   cfg=HPConfig(taus=(0, 20), lr=0.1, batch_size=32))
    recs = {(r["tau"], r["seed"]): r for r in probe.records}
    for s in (0, 1):
        assert recs[(20, s)]["hp_train_acc"] > recs[(0, s)]["hp_train_acc"]
        assert recs[(20, s)]["aie_hp"] < recs[(0, s)]["aie_hp"]
        assert sum(recs[(20, s)]["p0y_hist"]) == 96


def test_hp_traces_once_for_all_segments(monkeypatch):
    calls = {"n": 0}
    orig = steps.make_step_range

    def counting(*a, **k):
        run = orig(*a, **k)

        def traced(*a):
            calls["n"] += 1
            return run(*a)

        return traced

    monkeypatch.setattr(steps, "make_step_range", counting)
    x, y = blobs(64)
    model = tiny_model()
    _probe(model, init_vars(model, x), x, y, cfg=HPConfig(taus=(0, 1, 2, 4, 8), batch_size=32),
           variants={"hp": 1.0, "lshp": 0.9})
    assert calls["n"] == 1  # every segment, HP and lsHP, in one compiled program


def test_hp_rejects_batch_larger_than_data():
    x, y = blobs(20)
    model = tiny_model()
    with pytest.raises(ValueError, match="larger than"):
        _probe(model, init_vars(model, x), x, y, cfg=HPConfig(taus=(0, 1), batch_size=32))
