"""The evaluation protocol: what each model is asked, what is stored, how runs resume and
how results are summarised. The computation behind it (batching, shared prefixes, option
scoring) is :mod:`csp_utils.vlm.engine`.

For every question the model first answers (greedy) the answer prompt
``prompts.answer_messages(question)``; its reply is parsed with the benchmark's rule. Then it
is asked how sure it is, in a fresh conversation (one user turn with the image) whose
``{response}`` is the model's OWN reply, in each framing ("third" person by default, "first"
person), and the confidence is read out in up to two ways:

* ``"generated"``: greedy generation of a short reply, parsed by
  :func:`csp_utils.vlm.parsing.parse_confidence` (unparsable -> ``confidence = null``).
* ``"single_pass"``: every option (0%, 10%, ..., 100% by default) is scored by its
  log-likelihood as the assistant's reply to the confidence prompt: all the tokens the chat
  template writes for that reply (``%`` included), with ``EvalConfig.include_end=True`` also
  the end-of-turn token, which charges an option for "stopping there"
  (:func:`scoring.score_options_on`). The softmax over the options' log-likelihoods is the
  distribution; ``confidence`` is its expectation and ``confidence_argmax`` its mode.

Prompt layout: ``EvalConfig.layout`` picks the confidence conversation
(:func:`csp_utils.vlm.prompts.confidence_messages`: the paper's ``"single_turn"``, ``"follow_up"``
after the model's own answer, ``"question_first"``, or ``"inline"``: the answer prompt with the
model's own answer as the start of the reply, the options scored right after it), exactly as
training builds it.

Confidence-only adapters: with ``EvalConfig.adapter_scope="confidence"`` and a PEFT model,
the answer turn runs with the adapter disabled (``models.adapters_disabled``), so answers and
the internal probability are the base model's, and only the confidence prompts see the
adapter. Nothing computed under one is reused under the other (prefix caches, encoded
images), except for an activated adapter (PEFT's aLoRA) in the follow-up layout: every
state before its invocation is the base model's, so the confidence prompts continue the
answer prompts' KV cache (image included) with only the answer and the follow-up question
fed (:func:`engine.continued_prompts`). Where that is not exact (a tokenizer that merges
across the seam, an invocation outside the new tokens, multimodal RoPE, another layout)
they are built whole as for any adapter. ``"all"`` (the default) lets the adapted model answer too. Such an adapter may
take its answer-turn fields from the rows of another confidence-only adapter on the same
base model (``evaluate(answers_from=...)``, checked by :func:`load_answers`) instead of
generating them again.

The "internal" confidence is the model's probability of its own yes/no answer at the step
where "Yes" and "No" first differ (:func:`engine.internal_probs`): ``internal_prob`` is the
softmax restricted to the Yes/No tokens, ``internal_prob_raw`` the plain softmax over the
whole vocabulary. Both are null when the reply did not parse or did not start the way the
Yes/No replies start.

JSONL schema (one row per question x framing x read-out; appended batch by batch)::

    question_id, image_id, set, kind : from the QAItem
    model          : the model_name given to evaluate()
    framing        : "third" | "first"
    readout        : "generated" | "single_pass"
    question, label: the question text, gold "yes"/"no"
    raw_answer     : the model's answer reply, decoded, stripped
    answer         : parsed "yes"/"no", null when the rule found neither
    correct        : answer == label (an unparsed answer counts as wrong)
    response       : the text put in the confidence prompt's {response}
    raw_confidence : generated: the confidence reply; single_pass: the argmax option ("80%")
    confidence     : fraction in [0, 1] or null (generated: parsed reply; single_pass: the
                     expectation under option_probs)
    confidence_argmax: single_pass only: the most likely option as a fraction (else null)
    options        : single_pass only: the option percents scored (else null)
    option_probs   : single_pass only: softmax over option_logliks (else null)
    option_logliks : single_pass only: summed token log-probs of each option (else null)
    internal_prob, internal_prob_raw : see above (same on every row of a question)

Resume: ``evaluate`` skips questions whose rows for every (framing, read-out) are already
in the file for this ``model``; a half-written question or a truncated last line from an
interrupted run is dropped and redone.

Several processes: under ``accelerate launch`` each process takes every n-th question,
writes ``<out>.shard<i>of<n>.jsonl`` and the main process merges the shards into ``out`` in
benchmark order. Load the model on ``PartialState().device`` in each process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from accelerate import PartialState
from tqdm import tqdm

from csp_utils.vlm import engine
from csp_utils.core import metrics
from csp_utils.vlm import models, scoring
from csp_utils.vlm import parsing, prompts
from csp_utils.vlm.engine import chat_texts, generate_on, option_token_ids, yes_no_tokens

READOUTS = ("generated", "single_pass")
ADAPTER_SCOPES = ("all", "confidence")
# the fields of a row that the answer turn alone decides
ANSWER_FIELDS = ("raw_answer", "answer", "response", "internal_prob", "internal_prob_raw")


@dataclass
class EvalConfig:
    framings: Sequence[str] = ("third",)
    readouts: Sequence[str] = READOUTS
    options: Sequence[int] = prompts.CONFIDENCE_LEVELS   # integer percents to score
    include_end: bool = False       # single_pass: also score the end-of-turn token
    batch_size: int = 16
    max_new_tokens: int = 10        # the answer reply
    confidence_max_new_tokens: int = 8   # the generated confidence reply
    option_chunk: int | None = None  # options scored together; None = all (memory ~ K x prompt cache)
    response: str = "raw"           # {response} = "raw" reply, or "parsed" ("Yes"/"No")
    share_prefix: bool = True       # run template head + image once per batch (where exact)
    reuse_image_features: bool = True  # without a shared prefix: the vision encoder once per batch for all prompts
    continue_answer_cache: bool = True  # activated adapter, follow-up layout: confidence prompts continue the
                                        # answer prompts' KV cache (exact: states before the invocation are the base's)
    seed: int = 0
    prompt_config: prompts.PromptConfig | None = None
    progress: bool = True
    layout: str = "single_turn"     # confidence conversation: prompts.LAYOUTS
    adapter_scope: str = "all"      # "confidence": the answer turn runs with the adapter disabled

    def __post_init__(self):
        self.framings = tuple(self.framings)
        self.readouts = tuple(self.readouts)
        self.options = tuple(int(o) for o in self.options)
        for f in self.framings:
            if f not in prompts.FRAMINGS:
                raise ValueError(f"framing must be one of {prompts.FRAMINGS}, got {f!r}")
        for r in self.readouts:
            if r not in READOUTS:
                raise ValueError(f"readout must be one of {READOUTS}, got {r!r}")
        if not self.options or any(not 0 <= o <= 100 for o in self.options):
            raise ValueError(f"options must be integer percents in 0..100, got {self.options}")
        if self.response not in ("raw", "parsed"):
            raise ValueError(f"response must be 'raw' or 'parsed', got {self.response!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        prompts.check_layout(self.layout)
        if self.adapter_scope not in ADAPTER_SCOPES:
            raise ValueError(f"adapter_scope must be one of {ADAPTER_SCOPES}, got {self.adapter_scope!r}")


# ------------------------------------------------------------------------- evaluate
def evaluate(model, processor, benchmark, out_jsonl, model_name: str, config: EvalConfig | None = None,
             answers_from: tuple | None = None) -> Path:
    """Answer + confidence for every question of ``benchmark``, appended to ``out_jsonl``.

    Resumable (see module docstring); under ``accelerate launch`` the questions are
    sharded over processes and merged by the main process. ``answers_from``: ``(results
    file, model name)`` of a confidence-only adapter on the same base model whose answer-turn
    fields this confidence-only adapter takes instead of generating them (:func:`load_answers`).
    Returns the results path.
    """
    config = config or EvalConfig()
    state = PartialState()
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    combos, items, ids = _questions(benchmark, config)
    if answers_from is not None and not answers_on_base(model, config):
        raise ValueError(f"{model_name}: answers_from needs a confidence-only adapter (adapter_scope='confidence' "
                         "on a PEFT model); any other model answers for itself")

    n, idx = state.num_processes, state.process_index
    mine = out if n == 1 else shard_path(out, idx, n)
    if state.is_main_process:
        _prepare_resume(out, model_name, combos)
    state.wait_for_everyone()  # the main file is consistent before anyone reads it
    done = _complete_rows(_read_rows(out)[0], model_name, combos)[1]
    if mine != out:
        done |= _prepare_resume(mine, model_name, combos)
    shard = [it for i, it in enumerate(items) if i % n == idx]
    todo = [it for it in shard if it.question_id not in done]

    if todo:
        parse = answer_parser(benchmark)
        answers = load_answers(*answers_from, todo, config, parse) if answers_from is not None else None

        def write(batch, images, parse, option_ids, yn):
            given = [answers[it.question_id] for it in batch] if answers is not None else None
            _append(mine, elicit_batch(model, processor, batch, images, config, model_name, parse, option_ids, yn,
                                       given))

        _run(model, processor, benchmark, todo, config, model_name, len(shard),
             config.progress and state.is_main_process, write)

    if n > 1:
        state.wait_for_everyone()
        if state.is_main_process:
            _merge(out, [shard_path(out, i, n) for i in range(n)], ids, model_name, combos)
        state.wait_for_everyone()
    return out


def evaluate_adapters(model, processor, benchmark, members: Sequence[tuple], config: EvalConfig) -> list[Path]:
    """:func:`evaluate` for several activated adapters on one PEFT model at once, batch-major:
    each batch's answer turn runs once and every adapter continues it
    (:func:`elicit_batch_adapters`). ``members``: ``(results file, model name, adapter name)``.

    One process only, and every member's file must hold the same finished questions (e.g. all
    fresh): the batches are then the ones each :func:`evaluate` alone would make, so the rows
    are the same. Returns the results paths.
    """
    if PartialState().num_processes != 1:
        raise ValueError("evaluate_adapters runs in one process; under accelerate launch evaluate each adapter")
    combos, items, _ = _questions(benchmark, config)
    outs = [Path(out) for out, _, _ in members]
    done = []
    for out, (_, name, _) in zip(outs, members):
        out.parent.mkdir(parents=True, exist_ok=True)
        done.append(_prepare_resume(out, name, combos))
    if any(d != done[0] for d in done):
        raise ValueError(f"{benchmark.name}: the adapters' results hold different finished questions; "
                         "evaluate each one on its own to resume them")
    todo = [it for it in items if it.question_id not in done[0]]
    adapters = [(name, adapter) for _, name, adapter in members]

    def write(batch, images, parse, option_ids, yn):
        rows = elicit_batch_adapters(model, processor, batch, images, config, adapters, parse, option_ids, yn)
        for out, (_, name, _) in zip(outs, members):
            _append(out, rows[name])

    if todo:
        _run(model, processor, benchmark, todo, config, "+".join(name for name, _ in adapters), len(items),
             config.progress, write)
    return outs


def load_answers(path, model_name: str, items, config: EvalConfig, parse) -> dict[str, dict]:
    """The answer-turn fields (:data:`ANSWER_FIELDS`) of ``model_name``'s rows in ``path`` for
    every question of ``items``, by question id.

    What the rows show is checked: the file was written whole, every question is there with
    the same text, label and image, all its rows agree, the reply parses to the stored answer
    by ``parse`` and the stored response is what ``config.response`` makes of it. What the rows
    cannot show (prompt config, ``max_new_tokens``, the batches the answers were generated in,
    the base model) the caller vouches for: equal floats need the same batches, i.e. both
    evaluations run over the same questions from the start (``matrix.evaluate_models``).
    """
    rows, clean = _read_rows(Path(path))
    if not clean:
        raise ValueError(f"answers_from {path}: a line could not be read; evaluate {model_name} again first")
    by_id: dict[str, dict] = {}
    for r in rows:
        if r.get("model") != model_name:
            continue
        fields = {k: r[k] for k in ANSWER_FIELDS}
        seen = by_id.setdefault(r["question_id"], {"row": r, "fields": fields})
        if seen["fields"] != fields:
            raise ValueError(f"answers_from {path}: {model_name}'s rows of {r['question_id']} disagree on the answer")
    missing = [it.question_id for it in items if it.question_id not in by_id]
    if missing:
        raise ValueError(f"answers_from {path}: no {model_name} rows for {len(missing)} questions "
                         f"(e.g. {missing[0]}); evaluate {model_name} on this set first")
    out = {}
    for it in items:
        r, fields = by_id[it.question_id]["row"], by_id[it.question_id]["fields"]
        same_item = (r["question"], r["label"], r["image_id"]) == (it.question, it.label, it.image_id)
        if not same_item:
            raise ValueError(f"answers_from {path}: question {it.question_id} is not the one asked here")
        if parse(r["raw_answer"]) != r["answer"] or _response_text(r["raw_answer"], r["answer"],
                                                                   config.response) != r["response"]:
            raise ValueError(f"answers_from {path}: {it.question_id}'s answer or response was made under "
                             f"another parse rule or response mode than {config.response!r}")
        out[it.question_id] = fields
    return out


def _questions(benchmark, config: EvalConfig) -> tuple[list, list, list[str]]:
    """(framing, read-out) combinations, the benchmark's items and their ids, unique or refused."""
    combos = [(f, r) for f in config.framings for r in config.readouts]
    items = list(benchmark.items)
    ids = [it.question_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{benchmark.name}: question ids are not unique; results could not be resumed")
    return combos, items, ids


def _run(model, processor, benchmark, todo, config: EvalConfig, desc: str, bar_total, show, write) -> None:
    """``todo`` batch by batch under the config's seed, the model in eval mode:
    ``write(batch, images, parse, option_ids, yn)`` elicits a batch and appends its rows as it
    finishes. The batches depend on ``todo`` and the batch size only."""
    torch.manual_seed(config.seed)
    parse = answer_parser(benchmark)
    option_ids = (option_token_ids(processor, config.options, config.include_end, config.layout, config.prompt_config)
                  if "single_pass" in config.readouts else None)
    yn = yes_no_tokens(processor)
    was_training = model.training
    model.eval()  # dropout off: results must not depend on the mode the caller left the model in
    bar = tqdm(total=bar_total, initial=bar_total - len(todo), desc=f"{desc} {benchmark.name}", disable=not show)
    try:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start:start + config.batch_size]
            images = [benchmark.image_loader(it.image_id).convert("RGB") for it in batch]
            write(batch, images, parse, option_ids, yn)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)


