"""The figures made from saved results, and publishing a run's executed notebooks for readers."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from csp_utils import nbclean
from csp_utils.analysis import report


def _png_b64(side: int, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _notebook(png: str, widgets: bool = False) -> dict:
    nb = {"cells": [{"cell_type": "code", "source": "plot()", "metadata": {}, "execution_count": 1,
                     "outputs": [{"output_type": "display_data", "metadata": {},
                                  "data": {"image/png": png, "text/plain": "<Figure>"}}]}],
          "metadata": {"kernelspec": {"name": "python3"}}, "nbformat": 4, "nbformat_minor": 5}
    if widgets:
        nb["metadata"]["widgets"] = {"state": {"w": {"outputs": [{"data": {"image/png": png}}]}}}
    return nb


def _fake_run(tmp_path, notebooks: dict, finished: set) -> "Path":
    run = tmp_path / "runs" / "default"
    (run / "notebooks").mkdir(parents=True)
    (run / "markers").mkdir()
    for name, nb in notebooks.items():
        (run / "notebooks" / f"{name}.ipynb").write_text(json.dumps(nb))
        if name in finished:
            (run / "markers" / f"{name}.json").write_text("{}")
    return run


def test_publish_copies_finished_notebooks_with_outputs(tmp_path):
    small = _png_b64(16)
    run = _fake_run(tmp_path, {"00_world": _notebook(small), "07_figures": _notebook(small)}, finished={"00_world"})
    dest = tmp_path / "docs" / "notebooks"
    (dest).mkdir(parents=True)
    (dest / "03_gone.ipynb").write_text("{}")   # a stage the run no longer has
    out = report.publish_notebooks(run, dest)
    assert sorted(p.name for p in dest.glob("*.ipynb")) == ["00_world.ipynb"]
    assert out["skipped"] == ["07_figures.ipynb"] and out["shrunk"] == {}
    assert out["written"] == {"00_world.ipynb": (dest / "00_world.ipynb").stat().st_size}
    text = (dest / "00_world.ipynb").read_text()
    published = json.loads(text)
    assert published["cells"][0]["outputs"][0]["data"]["image/png"] == small
    assert nbclean.clean(text, keep_outputs=True) == text   # as git's filter would commit it


def test_publish_replaces_a_widgets_repr_with_a_line_for_the_reader(tmp_path):
    nb = _notebook(_png_b64(16))
    widget = {"model_id": "abc", "version_major": 2, "version_minor": 0}
    nb["cells"][0]["outputs"].append({"output_type": "display_data", "metadata": {}, "data": {
        report.WIDGET_VIEW: widget, "text/plain": "interactive(children=(IntSlider(value=40, ..."}})
    run = _fake_run(tmp_path, {"01_explorer": nb}, finished={"01_explorer"})
    report.publish_notebooks(run, tmp_path / "pub")
    figure, view = json.loads((tmp_path / "pub" / "01_explorer.ipynb").read_text())["cells"][0]["outputs"]
    assert view["data"] == {report.WIDGET_VIEW: widget, "text/plain": report.WIDGET_NOTE}
    assert figure["data"]["text/plain"] == "<Figure>"   # other outputs as they were


def test_publish_shrinks_notebooks_over_the_image_budget(tmp_path):
    big = _png_b64(256)                          # noise compresses badly: ~200 kB per copy
    run = _fake_run(tmp_path, {"01_explorer": _notebook(big, widgets=True)}, finished={"01_explorer"})
    budget = len(big) // 2
    out = report.publish_notebooks(run, tmp_path / "pub", max_image_bytes=budget)
    nb = json.loads((tmp_path / "pub" / "01_explorer.ipynb").read_text())
    assert "widgets" not in nb["metadata"]
    assert out["shrunk"]["01_explorer.ipynb"][0] == "dropped widget state"
    png = nb["cells"][0]["outputs"][0]["data"]["image/png"]
    assert len(png) <= budget
    width = Image.open(io.BytesIO(base64.b64decode(png))).width
    assert 100 <= width < 256                    # downscaled, still a readable figure


def test_publish_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder"):
        report.publish_notebooks(tmp_path, tmp_path / "pub")
    run = _fake_run(tmp_path, {}, finished=set())
    with pytest.raises(ValueError, match="overwrite"):
        report.publish_notebooks(run, run / "notebooks")


def test_reliability_before_after_is_a_grid_of_models_by_sets():
    import pandas as pd

    rng = np.random.default_rng(0)
    sets = ["pope-random", "pope-popular", "amber-existence"]
    rows = [{"set": s, "model": m, "framing": "third", "readout": "single_pass",
             "confidence": c, "correct": int(rng.random() < c)}
            for s in sets for m in ("base", "sft_simpo@s0", "sft_simpo@s1", "baseline:temperature")
            for c in rng.integers(0, 11, 40) / 10]
    fig = report.reliability_before_after(pd.DataFrame(rows), sets, after="sft_simpo")
    cells = {ax.get_title(): ax.get_subplotspec() for ax in fig.axes if ax.get_title()}
    assert len(cells) == 6                                   # two models (seeds pooled) x three sets
    assert [cells[f"{s}\nbase"].colspan.start for s in sets] == [0, 1, 2]
    assert {cells[f"{s}\nsft_simpo"].rowspan.start for s in sets} == {1}


def test_make_figures_writes_one_curve_per_training_log(tmp_path):
    logs = tmp_path / "results" / "train_logs"
    logs.mkdir(parents=True)
    (logs / "sft@s0.csv").write_text("step,loss,lr\n1,2.0,0.0\n5,1.0,1e-4\n")
    (logs / "margins_sft_simpo@s0.csv").write_text("split,margin\ntrain,0.3\n")  # a table, not a curve
    written = report.make_figures(tmp_path / "results", tmp_path / "figures", perturbation_grid=False)
    assert [p.name for p in written] == ["training_sft@s0.png"]


def test_make_figures_removes_only_its_own_stale_figures(tmp_path):
    """A figure the previous call wrote and this one does not (a model gone from the results)
    is deleted, PNG and PDF; files it never wrote stay."""
    logs = tmp_path / "results" / "train_logs"
    logs.mkdir(parents=True)
    for name in ("sft@s0", "sft@s1"):
        (logs / f"{name}.csv").write_text("step,loss,lr\n1,2.0,0.0\n5,1.0,1e-4\n")
    figs = tmp_path / "figures"
    report.make_figures(tmp_path / "results", figs, perturbation_grid=False)
    assert {p.name for p in figs.iterdir()} >= {"training_sft@s1.png", "training_sft@s1.pdf"}
    (figs / "notes.png").write_bytes(b"not a figure of make_figures")
    (logs / "sft@s1.csv").unlink()
    written = report.make_figures(tmp_path / "results", figs, perturbation_grid=False)
    assert [p.name for p in written] == ["training_sft@s0.png"]
    assert sorted(p.name for p in figs.iterdir()) == ["figures.json", "notes.png", "training_sft@s0.pdf",
                                                      "training_sft@s0.png"]
    assert json.loads((figs / "figures.json").read_text())["figures"] == ["training_sft@s0"]


def test_ablation_tables_script_pairs_each_variant_with_its_reference(tmp_path):
    """scripts/ablation_tables.py: one table per reference, the reference first, each variant's
    paired differences with their verdicts; a missing table is named."""
    import importlib.util
    import subprocess
    import sys

    import pandas as pd

    long = []
    for name, auc, per_seed in (("full", 0.55, "0.540000;0.550000;0.560000"), ("variant", 0.60, "0.600000;0.590000;0.610000")):
        for metric, value in (("brier", 0.13), ("auroc_within", auc), ("ece", 0.02)):
            long.append({"name": name, "set": "pooled-clean", "metric": metric, "cluster": "image", "value": value,
                         "low": value - 0.01, "high": value + 0.01, "seeds": 3,
                         "per_seed": per_seed if metric == "auroc_within" else None})
    pd.DataFrame(long).to_csv(tmp_path / "ablation_x.csv", index=False)
    pd.DataFrame([{"set": "pooled-clean", "method": "variant", "reference": "full", "metric": "auroc_within",
                   "diff": 0.05, "diff_low": 0.02, "diff_high": 0.08, "verdict": "better"}]).to_csv(
        tmp_path / "ablation_paired_x.csv", index=False)
    script = Path(__file__).parents[1] / "scripts" / "ablation_tables.py"
    spec = importlib.util.spec_from_file_location("ablation_tables", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.tables(tmp_path, "_x")
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| **full** (reference) | 3 |") and "0.540 / 0.550 / 0.560" in rows[0]
    assert rows[1].startswith("| variant | 3 |") and "+0.050 [+0.020, +0.080] better" in rows[1]
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "--suffix", "_y"], capture_output=True, text=True)
    assert done.returncode != 0 and "ablation_y.csv not found" in done.stderr


def _per_question_rows(rng, models, sets, n=60):
    return [{"model": m, "set": s, "framing": "-" if m.startswith("baseline:") else "third",
             "readout": "-" if m.startswith("baseline:") else "single_pass", "question_id": f"{s}-{i}",
             "image_id": f"eval-{i // 3}", "label": "yes", "answer": "yes", "correct": bool(ok),
             "confidence": float(np.clip(0.5 + 0.4 * ok - 0.2 * rng.random(), 0, 1)), "internal_prob": 0.9}
            for m in models for s in sets for i, ok in enumerate(rng.random(n) < 0.7)]


def test_per_question_loader_reads_run_and_results_folders_with_tidy_columns(tmp_path):
    from csp_utils.analysis import loading, tables

    rng = np.random.default_rng(1)
    res = tmp_path / "run" / "results"
    (res / "deep").mkdir(parents=True)
    main = _per_question_rows(rng, ["base", "sft_simpo@s0", "sft_simpo@s1", "baseline:temperature"], ["pope-random"])
    other = _per_question_rows(rng, ["base"], ["pope-random", "transfer-blur"])
    tables.figure_data(main).to_csv(res / loading.PER_QUESTION, index=False)
    tables.figure_data(other).to_csv(res / "deep" / loading.PER_QUESTION, index=False)
    for path in (tmp_path / "run", res):                  # a run folder or its results folder
        df = loading.per_question(path, top_label="embedded")
        assert list(df.columns[:7]) == ["base", "method", "seed", "model", "set", "framing", "readout"]
        assert len(df) == len(main) + len(other)
        assert set(df["base"]) == {"embedded", "deep"}
        got = df[df["model"] == "sft_simpo@s1"]
        assert set(got["method"]) == {"sft_simpo"} and set(got["seed"]) == {"s1"} and len(got) == 60
        assert df["correct"].dtype == bool and set(df.loc[df["model"] == "base", "seed"]) == {""}
    with pytest.raises(FileNotFoundError, match="per_question"):
        loading.per_question(tmp_path / "empty")


def test_headline_aurc_equals_it_recomputed_from_the_per_question_file(tmp_path):
    """What a reader checks from the published files: a set's AURC in headline.csv is the AURC
    of that set's per-question rows, and a pool's the mean of its sets'."""
    from csp_utils.analysis import loading, tables
    from csp_utils.core import metrics

    rng = np.random.default_rng(3)
    sets = ["pope-random", "amber-existence"]
    rows = _per_question_rows(rng, ["base", "sft_simpo@s0", "sft_simpo@s1"], sets)
    for r in rows[::7]:
        r["confidence"] = round(r["confidence"], 1)          # ties
    head = tables.headline_table(rows, n_boot=30)
    tables.figure_data(rows).to_csv(tmp_path / loading.PER_QUESTION, index=False)
    pq = loading.per_question(tmp_path)
    for method in ("base", "sft_simpo"):
        per_set = []
        for s in sets:
            g = pq[(pq["method"] == method) & (pq["set"] == s)]
            per_set.append(metrics.aurc(g["confidence"], g["correct"]))
            r = head[(head["model"] == method) & (head["set"] == s)].iloc[0]
            assert r["aurc"] == pytest.approx(per_set[-1], abs=1e-12)
            assert r["aurc_low"] <= r["aurc"] <= r["aurc_high"]
        pooled = head[(head["model"] == method) & (head["set"] == "pooled-clean")].iloc[0]
        assert pooled["aurc"] == pytest.approx(np.mean(per_set), abs=1e-12)


