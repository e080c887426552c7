"""OGB molecule data sets from disk (numpy only) and a generator of look-alikes.

:func:`read` reads the directory OGB's own tools write
(``ogb.graphproppred.PygGraphPropPredDataset(name='ogbg-moltox21')`` leaves
it under ``dataset/ogbg_moltox21/``), without torch or the network::

    raw/num-node-list.csv.gz   (N,) nodes per graph
    raw/num-edge-list.csv.gz   (N,) bonds per graph
    raw/node-feat.csv.gz       (Σ nodes, 9) OGB atom features
    raw/edge.csv.gz            (Σ bonds, 2) node indices local to their graph
    raw/edge-feat.csv.gz       (Σ bonds, 3) OGB bond features
    raw/graph-label.csv.gz     (N, T) 0/1, empty or nan = missing
    split/scaffold/{train,valid,test}.csv.gz   graph indices

(``mapping/`` holds SMILES and task names; it is not needed.) Bonds are
listed once and used in both directions, as OGB does for its ``mol``
data sets (``add_inverse_edge``). :func:`tables` turns the graphs into the
fixed-shape tables :mod:`hpft_jax.gcn` reads. :func:`write` writes the same
layout, and :func:`generate` random molecule-like graphs with a planted
label rule, for tests and the offline demo.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import re
import warnings

import numpy as np

from hpft_jax.gcn import ATOM_DIMS, BOND_DIMS, HEADER, NUM_BOND, table_width

RAW = ("num-node-list", "num-edge-list", "node-feat", "edge", "edge-feat", "graph-label")
SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Molecules:
    """Graphs in OGB's flat layout; ``splits``: name -> graph indices."""

    num_nodes: np.ndarray  # (N,) int64
    num_edges: np.ndarray  # (N,) int64
    node_feat: np.ndarray  # (Σ nodes, 9) int64
    edges: np.ndarray  # (Σ bonds, 2) int64, local indices
    edge_feat: np.ndarray  # (Σ bonds, 3) int64
    labels: np.ndarray  # (N, T) float32, NaN = missing
    splits: dict

    @property
    def num_graphs(self) -> int:
        return int(self.num_nodes.shape[0])


# --------------------------------------------------------------------------
# Reading


def _path(root: str, rel: str) -> str:
    path = os.path.join(root, rel + ".csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"OGB data set {root}: missing file {rel}.csv.gz (expected "
                                "OGB's layout raw/, split/scaffold/; see docs/graphs.md)")
    return path


def _ints(path: str, cols: int | None) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        text = f.read()
    if not text.strip():
        return np.zeros((0,) if cols is None else (0, cols), np.int64)
    a = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=1 if cols is None
                   else 2)
    return a.reshape(-1) if cols is None else a


def _labels(path: str) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    text = "\n".join(re.sub(r"(^|,)(?=,|$)", r"\1nan", ln) for ln in lines)  # empty = missing
    return np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float32, ndmin=2)


