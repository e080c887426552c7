"""Job arrays: which FT runs of a sharded sweep are still missing.

Each ``--shard i/n`` job logs only its own FT runs (``metrics-i-of-n.jsonl``);
pretraining and HP run once under a lock (:mod:`hpft_jax.locks`);
``hpft report`` reads every metrics file, so it merges the shards.
"""

from __future__ import annotations

import dataclasses

from hpft_jax import config as config_lib, prepare
from hpft_jax.runlog import RunDir


def missing(run: RunDir | str) -> list[prepare.RunKey]:
    """The FT runs of the whole sweep (every shard) not yet logged in ``run``;
    empty when ``run`` holds no sweep config (an analysis experiment)."""
    run = RunDir(run) if isinstance(run, str) else run
    try:
        cfg = run.read_config(config_lib.SweepConfig)
    except (FileNotFoundError, TypeError, ValueError, KeyError):
        return []
    done = {(r["variant"], r["seed"], r["tau"]) for r in run.records("ft")}
    full = dataclasses.replace(cfg, shard=(0, 1))
    return [k for k in prepare.plan(full) if tuple(k) not in done]
