"""A 5-layer GCN on molecules (OGB's ``gcn`` baseline) in Flax, static shapes.

**Graph tables.** The library gathers every batch by example index from
one on-device array (:func:`hpft_jax.steps.make_step_range`), so a graph is
one fixed-shape row: an integer table ``x[n]`` of shape (V, C) with
C = 10 + 4 D, one line per node slot::

    col 0           1 for a real node, 0 for a padding slot
    cols 1..9       the 9 OGB atom features
    cols 10..10+D   neighbour slots: 1 + the neighbour's node index, 0 = empty
    cols 10+D..     3 OGB bond features per neighbour slot (D x 3)

V (node budget per graph) and D (neighbour slots, the maximum degree) are
read from the array's static shape. Zeros anywhere are padding, so padding
a batch with empty graphs (``steps.predict`` does) or a table with more
nodes or slots changes no number (tested). Padded nodes and slots are
masked out of messages, degrees, BatchNorm statistics (flax's ``mask``) and
the mean pooling; padded graphs have z = 0 and are cut by the caller.

This is a padded adjacency list (ELLPACK) per graph rather than jraph's
concatenated ``pad_with_graphs`` layout: with one fixed-shape row per graph
the aggregation is a gather and a sum over the D slots, so no
``segment_sum`` and no per-batch packing are needed (jraph itself is
archived, its last release 0.0.6.dev0 from 2022; see docs/graphs.md).

**Model** (``ogb/examples/graphproppred/mol``, ``GNN(gnn_type='gcn')``):
AtomEncoder (sum of 9 embeddings) -> 5 x [GCNConv -> BatchNorm -> ReLU
(not after the last) -> dropout 0.5] -> mean pooling = z. GCNConv:
x' = W h; out_u = Σ_{v ∈ N(u)} relu(x'_v + bond_emb(e_vu)) / sqrt(d_u d_v)
+ relu(x'_u + root) / d_u, with d = degree + 1 (Kipf & Welling).
Blocks for the partial backbone are the 5 layers (``layer{i}``); the stem is
the atom encoder.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# ogb.utils.features.get_atom_feature_dims() / get_bond_feature_dims()
ATOM_DIMS = (119, 4, 12, 12, 10, 6, 6, 2, 2)
BOND_DIMS = (5, 6, 2)
NUM_ATOM, NUM_BOND = len(ATOM_DIMS), len(BOND_DIMS)
HEADER = 1 + NUM_ATOM  # the columns before the neighbour slots


def table_width(max_degree: int) -> int:
    """C for D neighbour slots."""
    return HEADER + (1 + NUM_BOND) * max_degree


def slots_of(width: int) -> int:
    """D from a table width C (raises if C is not 10 + 4 D)."""
    d, r = divmod(width - HEADER, 1 + NUM_BOND)
    if r or d < 0:
        raise ValueError(f"a graph table has {HEADER} + 4 D columns; got {width}")
    return d


class Graphs(NamedTuple):
    """A batch of tables, unpacked. Shapes: B graphs, V node slots, D slots."""

    node_mask: jax.Array  # (B, V) bool
    atoms: jax.Array  # (B, V, 9) int32
    nbr: jax.Array  # (B, V, D) int32, 0 where empty (use with edge_mask)
    bonds: jax.Array  # (B, V, D, 3) int32
    edge_mask: jax.Array  # (B, V, D) bool


def unpack(table: jax.Array) -> Graphs:
    """(B, V, C) integer (or integral float) table -> :class:`Graphs`."""
    t = table.astype(jnp.int32)
    d = slots_of(t.shape[-1])
    node_mask = t[..., 0] > 0
    nbr1 = t[..., HEADER:HEADER + d]
    edge_mask = (nbr1 > 0) & node_mask[..., None]
    bonds = t[..., HEADER + d:].reshape(t.shape[:-1] + (d, NUM_BOND))
    return Graphs(node_mask, t[..., 1:HEADER], jnp.maximum(nbr1 - 1, 0), bonds, edge_mask)


def _gather_nodes(values: jax.Array, nbr: jax.Array) -> jax.Array:
    """values (B, V, ...) at nbr (B, V, D) -> (B, V, D, ...)."""
    return jax.vmap(lambda v, i: v[i])(values, nbr)


class FeatureEncoder(nn.Module):
    """Sum of one embedding per categorical feature (OGB's Atom/BondEncoder)."""

    dims: tuple[int, ...]
    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats):
        # torch.nn.init.xavier_uniform_ as OGB initialises these tables
        init = nn.initializers.xavier_uniform()
        out = 0.0
        for i, n in enumerate(self.dims):
            idx = jnp.clip(feats[..., i], 0, n - 1)
            out = out + nn.Embed(n, self.width, embedding_init=init, dtype=self.dtype,
                                 name=f"emb{i}")(idx)
        return out


