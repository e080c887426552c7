"""Import torchvision-format ResNet weights into a Flax checkpoint.

    variables, meta = import_weights("moco_v2_800ep.pth.tar", "resnet50", "imported/moco")
    variables, meta = load_imported("imported/moco")

Names map as follows (``s`` = stage 1..4, ``i`` = block index from 0)::

    conv1.weight                     params/backbone/stem_conv/kernel
    bn1.{weight,bias}                params/backbone/stem_bn/{scale,bias}
    bn1.{running_mean,running_var}   batch_stats/backbone/stem_bn/{mean,var}
    layer{s}.{i}.conv{k}.weight      params/backbone/layer{s}_{i+1}/Conv_{k-1}/kernel
    layer{s}.{i}.bn{k}.*             .../layer{s}_{i+1}/BatchNorm_{k-1}/*
    layer{s}.{i}.downsample.0.weight .../layer{s}_{i+1}/proj_conv/kernel
    layer{s}.{i}.downsample.1.*      .../layer{s}_{i+1}/proj_bn/*
    fc.{weight,bias}                 params/head/out/{kernel,bias}   (keep_fc only)

Conv weights go from OIHW to HWIO, ``fc.weight`` is transposed and
``num_batches_tracked`` is dropped. The stem follows ``conv1``'s kernel
(7x7: ImageNet stem, 3x3: CIFAR stem) and the base width its output
channels. The written tree has the layout :mod:`hpft_jax.pretrain` writes
(``params/backbone``, ``params/head`` when kept, ``batch_stats/backbone``),
so a later ``--init-from DIR`` can take either.

Any key that is missing, unexpected or of the wrong shape is an error that
lists all of them; nothing is written unless the whole backbone loads.
"""

from __future__ import annotations

import hashlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hpft_jax import checkpoint, state_dict as sd_lib
from hpft_jax.config import ModelConfig, from_dict, to_dict
from hpft_jax.models import make_backbone
# torchvision's ImageNet normalisation, for RGB images scaled to [0, 1].
from hpft_jax.normalization import IMAGENET_MEAN, IMAGENET_STD

FORMAT = "hpft-imported-weights/1"
ARCHS = ("resnet18", "resnet34", "resnet50")
# torchvision layouts (stage sizes, bottleneck?) -> name; the last two only
# to say what a file holds.
LAYOUTS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
           ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
           ((3, 8, 36, 3), True): "resnet152"}
# Tried in this order when a file holds several networks.
PREFERRED_PREFIXES = ("", "module.", "module.encoder_q.", "encoder_q.", "module.encoder.",
                      "encoder.", "module.backbone.", "backbone.", "online_network.encoder.",
                      "online_network.", "model.")
ANCHORS = ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight")

Path = tuple[str, ...]


class WeightImportError(ValueError):
    """The file cannot become the requested backbone; nothing was written."""


# --------------------------------------------------------------------------
# Names


_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def flax_path(name: str) -> Path | None:
    """The Flax path of a torchvision ResNet key, or None if it has none.

    ``"layer2.0.downsample.1.running_var"`` ->
    ``("batch_stats", "backbone", "layer2_1", "proj_bn", "var")``.
    """
    if name in ("fc.weight", "fc.bias"):
        return ("params", "head", "out", "kernel" if name.endswith("weight") else "bias")
    m = re.fullmatch(r"(?:layer(\d)\.(\d+)\.)?(conv\d|bn\d|downsample\.[01])\.(\w+)", name)
    if m is None:
        return None
    stage, idx, mod, leaf = m.groups()
    in_block = stage is not None
    if mod == "conv1" and not in_block:
        mod_name, kind = "stem_conv", "conv"
    elif mod == "bn1" and not in_block:
        mod_name, kind = "stem_bn", "bn"
    elif not in_block:
        return None
    elif mod.startswith("conv"):
        mod_name, kind = f"Conv_{int(mod[4:]) - 1}", "conv"
    elif mod.startswith("bn"):
        mod_name, kind = f"BatchNorm_{int(mod[2:]) - 1}", "bn"
    else:
        mod_name, kind = ("proj_conv", "conv") if mod.endswith("0") else ("proj_bn", "bn")
    prefix = ("backbone",) if not in_block else ("backbone", f"layer{stage}_{int(idx) + 1}")
    if kind == "conv":
        return ("params", *prefix, mod_name, "kernel") if leaf == "weight" else None
    if leaf not in _BN:
        return None
    coll, flax_leaf = _BN[leaf]
    return (coll, *prefix, mod_name, flax_leaf)


