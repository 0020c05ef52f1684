"""Option scoring: the model's distribution over the confidence options after a prompt.

:func:`score_options_on` puts a confidence prompt and all its options (``" 80%"`` ->
``["Ġ", "80", "%"]``, every token counted) in ONE forward, the options as a prefix tree behind
the prompt, continuing the prompt's KV cache; :func:`score_options_reference` is the literal
one-option-at-a-time computation it equals (tested). Prompts come from :mod:`csp_utils.vlm.engine`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from csp_utils.vlm.models import adapters_disabled
from csp_utils.vlm.engine import (Prompts, attn_implementation, cache_of, device_dtype, fork_cache, keeps_last_logits_only,
                                  last_occurrence, model_inputs, plain_prompts, position_ids_from_mask, rows_repeated,
                                  tokenizer_of, uses_mrope)


def score_options(model, processor, messages, images, option_ids, option_chunk: int | None = None,
                  method: str | None = None):
    """Log-likelihood (B, K) of each option's tokens as the reply to each conversation.

    Models with multimodal RoPE (Qwen2-VL family) use :func:`score_options_reference`;
    all others :func:`score_options_on` (prompt and options in one forward).
    """
    if uses_mrope(model):
        return score_options_reference(model, processor, messages, images, option_ids)
    p = plain_prompts(model, processor, messages, images)
    return score_options_on(model, processor, p, option_ids, option_chunk, method)


def score_options_on(model, processor, p: Prompts, option_ids, option_chunk: int | None = None,
                     method: str | None = None):
    """Option log-likelihoods for prompts (left padded, positions that skip the padding; on
    a shared prefix only the text after it), by one of:

    * ``"tree"`` (default where the attention takes a custom mask: sdpa, eager): ONE
      forward per batch over the prompt followed by all options' tokens as a prefix tree
      (tokens that options share are fed once). Prompt tokens see the prompt causally; each
      tree token sees the prompt and its own ancestors only, at positions counted from the
      end of the prompt along its branch. No KV cache is built.
    * ``"expand"`` (other attention kernels, e.g. flash-attention): the prompt runs once
      and its KV cache is repeated to B x k rows for a chunk of ``option_chunk`` options
      (all by default); each row is fed its option (right padded; padding after a token
      cannot change it under a causal mask). Memory grows k x the prompt's cache.

    Both equal :func:`score_options_reference` within float error (tested).
    """

    attn = attn_implementation(model)
    method = method or ("tree" if attn in ("sdpa", "eager") else "expand")
    if method not in ("tree", "expand"):
        raise ValueError(f"method must be 'tree' or 'expand', got {method!r}")
    with torch.no_grad():
        if method == "tree":
            return _score_tree(model, p, option_ids, attn).numpy().astype(np.float64)
        mask, pos = p.attention_mask, position_ids_from_mask(p.attention_mask)
        B, K = mask.shape[0], len(option_ids)
        scores = torch.zeros(B, K, dtype=torch.float32)
        if p.prefix_cache is None:
            out = model(input_ids=p.input_ids, attention_mask=mask, position_ids=pos, **p.image_inputs,
                        use_cache=True, **keeps_last_logits_only(model))
        else:
            P = p.prefix_len
            out = model(input_ids=p.input_ids[:, P:], attention_mask=mask, position_ids=pos[:, P:],
                        cache=fork_cache(p.prefix_cache), use_cache=True, **keeps_last_logits_only(model))
        first = out.logits[:, -1].float().log_softmax(-1).cpu()   # predicts each option's 1st token
        for k, ids in enumerate(option_ids):
            scores[:, k] = first[:, ids[0]]
        rest = [k for k, ids in enumerate(option_ids) if len(ids) > 1]
        if rest:
            scores += _continue_expand(model, processor, cache_of(out), mask, pos, option_ids, rest, option_chunk)
    return scores.numpy().astype(np.float64)


def before_invocation(model, p: Prompts, invocation: list[int]) -> Prompts | None:
    """``p`` with the columns before every row's activated-adapter ``invocation`` (the image,
    the question, the answer) run once, without gradient, into a KV cache: the prompts then
    continue from it (``prefix_len``). No adapter weight acts there, so the states are the
    base model's either way and take no gradient. None where that does not hold or cannot be
    checked: a row without the invocation, image tokens after the cut, per-token image
    inputs, a cache already there, multimodal RoPE, or a row that is all padding before the cut."""
    if p.prefix_cache is not None or uses_mrope(model):
        return None
    ids, mask = p.input_ids, p.attention_mask
    starts = [last_occurrence(row.tolist(), invocation) for row in ids]
    if any(s is None for s in starts):
        return None
    cut = min(starts)
    B, T = ids.shape
    image_id = getattr(model.config, "image_token_id", None)
    if (cut < 1 or not bool(mask[:, :cut].any(1).all())
            or (image_id is not None and bool((ids[:, cut:] == image_id).any()))
            or any(getattr(v, "shape", (0,))[:2] == (B, T) for v in p.image_inputs.values())):
        return None
    pos = position_ids_from_mask(mask)
    # the adapter switched off rather than left to find no invocation: the same base outputs
    # without the activated layers' per-call masking
    with torch.no_grad(), adapters_disabled(model):
        out = model(input_ids=ids[:, :cut], attention_mask=mask[:, :cut], position_ids=pos[:, :cut], **p.image_inputs,
                    use_cache=True, **keeps_last_logits_only(model))
    return Prompts(ids, mask, {}, prefix_cache=cache_of(out), prefix_len=cut)


def _option_tree(option_ids):
    """The options' fed tokens (all but each option's last) as a prefix tree:
    ``(tokens, parent, depth, node)``, ``node[prefix]`` = the place in ``tokens`` of the
    token that ends that prefix; parents come before their children."""
    node: dict[tuple, int] = {}
    tokens, parent, depth = [], [], []
    for ids in option_ids:
        for i in range(1, len(ids)):
            key = tuple(ids[:i])
            if key not in node:
                node[key] = len(tokens)
                tokens.append(ids[i - 1])
                parent.append(node.get(key[:-1], -1))
                depth.append(i - 1)
    return tokens, parent, depth, node


def _score_tree(model, p: Prompts, option_ids, attn):
    """See score_options_on, ``"tree"``: (B, K) float32 log-likelihoods."""

    mask = p.attention_mask
    dev, B, T = mask.device, mask.shape[0], mask.shape[1]
    P = p.prefix_len if p.prefix_cache is not None else 0   # already in the prefix cache
    tokens, parent, depth, node = _option_tree(option_ids)
    S, Q = len(tokens), T - P                                # tree tokens, prompt tokens fed
    # who sees whom: keys are [prompt (T, prefix included) | tree (S)], queries [prompt[P:] | tree]
    keys = mask.bool()
    causal = torch.ones(Q, T, dtype=torch.bool, device=dev).tril(P)
    # a left-padding token also sees itself, so that no row is all masked (sdpa would give
    # NaN there, and NaN times a zero weight is still NaN); its output is never read
    itself = torch.zeros(Q, T, dtype=torch.bool, device=dev)
    itself[torch.arange(Q), P + torch.arange(Q)] = True
    prompt_rows = causal[None] & (keys[:, None, :] | itself[None])
    anc = torch.eye(S, dtype=torch.bool)
    for s_, p_ in enumerate(parent):
        if p_ >= 0:
            anc[s_] |= anc[p_]
    allowed = torch.cat([
        torch.cat([prompt_rows, torch.zeros(B, Q, S, dtype=torch.bool, device=dev)], 2),
        torch.cat([keys[:, None, :].expand(B, S, T), anc.to(dev).expand(B, S, S)], 2),
    ], 1)[:, None]                                                                    # (B, 1, Q+S, T+S)
    if attn == "eager":  # eager attention adds its mask to the scores
        dtype = device_dtype(model)[1] or torch.float32
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
    pos = position_ids_from_mask(mask)
    tree_pos = pos[:, -1:] + 1 + torch.tensor(depth, dtype=pos.dtype, device=dev)[None, :]
    kwargs = {} if p.prefix_cache is None else dict(cache=fork_cache(p.prefix_cache))
    out = model(
        input_ids=torch.cat([p.input_ids[:, P:], torch.tensor(tokens, dtype=p.input_ids.dtype, device=dev).expand(B, S)], 1),
        attention_mask=allowed,
        position_ids=torch.cat([pos[:, P:], tree_pos], 1),
        use_cache=p.prefix_cache is not None,
        **(p.image_inputs if p.prefix_cache is None else {}),
        **kwargs,
        **({"logits_to_keep": S + 1} if keeps_last_logits_only(model) else {}),
    )
    lp = out.logits[:, -(S + 1):].float().log_softmax(-1).cpu()      # [last prompt token | tree]
    # option k's token i is predicted at the last prompt token (i = 0) or at its prefix's node
    at, target, owner = zip(*[(0 if i == 0 else 1 + node[tuple(ids[:i])], ids[i], k)
                              for k, ids in enumerate(option_ids) for i in range(len(ids))])
    per_token = lp[:, list(at)].gather(-1, torch.tensor(target).expand(B, -1)[..., None]).squeeze(-1)
    scores = torch.zeros(B, len(option_ids), dtype=torch.float32)
    scores.index_add_(1, torch.tensor(owner), per_token)
    return scores


def _continue_expand(model, processor, base_cache, mask, pos, option_ids, rest, option_chunk):
    """Options' tokens after the first, one row per (question, option) (see score_options_on)."""

    dev, B = mask.device, mask.shape[0]
    add = torch.zeros(B, len(option_ids), dtype=torch.float32)
    chunk = option_chunk or len(rest)
    pad = tokenizer_of(processor).pad_token_id or 0
    for start in range(0, len(rest), chunk):
        ks = rest[start:start + chunk]
        n = len(ks)
        L = max(len(option_ids[k]) - 1 for k in ks)
        feed = torch.full((n, L), pad, dtype=torch.long)
        fmask = torch.zeros(n, L, dtype=mask.dtype)
        for j, k in enumerate(ks):
            ids = option_ids[k][:-1]
            feed[j, : len(ids)] = torch.tensor(ids)
            fmask[j, : len(ids)] = 1
        # row b*n + j = question b, option ks[j]
        o = model(
            input_ids=feed.to(dev).repeat(B, 1),
            attention_mask=torch.cat([mask.repeat_interleave(n, 0), fmask.to(dev).repeat(B, 1)], 1),
            position_ids=pos[:, -1:].repeat_interleave(n, 0) + 1 + torch.arange(L, device=dev),
            cache=rows_repeated(base_cache, n),
            use_cache=True,
        )
        lp = o.logits.float().log_softmax(-1).cpu().view(B, n, L, -1)
        for j, k in enumerate(ks):
            tgt = torch.tensor(option_ids[k][1:])
            add[:, k] += lp[:, j, : len(tgt)].gather(-1, tgt.expand(B, -1)[..., None]).squeeze(-1).sum(-1)
        del o
    return add


