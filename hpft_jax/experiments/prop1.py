"""``hpft prop1``: Proposition 1's bound against AIE over the τ sweep (Sec. 4.1).

Prop. 1 (proof: App. A, Eqs. 11-23) bounds the features' movement during FT
by the average initial energy,

    E_j ‖z_T^(j) − z_0^(j)‖₂  ≤  c · AIE,   AIE = E_n ‖e_{y_n} − p_0^(n)‖₂,
    c = γ · C₁ · C₂ · T,

with C₁ ≥ ‖κ^(j,n)‖ (the backbone's eNTK, Eq. 17-18), C₂ ≥ ‖v_t‖ (the head,
Eq. 20-21), T the number of updates (the proof sums over steps t; the
statement says "FT epochs") and γ the learning rate.

Which norms. Eq. 17 is ‖κ w‖₂ ≤ ‖κ‖₂‖w‖₂, so the bound needs the *spectral*
norm; the text's F-norm is also valid (‖κ‖₂ ≤ ‖κ‖_F) but looser, by up to
√h. C₂ bounds ‖∇_z q‖₂ = ‖W‖₂ for the linear head q = Wz + b, the operator
norm of the (h, k) kernel (the bias does not enter); for an MLP head the
product of its layers' operator norms (ReLU is 1-Lipschitz). By
Cauchy-Schwarz, ‖κ^(j,n)‖ ≤ (‖κ^(j,j)‖‖κ^(n,n)‖)^½ in both norms
(κ^(j,n) = J_j J_nᵀ), so the sup over pairs is attained on the diagonal.

The proof assumes a slow kernel, a linear head, plain full-batch SGD at a
constant γ and a non-increasing energy. Our FT breaks the last two:

* heavy-ball momentum β = 0.9 (update_t = −γ_t Σ_{s≤t} β^{t−s} g_s), so the
  gradient of step s enters with weight Σ_{t=s}^{T−1} γ_t β^{t−s}: γ·T
  becomes Σ_t γ_t (1 − β^{t+1}) / (1 − β) (≈ γT/(1−β));
* a cosine schedule: γ_t = γ·½(1 + cos(π t / (epochs·steps_per_epoch)));
* early stopping: z_T is the best epoch's model, so T = (best_epoch + 1) ·
  steps_per_epoch;
* minibatches: each step averages the energy over its batch, not the data
  set; over a shuffled epoch the batch averages add up to AIE per step in
  expectation (exactly when the batch size divides N).

We log all the variants: ``gT_plain`` = γ·T (the paper), ``gT_sched`` =
Σ_t γ_t (plain SGD on our schedule), ``gT_eff`` (schedule and momentum: the
one our FT needs) and ``gT_epochs`` = γ·(best_epoch + 1) (T read as epochs).
C₁ and C₂ are measured at two points only, the start and the end of FT
(their max is used), and C₁ on ``n_probes`` training samples (N² pairs):
both are estimates of the suprema the proof assumes.

1. HPτ-FT for every τ (default: the configured list, 2 seeds), exactly as
   the sweep runs it (:func:`hpft_jax.prepare.prepare`, then
   :func:`hpft_jax.sweep.finetune_runs` with ``save_final=True``), resumable.
2. Per run: the backbone's eNTK (:func:`theory.ntk.empirical_ntk_fn`, eval
   mode) on the probe set at the start and at the end of FT, ‖v‖ at both, the
   energy at the end, and the constants; logged as ``prop1`` events.
3. ``prop1.md`` (per-τ table, verdict, correlations) and ``figures/prop1.png``.

    hpft prop1                       # default τ list, seeds 0,1
    hpft prop1 --tau 0,4,64,1024 --seeds 0 --n-probes 20 --name prop1_small
    hpft prop1 --report-only
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from hpft_jax import checkpoint, energy, prepare, steps as steps_lib, sweep
from hpft_jax.config import SweepConfig
from hpft_jax.experiment import Experiment, require_classification, sweep_field
from hpft_jax.flags import opt_int_or_all, option
from hpft_jax.outputs import md_table, mean_std, plt
from hpft_jax.progress import bar
from hpft_jax.rng import probe_indices
from hpft_jax.runlog import RunDir
from theory.ntk import empirical_ntk_fn

Tree = Any
NORMS = ("spec", "fro")


@dataclasses.dataclass(frozen=True)
class Prop1Config:
    """``hpft prop1``; ``sweep`` supplies data, model, pretraining, HP, FT, seeds.

    ``sweep.hp.taus``: the HPτ-FT runs measured; ``ls_eta`` must be None (no
    lsHP) and ``shard`` (0, 1) (every run is measured).
    """

    sweep: SweepConfig = sweep_field("prop1", seeds=(0, 1), ls_eta=None)
    n_probes: int = option(50, "training samples for the eNTK (C₁ over their N² pairs)")
    probe_seed: int = option(0, "which probe samples")
    spec_pairs: int | None = option(
        200, "off-diagonal probe pairs whose spectral norm enters the mean ‖κ‖₂ (one "
        "eigendecomposition each; 'all' for every pair). The sup needs only the diagonal "
        "and is always exact", parse=opt_int_or_all)
    ntk_method: str = option("auto", "theory.ntk method: auto | structured | vjp_jvp | jacobian")

    def __post_init__(self):
        if isinstance(self.n_probes, bool) or int(self.n_probes) != self.n_probes \
                or self.n_probes < 1:
            raise ValueError(f"n_probes must be a positive integer; got {self.n_probes!r}")
        offdiag_pairs(2, self.spec_pairs)  # validates spec_pairs
        if self.sweep.ls_eta is not None:
            raise ValueError("hpft prop1 runs HP only: ls_eta must be None "
                             f"(remove --ls-eta); got {self.sweep.ls_eta}")
        if tuple(self.sweep.shard) != (0, 1):
            raise ValueError("prop1 measures every run of the sweep: run it unsharded")


# --------------------------------------------------------------------------
# The constants


def offdiag_pairs(n: int, m: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``m`` distinct pairs j < n of ``n`` probes, fixed by ``seed`` and sorted
    (all N(N−1)/2 when ``m`` is None or at least that many)."""
    ii, jj = np.triu_indices(n, k=1)
    if m is not None:
        if isinstance(m, bool) or int(m) != m or m < 0:
            raise ValueError(f"spec_pairs must be a non-negative integer or None; got {m!r}")
        if m < ii.size:
            keep = np.sort(np.random.default_rng(seed).choice(ii.size, int(m), replace=False))
            ii, jj = ii[keep], jj[keep]
    return ii, jj


