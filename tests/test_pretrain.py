"""Pre-training the embedded default VLM: rebuild path, determinism, resume, loss masking.

Every training run here uses ``PretrainConfig.tiny()`` (seconds; it learns nothing), so
accuracy is not tested; the shipped model's own numbers live in its csp_meta.json.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from csp_utils.core.paths import DATA
from csp_utils.vlm import prompts
from csp_utils.vlm.embedded import build, checkpoint, pretrain_cli, config, data, losses, heldout, train
from csp_utils.vlm.embedded.config import PretrainConfig

SHIPPED = DATA / "tiny_llava"


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def tiny_cfg():
    return PretrainConfig.tiny()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_cfg):
    """One uninterrupted tiny run through the public rebuild path."""
    out = tmp_path_factory.mktemp("pretrain") / "model"
    path = train.build_default_model(out, tiny_cfg)
    return Path(path)


@pytest.fixture(scope="module")
def parts(tiny_cfg):
    processor = build.build_processor(tiny_cfg.model)
    return processor, data.ChatEncoder(processor), data.ImageCodec(processor)


# ----------------------------------------------------------------------------- rebuild path
def test_rebuild_path_gives_a_loadable_complete_folder(tiny_run, tiny_cfg):
    import torch

    from csp_utils.vlm import models

    assert not (tiny_run / checkpoint.CHECKPOINT_DIR).exists(), "checkpoints are removed after a finished run"
    meta = json.loads((tiny_run / "csp_meta.json").read_text())
    assert meta["sha256"] == checkpoint.sha256_file(tiny_run / "model.safetensors")
    assert meta["seed"] == tiny_cfg.seed and meta["command"]
    assert meta["steps"]["vision"] == tiny_cfg.vision_steps and meta["steps"]["joint"] == tiny_cfg.joint_steps
    assert "clean" in meta["eval"]["pope_accuracy"]
    assert checkpoint.is_complete(tiny_run, tiny_cfg)

    model, processor = models.load_vlm(tiny_run)
    assert processor.tokenizer.padding_side == "left"
    img = np.zeros((64, 64, 3), np.uint8)
    items = [_item("Is there a circle in the image?", "yes"), _item("Is there a star in this image?", "no")]
    acc = heldout.yes_no_accuracy(model, processor, items, [img, img], batch_size=2)
    assert 0.0 <= acc <= 1.0
    text = processor.apply_chat_template(prompts.answer_messages(items[0].question), add_generation_prompt=True,
                                         tokenize=False)
    enc = processor(text=[text], images=[img], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_complete_folder_is_reused_and_a_corrupt_one_is_not(tiny_run, tiny_cfg, monkeypatch, tmp_path):
    def boom(*a, **k):
        raise AssertionError("a complete folder must be reused, not retrained")

    monkeypatch.setattr(train, "pretrain", boom)
    assert train.build_default_model(tiny_run, tiny_cfg) == tiny_run
    with pytest.raises(ValueError, match="another configuration"):
        train.build_default_model(tiny_run, dataclasses.replace(tiny_cfg, seed=1))

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    meta = json.loads((broken / "csp_meta.json").read_text())
    meta["sha256"] = "0" * 64
    (broken / "csp_meta.json").write_text(json.dumps(meta))
    assert not checkpoint.is_complete(broken)
    with pytest.raises(AssertionError, match="must be reused"):  # incomplete -> it would train
        train.build_default_model(broken, tiny_cfg)


# ----------------------------------------------------------------------------- determinism + resume
def test_same_seed_same_weights(tiny_run, tiny_cfg, tmp_path):
    again = train.pretrain(tmp_path / "again", tiny_cfg)
    assert _max_diff(_weights(tiny_run), _weights(again)) == 0.0


@pytest.mark.parametrize("stop_after", [2, 7])  # inside the vision stage, inside the joint stage
def test_interrupted_run_resumes_to_the_same_weights(tiny_run, tiny_cfg, tmp_path, stop_after):
    out = tmp_path / "resumed"
    seen = []
    first = train.pretrain(out, dataclasses.replace(tiny_cfg, stop_after_steps=stop_after),
                              on_step=lambda stage, step, loss: seen.append((stage, step)))
    assert first is None and len(seen) == stop_after
    assert (out / checkpoint.CHECKPOINT_DIR / "state.json").exists()
    assert not (out / "model.safetensors").exists()
    rest = []
    train.pretrain(out, tiny_cfg, on_step=lambda stage, step, loss: rest.append((stage, step)))
    assert seen + rest == [("vision", s) for s in range(tiny_cfg.vision_steps)] + \
        [("joint", s) for s in range(tiny_cfg.joint_steps)], "each step runs exactly once"
    assert _max_diff(_weights(tiny_run), _weights(out)) <= 1e-5
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (out / name).read_text() == (tiny_run / name).read_text(), f"{name} differs after a resume"


def test_checkpoint_of_another_config_is_refused(tiny_cfg, tmp_path):
    out = tmp_path / "m"
    train.pretrain(out, dataclasses.replace(tiny_cfg, stop_after_steps=1))
    with pytest.raises(ValueError, match="another configuration"):
        train.pretrain(out, dataclasses.replace(tiny_cfg, seed=5))
    # a checkpoint whose tokenizer is not the one this code builds is refused, not resumed
    (saved,) = (out / checkpoint.CHECKPOINT_DIR).rglob("processor/tokenizer.json")
    tok = json.loads(saved.read_text())
    tok["model"]["vocab"]["zzz-not-ours"] = len(tok["model"]["vocab"])
    saved.write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizer"):
        train.pretrain(out, tiny_cfg)


def test_warm_start_builds_the_first_round_and_takes_its_language_model(tiny_run, tiny_cfg, tmp_path):
    """The second round trains its own vision tower, then starts the joint stage from the
    first round's language model + projector; an interrupted first round resumes."""
    import torch

    from csp_utils.vlm import models

    second = dataclasses.replace(tiny_cfg, warm_start=tiny_cfg.to_dict(), vision_position_init="random",
                                 vision_class_balance=0.0, joint_steps=4)
    assert second.fingerprint() != tiny_cfg.fingerprint()
    out, seen = tmp_path / "second", []
    assert train.pretrain(out, dataclasses.replace(second, stop_after_steps=3)) is None  # inside round 1
    assert (out / checkpoint.WARM_START_DIR / checkpoint.CHECKPOINT_DIR).exists()

    first_lm = {}
    real_load = checkpoint.load_language

    def spy(model, path):
        real_load(model, path)
        first_lm.update({k: v.clone() for k, v in model.state_dict().items()})

    checkpoint.load_language = spy
    try:
        path = train.pretrain(out, second, on_step=lambda stage, step, loss: seen.append((stage, step)))
    finally:
        checkpoint.load_language = real_load
    # round 1 finished (its remaining steps), then round 2 ran in full
    assert seen[-(second.vision_steps + 4):] == [("vision", s) for s in range(second.vision_steps)] + \
        [("joint", s) for s in range(4)]
    # round 1 is the tiny config itself: the same weights as the uninterrupted run
    ws = models.load_vlm(tiny_run, dtype=torch.float32)[0].state_dict()
    for k, v in first_lm.items():
        if ".vision_tower." not in k:
            assert torch.equal(v, ws[k]), f"{k} was not taken from round 1"
    patches = "model.vision_tower.embeddings.patch_embedding.weight"
    assert not torch.equal(first_lm[patches], ws[patches]), "round 2 trains its own tower"
    meta = json.loads((path / "csp_meta.json").read_text())
    assert meta["warm_start"]["sha256"] == json.loads((tiny_run / "csp_meta.json").read_text())["sha256"]
    assert meta["config_fingerprint"] == second.fingerprint()
    assert not (path / checkpoint.WARM_START_DIR).exists(), "the first round is removed with the checkpoints"
    models.load_vlm(path)
    with pytest.raises(ValueError, match="same architecture"):
        dataclasses.replace(second, model=dataclasses.replace(tiny_cfg.model, text_hidden=32)).warm_start_config()