class GCNConv(nn.Module):
    """OGB's GCNConv (see the module docstring); h (B, V, H) -> (B, V, H)."""

    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, g: Graphs):
        x = nn.Dense(self.width, dtype=self.dtype, name="linear")(h)
        e = FeatureEncoder(BOND_DIMS, self.width, self.dtype, name="bond_encoder")(g.bonds)
        em = g.edge_mask.astype(x.dtype)
        deg = em.sum(-1) + 1.0  # (B, V)
        dis = jax.lax.rsqrt(deg)
        norm = dis[..., None] * _gather_nodes(dis, g.nbr) * em  # (B, V, D)
        msg = norm[..., None] * nn.relu(_gather_nodes(x, g.nbr) + e)
        root = self.param("root_emb", nn.initializers.normal(1.0), (self.width,))
        return msg.sum(2) + nn.relu(x + root[None, None]) / deg[..., None]


class GCNBlock(nn.Module):
    """GCNConv -> BatchNorm over real nodes -> ReLU (unless last) -> dropout."""

    width: int
    last: bool = False
    dropout: float = 0.5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, g: Graphs, *, train: bool):
        h = GCNConv(self.width, self.dtype, name="conv")(h, g)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, name="bn")(h, mask=g.node_mask[..., None])
        if not self.last:
            h = nn.relu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return h * g.node_mask[..., None].astype(h.dtype)  # padding stays exactly 0


def mean_pool(h: jax.Array, node_mask: jax.Array) -> jax.Array:
    """(B, V, H), (B, V) -> (B, H): mean over real nodes; 0 for an empty graph."""
    m = node_mask.astype(h.dtype)
    return (h * m[..., None]).sum(1) / jnp.maximum(m.sum(1), 1.0)[:, None]


class GCN(nn.Module):
    """``depth`` GCN layers on graph tables; z: (B, width).

    Slices as every backbone (:mod:`hpft_jax.models`): ``stop=s < depth``
    returns the float array (B, V, C + width) = [table, node features after
    block s-1], which ``start=s`` takes back; ``stop=depth`` (the whole
    trunk) returns the pooled z and ``start=depth`` passes z through.
    """

    width: int = 300
    depth: int = 5
    dropout: float = 0.5
    dtype: Dtype = jnp.float32

    @property
    def num_blocks(self) -> int:
        return self.depth

    def block_name(self, i: int) -> str:
        return f"layer{i}"

    @nn.compact
    def __call__(self, x, *, train: bool = False, start: int | None = None,
                 stop: int | None = None):
        stop = self.depth if stop is None else stop
        if start == self.depth:
            return x  # already z
        if start is None:
            table = x
            g = unpack(table)
            h = FeatureEncoder(ATOM_DIMS, self.width, self.dtype, name="atom_encoder")(g.atoms)
            h = h * g.node_mask[..., None].astype(h.dtype)
        else:
            table, h = x[..., :-self.width], x[..., -self.width:]
            g = unpack(table)
        for i in range(start or 0, stop):
            h = GCNBlock(self.width, last=i == self.depth - 1, dropout=self.dropout,
                         dtype=self.dtype, name=self.block_name(i))(h, g, train=train)
        if stop < self.depth:
            return jnp.concatenate([table.astype(h.dtype), h], axis=-1)
        return mean_pool(h, g.node_mask)
