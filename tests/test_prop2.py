"""theory.prop2: a small end-to-end run and the verdict logic."""

import csv

import numpy as np
import pytest

from theory import prop2

SMALL = ["--n", "6", "--d", "14", "--h", "20", "--grid", "21",
         "--ft-steps", "300", "--hp-taus", "0", "2", "8", "32",
         "--pop-samples", "64"]


def test_main_writes_outputs_and_closed_form_verdicts(tmp_path, capsys):
    prop2.main(["--out", str(tmp_path), *SMALL])
    printed = capsys.readouterr().out
    for name in ("prop2.csv", "prop2.png", "verdicts.md", "config.json"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "prop2.csv") as f:
        rows = list(csv.DictReader(f))
    # ray: 21 points, hp: 4 taus; 3 methods; 2 input sets.
    assert len(rows) == (21 + 4) * 3 * 2
    # The closed form's curves on the ray follow Lemmas 2-3 exactly.
    block = printed.split("## q0 = aY, closed_form, training inputs")[1]
    block = block.split("##")[0]
    assert "distance monotone (grows as q0 goes Y -> 0): HOLDS" in block
    assert "dot product: one interior maximum HOLDS" in block
    assert "closest: alpha_features (off by" in block
    # Linearised GD reproduces the closed form.
    dev = printed.split("- linearised_gd: ")[1].split("\n")[0]
    assert max(float(x.split()[1]) for x in dev.split(", ")) < 1e-8


def test_peak_refinement_is_exact_for_a_parabola():
    a = np.linspace(0, 1, 11)
    loc, interior, unimodal = prop2._peak(a, -(a - 0.337) ** 2)
    assert interior and unimodal and abs(loc - 0.337) < 1e-12
    loc, interior, _ = prop2._peak(a, a)
    assert not interior and loc == 1.0


def test_verdicts_report_failures():
    a = np.linspace(0, 1, 21)
    curves = {"dist_sq": np.sin(6 * a) + 2,        # not monotone
              "dot": np.cos(9 * a),                # two maxima on [0, 1]
              "norm_sq": -(a - 0.3) ** 2,
              "cos": 1 - (1 - a) ** 2}
    lines = prop2.ray_verdicts(a, curves, dot_expected={"1/2": 0.5},
                               norm_expected={"alpha": 0.3}, alpha=0.3)
    assert "FAILS" in lines[0] and "FAILS" in lines[1]
    assert "HOLDS" in lines[2] and "closest: alpha" in lines[2]
    assert "at a = 0.000" in lines[3]


def test_config_validation():
    with pytest.raises(ValueError, match="n must be < d"):
        prop2.Prop2Config(n=30, d=20)
    with pytest.raises(ValueError, match="h must be > n"):
        prop2.Prop2Config(h=10)
    with pytest.raises(ValueError, match="ft_lr"):
        prop2.Prop2Config(ft_lr=2.5)
