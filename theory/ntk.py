"""Empirical NTK of a feature map and its drift during finetuning.

Eq. 2 of the paper (Appendix A) writes the one-step change of the features
z_j = f(x_j; B) through the backbone's empirical NTK

    κ_t(x_j, x_n) = ∇_B z_j ∇_B z_nᵀ ∈ R^{h×h},

and Fig. 6 (Appendix A) checks that it changes slowly during FT by tracking,
over 50 probe inputs (2,500 pairs), k_norm = mean ‖κ_t‖_F and
k_gap = mean ‖κ_{t+1} − κ_t‖_F.

``f(params, x) -> (n, h)`` is the single model convention (as in
neural-tangents); for a backbone from :mod:`hpft_jax.models`, take the NTK of
the backbone params only, in eval mode::

    f = lambda p, x: backbone.apply({"params": p, "batch_stats": bs}, x, train=False)

Methods (all exact; they differ in cost):

* ``"structured"``: per-layer factors (see :mod:`theory.ntk_factors`). Dense
  layers give κ_l = (A Aᵀ + 1) ⊙ (G Gᵀ); Conv layers go through their patch
  Gram matrices or, where cheaper, an explicit per-layer Jacobian; other leaves
  through an explicit per-sample Jacobian.
* ``"vjp_jvp"``: per-sample VJPs, then batched JVPs (NTK-vector products);
  little memory, any ``f``.
* ``"jacobian"``: per-sample ``jax.jacrev`` and an explicit J₁J₂ᵀ; the
  reference, and the slowest (n·h·P floats of Jacobian; no chunking).
* ``"auto"``: ``"structured"`` when layer rules cover at least half of the
  parameters, otherwise ``"vjp_jvp"``.

Per-sample maps assume examples are independent: true for eval-mode BatchNorm,
false in train mode.

Where the paper and the numbers differ: footnote 2 gives κ = x_jᵀx_n·I for
z = Bx, which holds without a bias; with a bias (Flax's default) it is
(x_jᵀx_n + 1)·I. The derivation's Eq. 9 writes ∇_b z^(0) (∇_b z^(0))ᵀ where
Eq. 10 needs ∇_b z^(0) (∇_b z^(n))ᵀ.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from theory import ntk_budget, ntk_contract, ntk_cost, ntk_factors
from theory.ntk_factors import Factors, chunked_map

METHODS = ("auto", "structured", "vjp_jvp", "jacobian")
_HI = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------
# Input checks (host side, before jit)


def _check_int(name, value, *, allow_none=True):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int or None; got {value!r}")


def _check_conv(conv) -> None:
    if conv is not None and not callable(conv):
        raise TypeError(f"conv must be None or a drop-in for lax.conv_general_dilated; "
                        f"got {type(conv).__name__}")


def _check_options(f, trace, chunk_size, out_chunk_size, method, matmul_precision):
    if not callable(f):
        raise ValueError(f"f must be callable f(params, x) -> (n, h); got {type(f)}")
    if not isinstance(trace, bool):
        raise ValueError(f"trace must be a bool; got {trace!r}")
    _check_int("chunk_size", chunk_size)
    _check_int("out_chunk_size", out_chunk_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if matmul_precision is not None and not isinstance(matmul_precision, str):
        raise ValueError(f"matmul_precision must be a str or None; got {matmul_precision!r}")


def _check_x(name, x, like=None):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array; got {type(x)}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a leading sample axis with n >= 1; "
                         f"got shape {x.shape}")
    if like is not None and (x.shape[1:] != like.shape[1:] or x.dtype != like.dtype):
        raise ValueError(f"{name} must match x1 in per-sample shape and dtype: "
                         f"{x.shape[1:]} {x.dtype} vs {like.shape[1:]} {like.dtype}")
    if jnp.issubdtype(x.dtype, jnp.inexact) and not isinstance(x, jax.core.Tracer):
        if not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError(f"{name} contains NaN or inf")


def _check_params(params):
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params has no array leaves")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ValueError(f"params must hold floating arrays only; found dtype "
                             f"{jnp.result_type(leaf)}")


def _out_dim(f, params, x) -> int:
    z = jax.eval_shape(f, params, x)
    if not hasattr(z, "shape") or len(z.shape) != 2 or z.shape[0] != x.shape[0]:
        raise ValueError(f"f must return (n, h) features for x of shape {x.shape}; "
                         f"got {getattr(z, 'shape', type(z))}")
    return int(z.shape[1])


# --------------------------------------------------------------------------
# Methods


def _single(f):
    return lambda p, xi: f(p, xi[None])[0]


def _ntk_jacobian(f, params, x1, x2, *, trace):
    """Reference: explicit per-sample Jacobians (n, h, P) and J₁J₂ᵀ."""
    def jac(x):
        tree = jax.vmap(jax.jacrev(_single(f)), in_axes=(None, 0))(params, x)
        n, h = x.shape[0], _out_dim(f, params, x)
        return jnp.concatenate([t.reshape(n, h, -1)
                                for t in jax.tree_util.tree_leaves(tree)], axis=2)
    j1 = jac(x1)
    j2 = j1 if x2 is None else jac(x2)
    spec = "icp,jcp->ij" if trace else "icp,jdp->ijcd"
    return jnp.einsum(spec, j1, j2, precision=_HI)


def _ntk_vjp_jvp(f, params, x1, x2, *, trace, chunk_size, out_chunk_size):
    """NTK-vector products: for each x2 sample and output d, one VJP gives
    ∇_θ z_j[d]; one JVP over all of x1 (linearised once) gives κ[:, j, :, d]."""
    x2 = x1 if x2 is None else x2
    z1, jvp1 = jax.linearize(lambda p: f(p, x1), params)
    h = z1.shape[1]
    basis = jnp.eye(h, dtype=z1.dtype)

    def column(xj):                                      # -> (h_d, n1, h_c)
        _, vjp = jax.vjp(lambda p: _single(f)(p, xj), params)
        return chunked_map(lambda e: jvp1(vjp(e)[0]), basis, out_chunk_size)

    cols = chunked_map(column, x2, chunk_size or 1)            # (n2, d, n1, c)
    if trace:
        return jnp.diagonal(cols, axis1=1, axis2=3).sum(-1).T
    return jnp.transpose(cols, (2, 0, 3, 1))


def _structured_factors(f, params, x, plan, *, chunk_size, out_chunk_size) -> Factors:
    return ntk_factors.batch_factors(plan, f, params, x, chunk_size=chunk_size,
                                     out_chunk_size=out_chunk_size)


def auto_tile(n: int) -> int:
    """Tile size for full blocks when chunk_size is None: about 8 samples.

    Measured on the toy MLP (N = 50, h = 128): symmetric tiles of 5-10
    samples cost ~0.6x the CPU time of one 50x50 block (half the pairs, and
    the tile stays in cache); sizes that divide n avoid padded work.
    """
    if n <= 12:
        return n
    return min(range(5, 13), key=lambda t: (-(-n // t) * t, abs(t - 8)))


def _plan(f, params, x, *, trace=False, forms=None, conv=None):
    plan = ntk_factors.discover(f, params, x[0], n_samples=x.shape[0], trace=trace,
                                forms=forms)
    ntk_factors.check_forms(forms, plan)
    return plan if conv is None else dataclasses.replace(plan, conv=conv)


def _schedule(f, params, x1, x2, plan, *, kind, trace, forms, memory_budget,
              chunk_size, tile):
    """:class:`theory.ntk_budget.Schedule` for this call; in trace mode the
    factors held never exceed full mode's (per sample, all h outputs)."""
    cap = None
    itemsize = jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype).itemsize
    if trace:
        full = _plan(f, params, x1, trace=False, forms=forms)
        cap = plan.h * ntk_budget.unit_bytes(full, itemsize)["unit"]
    sets = 1 if (x2 is None and kind != "drift") else 2
    return ntk_budget.schedule(plan, x1.shape[0], kind=kind, memory_budget=memory_budget,
                               sets=sets, chunk_size=chunk_size, tile=tile,
                               cap_unit_bytes=cap, itemsize=itemsize)