def read(root: str, split: str = "scaffold") -> Molecules:
    """Read and check an OGB graph-property directory (see module docstring)."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"OGB data set directory {root} does not exist")
    paths = {k: _path(root, f"raw/{k}") for k in RAW}
    spaths = {k: _path(root, f"split/{split}/{k}") for k in SPLITS}
    nn_ = _ints(paths["num-node-list"], None)
    ne = _ints(paths["num-edge-list"], None)
    mol = Molecules(nn_, ne, _ints(paths["node-feat"], len(ATOM_DIMS)), _ints(paths["edge"], 2),
                    _ints(paths["edge-feat"], len(BOND_DIMS)), _labels(paths["graph-label"]),
                    {k: _ints(p, None) for k, p in spaths.items()})
    check(mol, root)
    return mol


def check(mol: Molecules, where: str) -> None:
    """Counts and value ranges consistent; raises ValueError naming the problem."""
    n = mol.num_graphs
    if mol.num_edges.shape[0] != n or mol.labels.shape[0] != n:
        raise ValueError(f"OGB data set {where}: inconsistent graph counts: num-node-list {n}, "
                         f"num-edge-list {mol.num_edges.shape[0]}, graph-label "
                         f"{mol.labels.shape[0]}")
    if (mol.num_nodes < 1).any() or (mol.num_edges < 0).any():
        raise ValueError(f"OGB data set {where}: a graph has no node or a negative edge count")
    for name, total, rows in (("node-feat", mol.num_nodes.sum(), mol.node_feat.shape[0]),
                              ("edge", mol.num_edges.sum(), mol.edges.shape[0]),
                              ("edge-feat", mol.num_edges.sum(), mol.edge_feat.shape[0])):
        if total != rows:
            raise ValueError(f"OGB data set {where}: raw/{name}.csv.gz has {rows} rows but the "
                             f"count lists sum to {total}")
    owner = np.repeat(np.arange(n), mol.num_edges)
    if mol.edges.size and ((mol.edges < 0).any()
                           or (mol.edges >= mol.num_nodes[owner][:, None]).any()):
        bad = int(owner[np.nonzero((mol.edges < 0).any(1)
                                   | (mol.edges >= mol.num_nodes[owner][:, None]).any(1))[0][0]])
        raise ValueError(f"OGB data set {where}: graph {bad} has an edge to a node it does not "
                         f"have ({mol.num_nodes[bad]} nodes)")
    for name, feat, dims in (("node-feat", mol.node_feat, ATOM_DIMS),
                             ("edge-feat", mol.edge_feat, BOND_DIMS)):
        if feat.size and ((feat < 0).any() or (feat >= np.asarray(dims)).any()):
            raise ValueError(f"OGB data set {where}: raw/{name}.csv.gz has values outside "
                             f"OGB's feature ranges {dims}")
    lab = mol.labels[~np.isnan(mol.labels)]
    if not np.isin(lab, (0.0, 1.0)).all():
        raise ValueError(f"OGB data set {where}: graph-label has values other than 0, 1 "
                         "and missing")
    for k, idx in mol.splits.items():
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"OGB data set {where}: split {k} names graphs outside [0, {n})")


def one_class_tasks(labels: np.ndarray) -> np.ndarray:
    """Indices of the tasks without both classes among the labelled entries."""
    pos = (labels == 1).any(0)
    neg = (labels == 0).any(0)
    return np.nonzero(~(pos & neg))[0]


# --------------------------------------------------------------------------
# Tables for the GCN


def max_degree(mol: Molecules) -> int:
    if not mol.edges.size:
        return 0
    offs = np.repeat(np.cumsum(mol.num_nodes) - mol.num_nodes, mol.num_edges)
    ends = np.concatenate([mol.edges[:, 0] + offs, mol.edges[:, 1] + offs])
    return int(np.bincount(ends, minlength=int(mol.num_nodes.sum())).max())


def tables(mol: Molecules, idx: np.ndarray, *, max_nodes: int, max_deg: int) -> np.ndarray:
    """(len(idx), max_nodes, 10 + 4 max_deg) int16 graph tables (hpft_jax.gcn)."""
    n = len(idx)
    out = np.zeros((n, max_nodes, table_width(max_deg)), np.int16)
    node_off = np.cumsum(mol.num_nodes) - mol.num_nodes
    edge_off = np.cumsum(mol.num_edges) - mol.num_edges
    g_nodes = mol.num_nodes[idx]
    g = np.repeat(np.arange(n), g_nodes)  # row in ``out`` of each node
    local = np.arange(g_nodes.sum()) - np.repeat(np.cumsum(g_nodes) - g_nodes, g_nodes)
    src = np.repeat(node_off[idx], g_nodes) + local
    out[g, local, 0] = 1
    out[g, local, 1:HEADER] = mol.node_feat[src]
    g_edges = mol.num_edges[idx]
    ge = np.repeat(np.arange(n), g_edges)
    eidx = np.repeat(edge_off[idx], g_edges) + (np.arange(g_edges.sum())
                                               - np.repeat(np.cumsum(g_edges) - g_edges, g_edges))
    e = mol.edges[eidx]
    feat = mol.edge_feat[eidx]
    # both directions: receiver u gets sender v in its next free slot
    recv = np.concatenate([e[:, 0], e[:, 1]])
    send = np.concatenate([e[:, 1], e[:, 0]])
    gg = np.concatenate([ge, ge])
    ff = np.concatenate([feat, feat])
    key = gg.astype(np.int64) * max_nodes + recv
    order = np.argsort(key, kind="stable")
    ks = key[order]
    first = np.searchsorted(ks, ks, side="left")
    slot = np.empty_like(order)
    slot[order] = np.arange(len(order)) - first
    out[gg, recv, HEADER + slot] = send + 1
    for k in range(NUM_BOND):
        out[gg, recv, HEADER + max_deg + slot * NUM_BOND + k] = ff[:, k]
    return out


# --------------------------------------------------------------------------
# Writing and generating


def _write(path: str, rows: np.ndarray, fmt: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.StringIO()
    if rows.size:
        np.savetxt(buf, rows, fmt=fmt, delimiter=",")
    text = buf.getvalue().replace("nan", "")
    with gzip.open(path, "wt") as f:
        f.write(text)


def write(mol: Molecules, root: str, split: str = "scaffold") -> None:
    """Write ``mol`` in OGB's layout under ``root`` (missing labels as empty fields)."""
    raw = os.path.join(root, "raw")
    _write(os.path.join(raw, "num-node-list.csv.gz"), mol.num_nodes[:, None], "%d")
    _write(os.path.join(raw, "num-edge-list.csv.gz"), mol.num_edges[:, None], "%d")
    _write(os.path.join(raw, "node-feat.csv.gz"), mol.node_feat, "%d")
    _write(os.path.join(raw, "edge.csv.gz"), mol.edges, "%d")
    _write(os.path.join(raw, "edge-feat.csv.gz"), mol.edge_feat, "%d")
    _write(os.path.join(raw, "graph-label.csv.gz"), mol.labels, "%.0f")
    for k, idx in mol.splits.items():
        _write(os.path.join(root, "split", split, f"{k}.csv.gz"), idx[:, None], "%d")
    os.makedirs(os.path.join(root, "mapping"), exist_ok=True)
    with gzip.open(os.path.join(root, "mapping", "mol.csv.gz"), "wt") as f:
        t = mol.labels.shape[1]
        f.write(",".join([f"task{i}" for i in range(t)] + ["smiles", "mol_id"]) + "\n")
        for i in range(mol.num_graphs):
            f.write(",".join([""] * t + [f"generated-{i}", f"gen-{i}"]) + "\n")


