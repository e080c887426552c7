"""``hpft eq2``: the one-step decomposition of Eq. 2 (App. A, Eqs. 3-10), measured.

Eq. 2 writes the change of a probe's features after one SGD step on a batch
of N examples (the loss is the batch *mean* cross-entropy) as

    z_{t+1}^{(j)} − z_t^{(j)} = (γ/N) Σ_n κ_t^{(j,n)} (∇_z q_t^{(n)})ᵀ (e_{y_n} − p_t^{(n)}) + O(γ²)

with κ^{(j,n)} = ∇_B z_j ∇_B z_nᵀ (h×h, the backbone's eNTK,
:func:`theory.ntk.empirical_ntk_fn`), ∇_z q (k×h: the head kernelᵀ for a
linear head, a per-sample Jacobian for an MLP head) and p = softmax(q). With
FT label smoothing (η_FT < 1) the target η·e_y + (1 − η)/K replaces e_y.

For every τ (HP snapshot) and FT step t it takes the FT state after t steps of
the normal FT optimizer (as ``hpft sweep`` runs it: SGD + momentum, cosine
schedule, the sweep's data order) and the batch that FT step t would use
(its first N examples), then

* **predicts** Δz_j for P fixed probe inputs from Eq. 2;
* takes **one real step**: plain SGD (no momentum, no weight decay), constant
  γ, every parameter updated (the head too; z depends on B only), eval-mode
  forward passes, and measures Δz_j = f(x_j; B − γ∇_B L) − f(x_j; B);
* logs, for each γ of a sweep over decades, the relative error
  ‖pred − real‖/‖real‖ (aggregated over probes, and the mean over probes),
  its fitted slope in log-log (Eq. 2 says ≈ 1: the error is O(γ²) against a
  Δz of O(γ)), and the three terms: energy E‖e_y − p‖ over the batch,
  direction E‖∇_z q‖_F, kernel E‖κ‖_F over the P×N pairs.

ReLU networks are only piecewise smooth: a probe whose ReLU pattern the step
changes (a kink crossed) has a remainder that is not O(γ²) until γ is below
the distance to that kink. For MLP backbones every record counts the flipped
ReLU inputs per probe and also gives the error over the kink-free probes.

The check runs in float64 by default (the model computes in float64 from the
float32 FT state), so round-off does not floor the error; ``--check-dtype float32``
shows the floor.

Where the paper slips (App. A): Eq. 9 writes ∇_b z^{(0)}(∇_b z^{(0)})ᵀ where
Eq. 10 needs ∇_b z^{(0)}(∇_b z^{(n)})ᵀ; Eq. 4 carries a stray factor "a";
Eq. 6's outer transpose makes a 1×hd row of what Eq. 4 calls an hd×1 column;
Eq. 8 bounds with ‖q − e_y‖ (the MSE residual) where cross-entropy has
‖p − e_y‖; and "Equation (10) can be rewritten as" means Eq. (3).

    hpft eq2                                   # τ ∈ {0, 16, 1024}, t ∈ {0, 10, 50}
    hpft eq2 --at-steps 0,20 --gammas 1e-1,1e-2,1e-3 --n-probe 32
    hpft eq2 --check-dtype float32 --name eq2_f32    # the float32 round-off floor
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hpft_jax import ft, prepare, steps
from hpft_jax.config import SweepConfig
from hpft_jax.experiment import Experiment, require_classification, sweep_field
from hpft_jax.flags import option
from hpft_jax.models import MLPBackbone, make_classifier
from hpft_jax.outputs import md_table, plt, save_figure
from hpft_jax.progress import bar
from hpft_jax.rng import FT_DATA, probe_indices, seed_key
from hpft_jax.runlog import RunDir
from theory.ntk import empirical_ntk_fn

Tree = Any
DEFAULT_TAUS = (0, 16, 1024)
DEFAULT_STEPS = (0, 10, 50)
DEFAULT_GAMMAS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
PROBE_SPLITS = ("train", "val", "test")
DTYPES = ("float64", "float32")
_PROBE_TAG = 7  # folded into the seed: the probe draw


@dataclasses.dataclass(frozen=True)
class Eq2Config:
    """``hpft eq2``; ``sweep`` supplies data, model, pretraining, HP, FT, seeds.

    ``sweep.hp.taus``: the HP snapshots to check; ``ls_eta`` must be None
    (no lsHP), ``sweep.ft.patience`` is unused (no early stopping).
    at_steps: FT steps t at which to check (the state after t FT steps);
    gammas: the plain-SGD learning rates γ of the one step;
    n_probe: P probe inputs (fixed per seed, from ``probe_split``);
    n_batch: N, the first N examples of FT step t's batch (None: all of it);
    check_dtype: "float64" (model and check in float64) or "float32".
    """

    sweep: SweepConfig = sweep_field("eq2", seeds=(0,), taus=DEFAULT_TAUS, ls_eta=None)
    at_steps: tuple[int, ...] = option(DEFAULT_STEPS, "FT steps t at which to check, e.g. 0,10,50")
    gammas: tuple[float, ...] = option(
        DEFAULT_GAMMAS, "γ of the one plain SGD step, e.g. 1e-1,1e-2,1e-3,1e-4")
    n_probe: int = option(16, "P probe inputs")
    n_batch: int | None = option(
        None, "N: the first N examples of FT step t's batch (default None: all of it)")
    probe_split: str = option("train", f"where the probes come from: {' | '.join(PROBE_SPLITS)}")
    check_dtype: str = option("float64", "precision of the check: float64 | float32 (the FT "
                              "trajectory stays in the model's dtype)")
    ntk_method: str = option("auto", "theory.ntk method: auto | structured | vjp_jvp | jacobian")

    def __post_init__(self):
        st = tuple(self.at_steps)
        if not st:
            raise ValueError("the step list is empty: give FT steps, e.g. --at-steps 0,10,50")
        if any(isinstance(s, bool) or int(s) != s or s < 0 for s in st):
            raise ValueError(f"FT steps must be non-negative integers; got {st}")
        if list(st) != sorted(set(st)):
            raise ValueError(f"FT steps must be strictly increasing; got {st}")
        g = tuple(self.gammas)
        if not g:
            raise ValueError("the γ list is empty")
        if any(not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0) for v in g):
            raise ValueError(f"every γ must be a finite number > 0; got {g}")
        if len(set(g)) != len(g):
            raise ValueError(f"γ values must be distinct; got {g}")
        if int(self.n_probe) != self.n_probe or self.n_probe < 1:
            raise ValueError(f"n_probe must be a positive integer; got {self.n_probe}")
        if self.n_batch is not None and (int(self.n_batch) != self.n_batch or self.n_batch < 1):
            raise ValueError(f"n_batch must be a positive integer or None; got {self.n_batch}")
        if self.probe_split not in PROBE_SPLITS:
            raise ValueError(f"probe_split must be one of {PROBE_SPLITS}; got {self.probe_split!r}")
        if self.check_dtype not in DTYPES:
            raise ValueError(f"dtype must be 'float64' or 'float32'; got {self.check_dtype!r}")
        if self.sweep.ls_eta is not None:
            raise ValueError("hpft eq2 runs HP only: ls_eta must be None "
                             f"(remove --ls-eta); got {self.sweep.ls_eta}")


def check_sizes(e2: Eq2Config, ft_cfg, *, num_train: int, num_probe_pool: int) -> int:
    """Validate the check against the data and FT schedule; returns N."""
    if e2.n_probe > num_probe_pool:
        raise ValueError(f"n_probe={e2.n_probe} probes requested but the {e2.probe_split} "
                         f"split has only {num_probe_pool} examples")
    n_batch = ft_cfg.batch_size if e2.n_batch is None else e2.n_batch
    if n_batch > ft_cfg.batch_size:
        raise ValueError(f"n_batch={n_batch} exceeds the FT batch size {ft_cfg.batch_size}: "
                         "the check uses (a prefix of) FT step t's batch")
    nb = steps.num_batches(num_train, ft_cfg.batch_size)
    if nb < 1:
        raise ValueError(f"FT batch size {ft_cfg.batch_size} exceeds the {num_train} "
                         "training examples")
    total = ft_cfg.epochs * nb
    bad = [s for s in e2.at_steps if s >= total]
    if bad:
        raise ValueError(f"FT steps {bad} are past the FT schedule: {ft_cfg.epochs} epochs x "
                         f"{nb} batches = {total} steps (use steps < {total})")
    return n_batch


# --------------------------------------------------------------------------
# The three terms of Eq. 2 and the prediction


def soft_targets(y, num_classes: int, eta: float, dtype):
    """(N,) labels -> (N, K) ``η·e_y + (1 − η)/K`` in ``dtype``."""
    onehot = jax.nn.one_hot(y, num_classes, dtype=dtype)
    return jnp.asarray(eta, dtype) * onehot + jnp.asarray((1.0 - eta) / num_classes, dtype)


def direction(head_apply: Callable, head_params, z):
    """∇_z q per sample: (N, K, h) for ``head_apply(head_params, z (N, h)) -> (N, K)``.

    For a linear head q = zW + b every slice is Wᵀ; for an MLP head it is
    the per-sample Jacobian (footnote 3).
    """
    one = lambda zi: head_apply(head_params, zi[None])[0]  # noqa: E731
    return jax.vmap(jax.jacrev(one))(z)


def drift(kappa, jac, resid):
    """Eq. 2 per unit γ: (1/N) Σ_n κ^{(j,n)} (∇_z q^{(n)})ᵀ r_n -> (P, h).

    kappa (P, N, h, h), jac (N, K, h), resid r = target − p (N, K).
    """
    hi = jax.lax.Precision.HIGHEST
    v = jnp.einsum("nkd,nk->nd", jac, resid, precision=hi)  # (∇_z q)ᵀ r, (N, h)
    return jnp.einsum("jncd,nd->jc", kappa, v, precision=hi) / jac.shape[0]


def mean_ce(logits, targets):
    """Batch-mean softmax cross-entropy in the logits' dtype (no float32 cast)."""
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


