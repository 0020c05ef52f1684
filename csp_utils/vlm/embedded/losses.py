"""The losses of both training stages and the model pieces they read: the vision tower's
patch features, the per-patch heads of stage 1, the joint stage's next-token loss (also from
cached vision features), and the vision tower's 2-D sin-cos position init."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from csp_utils.vlm.embedded.data import ImageCodec, Pool


def patch_heads(hidden: int, n_cat: int, n_col: int, seed: int) -> torch.nn.ModuleDict:
    """Stage 1's linear heads on the patch features: each patch's shape and colour (background
    a class of its own) and, from the mean feature, which shapes / colours / coloured shapes
    the image holds."""
    torch.manual_seed(seed + 1)
    return torch.nn.ModuleDict({"category": torch.nn.Linear(hidden, n_cat + 1),
                                "color": torch.nn.Linear(hidden, n_col + 1),
                                "presence": torch.nn.Linear(hidden, n_cat + n_col + n_cat * n_col)})


def sincos_positions(grid: int, dim: int) -> np.ndarray:
    """(grid*grid, dim) 2-D sin-cos position table (half the channels for rows, half for
    columns), as MAE initialises ViT positions: neighbouring patches start out similar,
    which a tower trained from scratch on a few thousand steps otherwise has to learn."""
    def one_axis(pos: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        out = np.outer(pos.ravel(), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([one_axis(rows, dim // 2), one_axis(cols, dim - dim // 2)], 1).astype(np.float32)


def init_vision_positions(model, how: str) -> None:
    if how == "random":
        return
    if how != "sincos":
        raise ValueError(f"vision_position_init must be 'sincos' or 'random', got {how!r}")
    pe = model.model.vision_tower.embeddings.position_embedding
    n, dim = pe.weight.shape
    grid = int(round((n - 1) ** 0.5))
    with torch.no_grad():  # row 0 is the CLS token's
        pe.weight[1:] = 0.5 * torch.from_numpy(sincos_positions(grid, dim))
        pe.weight[0] = 0.0


def patch_features(model, pixel_values):
    """The vision features LLaVA feeds its projector (layer -1, CLS dropped)."""
    vt = model.model.vision_tower
    hs = vt(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    return hs[model.config.vision_feature_layer][:, 1:]


def tower_features(model, pool: Pool, codec: ImageCodec, batch_size: int = 256):
    """(N, T, D) float32 features of every pool image from the (frozen) vision tower."""
    out = []
    was = model.training
    model.eval()
    with torch.no_grad():
        for a in range(0, len(pool.images), batch_size):
            pix = codec.decode(torch.from_numpy(pool.images[a:a + batch_size]))
            out.append(patch_features(model, pix).contiguous())
    model.train(was)
    return torch.cat(out)


def embeds_with_features(model, input_ids, vision_features):
    """Input embeddings with the projected vision features scattered into the image tokens."""
    emb = model.get_input_embeddings()(input_ids)
    projected = model.model.multi_modal_projector(vision_features)
    where = (input_ids == model.config.image_token_id)[..., None].expand_as(emb)
    return emb.masked_scatter(where, projected.to(emb.dtype)), projected


def forward_with_features(model, input_ids, attention_mask, position_ids, vision_features):
    """LLaVA's forward from precomputed vision-tower features (layer ``vision_feature_layer``,
    CLS dropped): projector, scatter into the image-token positions, language model.
    Equals ``model(input_ids, pixel_values=...)`` when the features come from those pixels.
    Returns ``(logits, projected image features)``."""
    emb, projected = embeds_with_features(model, input_ids, vision_features)
    out = model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids)
    return out.logits, projected


def joint_loss(model, batch: dict, per_example: bool = True, vision_features=None, captured: dict | None = None):
    """Next-token cross-entropy on the learned (assistant) tokens.

    ``per_example``: each example's mean, then the batch mean, so a two-token "Yes"
    weighs as much as a fifteen-token caption; else the plain mean over all learned tokens
    (what ``model(labels=...)`` computes). ``vision_features``: precomputed features of a
    frozen vision tower, used instead of ``batch["pixel_values"]``; the projected image
    features are then put into ``captured["p"]``, and the vocabulary projection runs on the
    learned positions only (a few per row of ~100: a third of the step's time otherwise).
    """
    labels = batch["labels"]
    target = labels[:, 1:]
    if vision_features is not None:
        emb, projected = embeds_with_features(model, batch["input_ids"], vision_features)
        if captured is not None:
            captured["p"] = projected
        hidden = model.model.language_model(inputs_embeds=emb, attention_mask=batch["attention_mask"],
                                            position_ids=batch["position_ids"]).last_hidden_state
        learned = target != -100
        rows = learned.nonzero()[:, 0]
        tok = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][learned]).float(), target[learned],
                                                reduction="none")
        if not per_example:
            return tok.mean()
        counts = learned.sum(1).clamp(min=1).float()
        return (torch.zeros(len(labels), dtype=tok.dtype).index_add(0, rows, tok) / counts).mean()
    if not per_example:
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    mask = (target != -100).float()
    return ((tok * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()


def patch_class_weights(n_cat: int, n_col: int, background: float, cat_labels: np.ndarray | None = None,
                         balance: float = 0.0):
    """Patch-loss class weights: background down-weighted; with ``balance`` > 0, each shape
    weighted by (mean frequency / its frequency) ** balance over ``cat_labels`` (the world's
    shapes are Zipf-distributed: rare ones were the worst recognised), normalised to mean 1."""
    w_cat, w_col = torch.ones(n_cat + 1), torch.ones(n_col + 1)
    if balance > 0 and cat_labels is not None:
        counts = np.bincount(cat_labels.ravel(), minlength=n_cat + 1)[:n_cat].astype(np.float64)
        w = (counts.mean() / np.maximum(counts, 1.0)) ** balance
        w_cat[:n_cat] = torch.from_numpy(w / w.mean()).float()
    w_cat[n_cat] = background
    w_col[n_col] = background
    return w_cat, w_col


def patch_loss(heads, feats, cat_labels: np.ndarray, col_labels: np.ndarray, w_cat, w_col, logits=None,
                presence: np.ndarray | None = None, presence_weight: float = 0.0):
    """Per-patch shape + colour cross-entropy (background patches down-weighted), plus the
    image-level presence of shapes / colours / coloured shapes read linearly from the mean
    patch feature (what one uniform attention head of the language model can read)."""
    lc, lk = logits if logits is not None else (heads["category"](feats), heads["color"](feats))
    yc, yk = torch.from_numpy(cat_labels), torch.from_numpy(col_labels)
    loss = (torch.nn.functional.cross_entropy(lc.flatten(0, 1), yc.flatten(), weight=w_cat)
            + torch.nn.functional.cross_entropy(lk.flatten(0, 1), yk.flatten(), weight=w_col))
    if presence is not None and presence_weight > 0:
        lp = heads["presence"](feats.mean(1))
        loss = loss + presence_weight * torch.nn.functional.binary_cross_entropy_with_logits(
            lp, torch.from_numpy(presence)) * (lp.shape[-1] / 14.0)  # sum-like scale over the few positives
    return loss


def word_token_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    return [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]


def word_embeddings(model, word_ids: list[list[int]]):
    emb = model.get_input_embeddings().weight
    return torch.stack([emb[ids].mean(0) for ids in word_ids])


def align_loss(model, projected, cat_labels: np.ndarray, col_labels: np.ndarray, cat_words, col_words):
    """Grounding alignment: each object patch, as projected into the language model's input
    space, scores its shape's and its colour's word embeddings highest (dot product, cross-
    entropy over the world's shapes / colours; background patches ignored). It ties image
    tokens to the words that questions use, so "Is there a star?" can find star patches."""
    yc, yk = torch.from_numpy(cat_labels), torch.from_numpy(col_labels)
    lc = projected @ word_embeddings(model, cat_words).T
    lk = projected @ word_embeddings(model, col_words).T
    yc = torch.where(yc >= len(cat_words), -100, yc)
    yk = torch.where(yk >= len(col_words), -100, yk)
    if not (yc >= 0).any():
        return projected.sum() * 0.0
    return (torch.nn.functional.cross_entropy(lc.flatten(0, 1), yc.flatten(), ignore_index=-100)
            + torch.nn.functional.cross_entropy(lk.flatten(0, 1), yk.flatten(), ignore_index=-100))
