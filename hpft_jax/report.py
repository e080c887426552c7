"""Tables and figures of a sweep, rebuilt from ``metrics*.jsonl`` alone.

``hpft report RUN_DIR`` never trains: it reads the logged events, averages
over seeds, picks τ* on *validation* accuracy (test accuracy is only
reported), prints a Table-1-style summary and writes the figures.
"""

from __future__ import annotations

import collections
import json
import math
import os

import numpy as np

from hpft_jax import masks
from hpft_jax.outputs import STD_NOTE, mean_std as _mean_std, md_table, plt, publish, save_figure
from hpft_jax.runlog import RunDir

ADAPT = (("dist_sq", "E‖z_T−z_0‖²"), ("norm_sq", "E‖z_T‖²"), ("dot", "E z_Tᵀz_0"),
         ("cos", "E cos(z_T, z_0)"))
# Which z_T the adaptation metrics use: the ft record's key and its wording.
ZT = {"best": ("adapt", "z_T of the best-validation model (the early-stopped one)"),
      "last": ("adapt_last", "z_T of the model at the last FT epoch run")}


def summarize(run: RunDir, *, zt: str = "best") -> dict:
    """Per (variant, τ): seed means and standard deviations of every metric;
    the adaptation metrics of ``zt``'s z_T (:data:`ZT`; records without
    ``adapt_last``, from before it was logged, give NaN for ``last``)."""
    if zt not in ZT:
        raise ValueError(f"zt must be one of {sorted(ZT)}; got {zt!r}")
    field = ZT[zt][0]
    hp_recs = collections.defaultdict(list)
    for r in run.records("hp"):
        hp_recs[(r["variant"], r["tau"])].append(r)
    ft_recs = collections.defaultdict(list)
    for r in run.records("ft"):
        ft_recs[(r["variant"], r["tau"])].append(r)
    out = {}
    for key in sorted(set(hp_recs) | set(ft_recs), key=lambda k: (k[0] != "hp", k)):
        h, f = hp_recs.get(key, []), ft_recs.get(key, [])
        row = {"n_seeds": len(f),
               "hp_train_acc": _mean_std(r["hp_train_acc"] for r in h),
               "aie": _mean_std(r["aie"] for r in f) if f else _mean_std(r["aie_hp"] for r in h),
               "val_acc": _mean_std(r["val_acc"] for r in f),
               "val_loss": _mean_std(r.get("val_loss") for r in f),
               "test_acc": _mean_std(r["test_acc"] for r in f),
               "epochs_run": _mean_std(r["epochs_run"] for r in f)}
        dense = any(f"{field}_dense" in r for r in f)  # segmentation: per location
        for k, _ in ADAPT:
            if dense:  # the per-location metrics lead; the pooled vector's follow
                row[k] = _mean_std((r.get(f"{field}_dense") or {}).get(k, math.nan) for r in f)
                row[f"pooled_{k}"] = _mean_std((r.get(field) or {}).get(k, math.nan)
                                               for r in f)
            else:
                row[k] = _mean_std((r.get(field) or {}).get(k, math.nan) for r in f)
        out[key] = row
    return out


def pick_tau_star(summary: dict) -> int | None:
    """τ with the best mean validation accuracy.

    Small validation sets tie often; ties go to the lower mean validation
    loss, then to the smaller τ. Test accuracy is never looked at.
    """
    cands = [(t, row["val_acc"][0], row["val_loss"][0]) for (v, t), row in summary.items()
             if v == "hp" and not math.isnan(row["val_acc"][0])]
    if not cands:
        return None
    key = lambda c: (-c[1], c[2] if not math.isnan(c[2]) else math.inf, c[0])  # noqa: E731
    return min(cands, key=key)[0]


def _pct(ms: tuple[float, float]) -> str:
    m, s = ms
    return "n/a" if math.isnan(m) else f"{100 * m:6.2f} ± {100 * s:4.2f}"


def _num(ms: tuple[float, float], fmt: str = "{:.4g}") -> str:
    m, s = ms
    return "n/a" if math.isnan(m) else (fmt.format(m) + " ± " + fmt.format(s))


def table1(summary: dict, metric: str = "accuracy") -> str:
    """Markdown, Table-1 layout: downstream *test* ``metric`` (accuracy, or
    the task's metric: :func:`metric_name`), τ* by validation."""
    taus = sorted(t for v, t in summary if v == "hp")
    if not taus:
        return "(no HP runs logged)"
    tmax, tstar = taus[-1], pick_tau_star(summary)
    rows = [("HP-train-acc (τ=%d)" % tmax, _pct(summary[("hp", tmax)]["hp_train_acc"])),
            ("HP0-FT", _pct(summary.get(("hp", 0), {}).get("test_acc", (math.nan, 0)))),
            (f"HP{tmax}-FT", _pct(summary[("hp", tmax)]["test_acc"]))]
    if tstar is not None:
        rows.append((f"HPτ*-FT (τ*={tstar})", _pct(summary[("hp", tstar)]["test_acc"])))
    if ("lshp", tmax) in summary:
        rows.append((f"lsHP{tmax}-FT", _pct(summary[("lshp", tmax)]["test_acc"])))
    return md_table(["", f"test {metric} (%)"], rows)


