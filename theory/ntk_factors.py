"""Per-sample factors of the empirical NTK, found by intercepting Flax layers.

The eNTK of Eq. 2, κ(x_i, x_j) = ∇_θ z_i ∇_θ z_jᵀ ∈ R^{h×h}, is a sum over
parameter leaves. For a layer with weight W (K, c_out) and bias b that one
sample uses at P positions (P = 1 for a Dense on a vector; the output pixels
for a Conv, whose position-p input is the K = k_h·k_w·c_in patch a_p),

    y_p = a_p W + b,       ∂z_c/∂W[k, o] = Σ_p a_p[k] G[c, p, o],

with G = ∂z/∂y (h, P, c_out). So the layer's kernel block is

    κ_l(i, j)[c, d] = Σ_{p,q,o} (a_{i,p}·a_{j,q} + 1) G_i[c,p,o] G_j[d,q,o]     (*)

("+1" is the bias; it is carried as a ones column appended to a). For a
Dense on vectors this is (A Aᵀ + 1) ⊙ (G Gᵀ), which costs O(h² c_out) per pair
instead of O(h² K c_out) for the explicit Jacobian product.

This module finds such layers without the model's cooperation: it runs ``f``
under :func:`flax.linen.intercept_methods`, records every exact ``nn.Dense``
and ``nn.Conv`` call whose kernel is, by identity, a leaf of ``params``, and
in the factor pass captures the layer's input and adds a zero perturbation δ
to its output, so that the VJP with respect to δ is G. Every other leaf (norm
scales, embeddings, shared or transformed weights, any non-Flax ``f``) is
covered by an explicit per-sample Jacobian. Each leaf is covered exactly once
(asserted).

Assumptions, stated once: examples are independent (the factors are taken
per sample, ``f(params, x_i[None])``; BatchNorm must be in eval mode), and a
rule-covered kernel/bias is not read anywhere except in its own layer call
(weight tying through the same module object is detected and falls back).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from theory import ntk_cost

_DEFAULT_PROMOTE = nn.Dense.__dataclass_fields__["promote_dtype"].default
_CONV_PROMOTE = nn.Conv.__dataclass_fields__["promote_dtype"].default


@dataclasses.dataclass(frozen=True)
class Layer:
    """One rule-covered layer call (static)."""

    path: tuple[str, ...]
    kind: str                    # "dense" | "conv"
    kernel: int                  # leaf index of W
    bias: int | None             # leaf index of b, if any
    in_shape: tuple[int, ...]    # per-sample input shape, as the layer sees it
    out_shape: tuple[int, ...]   # per-sample output shape
    n_pos: int                   # P
    fan_in: int                  # K (+1 when the bias is covered)
    features: int                # c_out
    form: str = "gram"           # "gram" (*) or "jac" (explicit per-layer Jacobian)
    module: Any = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the leaves of ``params`` are covered (static, found by tracing)."""

    treedef: Any
    leaf_sizes: tuple[int, ...]
    layers: tuple[Layer, ...]       # rule-covered calls in call order
    calls: tuple[tuple, ...]        # (path, type name, layer index or -1) per call
    fallback: tuple[int, ...]       # leaf indices covered by explicit Jacobians
    h: int
    # drop-in for lax.conv_general_dilated in the factor pass's rule-covered
    # nn.Conv calls (None: the module's own); changes how the backward passes
    # run, not what they compute
    conv: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def n_params(self) -> int:
        return int(sum(self.leaf_sizes))

    @property
    def rule_fraction(self) -> float:
        """Fraction of parameters covered by a layer rule."""
        covered = sum(self.leaf_sizes[i] for i in range(len(self.leaf_sizes))
                      if i not in set(self.fallback))
        return covered / max(self.n_params, 1)

    @property
    def jac_width(self) -> int:
        """Columns of the explicit per-sample Jacobian J (fallback + jac layers)."""
        w = sum(self.leaf_sizes[i] for i in self.fallback)
        return int(w + sum(l.fan_in * l.features for l in self.layers
                           if l.form == "jac"))


