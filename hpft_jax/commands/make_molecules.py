"""``hpft make-molecules DIR``: random molecule-like graphs in OGB's layout.

Each task t is 1 when the molecule has a bond between two given element
types (``hpft_jax.ogb.rule_pairs``), with label noise and missing labels;
the split is random 80/10/10 (written as split/scaffold). Tasks with
``--task-offset`` k start at the k-th rule, so a source and a downstream
set can share or differ in rules. For tests and the offline demo.
"""

from __future__ import annotations

import argparse
import os

from hpft_jax import ogb

description = __doc__.strip().split("\n\n")[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="directory to write (must not exist)")
    parser.add_argument("--graphs", type=int, default=1000, help="number of molecules")
    parser.add_argument("--tasks", type=int, default=12, help="binary tasks")
    parser.add_argument("--task-offset", type=int, default=0, help="first label rule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--missing", type=float, default=0.15, help="fraction of missing labels")


def run(args: argparse.Namespace) -> None:
    if os.path.exists(args.out):
        raise ValueError(f"{args.out} exists; choose a new directory")
    if args.graphs < 10 or args.tasks < 1 or not 0 <= args.missing < 1:
        raise ValueError("need --graphs >= 10, --tasks >= 1 and 0 <= --missing < 1")
    mol = ogb.generate(args.graphs, args.tasks, seed=args.seed, task_offset=args.task_offset,
                       missing=args.missing)
    ogb.write(mol, args.out)
    print(f"wrote {args.graphs} molecules, {args.tasks} tasks, to {args.out} (OGB layout)")