def score_options_reference(model, processor, messages, images, option_ids):
    """The literal computation: one question, one option, one full forward, no cache."""

    rows = []
    with torch.no_grad():
        for msgs, img in zip(messages, images):
            enc = model_inputs(model, processor, [msgs], [img])
            n = enc["input_ids"].shape[1]
            row = []
            for ids in option_ids:
                full = dict(enc)
                t = torch.tensor([ids], device=enc["input_ids"].device)
                full["input_ids"] = torch.cat([enc["input_ids"], t], 1)
                full["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(t)], 1)
                for key in ("mm_token_type_ids", "token_type_ids"):  # per-token extras, if any
                    if key in full:
                        full[key] = torch.cat([full[key], torch.zeros_like(t)], 1)
                lp = model(**full).logits[0, n - 1:-1].float().log_softmax(-1).cpu()
                row.append(float(lp.gather(-1, torch.tensor(ids)[:, None]).sum()))
            rows.append(row)
    return np.array(rows, dtype=np.float64)


def option_distribution(logliks, options: Sequence[int]):
    """Softmax over option log-likelihoods -> (probs (B, K), expectation (B,), argmax (B,)) as fractions."""
    ll = np.asarray(logliks, dtype=np.float64)
    ll = ll - ll.max(axis=-1, keepdims=True)
    p = np.exp(ll)
    p /= p.sum(axis=-1, keepdims=True)
    frac = np.asarray(options, dtype=np.float64) / 100.0
    return p, p @ frac, frac[p.argmax(axis=-1)]
