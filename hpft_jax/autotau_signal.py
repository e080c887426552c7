"""The autotau signal and rule, from HP records alone (numpy, no JAX).

The HP pass logs, per (seed, τ), the average initial energy AIE(τ) =
E‖e_y − p_0‖₂ (Prop. 1) and the HP train accuracy. From the seed-mean AIE
curve A(τ) on the snapshot grid τ_0 < τ_1 < ... < τ_max:

* ``spent(τ) = (A(τ_0) − A(τ)) / (A(τ_0) − min_τ A)``: the fraction of the
  energy HP can remove that it has removed by τ (0 at τ_0, 1 at the floor).
  It stands for how far the head's direction (the direction term ∇_z q of
  Eq. 2) has moved from its random start toward its converged value.
* ``score(τ) = spent(τ) · A(τ)``: direction consistency times the energy
  that is left for the features (the two factors of Eq. 2's feature update
  that HP controls). τ̂ = argmax score on the grid; ties go to the smaller τ.

Writing A(τ) = A_0 − spent·ΔA (ΔA = A_0 − A_min), the score is maximal at
spent* = min(1, A_0 / (2 ΔA)): the rule has no constant to tune. When HP
removes no energy (ΔA ≤ 0) the direction proxy is undefined and τ̂ is the
smallest τ. See docs/autotau.md.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def by_tau(records: Iterable[dict], variant: str = "hp") -> dict[int, list[dict]]:
    """HP records of ``variant`` grouped by τ (sorted), one per seed."""
    out: dict[int, dict[int, dict]] = {}
    for r in records:
        if r.get("variant", "hp") == variant:
            out.setdefault(int(r["tau"]), {})[int(r["seed"])] = r  # last one wins
    return {t: [out[t][s] for s in sorted(out[t])] for t in sorted(out)}


def spent_fraction(aie: Sequence[float]) -> np.ndarray:
    """(A_0 − A(τ)) / (A_0 − min A) over the grid; NaN everywhere if HP removed no energy."""
    a = np.asarray(aie, dtype=float)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError(f"AIE must be a non-empty 1-D finite sequence; got {aie!r}")
    drop = a[0] - a.min()
    if not drop > 0:
        return np.full_like(a, np.nan)
    return (a[0] - a) / drop


def score(aie: Sequence[float]) -> np.ndarray:
    """spent(τ) · A(τ); NaN where spent is undefined."""
    return spent_fraction(aie) * np.asarray(aie, dtype=float)


def pick_tau_hat(taus: Sequence[int], aie: Sequence[float]) -> int:
    """argmax_τ spent(τ)·A(τ), ties to the smaller τ; the smallest τ if HP
    removed no energy."""
    taus = [int(t) for t in taus]
    if len(taus) != len(aie):
        raise ValueError(f"{len(taus)} taus but {len(aie)} AIE values")
    if taus != sorted(set(taus)):
        raise ValueError(f"taus must be strictly increasing; got {taus}")
    s = score(aie)
    if np.all(np.isnan(s)):
        return taus[0]
    best = np.nanmax(s)
    return next(t for t, v in zip(taus, s) if not math.isnan(v) and v >= best - 1e-12)


def pick_hp_early_stop(taus: Sequence[int], hp_train_acc: Sequence[float]) -> int:
    """The usual early-stopping point of HP on its train accuracy: the smallest
    τ at which the seed-mean HP train accuracy reaches its maximum over the grid."""
    a = np.asarray(hp_train_acc, dtype=float)
    best = np.nanmax(a)
    return int(next(t for t, v in zip(taus, a) if v >= best - 1e-12))


def signal(records: Iterable[dict], seeds: Sequence[int] | None = None) -> dict:
    """The per-τ signal of the ``hp`` records (optionally only ``seeds``).

    Returns ``taus`` and, per τ (lists in τ order): ``aie`` / ``aie_std``,
    ``hp_train_acc`` / ``hp_train_acc_std``, ``hp_train_loss``,
    ``p0y_hist`` (seed-mean counts), ``spent``, ``score``; and ``tau_hat``,
    ``tau_hp_es`` (HP-train-acc early stop), ``spent_target`` =
    min(1, A_0 / (2 ΔA)), ``n_seeds``.
    """
    recs = list(records)
    if seeds is not None:
        keep = {int(s) for s in seeds}
        recs = [r for r in recs if int(r["seed"]) in keep]
    groups = by_tau(recs)
    if not groups:
        raise ValueError("no HP records to compute the autotau signal from")
    n = {len(v) for v in groups.values()}
    if len(n) != 1:
        raise ValueError(f"HP records cover different seeds at different τ: {sorted(n)}")
    taus = list(groups)

    def ms(key):
        vals = [np.asarray([r[key] for r in groups[t]], dtype=float) for t in taus]
        return [float(v.mean()) for v in vals], [float(v.std()) for v in vals]

    aie, aie_std = ms("aie_hp")
    acc, acc_std = ms("hp_train_acc")
    loss, _ = ms("hp_train_loss")
    hist = [np.mean([r["p0y_hist"] for r in groups[t]], axis=0).tolist() for t in taus]
    sp, sc = spent_fraction(aie), score(aie)
    drop = aie[0] - min(aie)
    return {
        "taus": taus, "aie": aie, "aie_std": aie_std, "hp_train_acc": acc,
        "hp_train_acc_std": acc_std, "hp_train_loss": loss, "p0y_hist": hist,
        "spent": [None if math.isnan(v) else float(v) for v in sp],
        "score": [None if math.isnan(v) else float(v) for v in sc],
        "spent_target": (min(1.0, aie[0] / (2 * drop)) if drop > 0 else None),
        "tau_hat": pick_tau_hat(taus, aie), "tau_hp_es": pick_hp_early_stop(taus, acc),
        "n_seeds": n.pop(),
    }


def compute_fraction(epochs_used: Sequence[int], epochs_sweep: Sequence[int]) -> float:
    """FT epochs (hence steps: every run has the same steps per epoch) used by
    autotau over those of the full sweep."""
    used, full = float(np.sum(epochs_used)), float(np.sum(epochs_sweep))
    if not full > 0:
        raise ValueError("the sweep ran no FT epoch")
    return used / full


def compute_fraction_bound(n_runs: int, n_taus: int, n_seeds: int) -> float:
    """Runs autotau finetunes over runs the sweep finetunes, all at max epochs:
    ``n_runs / (n_taus · n_seeds)`` (the sweep's lsHP run is not counted: it
    plays no part in choosing τ)."""
    if n_taus < 1 or n_seeds < 1:
        raise ValueError("the sweep needs at least one τ and one seed")
    return n_runs / (n_taus * n_seeds)