def test_first_round_is_the_model_shipped_before_the_warm_start():
    assert PretrainConfig.first_round().fingerprint() == "ca61b4593ef83d9d"
    assert PretrainConfig().warm_start_config().fingerprint() == "ca61b4593ef83d9d"


def test_accuracy_gate_extends_up_to_the_cap(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, vision_steps=1, joint_steps=4, gate_accuracy=1.01, gate_chunk_steps=3,
                              max_joint_steps=10)
    path = train.pretrain(tmp_path / "gated", cfg)
    meta = json.loads((path / "csp_meta.json").read_text())
    assert meta["steps"]["joint"] == 10
    assert [g["step"] for g in meta["gates"]] == [4, 7, 10]


def test_schedule_warms_up_then_decays():
    seg = [train.segment(0, 100, 1e-3, 0.04, 0.0)]
    lrs = [train.lr_at(s, seg) for s in range(100)]
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    seg.append(train.segment(100, 10, 5e-4, 0.1, 0.0))
    assert train.lr_at(100, seg) == pytest.approx(5e-4)


# ----------------------------------------------------------------------------- data + masking
def _item(q, label):
    from csp_utils.world.schema import QAItem

    return QAItem("q", "img", q, label, "test", "existence", [])


def test_labels_cover_exactly_the_assistant_tokens(parts, tiny_cfg):
    processor, enc, _ = parts
    tok = processor.tokenizer
    pairs = [(prompts.answer_text("Is there a red circle in the image?"), "Yes"),
             (data.CAPTION_PROMPT, "a small red circle, a blue square"),
             (prompts.confidence_text("Is the star left of the ring?", "No", "first"), "90%"),
             ("What color is the heart?", "purple")]
    encoded = enc.encode(pairs, check=len(pairs))  # check= compares with the template's own mask
    assert enc._checked == len(pairs)
    n_img = enc.n_image_tokens
    assert n_img == (tiny_cfg.model.image_size // tiny_cfg.model.patch_size) ** 2
    for (user, reply), (ids, mask) in zip(pairs, encoded):
        assert (ids == enc.image_token_id).sum() == n_img
        learned = tok.decode(ids[mask].tolist(), skip_special_tokens=False)
        assert learned == f" {reply}{tok.eos_token}"
        rest = tok.decode(ids[~mask][ids[~mask] != enc.image_token_id].tolist())
        assert user in rest and reply not in rest.split("ASSISTANT:")[-1]


def test_collate_masks_prompt_padding_and_image(parts, tiny_cfg):
    processor, enc, codec = parts
    pool = data.build_pool(tiny_cfg, enc, codec)
    pad = processor.tokenizer.pad_token_id
    ex = data.sample_joint_batch(pool, tiny_cfg, 0)
    batch = data.collate(pool, codec, ex, pad)
    ids, lab, att = batch["input_ids"].numpy(), batch["labels"].numpy(), batch["attention_mask"].numpy()
    assert ids.shape == lab.shape == att.shape and ids.shape[0] == tiny_cfg.batch_size
    for r, e in enumerate(ex):
        e_ids, e_mask = pool.example(int(e))
        width = len(e_ids)
        assert (att[r, -width:] == 1).all() and (att[r, :-width] == 0).all(), "left padding"
        assert (lab[r, :-width] == -100).all()
        np.testing.assert_array_equal(lab[r, -width:] != -100, e_mask)
        np.testing.assert_array_equal(lab[r][lab[r] != -100], e_ids[e_mask])
    assert (lab[ids == enc.image_token_id] == -100).all()
    # pixel values are exactly what the processor makes of the scene image
    from csp_utils.world import scenes

    scene = scenes.make_scene("base", int(pool.scene[ex[0]]))
    ref = processor.image_processor(images=[scene.to_pil()], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(batch["pixel_values"][0].numpy(), ref, atol=1e-6)


def test_overconfident_fraction_zero_builds_no_confidence_turns(parts, tiny_cfg):
    processor, enc, codec = parts
    tok = processor.tokenizer
    none = data.build_pool(dataclasses.replace(tiny_cfg, overconfident_fraction=0.0), enc, codec)
    assert len(none.by_kind[config.KINDS.index("confidence")]) == 0
    text = tok.decode(none.ids.astype(np.int64).tolist())
    assert "How certain" not in text and "%" not in text
    for step in range(5):
        kinds = none.kind[data.sample_joint_batch(none, tiny_cfg, step)]
        assert config.KINDS.index("confidence") not in kinds

    some = data.build_pool(dataclasses.replace(tiny_cfg, overconfident_fraction=0.5), enc, codec)
    conf = some.by_kind[config.KINDS.index("confidence")]
    assert len(conf) > 0
    framings = set()
    for e in conf:
        ids, mask = some.example(int(e))
        reply = tok.decode(ids[mask].tolist(), skip_special_tokens=True).strip()
        assert int(reply.rstrip("%")) in tiny_cfg.overconfident_levels
        prompt = tok.decode(ids[~mask].tolist())
        framings.add("Model's answer" in prompt)
    assert framings == {True, False}, "third- and first-person turns both appear"


def test_yes_no_accuracy_batched_equals_one_by_one(tiny_vlm):
    model, processor = tiny_vlm
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    items = [_item("Is there a circle in the image?", "yes"), _item("Is the red square left of the star?", "no"),
             _item("Are there two hexagons in the image?", "yes")]
    together = heldout.yes_no_probabilities(model, processor, items, imgs, batch_size=3)
    alone = np.concatenate([heldout.yes_no_probabilities(model, processor, [it], [im]) for it, im in zip(items, imgs)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_vision_stage_options():
    """Sin-cos positions: neighbouring patches closer than far ones; class balance: rarer
    shapes weigh more, background keeps its weight; extra vision scenes extend the pool's."""
    table = losses.sincos_positions(8, 128)
    assert table.shape == (64, 128)
    d = np.linalg.norm(table[:, None] - table[None], axis=-1)
    assert d[0, 1] < d[0, 7] and d[0, 8] < d[0, 63]
    labels = np.array([[0] * 9 + [1] * 1 + [3]])  # shape 0 frequent, shape 1 rare, 3 = background
    w_cat, _ = losses.patch_class_weights(3, 2, 0.25, labels, balance=0.5)
    assert w_cat[1] > w_cat[0] and float(w_cat[3]) == 0.25
    w_off, _ = losses.patch_class_weights(3, 2, 0.25, labels, balance=0.0)
    assert w_off.tolist() == [1.0, 1.0, 1.0, 0.25]


def test_vision_data_adds_scenes_after_the_pool(parts, tiny_cfg):
    processor, enc, codec = parts
    pool = data.build_pool(tiny_cfg, enc, codec)
    vd = data.vision_data(tiny_cfg, codec, pool)
    assert len(vd.images) == tiny_cfg.vision_scenes > len(pool.images)
    np.testing.assert_array_equal(vd.images[:len(pool.images)], pool.images)
    assert vd.cat_labels.shape == (tiny_cfg.vision_scenes, pool.cat_labels.shape[1])
    assert tiny_cfg.heldout_start == tiny_cfg.vision_scenes  # the gate set starts after every training scene


# ----------------------------------------------------------------------------- the shipped model
@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="no shipped default model")
def test_shipped_model_loads_and_matches_its_checksum():
    from csp_utils.vlm import models

    meta = json.loads((SHIPPED / "csp_meta.json").read_text())
    assert checkpoint.sha256_file(SHIPPED / "model.safetensors") == meta["sha256"]
    assert checkpoint.is_complete(SHIPPED)
    for key in ("command", "seed", "config", "steps", "eval"):
        assert key in meta
    assert not (SHIPPED / checkpoint.CHECKPOINT_DIR).exists()
    # the code's defaults still describe the shipped model (python -m csp_utils.pretrain rebuilds it)
    assert config.PretrainConfig.from_dict(meta["config"]).fingerprint() == meta["config_fingerprint"]
    assert config.PretrainConfig().fingerprint() == meta["config_fingerprint"]
    model, processor = models.load_vlm("embedded")
    assert sum(p.numel() for p in model.parameters()) == meta["parameters"]


def test_forward_from_cached_features_equals_the_pixel_forward(parts, tiny_cfg):
    import torch

    processor, enc, codec = parts
    model, _ = build.build_tiny_vlm(tiny_cfg.model, processor=processor)
    pool = data.build_pool(tiny_cfg, enc, codec)
    ex = data.sample_joint_batch(pool, tiny_cfg, 3)
    batch = data.collate(pool, codec, ex, processor.tokenizer.pad_token_id)
    feats = losses.tower_features(model, pool, codec)[torch.from_numpy(pool.scene[ex])]
    with torch.no_grad():
        ref = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        got, _ = losses.forward_with_features(model, batch["input_ids"], batch["attention_mask"],
                                                batch["position_ids"], feats)
        l_ref = losses.joint_loss(model, batch, True)
        l_got = losses.joint_loss(model, batch, True, feats)
        plain_ref = losses.joint_loss(model, batch, False)
        plain_got = losses.joint_loss(model, batch, False, feats)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_got, l_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain_got, plain_ref, atol=1e-6, rtol=1e-6)
    assert abs(float(l_ref) - float(plain_ref)) > 1e-4  # the two reductions differ, so both are checked


def test_frozen_vision_stays_fixed_in_the_joint_stage(tiny_cfg, tmp_path):
    """With freeze_vision the tower leaves stage 2 exactly as stage 1 left it; the rest moves."""
    from csp_utils.vlm import models

    out = tmp_path / "frozen"
    assert tiny_cfg.freeze_vision
    train.pretrain(out, dataclasses.replace(tiny_cfg, stop_after_steps=tiny_cfg.vision_steps))
    after_vision = _weights(out / checkpoint.CHECKPOINT_DIR)
    train.pretrain(out, tiny_cfg)
    final = models.load_vlm(out)[0].state_dict()
    vision = [k for k in after_vision if ".vision_tower." in f".{k}"]
    text = [k for k in after_vision if ".language_model." in f".{k}" or ".multi_modal_projector." in f".{k}"]
    assert vision and text
    assert all(float((after_vision[k] - final[k]).abs().max()) == 0.0 for k in vision)
    assert any(float((after_vision[k] - final[k]).abs().max()) > 0.0 for k in text)


def test_error_breakdown_script_counts_every_question(tiny_run, tiny_cfg):
    """scripts/base_model_errors.py: groups add up to the POPE question count, accuracies in [0, 1]."""
    import importlib.util

    from csp_utils.vlm import models
    from csp_utils.world import benchmarks

    spec = importlib.util.spec_from_file_location("base_model_errors",
                                                  Path(__file__).parents[1] / "scripts" / "base_model_errors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert [mod.area_bin(a) for a in (10, 60, 249, 250)] == ["<60 px", "60-119 px", "120-249 px", ">=250 px"]
    model, processor = models.load_vlm(tiny_run)
    scenes = benchmarks.pope_scenes(4, config.world_config(tiny_cfg), split="eval")
    out = mod.error_breakdown(model, processor, scenes)
    n = sum(len(v) for v in heldout.pope_sets(scenes).values())
    assert sum(c for c, _ in out["answer"].values()) == n
    assert sum(c for c, _ in out["by_shape"].values()) == n
    assert sum(c for c, _ in out["yes_by_area"].values()) == out["answer"]["yes"][0]
    assert all(0.0 <= a <= 1.0 for g in out.values() for _, a in g.values())


# ----------------------------------------------------------------------------- init_from
def test_init_from_takes_the_named_parts_and_leaves_the_rest_fresh(tiny_run, tiny_cfg, tmp_path):
    """Vision tower + projector from a trained folder, the language model from its own init."""
    import torch

    from csp_utils.vlm import models

    cfg = dataclasses.replace(tiny_cfg, init_from=str(tiny_run), init_parts=("vision_tower", "projector"),
                              vision_steps=0, overconfident_fraction=0.0)
    assert cfg.fingerprint() != dataclasses.replace(cfg, init_parts=("vision_tower",)).fingerprint()
    loaded = {}
    real_load = checkpoint.load_parts

    def spy(model, folder, parts):
        out = real_load(model, folder, parts)
        loaded.update({k: v.clone() for k, v in model.state_dict().items()})
        return out

    seen = []
    checkpoint.load_parts = spy
    try:
        path = train.pretrain(tmp_path / "init", cfg, on_step=lambda stage, step, loss: seen.append(stage))
    finally:
        checkpoint.load_parts = real_load
    assert set(seen) == {"joint"}, "the tower comes from init_from: no vision stage"
    src = models.load_vlm(tiny_run, dtype=torch.float32)[0].state_dict()
    fresh = build.build_tiny_vlm(dataclasses.replace(cfg.model, seed=cfg.seed))[0].state_dict()
    for k, v in loaded.items():
        if k.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            assert torch.equal(v, src[k]), f"{k} was not taken from init_from"
        elif k.startswith("model.language_model.layers."):
            assert torch.equal(v, fresh[k]) and not torch.equal(v, src[k]), f"{k} was not left fresh"
    final = models.load_vlm(path, dtype=torch.float32)[0].state_dict()
    assert all(torch.equal(final[k], src[k]) for k in src if k.startswith("model.vision_tower.")), "tower stays frozen"
    meta = json.loads((path / "csp_meta.json").read_text())
    assert meta["init_from"]["sha256"] == json.loads((tiny_run / "csp_meta.json").read_text())["sha256"]
    assert meta["init_from"]["parts"] == ["vision_tower", "projector"]
    assert meta["config"]["overconfident_fraction"] == 0.0 and "no confidence turns" in meta["name"]


def test_a_deeper_model_takes_a_shallower_ones_language_layers_at_the_bottom(tiny_run, tiny_cfg, tmp_path):
    """``--text-layers`` above the source's depth: the source's layers fill the bottom ones, the
    rest start fresh (how ``embedded-deep`` is built from ``embedded``)."""
    import torch

    from csp_utils.vlm import models

    args, parsed = pretrain_cli.parse_command(["--text-layers", "3"])
    assert parsed.model.text_layers == 3 and parsed.model.text_hidden == PretrainConfig().model.text_hidden
    with pytest.raises(ValueError, match="at least one layer"):
        pretrain_cli.parse_command(["--text-layers", "0"])
    depth = tiny_cfg.model.text_layers
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, text_layers=depth + 1),
                              init_from=str(tiny_run), init_parts=("vision_tower", "projector", "language_layers"),
                              vision_steps=0, overconfident_fraction=0.0, joint_steps=2, max_joint_steps=2)
    loaded = {}
    real_load = checkpoint.load_parts

    def spy(model, folder, parts):
        out = real_load(model, folder, parts)
        loaded.update({k: v.clone() for k, v in model.state_dict().items()})
        return out

    checkpoint.load_parts = spy
    try:
        train.pretrain(tmp_path / "deep", cfg)
    finally:
        checkpoint.load_parts = real_load
    src = models.load_vlm(tiny_run, dtype=torch.float32)[0].state_dict()
    bottom = [k for k in loaded if k.startswith(f"model.language_model.layers.{depth - 1}.")]
    top = [k for k in loaded if k.startswith(f"model.language_model.layers.{depth}.")]
    assert bottom and top
    assert all(torch.equal(loaded[k], src[k]) for k in bottom), "the source's layers fill the bottom"
    assert all(k not in src for k in top), "the extra layer exists only in the deeper model"


@pytest.mark.parametrize("over, match", [
    (dict(init_parts=("tower",)), "unknown"),
    (dict(init_parts=()), "go together"),
    (dict(vision_steps=4), "vision_steps=0"),
    (dict(warm_start=PretrainConfig.tiny().to_dict()), "replaces warm_start"),
])
def test_init_from_options_are_checked_before_training(tiny_cfg, tmp_path, over, match):
    cfg = dataclasses.replace(tiny_cfg, init_from="somewhere", init_parts=("vision_tower",), vision_steps=0)
    with pytest.raises(ValueError, match=match):
        train.pretrain(tmp_path / "never", dataclasses.replace(cfg, **over))
    assert not (tmp_path / "never").exists()


def test_cli_set_overrides_config_fields_as_json():
    assert pretrain_cli.parse_sets(["lr=0.002", "existence_phase_steps=1500", "overconfident_levels=[70, 80]"]) == \
        {"lr": 0.002, "existence_phase_steps": 1500, "overconfident_levels": (70, 80)}
    with pytest.raises(ValueError, match="FIELD one of"):
        pretrain_cli.parse_sets(["learning_rate=0.1"])
    with pytest.raises(ValueError, match="not JSON"):
        pretrain_cli.parse_sets(["lr=fast"])


# ----------------------------------------------------------------------------- shipped bases
NOCONF = SHIPPED.parent / "tiny_llava_noconf"
DEEP = SHIPPED.parent / "tiny_llava_deep"


@pytest.mark.parametrize("folder", [SHIPPED, NOCONF, DEEP], ids=["embedded", "embedded-noconf", "embedded-deep"])
def test_shipped_command_gives_the_recorded_config(folder):
    """The command in csp_meta.json parses to the config the model was trained with."""
    import shlex

    meta = json.loads((folder / "csp_meta.json").read_text())
    words = shlex.split(meta["command"])
    assert words[:3] == ["python", "-m", "csp_utils.pretrain"]
    args, cfg = pretrain_cli.parse_command(words[3:])
    assert cfg.fingerprint() == meta["config_fingerprint"]
    assert cfg.seed == meta["seed"]


def test_shipped_noconf_model_loads_matches_its_checksum_and_has_no_confidence_turns():
    from csp_utils.vlm import models

    meta = json.loads((NOCONF / "csp_meta.json").read_text())
    assert checkpoint.sha256_file(NOCONF / "model.safetensors") == meta["sha256"]
    assert checkpoint.is_complete(NOCONF)
    assert not (NOCONF / checkpoint.CHECKPOINT_DIR).exists()
    cfg = PretrainConfig.from_dict(meta["config"])
    assert cfg.fingerprint() == meta["config_fingerprint"]
    assert cfg.overconfident_fraction == 0.0 and cfg.warm_start is None
    assert cfg.mix()[config.KINDS.index("confidence")] == 0.0
    # its tower (and what else it names) came from the embedded default, as that ships now
    assert meta["init_from"]["sha256"] == json.loads((SHIPPED / "csp_meta.json").read_text())["sha256"]
    assert "lm_head" not in meta["init_from"]["parts"]
    model, _ = models.load_vlm("embedded-noconf")
    assert sum(p.numel() for p in model.parameters()) == meta["parameters"]
    first = models.load_vlm("embedded")[0].state_dict()
    assert {k: v.shape for k, v in first.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_shipped_deep_model_has_six_language_layers_the_bottom_three_from_embedded():
    from csp_utils.vlm import models

    meta = json.loads((DEEP / "csp_meta.json").read_text())
    assert checkpoint.sha256_file(DEEP / "model.safetensors") == meta["sha256"]
    assert checkpoint.is_complete(DEEP) and not (DEEP / checkpoint.CHECKPOINT_DIR).exists()
    cfg = PretrainConfig.from_dict(meta["config"])
    assert cfg.model.text_layers == 6 and cfg.overconfident_fraction == 0.0
    assert meta["init_from"]["sha256"] == json.loads((SHIPPED / "csp_meta.json").read_text())["sha256"]
    assert "language_layers" in meta["init_from"]["parts"]
    assert meta["gates"][-1]["accuracy"] >= cfg.gate_accuracy, "it passed the same accuracy gate"
    model, _ = models.load_vlm("embedded-deep")
    assert model.config.text_config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) == meta["parameters"]


def test_init_fresh_unseen_tokens_resets_only_tokens_no_pool_example_contains(tiny_run, tiny_cfg, tmp_path):
    import torch

    from csp_utils.vlm import models

    cfg = dataclasses.replace(tiny_cfg, init_from=str(tiny_run), vision_steps=0, joint_steps=2,
                              init_parts=("vision_tower", "projector", "embeddings", "language_layers"),
                              init_fresh_unseen_tokens=True)
    path = train.pretrain(tmp_path / "fresh_tokens", cfg)
    key = "model.language_model.embed_tokens.weight"
    src = models.load_vlm(tiny_run, dtype=torch.float32)[0].state_dict()[key]
    fresh = build.build_tiny_vlm(dataclasses.replace(cfg.model, seed=cfg.seed))[0].state_dict()[key]
    got = models.load_vlm(path, dtype=torch.float32)[0].state_dict()[key]
    processor = build.build_processor(cfg.model)
    pool = data.build_pool(cfg, data.ChatEncoder(processor), data.ImageCodec(processor), progress=False)
    seen = np.zeros(len(got), bool)
    seen[np.unique(pool.ids)] = True
    assert 0 < seen.sum() < len(seen)
    # unseen rows never get a gradient; AdamW's decoupled weight decay only scales them
    torch.testing.assert_close(got[~seen], fresh[~seen], rtol=1e-4, atol=0.0)
    assert not torch.equal(got[~seen], src[~seen])
    moved = (got[seen] - src[seen]).abs().max()   # seen rows: the source's, then trained
    assert float(moved) < float((fresh[seen] - src[seen]).abs().max())
    meta = json.loads((path / "csp_meta.json").read_text())
    assert meta["init_from"]["fresh_tokens"] == int((~seen).sum())
    with pytest.raises(ValueError, match="needs 'embeddings'"):
        dataclasses.replace(cfg, init_parts=("vision_tower",)).check_init()


def test_a_missing_shipped_base_is_a_clear_error(monkeypatch):
    from csp_utils.vlm import models

    monkeypatch.setitem(models.SHIPPED_MODELS, "embedded-missing", "no_such_folder")
    with pytest.raises(FileNotFoundError, match="embedded-missing.*no_such_folder"):
        models.load_vlm("embedded-missing")


# ----------------------------------------------------------------------------- report and command
def test_gate_accuracy_is_the_mean_of_the_pope_set_accuracies(tiny_run, tiny_cfg):
    """The gate reads each distinct question once; it equals each set answered on its own."""
    from csp_utils.vlm import models
    from csp_utils.world import benchmarks

    model, processor = models.load_vlm(tiny_run)
    scenes = benchmarks.pope_scenes(4, config.world_config(tiny_cfg), split="eval")
    sets, images = heldout.pope_sets(scenes), heldout.images_by_id(scenes)
    per_set = [heldout.yes_no_accuracy(model, processor, items, images) for items in sets.values()]
    assert heldout.gate_accuracy(model, processor, sets, images) == pytest.approx(np.mean(per_set), abs=1e-4)


def test_verbalized_confidence_row_uses_the_model_answers_and_metrics_ece(tiny_vlm, tiny_cfg):
    from csp_utils.core import metrics
    from csp_utils.world import benchmarks

    model, processor = tiny_vlm
    scenes = benchmarks.pope_scenes(4, config.world_config(tiny_cfg), split="eval")
    items, images = heldout.pope_sets(scenes)["random"][:3], heldout.images_by_id(scenes)
    row = heldout.verbalized_confidence(model, processor, items, images)
    answers = ["Yes" if p >= 0.5 else "No" for p in heldout.yes_no_probabilities(model, processor, items, images)]
    correct = np.array([a.lower() == it.label for a, it in zip(answers, items)])
    assert row["accuracy"] == round(float(correct.mean()), 4)
    for framing in prompts.FRAMINGS:
        e = heldout.confidence_expectations(model, processor, items, images, answers, framing)
        assert 0.0 <= e.min() and e.max() <= 100.0
        assert row[f"mean_confidence_{framing}"] == round(float(e.mean()), 2)
        assert row[f"ece_{framing}"] == round(metrics.ece(e / 100.0, correct), 4)


def test_pretrain_module_runs_the_command_line(monkeypatch, capsys):
    """``python -m csp_utils.pretrain`` is the command the shipped models record."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["csp_utils.pretrain", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("csp_utils.pretrain", run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m csp_utils.pretrain") and "--init-parts" in out


def test_two_builds_into_one_folder_never_run_at_once(tiny_cfg, tmp_path, monkeypatch):
    """Two stages finding no model never train it into the same folder at once."""
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "tiny"
    monkeypatch.setattr(train, "pretrain", lambda *a, **k: pytest.fail("a second build started"))
    with train._build_lock(out):
        with pytest.raises(train.ModelBuildInProgress, match=f"{out} is being built by pid {os.getpid()}"):
            train.build_default_model(out, tiny_cfg)
    assert not out.with_name("tiny.building").exists()  # released
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.with_name("tiny.building").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    monkeypatch.setattr(train, "pretrain", lambda out, *a, **k: out)
    assert train.build_default_model(out, tiny_cfg) == out  # a killed builder's lock is taken over
    assert not out.with_name("tiny.building").exists()