def describe(plan, sched, n: int, *, trace: bool) -> dict:
    """What the cost model chose: per layer its shapes, form and the
    multiply-adds of both forms; totals; and the chunk schedule."""
    layers = []
    for l in plan.layers:
        fl = ntk_cost.layer_flops(l.n_pos, l.fan_in, l.features, plan.h, n, trace=trace)
        layers.append({"path": "/".join(l.path), "kind": l.kind, "P": l.n_pos,
                       "K": l.fan_in, "c_out": l.features, "form": l.form,
                       "macs": fl, "unit_bytes": 4 * (l.n_pos * l.features if l.form
                                                      == "gram" else l.fan_in * l.features)})
    fb = int(sum(plan.leaf_sizes[k] for k in plan.fallback))
    tot = ntk_cost.model_costs([(l.n_pos, l.fan_in, l.features, l.form)
                                for l in plan.layers], fb, plan.h, n, trace=trace)
    return {"h": plan.h, "n": n, "trace": trace, "layers": layers,
            "fallback_params": fb, "totals": tot, "schedule": sched.as_dict()}


def explain(report: dict) -> str:
    """A short table of :func:`describe`'s report."""
    sch, tot = report["schedule"], report["totals"]
    out = [f"eNTK plan: n={report['n']} h={report['h']} "
           f"{'traces' if report['trace'] else 'full blocks'}; schedule {sch['mode']} "
           f"(output panel k={sch['k']}, stream s={sch['s']}, sample chunk "
           f"{sch['sample_chunk']}, tile {sch['tile']}, factor passes "
           f"{sch['passes']:.2f}, est. peak {sch['est_bytes'] / 2**30:.2f} GiB)"]
    for l in report["layers"]:
        m = l["macs"]
        out.append(f"  {l['path']:<28} {l['kind']:<5} P={l['P']:<5} K={l['K']:<5} "
                   f"c_out={l['c_out']:<4} -> {l['form']:<4} (gram {m['gram']:.3g}, "
                   f"jac {m['jac']:.3g} MAC)")
    out.append(f"  explicit-Jacobian leaves: {report['fallback_params']} params")
    out.append(f"  structured {tot['structured_macs']:.3g} MAC (backward passes "
               f"{tot['factor_macs']:.3g}, contraction {tot['contract_macs']:.3g}); "
               f"vjp_jvp {tot['vjp_jvp_macs']:.3g} MAC")
    return "\n".join(out)


