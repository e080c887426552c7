"""Errors a researcher should see named, not as a stack of XLA frames."""

from __future__ import annotations

import numpy as np


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the last good checkpoint is kept."""


def check_finite(losses, *, stage: str, epoch: int, steps_per_epoch: int,
                 runs: list[str] | None = None) -> None:
    """Raise :class:`NonFiniteLossError` naming the first bad step.

    ``losses``: (num_steps,) or (num_runs, num_steps) per-step losses of one
    epoch; ``runs`` names the runs along the first axis.
    """
    arr = np.asarray(losses)
    if np.isfinite(arr).all():
        return
    arr = arr.reshape(-1, arr.shape[-1])
    bad = []
    for r, row in enumerate(arr):
        idx = np.flatnonzero(~np.isfinite(row))
        if idx.size:
            step = epoch * steps_per_epoch + int(idx[0])
            who = f"{runs[r]}: " if runs else ""
            bad.append(f"{who}step {step} (epoch {epoch}, batch {int(idx[0])}), loss={row[idx[0]]}")
    raise NonFiniteLossError(
        f"{stage}: the loss is not finite at " + "; ".join(bad)
        + ". Lower the learning rate; the last checkpoint was kept.")
