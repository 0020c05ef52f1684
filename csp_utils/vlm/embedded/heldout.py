"""What a pre-trained model is measured by, and the meta it ships with.

Held-out scenes only: the accuracy gate reads world POPE on "base" scenes after every
training range, the final report reads world POPE and AMBER on the eval split (clean and
under each natural-uncertainty variant) and the verbalized confidence the model gives.
Items come from the study's benchmark builders (``csp_utils.world.benchmarks``), calibration error
from ``csp_utils.core.metrics``. The yes/no readout here is the plain next-token comparison of
" Yes" and " No" that the gate has always used, so that the gate decides as it did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from csp_utils.core import metrics
from csp_utils.core.versions import package_versions
from csp_utils.vlm import models, prompts
from csp_utils.vlm.embedded.checkpoint import META_FILE, MODEL_FILE, sha256_file
from csp_utils.vlm.embedded.config import PretrainConfig, world_config
from csp_utils.vlm.embedded.data import ChatEncoder, ImageCodec, patch_label_rows
from csp_utils.vlm.embedded.losses import patch_features
from csp_utils.vlm.engine import position_ids_from_mask, yes_no_tokens
from csp_utils.world import benchmarks
from csp_utils.world import scenes as sc, catalog, degradations

HELDOUT_SEED = 20260  # held-out questions do not depend on the training seed


def images_by_id(scs) -> dict:
    return {s.scene_id: s.image for s in scs}


def pope_sets(scs) -> dict[str, list]:
    """World POPE items (random, popular, adversarial) on scenes, as the study builds them."""
    stats = sc.world_statistics(scs)
    return {k: benchmarks.build_world_pope(scs, k, seed=HELDOUT_SEED, stats=stats).items for k in benchmarks.POPE_KINDS}


def _yes_no_ids(processor) -> tuple[int, int]:
    """The tokens the "Yes" and "No" replies start with (the next-token read-out needs the
    replies to differ at their first token, as the embedded tokenizer's do)."""
    yn = yes_no_tokens(processor)
    if yn.prefix:
        raise ValueError(f"the next-token yes/no read-out needs replies that differ at their first token, got {yn}")
    return yn.reply


def _images_for(items, images):
    if isinstance(images, Mapping):
        return [images[it.image_id] for it in items]
    if len(images) != len(items):
        raise ValueError(f"{len(images)} images for {len(items)} items; pass one per item or a mapping by image_id")
    return list(images)


def _as_pil(im):
    return im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im), "RGB")


