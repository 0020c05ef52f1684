"""The evaluation protocol on a random tiny LLaVA: the batched fast path equals the
one-question-at-a-time computation, resume equals an uninterrupted run, 2 processes equal 1.

Random weights are right here: these are equivalence tests, not quality tests.
"""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from csp_utils.evaluate import evaluation as ev
from csp_utils.vlm import engine, scoring, models, parsing, prompts

from helpers import bench_images, make_benchmark, noise_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SCHEMA = {
    "question_id", "image_id", "set", "kind", "model", "framing", "readout", "question", "label",
    "raw_answer", "answer", "correct", "response", "raw_confidence", "confidence", "confidence_argmax",
    "options", "option_probs", "option_logliks", "internal_prob", "internal_prob_raw",
}


# ------------------------------------------------------------------ fast == one by one
@pytest.mark.parametrize("shortcut", ["shared_prefix", "encoded_images", "none"])
def test_batched_fast_path_equals_one_question_at_a_time(tiny, shortcut):
    model, proc = tiny
    bench = make_benchmark(6)
    items = bench.items
    images = bench_images(bench, items)
    cfg = ev.EvalConfig(framings=("third", "first"), batch_size=6, confidence_max_new_tokens=6, max_new_tokens=6,
                        share_prefix=shortcut == "shared_prefix", reuse_image_features=shortcut == "encoded_images")
    parse = ev.answer_parser(bench)
    answer_msgs = [prompts.answer_messages(it.question) for it in items]
    if shortcut == "shared_prefix":  # the shortcut under test is really taken for this model
        prefix, _ = engine.shared_prefix(model, proc, answer_msgs, images)
        assert prefix is not None and prefix.ids.numel() > 64  # template head + the 64 image tokens
    if shortcut == "encoded_images":
        p = engine.plain_prompts(model, proc, answer_msgs, images)
        enc = engine.encode_images(model, p.image_inputs, proc, p, engine.chat_texts(proc, answer_msgs))
        assert enc is not None and enc.keys == ("pixel_values",)
        # the tokenizer alone reproduces the processor here, so confidence prompts skip the image processor
        assert enc.image_tokens == [64] * len(items)
        conf_msgs = [prompts.confidence_messages(it.question, "Yes") for it in items]
        fast, ref = enc.text_prompts(proc, conf_msgs), engine.plain_prompts(model, proc, conf_msgs, images)
        assert torch.equal(fast.input_ids, ref.input_ids) and torch.equal(fast.attention_mask, ref.attention_mask)
        # prompts of other images are refused, not silently given these features
        with pytest.raises(ValueError, match="pixel_values"):
            engine.plain_prompts(model, proc, answer_msgs[::-1], images[::-1], encoded=enc)
    rows = ev.elicit_batch(model, proc, items, images, cfg, "tiny", parse)
    assert len(rows) == len(items) * 2 * 2
    lengths = proc(text=[proc.apply_chat_template(prompts.answer_messages(it.question), add_generation_prompt=True)
                         for it in items], images=[[im] for im in images], padding=False)["input_ids"]
    assert len({len(x) for x in lengths}) > 1, "the test needs prompts of mixed lengths (left padding)"

    option_ids = engine.option_token_ids(proc, cfg.options)
    yn = engine.yes_no_tokens(proc)
    by_key = {(r["question_id"], r["framing"], r["readout"]): r for r in rows}
    for it, im in zip(items, images):
        (raw,), new, logits = engine.generate_replies(model, proc, [prompts.answer_messages(it.question)], [im], 6)
        parsed = parse(raw)
        (internal, internal_raw), = engine.internal_probs(logits, new, [parsed], yn)
        for framing in cfg.framings:
            msgs = prompts.confidence_messages(it.question, raw, framing=framing)
            (conf,), _, _ = engine.generate_replies(model, proc, [msgs], [im], 6)
            ref = scoring.score_options_reference(model, proc, [msgs], [im], option_ids)[0]
            gen = by_key[(it.question_id, framing, "generated")]
            single = by_key[(it.question_id, framing, "single_pass")]
            for r in (gen, single):
                assert r["raw_answer"] == raw and r["answer"] == parsed and r["response"] == raw
                assert r["internal_prob"] == pytest.approx(internal, abs=1e-4)
                assert r["internal_prob_raw"] == pytest.approx(internal_raw, abs=1e-4)
            assert gen["raw_confidence"] == conf
            assert gen["confidence"] == parsing.parse_confidence(conf)
            np.testing.assert_allclose(single["option_logliks"], ref, atol=1e-4, rtol=0)
            probs, expect, _ = scoring.option_distribution(ref, cfg.options)
            assert single["confidence"] == pytest.approx(float(expect), abs=1e-4)
            assert sum(single["option_probs"]) == pytest.approx(1.0)


