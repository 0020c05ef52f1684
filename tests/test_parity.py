"""Training and evaluation feed the confidence turn the same conversation.

For the same grounded rows, in every layout, the prompt that training's option collator
builds (``trainers.option_rows`` -> ``OptionCollator`` of ``build_option_trainer``) and the
prompt the evaluation scores (``evaluation.evaluate`` with a confidence-only adapter, as the
study runs grounded adapters) are the same token ids, on the same image, with the same quoted
answer, and give the same option log-likelihoods. On the shipped embedded base (its replies
are what the grounded builder quotes); skipped where it is not built.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from csp_utils.dataset import buildconfig, paper_rows, sources
from csp_utils.evaluate import evaluation as ev, suites
from csp_utils.train import regimes, settings, shaping, trainers
from csp_utils.vlm import engine, models, prompts, scoring
from csp_utils.world import benchmarks, scenes
from csp_utils.world.schema import QAItem

pytestmark = [pytest.mark.skipif(not (models.default_model_dir() / "model.safetensors").exists(),
                                 reason="the embedded default model is not built (python -m csp_utils.pretrain)"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def embedded():
    return models.load_vlm("embedded", dtype=torch.float32)


@pytest.fixture(scope="module")
def grounded_rows(embedded, tmp_path_factory):
    """A small grounded build with the study's builder settings (clean, key- and distractor-noised rows)."""
    model, processor = embedded
    cfg = buildconfig.BuildConfig(levels=(10, 40, 70, 100), targets="grounded", shard_size=40, seed=0,
                         grounded={"clean_share": 0.5, "questions": "world", "temperature_holdout": 0.6,
                                   "batch_size": 32})
    src = sources.world_source(scenes.make_scenes("csp", 6), 4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 6-scene build may warn about too few held-out rows for T
        ds = paper_rows.build_perturbed_dataset(src, out_dir=tmp_path_factory.mktemp("parity"), config=cfg, model=model,
                                        processor=processor, progress=False)
    assert {"none", "key", "distractor"} <= set(ds["noise_on"])
    return ds


def _adapted(model, seed: int = 0):
    """``model`` (a copy) under a LoRA whose B is random, so the adapter changes the confidence turn."""
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), trainers.lora_config(model, settings.LoraSettings()))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft_model.eval()


def _benchmark(ds):
    """The rows as an evaluation set: each row's own image, question and gold label."""
    images = {sid: img for sid, img in zip(ds["sample_id"], ds["image"])}
    items = [QAItem(r["sample_id"], r["sample_id"], r["question"], r["label"], "parity", r["kind"],
                               list(r["key_objects"])) for r in ds.select_columns(
                                   ["sample_id", "question", "label", "kind", "key_objects"])]
    return benchmarks.Benchmark("parity", "pope", items, lambda k: images[k], "yes")


def _unpadded(ids, mask) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


@pytest.mark.parametrize("layout", prompts.LAYOUTS)
def test_training_and_evaluation_feed_the_same_confidence_prompt(embedded, grounded_rows, layout, tmp_path,
                                                                  monkeypatch):
    base, processor = embedded
    ds = grounded_rows
    model = _adapted(base)

    # training: the real rows, collator and option ids of the option-loss trainer
    cfg = settings.SFTConfigCSP(confidence_target="correct", layout=layout, loss="soft_ce", max_steps=1,
                                per_device_train_batch_size=len(ds))
    rows = trainers.option_rows(ds, cfg.confidence_target, framing=cfg.framing)
    trainer = trainers.build_option_trainer(model, processor, rows, cfg, tmp_path / "trainer")
    examples = [rows[i] for i in range(len(rows))]
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        train_ll = trainers.option_logliks(model.eval(), batch, trainer.option_ids).numpy()

    # evaluation: the study's read-out of a grounded adapter, with the prompts it scores captured
    seen = []
    real = scoring.score_options_on

    def capture(m, proc, p, *a, **kw):
        seen.append(_unpadded(p.input_ids, p.attention_mask))
        return real(m, proc, p, *a, **kw)

    monkeypatch.setattr(scoring, "score_options_on", capture)
    # what config_for_adapter gives a grounded adapter (its record's layout, confidence-only scope)
    eval_cfg = ev.EvalConfig(framings=("third",), readouts=("single_pass",), batch_size=32, progress=False,
                             layout=layout, adapter_scope="confidence")
    out = ev.evaluate(model, processor, _benchmark(ds), tmp_path / "rows.jsonl", "m", eval_cfg)
    got = {r["question_id"]: r for r in ev.load_results(out)}
    eval_rows = [got[s] for s in ds["sample_id"]]
    eval_ids = [ids for chunk in seen for ids in chunk]

    # the quoted answer is the row's, as written (casing, punctuation)
    assert [r["response"] for r in eval_rows] == [ex["response"] for ex in examples]
    assert trainer.option_ids == engine.option_token_ids(processor, eval_cfg.options, eval_cfg.include_end,
                                                         eval_cfg.layout)
    # the same token ids, row by row (padding aside)
    train_ids = _unpadded(batch["input_ids"], batch["attention_mask"])
    assert len(eval_ids) == len(train_ids)
    for i, (a, b) in enumerate(zip(train_ids, eval_ids)):
        assert a == b, (layout, i, processor.tokenizer.decode(a), processor.tokenizer.decode(b))
    # the same image and prompt reach the model: the option log-likelihoods agree
    np.testing.assert_allclose(np.array([r["option_logliks"] for r in eval_rows]), train_ll, atol=1e-4, rtol=0)