class Factors(NamedTuple):
    """Per-sample factors for n samples and h output dims.

    A: per gram-form layer, (n, P, K) layer inputs (ones column for the bias);
    G: per gram-form layer, (n, h, P, c_out) = ∂z/∂y;
    J: (n, h, D) explicit Jacobian of the remaining leaves and jac-form layers,
       or None when there are none.
    """

    A: tuple
    G: tuple
    J: jax.Array | None

    @property
    def shape(self) -> tuple[int, int]:
        """(n, h)."""
        g = self.J if self.J is not None else self.G[0]
        return int(g.shape[0]), int(g.shape[1])

    @property
    def dtype(self):
        return (self.J if self.J is not None else self.G[0]).dtype


def chunked_map(fn: Callable, xs, chunk: int | None):
    """``vmap(fn)(xs)`` over axis 0, ``chunk`` rows at a time (all if None).

    Unlike ``lax.map(batch_size=...)``, a ragged last chunk is padded with
    copies of the last row (and the extra results dropped), so ``fn`` is
    traced and compiled once, not twice.
    """
    n = xs.shape[0]
    if chunk is None or chunk >= n:
        return jax.vmap(fn)(xs)
    nb = -(-n // chunk)
    pad = jnp.concatenate([xs, jnp.repeat(xs[-1:], nb * chunk - n, axis=0)], axis=0)
    out = jax.lax.map(jax.vmap(fn), pad.reshape((nb, chunk) + xs.shape[1:]))
    return jax.tree_util.tree_map(lambda a: a.reshape((nb * chunk,) + a.shape[2:])[:n], out)


def _rule_kind(module, method_name, args):
    """'dense' / 'conv' when the call follows the exact rule, else None."""
    if method_name != "__call__" or len(args) != 1:
        return None
    if type(module) is nn.Dense:
        ok = (module.dot_general is None and module.dot_general_cls is None
              and module.promote_dtype is _DEFAULT_PROMOTE)
        return "dense" if ok else None
    if type(module) is nn.Conv:
        ok = (module.feature_group_count == 1 and module.mask is None
              and module.conv_general_dilated is None
              and module.conv_general_dilated_cls is None
              and module.promote_dtype is _CONV_PROMOTE)
        return "conv" if ok else None
    return None


def _layer_params(module):
    try:
        return module.variables.get("params", {})
    except Exception:  # noqa: BLE001 - unbound or odd modules: no rule
        return {}


def _dtypes_match(module, a, kernel) -> bool:
    dt = kernel.dtype
    return (a.dtype == dt and (module.dtype is None or jnp.dtype(module.dtype) == dt)
            and jnp.issubdtype(dt, jnp.floating))


def discover(f: Callable, params, x_single, *, n_samples: int, trace: bool = False,
             forms=None) -> Plan:
    """Trace ``f(params, x_single[None])`` abstractly and build the :class:`Plan`.

    ``n_samples`` (samples per side of a kernel tile) and ``trace`` only feed
    the per-layer choice between the two exact forms of (*), made by
    :func:`theory.ntk_cost.choose_form`. ``forms`` overrides it: one form
    ("gram" / "jac") for every layer, or a dict from layer path ("a/b" or a
    tuple) to a form; layers it does not name keep the cost model's choice.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = tuple(int(np.prod(np.shape(l))) for l in leaves)
    records: list[dict] = []

    def run(leaves, xi):
        ids = {id(l): k for k, l in enumerate(leaves)}

        def icpt(next_fun, args, kwargs, ctx):
            y = next_fun(*args, **kwargs)
            kind = _rule_kind(ctx.module, ctx.method_name, args)
            if type(ctx.module) in (nn.Dense, nn.Conv) and ctx.method_name == "__call__":
                v = _layer_params(ctx.module)
                kern, bias = v.get("kernel"), v.get("bias")
                rec = dict(path=tuple(ctx.module.path), type=type(ctx.module).__name__,
                           kind=kind, kernel=ids.get(id(kern)),
                           bias=ids.get(id(bias)) if bias is not None else None,
                           has_bias=bias is not None,
                           in_shape=tuple(args[0].shape), out_shape=tuple(y.shape),
                           module=ctx.module.clone(parent=None))
                if kind is not None and (kern is None or not _dtypes_match(
                        ctx.module, args[0], kern)):
                    rec["kind"] = None
                records.append(rec)
            return y

        with nn.intercept_methods(icpt):
            return f(jax.tree_util.tree_unflatten(treedef, leaves), xi[None])

    z = jax.eval_shape(run, leaves, x_single)
    if len(z.shape) != 2 or z.shape[0] != 1:
        raise ValueError(f"f must map (n, ...) inputs to (n, h) features; for one "
                         f"sample it returned shape {z.shape}")
    h = int(z.shape[1])

    # A leaf hit by two rule calls (shared weights) or a call whose bias is not
    # a leaf of params cannot use the rule.
    hits: dict[int, int] = {}
    for r in records:
        for k in (r["kernel"], r["bias"]):
            if k is not None:
                hits[k] = hits.get(k, 0) + 1
    layers, calls = [], []
    for r in records:
        ok = (r["kind"] is not None and r["kernel"] is not None
              and hits[r["kernel"]] == 1
              and (not r["has_bias"] or (r["bias"] is not None and hits[r["bias"]] == 1)))
        if not ok:
            calls.append((r["path"], r["type"], -1))
            continue
        kshape = tuple(np.shape(leaves[r["kernel"]]))
        cout = kshape[-1]
        k_in = int(np.prod(kshape[:-1]))
        n_pos = int(np.prod(r["out_shape"][:-1]))
        fan_in = k_in + (r["bias"] is not None)
        form = _override(forms, r["path"]) or ntk_cost.choose_form(
            n_pos, fan_in, cout, h, n_samples, trace=trace)
        calls.append((r["path"], r["type"], len(layers)))
        layers.append(Layer(path=r["path"], kind=r["kind"], kernel=r["kernel"],
                            bias=r["bias"], in_shape=r["in_shape"],
                            out_shape=r["out_shape"], n_pos=n_pos, fan_in=fan_in,
                            features=cout, form=form, module=r["module"]))
    covered = [l.kernel for l in layers] + [l.bias for l in layers if l.bias is not None]
    fallback = tuple(k for k in range(len(leaves)) if k not in set(covered))
    every = sorted(covered + list(fallback))
    assert every == list(range(len(leaves))), "each parameter leaf must be covered once"
    return Plan(treedef=treedef, leaf_sizes=sizes, layers=tuple(layers),
                calls=tuple(calls), fallback=fallback, h=h)


def _override(forms, path: tuple) -> str | None:
    """The user's form for the layer at ``path``, or None."""
    if forms is None:
        return None
    if isinstance(forms, str):
        form = forms
    else:
        form = forms.get(path, forms.get("/".join(path)))
    if form is not None and form not in ntk_cost.FORMS:
        raise ValueError(f"forms must map layers to one of {ntk_cost.FORMS}; got {form!r}")
    return form


def check_forms(forms, plan: Plan) -> None:
    """Raise if a dict of forms names a layer path that the plan lacks."""
    if forms is None or isinstance(forms, str):
        _override(forms, ())
        return
    known = {l.path for l in plan.layers} | {"/".join(l.path) for l in plan.layers}
    bad = [k for k in forms if k not in known]
    if bad:
        raise ValueError(f"forms names unknown layers {bad}; rule-covered layers: "
                         f"{sorted('/'.join(l.path) for l in plan.layers)}")


class _FactorRun:
    """Interceptor for the factor pass: adds δ to outputs, captures inputs."""

    def __init__(self, plan: Plan, leaves, deltas):
        self.plan, self.leaves, self.deltas = plan, leaves, deltas
        self.i = 0
        self.busy = False
        self.inputs: list = [None] * len(plan.layers)

    def __call__(self, next_fun, args, kwargs, ctx):
        if self.busy or not (type(ctx.module) in (nn.Dense, nn.Conv)
                             and ctx.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        if self.i >= len(self.plan.calls):
            raise RuntimeError("f made more Dense/Conv calls than when it was traced")
        path, tname, li = self.plan.calls[self.i]
        self.i += 1
        if (tuple(ctx.module.path), type(ctx.module).__name__) != (path, tname):
            raise RuntimeError(
                f"f's layer calls changed between traces: expected {path} "
                f"({tname}), got {tuple(ctx.module.path)}")
        if li < 0:
            return next_fun(*args, **kwargs)
        layer = self.plan.layers[li]
        v = _layer_params(ctx.module)
        if v.get("kernel") is not self.leaves[layer.kernel]:
            raise RuntimeError(f"layer {path}: kernel is no longer a leaf of params")
        self.busy = True
        try:
            if layer.kind == "conv" and self.plan.conv is not None:
                mod = ctx.module.clone(parent=None, conv_general_dilated=self.plan.conv)
                y = mod.apply({"params": v}, *args, **kwargs)
            else:
                y = next_fun(*args, **kwargs)
            self.inputs[li] = _layer_inputs(layer, args[0])
        finally:
            self.busy = False
        return y + self.deltas[li].astype(y.dtype)


def patches_2d(x, kernel_hw, strides, pads, dilation) -> jax.Array:
    """Conv patches (N, H', W', k_h·k_w·C) of NHWC ``x`` by strided slices of
    the padded input, in the column order of an HWIO kernel's
    ``reshape(-1, c_out)``: no FLOPs, unlike a conv with an identity kernel.
    pads: ((top, bottom), (left, right))."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_hw, strides, dilation
    x = jnp.pad(x, ((0, 0),) + tuple(tuple(p) for p in pads) + ((0, 0),))
    n, hp, wp, c = x.shape
    ho = (hp - (kh - 1) * dh - 1) // sh + 1
    wo = (wp - (kw - 1) * dw - 1) // sw + 1
    cols = [jax.lax.slice(x, (0, i * dh, j * dw, 0),
                          (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                          (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def conv_pads(padding, in_shape, window, strides) -> tuple:
    """((top, bottom), (left, right)) for lax-style ``padding`` (a string or
    pairs) of a 2-D conv on NHWC inputs of ``in_shape``; ``window`` is the
    dilated kernel size."""
    if isinstance(padding, str):
        return tuple(jax.lax.padtype_to_pads(in_shape[1:3], window, strides, padding))
    return tuple(tuple(p) for p in padding)


def _slice_args(mod, in_shape):
    """(kernel_hw, strides, pads, dilation) for :func:`patches_2d` of a 2-D
    ``nn.Conv`` call on NHWC inputs of ``in_shape``, or None where the call
    needs the general path (input dilation, circular or causal padding, other
    ranks)."""
    ks = (mod.kernel_size,) if isinstance(mod.kernel_size, int) else tuple(mod.kernel_size)
    if len(in_shape) != 4 or len(ks) != 2:
        return None

    def pair(v):
        return (1, 1) if v is None else (v, v) if isinstance(v, int) else tuple(v)

    strides, dil, lhs_dil = pair(mod.strides), pair(mod.kernel_dilation), pair(mod.input_dilation)
    if lhs_dil != (1, 1):
        return None
    try:
        pads = nn.linear.canonicalize_padding(mod.padding, 2)
    except ValueError:
        return None
    if isinstance(pads, str) and pads not in ("SAME", "SAME_LOWER", "VALID"):
        return None
    window = tuple((k - 1) * d + 1 for k, d in zip(ks, dil))
    return ks, strides, conv_pads(pads, in_shape, window, strides), dil


def identity_patches(layer: Layer) -> bool:
    """Whether a conv layer's patches need a conv with an identity kernel
    (K_in² constant) instead of slices (:func:`patches_2d`)."""
    return layer.kind == "conv" and _slice_args(layer.module, layer.in_shape) is None


def _layer_inputs(layer: Layer, a) -> jax.Array:
    """(P, K) inputs a_p of one sample's layer call, ones column for the bias."""
    if layer.kind == "dense":
        rows = a.reshape(-1, a.shape[-1])
    elif (sl := _slice_args(layer.module, a.shape)) is not None:
        rows = patches_2d(a, *sl)
        rows = rows.reshape(-1, rows.shape[-1])
    else:
        # Patches by the layer's own conv with an identity kernel: this reuses
        # its padding, strides and dilations exactly; column order matches
        # kernel.reshape(-1, c_out).
        mod = layer.module
        ks = mod.kernel_size if not isinstance(mod.kernel_size, int) else (mod.kernel_size,)
        cin = a.shape[-1]
        kdim = int(np.prod(ks)) * cin
        eye = jnp.eye(kdim, dtype=a.dtype).reshape(tuple(ks) + (cin, kdim))
        patcher = mod.clone(features=kdim, use_bias=False, mask=None)
        rows = patcher.apply({"params": {"kernel": eye}}, a).reshape(-1, kdim)
    if layer.bias is not None:
        rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
    return rows


def sample_factors(plan: Plan, f: Callable, leaves, xi, *,
                   out_chunk_size: int | None = None, rows=None) -> Factors:
    """Factors of one sample ``xi`` (no batch axis): one forward pass, then h
    backward passes, ``out_chunk_size`` at a time (all at once if None).

    rows: (m, h) output cotangents to pull back instead of the identity; the
    factors then describe the m outputs ``rows @ z`` (an output chunk when
    rows are rows of the identity).
    """
    fb0 = [leaves[k] for k in plan.fallback]
    deltas0 = [jnp.zeros(l.out_shape, leaves[l.kernel].dtype) for l in plan.layers]

    def g(deltas, fb):
        cur = list(leaves)
        for k, v in zip(plan.fallback, fb):
            cur[k] = v
        run = _FactorRun(plan, cur, deltas)
        with nn.intercept_methods(run):
            z = f(jax.tree_util.tree_unflatten(plan.treedef, cur), xi[None])
        if run.i != len(plan.calls):
            raise RuntimeError("f made fewer Dense/Conv calls than when it was traced")
        return z[0], run.inputs

    z, vjp, inputs = jax.vjp(g, deltas0, fb0, has_aux=True)
    rows = jnp.eye(plan.h, dtype=z.dtype) if rows is None else rows.astype(z.dtype)
    d_delta, d_fb = chunked_map(vjp, rows, out_chunk_size)
    h = rows.shape[0]
    A, G, J = [], [], [d.reshape(h, -1) for d in d_fb]
    for layer, a, d in zip(plan.layers, inputs, d_delta):
        g_l = d.reshape(h, layer.n_pos, layer.features)
        if layer.form == "gram":
            A.append(a)
            G.append(g_l)
        else:  # explicit per-sample, per-layer Jacobian (h, K·c_out)
            J.append(jnp.einsum("pk,cpo->cko", a, g_l,
                                precision=jax.lax.Precision.HIGHEST).reshape(h, -1))
    J = jnp.concatenate(J, axis=1) if J else None
    return Factors(tuple(A), tuple(G), J)


def batch_factors(plan: Plan, f: Callable, params, x, *, chunk_size: int | None,
                  out_chunk_size: int | None, rows=None) -> Factors:
    """:func:`sample_factors` for all of x: (n, ...) and all h outputs.

    Samples run in vmapped chunks of ``chunk_size`` and the backward passes in
    chunks of ``out_chunk_size`` output dims, to bound working memory.
    """
    leaves = jax.tree_util.tree_leaves(params)

    def one(xi):
        return sample_factors(plan, f, leaves, xi, out_chunk_size=out_chunk_size,
                              rows=rows)

    return chunked_map(one, x, chunk_size)