def _merge(out: Path, shards: list[Path], ids: list[str], model_name, combos) -> None:
    """Main file + shards -> main file: other models' rows first, then ours in benchmark order."""
    rows, _ = _read_rows(out)
    for s in shards:
        rows += _read_rows(s)[0]
    keep, _ = _complete_rows(rows, model_name, combos)
    order = {q: i for i, q in enumerate(ids)}
    combo_order = {c: i for i, c in enumerate(combos)}
    others = [r for r in keep if r.get("model") != model_name]
    ours = sorted(
        (r for r in keep if r.get("model") == model_name),
        key=lambda r: (order.get(r["question_id"], len(order)), combo_order.get((r["framing"], r["readout"]), 0)),
    )
    _write_rows(out, others + ours)
    for s in shards:
        s.unlink(missing_ok=True)


# ------------------------------------------------------------------ one batch of questions
def config_for_adapter(config: EvalConfig, adapter_dir=None, adapter_scope: str | None = None,
                       layout: str | None = None) -> EvalConfig:
    """``config`` for one model: explicit ``adapter_scope`` / ``layout`` win; otherwise an
    adapter's own training record decides (its prompt layout, and a confidence-only scope for
    adapters trained on grounded targets, whose training never taught the answer turn);
    otherwise ``config``'s own values."""
    record = {}
    path = Path(adapter_dir) / models.CONFIG_FILE if adapter_dir is not None else None
    if path is not None and path.exists():
        record = json.loads(path.read_text())
    if adapter_scope is None:
        grounded = record.get("confidence_target") in models.GROUNDED_TARGETS
        adapter_scope = "confidence" if grounded else config.adapter_scope
    layout = layout or record.get("layout") or config.layout
    if adapter_dir is None:
        adapter_scope = config.adapter_scope
    return dataclasses.replace(config, adapter_scope=adapter_scope, layout=layout)