# -------------------------------------------------------------------- evaluate + resume
def _same_results(a, b, tol=1e-5):
    key = lambda r: (r["model"], r["question_id"], r["framing"], r["readout"])  # noqa: E731
    A, B = {key(r): r for r in a}, {key(r): r for r in b}
    assert A.keys() == B.keys()
    for k in A:
        for f in SCHEMA:
            x, y = A[k][f], B[k][f]
            if isinstance(x, float) or isinstance(y, float):
                assert x == pytest.approx(y, abs=tol), (k, f)
            elif isinstance(x, list) and x and isinstance(x[0], float):
                np.testing.assert_allclose(x, y, atol=tol, rtol=0)
            else:
                assert x == y, (k, f)


def test_evaluate_writes_the_schema_and_resumes(tiny, tmp_path):
    model, proc = tiny
    bench = make_benchmark(10)
    cfg = ev.EvalConfig(framings=("third", "first"), batch_size=4, max_new_tokens=5, confidence_max_new_tokens=5,
                        progress=False)
    full_path = ev.evaluate(model, proc, bench, tmp_path / "full.jsonl", "tiny", cfg)
    full = ev.load_results(full_path)
    assert len(full) == 10 * 4
    assert all(set(r) == SCHEMA for r in full)
    assert [r["question_id"] for r in full[::4]] == [it.question_id for it in bench.items]
    for r in full:
        assert r["answer"] in ("yes", "no")                        # POPE's rule always answers
        assert r["correct"] == (r["answer"] == r["label"])
        assert 0 <= r["internal_prob_raw"] <= r["internal_prob"] <= 1
        if r["readout"] == "single_pass":
            assert 0 <= r["confidence"] <= 1 and r["options"] == list(range(0, 101, 10))
        else:
            assert r["option_probs"] is None
            assert r["confidence"] == parsing.parse_confidence(r["raw_confidence"])

    # an interrupted run: 5 questions written in full, a 6th half-written, a line cut short
    lines = full_path.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:22]) + lines[22][: len(lines[22]) // 2])
    ev.evaluate(model, proc, bench, part, "tiny", cfg)
    _same_results(ev.load_results(part), full)

    # a finished file: a rerun does no work at all (the model is never called)
    class Untouchable(torch.nn.Module):
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name}) although every question was done")

    before = part.read_text()
    ev.evaluate(Untouchable(), proc, bench, part, "tiny", cfg)
    assert part.read_text() == before


