"""hpft autotau (issue 13): the signal and τ̂ rule against an independent
numpy computation, the compute-fraction and validation-table arithmetic, an
end-to-end tiny run (autotau.json, figure, FT only at τ̂, resume), a tiny
--validate run, and bad input (exit 2, nothing written).

Pretraining is replaced by a random "pretrained" backbone, as in test_drift.
"""

import json
import os

import jax
import numpy as np
import pytest

from hpft_jax import autotau_signal as S, pretrain
from hpft_jax.cli import main
from hpft_jax.experiments import autotau as A
from hpft_jax.models import make_classifier
from hpft_jax.runlog import RunDir

FLAGS = ["--width", "8", "--depth", "2", "--no-distort", "--batch-size", "64",
         "--ft-epochs", "2", "--hp-lr", "0.05", "--seeds", "0,1", "--taus", "0,1,4",
         "--pretrain-epochs", "1", "--quiet"]


def _fake_pretrain(data_cfg, model_cfg, pre_cfg, source, **_):
    model = make_classifier(pretrain.source_model_config(model_cfg), source.num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), source.train.x[:2]))
    rng = np.random.default_rng(7)
    return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), shapes), {}


# --------------------------------------------------------------------------
# Signal and rule on synthetic records


def _records(aie, acc, seeds=(0, 1, 2), taus=(0, 1, 2, 4, 8)):
    """HP records with AIE aie[s][i] and train acc acc[s][i] (plus lsHP noise)."""
    out = []
    for si, s in enumerate(seeds):
        for ti, t in enumerate(taus):
            out.append({"variant": "hp", "seed": s, "tau": t, "aie_hp": aie[si][ti],
                        "hp_train_acc": acc[si][ti], "hp_train_loss": 1.0 - acc[si][ti],
                        "p0y_hist": [si, ti]})
    out.append({"variant": "lshp", "seed": 0, "tau": taus[-1], "aie_hp": 99.0,
                "hp_train_acc": 2.0, "hp_train_loss": 0.0, "p0y_hist": [0, 0]})
    return out


def _reference(aie, acc, taus):
    """τ̂ and HP-acc stop by brute force, written out independently."""
    a = [sum(col) / len(col) for col in zip(*aie)]
    m = [sum(col) / len(col) for col in zip(*acc)]
    best, tau_hat, scores = -1.0, None, []
    for t, v in zip(taus, a):
        sc = (a[0] - v) / (a[0] - min(a)) * v
        scores.append(sc)
        if sc > best + 1e-12:
            best, tau_hat = sc, t
    es = [t for t, v in zip(taus, m) if v == max(m)][0]
    return a, scores, tau_hat, es


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_signal_matches_reference(seed):
    rng = np.random.default_rng(seed)
    taus = (0, 1, 2, 4, 8)
    aie = [sorted(rng.uniform(0.05, 0.8, size=5), reverse=True) for _ in range(3)]
    acc = [sorted(rng.uniform(0.3, 1.0, size=5)) for _ in range(3)]
    recs = _records(aie, acc)
    a, scores, tau_hat, es = _reference(aie, acc, taus)
    sig = S.signal(recs)
    assert sig["taus"] == list(taus) and sig["n_seeds"] == 3
    np.testing.assert_allclose(sig["aie"], a, rtol=1e-12)
    np.testing.assert_allclose(sig["score"], scores, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(sig["aie_std"], np.std(aie, axis=0), rtol=1e-9)
    assert sig["tau_hat"] == tau_hat and sig["tau_hp_es"] == es
    assert sig["p0y_hist"][2] == [1.0, 2.0]  # mean over seeds of [s, τ index]
    assert sig["spent"][0] == 0.0 and sig["spent"][int(np.argmin(a))] == 1.0
    assert sig["spent_target"] == pytest.approx(min(1.0, a[0] / (2 * (a[0] - min(a)))))


def test_rule_cases():
    taus = [0, 1, 2, 4]
    # A_0 = 0.8, A_min = 0.2: spent* = 0.8 / 1.2 = 2/3; scores 0, .25·.65, .5·.5, 0.2
    assert S.pick_tau_hat(taus, [0.8, 0.65, 0.5, 0.2]) == 2
    # little energy removable (A_0 = 1, A_min = 0.9): spent* > 1, the converged head wins
    assert S.pick_tau_hat(taus, [1.0, 0.97, 0.94, 0.9]) == 4
    # HP removes no energy: the smallest τ
    assert S.pick_tau_hat(taus, [0.5, 0.6, 0.7, 0.8]) == 0
    assert all(v is None for v in S.signal(_records([[0.5] * 4] * 3, [[0.5] * 4] * 3,
                                                    taus=taus))["score"])
    # ties go to the smaller τ: scores 0, .21, .21 (0.3·0.7 and 0.7·0.3), 0
    assert S.pick_tau_hat(taus, [1.0, 0.7, 0.3, 0.0]) == 1
    assert S.pick_hp_early_stop(taus, [0.5, 0.9, 0.9, 0.8]) == 1
    with pytest.raises(ValueError):
        S.pick_tau_hat([0, 2, 1], [0.5, 0.4, 0.3])
    with pytest.raises(ValueError):
        S.signal([])


def test_compute_fraction_arithmetic():
    assert S.compute_fraction_bound(5, 12, 5) == pytest.approx(1 / 12)
    assert S.compute_fraction_bound(1, 4, 2) == pytest.approx(0.125)
    assert S.compute_fraction([30, 28], [50, 50, 20, 40]) == pytest.approx(58 / 160)
    with pytest.raises(ValueError):
        S.compute_fraction([1], [0, 0])


def test_validation_table_arithmetic():
    def rec(name, taus, test, tau_star, tau_hat, es, auto, ae, se):
        return {"setting": name, "label": name, "taus": taus, "test": [[v, 0.0] for v in test],
                "tau_star": tau_star, "tau_hat": tau_hat, "tau_hp_es": es,
                "auto_test": [auto, 0.01], "auto_epochs": ae, "sweep_epochs": se,
                "compute_bound": 0.25, "sweep_wall_s": 1.0, "autotau_wall_s": 0.1}

    recs = [rec("a", [0, 1, 2, 4], [0.90, 0.95, 0.93, 0.91], 1, 2, 4, 0.92, 10, 100),
            rec("b", [0, 1, 2, 4], [0.80, 0.81, 0.86, 0.85], 2, 2, 4, 0.86, 30, 120)]
    v = A.validation_table(recs)
    # mean test per τ: .85, .88, .895, .88 -> fixed τ = 2
    assert v["fixed_tau"] == 2
    ra, rb = v["rows"]
    assert ra["regret"] == pytest.approx(0.03) and rb["regret"] == pytest.approx(0.0)
    assert ra["vs_best_extreme"] == pytest.approx(0.91 - 0.92)
    assert rb["vs_best_extreme"] == pytest.approx(0.85 - 0.86)
    assert ra["acc_hp_es"] == 0.91 and ra["acc_hat_in_sweep"] == 0.93
    assert v["mean_regret"] == pytest.approx(0.015)
    assert v["mean_compute_actual"] == pytest.approx((0.1 + 0.25) / 2)
    assert v["mean_regret_by_method"]["acc_fixed"] == pytest.approx((0.95 + 0.86) / 2 - 0.895)


# --------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    runs = tmp_path_factory.mktemp("autotau_runs")
    argv = ["autotau", "--runs-dir", str(runs), "--name", "a", *FLAGS]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "train", _fake_pretrain)
        assert main(argv) == 0
        first = list(RunDir(str(runs / "a")).records("ft"))
        assert main(argv) == 0  # a rerun finetunes nothing again
    return runs, RunDir(str(runs / "a")), first


