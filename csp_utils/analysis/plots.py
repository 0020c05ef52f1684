"""Reliability diagrams and the study's figures. Every function returns a Figure.

Inputs are plain arrays or pandas DataFrames; confidences are fractions in [0, 1]
(divide data percents by 100). Missing confidences (None/NaN) are dropped where a plot
shows calibration, and the coverage of parsed values is printed on the panel.
:func:`save_figure` writes PNG (150 dpi) and PDF.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

# Headless Linux without a backend choice: use Agg. Never override a backend the user,
# the test suite (MPLBACKEND=Agg) or Jupyter (inline) has chosen.
if (
    not os.environ.get("MPLBACKEND")
    and "matplotlib.pyplot" not in sys.modules
    and sys.platform.startswith("linux")
    and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from mpl_toolkits.axes_grid1 import make_axes_locatable  # noqa: E402

from csp_utils.core import metrics

FONT = 11  # axis labels and titles; ticks and annotations use FONT - 1 (never below 10)
BAR_COLOR = "#1f5fa8"
GAP_COLOR = "#d62728"
BETTER_COLOR = "#2ca02c"
PALETTE = plt.get_cmap("tab10")
MARKERS = ("o", "s", "^", "D", "v", "P")
LINESTYLES = ("-", "--", ":", "-.")


def _style(ax) -> None:
    ax.tick_params(labelsize=FONT - 1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# ----------------------------------------------------------------------- saving
METRIC_LABELS = {"ece": "ECE (10 bins)", "ece15": "ECE (15 bins)", "adaptive_ece": "adaptive ECE", "mce": "MCE", "brier": "Brier score",
                 "auroc": "AUROC", "auroc_within": "within-set AUROC", "accuracy": "accuracy", "f1": "F1",
                 "nll": "NLL", "aurc": "AURC", "eaurc": "excess AURC", "prr": "PRR", "sel_acc50": "accuracy at 50% coverage",
                 "sel_acc80": "accuracy at 80% coverage", "sel_acc90": "accuracy at 90% coverage"}


def metric_label(metric) -> str:
    """How a metric's column name reads in a figure (``"ece"`` -> ``"ECE"``)."""
    return METRIC_LABELS.get(str(metric), str(metric))