def gather_blocks(kappa, ii, jj):
    """What :func:`ntk_stats` needs of one probe set's eNTK, kappa (N, N, h, h)
    with κ[n, j] = κ[j, n]ᵀ: ``fro`` (N, N) = ‖κ^(j,n)‖_F for every pair, the
    diagonal blocks ``diag`` (N, h, h) and the blocks ``off`` (M, h, h) of the
    pairs (ii, jj) (static host indices). Jittable; keeps the N²h² kernel on
    the device."""
    n = kappa.shape[0]
    if kappa.ndim != 4 or kappa.shape[1] != n or kappa.shape[2] != kappa.shape[3]:
        raise ValueError(f"kappa must be (N, N, h, h); got {kappa.shape}")
    kappa = kappa.astype(jnp.float32)
    d = jnp.arange(n)
    return {"fro": jnp.sqrt(jnp.sum(kappa ** 2, axis=(-2, -1))), "diag": kappa[d, d],
            "off": kappa[np.asarray(ii, np.int32), np.asarray(jj, np.int32)]}


def spectral_norms(blocks, *, psd: bool = False) -> np.ndarray:
    """‖A‖₂ of each block, (M, h, h) -> (M,), on the host in float64:
    λ_max(AAᵀ)^½, or λ_max(A) of the symmetrised block when ``psd`` (the
    diagonal eNTK blocks J Jᵀ). numpy's LAPACK eigvalsh: XLA's CPU one ran
    ~10x slower on these blocks."""
    a = np.asarray(blocks, np.float64)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"blocks must be (M, h, h); got {a.shape}")
    if a.shape[0] == 0:
        return np.zeros((0,))
    if psd:
        return np.maximum(np.linalg.eigvalsh(0.5 * (a + a.transpose(0, 2, 1)))[:, -1], 0.0)
    return np.sqrt(np.maximum(np.linalg.eigvalsh(a @ a.transpose(0, 2, 1))[:, -1], 0.0))


