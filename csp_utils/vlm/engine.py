"""The speed engine of the evaluation: prompts as model inputs, shared prefixes, encoded
images, greedy generation and option scoring, each exactly equal to the one-question-at-a-time
computation (tested), only faster.

* Batches are left padded (generation continues from the right edge); positions skip the
  padding, as ``generate`` makes them (:func:`position_ids_from_mask`).
* :func:`shared_prefix`: the chat template's head and the image run once per batch; the
  answer prompt and every confidence prompt on the same images continue from that KV cache,
  where that is exact (same head tokens in every row, 1-D positions).
* :func:`encode_images`: without a shared prefix, the vision encoder runs once per batch for
  all its prompts (each distinct image once), and where the tokenizer alone reproduces the
  processor, later prompts skip the image processor too.
* Processor shortcuts (:func:`_check_shortcuts`): a LLaVA-style processor's per-image loop is
  replaced by one array operation and a plain tokenization, once they reproduced its output
  exactly on a real batch of that processor and image size.
* Option scoring continues these prompts: :mod:`csp_utils.vlm.scoring`.
* :func:`answer_turn`: greedy yes/no answers with :func:`internal_probs`, the model's
  probability of its own answer at the step where the "Yes" and "No" replies first differ
  (:func:`yes_no_tokens`).

``scripts/bench_elicitation.py`` compares this with the naive loop. What is asked, stored
and summarised lives in :mod:`csp_utils.evaluate.evaluation`.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.cache_utils import DynamicLayer

from csp_utils.vlm import prompts

# Models whose text positions are not one number per token (multimodal RoPE). For them the
# cached option scoring would need the model's own position bookkeeping, so options are
# scored by the exact one-at-a-time path instead (slower, same numbers).
MROPE_MODEL_TYPES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe"}


# ------------------------------------------------------------------------------ helpers
def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def _model_type(model) -> str:
    return str(getattr(model.config, "model_type", ""))


def uses_mrope(model) -> bool:
    """True for models with multimodal RoPE: their prompts neither share a prefix nor take
    pre-encoded images, and their options are scored one at a time."""
    return _model_type(model) in MROPE_MODEL_TYPES


def attn_implementation(model) -> str | None:
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "_attn_implementation", None)


def device_dtype(model):
    """Where inputs go and the float type pixels take: the model's own (a PEFT wrapper passes
    these through); a quantized model's first parameter may be uint8, so do not use that."""
    p = next(model.parameters())
    dtype = getattr(model, "dtype", None)
    return getattr(model, "device", p.device), dtype if dtype is not None and dtype.is_floating_point else None


