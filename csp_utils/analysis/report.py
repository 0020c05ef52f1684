"""Figures and the README table, regenerated from saved results only (never by training).

``make_figures(results_dir, figures_dir)`` reads the compact files that the evaluation and
ablation notebooks write (``headline.csv``, ``per_question.csv.gz``, ``paired.csv``,
``ablation.csv``, ``train_logs/*.csv``) and writes every figure as PNG + PDF. ``publish_results`` copies those
compact files next to the repository's ``figures/`` so a fresh clone regenerates the figures.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from csp_utils.analysis import outputs, plots, tables
from csp_utils.analysis.tables import MAIN_COMBO, POOLED, read_result
from csp_utils.core import metrics
from csp_utils.core.paths import REPO
from csp_utils.evaluate import suites

COMPACT = ("headline.csv", "paired.csv", "sets.json", "summary.csv", "per_question.csv.gz", "level_spearman.csv",
           "grounded_perturbed.csv", "ablation.csv", "timings.json", "base_model.json", "sources_cost.json")


def reliability_before_after(pq: pd.DataFrame, sets, after: str, before: str = "base",
                             combo=MAIN_COMBO):
    """One figure: a row of reliability diagrams per model (base above CSP), a column per set."""
    cells = {}
    for name in (before, after):
        for set_ in sets:
            g = pq[(pq["set"] == set_) & (pq["model"].map(lambda m: m.split("@")[0]) == name)
                   & (pq["framing"] == combo[0]) & (pq["readout"] == combo[1])].dropna(subset=["confidence"])
            if len(g):
                cells.setdefault(name, {})[set_] = (g["confidence"].to_numpy(float), g["correct"].astype(int).to_numpy())
    return plots.reliability_matrix(cells, suptitle=f"Before / after CSP ({combo[0]} person, {combo[1]})")


COVERAGE_GRID = np.arange(1, 101) / 100


def mean_risk_coverage(pq: pd.DataFrame, sets, coverages=COVERAGE_GRID) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve of one model's rows as the mean over ``sets`` of each set's own
    curve (seeds pooled within a set), as AURC is pooled; parsed confidences only."""
    curves = []
    for set_ in sets:
        g = pq[pq["set"] == set_].dropna(subset=["confidence"])
        if len(g):
            curves.append(metrics.risk_coverage(g["confidence"].to_numpy(float), g["correct"].astype(int).to_numpy(),
                                                 coverages))
    return coverages, np.mean(curves, axis=0)


def risk_coverage_figure(pq: pd.DataFrame, groups: dict, base: str = "base", combo=MAIN_COMBO):
    """Risk against coverage, a panel per group of sets ({title: sets}): every model at ``combo``
    and every baseline (recalibrated methods left out: their ``+`` twins would double the
    lines), and the oracle order of the ``base`` model's answers."""
    main = pq[((pq["framing"] == combo[0]) & (pq["readout"] == combo[1])) | (pq["framing"] == "-")]
    main = main.assign(group=main["model"].map(tables.model_group))
    names = [m for m in dict.fromkeys(main["group"]) if "+" not in m]
    names = sorted(names, key=lambda m: (m.startswith("baseline:"), m != base))
    panels = {}
    for title, sets in groups.items():
        lines = {m: mean_risk_coverage(main[main["group"] == m], sets) for m in names}
        own = main[(main["group"] == base) & main["set"].isin(sets)]
        oracle = []
        for set_ in sets:
            y = own.loc[own["set"] == set_, "correct"].astype(int).to_numpy()
            if y.size:
                oracle.append(metrics.oracle_risk_coverage(y, COVERAGE_GRID))
        if oracle:
            lines[f"oracle ({base}'s answers)"] = (COVERAGE_GRID, np.mean(oracle, axis=0))
        panels[title] = lines
    return plots.risk_coverage(panels, oracle=f"oracle ({base}'s answers)", suptitle=f"Risk against coverage, mean of the per-set curves "
                                                f"({combo[0]} person, {combo[1].replace('_', ' ')})")