def test_e2e_json_figure_and_ft_only_at_tau_hat(e2e):
    _, run, first = e2e
    with open(os.path.join(run.path, "autotau.json")) as f:
        out = json.load(f)
    hp = [r for r in run.records("hp")]
    assert {r["tau"] for r in hp} == {0, 1, 4} and {r["variant"] for r in hp} == {"hp"}
    taus = [0, 1, 4]
    aie = [[next(r["aie_hp"] for r in hp if r["seed"] == s and r["tau"] == t) for t in taus]
           for s in (0, 1)]
    acc = [[next(r["hp_train_acc"] for r in hp if r["seed"] == s and r["tau"] == t)
            for t in taus] for s in (0, 1)]
    _, scores, tau_hat, es = _reference(aie, acc, taus)
    assert out["tau_hat"] == tau_hat and out["tau_hp_es"] == es
    np.testing.assert_allclose(out["signal"]["score"], scores, rtol=1e-9, atol=1e-15)
    fts = list(run.records("ft"))
    assert len(fts) == len(first) == 2 and {r["tau"] for r in fts} == {tau_hat}
    assert sorted(r["seed"] for r in fts) == [0, 1]
    np.testing.assert_allclose(out["ft_test_acc"][0], np.mean([r["test_acc"] for r in fts]))
    np.testing.assert_allclose(out["ft_val_acc"][1], np.std([r["val_acc"] for r in fts]))
    nb = fts[0]["steps_per_epoch"]
    assert out["ft_steps_used"] == sum(r["epochs_run"] for r in fts) * nb
    assert out["ft_steps_sweep_max"] == 3 * 2 * 2 * nb
    assert out["ft_compute_fraction"] == pytest.approx(1 / 3)
    assert os.path.getsize(run.figures("autotau_signal.png")) > 0
    assert os.path.exists(os.path.join(run.path, "autotau.md"))


@pytest.mark.slow
def test_validate_tiny(tmp_path):
    argv = ["autotau", "--validate", "--settings", "rot0", "--runs-dir", str(tmp_path),
            "--name", "v", *FLAGS]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "train", _fake_pretrain)
        assert main(argv) == 0
    with open(tmp_path / "v" / "autotau_validate.json") as f:
        v = json.load(f)
    (row,) = v["rows"]
    sweep = RunDir(str(tmp_path / "v" / "rot0" / "sweep"))
    fts = [r for r in sweep.records("ft")]
    assert len(fts) == 6 and {r["variant"] for r in fts} == {"hp"}  # 3 τ × 2 seeds, no lsHP
    with open(tmp_path / "v" / "rot0" / "autotau" / "autotau.json") as f:
        auto = json.load(f)
    assert row["tau_hat"] == auto["tau_hat"]
    assert row["compute_actual"] == pytest.approx(
        sum(auto["ft_epochs_run"]) / sum(r["epochs_run"] for r in fts))
    # autotau's FT at τ̂ reproduces the sweep's FT at the same τ (same inits and keys)
    at = [r["test_acc"] for r in fts if r["tau"] == row["tau_hat"]]
    assert row["acc_hat"] == pytest.approx(np.mean(at), abs=1e-6)
    assert os.path.exists(tmp_path / "v" / "figures" / "autotau_validate.png")


@pytest.mark.parametrize("extra", [["--ls-eta", "0.9"], ["--settings", "bogus"],
                                   ["--taus", "4"], ["--downstream", "digits:0,0"]])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra):
    argv = ["autotau", "--runs-dir", str(tmp_path), "--name", "bad", *FLAGS, *extra]
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
