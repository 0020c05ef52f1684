"""The smoke chain: every notebook, in order, through the study driver, on one tiny model.

Run once per test session (module fixture); the tests then check the files each stage
wrote, the stage markers (a rerun skips), and that a failing notebook stops the chain.
"""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from csp_utils import study

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    """A tiny LLaVA trained for a few dozen steps: enough to answer in the Yes/No format."""
    from csp_utils import pretrain

    cfg = pretrain.PretrainConfig.tiny(joint_steps=60, batch_size=16, n_train_scenes=48)
    return pretrain.build_default_model(tmp_path_factory.mktemp("smoke_model") / "tiny", cfg)


@pytest.fixture(scope="module")
def smoke_run(smoke_model, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    run_dir = study.run_study(SMOKE, runs_root=runs, overrides={"base_model": str(smoke_model)})
    return run_dir


def test_every_stage_ran_and_left_a_marker(smoke_run):
    params = yaml.safe_load(SMOKE.read_text())
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    for stage in params["stages"]:
        marker = json.loads((smoke_run / "markers" / f"{stage}.json").read_text())
        assert marker["stage"] == stage and len(marker["hash"]) == 16
        assert (smoke_run / "notebooks" / f"{stage}.ipynb").stat().st_size > 0
        assert stage in manifest["timings_s"]
    assert manifest["params_hash"] and manifest["packages"]["torch"].startswith("2.13")
    # the host's instruction set decides torch's CPU kernels, hence the last float digits
    assert manifest["machine"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert manifest["machine"]["cpu_count"] >= 1 and manifest["machine"]["machine"]
    assert "failed" not in manifest


def test_stage_outputs(smoke_run):
    figs = smoke_run / "figures"
    # 00 and 01: world figures and the perturbation grid, PNG + PDF
    assert (smoke_run / "results" / "benchmark_composition.csv").exists()
    for stem in ("perturbation_grid",):
        assert (figs / f"{stem}.png").stat().st_size > 0 and (figs / f"{stem}.pdf").stat().st_size > 0
    # 02: the perturbed dataset and its report
    report = json.loads((smoke_run / "dataset" / "build_report.json").read_text())
    assert report["kept_samples"] > 0 and set(report["rows_per_level"]) >= {"0", "50", "100"}
    # 03 / 04: three regimes, each a PEFT adapter with its training config and a curve log
    for name in ("sft@s0", "sft_simpo@s0", "simpo_only@s0"):
        adapter = smoke_run / "adapters" / name
        assert (adapter / "adapter_config.json").exists(), name
        assert (adapter / "adapter_model.safetensors").exists(), name
        assert any(adapter.glob("*config*.json"))
    assert list((smoke_run / "train_logs").glob("*.csv"))
    # 05: per-question results, summaries with every combination, baselines
    head = pd.read_csv(smoke_run / "results" / "headline.csv")
    assert {"base", "sft_simpo", "baseline:constant", "baseline:internal", "baseline:temperature"} <= set(head["model"])
    assert {"third", "first"} <= set(head["framing"]) and {"generated", "single_pass"} <= set(head["readout"])
    assert {"pope-random", "amber-attribute", "transfer-blur", "perturbed"} <= set(head["set"])
    assert head["ece"].between(0, 1).all() or head["ece"].isna().any()
    summary = pd.read_csv(smoke_run / "results" / "summary.csv")
    assert {"accuracy", "f1", "ece", "auroc", "coverage"} <= set(summary.columns)
    # 06: ablation table over the variants
    ab = pd.read_csv(smoke_run / "results" / "ablation.csv")
    assert {"SFT + SimPO", "SFT only", "SimPO only", "base"} <= set(ab["name"])
    assert {"ece", "ece15", "brier", "auroc", "accuracy"} == set(ab["metric"])
    # 07: every figure regenerated from results
    for stem in ("reliability_clean_sets", "reliability_transfer_sets", "confidence_vs_level", "ablation_ece"):
        assert (figs / f"{stem}.png").stat().st_size > 0 and (figs / f"{stem}.pdf").exists(), stem


def test_rerun_skips_finished_stages_and_resumes_from_a_changed_one(smoke_run, smoke_model, capsys):
    before = {p.name: p.stat().st_mtime for p in (smoke_run / "markers").iterdir()}
    params = yaml.safe_load(SMOKE.read_text())
    params["stages"]["07_figures"] = {"after": "sft"}  # only the last stage changes
    changed = smoke_run.parent / "changed.yaml"
    changed.write_text(yaml.safe_dump(params, sort_keys=False))  # stage order is the chain
    study.run_study(changed, name=smoke_run.name, runs_root=smoke_run.parent,
                    overrides={"base_model": str(smoke_model)})
    out = capsys.readouterr().out
    after = {p.name: p.stat().st_mtime for p in (smoke_run / "markers").iterdir()}
    assert out.count("skipped (up to date)") == len(params["stages"]) - 1
    assert after["07_figures.json"] > before["07_figures.json"]
    assert all(after[k] == before[k] for k in before if k != "07_figures.json")


def test_a_failing_notebook_stops_the_chain_and_keeps_its_copy(tmp_path, smoke_model):
    bad = {"name": "bad", "base_model": str(smoke_model),
           "stages": {"02_build_perturbed_dataset": {"failure_policy": "no-such-policy", "n_scenes": 1},
                      "07_figures": {}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit, match="02_build_perturbed_dataset failed.*failure_policy"):
        study.run_study(path, runs_root=tmp_path / "runs")
    run = tmp_path / "runs" / "bad"
    assert (run / "notebooks" / "02_build_perturbed_dataset.ipynb").exists()
    assert not (run / "markers" / "02_build_perturbed_dataset.json").exists()
    assert not (run / "notebooks" / "07_figures.ipynb").exists()
    assert json.loads((run / "manifest.json").read_text())["failed"]["stage"] == "02_build_perturbed_dataset"


def test_new_base_model_weights_change_the_chain(tmp_path):
    """Markers chain from the base model's identity: retraining a model in place (same path)
    must not let finished stages count as up to date."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights-1")
    first = study.model_fingerprint(folder)
    assert study.model_fingerprint(folder) == first
    (folder / "model.safetensors").write_bytes(b"weights-two")
    assert study.model_fingerprint(folder) != first
    (folder / "csp_meta.json").write_text(json.dumps({"sha256": "abc"}))
    assert study.model_fingerprint(folder) == "abc"
    assert study.model_fingerprint("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"


def test_params_files_name_existing_notebooks():
    for path in sorted((REPO / "params").glob("*.yaml")):
        params = study.load_params(path)
        assert params["stages"], path
