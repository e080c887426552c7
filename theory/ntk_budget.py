"""eNTK traces, full blocks and drift under a memory budget, by output chunks.

Per-sample factors (:mod:`theory.ntk_factors`) grow as n·h·(bytes per
sample and output unit); for ResNet18 at h = 512 that is ~0.85 GB per
sample, so 50 probes do not fit. Every quantity here is a sum over output
units, so the factors are made for ``k`` outputs at a time (the backward
passes pull back rows of the identity):

* traces: Σ_c κ[i, j, c, c] splits over output chunks C; each backward pass
  runs exactly once, and only one chunk's factors (n·k units) are held.
* full blocks / drift: κ[:, :, C, D] needs chunks C and D. A panel C of k
  outputs is held; stream chunks D of s outputs (s divides k) after it are
  recomputed. Factor passes per parameter set ≈ 1 + (h/k − 1)/2.

Drift accumulates, per probe pair, the squared Frobenius norms of κ_t,
κ_next and κ_next − κ_t over the (C, D) blocks, using κ_ij[D, C] =
κ_ji[C, D]ᵀ for the blocks below the diagonal; nothing of size N²h² is held.

The sample axis is tiled (``tile`` samples per side) inside every
contraction, so position Grams are at most tile²·P² floats.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from theory import ntk_contract
from theory.ntk_factors import Factors, Plan, batch_factors, identity_patches

# Python + JAX + XLA + the compiled program's code and constants, beside
# XLA's buffers: ~0.3 GB for small programs, but 0.55-0.73 GB after
# compiling the ResNet18 50-probe trace program (whose RSS then rose by
# exactly XLA's temporaries + arguments: 8.11 GB where 350 MiB had been
# assumed and 8 GB was the budget).
RUNTIME_BYTES = 768 * 2**20
# Small buffers of the compiled program that the formulas below leave out
# (arguments, identity rows, loop counters, small copies); see
# tests/test_ntk_conv.py::test_estimate_bounds_xla_buffers.
PROGRAM_BYTES = 4 * 2**20
# Held factors are counted twice: ResNet18 traces (10 probes, k = 112) peaked
# at ~9.6 GB where one copy was estimated at 5.6 GiB (lax.map's stacked output
# and XLA's temporaries around it). Not yet profiled further.
HELD_COPIES = 2
# Drift in output chunks holds a third: ResNet18, 50 probes, k = 15, s = 3
# compiled to 7.27 GiB of XLA temporaries where two copies estimated 6.95.
DRIFT_HELD_COPIES = 3


# --------------------------------------------------------------------------
# Sizes


def unit_bytes(plan: Plan, itemsize: int = 4) -> dict:
    """Bytes of a plan's factors: per (sample, output unit), per sample (A),
    and the backward pass's transient per (sample, output unit)."""
    unit = sum(l.n_pos * l.features if l.form == "gram" else l.fan_in * l.features
               for l in plan.layers)
    unit += sum(plan.leaf_sizes[k] for k in plan.fallback)
    fixed = sum(l.n_pos * l.fan_in for l in plan.layers if l.form == "gram")
    acts = sum(l.n_pos * l.features for l in plan.layers)
    # cotangents of every layer's input and output and the ReLU masks, plus
    # the jac forms' einsum output and its reshape; calibrated on the small
    # CNN benchmark (peak RSS 5.5 GB where 2·acts + jac estimated 4.5 GB)
    # (+ one unit row: J is concatenated from the per-layer Jacobians)
    trans = 3 * acts + 2 * sum(l.fan_in * l.features for l in plan.layers
                               if l.form == "jac") + unit
    # a conv whose patches are not slices (input dilation, circular padding)
    # gets them from a conv with an identity kernel, a K_in² constant of the
    # program (all ResNet18 convs did: ~0.36 GB at full width)
    eyes = sum((l.fan_in - (l.bias is not None)) ** 2 for l in plan.layers
               if identity_patches(l))
    return {"unit": unit * itemsize, "sample": fixed * itemsize,
            "program": eyes * itemsize,
            "transient_unit": trans * itemsize,
            "forward_sample": 3 * sum(l.n_pos * max(l.fan_in, l.features)
                                      for l in plan.layers) * itemsize}