def ntk_stats(blocks: dict) -> dict[str, float]:
    """Sup and mean over the N² probe pairs of ‖κ‖₂ and ‖κ‖_F, from
    :func:`gather_blocks`.

    The sup needs only the diagonal: ‖J_i J_jᵀ‖ ≤ (‖J_i J_iᵀ‖ ‖J_j J_jᵀ‖)^½ in
    both norms (Cauchy-Schwarz), so ``spec_sup`` = max_j ‖κ^(j,j)‖₂ is the sup
    over all pairs. The spectral norm costs one eigendecomposition per block,
    so ``spec_mean`` = (Σ_j ‖κ^(j,j)‖₂ + (N² − N) · mean over the sampled
    off-diagonal pairs) / N², exact when every pair is sampled;
    ``spec_off_max`` is the largest sampled off-diagonal norm (≤ spec_sup).
    ``fro_*`` are exact over all pairs.
    """
    fro = np.asarray(blocks["fro"], np.float64)
    dg = spectral_norms(blocks["diag"], psd=True)
    off = spectral_norms(blocks["off"])
    n = dg.size
    mean_off = off.mean() if off.size else dg.mean()
    return {"spec_sup": float(dg.max()),
            "spec_mean": float((dg.sum() + (n * n - n) * mean_off) / (n * n)),
            "spec_diag_mean": float(dg.mean()),
            "spec_off_max": float(off.max()) if off.size else math.nan,
            "spec_pairs": int(off.size),
            "fro_sup": float(fro.max()), "fro_mean": float(fro.mean()),
            "fro_diag_sup": float(np.diagonal(fro).max())}


def head_norm(head_params) -> float:
    """C₂ candidate: ‖∇_z q‖₂ bound of the head ``params/head``.

    Linear head: the operator norm of its (h, k) kernel, = ‖v‖₂ of the k x h
    matrix v = ∇_z q. MLP head: the product of its Dense layers' operator
    norms (ReLU is 1-Lipschitz). Biases do not enter.
    """
    kernels = [np.asarray(leaf, dtype=np.float64) for path, leaf in _leaves(head_params)
               if path[-1] == "kernel"]
    if not kernels:
        raise ValueError("the head has no Dense kernel: cannot bound ‖∇_z q‖")
    return float(np.prod([np.linalg.norm(k.reshape(-1, k.shape[-1]), 2) for k in kernels]))


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], prefix + (str(k),))
    else:
        yield prefix, tree


def step_sizes(ft_cfg, num_train: int, steps: int) -> np.ndarray:
    """γ_t for the first ``steps`` FT updates, (steps,) float64: the cosine
    schedule of :func:`hpft_jax.steps.ft_optimizer` over epochs · batches
    (or the constant lr under ``schedule="constant"``)."""
    total = max(ft_cfg.epochs * steps_lib.num_batches(num_train, ft_cfg.batch_size), 1)
    t = np.arange(steps, dtype=np.float64)
    if ft_cfg.schedule == "constant":
        return np.full(steps, ft_cfg.lr, np.float64)
    return ft_cfg.lr * 0.5 * (1.0 + np.cos(np.pi * np.minimum(t, total) / total))


def lr_sum(gammas, momentum: float = 0.0) -> float:
    """Σ_t γ_t (1 − β^{t+1}) / (1 − β): the total weight heavy-ball momentum
    β gives the T gradients (each g_s enters the steps t ≥ s with γ_t β^{t−s});
    β = 0 is Σ_t γ_t."""
    g = np.asarray(gammas, dtype=np.float64)
    if g.ndim != 1:
        raise ValueError(f"gammas must be a 1-D sequence of step sizes; got shape {g.shape}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1); got {momentum}")
    if momentum == 0.0:
        return float(g.sum())
    t = np.arange(g.size)
    return float(np.sum(g * (1.0 - momentum ** (t + 1)) / (1.0 - momentum)))