def save_figure(fig: Figure, path_without_suffix: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<path>.png`` (150 dpi) and ``<path>.pdf``, creating folders; returns both paths.

    A trailing ``.png`` / ``.pdf`` is tolerated and replaced; any other dot stays part of
    the name (``ece_0.5`` -> ``ece_0.5.png``).
    """
    base = Path(path_without_suffix)
    if base.suffix.lower() in (".png", ".pdf"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = Path(f"{base}.png"), Path(f"{base}.pdf")
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None})  # same figure, same bytes
    return png, pdf


# ------------------------------------------------------------ reliability diagram
def _draw_reliability(ax, conf, correct, n_bins: int = 10, title: str | None = None) -> list:
    """Guo et al. (2017) style panel into ``ax``, with the confidence histogram beneath.

    Returns the axes drawn on (panel, histogram); their legend entries are the caller's to place.
    """
    c, y, coverage = metrics.drop_missing(conf, correct)
    ax.plot([0, 1], [0, 1], ls="--", color="0.45", lw=1.2, label="Perfect calibration", zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy", fontsize=FONT)
    _style(ax)
    if title:
        ax.set_title(title, fontsize=FONT)
    # the histogram axis shares x and takes over the "Confidence" label
    hax = make_axes_locatable(ax).append_axes("bottom", size="32%", pad=0.12, sharex=ax)
    hax.set_ylabel("Share", fontsize=FONT)
    hax.set_xlabel("Confidence", fontsize=FONT)
    hax.set_ylim(0, 1.0)
    hax.set_xticks([0, 0.5, 1])  # a small panel: fewer ticks, so the labels stay apart
    _style(hax)
    ax.tick_params(labelbottom=False)
    if c.size == 0:  # a model that never gave a parsable confidence still gets a panel
        ax.text(0.5, 0.5, "no parsed confidences\n(coverage 0%)", ha="center", va="center", fontsize=FONT)
        return [ax, hax]

    table = metrics.reliability_table(c, y, n_bins)
    full = table["count"].to_numpy() > 0
    left = table["lower"].to_numpy()
    width = 1.0 / n_bins
    acc = table["accuracy"].fillna(0.0).to_numpy()
    mean_conf = table["mean_confidence"].fillna(0.0).to_numpy()

    ax.bar(left[full], acc[full], width=width, align="edge", color=BAR_COLOR, edgecolor="black",
           linewidth=0.8, label="Accuracy", zorder=1)
    # The gap spans accuracy to the bin's mean confidence: exactly what ECE averages.
    lo, hi = np.minimum(acc, mean_conf), np.maximum(acc, mean_conf)
    ax.bar(left[full], (hi - lo)[full], bottom=lo[full], width=width, align="edge", color=GAP_COLOR,
           alpha=0.3, edgecolor=GAP_COLOR, hatch="//", linewidth=0.8, label="Gap", zorder=2)

    text = f"ECE = {100 * metrics.ece(c, y, n_bins):.1f}%\nn = {c.size}"
    if coverage < 1.0:
        text += f"\ncoverage = {100 * coverage:.0f}%"
    ax.text(0.97, 0.04, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=FONT - 1,
            bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.7"), zorder=4)

    share = table["count"].to_numpy() / c.size
    hax.bar(left, share, width=width, align="edge", color="0.6", edgecolor="black", linewidth=0.8)
    hax.axvline(c.mean(), color="black", ls="--", lw=1.2, label="Mean confidence")
    hax.axvline(y.mean(), color=BAR_COLOR, ls="-", lw=1.5, label="Mean accuracy")
    return [ax, hax]


def reliability_grid(
    groups: Mapping[str, tuple[Sequence, Sequence]],
    n_bins: int = 10,
    ncols: int | None = None,
    suptitle: str | None = None,
) -> Figure:
    """One reliability panel per entry of ``groups`` (title -> (conf, correct)), in order,
    filling rows of ``ncols`` panels; one legend for the whole figure, beneath the panels.
    An entry of ``None`` keeps its place in the grid empty.

    For sets x models, pass the entries model by model with ``ncols`` = number of sets
    (:func:`reliability_matrix` does this from a nested mapping).
    """
    if not groups:
        raise ValueError("groups is empty: pass {title: (conf, correct)}")
    n = len(groups)
    ncols = ncols or min(n, 3)
    nrows = -(-n // ncols)
    legend_cols = min(5, 2 * ncols - 1)  # as wide as the panels, no wider
    legend_rows = -(-5 // legend_cols)
    width, height = 3.0 * ncols, 3.6 * nrows + 0.3 + 0.22 * legend_rows
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    handles: dict = {}
    for ax, (name, data) in zip(axes.flat, groups.items()):
        if data is None:
            ax.set_visible(False)
            continue
        for a in _draw_reliability(ax, *data, n_bins, title=name):
            for h, label in zip(*a.get_legend_handles_labels()):
                handles.setdefault(label, h)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=max(1, min(len(handles), legend_cols)),
               fontsize=FONT - 1, frameon=False)
    top = 1 - (0.75 if suptitle else 0.35) / height  # in inches from the top, whatever the grid's height
    if suptitle:
        fig.suptitle(suptitle, fontsize=FONT + 1, y=1 - 0.15 / height)
    fig.subplots_adjust(wspace=0.45, hspace=0.45, top=top, bottom=(0.7 + 0.22 * legend_rows) / height)
    return fig


def reliability_matrix(cells: Mapping[str, Mapping[str, tuple[Sequence, Sequence]]], n_bins: int = 10,
                       suptitle: str | None = None) -> Figure:
    """Reliability panels as a grid: one row per model, one column per set.

    ``cells``: {model: {set: (conf, correct)}}; a set a model lacks leaves its panel empty.
    """
    if not cells:
        raise ValueError("cells is empty: pass {model: {set: (conf, correct)}}")
    sets = list(dict.fromkeys(s for row in cells.values() for s in row))
    groups = {f"{set_}\n{model}": row.get(set_) for model, row in cells.items() for set_ in sets}
    return reliability_grid(groups, n_bins, ncols=len(sets), suptitle=suptitle)


# --------------------------------------------------------------------- study figures
def ablation_bars(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Horizontal bars per ablation variant, one panel per metric, with interval error bars.

    ``df`` columns: ``name, value, low, high, metric``. NaN low/high draw no error bar.
    Variants keep their order of first appearance.
    """
    need = {"name", "value", "low", "high", "metric"}
    if missing := need - set(df.columns):
        raise ValueError(f"ablation_bars needs columns {sorted(need)}; missing {sorted(missing)}")
    if df.empty:
        raise ValueError("ablation_bars got an empty DataFrame")
    names = list(dict.fromkeys(df["name"]))
    metric_names = list(dict.fromkeys(df["metric"]))
    fig, axes = plt.subplots(1, len(metric_names), figsize=(4.2 * len(metric_names) + 1.5, 0.5 * len(names) + 1.8),
                             sharey=True, squeeze=False)
    ypos = {name: i for i, name in enumerate(names)}
    for j, (ax, metric) in enumerate(zip(axes[0], metric_names)):
        sub = df[df["metric"] == metric]
        y = np.array([ypos[n] for n in sub["name"]])
        v = sub["value"].to_numpy(float)
        low = (v - sub["low"].to_numpy(float)).clip(min=0)
        high = (sub["high"].to_numpy(float) - v).clip(min=0)
        ax.barh(y, v, color=[PALETTE(i % 10) for i in y], alpha=0.85, edgecolor="black", linewidth=0.6)
        has = ~(np.isnan(low) | np.isnan(high))  # a zero-length whisker would still draw its caps
        ax.errorbar(v[has], y[has], xerr=[low[has], high[has]], fmt="none", ecolor="black", capsize=3, lw=1)
        high = np.nan_to_num(high, nan=0.0)
        for yi, vi, hi in zip(y, v, high):
            ax.text(vi + hi, yi, f" {vi:.3f}", va="center", fontsize=FONT - 1)
        ax.set_title(metric_label(metric), fontsize=FONT)
        ax.margins(x=0.25)
        _style(ax)
    axes[0, 0].set_yticks(range(len(names)), [str(n) for n in names])
    axes[0, 0].invert_yaxis()  # first variant on top
    if title:
        fig.suptitle(title, fontsize=FONT + 1)
    fig.tight_layout()
    return fig


def metric_intervals(df: pd.DataFrame, metrics_=("ece", "ece15", "brier", "auroc"), units=None,
                     title: str | None = None, labels: dict | None = None) -> Figure:
    """Dot and whisker per model, one row of panels per set (or pool), one column per metric.

    ``df``: a headline table (``model, set, <metric>, <metric>_low, <metric>_high``), one
    row per model and set. Models keep their order of first appearance. ``labels``: column
    titles by metric, where :data:`METRIC_LABELS` would not say enough.
    """
    need = {"model", "set"} | {f"{m}{x}" for m in metrics_ for x in ("", "_low", "_high")}
    if missing := need - set(df.columns):
        raise ValueError(f"metric_intervals needs columns {sorted(need)}; missing {sorted(missing)}")
    units = list(units) if units is not None else list(dict.fromkeys(df["set"]))
    df = df[df["set"].isin(units)]
    if df.empty:
        raise ValueError("metric_intervals got no rows for the requested sets")
    models = list(dict.fromkeys(df["model"]))
    fig, axes = plt.subplots(len(units), len(metrics_), figsize=(3.4 * len(metrics_) + 1.8, (0.22 * len(models) + 0.5) * len(units) + 1.2),
                             sharey=True, squeeze=False)
    for i, unit in enumerate(units):
        sub = df[df["set"] == unit]
        y = np.array([models.index(m) for m in sub["model"]])
        for j, metric in enumerate(metrics_):
            ax = axes[i, j]
            v = sub[metric].to_numpy(float)
            lo = np.nan_to_num(v - sub[f"{metric}_low"].to_numpy(float), nan=0.0).clip(min=0)
            hi = np.nan_to_num(sub[f"{metric}_high"].to_numpy(float) - v, nan=0.0).clip(min=0)
            ax.errorbar(v, y, xerr=[lo, hi], fmt="o", color=BAR_COLOR, ecolor="black", capsize=2, ms=4, lw=1)
            if i == 0:
                ax.set_title((labels or {}).get(metric, metric_label(metric)), fontsize=FONT)
            if j == 0:
                ax.set_ylabel(unit, fontsize=FONT - 1)
            _style(ax)
        axes[i, 0].set_yticks(range(len(models)), [str(m) for m in models])
    axes[0, 0].invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=FONT + 1)
    fig.tight_layout()
    return fig


