"""Parameter checks before anything runs: each stage's parameters against its notebook's
parameters cell (names, types), config dicts against their dataclasses' fields, numbers
against their ranges (:data:`RANGES`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from csp_utils.pipeline.stages import DRIVER_PARAMETERS, NUMBER, notebook_of, spec_of


# ------------------------------------------------------------------ notebooks
def compile_notebook(notebook: Path) -> None:
    """Every code cell compiled (IPython syntax turned into Python first, as the kernel does),
    so that a syntax error stops the run before any stage starts or any output is removed:
    one line naming the notebook, the cell and the line."""
    import json

    from IPython.core.inputtransformer2 import TransformerManager

    try:
        cells = json.loads(notebook.read_text())["cells"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{notebook}: not a readable notebook ({err})") from None
    transform = TransformerManager().transform_cell
    for number, cell in enumerate(cells, 1):
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell.get("source") or [])
        try:
            compile(transform(source), f"{notebook.name} cell {number}", "exec", dont_inherit=True)
        except SyntaxError as err:
            raise ValueError(f"{notebook}: cell {number}, line {err.lineno}: SyntaxError: {err.msg}") from None


# ------------------------------------------------------------------ names
def unknown_name(what: str, name, known) -> str:
    """One line for a name that is not one of ``known``, with the closest known one."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    hint = f' Did you mean "{close[0]}"?' if close else ""
    return f"unknown {what} {name!r}.{hint} Known: {', '.join(known)}"


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
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)) and default:
        _check_items(stage, name, value, default)
    check_range(stage, name, value)
    check_choice(stage, name, value)


def _check_items(stage: str, name: str, value, default) -> None:
    """A list's items have the type of the default's items (numbers for numbers; a bool never)."""
    kinds = {type(x) for x in default}
    if len(kinds) != 1:
        return
    kind = kinds.pop()
    types = NUMBER if kind in NUMBER else (kind,)
    for item in value:
        if (isinstance(item, bool) and kind is not bool) or not isinstance(item, types):
            raise ValueError(f"stage {stage}: parameter {name!r} = {value!r}: item {item!r} is a "
                             f"{type(item).__name__}; its items are {kind.__name__}s (default {list(default)!r})")


def _choices() -> dict:
    """Parameter (a dotted path) -> the names it takes, from the constants the code checks them
    against later (inside a stage); a list takes such names only."""
    from csp_utils.dataset import buildconfig, csp_noise
    from csp_utils.evaluate import evaluation, suites
    from csp_utils.train import methods, settings
    from csp_utils.vlm import prompts

    training = {"confidence_target": settings.CONFIDENCE_TARGETS, "layout": prompts.LAYOUTS,
                "framing": prompts.FRAMINGS}
    return {"method": tuple(methods.METHODS), "regime": ("sft_simpo", "simpo"), "preset": ("tiny_default", "paper_llava7b"),
            "schedule": csp_noise.SCHEDULES, "framing": prompts.FRAMINGS,
            "readout": evaluation.READOUTS,
            "build.framing": prompts.FRAMINGS, "build.failure_policy": buildconfig.FAILURE_POLICIES,
            "build.targets": buildconfig.TARGETS, "build.questions": buildconfig.QUESTION_SOURCES,
            "build.noise.schedule": csp_noise.SCHEDULES, "build.noise.noise": csp_noise.NOISE_KINDS,
            **{f"{stage}.{k}": v for stage in ("sft", "simpo") for k, v in training.items()},
            "sft.loss": settings.LOSSES,
            "suite.transfer_kinds": tuple(suites.SuiteConfig().transfer_kinds),
            "scoring.framings": prompts.FRAMINGS, "scoring.readouts": evaluation.READOUTS,
            "scoring.layout": prompts.LAYOUTS, "scoring.adapter_scope": evaluation.ADAPTER_SCOPES,
            "adapter_scope": evaluation.ADAPTER_SCOPES}


_CHOICES: dict | None = None


def check_choice(stage: str, name: str, value) -> None:
    """A name (or every name of a list) is one the code knows, before any stage runs."""
    global _CHOICES
    if _CHOICES is None:
        _CHOICES = _choices()
    known = _CHOICES.get(name)
    if known is None:
        return
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item is not None and item not in known:
            raise ValueError(f"stage {stage}: {name!r}: {unknown_name('value', item, known)}")


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