class Checker:
    """The one-step check for one model (and dtype), compiled once.

    ``checker(params, stats, x_probe, x_batch, targets, gammas, x_train,
    t_train)`` -> dict of device arrays: ``drift`` (P, h), the Eq. 2
    prediction per unit γ from κ = :func:`theory.ntk.empirical_ntk_fn` of the
    backbone's params (eval mode, BatchNorm statistics fixed); ``real``
    (G, P, h), Δz after one plain SGD step of each γ on the batch, every
    parameter updated; ``flips`` (G, P), the ReLU inputs of each probe whose
    sign the step changed (MLP backbones; zeros otherwise); the terms
    ``energy``, ``direction``, ``kernel``, ``cs_bound`` (Prop. 1's
    Cauchy-Schwarz bound on ‖Δz‖/γ for one step); and energy, loss and accuracy on
    (x_train, t_train). ``params``/``stats`` are the classifier's variables.
    """

    def __init__(self, model, *, ntk_method: str = "auto"):
        self.model = model
        bb, hd = model.backbone, model.head
        self.counts_kinks = isinstance(bb, MLPBackbone)

        def feats(pb, sb, x):
            return bb.apply(steps.variables(pb, sb), x, train=False)

        def head_apply(ph, z):
            return hd.apply({"params": ph}, z, train=False)

        def preacts(pb, sb, x):
            """The MLP's ReLU inputs (every Dense output), [(N, width)]; [] otherwise."""
            if not self.counts_kinks:
                return []
            _, st = bb.apply(steps.variables(pb, sb), x, train=False, mutable=["intermediates"],
                             capture_intermediates=lambda m, name: isinstance(m, nn.Dense))
            inter = st["intermediates"]
            return [inter[bb.block_name(i)]["__call__"][0] for i in range(bb.num_blocks)]

        self.feats, self.head_apply, self.preacts = feats, head_apply, preacts

        def check(params, stats, x_probe, x_batch, targets, gammas, x_train, t_train):
            sb = stats.get("backbone", {}) if stats else {}
            ntk = empirical_ntk_fn(lambda p, x: feats(p, sb, x), method=ntk_method)
            kappa = ntk(params["backbone"], x_probe, x_batch)  # (P, N, h, h)
            zb = feats(params["backbone"], sb, x_batch)
            q = head_apply(params["head"], zb)
            resid = targets - jax.nn.softmax(q, axis=-1)
            jac = direction(head_apply, params["head"], zb)

            def loss(p):
                logits, _ = model.apply(steps.variables(p, stats), x_batch, train=False)
                return mean_ce(logits, targets)

            g = jax.grad(loss)(params)
            z0 = feats(params["backbone"], sb, x_probe)
            a0 = preacts(params["backbone"], sb, x_probe)

            def after(gamma):
                new = jax.tree_util.tree_map(lambda a, d: a - gamma * d, params, g)
                a1 = preacts(new["backbone"], sb, x_probe)
                flips = sum(jnp.sum((u > 0) != (v > 0), axis=-1) for u, v in zip(a0, a1))
                return (feats(new["backbone"], sb, x_probe) - z0,
                        flips + jnp.zeros(x_probe.shape[0], jnp.int32))

            real, flips = jax.lax.map(after, gammas)
            logits, _ = model.apply(steps.variables(params, stats), x_train, train=False)
            return {
                "drift": drift(kappa, jac, resid), "real": real, "flips": flips,
                "energy": jnp.linalg.norm(resid, axis=-1).mean(),
                "direction": jnp.sqrt(jnp.sum(jac**2, axis=(1, 2))).mean(),
                "kernel": jnp.sqrt(jnp.sum(kappa**2, axis=(2, 3))).mean(),
                # the Cauchy-Schwarz chain of Prop. 1's proof (Eqs. 16-20), one step:
                # (1/N) Σ_n ‖κ_jn‖_F ‖∇_z q_n‖_F ‖r_n‖, mean over probes
                "cs_bound": jnp.mean(jnp.sqrt(jnp.sum(kappa**2, axis=(2, 3)))
                                     @ (jnp.sqrt(jnp.sum(jac**2, axis=(1, 2)))
                                        * jnp.linalg.norm(resid, axis=-1))) / x_batch.shape[0],
                "batch_loss": mean_ce(q, targets),
                "z_norm": jnp.linalg.norm(z0, axis=-1).mean(),
                "energy_train": jnp.linalg.norm(t_train - jax.nn.softmax(logits, -1),
                                                axis=-1).mean(),
                "loss_train": mean_ce(logits, t_train),
                "acc_train": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(t_train, -1)),
            }

        self._check = jax.jit(check)

    def __call__(self, params, stats, x_probe, x_batch, targets, gammas, x_train, t_train):
        return self._check(params, stats, x_probe, x_batch, targets, gammas, x_train, t_train)


