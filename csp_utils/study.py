"""The study driver: run the ordered notebooks with papermill into one run folder.

    python -m csp_utils.study params/default.yaml            # the main study
    python -m csp_utils.study params/smoke.yaml --name smoke  # minutes
    python -m csp_utils.study params/default.yaml --only 07_figures

A params YAML holds global parameters (``base_model``, data folders, ...) and a ``stages``
mapping of per-notebook parameters. A stage key ``NAME@TAG`` runs notebook ``NAME`` again with other
parameters (e.g. ``03_train_sft@s1`` for a second seed). Each notebook gets only the global
parameters its parameters cell declares; every name and type is checked against that cell
before anything runs. The reserved stage key ``cell_timeout`` (seconds) overrides the stage's
default limit per cell (:data:`STAGES`); a cell that runs longer fails the stage.

What each notebook writes and reads inside the run folder is declared in :data:`STAGES`. A
stage's key hashes its parameters (not the run folder's location), its notebook's code cells,
the package source, the base model's fingerprint where the stage loads the model, and the
keys and output digests of the stages whose outputs it reads. A finished stage leaves
``markers/<stage>.json`` with its key and the digest of every output; a rerun skips it while
both still match. Otherwise its outputs are removed and it runs from scratch, except that a
stage interrupted with the same key (``markers/<stage>.running.json``) resumes from its partial
outputs. One driver at a time holds ``<run>/.lock``. With ``jobs: N`` (or ``--jobs N``) up to N
stages run at once, each in its own process with cores / N threads, a stage starting as soon as
the stages it reads have finished. A failing notebook stops the chain (stages already running
finish); its executed copy is kept and the error shown.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import inspect
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import multiprocessing
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from csp_utils.processes import pid_alive
from csp_utils.versions import package_versions

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
PACKAGE = Path(__file__).resolve().parent
RESERVED = ("cell_timeout",)  # stage keys read by the driver, never passed to the notebook
DRIVER_PARAMETERS = ("run_dir",)
DRIVER_KEYS = ("stages", "name", "jobs")  # top-level params read by the driver, never passed to a notebook
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
    return [f"figures/{stem}.{ext}" for stem in stems for ext in ("png", "pdf")]


def _matrix(models, results: str = "results") -> list[str]:
    """Result folders of model entries ("NAME" or "LABEL=ADAPTER": results carry the label)."""
    labels = [str(m).split("=", 1)[0] for m in models]
    return [f"{results}/matrix/{m.replace('/', '_')}" for m in dict.fromkeys(labels)]


def _adapters(models) -> list[str]:
    folders = [str(m).split("=", 1)[-1] for m in models if m != "base"]
    return [f"adapters/{m}" for m in dict.fromkeys(folders)]


def _preview(p: dict) -> list[str]:
    from csp_utils.experiment import results_suffix

    return _figures(f"reliability_pope_adversarial_preview{results_suffix(p['results'])}")


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
    return _figures("reliability_clean_sets", "reliability_transfer_sets", "confidence_vs_level",
                    "ablation_*",   # every ablation table's bars (notebook 06's previews are preview_ablation*)
                    "perturbation_grid_scenes", "internal_vs_verbalized_*", "training_*",
                    "metrics_*", "paired_differences_pooled") + [f"figures/{sub}" for sub in p["more_results"].values()]


NUMBER = (int, float)


def _build_configs() -> dict:
    from csp_utils import coco, grounded, perturbation, perturbed_dataset

    # the notebook passes the model, the seed, the grounder and the study-wide files itself
    data = (coco.make_source, ("base_model", "seed", "grounder", "coco_instances", "coco_train_images", "eval_images",
                               "jsonl", "jsonl_images"))
    return {"data": data, "build": perturbed_dataset.BuildConfig, "build.noise": perturbation.NoiseConfig,
            "build.grounded": grounded.GroundedOptions}


def _training_configs(name: str) -> Callable[[], dict]:
    def configs() -> dict:
        from csp_utils import training

        stage = training.SFTConfigCSP if name == "sft" else training.SimPOConfigCSP
        return {name: stage, f"{name}.lora": training.LoraSettings}
    return configs


def _evaluation_configs() -> dict:
    from csp_utils import evaluation, experiment

    return {"suite": experiment.SuiteConfig, "scoring": evaluation.EvalConfig, "boot": (experiment.headline_table, ("rows",))}


def _ablation_configs() -> dict:
    from csp_utils import evaluation

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
        outputs=lambda p: [*_matrix(p["models"], p["results"]),
                           *(f"{p['results']}/{name}" for name in (
                               "sets.json", "summary.csv", "headline.csv", "paired.csv", "per_question.csv.gz",
                               "level_spearman.csv", "grounded_perturbed.csv")),
                           *_preview(p)],
        inputs=lambda p: _adapters(p["models"]), uses_model=True, cell_timeout=8 * HOUR, configs=_evaluation_configs,
        types={"sets": (list,), "adapter_scope": (str,), "device_map": (str, dict),
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
        cell_timeout=HOUR, types=dict.fromkeys(("results_dir", "figures_dir", "publish_results", "readme",
                                                "results_doc", "publish_notebooks"), (str,))),
}


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


# ------------------------------------------------------------------ parameter checks
_ANY = object()  # a default that is not a literal: any value is accepted


def notebook_defaults(notebook: Path) -> dict:
    """The parameters cell's names and default values (papermill's inspection)."""
    from papermill.inspection import inspect_notebook

    defaults = {}
    for name, info in inspect_notebook(str(notebook)).items():
        try:
            defaults[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            defaults[name] = _ANY
    return defaults


def _accepted(default, declared: tuple = ()) -> tuple:
    """Types a value may have: the declared ones (and None where it is the default), else the
    default's, where a float takes an int; None or a non-literal default without a
    declaration takes anything."""
    if declared:
        return tuple(declared) + ((type(None),) if default is None else ())
    if default is None or default is _ANY:
        return (object,)
    return {float: NUMBER, list: (list, tuple), tuple: (list, tuple)}.get(type(default), (type(default),))


def check_value(stage: str, name: str, value, default, declared: tuple = ()) -> None:
    """A bool is never taken for a number, though Python counts it as an int."""
    types = _accepted(default, declared)
    is_bool_as_number = isinstance(value, bool) and bool not in types and object not in types
    if is_bool_as_number or not isinstance(value, types):
        raise ValueError(f"stage {stage}: parameter {name!r} = {value!r} is a {type(value).__name__}; the "
                         f"default {default!r} takes {' or '.join(t.__name__ for t in types)}")
    check_range(stage, name, value)


@dataclass(frozen=True)
class Range:
    """The numbers a parameter takes: ``low`` to ``high`` (None: unbounded; ``open``: the ends
    themselves excluded), plus documented sentinel values; a list takes such numbers only."""
    low: float | None = None
    high: float | None = None
    open: bool = False
    sentinels: dict = field(default_factory=dict)  # value -> what it means

    def holds(self, x) -> bool:
        if isinstance(x, bool) or not isinstance(x, NUMBER):
            return True  # not a number (None, "auto", a str): the type check's business
        if x in self.sentinels:
            return True
        below = self.low is not None and (x <= self.low if self.open else x < self.low)
        above = self.high is not None and (x >= self.high if self.open else x > self.high)
        return not (below or above)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"{'above' if self.open else 'from'} {self.low:g} {'and below' if self.open else 'to'} {self.high:g}"
        elif self.low is not None:
            text = f"{'above' if self.open else 'at least'} {self.low:g}"
        else:
            text = f"{'below' if self.open else 'at most'} {self.high:g}"
        return text + "".join(f", or {k} ({v})" for k, v in self.sentinels.items())


COUNT = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, open=True)
PERCENT = Range(0, 100)  # confidence levels, integer percents
SHARE = Range(0, 1)  # probabilities and fractions
OPEN_UNIT = Range(0, 1, open=True)
MAX_STEPS = Range(1, sentinels={-1: "the default: train num_train_epochs instead"})

_TRAINING = {"learning_rate": POSITIVE, "num_train_epochs": POSITIVE, "max_steps": MAX_STEPS,
             "per_device_train_batch_size": COUNT, "gradient_accumulation_steps": COUNT, "warmup": AT_LEAST_0,
             "weight_decay": AT_LEAST_0, "max_grad_norm": POSITIVE, "seed": AT_LEAST_0, "logging_steps": COUNT,
             "save_steps": COUNT, "save_total_limit": COUNT, "dataloader_num_workers": AT_LEAST_0,
             "replay_fraction": SHARE, "beta": POSITIVE, "simpo_gamma": AT_LEAST_0,
             "lora.r": COUNT, "lora.alpha": POSITIVE, "lora.dropout": SHARE}
_SUITE = {**{f"n_{what}_images": AT_LEAST_0 for what in ("pope", "amber", "transfer", "calibration", "train",
                                                          "perturbed", "grounded")},
          "transfer_severity": SHARE, "perturbed_levels": PERCENT, "grounded_levels": PERCENT, "noise_gamma": OPEN_UNIT,
          "seed": AT_LEAST_0, "image_size": COUNT}
_NOISE = {"noise_gamma": OPEN_UNIT, "t_max": COUNT, "beta_start": OPEN_UNIT, "beta_end": OPEN_UNIT, "levels": PERCENT,
          "seed": AT_LEAST_0}
# parameter (a dotted path inside a config dict) -> the numbers it takes, checked before anything
# runs for every stage that gets it; what is not named here is checked by type only
RANGES: dict[str, Range] = {
    # 00, 01
    "seed": AT_LEAST_0, "image_size": COUNT, "n_scenes": COUNT, "n_pope_images": COUNT, "n_synthetic": COUNT,
    "n_bins": COUNT, "severities": SHARE, "scene_index": AT_LEAST_0, "grid_levels": PERCENT, "noise_gamma": OPEN_UNIT,
    "t_max": COUNT,
    # 02
    "data.n_scenes": COUNT, "data.questions_per_scene": COUNT, "data.n_images": COUNT, "data.image_size": COUNT,
    "build.levels": PERCENT, "build.shard_size": COUNT, "build.seed": AT_LEAST_0, "build.png_compress_level": Range(0, 9),
    **{f"build.noise.{k}": v for k, v in _NOISE.items()},
    **{f"build.grounded.{k}": SHARE for k in ("clean_share", "key_share", "temperature_holdout", "bright_tolerance")},
    "build.grounded.batch_size": COUNT, "build.grounded.max_new_tokens": COUNT,
    # 03, 04
    **{f"{stage}.{k}": v for stage in ("sft", "simpo") for k, v in _TRAINING.items()}, "margin_pairs": COUNT,
    # 05, 06
    **{f"suite.{k}": v for k, v in _SUITE.items()},
    "scoring.options": PERCENT, "scoring.batch_size": COUNT, "scoring.max_new_tokens": COUNT,
    "scoring.confidence_max_new_tokens": COUNT, "scoring.option_chunk": COUNT, "scoring.seed": AT_LEAST_0,
    "boot.n_boot": COUNT, "boot.alpha": OPEN_UNIT, "boot.seed": AT_LEAST_0,
}


def check_range(stage: str, name: str, value) -> None:
    rule = RANGES.get(name)
    if rule is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    bad = [x for x in values if not rule.holds(x)]
    if bad:
        what = f"{name!r} = {value!r}" + (f" (item {bad[0]!r})" if values is value else "")
        raise ValueError(f"stage {stage}: {what} is out of range; it takes numbers {rule.describe()}")


def check_stage_parameters(stage: str, given: dict, defaults: dict) -> None:
    valid = sorted(set(defaults) - set(DRIVER_PARAMETERS))
    for name, value in given.items():
        if name in DRIVER_PARAMETERS:
            raise ValueError(f"stage {stage}: {name!r} is set by the driver (the run folder); remove it")
        if name not in defaults:
            raise ValueError(f"stage {stage}: unknown parameter {name!r}; {notebook_of(stage).name} takes: "
                             + ", ".join(valid))
        check_value(stage, name, value, defaults[name], spec_of(stage).types.get(name, ()))
    configs = spec_of(stage).configs()
    for name in configs:
        if "." not in name and isinstance(given.get(name), dict):
            check_config(stage, name, given[name], configs)


def _fields(target) -> dict:
    """A dataclass's fields or a function's keywords, with their defaults (_ANY where none is a
    literal), less the names the notebook sets itself."""
    target, excluded = target if isinstance(target, tuple) else (target, ())
    if dataclasses.is_dataclass(target):
        fields = {f.name: _ANY if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(target)}
    else:
        fields = {name: _ANY if p.default is p.empty else p.default
                  for name, p in inspect.signature(target).parameters.items() if p.kind != p.VAR_KEYWORD}
    return {k: v for k, v in fields.items() if k not in excluded}


def check_config(stage: str, path: str, given: dict, configs: dict) -> None:
    """A config dict's keys against the fields of its dataclass (or a function's keywords), each
    value against the field's default as for notebook parameters; nested dicts likewise."""
    fields, target = _fields(configs[path]), configs[path]
    target = target[0] if isinstance(target, tuple) else target
    for name, value in given.items():
        where = f"{path}.{name}"
        if name not in fields:
            raise ValueError(f"stage {stage}: unknown key {name!r} in {path}; {target.__name__} takes: "
                             + ", ".join(sorted(fields)))
        if where in configs and isinstance(value, dict):
            check_config(stage, where, value, configs)
        else:
            check_value(stage, where, value, fields[name], spec_of(stage).types.get(where, ()))