# --------------------------------------------------------------------------
# Public API


def empirical_ntk_fn(f: Callable, *, trace: bool = False, chunk_size: int | None = None,
                     out_chunk_size: int | None = None, method: str = "auto",
                     matmul_precision: str | None = "highest", forms=None,
                     memory_budget: int | None = None, conv: Callable | None = None
                     ) -> Callable:
    """Jitted ``ntk(params, x1, x2=None)`` for ``f(params, x) -> (n, h)``.

    Returns κ(x1_i, x2_j) = ∇_θ z_i ∇_θ z_jᵀ stacked as (n1, n2, h, h), or with
    ``trace=True`` its true trace Σ_c κ[i, j, c, c] (n1, n2) (not the mean,
    which neural-tangents' ``trace_axes`` returns). ``x2=None`` means x1 and
    lets the structured method compute only the tiles i ≤ j.

    chunk_size: samples per tile and per vmapped batch; bounds peak memory.
      None picks per method: ``"structured"`` computes factors for all
      samples at once and contracts full blocks in tiles of
      :func:`auto_tile` samples (traces in one block); ``"vjp_jvp"`` takes
      one x2 sample at a time (each holds h parameter-sized cotangents);
      ``"jacobian"`` does everything at once.
    out_chunk_size: output dims per batch of backward passes (None: all h).
    matmul_precision: traced under ``jax.default_matmul_precision`` (default
      "highest", so GPUs do not drop float32 matmuls to TF32); None leaves
      JAX's default.
    forms: override the cost model's per-layer form ("gram" / "jac" for all
      layers, or {layer path: form}); see :mod:`theory.ntk_cost`.
    memory_budget: bytes for the whole process (structured method). Factors
      that do not fit are made for output chunks and recomputed
      (:mod:`theory.ntk_budget`). In trace mode the held factors never
      exceed full mode's, budget or not.
    conv: a drop-in for ``lax.conv_general_dilated`` that the structured
      method's backward passes use in rule-covered ``nn.Conv`` calls (None:
      the module's own), e.g. ``hpft_jax.convs.for_ntk("auto")``: GEMM
      gradients for stride-1 convs on CPU, with which ResNet18's backward
      passes ran 2.8x faster here (benchmarks/RESULTS.md). Same values to
      float tolerance.

    ``ntk.plan(params, x1, x2=None)`` returns the choices as a dict and
    ``ntk.explain(...)`` as text.
    """
    _check_options(f, trace, chunk_size, out_chunk_size, method, matmul_precision)
    _check_int("memory_budget", memory_budget)
    _check_conv(conv)

    def core(params, x1, x2):
        with _precision(matmul_precision):
            _out_dim(f, params, x1)
            m = method
            if m in ("auto", "structured"):
                plan = _plan(f, params, x1, trace=trace, forms=forms, conv=conv)
                if m == "auto" and plan.rule_fraction < 0.5:
                    m = "vjp_jvp"
            if m == "jacobian":
                return _ntk_jacobian(f, params, x1, x2, trace=trace)
            if m == "vjp_jvp":
                return _ntk_vjp_jvp(f, params, x1, x2, trace=trace,
                                    chunk_size=chunk_size, out_chunk_size=out_chunk_size)
            sched = structured_schedule(params, x1, x2, plan)
            if sched.mode == "outputs":
                run = ntk_budget.traces if trace else ntk_budget.kernel
                return run(plan, f, params, x1, x2, sched, _dtype(params))
            kw = dict(chunk_size=sched.sample_chunk, out_chunk_size=out_chunk_size)
            f1 = _structured_factors(f, params, x1, plan, **kw)
            f2 = None if x2 is None else _structured_factors(f, params, x2, plan, **kw)
            tile = chunk_size
            if tile is None and not trace:
                tile = auto_tile(max(x1.shape[0], 0 if x2 is None else x2.shape[0]))
            return ntk_contract.kernel(f1, f2, trace=trace, chunk_size=tile)

    def structured_schedule(params, x1, x2, plan):
        n = max(x1.shape[0], 0 if x2 is None else x2.shape[0])
        # what core() contracts with: stored traces take one block
        tile = chunk_size if chunk_size is not None else (n if trace else auto_tile(n))
        return _schedule(f, params, x1, x2, plan, kind="trace" if trace else "full",
                         trace=trace, forms=forms, memory_budget=memory_budget,
                         chunk_size=chunk_size, tile=tile)

    def report(params, x1, x2=None):
        with _precision(matmul_precision):
            plan = _plan(f, params, x1, trace=trace, forms=forms, conv=conv)
            return describe(plan, structured_schedule(params, x1, x2, plan), x1.shape[0],
                            trace=trace)

    core_jit = jax.jit(core)

    def ntk(params, x1, x2=None):
        _check_params(params)
        _check_x("x1", x1)
        if x2 is not None:
            _check_x("x2", x2, like=x1)
        return core_jit(params, x1, x2)

    ntk.method = method
    ntk.plan = report
    ntk.explain = lambda params, x1, x2=None: explain(report(params, x1, x2))
    ntk.lower = lambda params, x1, x2=None: core_jit.lower(params, x1, x2)  # AOT / cost
    return ntk


