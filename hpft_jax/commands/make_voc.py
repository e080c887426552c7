"""``hpft make-voc DIR``: a tiny generated data set in PASCAL VOC 2012's layout.

Coloured shapes on noisy gradient backgrounds (class = shape and colour),
palette PNG masks with 255 on a one-pixel ring around each shape, lists
``ImageSets/Segmentation/{train,val}.txt``; read it with ``voc:DIR``. For
tests and the offline demo.
"""

from __future__ import annotations

import argparse
import os

from hpft_jax import voc

description = __doc__.strip().split("\n\n")[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="directory to write (must not exist)")
    parser.add_argument("--train", type=int, default=48, help="training images")
    parser.add_argument("--val", type=int, default=16, help="validation images (VOC's val)")
    parser.add_argument("--classes", type=int, default=4, help="classes incl. background, 2..8")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    if os.path.exists(args.out):
        raise ValueError(f"{args.out} exists; choose a new directory")
    if args.train < 2 or args.val < 1 or not 2 <= args.classes <= 8:
        raise ValueError("need --train >= 2, --val >= 1 and 2 <= --classes <= 8")
    voc.generate(args.out, num_train=args.train, num_val=args.val, num_classes=args.classes,
                 seed=args.seed)
    print(f"wrote {args.train} + {args.val} images to {args.out} (VOC layout)")
