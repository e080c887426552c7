"""``hpft``: the command line.

    hpft sweep                  # the main job on the embedded digits
    hpft sweep --tau 0,1,2,4 --eta-hp 0.9 --head mlp --downstream digits:0,1,2
    hpft pretrain --source digits
    hpft report runs/toy

Flags fill the frozen dataclasses of :mod:`hpft_jax.config`; a flag left out
keeps the dataclass default. Library code raises; this module turns the
errors a user can fix into one-line messages and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable

from hpft_jax import config as C


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _shard(s: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in s.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n, e.g. 0/4; got {s!r}") from None
    return i, n


def _opt_float(s: str) -> float | None:
    return None if s.lower() in ("none", "off", "") else float(s)


def _floats2(s: str) -> tuple[float, float]:
    a, b = (float(v) for v in s.split(","))
    return a, b


# flag -> (section, field, type, help). Section None = SweepConfig itself.
FLAGS: dict[str, tuple[str | None, str, Callable[[str], Any], str]] = {
    "--name": (None, "name", str, "run name: results go to RUNS_DIR/NAME"),
    "--runs-dir": (None, "runs_dir", str, "where runs (and the pretrained cache) live"),
    "--seeds": (None, "seeds", _ints, "comma-separated seeds (HP head init and data order)"),
    "--ls-eta": (None, "ls_eta", _opt_float, "η_HP of the extra lsHP run at the largest τ, or 'none'"),
    "--shard": (None, "shard", _shard, "run slice i of n of the FT runs (job arrays)"),
    "--max-batch-runs": (None, "max_batch_runs", int,
                         "at most this many FT runs per vmapped program (memory)"),
    "--source": ("data", "source", str, "pretraining data: digits | mnist | cifar10 | idx:DIR | npz:FILE ..."),
    "--downstream": ("data", "downstream", str, "downstream data, e.g. digits:0,1,2 or stl10"),
    "--data-dir": ("data", "data_dir", str, "tfds data_dir"),
    "--max-rotation": ("data", "max_rotation", float, "downstream distortion: max rotation (deg)"),
    "--zoom": ("data", "zoom", _floats2, "downstream distortion: zoom range lo,hi"),
    "--per-class": ("data", "per_class", int, "cap downstream examples per class"),
    "--image-size": ("data", "image_size", int, "resize images to this size"),
    "--augment": ("data", "augment", str, "none | flip_crop"),
    "--data-seed": ("data", "seed", int, "seed of splits and distortion"),
    "--backbone": ("model", "backbone", str, "mlp | resnet18 | resnet34 | resnet50 | resnet_tiny"),
    "--width": ("model", "width", int, "MLP width or ResNet base width"),
    "--depth": ("model", "depth", int, "MLP backbone depth"),
    "--stem": ("model", "stem", str, "ResNet stem: cifar | imagenet"),
    "--head": ("model", "head", str, "linear | mlp"),
    "--head-hidden": ("model", "head_hidden", int, "MLP head width"),
    "--reinit-blocks": ("model", "reinit_blocks", int, "partial backbone: re-initialise the last k blocks"),
    "--dtype": ("model", "dtype", str, "compute dtype (float32 | bfloat16)"),
    "--pretrain-epochs": ("pretrain", "epochs", int, "pretraining epochs"),
    "--pretrain-lr": ("pretrain", "lr", float, "pretraining learning rate"),
    "--tau": ("hp", "taus", _ints, "HP epochs to snapshot, e.g. 0,1,2,4,8"),
    "--hp-lr": ("hp", "lr", float, "HP learning rate (constant SGD)"),
    "--eta-hp": ("hp", "eta", float, "HP label smoothing: target η·e_y + (1−η)·u"),
    "--ft-epochs": ("ft", "epochs", int, "maximum FT epochs"),
    "--ft-lr": ("ft", "lr", float, "FT peak learning rate (cosine)"),
    "--weight-decay": ("ft", "weight_decay", float, "FT weight decay"),
    "--eta-ft": ("ft", "eta", float, "FT label smoothing η_FT"),
    "--patience": ("ft", "patience", int, "early-stopping patience (epochs)"),
}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (defaults: hpft_jax/config.py)")
    for flag, (_, _, tp, hlp) in FLAGS.items():
        # SUPPRESS: an absent flag leaves no attribute, so "--ls-eta none"
        # (a real None) is not mistaken for "flag not given".
        g.add_argument(flag, type=tp, default=argparse.SUPPRESS, help=hlp)
    g.add_argument("--batch-size", type=int, default=None,
                   help="batch size of pretraining, HP and FT")
    g.add_argument("--no-distort", action="store_true", help="no downstream rotation/zoom")
    g.add_argument("--download", action="store_true",
                   help="let tensorflow-datasets download (needs internet and tensorflow)")
    g.add_argument("--sequential", action="store_true",
                   help="finetune runs one at a time instead of vmap-batched")
    g.add_argument("--config", default=None,
                   help="start from this config.json (flags override it)")


def config_from_args(args: argparse.Namespace) -> C.SweepConfig:
    """Fill the dataclasses: defaults <- --config file <- flags."""
    base = C.SweepConfig()
    if args.config:
        with open(args.config) as f:
            base = C.from_dict(C.SweepConfig, json.load(f))
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {s: {} for s in ("data", "model", "pretrain", "hp", "ft")}
    for flag, (section, field, _, _) in FLAGS.items():
        dest = flag[2:].replace("-", "_")
        if hasattr(args, dest):
            (top if section is None else sections[section])[field] = getattr(args, dest)
    if args.batch_size is not None:
        for s in ("pretrain", "hp", "ft"):
            sections[s]["batch_size"] = args.batch_size
    if args.no_distort:
        sections["data"]["distort"] = False
    if args.download:
        sections["data"]["download"] = True
    if args.sequential:
        top["vmap"] = False
    for s, fields in sections.items():
        if fields:
            top[s] = dataclasses.replace(getattr(base, s), **fields)
    return dataclasses.replace(base, **top)


def cmd_sweep(args) -> None:
    from hpft_jax.report import report
    from hpft_jax.sweep import run_sweep

    cfg = config_from_args(args)
    run = run_sweep(cfg, progress=not args.quiet, save_final=args.save_final)
    report(run.path, write_figures=not args.no_figures)


def cmd_pretrain(args) -> None:
    from hpft_jax import pretrain

    cfg = config_from_args(args)
    _, meta = pretrain.get_or_train(cfg.data, cfg.model, cfg.pretrain, cfg.runs_dir,
                                    progress=not args.quiet)
    path = pretrain.pretrained_dir(cfg.runs_dir, cfg.data, cfg.model, cfg.pretrain)
    print(json.dumps({"path": os.path.abspath(path), **meta.get("metrics", {})}, indent=2))


def cmd_report(args) -> None:
    from hpft_jax.report import report

    report(args.run_dir, write_figures=not args.no_figures)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpft", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sweep", help="pretrain (cached), HP snapshots, FT from each τ; report")
    add_config_flags(s)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--no-figures", action="store_true")
    s.add_argument("--save-final", action="store_true",
                   help="keep every finetuned model under checkpoints/final/")
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("pretrain", help="pretrain the backbone on the source data (cached)")
    add_config_flags(s)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("report", help="rebuild tables and figures from metrics.jsonl")
    s.add_argument("run_dir")
    s.add_argument("--no-figures", action="store_true")
    s.set_defaults(fn=cmd_report)

    from hpft_jax import experiments

    experiments.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from hpft_jax.checkpoint import CheckpointError
    from hpft_jax.errors import NonFiniteLossError
    from hpft_jax.params import CheckpointMismatchError

    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, CheckpointError, CheckpointMismatchError,
            NonFiniteLossError) as e:
        print(f"hpft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hpft {args.command}: interrupted; rerun the same command to continue",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
