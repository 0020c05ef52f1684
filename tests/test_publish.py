"""Writing into the repository is a step of its own: a run writes only its run folder,
``--publish`` writes a finished run and reports what changed, ``--figures-only`` checks its
inputs before it touches a figure, and notebooks saved in an editor leave git clean."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from csp_utils import nbclean
from csp_utils.pipeline import cli, planning, publish

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "figures" / "results"


def _figures(tmp_path) -> Path:
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "old.png").write_bytes(b"old figure")
    (figs / "figures.json").write_text(json.dumps({"figures": ["old"]}))
    return figs


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage", ["truncated", "missing", "bad_csv"])
def test_figures_only_names_a_damaged_or_missing_input_and_keeps_the_figures(tmp_path, damage):
    results = tmp_path / "results"
    shutil.copytree(PUBLISHED, results)
    target = {"truncated": results / "per_question.csv.gz", "missing": results / "deep" / "headline.csv",
              "bad_csv": results / "train_logs" / "sft@s0.csv"}[damage]
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "missing":
        target.unlink()
    else:
        target.write_bytes(b"\xff\xfe\x00garbage\x00" * 3)
    figs = _figures(tmp_path)
    before = _snapshot(figs)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--figures-only", str(results), "--figures-dir", str(figs)])
    message = str(exit_.value)
    assert str(target) in message and "\n" not in message, message
    assert _snapshot(figs) == before


def test_figures_only_redraws_every_figure_from_compact_results(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(PUBLISHED, results)
    figs = _figures(tmp_path)
    written = publish.figures_only(results, figs)
    names = {p.name for p in written}
    assert {"metrics_pooled.png", "reliability_clean_sets.png", "training_sft@s0.png"} <= names
    assert (figs / "deep" / "metrics_pooled.png").exists()
    assert not (figs / "old.png").exists()  # the previous drawing's figure no longer drawn
    assert not list(figs.glob(".drawing-*"))


def _fake_run(tmp_path) -> Path:
    run = tmp_path / "runs" / "default"
    shutil.copytree(PUBLISHED, run / "results")
    head = pd.read_csv(run / "results" / "headline.csv")
    head.loc[head["model"] == "grounded", "brier"] += 0.01
    head.to_csv(run / "results" / "headline.csv", index=False)
    (run / "notebooks").mkdir()
    (run / "markers").mkdir()
    nb = {"cells": [{"cell_type": "code", "execution_count": 1, "id": "a", "metadata": {"tags": ["injected-parameters"]},
                     "outputs": [], "source": f'run_dir = "{run.resolve()}"\n'}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (run / "notebooks" / "07_figures.ipynb").write_text(json.dumps(nb))
    (run / "markers" / "07_figures.json").write_text("{}")
    return run


def test_publish_writes_the_run_and_reports_changed_files_and_numbers(tmp_path):
    run = _fake_run(tmp_path)
    shutil.copytree(PUBLISHED, tmp_path / "pub" / "results")
    readme = tmp_path / "pub" / "README.md"
    readme.write_text("# x\n\n<!-- results:start -->\nold\n<!-- results:end -->\n")
    targets = {"figures": tmp_path / "pub" / "figs", "results": tmp_path / "pub" / "results", "readme": readme,
               "results_doc": tmp_path / "pub" / "results.md", "notebooks": tmp_path / "pub" / "notebooks"}
    settings = {"after": "sft_simpo", "methods": ["sft_simpo", "grounded"], "base_label": "embedded",
                "more_results": {"embedded-deep": "deep"}}
    lines = publish.publish_run(run, targets, settings)
    text = "\n".join(lines)
    line = next(x for x in lines if "pooled-clean embedded grounded" in x)
    assert "Brier 0.132 -> 0.142 (+0.010)" in line and "within-set AUROC 0.570 -> 0.570 (+0.000)" in line
    assert "changed" in text and "headline.csv" in text and "README.md" in text and "07_figures.ipynb" in text
    assert "| embedded | grounded |" in readme.read_text()  # the compact table: base model, model, ...
    published = json.loads((targets["notebooks"] / "07_figures.ipynb").read_text())
    assert published["cells"][0]["source"] == 'run_dir = "runs/default"\n'

    again = publish.publish_run(run, targets, settings)
    assert again[-1] == "nothing changed: the run was published already"
    # --compare: numbers only, nothing written
    before = _snapshot(tmp_path / "pub")
    numbers = [x for x in again if not x.startswith(("changed", "nothing", "  added", "  changed", "  removed"))]
    assert publish.publish_run(run, targets, settings, compare_only=True) == numbers
    assert _snapshot(tmp_path / "pub") == before


def test_publish_refuses_a_run_that_did_not_finish(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(REPO / "params" / "default.yaml"), "--publish", "--runs-root", str(tmp_path / "runs")])
    assert "no run folder" in str(exit_.value) and "\n" not in str(exit_.value)
    (tmp_path / "runs" / "default" / "markers").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(REPO / "params" / "default.yaml"), "--publish", "--runs-root", str(tmp_path / "runs")])
    assert "is not finished (00_world_and_benchmarks" in str(exit_.value)


def test_a_study_writes_only_its_run_folder():
    """No stage of any params file is pointed outside its run folder: what goes into the
    repository is named in ``publish`` and written by --publish only. The default study
    publishes every place, another only its own results page and compact results, none twice."""
    targets = {}
    for path in sorted((REPO / "params").glob("*.yaml")):
        params = planning.load_params(path)
        for name, given in params["stages"].items():
            assert not {"figures_dir", "results_dir"} & set(given or {}), (path.name, name)
        if not params.get("publish"):
            continue
        given = publish.publish_targets(params, path.name)
        assert set(given) == set(publish.PUBLISH_KEYS) if path.name == "default.yaml" else (
            set(given) <= {"results", "results_doc"}), path
        for key, where in given.items():
            assert where not in targets, f"{path.name}: publish.{key} is {targets.get(where)}'s too"
            targets[where] = path.name


def test_an_unknown_publish_key_is_refused_with_a_did_you_mean():
    with pytest.raises(publish.PublishError, match='unknown key .readmee.. Did you mean "readme"'):
        publish.publish_targets({"publish": {"readmee": "README.md"}}, "p.yaml")
    with pytest.raises(publish.PublishError, match="inside the repository"):
        publish.publish_targets({"publish": {"figures": "/etc"}}, "p.yaml")


# ---------------------------------------------------------------- notebooks clean in git
def _git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout


def _clone_with_filter(tmp_path) -> Path:
    repo = tmp_path / "clone"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "docs" / "notebooks").mkdir(parents=True)
    shutil.copy(REPO / ".gitattributes", repo)
    shutil.copy(REPO / "notebooks" / "01_perturbation_explorer.ipynb", repo / "notebooks")
    shutil.copy(REPO / "docs" / "notebooks" / "00_world_and_benchmarks.ipynb", repo / "docs" / "notebooks")
    _git(repo, "init", "-q")
    nbclean.install(repo)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "x")
    return repo


def _as_an_editor_saves(path: Path, outputs: bool) -> dict:
    nb = json.loads(path.read_text())
    nb["metadata"]["kernelspec"]["display_name"] = "Python 3 (ipykernel)"
    nb["metadata"]["language_info"]["version"] = "3.11.9"
    for i, cell in enumerate(nb["cells"]):
        if outputs and cell["cell_type"] == "code":
            cell["execution_count"] = i
            cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "x" * 1000}]
            cell["metadata"]["execution"] = {"iopub.status.idle": "2026-01-01T00:00:00Z"}
    path.write_text(json.dumps(nb, indent=2))
    return nb


def test_a_notebook_run_and_saved_in_an_editor_leaves_git_clean(tmp_path):
    repo = _clone_with_filter(tmp_path)
    _as_an_editor_saves(repo / "notebooks" / "01_perturbation_explorer.ipynb", outputs=True)
    _as_an_editor_saves(repo / "docs" / "notebooks" / "00_world_and_benchmarks.ipynb", outputs=False)
    # git status lists a file whose size changed until the index is refreshed; the content it
    # would commit is the filter's: no diff, and staging it leaves nothing to commit
    assert _git(repo, "diff") == ""
    _git(repo, "add", "-A")
    assert _git(repo, "status", "--porcelain") == ""
    # a code edit is still a change
    nb = json.loads((repo / "notebooks" / "01_perturbation_explorer.ipynb").read_text())
    nb["cells"][1]["source"] = ["x = 2\n"]
    (repo / "notebooks" / "01_perturbation_explorer.ipynb").write_text(json.dumps(nb))
    assert _git(repo, "status", "--porcelain").strip() == "M notebooks/01_perturbation_explorer.ipynb"


def test_the_tracked_notebooks_are_in_their_committed_form():
    """What the filter makes of each tracked notebook is the file itself, so that a fresh clone's
    git status stays clean whether or not the filter ran."""
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        assert nbclean.clean(path.read_text()) == path.read_text(), path.name
    for path in sorted((REPO / "docs" / "notebooks").glob("*.ipynb")):
        assert nbclean.clean(path.read_text(), keep_outputs=True) == path.read_text(), path.name
