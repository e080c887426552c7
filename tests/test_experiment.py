"""The experiment framework: flags, config shape, refusal, validation before
writing, the lazy command table, and the README's worked example run end to end."""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import types

import pytest

from hpft_jax import cli, config as C, flags, pretrain
from hpft_jax.runlog import RunDir

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
TINY = ["--width", "8", "--depth", "2", "--no-distort", "--batch-size", "64", "--hp-lr", "0.05",
        "--pretrain-epochs", "1", "--quiet"]


def _example_source() -> str:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Adding an experiment", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def example(monkeypatch):
    """The README's example as a module, registered in the command table."""
    mod = types.ModuleType("heldout_energy_example")
    exec(compile(_example_source(), "README.md", "exec"), mod.__dict__)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(cli.COMMANDS, "heldout_energy",
                        (f"{mod.__name__}:EXPERIMENT", "AIE on held-out data"))
    return mod


def test_readme_example_runs_reports_and_refuses_changes(example, tmp_path, capsys):
    argv = ["heldout_energy", "--runs-dir", str(tmp_path), "--tau", "0,2", "--seeds", "0",
            "--split", "test", *TINY]
    assert cli.main(argv) == 0
    run = RunDir(str(tmp_path / "heldout_energy"))
    with open(run.config_file) as f:
        saved = json.load(f)
    assert saved["split"] == "test" and saved["sweep"]["hp"]["taus"] == [0, 2]
    cfg = C.from_dict(example.HeldoutEnergyConfig, saved)  # the config round-trips
    assert cfg.sweep.ls_eta is None and cfg.sweep.model.width == 8
    recs = {r["tau"]: r["aie"] for r in run.records("heldout_energy")}
    assert sorted(recs) == [0, 2] and recs[2] < recs[0]  # HP lowers the energy
    with open(os.path.join(run.path, "heldout_energy.md")) as f:
        assert "AIE of the HP snapshots" in f.read()
    assert os.path.getsize(run.figures("heldout_energy.png")) > 1000
    # an experiment setting is part of the config: a changed one is refused
    capsys.readouterr()
    assert cli.main(argv[:-len(TINY)] + ["--split", "val", *TINY]) == 2
    assert "different config" in capsys.readouterr().err
    # a repeated command logs nothing new
    n = len(list(run.records()))
    assert cli.main(argv) == 0 and len(list(run.records())) == n


@pytest.mark.parametrize("extra, match", [
    (["--split", "train"], "split must be 'val' or 'test'"),
    (["--downstream", "digits:0,11"], "11"),
    (["--backbone", "vgg"], "unknown backbone"),
])
def test_bad_input_writes_nothing(example, tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.setattr(pretrain, "train", lambda *a, **k: pytest.fail("must not train"))
    argv = ["heldout_energy", "--runs-dir", str(tmp_path), *TINY, *extra]
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "heldout_energy")


def test_options_become_flags_with_defaults_and_types():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        n: int = flags.option(3, "an int")
        xs: tuple[float, ...] = flags.option((1.0, 2.0), "floats")
        every: int | None = flags.option(None, "int or None")
        on: bool = flags.option(True, "a switch", flag="--no-on")
        label: str = flags.option("a", "a string")

    p = argparse.ArgumentParser()
    flags.add_options(p, Cfg, "cfg")
    text = p.format_help()
    assert "(default: 3)" in text and "(default: 1.0,2.0)" in text and "--no-on" in text
    got = flags.options_from_args(Cfg, p.parse_args(
        ["--n", "5", "--xs", "0.5", "--every", "7", "--no-on"]))
    assert got == {"n": 5, "xs": (0.5,), "every": 7, "on": False}
    assert flags.options_from_args(Cfg, p.parse_args([])) == {}  # absent flags keep defaults


def test_sweep_help_shows_defaults():
    p = cli.build_parser(["sweep"])
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    help_text = sub.choices["sweep"].format_help()
    d = C.SweepConfig()
    assert f"(default: {d.hp.lr})" in help_text and f"(default: {d.ft.lr})" in help_text
    assert "(default: 0,1,2,4,8,16,32,64,128,256,512,1024)" in help_text


def test_top_level_help_imports_no_jax_and_no_markup():
    code = ("import sys, io, contextlib; from hpft_jax import cli\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try: cli.main(['--help'])\n"
            "    except SystemExit: pass\n"
            "print('JAX' if 'jax' in sys.modules else 'NOJAX'); print(buf.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("NOJAX") and "``" not in out
    for name in cli.COMMANDS:
        assert name in out


def test_every_command_builds():
    p = cli.build_parser()  # imports every command module: no cycle, no import-time work
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli.COMMANDS)
    for name, parser in sub.choices.items():
        assert "``" not in parser.format_help(), name