# The generator's atom "elements" (OGB feature 0 = atomic number - 1): C N O F S Cl
ELEMENTS = (5, 6, 7, 8, 15, 16)


def rule_pairs(num_tasks: int, offset: int = 0) -> list[tuple[int, int]]:
    """Task t is 1 when the molecule has a bond between elements (a_t, b_t)."""
    pairs = [(a, b) for a in range(len(ELEMENTS)) for b in range(a, len(ELEMENTS))
             if (a, b) != (0, 0)]  # C-C is in almost every molecule
    return [pairs[(offset + t) % len(pairs)] for t in range(num_tasks)]


def generate(num_graphs: int, num_tasks: int, *, seed: int = 0, task_offset: int = 0,
             nodes: tuple[int, int] = (6, 24), missing: float = 0.15,
             noise: float = 0.05) -> Molecules:
    """Random molecule-like graphs (trees of valence ≤ 4 plus a few rings)
    with task labels from :func:`rule_pairs`, flipped with prob. ``noise``
    and missing with prob. ``missing``; splits 80/10/10 at random."""
    rng = np.random.default_rng(seed)
    probs = np.array([0.55, 0.15, 0.15, 0.05, 0.05, 0.05])
    rules = rule_pairs(num_tasks, task_offset)
    nn_, ne, nf, ed, ef, lab = [], [], [], [], [], []
    for _ in range(num_graphs):
        n = int(rng.integers(nodes[0], nodes[1] + 1))
        elem = rng.choice(len(ELEMENTS), n, p=probs)
        deg = np.zeros(n, int)
        bonds = []
        for i in range(1, n):
            cands = np.nonzero(deg[:i] < 4)[0]
            j = int(rng.choice(cands))
            bonds.append((j, i))
            deg[i] += 1
            deg[j] += 1
        for _ in range(int(rng.integers(0, 3))):  # ring closures
            a, b = rng.choice(n, 2, replace=False)
            if deg[a] < 4 and deg[b] < 4 and (a, b) not in bonds and (b, a) not in bonds:
                bonds.append((int(a), int(b)))
                deg[a] += 1
                deg[b] += 1
        e = np.array(bonds, np.int64).reshape(-1, 2)
        atoms = np.zeros((n, len(ATOM_DIMS)), np.int64)
        atoms[:, 0] = np.array(ELEMENTS)[elem]
        atoms[:, 2] = deg
        atoms[:, 3] = 5  # formal charge 0
        atoms[:, 4] = rng.integers(0, 4, n)  # hydrogens
        atoms[:, 6] = rng.integers(0, 6, n)
        atoms[:, 7] = rng.integers(0, 2, n)
        atoms[:, 8] = rng.integers(0, 2, n)
        bf = np.stack([rng.choice([0, 1, 3], len(e)), np.zeros(len(e), np.int64),
                       rng.integers(0, 2, len(e))], 1)
        pairs = {tuple(sorted((int(elem[a]), int(elem[b])))) for a, b in e}
        y = np.array([float(p in pairs) for p in rules], np.float32)
        y = np.where(rng.random(num_tasks) < noise, 1.0 - y, y)
        y[rng.random(num_tasks) < missing] = np.nan
        nn_.append(n)
        ne.append(len(e))
        nf.append(atoms)
        ed.append(e)
        ef.append(bf)
        lab.append(y)
    perm = rng.permutation(num_graphs)
    a, b = int(0.8 * num_graphs), int(0.9 * num_graphs)
    return Molecules(np.array(nn_), np.array(ne), np.concatenate(nf), np.concatenate(ed),
                     np.concatenate(ef), np.stack(lab),
                     {"train": np.sort(perm[:a]), "valid": np.sort(perm[a:b]),
                      "test": np.sort(perm[b:])})