def sweep_table(summary: dict) -> str:
    """Markdown: every (variant, τ) with energy, accuracies and adaptation."""
    pooled = any("pooled_cos" in row for row in summary.values())
    names = [n for _, n in ADAPT]
    head = ["variant", "τ", "HP-train-acc", "AIE", "FT val", "FT test"] + (
        [f"{n} per location" for n in names] + [f"{n} pooled" for n in names] if pooled
        else names)
    keys = [k for k, _ in ADAPT] + ([f"pooled_{k}" for k, _ in ADAPT] if pooled else [])
    return md_table(head, ([v, t, _pct(row["hp_train_acc"]), _num(row["aie"], "{:.3f}"),
                            _pct(row["val_acc"]), _pct(row["test_acc"])]
                           + [_num(row.get(k, (math.nan, 0)), "{:.4g}") for k in keys]
                           for (v, t), row in summary.items()))


# --------------------------------------------------------------------------
# Figures


def _series(summary, key, variant="hp"):
    pts = sorted((t, row[key]) for (v, t), row in summary.items() if v == variant)
    t = np.array([p[0] for p in pts], dtype=float)
    m = np.array([p[1][0] for p in pts], dtype=float)
    s = np.array([p[1][1] for p in pts], dtype=float)
    return t, m, s


def _tau_axis(ax, taus) -> None:
    """A symlog τ axis (0 and the powers of 2 evenly spaced) with plain tick
    labels at the swept τ, no negative decades, room for the last point."""
    taus = sorted(int(t) for t in taus)
    ax.set_xscale("symlog", linthresh=1, linscale=0.5)
    ax.set_xlim(-0.3, 1.6 * max(taus[-1], 1))
    ticks = [t for i, t in enumerate(taus) if i % 2 == 0 or t == taus[-1]]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(plt().NullLocator())
    ax.set_xlabel("HP epochs τ")
    ax.grid(alpha=0.3)


def _n_seeds(summary: dict) -> int:
    return max((row["n_seeds"] for row in summary.values()), default=0)


def _errplot(ax, summary, key, label=None, scale=1.0, variant="hp", **kw):
    t, m, s = _series(summary, key, variant)
    if variant != "hp":
        t = t * 1.15  # beside the HP point at the same τ, not on it
    if t.size:
        ax.errorbar(t, scale * m, yerr=scale * s, marker=kw.pop("marker", "o"), capsize=3,
                    label=label, **kw)


