"""Params files: one home per value. A value a params file gives must differ from the one it
overrides (the notebook's default, the method's or hardware preset's setting, the config
dataclass's default); a value restated there would silently stop following its home. And the
default study still expands into its stages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from csp_utils.analysis import tables
from csp_utils.dataset import buildconfig, coco, csp_noise
from csp_utils.evaluate import evaluation, suites
from csp_utils.pipeline import checks, planning, stages
from csp_utils.train import methods, settings

PARAMS = sorted((Path(__file__).parents[1] / "params").glob("*.yaml"))


def _defaults(target) -> dict:
    return checks._fields(target)


def _same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return norm(a) == norm(b)


CONFIGS = ("build", "data", "sft", "simpo", "suite", "scoring", "boot")  # config dicts: compared key by key


def restated(name: str, given: dict, over: dict, path: str = "") -> list[str]:
    """Keys of ``given`` whose value equals the one in ``over`` (config dicts compared key by key)."""
    out = []
    for key, value in given.items():
        base = over.get(key, checks._ANY) if isinstance(over, dict) else checks._ANY
        if isinstance(value, dict) and isinstance(base, dict) and (path or key in CONFIGS):
            out += restated(name, value, base, f"{path}{key}.")
        elif base is not checks._ANY and _same(value, base):
            out.append(f"{name}: {path}{key} = {value!r} restates the default")
    return out


def _overridden(notebook: str, own: dict, defaults: dict) -> dict:
    """What each of the stage's parameters overrides, as nested dicts."""
    full = {**defaults, **own}
    over = dict(defaults)
    method = full.get("method")
    if notebook == "02_build_perturbed_dataset":
        config = dataclasses.asdict(buildconfig.BuildConfig())
        config["grounded"] = dataclasses.asdict(buildconfig.GroundedOptions())
        config["noise"] = dataclasses.asdict(csp_noise.NoiseConfig())
        over["build"] = methods.deep_merge(config, methods.build_fields(method))
        over["data"] = _defaults(coco.make_source)
    elif notebook in ("03_train_sft", "04_train_simpo"):
        key = "sft" if notebook == "03_train_sft" else "simpo"
        over[key] = dataclasses.asdict(getattr(settings.make_configs(full["preset"], method=method), key))
    elif notebook in ("05_evaluate", "06_ablations"):
        over["suite"] = _defaults(suites.SuiteConfig)
        over["scoring"] = _defaults(evaluation.EvalConfig)
        over["boot"] = _defaults(tables.headline_table)
    return over


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: p.name)
def test_no_params_file_restates_a_default(path):
    params = yaml.safe_load(path.read_text())
    found = []
    for stage, own in (params["stages"] or {}).items():
        own = own or {}
        defaults = checks.notebook_defaults(stages.notebook_of(stage))
        found += restated(stage, own, _overridden(stage.split("@")[0], own, defaults))
    for method, data in (params.get("data") or {}).items():
        found += restated(f"data.{method}", data, _defaults(coco.make_source))
    assert not found, "\n".join(found)


def test_the_restated_rule_catches_a_restated_value():
    assert restated("03_train_sft@g0", {"sft": {"learning_rate": 5e-3}},
                    _overridden("03_train_sft", {"method": "grounded_csp"},
                                checks.notebook_defaults(stages.notebook_of("03_train_sft"))))


def test_the_default_study_expands_into_its_stages():
    names = [s.name for s in planning.plan_study(planning.load_params(PARAMS[[p.name for p in PARAMS]
                                                                                .index("default.yaml")]))]
    paper = [f"{n}{t}" for t in ("", "@s1", "@s2") for n in ("03_train_sft", "04_train_simpo")]
    deep = [f"{n}@deep{k}" for k in ("", "1", "2") for n in ("03_train_sft", "04_train_simpo")]
    parts = ["base", "paper_csp", "grounded_csp", "activated"]
    assert names == (["00_world_and_benchmarks", "01_perturbation_explorer", "02_build_perturbed_dataset",
                      "02_build_perturbed_dataset@s1", "02_build_perturbed_dataset@s2",
                      "02_build_perturbed_dataset@grounded", "02_build_perturbed_dataset@grounded_deep",
                      "02_build_perturbed_dataset@calibrated_activated_deep"]
                     + paper + [f"03_train_sft@{m}{k}" for m in "ga" for k in range(3)]
                     + [f"05_evaluate@{p}" for p in parts]
                     + deep + [f"03_train_sft@{m}d{k}" for m in "gac" for k in range(3)]
                     + [f"05_evaluate@deep-{p}" for p in parts]
                     + ["05_evaluate", "05_evaluate@deep", "07_figures"])


