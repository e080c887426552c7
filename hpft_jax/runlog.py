"""A run directory: ``config.json``, ``metrics*.jsonl``, ``checkpoints/``, ``figures/``.

Metrics are JSON lines, one event per line, appended and flushed as they
happen, so a killed run keeps everything it logged and ``hpft report`` can
rebuild tables and figures without training. A sharded sweep (``--shard
i/n``) writes ``metrics-i-of-n.jsonl``; readers take every ``metrics*.jsonl``.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Iterator

import numpy as np

from hpft_jax import config as config_lib


def _plain(x: Any) -> Any:
    """JSON-safe copy: numpy/JAX scalars and arrays become Python values."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return _plain(np.asarray(x).tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


class RunDir:
    """Paths and logging for ``runs/<name>/``."""

    def __init__(self, path: str, shard: tuple[int, int] = (0, 1)):
        self.path = os.path.abspath(path)
        i, n = shard
        self.metrics_file = os.path.join(
            self.path, "metrics.jsonl" if n == 1 else f"metrics-{i}-of-{n}.jsonl")

    # -- layout
    @property
    def config_file(self) -> str:
        return os.path.join(self.path, "config.json")

    def checkpoints(self, *parts: str) -> str:
        return os.path.join(self.path, "checkpoints", *parts)

    def figures(self, name: str = "") -> str:
        d = os.path.join(self.path, "figures")
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, name) if name else d

    # -- config
    def write_config(self, cfg: Any, *, resume: bool = True) -> None:
        """Write ``config.json``; an existing one must hold the same config.

        Everything but ``shard`` must agree, so a killed run is continued
        only with the settings it started with.
        """
        os.makedirs(self.path, exist_ok=True)
        new = config_lib.to_dict(cfg)
        if os.path.exists(self.config_file):
            with open(self.config_file) as f:
                old = json.load(f)
            if isinstance(old.get("model"), dict):  # written before ModelConfig.conv existed
                old["model"].setdefault("conv", "auto")
            a = {k: v for k, v in old.items() if k != "shard"}
            b = {k: v for k, v in new.items() if k != "shard"}
            if a != b:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise ValueError(
                    f"{self.path} holds a run with a different config (differs in "
                    f"{diff}); choose another --name or delete the directory")
            if not resume:
                raise ValueError(f"{self.path} exists; pass --resume to continue it")
            return
        tmp = f"{self.config_file}.tmp-{os.getpid()}"  # concurrent shards write it too
        with open(tmp, "w") as f:
            f.write(config_lib.dumps(cfg))
        os.replace(tmp, self.config_file)

    def read_config(self, cls) -> Any:
        if not os.path.exists(self.config_file):
            raise FileNotFoundError(f"no config.json in {self.path}: not a run directory")
        with open(self.config_file) as f:
            return config_lib.from_dict(cls, json.load(f))

    # -- metrics
    def log(self, event: str, **fields: Any) -> dict:
        rec = {"event": event, **_plain(fields)}
        os.makedirs(self.path, exist_ok=True)
        with open(self.metrics_file, "a") as f:
            # A writer killed mid-line left a torn last line: start a new
            # line, or this record would be glued to it and lost as well.
            torn = f.tell() > 0 and not _ends_with_newline(self.metrics_file)
            f.write(("\n" if torn else "") + json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return rec

    def records(self, event: str | None = None) -> Iterator[dict]:
        """All records of every ``metrics*.jsonl`` (a torn last line is skipped)."""
        for fn in sorted(glob.glob(os.path.join(self.path, "metrics*.jsonl"))):
            with open(fn) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a write cut off by a kill
                    if event is None or rec.get("event") == event:
                        yield rec


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