def relative_errors(pred, real):
    """``(aggregated (G,), mean over probes (G,), cos (G,))`` for pred, real (G, P, h).

    aggregated = ‖pred − real‖_F / ‖real‖_F over all probes; mean = mean_j
    ‖pred_j − real_j‖/‖real_j‖; cos = ⟨pred, real⟩_F / (‖pred‖_F ‖real‖_F).
    """
    pred, real = np.asarray(pred, np.float64), np.asarray(real, np.float64)
    if pred.shape != real.shape or pred.ndim != 3:
        raise ValueError(f"pred and real must both be (G, P, h); got {pred.shape}, {real.shape}")
    diff = np.linalg.norm((pred - real).reshape(len(pred), -1), axis=1)
    rn = np.linalg.norm(real.reshape(len(real), -1), axis=1)
    pn = np.linalg.norm(pred.reshape(len(pred), -1), axis=1)
    agg = diff / rn
    mean = (np.linalg.norm(pred - real, axis=2) / np.linalg.norm(real, axis=2)).mean(axis=1)
    cos = np.sum((pred * real).reshape(len(pred), -1), axis=1) / (pn * rn)
    return agg, mean, cos


def smooth_errors(pred, real, flips):
    """Aggregated relative error over the probes whose ReLU pattern the step left
    unchanged (``flips[g, j] == 0``), per γ; NaN where every probe flipped.

    On those probes the MLP is a polynomial in the weights, so the remainder
    of Eq. 2 is exactly of second order; a probe that crosses a kink is not.
    """
    pred, real = np.asarray(pred, np.float64), np.asarray(real, np.float64)
    keep = np.asarray(flips) == 0
    num = np.sum(np.sum((pred - real) ** 2, axis=2) * keep, axis=1)
    den = np.sum(np.sum(real**2, axis=2) * keep, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(keep.any(axis=1), np.sqrt(num / den), np.nan)


def _finite_slope(g, e):
    ok = np.isfinite(e)
    return fit_slope(np.asarray(g)[ok], np.asarray(e)[ok])[0] if ok.sum() >= 2 else None


def fit_slope(gammas, errors) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of log10(error) against log10(γ)."""
    g = np.log10(np.asarray(gammas, np.float64))
    e = np.log10(np.asarray(errors, np.float64))
    if g.size < 2:
        return math.nan, math.nan
    slope, icpt = np.polyfit(g, e, 1)
    return float(slope), float(icpt)


# --------------------------------------------------------------------------
# The check at one FT state


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def check_state(checker: Checker, params, stats, x_probe, x_batch, y_batch, gammas, *,
                num_classes: int, eta: float, dtype: str, train_x=None, train_y=None,
                arrays: bool = False) -> dict:
    """The whole check at one FT state; a host-side summary dict (JSON-able).

    ``params``/``stats``: the classifier's variables (any float dtype; cast
    to ``dtype``); call under ``jax.enable_x64(True)`` for float64.
    ``train_x/train_y``: where to measure energy, loss and accuracy (default:
    the batch). ``arrays=True`` adds ``pred`` (G, P, h) and ``real``.
    """
    dt = jnp.dtype(dtype)
    params, stats = _cast(params, dt), _cast(stats, dt)
    xp, xb = jnp.asarray(x_probe, dt), jnp.asarray(x_batch, dt)
    tgt = soft_targets(jnp.asarray(y_batch), num_classes, eta, dt)
    if train_x is None:
        xt, tt = xb, tgt
    else:
        xt = jnp.asarray(train_x, dt)
        tt = soft_targets(jnp.asarray(train_y), num_classes, eta, dt)
    g = np.asarray(gammas, np.float64)
    t = checker(params, stats, xp, xb, tgt, jnp.asarray(g, dt), xt, tt)
    d = np.asarray(t["drift"], np.float64)
    real, flips = np.asarray(t["real"], np.float64), np.asarray(t["flips"])
    pred = g[:, None, None] * d[None]
    agg, mean, cos = relative_errors(pred, real)
    per = np.linalg.norm(pred - real, axis=2) / np.linalg.norm(real, axis=2)  # (G, P)
    slope, icpt = fit_slope(g, agg)
    smooth = smooth_errors(pred, real, flips) if checker.counts_kinks else None
    out = {
        "gammas": g.tolist(), "rel_err": agg.tolist(), "rel_err_mean": mean.tolist(),
        "rel_err_median": np.median(per, axis=1).tolist(), "rel_err_probe": per.tolist(),
        "cos": cos.tolist(), "slope": slope, "intercept": icpt,
        "kink_flips": flips.tolist() if checker.counts_kinks else None,
        "kink_probes": (flips > 0).sum(axis=1).tolist() if checker.counts_kinks else None,
        "rel_err_smooth": None if smooth is None else [None if np.isnan(v) else v
                                                       for v in smooth.tolist()],
        "slope_smooth": None if smooth is None else _finite_slope(g, smooth),
        "pred_norm": (g * np.linalg.norm(d, axis=1).mean()).tolist(),
        "real_norm": np.linalg.norm(real, axis=2).mean(axis=1).tolist(),
        "drift_norm": float(np.linalg.norm(d, axis=1).mean()),
    }
    out.update({k: float(t[k]) for k in ("energy", "direction", "kernel", "cs_bound", "batch_loss",
                                         "z_norm", "energy_train", "loss_train", "acc_train")})
    if arrays:
        out.update(pred=pred, real=real)
    return out


# --------------------------------------------------------------------------
# The experiment


def _key(e2: Eq2Config, tau: int, seed: int, step: int, n_batch: int) -> tuple:
    return (int(tau), int(seed), int(step), e2.check_dtype, int(e2.n_probe), int(n_batch),
            e2.probe_split, tuple(float(g) for g in e2.gammas))


def _rec_key(r: dict) -> tuple:
    return (r["tau"], r["seed"], r["step"], r["dtype"], r["n_probe"], r["n_batch"],
            r["probe_split"], tuple(r["gammas"]))


def check(cfg: Eq2Config, loaded: prepare.Loaded) -> None:
    """Probe count, batch prefix and FT steps must fit the data and FT schedule."""
    require_classification(loaded, "hpft eq2 (Eq. 2's residual e_y − p of a softmax)")
    check_sizes(cfg, cfg.sweep.ft, num_train=loaded.num_train,
                num_probe_pool=getattr(loaded.ds, cfg.probe_split).x.shape[0])


def run(cfg: Eq2Config, run: RunDir, loaded: prepare.Loaded, *, progress: bool = True) -> None:
    """Run (or continue) the check into ``run``; logged entries are skipped.

    The FT state at step t is the sweep's FT (:func:`hpft_jax.ft.make_ft_steps`:
    its optimizer, schedule, batches and keys) from the HP snapshot at τ
    (:func:`hpft_jax.prepare.prepare`), without early stopping.
    """
    sw, ds = cfg.sweep, loaded.ds
    pool = getattr(ds, cfg.probe_split)
    n = loaded.num_train
    n_batch = check_sizes(cfg, sw.ft, num_train=n, num_probe_pool=pool.x.shape[0])
    done = {_rec_key(r) for r in run.records("eq2")}
    todo = [(t, s) for t in sw.hp.taus for s in sw.seeds
            if any(_key(cfg, t, s, st, n_batch) not in done for st in cfg.at_steps)]
    if not todo:
        return
    prep = prepare.prepare(sw, run, loaded=loaded, progress=progress)
    hp_acc = {(r["tau"], r["seed"]): r for r in run.records("hp") if r["variant"] == "hp"}
    # no mesh: the state stays on one device, where the check reads it
    fts = ft.make_ft_steps(loaded.model, sw.ft, num_classes=ds.num_classes, num_train=n,
                           augment=sw.data.augment)
    xs, ys = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    dtype = cfg.check_dtype
    model_chk = make_classifier(dataclasses.replace(sw.model, dtype=dtype), ds.num_classes)
    x64 = dtype == "float64"
    with jax.enable_x64(x64):
        checker = Checker(model_chk, ntk_method=cfg.ntk_method)
    pb = bar(len(todo) * len(cfg.at_steps), "eq2 check", enabled=progress, unit="state")
    for tau, seed in todo:
        key = seed_key(seed, FT_DATA)
        # host copies: fts.run donates the state, and the frozen backbone
        # leaves of prep.init are shared by every run
        params0, stats0 = jax.device_get(prep.init(prepare.RunKey("hp", seed, tau)))
        state = steps.init_state(params0, stats0, fts.tx)
        pidx = probe_indices(pool.x.shape[0], cfg.n_probe, seed=[int(seed), _PROBE_TAG],
                             what="n_probe")
        at = 0
        for st in cfg.at_steps:
            state, _ = fts.run(state, xs, ys, key, at, st)
            at = st
            if _key(cfg, tau, seed, st, n_batch) in done:
                pb.update()
                continue
            bidx = np.asarray(fts.batch(key, st))[:n_batch]
            t0 = time.perf_counter()
            with jax.enable_x64(x64):
                out = check_state(checker, jax.device_get(state.params),
                                  jax.device_get(state.batch_stats), pool.x[pidx],
                                  ds.train.x[bidx], ds.train.y[bidx], cfg.gammas,
                                  num_classes=ds.num_classes, eta=sw.ft.eta, dtype=dtype,
                                  train_x=ds.train.x, train_y=ds.train.y)
            h = hp_acc.get((tau, seed), {})
            run.log("eq2", tau=int(tau), seed=int(seed), step=int(st), dtype=dtype,
                    n_probe=int(cfg.n_probe), n_batch=int(n_batch), probe_split=cfg.probe_split,
                    eta_ft=float(sw.ft.eta), head=sw.model.head,
                    hp_train_acc=h.get("hp_train_acc"), n_train=int(n),
                    n_batches_per_epoch=fts.num_batches,
                    probe_indices=pidx.tolist(), batch_indices=bidx.tolist(),
                    wall_s=time.perf_counter() - t0, **out)
            pb.update()
    pb.close()


# --------------------------------------------------------------------------
# Report


def records(run, dtype: str | None = None) -> list[dict]:
    """The latest ``eq2`` record per entry, sorted by (dtype, τ, seed, step)."""
    by = {}
    for r in run.records("eq2"):
        if dtype is None or r["dtype"] == dtype:
            by[_rec_key(r)] = r
    return sorted(by.values(), key=lambda r: (r["dtype"], r["tau"], r["seed"], r["step"],
                                              r["n_probe"], r["n_batch"]))


def _f(v, fmt="{:.3f}") -> str:
    """``v`` formatted, or "n/a" for None and NaN."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _values(vals) -> np.ndarray:
    """A logged list with None for NaN, as float64."""
    return np.asarray([math.nan if v is None else v for v in vals], np.float64)


