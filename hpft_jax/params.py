"""Split and merge backbone and head, load pretrained weights, re-initialise.

Parameter trees are the ones :class:`hpft_jax.models.Classifier` creates::

    {"params": {"backbone": {...}, "head": {...}},
     "batch_stats": {"backbone": {...}}}          # ResNets only

"Head" here means everything head probing trains: ``params/head`` plus, under
a partial backbone, the last ``reinit_blocks`` backbone blocks (Sec. 5.3).
Paths are tuples of keys, as ``flax.traverse_util.flatten_dict`` gives them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]
Tree = Any


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists every key."""


def head_block_names(model, reinit_blocks: int) -> tuple[str, ...]:
    """Names of the backbone blocks that join the head."""
    n = model.backbone.num_blocks
    if not 0 <= reinit_blocks <= n:
        raise ValueError(f"reinit_blocks must lie in [0, {n}]; got {reinit_blocks}")
    return tuple(model.backbone.block_name(i) for i in range(n - reinit_blocks, n))


def is_head_path(path: Path, head_blocks: Iterable[str]) -> bool:
    """True for ``(.., 'head', ..)`` and ``(.., 'backbone', <head block>, ..)``.

    ``path`` may start with a collection name (``params``, ``batch_stats``).
    """
    path = tuple(path)
    if path and path[0] in ("params", "batch_stats"):
        path = path[1:]
    if not path:
        return False
    if path[0] == "head":
        return True
    return path[0] == "backbone" and len(path) > 1 and path[1] in set(head_blocks)


def head_mask(tree: Tree, head_blocks: Iterable[str]) -> Tree:
    """Boolean tree: True on the leaves head probing trains."""
    head_blocks = tuple(head_blocks)
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict(
        {p: is_head_path(p, head_blocks) for p in flat})


def partition(tree: Tree, predicate: Callable[[Path], bool]) -> tuple[Tree, Tree]:
    """Split a nested dict into ``(selected, rest)`` by path predicate."""
    flat = traverse_util.flatten_dict(tree)
    sel = {p: v for p, v in flat.items() if predicate(p)}
    rest = {p: v for p, v in flat.items() if not predicate(p)}
    return traverse_util.unflatten_dict(sel), traverse_util.unflatten_dict(rest)


def merge(*trees: Tree) -> Tree:
    """Union of nested dicts with disjoint leaves; overlaps raise."""
    out: dict[Path, Any] = {}
    for t in trees:
        for p, v in traverse_util.flatten_dict(t).items():
            if p in out:
                raise ValueError(f"merge: duplicate leaf {'/'.join(p)}")
            out[p] = v
    return traverse_util.unflatten_dict(out)


def _fmt(paths: Iterable[Path]) -> str:
    return "\n  ".join("/".join(p) for p in sorted(paths))


def load_pretrained(target: Tree, loaded: Tree, *,
                    reinit: Callable[[Path], bool]) -> tuple[Tree, list[str]]:
    """Copy ``loaded`` into ``target`` except where ``reinit(path)`` is True.

    ``target`` is a freshly initialised variables dict of the model to train;
    ``loaded`` a pretrained one. Leaves with ``reinit(path)`` keep their fresh
    values; every other leaf must exist in ``loaded`` with the same shape.
    Checkpoint leaves with no place in ``target`` are an error unless they
    lie under a re-initialised path (for example the old, 10-class head).
    Nothing is loaded silently: any mismatch raises
    :class:`CheckpointMismatchError` listing all offending keys.

    Returns the merged variables and the list of paths not loaded.
    """
    tflat = traverse_util.flatten_dict(target)
    lflat = traverse_util.flatten_dict(loaded)
    missing = [p for p in tflat if not reinit(p) and p not in lflat]
    unexpected = [p for p in lflat if p not in tflat and not reinit(p)]
    shape = [p for p in tflat if not reinit(p) and p in lflat
             and np.shape(tflat[p]) != np.shape(lflat[p])]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint:\n  {_fmt(missing)}")
        if unexpected:
            parts.append(f"in the checkpoint but not in the model:\n  {_fmt(unexpected)}")
        if shape:
            parts.append("shape mismatch:\n  " + "\n  ".join(
                f"{'/'.join(p)}: model {np.shape(tflat[p])} vs checkpoint "
                f"{np.shape(lflat[p])}" for p in sorted(shape)))
        raise CheckpointMismatchError(
            "pretrained checkpoint does not match the model (another "
            "architecture?)\n" + "\n".join(parts))
    merged = {p: (v if reinit(p) else lflat[p]) for p, v in tflat.items()}
    not_loaded = sorted("/".join(p) for p in tflat if reinit(p))
    return traverse_util.unflatten_dict(merged), not_loaded


def count(tree: Tree) -> int:
    """Number of scalars in a tree."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))