def paired_differences(df: pd.DataFrame, metrics_=("ece", "brier", "auroc_within"), title: str | None = None) -> Figure:
    """Forest plot of paired differences (method - reference) with intervals, one panel per metric.

    ``df``: a paired table (``set, method, reference, metric, diff, diff_low, diff_high``).
    A dashed line marks 0; filled markers: the interval excludes 0 (green: better, red: worse).
    """
    need = {"set", "method", "reference", "metric", "diff", "diff_low", "diff_high"}
    if missing := need - set(df.columns):
        raise ValueError(f"paired_differences needs columns {sorted(need)}; missing {sorted(missing)}")
    df = df[df["metric"].isin(metrics_)]
    if df.empty:
        raise ValueError("paired_differences got no rows for the requested metrics")
    labels = list(dict.fromkeys(f"{r.set}: {r.method} - {r.reference}" for r in df.itertuples()))
    fig, axes = plt.subplots(1, len(metrics_), figsize=(3.6 * len(metrics_) + 3.5, 0.3 * len(labels) + 1.8),
                             sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics_):
        sub = df[df["metric"] == metric]
        y = np.array([labels.index(f"{r.set}: {r.method} - {r.reference}") for r in sub.itertuples()])
        v, low, high = (sub[k].to_numpy(float) for k in ("diff", "diff_low", "diff_high"))
        sig = (low > 0) | (high < 0)
        better = (high < 0) if metrics.LOWER_IS_BETTER.get(metric, True) else (low > 0)
        ax.errorbar(v, y, xerr=[np.nan_to_num(v - low).clip(min=0), np.nan_to_num(high - v).clip(min=0)],
                    fmt="none", ecolor="black", capsize=2, lw=1)
        ax.scatter(v[sig & better], y[sig & better], color=BETTER_COLOR, zorder=3, s=18)
        ax.scatter(v[sig & ~better], y[sig & ~better], color=GAP_COLOR, zorder=3, s=18)
        ax.scatter(v[~sig], y[~sig], facecolor="white", edgecolor="black", zorder=3, s=18)
        ax.axvline(0, color="grey", ls="--", lw=0.8)
        direction = "lower is better" if metrics.LOWER_IS_BETTER.get(metric, True) else "higher is better"
        ax.set_title(f"Δ {metric_label(metric)}\n({direction})", fontsize=FONT)
        _style(ax)
    axes[0, 0].set_yticks(range(len(labels)), labels)
    axes[0, 0].invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=FONT + 1)
    fig.tight_layout()
    return fig


