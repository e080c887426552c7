"""The ``hpft`` jobs that are not analysis experiments: sweep, pretrain, report."""

from __future__ import annotations

import argparse
import json
import os

from hpft_jax import config as config_lib, flags, pretrain, prepare, report, sweep


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    flags.add_config_flags(p)
    flags.add_output_flags(p, report_only=False)
    p.add_argument("--save-final", action="store_true",
                   help="keep every finetuned model under checkpoints/final/")


def _sweep(args: argparse.Namespace) -> None:
    cfg = flags.sweep_config(args)
    if args.print_config:
        print(config_lib.dumps(cfg))
        return
    run = sweep.run_sweep(cfg, progress=not args.quiet, save_final=args.save_final)
    report.report(run.path, write_figures=not args.no_figures)


def _pretrain_arguments(p: argparse.ArgumentParser) -> None:
    flags.add_config_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _pretrain(args: argparse.Namespace) -> None:
    cfg = flags.sweep_config(args)
    if args.print_config:
        print(config_lib.dumps(cfg))
        return
    prepare.load(cfg)  # bad data or model specs fail before any training
    _, meta = pretrain.get_or_train(cfg.data, cfg.model, cfg.pretrain, cfg.runs_dir,
                                    progress=not args.quiet)
    path = pretrain.pretrained_dir(cfg.runs_dir, cfg.data, cfg.model, cfg.pretrain)
    print(json.dumps({"path": os.path.abspath(path), **meta.get("metrics", {})}, indent=2))


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--no-figures", action="store_true", help="write no figures")
    p.add_argument("--zt", choices=sorted(report.ZT), default="best",
                   help="z_T of the adaptation metrics: best (best-validation, early-stopped "
                        "model; default) or last (the last FT epoch's model)")


def _report(args: argparse.Namespace) -> None:
    report.report(args.run_dir, write_figures=not args.no_figures, zt=args.zt)


SWEEP = flags.Command(sweep.__doc__.split("\n\n")[0], _sweep_arguments, _sweep)
PRETRAIN = flags.Command(pretrain.__doc__.split("\n\n")[0], _pretrain_arguments, _pretrain)
REPORT = flags.Command(report.__doc__.split("\n\n")[0], _report_arguments, _report)