def to_flax(name: str, value: np.ndarray) -> np.ndarray:
    """The array as Flax stores it: conv OIHW -> HWIO, fc (out, in) -> (in, out)."""
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if name == "fc.weight":
        return value.T
    return value


def layout_of(keys) -> tuple[tuple[int, ...], bool]:
    """``(blocks per stage, bottleneck?)`` of the torchvision keys ``keys``."""
    sizes = []
    for s in range(1, 5):
        idx = {int(m.group(1)) for k in keys
               if (m := re.match(rf"layer{s}\.(\d+)\.", k))}
        sizes.append(max(idx) + 1 if idx else 0)
    return tuple(sizes), any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in keys)


def describe_layout(keys) -> str:
    sizes, bottleneck = layout_of(keys)
    name = LAYOUTS.get((sizes, bottleneck))
    kind = "Bottleneck" if bottleneck else "BasicBlock"
    what = f"{kind}, stages {'-'.join(map(str, sizes))}"
    return f"{name} ({what})" if name else f"an unknown ResNet ({what})"


# --------------------------------------------------------------------------
# The model a state dict becomes


def model_config(arch: str, sd: dict[str, np.ndarray]) -> ModelConfig:
    """Backbone config from ``arch`` and ``conv1.weight`` (stem and width)."""
    w = sd.get("conv1.weight")
    if w is None or w.ndim != 4:
        raise WeightImportError("the state dict has no 4-d conv1.weight")
    ksize = w.shape[2:]
    stems = {(7, 7): "imagenet", (3, 3): "cifar"}
    if ksize not in stems:
        raise WeightImportError(
            f"conv1 has a {ksize[0]}x{ksize[1]} kernel; expected 7x7 (ImageNet stem) or 3x3 (CIFAR stem)")
    return ModelConfig(backbone=arch, width=int(w.shape[0]), stem=stems[ksize], head="linear")


def abstract_variables(cfg: ModelConfig, in_channels: int, num_classes: int | None) -> dict:
    """Shapes of ``{"params": {"backbone", "head"?}, "batch_stats": {"backbone"}}``."""
    bb = make_backbone(cfg.backbone, width=cfg.width, depth=cfg.depth, stem=cfg.stem)
    x = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
    v = jax.eval_shape(lambda x: bb.init(jax.random.key(0), x), x)
    out = {"params": {"backbone": v["params"]}, "batch_stats": {"backbone": v["batch_stats"]}}
    if num_classes is not None:
        h = int(jax.eval_shape(lambda v, x: bb.apply(v, x), v, x).shape[1])
        out["params"]["head"] = {"out": {
            "kernel": jax.ShapeDtypeStruct((h, num_classes), jnp.float32),
            "bias": jax.ShapeDtypeStruct((num_classes,), jnp.float32)}}
    return out


def _fmt(items) -> str:
    return "\n  " + "\n  ".join(items)


def convert(sd: dict[str, np.ndarray], arch: str, *, keep_fc: bool) -> tuple[dict, ModelConfig, int | None]:
    """``(variables, model config, num_classes or None)`` from a stripped state dict.

    Raises :class:`WeightImportError` listing every missing, unexpected and
    wrong-shape key; one line only when the file holds another depth.
    """
    if arch not in ARCHS:
        raise WeightImportError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    found = describe_layout(sd)
    name = found.split()[0]
    if name != arch:
        hint = f": use --arch {name}" if name in ARCHS else ""
        raise WeightImportError(f"the checkpoint holds {found}, not {arch}{hint}")
    cfg = model_config(arch, sd)
    fc = sd.get("fc.weight")
    num_classes = int(fc.shape[0]) if keep_fc and fc is not None else None
    if keep_fc and fc is None:
        raise WeightImportError("--keep-fc, but the state dict has no fc.weight")
    want = traverse_util.flatten_dict(
        abstract_variables(cfg, int(sd["conv1.weight"].shape[1]), num_classes))
    got: dict[Path, np.ndarray] = {}
    unexpected, shape, misshapen = [], [], set()
    for name, value in sorted(sd.items()):
        if name.endswith("num_batches_tracked") or (not keep_fc and name.startswith("fc.")):
            continue
        path = flax_path(name)
        if path is None or path not in want:
            unexpected.append(f"{name} {tuple(value.shape)}")
            continue
        arr = to_flax(name, value)
        if arr.shape != want[path].shape:
            shape.append(f"{name}: {tuple(value.shape)} in the file, {'/'.join(path)} "
                         f"wants {want[path].shape} after transposing")
            misshapen.add(path)
            continue
        got[path] = arr.astype(np.float32)
    missing = ["/".join(p) for p in want if p not in got and p not in misshapen]
    if missing or unexpected or shape:
        parts = [f"the state dict does not fit {arch} (stem {cfg.stem}, width {cfg.width}): "
                 f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shape)} wrong-shape keys"]
        if missing:
            parts.append("missing (Flax paths):" + _fmt(sorted(missing)))
        if unexpected:
            parts.append("unexpected:" + _fmt(unexpected))
        if shape:
            parts.append("wrong shape:" + _fmt(shape))
        raise WeightImportError("\n".join(parts))
    return traverse_util.unflatten_dict(got), cfg, num_classes


