"""Configuration validation and the JSON round trip."""

import dataclasses

import pytest

from hpft_jax import config as C


def test_round_trip_is_exact():
    cfg = C.SweepConfig(hp=C.HPConfig(taus=(0, 3, 9), eta=0.9), seeds=(4, 5),
                        data=C.DataConfig(zoom=(1.1, 1.2)), shard=(1, 3))
    assert C.from_dict(C.SweepConfig, C.to_dict(cfg)) == cfg


@pytest.mark.parametrize("taus, msg", [((0, 4, 2), "increasing"), ((-1, 2), "non-negative"),
                                       ((0, 0, 1), "increasing"), ((), "empty")])
def test_bad_tau_lists(taus, msg):
    with pytest.raises(ValueError, match=msg):
        C.HPConfig(taus=taus)


@pytest.mark.parametrize("eta", [0.0, -0.1, 1.01, float("nan")])
def test_eta_outside_unit_interval(eta):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        C.HPConfig(eta=eta)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        C.FTConfig(eta=eta)


def test_other_validation():
    with pytest.raises(ValueError, match="shard"):
        C.SweepConfig(shard=(2, 2))
    with pytest.raises(ValueError, match="reinit_blocks"):
        C.ModelConfig(reinit_blocks=-1)
    with pytest.raises(ValueError, match="unknown"):
        C.from_dict(C.HPConfig, {"taus": [0], "bogus": 1})


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        C.HPConfig().lr = 1.0


def test_cli_flags_fill_the_dataclasses():
    from hpft_jax.cli import build_parser
    from hpft_jax.flags import sweep_config

    def cfg(*argv):
        return sweep_config(build_parser(["sweep"]).parse_args(["sweep", *argv]))

    assert cfg() == C.SweepConfig()
    assert cfg("--ls-eta", "none").ls_eta is None  # an explicit None is kept
    c = cfg("--tau", "0,2,8", "--eta-hp", "0.9", "--head", "mlp", "--batch-size", "64",
            "--downstream", "digits:3,4", "--sequential", "--shard", "1/4")
    assert c.hp.taus == (0, 2, 8) and c.hp.eta == 0.9 and c.model.head == "mlp"
    assert c.pretrain.batch_size == c.hp.batch_size == c.ft.batch_size == 64
    assert c.data.downstream == "digits:3,4" and not c.vmap and c.shard == (1, 4)