def test_summarize(tiny, tmp_path):
    model, proc = tiny
    bench = make_benchmark(6)
    cfg = ev.EvalConfig(batch_size=6, max_new_tokens=4, confidence_max_new_tokens=4, progress=False)
    rows = ev.load_results(ev.evaluate(model, proc, bench, tmp_path / "r.jsonl", "tiny", cfg))
    summary = {s["readout"]: s for s in ev.summarize(rows, bench.positive_class)}
    assert set(summary) == {"generated", "single_pass"}
    s = summary["single_pass"]
    assert s["n_questions"] == 6 and s["coverage"] == 1.0 and s["n_parsed"] == 6
    assert s["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows if r["readout"] == "single_pass"]))
    for key in ("ece", "adaptive_ece", "mce", "brier", "auroc", "f1", "yes_ratio", "internal_ece",
                "spearman_internal_verbalized", "answer_coverage"):
        assert key in s

    # hand-made rows with known numbers: coverage counts unparsed confidences as missing
    base = dict(model="m", set="s", framing="third", readout="generated", raw_answer="", response="")
    hand = [
        base | dict(question_id="a", label="yes", answer="yes", correct=True, confidence=0.9, internal_prob=0.8),
        base | dict(question_id="b", label="no", answer="yes", correct=False, confidence=0.6, internal_prob=0.7),
        base | dict(question_id="c", label="no", answer="no", correct=True, confidence=None, internal_prob=0.9),
        base | dict(question_id="d", label="yes", answer=None, correct=False, confidence=0.2, internal_prob=None),
    ]
    (h,) = ev.summarize(hand, "yes")
    assert h["accuracy"] == 0.5 and h["n_other"] == 1 and h["answer_coverage"] == 0.75
    assert h["coverage"] == 0.75 and h["n_parsed"] == 3
    assert h["ece"] == pytest.approx((abs(0.9 - 1) + abs(0.6 - 0) + abs(0.2 - 0)) / 3)
    assert h["spearman_n"] == 2 and math.isnan(h["spearman_internal_verbalized"])


def test_config_is_checked():
    with pytest.raises(ValueError, match="framing"):
        ev.EvalConfig(framings=("second",))
    with pytest.raises(ValueError, match="readout"):
        ev.EvalConfig(readouts=("telepathy",))
    with pytest.raises(ValueError, match="options"):
        ev.EvalConfig(options=(0, 150))
    with pytest.raises(ValueError, match="layout"):
        ev.EvalConfig(layout="sideways")
    with pytest.raises(ValueError, match="adapter_scope"):
        ev.EvalConfig(adapter_scope="answer")


# ------------------------------------------------------------------ prompt layouts
@pytest.mark.parametrize("layout,which", [("follow_up", "tiny"), ("question_first", "tiny"),
                                          ("follow_up", "tiny_text_first"), ("inline", "tiny"),
                                          ("inline", "tiny_text_first")])
def test_layouts_on_the_fast_path_equal_one_question_at_a_time(layout, which, request):
    model, proc = request.getfixturevalue(which)
    bench = make_benchmark(5)
    items, images = bench.items, bench_images(bench, bench.items)
    cfg = ev.EvalConfig(readouts=("single_pass",), batch_size=5, max_new_tokens=6, layout=layout)
    rows = ev.elicit_batch(model, proc, items, images, cfg, "tiny", ev.answer_parser(bench))
    option_ids = engine.option_token_ids(proc, cfg.options, layout=layout)
    for it, im, row in zip(items, images, rows):
        msgs = prompts.confidence_messages(it.question, row["raw_answer"], layout=layout)
        if layout == "follow_up":  # the model's own answer turn, then the confidence question
            assert msgs[:2] == prompts.answer_messages(it.question, row["raw_answer"]) and len(msgs) == 3
        if layout == "inline":  # the answer conversation, its reply left open after the answer
            assert msgs == prompts.answer_messages(it.question, row["raw_answer"])
        ref = scoring.score_options_reference(model, proc, [msgs], [im], option_ids)[0]
        np.testing.assert_allclose(row["option_logliks"], ref, atol=1e-4, rtol=0)
    single = ev.elicit_batch(model, proc, items, images, ev.EvalConfig(readouts=("single_pass",), batch_size=5,
                             max_new_tokens=6), "tiny", ev.answer_parser(bench))
    assert any(abs(a["confidence"] - b["confidence"]) > 1e-4 for a, b in zip(rows, single))


# ------------------------------------------------------------------ confidence-only adapters
def _with_random_adapter(model, scale: float, seed: int = 0, config=None):
    """``model`` (a copy) under a LoRA (``config``, else one on every linear layer of the
    language model and projector) whose B is random, so the adapter changes its outputs."""
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), config or LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "linear_1", "linear_2"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    return peft_model.eval()