def make_figures(results_dir, figures_dir, after: str = "sft_simpo", perturbation_grid: bool = True) -> list[Path]:
    """Every figure of the study from saved results; returns the PNG paths written."""
    results_dir, figures_dir = Path(results_dir), Path(figures_dir)
    written: list[Path] = []

    def save(fig, name):
        png, _ = plots.save_figure(fig, figures_dir / name)
        written.append(png)
        plots.plt.close(fig)  # pyplot comes through plots, which picks the backend first

    pq_path = results_dir / "per_question.csv.gz"
    if pq_path.exists():
        pq = pd.read_csv(pq_path)
        clean = [s for s in suites.CLEAN_SETS if s in set(pq["set"])]
        transfer = sorted(s for s in set(pq["set"]) if s.startswith("transfer-"))
        if clean:
            save(reliability_before_after(pq, clean, after), outputs.RELIABILITY_CLEAN)
        if transfer:
            save(reliability_before_after(pq, transfer, after), outputs.RELIABILITY_TRANSFER)
        lv = tables.level_table(pq)
        if len(lv):
            lv = lv[(lv["framing"] == MAIN_COMBO[0]) & (lv["readout"] == MAIN_COMBO[1])].dropna(subset=["confidence"])
            df = pd.DataFrame({"level": lv["level"], "confidence": lv["confidence"] * 100,
                               "model": lv["model"].map(tables.model_group)})
            base = lv[lv["model"] == "base"]
            reference = (base.groupby("level")["correct"].mean() * 100).rename("accuracy").reset_index()
            save(plots.confidence_vs_level(df, xlabel="Target confidence / noise level (%)",
                                           ylabel="Verbalized confidence (%)",
                                           title="Confidence vs CSP noise level (held-out scenes)",
                                           reference=reference),
                 outputs.CONFIDENCE_VS_LEVEL)
        acc = tables.confidence_accuracy_table(pq, transfer)
        # the methods and the two references a reader compares them with; recalibrations are in the tables
        acc = acc[~acc["model"].str.contains("+", regex=False)
                  & (~acc["model"].str.startswith("baseline:") | acc["model"].isin(["baseline:temperature",
                                                                                  "baseline:constant"]))]
        if len(acc):
            save(plots.confidence_vs_accuracy(acc, title="Degraded images never trained on: confidence vs accuracy"),
                 outputs.CONFIDENCE_VS_ACCURACY)
        rc_groups = {f"{name} sets": units for name, units in (("clean", clean), ("transfer", transfer)) if units}
        if rc_groups:
            save(risk_coverage_figure(pq, rc_groups), outputs.RISK_COVERAGE)
        both = pq[(pq["framing"] == MAIN_COMBO[0]) & (pq["readout"] == MAIN_COMBO[1])
                  & ~pq["set"].isin(["perturbed"])].dropna(subset=["confidence", "internal_prob"])
        for name in ("base", after):
            g = both[both["model"].map(tables.model_group) == name]
            if len(g) >= 3:
                save(plots.internal_vs_verbalized(g["internal_prob"], g["confidence"], g["correct"].astype(int),
                                                  title=f"{name}: internal vs verbalized"),
                     outputs.INTERNAL_VS_VERBALIZED.format(model=name))
    head = read_result(results_dir, "headline.csv")
    if head is not None and "ece15" in head.columns:
        main = head[((head["framing"] == MAIN_COMBO[0]) & (head["readout"] == MAIN_COMBO[1])) | (head["framing"] == "-")]
        cl = ", ".join(sorted(set(main["cluster"])))
        pooled = [u for u in POOLED if u in set(main["set"])]
        if pooled:
            # a pool's AUROC mixes its sets; the within-set AUROC is the mean of its sets' own
            save(plots.metric_intervals(main, ("ece", "brier", "auroc_within", "auroc"), units=pooled,
                                        title=f"Pooled sets (95% intervals, resampling seeds, then {cl}s)",
                                        labels={"auroc": "pooled AUROC (mixes sets)"}),
                 outputs.METRICS_POOLED)
        groups = {"clean": [u for u in suites.CLEAN_SETS if u in set(main["set"])],
                  "transfer": sorted(u for u in set(main["set"]) if u.startswith("transfer-"))}
        for name, units in groups.items():
            if units:
                save(plots.metric_intervals(main, units=units, title=f"{name.capitalize()} sets "
                                                                     f"(95% intervals, resampling by {cl})"),
                     outputs.METRICS_SETS.format(group=name))
    paired = read_result(results_dir, "paired.csv")
    if paired is not None and len(paired):
        sub = paired[(paired["method"] == after) & paired["set"].isin(POOLED)]
        if len(sub):
            save(plots.paired_differences(sub, title=f"{after} minus each reference, pooled sets "
                                                     f"(same resamples, by {sub['cluster'].iloc[0]})"),
                 outputs.PAIRED_POOLED)
    for table in sorted(results_dir.glob("ablation*.csv")):
        if table.name.startswith("ablation_paired"):
            continue
        ab = pd.read_csv(table)
        if len(ab):
            ablation_figures(ab, table.stem.removeprefix("ablation"), save)
    logs = sorted((results_dir / "train_logs").glob("*.csv")) if (results_dir / "train_logs").exists() else []
    # train_logs/ also holds margin tables and measured targets: curves are the files with a step column
    logs = [p for p in logs if p.read_text().split("\n", 1)[0].split(",")[0] == "step"]
    for log in logs:
        save(plots.training_curves(log, title=log.stem), outputs.TRAINING.format(log=log.stem))
    if perturbation_grid:
        save(perturbation_grid_figure(), outputs.PERTURBATION_GRID)
    prune_stale_figures(figures_dir, written)
    return written


