"""The evaluation engine on a random tiny LLaVA: option tokens, option scoring, generation on a
shared prefix, the internal yes/no probability, processor shortcuts and the vision encoder
each equal the literal computation.

Random weights are right here: these are equivalence tests, not quality tests.
"""

import math

import numpy as np
import pytest
import torch

from csp_utils.vlm import engine, prompts, scoring
from helpers import bench_images, make_benchmark, noise_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- tokens
def test_option_tokens_follow_the_chat_template(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    ids = engine.option_token_ids(proc, [0, 10, 100])
    assert [tok.decode(i) for i in ids] == [" 0%", " 10%", " 100%"]  # the template's leading space
    assert all(len(i) > 1 for i in ids)                            # numbers span several tokens
    with_end = engine.option_token_ids(proc, [0, 10, 100], include_end=True)
    assert all(w[:-1] == i and w[-1] == tok.eos_token_id for w, i in zip(with_end, ids))
    yn = engine.yes_no_tokens(proc)
    assert tok.decode(yn.yes).strip() == "Yes" and tok.decode(yn.no).strip() == "No"


def test_option_distribution():
    probs, expect, arg = scoring.option_distribution([[0.0, math.log(3.0)], [-1e9, 0.0]], [20, 80])
    assert probs[0] == pytest.approx([0.25, 0.75])
    assert expect == pytest.approx([0.25 * 0.2 + 0.75 * 0.8, 0.8])
    assert arg.tolist() == [0.8, 0.8]


def test_expanded_tokenization_equals_the_processors_ids(tiny):
    """Confidence prompts on encoded images are tokenized as written, the image token
    repeated in the ids: the same ids and mask as the processor's expanded text, and
    no prompt at all (None) where a text does not hold exactly one placeholder."""
    model, proc = tiny
    ph = proc.image_token
    texts = engine.chat_texts(proc, [prompts.confidence_messages(q, a) for q, a in
                                 [("Is there a red star?", "Yes"), ("Is there a circle in the image?", "No")]])
    ids, mask = engine._tokenize_expanded(proc, texts, [64, 64])
    ref = proc.tokenizer([t.replace(ph, ph * 64) for t in texts], padding=True, padding_side="left",
                         return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert mask[0].sum() != mask[1].sum(), "the texts differ in length: left padding is exercised"
    assert engine._tokenize_expanded(proc, [texts[0] + ph, texts[1]], [64, 64]) is None
    assert engine._tokenize_expanded(proc, [texts[0].replace(ph, ""), texts[1]], [64, 64]) is None


def test_option_scoring_variants_agree(tiny):
    """Every way of scoring options gives the one-question-one-option numbers: the tree
    continuation (sdpa and eager masks), the expanded cache (chunked or not), on a shared
    prefix or on whole prompts, with or without the end token."""
    model, proc = tiny
    bench = make_benchmark(3)
    images = bench_images(bench, bench.items)
    answers = ["Yes", "No", "Yes, there is."]
    msgs = [prompts.confidence_messages(it.question, a) for it, a in zip(bench.items, answers)]
    prefix, _ = engine.shared_prefix(model, proc, [prompts.answer_messages(it.question) for it in bench.items], images)
    on_prefix = prefix.prompts(msgs)
    assert on_prefix is not None and on_prefix.prefix_len == prefix.ids.numel()
    plain = engine.plain_prompts(model, proc, msgs, images)
    for include_end in (False, True):
        ids = engine.option_token_ids(proc, [0, 30, 55, 100], include_end)
        ref = scoring.score_options_reference(model, proc, msgs, images, ids)
        for p in (plain, on_prefix):
            for kwargs in (dict(method="tree"), dict(method="expand"), dict(method="expand", option_chunk=1)):
                np.testing.assert_allclose(scoring.score_options_on(model, proc, p, ids, **kwargs), ref, atol=1e-4, rtol=0,
                                           err_msg=str(kwargs))
    before = engine.attn_implementation(model)
    try:
        model.set_attn_implementation("eager")
        np.testing.assert_allclose(scoring.score_options_on(model, proc, on_prefix, ids, method="tree"), ref,
                                   atol=1e-4, rtol=0)
    finally:
        model.set_attn_implementation(before)


def test_generation_on_a_shared_prefix_equals_whole_prompts(tiny):
    model, proc = tiny
    bench = make_benchmark(4)
    images = bench_images(bench, bench.items)
    answer_msgs = [prompts.answer_messages(it.question) for it in bench.items]
    prefix, on_prefix = engine.shared_prefix(model, proc, answer_msgs, images)
    a_texts, a_ids, a_logits = engine.generate_on(model, proc, on_prefix, 5)
    b_texts, b_ids, b_logits = engine.generate_replies(model, proc, answer_msgs, images, 5)
    assert a_texts == b_texts and torch.equal(a_ids, b_ids)
    torch.testing.assert_close(a_logits[0], b_logits[0], atol=1e-4, rtol=0)
    # the prefix is reusable: a second use gives the same as the first (generation did not grow it)
    assert engine.generate_on(model, proc, on_prefix, 5)[0] == a_texts
    # a conversation whose head differs cannot use it
    other = [[prompts.assistant_turn("Hi"), prompts.user_turn("Is there a star?")]] * 4
    assert prefix.prompts(other) is None


def test_internal_prob_is_the_yes_no_softmax_of_the_first_answer_token(tiny):
    model, proc = tiny
    bench = make_benchmark(2)
    it, im = bench.items[1], bench_images(bench, bench.items[1:2])[0]
    yn = engine.yes_no_tokens(proc)
    enc = engine.encode(proc, [prompts.answer_messages(it.question)], [im])
    with torch.no_grad():
        p = torch.softmax(model(**enc).logits[0, -1].float(), -1)
    p_yes, p_no = float(p[yn.yes].sum()), float(p[yn.no].sum())
    _, new, logits = engine.generate_replies(model, proc, [prompts.answer_messages(it.question)], [im], 2)
    for answer, own in (("yes", p_yes), ("no", p_no)):
        (restricted, raw), = engine.internal_probs(logits, new, [answer], yn)
        assert raw == pytest.approx(own, rel=1e-4)
        assert restricted == pytest.approx(own / (p_yes + p_no), rel=1e-4)
    assert engine.internal_probs(logits, new, [None], yn) == [(None, None)]  # unparsed answer: no internal prob


def test_processor_shortcuts_are_taken_only_where_they_reproduce_the_processor(tiny, monkeypatch):
    """The fast path's shortcut for the processor (one array op for the pixels, the text
    tokenized as written) is checked against the processor on the first batch of an image
    size, used afterwards with the same tensors, and refused where it differs."""
    model, proc = tiny
    engine._CHECKED.pop(proc, None)
    msgs = [prompts.answer_messages(q) for q in ("Is there a star?", "Is the large red square left of the blue star?",
                                                 "Is there a circle in the image?")]
    first = engine.plain_prompts(model, proc, msgs, noise_images(3), shortcuts=True)   # runs the processor, checks
    assert engine._CHECKED[proc] == {((64, 64), "RGB"): 64} and first.image_tokens == [64] * 3

    images = noise_images(3, seed=2)
    ref = engine.plain_prompts(model, proc, msgs[::-1], images)
    with monkeypatch.context() as m:   # from now on the processor is not called at all
        m.setattr(engine, "encode", lambda *a, **k: pytest.fail("the processor ran although the shortcut was checked"))
        fast = engine.plain_prompts(model, proc, msgs[::-1], images, shortcuts=True)
    assert torch.equal(fast.input_ids, ref.input_ids) and torch.equal(fast.attention_mask, ref.attention_mask)
    assert torch.equal(fast.image_inputs["pixel_values"], ref.image_inputs["pixel_values"])
    assert fast.attention_mask.sum(1).unique().numel() > 1, "left padding is exercised"

    # 48 x 64 images: the processor resizes them, the shortcut would not: checked and refused
    tall = noise_images(3, hw=(48, 64))
    p = engine.plain_prompts(model, proc, msgs, tall, shortcuts=True)
    assert engine._CHECKED[proc][((64, 48), "RGB")] is False and p.image_tokens is None
    ref = engine.plain_prompts(model, proc, msgs, tall)
    assert torch.equal(p.input_ids, ref.input_ids)
    assert torch.equal(p.image_inputs["pixel_values"], ref.image_inputs["pixel_values"])
    # images of mixed sizes have no key: the processor runs, nothing is recorded
    before = dict(engine._CHECKED[proc])
    mixed = noise_images(2) + tall[:1]
    p = engine.plain_prompts(model, proc, msgs, mixed, shortcuts=True)
    assert engine._CHECKED[proc] == before and p.image_tokens is None


def test_vision_encoder_runs_once_per_distinct_image(tiny_text_first):
    """Rows with the same image get the encoder output of one run on it: the same as encoding
    every row; an encoder whose output is not one entry per image is run on every row."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, proc = tiny_text_first
    imgs = noise_images(3, seed=5)
    batch = [imgs[0], imgs[1], imgs[0], imgs[2], imgs[1]]
    pixels = proc.image_processor(batch, return_tensors="pt")["pixel_values"]
    assert engine._distinct_rows(pixels) == ([0, 1, 3], [0, 1, 0, 2, 1])
    fn = model.model.get_image_features
    calls = []

    def counted(pixel_values, return_dict=True):
        calls.append(pixel_values.shape[0])
        return fn(pixel_values=pixel_values, return_dict=True)

    key = object.__new__(type(model))   # a fresh key: not yet checked
    out = engine._encode_distinct(key, counted, pixels)
    assert calls == [3, 5] and engine._DISTINCT_OK[key] is True   # once on the distinct images, once to check
    full = fn(pixel_values=pixels, return_dict=True)
    assert engine._close(out, full)
    torch.testing.assert_close(out.pooler_output[2], full.pooler_output[0])
    calls.clear()
    engine._encode_distinct(key, counted, pixels)
    assert calls == [3]                                          # checked: the distinct images only
    assert engine._encode_distinct(key, counted, pixels[[0, 1, 3]]) is None   # nothing repeats: caller encodes all

    def batch_summary(pixel_values, return_dict=True):  # one output for the whole batch, not per image
        return BaseModelOutputWithPooling(last_hidden_state=pixel_values.mean(0, keepdim=True))

    other = object.__new__(type(model))
    out = engine._encode_distinct(other, batch_summary, pixels)
    assert engine._DISTINCT_OK[other] is False
    torch.testing.assert_close(out.last_hidden_state, pixels.mean(0, keepdim=True))
    assert engine._encode_distinct(other, batch_summary, pixels) is None