# --------------------------------------------------------------------------
# Files


def sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def read_backbone_state(src: str, *, prefix: str | None = None) -> tuple[dict, dict]:
    """``(stripped state dict, info)`` of a checkpoint file.

    ``info``: ``wrapper`` (the nesting key or None), ``prefix`` (stripped),
    ``prefix_detected`` (bool) and ``ignored_keys`` (how many keys lay
    outside the prefix, e.g. MoCo's key encoder).
    """
    obj = sd_lib.read(src)
    sd, wrapper = sd_lib.unwrap(obj, path=src)
    if prefix is None:
        prefix = sd_lib.choose_prefix(sd, ANCHORS, PREFERRED_PREFIXES, path=src)
        detected = True
    else:
        prefix = sd_lib.normalise_prefix(prefix)
        detected = False
    inside, outside = sd_lib.strip_prefix(sd, prefix, path=src)
    return inside, {"wrapper": wrapper, "prefix": prefix, "prefix_detected": detected,
                    "ignored_keys": len(outside)}


def _check_out_dir(out_dir: str) -> None:
    if os.path.isfile(out_dir):
        raise WeightImportError(f"--out {out_dir} is a file; give a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not checkpoint.exists(out_dir):
        raise WeightImportError(
            f"--out {out_dir} exists and is not a checkpoint; refusing to replace it")


def import_weights(src: str, arch: str, out_dir: str, *, prefix: str | None = None,
                   keep_fc: bool = False) -> tuple[dict, dict]:
    """Convert ``src`` into a checkpoint at ``out_dir``; returns ``(variables, meta)``.

    ``prefix=None`` detects the key prefix; a string (``""`` for none)
    overrides it. ``keep_fc`` keeps ``fc`` as ``params/head/out``. Nothing
    is written unless the conversion succeeds, and the write is atomic.
    """
    if arch not in ARCHS:
        raise WeightImportError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    _check_out_dir(out_dir)
    sd, info = read_backbone_state(src, prefix=prefix)
    try:
        variables, cfg, num_classes = convert(sd, arch, keep_fc=keep_fc)
    except WeightImportError as e:
        raise WeightImportError(f"{src} (prefix {info['prefix']!r}): {e}") from None
    meta = {
        "format": FORMAT,
        "model": to_dict(cfg),
        "num_classes": num_classes,
        "source": {"path": os.path.abspath(src), "sha256": sha256(src),
                   "bytes": os.path.getsize(src), "format": sd_lib.file_format(src)},
        **info,
        "kept_fc": bool(keep_fc),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "input": "RGB scaled to [0, 1], then (x - mean) / std"},
    }
    checkpoint.save_tree_atomic(out_dir, variables, meta)
    return variables, meta


def load_imported(path: str) -> tuple[dict, dict]:
    """``(variables, meta)`` of :func:`import_weights`' (or pretraining's) checkpoint.

    ``variables`` = ``{"params": {"backbone", "head"?}, "batch_stats": {..}}``
    as numpy arrays; ``meta["model"]`` is a :class:`ModelConfig` dict.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if not checkpoint.exists(path):
        raise WeightImportError(f"{path} is not a complete checkpoint (no meta.json or tree/)")
    tree, meta = checkpoint.load_tree(path)
    if "model" not in meta:
        raise WeightImportError(f"{path}/meta.json has no 'model' entry; not a backbone checkpoint")
    tree = jax.tree_util.tree_map(np.asarray, tree)
    variables = {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}
    return variables, meta


def backbone_of(meta: dict):
    """The backbone module a checkpoint's ``meta`` describes."""
    cfg = from_dict(ModelConfig, meta["model"])
    return make_backbone(cfg.backbone, width=cfg.width, depth=cfg.depth, stem=cfg.stem,
                         dtype=jnp.dtype(cfg.dtype))
