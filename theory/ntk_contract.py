"""Contract per-sample factors into eNTK blocks, tile by tile over sample pairs.

Shapes: a kernel block is (n1, n2, h, h) with κ[i, j] = ∇_θ z_i ∇_θ z_jᵀ
(Eq. 2), its trace (n1, n2). Tiles are ``t × t`` sample pairs; with one
probe set (x2 None) only tiles I ≤ J are computed and κ[j, i] = κ[i, j]ᵀ
fills the rest. Drift statistics never hold more than one tile pair.

Measured on the toy MLP (N = 50, h = 128, 2-core CPU): tiles of 5-10
samples in a loop, accumulated in (i, c, j, d) order and written in place,
ran ~2x faster than one 50 x 50 block; a stack of tiles scattered into
place afterwards cost another ~0.3 s of memory traffic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from theory.ntk_factors import Factors

_HI = jax.lax.Precision.HIGHEST
# Columns per matmul of a contraction over the explicit Jacobian's long axis.
# ResNet18 traces (J of 50 samples x 15 outputs x 1.01M columns): one dot over
# all 15M columns held a ~3.4 GB copy outside XLA:CPU's buffer assignment
# and took 3.9-31 s; blocks of 2^14 columns took 2.0 s and 0.01 GB
# (benchmarks/RESULTS.md, issue 15).
COL_BLOCK = 1 << 14


def _ein(spec, *ops):
    return jnp.einsum(spec, *ops, precision=_HI)


def long_contract(spec: str, a, b, block: int | None = None):
    """``einsum(spec, a, b)`` where both contract their last axis, in blocks
    of ``block`` (default :data:`COL_BLOCK`) columns accumulated in a loop;
    one einsum when the axis is shorter than two blocks."""
    block = block or COL_BLOCK
    x = a.shape[-1]
    nb = x // block
    if nb <= 1:
        return _ein(spec, a, b)
    cut = lambda t, i: jax.lax.dynamic_slice_in_dim(t, i * block, block, axis=t.ndim - 1)  # noqa: E731
    out = jax.eval_shape(lambda: _ein(spec, a[..., :1], b[..., :1]))
    acc = jax.lax.fori_loop(0, nb, lambda i, acc: acc + _ein(spec, cut(a, i), cut(b, i)),
                            jnp.zeros(out.shape, out.dtype))
    if nb * block < x:
        acc = acc + _ein(spec, a[..., nb * block:], b[..., nb * block:])
    return acc


def pair_block(f1: Factors, f2: Factors, *, trace: bool, layout: str = "ijcd"):
    """κ (t1, t2, h1, h2), or its trace (t1, t2), from two sets of factors.

    h1 and h2 may differ (two output chunks of the same model); a trace needs
    the same outputs on both sides.

    ``layout="icjd"`` returns the full block as (t1, h, t2, h), the order the
    matmuls produce, which saves a transpose where only norms are needed.
    """
    t1, h = f1.shape
    t2, h2 = f2.shape
    out = jnp.zeros((t1, t2) if trace else (t1, h, t2, h2), f1.dtype)
    for a1, g1, a2, g2 in zip(f1.A, f1.G, f2.A, f2.G):
        if a1.shape[1] == 1:      # one position: (A Aᵀ) ⊙ (G Gᵀ)
            m = _ein("ik,jk->ij", a1[:, 0], a2[:, 0])
            if trace:
                out = out + m * _ein("ico,jco->ij", g1[:, :, 0], g2[:, :, 0])
            else:
                out = out + m[:, None, :, None] * _ein(
                    "ico,jdo->icjd", g1[:, :, 0], g2[:, :, 0])
        else:                     # positions: Σ_pq M[p,q] G_i[:,p] G_j[:,q]ᵀ
            m = _ein("ipk,jqk->ijpq", a1, a2)
            if trace:
                out = out + jnp.sum(m * _ein("icpo,jcqo->ijpq", g1, g2), axis=(2, 3))
            else:
                out = out + _ein("icpo,ijpdo->icjd", g1,
                                 _ein("ijpq,jdqo->ijpdo", m, g2))
    if f1.J is not None:   # trace: (t1, h·D) x (h·D, t2) matmuls, no transposed copy
        out = out + (long_contract("iX,jX->ij", f1.J.reshape(t1, -1), f2.J.reshape(t2, -1))
                     if trace else long_contract("icD,jdD->icjd", f1.J, f2.J))
    if trace or layout == "icjd":
        return out
    return jnp.transpose(out, (0, 2, 1, 3))


def _pad(fac: Factors, n: int) -> Factors:
    if fac.shape[0] == n:   # no copy of the factors when nothing is padded
        return fac
    return jax.tree_util.tree_map(
        lambda t: jnp.pad(t, [(0, n - t.shape[0])] + [(0, 0)] * (t.ndim - 1)), fac)


def _take(fac: Factors, start, t: int) -> Factors:
    return jax.tree_util.tree_map(
        lambda a: jax.lax.dynamic_slice_in_dim(a, start * t, t, axis=0), fac)


def _pairs(nb1: int, nb2: int, symmetric: bool):
    if symmetric:
        ii, jj = np.triu_indices(nb1)
    else:
        ii, jj = np.divmod(np.arange(nb1 * nb2), nb2)
    return jnp.asarray(ii, jnp.int32), jnp.asarray(jj, jnp.int32)


def kernel(f1: Factors, f2: Factors | None, *, trace: bool,
           chunk_size: int | None) -> jax.Array:
    """Full eNTK (n1, n2, h1, h2) or traces (n1, n2); ``f2=None`` means f2 = f1.

    Tiles are written in place into one output buffer inside a loop, so no
    stack of tiles is ever held; with f2 None each tile I < J is also written,
    transposed, at (J, I).
    """
    symmetric = f2 is None
    f2 = f1 if symmetric else f2
    (n1, h), (n2, h2) = f1.shape, f2.shape
    t = chunk_size
    if t is None or t >= max(n1, n2):
        return pair_block(f1, f2, trace=trace)
    nb1, nb2 = -(-n1 // t), -(-n2 // t)
    p1, p2 = _pad(f1, nb1 * t), _pad(f2, nb2 * t)
    ii, jj = _pairs(nb1, nb2, symmetric)
    out = jnp.zeros((nb1 * t, nb2 * t) + (() if trace else (h, h2)), f1.dtype)

    def body(k, out):
        i, j = ii[k], jj[k]
        blk = pair_block(_take(p1, i, t), _take(p2, j, t), trace=trace)
        zeros = (jnp.zeros((), ii.dtype),) * (blk.ndim - 2)
        if symmetric:   # mirror first: on diagonal tiles the direct one wins
            mirrored = blk.T if trace else jnp.transpose(blk, (1, 0, 3, 2))
            out = jax.lax.dynamic_update_slice(out, mirrored, (j * t, i * t) + zeros)
        return jax.lax.dynamic_update_slice(out, blk, (i * t, j * t) + zeros)

    out = jax.lax.fori_loop(0, ii.shape[0], body, out)
    return out if (nb1 * t, nb2 * t) == (n1, n2) else out[:n1, :n2]


def drift(ft: Factors, fn: Factors, *, chunk_size: int | None) -> dict:
    """Mean over the N² probe pairs of ‖κ_t‖_F, ‖κ_next‖_F and ‖κ_next − κ_t‖_F.

    k_gap is the norm of the *difference* of the two kernels, tile by tile
    (‖A‖² + ‖B‖² − 2⟨A, B⟩ cancels badly when the kernel moves by ~1%).
    Only tiles I ≤ J are formed; off-diagonal tiles count twice.
    """
    n = ft.shape[0]
    t = n if chunk_size is None else min(chunk_size, n)
    nb = -(-n // t)
    pt, pn = _pad(ft, nb * t), _pad(fn, nb * t)   # zero factors: zero kernels
    ii, jj = _pairs(nb, nb, True)

    def tile(ij):
        kw = dict(trace=False, layout="icjd")
        kt = pair_block(_take(pt, ij[0], t), _take(pt, ij[1], t), **kw)
        kn = pair_block(_take(pn, ij[0], t), _take(pn, ij[1], t), **kw)
        w = jnp.where(ij[0] == ij[1], 1.0, 2.0).astype(kt.dtype)
        fro = lambda k: jnp.sum(jnp.sqrt(jnp.sum(k * k, axis=(1, 3))))  # noqa: E731
        return w * jnp.stack([fro(kt), fro(kn), fro(kn - kt)])

    sums = jnp.sum(jax.lax.map(tile, (ii, jj)), axis=0) / (n * n)
    return {"k_norm": sums[0], "k_norm_next": sums[1], "k_gap": sums[2]}
