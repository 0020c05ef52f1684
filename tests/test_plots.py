"""Each plot draws what its inputs say (panels, bars, lines, points, labels, legends);
save_figure writes non-empty PNG and PDF into tmp_path."""

from types import SimpleNamespace

import matplotlib
import matplotlib.collections
import matplotlib.patches
import numpy as np
import pandas as pd
import pytest

from csp_utils.analysis import plots
from csp_utils.core import metrics

RNG = np.random.default_rng(0)
CONF = RNG.integers(0, 11, 200) / 10
CORRECT = (RNG.random(200) < CONF).astype(int)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def all_texts(fig):
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text)]


def bar_heights(ax):
    return [p.get_height() for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)]


def legend_labels(legend):
    return [t.get_text() for t in legend.get_texts()]


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_backend_is_noninteractive():
    assert matplotlib.get_backend().lower() == "agg"  # MPLBACKEND=Agg from conftest is respected


def test_reliability_panel(tmp_path):
    fig = plots.reliability_grid({"demo": (CONF, CORRECT)}, n_bins=10)
    assert len(fig.axes) == 2  # bars + histogram beneath
    panel, hist = fig.axes
    assert panel.get_title() == "demo"
    assert (panel.get_ylabel(), hist.get_xlabel(), hist.get_ylabel()) == ("Accuracy", "Confidence", "Share")
    table = metrics.reliability_table(CONF, CORRECT, 10)
    full = table["count"].to_numpy() > 0
    acc, mean_conf = table["accuracy"].to_numpy()[full], table["mean_confidence"].to_numpy()[full]
    heights = bar_heights(panel)
    assert np.allclose(heights[:full.sum()], acc)                      # one accuracy bar per filled bin
    assert np.allclose(heights[full.sum():], np.abs(acc - mean_conf))  # then the gap to its mean confidence
    assert np.allclose(bar_heights(hist), table["count"].to_numpy() / CONF.size)
    (diagonal,) = panel.lines
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]
    mean_conf_line, mean_acc_line = hist.lines
    assert mean_conf_line.get_xdata()[0] == pytest.approx(CONF.mean())
    assert mean_acc_line.get_xdata()[0] == pytest.approx(CORRECT.mean())
    assert legend_labels(fig.legends[0]) == ["Perfect calibration", "Accuracy", "Gap", "Mean confidence",
                                             "Mean accuracy"]
    assert f"ECE = {100 * metrics.ece(CONF, CORRECT, 10):.1f}%\nn = 200" in all_texts(fig)
    assert min(t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text()) >= 10
    png, pdf = plots.save_figure(fig, tmp_path / "figs" / "reliability")
    assert png.suffix == ".png" and pdf.suffix == ".pdf"
    assert png.stat().st_size > 1000 and pdf.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"


def test_reliability_panel_with_missing_confidences():
    conf = list(CONF[:20]) + [None] * 5
    fig = plots.reliability_grid({"with missing": (conf, CORRECT[:25])}, n_bins=15)
    assert any("coverage = 80%" in t for t in all_texts(fig))


def test_save_figure_keeps_dots_and_strips_known_suffix(tmp_path):
    fig = plots.reliability_grid({"demo": (CONF, CORRECT)})
    png, pdf = plots.save_figure(fig, tmp_path / "ece_0.5")
    assert png.name == "ece_0.5.png" and pdf.name == "ece_0.5.pdf"
    png, pdf = plots.save_figure(fig, str(tmp_path / "x.png"))
    assert png.name == "x.png" and pdf.name == "x.pdf" and pdf.exists()


def test_reliability_grid_including_empty_group(tmp_path):
    groups = {
        "random: base": (CONF, CORRECT),
        "random: CSP": (CONF[::-1], CORRECT),
        "nothing parsed": ([None, None], [1, 0]),
    }
    fig = plots.reliability_grid(groups, ncols=2, suptitle="before / after")
    assert _panel_titles(fig) == list(groups)  # in order, the fourth place of the 2 x 2 grid empty
    assert len(visible_axes(fig)) == 6 and fig.get_suptitle() == "before / after"
    (empty,) = [ax for ax in fig.axes if ax.get_title() == "nothing parsed"]  # no bars, only the note
    assert bar_heights(empty) == [] and "no parsed confidences\n(coverage 0%)" in [t.get_text() for t in empty.texts]
    assert all(p.stat().st_size > 0 for p in plots.save_figure(fig, tmp_path / "grid"))
    with pytest.raises(ValueError):
        plots.reliability_grid({})
    # a tall grid keeps its title close to the panels
    tall = plots.reliability_grid({f"set {i}": (CONF, CORRECT) for i in range(12)}, ncols=2, suptitle="before / after")
    assert (1 - tall.subplotpars.top) * tall.get_figheight() < 1.0  # inches above the first row