def _dtype(params):
    return jax.tree_util.tree_leaves(params)[0].dtype


def _precision(p):
    return contextlib.nullcontext() if p is None else jax.default_matmul_precision(p)


@dataclasses.dataclass(frozen=True)
class NTKDrift:
    """eNTK drift on a fixed probe set (Fig. 6), from per-sample factors.

    ``drift(params_t, params_next, state_t=None, state_next=None) ->
    {"k_norm", "k_norm_next", "k_gap"}`` (scalars: means over the N² probe
    pairs of ‖κ_t‖_F, ‖κ_next‖_F and ‖κ_next − κ_t‖_F). ``state`` is an
    extra input of ``f`` that is not differentiated (BatchNorm statistics):
    with it, ``f(params, x, state)``. ``factors(params, state=None)`` and
    ``from_factors(F_t, F_next)`` split it so a loop can reuse the factors
    of the previous probe. All three are jitted; nothing of size N²h² is
    ever held.

    When the factors do not fit ``memory_budget`` (``schedule.mode ==
    "outputs"``), ``factors`` returns ``(params, state)`` unchanged and
    ``from_factors`` recomputes output-chunk factors tile by tile, each
    parameter set with its own state (:func:`theory.ntk_budget.drift`), so
    loops written against the split API still work. ``plan()`` /
    ``explain()`` say what was chosen.
    """

    factors: Callable[..., Any]
    from_factors: Callable[[Any, Any], dict]
    _both: Callable[..., dict]
    plan: Callable[..., dict] = None
    explain: Callable[..., str] = None

    def __call__(self, params_t, params_next, state_t=None, state_next=None) -> dict:
        return self._both(params_t, params_next, state_t, state_next)


def _bind(f: Callable, state) -> Callable:
    """``f(params, x)``, with ``state`` as f's third argument when given."""
    return f if state is None else (lambda p, x: f(p, x, state))