def elicit_batch(model, processor, items, images, config: EvalConfig, model_name: str, parse,
                 option_ids=None, yn=None, answers: list[dict] | None = None) -> list[dict]:
    """All rows (framing x read-out) for one batch of questions, in a fixed order.

    With ``config.share_prefix`` the template head + image is run once for the batch and
    every prompt (answer and confidence) continues from its cache, where that is exact
    (:func:`engine.shared_prefix`); otherwise each prompt runs whole. With a confidence-only
    adapter the answer turn runs on the base model and the confidence prompts get their
    own prefix / encoded images, computed with the adapter; ``answers`` (one dict of
    :data:`ANSWER_FIELDS` per item, see :func:`load_answers`) then stand in for that turn.
    """
    separate = answers_on_base(model, config)
    invocation = continues_answer_turn(model, config) if answers is None else None
    if answers is not None:
        if not separate:
            raise ValueError("answers can stand in only for the answer turn of a confidence-only adapter "
                             "(adapter_scope='confidence' on a PEFT model)")
        if len(answers) != len(items):
            raise ValueError(f"{len(answers)} answers for {len(items)} questions")
        turn = _GivenAnswers([a["raw_answer"] for a in answers], [a["answer"] for a in answers],
                             [(a["internal_prob"], a["internal_prob_raw"]) for a in answers])
    else:
        turn = _answer_turn(model, processor, items, images, config, parse, yn or yes_no_tokens(processor),
                            invocation is not None)
    return _confidence_rows(model, processor, items, images, config, model_name, turn, invocation, option_ids)