def figures(run: RunDir, summary: dict, metric: str = "accuracy") -> list[str]:
    """Write the sweep's figures; returns their paths."""
    pyplot = plt()
    paths = []
    taus = [t for v, t in summary if v == "hp"]
    err = f"error bars: {STD_NOTE.replace('seeds', f'{_n_seeds(summary)} seeds')}"

    def save(fig, name):
        paths.append(save_figure(run, fig, name))

    fig, ax = pyplot.subplots(figsize=(5, 3.8))
    _errplot(ax, summary, "aie", label="HP")
    _errplot(ax, summary, "aie", label="lsHP", variant="lshp", marker="s", color="C3")
    ax.set_ylabel("AIE = E‖e_y − p_0‖")
    _tau_axis(ax, taus)
    ax.set_title("Initial energy after HP", fontsize=10)
    ax.legend(fontsize=8, title=err, title_fontsize=7, loc="upper right")
    save(fig, "aie_vs_tau.png")

    fig, axes = pyplot.subplots(2, 2, figsize=(9, 6.5))
    for ax, (k, name) in zip(axes.flat, ADAPT):
        _errplot(ax, summary, k, label="HP")
        _errplot(ax, summary, k, label="lsHP", variant="lshp", marker="s", color="C3")
        ax.set_ylabel(name)
        _tau_axis(ax, taus)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Feature adaptation after FT, against τ ({err})", fontsize=10)
    save(fig, "adaptation_vs_tau.png")

    fig, ax = pyplot.subplots(figsize=(5.5, 4.6))
    _errplot(ax, summary, "val_acc", label="HP-FT validation", scale=100)
    _errplot(ax, summary, "test_acc", label="HP-FT test", scale=100)
    _errplot(ax, summary, "test_acc", label="lsHP-FT test", scale=100, variant="lshp",
             marker="s", color="C3")
    tstar = pick_tau_star(summary)
    if tstar is not None:
        ax.axvline(tstar, color="k", ls=":", label=f"τ* = {tstar} (by validation)")
    ax.set_ylabel(f"{metric} (%)")
    _tau_axis(ax, taus)
    ax.legend(fontsize=7, title=err, title_fontsize=7, ncol=2, loc="upper center",
              bbox_to_anchor=(0.5, -0.2))
    save(fig, "ft_acc_vs_tau.png")

    fts = [r for r in run.records("ft") if r["variant"] == "hp"]
    by_tau = collections.defaultdict(list)
    for r in fts:
        by_tau[r["tau"]].append(r)
    if by_tau:
        taus = sorted(by_tau)
        cols = min(len(taus), 4)
        rows_ = math.ceil(len(taus) / cols)
        fig, axes = pyplot.subplots(rows_, cols, figsize=(3 * cols, 2.3 * rows_), squeeze=False)
        edges = np.linspace(0, 1, len(fts[0]["p0y_hist"]) + 1)
        for ax, t in zip(axes.flat, taus):
            counts = np.sum([r["p0y_hist"] for r in by_tau[t]], axis=0)
            ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge")
            ax.set_title(f"τ = {t}", fontsize=9)
            ax.set_xlabel("p_0[y]", fontsize=8)
        for ax in list(axes.flat)[len(taus):]:
            ax.axis("off")
        fig.suptitle("p_0[y] at the start of FT (all seeds)")
        save(fig, "p0y_hist.png")

        colors = pyplot.cm.viridis(np.linspace(0, 0.95, len(taus)))
        fig, ax = pyplot.subplots(figsize=(5, 3.5))
        for t, c in zip(taus, colors):
            g = [r["grad_v_norm"] for r in by_tau[t] if r.get("grad_v_norm")]
            if g:
                ax.plot(np.mean(g, axis=0), label=f"τ={t}", color=c)
        ax.set_xlabel("FT step")
        ax.set_ylabel("‖∇_v L‖")
        ax.set_yscale("log")
        ax.set_title("Direction term at the start of FT")
        ax.legend(fontsize=7, ncol=2)
        save(fig, "direction.png")

        fig, ax = pyplot.subplots(figsize=(5, 3.5))
        for t, c in zip(taus, colors):
            curves = [r["curves"]["val_acc"] for r in by_tau[t]]
            n = min(len(c) for c in curves)
            ax.plot(100 * np.mean([c[:n] for c in curves], axis=0), label=f"τ={t}", color=c)
        ax.set_xlabel("FT epoch")
        ax.set_ylabel(f"validation {metric} (%)")
        ax.legend(fontsize=7, ncol=2)
        save(fig, "ft_curves.png")

    projs = sorted((r for r in fts if r.get("projection")), key=lambda r: r["tau"])
    if projs:
        save(projection_figure(pyplot, projs), "projection.png")
    if taus and fts:
        seed = min(r["seed"] for r in fts)
        fig = masks.figure(run, (min(taus), tstar, max(taus)), seed)
        if fig is not None:
            save(fig, "masks.png")
    return paths


def projection_figure(pyplot, recs: list[dict], zt: str = "zt_best"):
    """Fig. 3 (middle) / Fig. 11: z_0 of the fixed inputs in its first
    principal plane (one panel, the same for every τ when the backbone is
    shared), then z_T after HPτ-FT for each logged τ in the same coordinates;
    coloured by class."""
    n = len(recs) + 1
    fig, axes = pyplot.subplots(1, n, figsize=(2.9 * n, 3.1), squeeze=False)
    first = recs[0]["projection"]
    pts = [np.asarray(first["z0"])] + [np.asarray(r["projection"][zt]) for r in recs]
    lo, hi = np.min([p.min(0) for p in pts], axis=0), np.max([p.max(0) for p in pts], axis=0)
    pad = 0.05 * (hi - lo + 1e-12)
    titles = ["z_0 (start of FT)"] + [f"z_T, HP{r['tau']}-FT (seed {r['seed']})" for r in recs]
    y = first["y"]
    colour = {"c": "C0"} if y is None else {"c": y, "cmap": "tab10", "vmin": 0, "vmax": 9}
    for ax, p, title in zip(axes.flat, pts, titles):
        ax.scatter(p[:, 0], p[:, 1], s=8, **colour)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
    ev = first["explained"]
    fig.suptitle(f"{len(pts[0])} fixed training inputs in z_0's first two principal components "
                 f"({100 * ev[0]:.0f} % + {100 * ev[1]:.0f} % of z_0's variance)"
                 + ("" if y is None else "; colour = class")
                 + f"; z_T = {'best-validation' if zt == 'zt_best' else 'last-epoch'} model",
                 fontsize=8)
    return fig


