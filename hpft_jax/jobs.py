"""The ``hpft`` jobs that are not analysis experiments: sweep, pretrain, report."""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from hpft_jax import config as config_lib, flags, jobarray, multihost, parallel, pretrain
from hpft_jax import prepare, report, sweep


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    flags.add_config_flags(p)
    flags.add_output_flags(p, report_only=False)
    p.add_argument("--save-final", action="store_true",
                   help="keep every finetuned model under checkpoints/final/")
    p.add_argument("--mesh", default="data",
                   help="device mesh: 'data' (batches split over the local devices), 'runs' "
                        "(the vmapped FT runs split over them, R/n per device) or 'R,D' "
                        "(R run groups x D-way data parallel); results agree to float "
                        "tolerance (default: data)")
    g = p.add_argument_group("several processes (jax.distributed; see README 'Scaling out')")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address; with --num-processes and --process-id "
                        "(none of the three: JAX detects SLURM/TPU/MPI clusters itself)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--init-timeout", type=int, default=300, metavar="S",
                   help="give up joining after S seconds (default: 300)")


def _sweep(args: argparse.Namespace) -> None:
    cfg = flags.sweep_config(args)
    if args.print_config:
        print(config_lib.dumps(cfg))
        return
    explicit = multihost.check_flags(args.coordinator, args.num_processes, args.process_id)
    if explicit or multihost.cluster_detected():
        multihost.initialize(args.coordinator, args.num_processes, args.process_id,
                             timeout_s=args.init_timeout)
        multihost.check_layout(jax.device_count(), jax.process_count(),
                               jax.local_device_count())
    mesh = parallel.parse_mesh(args.mesh)  # a bad mesh fails before anything is written
    if jax.process_count() > 1:
        run = multihost.run_sweep(cfg, progress=not args.quiet, mesh=mesh)
        if jax.process_index() == 0:  # only process 0 writes the report
            report.report(run.path, write_figures=not args.no_figures)
        return
    run = sweep.run_sweep(cfg, progress=not args.quiet, save_final=args.save_final, mesh=mesh)
    i, n = cfg.shard
    if n > 1:  # a shard writes only its own results; `hpft report` merges them
        left = jobarray.missing(run)
        print(f"shard {i}/{n} done; {len(left)} FT runs of the sweep not logged yet; "
              f"when every shard is done: hpft report {run.path}")
        return
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
    print(json.dumps({"path": os.path.abspath(path), **meta.get("metrics", {}),
                      "input": meta.get("input")}, indent=2))


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--no-figures", action="store_true", help="write no figures")
    p.add_argument("--zt", choices=sorted(report.ZT), default="best",
                   help="z_T of the adaptation metrics: best (best-validation, early-stopped "
                        "model; default) or last (the last FT epoch's model)")


def _report(args: argparse.Namespace) -> None:
    left = jobarray.missing(args.run_dir) if os.path.isdir(args.run_dir) else []
    if left:
        print(f"hpft report: note: {len(left)} FT runs of the sweep are not logged yet "
              f"(first: {left[0].label}); the report covers the others", file=sys.stderr)
    report.report(args.run_dir, write_figures=not args.no_figures, zt=args.zt)


SWEEP = flags.Command(sweep.__doc__.split("\n\n")[0], _sweep_arguments, _sweep)
PRETRAIN = flags.Command(pretrain.__doc__.split("\n\n")[0], _pretrain_arguments, _pretrain)
REPORT = flags.Command(report.__doc__.split("\n\n")[0], _report_arguments, _report)