@pytest.mark.parametrize("which", ["tiny", "tiny_text_first"])
def test_a_confidence_only_adapter_answers_as_the_base_model(which, request):
    base, proc = request.getfixturevalue(which)
    adapted = _with_random_adapter(base, 0.5)
    bench = make_benchmark(8)
    items, images, parse = bench.items, bench_images(bench, bench.items), ev.answer_parser(bench)
    cfg = dict(framings=("third", "first"), batch_size=8, max_new_tokens=6, confidence_max_new_tokens=4,
               layout="follow_up")
    base_rows = ev.elicit_batch(base, proc, items, images, ev.EvalConfig(**cfg), "m", parse)
    conf_rows = ev.elicit_batch(adapted, proc, items, images, ev.EvalConfig(**cfg, adapter_scope="confidence"),
                                "m", parse)
    all_rows = ev.elicit_batch(adapted, proc, items, images, ev.EvalConfig(**cfg, adapter_scope="all"), "m", parse)
    for b, c in zip(base_rows, conf_rows):
        assert c["raw_answer"] == b["raw_answer"] and c["answer"] == b["answer"]
        assert c["internal_prob"] == pytest.approx(b["internal_prob"], abs=1e-5)
    # the adapter, left on, answers differently here: the check above can fail
    assert any(a["raw_answer"] != b["raw_answer"] for a, b in zip(all_rows, base_rows))
    # the confidence is the adapter's, on the base model's own answer
    option_ids = engine.option_token_ids(proc, prompts.CONFIDENCE_LEVELS)
    singles = [r for r in conf_rows if r["readout"] == "single_pass"]
    for r in singles:
        msgs = prompts.confidence_messages(r["question"], r["raw_answer"], framing=r["framing"], layout="follow_up")
        im = images[[it.question_id for it in items].index(r["question_id"])]
        with torch.no_grad():
            ref = scoring.score_options_reference(adapted, proc, [msgs], [im], option_ids)[0]
        np.testing.assert_allclose(r["option_logliks"], ref, atol=1e-4, rtol=0)
    base_singles = [r for r in base_rows if r["readout"] == "single_pass"]
    assert any(abs(a["confidence"] - b["confidence"]) > 1e-3 for a, b in zip(singles, base_singles))


def test_adapters_disabled_gives_peft_disable_adapter_outputs_and_restores_the_adapter(tiny):
    """``models.adapters_disabled`` switches the same layers as PEFT's ``disable_adapter``: the
    base model's logits inside, the adapter's after, its weights trainable again, and one more
    adapter (new layers' set) found too."""
    base, proc = tiny
    adapted = _with_random_adapter(base, 0.5)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])

    def logits():
        with torch.no_grad():
            return adapted(input_ids=ids).logits

    on = logits()
    with adapted.disable_adapter():
        peft_off = logits()
    assert not torch.equal(on, peft_off), "the adapter changes the outputs: the check can fail"
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    with models.adapters_disabled(adapted):
        assert torch.equal(logits(), peft_off)
        assert adapted._adapters_disabled
    assert torch.equal(logits(), on) and not adapted._adapters_disabled
    assert [n for n, p in adapted.named_parameters() if p.requires_grad] == trainable
    # an error inside still switches the adapter back on
    with pytest.raises(RuntimeError), models.adapters_disabled(adapted):
        raise RuntimeError("inside")
    assert torch.equal(logits(), on)
    # a second adapter on other layers: the cached layer list is rebuilt
    from peft import LoraConfig
    adapted.add_adapter("other", LoraConfig(r=4, target_modules=["gate_proj"]))
    adapted.set_adapter("other")
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B.other" in name:
                p.normal_(0, 0.5)
    other = logits()
    assert not torch.equal(other, peft_off)
    with models.adapters_disabled(adapted):
        assert torch.equal(logits(), peft_off)
    assert torch.equal(logits(), other)


# ------------------------------------------------------------------ activated adapters
def _with_random_activated_adapter(model, processor, scale: float):
    """An activated LoRA (PEFT's aLoRA, invoked by the third-person follow-up question)."""
    from csp_utils.train import settings, trainers

    config = trainers.lora_config(model, settings.LoraSettings(r=8, activation="confidence"), processor)
    return _with_random_adapter(model, scale, config=config)


