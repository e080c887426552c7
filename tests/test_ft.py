"""Finetuning: vmap equals sequential, early stopping, one trace, NaN, resume."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from hpft_jax import checkpoint, ft
from hpft_jax.errors import NonFiniteLossError

from _toy import FT, data_dict, init_vars, tiny_model


def _run(model, inits, seeds, data, cfg=FT, **kw):
    return ft.finetune(model, cfg, inits, seeds, data, data["train_x"], data["train_y"],
                       num_classes=3, progress=False, **kw)


@pytest.fixture(scope="module")
def setup():
    data = data_dict()
    model = tiny_model()
    inits = []
    for s in (0, 1):
        v = init_vars(model, data["train_x"], seed=s)
        inits.append((v["params"], {}))
    return model, data, inits


def test_vmapped_runs_equal_sequential_runs(setup):
    model, data, inits = setup
    both, final = _run(model, inits, [0, 1], data)
    for r in range(2):
        one, fin1 = _run(model, [inits[r]], [r], data)
        a, b = both[r], one[0]
        assert a["best_epoch"] == b["best_epoch"] and a["epochs_run"] == b["epochs_run"]
        np.testing.assert_allclose(a["curves"]["loss"], b["curves"]["loss"], rtol=1e-5)
        for k in a["adapt"]:
            np.testing.assert_allclose(a["adapt"][k], b["adapt"][k], rtol=1e-5, err_msg=k)
        for u, v in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(fin1)):
            np.testing.assert_allclose(u[r], v[0], rtol=1e-5, atol=1e-6)


def test_early_stopping_semantics(setup):
    model, data, inits = setup
    cfg = dataclasses.replace(FT, epochs=12, patience=2, lr=0.05)
    (res,), _ = _run(model, inits[:1], [0], data, cfg=cfg)
    val = np.asarray(res["curves"]["val_acc"])
    n = res["epochs_run"]
    assert len(val) == n
    best = int(np.argmax(val))  # first maximum: ties do not count as improvement
    assert res["best_epoch"] == best
    assert res["val_acc"] == val[best]
    stopped_early = n < cfg.epochs
    if stopped_early:
        assert n == best + cfg.patience + 1
        assert np.all(val[best + 1:] <= val[best])


def test_ft_epoch_traces_once(setup, monkeypatch):
    model, data, inits = setup
    calls = {"n": 0}
    orig = ft.make_ft_epoch

    def counting(*a, **k):
        f = orig(*a, **k)

        def traced(*args):
            calls["n"] += 1
            return f(*args)

        return traced

    monkeypatch.setattr(ft, "make_ft_epoch", counting)
    ft._epoch_program.cache_clear()
    _run(model, inits, [0, 1], data, cfg=dataclasses.replace(FT, epochs=5, patience=10))
    assert calls["n"] == 1


def test_nan_loss_names_the_step_and_keeps_the_checkpoint(setup, tmp_path):
    model, data, inits = setup
    ck = str(tmp_path / "ck")
    good = dataclasses.replace(FT, epochs=6, patience=10)
    with pytest.raises(KeyboardInterrupt):  # two good epochs, checkpointed
        _run(model, inits[:1], [0], data, cfg=good, ckpt_dir=ck, stop_after_epochs=2,
             ckpt_every_s=0)
    bad = dataclasses.replace(good, lr=1e12)  # continue with a learning rate that diverges
    with pytest.raises(NonFiniteLossError, match=r"run 0: step \d+ \(epoch 2, batch \d+\)"):
        _run(model, inits[:1], [0], data, cfg=bad, ckpt_dir=ck)
    mgr = checkpoint.EpochCheckpointer(ck)
    like = jax.vmap(lambda p: ft.init_carry(p, {}, ft.steps.ft_optimizer(good, 1)))(
        jax.tree_util.tree_map(lambda a: a[None], inits[0][0]))
    epoch, carry, _ = mgr.restore(like)
    mgr.close()
    assert epoch == 1  # the NaN state was not saved over it
    assert all(np.isfinite(np.asarray(a)).all()
               for a in jax.tree_util.tree_leaves(carry.state.params))


def test_interrupted_ft_resumes_to_identical_results(setup, tmp_path):
    model, data, inits = setup
    cfg = dataclasses.replace(FT, epochs=5, patience=10)
    ref, _ = _run(model, inits, [0, 1], data, cfg=cfg)
    ck = str(tmp_path / "ft")
    with pytest.raises(KeyboardInterrupt):
        _run(model, inits, [0, 1], data, cfg=cfg, ckpt_dir=ck, stop_after_epochs=2,
             ckpt_every_s=0)
    assert os.path.isdir(ck)
    res, _ = _run(model, inits, [0, 1], data, cfg=cfg, ckpt_dir=ck)
    assert res == ref


def test_empty_validation_split_is_an_error(setup):
    model, data, inits = setup
    d = dict(data, val_x=data["val_x"][:0], val_y=data["val_y"][:0])
    with pytest.raises(ValueError, match="validation split is empty"):
        _run(model, inits[:1], [0], d)


def test_training_a_subset_freezes_the_rest(setup):
    """Layer FT: only the chosen block (and head) train; frozen leaves are
    bit-identical and hold no optimizer state."""
    model, data, inits = setup
    pred = lambda p: p[0] == "head" or p[:2] == ("backbone", "dense1")  # noqa: E731
    (res,), final = _run(model, inits[:1], [0], data, trainable=pred)
    p0 = inits[0][0]
    got = jax.tree_util.tree_map(lambda a: a[0], final["params"])
    np.testing.assert_array_equal(got["backbone"]["dense0"]["kernel"], p0["backbone"]["dense0"]["kernel"])
    assert not np.array_equal(got["backbone"]["dense1"]["kernel"], p0["backbone"]["dense1"]["kernel"])
    assert not np.array_equal(got["head"]["out"]["kernel"], p0["head"]["out"]["kernel"])
    tx = ft.steps.ft_optimizer(FT, 10)
    from hpft_jax.params import partition
    train, _ = partition(p0, pred)
    state = ft.steps.init_state(train, {}, tx)
    assert "dense0" not in str(jax.tree_util.tree_structure(state.opt_state))
    with pytest.raises(ValueError, match="no parameter"):
        _run(model, inits[:1], [0], data, trainable=lambda p: False)
