"""The experiment framework: one config shape, one run flow, one command line.

An analysis experiment is a module with three pieces of its own logic,
registered as ``EXPERIMENT = Experiment(...)``:

* a frozen config dataclass: a ``sweep`` field (:func:`sweep_field`: data,
  model, pretraining, HP, FT, seeds, with the experiment's defaults) plus its
  own settings as :func:`hpft_jax.flags.option` fields (each one a flag);
* ``run(cfg, run, loaded, *, progress)``: the experiment itself. ``loaded``
  holds the data and model (:func:`hpft_jax.prepare.load`);
  :func:`hpft_jax.prepare.prepare` gives the pretrained backbone and HP
  snapshots exactly as the sweep builds them. It logs events with
  ``run.log`` and skips what the run directory already holds, so a killed
  run continues when the command is repeated;
* ``report(run, *, figures) -> (markdown parts, figure paths)``, from the
  logged events alone.

The framework supplies the rest: flags for every config field (defaults shown
in ``--help``), ``--config``/``--quiet``/``--no-figures``/``--report-only``,
data and model checked before anything is written, ``config.json`` written
through the run directory (a rerun with another config is refused), and
``<name>.md`` written and printed. See README "Adding an experiment".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Callable, Sequence

from hpft_jax import config as config_lib, flags, outputs, prepare, tasks
from hpft_jax.runlog import RunDir

_KEEP = object()


def sweep_field(name: str, *, seeds: Sequence[int] | None = None,
                taus: Sequence[int] | None = None, ls_eta: Any = _KEEP) -> Any:
    """The ``sweep`` field of an experiment config, with its defaults:
    run ``name``, and optionally ``seeds``, HP ``taus`` and ``ls_eta``
    (None: no lsHP run)."""

    def make() -> config_lib.SweepConfig:
        cfg = config_lib.SweepConfig(name=name)
        changes: dict[str, Any] = {}
        if seeds is not None:
            changes["seeds"] = tuple(seeds)
        if taus is not None:
            changes["hp"] = dataclasses.replace(cfg.hp, taus=tuple(taus))
        if ls_eta is not _KEEP:
            changes["ls_eta"] = ls_eta
        return dataclasses.replace(cfg, **changes)

    return dataclasses.field(default_factory=make)


def require_classification(loaded: prepare.Loaded, what: str) -> None:
    """Refuse a task other than single-label classification, for analyses
    whose formulas assume a softmax cross-entropy head over classes."""
    task = tasks.of(loaded.model)
    if task.name != "classification":
        raise ValueError(f"{what} assumes single-label softmax classification; this "
                         f"downstream data's task is {task.name!r}")


def first_paragraph(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An ``hpft NAME`` analysis experiment (see the module docstring).

    ``check(cfg, loaded)`` (optional) validates settings against the data
    before anything is written, e.g. a probe count larger than the split.
    """

    name: str
    config: type
    runner: Callable[..., None]
    reporter: Callable[..., tuple[list[str], list[str]]]
    help: str
    doc: str = ""
    check: Callable[[Any, prepare.Loaded], None] | None = None

    @property
    def description(self) -> str:
        return first_paragraph(self.doc) or self.help

    # -- configuration
    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        flags.add_config_flags(p, self.config().sweep)
        flags.add_options(p, self.config, f"hpft {self.name}")
        flags.add_output_flags(p)

    def config_from_args(self, args: argparse.Namespace):
        """Defaults <- ``--config`` file <- flags."""
        base = self.config()
        if getattr(args, "config", None):
            data = flags.read_config_file(args.config)
            base = (config_lib.from_dict(self.config, data) if "sweep" in data else
                    dataclasses.replace(base, sweep=config_lib.from_dict(config_lib.SweepConfig,
                                                                         data)))
        sweep = flags.sweep_config(argparse.Namespace(**{**vars(args), "config": None}),
                                   base.sweep)
        return dataclasses.replace(base, sweep=sweep, **flags.options_from_args(self.config, args))

    # -- running
    def run_dir(self, cfg) -> RunDir:
        return RunDir(os.path.join(cfg.sweep.runs_dir, cfg.sweep.name), tuple(cfg.sweep.shard))

    def execute(self, cfg, *, progress: bool = True) -> RunDir:
        """Check, write ``config.json``, run (or continue); returns the run directory."""
        if not isinstance(cfg, self.config):
            raise TypeError(f"hpft {self.name} needs a {self.config.__name__}; "
                            f"got {type(cfg).__name__}")
        run = self.run_dir(cfg)
        loaded = prepare.load(cfg.sweep)
        if self.check is not None:
            self.check(cfg, loaded)
        run.write_config(cfg)
        self.runner(cfg, run, loaded, progress=progress)
        return run

    def report(self, run: RunDir | str, *, figures: bool = True, out=print) -> str:
        """Write ``<name>.md`` (and the figures) from the logged events; returns the text."""
        run = RunDir(run) if isinstance(run, str) else run
        if not os.path.isdir(run.path):
            raise FileNotFoundError(f"no run directory at {run.path}")
        parts, paths = self.reporter(run, figures=figures)
        return outputs.publish(run, f"{self.name}.md", parts, paths, out=out)

    def run(self, args: argparse.Namespace) -> None:
        """The command: run (unless ``--report-only``), then report."""
        cfg = self.config_from_args(args)
        if getattr(args, "print_config", False):
            print(config_lib.dumps(cfg))
            return
        t0 = time.perf_counter()
        run = self.run_dir(cfg) if args.report_only else self.execute(cfg,
                                                                      progress=not args.quiet)
        self.report(run, figures=not args.no_figures)
        if not args.report_only:
            print(f"\nwall time of this command: {time.perf_counter() - t0:.1f} s")