@pytest.mark.parametrize("which", ["tiny", "tiny_text_first"])
@pytest.mark.parametrize("scope", ["confidence", "all"])
def test_an_activated_adapter_continues_the_answer_turns_cache_with_the_same_rows(which, scope, request, monkeypatch):
    """The confidence prompts continue the answer prompts' KV cache (no image, no question fed
    again) and give today's rows: answers equal, confidences within 1e-6; the adapter acts
    there (its confidences are not the base model's)."""
    base, proc = request.getfixturevalue(which)
    adapted = _with_random_activated_adapter(base, proc, 0.5)
    bench = make_benchmark(10)
    items, images, parse = bench.items, bench_images(bench, bench.items), ev.answer_parser(bench)
    cfg = ev.EvalConfig(framings=("third", "first"), batch_size=5, max_new_tokens=6, confidence_max_new_tokens=4,
                        layout="follow_up", adapter_scope=scope)
    taken, real = [], engine.continued_prompts
    monkeypatch.setattr(engine, "continued_prompts", lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])

    def rows(model, config):
        return [r for s in range(0, 10, 5)
                for r in ev.elicit_batch(model, proc, items[s:s + 5], images[s:s + 5], config, "m", parse)]

    new = rows(adapted, cfg)
    assert len(taken) == 4 and all(p is not None and p.prefix_cache is not None for p in taken)
    assert all(not p.image_inputs for p in taken), "the image is not given again"
    old = rows(adapted, dataclasses.replace(cfg, continue_answer_cache=False))
    assert len(taken) == 4, "today's path builds its prompts whole"
    assert len(new) == len(old)
    for a, b in zip(new, old):
        same = {k: a[k] for k in SCHEMA if k not in ("confidence", "option_probs", "option_logliks")}
        assert same == {k: b[k] for k in same}, "answers, read-outs and the internal probability equal"
        if a["readout"] == "single_pass":   # float32 log-likelihoods of ~-20: within their last bits
            assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)
            np.testing.assert_allclose(a["option_probs"], b["option_probs"], atol=1e-6, rtol=0)
            np.testing.assert_allclose(a["option_logliks"], b["option_logliks"], atol=0, rtol=1e-6)
    plain = rows(base, dataclasses.replace(cfg, adapter_scope="all"))
    third = [(a, b) for a, b in zip(new, plain) if a["framing"] == "third" and a["readout"] == "single_pass"]
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in third) > 1e-3, "the adapter acts"
    first = [(a, b) for a, b in zip(new, plain) if a["framing"] == "first" and a["readout"] == "single_pass"]
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in first) < 1e-5, "not invoked: the base model"


def test_continued_prompts_refuse_what_they_cannot_continue_exactly(tiny):
    model, proc = tiny
    msgs = [prompts.answer_messages("Is there a red star?")]
    before_texts = engine.chat_texts(proc, msgs)
    before = engine.plain_prompts(model, proc, msgs, noise_images(1))
    cache = object()
    follow = engine.chat_texts(proc, [prompts.confidence_messages("Is there a red star?", "Yes", layout="follow_up")])
    assert engine.continued_prompts(proc, before, cache, before_texts, follow) is not None
    other = engine.chat_texts(proc, [prompts.confidence_messages("Is there a star?", "Yes", layout="follow_up")])
    assert engine.continued_prompts(proc, before, cache, before_texts, other) is None      # another head
    assert engine.continued_prompts(proc, before, None, before_texts, follow) is None      # no cache kept
    invocation = engine.invocation_tokens(proc)
    assert engine.continued_prompts(proc, before, cache, before_texts, follow, invocation) is not None
    tok = engine.tokenizer_of(proc)
    assert len(tok(" Yes", add_special_tokens=False)["input_ids"]) == 1
    seam = [before_texts[0] + " Ye"]   # the tail "s" would sit inside the whole text's token " Yes"
    assert engine.continued_prompts(proc, before, cache, seam, [before_texts[0] + " Yes"]) is None
    # the invocation already in the cached part: PEFT would not find it in the new tokens alone
    assert engine.continued_prompts(proc, before, cache, follow, [follow[0] + " Yes"]) is not None
    assert engine.continued_prompts(proc, before, cache, follow, [follow[0] + " Yes"], invocation) is None


# ------------------------------------------------- answers of another confidence-only adapter
def _confidence_only_config(layout: str, **kw) -> "ev.EvalConfig":
    return ev.EvalConfig(framings=("third", "first"), batch_size=4, max_new_tokens=6, confidence_max_new_tokens=4,
                         layout=layout, adapter_scope="confidence", progress=False, **kw)