def make_drift_fn(f: Callable, x_probe, *, chunk_size: int | None = None,
                  out_chunk_size: int | None = None,
                  matmul_precision: str | None = "highest", forms=None,
                  memory_budget: int | None = None,
                  conv: Callable | None = None) -> NTKDrift:
    """Drift functions for ``f(params, x) -> (N, h)`` on probes x_probe: (N, ...).

    Uses the structured factors (every leaf is covered; leaves without a layer
    rule by an explicit per-sample Jacobian, N·h·P_leaf floats).
    chunk_size: probe samples per tile (None: :func:`auto_tile`); the largest
    transient is a few (t, t, h, h) tiles. out_chunk_size: as in
    :func:`empirical_ntk_fn`. forms, memory_budget: as there; with a budget
    the factors of both parameter sets are stored when they fit, otherwise
    recomputed per output chunk (see :class:`NTKDrift`). A ``state``
    passed to the drift functions (BatchNorm statistics of each parameter
    set) is f's third argument, ``f(params, x, state)``, and is not
    differentiated. conv: as in :func:`empirical_ntk_fn`.
    """
    _check_options(f, False, chunk_size, out_chunk_size, "structured", matmul_precision)
    _check_int("memory_budget", memory_budget)
    _check_conv(conv)
    _check_x("x_probe", x_probe)
    x_probe = jnp.asarray(x_probe)
    tile = auto_tile(x_probe.shape[0]) if chunk_size is None else chunk_size

    def plan_of(params, state=None):
        g = _bind(f, state)
        with _precision(matmul_precision):
            _out_dim(g, params, x_probe)
            plan = _plan(g, params, x_probe, forms=forms, conv=conv)
            return plan, _schedule(g, params, x_probe, None, plan, kind="drift",
                                   trace=False, forms=forms, memory_budget=memory_budget,
                                   chunk_size=chunk_size, tile=tile)

    def factors(params, state=None):
        plan, sched = plan_of(params, state)
        if sched.mode == "outputs":
            return params, state
        with _precision(matmul_precision):
            return _structured_factors(_bind(f, state), params, x_probe, plan,
                                       chunk_size=sched.sample_chunk,
                                       out_chunk_size=out_chunk_size)

    def from_factors(ft, fn):
        if isinstance(ft, Factors):
            with _precision(matmul_precision):
                return ntk_contract.drift(ft, fn, chunk_size=tile)
        (pt, st), (pn, sn) = ft, fn
        plan, sched = plan_of(pt, st)
        with _precision(matmul_precision):
            return ntk_budget.drift(plan, _bind(f, st), pt, pn, x_probe, sched, _dtype(pt),
                                    f_next=_bind(f, sn))

    def both(pt, pn, st=None, sn=None):
        return from_factors(factors(pt, st), factors(pn, sn))

    def report(params, state=None):
        plan, sched = plan_of(params, state)
        return describe(plan, sched, x_probe.shape[0], trace=False)

    return NTKDrift(jax.jit(factors), jax.jit(from_factors), jax.jit(both), report,
                    lambda params, state=None: explain(report(params, state)))


def ntk_drift(f: Callable, params_seq: Sequence[Any], x_probe, **kwargs) -> dict:
    """k_norm (T,) and k_gap (T−1,) along a sequence of T parameter trees.

    Each tree's factors are computed once; keyword arguments go to
    :func:`make_drift_fn`.
    """
    params_seq = list(params_seq)
    if not params_seq:
        raise ValueError("params_seq must hold at least one parameter tree")
    d = make_drift_fn(f, x_probe, **kwargs)
    prev = d.factors(params_seq[0])
    if len(params_seq) == 1:
        out = d.from_factors(prev, prev)
        return {"k_norm": out["k_norm"][None], "k_gap": jnp.zeros((0,), out["k_gap"].dtype)}
    norms, gaps = [], []
    for p in params_seq[1:]:
        cur = d.factors(p)
        out = d.from_factors(prev, cur)
        norms.append(out["k_norm"])
        gaps.append(out["k_gap"])
        prev = cur
    norms.append(out["k_norm_next"])
    return {"k_norm": jnp.stack(norms), "k_gap": jnp.stack(gaps)}


__all__ = ["METHODS", "NTKDrift", "auto_tile", "describe", "empirical_ntk_fn", "explain",
           "make_drift_fn", "ntk_drift"]
