"""The plan: a params YAML read, ``--set`` overrides applied, methods, bases and seeds
expanded into stages (:mod:`csp_utils.pipeline.expand`), each stage's parameters resolved and
checked, and what it owns, shares and reads worked out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from csp_utils.pipeline import stages
from csp_utils.pipeline.checks import (check_stage_parameters, check_value, compile_notebook, notebook_defaults,
                                      unknown_name)
from csp_utils.pipeline.expand import expand_study
from csp_utils.pipeline.stages import DRIVER_KEYS, DRIVER_PARAMETERS, RESERVED, notebook_of, spec_of


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
    """The params file, its methods, bases and seeds expanded into stages."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"params file {path} not found; see params/ for examples")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: {_yaml_problem(err)}") from None
    if not isinstance(params, dict) or "stages" not in params or not isinstance(params["stages"], dict):
        raise ValueError(f"{path}: needs a 'stages' mapping of notebook name -> parameters")
    try:
        params = expand_study(params)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    publish = params.get("publish")
    if publish is not None and not isinstance(publish, dict):
        raise ValueError(f"{path}: publish must be a mapping of what -> path inside the repository")
    for key in publish or {}:
        if key not in stages.PUBLISH_KEYS:
            raise ValueError(f"{path}: publish: {unknown_name('key', key, stages.PUBLISH_KEYS)}")
    for stage in params["stages"]:
        if not notebook_of(stage).exists():
            raise ValueError(f"{path}: stage {stage!r} has no notebook {notebook_of(stage)}")
        if stage.split("@")[0] not in stages.STAGES:
            raise ValueError(f"{path}: notebook {stage.split('@')[0]!r} has no declaration in stages.STAGES")
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


def within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _check_no_overlap(stages: list[Stage]) -> None:
    owned = [(s.name, p) for s in stages for p in s.outputs + s.scratch if "*" not in p]
    for i, (a, pa) in enumerate(owned):
        for b, pb in owned[i + 1:]:
            if a != b and pa != pb and (within(pa, pb) or within(pb, pa)):
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
                                if "*" not in out and (within(out, path) or within(path, out))))
    owner.update({p: stage for p in mine})
    return Stage(stage, parameters, mine, shared, list(spec.scratch(full)), inputs, spec.uses_model,
                 _cell_timeout(stage, params["stages"][stage] or {}), list(dict.fromkeys(reads)))


def plan_study(params: dict) -> list[Stage]:
    """Every stage, checked and resolved, in chain order; raises before anything runs. Params
    as read from a file are expanded first (:func:`load_params` has done it already)."""
    params = expand_study(params)
    for notebook in dict.fromkeys(notebook_of(stage) for stage in params["stages"]):
        compile_notebook(notebook)
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
