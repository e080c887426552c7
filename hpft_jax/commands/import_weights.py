"""``hpft import-weights SRC --arch resnet50 --out DIR``: torchvision weights -> checkpoint."""

from __future__ import annotations

import argparse

from hpft_jax.weights import ARCHS, import_weights

description = __doc__.strip().split("\n\n")[0]
HELP = "convert a torchvision-format ResNet checkpoint (.pth/.safetensors/.npz) for --init-from"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint file: .pth, .pth.tar, .pt, .safetensors or .npz")
    parser.add_argument("--arch", required=True, choices=ARCHS, help="torchvision architecture")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--prefix", default=None,
                        help="key prefix to strip, e.g. module.encoder_q. ('' for none); "
                             "detected when left out")
    parser.add_argument("--keep-fc", action="store_true",
                        help="keep fc as the pretraining head (params/head/out)")


def run(args: argparse.Namespace) -> None:
    variables, meta = import_weights(args.src, args.arch, args.out, prefix=args.prefix,
                                     keep_fc=args.keep_fc)
    how = "detected" if meta["prefix_detected"] else "given"
    nested = f", unwrapped from {meta['wrapper']!r}" if meta["wrapper"] else ""
    ignored = f"; ignored {meta['ignored_keys']} keys outside the prefix" if meta["ignored_keys"] else ""
    head = f"; kept fc ({meta['num_classes']} classes)" if meta["kept_fc"] else "; dropped fc"
    print(f"prefix {meta['prefix']!r} ({how}){nested}{ignored}{head}")
    print(f"wrote {args.arch} (stem {meta['model']['stem']}, width {meta['model']['width']}) "
          f"to {args.out}; source sha256 {meta['source']['sha256'][:16]}...")