# --------------------------------------------------------------------------
# A data spec's splits


def parse_budget(rest: str, spec: str) -> tuple[str, int | None]:
    """``DIR`` or ``DIR@V`` -> (DIR, node budget V or None)."""
    path, at, budget = rest.rpartition("@")
    if not at:
        return rest, None
    if not budget.isdigit() or int(budget) < 1:
        raise ValueError(f"data spec {spec!r}: the node budget after '@' must be a positive "
                         f"integer; got {budget!r}")
    return path, int(budget)


def load_splits(path: str, budget: int | None, spec: str) -> tuple[int, dict]:
    """Read ``path`` and build its split tables: ``(num_tasks, {split: (x, y,
    idx)})`` with x (n, V, C) int16 tables, y (n, T) float32 (NaN = missing),
    idx the graph indices. V is ``budget`` or the largest graph; D the
    largest degree. Warns for tasks without both classes in a split."""
    mol = read(path)
    largest = int(mol.num_nodes.max())
    if budget is not None and largest > budget:
        over = int((mol.num_nodes > budget).sum())
        raise ValueError(f"data spec {spec!r}: {over} graphs are over the node budget of "
                         f"{budget} (largest graph: {largest} nodes, graph "
                         f"{int(mol.num_nodes.argmax())}); raise or drop '@{budget}'")
    v = budget or largest
    d = max(max_degree(mol), 1)
    t = mol.labels.shape[1]
    out = {}
    for name, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        idx = mol.splits[key]
        y = mol.labels[idx]
        bad = one_class_tasks(y) if len(idx) else np.arange(0)
        if len(bad):
            warnings.warn(f"data spec {spec!r}: {len(bad)} of {t} tasks have no positive or "
                          f"no negative label in the {key} split (tasks {bad.tolist()}); they are "
                          f"left out of its ROC-AUC average", stacklevel=2)
        out[name] = (tables(mol, idx, max_nodes=v, max_deg=d), y, idx)
    return t, out