def elicit_batch_adapters(model, processor, items, images, config: EvalConfig, adapters: Sequence[tuple[str, str]],
                          parse, option_ids=None, yn=None) -> dict[str, list[dict]]:
    """:func:`elicit_batch` for several activated adapters on one PEFT model, by model name:
    ``adapters`` is ``(model name, adapter name)`` of each (loaded with ``model.load_adapter``).

    The answer turn runs once, on the base model, and every adapter's confidence prompts
    continue its KV cache (:func:`engine.continued_prompts`): each adapter's rows are the ones
    :func:`elicit_batch` gives with that adapter alone. Needs what the continuation needs (a
    confidence-only scope, the follow-up layout, the same invocation tokens for every adapter);
    anything else is refused.
    """
    if not adapters:
        return {}
    if not answers_on_base(model, config):
        raise ValueError("several adapters share an answer turn only with adapter_scope='confidence' on a PEFT model")
    invocations = []
    for _, adapter in adapters:
        model.set_adapter(adapter)
        invocations.append(continues_answer_turn(model, config))
    if invocations[0] is None or any(inv != invocations[0] for inv in invocations):
        raise ValueError("several adapters share an answer turn only when each is an activated adapter with the same "
                         "invocation tokens, in the follow-up layout with continue_answer_cache")
    turn = _answer_turn(model, processor, items, images, config, parse, yn or yes_no_tokens(processor), True)
    out = {}
    for name, adapter in adapters:
        model.set_adapter(adapter)
        out[name] = _confidence_rows(model, processor, items, images, config, name, turn, invocations[0], option_ids)
    return out


