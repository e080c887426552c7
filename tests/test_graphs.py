"""GCN on graph tables: padding changes nothing, GCNConv against an edge-list
numpy computation, OGB layout round trip and its bad inputs."""

import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpft_jax import gcn, ogb, tasks
from hpft_jax.models import Classifier, LinearHead


@pytest.fixture(scope="module")
def mol():
    return ogb.generate(10, 3, seed=0, nodes=(3, 9))


def _model(dropout=0.0):
    return Classifier(gcn.GCN(width=16, depth=2, dropout=dropout), LinearHead(3), task="multilabel")


def test_tables_round_trip_edges(mol):
    d = ogb.max_degree(mol)
    t = ogb.tables(mol, np.arange(mol.num_graphs), max_nodes=int(mol.num_nodes.max()), max_deg=d)
    g = gcn.unpack(jnp.asarray(t))
    off = np.cumsum(mol.num_nodes) - mol.num_nodes
    eoff = np.cumsum(mol.num_edges) - mol.num_edges
    for i in range(mol.num_graphs):
        assert int(g.node_mask[i].sum()) == mol.num_nodes[i]
        np.testing.assert_array_equal(np.asarray(g.atoms[i, :mol.num_nodes[i]]),
                                      mol.node_feat[off[i]:off[i] + mol.num_nodes[i]])
        e = mol.edges[eoff[i]:eoff[i] + mol.num_edges[i]]
        want = sorted(map(tuple, np.concatenate([e, e[:, ::-1]]).tolist()))
        u, s = np.nonzero(np.asarray(g.edge_mask[i]))
        got = sorted(zip(u.tolist(), np.asarray(g.nbr[i])[u, s].tolist()))
        assert got == want


@pytest.mark.slow  # ~1 min on a shared 2-core CPU: two train-mode GCN gradients compile
def test_more_padding_changes_no_number(mol):
    """Same graphs with more node slots, neighbour slots and empty graphs:
    the same logits, z, loss, gradients and BatchNorm statistics."""
    idx = np.arange(mol.num_graphs)
    v, d = int(mol.num_nodes.max()), ogb.max_degree(mol)
    small = jnp.asarray(ogb.tables(mol, idx, max_nodes=v, max_deg=d))
    big = jnp.asarray(np.concatenate([ogb.tables(mol, idx, max_nodes=v + 5, max_deg=d + 2),
                                      np.zeros((3, v + 5, gcn.table_width(d + 2)), np.int16)]))
    y = jnp.asarray(np.concatenate([mol.labels, np.full((3, 3), np.nan, np.float32)]))
    model = _model()
    vars_ = model.init(jax.random.key(0), small, train=False)
    task = tasks.get("multilabel")

    def train_out(x, yy):
        def loss(p):
            (logits, z), upd = model.apply({"params": p, "batch_stats": vars_["batch_stats"]},
                                           x, train=True, mutable=["batch_stats"])
            return task.loss(logits, yy, 0.9), (logits, upd["batch_stats"])
        (l, (logits, bs)), g = jax.value_and_grad(loss, has_aux=True)(vars_["params"])
        return l, logits, bs, g

    n = mol.num_graphs
    ls, lg_s, bs_s, g_s = train_out(small, y[:n])
    lb, lg_b, bs_b, g_b = train_out(big, y)
    np.testing.assert_allclose(lb, ls, rtol=1e-6)
    np.testing.assert_allclose(lg_b[:n], lg_s, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves((bs_s, g_s)), jax.tree_util.tree_leaves((bs_b, g_b))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    ev_s = model.apply(vars_, small, train=False)
    ev_b = model.apply(vars_, big, train=False)
    for a, b in zip(ev_s, ev_b):
        np.testing.assert_allclose(b[:n], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ev_b[1][n:], 0.0)  # empty graphs: z = 0


def test_gcnconv_matches_edge_list_numpy(mol):
    """OGB's GCNConv written with an explicit directed edge list (segment sums)."""
    idx = np.arange(mol.num_graphs)
    t = jnp.asarray(ogb.tables(mol, idx, max_nodes=int(mol.num_nodes.max()),
                               max_deg=ogb.max_degree(mol)))
    g = gcn.unpack(t)
    conv = gcn.GCNConv(8)
    h = jax.random.normal(jax.random.key(1), g.node_mask.shape + (5,))
    p = conv.init(jax.random.key(2), h, g)
    out = np.asarray(conv.apply(p, h, g))
    P = jax.tree_util.tree_map(np.asarray, p["params"])
    eoff = np.cumsum(mol.num_edges) - mol.num_edges
    for i in range(mol.num_graphs):
        n = mol.num_nodes[i]
        x = np.asarray(h[i, :n]) @ P["linear"]["kernel"] + P["linear"]["bias"]
        e = mol.edges[eoff[i]:eoff[i] + mol.num_edges[i]]
        f = mol.edge_feat[eoff[i]:eoff[i] + mol.num_edges[i]]
        row = np.concatenate([e[:, 0], e[:, 1]])  # source
        col = np.concatenate([e[:, 1], e[:, 0]])  # target
        ff = np.concatenate([f, f])
        emb = sum(P["bond_encoder"][f"emb{k}"]["embedding"][ff[:, k]] for k in range(3))
        deg = np.bincount(row, minlength=n) + 1.0
        norm = deg[row] ** -0.5 * deg[col] ** -0.5
        msg = norm[:, None] * np.maximum(x[row] + emb, 0)
        agg = np.zeros_like(x)
        np.add.at(agg, col, msg)
        want = agg + np.maximum(x + P["root_emb"], 0) / deg[:, None]
        np.testing.assert_allclose(out[i, :n], want, rtol=1e-4, atol=1e-5)


def test_partial_backbone_slices_compose(mol):
    t = jnp.asarray(ogb.tables(mol, np.arange(4), max_nodes=int(mol.num_nodes.max()),
                               max_deg=ogb.max_degree(mol)))
    model = _model()
    v = model.init(jax.random.key(0), t, train=False)
    whole = model.apply(v, t, train=False)
    for split in (0, 1, 2):
        h = model.apply(v, t, split=split, method=model.trunk)
        top = model.apply(v, h, split=split, method=model.top)
        np.testing.assert_allclose(top[0], whole[0], rtol=1e-5, atol=1e-6)


def test_ogb_layout_round_trip(tmp_path, mol):
    ogb.write(mol, str(tmp_path))
    back = ogb.read(str(tmp_path))
    for f in ("num_nodes", "num_edges", "node_feat", "edges", "edge_feat"):
        np.testing.assert_array_equal(getattr(back, f), getattr(mol, f))
    np.testing.assert_array_equal(np.isnan(back.labels), np.isnan(mol.labels))
    np.testing.assert_array_equal(np.nan_to_num(back.labels), np.nan_to_num(mol.labels))
    for k in ogb.SPLITS:
        np.testing.assert_array_equal(back.splits[k], mol.splits[k])


def test_ogb_bad_inputs(tmp_path, mol):
    ogb.write(mol, str(tmp_path))
    os.remove(tmp_path / "raw" / "edge-feat.csv.gz")
    with pytest.raises(FileNotFoundError, match="edge-feat.csv.gz"):
        ogb.read(str(tmp_path))
    ogb.write(mol, str(tmp_path))
    with gzip.open(tmp_path / "raw" / "num-node-list.csv.gz", "wt") as f:
        f.write("\n".join(str(n + 1) for n in mol.num_nodes) + "\n")
    with pytest.raises(ValueError, match="node-feat.csv.gz has .* rows but the count lists"):
        ogb.read(str(tmp_path))