@pytest.mark.parametrize("which", ["tiny", "tiny_text_first"])
@pytest.mark.parametrize("layout", ["single_turn", "follow_up"])
def test_answers_taken_from_another_confidence_only_adapter_equal_generated_ones(which, layout, request, tmp_path,
                                                                                monkeypatch):
    """Rows made with the answer turn taken from another confidence-only adapter's rows are
    byte for byte the rows made by generating it (same batches for the confidence prompts)."""
    base, proc = request.getfixturevalue(which)
    first, second = _with_random_adapter(base, 0.5, seed=0), _with_random_adapter(base, 0.5, seed=1)
    bench, cfg = make_benchmark(10), _confidence_only_config(layout)
    source = ev.evaluate(first, proc, bench, tmp_path / "first.jsonl", "first", cfg)
    made = ev.load_results(ev.evaluate(second, proc, bench, tmp_path / "made.jsonl", "second", cfg))
    with monkeypatch.context() as m:   # the answer turn must not run at all
        m.setattr(ev, "_answer_turn", lambda *a, **k: pytest.fail("the answer turn ran although answers were given"))
        taken = ev.load_results(ev.evaluate(second, proc, bench, tmp_path / "taken.jsonl", "second", cfg,
                                            answers_from=(source, "first")))
    assert [json.dumps(r) for r in taken] == [json.dumps(r) for r in made]
    # the adapters' confidences differ, so the rows are not trivially the source's
    assert any(a["option_logliks"] != b["option_logliks"]
               for a, b in zip(ev.load_results(source), made) if a["readout"] == "single_pass")


def test_answers_from_are_refused_where_they_could_mismatch(tiny, tmp_path):
    """Missing, unreadable, inconsistent or differently made source rows, and a model that
    answers for itself, are refused with an error naming the problem."""
    base, proc = tiny
    adapter = _with_random_adapter(base, 0.5)
    bench, cfg = make_benchmark(6), _confidence_only_config("follow_up")
    source = ev.evaluate(adapter, proc, bench, tmp_path / "source.jsonl", "first", cfg)
    lines = source.read_text().splitlines(keepends=True)

    def refused(text, match, config=cfg, model=adapter, name="first"):
        path = tmp_path / "edited.jsonl"
        path.write_text(text)
        out = tmp_path / "out.jsonl"
        out.unlink(missing_ok=True)
        with pytest.raises(ValueError, match=match):
            ev.evaluate(model, proc, bench, out, "second", config, answers_from=(path, name))

    refused("".join(lines), "no other rows", name="other")   # another model's name: no rows
    refused("".join(lines[4:]), "no first rows for 1 questions")     # one question (4 rows) missing
    refused("".join(lines) + lines[0][:-5], "could not be read")     # a cut last line
    row = json.loads(lines[0])
    refused("".join([json.dumps({**row, "response": row["response"] + "!"}) + "\n"] + lines[1:]), "disagree")
    refused("".join(json.dumps({**json.loads(x), "question": "Is there a cat?"}) + "\n" for x in lines),
            "not the one asked here")
    changed = [json.dumps({**json.loads(x), "response": json.loads(x)["response"] + "!"}) + "\n" for x in lines]
    refused("".join(changed), "response mode")
    refused("".join(lines), "confidence-only adapter", model=base)
    refused("".join(lines), "confidence-only adapter", config=dataclasses.replace(cfg, adapter_scope="all"))


# ----------------------------------------------------------------- two processes
RUN_SRC = textwrap.dedent(
    '''
    import sys
    import torch
    sys.path.insert(0, sys.argv[3])  # tests/, for the benchmark the test builds too
    from csp_utils.evaluate import evaluation
    from csp_utils.vlm import models
    from helpers import make_benchmark

    torch.set_num_threads(1)
    model, processor = models.load_vlm(sys.argv[1])
    cfg = evaluation.EvalConfig(framings=("third", "first"), batch_size=3, max_new_tokens=4,
                                confidence_max_new_tokens=4, progress=False)
    evaluation.evaluate(model, processor, make_benchmark(9), sys.argv[2], "tiny", cfg)
    '''
)


