"""The study as planned before anything runs: listed stages merged over the expansion, unique
stage names, every name and number resolved, every notebook compiled, and ``--plan``."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from csp_utils.pipeline import checks, cli, driver, planning
from csp_utils.pipeline.expand import expand_study

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "params" / "default.yaml").read_text())


def _expanded(change) -> dict:
    params = copy.deepcopy(DEFAULT)
    change(params)
    return expand_study(params)["stages"]


def test_a_stage_listed_beside_bases_is_merged_over_every_stage_generated_from_it():
    stages = _expanded(lambda p: p["stages"].update({
        "03_train_sft": {"sft": {"max_steps": 2}},
        "02_build_perturbed_dataset": {"build": {"levels": [0, 50, 100], "shard_size": 4}},
        "03_train_sft@g1": {"sft": {"learning_rate": 0.01}}}))
    sft = {k: v for k, v in stages.items() if k.startswith("03_train_sft")}
    assert len(sft) == 21 and all(v["sft"]["max_steps"] == 2 for v in sft.values())
    assert stages["03_train_sft@s1"]["sft"] == {"seed": 1, "max_steps": 2}  # the seed the expansion gives stays
    assert stages["03_train_sft@g1"]["sft"] == {"seed": 1, "max_steps": 2, "learning_rate": 0.01}
    assert "learning_rate" not in stages["03_train_sft@g2"]["sft"]
    builds = [v for k, v in stages.items() if k.startswith("02_build")]
    assert len(builds) == 8 and all(v["build"]["shard_size"] == 4 for v in builds)
    assert stages["02_build_perturbed_dataset@s2"]["build"] == {"seed": 2, "levels": [0, 50, 100], "shard_size": 4}


def test_the_recorded_params_hold_the_merged_settings():
    params = copy.deepcopy(DEFAULT)
    params["stages"]["03_train_sft"] = {"sft": {"max_steps": 2}}
    plan = planning.plan_study(expand_study(params))
    assert all(s.parameters["sft"]["max_steps"] == 2 for s in plan if s.name.startswith("03_train_sft"))


def test_a_listed_value_the_expansion_sets_otherwise_is_refused_naming_both_stages():
    with pytest.raises(ValueError, match=r"03_train_sft sets sft.seed = 7.*03_train_sft@s1"):
        _expanded(lambda p: p["stages"].update({"03_train_sft": {"sft": {"seed": 7}}}))


def test_bases_whose_tags_share_a_first_letter_get_distinct_stage_names():
    stages = _expanded(lambda p: p["bases"].update({"embedded-noconf": "noconf", "embedded-deep": "nodeep"}))
    grounded = [k for k in stages if k.startswith("03_train_sft@g")]
    assert len(grounded) == len(set(grounded)) == 9
    assert {"03_train_sft@gnoc0", "03_train_sft@gnod0"} <= set(grounded)
    models = {k: v["models"] for k, v in stages.items() if k.startswith("05_evaluate")}
    assert "grounded@s0=sft@gnod0" in models["05_evaluate@nodeep"]
    assert "grounded@s0=sft@gnoc0" in models["05_evaluate@noconf"]


def test_two_generated_stages_of_one_name_are_refused_naming_both_origins():
    with pytest.raises(ValueError, match=r"two stages named 03_train_sft@s1: paper_csp seed 1 on base embedded "
                                         r"and paper_csp seed 1 on base other"):
        _expanded(lambda p: p["bases"].update({"other": "s"}))
    with pytest.raises(ValueError, match="tag 'n' is given to two base models"):
        _expanded(lambda p: p["bases"].update({"a": "n", "b": "n"}))


@pytest.mark.parametrize("count, what", [("3", "'3'"), ([3], r"\[3\]"), (-2, "-2"), (True, "True"), (1.5, "1.5")])
def test_seed_counts_are_whole_numbers(count, what):
    with pytest.raises(ValueError, match=f"seeds: paper_csp = {what} is not a number of seeds"):
        _expanded(lambda p: p["seeds"].update(paper_csp=count))


def test_a_misspelt_method_gets_a_did_you_mean():
    with pytest.raises(ValueError, match='unknown method .grounded_cps.. Did you mean "grounded_csp"'):
        _expanded(lambda p: p["seeds"].update(grounded_cps=1))


@pytest.mark.parametrize("override, message", [
    ({"05_evaluate.suite.transfer_kinds": ["blurr"]}, "'suite.transfer_kinds': unknown value 'blurr'. Did you mean \"blur\""),
    ({"05_evaluate.scoring.framings": ["thrid"]}, "unknown value 'thrid'. Did you mean \"third\""),
    ({"03_train_sft.method": "groundd_csp"}, "Did you mean \"grounded_csp\""),
    ({"03_train_sft.sft.layout": "inlin"}, "Did you mean \"inline\""),
    ({"05_evaluate.suite.transfer_kinds": [3]}, "item 3 is a int; its items are strs"),
    ({"05_evaluate.suite.perturbed_levels": [0, "50"]}, "item '50' is a str; its items are ints"),
])
def test_names_and_list_elements_are_resolved_before_anything_runs(override, message):
    params = planning.apply_overrides(planning.load_params(REPO / "params" / "default.yaml"), override)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        planning.plan_study(params)


@pytest.mark.parametrize("params_file, bases, override, expect", [
    ("default.yaml", {"embedded": None, "embedded-nocnf": "noconf"}, {}, 'Did you mean "embedded-noconf"'),
    ("smoke.yaml", None, {"base_model": "embeded"}, 'Did you mean "embedded"'),
])
def test_a_mistyped_base_model_is_refused_before_any_stage(tmp_path, params_file, bases, override, expect):
    params = yaml.safe_load((REPO / "params" / params_file).read_text())
    if bases:  # seed counts given per base name the default's bases: dropped with them
        params["bases"] = bases
        params["seeds"] = {m: n for m, n in params["seeds"].items() if not isinstance(n, dict)}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(params))
    sets = [f"{k}={v}" for k, v in override.items()]
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(path), "--runs-root", str(tmp_path / "runs")] + (["--set", *sets] if sets else []))
    assert expect in str(exit_.value) and "\n" not in str(exit_.value)
    assert not (tmp_path / "runs").exists()


def test_a_syntax_error_in_a_notebook_is_one_line_before_anything_is_removed(tmp_path, monkeypatch):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(REPO / "notebooks", notebooks)
    nb = json.loads((notebooks / "05_evaluate.ipynb").read_text())
    code = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
    nb["cells"][code[3]]["source"] = ["x = 1\n", "print((x)\n"]
    (notebooks / "05_evaluate.ipynb").write_text(json.dumps(nb))
    monkeypatch.setattr(planning, "notebook_of", lambda stage: notebooks / f"{stage.split('@')[0]}.ipynb")
    with pytest.raises(ValueError) as err:
        planning.plan_study(planning.load_params(REPO / "params" / "default.yaml"))
    assert str(err.value) == (f"{notebooks / '05_evaluate.ipynb'}: cell {code[3] + 1}, line 2: "
                              "SyntaxError: '(' was never closed")


def test_every_shipped_notebook_compiles():
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        checks.compile_notebook(path)


def test_plan_prints_every_stage_and_writes_nothing(tmp_path, capsys):
    cli.main([str(REPO / "params" / "default.yaml"), "--plan", "--runs-root", str(tmp_path / "runs"),
              "--set", "03_train_sft.sft.max_steps=2"])
    out = capsys.readouterr().out
    plan = planning.plan_study(planning.apply_overrides(planning.load_params(REPO / "params" / "default.yaml"),
                                                        {"03_train_sft.sft.max_steps": 2}))
    for stage in plan:
        assert f"[plan] {stage.name}: run (" in out
    assert "{base_model: embedded, sft: {max_steps: 2}, tag: '@s0'}" in out
    assert not (tmp_path / "runs").exists()


def test_an_interrupt_names_its_signal(tmp_path):
    """SIGINT goes through the driver's handler, which names the signal (Python's own gave an
    empty cause: ``interrupted ()``)."""
    import signal

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            cli.main([str(tmp_path / "missing.yaml")])
        with pytest.raises(KeyboardInterrupt, match="signal SIGINT"):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def test_a_misspelt_publish_key_is_refused_when_the_params_are_read(tmp_path):
    params = copy.deepcopy(DEFAULT)
    params["publish"]["readmee"] = params["publish"].pop("readme")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match='publish: unknown key .readmee.. Did you mean "readme"'):
        planning.load_params(path)