def test_risk_coverage_figure_draws_methods_baselines_and_the_oracle(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(2)
    sets = ["pope-random", "transfer-blur"]
    pq = pd.DataFrame(_per_question_rows(rng, ["base", "sft_simpo@s0", "sft_simpo+isotonic@s0",
                                               "baseline:temperature"], sets))
    fig = report.risk_coverage_figure(pq, {"clean sets": sets[:1], "transfer sets": sets[1:]})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert [t.split(" (")[0] for t in labels] == ["base", "sft_simpo", "baseline:temperature", "oracle"]
    from csp_utils.core import metrics
    g = pq[(pq["model"] == "sft_simpo@s0") & (pq["set"] == "pope-random")]
    assert labels[1] == f"sft_simpo ({np.mean(metrics.risk_coverage(g['confidence'], g['correct'], report.COVERAGE_GRID)):.3f})"


def test_publish_drops_progress_bars_and_warnings_and_notes_only_sliders(tmp_path):
    """A progress bar is a widget too (tqdm in a kernel) and a warning a stderr stream: neither
    belongs in a published copy; the live-widget note goes under sliders only."""
    nb = _notebook(_png_b64(16))
    outputs = nb["cells"][0]["outputs"]
    outputs.append({"output_type": "stream", "name": "stderr", "text": "\rLoading weights: 100%|#####| 12/12\n"})
    outputs.append({"output_type": "stream", "name": "stderr", "text": "FutureWarning: `x` is deprecated\n"})
    outputs.append({"output_type": "stream", "name": "stdout", "text": "rows: 12\n"})
    outputs.append({"output_type": "display_data", "metadata": {}, "data": {
        report.WIDGET_VIEW: {"model_id": "bar"}, "text/plain": "Loading weights: 100%|#####| 12/12"}})
    outputs.append({"output_type": "display_data", "metadata": {}, "data": {
        report.WIDGET_VIEW: {"model_id": "box"}, "text/plain": "interactive(children=(...))"}})
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {
        "bar": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_p"]}},
        "p": {"model_name": "FloatProgressModel", "state": {}},
        "box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_s"]}},
        "s": {"model_name": "IntSliderModel", "state": {}}}}}
    run = _fake_run(tmp_path, {"05_eval": nb}, finished={"05_eval"})
    report.publish_notebooks(run, tmp_path / "pub")
    out = json.loads((tmp_path / "pub" / "05_eval.ipynb").read_text())["cells"][0]["outputs"]
    assert [o.get("name") or o["data"].get("text/plain") for o in out] == [
        "<Figure>", "stdout", report.WIDGET_NOTE]


