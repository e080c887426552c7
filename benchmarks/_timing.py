"""Timing and FLOP helpers shared by the benchmark scripts (child side)."""

from __future__ import annotations

import time


def timed(fn, reps: int, warmup: int = 0, budget_s: float | None = None):
    """(output, timings) for ``fn()``: the first call, ``warmup`` more, then
    up to ``reps`` timed calls (stopping early once their total passes
    ``budget_s``). Timings: ``first_s``, ``median_s`` (the first call's time
    when ``reps`` is 0), ``compile_s`` = first − median, ``runs_s``.
    The output is the last call's.
    """
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn())
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
        if budget_s is not None and sum(runs) > budget_s:
            break
    runs.sort()
    med = runs[len(runs) // 2] if runs else first
    return out, {"first_s": first, "compile_s": max(first - med, 0.0), "median_s": med,
                 "runs_s": runs}


def flops(lowered_or_compiled) -> float:
    """XLA's FLOP count of a lowered or compiled program (NaN if absent)."""
    ca = lowered_or_compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", float("nan")))