def contract_bytes(plan: Plan, t: int, k1: int, k2: int, *, kind: str,
                   itemsize: int = 4) -> int:
    """Transient bytes of one t × t sample-tile contraction
    (:func:`theory.ntk_contract.pair_block`) with k1 and k2 outputs per side.

    Layers are contracted one after another, so the largest gram-form layer
    counts: its position Gram M (t², P²), the product with the cotangents
    (t², P²) for traces or (t², P, k2, c_out) for blocks, and transposed G
    tiles; plus the block accumulators (drift: κ_t, κ_next, their difference
    and squares).
    """
    peak = 0
    for l in plan.layers:
        if l.form != "gram" or l.n_pos == 1:
            continue
        P, c = l.n_pos, l.features
        prod = P * P if kind == "trace" else P * k2 * c
        peak = max(peak, t * t * (P * P + prod) + t * (k1 + k2) * P * c)
    acc = t * t * (1 if kind == "trace" else k1 * k2)
    return int((peak + (5 if kind == "drift" else 2) * acc) * itemsize)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How a computation is chunked (static).

    mode: "stored" (all n·h factors held, tiles over sample pairs) or
    "outputs" (output panels of ``k`` units, stream chunks of ``s``).
    hp: h padded to a multiple of k. sample_chunk: samples per vmapped
    backward batch. tile: samples per side of a contraction tile.
    passes: factor passes per parameter set. est_bytes: the estimate of peak.
    """

    mode: str
    k: int
    s: int
    hp: int
    sample_chunk: int | None
    tile: int
    passes: float
    est_bytes: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def schedule(plan: Plan, n: int, *, kind: str, memory_budget: int | None,
             sets: int = 1, chunk_size: int | None = None, tile: int | None = None,
             cap_unit_bytes: int | None = None, itemsize: int = 4) -> Schedule:
    """Pick output and sample chunks for ``kind`` in {"trace", "full", "drift"}.

    ``sets``: factor sets held per output unit (2 for x1 ≠ x2 or for drift's
    two parameter sets). ``cap_unit_bytes``: trace mode never holds more
    factor bytes than this many per sample (full mode's factors).
    """
    h = plan.h
    u = unit_bytes(plan, itemsize)
    t = tile or n
    out_bytes = {"trace": n * n, "full": n * n * h * h, "drift": 3 * n * n}[kind] * itemsize
    stored = sets * n * (h * u["unit"] + u["sample"])
    cap_ok = cap_unit_bytes is None or h * u["unit"] <= cap_unit_bytes
    trans = lambda sc, k: sc * (k * u["transient_unit"] + u["forward_sample"])  # noqa: E731
    con = lambda t, k, s: (PROGRAM_BYTES + u["program"]  # noqa: E731
                           + contract_bytes(plan, t, k, s, kind=kind, itemsize=itemsize))
    if memory_budget is None:
        if cap_ok:
            return Schedule("stored", h, h, h, chunk_size, t, 1.0, RUNTIME_BYTES
                            + stored + out_bytes + trans(chunk_size or n, h) + con(t, h, h))
        k = max(1, min(h, cap_unit_bytes // u["unit"]))
        sched = _outputs(kind, k, k, h, chunk_size, t, n, sets, u, out_bytes)
        return dataclasses.replace(sched, est_bytes=sched.est_bytes
                                   + trans(chunk_size or n, k) + con(t, k, k))
    avail = memory_budget - RUNTIME_BYTES - out_bytes
    fixed = sets * n * u["sample"]
    per_unit = HELD_COPIES * sets * n * u["unit"]
    per_stream = (DRIFT_HELD_COPIES if kind == "drift" else HELD_COPIES) * sets * n * u["unit"]
    top = h if cap_ok else max(1, min(h, cap_unit_bytes // u["unit"]))
    # The most outputs held at once whose factors plus one backward batch fit.
    for units in range(top, 0, -1):
        stored = units == h
        if stored or kind == "trace":
            k = s = units
            held = k
        else:
            if units < 2:
                break
            s = max(1, units // 5)
            k = min(max(1, (units - s) // s) * s, h)
            held = k + s
        tt = t   # outputs: the largest sample tile whose contraction fits beside the factors
        pu = per_stream if not stored else per_unit
        room = avail - fixed - held * pu
        while not stored and tt > 1 and room - con(tt, k, s) < trans(1, k):
            tt = max(1, tt // 2)
        rest = avail - fixed - held * pu - con(tt, k, s)
        sc = min(n, chunk_size or n, int(rest // max(trans(1, k), 1)))
        if sc < 1 or rest < trans(sc, k):
            continue
        est = int(RUNTIME_BYTES + out_bytes + fixed + held * pu + trans(sc, k)
                  + con(tt, k, s))
        if stored:
            return Schedule("stored", h, h, h, sc, tt, 1.0, est)
        return dataclasses.replace(_outputs(kind, k, s, h, sc, tt, n, sets, u, out_bytes),
                                   est_bytes=est)
    need = RUNTIME_BYTES + out_bytes + fixed + 2 * per_stream + trans(1, 1) + con(1, 1, 1)
    raise ValueError(f"memory_budget={memory_budget} B is too small for "
                     f"{kind} here; need at least ~{int(need)} B")


def _outputs(kind, k, s, h, sc, t, n, sets, u, out_bytes) -> Schedule:
    if s > k or k % s:
        s = math.gcd(k, s)
    if kind == "trace":   # same chunk count, fewest padded rows (h = 128, k = 53: 43)
        k = s = -(-h // -(-h // k))
    nc = -(-h // k)
    hp = nc * k
    passes = 1.0   # traces: each output's backward pass runs once
    if kind != "trace":   # panels once, plus the stream after each panel
        passes = 1.0 + sum(hp - (a + 1) * k for a in range(nc)) / hp
    est = RUNTIME_BYTES + out_bytes + sets * n * (u["sample"] + (k + s) * u["unit"])
    return Schedule("outputs", k, s, hp, sc, t, passes, est)


# --------------------------------------------------------------------------
# Chunked computations (call inside jit)


def _rows(h: int, hp: int, start, m: int, dtype):
    """Rows start..start+m of the (hp, h) identity padded with zero rows."""
    eye = jnp.eye(hp, h, dtype=dtype)
    return jax.lax.dynamic_slice_in_dim(eye, start, m, axis=0)


def _facs(plan, f, params, x, rows, sc) -> Factors:
    return batch_factors(plan, f, params, x, chunk_size=sc, out_chunk_size=None, rows=rows)


def traces(plan: Plan, f, params, x1, x2, sched: Schedule, dtype) -> jax.Array:
    """Σ_c κ[i, j, c, c]: (n1, n2), one output chunk of k at a time."""
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    k, nc = sched.k, sched.hp // sched.k
    tile = None if sched.tile >= max(n1, n2) else sched.tile

    def body(a, acc):
        rows = _rows(plan.h, sched.hp, a * k, k, dtype)
        f1 = _facs(plan, f, params, x1, rows, sched.sample_chunk)
        f2 = None if x2 is None else _facs(plan, f, params, x2, rows, sched.sample_chunk)
        return acc + ntk_contract.kernel(f1, f2, trace=True, chunk_size=tile)

    return jax.lax.fori_loop(0, nc, body, jnp.zeros((n1, n2), dtype))


def _sq_blocks(ct: Factors, dt: Factors, cn: Factors, dn: Factors, t: int) -> jax.Array:
    """Σ_{c∈C, d∈D} of κ_t², κ_n² and (κ_n − κ_t)² per pair: (3, n, n).

    Each t × t sample tile forms the two blocks once and subtracts them.
    """
    n = ct.shape[0]
    nb = -(-n // t)
    pad = lambda fac: ntk_contract._pad(fac, nb * t)  # noqa: E731
    ct, dt, cn, dn = pad(ct), pad(dt), pad(cn), pad(dn)
    ii, jj = np.divmod(np.arange(nb * nb), nb)

    def one(ij):
        blk = lambda a, b: ntk_contract.pair_block(  # noqa: E731
            ntk_contract._take(a, ij[0], t), ntk_contract._take(b, ij[1], t),
            trace=False, layout="icjd")
        kt, kn = blk(ct, dt), blk(cn, dn)
        sq = lambda k: jnp.sum(k * k, axis=(1, 3))  # noqa: E731
        return jnp.stack([sq(kt), sq(kn), sq(kn - kt)])

    tiles = jax.lax.map(one, (jnp.asarray(ii, jnp.int32), jnp.asarray(jj, jnp.int32)))
    out = tiles.reshape(nb, nb, 3, t, t).transpose(2, 0, 3, 1, 4)
    return out.reshape(3, nb * t, nb * t)[:, :n, :n]


def drift(plan: Plan, f, pt, pn, x, sched: Schedule, dtype, *, f_next=None) -> dict:
    """k_norm, k_norm_next, k_gap (means over the n² pairs of Frobenius norms),
    from output panels of k and stream chunks of s, recomputed as needed.

    ``f`` evaluates ``pt``; ``f_next`` (default ``f``) evaluates ``pn``, e.g.
    the same backbone with the BatchNorm statistics of the next state."""
    fn_ = f if f_next is None else f_next
    n = x.shape[0]
    k, s, hp = sched.k, sched.s, sched.hp
    nc, r = hp // k, k // s
    t = min(sched.tile, n)

    def sq3(ct, cn, dt, dn):
        return _sq_blocks(ct, dt, cn, dn, t)

    def panel(a, acc):
        rows_c = _rows(plan.h, hp, a * k, k, dtype)
        ct = _facs(plan, f, pt, x, rows_c, sched.sample_chunk)
        cn = _facs(plan, fn_, pn, x, rows_c, sched.sample_chunk)
        acc = acc + sq3(ct, cn, ct, cn)

        def stream(b, acc):
            rows_d = _rows(plan.h, hp, b * s, s, dtype)
            dt = _facs(plan, f, pt, x, rows_d, sched.sample_chunk)
            dn = _facs(plan, fn_, pn, x, rows_d, sched.sample_chunk)
            m = sq3(ct, cn, dt, dn)
            return acc + m + jnp.swapaxes(m, 1, 2)

        return jax.lax.fori_loop((a + 1) * r, nc * r, stream, acc)

    acc = jax.lax.fori_loop(0, nc, panel, jnp.zeros((3, n, n), dtype))
    means = jnp.mean(jnp.sqrt(acc), axis=(1, 2))
    return {"k_norm": means[0], "k_norm_next": means[1], "k_gap": means[2]}


def kernel(plan: Plan, f, params, x1, x2, sched: Schedule, dtype) -> jax.Array:
    """Full κ (n1, n2, h, h) from output panels and stream chunks."""
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    k, s, hp, h = sched.k, sched.s, sched.hp, plan.h
    nc, r = hp // k, k // s
    tile = None if sched.tile >= max(n1, n2) else sched.tile
    sc = sched.sample_chunk

    def both(rows):
        a = _facs(plan, f, params, x1, rows, sc)
        return a, (a if x2 is None else _facs(plan, f, params, x2, rows, sc))

    def put(out, blk, c0, d0):
        idx = tuple(jnp.asarray(i, jnp.int32) for i in (0, 0, c0, d0))
        return jax.lax.dynamic_update_slice(out, blk, idx)

    def panel(a, out):
        c1, c2 = both(_rows(h, hp, a * k, k, dtype))
        out = put(out, ntk_contract.kernel(c1, None if x2 is None else c2, trace=False,
                                           chunk_size=tile), a * k, a * k)

        def stream(b, out):
            d1, d2 = both(_rows(h, hp, b * s, s, dtype))
            cd = ntk_contract.kernel(c1, d2, trace=False, chunk_size=tile)
            dc = (jnp.transpose(cd, (1, 0, 3, 2)) if x2 is None
                  else ntk_contract.kernel(d1, c2, trace=False, chunk_size=tile))
            return put(put(out, cd, a * k, b * s), dc, b * s, a * k)

        return jax.lax.fori_loop((a + 1) * r, nc * r, stream, out)

    out = jax.lax.fori_loop(0, nc, panel, jnp.zeros((n1, n2, hp, hp), dtype))
    return out[:, :, :h, :h]