def test_published_notebooks_name_the_run_folder_relative_and_no_machine_path(tmp_path):
    from csp_utils.core.paths import REPO

    run = tmp_path / "runs" / "default"
    nb = _notebook(_png_b64(16))
    nb["cells"].insert(0, {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "execution_count": 1,
                           "outputs": [], "source": f'# Parameters\nrun_dir = "{run.resolve()}"\n'})
    nb["cells"][1]["outputs"].append({"output_type": "stream", "name": "stdout",
                                      "text": f"wrote {run.resolve()}/results/x.csv from {REPO}/notebooks\n"})
    nb["metadata"]["papermill"] = {"parameters": {"run_dir": str(run.resolve())}}
    _fake_run(tmp_path, {"00_world": nb}, finished={"00_world"})
    report.publish_notebooks(run, tmp_path / "pub")
    text = (tmp_path / "pub" / "00_world.ipynb").read_text()
    published = json.loads(text)
    assert 'run_dir = "runs/default"' in "".join(published["cells"][0]["source"])
    assert "runs/default/results/x.csv from notebooks" in "".join(published["cells"][1]["outputs"][1]["text"])
    assert str(tmp_path) not in text and str(REPO) not in text


def test_the_published_notebooks_name_no_machine_path():
    """Every published notebook in the repository: a relative run folder, no absolute paths."""
    from csp_utils.core.paths import REPO

    for path in sorted((REPO / "docs" / "notebooks").glob("*.ipynb")):
        text = path.read_text()
        for root in ("/work/", "/home/", "/tmp/", "/Users/", str(REPO)):
            assert root not in text, (path.name, root)


def test_publish_brings_a_figure_like_image_under_the_budget(tmp_path):
    """Plots have few colours and sharp edges: resampling blends them into many, so their PNG
    bytes fall much less than their pixels; the images still end under the budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    fig, axes = plt.subplots(2, 6, figsize=(22, 11), dpi=100)
    for ax in axes.flat:
        ax.bar(np.arange(10), rng.random(10), color="tab:blue", edgecolor="k")
        ax.plot([0, 9], [0, 1], "--", color="grey")
        ax.set_title("pope-random base")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode()
    nb = _notebook(png)
    nb["cells"] = nb["cells"] * 8
    run = _fake_run(tmp_path, {"07_figures": nb}, finished={"07_figures"})
    budget = 8 * len(png) // 6
    report.publish_notebooks(run, tmp_path / "pub", max_image_bytes=budget)
    published = json.loads((tmp_path / "pub" / "07_figures.ipynb").read_text())
    sizes = [len(o["data"]["image/png"]) for c in published["cells"] for o in c["outputs"]]
    assert len(sizes) == 8 and sum(sizes) <= budget
    assert Image.open(io.BytesIO(base64.b64decode(published["cells"][0]["outputs"][0]["data"]["image/png"]))).width >= 700