# ------------------------------------------------------------------ the plan
@dataclass
class Stage:
    name: str
    parameters: dict  # what papermill gets, run_dir aside
    outputs: list[str]  # paths under the run folder this stage owns
    shared: list[str]  # outputs an earlier stage owns too: read and added to, never cleared here
    scratch: list[str]
    inputs: list[str]  # the stages whose outputs it reads
    uses_model: bool
    cell_timeout: int
    reads: list[str] = field(default_factory=list)  # the paths it reads (inputs' outputs at or under them)


def load_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"params file {path} not found; see params/ for examples")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: {_yaml_problem(err)}") from None
    if not isinstance(params, dict) or "stages" not in params or not isinstance(params["stages"], dict):
        raise ValueError(f"{path}: needs a 'stages' mapping of notebook name -> parameters")
    for stage in params["stages"]:
        if not notebook_of(stage).exists():
            raise ValueError(f"{path}: stage {stage!r} has no notebook {notebook_of(stage)}")
        if stage.split("@")[0] not in STAGES:
            raise ValueError(f"{path}: notebook {stage.split('@')[0]!r} has no declaration in study.STAGES")
    return params


def _yaml_problem(err: Exception) -> str:
    """One line: where (line and column, counted from 1) and what, for a YAML syntax error."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
    return f"YAML syntax error at {where}{what or err}"


def parse_set(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--set``, the value read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects KEY=VALUE (or STAGE.KEY=VALUE), got {item!r}")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"--set {item!r}: the value is not YAML ({_yaml_problem(err)}); quote it") from None


def apply_overrides(params: dict, overrides: dict) -> dict:
    """``--set`` values into the params: ``KEY`` a global parameter, ``STAGE.KEY`` (``STAGE.CONFIG.FIELD``)
    one stage's own. A global that a stage sets itself would never reach that stage, so it is
    refused, naming those stages, instead of being recorded but not run."""
    for key, value in (overrides or {}).items():
        head, dot, rest = key.partition(".")
        if dot and head in params["stages"]:
            holder = params["stages"][head] = dict(params["stages"][head] or {})
            *path, last = rest.split(".")
            for part in path:
                if not isinstance(holder.get(part, {}), dict):
                    raise ValueError(f"--set {key}: {head}'s {part!r} is {holder[part]!r}, not a mapping")
                holder[part] = dict(holder.get(part) or {})  # a copy: the loaded file's dicts stay as read
                holder = holder[part]
            holder[last] = value
            continue
        if dot:
            raise ValueError(f"--set {key}: no stage {head!r} in this study; stages: {', '.join(params['stages'])} "
                             "(STAGE.KEY sets one stage's parameter, KEY a global one)")
        own = [stage for stage, given in params["stages"].items() if key in (given or {})]
        if own:
            raise ValueError(f"--set {key}={value!r} is ambiguous: stage(s) {', '.join(own)} set their own {key!r}, "
                             f"which wins over a global value; set it per stage, e.g. --set {own[0]}.{key}=...")
        params[key] = value
    return params


def _global_parameters(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in DRIVER_KEYS}


def stage_parameters(params: dict, stage: str, defaults: dict) -> dict:
    """The globals the notebook declares (``base_model`` only where the stage loads it), then
    the stage's own parameters, reserved keys removed; a stage key ``NAME@TAG`` fills its
    notebook's tagged parameter (:attr:`StageSpec.tagged`) where the stage does not give it."""
    use = {k: v for k, v in _global_parameters(params).items()
           if k in defaults and (k != "base_model" or spec_of(stage).uses_model)}
    own = {k: v for k, v in (params["stages"][stage] or {}).items() if k not in RESERVED}
    tagged = spec_of(stage).tagged
    if "@" in stage and tagged in defaults and tagged not in own:
        own[tagged] = f"{defaults[tagged]}@{stage.split('@', 1)[1]}"
    return {**use, **own}


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _check_no_overlap(stages: list[Stage]) -> None:
    owned = [(s.name, p) for s in stages for p in s.outputs + s.scratch if "*" not in p]
    for i, (a, pa) in enumerate(owned):
        for b, pb in owned[i + 1:]:
            if a != b and pa != pb and (_within(pa, pb) or _within(pb, pa)):
                raise ValueError(f"stages {a} and {b} write overlapping paths {pa!r} and {pb!r}; rename one")


