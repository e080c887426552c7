"""What every report shares: seed statistics, markdown tables, figures, files.

Reports are rebuilt from ``metrics*.jsonl`` alone and never train; each one
is a few lines on top of these helpers.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

STD_NOTE = "mean ± std over seeds (population std, ddof = 0)"


def mean_std(xs: Iterable[float | None]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof = 0) of the non-None
    values; ``(nan, nan)`` when there are none."""
    a = np.asarray([x for x in xs if x is not None], dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std())


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plt():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib  # noqa: PLC0415  (matplotlib costs ~0.5 s; only reports need it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot  # noqa: PLC0415

    return pyplot


def save_figure(run, fig, name: str, *, tight: bool = True, dpi: int = 120) -> str:
    """Write ``fig`` to ``run``'s ``figures/name``, close it; returns the path."""
    path = run.figures(name)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt().close(fig)
    return path


def publish(run, filename: str, parts: Sequence[str], figures: Sequence[str] = (),
            *, out=print) -> str:
    """Join markdown ``parts``, list ``figures``, write ``run.path/filename``,
    print it with ``out``; returns the text."""
    text = "\n\n".join(parts)
    if figures:
        text += "\n\n## Figures\n\n" + "\n".join(
            f"- {os.path.relpath(p, run.path)}" for p in figures)
    with open(os.path.join(run.path, filename), "w") as f:
        f.write(text + "\n")
    out(text)
    return text