@dataclass
class _GivenAnswers:
    """Answer-turn fields taken from stored rows (nothing cached to continue)."""

    raw: list
    parsed: list
    internal: list
    prefix: object = None
    encoded: object = None
    kept: tuple | None = None


def _confidence_rows(model, processor, items, images, config: EvalConfig, model_name: str, turn, invocation,
                     option_ids) -> list[dict]:
    """The rows of one batch given its answer turn (:func:`engine.answer_turn`'s fields): the
    confidence prompts of every framing, each read out every way."""
    pc = config.prompt_config
    if option_ids is None and "single_pass" in config.readouts:
        option_ids = option_token_ids(processor, config.options, config.include_end, config.layout, config.prompt_config)
    separate = answers_on_base(model, config)
    raw, parsed, internal = turn.raw, turn.parsed, turn.internal
    prefix, encoded = (None, None) if separate else (turn.prefix, turn.encoded)  # the base model's: not the adapter's
    answer_turn = turn.kept if invocation is not None else None
    responses = [_response_text(r, p, config.response) for r, p in zip(raw, parsed)]

    rows: dict[tuple[int, str, str], dict] = {}
    for framing in config.framings:
        msgs = [prompts.confidence_messages(it.question, resp, framing=framing, config=pc, layout=config.layout)
                for it, resp in zip(items, responses)]
        conf_prompts = None
        if answer_turn is not None:
            conf_prompts = engine.continued_prompts(processor, *answer_turn, chat_texts(processor, msgs), invocation)
        if conf_prompts is None and prefix is not None:
            conf_prompts = prefix.prompts(msgs)
        if conf_prompts is None and separate and prefix is None and encoded is None:
            conf_texts = chat_texts(processor, msgs)
            if config.share_prefix:
                prefix, conf_prompts = engine.shared_prefix(model, processor, msgs, images, conf_texts, shortcuts=True)
            else:
                conf_prompts = engine.plain_prompts(model, processor, msgs, images, conf_texts, shortcuts=True)
            if prefix is None and config.reuse_image_features and not engine.uses_mrope(model):
                encoded = engine.encode_images(model, conf_prompts.image_inputs, processor, conf_prompts, conf_texts)
                if encoded is not None:
                    conf_prompts.image_inputs = encoded.replace(conf_prompts.image_inputs)
        if conf_prompts is None:
            conf_prompts = encoded.text_prompts(processor, msgs) if encoded is not None else None
        if conf_prompts is None:
            conf_prompts = engine.plain_prompts(model, processor, msgs, images, encoded=encoded)
        for readout in config.readouts:
            if readout == "generated":
                texts, _, _ = generate_on(model, processor, conf_prompts, config.confidence_max_new_tokens)
                extra = [dict(raw_confidence=t, confidence=parsing.parse_confidence(t)) for t in texts]
            else:
                extra = _single_pass(model, processor, conf_prompts, msgs, images, option_ids, config)
            for i, it in enumerate(items):
                rows[(i, framing, readout)] = _row(it, model_name, framing, readout, raw[i], parsed[i],
                                                   responses[i], internal[i], extra[i])
    return [rows[(i, f, r)] for i in range(len(items)) for f in config.framings for r in config.readouts]