def test_world_evaluation_images_have_the_grounded_training_size(grounded_rows):
    suite = suites.build_suite(suites.SuiteConfig(n_pope_images=2, n_amber_images=2, seed=0),
                                   sets=["pope-random", "amber-existence"])
    train_sizes = {im.size for im in grounded_rows["image"]}
    for bench in suite.values():
        sizes = {bench.image_loader(it.image_id).size for it in bench.items}
        assert sizes == train_sizes, (bench.name, sizes, train_sizes)


def test_the_inline_layout_is_the_answer_prompt_with_the_answer_and_confidence_in_one_reply(embedded):
    _, processor = embedded
    q = "Is there a red square in the image?"
    msgs = prompts.confidence_messages(q, "Yes", layout="inline")
    assert msgs == prompts.answer_messages(q, "Yes")  # the answer conversation, its reply left open
    answer_prompt = engine.chat_texts(processor, [prompts.answer_messages(q)])[0]
    open_reply = engine.chat_texts(processor, [msgs])[0]
    assert open_reply == answer_prompt + " Yes" and open_reply.endswith("ASSISTANT: Yes")
    whole = processor.apply_chat_template(prompts.confidence_messages(q, "Yes", "80%", layout="inline"),
                                          tokenize=False)
    assert whole.startswith(open_reply + " 80%")
    # the options are read right after the answer token, inside the same reply
    ids = engine.option_token_ids(processor, [80], layout="inline")[0]
    tok = processor.tokenizer
    assert tok.decode(ids) == " 80%"
    assert tok(open_reply, add_special_tokens=False)["input_ids"] + ids == tok(
        open_reply + " 80%", add_special_tokens=False)["input_ids"]
    # another template's wording works the same way
    pc = prompts.PromptConfig(inline_template="{response}. Confidence: {confidence}")
    text = engine.chat_texts(processor, [prompts.confidence_messages(q, "No", layout="inline", config=pc)])[0]
    assert text.endswith("ASSISTANT: No. Confidence:")
    with pytest.raises(ValueError, match="confidence"):
        prompts.confidence_messages(q, "No", layout="inline", config=prompts.PromptConfig(inline_template="{response}"))
    with pytest.raises(ValueError, match="inline"):
        shaping.simpo_pairs(None, "correct", layout="inline")


def test_own_distribution_script_scores_unseen_scenes_and_refuses_seen_ones(embedded, tmp_path):
    """The script end to end at toy size: a 2-step grounded adapter, held-out scenes after the
    training ones, the evaluation's read-out on them and on the clean world sets."""
    import json
    import sys
    from pathlib import Path

    model, processor = embedded
    run = tmp_path / "run"
    cfg = buildconfig.BuildConfig(levels=(10, 40, 70, 100), targets="grounded", shard_size=40, seed=0,
                         grounded={"clean_share": 0.5, "questions": "world", "temperature_holdout": 0.6,
                                   "batch_size": 32})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = paper_rows.build_perturbed_dataset(sources.world_source(scenes.make_scenes("csp", 6), 4, seed=0),
                                        out_dir=run / "grounded", config=cfg, model=model, processor=processor,
                                        progress=False)
    sft = settings.SFTConfigCSP(confidence_target="correct", layout="follow_up", loss="soft_ce", max_steps=2,
                                per_device_train_batch_size=4, logging_steps=1, save_steps=100)
    result = regimes.train_sft("embedded", ds, run, sft, name="sft@g")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import own_distribution
    finally:
        sys.path.pop(0)
    args = ["--adapter", str(result.adapter_dir), "--dataset", str(run / "grounded"), "--scenes", "4",
            "--pope-images", "2", "--amber-images", "2", "--out", str(tmp_path / "od")]
    with pytest.raises(ValueError, match="overlap"):
        own_distribution.main(args + ["--start", "3"])
    res = own_distribution.main(args)
    assert res["training_scenes"] == [0, 5] and res["heldout_scenes"] == [6, 9]
    assert res["quoted_answer_equals_eval_response"] == 1.0 and res["adapter_scope"] == "confidence"
    assert res["own_distribution"]["all"]["adapter"]["n"] == res["heldout_rows"] > 0
    assert set(res["eval_sets"]) == set(suites.CLEAN_SETS)
    assert json.loads((tmp_path / "od" / "results.json").read_text())["layout"] == "follow_up"