def _free_port() -> int:
    with socket.socket() as s:  # other test runs may hold accelerate's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_processes_equal_one(tiny, tmp_path):
    model, proc = tiny
    models.save_vlm(model, proc, tmp_path / "model")
    script = tmp_path / "run_eval.py"
    script.write_text(RUN_SRC)
    one = tmp_path / "one.jsonl"
    two = tmp_path / "two.jsonl"
    loaded, loaded_proc = models.load_vlm(tmp_path / "model")
    cfg = ev.EvalConfig(framings=("third", "first"), batch_size=3, max_new_tokens=4, confidence_max_new_tokens=4,
                        progress=False)
    ev.evaluate(loaded, loaded_proc, make_benchmark(9), one, "tiny", cfg)

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(tmp_path / "model"), str(two),
           os.path.dirname(__file__)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not list(tmp_path.glob("two.shard*")), "shards are merged and removed"
    rows_two, rows_one = ev.load_results(two), ev.load_results(one)
    assert [(r["question_id"], r["framing"], r["readout"]) for r in rows_two] == \
           [(r["question_id"], r["framing"], r["readout"]) for r in rows_one]
    _same_results(rows_two, rows_one)
    json.dumps(rows_two)  # plain JSON all the way


# -------------------------------------------------------------- processor shortcuts
def test_fast_path_with_processor_shortcuts_equals_one_question_at_a_time(tiny_text_first, monkeypatch):
    """elicit_batch on same-size images (where the shortcuts are taken: the answer prompts
    skip the processor, the confidence prompts the image processor and the vision tower)
    gives the one-at-a-time answers, generated confidences and option scores."""
    model, proc = tiny_text_first
    engine._CHECKED.pop(proc, None)
    questions = ["Is there a star?", "Is the large red square left of the small blue star in the image?",
                 "Is there a circle in the image?", "Are there two squares?"]
    images = [im for im in noise_images(4, seed=3) for _ in (0, 1)]   # each image asked twice, as in POPE
    from csp_utils.world.benchmarks import Benchmark
    from csp_utils.world.schema import QAItem

    items = [QAItem(f"q{i}", f"im{i}", questions[i % 4], "yes", "pope-test", "existence", []) for i in range(8)]
    bench = Benchmark("pope-test", "pope", items, lambda k: images[int(k[2:])], "yes")
    cfg = ev.EvalConfig(batch_size=4, max_new_tokens=5, confidence_max_new_tokens=5, options=(0, 40, 100))
    parse = ev.answer_parser(bench)
    rows = ev.elicit_batch(model, proc, items[:4], images[:4], cfg, "t", parse)   # checks the shortcut
    assert engine._CHECKED[proc] == {((64, 64), "RGB"): 64}
    assert engine._DISTINCT_OK.get(model) is True, "repeated images were encoded once, checked against all rows"
    with monkeypatch.context() as m:  # takes it: no processor call for answers or confidences
        m.setattr(engine, "encode", lambda *a, **k: pytest.fail("the processor ran although the shortcut was checked"))
        rows += ev.elicit_batch(model, proc, items[4:], images[4:], cfg, "t", parse)
    option_ids = engine.option_token_ids(proc, cfg.options)
    by_key = {(r["question_id"], r["readout"]): r for r in rows}
    for it, im in zip(items, images):
        naive = ev.elicit_naive(model, proc, it, im, cfg, parse)
        gen, single = by_key[(it.question_id, "generated")], by_key[(it.question_id, "single_pass")]
        assert gen["raw_answer"] == naive["raw_answer"] and gen["raw_confidence"] == naive["raw_confidence"]
        msgs = [prompts.confidence_messages(it.question, gen["response"])]
        ref = scoring.score_options_reference(model, proc, msgs, [im], option_ids)[0]
        np.testing.assert_allclose(single["option_logliks"], ref, atol=1e-4, rtol=0)