def confidence_vs_level(
    df: pd.DataFrame,
    xlabel: str = "Level",
    ylabel: str = "Verbalized confidence",
    diagonal: bool = True,
    title: str | None = None,
    reference: pd.DataFrame | None = None,
) -> Figure:
    """Mean +- std of ``confidence`` per ``level``, one line per ``model``.

    ``df`` columns: ``level, confidence, model``. The y = x diagonal is drawn for reference
    (a model that says exactly the level); pass ``diagonal=False`` when level and
    confidence are not in the same units. ``reference`` (columns ``level, accuracy``, in the
    confidence's units) draws the base model's accuracy per level: the line a calibrated
    confidence follows.
    """
    need = {"level", "confidence", "model"}
    if missing := need - set(df.columns):
        raise ValueError(f"confidence_vs_level needs columns {sorted(need)}; missing {sorted(missing)}")
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    stats = df.groupby(["model", "level"], sort=True)["confidence"].agg(["mean", "std"]).reset_index()
    for i, model in enumerate(dict.fromkeys(df["model"])):
        s = stats[stats["model"] == model]
        x, m, sd = s["level"].to_numpy(float), s["mean"].to_numpy(float), s["std"].fillna(0).to_numpy(float)
        # a line style and marker per model: a line lying under another stays visible
        ax.plot(x, m, marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % len(LINESTYLES)], color=PALETTE(i % 10),
                lw=1.8, ms=6, mfc="none" if i % 2 else PALETTE(i % 10), label=str(model))
        ax.fill_between(x, m - sd, m + sd, color=PALETTE(i % 10), alpha=0.18)
    if diagonal:
        lo = float(min(df["level"].min(), df["confidence"].min()))
        hi = float(max(df["level"].max(), df["confidence"].max()))
        ax.plot([lo, hi], [lo, hi], ls="--", color="0.45", lw=1.2, label="y = x (the paper's target)")
    if reference is not None and len(reference):
        r = reference.sort_values("level")
        ax.plot(r["level"].to_numpy(float), r["accuracy"].to_numpy(float), color="black", lw=2.2,
                label="base model's accuracy (what calibrated says)")
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    if title:
        ax.set_title(title, fontsize=FONT)
    ax.legend(fontsize=FONT - 1, frameon=False)
    _style(ax)
    fig.tight_layout()
    return fig


