"""The stage graph: what each notebook writes and reads inside the run folder
(:data:`STAGES`), its time limit, its parameter types and config classes; where run folders
and notebooks are.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


from csp_utils.analysis import outputs
from csp_utils.core.paths import REPO


NOTEBOOKS = REPO / "notebooks"
RESERVED = ("cell_timeout",)  # stage keys read by the driver, never passed to the notebook
DRIVER_PARAMETERS = ("run_dir",)
DRIVER_KEYS = ("stages", "name", "jobs", "publish")  # top-level params read by the driver, never passed to a notebook
# what ``publish`` in a params file may name (``--publish`` writes a finished run there)
PUBLISH_KEYS = {"figures": "the figures, drawn from the published compact results",
                "results": "the compact results (CSV/JSON, training logs; another base's in a subfolder)",
                "readme": "a Markdown file whose results section gets the pooled table",
                "results_doc": "the full results page", "notebooks": "the run's executed notebooks"}
HOUR = 3600


# ------------------------------------------------------------------ stage declarations
def _nothing(p: dict) -> list[str]:
    return []


@dataclass(frozen=True)
class StageSpec:
    """What one notebook writes and reads, as paths under the run folder built from its
    parameters (notebook defaults filled in). A path may end in a ``*`` pattern."""
    outputs: Callable[[dict], list[str]]
    inputs: Callable[[dict], list[str]] = _nothing  # the stages declaring these as outputs are read
    scratch: Callable[[dict], list[str]] = _nothing  # resume state: cleared with the outputs, not digested
    uses_model: bool = False  # loads base_model (others are not passed it)
    cell_timeout: int = 600  # seconds per cell
    # parameter -> accepted types, where the default says too little (None) or too much (a str
    # that may also be a dict); None stays accepted where it is the default
    types: dict = field(default_factory=dict)
    # the parameter a stage key NAME@TAG sets to its default plus "@TAG" unless the stage gives it
    tagged: str | None = None
    # config-dict parameter (a dotted path for a nested dict) -> the dataclass or function whose
    # fields or keywords it takes (or that and the names the notebook sets itself); checked by
    # name and by the type of each default
    configs: Callable[[], dict] = dict


def _figures(*stems: str) -> list[str]:
    return outputs.figure_files("figures", *stems)


def _matrix(models, results: str = "results") -> list[str]:
    """Result folders of model entries ("NAME" or "LABEL=ADAPTER": results carry the label)."""
    return [f"{results}/matrix/{m.replace('/', '_')}" for m in dict.fromkeys(_labels(models))]


def _adapters(models) -> list[str]:
    folders = [str(m).split("=", 1)[-1] for m in models if m != "base"]
    return [f"adapters/{m}" for m in dict.fromkeys(folders)]


def _preview(p: dict) -> list[str]:
    from csp_utils.evaluate.matrix import results_suffix

    return _figures(f"reliability_pope_adversarial_preview{results_suffix(p['results'])}")


def _sources(p: dict) -> list[str]:
    """The confidence sources on the base model's answers, where the stage evaluates the base model."""
    return [f"{p['results']}/sources"] if p["sources"] and "base" in _labels(p["models"]) else []


def _labels(models) -> list[str]:
    """The names model entries' results carry ("LABEL=ADAPTER" -> LABEL)."""
    return [str(m).split("=", 1)[0] for m in models]


def _evaluation_tables(p: dict) -> list[str]:
    """What an evaluation writes besides its rows (a part of a split one writes rows only)."""
    return [*(f"{p['results']}/{name}" for name in (
        "sets.json", "summary.csv", "headline.csv", "paired.csv", "per_question.csv.gz", "level_spearman.csv",
        "grounded_perturbed.csv")), *_preview(p)]


def _simpo_name(p: dict) -> str:
    return ("sft_simpo" if p["regime"] == "sft_simpo" else "simpo_only") + p["tag"]


def _ablation_models(p: dict) -> list[str]:
    """Every model entry of notebook 06: each variant's (one, or one per seed) and the reference."""
    return [m for v in p["variants"].values() for m in ([v] if isinstance(v, str) else v)] + [p["reference"]]


def _suffix(p: dict) -> str:
    return f"_{p['name']}" if p.get("name") else ""


def _figures_outputs(p: dict) -> list[str]:
    if p["figures_dir"] is not None:  # published outside the run folder: not the driver's to clear
        return []
    return (_figures(*(outputs.pattern(name) for name in outputs.REPORT_FIGURES))
            + [f"figures/{sub}" for sub in p["more_results"].values()])


NUMBER = (int, float)


def _build_configs() -> dict:
    from csp_utils.dataset import coco, csp_noise, buildconfig

    # the notebook passes the model, the seed, the grounder and the study-wide files itself
    data = (coco.make_source, ("base_model", "seed", "grounder", "coco_instances", "coco_train_images", "eval_images",
                               "jsonl", "jsonl_images"))
    return {"data": data, "build": buildconfig.BuildConfig, "build.noise": csp_noise.NoiseConfig,
            "build.grounded": buildconfig.GroundedOptions}


def _training_configs(name: str) -> Callable[[], dict]:
    def configs() -> dict:
        from csp_utils.train import settings

        stage = settings.SFTConfigCSP if name == "sft" else settings.SimPOConfigCSP
        return {name: stage, f"{name}.lora": settings.LoraSettings}
    return configs


