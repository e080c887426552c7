"""Run-once stages for job arrays: a lock file that waiting shards respect.

``--shard i/n`` jobs of one sweep share the pretrained backbone and the HP
snapshots. Each such stage is guarded by ``<checkpoint>.lock``: the first
shard to take the lock checks whether the checkpoint exists, computes and
writes it (atomically, :func:`hpft_jax.checkpoint.save_tree`) and releases
the lock; the others wait on the lock, then find the checkpoint and read it.

The lock is ``filelock``'s ``fcntl.flock`` lock: the kernel releases it when
its holder dies, so a killed shard never leaves the others waiting, and the
next one to take it redoes the stage (checkpoints are never half-written).
On a shared file system the lock needs working ``flock`` (NFSv4, Lustre with
``-o flock``, GPFS); where it does not work, run the stages first, once
(``hpft pretrain``, then one shard), and start the array after.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

import filelock


@contextlib.contextmanager
def stage(path: str, what: str, *, progress: bool = True,
          timeout: float | None = None) -> Iterator[None]:
    """Hold ``path + '.lock'`` for the duration of the block.

    ``what`` names the stage in the message printed while waiting;
    ``timeout`` (seconds, None: wait as long as the holder runs) raises
    ``TimeoutError`` naming the lock file.
    """
    lock_file = os.path.abspath(path.rstrip(os.sep)) + ".lock"
    os.makedirs(os.path.dirname(lock_file), exist_ok=True)
    lock = filelock.FileLock(lock_file)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if progress:
            print(f"waiting for another process's {what} (lock {lock_file})", file=sys.stderr)
        t0 = time.monotonic()
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except filelock.Timeout:
            raise TimeoutError(f"{what}: another process held {lock_file} for more than "
                               f"{timeout:g} s") from None
        if progress:
            print(f"{what}: lock taken after {time.monotonic() - t0:.0f} s", file=sys.stderr)
    try:
        yield
    finally:
        lock.release()
