"""Read a PyTorch-style state dict from disk as ``{name: np.ndarray}``.

Formats, by file suffix:

* ``.pth``, ``.pth.tar``, ``.pt``, ``.tar``, ``.bin``: through torch when it
  is installed, with ``torch.load(..., weights_only=True)``, which refuses to
  run code from the file (this module never unpickles anything itself);
* ``.safetensors``: through the ``safetensors`` package, no torch needed;
* ``.npz``: ``np.load(..., allow_pickle=False)``, no torch needed.

Training scripts wrap the state dict (``{"state_dict": {...}, "epoch": ..}``)
and prefix its keys (``module.`` from DataParallel, ``module.encoder_q.``
from MoCo, ``online_network.`` from BYOL, ...). :func:`unwrap` removes the
wrapper; :func:`strip_prefix` keeps the keys under one prefix.

Every user error raises :class:`StateDictError` (a ``ValueError``) whose
first line names the problem.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Iterable, Mapping

import numpy as np

StateDict = dict[str, np.ndarray]

TORCH_SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar", ".bin")
SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")

# Keys under which training scripts nest the model's state dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "network")


class StateDictError(ValueError):
    """A file is not a readable state dict, or its keys are not as expected."""


def file_format(path: str) -> str:
    """``"torch"``, ``"safetensors"`` or ``"npz"``, from the file name."""
    name = os.path.basename(path).lower()
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    raise StateDictError(
        f"{path}: unknown checkpoint format; expected one of {', '.join(SUFFIXES)}")


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # noqa: PLC0415 (optional dependency; only called on torch tensors)

    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def _optional(module: str, path: str, hint: str):
    """Import an optional dependency, or fail naming the file and the fix."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise StateDictError(f"{path}: {hint}") from None


def _read_torch(path: str) -> Any:
    torch = _optional("torch", path, "reading PyTorch checkpoints needs torch: pip install "
                      "torch (CPU is enough), or convert the file to .safetensors or .npz")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in str(e).lower():
            first = ("it holds Python objects besides tensors, which are not unpickled "
                     "here; if you trust the file, convert it to .safetensors "
                     "(docs/weights.md)")
        raise StateDictError(f"{path} is not a readable PyTorch checkpoint: {first}") from None

    def conv(x):
        if isinstance(x, torch.Tensor):
            return _torch_to_numpy(x)
        if isinstance(x, Mapping):
            return {str(k): conv(v) for k, v in x.items()}
        return x

    return conv(obj)


def _read_safetensors(path: str) -> Any:
    st = _optional("safetensors.numpy", path, "reading .safetensors needs the safetensors "
                   "package: pip install safetensors")
    try:
        return st.load_file(path)
    except Exception as e:
        raise StateDictError(f"{path} is not a readable safetensors file: {e}") from None


def _read_npz(path: str) -> Any:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # BadZipFile, ValueError (pickled object arrays), OSError
        raise StateDictError(f"{path} is not a readable .npz of arrays: {e}") from None


def read(path: str) -> Any:
    """The file's contents: nested dicts whose array leaves are numpy arrays."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    fmt = file_format(path)
    return {"torch": _read_torch, "safetensors": _read_safetensors, "npz": _read_npz}[fmt](path)


def _arrays(d: Mapping) -> StateDict:
    return {k: v for k, v in d.items() if isinstance(v, np.ndarray)}


def unwrap(obj: Any, *, path: str = "checkpoint") -> tuple[StateDict, str | None]:
    """``(state dict, wrapper key or None)``: the flat name -> array mapping.

    A top-level dict with arrays is the state dict itself; otherwise the
    first of :data:`WRAPPER_KEYS` that holds one is used.
    """
    if not isinstance(obj, Mapping):
        raise StateDictError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    if _arrays(obj):
        return _arrays(obj), None
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and _arrays(inner):
            return _arrays(inner), key
    raise StateDictError(
        f"{path}: found no tensors at the top level or under {list(WRAPPER_KEYS)}; "
        f"top-level keys: {sorted(map(str, obj))[:10]}")


def normalise_prefix(prefix: str) -> str:
    """``"module.encoder_q"`` -> ``"module.encoder_q."``; ``""`` stays empty."""
    return prefix if prefix == "" or prefix.endswith(".") else prefix + "."


def candidate_prefixes(keys: Iterable[str], anchors: Iterable[str]) -> list[str]:
    """Every ``p`` such that ``p + a`` is a key for all ``anchors``; sorted."""
    keys = set(keys)
    anchors = list(anchors)
    first = anchors[0]
    cands = {k[: len(k) - len(first)] for k in keys if k.endswith(first)}
    return sorted(p for p in cands if all(p + a in keys for a in anchors))


def choose_prefix(keys: Iterable[str], anchors: Iterable[str],
                  preferred: Iterable[str], *, path: str = "checkpoint") -> str:
    """The one prefix under which all ``anchors`` exist.

    Several candidates (MoCo keeps ``encoder_q`` and ``encoder_k``, BYOL an
    online and a target network) are resolved by the order of ``preferred``;
    otherwise the error lists them so the user can pass one.
    """
    keys = list(keys)
    cands = candidate_prefixes(keys, anchors)
    if len(cands) == 1:
        return cands[0]
    for p in preferred:
        if p in cands:
            return p
    if not cands:
        raise StateDictError(
            f"{path}: found no {'/'.join(anchors)} under any prefix (not a checkpoint "
            f"of this kind?); first keys: {sorted(keys)[:5]}")
    raise StateDictError(
        f"{path}: several networks in the file, under prefixes {cands}; choose one with --prefix")


def strip_prefix(sd: Mapping[str, np.ndarray], prefix: str, *,
                 path: str = "checkpoint") -> tuple[StateDict, list[str]]:
    """``(keys under prefix with it removed, keys outside it)``."""
    inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not inside:
        tops = sorted({k.split(".")[0] + "." for k in sd})[:10]
        raise StateDictError(
            f"{path}: prefix {prefix!r} matches no key; keys start with {tops}")
    outside = sorted(k for k in sd if not k.startswith(prefix))
    return inside, outside
