"""End-to-end sweeps on the shipped digits and on tfds mock data; resume; CLI."""

import dataclasses
import json
import os

import pytest

from hpft_jax import config as C
from hpft_jax.cli import main
from hpft_jax.report import pick_tau_star, summarize
from hpft_jax.runlog import RunDir
from hpft_jax.prepare import plan
from hpft_jax.sweep import run_sweep

TINY = C.SweepConfig(
    name="tiny",
    model=C.ModelConfig(backbone="mlp", width=16, depth=2),
    pretrain=C.PretrainConfig(epochs=3, batch_size=64),
    hp=C.HPConfig(taus=(0, 1, 4), lr=0.005, batch_size=64),
    ft=C.FTConfig(epochs=3, lr=0.005, batch_size=64, patience=5, direction_steps=4),
    seeds=(0, 1),
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One runs directory per module, so the pretrained backbone is cached once."""
    return tmp_path_factory.mktemp("runs")


def _cfg(runs_dir, **kw):
    return dataclasses.replace(TINY, runs_dir=str(runs_dir), **kw)


def _ft(run):
    return sorted((r["variant"], r["tau"], r["seed"], json.dumps(r, sort_keys=True))
                  for r in run.records("ft"))


def test_tiny_sweep_on_digits_end_to_end(runs):
    cfg = _cfg(runs, name="e2e")
    run = run_sweep(cfg, progress=False)
    ft = list(run.records("ft"))
    assert len(ft) == len(plan(cfg)) == 3 * 2 + 2
    assert {r["variant"] for r in ft} == {"hp", "lshp"}
    assert len(list(run.records("hp"))) == 3 * 2 + 2
    for r in ft:
        assert 0 <= r["val_acc"] <= 1 and r["aie"] > 0
        assert set(r["adapt"]) == {"dist_sq", "norm_sq", "dot", "cos", "dist"}
        assert len(r["grad_v_norm"]) == 4
    summary = summarize(run)
    assert pick_tau_star(summary) in (0, 1, 4)
    # report rebuilds from metrics.jsonl alone, with figures
    assert main(["report", run.path]) == 0
    for name in ("aie_vs_tau.png", "adaptation_vs_tau.png", "ft_acc_vs_tau.png", "p0y_hist.png"):
        assert os.path.getsize(os.path.join(run.path, "figures", name)) > 1000
    with open(os.path.join(run.path, "config.json")) as f:
        assert C.from_dict(C.SweepConfig, json.load(f)) == cfg


def test_sweep_on_tfds_mock_data(tmp_path):  # own runs dir: another pretraining source
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = _cfg(tmp_path, ls_eta=None, seeds=(0,),
               data=C.DataConfig(source="mnist", downstream="mnist:0,1,2", distort=False))
    with tfds.testing.mock_data(num_examples=400):
        run = run_sweep(cfg, progress=False)
    assert len(list(run.records("ft"))) == 3


@pytest.mark.parametrize("vmap", [False, True])
def test_killed_sweep_resumes_to_identical_metrics(runs, vmap):
    ref = run_sweep(_cfg(runs, name=f"ref{vmap}", vmap=vmap), progress=False)
    cfg = _cfg(runs, name=f"resumed{vmap}", vmap=vmap)
    with pytest.raises(KeyboardInterrupt):
        if vmap:  # killed in the middle of the batched FT
            run_sweep(cfg, progress=False, stop_after_epochs=1, ckpt_every_s=0)
        else:  # killed after the first τ finished
            run_sweep(cfg, progress=False, stop_after_groups=1)
    done = len(list(RunDir(os.path.join(cfg.runs_dir, cfg.name)).records("ft")))
    assert done == (0 if vmap else 1)
    run = run_sweep(cfg, progress=False)
    assert _ft(run) == _ft(ref)


def test_shards_partition_the_plan(tmp_path):
    full = plan(_cfg(tmp_path))
    parts = [plan(_cfg(tmp_path, shard=(i, 3))) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(full)
    assert not set(parts[0]) & set(parts[1])


def test_batch_groups_cover_the_plan_in_order(tmp_path):
    from hpft_jax.sweep import batch_groups

    todo = plan(_cfg(tmp_path))
    for cfg, sizes in ((_cfg(tmp_path), [8]), (_cfg(tmp_path, max_batch_runs=3), [3, 3, 2]),
                       (_cfg(tmp_path, vmap=False), [1] * 8)):
        groups = batch_groups(todo, cfg)
        assert [len(g) for g in groups] == sizes
        assert sum(groups, []) == todo


def test_opposite_energy_warns(tmp_path):
    cfg = _cfg(tmp_path, ft=dataclasses.replace(TINY.ft, eta=0.8))
    with pytest.warns(UserWarning, match="opposite energy"):
        from hpft_jax.prepare import warn_opposite_energy
        warn_opposite_energy(cfg)


def test_rerun_with_another_config_is_refused(tmp_path):
    run = RunDir(str(tmp_path / "r"))
    run.write_config(_cfg(tmp_path, name="r", seeds=(0,)))
    run.write_config(_cfg(tmp_path, name="r", seeds=(0,), shard=(1, 2)))  # a shard: fine
    with pytest.raises(ValueError, match=r"different config \(differs in \['seeds'\]\)"):
        run.write_config(_cfg(tmp_path, name="r", seeds=(1,)))
    with pytest.raises(ValueError, match="different config"):  # before any training
        run_sweep(_cfg(tmp_path, name="r", seeds=(1,)), progress=False)


@pytest.mark.parametrize("argv, msg", [
    (["--tau", "0,4,2"], "increasing"),
    (["--tau=-1,2"], "non-negative"),
    (["--eta-hp", "1.5"], "(0, 1]"),
    (["--downstream", "nosuchdata"], "nosuchdata"),
    (["--backbone", "vgg"], "unknown backbone"),
    (["--batch-size", "100000"], "larger than"),
])
def test_cli_reports_bad_input(tmp_path, capsys, argv, msg):
    code = main(["sweep", "--quiet", "--runs-dir", str(tmp_path), "--pretrain-epochs", "1",
                 "--ft-epochs", "1", "--seeds", "0", "--ls-eta", "none"] + argv)
    assert code == 2
    # rejected before anything is written: the corrected command may reuse the name
    assert not os.path.exists(tmp_path / "toy" / "config.json")
    assert msg in capsys.readouterr().err