def _answer_turn(model, processor, items, images, config: EvalConfig, parse, yn, keep_cache: bool = False):
    """The batch's :class:`engine.AnswerTurn` (answers, internal probabilities, prefix or encoded
    images); with ``keep_cache`` its ``kept`` holds the answer prompts and their KV cache."""
    answer_msgs = [prompts.answer_messages(it.question, config=config.prompt_config) for it in items]
    with _answer_context(model, config):
        # no shared prefix (e.g. the question comes before the image): at least encode the
        # images once for the answer and every confidence prompt
        return engine.answer_turn(model, processor, answer_msgs, images, config.max_new_tokens, parse, yn,
                                  share_prefix=config.share_prefix,
                                  reuse_image_features=config.reuse_image_features, keep_cache=keep_cache)


def _single_pass(model, processor, conf_prompts, msgs, images, option_ids, config: EvalConfig) -> list[dict]:
    """The single-pass read-out's row fields for a batch of confidence prompts."""
    if engine.uses_mrope(model):
        ll = scoring.score_options_reference(model, processor, msgs, images, option_ids)
    else:
        ll = scoring.score_options_on(model, processor, conf_prompts, option_ids, config.option_chunk)
    probs, expect, arg = scoring.option_distribution(ll, config.options)
    return [
        dict(
            raw_confidence=prompts.format_confidence(int(round(a * 100))),
            confidence=float(e),
            confidence_argmax=float(a),
            options=list(config.options),
            option_probs=[float(x) for x in pr],
            option_logliks=[float(x) for x in lls],
        )
        for pr, e, a, lls in zip(probs, expect, arg, ll)
    ]