def yes_no_probabilities(model, processor, items, images, batch_size: int = 64) -> np.ndarray:
    """P(" Yes") / (P(" Yes") + P(" No")) of the next token after the generation prompt, per item.

    Batched with left padding (the tokenizer's default) and position ids counted from each
    row's first real token, so padding does not change a row's scores.
    """
    tok = processor.tokenizer
    tok.padding_side = "left"
    yes_id, no_id = _yes_no_ids(processor)
    imgs = [_as_pil(im) for im in _images_for(items, images)]
    out = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for a in range(0, len(items), batch_size):
            chunk = items[a:a + batch_size]
            texts = [processor.apply_chat_template(prompts.answer_messages(it.question), add_generation_prompt=True,
                                                   tokenize=False) for it in chunk]
            enc = processor(text=texts, images=imgs[a:a + batch_size], padding=True, return_tensors="pt")
            pos = position_ids_from_mask(enc["attention_mask"])
            logits = model(**enc, position_ids=pos).logits[:, -1, :].float()
            two = torch.stack([logits[:, yes_id], logits[:, no_id]], -1)
            out.append(torch.softmax(two, -1)[:, 0].numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def unique_probabilities(model, processor, items, images, batch_size: int = 64) -> np.ndarray:
    """``yes_no_probabilities`` computed once per distinct (image, question)."""
    keys = [(it.image_id, it.question) for it in items]
    uniq = list(dict.fromkeys(keys))
    first = {k: it for it, k in zip(reversed(items), reversed(keys))}
    p = yes_no_probabilities(model, processor, [first[k] for k in uniq], images, batch_size)
    table = dict(zip(uniq, p))
    return np.array([table[k] for k in keys])


def yes_no_accuracy(model, processor, items, images, batch_size: int = 64) -> float:
    """Share of ``items`` (with ``.question`` and ``.label`` "yes"/"no") answered right.

    ``images``: one image per item (PIL or uint8 array), or a mapping image_id -> image.
    The answer is whichever of " Yes" / " No" has the higher next-token logit.
    """
    if not items:
        return float("nan")
    p = yes_no_probabilities(model, processor, items, images, batch_size)
    pred = np.where(p >= 0.5, "yes", "no")
    return float(np.mean(pred == np.array([it.label for it in items])))


def accuracy(p: np.ndarray, items) -> float:
    if len(items) == 0:
        return float("nan")
    return round(float(np.mean(np.where(p >= 0.5, "yes", "no") == np.array([it.label for it in items]))), 4)


def confidence_expectations(model, processor, items, images, responses, framing: str = "third",
                            levels: Sequence[int] = prompts.CONFIDENCE_LEVELS, batch_size: int = 128) -> np.ndarray:
    """Expected verbalized confidence (percent) per item, scoring each level as a reply
    (the report's summary of a base; the study elicits confidence with csp_utils.evaluate.evaluation)."""
    enc_ = ChatEncoder(processor)
    imgs = [_as_pil(im) for im in _images_for(items, images)]
    pairs = [(prompts.confidence_text(it.question, r, framing), prompts.format_confidence(int(c)))
             for it, r in zip(items, responses) for c in levels]
    enc = enc_.encode(pairs, check=1)
    codec = ImageCodec(processor)
    pix_all = codec.encode([np.asarray(im.convert("RGB")) for im in imgs])
    scores = np.zeros(len(pairs))
    pad = processor.tokenizer.pad_token_id
    model.eval()
    with torch.inference_mode():
        for a in range(0, len(pairs), batch_size):
            rows = list(range(a, min(len(pairs), a + batch_size)))
            width = max(len(enc[r][0]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            att = torch.zeros((len(rows), width), dtype=torch.long)
            learn = torch.zeros((len(rows), width), dtype=torch.bool)
            for k, r in enumerate(rows):
                i, m = enc[r]
                ids[k, width - len(i):] = torch.from_numpy(i)
                att[k, width - len(i):] = 1
                learn[k, width - len(i):] = torch.from_numpy(m)
            pix = codec.decode(torch.from_numpy(pix_all[[r // len(levels) for r in rows]]))
            pos = position_ids_from_mask(att)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=att, pixel_values=pix,
                                           position_ids=pos).logits.float(), -1)
            tok_lp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
            scores[rows] = (tok_lp * learn[:, 1:]).sum(-1).numpy()
    s = scores.reshape(len(items), len(levels))
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p @ np.asarray(levels, float)


def patch_accuracy(model, heads, scs, codec: ImageCodec, patch: int) -> dict:
    if not scs:
        return {}
    pix = codec.decode(torch.from_numpy(codec.encode([s.image for s in scs])))
    yc, yk = (torch.from_numpy(a) for a in patch_label_rows(scs, patch))
    with torch.no_grad():
        f = patch_features(model, pix)
        pc, pk = heads["category"](f).argmax(-1), heads["color"](f).argmax(-1)
        present = (heads["presence"](f.mean(1)) > 0).numpy()
    obj = yc < len(catalog.CATEGORIES)
    out = {"category": round(float((pc == yc).float().mean()), 4), "color": round(float((pk == yk).float().mean()), 4),
           "category_on_objects": round(float((pc == yc)[obj].float().mean()), 4) if obj.any() else None,
           "color_on_objects": round(float((pk == yk)[obj].float().mean()), 4) if obj.any() else None}
    # the presence head as a POPE answerer (an upper-bound-like probe of what the LM can read)
    row = {s.scene_id: i for i, s in enumerate(scs)}
    try:
        for kind, items in pope_sets(scs).items():
            pred = [present[row[it.image_id], catalog.CATEGORIES.index(it.objects[0])] for it in items]
            out[f"presence_pope_{kind}"] = round(float(np.mean([p == (it.label == "yes") for p, it in zip(pred, items)])), 4)
    except ValueError:  # scenes with fewer than 3 shapes (not POPE scenes)
        pass
    return out


def accuracy_by_kind(probs: np.ndarray, sets: Mapping[str, list]) -> dict[str, float]:
    """Accuracy of each set, ``probs`` holding the sets' items one after the other."""
    out, k0 = {}, 0
    for kind, items in sets.items():
        out[kind] = accuracy(probs[k0:k0 + len(items)], items)
        k0 += len(items)
    return out


def gate_accuracy(model, processor, sets: Mapping[str, list], images) -> float:
    """Mean world-POPE accuracy (random, popular, adversarial): the joint stage's gate."""
    probs = unique_probabilities(model, processor, [it for v in sets.values() for it in v], images)
    return float(np.mean(list(accuracy_by_kind(probs, sets).values())))


def pope_row(model, processor, pope: Mapping[str, list], images) -> tuple[dict, np.ndarray]:
    """Accuracy per POPE set and their mean, and the yes-probabilities of all items."""
    probs = unique_probabilities(model, processor, [it for v in pope.values() for it in v], images)
    row = accuracy_by_kind(probs, pope)
    row["mean"] = round(float(np.mean([row[k] for k in pope])), 4)
    return row, probs


def verbalized_confidence(model, processor, items, images) -> dict:
    """The model's own yes/no answer, then its expected confidence in it (third and first
    person), with the accuracy and calibration error of those confidences."""
    pv = yes_no_probabilities(model, processor, items, images)
    answers = ["Yes" if q >= 0.5 else "No" for q in pv]
    correct = np.array([(a.lower() == it.label) for a, it in zip(answers, items)])
    row = {"accuracy": round(float(correct.mean()), 4)}
    for framing in prompts.FRAMINGS:
        e = confidence_expectations(model, processor, items, images, answers, framing)
        row[f"mean_confidence_{framing}"] = round(float(e.mean()), 2)
        row[f"std_confidence_{framing}"] = round(float(e.std()), 2)
        row[f"ece_{framing}"] = round(float(metrics.ece(e / 100.0, correct)), 4)
    return row


def evaluate_pretrained(model, processor, cfg: PretrainConfig) -> dict:
    """Held-out numbers for csp_meta.json, on eval-split scenes with the study's benchmark
    builders: world POPE (random / popular / adversarial) and AMBER (existence / attribute /
    relation), POPE under each natural-uncertainty variant, and the verbalized confidence
    the base model gives (its own answer quoted)."""
    world = world_config(cfg)
    scs = benchmarks.pope_scenes(cfg.eval_scenes, world, split="eval")
    pope = pope_sets(scs)
    stats = sc.world_statistics(scs)
    amber = {k: benchmarks.build_world_amber(scs, k, seed=HELDOUT_SEED, stats=stats).items for k in benchmarks.AMBER_KINDS}
    clean = images_by_id(scs)
    rep: dict = {"split": "eval", "scenes": len(scs), "scene_selection": "benchmarks.pope_scenes (>= 3 categories)",
                 "severity": cfg.eval_severity, "items": {f"pope-{k}": len(v) for k, v in pope.items()}}
    rep["items"].update({f"amber-{k}": len(v) for k, v in amber.items()})
    row, probs = pope_row(model, processor, pope, clean)
    rep["pope_accuracy"] = {"clean": row}
    rep["pope_yes_ratio"] = {"clean": round(float((probs >= 0.5).mean()), 4)}
    rep["mean_answer_probability"] = {"clean": round(float(np.maximum(probs, 1 - probs).mean()), 4)}
    ap = unique_probabilities(model, processor, [it for v in amber.values() for it in v], clean)
    rep["amber_accuracy"] = accuracy_by_kind(ap, amber)
    variant_imgs = {}
    for kind in cfg.eval_variants:
        variant_imgs[kind] = {s.scene_id: degradations.degrade(s, kind, cfg.eval_severity, world).image for s in scs}
        row, probs = pope_row(model, processor, pope, variant_imgs[kind])
        rep["pope_accuracy"][kind] = row
        rep["pope_yes_ratio"][kind] = round(float((probs >= 0.5).mean()), 4)
        rep["mean_answer_probability"][kind] = round(float(np.maximum(probs, 1 - probs).mean()), 4)
    sub = pope["random"][: cfg.eval_confidence_items]
    sets = [("clean", clean)] + [(k, variant_imgs[k]) for k in ("blur", "occlusion") if k in variant_imgs]
    conf = {name: verbalized_confidence(model, processor, sub, imgs) for name, imgs in sets} if sub else {}
    if conf:
        rep["verbalized_confidence"] = conf
    return rep


def default_command(cfg: PretrainConfig) -> str:
    return f"python -m csp_utils.pretrain --seed {cfg.seed} --steps {cfg.joint_steps} --vision-steps {cfg.vision_steps}"


def warm_start_summary(folder: Path) -> dict:
    """What identifies the warm-start round and what it cost, for this model's meta."""
    meta = json.loads((folder / META_FILE).read_text())
    return {"config_fingerprint": meta["config_fingerprint"], "sha256": meta["sha256"],
            "steps": meta["steps"], "train_wall_s": meta["train_wall_s"],
            "pope_accuracy_clean": meta["eval"]["pope_accuracy"]["clean"]}


def model_meta(cfg: PretrainConfig, state: dict, model, report: dict, command: str | None,
               warm_start_dir: Path | None) -> dict:
    """The finished model's csp_meta.json (its checksum is added once the weights are written)."""
    return {
        "name": "csp_utils embedded tiny LLaVA" + ("" if cfg.overconfident_fraction else " (no confidence turns)"),
        "command": command or default_command(cfg),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "config_fingerprint": cfg.fingerprint(),
        "steps": {"vision": cfg.vision_steps, "joint": state["step"], "joint_budget": cfg.joint_steps,
                  "joint_cap": cfg.max_joint_steps, "batch_size": cfg.batch_size},
        "gates": state["gates"],
        "vision_patch_accuracy": state.get("vision_patch_accuracy"),
        "joint_patch_accuracy": state.get("joint_patch_accuracy"),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "train_wall_s": round(state.get("elapsed_s", 0.0), 1),
        "warm_start": warm_start_summary(warm_start_dir) if warm_start_dir is not None else None,
        "init_from": state.get("init_from"),
        "eval": report,
        "history": state["history"],
        "versions": package_versions(),
    }


def save_model(model, processor, out: Path, meta: dict) -> dict:
    """Write the model folder, then its meta with the weights' checksum and size."""
    model.config.use_cache = True
    models.save_vlm(model, processor, out, meta)
    meta["sha256"] = sha256_file(out / MODEL_FILE)
    meta["size_bytes"] = int((out / MODEL_FILE).stat().st_size)
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return meta
