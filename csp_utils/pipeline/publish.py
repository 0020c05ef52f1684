"""Writing a finished run into the repository, as a step of its own.

A study writes only its run folder. ``--publish`` copies a finished, up-to-date run's compact
results, figures, README table, results page and executed notebooks to the places the params
file's ``publish`` mapping names, prints each file it changed and how the new numbers differ
from the ones it replaced; ``--compare`` prints only the numbers. ``--figures-only`` redraws
the figures from compact results after reading every input file whole, so a damaged or missing
file is one line naming it and the figures on disk stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from csp_utils.core.paths import REPO
from csp_utils.pipeline.checks import notebook_defaults, unknown_name
from csp_utils.pipeline.driver import prepare_run
from csp_utils.pipeline.markers import changed_outputs, read_marker
from csp_utils.pipeline.stages import PUBLISH_KEYS, notebook_of

REQUIRED = ("headline.csv", "per_question.csv.gz")  # what every figure and table starts from
COMPARED = (("auroc_within", "within-set AUROC"), ("brier", "Brier"), ("ece", "ECE10"))


class PublishError(ValueError):
    pass


def publish_targets(params: dict, source: str) -> dict[str, Path]:
    """The params' ``publish`` mapping, checked: known keys, paths inside the repository."""
    given = params.get("publish")
    if not given:
        raise PublishError(f"{source} has no 'publish' mapping: this study's results are not published "
                           f"(it may say publish: {{{', '.join(f'{k}: PATH' for k in PUBLISH_KEYS)}}})")
    if not isinstance(given, dict):
        raise PublishError(f"{source}: publish must be a mapping of what -> path, got {given!r}")
    targets = {}
    for key, value in given.items():
        if key not in PUBLISH_KEYS:
            raise PublishError(f"{source}: publish: {unknown_name('key', key, PUBLISH_KEYS)}")
        path = (REPO / str(value)).resolve()
        if not isinstance(value, str) or REPO.resolve() not in (path, *path.parents):
            raise PublishError(f"{source}: publish.{key} = {value!r} must be a path inside the repository")
        targets[key] = path
    return targets


# ------------------------------------------------------------------ compact results, checked
def check_results(results_dir: Path) -> list[Path]:
    """Every compact file under ``results_dir`` (and its base subfolders) read whole; returns
    the results folders. One line naming the file when one is missing or damaged."""
    import pandas as pd

    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise PublishError(f"{results_dir}: no such results folder")
    from csp_utils.analysis.report import COMPACT

    # a subfolder holding any compact file is another base's results (a missing file there is named)
    folders = [results_dir] + sorted(p for p in results_dir.iterdir()
                                     if p.is_dir() and any((p / name).exists() for name in COMPACT))
    for folder in folders:
        for name in REQUIRED:
            if not (folder / name).is_file():
                raise PublishError(f"{folder / name} is missing; restore it (git checkout -- {folder / name}) "
                                   "or publish a run again")
        files = [p for p in folder.iterdir() if p.is_file()]
        files += sorted((folder / "train_logs").glob("*")) if (folder / "train_logs").is_dir() else []
        for path in files:
            try:
                if path.name.endswith((".csv", ".csv.gz")):
                    pd.read_csv(path)
                elif path.suffix == ".json":
                    json.loads(path.read_text())
            except Exception as err:  # any reader error means the file cannot be used: name it
                raise PublishError(f"{path} is damaged ({type(err).__name__}: {err}); restore it "
                                   f"(git checkout -- {path}) or publish a run again; no figure was changed") from None
    return folders


# ------------------------------------------------------------------ figures
def figures_only(results_dir, figures_dir=None, after: str = "sft_simpo") -> list[Path]:
    """Every figure from compact results, drawn into a scratch folder first and moved into
    ``figures_dir`` (default: the folder above ``results_dir``) only when all were drawn;
    another base's subfolder of results gets its figures in the same subfolder."""
    from csp_utils.analysis import report

    results_dir = Path(results_dir)
    figures_dir = Path(figures_dir) if figures_dir else results_dir.parent
    folders = check_results(results_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=figures_dir, prefix=".drawing-") as scratch:
        scratch = Path(scratch)
        drawn = report.make_figures(results_dir, scratch, after=after)
        for sub in folders[1:]:
            drawn += report.make_figures(sub, scratch / sub.name, after=after, perturbation_grid=False)
        for folder in [scratch] + [scratch / sub.name for sub in folders[1:]]:
            _replace_figures(folder, figures_dir / folder.relative_to(scratch))
    return [figures_dir / p.relative_to(scratch) for p in drawn]


def _replace_figures(new: Path, dest: Path) -> None:
    """``new``'s figures and manifest into ``dest``; the figures ``dest``'s manifest listed that
    ``new`` does not are removed (PNG and PDF)."""
    from csp_utils.analysis.report import FIGURES_MANIFEST

    dest.mkdir(parents=True, exist_ok=True)
    before = dest / FIGURES_MANIFEST
    old = set(json.loads(before.read_text())["figures"]) if before.exists() else set()
    now = set(json.loads((new / FIGURES_MANIFEST).read_text())["figures"])
    for path in new.iterdir():
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    for stem in sorted(old - now):
        for path in (dest / f"{stem}.png", dest / f"{stem}.pdf"):
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------ numbers
def headline_numbers(results: dict[str, Path], models) -> dict[tuple, dict]:
    """(pooled set, base label, model) -> the compared metrics, from each base's headline.csv."""
    import pandas as pd

    from csp_utils.analysis.markdown import main_rows
    from csp_utils.analysis.tables import MAIN_COMBO, POOLED

    out = {}
    for label, folder in results.items():
        path = Path(folder) / "headline.csv"
        if not path.exists():
            continue
        head = main_rows(pd.read_csv(path), *MAIN_COMBO)
        for _, row in head[head["set"].isin(POOLED) & head["model"].isin(models)].iterrows():
            out[(row["set"], label, row["model"])] = {k: row.get(k) for k, _ in COMPARED}
    return out