def keeps_last_logits_only(model) -> dict:
    """``logits_to_keep=1`` where the forward takes it: a prompt forward then computes one
    position's logits instead of (B, T, V) (hundreds of MB for a 7B model)."""

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def cache_of(out):
    """The KV cache a forward returned (transformers 5 calls it ``cache``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def fork_cache(cache):
    """A cache that can grow without changing ``cache``. Dynamic layers replace their
    tensors when they grow (``torch.cat``), so sharing the tensors is safe and free; any
    other cache type is deep-copied."""

    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is DynamicLayer for layer in layers):
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in layers]
        return out
    return copy.deepcopy(cache)


def rows_repeated(cache, n: int):
    """A cache whose row b*n + j is row b of ``cache`` (j < n); ``cache`` is untouched.

    Dynamic layers are expanded directly (``expand`` + ``reshape``: one copy, ~20x faster
    on CPU than ``repeat_interleave``); other cache types get a deep copy and their own
    ``batch_repeat_interleave``.
    """

    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is DynamicLayer for layer in layers):
        def rep(x):
            return x.unsqueeze(1).expand(x.shape[0], n, *x.shape[1:]).reshape(x.shape[0] * n, *x.shape[1:])

        out = fork_cache(cache)
        for layer in out.layers:
            layer.keys, layer.values = rep(layer.keys), rep(layer.values)
        return out
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out


def position_ids_from_mask(attention_mask):
    """Positions that skip padding, as ``generate`` makes them (pads get 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def chat_texts(processor, messages: list[list[dict]]) -> list[str]:
    """Each conversation as the prompt the model continues: with the generation prompt, or,
    when it ends in an assistant turn (the inline layout's open reply), that turn left open."""
    return [chat_text(processor, m) for m in messages]


def chat_text(processor, messages: list[dict]) -> str:
    if messages and messages[-1].get("role") == "assistant":
        return processor.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def invocation_tokens(processor, framing: str = "third", config: prompts.PromptConfig | None = None) -> list[int]:
    """The token ids of the follow-up confidence question as they stand in a conversation: the
    invocation sequence of an activated adapter (PEFT's ``alora_invocation_tokens``).

    Read off a chat-templated follow-up conversation (the tokens that lie inside the question's
    characters), then checked to occur in that conversation's own encoding: a sequence PEFT
    did not find would leave the adapter off without a word."""
    query, response = "Is there a cat in the image?", "Yes"
    question = prompts.confidence_text(query, response, framing, config, "follow_up")
    text = chat_text(processor, prompts.confidence_messages(query, response, framing=framing, config=config,
                                                             layout="follow_up"))
    start = text.rindex(question)
    end = start + len(question)
    tok = tokenizer_of(processor)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [i for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if start <= a and b <= end and b > a]
    full = tok(text)["input_ids"]
    if not ids or not any(full[k:k + len(ids)] == ids for k in range(len(full) - len(ids) + 1)):
        raise ValueError(f"the follow-up question {question!r} has no stable token sequence in this processor's "
                         "chat template; an activated adapter cannot be invoked by it")
    return ids


def activated_invocation(model) -> list[int] | None:
    """The invocation tokens of the model's active adapter where it is an activated one
    (PEFT's aLoRA, ``alora_invocation_tokens``), else None. Every state before the last
    occurrence of these tokens is then the base model's."""
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    if not isinstance(configs, dict) or not isinstance(active, str) or active not in configs:
        return None
    tokens = getattr(configs[active], "alora_invocation_tokens", None)
    return [int(t) for t in tokens] if tokens else None


def last_occurrence(ids: list[int], seq: list[int]) -> int | None:
    """Where the last occurrence of ``seq`` in ``ids`` starts, or None."""
    n = len(seq)
    return next((k for k in range(len(ids) - n, -1, -1) if ids[k:k + n] == seq), None)


def continued_prompts(processor, before: Prompts, cache, before_texts, texts,
                      invocation: list[int] | None = None) -> Prompts | None:
    """Prompts that continue ``before`` (prompts whose KV ``cache`` holds all their positions)
    with the rest of ``texts``: each text must be its ``before`` text plus a tail, and tokenize
    as the ``before`` text's tokens followed by the tail's own (a tokenizer that merges across
    the seam gives None). The padding of ``before`` stays where it is, so each row's tail
    follows a gap (positions skip it, as on a shared prefix). With an activated adapter's
    ``invocation`` the last occurrence of it must lie inside the tail (or nowhere): PEFT then
    finds it in the tail alone just as in the whole prompt."""
    if cache is None or len(texts) != len(before_texts):
        return None
    tails = []
    for head, text in zip(before_texts, texts):
        if not text.startswith(head) or len(text) == len(head):
            return None
        tails.append(text[len(head):])
    tok = tokenizer_of(processor)
    tail_ids = tok(tails, add_special_tokens=False)["input_ids"]
    heads = tok(list(before_texts), add_special_tokens=False)["input_ids"]
    wholes = tok(list(texts), add_special_tokens=False)["input_ids"]
    if any(not t or w != h + t for w, h, t in zip(wholes, heads, tail_ids)):
        return None
    if invocation is not None:
        starts = [last_occurrence(w, invocation) for w in wholes]
        if any(k is not None and k < len(h) for k, h in zip(starts, heads)):
            return None
    dev = before.input_ids.device
    ids, mask = (t.to(dev) for t in _left_padded(tail_ids, tok))
    T = before.input_ids.shape[1]
    return Prompts(torch.cat([before.input_ids, ids], 1), torch.cat([before.attention_mask, mask], 1), {},
                   prefix_cache=cache, prefix_len=T)


def encode(processor, messages: list[list[dict]], images: list, device=None, dtype=None, texts=None):
    """Chat-template each conversation (with the generation prompt) and batch it, left-padded.

    Images go one per conversation, nested (``[[img], [img], ...]``), which every processor
    we support reads as "image i belongs to text i".
    """
    tok = tokenizer_of(processor)
    tok.padding_side = "left"  # batched generation continues from the right edge
    texts = texts if texts is not None else chat_texts(processor, messages)
    enc = processor(text=texts, images=[[im] for im in images], padding=True, return_tensors="pt")
    if device is not None:
        enc = enc.to(device)
    if dtype is not None:  # only floating tensors (pixel values) are cast
        enc = enc.to(dtype=dtype)
    return enc


def model_inputs(model, processor, messages, images, texts=None, shortcuts: bool = False):
    device, dtype = device_dtype(model)
    if shortcuts:
        texts = texts if texts is not None else chat_texts(processor, messages)
        enc = _shortcut_inputs(processor, texts, images)
        if enc is None:
            enc = encode(processor, messages, images, texts=texts)
            _check_shortcuts(processor, texts, images, enc)
        if device is not None:
            enc = enc.to(device)
        return enc.to(dtype=dtype) if dtype is not None else enc
    return encode(processor, messages, images, device=device, dtype=dtype, texts=texts)


# ------------------------------------------------- processor shortcuts, checked per processor
# Per batch, a LLaVA-style processor preprocesses the images one at a time (PIL + numpy, no
# torchvision here) and tokenizes each text with its image placeholder written out once per
# image token: on the embedded default that costs as much as the model's forward. The same
# tensors come from one array operation over the batch and from tokenizing the text as written
# (:func:`_tokenize_expanded`). The fast path uses them for a processor and image size only
# after they reproduced the processor's own output exactly on a real batch; otherwise, and for
# every other processor, the processor runs.
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # processor -> {image key: tokens or False}


def _checked_tokens(processor, images):
    """Image tokens per image for which the shortcuts were checked on this processor and
    these images' key; None if not checked, False if they differed."""
    try:
        return _CHECKED.get(processor, {}).get(_image_key(images))
    except TypeError:  # a processor that cannot be weakly referenced or hashed: never checked
        return None


def _image_key(images):
    """(size, mode) shared by every image of the batch, or None (mixed sizes, not PIL)."""

    if not images or not all(isinstance(im, Image.Image) for im in images):
        return None
    keys = {(im.size, im.mode) for im in images}
    return next(iter(keys)) if len(keys) == 1 else None


def _batched_pixels(image_processor, images):
    """``pixel_values`` of same-size images that the processor's resize and crop leave as they
    are: rescaled and normalised in one array op, with the arithmetic of transformers' numpy
    functions (rescale in float64, then float32; ``(x - mean) / std`` in float32). Whether resize
    and crop really are identities is not assumed: :func:`_check_shortcuts` compares."""

    x = np.stack([np.asarray(im) for im in images])                       # (B, H, W, C) uint8
    if x.ndim != 4:
        return None
    if getattr(image_processor, "do_rescale", False):
        x = x.astype(np.float64) * image_processor.rescale_factor
    x = x.astype(np.float32)
    if getattr(image_processor, "do_normalize", False):
        x = (x - np.asarray(image_processor.image_mean, dtype=np.float32)) / np.asarray(
            image_processor.image_std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _shortcut_inputs(processor, texts, images):
    """The processor's inputs for this batch made by the shortcuts, where they were checked
    for this processor and image key; else None."""

    n = _checked_tokens(processor, images)
    if not n:
        return None
    expanded = _tokenize_expanded(processor, texts, [n] * len(texts))
    if expanded is None:
        return None
    ids, mask = expanded
    pixels = _batched_pixels(processor.image_processor, images)
    return transformers.BatchFeature({"input_ids": ids, "attention_mask": mask, "pixel_values": pixels})


def _check_shortcuts(processor, texts, images, enc) -> None:
    """Record whether the shortcuts give exactly ``enc`` (the processor's output for this batch):
    the number of image tokens per image, or False."""

    key = _image_key(images)
    try:
        table = _CHECKED.setdefault(processor, {})
    except TypeError:  # a processor that cannot be weakly referenced: no shortcuts
        return
    if key is None or key in table:
        return
    image_id = getattr(processor, "image_token_id", None)
    image_processor = getattr(processor, "image_processor", None)
    table[key] = False
    if image_id is None or image_processor is None or set(enc) != {"input_ids", "attention_mask", "pixel_values"}:
        return
    counts = (enc["input_ids"] == image_id).sum(1).tolist()
    if len(set(counts)) != 1 or counts[0] < 1:
        return
    expanded = _tokenize_expanded(processor, texts, counts)
    pixels = _batched_pixels(image_processor, images)
    if expanded is None or pixels is None:
        return
    ids, mask = expanded
    same = (ids.shape == enc["input_ids"].shape and torch.equal(ids, enc["input_ids"].cpu())
            and torch.equal(mask, enc["attention_mask"].cpu()) and pixels.shape == enc["pixel_values"].shape
            and pixels.dtype == enc["pixel_values"].dtype and torch.equal(pixels, enc["pixel_values"].cpu()))
    if same:
        table[key] = counts[0]


# ---------------------------------------------------------------- reply token sequences
def reply_tokens(processor, reply: str, include_end: bool = False) -> list[int]:
    """Token ids of ``reply`` as the chat template writes it after the generation prompt.

    Rendered once with and once without an assistant turn; the difference is the reply as
    the model would produce it (leading space, template decoration). It is cut after the
    shortest run of tokens that decodes to contain ``reply``; with ``include_end`` the
    template's next special token (its end-of-turn), else the tokenizer's EOS, is appended.
    """
    user = [prompts.user_turn("x")]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(user + [prompts.assistant_turn(reply)], tokenize=False)
    return _continuation_tokens(processor, prompt, full, reply, include_end)


def inline_reply_tokens(processor, reply: str, include_end: bool = False,
                        prompt_config: prompts.PromptConfig | None = None) -> list[int]:
    """Token ids of the confidence ``reply`` as the inline layout writes it: inside the one
    assistant reply, after the answer (``prompts.confidence_messages(layout="inline")``).
    The same after "Yes" and after "No", or an error (options are scored as one set)."""
    seqs = []
    for answer in ("Yes", "No"):
        head = prompts.confidence_messages("x", answer, layout="inline", config=prompt_config)
        whole = prompts.confidence_messages("x", answer, confidence=reply, layout="inline", config=prompt_config)
        seqs.append(_continuation_tokens(processor, chat_text(processor, head),
                                         processor.apply_chat_template(whole, tokenize=False), reply, include_end))
    if seqs[0] != seqs[1]:
        raise ValueError(f"the inline reply {reply!r} tokenizes differently after 'Yes' and 'No': {seqs}")
    return seqs[0]


def _continuation_tokens(processor, prompt: str, full: str, reply: str, include_end: bool) -> list[int]:
    """The tokens ``full`` adds to ``prompt``, cut after the shortest run that decodes to
    contain ``reply`` (plus the end token with ``include_end``)."""
    tok = tokenizer_of(processor)
    if not full.startswith(prompt):
        raise ValueError(
            "The chat template does not write an assistant turn as a continuation of the "
            f"generation prompt; cannot score replies.\nprompt: {prompt!r}\nfull: {full!r}"
        )
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    if f_ids[: len(p_ids)] == p_ids:
        rest = f_ids[len(p_ids):]
    else:  # the tokenizer merged across the boundary: tokenize the reply part alone
        rest = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    for n in range(1, len(rest) + 1):
        if reply in tok.decode(rest[:n]):
            break
    else:
        raise ValueError(f"The chat template changed the reply {reply!r}: rendered {full[len(prompt):]!r}")
    ids = list(rest[:n])
    if include_end:
        special = set(tok.all_special_ids)
        end = next((t for t in rest[n:] if t in special), tok.eos_token_id)
        if end is None:
            raise ValueError("include_end=True but the template has no end token and the tokenizer no EOS")
        ids.append(int(end))
    return ids


def option_token_ids(processor, options: Sequence[int], include_end: bool = False, layout: str = "single_turn",
                     prompt_config: prompts.PromptConfig | None = None) -> list[list[int]]:
    """Token sequences of the confidence options, written as ``prompts.format_confidence``:
    as the reply after the generation prompt, or, in the inline layout, after the answer
    inside the same reply."""
    prompts.check_layout(layout)
    if layout == "inline":
        return [inline_reply_tokens(processor, prompts.format_confidence(int(o)), include_end, prompt_config)
                for o in options]
    return [reply_tokens(processor, prompts.format_confidence(int(o)), include_end) for o in options]


@dataclass
class YesNoTokens:
    """Where and with which tokens the internal yes/no probability is read."""

    prefix: list[int]        # tokens shared by the "Yes" and "No" replies (often none)
    yes: list[int]           # token ids at position len(prefix) that mean yes
    no: list[int]
    reply: tuple[int, int] = (-1, -1)   # the "Yes" and the "No" reply's own token there


def common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The tokens every one of ``seqs`` starts with."""
    c = 0
    while all(len(q) > c and q[c] == seqs[0][c] for q in seqs):
        c += 1
    return list(seqs[0][:c])


def yes_no_tokens(processor) -> YesNoTokens:
    seqs = {v: reply_tokens(processor, v) for v in ("Yes", "yes", "No", "no")}
    a, b = seqs["Yes"], seqs["No"]
    prefix = common_prefix([a, b])
    c = len(prefix)
    if c >= min(len(a), len(b)):
        raise ValueError(f"'Yes' and 'No' replies do not differ in tokens: {a} vs {b}")
    tok = tokenizer_of(processor)

    def at_c(main, variant):
        # the lower-case variant counts only when it is one whole-word token at the same step
        ids = {seqs[main][c]}
        v = seqs[variant]
        if len(v) > c and v[:c] == prefix and tok.decode([v[c]]).strip().lower() == variant:
            ids.add(v[c])
        return sorted(ids)

    yes, no = at_c("Yes", "yes"), at_c("No", "no")
    if set(yes) & set(no):
        raise ValueError(f"yes and no share a token at the decision step: {yes} / {no}")
    return YesNoTokens(prefix=prefix, yes=yes, no=no, reply=(a[c], b[c]))


# ------------------------------------------------------------------ prompts as inputs
@dataclass
class Prompts:
    """A batch of prompts ready for the model.

    Either plain (``prefix_cache`` None): left-padded ids + the image inputs; or on a
    shared prefix: ``input_ids[:, :prefix_len]`` (template head + image) is already in
    ``prefix_cache`` and the rest is the left-padded per-prompt text, so the padding sits
    between the prefix and the text (positions skip it, as everywhere here).
    """

    input_ids: object
    attention_mask: object
    image_inputs: dict
    prefix_cache: object = None
    prefix_len: int = 0
    image_tokens: list | None = None   # per row, where the ids are the text's with the placeholder
                                       # repeated (the processor shortcut, checked)


def plain_prompts(model, processor, messages, images, texts=None, encoded=None, shortcuts: bool = False) -> Prompts:
    """Plain prompts; with ``encoded`` (from :func:`encode_images`, for the same images in
    the same order) the image inputs are replaced by those encoder outputs, so the vision
    tower does not run again. ``shortcuts``: the processor's output may come from the checked
    shortcuts (same tensors, see :func:`_check_shortcuts`)."""
    enc = model_inputs(model, processor, messages, images, texts, shortcuts)
    rest = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    if encoded is not None:
        rest = encoded.replace(rest)
    n = _checked_tokens(processor, images) if shortcuts else None
    if n and not bool(((enc["input_ids"] == processor.image_token_id).sum(1) == n).all()):
        n = None
    return Prompts(enc["input_ids"], enc["attention_mask"], rest, image_tokens=[n] * len(images) if n else None)


@dataclass
class EncodedImages:
    """A batch's images through the model's vision encoder, once (transformers'
    ``mm_encoder_outputs``): the answer prompts and the confidence prompts of the same
    images then skip the vision tower. Exact: the encoder sees the same pixel inputs."""

    keys: tuple                 # the image inputs the encoder consumed (e.g. pixel_values)
    inputs: dict                # those inputs, to check that later prompts carry the same
    outputs: dict               # {"image": encoder output}, as forward/generate take it
    image_tokens: list | None = None   # per row: how many image tokens the processor wrote, where
                                       # the tokenizer alone reproduces the processor (see text_prompts)

    def text_prompts(self, processor, messages) -> Prompts | None:
        """Prompts for other conversations on the same images without running the image
        processor again: the placeholder is expanded to this batch's image-token count and
        only the tokenizer runs. None unless :func:`encode_images` checked on the batch it
        encoded that this gives exactly the processor's ids (LLaVA-style processors do)."""
        if self.image_tokens is None or len(messages) != len(self.image_tokens):
            return None
        expanded = _tokenize_expanded(processor, chat_texts(processor, messages), self.image_tokens)
        if expanded is None:
            return None
        ids, mask = expanded
        dev = self.inputs["pixel_values"].device
        return Prompts(ids.to(dev), mask.to(dev), {"mm_encoder_outputs": dict(self.outputs)})

    def replace(self, image_inputs: dict) -> dict:
        for k in self.keys:
            if k not in image_inputs or not torch.equal(image_inputs[k], self.inputs[k]):
                raise ValueError(f"these prompts' {k} differ from the encoded images'; encode them separately")
        rest = {k: v for k, v in image_inputs.items() if k not in self.keys}
        rest["mm_encoder_outputs"] = dict(self.outputs)  # forward may add to its dict
        return rest


def _tokenize_expanded(processor, texts, counts):
    """Left-padded ids of ``texts`` with the i-th image placeholder written ``counts[i]`` times,
    or None where a text does not tokenize its placeholder to exactly one image token.

    The texts are tokenized as written and the image token is repeated in the ids: the
    placeholder is an added token, split off before the rest is tokenized, so this equals
    tokenizing the expanded text (what LLaVA-style processors do), at a third of the cost
    (:func:`encode_images` checks the equality against the processor on every batch)."""
    tok = tokenizer_of(processor)
    image_id = getattr(processor, "image_token_id", None)
    rows = []
    for ids, n in zip(tok(list(texts))["input_ids"], counts):
        if ids.count(image_id) != 1:
            return None
        at = ids.index(image_id)
        rows.append(ids[:at] + [image_id] * n + ids[at + 1:])
    return _left_padded(rows, tok)


def _left_padded(rows: list[list[int]], tok):
    """(ids, attention mask) of token-id lists, left padded with the tokenizer's pad id."""

    L = max(len(r) for r in rows)
    ids = np.full((len(rows), L), tok.pad_token_id if tok.pad_token_id is not None else 0, dtype=np.int64)
    mask = np.zeros((len(rows), L), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = r
        mask[i, L - len(r):] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def encode_images(model, image_inputs: dict, processor=None, prompts_: Prompts | None = None,
                  texts=None) -> EncodedImages | None:
    """Run the vision encoder on a batch's image inputs, or None where the model does not
    take pre-encoded images (``mm_encoder_outputs``) or the inputs hold no pixels. This is
    what ``generate`` does before its prefill, done once for all prompts of the batch.

    Given the ``processor``, the batch's ``prompts_`` and their chat ``texts``, it also
    checks whether expanding the image placeholder and tokenizing reproduces the processor's
    ids exactly; if so, later prompts on these images skip the image processor too
    (:meth:`EncodedImages.text_prompts`)."""

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "mm_encoder_outputs" not in inspect.signature(base.forward).parameters:
        return None
    fn = getattr(getattr(base, "model", base), "get_image_features", None) or getattr(base, "get_image_features", None)
    if fn is None:
        return None
    keys = tuple(k for k in inspect.signature(fn).parameters if k != "kwargs" and k in image_inputs)
    if "pixel_values" not in keys:
        return None

    inputs = {k: image_inputs[k] for k in keys}
    with torch.no_grad():
        out = _encode_distinct(base, fn, inputs["pixel_values"]) if keys == ("pixel_values",) else None
        if out is None:
            out = fn(**inputs, return_dict=True)
    encoded = EncodedImages(keys, inputs, {"image": out})
    image_id = getattr(processor, "image_token_id", None)
    if prompts_ is not None and prompts_.image_tokens is not None and set(image_inputs) == set(keys):
        encoded.image_tokens = list(prompts_.image_tokens)   # checked when the prompts were made
    elif (image_id is not None and prompts_ is not None and texts is not None
            and set(image_inputs) == set(keys) and all(t.count(processor.image_token) == 1 for t in texts)):
        counts = (prompts_.input_ids == image_id).sum(1).tolist()
        expanded = _tokenize_expanded(processor, texts, counts)
        if expanded is not None:
            ids, mask = (t.to(prompts_.input_ids.device) for t in expanded)
            if ids.shape == prompts_.input_ids.shape and torch.equal(ids, prompts_.input_ids) \
                    and torch.equal(mask, prompts_.attention_mask):
                encoded.image_tokens = counts
    return encoded


# POPE asks six questions per image and AMBER several, and benchmarks list them together, so
# a batch holds few distinct images: the vision encoder runs on each once. Whether the
# encoder's output is one entry per image (so that it can be given back per row) is checked
# once per model against encoding the whole batch.
_DISTINCT_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> bool


class _NotPerImage(Exception):
    pass


def _distinct_rows(x) -> tuple[list[int], list[int]]:
    """The first row of each distinct value of ``x`` (exact, by bytes) and, for every row,
    the place of its value among them."""
    first, place, inverse = [], {}, []
    for i, row in enumerate(x.detach().reshape(x.shape[0], -1).cpu().numpy()):
        key = row.tobytes()
        if key not in place:
            place[key] = len(first)
            first.append(i)
        inverse.append(place[key])
    return first, inverse


def _per_row(out, inverse: list[int], n: int):
    """The encoder output of ``n`` distinct images given back one entry per batch row."""

    index = torch.tensor(inverse)

    def pick(v):
        if v is None:
            return None
        if torch.is_tensor(v) and v.ndim and v.shape[0] == n:
            return v[index.to(v.device)]
        if isinstance(v, list) and len(v) == n:
            return [v[i] for i in inverse]
        if isinstance(v, tuple):
            return tuple(pick(x) for x in v)
        raise _NotPerImage

    return type(out)(**{k: pick(v) for k, v in out.items()})


def _close(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if hasattr(a, "keys") and hasattr(b, "keys"):
        return set(a.keys()) == set(b.keys()) and all(_close(a[k], b[k]) for k in a.keys())
    return a is None and b is None


def _encode_distinct(base, fn, pixel_values):
    """``fn`` (the model's image encoder) on each distinct image of the batch once, its output
    given back per row; None where no image repeats or this model's output is not one entry
    per image."""
    first, inverse = _distinct_rows(pixel_values)
    ok = _DISTINCT_OK.get(base)
    if len(first) == pixel_values.shape[0] or ok is False:
        return None
    try:
        out = _per_row(fn(pixel_values=pixel_values[first], return_dict=True), inverse, len(first))
    except _NotPerImage:
        out = None
    if ok is None:   # first batch with a repeated image: compare with encoding every row
        full = fn(pixel_values=pixel_values, return_dict=True)
        _DISTINCT_OK[base] = out is not None and _close(out, full)
        return out if _DISTINCT_OK[base] else full
    return out


@dataclass
class SharedPrefix:
    """The KV cache of what every prompt of a batch shares: the chat template's head and the
    image (``head_text`` + image placeholder), computed once and reused by the answer and
    confidence prompts of the same images ("the confidence turn reuses the answer turn's
    prefix"). Built by :func:`shared_prefix` only where that is exact (see there)."""

    head_text: str
    placeholder: str
    ids: object            # (P,) token ids of the prefix
    cache: object          # KV cache of the prefix, one row per image
    processor: object

    def prompts(self, messages, texts=None, tails=None) -> Prompts | None:
        """Prompts on this prefix, or None when one does not start with it or its text
        would not tokenize the same on its own (then use :func:`plain_prompts`)."""

        tok = tokenizer_of(self.processor)
        texts = texts if texts is not None else chat_texts(self.processor, messages)
        tails = tails if tails is not None else _tails(texts, self.placeholder, self.head_text, tok)
        if tails is None or len(tails) != self.cache_rows:
            return None
        dev = self.ids.device
        ids, mask = (t.to(dev) for t in _left_padded(tails, tok))
        P = self.ids.numel()
        return Prompts(
            torch.cat([self.ids.expand(len(tails), P), ids], 1),
            torch.cat([torch.ones((len(tails), P), dtype=torch.long, device=dev), mask], 1),
            {},
            prefix_cache=self.cache,
            prefix_len=P,
        )

    @property
    def cache_rows(self) -> int:
        return int(self.cache.layers[0].keys.shape[0]) if getattr(self.cache, "layers", None) else -1


def _tails(texts, placeholder, head_text, tok, check_whole: bool = True) -> list[list[int]] | None:
    """Token ids of each text after the image placeholder, when the text is ``head_text +
    placeholder + tail`` and the tail tokenizes the same as inside the whole text."""
    tails = []
    for t in texts:
        if t.count(placeholder) != 1:
            return None
        head, tail = t.split(placeholder)
        if head != head_text:
            return None
        tails.append(tail)
    # tokenized behind the placeholder, as in the whole text (a SentencePiece tokenizer
    # would put a "▁" before a tail tokenized alone)
    ph = tok.convert_tokens_to_ids(placeholder)
    out = []
    for ids in tok([placeholder + t for t in tails], add_special_tokens=False)["input_ids"]:
        if ph not in ids or ids.index(ph) + 1 == len(ids):
            return None
        out.append(ids[ids.index(ph) + 1:])
    if check_whole:
        for ids, whole in zip(out, tok(list(texts), add_special_tokens=False)["input_ids"]):
            if whole[len(whole) - len(ids):] != ids:
                return None  # the tokenizer joins the tail to what precedes it
    return out


def shared_prefix(model, processor, messages, images, texts=None,
                  shortcuts: bool = False) -> tuple[SharedPrefix | None, Prompts]:
    """``(prefix, prompts)`` for a batch: the batch as prompts on a shared prefix when that
    is exact, else ``(None, plain prompts)``.

    Exact means: each chat text is ``head + image placeholder + tail`` with the same head;
    the processor's ids of every prompt end with the tail's ids tokenized alone; what
    precedes (template head, expanded image tokens) is the same token sequence in every
    row; the processor returns no other per-token inputs; the model has 1-D positions.
    The prefix pass runs the image once; later prompts on the same images (the
    confidence questions) then skip the vision tower and the image tokens.
    """

    texts = texts if texts is not None else chat_texts(processor, messages)
    placeholder = getattr(processor, "image_token", None)
    tails = None
    if placeholder and not uses_mrope(model):
        # checked against the processor's own ids below; a text-first template fails here
        tails = _tails(texts, placeholder, texts[0].split(placeholder)[0], tokenizer_of(processor), check_whole=False)
    plain = plain_prompts(model, processor, messages, images, texts, shortcuts=shortcuts)
    if tails is None:
        return None, plain
    head = texts[0].split(placeholder)[0]
    B, T = plain.input_ids.shape
    if any(getattr(v, "shape", (0,))[:2] == (B, T) for v in plain.image_inputs.values()):
        return None, plain
    rows = [ids[m.bool()].tolist() for ids, m in zip(plain.input_ids, plain.attention_mask)]
    heads = {tuple(r[: len(r) - len(t)]) for r, t in zip(rows, tails) if r[len(r) - len(t):] == t}
    if len(heads) != 1 or sum(r[len(r) - len(t):] == t for r, t in zip(rows, tails)) != len(rows):
        return None, plain
    ids = torch.tensor(next(iter(heads)), device=plain.input_ids.device)
    with torch.no_grad():
        out = model(input_ids=ids.expand(B, ids.numel()), attention_mask=torch.ones((B, ids.numel()), dtype=torch.long,
                    device=ids.device), **plain.image_inputs, use_cache=True, **keeps_last_logits_only(model))
    prefix = SharedPrefix(head, placeholder, ids, cache_of(out), processor)
    on_prefix = prefix.prompts(messages, texts, tails)
    return (prefix, on_prefix) if on_prefix is not None else (None, plain)


# ------------------------------------------------------------------------- generation
def generate_on(model, processor, p: Prompts, max_new_tokens: int, keep_cache: bool = False):
    """Greedy replies for a batch: ``(texts, new_token_ids, step_logits)``, with ``keep_cache``
    also the KV cache of the prompt alone (:func:`prompt_cache`; None where it cannot be cut).

    ``step_logits[t]`` is the (B, V) raw logits of generation step t (float32, CPU).
    """

    tok = tokenizer_of(processor)
    kwargs = dict(input_ids=p.input_ids, attention_mask=p.attention_mask, **p.image_inputs)
    if p.prefix_cache is not None:  # generate feeds only what the cache does not hold
        kwargs["cache"] = fork_cache(p.prefix_cache)
    with torch.no_grad():
        out = model.generate(
            **kwargs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, p.input_ids.shape[1]:]
    texts = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    result = texts, new.cpu(), [lg.float().cpu() for lg in out.logits]
    if keep_cache:
        return (*result, prompt_cache(cache_of(out), p.input_ids.shape[1]))
    return result


def prompt_cache(cache, length: int):
    """The first ``length`` positions of a dynamic KV cache (``cache`` untouched): after
    ``generate``, the prompt's states exactly as its prefill computed them (later steps only
    append). None for other cache types."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer for layer in layers):
        return None
    if any(layer.keys.shape[-2] < length for layer in layers):
        return None
    out = fork_cache(cache)
    for layer in out.layers:
        layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
    return out


def generate_replies(model, processor, messages, images, max_new_tokens: int):
    """Greedy replies to chat conversations with one image each; see :func:`generate_on`."""
    return generate_on(model, processor, plain_prompts(model, processor, messages, images), max_new_tokens)


@dataclass
class AnswerTurn:
    """A batch's greedy yes/no answers (:func:`answer_turn`)."""

    raw: list[str]                      # the greedy replies
    parsed: list                        # each reply read by ``parse`` ("yes" | "no" | None)
    internal: list[tuple[float | None, float | None]]   # :func:`internal_probs` of each parsed answer
    step_logits: list                   # generate_on's per-step logits
    prefix: object = None               # the shared prefix the prompts continued from, or None
    encoded: "EncodedImages | None" = None   # the images through the vision encoder, or None
    kept: tuple | None = None           # with keep_cache: (prompts, prompt cache, texts), where the cache could be cut


def answer_turn(model, processor, messages, images, max_new_tokens: int, parse, yn: YesNoTokens,
                share_prefix: bool = True, reuse_image_features: bool = False, keep_cache: bool = False) -> AnswerTurn:
    """The model's greedy answers to a batch of answer prompts (one image each) and the
    internal probability of each parsed answer: the evaluation's answer turn, also what the
    grounded builder records. ``share_prefix``: template head + image once per batch where
    exact; without a shared prefix, ``reuse_image_features`` encodes the images once so that
    later prompts on them skip the vision tower (``encoded``). ``keep_cache`` keeps the answer
    prompts' own KV cache for a confidence turn that continues them (``kept``)."""
    texts = chat_texts(processor, messages)
    if share_prefix:
        prefix, p = shared_prefix(model, processor, messages, images, texts, shortcuts=True)
    else:
        prefix, p = None, plain_prompts(model, processor, messages, images, texts, shortcuts=True)
    encoded = None
    if prefix is None and reuse_image_features and not uses_mrope(model):
        encoded = encode_images(model, p.image_inputs, processor, p, texts)
        if encoded is not None:
            p.image_inputs = encoded.replace(p.image_inputs)
    raw, new_ids, step_logits, *cache = generate_on(model, processor, p, max_new_tokens, keep_cache=keep_cache)
    parsed = [parse(r) for r in raw]
    kept = (p, cache[0], texts) if keep_cache and cache[0] is not None else None
    return AnswerTurn(raw, parsed, internal_probs(step_logits, new_ids, parsed, yn), step_logits, prefix, encoded,
                      kept)


def internal_probs(step_logits, new_ids, answers, yn: YesNoTokens) -> list[tuple[float | None, float | None]]:
    """(restricted, raw) probability of each row's own parsed answer at the step where the
    "Yes" and "No" replies first differ: ``p(own) / (p(yes) + p(no))`` (case variants that are
    one token summed) and ``p(own)`` over the whole vocabulary; (None, None) for a reply that
    did not parse or did not start the way the Yes/No replies start."""

    c = len(yn.prefix)
    out = []
    for i, ans in enumerate(answers):
        ok = ans in ("yes", "no") and c < len(step_logits) and new_ids[i, :c].tolist() == yn.prefix
        if not ok:
            out.append((None, None))
            continue
        p = torch.softmax(step_logits[c][i], -1)
        p_yes, p_no = float(p[yn.yes].sum()), float(p[yn.no].sum())
        own = p_yes if ans == "yes" else p_no
        out.append((own / (p_yes + p_no) if p_yes + p_no > 0 else None, own))
    return out
