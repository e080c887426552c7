"""Progress: tqdm bars on a terminal, one line per stage in a log file.

A bar redrawn with ``\\r`` is noise in a file that is not a terminal (a job
array's log); there each stage prints one line when it ends, with its wall
time and the bar's last postfix.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class StageLine:
    """The subset of tqdm's interface the library uses, printing one line at ``close``."""

    def __init__(self, total: int, desc: str, unit: str, stream):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.n, self.postfix, self.t0, self.closed = 0, {}, time.perf_counter(), False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kwargs) -> None:
        self.postfix = kwargs

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} in "
              f"{time.perf_counter() - self.t0:.1f} s{extra}", file=self.stream, flush=True)


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "ep", stream=None):
    """A progress bar for ``total`` units, or a :class:`StageLine` when
    ``stream`` (default stderr) is not a terminal; silent when not ``enabled``."""
    stream = sys.stderr if stream is None else stream
    if enabled and not stream.isatty():
        return StageLine(total, desc, unit, stream)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled,
                dynamic_ncols=True, leave=False, file=stream)