def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "bench_elicitation.py"
    spec = importlib.util.spec_from_file_location("bench_elicitation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_speed_script_prints_both_throughputs_and_their_ratio(capsys):
    """scripts/bench_elicitation.py on a few questions: it runs both paths on the embedded
    default, they give the same answers, and it prints the ratio of their throughputs."""
    bench = _load_bench()
    before = torch.get_num_threads()
    try:
        out = bench.main(["--n", "6", "--batch-size", "4", "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    text = capsys.readouterr().out
    assert "embedded default (trained" in out["model"]
    assert out["same_answers"] == 1.0
    # one run per path: the ratio is the fast throughput over the naive one
    assert out["ratio"] == pytest.approx(out["fast_qps"] / out["naive_qps"]) and out["ratio"] > 0
    for line in ("naive loop :", "fast path  :", "ratio      :", "CPUs: ", "where the time goes"):
        assert line in text
    # both paths' parts: the model's two halves were found and ran, and the parts add up
    for path in ("naive", "fast"):
        parts = out[f"{path}_parts"]
        assert parts["vision tower"] > 0 and parts["language model"] > 0 and parts["processor and text"] > 0
        assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
    assert out["capability"] == torch.backends.cpu.get_cpu_capability() and out["threads"] == 1


def test_speed_script_times_each_part_exclusively():
    """A call inside a timed call counts for its own part only (fake clock: each read +1)."""
    bench = _load_bench()
    ticks = iter(range(100))
    timer = bench.PartTimer(clock=lambda: float(next(ticks)))

    class Owner:
        @staticmethod
        def inner():
            return "in"

        @staticmethod
        def outer():
            next(ticks)                     # 1 s of the outer part's own work
            return Owner.inner()

    timer.function("outer", Owner, "outer")
    timer.function("inner", Owner, "inner")
    assert Owner.outer() == "in"
    # clock reads: outer enters 0, own work 1, inner enters 2, leaves 3, outer leaves 4
    assert timer.total == {"outer": 3.0, "inner": 1.0}
    timer.remove()
    assert Owner.outer.__name__ == "outer" and Owner.inner.__name__ == "inner"


def test_speed_script_compares_cpu_capabilities(capsys):
    """--capabilities reruns the script in a fresh process per ATen kernel set."""
    bench = _load_bench()
    out = bench.main(["--n", "6", "--batch-size", "4", "--repeats", "1", "--threads", "1",
                      "--capabilities", "default"])
    (res,) = out["capabilities"]
    assert res["requested"] == "default" and res["capability"] == "DEFAULT"
    assert res["same_answers"] == 1.0 and res["ratio"] > 0 and res["n"] == 6
    assert "ATEN_CPU_CAPABILITY=default  -> DEFAULT" in capsys.readouterr().out


def test_adapters_trained_on_grounded_targets_are_evaluated_confidence_only(tmp_path):
    cfg = ev.EvalConfig(layout="single_turn")
    grounded, paper = tmp_path / "grounded", tmp_path / "paper"
    for folder, record in ((grounded, {"confidence_target": "internal", "layout": "follow_up"}),
                           (paper, {"confidence_target": "paper", "layout": "single_turn"})):
        folder.mkdir()
        (folder / "training_config.json").write_text(json.dumps(record))
    got = ev.config_for_adapter(cfg, grounded)
    assert (got.adapter_scope, got.layout) == ("confidence", "follow_up")
    got = ev.config_for_adapter(cfg, paper)
    assert (got.adapter_scope, got.layout) == ("all", "single_turn")
    assert ev.config_for_adapter(cfg, paper, adapter_scope="confidence").adapter_scope == "confidence"
    assert ev.config_for_adapter(cfg, None, layout="question_first").layout == "question_first"
    assert ev.config_for_adapter(cfg, grounded, layout="single_turn").layout == "single_turn"


def test_asking_a_model_again_in_another_framing_keeps_its_rows_in_the_first():
    from csp_utils.evaluate import evaluation

    def row(q, framing, model="m"):
        return {"model": model, "question_id": q, "framing": framing, "readout": "single_pass"}

    rows = [row("q1", "third"), row("q2", "third"), row("q1", "first"), row("q1", "third", model="other"),
            row("q1", "third")]  # the last line duplicates the first
    keep, done = evaluation._complete_rows(rows, "m", {("first", "single_pass")})
    assert done == {"q1"}
    # q2 has no first-person row yet: it will be asked in first person; its third-person row stays
    assert keep == rows[:4]
    keep, done = evaluation._complete_rows(rows, "m", {("third", "single_pass"), ("first", "single_pass")})
    assert done == {"q1"} and keep == [rows[0], rows[2], rows[3]]  # q2 unfinished: asked again in both