def _setting(r: dict) -> list:
    return [r["dtype"], r["tau"], r["seed"], r["step"]]


def terms_table(recs: list[dict]) -> str:
    """Markdown: the three terms of Eq. 2 and ‖Δz‖/γ, one row per setting."""
    head = ["dtype", "τ", "seed", "step", "HP-train-acc", "train acc at t",
            "energy E‖e_y−p‖", "direction E‖∇_z q‖_F", "kernel E‖κ‖_F", "E‖z‖",
            "‖Δz‖/γ pred", "‖Δz‖/γ real (γ min)", "C-S bound /γ"]

    def row(r):
        i = int(np.argmin(r["gammas"]))
        acc = r.get("hp_train_acc")
        return _setting(r) + [
            "n/a" if acc is None else f"{100 * acc:.1f} %", f"{100 * r['acc_train']:.1f} %",
            f"{r['energy']:.4f}", f"{r['direction']:.3f}", f"{r['kernel']:.4g}",
            f"{r['z_norm']:.3g}", f"{r['drift_norm']:.4g}",
            f"{r['real_norm'][i] / r['gammas'][i]:.4g}", _f(r.get("cs_bound"), "{:.4g}")]

    return md_table(head, (row(r) for r in recs))


def error_table(recs: list[dict], key: str = "rel_err", *, slopes: bool = True) -> str:
    """Markdown: relative error per γ, with (k/P) = probes whose ReLU pattern
    the step changed, and the fitted slopes."""
    if not recs:
        return "(no eq2 records)"
    gammas = recs[0]["gammas"]
    head = (["dtype", "τ", "seed", "step"] + [f"γ={g:g}" for g in gammas]
            + (["slope", "slope (no kink)"] if slopes else []))

    def row(r):
        errs = dict(zip(r["gammas"], r[key] or [None] * len(r["gammas"])))
        kinks = dict(zip(r["gammas"], r.get("kink_probes") or [None] * len(r["gammas"])))
        cells = _setting(r) + [_f(errs.get(g), "{:.2e}") + (
            "" if kinks.get(g) is None else f" ({kinks[g]}/{r['n_probe']})") for g in gammas]
        return cells + ([_f(r["slope"]), _f(r.get("slope_smooth"))] if slopes else [])

    return md_table(head, (row(r) for r in recs))