def compare_lines(old: dict, new: dict) -> list[str]:
    """One line per pooled set, base and model: each compared metric published -> this run."""
    lines = []
    for key in sorted(set(old) | set(new)):
        set_, label, model = key
        cells = []
        for metric, title in COMPARED:
            a, b = (old.get(key) or {}).get(metric), (new.get(key) or {}).get(metric)
            if a is None or b is None or a != a or b != b:
                cells.append(f"{title} {'—' if a is None or a != a else f'{a:.3f}'} -> "
                             f"{'—' if b is None or b != b else f'{b:.3f}'}")
            else:
                cells.append(f"{title} {a:.3f} -> {b:.3f} ({b - a:+.3f})")
        lines.append(f"{set_} {label} {model}: " + ", ".join(cells))
    return lines


# ------------------------------------------------------------------ publishing
def _digests(paths) -> dict[Path, str]:
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for path in files:
            if not any(part.startswith(".drawing-") for part in path.parts):
                out[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _bases(results: Path, figures: dict) -> dict[str, Path]:
    return {figures["base_label"]: results, **{label: results / sub for label, sub in figures["more_results"].items()}}


def publish_run(run_dir: Path, targets: dict[str, Path], figures: dict, compare_only: bool = False) -> list[str]:
    """Write a finished run into the repository (or, ``compare_only``, only compare its numbers
    with the published ones); ``figures``: the run's 07_figures parameters (after, methods,
    base_label, more_results). Returns the lines printed."""
    from csp_utils.analysis import markdown, report

    run_dir = Path(run_dir)
    check_results(run_dir / "results")
    models = ["base", figures["after"], *figures["methods"]]
    published = targets.get("results")
    old = headline_numbers(_bases(published, figures), models) if published else {}
    new = headline_numbers(_bases(run_dir / "results", figures), models)
    lines = [f"numbers, published ({_rel(published) if published else 'none'}) -> this run ({run_dir}):"]
    lines += ["  " + line for line in compare_lines(old, new)]
    if compare_only:
        return lines
    before = _digests(targets.values())
    results = published or run_dir / "results"
    if published:
        report.publish_results(run_dir / "results", published)
    if "figures" in targets:
        figures_only(results, targets["figures"], after=figures["after"])
    bases = _bases(results, figures)
    if "readme" in targets:
        markdown.write_readme_section(targets["readme"], markdown.results_markdown(bases, figures["methods"]))
    if "results_doc" in targets:
        targets["results_doc"].parent.mkdir(parents=True, exist_ok=True)
        targets["results_doc"].write_text(markdown.results_document(bases, figures["methods"], f"{_rel(results)}/"))
    if "notebooks" in targets:
        report.publish_notebooks(run_dir, targets["notebooks"])
    after = _digests(targets.values())
    changed = sorted({p for p in before.keys() | after.keys() if before.get(p) != after.get(p)})
    lines.append(f"changed {len(changed)} file(s):" if changed else "nothing changed: the run was published already")
    lines += [f"  {'added' if p not in before else 'removed' if p not in after else 'changed'} {_rel(p)}"
              for p in changed]
    return lines


def publish_study(params_path, name=None, runs_root="runs", overrides=None, compare_only: bool = False) -> None:
    """``--publish`` / ``--compare``: the run folder of ``params_path`` (every stage finished,
    its outputs as recorded) into the repository's places its ``publish`` mapping names."""
    params, plan, name, run_dir = prepare_run(params_path, name, runs_root, overrides)
    targets = publish_targets(params, str(params_path))
    if compare_only:
        targets = {k: v for k, v in targets.items() if k == "results"}
    figures = next((s for s in plan if s.name == "07_figures"), None)
    if figures is None:
        raise PublishError(f"{params_path} has no 07_figures stage: nothing says which methods its tables show")
    if not run_dir.is_dir():
        raise PublishError(f"no run folder {run_dir}: run the study first (python -m csp_utils.study {params_path})")
    failed = json.loads((run_dir / "manifest.json").read_text()).get("failed") if (
        run_dir / "manifest.json").exists() else None
    unfinished = [s.name for s in plan if read_marker(run_dir, s.name) is None]
    if unfinished or failed:
        raise PublishError(f"run folder {run_dir} is not finished ({', '.join(unfinished) or failed['stage']} "
                           f"{'did not finish' if unfinished else 'failed'}): finish it with "
                           f"python -m csp_utils.study {params_path}, then publish")
    changed = [f"{s.name}: {', '.join(c)}" for s in plan for c in [changed_outputs(run_dir, read_marker(run_dir, s.name))]
               if c]
    if changed:
        raise PublishError(f"run folder {run_dir}: outputs changed since their stage finished ({'; '.join(changed)}); "
                           f"rerun python -m csp_utils.study {params_path}, then publish")
    settings = {**notebook_defaults(notebook_of("07_figures")), **figures.parameters}
    for line in publish_run(run_dir, targets, settings, compare_only):
        print(f"[{'compare' if compare_only else 'publish'}] {line}", flush=True)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO.resolve()))
    except ValueError:
        return str(path)