def confidence_vs_accuracy(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Mean confidence against accuracy, one marker per ``set`` (a degradation) and one colour per
    ``model``; points on the diagonal are calibrated on that set, points above it overconfident.
    ``df`` columns: ``set, model, accuracy, confidence`` (fractions)."""
    need = {"set", "model", "accuracy", "confidence"}
    if missing := need - set(df.columns):
        raise ValueError(f"confidence_vs_accuracy needs columns {sorted(need)}; missing {sorted(missing)}")
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    sets, models = list(dict.fromkeys(df["set"])), list(dict.fromkeys(df["model"]))
    for _, r in df.iterrows():
        i, j = models.index(r["model"]), sets.index(r["set"])
        ax.plot(r["accuracy"], r["confidence"], ls="none", marker=MARKERS[j % len(MARKERS)], ms=8,
                color=PALETTE(i % 10), mfc="none" if i % 2 else PALETTE(i % 10))
    lo = float(min(df["accuracy"].min(), df["confidence"].min(), 0.4))
    ax.plot([lo, 1], [lo, 1], ls="--", color="0.45", lw=1.2)
    handles = [plt.Line2D([], [], color=PALETTE(i % 10), marker="o", ls="none", label=str(m)) for i, m in enumerate(models)]
    handles += [plt.Line2D([], [], color="0.3", marker=MARKERS[j % len(MARKERS)], ls="none", mfc="none",
                           label=str(s)) for j, s in enumerate(sets)]
    ax.legend(handles=handles, fontsize=FONT - 1, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("Accuracy of the base model's answers", fontsize=FONT)
    ax.set_ylabel("Mean confidence", fontsize=FONT)
    if title:
        ax.set_title(title, fontsize=FONT)
    _style(ax)
    fig.tight_layout()
    return fig


def risk_coverage(panels: Mapping[str, Mapping[str, tuple[Sequence, Sequence]]], oracle: str = "oracle",
                  suptitle: str | None = None) -> Figure:
    """Selective risk against coverage: a panel per group of sets, a line per model.

    ``panels``: {panel title: {label: (coverages, risks)}}; the line labelled ``oracle`` (the
    order that keeps every right answer first) is drawn grey and dashed. The legend gives each
    line's area under the curve on its coverage grid (the AURC up to the grid's resolution).
    """
    n_lines = max(len(lines) for lines in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(6.8 * len(panels), 4.4 + 0.22 * n_lines), squeeze=False)
    colors = [PALETTE(k) for k in range(10) if k != 7]   # tab10's grey is the oracle's
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for i, (label, (cov, risk)) in enumerate(lines.items()):
            cov, risk = np.asarray(cov, float), np.asarray(risk, float)
            area = float(np.mean(risk))
            if label == oracle:
                ax.plot(cov, risk, color="0.45", ls="--", lw=1.4, label=f"{label} ({area:.3f})")
                continue
            # a line style per model too: lines that coincide (a monotone recalibration) stay visible
            ax.plot(cov, risk, color=colors[i % len(colors)], ls=LINESTYLES[i % len(LINESTYLES)], lw=1.6,
                    label=f"{label} ({area:.3f})")
        ax.set_xlabel("coverage (share of answers kept, most confident first)", fontsize=FONT)
        ax.set_ylabel("selective risk (error rate of the kept)", fontsize=FONT)
        ax.set_title(title, fontsize=FONT)
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=FONT - 1, frameon=False, title="model (AURC)", title_fontsize=FONT - 1, ncol=2,
                  loc="upper center", bbox_to_anchor=(0.5, -0.16))
        _style(ax)
    if suptitle:
        fig.suptitle(suptitle, fontsize=FONT)
    fig.tight_layout()
    return fig


def internal_vs_verbalized(internal, verbalized, correct=None, title: str | None = None,
                           jitter: float = 0.01, seed: int = 0) -> Figure:
    """Scatter of internal (token-probability) vs verbalized confidence, Spearman in the title.

    Both are fractions in [0, 1]; pairs with a missing value on either side are dropped
    (n is shown). ``correct`` colours right and wrong answers. Verbalized values are
    discrete, so a small fixed-seed vertical ``jitter`` is added for display only;
    Spearman uses the raw values.
    """
    a = np.array([np.nan if pd.isna(v) else v for v in internal], dtype=float)
    b = np.array([np.nan if pd.isna(v) else v for v in verbalized], dtype=float)
    if a.size != b.size:
        raise ValueError(f"internal and verbalized differ in length ({a.size} vs {b.size})")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    rho, p = metrics.spearman(a, b)
    fig, ax = plt.subplots(figsize=(5.0, 4.8))
    shown = b + np.random.default_rng(seed).uniform(-jitter, jitter, b.size) if jitter else b
    if correct is None:
        ax.scatter(a, shown, s=18, alpha=0.5, color=BAR_COLOR, edgecolors="none")
    else:
        y = metrics.as_binary(correct, "correct")
        if y.size != keep.size:
            raise ValueError(f"correct has {y.size} values for {keep.size} pairs")
        y = y[keep]
        for val, color, label in ((1, "#2ca02c", "right"), (0, GAP_COLOR, "wrong")):
            sel = y == val
            ax.scatter(a[sel], shown[sel], s=18, alpha=0.5, color=color, edgecolors="none", label=label)
        ax.legend(fontsize=FONT - 1, loc="upper left", framealpha=0.9, markerscale=1.5)
    ax.plot([0, 1], [0, 1], ls="--", color="0.45", lw=1.2)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("Internal confidence (token probability)", fontsize=FONT)
    ax.set_ylabel("Verbalized confidence", fontsize=FONT)
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}Spearman \u03c1 = {rho:.2f} (p = {p:.2g}, n = {a.size})", fontsize=FONT)
    _style(ax)
    fig.tight_layout()
    return fig


def training_curves(csv_paths, title: str | None = None) -> Figure:
    """Loss and learning rate per optimiser step for every training log; the SimPO margin and
    reward accuracy where logged.

    ``csv_paths``: one training-log CSV (a ``step`` column) or several, one line each, labelled
    by file stem. Steps are whole numbers, and so are the x-axis ticks.
    """
    if isinstance(csv_paths, (str, os.PathLike)):
        csv_paths = [csv_paths]
    missing = [str(p) for p in csv_paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no training log at {missing}")
    logs = {Path(p).stem: pd.read_csv(p) for p in csv_paths}
    panels = [("loss", "loss"), ("lr", "learning rate")]
    if any("margin" in log and log["margin"].notna().any() for log in logs.values()):
        panels += [("margin", "margin (mean logp chosen - rejected)"), ("reward_acc", "reward accuracy")]
    ncols = 2
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        for stem, log in logs.items():
            pts = log[["step", key]].dropna() if key in log else log.iloc[:0]
            if len(pts):
                ax.plot(pts["step"], pts[key], marker="o", ms=2.5, lw=1.4, label=stem)
        ax.set_xlabel("step", fontsize=FONT)
        ax.set_ylabel(label, fontsize=FONT)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.grid(alpha=0.3)
        _style(ax)
        if len(logs) > 1:
            ax.legend(fontsize=FONT - 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=FONT + 1)
    fig.tight_layout()
    return fig


def _to_array(image) -> np.ndarray:
    return np.asarray(image)  # PIL images convert; arrays pass through


def image_grid(images: Sequence, titles: Sequence[str] | None = None, ncols: int = 4,
               suptitle: str | None = None, cell: float = 2.4) -> Figure:
    """Images (PIL or uint8 arrays, RGB or grayscale) in a grid with optional titles;
    used for the perturbation grid (rows: samples, columns: noise levels)."""
    images = list(images)
    if not images:
        raise ValueError("image_grid got no images")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, (cell + 0.35) * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(images):
            continue
        arr = _to_array(images[i])
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, interpolation="nearest")
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=FONT - 1)
    if suptitle:
        fig.suptitle(suptitle, fontsize=FONT + 1)
    fig.tight_layout()
    return fig


def scene_grid(scenes: Sequence, ncols: int = 4, masks: bool = True, boxes: bool = True,
               cell: float = 2.6) -> Figure:
    """Scenes with their objects' mask outlines (solid) and boxes (dashed); names below each.

    Duck-typed on ``scenes.Scene``: ``image``, ``objects`` (each with ``box`` =
    (x0, y0, x1, y1), x1/y1 exclusive, ``mask`` and ``name``), ``scene_id``, ``variant``.
    """
    scenes = list(scenes)
    if not scenes:
        raise ValueError("scene_grid got no scenes")
    ncols = max(1, min(ncols, len(scenes)))
    nrows = -(-len(scenes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, (cell + 0.9) * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(scenes):
            ax.axis("off")
            continue
        scene = scenes[i]
        img = np.asarray(scene.image)
        ax.imshow(img, interpolation="nearest")
        for j, obj in enumerate(scene.objects):
            color = PALETTE(j % 10)
            m = np.asarray(obj.mask, dtype=bool)
            if masks and m.any():
                # outline, not tint: a tint would change the colours the questions ask about
                ax.contour(m.astype(float), levels=[0.5], colors=[color], linewidths=1.4)
            if boxes:
                x0, y0, x1, y1 = obj.box
                # pixel centres sit on integers, so a box covers x0 - 0.5 .. x1 - 0.5
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       edgecolor=color, lw=1.2, ls="--"))
        ax.set_xticks([])
        ax.set_yticks([])
        variant = getattr(scene, "variant", "clean")
        severity = getattr(scene, "severity", 0.0)
        head = str(getattr(scene, "scene_id", i)).split("~")[0]  # variant ids repeat the variant
        if variant != "clean":
            head += f"\n{variant}, severity {severity:g}"
        ax.set_title(head, fontsize=FONT - 1)
        names = [obj.name for obj in scene.objects]
        ax.set_xlabel(_wrap(", ".join(names), 28), fontsize=FONT - 1)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or "(no objects)"


def count_bars(counts: Mapping[str, float] | pd.Series, title: str | None = None, xlabel: str = "",
               ylabel: str = "Count", ax=None, sort: bool = True) -> Figure:
    """Bar chart of counts (e.g. category frequencies), largest first unless ``sort=False``."""
    s = pd.Series(counts, dtype=float)
    if s.empty:
        raise ValueError("count_bars got no counts")
    if sort:
        s = s.sort_values(ascending=False)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.5, 0.45 * len(s) + 1.5), 3.8))
    ax.bar(range(len(s)), s.to_numpy(), color=BAR_COLOR, edgecolor="black", linewidth=0.6)
    ax.set_xticks(range(len(s)), [str(k) for k in s.index], rotation=45, ha="right")
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    if title:
        ax.set_title(title, fontsize=FONT)
    _style(ax)
    ax.figure.tight_layout()
    return ax.figure


def count_panels(panels: Mapping[str, Mapping[str, float]], ncols: int = 2, ylabel: str = "Count",
                 suptitle: str | None = None) -> Figure:
    """One :func:`count_bars` panel per entry (title -> counts), e.g. category frequencies of
    the scenes and of each POPE set's negatives."""
    if not panels:
        raise ValueError("count_panels got no panels")
    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    width = max(max(len(c) for c in panels.values()) * 0.4 + 1.5, 4.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.6 * nrows), squeeze=False)
    for ax, (name, counts) in zip(axes.flat, panels.items()):
        count_bars(counts, title=name, ylabel=ylabel, ax=ax)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=FONT + 1)
    fig.tight_layout()
    return fig