def _panel_titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]


def test_reliability_matrix_rows_are_models_and_columns_sets():
    sets = ["pope-random", "pope-popular", "amber-existence"]
    cells = {"base": {s: (CONF, CORRECT) for s in sets}, "sft_simpo": {s: (CONF[::-1], CORRECT) for s in sets[:2]}}
    fig = plots.reliability_matrix(cells, suptitle="before / after")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 5
    grid = {ax.get_title(): ax.get_subplotspec() for ax in panels}
    assert {grid[f"{s}\nbase"].rowspan.start for s in sets} == {0}        # one row per model
    assert [grid[f"{s}\nbase"].colspan.start for s in sets] == [0, 1, 2]  # one column per set
    assert grid["pope-random\nsft_simpo"].rowspan.start == 1
    empty = [ax for ax in fig.axes if not ax.get_visible()]                # a set the model lacks stays empty
    assert [(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in empty] == [(1, 2)]
    # one legend for the figure, none on a panel to cover bars or lines
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)
    assert fig.get_figwidth() < 3.5 * len(sets) and fig.get_figheight() < 9  # panels of a page's grid
    with pytest.raises(ValueError, match="empty"):
        plots.reliability_matrix({})


def test_ablation_bars(tmp_path):
    df = pd.DataFrame(
        {
            "name": ["local", "global", "gamma 0.5"] * 2,
            "value": [0.05, 0.08, 0.06, 0.7, 0.65, 0.68],
            "low": [0.03, 0.06, np.nan, 0.65, 0.6, 0.6],
            "high": [0.07, 0.1, np.nan, 0.75, 0.7, 0.75],
            "metric": ["ece"] * 3 + ["auroc"] * 3,   # column names, as ablation.csv has them
        }
    )
    fig = plots.ablation_bars(df, title="ablations")
    assert len(fig.axes) == 2 and fig.get_suptitle() == "ablations"
    ax = fig.axes[0]
    assert [p.get_width() for p in ax.patches] == [0.05, 0.08, 0.06]             # one bar per variant
    assert [p.get_width() for p in fig.axes[1].patches] == [0.7, 0.65, 0.68]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["local", "global", "gamma 0.5"]
    bar_centres = [p.get_y() + p.get_height() / 2 for p in ax.patches]
    whiskers = [seg for c in ax.collections for seg in c.get_segments()]
    assert [seg[0, 1] for seg in whiskers] == bar_centres[:2]               # centred; a NaN interval draws none
    assert [tuple(seg[:, 0]) for seg in whiskers] == [(0.03, 0.07), (0.06, 0.1)]
    assert [ax.get_title() for ax in fig.axes] == ["ECE (10 bins)", "AUROC"]
    assert all(p.stat().st_size > 0 for p in plots.save_figure(fig, tmp_path / "abl"))
    with pytest.raises(ValueError, match="missing"):
        plots.ablation_bars(df.drop(columns="low"))


def test_confidence_vs_level(tmp_path):
    levels = np.repeat(np.arange(0, 101, 20), 5)
    df = pd.concat(
        [
            pd.DataFrame({"level": levels, "confidence": np.full(levels.size, 80.0), "model": "base"}),
            pd.DataFrame({"level": levels, "confidence": levels + RNG.normal(0, 5, levels.size), "model": "CSP"}),
        ]
    )
    fig = plots.confidence_vs_level(df, xlabel="Target level (%)", ylabel="Confidence (%)")
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 3  # two models and the diagonal
    base, csp = fig.axes[0].lines[:2]
    assert list(base.get_xdata()) == list(range(0, 101, 20)) and np.allclose(base.get_ydata(), 80.0)
    means = df[df["model"] == "CSP"].groupby("level")["confidence"].mean()
    assert np.allclose(csp.get_ydata(), means.to_numpy())
    assert len(fig.axes[0].collections) == 2                   # a +- std band per model
    assert legend_labels(fig.axes[0].get_legend()) == ["base", "CSP", "y = x (the paper's target)"]
    assert fig.axes[0].get_ylabel() == "Confidence (%)"
    # the base model's accuracy per level: the line a calibrated confidence follows
    ref = pd.DataFrame({"level": [100, 0, 50], "accuracy": [90.0, 45.0, 60.0]})
    with_ref = plots.confidence_vs_level(df, reference=ref)
    acc = with_ref.axes[0].lines[-1]
    assert list(acc.get_xdata()) == [0, 50, 100] and list(acc.get_ydata()) == [45.0, 60.0, 90.0]
    assert legend_labels(with_ref.axes[0].get_legend())[-1] == "base model's accuracy (what calibrated says)"
    # a line drawn under another still shows: each model has its own line style and marker
    assert (base.get_linestyle(), base.get_marker()) != (csp.get_linestyle(), csp.get_marker())
    assert base.get_linestyle() != csp.get_linestyle() and base.get_marker() != csp.get_marker()
    assert fig.axes[0].get_xlabel() == "Target level (%)"
    assert all(p.stat().st_size > 0 for p in plots.save_figure(fig, tmp_path / "lvl"))


