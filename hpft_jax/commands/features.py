"""``hpft features --init-from DIR --input X.npy --out Z.npy``: backbone features z."""

from __future__ import annotations

import argparse
import os

import numpy as np

from hpft_jax.features import features

description = __doc__.strip().split("\n\n")[0]
HELP = "backbone features z (N, h) of normalised images (N, H, W, C) from a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init-from", required=True, dest="init_from",
                        help="checkpoint directory (hpft import-weights or pretraining)")
    parser.add_argument("--input", required=True, help=".npy float32 array (N, H, W, C), normalised")
    parser.add_argument("--out", required=True, help=".npy file for the (N, h) features")
    parser.add_argument("--chunk", type=int, default=64, help="images per compiled batch")


def run(args: argparse.Namespace) -> None:
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"no such input file: {args.input}")
    try:
        x = np.load(args.input, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{args.input} is not a plain .npy array: {e}") from None
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{args.input}: expected one .npy array, got an archive")
    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1; got {args.chunk}")
    z = features(args.init_from, x, chunk=args.chunk)
    tmp = args.out + ".tmp.npy"
    np.save(tmp, z)
    os.replace(tmp, args.out)
    print(f"wrote features {z.shape} to {args.out}")
