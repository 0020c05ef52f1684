"""CSP training: reply-only SFT labels, a SimPO that sees images, regimes, resume, DDP.

Everything runs on a randomly initialised tiny LLaVA saved to a temporary folder and a
handful of rows in the perturbed dataset's schema: 75-120 s on 2 shared CPU cores, most of
it the two papermill notebooks and the two-process run. The one ``slow`` test trains the
embedded default model (skipped when it is not built; about 80 s).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from csp_utils.analysis import plots
from csp_utils.dataset import grounded_rows
from csp_utils.train import callbacks, regimes, settings, shaping, trainers
from csp_utils.vlm import models, prompts
from csp_utils.vlm.embedded import build
from csp_utils.world import scenes

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
LEVELS = (0, 30, 50, 80, 100)
N_SAMPLES = 4


def make_rows(n_samples: int = N_SAMPLES, levels=LEVELS, seed: int = 0) -> list[dict]:
    """Rows with the perturbed dataset's columns; images are random, one per (sample, level)."""
    rng = np.random.RandomState(seed)
    rows = []
    for s in range(n_samples):
        question = f"Is there a red circle number {s}?"
        answer = "Yes" if s % 2 == 0 else "No"
        for c in levels:
            rows.append(dict(
                image=Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)),
                sample_id=f"s{s}-c{c}", question=question, answer=answer, confidence=c, target_text=f"{c}%",
                confidence_prompt=prompts.confidence_text(question, answer), framing="third", t=100 - c,
                noise_gamma=0.07, t_max=100, schedule="geometric", noise="local", mask_area=0.1,
                grounder="oracle", grounding_status="ok", source_id=f"s{s}"))
    return rows


def make_dataset(**kw):
    return datasets.Dataset.from_list(make_rows(**kw)).cast_column("image", datasets.Image())