def test_a_split_evaluation_runs_its_parts_beside_each_other_and_its_tables_after_them():
    plan = {s.name: s for s in planning.plan_study(planning.load_params(
        PARAMS[[p.name for p in PARAMS].index("default.yaml")]))}
    whole = plan["05_evaluate@deep"]
    parts = [s for name, s in plan.items() if name.startswith("05_evaluate@deep-")]
    # every model is in exactly one part, the activated methods together (they share one answer turn)
    assert sorted(m for s in parts for m in s.parameters["models"]) == sorted(whole.parameters["models"])
    activated = plan["05_evaluate@deep-activated"].parameters["models"]
    assert {m.split("@")[0] for m in activated} == {"distilled_activated", "calibrated_activated"}
    assert plan["05_evaluate@deep-base"].inputs == [], "the base model waits for no training"
    for s in parts:
        assert s.parameters["rows_only"] is True and s.parameters["results"] == "results/deep"
        assert all(o.startswith("results/deep/matrix/") for o in s.outputs), "a part writes rows only"
        assert s.name in whole.inputs
    assert "results/deep/headline.csv" in whole.outputs and not any("/matrix/" in o for o in whole.outputs)
    assert len(whole.shared) == len(whole.parameters["models"]), "its rows are the parts'"
    with pytest.raises(ValueError, match="split_evaluation: true or false"):
        planning.expand_study({"bases": {"embedded": None}, "seeds": {}, "split_evaluation": "yes",
                               "stages": {}})


def test_the_deep_base_trains_the_activated_recipes_on_their_own_rows():
    plan = planning.plan_study(planning.load_params(PARAMS[[p.name for p in PARAMS].index("default.yaml")]))
    stage = {s.name: s for s in plan}
    assert stage["03_train_sft@ad1"].parameters == {"base_model": "embedded-deep", "dataset": "grounded@deep",
                                                    "method": "distilled_activated", "sft": {"seed": 1},
                                                    "tag": "@ad1"}
    assert stage["03_train_sft@cd2"].parameters["dataset"] == "calibrated_activated@deep"
    models = stage["05_evaluate@deep"].parameters["models"]
    assert "distilled_activated@s2=sft@ad2" in models and "calibrated_activated@s0=sft@cd0" in models
    sft = settings.make_configs(method="distilled_activated").sft
    assert (sft.confidence_target, sft.layout, sft.lora.activation, sft.loss) == (
        "internal", "follow_up", "confidence", "binomial_ce")

def test_a_method_with_rows_of_its_own_gets_its_own_dataset_and_per_base_seeds():
    from csp_utils.pipeline import expand

    params = {"name": "x", "base_model": "embedded", "bases": {"embedded": None, "embedded-deep": "deep"},
              "seeds": {"distilled_activated": 1, "calibrated_activated": {"embedded-deep": 2}},
              "data": {"grounded_csp": {"n_scenes": 8}, "calibrated_activated": {"n_scenes": 6}},
              "stages": {"05_evaluate": {}}}
    stages = expand.expand_study(params)["stages"]
    assert stages["02_build_perturbed_dataset@calibrated_activated_deep"] == {
        "base_model": "embedded-deep", "data": {"n_scenes": 6}, "dataset": "calibrated_activated@deep",
        "method": "calibrated_activated"}
    # no calibrated seeds on the first base: neither its rows nor its trainings
    assert "02_build_perturbed_dataset@calibrated_activated" not in stages
    assert [n for n in stages if n.startswith("03_train_sft@c")] == ["03_train_sft@cd0", "03_train_sft@cd1"]
    assert stages["03_train_sft@cd1"]["dataset"] == "calibrated_activated@deep"
    assert stages["03_train_sft@ad0"]["dataset"] == "grounded@deep"
    assert "calibrated_activated@s1=sft@cd1" in stages["05_evaluate@deep"]["models"]
    assert not any(m.startswith("calibrated") for m in stages["05_evaluate"]["models"])
    with pytest.raises(ValueError, match="not a number of seeds"):
        expand.expand_study({**params, "seeds": {"grounded_csp": "3"}})
    with pytest.raises(ValueError, match="outside bases.*Did you mean"):
        expand.expand_study({**params, "seeds": {"grounded_csp": {"embedded-dep": 1}}})


def test_the_calibrated_method_trains_on_noised_rows_with_the_measured_target():
    m = settings.make_configs(method="calibrated_activated")
    assert (m.sft.confidence_target, m.sft.layout, m.sft.lora.activation) == ("calibrated", "follow_up", "confidence")
    from csp_utils.train import methods
    g = methods.build_fields("calibrated_activated")["grounded"]
    assert g["clean_share"] == 0.5 and g["global_share"] == 0.5