def test_internal_vs_verbalized(tmp_path):
    internal = RNG.random(50)
    verbal = list(np.clip(np.round(internal, 1) + 0.1, 0, 1))
    verbal[3] = None  # dropped pair
    correct = RNG.integers(0, 2, 50)
    fig = plots.internal_vs_verbalized(internal, verbal, correct=correct)
    ax = fig.axes[0]
    title = ax.get_title()
    assert "Spearman" in title and "n = 49" in title
    right, wrong = ax.collections                       # one scatter per outcome, the dropped pair in neither
    keep = np.arange(50) != 3
    assert np.allclose(np.sort(right.get_offsets()[:, 0]), np.sort(internal[keep & (correct == 1)]))
    assert np.allclose(np.sort(wrong.get_offsets()[:, 0]), np.sort(internal[keep & (correct == 0)]))
    assert legend_labels(ax.get_legend()) == ["right", "wrong"]
    assert ax.get_xlabel().startswith("Internal confidence") and ax.get_ylabel() == "Verbalized confidence"
    assert all(p.stat().st_size > 0 for p in plots.save_figure(fig, tmp_path / "ivv"))
    alone = plots.internal_vs_verbalized(internal, internal).axes[0]
    (points,) = alone.collections                       # without outcomes: one scatter, no legend
    assert points.get_offsets().shape == (50, 2) and alone.get_legend() is None
    assert "Spearman \u03c1 = 1.00" in alone.get_title()


def test_image_grid_and_scene_grid(tmp_path):
    from PIL import Image

    imgs = [RNG.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    imgs.append(Image.fromarray(imgs[0]))
    imgs.append(RNG.integers(0, 255, (32, 32), dtype=np.uint8))  # grayscale
    fig = plots.image_grid(imgs, [f"t={i}" for i in range(6)], ncols=4)
    assert len(fig.axes) == 8  # 2 rows of 4, the last two empty
    shown = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in shown] == [f"t={i}" for i in range(6)]
    for ax, img in zip(shown, imgs):
        assert np.array_equal(ax.images[0].get_array(), np.asarray(img))
    assert shown[5].images[0].get_cmap().name == "gray"
    assert all(p.stat().st_size > 0 for p in plots.save_figure(fig, tmp_path / "images"))
    with pytest.raises(ValueError):
        plots.image_grid(imgs, ["one title"])

    mask = np.zeros((32, 32), bool)
    mask[4:10, 4:12] = True
    obj = SimpleNamespace(box=(4, 4, 12, 10), mask=mask, name="red square")
    scene = SimpleNamespace(scene_id="eval-000001", image=imgs[0], objects=[obj], variant="blur", severity=0.5)
    fig = plots.scene_grid([scene, scene], ncols=2)
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel() == "red square"
    assert fig.axes[0].get_title() == "eval-000001\nblur, severity 0.5"
    (box,) = fig.axes[0].patches                      # the dashed box around the object's pixels
    assert (box.get_xy(), box.get_width(), box.get_height()) == ((3.5, 3.5), 8, 6)
    assert len(fig.axes[0].collections) >= 1           # the mask's outline
    bare = plots.scene_grid([scene], masks=False, boxes=False)
    assert not bare.axes[0].patches and not bare.axes[0].collections


