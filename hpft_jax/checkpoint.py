"""Orbax checkpoints with clear errors.

Two uses:

* :func:`save_tree` / :func:`load_tree`: one pytree plus a JSON meta file in a
  directory (the pretrained backbone, HP snapshots). Writes are atomic: the
  whole directory is written under a temporary name and renamed into place.
* :class:`EpochCheckpointer`: the latest training state of a loop, keyed by
  epoch, so an interrupted FT resumes where it stopped.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""


def _process_local() -> dict:
    """Orbax options under ``jax.distributed``: every process checkpoints on
    its own (``active_processes={i}``), so process 0 can write the shared
    checkpoints while the others wait elsewhere; empty with one process."""
    if jax.process_count() == 1:
        return {}
    i = jax.process_index()
    return {"multiprocessing_options": ocp.options.MultiprocessingOptions(
        primary_host=i, active_processes={i}, barrier_sync_key_prefix=f"hpft-p{i}")}


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def exists(path: str) -> bool:
    return os.path.exists(os.path.join(path, "meta.json")) and os.path.isdir(
        os.path.join(path, "tree"))


def _write_tree(path: str, tree: Any, meta: dict) -> None:
    """Write ``tree`` and ``meta`` into the new directory ``path`` (not atomic)."""
    os.makedirs(path)
    ckptr = ocp.StandardCheckpointer(**_process_local())
    ckptr.save(os.path.join(path, "tree"), tree)
    ckptr.wait_until_finished()
    ckptr.close()
    # meta.json last: its presence marks a complete checkpoint.
    with open(os.path.join(path, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(os.path.join(path, "meta.json.tmp"), os.path.join(path, "meta.json"))


def _suffix() -> str:
    """Unique per process across hosts (job-array shards share a file system)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def save_tree(path: str, tree: Any, meta: dict) -> None:
    """Write ``tree`` (arrays) and ``meta`` (JSON) at ``path``, atomically.

    The checkpoint is written into a sibling temporary directory and renamed
    into place, so a reader (or a crash) sees the old checkpoint or the new
    one, never a half-written one; a kill leaves at most a
    ``.tmp-HOST-PID`` sibling, which :func:`remove_stale` deletes.
    """
    path = os.path.abspath(path.rstrip(os.sep))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp, old = f"{path}.tmp-{_suffix()}", f"{path}.old-{_suffix()}"
    try:
        _write_tree(tmp, tree, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    moved = os.path.exists(path)
    if moved:
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        # Another writer renamed its complete copy in between: keep that one.
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and not os.path.exists(path):
            os.rename(old, path)
        if not exists(path):
            raise
    if moved and os.path.exists(old):
        shutil.rmtree(old)


# Kept for callers of the earlier name; every write is atomic now.
save_tree_atomic = save_tree


def remove_stale(path: str) -> list[str]:
    """Delete ``path``'s ``.tmp-*``/``.old-*`` siblings left by killed writers.

    Call it only while holding the stage's lock (:mod:`hpft_jax.locks`), when
    no other process can be writing them. Returns the removed paths.
    """
    path = os.path.abspath(path.rstrip(os.sep))
    stale = glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(glob.escape(path) + ".old-*")
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def load_tree(path: str, like: Any | None = None) -> tuple[Any, dict]:
    """Read a :func:`save_tree` checkpoint; ``like`` fixes the structure.

    Without ``like`` the tree comes back as saved (used to diagnose a
    mismatch key by key). Missing or corrupt checkpoints raise
    :class:`CheckpointError` naming the path.
    """
    path = os.path.abspath(path)
    if not exists(path):
        raise CheckpointError(
            f"no complete checkpoint at {path} (missing meta.json or tree/); "
            "it may have been interrupted while writing - delete it and rerun")
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        ckptr = ocp.StandardCheckpointer(**_process_local())
        target = os.path.join(path, "tree")
        tree = ckptr.restore(target) if like is None else ckptr.restore(target, _abstract(like))
        ckptr.close()
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types for corrupt data
        raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e
    return tree, meta


class EpochCheckpointer:
    """The latest ``(state, meta)`` of a loop, keyed by epoch (keeps 1)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        local = _process_local()
        if local:  # orbax will not create the root for a subset of processes
            os.makedirs(self.path, exist_ok=True)
        self._mgr = ocp.CheckpointManager(
            self.path, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=not local,
                                                         **local))

    def latest(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, epoch: int, state: Any, meta: dict) -> None:
        self._mgr.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, like: Any) -> tuple[int, Any, dict] | None:
        """``(epoch, state, meta)`` of the latest checkpoint, or None."""
        step = self._mgr.latest_step()
        if step is None:
            return None
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(like)),
                meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(
                f"could not restore {self.path} at epoch {step}: {type(e).__name__}: {e}; "
                "delete that directory to start this stage afresh") from e
        return step, out["state"], out["meta"]

    def close(self, *, delete: bool = False) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
        if delete and os.path.exists(self.path):
            shutil.rmtree(self.path)