def trends(summary: dict) -> list[str]:
    """Plain-language check of the paper's trends (Sec. 4.2, App. C.1)."""
    t, dist, _ = _series(summary, "dist_sq")
    if len(t) < 3:
        return ["(fewer than 3 values of τ: no trend check)"]
    _, cos, _ = _series(summary, "cos")
    _, dot, _ = _series(summary, "dot")
    _, norm, _ = _series(summary, "norm_sq")
    out = []

    def mono(a, sign):
        d = np.diff(a) * sign
        return int(np.sum(d > 0)), len(d)

    k, n = mono(dist, -1)
    out.append(f"E‖z_T−z_0‖² falls with τ in {k}/{n} steps "
               f"({dist[0]:.4g} at τ={t[0]:g} → {dist[-1]:.4g} at τ={t[-1]:g})")
    k, n = mono(cos, +1)
    out.append(f"cos(z_T, z_0) rises with τ in {k}/{n} steps ({cos[0]:.4f} → {cos[-1]:.4f})")
    for name, a in (("E z_Tᵀz_0", dot), ("E‖z_T‖²", norm)):
        i = int(np.argmax(a))
        shape = ("rises then falls (interior maximum at τ=%g)" % t[i]) if 0 < i < len(a) - 1 \
            else ("is largest at τ=%g (no interior maximum)" % t[i])
        out.append(f"{name} {shape}")
    tstar = pick_tau_star(summary)
    if tstar is not None:
        te = {tt: summary[("hp", tt)]["test_acc"][0] for tt in t.astype(int)}
        out.append(f"HPτ*-FT (τ*={tstar}) test {100 * te[tstar]:.2f}% vs HP0-FT "
                   f"{100 * te[int(t[0])]:.2f}% and HP{int(t[-1])}-FT {100 * te[int(t[-1])]:.2f}%")
    return out


def _downstream(path: str) -> str:
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return ""
    return str(cfg.get("sweep", cfg).get("data", {}).get("downstream", ""))


def metric_name(path: str) -> str:
    """The downstream task's metric as the report names it: ``mIoU`` for
    segmentation (``voc:`` data), else ``accuracy`` (graphs: see
    :func:`_metric_note`)."""
    return "mIoU" if _downstream(path).startswith("voc:") else "accuracy"


def _metric_note(path: str) -> list[str]:
    """A line naming the metric behind every "acc" column when it is not
    accuracy (graph data: ROC-AUC, segmentation: mIoU; hpft_jax.tasks);
    nothing otherwise."""
    down = _downstream(path)
    if down.startswith("voc:"):
        return ["Segmentation task: every accuracy-named column below (HP-train-acc, FT val, "
                "FT test) is mIoU × 100 (confusion matrix over the whole split; classes "
                "absent from both labels and predictions left out). FT test = VOC's "
                "val.txt; FT val = a part of train.txt held out for early stopping. "
                "Adaptation metrics (table and figure): per location of the backbone's "
                "feature map, averaged over locations and the first 64 training inputs "
                "(`adapt_dense`); the pooled vector's (`adapt`) follow in the table."]
    if down.startswith("ogb:"):
        return ["Multi-label graph task: every accuracy column below (HP-train-acc, FT val, "
                "FT test) is ROC-AUC × 100, averaged over the tasks with both classes "
                "(OGB's evaluator)."]
    return []


def report(run_dir: str, *, write_figures: bool = True, out=print, zt: str = "best") -> str:
    """Print and write ``report.md`` for a run directory; returns the text.

    ``zt``: which z_T the adaptation columns use (:data:`ZT`); the default,
    ``best``, is the early-stopped model (what the README's table shows)."""
    run = RunDir(run_dir)
    if not os.path.isdir(run.path):
        raise FileNotFoundError(f"no run directory at {run.path}")
    summary = summarize(run, zt=zt)
    if not summary:
        raise ValueError(f"{run.path} has no HP/FT records in metrics*.jsonl yet")
    metric = metric_name(run.path)
    parts = [
        f"# Sweep report: {run.path}",
        f"## Table 1 layout (downstream test {metric}; τ* chosen on validation)",
        *_metric_note(run.path),
        table1(summary, metric),
        f"## Every τ ({STD_NOTE})",
        f"Adaptation columns: {ZT[zt][1]} (`{ZT[zt][0]}`). Both are logged; "
        + ("`hpft report RUN --zt last` shows the last epoch's" if zt == "best" else
           "`hpft report RUN` (default `--zt best`) shows the best-validation model's")
        + ". With early stopping off they are the same model.",
        sweep_table(summary),
        "## Trends (paper: distance falls, cos rises, dot/norm rise then fall)",
        "\n".join("- " + s for s in trends(summary)),
    ]
    return publish(run, "report.md", parts,
                   figures(run, summary, metric) if write_figures else [], out=out)