def ablation_figures(ab: pd.DataFrame, suffix: str, save) -> None:
    """Bars per metric of one ablation table (``results/ablation<suffix>.csv``): pooled clean and
    pooled transfer, or the mean over sets when the table has no pools."""
    for metric in sorted(set(ab["metric"])):
        sub = ab[ab["metric"] == metric]
        cl = sub["cluster"].iloc[0] if "cluster" in sub else "question"
        for unit, unit_suffix in (("pooled-clean", ""), ("pooled-transfer", "_transfer")):
            if unit in set(sub["set"]):
                save(plots.ablation_bars(sub[sub["set"] == unit], title=f"Ablations: {plots.metric_label(metric)}, "
                                         f"{unit.replace('-', ' ')} sets\n(95% bootstrap interval, seeds then {cl}s)"),
                     outputs.ABLATION.format(suffix=suffix, metric=metric, unit=unit_suffix))
        if "pooled-clean" in set(sub["set"]):
            continue
        agg = sub.groupby("name", sort=False).agg(value=("value", "mean"), low=("low", "mean"),
                                                  high=("high", "mean")).reset_index()
        agg["metric"] = metric
        # averaged endpoints are wider than the mean's own interval: the title says which it is
        n_sets = sub["set"].nunique()
        save(plots.ablation_bars(agg, title=f"Ablations: {plots.metric_label(metric)}, mean over {n_sets} sets\n"
                                             "(whiskers: mean of the per-set 95% bootstrap intervals)"),
             outputs.ABLATION.format(suffix=suffix, metric=metric, unit=""))


FIGURES_MANIFEST = "figures.json"


def prune_stale_figures(figures_dir, written: list[Path]) -> list[Path]:
    """Delete the figures (PNG and PDF) that the previous :func:`make_figures` into this folder
    wrote and this one did not (a model or set no longer in the results), then record this
    call's figures in ``figures.json``. Files it never wrote are left alone."""
    figures_dir = Path(figures_dir)
    manifest = figures_dir / FIGURES_MANIFEST
    now = sorted(p.stem for p in written)
    before = json.loads(manifest.read_text())["figures"] if manifest.exists() else []
    removed = []
    for stem in sorted(set(before) - set(now)):
        for path in (figures_dir / f"{stem}.png", figures_dir / f"{stem}.pdf"):
            if path.exists():
                path.unlink()
                removed.append(path)
    if removed:
        print("stale figures removed:", *removed, sep="\n  ")
    figures_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"written_by": "csp_utils.analysis.report.make_figures", "figures": now}, indent=1) + "\n")
    return removed


def perturbation_grid_figure(levels=(100, 70, 40, 10), n_scenes: int = 3, seed: int = 0):
    """The CSP perturbation of a few held-out scenes' key objects (deterministic, no model)."""
    images, titles = suites.perturbation_examples(levels, n_scenes, seed)
    return plots.image_grid(images, titles, ncols=len(levels), suptitle="CSP noise on the key object")


