"""``hpft``: the command line.

    hpft sweep                  # the main job on the embedded digits
    hpft sweep --tau 0,1,2,4 --eta-hp 0.9 --head mlp --downstream digits:0,1,2
    hpft pretrain --source digits
    hpft report runs/toy
    hpft drift --help           # every analysis experiment: see hpft --help

Commands are a lazy table: ``hpft --help`` imports no JAX, and only the
chosen command's module is imported. Library code raises; this module turns
the errors a user can fix into one-line messages and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Iterable

# name -> ("module" or "module:ATTR", help). The target has
# ``add_arguments(parser)``, ``run(args)`` and ``description``.
COMMANDS: dict[str, tuple[str, str]] = {
    "sweep": ("hpft_jax.jobs:SWEEP", "pretrain (cached), HP snapshots, FT from each τ; report"),
    "pretrain": ("hpft_jax.jobs:PRETRAIN", "pretrain the backbone on the source data (cached)"),
    "report": ("hpft_jax.jobs:REPORT", "rebuild a sweep's tables and figures from metrics.jsonl"),
    "import-weights": ("hpft_jax.commands.import_weights",
                       "convert a torchvision-format ResNet checkpoint (.pth/.safetensors/.npz) "
                       "for --init-from"),
    "features": ("hpft_jax.commands.features",
                 "backbone features z (N, h) of normalised images (N, H, W, C) from a checkpoint"),
    "make-voc": ("hpft_jax.commands.make_voc", "a tiny generated data set in VOC's layout"),
    "make-molecules": ("hpft_jax.commands.make_molecules",
                       "random molecule-like graphs with planted labels in OGB's layout"),
    "exchange": ("hpft_jax.experiments.exchange:EXPERIMENT",
                 "head-exchange matrices between HPτ-FT models (Fig. 3, right)"),
    "tricks": ("hpft_jax.experiments.tricks:EXPERIMENT",
               "MLP head, lsHP (η_HP, η_FT) cases, partial backbone (Tables 2, 3, 5-8)"),
    "collapse": ("hpft_jax.experiments.collapse:EXPERIMENT",
                 "linear probe, Layer FT, SCL FT, full FT: accuracy, % tuned, NC1 "
                 "(companion paper Table 3, Fig. 10)"),
    "drift": ("hpft_jax.experiments.drift:EXPERIMENT",
              "eNTK drift (k_norm, k_gap) during FT: scratch vs pretrained + HPτ "
              "(App. A, Fig. 6)"),
    "eq2": ("hpft_jax.experiments.eq2:EXPERIMENT",
            "one-step check of the Eq. 2 decomposition (kernel, direction, energy) against "
            "a real SGD step, over γ"),
    "autotau": ("hpft_jax.experiments.autotau:EXPERIMENT", "choose τ from HP alone, FT at τ̂"),
    "prop1": ("hpft_jax.experiments.prop1:EXPERIMENT",
              "Prop. 1's bound c·AIE against the measured E‖z_T − z_0‖ over τ (Sec. 4.1)"),
}


def plain(text: str) -> str:
    """Docstring markup (``x``, :func:`x`) as plain text for ``--help``."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "").replace("%", "%%")


def load_command(name: str):
    """Import and return the target of ``COMMANDS[name]``."""
    target = COMMANDS[name][0]
    module, _, attr = target.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``commands`` (default: all) get their flags, the others
    only their one-line help (so ``hpft --help`` imports nothing heavy)."""
    full = set(COMMANDS if commands is None else commands)
    p = argparse.ArgumentParser(prog="hpft", description=plain(__doc__.split("\n\n")[0]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, hlp) in COMMANDS.items():
        if name not in full:
            sub.add_parser(name, help=plain(hlp), add_help=False)
            continue
        cmd = load_command(name)
        s = sub.add_parser(name, help=plain(hlp), description=plain(cmd.description))
        cmd.add_arguments(s)
        s.set_defaults(_cmd=cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = [argv[0]] if argv and argv[0] in COMMANDS else []
    args = build_parser(chosen).parse_args(argv)
    # The command's module is imported by now, so these imports cost nothing.
    from hpft_jax.checkpoint import CheckpointError  # noqa: PLC0415
    from hpft_jax.errors import NonFiniteLossError  # noqa: PLC0415
    from hpft_jax.params import CheckpointMismatchError  # noqa: PLC0415

    try:
        args._cmd.run(args)
    except (ValueError, FileNotFoundError, TimeoutError, CheckpointError,
            CheckpointMismatchError, NonFiniteLossError) as e:
        print(f"hpft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hpft {args.command}: interrupted; rerun the same command to continue",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