def lr_sums(ft_cfg, num_train: int, best_epoch: int) -> dict:
    """T and the four γ·T variants for a run that early-stopped at ``best_epoch``."""
    if best_epoch < 0:
        raise ValueError(f"best_epoch must be >= 0 (the run never finished an epoch); "
                         f"got {best_epoch}")
    nb = steps_lib.num_batches(num_train, ft_cfg.batch_size)
    T = (best_epoch + 1) * nb
    g = step_sizes(ft_cfg, num_train, T)
    return {"steps_per_epoch": nb, "T": T, "gT_plain": ft_cfg.lr * T,
            "gT_epochs": ft_cfg.lr * (best_epoch + 1), "gT_sched": lr_sum(g),
            "gT_eff": lr_sum(g, ft_cfg.momentum)}


def constants(rec: dict) -> dict:
    """C₁, C₂, c and the bound from one ``prop1`` record.

    C₁ = max over start and end of the sup over probe pairs (``C1_spec``,
    ``C1_fro``), C₂ = max of ‖v‖ at start and end, and for each norm
    ``c_<norm>`` = gT_eff · C₁ · C₂ (the one our FT needs), ``bound_<norm>`` =
    c · AIE and ``ratio_<norm>`` = measured / bound. ``c_paper`` =
    gT_plain · C₁(spec) · C₂ is the paper's formula; ``c_mean`` uses the mean
    over pairs of ‖κ‖₂ instead of the sup (a heuristic, not a bound).
    """
    s, e = rec["ntk_start"], rec["ntk_end"]
    c2 = max(rec["c2_start"], rec["c2_end"])
    out = {"C2": c2}
    for k in NORMS:
        c1 = max(s[f"{k}_sup"], e[f"{k}_sup"])
        c = rec["gT_eff"] * c1 * c2
        out.update({f"C1_{k}": c1, f"c_{k}": c, f"bound_{k}": c * rec["aie"],
                    f"ratio_{k}": rec["dist"] / (c * rec["aie"]) if c * rec["aie"] > 0
                    else math.inf})
    out["c_paper"] = rec["gT_plain"] * out["C1_spec"] * c2
    out["c_mean"] = rec["gT_eff"] * max(s["spec_mean"], e["spec_mean"]) * c2
    return out


# --------------------------------------------------------------------------
# Measuring one run


def backbone_fn(model, batch_stats: Tree):
    """``f(backbone_params, x) -> z (N, h)``: the backbone in eval mode."""
    bs = (batch_stats or {}).get("backbone", {}) or {}

    def f(p, x):
        v = {"params": p, "batch_stats": bs} if bs else {"params": p}
        return model.backbone.apply(v, x, train=False)

    return f


def make_measure(model, x_probe, *, spec_pairs: int | None = 200, seed: int = 0,
                 method: str = "auto"):
    """``measure(params, batch_stats) -> (ntk_stats, C₂)`` for a classifier's
    variables (:func:`ntk_stats` of the backbone's eNTK on ``x_probe``, with
    ``spec_pairs`` off-diagonal pairs for the mean spectral norm; C₂ =
    :func:`head_norm`). One compiled eNTK for BatchNorm-free models (one per
    distinct statistics otherwise)."""
    x_probe = jnp.asarray(x_probe)
    cache: dict = {}
    ii, jj = offdiag_pairs(x_probe.shape[0], spec_pairs, seed)
    gather = jax.jit(functools.partial(gather_blocks, ii=ii, jj=jj))

    def ntk_for(stats):
        key = _digest(stats.get("backbone", {}) if stats else {})
        if key not in cache:
            cache.clear()  # one at a time: statistics change every run
            cache[key] = empirical_ntk_fn(backbone_fn(model, stats), method=method)
        return cache[key]

    def measure(params, stats):
        kappa = ntk_for(stats)(params["backbone"], x_probe)
        return ntk_stats(jax.device_get(gather(kappa))), head_norm(params["head"])

    return measure