def publish_results(results_dir, dest) -> list[Path]:
    """Copy the compact results (CSV/JSON, training logs) to ``dest`` for committing."""
    results_dir, dest = Path(results_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in COMPACT:
        if (results_dir / name).exists():
            copied.append(Path(shutil.copy2(results_dir / name, dest / name)))
    if (results_dir / "train_logs").exists():
        shutil.copytree(results_dir / "train_logs", dest / "train_logs", dirs_exist_ok=True)
        copied.append(dest / "train_logs")
    for sub in sorted(p for p in results_dir.iterdir() if p.is_dir() and (p / "headline.csv").exists()):
        copied += publish_results(sub, dest / sub.name)  # another base model's evaluation
    return copied


def paired_verdicts(results_dir, after: str = "sft_simpo") -> pd.DataFrame:
    """``after`` against the base model and each baseline, per set and pool: paired
    differences in ECE, Brier, AUROC and accuracy with intervals and verdicts."""
    paired = read_result(Path(results_dir), "paired.csv")
    if paired is None or paired.empty:
        return pd.DataFrame()
    sub = paired[paired["method"] == after]
    return sub.pivot_table(index=["set", "reference"], columns="metric", values=["diff", "verdict"],
                           aggfunc="first", sort=False)


MAX_NOTEBOOK_IMAGE_BYTES = 2_000_000   # a published notebook should open quickly in a browser


def _image_bytes(nb: dict) -> int:
    """Bytes of base64 images in a notebook's outputs and widget state."""
    def walk(node):
        if isinstance(node, dict):
            return sum(len("".join(v)) if k.startswith("image/") and isinstance(v, (str, list)) else walk(v)
                       for k, v in node.items())
        if isinstance(node, list):
            return sum(walk(v) for v in node)
        return 0

    return walk(nb.get("cells", [])) + walk(nb.get("metadata", {}).get("widgets", {}))


def _downscale_png(b64: str, scale: float) -> str:
    """A PNG at ``scale`` of its size, in a 256-colour palette: resampling alone adds blended
    colours that PNG compresses badly, so a plot's bytes would shrink far less than its pixels."""
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.convert("RGBA").resize(size, Image.LANCZOS).quantize(256, method=Image.Quantize.FASTOCTREE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def _shrink_notebook(nb: dict, max_image_bytes: int, tries: int = 6) -> list[str]:
    """Keep a notebook's embedded images under ``max_image_bytes``: first drop the widget
    state (interactive copies of plots the notebook also shows statically), then downscale
    the PNG outputs from their originals, by less each try until they fit. Returns what was
    done, for the caller to report."""
    actions = []
    if _image_bytes(nb) > max_image_bytes and "widgets" in nb.get("metadata", {}):
        del nb["metadata"]["widgets"]
        actions.append("dropped widget state")
    size = _image_bytes(nb)
    if size <= max_image_bytes:
        return actions
    pngs = [out["data"] for cell in nb.get("cells", []) for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]
    originals = ["".join(d["image/png"]) if isinstance(d["image/png"], list) else d["image/png"] for d in pngs]
    scale = 1.0
    for _ in range(tries):
        scale *= 0.95 * min(1.0, max_image_bytes / size) ** 0.5   # bytes shrink about with the pixel count
        for data, png in zip(pngs, originals):
            data["image/png"] = _downscale_png(png, scale)
        size = _image_bytes(nb)
        if size <= max_image_bytes:
            break
    actions.append(f"downscaled PNG outputs by {scale:.2f}")
    return actions


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = "(a live widget: open the notebook in JupyterLab and run it to use it)"


def _is_slider(out: dict, nb: dict) -> bool:
    """A widget output that holds a slider (``interact``), not a progress bar: its model or one
    of its children in the saved widget state is a slider (the repr where no state was saved)."""
    state = nb.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state")
    if not state:
        return "Slider(" in "".join(out["data"].get("text/plain", ""))
    todo, seen = [out["data"][WIDGET_VIEW].get("model_id")], set()
    while todo:
        model = state.get(todo.pop()) or {}
        if "Slider" in model.get("model_name", "") or "Slider" in model.get("state", {}).get("_model_name", ""):
            return True
        children = model.get("state", {}).get("children") or []
        todo += [c.removeprefix("IPY_MODEL_") for c in children if isinstance(c, str) and c not in seen]
        seen.update(children)
    return False


def _note_widgets(nb: dict) -> None:
    """A widget's text fallback is its repr (``interactive(children=(IntSlider(...``), which is
    what GitHub shows where the widget was: a line for the reader under a slider instead;
    other widgets (progress bars) are dropped, since they show nothing once the run is over."""
    for cell in nb.get("cells", []):
        kept = []
        for out in cell.get("outputs", []):
            if WIDGET_VIEW in out.get("data", {}):
                if not _is_slider(out, nb):
                    continue
                out["data"]["text/plain"] = WIDGET_NOTE
            kept.append(out)
        if "outputs" in cell:
            cell["outputs"] = kept


def _quiet(nb: dict) -> None:
    """Drop stderr streams (progress bars, library warnings): a finished stage's errors are in
    its error outputs, and its results in stdout and the displays."""
    for cell in nb.get("cells", []):
        if "outputs" in cell:
            cell["outputs"] = [o for o in cell["outputs"] if not (o.get("output_type") == "stream"
                                                                  and o.get("name") == "stderr")]


def _relative_paths(nb: dict, run_dir: Path) -> None:
    """The run folder as ``runs/<name>`` (relative to the repository, as every notebook resolves
    it) and the repository as ``.``: a published copy names no path of the machine that ran it."""
    run_dir = run_dir.resolve()
    try:
        rel = run_dir.relative_to(REPO.resolve()).as_posix()
    except ValueError:
        rel = f"runs/{run_dir.name}"
    swaps = [(str(run_dir), rel), (str(REPO.resolve()) + "/", ""), (str(REPO.resolve()), ".")]

    def fix(value):
        if isinstance(value, str):
            for a, b in swaps:
                value = value.replace(a, b)
            return value
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) if not k.startswith("image/") else v for k, v in value.items()}
        return value

    for cell in nb.get("cells", []):
        cell["source"] = fix(cell.get("source", ""))
        if "outputs" in cell:
            cell["outputs"] = fix(cell["outputs"])
    papermill = nb.get("metadata", {}).get("papermill")
    if papermill:
        papermill = fix(papermill)
        if Path(papermill.get("input_path") or ".").is_absolute():  # a run made from another checkout
            papermill["input_path"] = f"notebooks/{Path(papermill['input_path']).name}"
        nb["metadata"]["papermill"] = papermill


