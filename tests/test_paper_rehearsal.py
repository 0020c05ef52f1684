"""The CPU rehearsal of the paper's setting: params/paper_smoke.yaml on the rehearsal kit (random
weights of the real architectures, scikit-image photographs, official-format POPE / AMBER
files), run by scripts/rehearse_gpu.py --cpu, and what each stage writes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from csp_utils.dataset import coco, grounders
from csp_utils.pipeline import rehearsal

REPO = Path(__file__).resolve().parents[1]
PAPER, SMOKE = REPO / "params" / "paper.yaml", REPO / "params" / "paper_smoke.yaml"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return rehearsal.make_rehearsal_kit(tmp_path_factory.mktemp("kit") / "kit")


@pytest.fixture(scope="module")
def rehearsal_run(kit, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # toy models; extra threads only oversubscribe a shared machine
    try:
        return _script("rehearse_gpu").main(["--cpu", "--kit", str(kit),
                                             "--runs-root", str(tmp_path_factory.mktemp("runs"))])
    finally:
        torch.set_num_threads(before)


def test_the_kit_holds_the_real_architectures_and_official_layouts(kit):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(kit / "models" / "llava")
    assert cfg.model_type == "llava" and cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert AutoConfig.from_pretrained(kit / "models" / "grounding-dino").model_type == "grounding-dino"
    assert AutoConfig.from_pretrained(kit / "models" / "sam").model_type == "sam"
    assert coco.processor_image_size(kit / "models" / "llava") == 336
    from csp_utils.vlm import models, prompts

    _, proc = models.load_vlm(kit / "models" / "llava")
    text = proc.apply_chat_template(prompts.answer_messages("Is there a cat?"), add_generation_prompt=True)
    assert text.startswith("USER: <image>")  # LLaVA-1.5's image-first layout
    assert len(proc(images=Image.new("RGB", (500, 336)), text=text)["input_ids"][0]) > 576  # 24 x 24 patches
    from csp_utils.world import benchmarks

    for kind in ("random", "popular", "adversarial"):
        bench = benchmarks.load_pope(kit / "pope", kit / "coco" / "val2014", split_name=kind)
        bench.check_images()
        assert {it.label for it in bench.items} == {"yes", "no"}
    amber = benchmarks.load_amber(kit / "amber", kit / "amber" / "image")
    assert all(len(b.items) for b in amber.values())
    instances = json.loads((kit / "coco" / "annotations" / "instances_train2014.json").read_text())
    assert all("train2014" in im["file_name"] for im in instances["images"])


def test_the_kit_is_deterministic(kit, tmp_path):
    again = rehearsal.make_rehearsal_kit(tmp_path / "again", models=False)
    for rel in ("coco/annotations/instances_train2014.json", "pope/coco_pope_random.json", "amber/annotations.json",
                "coco/train2014/COCO_train2014_000000000001.jpg"):
        assert (again / rel).read_bytes() == (kit / rel).read_bytes(), rel


def test_paper_smoke_runs_the_stages_of_paper_yaml():
    paper, smoke = yaml.safe_load(PAPER.read_text()), yaml.safe_load(SMOKE.read_text())
    assert list(paper["stages"]) == list(smoke["stages"])
    assert paper["stages"]["05_evaluate"].get("models") == smoke["stages"]["05_evaluate"].get("models")
    for stage in paper["stages"]:
        for key in ("preset", "regime"):
            assert paper["stages"][stage].get(key) == smoke["stages"][stage].get(key), (stage, key)
    build = {name: params["stages"]["02_build_perturbed_dataset"] for name, params in (("paper", paper), ("smoke", smoke))}
    assert build["paper"]["data"]["source"] == build["smoke"]["data"]["source"] == "coco"
    assert build["paper"]["build"].get("failure_policy") == build["smoke"]["build"].get("failure_policy")
    assert build["paper"]["build"]["grounder"]["kind"] == "dino_sam"
    # the paper's inputs are study-wide: image folders and checkpoints are given with --set
    assert set(rehearsal.study_overrides("kit")) <= set(paper) and set(rehearsal.study_overrides("kit")) <= set(smoke)
    # nothing outside the repository
    for key in ("pope_dir", "amber_dir"):
        assert paper[key].startswith("csp_utils/data/benchmarks/")
    assert "../" not in PAPER.read_text() and "/data/" not in yaml.safe_dump(paper["stages"])


def test_every_stage_ran(rehearsal_run):
    manifest = json.loads((rehearsal_run / "manifest.json").read_text())
    assert "failed" not in manifest
    assert list(manifest["timings_s"]) == list(yaml.safe_load(SMOKE.read_text())["stages"])


def test_the_dataset_was_grounded_by_groundingdino_then_sam(rehearsal_run, kit):
    from datasets import load_from_disk

    run = rehearsal_run
    source = json.loads((run / "dataset" / "source_report.json").read_text())
    assert source["image_size"] == 336 and source["images_used"] == 2 and source["questions"] == 12
    report = json.loads((run / "dataset" / "build_report.json").read_text())
    assert report["grounder"].startswith("grounding-dino+sam")
    # 6 "Yes" questions reach the grounder; random weights find some objects and miss others
    # (words outside the toy detector's vocabulary), and every miss is counted, never hidden
    assert report["negatives_dropped"] == 6 and report["grounded_samples"] == 6
    assert report["grounding_status"].get("ok", 0) >= 1
    assert report["grounding_status"].get("ok", 0) + sum(report["grounding_failures"].values()) == 6
    assert report["skipped_samples"] == sum(report["grounding_failures"].values())

    ds = load_from_disk(str(run / "dataset" / "dataset"))
    assert len(ds) == 3 * report["kept_samples"] and set(ds["confidence"]) == {0, 50, 100}
    assert set(ds["grounding_status"]) == {"ok"} and set(ds["noise"]) == {"local"}
    assert all(g.startswith("grounding-dino+sam") for g in ds["grounder"])
    # the noise sits where GroundingDINO -> SAM put the mask, at the model's input size
    spec = {"detector": str(kit / "models" / "grounding-dino"), "segmenter": str(kit / "models" / "sam"),
            "box_threshold": 0.0, "text_threshold": 0.0, "max_boxes": 2}
    grounder = grounders.make_grounder(spec)
    sid = ds[0]["source_id"]
    rows = {r["confidence"]: r for r in ds.filter(lambda r: r["source_id"] == sid)}
    photo = coco.resize_shortest_edge(Image.open(kit / "coco" / "train2014" / rows[0]["image_id"]).convert("RGB"), 336)
    assert min(rows[0]["image"].size) == 336
    mask = grounder.ground(photo, rows[0]["key_objects"]).mask
    # (tolerances: a SAM logit at the threshold may fall either way under other thread counts)
    assert np.isclose(mask.mean(), rows[0]["mask_area"], atol=1e-3)
    clean, noised = np.asarray(rows[100]["image"]), np.asarray(rows[0]["image"])
    assert np.array_equal(clean, np.asarray(photo))
    changed = (clean != noised).any(-1)
    assert changed.sum() >= 0.99 * mask.sum() and (changed & ~mask).mean() < 1e-3


def test_training_used_the_paper_preset(rehearsal_run):
    for name in ("sft@s0", "sft_simpo@s0", "simpo_only@s0"):
        adapter = rehearsal_run / "adapters" / name
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        targets = cfg["target_modules"]  # the 7B preset: attention projections of the language model only
        assert "language_model" in targets and "projector" not in targets, name
        assert all(p in targets for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and "gate_proj" not in targets
        assert (adapter / "adapter_model.safetensors").stat().st_size > 0
        assert json.loads((adapter / "training_config.json").read_text())


def test_evaluation_read_the_official_files(rehearsal_run):
    head = pd.read_csv(rehearsal_run / "results" / "headline.csv")
    sets = set(head["set"])
    assert {"coco-pope-random", "coco-pope-popular", "coco-pope-adversarial"} <= sets
    assert {"official-amber-existence", "official-amber-attribute", "official-amber-relation"} <= sets
    models = set(pd.read_csv(rehearsal_run / "results" / "summary.csv")["model"])
    assert {"base", "sft@s0", "simpo_only@s0", "sft_simpo@s0", "baseline:temperature"} <= models
    for model in ("base", "sft@s0", "simpo_only@s0", "sft_simpo@s0"):
        rows = [json.loads(line) for line in (rehearsal_run / "results" / "matrix" / model /
                                              "coco-pope-random.jsonl").read_text().splitlines()]
        assert len({r["question_id"] for r in rows}) == 4, model


def test_figures_were_made(rehearsal_run):
    pngs = list((rehearsal_run / "figures").glob("*.png"))
    assert len(pngs) >= 3 and all(p.stat().st_size > 0 for p in pngs)


def test_the_gpu_params_put_back_the_gpu_settings():
    gpu = _script("rehearse_gpu").gpu_params(yaml.safe_load(SMOKE.read_text()))
    assert list(gpu["stages"]) == list(yaml.safe_load(SMOKE.read_text())["stages"])
    for stage in ("03_train_sft", "04_train_simpo", "04_train_simpo@only"):
        config = gpu["stages"][stage]["sft" if stage.startswith("03") else "simpo"]
        assert not set(config) & {"dtype", "mixed_precision"} and gpu["stages"][stage]["preset"] == "paper_llava7b"
    assert gpu["stages"]["05_evaluate"]["dtype"] == "bfloat16" and gpu["stages"]["05_evaluate"]["device_map"] == "auto"
    from csp_utils.train import settings

    sft = settings.make_configs("paper_llava7b").sft
    assert sft.dtype == "bfloat16" and sft.mixed_precision == "bf16"