def composition_bars(df: pd.DataFrame, by: str = "set", hue: str = "label", title: str | None = None) -> Figure:
    """Stacked counts of ``hue`` values (e.g. yes/no) per ``by`` group (e.g. benchmark set),
    with each group's total and the share of the first hue value printed."""
    for col in (by, hue):
        if col not in df.columns:
            raise ValueError(f"composition_bars needs column {col!r}; have {list(df.columns)}")
    table = pd.crosstab(df[by], df[hue]).reindex(list(dict.fromkeys(df[by])))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(table) + 2.0), 4.0))
    bottom = np.zeros(len(table))
    x = np.arange(len(table))
    for i, col in enumerate(table.columns):
        vals = table[col].to_numpy(float)
        ax.bar(x, vals, bottom=bottom, color=PALETTE(i % 10), edgecolor="black", linewidth=0.6, label=str(col))
        bottom += vals
    first = table.columns[0]
    for xi, total, k in zip(x, bottom, table[first].to_numpy(float)):
        ax.text(xi, total, f"{int(total)}\n{100 * k / total:.0f}% {first}", ha="center", va="bottom",
                fontsize=FONT - 1)
    ax.set_xticks(x, [str(i) for i in table.index], rotation=30, ha="right")
    ax.set_ylabel("Questions", fontsize=FONT)
    ax.set_ylim(0, bottom.max() * 1.25)
    ax.legend(title=hue, fontsize=FONT - 1, title_fontsize=FONT - 1, frameon=False, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title, fontsize=FONT)
    _style(ax)
    fig.tight_layout()
    return fig


__all__ = [
    "save_figure",
    "reliability_grid",
    "reliability_matrix",
    "ablation_bars",
    "confidence_vs_level",
    "internal_vs_verbalized",
    "training_curves",
    "image_grid",
    "scene_grid",
    "count_bars",
    "count_panels",
    "composition_bars",
]