def publish_notebooks(run_dir, dest="docs/notebooks", max_image_bytes: int = MAX_NOTEBOOK_IMAGE_BYTES) -> dict:
    """Copy a run's executed notebooks, outputs included, to ``dest`` so a reader can open
    them without running anything.

    Only finished stages are published (those with ``markers/<stage>.json``): a failed stage's
    partial copy, or the notebook running this call, is left out and named in the result.
    Notebooks in ``dest`` of stages the run no longer has are removed, so ``dest`` mirrors the
    run. Returns ``{"written": {name: bytes}, "skipped": [names], "shrunk": {name: [actions]}}``.
    """
    run_dir, dest = Path(run_dir), Path(dest)
    source = run_dir / "notebooks"
    if not source.is_dir():
        raise FileNotFoundError(f"{source} not found: run_dir must be a study run folder "
                                f"(python -m csp_utils.study params/default.yaml)")
    if dest.resolve() == source.resolve() or dest.resolve() == (REPO / "notebooks"):
        raise ValueError(f"dest {dest} would overwrite the source notebooks; give a separate folder such as docs/notebooks")
    from csp_utils import nbclean   # the standard-library filter command, outside the layers

    dest.mkdir(parents=True, exist_ok=True)
    written, skipped, shrunk = {}, [], {}
    for path in sorted(source.glob("*.ipynb")):
        if not (run_dir / "markers" / f"{path.stem}.json").exists():
            skipped.append(path.name)
            continue
        nb = json.loads(path.read_text())
        _note_widgets(nb)
        _quiet(nb)
        _relative_paths(nb, run_dir)
        actions = _shrink_notebook(nb, max_image_bytes)
        if actions:
            shrunk[path.name] = actions
        out = dest / path.name
        # in the form git's notebook filter gives it, so a fresh clone's status stays clean
        out.write_text(nbclean.clean(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", keep_outputs=True))
        written[path.name] = out.stat().st_size
    for old in dest.glob("*.ipynb"):
        if old.name not in written:
            old.unlink()
    return {"written": written, "skipped": skipped, "shrunk": shrunk}