def _cell_timeout(stage: str, given: dict) -> int:
    timeout = given.get("cell_timeout", spec_of(stage).cell_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise ValueError(f"stage {stage}: cell_timeout must be a positive number of seconds, got {timeout!r}")
    return timeout


def _plan_stage(stage: str, params: dict, defaults: dict, owner: dict[str, str]) -> Stage:
    """One stage resolved; ``owner``: output path -> the earlier stage that writes it (updated)."""
    parameters = stage_parameters(params, stage, defaults)
    check_stage_parameters(stage, parameters, defaults)
    full = {**defaults, **parameters}
    spec = spec_of(stage)
    outputs = list(dict.fromkeys(spec.outputs(full)))
    shared = [p for p in outputs if p in owner]
    mine = [p for p in outputs if p not in owner]
    reads = spec.inputs(full) + shared
    inputs = list(dict.fromkeys(writer for path in reads for out, writer in owner.items()
                                if "*" not in out and (_within(out, path) or _within(path, out))))
    owner.update({p: stage for p in mine})
    return Stage(stage, parameters, mine, shared, list(spec.scratch(full)), inputs, spec.uses_model,
                 _cell_timeout(stage, params["stages"][stage] or {}), list(dict.fromkeys(reads)))


def plan_study(params: dict) -> list[Stage]:
    """Every stage, checked and resolved, in chain order; raises before anything runs."""
    defaults = {stage: notebook_defaults(notebook_of(stage)) for stage in params["stages"]}
    declared = set().union(*defaults.values()) if defaults else set()
    for name, value in _global_parameters(params).items():
        if name not in declared:
            raise ValueError(f"global parameter {name!r} is declared by no notebook; known: "
                             + ", ".join(sorted(declared - set(DRIVER_PARAMETERS))))
        for stage, names in defaults.items():  # also where the stage's own value wins: a wrong value is wrong
            if name in names and name not in DRIVER_PARAMETERS:
                check_value(stage, name, value, names[name], spec_of(stage).types.get(name, ()))
    owner: dict[str, str] = {}
    plan = [_plan_stage(stage, params, defaults[stage], owner) for stage in params["stages"]]
    _check_no_overlap(plan)
    return plan


# ------------------------------------------------------------------ digests and keys
def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _matches(run_dir: Path, rel: str) -> list[Path]:
    if "*" in rel:
        return sorted(run_dir.glob(rel))
    path = run_dir / rel
    return [path] if path.exists() or path.is_symlink() else []


def _derived_cache(path: Path) -> bool:
    """``datasets`` writes ``cache-<fingerprint>.arrow`` beside a saved dataset that a reader
    maps or filters: the reader's derived files, not a change to the dataset."""
    return path.name.startswith("cache-") and path.suffix == ".arrow"


def output_digest(run_dir: Path, rel: str) -> str | None:
    """A file's sha256; a folder's (or a pattern's) over its files' relative paths and digests;
    None when nothing is there."""
    return _digest_and_files(run_dir, rel)[0]


def _digest_and_files(run_dir: Path, rel: str) -> tuple[str | None, dict | None]:
    """The output's digest and, for a folder or pattern, each file's (relative path -> digest),
    recorded so that a damaged input can be named file by file."""
    found = _matches(run_dir, rel)
    if not found:
        return None, None
    if found == [run_dir / rel] and found[0].is_file():
        return _file_hash(found[0]), None
    files = sorted(f for p in found for f in ([p] if p.is_file() else p.rglob("*"))
                   if f.is_file() and not _derived_cache(f))
    pairs = [(str(f.relative_to(run_dir)), _file_hash(f)) for f in files]
    return _hash(pairs), dict(pairs)


def code_digest(notebook: Path) -> str:
    """The notebook's code cells only: markdown edits and saved outputs change nothing."""
    cells = json.loads(notebook.read_text())["cells"]
    return _hash(["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                  for c in cells if c["cell_type"] == "code"])


def package_digest() -> str:
    """Every module of the package: a stage runs whatever it imports, so any source change counts."""
    return _hash([(str(p.relative_to(PACKAGE)), _file_hash(p)) for p in sorted(PACKAGE.rglob("*.py"))])


def model_fingerprint(base_model) -> str:
    """What identifies the base model's weights, so that a retrained or replaced model
    invalidates every stage that loads it: the checksum in ``csp_meta.json`` (the embedded
    default), else the names, sizes and mtimes of a local folder's weight and config files,
    else the hub id."""
    from csp_utils import models

    name = str(base_model)
    if name == models.EMBEDDED and not (models.default_model_dir() / "model.safetensors").exists():
        # never the bare name: a stage keyed on it would start a notebook that cannot load the model
        raise models.MissingEmbeddedModelError(models.missing_embedded_model_message())
    folder = (models.default_model_dir() if name == models.EMBEDDED else models.shipped_model_path(name)
              if name in models.SHIPPED_MODELS else Path(name).expanduser())
    meta = folder / "csp_meta.json"
    if meta.exists():
        return json.loads(meta.read_text()).get("sha256") or _file_hash(meta)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))
        return _hash([(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    return name  # a hub id (or an embedded model not built yet)


def _fingerprint_or_none(base_model) -> str | None:
    """For the manifest: a run of stages that load no model does not need it."""
    try:
        return model_fingerprint(base_model)
    except FileNotFoundError:
        return None


def key_parts(stage: Stage, package: str, markers: dict[str, dict | None]) -> dict:
    """What the stage's result depends on; ``markers``: the current marker of each stage it reads."""
    parts = {"parameters": _hash(stage.parameters), "notebook": code_digest(notebook_of(stage.name)),
             "package": package,
             "inputs": _hash({name: [(m or {}).get("key"), (m or {}).get("produced")]
                              for name, m in sorted(markers.items())})}
    if stage.uses_model:
        parts["model"] = model_fingerprint(stage.parameters.get("base_model", "embedded"))
    return parts


# ------------------------------------------------------------------ markers
def _marker_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "markers" / f"{stage}.json"


def _running_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "markers" / f"{stage}.running.json"


def read_marker(run_dir: Path, stage: str) -> dict | None:
    path = _marker_path(run_dir, stage)
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)  # a killed driver leaves the old file or the new one


def changed_outputs(run_dir: Path, marker: dict) -> list[str]:
    return [rel for rel, digest in marker.get("outputs", {}).items() if output_digest(run_dir, rel) != digest]


def stage_state(run_dir: Path, stage: Stage, key: str, parts: dict) -> tuple[str, str]:
    """("done" | "resume" | "fresh", why)."""
    marker = read_marker(run_dir, stage.name)
    if marker and marker.get("key") == key:
        changed = changed_outputs(run_dir, marker)
        if not changed:
            return "done", "up to date"
        return "fresh", "outputs changed or missing: " + ", ".join(changed)
    running = _running_path(run_dir, stage.name)
    if running.exists() and json.loads(running.read_text()).get("key") == key:
        return "resume", "resuming an interrupted run with the same key"
    if marker:
        old = marker.get("key_parts", {})
        return "fresh", "changed: " + (", ".join(k for k in parts if old.get(k) != parts[k]) or "key")
    if running.exists():
        return "fresh", "an interrupted run had another key"
    return "fresh", "not run yet"


def changed_files(run_dir: Path, marker: dict, rel: str) -> list[str]:
    """The files of a folder output that differ from, are missing from, or were added since its
    marker's record (an old marker without per-file digests names the folder)."""
    recorded = (marker.get("files") or {}).get(rel)
    if recorded is None:
        return [rel]
    now = _digest_and_files(run_dir, rel)[1] or {}
    return sorted(f for f in recorded.keys() | now.keys() if recorded.get(f) != now.get(f)) or [rel]


def check_inputs(run_dir: Path, stage: Stage) -> None:
    """What the stage reads still holds what its writer recorded; checked before the stage's
    own outputs are removed, so that a refused run loses nothing."""
    for name in stage.inputs:
        marker = read_marker(run_dir, name)
        if marker is None:
            raise StageFailed(stage.name, f"it reads the outputs of {name}, which has not finished in this run "
                              f"folder; run {name} first (nothing was removed)", None)
        read = [rel for rel in marker.get("outputs", {})
                if any(_within(rel, path) or _within(path, rel) for path in stage.reads)]
        damaged = [f for rel in changed_outputs(run_dir, marker) if rel in read for f in changed_files(run_dir, marker, rel)]
        if damaged:
            raise StageFailed(stage.name, f"its input {', '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''} "
                              f"changed or went missing since {name} finished; nothing was removed. Rebuild it "
                              f"with {name} (e.g. --only {name} {stage.name})", None)


def clear_outputs(run_dir: Path, stage: Stage) -> None:
    """Remove what the stage wrote before, so a rerun never builds on another key's files."""
    for rel in stage.outputs + stage.scratch:
        for path in _matches(run_dir, rel):
            print(f"[study] {stage.name}: removing old {path.relative_to(run_dir)}", flush=True)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


# ------------------------------------------------------------------ the run folder lock
class RunLocked(SystemExit):
    pass


@contextmanager
def run_lock(run_dir: Path):
    """``<run>/.lock`` (pid and host), created atomically: one driver per run folder. A lock
    whose process is gone on this host is taken over; any other lock refuses."""
    lock = run_dir / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(lock, me["host"])
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise RunLocked(f"[study] could not take the lock {lock}; another driver keeps taking it")
    try:
        yield
    finally:
        try:
            if json.loads(lock.read_text()) == me:
                lock.unlink()
        except (OSError, json.JSONDecodeError):
            pass


def _take_over_if_stale(lock: Path, host: str) -> None:
    try:
        text = lock.read_text()
        holder = json.loads(text)
    except FileNotFoundError:
        return  # released meanwhile: try again
    except json.JSONDecodeError:
        holder, text = {}, None  # being written, or damaged
    pid, where = holder.get("pid"), holder.get("host")
    if text is None or where != host or pid_alive(int(pid)):
        raise RunLocked(f"[study] run folder {lock.parent} is in use by pid {pid} on host {where} "
                        f"(lock file {lock}). Wait for that driver to finish; if it is not running any more, "
                        "remove the lock file.")
    aside = lock.with_name(f".lock.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)  # atomic: of two drivers taking over, one gets the stale lock
    except FileNotFoundError:
        return
    if aside.read_text() != text:  # a live driver's lock replaced the stale one meanwhile: put it back
        os.rename(aside, lock)
        return
    aside.unlink()
    print(f"[study] taking over a stale lock of pid {pid} (no such process on {host})", flush=True)


# ------------------------------------------------------------------ provenance
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """The host, recorded because float results depend on it: torch picks its CPU kernels by
    instruction set (AVX2 vs AVX-512), so the same code and seed give results that agree to
    float error, not byte for byte, across machines."""
    import torch

    try:  # the model name is in /proc/cpuinfo on Linux; platform.processor() is often empty there
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or None
    return {"system": platform.system(), "machine": platform.machine(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ------------------------------------------------------------------ running
def _timed_out_cell(out_nb: Path) -> str:
    """The last cell that started in the executed copy: the one that hit the limit."""
    try:
        cells = json.loads(out_nb.read_text())["cells"]
    except (OSError, json.JSONDecodeError, KeyError):
        return "unknown cell"
    started = [(i, c) for i, c in enumerate(cells) if (c.get("metadata", {}).get("papermill") or {}).get("start_time")]
    if not started:
        return "unknown cell"
    i, cell = started[-1]
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return f"cell {i} of the executed copy ({source.strip().splitlines()[0][:60] if source.strip() else 'empty'!r})"


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when the process that starts it dies.

    jupyter_client starts each kernel in its own session, so neither a kill of the driver's
    process group nor a Ctrl-C reaches it, and ipykernel's own check polls its parent only once
    a second: a training kernel left behind goes on writing checkpoints into the run folder.
    Linux only (prctl); elsewhere the kernel keeps ipykernel's polling alone."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def _kernel_manager_class():
    """jupyter_client's kernel manager, with kernels that die with the process starting them,
    talk to the driver over encrypted sockets, and are shut down without a Ctrl-C.

    Left to its defaults, every kernel warns that it runs "over TCP without encryption" (the
    kernelspec declares CurveZMQ support; the manager provisions keys only when asked), and a
    shutdown first sends the kernel SIGINT: a kernel still handling a message then logs
    "ERROR | KeyboardInterrupt caught in kernel" although its notebook succeeded. The shutdown
    request alone ends an idle kernel; a busy one (a cell past its limit) still gets SIGTERM,
    then SIGKILL, from jupyter_client."""
    import zmq
    from jupyter_client import AsyncKernelManager

    class DriverKernelManager(AsyncKernelManager):
        def __init__(self, **kw):
            if zmq.has("curve"):
                kw.setdefault("transport_encryption", "auto")
            else:  # no libsodium: Unix sockets, which never leave the machine
                kw.setdefault("transport", "ipc")
            super().__init__(**kw)
            self._quiet_shutdown = False

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            preexec = _die_with_parent()
            if preexec is not None:
                kw["preexec_fn"] = preexec
            return await super()._async_launch_kernel(kernel_cmd, **kw)

        async def _async_interrupt_kernel(self):
            if not self._quiet_shutdown:
                await super()._async_interrupt_kernel()

        async def shutdown_kernel(self, now: bool = False, restart: bool = False):
            self._quiet_shutdown = True
            try:
                await super()._async_shutdown_kernel(now=now, restart=restart)
            finally:
                self._quiet_shutdown = False

    return DriverKernelManager


def execute_stage(stage: Stage, run_dir: Path, out_nb: Path, log_output: bool, notebook: Path | None = None) -> None:
    """Run the notebook; a failing cell or one past the stage's time limit stops the study."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    try:
        pm.execute_notebook(str(notebook or notebook_of(stage.name)), str(out_nb),
                            parameters={**stage.parameters, "run_dir": str(run_dir)}, cwd=str(REPO),
                            progress_bar=False, log_output=log_output, kernel_name="python3",
                            execution_timeout=stage.cell_timeout, kernel_manager_class=_kernel_manager_class())
    except pm.PapermillExecutionError as err:
        raise StageFailed(stage.name, f"{err.ename}: {err.evalue}", out_nb) from None
    except CellTimeoutError:
        raise StageFailed(stage.name, f"{_timed_out_cell(out_nb)} ran past the cell limit of "
                          f"{stage.cell_timeout} s (set cell_timeout for this stage to change it)", out_nb) from None
    except DeadKernelError as err:
        raise StageFailed(stage.name, f"the kernel died: {err}", out_nb) from None
    except OSError as err:  # papermill writing the executed copy: disk full, a read-only folder
        raise StageFailed(stage.name, f"cannot write: {os_problem(err)}", out_nb) from None


class StageFailed(Exception):
    def __init__(self, stage: str, error: str, notebook: Path | None):
        super().__init__(f"{stage}: {error}")
        self.stage, self.error, self.notebook = stage, error, notebook

    def __reduce__(self):  # crosses the process boundary of a parallel run
        return StageFailed, (self.stage, self.error, self.notebook)


def finish_stage(run_dir: Path, stage: Stage, key: str, parts: dict, seconds: float) -> None:
    """Record the outputs' digests; check the shared ones still hold what their owner recorded."""
    for owner in _owners_of_shared(run_dir, stage):
        changed = [p for p in changed_outputs(run_dir, owner) if p in stage.shared]
        if changed:
            raise StageFailed(stage.name, f"it added to {', '.join(changed)}, an output of {owner['stage']} "
                              "that both stages write; give both the same settings (e.g. the same suite) "
                              "so that the shared results agree", run_dir / "notebooks" / f"{stage.name}.ipynb")
    digests = {rel: _digest_and_files(run_dir, rel) for rel in stage.outputs}
    outputs = {rel: digest for rel, (digest, _) in digests.items()}
    files = {rel: per_file for rel, (_, per_file) in digests.items() if per_file is not None}
    _write_json(_marker_path(run_dir, stage.name),
                {"stage": stage.name, "key": key, "key_parts": parts, "produced": _hash(outputs),
                 "outputs": outputs, "files": files, "reads": stage.inputs, "seconds": seconds,
                 "parameters": stage.parameters})
    _running_path(run_dir, stage.name).unlink(missing_ok=True)


def _owners_of_shared(run_dir: Path, stage: Stage) -> list[dict]:
    markers = [read_marker(run_dir, name) for name in stage.inputs]
    return [m for m in markers if m and any(p in m.get("outputs", {}) for p in stage.shared)]


def _check_only(only, plan: list[Stage]) -> None:
    names = [s.name for s in plan]
    unknown = [s for s in only or [] if s not in names]
    if unknown:
        raise ValueError(f"--only: no stage {', '.join(map(repr, unknown))} in this study; stages: {', '.join(names)}")


def prepare_run(params_path, name, runs_root, overrides) -> tuple[dict, list[Stage], str, Path]:
    params = apply_overrides(load_params(params_path), overrides)
    plan = plan_study(params)
    name = name or params.get("name") or Path(params_path).stem
    return params, plan, name, resolve_run_dir(Path(runs_root) / name).resolve()


def check_base_models(plan: list[Stage], only) -> None:
    """Every selected stage that loads a model finds it, before anything runs: a missing shipped
    model is an error saying how to restore it, never a rebuild started inside a stage."""
    for stage in plan:
        if stage.uses_model and (only is None or stage.name in only):
            try:
                model_fingerprint(stage.parameters.get("base_model", "embedded"))
            except FileNotFoundError as err:
                raise FileNotFoundError(f"stage {stage.name}: {err}") from None


def check_jobs(jobs) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive whole number of stages run at once, got {jobs!r}")
    return jobs


def run_study(params_path: str | Path, name: str | None = None, runs_root: str | Path = "runs",
              only: list[str] | None = None, force: bool = False, log_output: bool = False,
              overrides: dict | None = None, jobs: int | None = None) -> Path:
    """Run the chain; ``overrides`` replace global parameters (e.g. ``{"base_model": path}``);
    ``jobs`` (default: the params' ``jobs``, else 1) stages run at once where none reads another's
    outputs. Everything is checked before the first stage starts."""
    params, plan, name, run_dir = prepare_run(params_path, name, runs_root, overrides)
    jobs = check_jobs(params.get("jobs", 1) if jobs is None else jobs)
    _check_only(only, plan)
    check_base_models(plan, only)
    try:
        (run_dir / "markers").mkdir(parents=True, exist_ok=True)
        (run_dir / "notebooks").mkdir(exist_ok=True)
        with run_lock(run_dir):
            _run_locked(params, plan, name, run_dir, only, force, log_output, jobs)
    except OSError as err:  # before or between stages: the run folder itself
        raise RunFolderError(f"run folder {run_dir} cannot be written: {os_problem(err)}") from None
    return run_dir


class RunFolderError(OSError):
    def __str__(self):
        return self.args[0]


def threads_per_job(jobs: int) -> int:
    """Cores per concurrent stage: more torch threads than cores slows every stage many-fold."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def _execute_in_worker(stage: Stage, run_dir: Path, out_nb: Path, log_output: bool, threads: int,
                       notebook: Path) -> None:
    """Runs in a worker process; the notebook's kernel inherits the thread limits set here."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    execute_stage(stage, run_dir, out_nb, log_output, notebook)


class _Inline:
    """A one-slot executor that runs the stage in this process (``jobs == 1``)."""

    def __init__(self, log_output: bool):
        self.log_output = log_output

    def submit(self, stage: Stage, run_dir: Path, out_nb: Path) -> Future:
        future: Future = Future()
        try:
            execute_stage(stage, run_dir, out_nb, self.log_output)
            future.set_result(None)
        except StageFailed as err:
            future.set_exception(err)
        return future

    def shutdown(self) -> None:
        pass

    def abort(self) -> None:
        pass  # the stage ran in this process: its kernel was shut down on the way out


class _Pool:
    """Up to ``jobs`` stages at once, each in its own process with ``cores // jobs`` threads."""

    def __init__(self, jobs: int, log_output: bool):
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        self.log_output, self.threads = log_output, threads_per_job(jobs)

    def submit(self, stage: Stage, run_dir: Path, out_nb: Path) -> Future:
        return self.pool.submit(_execute_in_worker, stage, run_dir, out_nb, self.log_output, self.threads,
                                notebook_of(stage.name))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)

    def abort(self) -> None:
        """Interrupted: end the workers now (their kernels die with them), wait for nothing."""
        for process in list((self.pool._processes or {}).values()):
            if process.is_alive():
                process.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _ready(stage: Stage, finished: set[str], running: list[Stage], names: set[str]) -> bool:
    """Every stage it reads has finished, and no running stage writes a path it writes."""
    if any(name in names and name not in finished for name in stage.inputs):
        return False
    mine = stage.outputs + stage.shared + stage.scratch
    return not any(_within(a, b) or _within(b, a) for other in running
                   for a in other.outputs + other.shared + other.scratch for b in mine)


def os_problem(err: OSError) -> str:
    """``path: cause`` of a failed file operation, in one line."""
    path = f"{err.filename} -> {err.filename2}" if err.filename2 else err.filename
    return f"{path}: {err.strerror or err}" if path else f"{err.strerror or err}"


def _start_stage(stage: Stage, run_dir: Path, package: str, force: bool, executor):
    """Submit the stage unless it is up to date: (future, key, key parts, start time), or None."""
    parts = key_parts(stage, package, {n: read_marker(run_dir, n) for n in stage.inputs})
    key = _hash(parts)
    state, why = stage_state(run_dir, stage, key, parts)
    if state == "done" and not force:
        print(f"[study] {stage.name}: skipped (up to date)")
        return None
    print(f"[study] {stage.name}: {'forced' if force else why}", flush=True)
    out_nb = run_dir / "notebooks" / f"{stage.name}.ipynb"
    check_inputs(run_dir, stage)  # no executed copy to point to: the stage never started
    try:
        if state != "resume" or force:
            _marker_path(run_dir, stage.name).unlink(missing_ok=True)
            clear_outputs(run_dir, stage)
        _write_json(_running_path(run_dir, stage.name), {"stage": stage.name, "key": key, "pid": os.getpid()})
    except OSError as err:  # disk full, a read-only run folder: the stage and the path, not a traceback
        raise StageFailed(stage.name, f"cannot prepare its outputs: {os_problem(err)}", None) from None
    print(f"[study] {stage.name}: running -> {out_nb}", flush=True)
    t0 = time.time()
    return executor.submit(stage, run_dir, out_nb), key, parts, t0


def _run_locked(params, plan, name, run_dir: Path, only, force: bool, log_output: bool, jobs: int = 1) -> None:
    """Run the selected stages, up to ``jobs`` at once, each as soon as the stages it reads are done."""
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(name=name, params=params, params_hash=_hash(params), git_commit=git_commit(),
                    packages=package_versions(), machine=machine_info(),
                    base_model_fingerprint=_fingerprint_or_none(params.get("base_model", "embedded")))
    manifest.setdefault("timings_s", {})
    package = package_digest()
    names = {s.name for s in plan}
    finished: set[str] = set()
    for stage in plan:
        if only is not None and stage.name not in only:
            print(f"[study] {stage.name}: not selected")
            finished.add(stage.name)
    waiting = [s for s in plan if s.name not in finished]
    running: dict[Future, tuple[Stage, str, dict, float]] = {}
    failed: StageFailed | None = None
    executor = _Inline(log_output) if jobs == 1 else _Pool(jobs, log_output)
    wall0 = time.time()
    try:
        while waiting or running:
            while failed is None and len(running) < jobs:
                stage = next((s for s in waiting if _ready(s, finished, [r[0] for r in running.values()], names)),
                             None)
                if stage is None:
                    break
                waiting.remove(stage)
                try:
                    started = _start_stage(stage, run_dir, package, force, executor)
                except StageFailed as err:
                    failed = failed or err
                    print(f"[study] {stage.name}: failed", flush=True)
                    continue
                if started is None:
                    finished.add(stage.name)
                else:
                    running[started[0]] = (stage, *started[1:])
            if not running:
                if waiting and failed is None:
                    raise RuntimeError("stages wait on each other: " + ", ".join(s.name for s in waiting))
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                stage, key, parts, t0 = running.pop(future)
                seconds = round(time.time() - t0, 1)
                try:
                    future.result()
                    try:
                        finish_stage(run_dir, stage, key, parts, seconds)
                    except OSError as err:
                        raise StageFailed(stage.name, f"cannot record its outputs: {os_problem(err)}",
                                          run_dir / "notebooks" / f"{stage.name}.ipynb") from None
                except StageFailed as err:
                    failed = failed or err
                    print(f"[study] {stage.name}: failed", flush=True)
                    continue
                finished.add(stage.name)
                manifest["timings_s"][stage.name] = seconds
                _write_json(manifest_path, manifest)
                print(f"[study] {stage.name}: done in {seconds:.0f} s", flush=True)
    except BaseException:  # Ctrl-C, SIGTERM (see main): no stage left running behind the driver
        executor.abort()
        raise
    else:
        executor.shutdown()
    if failed is not None:
        manifest["failed"] = {"stage": failed.stage, "error": failed.error,
                              "notebook": None if failed.notebook is None else str(failed.notebook)}
        try:
            _write_json(manifest_path, manifest)
            recorded = ""
        except OSError as err:  # the disk that failed the stage may refuse this too
            recorded = f"\n        (the manifest could not record it: {os_problem(err)})"
        kept = (f"\n        executed copy kept at {failed.notebook}"
                if failed.notebook is not None and failed.notebook.exists() else "")
        raise SystemExit(f"[study] stage {failed.stage} failed: {failed.error}{kept}{recorded}") from None
    manifest.pop("failed", None)
    manifest["jobs"] = jobs
    manifest["wall_s"] = round(time.time() - wall0, 1)
    _write_json(manifest_path, manifest)


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params", nargs="?", default=str(REPO / "params" / "default.yaml"))
    ap.add_argument("--name", help="run folder name under --runs-root (default: the params' name)")
    ap.add_argument("--runs-root", default="runs", help="relative paths are under the repository")
    ap.add_argument("--only", nargs="*", help="run only these stages (others keep their markers)")
    ap.add_argument("--force", action="store_true", help="rerun stages from scratch even when up to date")
    ap.add_argument("--log-output", action="store_true", help="stream notebook output to the terminal")
    ap.add_argument("--jobs", type=int, help="stages run at once (default: the params' jobs, else 1); "
                    "each gets cores / jobs threads")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override a global parameter (--set base_model=/path/to/model) or one stage's own "
                    "(--set 03_train_sft.sft.max_steps=4); values are YAML")
    args = ap.parse_args(argv)
    # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C: kernels are shut down, the lock released.
    # SIGINT is set too: a process started in the background by a non-interactive shell inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    overrides = {}
    for item in args.set:
        try:
            key, value = parse_set(item)
        except ValueError as err:
            ap.error(str(err))
        overrides[key] = value
    try:
        run_dir = run_study(args.params, args.name, args.runs_root, args.only, args.force, args.log_output, overrides,
                            args.jobs)
    except (ValueError, FileNotFoundError, RunFolderError) as err:
        raise SystemExit(f"[study] {err}") from None
    except KeyboardInterrupt as err:
        raise SystemExit(f"[study] interrupted ({err or 'Ctrl-C'}); the same command resumes the run") from None
    print(f"[study] run folder: {run_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
