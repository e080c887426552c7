"""Command-line flags shared by every ``hpft`` job: argparse only, no JAX.

* :data:`FLAGS`: one flag per field of :class:`hpft_jax.config.SweepConfig`
  and its sections; :func:`add_config_flags` adds them with the defaults a
  job starts from shown in ``--help``, and :func:`sweep_config` fills the
  dataclasses (defaults <- ``--config`` file <- flags).
* :func:`option`: declares an experiment's own setting as a dataclass field
  with its flag and help; :func:`add_options` / :func:`options_from_args`
  turn such fields into flags and back.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import types
import typing
from typing import Any, Callable

from hpft_jax import config as C, normalization, presets


# --------------------------------------------------------------------------
# Value parsers


def ints(s: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``."""
    try:
        return tuple(int(v) for v in s.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def floats(s: str) -> tuple[float, ...]:
    """``"1e-1,1e-2"`` -> ``(0.1, 0.01)``."""
    try:
        return tuple(float(v) for v in s.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def names(s: str) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``."""
    return tuple(v.strip() for v in s.split(",") if v.strip())


def _pair(s: str, sep: str, conv: Callable[[str], Any], expected: str) -> tuple[Any, Any]:
    parts = s.split(sep)
    try:
        if len(parts) != 2:
            raise ValueError
        return conv(parts[0]), conv(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}; got {s!r}") from None


def shard(s: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``."""
    return _pair(s, "/", int, "i/n, e.g. 0/4")


_BYTE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def byte_size(s: str) -> int | None:
    """``auto`` -> None; ``BYTES`` with an optional K/M/G/T (binary) suffix
    -> a positive number of bytes."""
    if s == "auto":
        return None
    t = s.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _BYTE_UNITS and t[-1:] else ""
    try:
        value = int(float(t[:len(t) - len(unit)]) * _BYTE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected BYTES (e.g. 512M, 2G) or auto; got {s!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive; got {s!r}")
    return value


def opt_float(s: str) -> float | None:
    return None if s.lower() in ("none", "off", "") else float(s)


def opt_int_or_all(s: str) -> int | None:
    """An integer, or ``all`` (None)."""
    if s.lower() == "all":
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all'; got {s!r}") from None


def on_off(s: str) -> bool:
    """``on``/``off`` (also true/false, yes/no, 1/0) -> bool."""
    v = s.strip().lower()
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off; got {s!r}")


def on_off_auto(s: str) -> bool | None:
    """``on``/``off``/``auto`` -> True/False/None."""
    return None if s.strip().lower() == "auto" else on_off(s)


def float_pair(s: str) -> tuple[float, float]:
    """``"lo,hi"`` -> ``(lo, hi)``."""
    return _pair(s, ",", float, "lo,hi")


# --------------------------------------------------------------------------
# The sweep configuration

# flag -> (section, field, type, help). Section None = SweepConfig itself.
FLAGS: dict[str, tuple[str | None, str, Callable[[str], Any], str]] = {
    "--name": (None, "name", str, "run name: results go to RUNS_DIR/NAME"),
    "--runs-dir": (None, "runs_dir", str, "where runs (and the pretrained cache) live"),
    "--seeds": (None, "seeds", ints, "comma-separated seeds (HP head init and data order)"),
    "--ls-eta": (None, "ls_eta", opt_float, "η_HP of the extra lsHP run at the largest τ, or 'none'"),
    "--shard": (None, "shard", shard, "run slice i of n of the FT runs (job arrays)"),
    "--max-batch-runs": (None, "max_batch_runs", int,
                         "at most this many FT runs per vmapped program (memory)"),
    "--source": ("data", "source", str, "pretraining data: digits | mnist | cifar10 | idx:DIR | npz:FILE ..."),
    "--downstream": ("data", "downstream", str, "downstream data, e.g. digits:0,1,2 or stl10"),
    "--data-dir": ("data", "data_dir", str, "tfds data_dir"),
    "--max-rotation": ("data", "max_rotation", float, "downstream distortion: max rotation (deg)"),
    "--zoom": ("data", "zoom", float_pair, "downstream distortion: zoom range lo,hi"),
    "--per-class": ("data", "per_class", int, "cap downstream examples per class"),
    "--image-size": ("data", "image_size", int, "resize images to this size"),
    "--augment": ("data", "augment", str, "none | flip_crop | rrc_flip (random-resized-crop "
                  "+ flip, the ImageNet train augmentation) | scale_crop_flip (segmentation: "
                  "image and mask scaled, cropped, flipped together)"),
    "--distort": ("data", "distort", on_off_auto,
                  "downstream rotation/zoom: on | off | auto (auto: on for digits, mnist, idx:)"),
    "--pipeline": ("data", "pipeline", str,
                   "input pipeline: dataset (own mean/std, squash) | imagenet (ImageNet "
                   "mean/std, resize + centre crop); default: the --init-from backbone's"),
    "--flowers-split": ("data", "flowers_split", str,
                        "oxford_flowers102 split: tfds | table4 (train on the 6,149 test "
                        "images, test on train+val)"),
    "--data-seed": ("data", "seed", int, "seed of splits and distortion"),
    "--input": ("data", "input", str,
                "input path: auto | device (each split on every device) | stream (batches "
                "gathered on the host and prefetched); auto streams a stage whose data "
                "exceed --data-budget"),
    "--data-budget": ("data", "data_budget", byte_size,
                      "device memory the data of one stage may take, BYTES (512M, 2G) or "
                      "auto (half a device's memory; a quarter of the RAM on CPU)"),
    "--backbone": ("model", "backbone", str, "mlp | resnet18 | resnet34 | resnet50 | resnet_tiny"),
    "--width": ("model", "width", int, "MLP width or ResNet base width (None: 128 / 64)"),
    "--depth": ("model", "depth", int, "MLP backbone depth"),
    "--stem": ("model", "stem", str, "ResNet stem: cifar | imagenet"),
    "--head": ("model", "head", str, "linear | mlp"),
    "--head-hidden": ("model", "head_hidden", int, "MLP head width"),
    "--reinit-blocks": ("model", "reinit_blocks", int, "partial backbone: re-initialise the last k blocks"),
    "--dtype": ("model", "dtype", str, "compute dtype (float32 | bfloat16)"),
    "--conv": ("model", "conv", str,
               "training's convolutions: auto (patches + matmul on CPU) | lax | patches"),
    "--pretrain-epochs": ("pretrain", "epochs", int, "pretraining epochs"),
    "--pretrain-lr": ("pretrain", "lr", float, "pretraining learning rate"),
    "--pretrain-optimizer": ("pretrain", "optimizer", str,
                             "pretraining optimizer: adam | sgd (momentum 0.9); cosine schedule"),
    "--pretrain-weight-decay": ("pretrain", "weight_decay", float, "pretraining weight decay"),
    "--init-from": ("pretrain", "init_from", str,
                    "use this backbone checkpoint (hpft import-weights, or a pretraining "
                    "cache entry) instead of pretraining"),
    "--tau": ("hp", "taus", ints, "HP epochs to snapshot, e.g. 0,1,2,4,8 (also --taus)"),
    "--hp-lr": ("hp", "lr", float, "HP learning rate (constant SGD)"),
    "--hp-momentum": ("hp", "momentum", float, "HP SGD momentum (0: plain SGD)"),
    "--eta-hp": ("hp", "eta", float, "HP label smoothing: target η·e_y + (1−η)·u"),
    "--ft-epochs": ("ft", "epochs", int, "maximum FT epochs"),
    "--ft-lr": ("ft", "lr", float, "FT (peak) learning rate"),
    "--ft-momentum": ("ft", "momentum", float, "FT SGD momentum (0: plain SGD)"),
    "--ft-schedule": ("ft", "schedule", str, "FT lr schedule: cosine | constant"),
    "--early-stopping": ("ft", "early_stopping", on_off,
                         "FT early stopping on validation accuracy: on | off (off: the "
                         "last epoch's model is evaluated)"),
    "--weight-decay": ("ft", "weight_decay", float, "FT weight decay"),
    "--eta-ft": ("ft", "eta", float, "FT label smoothing η_FT"),
    "--patience": ("ft", "patience", int, "early-stopping patience (epochs)"),
}
ALIASES = {"--tau": ("--taus",)}


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else "()"
    return str(value)


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def add_config_flags(p: argparse.ArgumentParser, defaults: C.SweepConfig | None = None) -> None:
    """Every :data:`FLAGS` flag, ``--help`` showing ``defaults``' values."""
    defaults = C.SweepConfig() if defaults is None else defaults
    g = p.add_argument_group("configuration (hpft_jax/config.py; a flag left out keeps "
                             "the default shown)")
    for flag, (section, field, tp, hlp) in FLAGS.items():
        value = getattr(defaults if section is None else getattr(defaults, section), field)
        # SUPPRESS: an absent flag leaves no attribute, so "--ls-eta none"
        # (a real None) is not mistaken for "flag not given".
        g.add_argument(flag, *ALIASES.get(flag, ()), dest=_dest(flag), type=tp,
                       default=argparse.SUPPRESS, help=f"{hlp} (default: {_show(value)})")
    bs = defaults.ft.batch_size
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"batch size of pretraining, HP and FT (default: {bs})")
    g.add_argument("--no-distort", action="store_true",
                   help="no downstream rotation/zoom (= --distort off)")
    g.add_argument("--download", action="store_true",
                   help="let tensorflow-datasets download (needs internet and tensorflow)")
    g.add_argument("--sequential", action="store_true",
                   help="finetune runs one at a time instead of vmap-batched")
    g.add_argument("--config", default=None,
                   help="start from this config.json (flags override it)")
    g.add_argument("--preset", default=None, metavar="NAME",
                   help="start from a named setting (flags override it): "
                        + " | ".join(presets.PRESETS) + f" (default: {presets.DEFAULT}, "
                        "the defaults shown); see hpft_jax/presets.py")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit")


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_config_file(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def sweep_config(args: argparse.Namespace, base: C.SweepConfig | None = None) -> C.SweepConfig:
    """Fill the dataclasses: ``base`` <- ``--config`` file <- ``--preset`` <- flags."""
    base = C.SweepConfig() if base is None else base
    if getattr(args, "config", None):
        data = read_config_file(args.config)
        base = C.from_dict(C.SweepConfig, data.get("sweep", data))
    if getattr(args, "preset", None):
        base = presets.apply(base, args.preset)
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {s: {} for s in ("data", "model", "pretrain", "hp", "ft")}
    for flag, (section, field, _, _) in FLAGS.items():
        dest = _dest(flag)
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
    if "init_from" in sections["pretrain"]:
        meta = os.path.join(sections["pretrain"]["init_from"], "meta.json")
        if not os.path.isfile(meta):
            raise FileNotFoundError(f"--init-from {sections['pretrain']['init_from']}: no "
                                    "backbone checkpoint there (no meta.json)")
        sections["pretrain"]["init_sha256"] = file_sha256(meta)  # pins the checkpoint
    for s, fields in sections.items():
        if fields:
            top[s] = dataclasses.replace(getattr(base, s), **fields)
    # config.json names the pipeline an imported backbone implies
    return normalization.resolve(dataclasses.replace(base, **top))


def add_output_flags(p: argparse.ArgumentParser, *, report_only: bool = True) -> None:
    """``--quiet``, ``--no-figures`` and (for experiments) ``--report-only``."""
    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    g.add_argument("--no-figures", action="store_true", help="write no figures")
    if report_only:
        g.add_argument("--report-only", action="store_true",
                       help="rebuild the report and figures from metrics.jsonl, without training")


# --------------------------------------------------------------------------
# An experiment's own settings


def option(default: Any, help: str, *, flag: str | None = None,  # noqa: A002
           parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field that is also a command-line flag.

    ``flag`` defaults to ``--field-name``; a bool field becomes a switch
    (``--name`` when the default is False, ``--no-name`` when True).
    ``parse`` turns the flag's text into the value (default: from the type).
    """
    return dataclasses.field(default=default,
                             metadata={"help": help, "flag": flag, "parse": parse})


def _parser_for(tp: Any) -> Callable[[str], Any]:
    """The text -> value parser of a field type: int, float, str, their
    tuples and ``X | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _parser_for(next(a for a in args if a is not type(None)))
    if typing.get_origin(tp) is tuple and args[0] in (int, float, str):
        return {int: ints, float: floats, str: names}[args[0]]
    if tp in (int, float, str):
        return tp
    raise TypeError(f"no flag parser for a field of type {tp}; pass option(parse=...)")


def option_fields(cls) -> list[dataclasses.Field]:
    """The :func:`option` fields of an experiment's config class."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_options(p: argparse.ArgumentParser, cls, title: str) -> None:
    """One flag per :func:`option` field of ``cls``, with its default shown."""
    hints = typing.get_type_hints(cls)
    taken = {_dest(flag) for flag in FLAGS} | {"batch_size", "no_distort", "download",
                                              "sequential", "config", "preset",
                                              "print_config"}
    clash = [f.name for f in option_fields(cls) if f.name in taken]
    if clash:
        raise TypeError(f"{cls.__name__} options {clash} share a name with a sweep flag; "
                        "rename the fields")
    g = p.add_argument_group(title)
    for f in option_fields(cls):
        flag = f.metadata["flag"]
        if hints[f.name] is bool:
            flag = flag or (f"--no-{f.name}" if f.default else f"--{f.name}").replace("_", "-")
            g.add_argument(flag, dest=f.name, action="store_const", const=not f.default,
                           default=argparse.SUPPRESS, help=f.metadata["help"])
            continue
        flag = flag or "--" + f.name.replace("_", "-")
        parse = f.metadata["parse"] or _parser_for(hints[f.name])
        g.add_argument(flag, dest=f.name, type=parse, default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {_show(f.default)})")


def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` of the :func:`option` flags given on the command line."""
    return {f.name: getattr(args, f.name) for f in option_fields(cls) if hasattr(args, f.name)}


@dataclasses.dataclass(frozen=True)
class Command:
    """An ``hpft`` subcommand: ``add_arguments(parser)`` then ``run(args)``.

    :class:`hpft_jax.experiment.Experiment` has the same three members.
    """

    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