def _evaluation_configs() -> dict:
    from csp_utils.evaluate import evaluation
    from csp_utils.analysis import tables
    from csp_utils.evaluate import suites

    return {"suite": suites.SuiteConfig, "scoring": evaluation.EvalConfig, "boot": (tables.headline_table, ("rows",))}


def _ablation_configs() -> dict:
    from csp_utils.evaluate import evaluation

    # the notebook's framing and readout parameters set these
    return {**_evaluation_configs(), "scoring": (evaluation.EvalConfig, ("framings", "readouts"))}


STAGES: dict[str, StageSpec] = {
    "00_world_and_benchmarks": StageSpec(
        outputs=lambda p: ["results/benchmark_composition.csv", *_figures(
            "world_scenes", "world_variants", "benchmark_balance", "category_frequencies",
            "reliability_illustrative")]),
    "01_perturbation_explorer": StageSpec(outputs=lambda p: _figures("perturbation_grid")),
    "02_build_perturbed_dataset": StageSpec(
        outputs=lambda p: [p["dataset"], *_figures(f"{p['dataset']}_levels")],
        uses_model=True,  # grounded rows record its answers; photographs take its input size
        cell_timeout=2 * HOUR, tagged="dataset", configs=_build_configs, types={
            "build.grounder": (str, dict), "data.image_size": (str, int, type(None)), **dict.fromkeys(
                ("coco_instances", "coco_train_images", "pope_dir", "jsonl", "jsonl_images", "detector", "segmenter"),
                (str,))}),
    "03_train_sft": StageSpec(
        outputs=lambda p: [f"adapters/sft{p['tag']}", f"train_logs/sft{p['tag']}.csv"],
        inputs=lambda p: [p["dataset"]],
        scratch=lambda p: [f"checkpoints/sft{p['tag']}", f"merged/sft{p['tag']}"],
        uses_model=True, cell_timeout=8 * HOUR, tagged="tag", configs=_training_configs("sft")),
    "04_train_simpo": StageSpec(
        outputs=lambda p: [f"adapters/{_simpo_name(p)}", f"train_logs/{_simpo_name(p)}.csv",
                           f"train_logs/margins_{_simpo_name(p)}.csv"],
        inputs=lambda p: [p["dataset"]] + ([f"adapters/sft{p['tag']}"] if p["regime"] == "sft_simpo" else []),
        scratch=lambda p: [f"checkpoints/{_simpo_name(p)}", f"merged/{_simpo_name(p)}"],
        uses_model=True, cell_timeout=8 * HOUR, tagged="tag", configs=_training_configs("simpo")),
    "05_evaluate": StageSpec(
        outputs=lambda p: [*_matrix(p["models"], p["results"]), *_sources(p),
                           *([] if p["rows_only"] else _evaluation_tables(p))],
        inputs=lambda p: _adapters(p["models"]), uses_model=True, cell_timeout=8 * HOUR, configs=_evaluation_configs,
        types={"sets": (list,), "adapter_scope": (str,), "device_map": (str, dict), "rows_only": (bool,),
               **dict.fromkeys(("pope_dir", "coco_val_images", "amber_dir", "amber_images"), (str,))}),
    "06_ablations": StageSpec(
        outputs=lambda p: [*_matrix(_ablation_models(p)), f"results/ablation{_suffix(p)}.csv",
                           f"results/ablation_paired{_suffix(p)}.csv",
                           *_figures(*(f"preview_ablation{_suffix(p)}_{m}" for m in ("ece", "brier", "auroc_within")))],
        inputs=lambda p: _adapters(_ablation_models(p)), uses_model=True, cell_timeout=8 * HOUR,
        configs=_ablation_configs, types={"sets": (list,)}),
    "07_figures": StageSpec(
        outputs=lambda p: (["results/train_logs"] if p["results_dir"] is None else []) + _figures_outputs(p),
        inputs=lambda p: (["results"] if p["results_dir"] is None else []) + ["train_logs"],
        cell_timeout=HOUR, types=dict.fromkeys(("results_dir", "figures_dir"), (str,))),
}


# ------------------------------------------------------------------ batch kernels
BATCH_ENV = "CSP_BATCH"   # "1" in the environment of every kernel the driver starts


def batch_kernel() -> bool:
    """True in a kernel that runs a notebook unattended: one the driver started (``CSP_BATCH``)
    or one whose parent process is papermill or nbconvert (Linux: ``/proc``). Nobody moves a
    widget there, and nbclient can leave such a run waiting on an idle kernel after a cell
    that builds ``interact`` widgets (papermill #723, nbclient #312)."""
    if os.environ.get(BATCH_ENV) == "1":
        return True
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    # the program itself (papermill's script, python -m papermill), not any argument naming it
    programs = [Path(a).name for a in args[:2]] + [b for a, b in zip(args, args[1:3]) if a == "-m"]
    return any(p in ("papermill", "jupyter-nbconvert", "nbconvert") for p in programs)


# ------------------------------------------------------------------ run folders
def resolve_run_dir(run_dir) -> Path:
    """A relative run folder lives under the repository (``runs/dev`` -> ``<repo>/runs/dev``),
    wherever the caller runs: the driver, or a notebook opened in JupyterLab from notebooks/."""
    path = Path(run_dir).expanduser()
    return path if path.is_absolute() else REPO / path


def notebook_of(stage: str) -> Path:
    """``03_train_sft@s1`` -> notebooks/03_train_sft.ipynb."""
    return NOTEBOOKS / f"{stage.split('@')[0]}.ipynb"


def spec_of(stage: str) -> StageSpec:
    return STAGES[stage.split("@")[0]]