def _digest(tree) -> str:
    h = hashlib.sha1()
    for path, leaf in _leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(repr((path, a.shape, str(a.dtype))).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def make_features(model):
    """Jitted ``(variables, x, y) -> (z (N, h), energy (N,))``, eval mode."""
    def fn(v, x, y):
        logits, z = steps_lib.predict(model, v, x)
        return z, energy.energy_per_sample(logits, y)

    return jax.jit(fn)


def measure_run(measure, features, start: tuple[Tree, Tree], end: tuple[Tree, Tree],
                x, y, *, start_ntk: dict | None = None) -> dict:
    """eNTK statistics and ‖v‖ at the start and end of one FT run, AIE, the
    energy at the end and E‖z_T − z_0‖₂ on (x, y) (the FT training set).

    ``start``/``end`` = (params, batch_stats); ``start_ntk`` reuses the start
    statistics (runs that share a backbone at the start of FT)."""
    if start_ntk is None:
        start_ntk, c2_start = measure(*start)
    else:
        c2_start = head_norm(start[0]["head"])
    end_ntk, c2_end = measure(*end)
    z0, e0 = (np.asarray(a, np.float64) for a in features(steps_lib.variables(*start), x, y))
    zt, et = (np.asarray(a, np.float64) for a in features(steps_lib.variables(*end), x, y))
    return {"ntk_start": start_ntk, "ntk_end": end_ntk, "c2_start": c2_start, "c2_end": c2_end,
            "aie_models": float(e0.mean()), "energy_end": float(et.mean()),
            "dist_models": float(np.linalg.norm(zt - z0, axis=1).mean())}


# --------------------------------------------------------------------------
# The experiment


def _key(rec) -> tuple:
    return (rec["variant"], rec["seed"], rec["tau"], rec["n_probes"], rec["probe_seed"],
            rec.get("spec_pairs"))


def check(cfg: Prop1Config, loaded: prepare.Loaded) -> None:
    """The probe count must fit the downstream training set."""
    require_classification(loaded, "hpft prop1 (Prop. 1's bound for softmax cross-entropy)")
    if cfg.n_probes > loaded.num_train:
        raise ValueError(f"n_probes={cfg.n_probes} exceeds the {loaded.num_train} "
                         "training samples")


def run(cfg: Prop1Config, run: RunDir, loaded: prepare.Loaded, *,
        progress: bool = True) -> None:
    """Run (or continue) the sweep's FT and the per-run measurements into
    ``run``; runs already measured are skipped."""
    sw, ds = cfg.sweep, loaded.ds
    idx = probe_indices(loaded.num_train, cfg.n_probes, seed=cfg.probe_seed, what="n_probes")
    n_off = offdiag_pairs(cfg.n_probes, cfg.spec_pairs, cfg.probe_seed)[0].size
    done = {_key(r) for r in run.records("prop1")}
    todo = [k for k in prepare.plan(sw)
            if (*k, cfg.n_probes, cfg.probe_seed, n_off) not in done]
    if not todo:
        return
    prepare.warn_opposite_energy(sw)
    prep = prepare.prepare(sw, run, loaded=loaded, progress=progress)
    sweep.finetune_runs(prep, run, save_final=True, progress=progress)

    ft_recs = {(r["variant"], r["seed"], r["tau"]): r for r in run.records("ft")}
    measure = make_measure(loaded.model, ds.train.x[idx], spec_pairs=cfg.spec_pairs,
                           seed=cfg.probe_seed, method=cfg.ntk_method)
    features = make_features(loaded.model)
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    start_cache: dict = {}
    pb = bar(len(todo), "prop1 eNTK", enabled=progress, unit="run")
    for k in todo:
        path = sweep.final_dir(run, k)
        if not checkpoint.exists(path):
            raise FileNotFoundError(
                f"no finetuned model for {k.label} at {path}: its FT run finished without "
                f"saving it (a sweep run without save_final); delete {run.path} and rerun")
        tree, _ = checkpoint.load_tree(path)
        end = (tree["params"], tree.get("batch_stats", {}) or {})
        start = jax.device_get(prep.init(k))
        skey = _digest({"p": start[0]["backbone"], "s": start[1]})
        m = measure_run(measure, features, start, end, x, y, start_ntk=start_cache.get(skey))
        start_cache[skey] = m["ntk_start"]
        rec = ft_recs[tuple(k)]
        dist = rec["adapt"].get("dist")
        run.log("prop1", variant=k.variant, seed=k.seed, tau=k.tau, n_probes=int(cfg.n_probes),
                probe_seed=int(cfg.probe_seed), spec_pairs=n_off, probe_idx=idx.tolist(),
                aie=rec["aie"],
                dist=dist if dist is not None else m["dist_models"],
                dist_source="ft record" if dist is not None else "models",
                best_epoch=rec["best_epoch"], lr=sw.ft.lr, momentum=sw.ft.momentum,
                weight_decay=sw.ft.weight_decay, eta_ft=sw.ft.eta,
                **lr_sums(sw.ft, loaded.num_train, rec["best_epoch"]), **m)
        pb.update()
    pb.close()


# --------------------------------------------------------------------------
# Report


def rows(run) -> list[dict]:
    """One dict per logged run of the latest probe setting (n_probes,
    probe_seed, spec_pairs): the record and its :func:`constants`, ordered by
    τ then seed."""
    recs = list(run.records("prop1"))
    if not recs:
        raise ValueError(f"{run.path} has no prop1 records yet")
    setting = _key(recs[-1])[3:]
    keep = {_key(r): r for r in recs if _key(r)[3:] == setting}
    return [{**r, **constants(r)}
            for _, r in sorted(keep.items(), key=lambda kv: (kv[0][2], kv[0][1]))]


def correlations(aie, dist) -> dict:
    """Pearson and Spearman correlation of dist with AIE across runs, and the
    least-squares fit through the origin dist ≈ c_fit · AIE (with its R²)."""
    a, d = np.asarray(aie, np.float64), np.asarray(dist, np.float64)
    if a.shape != d.shape or a.ndim != 1:
        raise ValueError(f"aie and dist must be matching 1-D arrays; got {a.shape}, {d.shape}")
    out = {"n": int(a.size), "pearson": math.nan, "pearson_p": math.nan,
           "spearman": math.nan, "spearman_p": math.nan}
    if a.size >= 3 and np.ptp(a) > 0 and np.ptp(d) > 0:
        p = scipy.stats.pearsonr(a, d)
        s = scipy.stats.spearmanr(a, d)
        out.update(pearson=float(p.statistic), pearson_p=float(p.pvalue),
                   spearman=float(s.statistic), spearman_p=float(s.pvalue))
    denom = float(a @ a)
    c_fit = float(a @ d) / denom if denom > 0 else math.nan
    resid = d - c_fit * a
    tot = float(((d - d.mean()) ** 2).sum())
    out["c_fit"] = c_fit
    out["r2_fit"] = 1.0 - float(resid @ resid) / tot if tot > 0 else math.nan
    if a.size >= 2 and np.ptp(a) > 0:
        slope, icpt = np.polyfit(a, d, 1)
        out["slope"], out["intercept"] = float(slope), float(icpt)
    else:
        out["slope"] = out["intercept"] = math.nan
    return out


def _ms(xs) -> str:
    """``mean ± std`` (population std) of the seeds' values; the mean alone for one."""
    xs = list(xs)
    m, sd = mean_std(xs)
    return f"{m:.4g}" if len(xs) == 1 else f"{m:.4g} ± {sd:.2g}"


def markdown(rs: list[dict]) -> str:
    """Per-τ table (mean ± std over seeds), the verdict and the correlations."""
    taus = sorted({r["tau"] for r in rs})
    cols = [("AIE", "aie"), ("E‖z_T−z₀‖", "dist"), ("C₁ (‖κ‖₂ sup)", "C1_spec"),
            ("C₁ (‖κ‖_F sup)", "C1_fro"), ("C₂ (‖v‖₂)", "C2"), ("T (steps)", "T"),
            ("Σγ_eff", "gT_eff"), ("c (‖·‖₂)", "c_spec"), ("bound c·AIE", "bound_spec"),
            ("measured / bound", "ratio_spec"), ("ratio (F-norm)", "ratio_fro"),
            ("E‖e−p_T‖", "energy_end")]
    groups = [[r for r in rs if r["tau"] == t] for t in taus]
    table = md_table(["τ", "seeds"] + [c for c, _ in cols],
                     ([g[0]["tau"], len(g)] + [_ms(r[k] for r in g) for _, k in cols]
                      for g in groups))
    r0 = rs[0]
    parts = [
        f"Prop. 1 per τ, mean ± std over seeds; C₁ on {r0['n_probes']} probe training "
        f"samples ({r0['n_probes'] ** 2} pairs; the mean of ‖κ‖₂ from the diagonal and "
        f"{r0['spec_pairs']} sampled off-diagonal pairs) at the start and end of FT, "
        f"C₂ at both; "
        f"c = Σγ_eff · C₁ · C₂ with Σγ_eff = Σ_t γ_t (1 − β^(t+1))/(1 − β) "
        f"(γ = {r0['lr']:g}, β = {r0['momentum']:g}, cosine, T = steps to the best epoch, "
        f"{r0['steps_per_epoch']} per epoch).",
        table]
    for k, name in (("spec", "spectral-norm C₁"), ("fro", "F-norm C₁")):
        ratios = np.asarray([r[f"ratio_{k}"] for r in rs])
        held = int(np.sum(ratios <= 1.0))
        parts.append(f"**Bound with {name}:** holds in {held}/{len(rs)} runs; measured/bound "
                     f"in [{ratios.min():.3g}, {ratios.max():.3g}] (median {np.median(ratios):.3g}).")
    variants = {"paper's γ·T (peak γ, steps, no momentum)": "gT_plain",
                "Σγ_t (schedule, no momentum)": "gT_sched",
                "γ·(epochs) (T read as epochs)": "gT_epochs"}
    lines = []
    for name, key in variants.items():
        ratios = np.asarray([r["dist"] / (r[key] * r["C1_spec"] * r["C2"] * r["aie"]) for r in rs])
        lines.append(f"- {name}: holds in {int(np.sum(ratios <= 1))}/{len(rs)} runs, "
                     f"ratio in [{ratios.min():.3g}, {ratios.max():.3g}]")
    ratios = np.asarray([r["dist"] / (r["c_mean"] * r["aie"]) for r in rs])
    lines.append(f"- mean over pairs of ‖κ‖₂ instead of the sup (not a bound): holds in "
                 f"{int(np.sum(ratios <= 1))}/{len(rs)} runs, ratio in "
                 f"[{ratios.min():.3g}, {ratios.max():.3g}]")
    parts.append("Other choices of γ·T and C₁ (spectral C₁):\n\n" + "\n".join(lines))
    co = correlations([r["aie"] for r in rs], [r["dist"] for r in rs])
    cs = np.asarray([r["c_spec"] for r in rs])
    parts.append(
        f"**E‖z_T−z₀‖ against AIE across {co['n']} runs:** Pearson r = {co['pearson']:.3f} "
        f"(p = {co['pearson_p']:.2g}), Spearman ρ = {co['spearman']:.3f} "
        f"(p = {co['spearman_p']:.2g}). Fit through the origin: E‖z_T−z₀‖ ≈ "
        f"{co['c_fit']:.4g} · AIE (R² = {co['r2_fit']:.3f}); affine fit "
        f"{co['slope']:.4g} · AIE + {co['intercept']:.4g}; theoretical c (spectral) "
        f"median {np.median(cs):.4g}, range [{cs.min():.4g}, {cs.max():.4g}], "
        f"i.e. {np.median(cs) / co['c_fit']:.3g}x the fitted slope.")
    held = int(np.sum([r["energy_end"] <= r["aie"] for r in rs]))
    parts.append(f"Energy assumption (Eq. 22, checked at the end only): E‖e−p_T‖ ≤ AIE in "
                 f"{held}/{len(rs)} runs.")
    warn = []
    if any(r["weight_decay"] for r in rs):
        warn.append("weight decay > 0 adds a term the bound does not cover")
    if any(r["eta_ft"] != 1.0 for r in rs):
        warn.append("η_FT < 1: FT's gradient carries ‖t − p‖ with smoothed targets t, not ‖e − p‖")
    if warn:
        parts.append("Caveats: " + "; ".join(warn) + ".")
    return "\n\n".join(parts)


def figure(run, rs: list[dict]) -> str:
    """E‖z_T−z₀‖ against AIE per run (coloured by τ), the per-run bounds,
    the mean-c bound lines and the fitted line; returns the path."""
    taus = sorted({r["tau"] for r in rs})
    cmap = plt().get_cmap("viridis", len(taus))
    # one colour per τ: index i of the len(taus)-colour map sits at [i - ½, i + ½]
    norm = {"vmin": -0.5, "vmax": len(taus) - 0.5}
    ci = np.asarray([taus.index(r["tau"]) for r in rs])
    a = np.asarray([r["aie"] for r in rs])
    d = np.asarray([r["dist"] for r in rs])
    co = correlations(a, d)
    grid = np.linspace(0, a.max() * 1.05, 50)
    fig, axes = plt().subplots(1, 2, figsize=(11, 4.3))
    ax = axes[0]
    sc = ax.scatter(a, d, c=ci, cmap=cmap, **norm, s=28, label="measured E‖z_T−z₀‖", zorder=3)
    for k, mk, name in (("spec", "^", "‖κ‖₂"), ("fro", "v", "‖κ‖_F")):
        b = np.asarray([r[f"bound_{k}"] for r in rs])
        ax.scatter(a, b, c=ci, cmap=cmap, **norm, marker=mk, s=22, alpha=0.6,
                   label=f"bound c·AIE per run, C₁ = sup {name}")
        cm = np.mean([r[f"c_{k}"] for r in rs])
        ax.plot(grid[1:], cm * grid[1:], ls="--" if k == "spec" else ":", color="0.4",
                label=f"mean c ({name}) · AIE, c = {cm:.3g}")
    ax.plot(grid[1:], co["c_fit"] * grid[1:], color="C3", label=f"fit {co['c_fit']:.3g} · AIE")
    ax.set_yscale("log")
    ax.set_xlabel("AIE = E‖e_y − p₀‖")
    ax.set_ylabel("E‖z_T − z₀‖ (log)")
    ax.set_title("Prop. 1: measured against the bound")
    ax.legend(fontsize=7, loc="center right")
    ax = axes[1]
    ax.scatter(a, d, c=ci, cmap=cmap, **norm, s=28, zorder=3)
    ax.plot(grid, co["c_fit"] * grid, color="C3",
            label=f"fit through 0: {co['c_fit']:.3g} · AIE (R² = {co['r2_fit']:.2f})")
    if math.isfinite(co["slope"]):
        ax.plot(grid, co["slope"] * grid + co["intercept"], color="C1", ls="--",
                label=f"affine fit: {co['slope']:.3g} · AIE + {co['intercept']:.3g}")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("AIE = E‖e_y − p₀‖")
    ax.set_ylabel("E‖z_T − z₀‖")
    ax.set_title(f"Pearson r = {co['pearson']:.2f}, Spearman ρ = {co['spearman']:.2f}")
    ax.legend(fontsize=8, loc="upper left")
    cb = fig.colorbar(sc, ax=axes, ticks=range(len(taus)), fraction=0.03, pad=0.02)
    cb.ax.set_yticklabels([str(t) for t in taus])
    cb.set_label("τ (HP epochs)")
    path = run.figures("prop1.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the colorbar defeats tight_layout
    plt().close(fig)
    return path


def report(run: RunDir, *, figures: bool = True) -> tuple[list[str], list[str]]:
    """``prop1.md``'s parts and ``figures/prop1.png``, from the records alone."""
    rs = rows(run)
    parts = [f"# Prop. 1 against AIE: {run.path}", markdown(rs)]
    return parts, [figure(run, rs)] if figures else []


EXPERIMENT = Experiment("prop1", Prop1Config, run, report, check=check, doc=__doc__,
                        help="Prop. 1's bound c·AIE against the measured E‖z_T − z_0‖ over τ "
                             "(Sec. 4.1)")