def test_count_and_composition_bars(tmp_path):
    fig = plots.count_bars({"circle": 10, "square": 30, "star": 3}, title="categories")
    (ax,) = fig.axes
    assert bar_heights(ax) == [30, 10, 3] and ax.get_title() == "categories"  # largest first
    assert [t.get_text() for t in ax.get_xticklabels()] == ["square", "circle", "star"]
    assert bar_heights(plots.count_bars({"b": 1, "a": 2}, sort=False).axes[0]) == [1, 2]
    fig = plots.count_panels({"scenes": {"circle": 10, "star": 3}, "negatives": {"square": 4}, "x": {"a": 1}})
    panels = visible_axes(fig)
    assert [ax.get_title() for ax in panels] == ["scenes", "negatives", "x"]
    assert [bar_heights(ax) for ax in panels] == [[10, 3], [4], [1]]
    df = pd.DataFrame({"set": ["random"] * 6 + ["popular"] * 4, "label": ["yes", "no"] * 5})
    fig = plots.composition_bars(df, title="balance")
    (ax,) = fig.axes
    no, yes = ax.containers                             # stacked: one series per label, sets in order
    assert [p.get_height() for p in no] == [3, 2] and [p.get_height() for p in yes] == [3, 2]
    assert [p.get_y() for p in yes] == [3, 2]           # on top of the "no" bars
    assert legend_labels(ax.get_legend()) == ["no", "yes"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["random", "popular"]
    assert {"6\n50% no", "4\n50% no"} <= set(all_texts(fig)) and ax.get_title() == "balance"
    assert all(p.stat().st_size > 0 for p in plots.save_figure(fig, tmp_path / "comp"))


def test_training_curves_have_integer_steps(tmp_path):
    sft, simpo = tmp_path / "sft.csv", tmp_path / "sft_simpo.csv"
    sft.write_text("step,loss,lr,margin,reward_acc\n1,2.0,0.0,,\n2,1.5,1e-4,,\n3,1.2,5e-5,,\n")
    simpo.write_text("step,loss,lr,margin,reward_acc\n1,0.7,0.0,0.1,0.5\n3,0.6,1e-4,0.3,0.75\n")
    fig = plots.training_curves([sft, simpo], title="curves")
    assert len([ax for ax in fig.axes if ax.lines]) == 4   # loss, lr, margin, reward accuracy
    loss = fig.axes[0]
    assert loss.get_ylabel() == "loss" and legend_labels(loss.get_legend()) == ["sft", "sft_simpo"]
    assert [list(line.get_ydata()) for line in loss.lines] == [[2.0, 1.5, 1.2], [0.7, 0.6]]
    assert [len(ax.lines) for ax in fig.axes[2:]] == [1, 1]  # only the SimPO log has a margin
    fig.canvas.draw()
    for ax in fig.axes:
        assert all(float(t).is_integer() for t in ax.get_xticks())
    only_sft = plots.training_curves(sft)
    assert len(only_sft.axes) == 2
    with pytest.raises(FileNotFoundError, match="no training log"):
        plots.training_curves(tmp_path / "missing.csv")


def test_saved_figures_are_byte_reproducible(tmp_path):
    """The committed figures change only when what they show changes (no timestamps)."""
    import time

    fig = plots.reliability_grid({"demo": (CONF, CORRECT)})
    a = plots.save_figure(fig, tmp_path / "a")
    time.sleep(1.1)  # a PDF CreationDate would differ by now
    b = plots.save_figure(fig, tmp_path / "b")
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes()


def _headline():
    rows = []
    for unit in ("pooled-clean", "pooled-transfer"):
        for i, model in enumerate(("base", "sft_simpo", "baseline:temperature")):
            r = {"model": model, "set": unit}
            for k, v in (("ece", 0.05), ("ece15", 0.06), ("brier", 0.15), ("auroc", 0.6)):
                r |= {k: v + 0.01 * i, f"{k}_low": v, f"{k}_high": v + 0.03}
            rows.append(r)
    return pd.DataFrame(rows)


def test_metric_intervals(tmp_path):
    fig = plots.metric_intervals(_headline(), title="pooled")
    assert len(fig.axes) == 8   # 2 sets x 4 metrics
    dots = fig.axes[0].lines[0]                        # one dot per model, at its ECE
    assert np.allclose(dots.get_xdata(), [0.05, 0.06, 0.07]) and list(dots.get_ydata()) == [0, 1, 2]
    assert [ax.get_ylabel() for ax in fig.axes[::4]] == ["pooled-clean", "pooled-transfer"]
    assert [ax.get_title() for ax in fig.axes[:4]] == ["ECE (10 bins)", "ECE (15 bins)", "Brier score", "AUROC"]
    assert {"base", "sft_simpo", "baseline:temperature"} <= set(all_texts(fig))
    assert all(p.stat().st_size > 0 for p in plots.save_figure(fig, tmp_path / "intervals"))
    one = plots.metric_intervals(_headline(), units=["pooled-transfer"], labels={"auroc": "pooled AUROC (mixes sets)"})
    assert len(one.axes) == 4 and one.axes[3].get_title() == "pooled AUROC (mixes sets)"
    with pytest.raises(ValueError, match="missing"):
        plots.metric_intervals(_headline().drop(columns="auroc_low"))
    with pytest.raises(ValueError, match="no rows"):
        plots.metric_intervals(_headline(), units=["pope-random"])


def test_paired_differences_marks_intervals_that_exclude_zero(tmp_path):
    df = pd.DataFrame({"set": ["pooled-clean"] * 4, "method": ["sft_simpo"] * 4,
                       "reference": ["base", "base", "baseline:temperature", "baseline:temperature"],
                       "metric": ["brier", "auroc", "brier", "auroc"], "diff": [0.03, -0.02, 0.07, -0.3],
                       "diff_low": [0.02, -0.05, 0.06, -0.35], "diff_high": [0.04, 0.01, 0.09, -0.25]})
    fig = plots.paired_differences(df, metrics_=("brier", "auroc"))
    assert len(fig.axes) == 2 and "lower is better" in fig.axes[0].get_title()
    assert "higher is better" in fig.axes[1].get_title()
    dots = [c for c in fig.axes[1].collections if isinstance(c, matplotlib.collections.PathCollection)]
    filled = [c for c in dots if c.get_offsets().shape[0] and tuple(c.get_facecolor()[0][:3]) != (1.0, 1.0, 1.0)]
    assert sum(c.get_offsets().shape[0] for c in filled) == 1   # only the AUROC interval below 0 is marked
    assert tuple(next(c for c in filled if c.get_offsets().shape[0]).get_facecolor()[0][:3]) == \
        matplotlib.colors.to_rgb(plots.GAP_COLOR)                # below 0 is worse for AUROC
    brier_dots = [c for c in fig.axes[0].collections if isinstance(c, matplotlib.collections.PathCollection)]
    brier_red = [c for c in brier_dots if c.get_offsets().shape[0]
                 and tuple(c.get_facecolor()[0][:3]) == matplotlib.colors.to_rgb(plots.GAP_COLOR)]
    assert sum(c.get_offsets().shape[0] for c in brier_red) == 2  # both Brier intervals above 0: worse
    assert "pooled-clean: sft_simpo - base" in all_texts(fig)
    assert all(p.stat().st_size > 0 for p in plots.save_figure(fig, tmp_path / "paired"))
    with pytest.raises(ValueError, match="missing"):
        plots.paired_differences(df.drop(columns="diff_low"))


def test_confidence_against_accuracy_per_degradation_pools_seeds_per_method():
    from csp_utils.analysis import tables

    rows = []
    for model, conf in (("base", 0.9), ("m@s0", 0.6), ("m@s1", 0.8)):
        for s, acc_n in (("transfer-blur", 3), ("transfer-low_light", 1)):
            for i in range(4):
                rows.append({"model": model, "set": s, "framing": "third", "readout": "single_pass",
                             "confidence": conf, "correct": i < acc_n})
    rows.append({"model": "base", "set": "pope-random", "framing": "third", "readout": "single_pass",
                 "confidence": 0.5, "correct": True})
    t = tables.confidence_accuracy_table(rows, ["transfer-blur", "transfer-low_light"])
    got = t.set_index(["set", "model"])
    assert set(t["set"]) == {"transfer-blur", "transfer-low_light"}          # other sets left out
    assert got.loc[("transfer-blur", "m"), "n"] == 8                          # seeds pooled
    assert got.loc[("transfer-blur", "m"), "confidence"] == pytest.approx(0.7)
    assert got.loc[("transfer-low_light", "m"), "accuracy"] == pytest.approx(0.25)
    assert got.loc[("transfer-low_light", "base"), "brier"] == pytest.approx((0.1 ** 2 + 3 * 0.9 ** 2) / 4)
    fig = plots.confidence_vs_accuracy(t)
    assert len(fig.axes[0].lines) == len(t) + 1                               # a point per row and the diagonal
    with pytest.raises(ValueError, match="needs columns"):
        plots.confidence_vs_accuracy(t.drop(columns="accuracy"))