def pooled_slope(recs: list[dict], key: str = "rel_err") -> float:
    """One slope over every record's (log γ, log rel. err), intercepts per record."""
    xs, ys = [], []
    for r in recs:
        if not r.get(key):
            continue
        e = _values(r[key])
        ok = np.isfinite(e) & (e > 0)
        if ok.sum() < 2:
            continue
        g = np.log10(np.asarray(r["gammas"])[ok])
        e = np.log10(e[ok])
        xs.append(g - g.mean())
        ys.append(e - e.mean())
    if not xs:
        return math.nan
    x, y = np.concatenate(xs), np.concatenate(ys)
    return float(np.sum(x * y) / np.sum(x * x))


def figure(run, recs: list[dict]) -> str:
    """Rel. error vs γ (log-log; all probes, and probes whose ReLU pattern is
    unchanged) per τ/step with a slope-1 guide; the three terms and ‖Δz‖/γ
    against the FT step, per τ."""
    fig = plt().figure(figsize=(17, 5.6))
    # fixed margins: tight_layout (and mathtext tick labels) cost seconds here
    gs = fig.add_gridspec(2, 6, left=0.05, right=0.99, bottom=0.09, top=0.93,
                          wspace=0.45, hspace=0.45)
    plain = plt().FuncFormatter(lambda v, _: f"{v:g}")
    taus = sorted({r["tau"] for r in recs})
    stps = sorted({r["step"] for r in recs})
    colors = {t: plt().cm.viridis(0.9 * i / max(len(taus) - 1, 1)) for i, t in enumerate(taus)}
    markers = dict(zip(stps, "osD^v<>ph*"))
    styles = {"float64": "-", "float32": ":"}
    g_all = np.asarray(sorted({v for r in recs for v in r["gammas"]}))
    left = [("rel_err", "all probes"), ("rel_err_smooth", "probes with no ReLU kink crossed")]
    for col, (key, title) in enumerate(left):
        ax = fig.add_subplot(gs[:, 2 * col:2 * col + 2])
        logs = []
        for r in recs:
            if not r.get(key):
                continue
            e = _values(r[key])
            if r["dtype"] == "float64":
                logs += list(np.log(e[np.isfinite(e)]))
            ax.loglog(r["gammas"], e, styles.get(r["dtype"], "-"),
                      marker=markers.get(r["step"], "o"), color=colors[r["tau"]], ms=4,
                      label=f"τ={r['tau']} t={r['step']}"
                            + ("" if r["dtype"] == "float64" else f" ({r['dtype']})")
                            + (f" seed {r['seed']}" if r["seed"] else ""))
        if logs:
            mid = np.exp(np.mean(logs)) / np.exp(np.mean(np.log(g_all)))
            ax.loglog(g_all, mid * g_all, "k--", lw=1, label="slope 1")
        ax.set_xlabel("γ (one plain SGD step)")
        ax.set_ylabel("‖Δz_pred − Δz_real‖_F / ‖Δz_real‖_F")
        ax.set_title(f"Eq. 2 error: {title}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        if col == 0:
            ax.legend(fontsize=6, ncol=2)
    panels = (("energy", "energy E‖e_y − p‖", "log"),
              ("direction", "direction E‖∇_z q‖_F", "linear"),
              ("kernel", "kernel E‖κ‖_F", "linear"),
              ("drift_norm", "E‖Δz‖/γ (pred x, real o)", "log"))
    dt = "float64" if any(r["dtype"] == "float64" for r in recs) else recs[0]["dtype"]
    main = [r for r in recs if r["dtype"] == dt and r["seed"] == recs[0]["seed"]]
    for k, (key, title, scale) in enumerate(panels):
        a = fig.add_subplot(gs[k // 2, 4 + k % 2])
        for t in taus:
            rs = sorted((r for r in main if r["tau"] == t), key=lambda r: r["step"])
            x = [r["step"] for r in rs]
            a.plot(x, [r[key] for r in rs], marker="x" if key == "drift_norm" else "o",
                   color=colors[t], label=f"τ={t}", ms=4)
            if key == "drift_norm":
                i = [int(np.argmin(r["gammas"])) for r in rs]
                a.plot(x, [r["real_norm"][j] / r["gammas"][j] for r, j in zip(rs, i)], "o",
                       mfc="none", color=colors[t], ms=7)
        a.set_title(title, fontsize=9)
        a.set_xticks(stps)
        a.set_yscale(scale)
        a.set_xlabel("FT step t", fontsize=8)
        a.grid(alpha=0.3)
        if scale == "log":
            a.yaxis.set_major_locator(plt().LogLocator(subs=(1.0, 2.0, 5.0)))
            a.yaxis.set_major_formatter(plain)
            a.yaxis.set_minor_formatter(plt().NullFormatter())
        if k == 0:
            a.legend(fontsize=7)
    return save_figure(run, fig, "eq2.png", tight=False)


def report(run: RunDir, *, figures: bool = True) -> tuple[list[str], list[str]]:
    """``eq2.md``'s parts and ``figures/eq2.png``, from the records alone."""
    recs = records(run)
    if not recs:
        raise ValueError(f"{run.path} has no eq2 records yet")
    r0 = recs[0]
    parts = [f"# Eq. 2 one-step check: {run.path}",
             f"P = {r0['n_probe']} probes ({r0['probe_split']} split), N = {r0['n_batch']} "
             f"(FT step t's batch), η_FT = {r0['eta_ft']:g}"
             + (" (the smoothed target replaces e_y)" if r0["eta_ft"] < 1 else "")
             + f", {r0['head']} head. One plain SGD step of size γ from the FT state at step t.",
             "## The terms of Eq. 2", terms_table(recs),
             "## Relative error ‖pred − real‖_F / ‖real‖_F over the probes",
             "(k/P): probes whose ReLU pattern the step changed (MLP backbones). Slopes: "
             "least-squares fit of log rel. err against log γ; Eq. 2 says 1.",
             error_table(recs, "rel_err")]
    if any(r.get("rel_err_smooth") for r in recs):
        parts += ["## Relative error over the probes with no ReLU kink crossed",
                  error_table(recs, "rel_err_smooth", slopes=False)]
    lines = []
    for dt in sorted({r["dtype"] for r in recs}):
        rs = [r for r in recs if r["dtype"] == dt]
        smooth = pooled_slope(rs, "rel_err_smooth")
        lines.append(f"- {dt}, {len(rs)} settings: pooled slope {pooled_slope(rs):.3f} (all probes)"
                     + ("" if math.isnan(smooth) else
                        f", {smooth:.3f} (probes with no kink crossed)"))
    parts += ["## Pooled slopes", "\n".join(lines)]
    return parts, [figure(run, recs)] if figures else []


EXPERIMENT = Experiment("eq2", Eq2Config, run, report, check=check, doc=__doc__,
                        help="one-step check of the Eq. 2 decomposition (kernel, direction, "
                             "energy) against a real SGD step, over γ")
