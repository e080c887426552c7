"""Progress bars (tqdm) that can be switched off for tests and logs."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "ep"):
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled,
                dynamic_ncols=True, leave=False, file=sys.stderr)
