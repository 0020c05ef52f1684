"""Params files: one home per value. A value a params file gives must differ from the one it
overrides (the notebook's default, the method's or hardware preset's setting, the config
dataclass's default, the named sizes); a value restated there would silently stop following its
home, and a size is written once across params files and ``suites.SIZES``. And the studies still
expand into their stages: bases and seeds, ablation families, named sizes."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml

from csp_utils.analysis import tables
from csp_utils.dataset import buildconfig, coco, csp_noise
from csp_utils.evaluate import evaluation, suites
from csp_utils.pipeline import checks, expand, planning, stages
from csp_utils.train import methods, settings

REPO = Path(__file__).parents[1]
PARAMS = sorted((REPO / "params").glob("*.yaml"))


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "params" / name).read_text())


def _gpu_rehearsal() -> dict:
    """The params scripts/rehearse_gpu.py writes: paper_smoke's with the GPU settings put back."""
    spec = importlib.util.spec_from_file_location("rehearse_gpu", REPO / "scripts" / "rehearse_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gpu_params(_load("paper_smoke.yaml"))


# every params file, and the params a script writes from one
WRITTEN = {**{p.name: (lambda p=p: yaml.safe_load(p.read_text())) for p in PARAMS},
           "scripts/rehearse_gpu.py": _gpu_rehearsal}


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


def _overridden(notebook: str, own: dict, defaults: dict, sizes: str | None = None) -> dict:
    """What each of the stage's parameters overrides, as nested dicts (the named sizes over the
    defaults)."""
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
    return methods.deep_merge(over, suites.SIZES[sizes].get(notebook, {})) if sizes else over


def _ablation_restated(params: dict) -> list[str]:
    """An ablation family's stage parameters against the 06 notebook's, each variant's settings
    against its method's (build: the method whose rows it rebuilds)."""
    found = []
    for name, family in (params.get("ablations") or {}).items():
        own = {k: v for k, v in family.items() if k not in expand.FAMILY_KEYS}
        found += restated(name, own, checks.notebook_defaults(stages.notebook_of("06_ablations")))
        method = family["method"]
        rows = method if method == "paper_csp" or expand._rows_of(method, params.get("data") or {}) != "grounded" else "grounded_csp"
        for label, variant in family["variants"].items():
            for key, notebook, owner in (("build", "02_build_perturbed_dataset", rows), ("sft", "03_train_sft", method),
                                         ("simpo", "04_train_simpo", method)):
                if isinstance(variant, dict) and key in variant:
                    defaults = checks.notebook_defaults(stages.notebook_of(notebook))
                    found += restated(f"{name}: {label}", {key: variant[key]},
                                      _overridden(notebook, {"method": owner}, defaults))
    return found


@pytest.mark.parametrize("where", WRITTEN)
def test_no_params_file_restates_a_default(where):
    params = WRITTEN[where]()
    found = []
    for stage, own in (params["stages"] or {}).items():
        own = own or {}
        defaults = checks.notebook_defaults(stages.notebook_of(stage))
        found += restated(stage, own, _overridden(stage.split("@")[0], own, defaults, params.get("sizes")))
    for method, data in (params.get("data") or {}).items():
        found += restated(f"data.{method}", data, _defaults(coco.make_source))
    found += _ablation_restated(params)
    assert not found, "\n".join(found)


def _is_size(key: str) -> bool:
    return key.startswith("n_") or key.endswith(("_levels", "_kinds")) or key == "batch_size"


def _sizes_given(where: str, notebook: str, given: dict, seen: set) -> list[tuple]:
    """(key, value, place) of each size a stage or a named size gives; a dict met twice (a YAML
    alias, one dict shared by two notebooks) counts once."""
    out = []
    parts = [(notebook, given)] if notebook == "00_world_and_benchmarks" else [
        (f"{notebook}.{c}", given.get(c)) for c in ("suite", "scoring", "boot")]
    for part, values in parts:
        if isinstance(values, dict) and id(values) not in seen:
            seen.add(id(values))
            out += [(k, repr(v), f"{where}: {part}") for k, v in values.items() if _is_size(k)]
    return out


def test_every_size_is_written_once():
    """The world's and the evaluation's sizes live in ``suites.SIZES``, which params files name:
    no size (key and value) is given in two places among the params files and the named sizes."""
    seen, given = set(), []
    for name, sizes in suites.SIZES.items():
        for notebook, values in sizes.items():
            given += _sizes_given(f"SIZES[{name!r}]", notebook, values, seen)
    for path in PARAMS:
        for stage, own in (yaml.safe_load(path.read_text())["stages"] or {}).items():
            if stage.split("@")[0] in ("00_world_and_benchmarks", "05_evaluate", "06_ablations"):
                given += _sizes_given(f"{path.name} {stage}", stage.split("@")[0], own or {}, seen)
    places = {}
    for key, value, place in given:
        places.setdefault((key, value), []).append(place)
    twice = [f"{k} = {v} in {', '.join(p)}" for (k, v), p in places.items() if len(p) > 1]
    assert not twice, "\n".join(twice)
    assert any(k == "n_grounded_images" for k, _, _ in given)  # the check sees the sizes


def test_the_size_rule_catches_a_size_written_twice():
    seen = set()
    given = _sizes_given("SIZES", "05_evaluate", suites.SIZES["study"]["05_evaluate"], seen)
    given += _sizes_given("full.yaml", "05_evaluate", {"suite": {"n_grounded_images": 60}}, seen)
    assert [g for g in given if g[0] == "n_grounded_images"] == [
        ("n_grounded_images", "60", "SIZES: 05_evaluate.suite"), ("n_grounded_images", "60", "full.yaml: 05_evaluate.suite")]


def test_the_restated_rule_catches_a_restated_value():
    assert restated("03_train_sft@g0", {"sft": {"learning_rate": 5e-3}},
                    _overridden("03_train_sft", {"method": "grounded_csp"},
                                checks.notebook_defaults(stages.notebook_of("03_train_sft"))))
    assert restated("05_evaluate", {"scoring": {"batch_size": 32}},
                    _overridden("05_evaluate", {}, checks.notebook_defaults(stages.notebook_of("05_evaluate")), "study"))
    family = {"method": "grounded_csp", "seeds": 1, "first_person": True,
              "variants": {"g": {}, "soft CE": {"tag": "x", "sft": {"loss": "soft_ce"}}}}
    assert _ablation_restated({"ablations": {"06_ablations": family}}) == [
        "06_ablations: first_person = True restates the default", "06_ablations: soft CE: sft.loss = 'soft_ce' restates the default"]


def test_the_default_study_expands_into_its_stages():
    names = [s.name for s in planning.plan_study(planning.load_params(PARAMS[[p.name for p in PARAMS]
                                                                                .index("default.yaml")]))]
    paper = [f"{n}{t}" for t in ("", "@s1", "@s2") for n in ("03_train_sft", "04_train_simpo")]
    deep = [f"{n}@deep{k}" for k in ("", "1", "2") for n in ("03_train_sft", "04_train_simpo")]
    parts = ["base", "paper_csp", "grounded_csp", "activated"]
    assert names == (["00_world_and_benchmarks", "01_perturbation_explorer", "02_build_perturbed_dataset",
                      "02_build_perturbed_dataset@s1", "02_build_perturbed_dataset@s2",
                      "02_build_perturbed_dataset@grounded", "02_build_perturbed_dataset@grounded_deep",
                      "02_build_perturbed_dataset@distilled_activated",
                      "02_build_perturbed_dataset@distilled_activated_deep",
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
        assert all(o.startswith(("results/deep/matrix/", "results/deep/sources")) for o in s.outputs), "rows only"
        assert s.name in whole.inputs
    assert "results/deep/headline.csv" in whole.outputs and not any("/matrix/" in o for o in whole.outputs)
    assert "results/deep/sources" in plan["05_evaluate@deep-base"].outputs, "made beside the base model's rows"
    assert len(whole.shared) == len(whole.parameters["models"]) + 1, "its rows and sources are the parts'"
    with pytest.raises(ValueError, match="split_evaluation: true or false"):
        planning.expand_study({"bases": {"embedded": None}, "seeds": {}, "split_evaluation": "yes",
                               "stages": {}})


def test_the_deep_base_trains_the_activated_recipes_on_their_own_rows():
    plan = planning.plan_study(planning.load_params(PARAMS[[p.name for p in PARAMS].index("default.yaml")]))
    stage = {s.name: s for s in plan}
    # distilled_activated's data differ from grounded CSP's (twice the scenes): rows of its own, on both bases
    assert stage["03_train_sft@ad1"].parameters == {"base_model": "embedded-deep",
                                                    "dataset": "distilled_activated@deep",
                                                    "method": "distilled_activated", "sft": {"seed": 1},
                                                    "tag": "@ad1"}
    assert stage["03_train_sft@a0"].parameters["dataset"] == "distilled_activated"
    assert stage["02_build_perturbed_dataset@distilled_activated_deep"].parameters["data"] == {"n_scenes": 4800}
    assert stage["03_train_sft@gd0"].parameters["dataset"] == "grounded@deep"
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


def test_the_full_study_expands_its_ablation_families():
    stages = expand.expand_study(_load("full.yaml"))["stages"]
    paper = [f"{n}@{v}{k}" for k in ("", "1", "2") for n, v in (
        ("02_build_perturbed_dataset", "global"), ("02_build_perturbed_dataset", "gamma"), ("02_build_perturbed_dataset", "neg"),
        ("03_train_sft", "global"), ("03_train_sft", "gamma"), ("03_train_sft", "measured"), ("04_train_simpo", "only"),
        ("04_train_simpo", "global"), ("04_train_simpo", "gamma"), ("04_train_simpo", "measured"))]
    names = list(stages)
    assert names[names.index("03_train_sft@dn2") + 1:][:len(paper)] == paper  # after the study's training, seed by seed
    assert stages["02_build_perturbed_dataset@neg1"] == {"data": {"n_scenes": 400},
                                                         "build": {"include_negatives": True, "seed": 1}}
    assert stages["03_train_sft@measured2"] == {"dataset": "dataset@neg2", "sft": {"confidence_target": "measured", "seed": 2}}
    assert stages["04_train_simpo@only"] == {"regime": "simpo", "tag": "@s0"}
    assert stages["04_train_simpo@only1"] == {"regime": "simpo", "tag": "@s1", "dataset": "dataset@s1", "simpo": {"seed": 1}}
    # grounded CSP's rebuilt rows: once, into grounded@TAG
    assert stages["02_build_perturbed_dataset@gflip"] == {"data": {"n_scenes": 2400}, "dataset": "grounded@flip",
                                                          "method": "grounded_csp", "build": {"grounded": {"flip_rows": True}}}
    assert "02_build_perturbed_dataset@gflip1" not in stages
    assert stages["03_train_sft@gclean752"] == {"dataset": "grounded@clean75", "method": "grounded_csp", "sft": {"seed": 2}}
    assert stages["03_train_sft@gce1"] == {"dataset": "grounded", "method": "grounded_csp", "sft": {"loss": "ce", "seed": 1}}
    # another method as a variant: the seeds the study does not train are added in its own names
    assert stages["03_train_sft@d2"] == {"dataset": "grounded", "method": "distilled", "sft": {"seed": 2}}
    assert "distilled@s1=sft@d1" not in stages["05_evaluate"]["models"]
    grounded = stages["06_ablations@grounded"]
    assert grounded["name"] == "grounded" and grounded["first_person"] is False
    assert grounded["variants"]["grounded, target internal (distilled)"] == ["distilled@s0=sft@d0", "sft@d1", "sft@d2"]
    assert grounded["reference"] == "grounded@s0=sft@g0"
    assert grounded["paired"] == {"grounded (correct, inline, soft CE)": list(grounded["variants"])[1:]}
    ablation = stages["06_ablations"]
    assert "reference" not in ablation and "name" not in ablation  # the notebook's defaults
    assert list(ablation["variants"]) == ["base", "SFT + SimPO (local, paper target)", "SFT only", "SimPO only",
                                          "global noise", "noise_gamma 0.035", "measured-accuracy target"]
    assert ablation["variants"]["base"] == "base" and ablation["variants"]["SFT only"] == ["sft@s0", "sft@s1", "sft@s2"]
    # the named sizes under every evaluation; each base's own evaluation settings in place of the template's
    assert all(stages[s]["suite"] == {"n_grounded_images": 60} and stages[s]["scoring"]["batch_size"] == 32
               for s in ("05_evaluate", "05_evaluate@noconf", "06_ablations", "06_ablations@grounded"))
    assert stages["05_evaluate"]["scoring"]["framings"] == ["third", "first"]
    assert stages["05_evaluate@noconf"]["scoring"] == {"readouts": ["single_pass"], "batch_size": 32}


def test_named_sizes_go_under_every_stage_and_a_stage_s_own_values_win():
    smoke = expand.expand_study(_load("smoke.yaml"))["stages"]
    assert all(smoke[s]["boot"] == {"n_boot": 20} and smoke[s]["suite"]["n_pope_images"] == 2
               for s in smoke if s.startswith(("05_", "06_")))
    assert smoke["05_evaluate"]["suite"]["n_grounded_images"] == 1 and "n_grounded_images" not in smoke["05_evaluate@second"]["suite"]
    assert smoke["00_world_and_benchmarks"] == {"n_scenes": 4, "n_pope_images": 10, "n_synthetic": 200}
    assert expand.expand_study(_load("paper_smoke.yaml"))["stages"]["05_evaluate"]["scoring"]["batch_size"] == 4
    assert suites.SIZES["smoke"]["05_evaluate"]["scoring"] == {"batch_size": 8}  # the module's sizes stay as written
    with pytest.raises(ValueError, match='sizes: unknown sizes .smok.. Did you mean "smoke"'):
        expand.expand_study({**_load("smoke.yaml"), "sizes": "smok"})


def _family(**changes) -> dict:
    params = _load("full.yaml")
    family = params["ablations"]["06_ablations@grounded"]
    for key, value in changes.items():
        if key == "variants":
            family["variants"] = {**family["variants"], **value}
        else:
            family[key] = value
    return params


@pytest.mark.parametrize("params, message", [
    (_family(method="grounded"), 'ablations: 06_ablations@grounded: method: unknown method .grounded.. Did you mean "grounded_csp"'),
    (_family(seeds="3"), "06_ablations@grounded: seeds = '3' is not a number of seeds; it takes a whole number"),
    (_family(seeds=2.5), "seeds = 2.5 is not a number of seeds"),
    (_family(seeds=4), "the reference, grounded_csp on embedded, has 3 seed.s. in seeds, the family 4"),
    (_family(variants={"x": {"tga": "x"}}), "variant 'x': unknown key 'tga'. Did you mean \"tag\""),
    (_family(variants={"x": {"sft": {"loss": "ce"}}}), "variant 'x': a variant with settings needs a tag"),
    (_family(variants={"x": {"tag": "x", "sft": {"seed": 4}}}), "variant 'x': sft must be a mapping of settings without seed"),
    (_family(variants={"x": {"tag": "x", "simpo": {"beta": 2}}}), "grounded_csp trains no SimPO stage"),
    (_family(variants={"x": {"regime": "simpo", "tag": "x"}}), "regime is sft .* for paper_csp only"),
    (_family(variants={"x": {"method": "distiled"}}), "method names a method trained on the grounded rows"),
    (_family(variants={"x": {"tag": "x", "dataset": "y"}}), "dataset names the rows the variant builds; give build"),
    (_family(variants={"x": {}}), "exactly one variant must be grounded_csp itself"),
    (_family(variants={"x": {"tag": "ce", "sft": {"loss": "brier"}}}), "two variants expand to 03_train_sft@gce"),
    (_family(reference="sft@g1"), "reference of its 06_ablations stage are the expansion's"),
    ({**_load("full.yaml"), "ablations": {"06_ablation": {}}}, "each key is the 06_ablations stage the family expands into"),
    ({**_load("full.yaml"), "ablations": [1]}, "ablations: a mapping of 06_ablations stage"),
])
def test_a_bad_ablation_family_is_refused_naming_the_key(params, message):
    with pytest.raises(ValueError, match=message):
        expand.expand_study(copy.deepcopy(params))