def _row(item, model_name, framing, readout, raw, parsed, response, internal, extra) -> dict:
    row = {
        "question_id": item.question_id,
        "image_id": item.image_id,
        "set": item.set,
        "kind": getattr(item, "kind", None),
        "model": model_name,
        "framing": framing,
        "readout": readout,
        "question": item.question,
        "label": item.label,
        "raw_answer": raw,
        "answer": parsed,
        "correct": parsed == str(item.label).strip().lower(),
        "response": response,
        "raw_confidence": None,
        "confidence": None,
        "confidence_argmax": None,
        "options": None,
        "option_probs": None,
        "option_logliks": None,
        "internal_prob": internal[0],
        "internal_prob_raw": internal[1],
    }
    row.update(extra)
    return row


def answer_parser(benchmark) -> Callable[[str], str | None]:
    """The benchmark's own rule for reading a yes/no reply."""
    family = getattr(benchmark, "family", None)
    return lambda text: parsing.parse_yes_no(text, family=family)


def _response_text(raw: str, parsed: str | None, how: str) -> str:
    if how == "parsed" and parsed in ("yes", "no"):
        return parsed.capitalize()
    return raw


def has_adapter(model) -> bool:
    """True for a PEFT model whose adapter can be switched off for a turn."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


def answers_on_base(model, config: EvalConfig) -> bool:
    """True when the answer turn runs on the base model (a confidence-only adapter)."""
    return config.adapter_scope == "confidence" and has_adapter(model)


def continues_answer_turn(model, config: EvalConfig) -> list[int] | None:
    """The invocation tokens of an activated adapter whose confidence prompts may continue
    the answer turn's cache (follow-up layout, 1-D positions), else None."""
    if not config.continue_answer_cache or config.layout != "follow_up" or engine.uses_mrope(model):
        return None
    return engine.activated_invocation(model)


def _answer_context(model, config: EvalConfig):
    """The context the answer turn runs in: the base model for a confidence-only adapter."""
    return models.adapters_disabled(model) if answers_on_base(model, config) else contextlib.nullcontext()


# -------------------------------------------------------------------- results on disk
def load_results(path) -> list[dict]:
    """Rows of a results file; a truncated last line (interrupted write) is ignored."""
    rows, _ = _read_rows(Path(path))
    return rows


def _read_rows(path: Path) -> tuple[list[dict], bool]:
    """(rows, clean): clean is False when a line could not be read (it is left out)."""
    if not path.exists():
        return [], True
    rows, clean = [], True
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            if not line.endswith("\n"):
                clean = False  # the last write was cut short
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                clean = False
    return rows, clean


def _key(row) -> tuple:
    return (row["model"], row["question_id"], row["framing"], row["readout"])


def _complete_rows(rows, model_name, combos) -> tuple[list[dict], set[str]]:
    """Keep other models' rows and this model's complete questions; return (rows, done ids)."""
    need = set(combos)
    have: dict[str, set] = {}
    for r in rows:
        if r.get("model") == model_name:
            have.setdefault(r["question_id"], set()).add((r["framing"], r["readout"]))
    done = {q for q, s in have.items() if need <= s}
    keep, seen = [], set()
    for r in rows:
        mine = r.get("model") == model_name
        if mine and _key(r) in seen:
            continue  # a duplicate line
        if mine and (r["framing"], r["readout"]) in need and r["question_id"] not in done:
            continue  # an unfinished question: asked again; other framings / read-outs stay
        seen.add(_key(r))
        keep.append(r)
    return keep, done