def small_configs(steps: int = 4, **simpo) -> settings.TrainingConfigs:
    """Few steps, no dropout (determinism), a checkpoint every 2 steps, a log every step."""
    cfg = settings.tiny_default()
    for stage in (cfg.sft, cfg.simpo):
        stage.max_steps = steps
        stage.per_device_train_batch_size = 4
        stage.logging_steps = 1
        stage.save_steps = 2
        stage.warmup = 0
        stage.lora.dropout = 0.0
    for key, value in simpo.items():
        setattr(cfg.simpo, key, value)
    return cfg


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A saved tiny base model and a saved dataset, like a run folder after notebook 02."""
    root = tmp_path_factory.mktemp("training")
    model, processor = build.build_tiny_vlm(build.TinyVLMConfig())
    models.save_vlm(model, processor, root / "base")
    make_dataset().save_to_disk(str(root / "dataset" / "dataset"))
    return root


def load_base(work):
    return models.load_vlm(work / "base", dtype=torch.float32)


def adapter_tensors(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- data


def test_load_dataset_from_run_folder_or_dataset_folder(work):
    a = shaping.load_perturbed_dataset(work / "dataset")
    b = shaping.load_perturbed_dataset(work / "dataset" / "dataset")
    assert len(a) == len(b) == N_SAMPLES * len(LEVELS)
    with pytest.raises(FileNotFoundError, match="no saved datasets.Dataset"):
        shaping.load_perturbed_dataset(work / "nowhere")
    with pytest.raises(ValueError, match="lacks columns"):
        shaping.load_perturbed_dataset(a.remove_columns(["confidence_prompt"]))


def test_simpo_pairs_drop_and_count_c50():
    ds = make_dataset()
    pairs, dropped = shaping.simpo_pairs(ds)
    assert dropped == N_SAMPLES  # one c = 50 row per sample
    assert len(pairs) == len(ds) - N_SAMPLES
    for row in pairs:
        c = int(row["chosen"].rstrip("%"))
        assert row["rejected"] == f"{100 - c}%" and row["chosen"] != row["rejected"]
        assert isinstance(row["image"], Image.Image)
    with pytest.raises(ValueError, match="no preference pairs left"):
        shaping.simpo_pairs(make_dataset(levels=(50,)))


def test_replay_rows_are_clean_question_answer_turns():
    ds = make_dataset()
    rows, n_replay = shaping.sft_rows(ds, replay_fraction=0.5, seed=1)
    assert n_replay == len(ds)  # half of all rows
    replay = [rows[i] for i in range(len(ds), len(rows))]
    clean_images = {ds[i]["image"].tobytes() for i in range(len(ds)) if ds[i]["t"] == 0}
    for row in replay:
        user, assistant = row["messages"]
        assert user["content"].endswith("Answer with Yes or No.")
        assert assistant["content"] in ("Yes", "No")
        assert row["image"].tobytes() in clean_images
    with pytest.raises(ValueError, match="clean rows"):
        shaping.sft_rows(make_dataset(levels=(30, 80)), replay_fraction=0.2)


def test_lora_targets_language_model_and_projector_only(tiny_vlm):
    model, _ = tiny_vlm
    cfg = settings.LoraSettings()
    regex = trainers.lora_target_regex(model, cfg)
    import re

    hit = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(regex, n)]
    assert any("language_model" in n for n in hit) and any("multi_modal_projector" in n for n in hit)
    assert not any("vision_tower" in n or n.endswith("lm_head") for n in hit)
    with pytest.raises(ValueError, match="match no linear layer"):
        trainers.lora_target_regex(model, settings.LoraSettings(target_modules=("q_projj",)))
    with pytest.raises(ValueError, match="do not exist"):
        trainers.lora_target_regex(model, settings.LoraSettings(target_modules=("q_proj", "q_projj")))


def test_measured_targets_are_cell_accuracies(tiny_vlm):
    model, processor = tiny_vlm
    ds = make_dataset()
    measured = shaping.measured_accuracy_targets(model, processor, ds, batch_size=7)
    # Batching with padding must not change any answer.
    one_by_one = grounded_rows.model_answers(model, processor, ds["question"], [r["image"] for r in ds], batch_size=1).own
    assert set(one_by_one) <= {"Yes", "No"}
    assert measured.own_answers == one_by_one
    for i, row in enumerate(ds):
        same = [j for j in range(len(ds)) if ds[j]["confidence"] == row["confidence"]
                and measured.own_answers[j] == measured.own_answers[i]]
        accuracy = np.mean([measured.own_answers[j] == ds[j]["answer"] for j in same])
        assert measured.targets[i] == int(round(100 * accuracy))
    # The measured target's prompt carries the model's own answer: the cell is keyed by it.
    rows, _ = shaping.sft_rows(ds, "measured", measured)
    user, assistant = rows[0]["messages"]
    assert f"Model's answer was {measured.own_answers[0]}." in user["content"]
    assert assistant["content"] == f"{measured.targets[0]}%"


def test_measured_targets_are_measured_once_per_model_and_dataset(tiny_vlm, tmp_path, monkeypatch):
    """SFT then SimPO with the measured target reuse one measurement; other weights or
    another dataset measure again."""
    model, processor = tiny_vlm
    ds = make_dataset()
    calls = []
    real = shaping.measured_accuracy_targets

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(regimes, "measured_accuracy_targets", counting)
    cfg = settings.tiny_default().sft
    cfg.confidence_target = "measured"
    first = regimes._measured_if_asked(cfg, model, processor, ds, None, tmp_path)
    again = regimes._measured_if_asked(settings.SimPOConfigCSP(confidence_target="measured"),
                                        model, processor, ds, None, tmp_path)
    assert len(calls) == 1 and again == first
    assert (tmp_path / "train_logs" / "measured_targets.csv").exists()
    regimes._measured_if_asked(cfg, model, processor, ds.select(range(len(ds) - 1)), None, tmp_path)
    assert len(calls) == 2
    with torch.no_grad():
        p = next(model.parameters())
        p.add_(1.0)
        try:
            regimes._measured_if_asked(cfg, model, processor, ds, None, tmp_path)
        finally:
            p.sub_(1.0)
    assert len(calls) == 3
    cfg.confidence_target = "paper"
    assert regimes._measured_if_asked(cfg, model, processor, ds, None, tmp_path) is None and len(calls) == 3


def test_margin_table_reuses_the_runs_measured_targets(work, tmp_path, monkeypatch):
    """The SimPO notebook's margin table scores the pairs training used: with the run
    folder it takes the cached measurement instead of measuring the base model again."""
    model, processor = load_base(work)
    ds = shaping.load_perturbed_dataset(work / "dataset")
    n = len(ds)  # targets away from 50% so that pairs exist (the random base scores ~50% everywhere)
    fake = shaping.MeasuredTargets(own_answers=["Yes"] * n, correct=[True] * n, targets=[90] * n,
                                    cells={"c=90|Yes": {"accuracy": 0.9, "n": n, "target": 90}})
    calls = []
    monkeypatch.setattr(regimes, "measured_accuracy_targets", lambda *a, **k: calls.append(1) or fake)
    assert regimes.cached_measured_targets(model, processor, ds, tmp_path) == fake and calls == [1]
    calls.clear()
    table = regimes.margin_table(work / "base", work / "dataset", {"base": None}, target="measured",
                                  max_pairs=8, run_dir=tmp_path)
    assert calls == [] and table["pairs"].iloc[0] > 0
    regimes.margin_table(work / "base", work / "dataset", {"base": None}, target="measured", max_pairs=8)
    assert calls == [1], "without a run folder it measures"


def test_rerunning_a_finished_run_keeps_it(work, tmp_path):
    """A notebook rerun over a finished run (the study's --force) keeps the adapter and the
    log as they are: resuming would take one more optimizer step past max_steps."""
    run = tmp_path / "run"
    cfg = small_configs(steps=2)
    first = regimes.train_regime("sft_simpo", work / "base", work / "dataset", run, cfg)
    logs = {n: (run / "train_logs" / f"{n}.csv").read_text() for n in ("sft", "sft_simpo")}
    adapters = {n: (run / "adapters" / n / "adapter_model.safetensors").read_bytes() for n in ("sft", "sft_simpo")}
    again = regimes.train_regime("sft", work / "base", work / "dataset", run, cfg)
    again.update(regimes.train_regime("sft_simpo", work / "base", work / "dataset", run, cfg,
                                       sft_adapter="require"))
    for n in ("sft", "sft_simpo"):
        assert again[n].completed and again[n].global_step == first[n].global_step == 2
        assert (again[n].n_examples, again[n].n_dropped_pairs) == (first[n].n_examples, first[n].n_dropped_pairs)
        assert (run / "train_logs" / f"{n}.csv").read_text() == logs[n]
        assert (run / "adapters" / n / "adapter_model.safetensors").read_bytes() == adapters[n]
        assert sorted(p.name for p in (run / "checkpoints" / n).glob("checkpoint-*")) == ["checkpoint-2"]


def test_notebooks_03_and_04_measure_the_base_model_once(work, tmp_path, monkeypatch):
    """With the measured target, SFT (notebook 03), SimPO (notebook 04, a second call) and
    its margin table all take the one measurement cached in the run folder."""
    ds = shaping.load_perturbed_dataset(work / "dataset")
    n = len(ds)
    fake = shaping.MeasuredTargets(own_answers=["Yes"] * n, correct=[True] * n, targets=[90] * n,
                                    cells={"c=90|Yes": {"accuracy": 0.9, "n": n, "target": 90}})
    calls = []
    monkeypatch.setattr(regimes, "measured_accuracy_targets", lambda *a, **k: calls.append(1) or fake)
    cfg = small_configs(steps=2)
    cfg.sft.confidence_target = cfg.simpo.confidence_target = "measured"
    run = tmp_path / "run"
    regimes.train_regime("sft", work / "base", work / "dataset", run, cfg)
    result = regimes.train_regime("sft_simpo", work / "base", work / "dataset", run, cfg,
                                   sft_adapter="require")["sft_simpo"]
    regimes.margin_table(work / "base", work / "dataset", {"base": None}, target="measured",
                          max_pairs=8, run_dir=run)
    assert calls == [1] and result.completed and result.n_examples > 0
    assert (run / "train_logs" / "measured_targets.json").exists()


def test_assistant_masks_from_lists_gives_the_same_masks(work, monkeypatch):
    """The collation speed-up (transformers' assistant-mask step fed lists, not tensors)
    leaves every mask as it was, on the conversations SFT and SimPO collate."""
    import torch
    from transformers.processing_utils import ProcessorMixin

    _, processor = load_base(work)
    ds = shaping.load_perturbed_dataset(work / "dataset")
    convs = [shaping.with_image([prompts.user_turn(prompts.confidence_text(ds[i]["question"], "Yes"))],
                                  ds[i]["image"].convert("RGB")) + [prompts.assistant_turn(reply)]
             for i, reply in zip(range(4), ["0%", "30%", "100%", "80%"])]
    kwargs = dict(tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
                  processor_kwargs={"padding": True, "padding_side": "right", "add_special_tokens": False})
    assert trainers.assistant_masks_from_lists() and trainers.assistant_masks_from_lists()  # idempotent
    patched = ProcessorMixin._adjust_assistant_masks_indices
    fast = processor.apply_chat_template(convs, **kwargs)["assistant_masks"]
    monkeypatch.setattr(ProcessorMixin, "_adjust_assistant_masks_indices", patched.__wrapped__)
    plain = processor.apply_chat_template(convs, **kwargs)["assistant_masks"]
    assert torch.equal(torch.as_tensor(fast), torch.as_tensor(plain))
    assert 0 < int(torch.as_tensor(fast).sum()) < torch.as_tensor(fast).numel()


# --------------------------------------------------------------------------- SFT labels


def test_sft_labels_mask_everything_but_the_reply(work, tmp_path):
    model, processor = load_base(work)
    cfg = small_configs().sft
    rows, _ = shaping.sft_rows(shaping.load_perturbed_dataset(work / "dataset"))
    trainer = trainers.build_sft_trainer(model, processor, rows, cfg, tmp_path)
    examples = [rows[i] for i in (0, 1, 3, 4)]  # 0%, 30%, 80%, 100%: replies of different lengths
    batch = trainer.data_collator([dict(e) for e in examples])
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    n_image_tokens = (64 // 8) ** 2
    assert batch["pixel_values"].shape[0] == len(examples)
    for i, example in enumerate(examples):
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        kept = labels != -100
        assert tok.decode(ids[kept]) == f" {example['messages'][1]['content']}{tok.eos_token}"
        assert torch.equal(labels[kept], ids[kept])
        # The kept tokens are one contiguous block at the end of the real tokens (the reply).
        positions = kept.nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[-1] + 1))
        assert (ids == image_id).sum() == n_image_tokens  # max_length=None: no image token lost
    # SFT and SimPO tokenize the same conversation identically.
    pair = {"image": examples[0]["image"], "prompt": examples[0]["messages"][0]["content"],
            "chosen": examples[0]["messages"][1]["content"], "rejected": "100%"}
    simpo_batch = trainers.SimPOCollator(processor)([pair])
    real = batch["attention_mask"][0].bool()
    simpo_real = simpo_batch["attention_mask"][0].bool()
    assert torch.equal(simpo_batch["input_ids"][0][simpo_real], batch["input_ids"][0][real])


def test_sft_loss_is_the_same_with_and_without_trls_fused_head(work, tmp_path):
    import dataclasses

    rows, _ = shaping.sft_rows(shaping.load_perturbed_dataset(work / "dataset"))
    losses = []
    for fused in (False, True):
        model, processor = load_base(work)
        cfg = dataclasses.replace(small_configs().sft, trl_fused_loss=fused)
        trainer = trainers.build_sft_trainer(model, processor, rows, cfg, tmp_path / str(fused))
        batch = trainer.data_collator([dict(rows[i]) for i in range(6)])
        with torch.no_grad():
            losses.append(float(trainer.compute_loss(trainer.model, batch)))
    assert abs(losses[0] - losses[1]) < 1e-5, losses


# --------------------------------------------------------------------------- SimPO sees images


def separate_forward_mean_logp(model, processor, image, prompt_text, reply) -> torch.Tensor:
    """Mean log-prob of ``reply`` from one full, unpadded forward of one conversation with its
    image; the reply is located through the generation prompt, not the assistant mask."""
    user = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt_text}]}]
    full = processor.apply_chat_template(user + [prompts.assistant_turn(reply)], tokenize=True, return_dict=True,
                                         return_tensors="pt")
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ids = full["input_ids"][0]
    start = prompt["input_ids"].shape[1]
    end = int((ids == processor.tokenizer.eos_token_id).nonzero().flatten()[-1]) + 1  # through </s>
    logits = model(**full).logits[0].float()
    logp = logits[start - 1:end - 1].log_softmax(-1).gather(1, ids[start:end, None]).squeeze(1)
    return logp.mean()


def test_simpo_loss_equals_separate_forwards_with_images(work, tmp_path):
    from peft import get_peft_model

    model, processor = load_base(work)
    cfg = small_configs().simpo
    model = get_peft_model(model, trainers.lora_config(model, cfg.lora))
    with torch.no_grad():  # non-zero LoRA B so the adapter takes part in the check
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pairs, _ = shaping.simpo_pairs(shaping.load_perturbed_dataset(work / "dataset"))
    trainer = trainers.build_simpo_trainer(model, processor, pairs, cfg, tmp_path)
    examples = [pairs[i] for i in (0, 2, 5, 9)]
    batch = trainer.data_collator(examples)
    n = len(examples)
    assert batch["pixel_values"].shape[0] == 2 * n  # an image for every chosen and every rejected row
    assert torch.equal(batch["pixel_values"][:n], batch["pixel_values"][n:])
    model.eval()
    with torch.no_grad():
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
        chosen = torch.stack([separate_forward_mean_logp(model, processor, e["image"], e["prompt"], e["chosen"])
                              for e in examples])
        rejected = torch.stack([separate_forward_mean_logp(model, processor, e["image"], e["prompt"], e["rejected"])
                                for e in examples])
        expected = trainers.simpo_losses(chosen, rejected, cfg.beta, cfg.simpo_gamma).mean()
        by_hand = -torch.nn.functional.logsigmoid(cfg.beta * (chosen - rejected) - cfg.simpo_gamma).mean()
    torch.testing.assert_close(out["chosen_logps"], chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["rejected_logps"], rejected, atol=1e-5, rtol=0)
    assert abs(float(loss) - float(expected)) < 1e-5 and abs(float(expected) - float(by_hand)) < 1e-6

    # Another image for the first pair moves both halves' scores, and the loss.
    other = Image.fromarray(np.random.RandomState(99).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    changed = [{**examples[0], "image": other}] + examples[1:]
    with torch.no_grad():
        loss2, out2 = trainer.compute_loss(model, trainer.data_collator(changed), return_outputs=True)
    assert abs(float(out2["chosen_logps"][0]) - float(out["chosen_logps"][0])) > 1e-4
    assert abs(float(out2["rejected_logps"][0]) - float(out["rejected_logps"][0])) > 1e-4
    torch.testing.assert_close(out2["chosen_logps"][1:], out["chosen_logps"][1:], atol=1e-5, rtol=0)
    assert abs(float(loss2) - float(loss)) > 1e-6


# --------------------------------------------------------------------------- regimes


def test_three_regimes_write_loadable_adapters_and_simpo_widens_margins(work, tmp_path):
    from peft import PeftModel

    run = tmp_path / "run"
    cfg = small_configs(steps=6, learning_rate=2e-3)
    results = regimes.train_regime("sft", work / "base", work / "dataset", run, cfg)
    results.update(regimes.train_regime("sft_simpo", work / "base", work / "dataset", run, cfg))  # reuses sft
    results.update(regimes.train_regime("simpo", work / "base", work / "dataset", run, cfg))
    assert set(results) == {"sft", "sft_simpo", "simpo_only"}
    base_state = {k: v.clone() for k, v in load_base(work)[0].state_dict().items()}
    for name, result in results.items():
        folder = run / "adapters" / name
        assert result.completed and result.adapter_dir == folder and result.global_step == 6
        record = json.loads((folder / models.CONFIG_FILE).read_text())
        assert record["stage"] == ("sft" if name == "sft" else "simpo") and record["global_step"] == 6
        assert any(float(t.abs().max()) > 0 for k, t in adapter_tensors(folder).items() if "lora_B" in k)
        model, processor = load_base(work)
        peft_model = PeftModel.from_pretrained(model, str(folder))
        assert any("lora_A" in n for n, _ in peft_model.named_parameters())
        rows = callbacks.read_training_log(run / "train_logs" / f"{name}.csv")
        assert [r["step"] for r in rows] == list(range(1, 7))
    assert json.loads((run / "adapters" / "sft_simpo" / models.CONFIG_FILE).read_text())["init_adapter"].endswith("sft")
    assert results["sft_simpo"].n_dropped_pairs == N_SAMPLES
    assert callbacks.read_training_log(run / "train_logs" / "sft_simpo.csv")[0]["margin"] is not None

    # Margins on the training pairs: SimPO from the base and SimPO after SFT both widen them.
    pairs, _ = shaping.simpo_pairs(shaping.load_perturbed_dataset(work / "dataset"))
    base, processor = load_base(work)
    margin = lambda name: regimes.pair_margins(  # noqa: E731
        models.load_vlm(work / "base", adapter=run / "adapters" / name)[0], processor, pairs, batch_size=5).mean()
    before = regimes.pair_margins(base, processor, pairs).mean()
    simpo_only, after_sft, after_both = margin("simpo_only"), margin("sft"), margin("sft_simpo")
    assert simpo_only > before + 0.05, (float(before), float(simpo_only))
    assert after_both > after_sft + 0.05, (float(after_sft), float(after_both))
    # The base model itself was never touched (each stage loads a fresh copy).
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in base_state.items())

    # Merging gives an ordinary model folder that computes what base + adapter computes.
    merged_dir = regimes.merge_adapter(work / "base", run / "adapters" / "sft", tmp_path / "merged")
    merged, _ = models.load_vlm(merged_dir)
    with_adapter, _ = models.load_vlm(work / "base", adapter=run / "adapters" / "sft")
    batch = trainers.SimPOCollator(processor)([pairs[0]])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, with_adapter(**inputs).logits, atol=1e-4, rtol=0)

    fig = plots.training_curves([run / "train_logs" / "sft.csv", run / "train_logs" / "sft_simpo.csv"])
    assert len([ax for ax in fig.axes if ax.lines]) == 4


def test_regime_arguments_are_checked(work, tmp_path):
    with pytest.raises(ValueError, match="regime must be one of"):
        regimes.train_regime("dpo", work / "base", work / "dataset", tmp_path)
    with pytest.raises(FileNotFoundError, match="holds none"):  # notebook 04 without notebook 03
        regimes.train_regime("sft_simpo", work / "base", work / "dataset", tmp_path, sft_adapter="require")
    configs = settings.make_configs("tiny_default", sft={"learning_rate": 0.1, "lora": {"r": 4}, "max_steps": None})
    assert configs.sft.learning_rate == 0.1 and configs.sft.lora.r == 4 and configs.sft.lora.alpha == 32
    assert configs.sft.max_steps == settings.tiny_default().sft.max_steps
    with pytest.raises(ValueError, match="unknown SimPOConfigCSP field 'gamma'"):
        settings.make_configs(simpo={"gamma": 1.0})


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stage", ["sft", "simpo"])
def test_resume_ends_where_an_uninterrupted_run_ends(work, tmp_path, stage):
    cfg = small_configs(steps=5)
    train = regimes.train_sft if stage == "sft" else regimes.train_simpo
    stage_cfg = cfg.sft if stage == "sft" else cfg.simpo
    straight = train(work / "base", work / "dataset", tmp_path / "a", stage_cfg)
    # "Kill" after step 3: the last checkpoint is step 2, so step 3 is redone on resume.
    killed = train(work / "base", work / "dataset", tmp_path / "b", stage_cfg,
                   callbacks=[callbacks.stop_after_steps_callback(3)])
    assert not killed.completed and killed.adapter_dir is None and killed.global_step == 3
    assert (killed.checkpoint_dir / "checkpoint-2").is_dir() and not (killed.checkpoint_dir / "checkpoint-3").exists()
    resumed = train(work / "base", work / "dataset", tmp_path / "b", stage_cfg)
    assert resumed.completed and resumed.global_step == 5
    a, b = adapter_tensors(straight.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst
    assert [r["step"] for r in callbacks.read_training_log(resumed.log_csv)] == [1, 2, 3, 4, 5]
    # Checkpoints of another configuration are refused rather than silently mixed.
    other = dataclass_replace(stage_cfg, learning_rate=stage_cfg.learning_rate * 2)
    with pytest.raises(ValueError, match="different configuration"):
        train(work / "base", work / "dataset", tmp_path / "b", other)


def _fake_checkpoint(folder: Path, step: int) -> Path:
    """The files the Trainer writes into checkpoint-N, weights first, trainer state last."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(folder / "adapter_model.safetensors"))
    torch.save({"state": {}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 5}))
    return folder


def test_resume_uses_the_last_complete_checkpoint_and_sets_the_others_aside(tmp_path, capsys):
    """A kill while the Trainer saves leaves checkpoint-N empty or cut short; transformers
    resumes from the highest-numbered folder and fails there for good."""
    ckpt = tmp_path / "checkpoints" / "sft@s0"
    _fake_checkpoint(ckpt / "checkpoint-2", 2)
    (ckpt / "csp_run_key.json").write_text(json.dumps({"key": "k"}))
    (ckpt / "checkpoint-4").mkdir()  # died before writing anything
    cut = _fake_checkpoint(ckpt / "checkpoint-3", 3)
    data = (cut / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    no_state = _fake_checkpoint(ckpt / "checkpoint-5", 5)
    (no_state / "trainer_state.json").unlink()  # killed after the weights, before the state
    cut_optimizer = _fake_checkpoint(ckpt / "checkpoint-6", 6)
    blob = (cut_optimizer / "optimizer.pt").read_bytes()
    (cut_optimizer / "optimizer.pt").write_bytes(blob[:-30])
    assert regimes._prepare_checkpoints(ckpt, "k", resume=True) == str(ckpt / "checkpoint-2")
    out = capsys.readouterr().out
    for name, why in (("checkpoint-3", "adapter_model.safetensors is damaged"), ("checkpoint-4", "no trainer_state"),
                      ("checkpoint-5", "no trainer_state"), ("checkpoint-6", "optimizer.pt is cut short")):
        assert f"{ckpt / name} is incomplete ({why}" in out, (name, out)
        assert (ckpt / "incomplete" / name).is_dir() and not (ckpt / name).exists()
    # set aside again on a later kill: the older copy is replaced
    (ckpt / "checkpoint-4").mkdir()
    assert regimes._prepare_checkpoints(ckpt, "k", resume=True) == str(ckpt / "checkpoint-2")
    assert sorted(p.name for p in (ckpt / "incomplete").iterdir()) == [f"checkpoint-{i}" for i in (3, 4, 5, 6)]
    # nothing complete: start over, as with no checkpoint at all
    shutil.rmtree(ckpt / "checkpoint-2")
    (ckpt / "checkpoint-7").mkdir()
    assert regimes._prepare_checkpoints(ckpt, "k", resume=True) is None


def test_a_run_killed_while_saving_resumes_to_the_uninterrupted_result(work, tmp_path):
    stage_cfg = small_configs(steps=4).sft
    straight = regimes.train_sft(work / "base", work / "dataset", tmp_path / "a", stage_cfg)
    killed = regimes.train_sft(work / "base", work / "dataset", tmp_path / "b", stage_cfg,
                                callbacks=[callbacks.stop_after_steps_callback(3)])
    (killed.checkpoint_dir / "checkpoint-4").mkdir()  # what a kill during the save of step 4 leaves
    resumed = regimes.train_sft(work / "base", work / "dataset", tmp_path / "b", stage_cfg)
    assert resumed.completed and resumed.global_step == 4
    a, b = adapter_tensors(straight.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def dataclass_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


# --------------------------------------------------------------------------- several processes


def test_two_processes_write_a_loadable_adapter(work, tmp_path):
    from peft import PeftModel

    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # `--cpu` makes accelerate start one process; `--multi_gpu` on a GPU-less machine starts
    # torchrun workers, which training.py joins over gloo (see docs/multi_gpu.md).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "scripts" / "train_accelerate.py"), "--regime", "sft_simpo", "--base-model", str(work / "base"),
           "--dataset", str(work / "dataset"), "--run-dir", str(run), "--max-steps", "2", "--batch-size", "2",
           "--logging-steps", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("sft", "sft_simpo"):
        record = json.loads((run / "adapters" / name / models.CONFIG_FILE).read_text())
        assert record["world_size"] == 2 and record["global_step"] == 2
        model, _ = models.load_vlm(work / "base", adapter=run / "adapters" / name)
        assert isinstance(model, PeftModel)
        assert [r["step"] for r in callbacks.read_training_log(run / "train_logs" / f"{name}.csv")] == [1, 2]




# --------------------------------------------------------------------------- the embedded model (slow)


@pytest.mark.slow
def test_sft_on_the_embedded_model_tracks_the_level_on_heldout_images(tmp_path):
    """After SFT on a world perturbed dataset, the embedded model's
    verbalized confidence on *held-out* perturbed images rises with the level (Spearman)."""
    from scipy.stats import spearmanr

    from csp_utils.vlm import engine

    from csp_utils.vlm import scoring
    from csp_utils.dataset import grounders, buildconfig, paper_rows, sources
    from csp_utils.world import scenes

    if not (models.default_model_dir() / "model.safetensors").exists():
        pytest.skip("the embedded default model is not built (python -m csp_utils.pretrain)")

    def build(split, n, folder):
        world = scenes.make_scenes(split, n)
        return paper_rows.build_perturbed_dataset(
            sources.world_source(world, questions_per_scene=2),
            grounders.AnnotationGrounder.from_scenes(world), folder,
            buildconfig.BuildConfig(shard_size=10_000), progress=False)

    build("csp", 200, tmp_path / "run" / "dataset")
    heldout = build("eval", 40, tmp_path / "heldout")
    configs = settings.make_configs(sft={"max_steps": 300, "logging_steps": 50, "save_steps": 10 ** 6})
    regimes.train_regime("sft", "embedded", tmp_path / "run" / "dataset", tmp_path / "run", configs)

    model, processor = models.load_vlm("embedded", adapter=tmp_path / "run" / "adapters" / "sft")
    options = list(range(0, 101, 10))
    option_ids = engine.option_token_ids(processor, options)
    expected = []
    for start in range(0, len(heldout), 32):
        rows = heldout.select(range(start, min(start + 32, len(heldout))))
        messages = [prompts.confidence_messages(q, a) for q, a in zip(rows["question"], rows["answer"])]
        with torch.no_grad():
            ll = scoring.score_options(model, processor, messages, [im.convert("RGB") for im in rows["image"]],
                                          option_ids)
        expected += list(scoring.option_distribution(np.asarray(ll), options)[1])
    levels = np.asarray(heldout["confidence"])
    expected = np.asarray(expected)
    rho = spearmanr(expected, levels).correlation
    print(f"held-out Spearman(verbalized confidence, level) = {rho:.3f}")
    assert rho > 0.4
    assert expected[levels == 100].mean() > expected[levels == 0].mean() + 0.1


def test_saved_adapters_record_their_base_and_refuse_another(work, tmp_path):
    run = tmp_path / "run"
    result = regimes.train_sft(work / "base", work / "dataset", run, small_configs(steps=1).sft)
    record = json.loads((result.adapter_dir / models.BASE_RECORD).read_text())
    assert record["base_model"] == str(work / "base")
    assert record["fingerprint"] == models.base_fingerprint(load_base(work)[0])
    model, processor = build.build_tiny_vlm(build.TinyVLMConfig(seed=1))  # same shapes, other weights
    other = models.save_vlm(model, processor, tmp_path / "other")
    with pytest.raises(models.AdapterBaseMismatchError, match="trained on base model"):
        models.load_vlm(other, adapter=result.adapter_dir)
    with pytest.raises(models.AdapterBaseMismatchError):  # SimPO after SFT starts from the SFT adapter
        regimes.train_simpo(other, work / "dataset", run, small_configs(steps=1).simpo,
                             init_adapter=result.adapter_dir, name="sft_simpo_other")


# --------------------------------------------------------------------------- grounded rows, option losses


def make_grounded_rows(n: int = 6, seed: int = 3) -> list[dict]:
    """Rows with the grounded dataset's columns: quoted answers (some flipped), targets of
    every kind, questions of different lengths (left padding is exercised)."""
    rng = np.random.RandomState(seed)
    questions = ["Is there a circle?", "Is the large red square left of the small blue star in the image?",
                 "Is there a star in this image?"]
    rows = []
    for i in range(n):
        own = "Yes" if i % 2 == 0 else "No"
        flipped = i % 3 == 2
        answer = ("No" if own == "Yes" else "Yes") if flipped else own
        label = "yes" if i % 4 < 2 else "no"
        p = float(rng.uniform(0.05, 0.95))
        rows.append(dict(
            image=Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)), sample_id=f"g{i}",
            source_id=f"src{i // 2}", image_id=f"scene{i // 2}", question=questions[i % 3], label=label,
            kind="existence", level=100 if i % 2 else 40, noise_on="none" if i % 2 else "distractor",
            answer=answer, own_answer=own, flipped=flipped, correct=int(answer.lower() == label),
            internal_p=p, cell_acc=int(rng.randint(0, 101))))
    return rows


def make_grounded_dataset(**kw):
    return datasets.Dataset.from_list(make_grounded_rows(**kw)).cast_column("image", datasets.Image())


def test_grounded_targets_follow_the_schema():
    ds = make_grounded_dataset()
    assert shaping.grounded_targets(ds, "correct") == [100 * c for c in ds["correct"]]
    assert shaping.grounded_targets(ds, "cell") == list(ds["cell_acc"])
    assert shaping.grounded_targets(ds, "internal") == [round(100 * p) for p in ds["internal_p"]]
    cols = shaping.option_examples(ds, "internal")
    assert cols["response"] == list(ds["answer"]) and cols["framing"] == ["third"] * len(ds)
    with pytest.raises(ValueError, match="lacks columns.*internal_p"):
        shaping.load_perturbed_dataset(ds.remove_columns(["internal_p"]), "internal")
    with pytest.raises(ValueError, match="outside 0..100"):
        shaping.grounded_targets(datasets.Dataset.from_list([{**make_grounded_rows(1)[0], "cell_acc": 120}]), "cell")
    with pytest.raises(ValueError, match="loss must be one of"):
        settings.SFTConfigCSP(loss="mse")
    with pytest.raises(ValueError, match="layout must be one of"):
        settings.SFTConfigCSP(layout="two_turn")


def test_two_point_targets_put_the_mass_around_the_target_with_its_mean():
    o = torch.tensor([x / 100 for x in prompts.CONFIDENCE_LEVELS])
    y = torch.tensor([0.73, 0.0, 1.0, 0.5, 0.05])
    q = trainers.two_point_targets(y, o)
    torch.testing.assert_close(q.sum(1), torch.ones(5))
    torch.testing.assert_close(q @ o, y)
    assert q[0, 7] == pytest.approx(0.7) and q[0, 8] == pytest.approx(0.3)
    assert q[1, 0] == 1 and q[2, 10] == 1 and q[3, 5] == pytest.approx(1.0)
    assert int((q > 0).sum()) == 2 + 1 + 1 + 1 + 2


def test_binomial_targets_are_the_binomial_over_the_options_with_the_target_mean():
    from math import comb

    o = torch.tensor([x / 100 for x in prompts.CONFIDENCE_LEVELS], dtype=torch.float64)
    y = torch.tensor([0.73, 0.0, 1.0, 0.5], dtype=torch.float64)
    q = trainers.binomial_targets(y, o)
    torch.testing.assert_close(q.sum(1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(q @ o, y, atol=1e-5, rtol=0)
    assert float(q[0, 7]) == pytest.approx(comb(10, 7) * 0.73 ** 7 * 0.27 ** 3)
    assert float(q[1, 0]) == pytest.approx(1.0, abs=1e-4) and float(q[2, 10]) == pytest.approx(1.0, abs=1e-4)
    ll = torch.log_softmax(torch.randn(4, 11, dtype=torch.float64), -1)
    torch.testing.assert_close(trainers.option_losses(ll, y, prompts.CONFIDENCE_LEVELS, "binomial_ce"),
                               -(q * ll).sum(-1))
    with pytest.raises(ValueError, match="evenly spaced"):
        trainers.binomial_targets(y, o ** 2)


def test_grounded_simpo_pairs_choose_the_nearest_and_reject_the_farthest_option():
    assert shaping.nearest_and_farthest_option(73) == (70, 0)
    assert shaping.nearest_and_farthest_option(12) == (10, 100)
    assert shaping.nearest_and_farthest_option(50) == (50, 0)
    assert shaping.nearest_and_farthest_option(100) == (100, 0)
    ds = make_grounded_dataset()
    pairs, dropped = shaping.simpo_pairs(ds, "internal", layout="follow_up")
    assert dropped == 0 and len(pairs) == len(ds)
    for row, p in zip(pairs, ds["internal_p"]):
        near, far = shaping.nearest_and_farthest_option(round(100 * p))
        assert (row["chosen"], row["rejected"]) == (f"{near}%", f"{far}%")


def test_follow_up_pairs_label_only_the_confidence_reply(work):
    _, processor = load_base(work)
    pairs, _ = shaping.simpo_pairs(make_grounded_dataset(), "correct", layout="follow_up")
    batch = trainers.SimPOCollator(processor, "follow_up")([pairs[0], pairs[1]])
    tok = processor.tokenizer
    for i, ex in enumerate([pairs[0], pairs[1]] * 2):
        kept = batch["labels"][i] != -100
        reply = ex["chosen"] if i < 2 else ex["rejected"]
        # the quoted answer is an assistant turn too, but context only
        assert tok.decode(batch["input_ids"][i][kept]) == f" {reply}{tok.eos_token}"
        assert f" {ex['response']}{tok.eos_token}" in tok.decode(batch["input_ids"][i][~kept])


def hand_option_losses(model, processor, examples, layout):
    """Per example: the 11 option log-likelihoods from plain per-option forwards (one
    conversation, one option, no padding, no tree), softmax, expected Brier; and minus the
    log-likelihood of the option nearest the target."""
    from csp_utils.vlm import engine, scoring

    option_ids = engine.option_token_ids(processor, prompts.CONFIDENCE_LEVELS, layout=layout)
    o = np.array(prompts.CONFIDENCE_LEVELS) / 100
    brier, ce, soft = [], [], []
    for ex in examples:
        msgs = prompts.confidence_messages(ex["question"], ex["response"], framing=ex["framing"], layout=layout)
        ll = scoring.score_options_reference(model, processor, [msgs], [ex["image"].convert("RGB")], option_ids)[0]
        p = np.exp(ll - ll.max())
        p /= p.sum()
        y = ex["target"] / 100
        brier.append(float((p * (o - y) ** 2).sum()))
        ce.append(float(-ll[prompts.CONFIDENCE_LEVELS.index(shaping.nearest_and_farthest_option(ex["target"])[0])]))
        lo = ex["target"] // 10  # the two options around the target, weighted so that their mean is it
        w = (ex["target"] - 10 * lo) / 10
        logp = ll - ll.max() - np.log(np.exp(ll - ll.max()).sum())
        soft.append(float(-(1 - w) * logp[lo] - (w * logp[lo + 1] if w else 0.0)))
    return np.array(brier), np.array(ce), np.array(soft)


@pytest.mark.parametrize("layout", ["single_turn", "follow_up", "question_first", "inline"])
def test_brier_option_loss_equals_a_hand_computation_and_sees_the_image(work, tmp_path, layout):
    from peft import get_peft_model

    model, processor = load_base(work)
    cfg = dataclass_replace(small_configs().sft, loss="brier", confidence_target="internal", layout=layout)
    model = get_peft_model(model, trainers.lora_config(model, cfg.lora))
    with torch.no_grad():  # non-zero LoRA B so the adapter takes part in the check
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    rows = trainers.option_rows(make_grounded_dataset(), "internal")
    trainer = trainers.build_option_trainer(model, processor, rows, cfg, tmp_path)
    examples = [rows[i] for i in (0, 1, 2, 5)]
    batch = trainer.data_collator(examples)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1, "the test needs prompts of mixed lengths"
    model.eval()
    with torch.no_grad():
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
        brier, ce, soft_ce = hand_option_losses(model, processor, examples, layout)
    assert abs(float(loss) - brier.mean()) < 1e-5, (float(loss), brier)
    ce_loss = trainers.option_losses(out["option_logliks"], batch["targets"], prompts.CONFIDENCE_LEVELS, "ce")
    np.testing.assert_allclose(ce_loss.numpy(), ce, atol=1e-4, rtol=0)
    soft = trainers.option_losses(out["option_logliks"], batch["targets"], prompts.CONFIDENCE_LEVELS, "soft_ce")
    np.testing.assert_allclose(soft.numpy(), soft_ce, atol=1e-4, rtol=0)

    other = Image.fromarray(np.random.RandomState(99).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        loss2 = trainer.compute_loss(model, trainer.data_collator([{**examples[0], "image": other}] + examples[1:]))
    assert abs(float(loss2) - float(loss)) > 1e-6


def test_option_loss_has_gradients_and_training_writes_an_adapter(work, tmp_path):
    ds = make_grounded_dataset(n=8)
    cfg = dataclass_replace(small_configs(steps=3).sft, loss="brier", confidence_target="internal",
                            layout="follow_up", learning_rate=5e-3)
    result = regimes.train_sft(work / "base", ds, tmp_path, cfg)
    assert result.completed and result.global_step == 3
    record = json.loads((result.adapter_dir / models.CONFIG_FILE).read_text())
    assert record["layout"] == "follow_up" and record["loss"] == "brier" and record["confidence_target"] == "internal"
    tensors = adapter_tensors(result.adapter_dir)
    assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in tensors.items())  # B moved from zero
    logged = callbacks.read_training_log(result.log_csv)
    assert logged and all(r["loss"] is not None and 0 <= r["loss"] <= 1 for r in logged)  # a Brier score


def test_sft_then_simpo_on_grounded_rows_in_the_follow_up_layout(work, tmp_path):
    cfg = small_configs(steps=2)
    for stage in (cfg.sft, cfg.simpo):
        stage.confidence_target, stage.layout = "cell", "follow_up"
    cfg.sft.loss = "brier"
    results = regimes.train_regime("sft_simpo", str(work / "base"), make_grounded_dataset(n=8), tmp_path, cfg)
    assert all(r.completed for r in results.values()) and set(results) == {"sft", "sft_simpo"}
    record = json.loads((results["sft_simpo"].adapter_dir / models.CONFIG_FILE).read_text())
    assert record["layout"] == "follow_up" and record["confidence_target"] == "cell"
    assert record["n_examples"] == 8 and record["n_dropped_pairs"] == 0
    logged = callbacks.read_training_log(results["sft_simpo"].log_csv)
    assert logged[-1]["margin"] is not None


def test_an_inline_adapter_trains_and_evaluates_end_to_end_answering_as_the_base_model(work, tmp_path):
    """A confidence-only adapter in the inline layout: a few option-loss steps, then the
    study's evaluation on a tiny world suite (layout and scope from its record)."""
    from csp_utils.evaluate import evaluation as ev, suites

    cfg = dataclass_replace(small_configs(steps=3).sft, loss="soft_ce", confidence_target="correct", layout="inline",
                            learning_rate=5e-2)
    result = regimes.train_sft(work / "base", make_grounded_dataset(n=8), tmp_path, cfg)
    assert result.completed and result.global_step == 3
    config = ev.config_for_adapter(ev.EvalConfig(readouts=("single_pass", "generated"), batch_size=8, progress=False,
                                                 confidence_max_new_tokens=4), result.adapter_dir)
    assert (config.layout, config.adapter_scope) == ("inline", "confidence")
    bench = suites.build_suite(suites.SuiteConfig(n_pope_images=2, seed=0), sets=["pope-random"])["pope-random"]
    adapted, proc = models.load_vlm(work / "base", adapter=result.adapter_dir, dtype=torch.float32)
    base, _ = load_base(work)
    got = ev.load_results(ev.evaluate(adapted, proc, bench, tmp_path / "inline.jsonl", "inline", config))
    ref = ev.load_results(ev.evaluate(base, proc, bench, tmp_path / "base.jsonl", "base",
                                      dataclasses.replace(config, adapter_scope="all")))
    assert len(got) == 2 * len(bench.items)
    singles = [r for r in got if r["readout"] == "single_pass"]
    assert all(r["confidence"] is not None and len(r["option_probs"]) == 11 for r in singles)
    assert [r["raw_answer"] for r in got] == [r["raw_answer"] for r in ref]  # the base model's answers
    ref_singles = [r for r in ref if r["readout"] == "single_pass"]
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(singles, ref_singles)) > 1e-3  # the adapter's


def test_an_activated_adapter_keeps_the_base_models_states_before_the_confidence_question(work, tmp_path):
    """``activation="confidence"`` (PEFT's aLoRA): the image, the question and the answer are
    computed by the base model at every layer; only the follow-up question and what follows
    see the adapter."""
    from csp_utils.vlm import engine

    with pytest.raises(ValueError, match="layout='follow_up'"):
        settings.SFTConfigCSP(lora=settings.LoraSettings(activation="confidence"), layout="inline")
    with pytest.raises(ValueError, match="lora.activation"):
        settings.SFTConfigCSP(lora=settings.LoraSettings(activation="late"))
    cfg = dataclass_replace(small_configs(steps=3).sft, loss="soft_ce", confidence_target="correct",
                            layout="follow_up", learning_rate=5e-2,
                            lora=settings.LoraSettings(activation="confidence"))
    result = regimes.train_sft(work / "base", make_grounded_dataset(n=8), tmp_path, cfg)
    assert result.completed
    base, proc = load_base(work)
    invocation = engine.invocation_tokens(proc)
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["alora_invocation_tokens"] == invocation
    assert not any("multi_modal_projector" in k for k in adapter_tensors(result.adapter_dir)), "language model only"
    adapted, _ = models.load_vlm(work / "base", adapter=result.adapter_dir, dtype=torch.float32)
    image = scenes.make_scene("csp", 0).image
    messages = [prompts.confidence_messages("Is there a red star?", a, layout="follow_up") for a in ("Yes", "No")]
    enc = engine.encode(proc, messages, [image, image])
    with torch.no_grad():
        got = adapted(**enc, output_hidden_states=True).hidden_states
        ref = base(**enc, output_hidden_states=True).hidden_states
    ids, n = enc["input_ids"][0].tolist(), len(invocation)
    start = max(k for k in range(len(ids) - n + 1) if ids[k:k + n] == invocation)
    for layer, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a[:, :start], b[:, :start], rtol=0, atol=1e-6, msg=f"layer {layer}")
    assert float((got[-1][:, start:] - ref[-1][:, start:]).abs().max()) > 1e-4, "the adapter acts from the question on"


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_an_activated_adapter_trains_past_its_prefix_with_the_same_loss_and_gradients(work, tmp_path, dropout,
                                                                                      monkeypatch):
    """The option loss of an activated adapter with the part before the invocation run once
    without gradient equals the whole prompt's forward and backward: loss and every LoRA
    gradient within float error (train mode, LoRA dropout on or off, same seed)."""
    from peft import get_peft_model

    from csp_utils.vlm import scoring

    model, processor = load_base(work)
    cfg = dataclass_replace(small_configs().sft, loss="soft_ce", confidence_target="internal", layout="follow_up",
                            lora=settings.LoraSettings(activation="confidence", dropout=dropout))
    model = get_peft_model(model, trainers.lora_config(model, cfg.lora, processor))
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero LoRA B so that both LoRA matrices take gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    rows = trainers.option_rows(make_grounded_dataset(), "internal")
    trainer = trainers.build_option_trainer(model, processor, rows, cfg, tmp_path)
    batch = trainer.data_collator([rows[i] for i in range(6)])
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1, "the test needs prompts of mixed lengths"
    cuts, real = [], scoring.before_invocation
    monkeypatch.setattr(scoring, "before_invocation", lambda *a: cuts.append(real(*a)) or cuts[-1])
    model.train()

    def loss_and_grads(split: bool):
        trainer.split_activated = split
        model.zero_grad()
        torch.manual_seed(1)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole_loss, whole = loss_and_grads(False)
    assert cuts == []
    split_loss, split = loss_and_grads(True)
    assert len(cuts) == 1 and cuts[0] is not None and cuts[0].prefix_len > 64, "image and question in the cache"
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    assert whole.keys() == split.keys() and any(float(g.abs().max()) > 1e-4 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_grounded_probe_script_runs_on_the_embedded_model(tmp_path):
    """The experiment script end to end at toy size: rows, one adapter, confidence-only
    evaluation (answers stay the base model's), baselines and the probe."""
    if not (models.default_model_dir() / "model.safetensors").exists():
        pytest.skip("the embedded default model is not built (python -m csp_utils.pretrain)")
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import grounded_probe
    finally:
        sys.path.pop(0)
    res = grounded_probe.main(["--out", str(tmp_path), "--train-scenes", "20", "--eval-scenes", "8", "--steps", "3",
                               "--layouts", "follow_up", "--losses", "soft_ce", "--flip-share", "0.2"])
    run = res["runs"]["follow_up-soft_ce-internal"]
    assert run["answers_equal_base"] and run["steps"] == 3
    assert res["data"]["n_flip"] == round(0.2 * res["data"]["n_answered"])
    assert set(res["probe"]) == {"answer_prompt", "follow_up"}
    assert (tmp_path / "results.md").exists()


def test_the_probe_reads_the_position_that_predicts_the_confidence_digits():
    """The options share a leading " ": the probe's state is the one at that token, whose
    logits score the digits, as a forward over the prompt and a whole option gives it."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import grounded_probe
    finally:
        sys.path.pop(0)
    from PIL import Image

    from csp_utils.vlm import engine, prompts

    model, processor = models.load_vlm("embedded", dtype=torch.float32)
    model.eval()
    options = engine.option_token_ids(processor, prompts.CONFIDENCE_LEVELS, layout="follow_up")
    then = engine.common_prefix(options)
    assert then and all(o[:len(then)] == then and len(o) > len(then) for o in options)
    msgs = [prompts.confidence_messages("Is there a red cube in the image?", a, layout="follow_up") for a in ("Yes", "No")]
    images = [Image.new("RGB", (64, 64), c) for c in ("white", "gray")]
    got = grounded_probe.last_hidden(model, processor, msgs, images, then=then)
    for i in range(2):
        p = engine.plain_prompts(model, processor, msgs[i:i + 1], images[i:i + 1], shortcuts=True)
        ids = torch.cat([p.input_ids, torch.tensor([options[5]])], 1)
        with torch.no_grad():
            o = model(input_ids=ids, attention_mask=torch.ones_like(ids), **p.image_inputs, output_hidden_states=True)
        at = p.input_ids.shape[1] + len(then) - 1   # the " " whose logits score the digits
        for layer, h in enumerate(o.hidden_states):
            torch.testing.assert_close(got[i, layer], h[0, at], rtol=1e-4, atol=1e-4, msg=f"row {i} layer {layer}")
    assert not torch.allclose(got, grounded_probe.last_hidden(model, processor, msgs, images), atol=1e-3)


def test_the_checkpoint_key_names_the_init_adapter_by_its_weights_not_its_folder(tmp_path):
    from safetensors.torch import save_file

    a, b, c = (tmp_path / n for n in ("run1/adapters/sft", "moved/adapters/sft", "other"))
    for folder, value in ((a, 1.0), (b, 1.0), (c, 2.0)):
        folder.mkdir(parents=True)
        save_file({"w": torch.full((2,), value)}, str(folder / "adapter_model.safetensors"))
    assert regimes._adapter_digest(a) == regimes._adapter_digest(b)  # same weights, another folder
    assert regimes._adapter_digest(a) != regimes._adapter_digest(c)
    assert regimes._adapter_digest(None) is None


def test_simpo_from_an_existing_sft_adapter_reads_the_rows_with_simpos_own_target(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(regimes, "load_perturbed_dataset", lambda ds, target: seen.setdefault("target", target))
    monkeypatch.setattr(regimes, "adapter_complete", lambda folder: True)  # notebook 03 already trained SFT
    monkeypatch.setattr(regimes, "train_simpo", lambda *a, **k: "trained")
    cfg = settings.make_configs("tiny_default", simpo={"confidence_target": "correct", "layout": "follow_up"})
    assert cfg.sft.confidence_target == "paper"
    out = regimes.train_regime("sft_simpo", "embedded", tmp_path / "grounded", tmp_path, cfg, sft_adapter="require")
    assert seen["target"] == "correct" and out == {"sft_simpo": "trained"}