def _write_rows(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, allow_nan=False) + "\n")
    os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one


def _prepare_resume(path: Path, model_name, combos) -> set[str]:
    """Done question ids in ``path``; rewrites it first if it holds broken or partial rows."""
    rows, clean = _read_rows(path)
    keep, done = _complete_rows(rows, model_name, combos)
    if not clean or len(keep) != len(rows):
        _write_rows(path, keep)
    return done


def _append(path: Path, rows) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def shard_path(out: Path, index: int, count: int) -> Path:
    return out.with_name(f"{out.stem}.shard{index}of{count}{out.suffix}")


# -------------------------------------------------------------------------- summary
def summarize(rows, positive_class: str = "yes", n_bins: int = 10) -> list[dict]:
    """One summary per (model, set, framing, read-out), as flat dicts.

    Task metrics (``metrics.task_metrics``; an unparsed answer counts as wrong), the
    calibration of the verbalized ``confidence`` on its parsed subset
    (``metrics.calibration_summary``: ece, adaptive_ece, mce, brier, auroc, n, n_total,
    coverage, ...), the same for the internal probability (``internal_`` prefix), and the
    Spearman correlation between internal and verbalized confidence on rows that have both.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["set"], r["framing"], r["readout"]), []).append(r)
    out = []
    for (model, set_, framing, readout), rs in groups.items():
        labels = [r["label"] for r in rs]
        answers = [r["answer"] if r["answer"] is not None else "unparsed" for r in rs]
        correct = [bool(r["correct"]) for r in rs]
        s = {"model": model, "set": set_, "framing": framing, "readout": readout,
             "positive_class": positive_class, "n_questions": len(rs),
             "answer_coverage": float(np.mean([r["answer"] is not None for r in rs]))}
        s |= metrics.task_metrics(labels, answers, positive=positive_class)
        # calibration_summary's n/accuracy describe the parsed subset: renamed so they do not
        # overwrite the task metrics' n/accuracy over all questions
        rename = {"n": "n_parsed", "accuracy": "accuracy_parsed"}
        cal = metrics.calibration_summary([_none_nan(r["confidence"]) for r in rs], correct, n_bins)
        s |= {rename.get(k, k): v for k, v in cal.items()}
        internal = metrics.calibration_summary([_none_nan(r["internal_prob"]) for r in rs], correct, n_bins)
        s |= {f"internal_{rename.get(k, k)}": v for k, v in internal.items()}
        pairs = [(r["internal_prob"], r["confidence"]) for r in rs
                 if r["internal_prob"] is not None and r["confidence"] is not None]
        rho, p = metrics.spearman(*zip(*pairs)) if len(pairs) >= 3 else (math.nan, math.nan)
        s |= {"spearman_internal_verbalized": rho, "spearman_p": p, "spearman_n": len(pairs)}
        out.append(s)
    return out


def _none_nan(v):
    return math.nan if v is None else v


# ------------------------------------------------------------------ the naive loop
def elicit_naive(model, processor, item, image, config: EvalConfig, parse, framing: str = "third") -> dict:
    """One question the slow, obvious way: ``generate`` the answer, then ``generate`` the
    confidence. The baseline of ``scripts/bench_elicitation.py``."""
    pc = config.prompt_config
    (raw,), _, _ = engine.generate_replies(model, processor, [prompts.answer_messages(item.question, config=pc)],
                                    [image], config.max_new_tokens)
    parsed = parse(raw)
    msgs = prompts.confidence_messages(item.question, _response_text(raw, parsed, config.response), framing=framing,
                                       config=pc, layout=config.layout)
    (conf,), _, _ = engine.generate_replies(model, processor, [msgs], [image], config.confidence_max_new_tokens)
    return {"question_id": item.question_id, "raw_answer": raw, "answer": parsed,
            "raw_confidence": conf, "confidence": parsing.parse_confidence(conf)}
