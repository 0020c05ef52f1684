"""Training the embedded default VLM from scratch on the object world (CPU, minutes).

The recipe follows the probe in ``shared/notes/stack.md``; yes/no answers alone leave a
tiny LLaVA at chance, so training runs in two stages, as real VLMs are built:

1. **Vision pre-training.** The CLIP vision tower alone, with two linear heads on its patch
   tokens (the features LLaVA feeds its projector) that classify each patch's shape and
   colour (``scenes.scene_labels``; background is a class of its own). It trains on the
   pool's scenes, or on more (``vision_scenes``: images and patch labels only).
2. **Joint training.** The whole LLaVA on a mix of chat examples, loss on assistant tokens
   only: captions ("What objects are in the image?" -> ``scenes.caption``), yes/no
   questions in POPE and AMBER wording through ``prompts.answer_messages`` (answers "Yes" /
   "No", the evaluation's wording), short answers (colour, count) and, with
   ``overconfident_fraction > 0``, *overconfident confidence turns*: third- and
   first-person confidence questions (``prompts.confidence_messages``) whose target is high
   (80..100%) whatever the image and whether the quoted answer is right. That plants the
   overconfidence of instruction-tuned VLMs on purpose, so CSP has something to fix;
   ``overconfident_fraction=0`` builds a base without it.

The default trains in two rounds. From scratch, the language model left chance only on a
tower that had overfit its 12,000 scenes; on a better tower (more scenes, sin-cos positions,
class-balanced loss) it stayed at chance for every run we tried. So the first round
(:meth:`PretrainConfig.first_round`, the earlier shipped model) is trained from
scratch, and the second trains the better tower, then warm-starts its joint stage from the
first round's language model and projector (``warm_start``), with no existence phase.

The joint stage has a fixed step budget, then an accuracy gate: while held-out POPE-style
accuracy is below ``gate_accuracy`` it is extended in chunks (a warm restart of the
cosine schedule) up to ``max_joint_steps``. The moment a run "clicks" varies with the seed.

Everything is deterministic under ``PretrainConfig.seed``: the example pool is built from
seeded scenes and each step draws its batch from a generator seeded by (seed, stage, step).
Checkpoints (safetensors weights, optimizer state and schedule, RNG states) are written
every ``checkpoint_every`` steps under ``<out>/_checkpoint``; a rerun resumes from there and
ends with the same weights as an uninterrupted run. CLI::

    python -m csp_utils.pretrain --out DIR [--steps N] [--vision-steps N] [--seed S] [--tiny]

The command-line overrides apply to the last round; the first is built (or reused) as
configured in ``warm_start``, under ``DIR/_warm_start`` (removed when the model is done).
``--init-from DIR --init-parts ...`` starts from parts of a finished model instead (no
``warm_start``), ``--set FIELD=JSON`` sets any other field; docs/base_models.md shows the
command that built the base without confidence turns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from csp_utils import prompts
from csp_utils.models import TinyVLMConfig

log = logging.getLogger("csp_utils.pretrain")

CAPTION_PROMPT = "What objects are in the image?"
CHECKPOINT_DIR = "_checkpoint"
WARM_START_DIR = "_warm_start"
META_FILE = "csp_meta.json"
MODEL_FILE = "model.safetensors"
# Example kinds of the joint stage, in the order of PretrainConfig's mix weights.
KINDS = ("caption", "yes_no", "short", "confidence")
# Fields that change how a run is executed or reported, never what it computes.
# Parts of a LLaVA that ``init_from`` can give, by state-dict key prefix.
INIT_PARTS = {
    "vision_tower": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "embeddings": ("model.language_model.embed_tokens.",),
    "language_layers": ("model.language_model.layers.", "model.language_model.norm."),
    "lm_head": ("lm_head.",),
}
RUNTIME_FIELDS = ("checkpoint_every", "stop_after_steps", "num_threads", "progress", "keep_checkpoint", "log_every")


# --------------------------------------------------------------------------- configuration
@dataclass
class PretrainConfig:
    """Everything that determines the trained default model (plus a few runtime knobs)."""

    model: TinyVLMConfig = field(default_factory=TinyVLMConfig)
    seed: int = 0
    world: dict = field(default_factory=dict)          # scenes.WorldConfig overrides (default world)
    # data pool ("base" split scenes 0..n_train_scenes-1)
    n_train_scenes: int = 12000
    questions_per_scene: int = 8                       # yes/no questions per scene in the pool
    short_per_scene: int = 2
    confidence_per_scene: int = 2
    # stage 1: vision tower alone. The first round's tower (the pool's 12k scenes, random
    # position init) overfit them: 99% training patch accuracy, 81% on held-out object
    # patches. More scenes (images and patch labels only), 2-D sin-cos position init, a
    # class-balanced shape loss and lr 2e-3 reach 88% in 3000 steps.
    vision_scenes: int | None = 48000                  # base scenes 0..N-1 for stage 1 (None: the pool's)
    vision_steps: int = 3000
    vision_lr: float = 2e-3
    vision_position_init: str = "sincos"               # or "random"; sincos: 2-D sin-cos patch positions (as MAE)
    vision_class_balance: float = 0.5                  # shape-loss weights (mean freq / freq) ** this; 0 = off
    vision_background_weight: float = 0.25             # loss weight of background patches (most of them)
    presence_weight: float = 1.0                       # image-level presence of shapes / colours / coloured shapes
    # stage 2: the whole LLaVA. From scratch, a tiny language model stayed at chance on the
    # better tower (3 runs of 1000-3000 steps, frozen or not), so the default warm-starts it:
    # the joint stage begins from the language model and projector of the model that
    # ``warm_start`` (a PretrainConfig dict: the first round) trains, built first into
    # <out>/_warm_start or reused there, and puts them on this round's tower.
    warm_start: dict | None = field(default_factory=lambda: PretrainConfig.first_round().to_dict())
    # Or start from parts of a finished model folder (INIT_PARTS; "vision_tower" replaces
    # stage 1, so it needs vision_steps=0). Parts left out start fresh, so a base trained
    # without confidence turns can reuse a tower without inheriting a language model's answers.
    init_from: str | None = None
    init_parts: tuple[str, ...] = ()
    # with "embeddings": tokens no pool example contains keep their fresh embedding (a
    # model's answers to prompts this pool never shows are read and written through them)
    init_fresh_unseen_tokens: bool = False
    joint_steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup_fraction: float = 0.04
    min_lr_ratio: float = 0.0                          # cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    loss_per_example: bool = True                      # mean over each example's tokens, then over the batch
    freeze_vision: bool = True                         # stage 2 keeps the vision tower fixed (features cached)
    aux_patch_weight: float = 0.5                      # stage 1's patch loss kept on in stage 2 (0: off; unfrozen only)
    align_weight: float = 0.0                          # projected object patches -> their shape/colour word embeddings
    # existence phase: the first joint steps draw only captions and existence questions
    # ("Is there a (red) star?"), the one skill a tiny LM must find first; the harder forms
    # (attributes, relations, counts), short answers and confidence turns join afterwards
    existence_phase_steps: int = 0                     # the first round: 1500 (a warm start knows the task)
    existence_phase_yes_no: float = 0.8                # share of yes/no (rest captions) in that phase
    # joint mix: overconfident_fraction of all examples are confidence turns, the rest split
    # by these weights
    caption_weight: float = 0.3
    yes_no_weight: float = 0.6
    short_answer_weight: float = 0.10
    overconfident_fraction: float = 0.10
    overconfident_levels: tuple[int, ...] = (80, 85, 90, 95, 100)   # integer percents, image-blind
    # accuracy gate: mean world-POPE accuracy (random, popular, adversarial) on held-out "base" scenes
    gate_accuracy: float | None = 0.85
    gate_chunk_steps: int = 500
    max_joint_steps: int = 6000
    gate_restart_lr_ratio: float = 0.5                 # peak lr of an extension, relative to lr
    gate_scenes: int = 100                             # held-out "base" scenes (after the training range)
    eval_every: int = 250                              # monitoring evals of the gate set (0: off)
    # final report (eval split; variants at eval_severity)
    eval_scenes: int = 300
    eval_severity: float = 0.8
    eval_variants: tuple[str, ...] = ("blur", "low_light", "small", "occlusion", "clutter")
    eval_confidence_items: int = 200
    # runtime
    checkpoint_every: int = 200
    stop_after_steps: int | None = None                # testing hook: checkpoint and stop after this many steps
    num_threads: int | None = None
    progress: bool = True
    log_every: int = 50
    keep_checkpoint: bool = False

    @classmethod
    def tiny(cls, **overrides) -> "PretrainConfig":
        """Seconds, not minutes: for tests and smoke runs (learns nothing useful)."""
        base = dict(
            model=TinyVLMConfig(patch_size=16, vision_hidden=16, vision_layers=1, vision_heads=2,
                                vision_intermediate=32, text_hidden=16, text_layers=1, text_heads=2,
                                text_intermediate=32, max_position_embeddings=128),
            warm_start=None, n_train_scenes=24, vision_scenes=32, vision_position_init="sincos", vision_class_balance=0.5,
            questions_per_scene=3, short_per_scene=1, confidence_per_scene=1,
            vision_steps=4, joint_steps=8, existence_phase_steps=4, batch_size=8, gate_accuracy=None, gate_chunk_steps=4,
            max_joint_steps=16, gate_scenes=4, eval_every=0,
            eval_scenes=4, eval_confidence_items=0, eval_variants=(),
            checkpoint_every=4, progress=False, log_every=0,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def first_round(cls, **overrides) -> "PretrainConfig":
        """The first round, trained from scratch (config fingerprint ca61b4593ef83d9d, the
        earlier shipped model), whose language model the default warm-starts."""
        base = dict(warm_start=None, vision_scenes=None, vision_steps=4000, vision_lr=1e-3,
                    vision_position_init="random", vision_class_balance=0.0,
                    joint_steps=3000, lr=2e-3, existence_phase_steps=1500)
        base.update(overrides)
        return cls(**base)

    def check_init(self) -> None:
        """Early errors for an inconsistent ``init_from`` / ``init_parts``."""
        unknown = set(self.init_parts) - set(INIT_PARTS)
        if unknown:
            raise ValueError(f"init_parts {sorted(unknown)} unknown; choose from {list(INIT_PARTS)}")
        if bool(self.init_from) != bool(self.init_parts):
            raise ValueError("init_from and init_parts go together: name the model folder and the parts it gives")
        if self.init_from and self.warm_start is not None:
            raise ValueError("init_from replaces warm_start: set warm_start=None (CLI: --init-from does)")
        if self.init_fresh_unseen_tokens and "embeddings" not in self.init_parts:
            raise ValueError("init_fresh_unseen_tokens needs 'embeddings' in init_parts (else all are fresh)")
        if "vision_tower" in self.init_parts and self.vision_steps > 0:
            raise ValueError("init_parts has vision_tower: set vision_steps=0 (a trained tower would be overwritten)")

    def warm_start_config(self) -> "PretrainConfig | None":
        """The warm-start round's config, with this run's runtime knobs."""
        if self.warm_start is None:
            return None
        ws = PretrainConfig.from_dict(self.warm_start)
        if ws.model != self.model:
            raise ValueError("warm_start must train the same architecture (its 'model' differs)")
        return dataclasses.replace(ws, **{k: getattr(self, k) for k in RUNTIME_FIELDS})

    @property
    def heldout_start(self) -> int:
        """First "base" scene index no training stage uses (the gate set starts there)."""
        return max(self.n_train_scenes, self.vision_scenes or 0)

    def mix(self) -> np.ndarray:
        """Probabilities of KINDS in a joint batch."""
        w = np.array([self.caption_weight, self.yes_no_weight, self.short_answer_weight], float)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("caption/yes_no/short_answer weights must be >= 0 and not all 0")
        f = float(self.overconfident_fraction)
        if not 0.0 <= f < 1.0:
            raise ValueError(f"overconfident_fraction must lie in [0, 1), got {f}")
        return np.concatenate([(1 - f) * w / w.sum(), [f]])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the fields that determine the result (runtime knobs excluded)."""
        d = self.to_dict()
        for k in RUNTIME_FIELDS:
            d.pop(k, None)
        if d.get("warm_start") is None:  # configs from before the field hash as they did
            d.pop("warm_start", None)
        for c in (d, d.get("warm_start") or {}):  # without init_from, configs hash as they did before it
            if not c.get("init_from"):
                for k in ("init_from", "init_parts", "init_fresh_unseen_tokens"):
                    c.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: Mapping) -> "PretrainConfig":
        d = dict(d)
        d["model"] = TinyVLMConfig(**d.get("model", {}))
        for k in ("betas", "overconfident_levels", "eval_variants", "init_parts"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _world_config(cfg: PretrainConfig):
    from csp_utils import scenes

    return scenes.WorldConfig(**cfg.world)


# --------------------------------------------------------------------------- chat encoding
class ChatEncoder:
    """Single-turn chat examples -> (input_ids, assistant mask), fast and exact.

    The chat template is rendered once with sentinels to find the text around a user turn
    and around an assistant reply (the part inside ``{% generation %}`` is learned, the rest
    is not); examples are then assembled by string formatting and tokenised in batches.
    The first examples of every batch are checked against the template's own
    ``return_assistant_tokens_mask`` output, and a mismatch raises.
    """

    _U, _A = "\x00USER\x00", "\x00REPLY\x00"

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_token_id = self.tok.convert_tokens_to_ids("<image>")
        self.n_image_tokens = _num_image_tokens(processor)
        tpl = self.tok.chat_template or processor.chat_template
        self.template = tpl
        prompt = self.tok.apply_chat_template([prompts.user_turn(self._U)], tokenize=False,
                                              add_generation_prompt=True, chat_template=tpl)
        full = self.tok.apply_chat_template([prompts.user_turn(self._U), prompts.assistant_turn(self._A)],
                                            tokenize=False, chat_template=tpl)
        if not full.startswith(prompt):
            raise ValueError("chat template: the generation prompt is not a prefix of the conversation")
        self.prompt_pre, self.prompt_post = prompt.split(self._U)
        reply = full[len(prompt):]
        # which part of the reply the template marks as assistant text (learned)
        enc = self.tok.apply_chat_template(
            [prompts.user_turn("x"), prompts.assistant_turn("Yes")], tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True, chat_template=tpl)
        ids, mask = enc["input_ids"], enc["assistant_masks"]
        learned = self.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        r_yes = reply.replace(self._A, "Yes")
        if not r_yes.startswith(learned) and learned not in r_yes:
            raise ValueError(f"chat template: cannot locate the assistant span {learned!r} in {r_yes!r}")
        start, a_at = r_yes.index(learned), reply.index(self._A)
        end = start + len(learned) + len(self._A) - len("Yes")  # the learned span's end, in sentinel text
        if not start <= a_at < end:
            raise ValueError("chat template: the assistant span does not contain the reply")
        self.reply_pre, self.reply_gen, self.reply_post = reply[:start], reply[start:end], reply[end:]
        self._checked = 0

    def prompt_text(self, user_text: str) -> str:
        return self.prompt_pre + user_text + self.prompt_post

    def encode(self, pairs: Sequence[tuple[str, str]], check: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(user_text, reply)]`` -> ``[(ids, learned_mask)]`` with the image token expanded."""
        n = len(pairs)
        t_ids = self._tokenize([self.prompt_text(u) + self.reply_pre for u, _ in pairs])
        g_ids = self._tokenize([self.reply_gen.replace(self._A, a) for _, a in pairs])
        tail_ids = self._tokenize([self.reply_post])[0] if self.reply_post else []
        out = []
        for k in range(n):
            ids = list(t_ids[k]) + list(g_ids[k]) + list(tail_ids)
            mask = [0] * len(t_ids[k]) + [1] * len(g_ids[k]) + [0] * len(tail_ids)
            if k < check:
                self._check(pairs[k], ids, mask)
            ids, mask = self._expand(np.asarray(ids, np.int64), np.asarray(mask, bool))
            out.append((ids, mask))
        return out

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added); each distinct text is encoded once."""
        uniq = list(dict.fromkeys(texts))
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            ids = [e.ids for e in backend.encode_batch(uniq, add_special_tokens=False)]
        else:
            ids = self.tok(uniq, add_special_tokens=False)["input_ids"]
        table = dict(zip(uniq, ids))
        return [table[t] for t in texts]

    def _check(self, pair, ids, mask) -> None:
        u, a = pair
        ref = self.tok.apply_chat_template([prompts.user_turn(u), prompts.assistant_turn(a)], tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True,
                                           chat_template=self.template)
        if list(ref["input_ids"]) != ids or [int(m) for m in ref["assistant_masks"]] != mask:
            raise RuntimeError(f"fast chat encoding disagrees with the chat template for {pair!r}")
        self._checked += 1

    def _expand(self, ids: np.ndarray, mask: np.ndarray):
        pos = np.flatnonzero(ids == self.image_token_id)
        if len(pos) != 1:
            raise ValueError(f"expected one <image> token per example, found {len(pos)}")
        p = int(pos[0])
        ids = np.concatenate([ids[:p], np.full(self.n_image_tokens, self.image_token_id), ids[p + 1:]])
        mask = np.concatenate([mask[:p], np.zeros(self.n_image_tokens, bool), mask[p + 1:]])
        return ids, mask


def _num_image_tokens(processor) -> int:
    from PIL import Image

    size = processor.image_processor.crop_size["height"]
    enc = processor(text=["<image>"], images=[Image.new("RGB", (size, size))], return_tensors="np")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    return int((enc["input_ids"][0] == image_id).sum())


# --------------------------------------------------------------------------- images
class ImageCodec:
    """Images as the processor sees them, stored compactly as uint8 and restored exactly."""

    def __init__(self, processor):
        ip = processor.image_processor
        self.ip = ip
        self.mean = np.asarray(ip.image_mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(ip.image_std, np.float32).reshape(1, 3, 1, 1)
        self.scale = float(ip.rescale_factor)

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 3, S, S) uint8 holding the processor's pixel values exactly (checked)."""
        from PIL import Image

        pils = [Image.fromarray(im, "RGB") for im in images]
        pv = np.asarray(self.ip(images=pils, return_tensors="np")["pixel_values"], np.float32)
        q = np.clip(np.rint((pv * self.std + self.mean) / self.scale), 0, 255).astype(np.uint8)
        if np.abs(self.decode_np(q) - pv).max() > 1e-5:
            raise ValueError("the image processor's output is not an affine image of uint8 pixels")
        return q

    def decode_np(self, q: np.ndarray) -> np.ndarray:
        return ((q.astype(np.float32) * self.scale) - self.mean) / self.std

    def decode(self, q):
        import torch

        x = q.float() * self.scale
        return (x - torch.from_numpy(self.mean)) / torch.from_numpy(self.std)


# --------------------------------------------------------------------------- data pool
@dataclass
class Pool:
    images: np.ndarray                 # (N, 3, S, S) uint8
    cat_labels: np.ndarray             # (N, G*G) int64, background = len(CATEGORIES)
    col_labels: np.ndarray             # (N, G*G) int64, background = len(COLOR_NAMES)
    presence: np.ndarray               # (N, P) float32: which shapes, colours, coloured shapes a scene has
    ids: np.ndarray                    # flat token ids of all examples
    learn: np.ndarray                  # flat bool: learned (assistant) tokens
    offsets: np.ndarray                # (E + 1,) example boundaries in ids / learn
    scene: np.ndarray                  # (E,) scene of each example
    kind: np.ndarray                   # (E,) index into KINDS
    by_kind: list[np.ndarray]          # example ids of each kind
    existence: np.ndarray              # example ids of the existence yes/no questions

    def example(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[e], self.offsets[e + 1]
        return self.ids[a:b], self.learn[a:b]


_TOUCH = re.compile(r"^Is the (.+) touching the (.+)\?$")
KIND_WEIGHTS = {"existence": 0.5, "attribute": 0.25, "relation": 0.25}


def amber_wording(question: str, rng: np.random.Generator) -> str:
    """Half the time, AMBER's wording of a world question ("... in this image?", "direct contact")."""
    if rng.random() < 0.5:
        return question
    m = _TOUCH.match(question)
    if m:
        return f"Is there direct contact between the {m.group(1)} and {m.group(2)}?"
    if question.endswith(" in the image?"):
        return question[: -len(" in the image?")] + " in this image?"
    if question.endswith(" in this image?"):
        return question[: -len(" in this image?")] + " in the image?"
    return question[:-1] + " in this image?"


def balanced_questions(scene, rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """Up to ``n`` yes/no questions ``(question, label, kind)`` with no text-only shortcut.

    ``scenes.world_questions`` is balanced overall but not within a question form (a bare
    category is mostly absent, a colour + category mostly present), which lets a model
    answer from the wording alone; here every pick is a (yes, no) pair of the same
    (kind, subtype), kinds weighted as ``KIND_WEIGHTS``. Adds AMBER's count form ("Is
    there one star ...?") and, half the time, AMBER's wording.
    """
    from csp_utils import scenes as sc

    groups: dict[tuple[str, str], dict[str, list[str]]] = {}
    for it in sc.world_questions(scene, rng, 64):
        groups.setdefault((it.kind, it.subtype), {"yes": [], "no": []})[it.label].append(it.question)
    for c in sorted(scene.categories()):  # counts including "one", as AMBER asks them
        k = scene.count(c)
        wrong = k + 1 if k == 1 or rng.random() < 0.5 else k - 1
        for num, label in ((k, "yes"), (wrong, "no")):
            q = (f"Is there one {c} in the image?" if num == 1
                 else f"Are there {sc.NUMBER_WORDS.get(num, str(num))} {sc.plural(c)} in the image?")
            groups.setdefault(("attribute", "count-one"), {"yes": [], "no": []})[label].append(q)
    usable = {g: v for g, v in groups.items() if v["yes"] and v["no"]}
    out: list[tuple[str, str, str]] = []
    while len(out) + 2 <= n and usable:
        kinds = sorted({g[0] for g in usable})
        w = np.array([KIND_WEIGHTS.get(k, 0.1) for k in kinds])
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        names = sorted(g for g in usable if g[0] == kind)
        g = names[int(rng.integers(len(names)))]
        for label in ("yes", "no"):
            cands = usable[g][label]
            out.append((amber_wording(cands.pop(int(rng.integers(len(cands)))), rng), label, kind))
        if not (usable[g]["yes"] and usable[g]["no"]):
            del usable[g]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def short_answers(scene, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """Cheap short-answer questions: a unique shape's colour, how many objects."""
    from csp_utils import scenes as sc

    cands = []
    for c in sorted(scene.categories()):
        if scene.count(c) == 1:
            o = next(o for o in scene.objects if o.category == c)
            cands.append((f"What color is the {c}?", o.color))
    k = len(scene.objects)
    cands.append(("How many objects are in the image?", sc.NUMBER_WORDS.get(k, str(k))))
    pick = rng.permutation(len(cands))[:n]
    return [cands[i] for i in pick]


def confidence_turns(questions: Sequence[str], rng: np.random.Generator, n: int,
                     levels: Sequence[int]) -> list[tuple[str, str]]:
    """Overconfident confidence turns: high targets, blind to the image and to correctness.

    The quoted answer is "Yes" or "No" at random (so it is wrong half of the time), the
    framing third or first person at random, the query the bare question or the answer
    prompt, and the target one of ``levels``.
    """
    out = []
    for _ in range(n):
        if not questions:
            break
        q = questions[int(rng.integers(len(questions)))]
        query = q if rng.random() < 0.5 else prompts.answer_text(q)
        response = ("Yes", "No")[int(rng.integers(2))]
        framing = prompts.FRAMINGS[int(rng.integers(len(prompts.FRAMINGS)))]
        target = prompts.format_confidence(int(levels[int(rng.integers(len(levels)))]))
        out.append((prompts.confidence_text(query, response, framing), target))
    return out


def patch_label_rows(scenes_, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(shape ids, colour ids)``, each (N, G*G) int64, of every patch of each scene
    (``scenes.scene_labels``); background is the class after the world's shapes / colours."""
    from csp_utils import scenes as sc

    labels = [sc.scene_labels(s, patch) for s in scenes_]
    return (np.stack([np.where(c < 0, len(sc.CATEGORIES), c).ravel() for c, _ in labels]).astype(np.int64),
            np.stack([np.where(k < 0, len(sc.COLOR_NAMES), k).ravel() for _, k in labels]).astype(np.int64))


def build_pool(cfg: PretrainConfig, encoder: ChatEncoder, codec: ImageCodec, chunk: int = 1000,
               progress: bool = False) -> Pool:
    """The training pool, deterministic in (cfg.seed, world config): images, patch labels, examples."""
    from csp_utils import scenes as sc

    wcfg = _world_config(cfg)
    patch = cfg.model.patch_size
    mix = cfg.mix()
    images, cats, cols, pres = [], [], [], []
    pairs, scene_of, kind_of, existence_of = [], [], [], []
    for start in _progress(range(0, cfg.n_train_scenes, chunk), progress, "building pool"):
        batch = sc.make_scenes("base", min(chunk, cfg.n_train_scenes - start), wcfg, start=start)
        if batch[0].image.shape[0] != cfg.model.image_size:
            raise ValueError(f"world images are {batch[0].image.shape[0]} px but the model expects "
                             f"{cfg.model.image_size}; set PretrainConfig.world['image_size']")
        images.append(codec.encode([s.image for s in batch]))
        c, k = patch_label_rows(batch, patch)
        cats.append(c)
        cols.append(k)
        for s in batch:
            pres.append(presence_vector(s))
            rng = np.random.default_rng([cfg.seed, 7, s.index])
            qs = balanced_questions(s, rng, cfg.questions_per_scene)
            ex = [(CAPTION_PROMPT, sc.caption(s), 0, False)]
            ex += [(prompts.answer_text(q), "Yes" if label == "yes" else "No", 1, qk == "existence")
                   for q, label, qk in qs]
            if mix[2] > 0:
                ex += [(q, a, 2, False) for q, a in short_answers(s, rng, cfg.short_per_scene)]
            if mix[3] > 0:
                ex += [(q, a, 3, False) for q, a in confidence_turns([q for q, _, _ in qs], rng,
                                                                      cfg.confidence_per_scene, cfg.overconfident_levels)]
            for u, a, kd, exist in ex:
                pairs.append((u, a))
                scene_of.append(s.index)
                kind_of.append(kd)
                existence_of.append(exist)
    encoded = []
    for a in range(0, len(pairs), 4096):
        encoded += encoder.encode(pairs[a:a + 4096], check=2)
    lengths = np.array([len(i) for i, _ in encoded], np.int64)
    dtype = np.int16 if len(encoder.tok) < 2 ** 15 else np.int32
    kind = np.array(kind_of, np.int64)
    return Pool(
        images=np.concatenate(images),
        cat_labels=np.concatenate(cats),
        col_labels=np.concatenate(cols),
        presence=np.stack(pres),
        ids=np.concatenate([i for i, _ in encoded]).astype(dtype),
        learn=np.concatenate([m for _, m in encoded]),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        scene=np.array(scene_of, np.int64),
        kind=kind,
        by_kind=[np.flatnonzero(kind == k) for k in range(len(KINDS))],
        existence=np.flatnonzero(existence_of),
    )


@dataclass
class VisionData:
    """What stage 1 trains on: images, patch labels and presence of base scenes 0..N-1."""
    images: np.ndarray                 # (N, 3, S, S) uint8
    cat_labels: np.ndarray             # (N, G*G) int64
    col_labels: np.ndarray             # (N, G*G) int64
    presence: np.ndarray               # (N, P) float32


def vision_data(cfg: PretrainConfig, codec: ImageCodec, pool: Pool, chunk: int = 1000,
                progress: bool = False) -> VisionData:
    """Stage 1's scenes: the pool's own, then more "base" scenes up to ``cfg.vision_scenes``
    (rendered here, labels only: about a second per thousand)."""
    from csp_utils import scenes as sc

    total = cfg.vision_scenes if cfg.vision_scenes is not None else len(pool.images)
    n = min(total, len(pool.images))
    parts = [(pool.images[:n], pool.cat_labels[:n], pool.col_labels[:n], pool.presence[:n])]
    wcfg, patch = _world_config(cfg), cfg.model.patch_size
    for start in _progress(range(n, total, chunk), progress, "rendering vision scenes"):
        batch = sc.make_scenes("base", min(chunk, total - start), wcfg, start=start)
        parts.append((codec.encode([s.image for s in batch]), *patch_label_rows(batch, patch),
                      np.stack([presence_vector(s) for s in batch])))
    return VisionData(*(np.concatenate(arrays) for arrays in zip(*parts)))


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


def _init_vision_positions(model, how: str) -> None:
    import torch

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


def presence_vector(scene) -> np.ndarray:
    """Multi-hot ``[shapes (14) | colours (7) | colour x shape (98)]`` of the objects in a scene."""
    from csp_utils import scenes as sc

    n_cat, n_col = len(sc.CATEGORIES), len(sc.COLOR_NAMES)
    v = np.zeros(n_cat + n_col + n_cat * n_col, np.float32)
    for o in scene.objects:
        c, k = sc.CATEGORIES.index(o.category), sc.COLOR_NAMES.index(o.color)
        v[c] = v[n_cat + k] = v[n_cat + n_col + c * n_col + k] = 1.0
    return v


def _step_generator(seed: int, stage: int, step: int):
    import torch

    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, 1000 + stage, step]).generate_state(1, np.uint64)[0] >> 1))
    return g


def sample_joint_batch(pool: Pool, cfg: PretrainConfig, step: int) -> np.ndarray:
    """Example ids of joint step ``step``: a function of (seed, step) only, so resuming is exact."""
    import torch

    g = _step_generator(cfg.seed, 2, step)
    by_kind = list(pool.by_kind)
    if step < cfg.existence_phase_steps and len(pool.existence):
        y = cfg.existence_phase_yes_no
        mix = torch.tensor([1.0 - y, y, 0.0, 0.0], dtype=torch.float64)
        by_kind[1] = pool.existence
    else:
        mix = torch.tensor(cfg.mix(), dtype=torch.float64)
    avail = torch.tensor([len(b) > 0 for b in by_kind])
    mix = mix * avail
    kinds = torch.multinomial(mix, cfg.batch_size, replacement=True, generator=g).numpy()
    u = torch.rand(cfg.batch_size, generator=g, dtype=torch.float64).numpy()
    return np.array([by_kind[k][int(x * len(by_kind[k]))] for k, x in zip(kinds, u)], np.int64)


def collate(pool: Pool, codec: ImageCodec, examples: np.ndarray, pad_id: int, pixels: bool = True):
    """Left-padded batch: input_ids, attention_mask, position_ids, labels (-100 off assistant
    tokens) and, with ``pixels``, pixel_values."""
    import torch

    seqs = [pool.example(int(e)) for e in examples]
    width = max(len(i) for i, _ in seqs)
    ids = np.full((len(seqs), width), pad_id, np.int64)
    att = np.zeros((len(seqs), width), np.int64)
    lab = np.full((len(seqs), width), -100, np.int64)
    for r, (i, m) in enumerate(seqs):
        ids[r, width - len(i):] = i
        att[r, width - len(i):] = 1
        lab[r, width - len(i):] = np.where(m, i, -100)
    pos = np.maximum(np.cumsum(att, axis=1) - 1, 0)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(att),
             "position_ids": torch.from_numpy(pos), "labels": torch.from_numpy(lab)}
    if pixels:
        batch["pixel_values"] = codec.decode(torch.from_numpy(pool.images[pool.scene[examples]]))
    return batch


def _embeds_with_features(model, input_ids, vision_features):
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
    emb, projected = _embeds_with_features(model, input_ids, vision_features)
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
    import torch

    labels = batch["labels"]
    target = labels[:, 1:]
    if vision_features is not None:
        emb, projected = _embeds_with_features(model, batch["input_ids"], vision_features)
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


# --------------------------------------------------------------------------- schedule
def lr_at(step: int, segments: Sequence[Mapping]) -> float:
    """Learning rate of ``step`` under piecewise warmup + cosine segments.

    A segment is ``{"start", "length", "peak", "warmup", "floor"}``; steps past the last
    segment keep its final value.
    """
    seg = segments[-1]
    for s in segments:
        if s["start"] <= step < s["start"] + s["length"]:
            seg = s
            break
    t = min(step - seg["start"], seg["length"] - 1)
    if t < seg["warmup"]:
        return seg["peak"] * (t + 1) / seg["warmup"]
    span = max(1, seg["length"] - seg["warmup"])
    prog = min(1.0, (t - seg["warmup"] + 1) / span)
    return seg["floor"] + (seg["peak"] - seg["floor"]) * 0.5 * (1 + math.cos(math.pi * prog))


def _segment(start: int, length: int, peak: float, warmup_fraction: float, floor: float) -> dict:
    return {"start": int(start), "length": int(length), "peak": float(peak),
            "warmup": max(1, int(round(warmup_fraction * length))), "floor": float(floor)}


# --------------------------------------------------------------------------- accuracy helper
def _yes_no_ids(tokenizer) -> tuple[int, int]:
    yes = tokenizer(" Yes", add_special_tokens=False)["input_ids"]
    no = tokenizer(" No", add_special_tokens=False)["input_ids"]
    return yes[0], no[0]


def _images_for(items, images):
    if isinstance(images, Mapping):
        return [images[it.image_id] for it in items]
    if len(images) != len(items):
        raise ValueError(f"{len(images)} images for {len(items)} items; pass one per item or a mapping by image_id")
    return list(images)


def _as_pil(im):
    from PIL import Image

    return im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im), "RGB")


def yes_no_probabilities(model, processor, items, images, batch_size: int = 64) -> np.ndarray:
    """P(" Yes") / (P(" Yes") + P(" No")) of the next token after the generation prompt, per item.

    Batched with left padding (the tokenizer's default) and position ids counted from each
    row's first real token, so padding does not change a row's scores.
    """
    import torch

    tok = processor.tokenizer
    tok.padding_side = "left"
    yes_id, no_id = _yes_no_ids(tok)
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
            pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = model(**enc, position_ids=pos).logits[:, -1, :].float()
            two = torch.stack([logits[:, yes_id], logits[:, no_id]], -1)
            out.append(torch.softmax(two, -1)[:, 0].numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


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


def confidence_expectations(model, processor, items, images, responses, framing: str = "third",
                            levels: Sequence[int] = prompts.CONFIDENCE_LEVELS, batch_size: int = 128) -> np.ndarray:
    """Expected verbalized confidence (percent) per item, scoring each level as a reply.

    For the pre-training report only (the evaluation module does this properly).
    """
    import torch

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
            pos = (att.cumsum(-1) - 1).clamp(min=0)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=att, pixel_values=pix,
                                           position_ids=pos).logits.float(), -1)
            tok_lp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
            scores[rows] = (tok_lp * learn[:, 1:]).sum(-1).numpy()
    s = scores.reshape(len(items), len(levels))
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p @ np.asarray(levels, float)


# --------------------------------------------------------------------------- held-out sets
HELDOUT_SEED = 20260  # held-out questions do not depend on the training seed


def _by_id(scs) -> dict:
    return {s.scene_id: s.image for s in scs}


# --------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].astype(np.int64).tolist(),
            "numpy_pos": int(np.random.get_state()[2])}


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], np.uint32), state["numpy_pos"]))


def save_checkpoint(folder: Path, model, heads, optimizer, state: dict) -> None:
    """Atomically replace ``folder`` with weights (safetensors), optimizer + RNG (torch.save), state (JSON)."""
    import torch
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE))
    if heads is not None:
        save_file({k: v.detach().contiguous() for k, v in heads.state_dict().items()}, str(tmp / "heads.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint_state(folder: Path) -> dict | None:
    for f in (folder, folder.with_name(folder.name + ".old")):  # .old: a crash between the renames
        if (f / "state.json").exists() and (f / "optimizer.pt").exists():
            st = json.loads((f / "state.json").read_text())
            st["_folder"] = str(f)
            return st
    return None


def _load_weights(module, path: Path) -> None:
    from safetensors.torch import load_file

    missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")


def _load_language(model, folder: Path) -> None:
    """Everything but the vision tower (language model, projector) from a trained model folder."""
    import torch

    from csp_utils import models

    src, _ = models.load_vlm(folder, dtype=torch.float32)  # through transformers: its key layout
    weights = {k: v for k, v in src.state_dict().items() if ".vision_tower." not in k}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(".vision_tower." not in k for k in missing):
        raise RuntimeError(f"warm start {folder} does not fit the model: missing {missing}, unexpected {unexpected}")


def _load_parts(model, folder, parts: Sequence[str]) -> dict:
    """Copy ``parts`` (INIT_PARTS) of the trained model in ``folder`` into ``model``; returns
    the source's identity for the meta."""
    import torch

    from csp_utils import models

    src, _ = models.load_vlm(folder, dtype=torch.float32)
    prefixes = tuple(p for part in parts for p in INIT_PARTS[part])
    weights = {k: v for k, v in src.state_dict().items() if k.startswith(prefixes)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or not weights:
        raise RuntimeError(f"init_from {folder} does not fit the model: unexpected {unexpected}")
    path = Path(folder) / MODEL_FILE
    return {"path": str(folder), "parts": list(parts), "sha256": sha256_file(path), "tensors": len(weights)}


def _refresh_unseen_tokens(model, fresh, seen_ids: np.ndarray) -> int:
    """Put the ``fresh`` embedding back on every token not in ``seen_ids``; returns how many."""
    import torch

    unseen = np.setdiff1d(np.arange(fresh.shape[0]), np.unique(seen_ids))
    with torch.no_grad():
        model.get_input_embeddings().weight[torch.from_numpy(unseen)] = fresh[torch.from_numpy(unseen)]
    return int(len(unseen))


def _load_optimizer(optimizer, folder: Path) -> None:
    import torch

    blob = torch.load(Path(folder) / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    _set_rng_state(blob["rng"])


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(folder, config: PretrainConfig | None = None) -> bool:
    """A finished model folder: weights whose sha256 matches csp_meta.json (and, if given, the same config)."""
    folder = Path(folder)
    meta_path, weights = folder / META_FILE, folder / MODEL_FILE
    if not (meta_path.exists() and weights.exists() and (folder / "config.json").exists()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    if meta.get("sha256") != sha256_file(weights):
        return False
    return config is None or meta.get("config_fingerprint") == config.fingerprint()


# --------------------------------------------------------------------------- training
class _Heads:
    """Per-patch shape and colour heads of stage 1 (built lazily to keep torch out of import)."""

    @staticmethod
    def build(hidden: int, n_cat: int, n_col: int, seed: int):
        import torch

        torch.manual_seed(seed + 1)
        return torch.nn.ModuleDict({"category": torch.nn.Linear(hidden, n_cat + 1),
                                    "color": torch.nn.Linear(hidden, n_col + 1),
                                    "presence": torch.nn.Linear(hidden, n_cat + n_col + n_cat * n_col)})


def _vision_features(model, pool: Pool, codec: ImageCodec, batch_size: int = 256):
    """(N, T, D) float32 features of every pool image from the (frozen) vision tower."""
    import torch

    out = []
    was = model.training
    model.eval()
    with torch.no_grad():
        for a in range(0, len(pool.images), batch_size):
            pix = codec.decode(torch.from_numpy(pool.images[a:a + batch_size]))
            out.append(_patch_features(model, pix).contiguous())
    model.train(was)
    return torch.cat(out)


def _patch_class_weights(n_cat: int, n_col: int, background: float, cat_labels: np.ndarray | None = None,
                         balance: float = 0.0):
    """Patch-loss class weights: background down-weighted; with ``balance`` > 0, each shape
    weighted by (mean frequency / its frequency) ** balance over ``cat_labels`` (the world's
    shapes are Zipf-distributed: rare ones were the worst recognised), normalised to mean 1."""
    import torch

    w_cat, w_col = torch.ones(n_cat + 1), torch.ones(n_col + 1)
    if balance > 0 and cat_labels is not None:
        counts = np.bincount(cat_labels.ravel(), minlength=n_cat + 1)[:n_cat].astype(np.float64)
        w = (counts.mean() / np.maximum(counts, 1.0)) ** balance
        w_cat[:n_cat] = torch.from_numpy(w / w.mean()).float()
    w_cat[n_cat] = background
    w_col[n_col] = background
    return w_cat, w_col


def _patch_loss(heads, feats, cat_labels: np.ndarray, col_labels: np.ndarray, w_cat, w_col, logits=None,
                presence: np.ndarray | None = None, presence_weight: float = 0.0):
    """Per-patch shape + colour cross-entropy (background patches down-weighted), plus the
    image-level presence of shapes / colours / coloured shapes read linearly from the mean
    patch feature (what one uniform attention head of the language model can read)."""
    import torch

    lc, lk = logits if logits is not None else (heads["category"](feats), heads["color"](feats))
    yc, yk = torch.from_numpy(cat_labels), torch.from_numpy(col_labels)
    loss = (torch.nn.functional.cross_entropy(lc.flatten(0, 1), yc.flatten(), weight=w_cat)
            + torch.nn.functional.cross_entropy(lk.flatten(0, 1), yk.flatten(), weight=w_col))
    if presence is not None and presence_weight > 0:
        lp = heads["presence"](feats.mean(1))
        loss = loss + presence_weight * torch.nn.functional.binary_cross_entropy_with_logits(
            lp, torch.from_numpy(presence)) * (lp.shape[-1] / 14.0)  # sum-like scale over the few positives
    return loss


def _word_token_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    return [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]


def _word_embeddings(model, word_ids: list[list[int]]):
    import torch

    emb = model.get_input_embeddings().weight
    return torch.stack([emb[ids].mean(0) for ids in word_ids])


def _align_loss(model, projected, cat_labels: np.ndarray, col_labels: np.ndarray, cat_words, col_words):
    """Grounding alignment: each object patch, as projected into the language model's input
    space, scores its shape's and its colour's word embeddings highest (dot product, cross-
    entropy over the world's shapes / colours; background patches ignored). It ties image
    tokens to the words that questions use, so "Is there a star?" can find star patches."""
    import torch

    yc, yk = torch.from_numpy(cat_labels), torch.from_numpy(col_labels)
    lc = projected @ _word_embeddings(model, cat_words).T
    lk = projected @ _word_embeddings(model, col_words).T
    yc = torch.where(yc >= len(cat_words), -100, yc)
    yk = torch.where(yk >= len(col_words), -100, yk)
    if not (yc >= 0).any():
        return projected.sum() * 0.0
    return (torch.nn.functional.cross_entropy(lc.flatten(0, 1), yc.flatten(), ignore_index=-100)
            + torch.nn.functional.cross_entropy(lk.flatten(0, 1), yk.flatten(), ignore_index=-100))


def _patch_features(model, pixel_values):
    """The vision features LLaVA feeds its projector (layer -1, CLS dropped)."""
    vt = model.model.vision_tower
    hs = vt(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    return hs[model.config.vision_feature_layer][:, 1:]


def _progress(it, enabled: bool, desc: str, total=None, initial=0):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, initial=initial, mininterval=float(os.environ.get("CSP_TQDM_INTERVAL", 1)))


def _make_optimizer(params, cfg: PretrainConfig, lr: float):
    import torch

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(cfg.betas))


def _optimizer_step(opt, params, loss, lr: float, grad_clip: float, state: dict, step: int, ema,
                    on_step, stage: str) -> float:
    """One optimizer step at ``lr`` (both stages): backward, clip, step; advances the step
    counters in ``state``, calls ``on_step`` and returns the loss's running average."""
    import torch

    for gr in opt.param_groups:
        gr["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    state["step"] = step + 1
    state["total_steps"] += 1
    lv = loss.item()
    if on_step:
        on_step(stage, step, lv)
    return lv if ema is None else 0.95 * ema + 0.05 * lv


def pretrain(out_dir, config: PretrainConfig | None = None, command: str | None = None,
             on_step: Callable[[str, int, float], None] | None = None) -> Path | None:
    """Train (or resume) the default VLM into ``out_dir``; returns the path, or None if stopped early.

    ``config.stop_after_steps`` (a testing hook) checkpoints and returns None after that
    many optimizer steps in total (vision + joint). ``on_step(stage, step, loss)`` is
    called after every optimizer step.
    """
    import torch

    from csp_utils import models
    from csp_utils import scenes as sc

    cfg = config or PretrainConfig()
    cfg.check_init()
    out = Path(out_dir)
    ckpt = out / CHECKPOINT_DIR
    t_start = time.time()
    seg_clock = [t_start]  # wall time since the last checkpoint, added to state["elapsed_s"]
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    ws_cfg, ws_dir = cfg.warm_start_config(), out / WARM_START_DIR
    if ws_cfg is not None and not is_complete(ws_dir, ws_cfg):
        log.info("building the warm-start round in %s", ws_dir)
        if pretrain(ws_dir, ws_cfg, on_step=on_step) is None:
            return None

    state = load_checkpoint_state(ckpt)
    if state is not None and state["fingerprint"] != cfg.fingerprint():
        raise ValueError(f"{ckpt} holds a run with another configuration; delete it or use force=True")
    resume = Path(state.pop("_folder")) if state is not None else None
    if state is not None:
        processor = _resumed_processor(cfg, resume / "processor")
        log.info("resuming from %s (stage %s, step %d)", resume, state["stage"], state["step"])
    else:
        processor = models.build_processor(cfg.model)
        state = {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict(), "stage": "vision", "step": 0,
                 "segments": [], "history": [], "gates": [], "elapsed_s": 0.0, "total_steps": 0}
    model, processor = models.build_tiny_vlm(dataclasses.replace(cfg.model, seed=cfg.seed), processor=processor)
    encoder, codec = ChatEncoder(processor), ImageCodec(processor)
    world = _world_config(cfg)

    t0 = time.time()
    pool = build_pool(cfg, encoder, codec, progress=cfg.progress)
    log.info("pool: %d scenes, %d examples (%s) in %.1fs", len(pool.images), len(pool.kind),
             ", ".join(f"{k} {len(b)}" for k, b in zip(KINDS, pool.by_kind)), time.time() - t0)
    from csp_utils import benchmarks as bm

    gate_scenes = bm.pope_scenes(cfg.gate_scenes, world, split="base", start=cfg.heldout_start)
    gate_sets = pope_sets(gate_scenes)
    gate_items = [it for v in gate_sets.values() for it in v]
    gate_images = _by_id(gate_scenes)

    def gate_eval() -> float:
        """Mean world-POPE accuracy (random, popular, adversarial) on held-out base scenes."""
        probs, accs, k0 = unique_probabilities(model, processor, gate_items, gate_images), [], 0
        for items in gate_sets.values():
            accs.append(_acc(probs[k0:k0 + len(items)], items))
            k0 += len(items)
        return float(np.mean(accs))

    def checkpoint(heads, opt):
        state["elapsed_s"] = state.get("elapsed_s", 0.0) + (time.time() - seg_clock[0])
        seg_clock[0] = time.time()
        save_checkpoint(ckpt, model, heads, opt, state)
        if not (ckpt / "processor").exists():
            processor.save_pretrained(ckpt / "processor")

    n_cat, n_col = len(sc.CATEGORIES), len(sc.COLOR_NAMES)

    # ------------------------------------------------------------- stage 1: vision tower
    if state["stage"] == "vision" and cfg.vision_steps <= 0:
        state.update(stage="joint", step=0)  # the tower comes from init_from (or stays random)
    if state["stage"] == "vision":
        heads = _Heads.build(cfg.model.vision_hidden, n_cat, n_col, cfg.seed)
        params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
        opt = _make_optimizer(params, cfg, cfg.vision_lr)
        segs = [_segment(0, max(1, cfg.vision_steps), cfg.vision_lr, cfg.warmup_fraction, cfg.vision_lr * cfg.min_lr_ratio)]
        if state["step"] > 0:
            _load_weights(model, resume / MODEL_FILE)
            _load_weights(heads, resume / "heads.safetensors")
            _load_optimizer(opt, resume)
        else:
            _init_vision_positions(model, cfg.vision_position_init)
        t0 = time.time()
        vdata = vision_data(cfg, codec, pool, progress=cfg.progress)
        log.info("vision data: %d scenes in %.1fs", len(vdata.images), time.time() - t0)
        w_cat, w_col = _patch_class_weights(n_cat, n_col, cfg.vision_background_weight, vdata.cat_labels,
                                            cfg.vision_class_balance)
        model.train()
        bar = _progress(range(state["step"], cfg.vision_steps), cfg.progress, "vision pre-training",
                        total=cfg.vision_steps, initial=state["step"])
        ema = None
        for step in bar:
            g = _step_generator(cfg.seed, 1, step)
            idx = torch.randint(0, len(vdata.images), (cfg.batch_size,), generator=g).numpy()
            pix = codec.decode(torch.from_numpy(vdata.images[idx]))
            feats = _patch_features(model, pix)
            yc = torch.from_numpy(vdata.cat_labels[idx])
            yk = torch.from_numpy(vdata.col_labels[idx])
            lc, lk = heads["category"](feats), heads["color"](feats)
            loss = _patch_loss(heads, feats, vdata.cat_labels[idx], vdata.col_labels[idx], w_cat, w_col, (lc, lk),
                               vdata.presence[idx], cfg.presence_weight)
            lr = lr_at(step, segs)
            ema = _optimizer_step(opt, params, loss, lr, cfg.grad_clip, state, step, ema, on_step, "vision")
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                with torch.no_grad():
                    acc_c = float((lc.argmax(-1) == yc).float().mean())
                    acc_k = float((lk.argmax(-1) == yk).float().mean())
                state["history"].append({"stage": "vision", "step": step + 1, "loss": round(ema, 4),
                                         "patch_acc_category": round(acc_c, 4), "patch_acc_color": round(acc_k, 4),
                                         "lr": lr, "t": round(time.time() - t_start, 1)})
                log.info("vision step %d loss %.4f patch acc category %.3f colour %.3f", step + 1, ema, acc_c, acc_k)
                if cfg.progress and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{ema:.3f}", cat=f"{acc_c:.2f}", col=f"{acc_k:.2f}")
            done = state["step"] >= cfg.vision_steps
            if done:
                state["vision_patch_accuracy"] = _patch_accuracy(model, heads, gate_scenes, codec, patch=cfg.model.patch_size)
                log.info("vision stage done: held-out patch accuracy %s", state["vision_patch_accuracy"])
                state.update(stage="joint", step=0)
                checkpoint(heads, opt)  # the joint stage starts fresh (new optimizer), keeps the heads
                break
            if _should_stop(cfg, state):
                checkpoint(heads, opt)
                return None
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                checkpoint(heads, opt)
        del heads, opt, vdata
        if state["stage"] == "joint" and _should_stop(cfg, state):
            return None

    # ------------------------------------------------------------- stage 2: whole LLaVA
    if state["stage"] == "joint":
        heads = _Heads.build(cfg.model.vision_hidden, n_cat, n_col, cfg.seed)
        aux = cfg.aux_patch_weight > 0 and not cfg.freeze_vision
        if cfg.freeze_vision:
            model.model.vision_tower.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad] + (list(heads.parameters()) if aux else [])
        opt = _make_optimizer(params, cfg, cfg.lr)
        if not state["segments"]:
            state["segments"] = [_segment(0, cfg.joint_steps, cfg.lr, cfg.warmup_fraction, cfg.lr * cfg.min_lr_ratio)]
        folder = resume or ckpt
        if (folder / MODEL_FILE).exists():
            _load_weights(model, folder / MODEL_FILE)
            if (folder / "heads.safetensors").exists():
                _load_weights(heads, folder / "heads.safetensors")
            if state["step"] > 0:
                _load_optimizer(opt, folder)
        if ws_cfg is not None and state["step"] == 0:
            _load_language(model, ws_dir)
        if cfg.init_from and state["step"] == 0:
            fresh = model.get_input_embeddings().weight.detach().clone()
            state["init_from"] = _load_parts(model, cfg.init_from, cfg.init_parts)
            if cfg.init_fresh_unseen_tokens:
                state["init_from"]["fresh_tokens"] = _refresh_unseen_tokens(model, fresh, pool.ids)
        pad = processor.tokenizer.pad_token_id
        w_cat, w_col = _patch_class_weights(n_cat, n_col, cfg.vision_background_weight)
        features = _vision_features(model, pool, codec) if cfg.freeze_vision else None
        captured: dict = {}
        hooks = []
        if aux:
            layer = model.config.vision_feature_layer

            def grab(module, args, output):
                captured["h"] = output.hidden_states[layer][:, 1:]

            hooks.append(model.model.vision_tower.register_forward_hook(grab))
        align = cfg.align_weight > 0
        if align:
            cat_words = _word_token_ids(processor.tokenizer, sc.CATEGORIES)
            col_words = _word_token_ids(processor.tokenizer, sc.COLOR_NAMES)

            def grab_projected(module, args, output):
                captured["p"] = output

            if features is None:
                hooks.append(model.model.multi_modal_projector.register_forward_hook(grab_projected))
        model.train()
        ema = None
        while True:
            end = state["segments"][-1]["start"] + state["segments"][-1]["length"]
            bar = _progress(range(state["step"], end), cfg.progress, "joint training", total=end, initial=state["step"])
            stopped = False
            for step in bar:
                examples = sample_joint_batch(pool, cfg, step)
                batch = collate(pool, codec, examples, pad, pixels=features is None)
                lr = lr_at(step, state["segments"])
                sid = pool.scene[examples]
                loss = joint_loss(model, batch, cfg.loss_per_example,
                                  None if features is None else features[torch.from_numpy(sid)], captured)
                if aux:
                    loss = loss + cfg.aux_patch_weight * _patch_loss(
                        heads, captured.pop("h"), pool.cat_labels[sid], pool.col_labels[sid], w_cat, w_col,
                        presence=pool.presence[sid], presence_weight=cfg.presence_weight)
                if align:
                    loss = loss + cfg.align_weight * _align_loss(model, captured.pop("p"), pool.cat_labels[sid],
                                                                 pool.col_labels[sid], cat_words, col_words)
                ema = _optimizer_step(opt, params, loss, lr, cfg.grad_clip, state, step, ema, on_step, "joint")
                evaluate = bool(cfg.eval_every) and (step + 1) % cfg.eval_every == 0 and step + 1 < end
                if evaluate or (cfg.log_every and (step + 1) % cfg.log_every == 0):
                    rec = {"stage": "joint", "step": step + 1, "loss": round(ema, 4), "lr": lr,
                           "t": round(time.time() - t_start, 1)}
                    if evaluate:
                        rec["gate_accuracy"] = round(gate_eval(), 4)
                        model.train()
                    state["history"].append(rec)
                    log.info("joint step %d loss %.4f lr %.2e%s", step + 1, ema, lr,
                             f" held-out acc {rec['gate_accuracy']:.3f}" if "gate_accuracy" in rec else "")
                    if cfg.progress and hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{ema:.3f}", **({"acc": f"{rec['gate_accuracy']:.3f}"}
                                                              if "gate_accuracy" in rec else {}))
                if state["step"] < end and _should_stop(cfg, state):
                    stopped = True
                    break
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["step"] < end:
                    checkpoint(heads, opt)
            if stopped:
                checkpoint(heads, opt)
                return None
            # ---- accuracy gate at the end of the planned budget
            if cfg.gate_accuracy is None:
                state["stage"] = "final"
                break
            acc = gate_eval()
            model.train()
            state["gates"].append({"step": state["step"], "accuracy": round(acc, 4)})
            log.info("gate at joint step %d: held-out accuracy %.4f (threshold %.3f)", state["step"], acc, cfg.gate_accuracy)
            if acc >= cfg.gate_accuracy or state["step"] >= cfg.max_joint_steps:
                if acc < cfg.gate_accuracy:
                    log.warning("accuracy gate not passed (%.4f < %.3f) at the step cap %d", acc, cfg.gate_accuracy,
                                cfg.max_joint_steps)
                state["stage"] = "final"
                break
            length = min(cfg.gate_chunk_steps, cfg.max_joint_steps - state["step"])
            state["segments"].append(_segment(state["step"], length, cfg.lr * cfg.gate_restart_lr_ratio,
                                              cfg.warmup_fraction, cfg.lr * cfg.min_lr_ratio))
            log.info("extending the joint stage by %d steps", length)
            checkpoint(heads, opt)
            if _should_stop(cfg, state):
                return None
        for h in hooks:
            h.remove()
        if aux:
            state["joint_patch_accuracy"] = _patch_accuracy(model, heads, gate_scenes, codec, cfg.model.patch_size)
            log.info("joint stage done: held-out patch accuracy %s", state["joint_patch_accuracy"])
        checkpoint(heads, opt)
        del opt
    else:
        _load_weights(model, (resume or ckpt) / MODEL_FILE)

    # ------------------------------------------------------------- report + save
    model.eval()
    report = evaluate_pretrained(model, processor, cfg)
    train_s = state.get("elapsed_s", 0.0)
    meta = {
        "name": "csp_utils embedded tiny LLaVA" + ("" if cfg.overconfident_fraction else " (no confidence turns)"),
        "command": command or _default_command(cfg),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "config_fingerprint": cfg.fingerprint(),
        "steps": {"vision": cfg.vision_steps, "joint": state["step"], "joint_budget": cfg.joint_steps,
                  "joint_cap": cfg.max_joint_steps, "batch_size": cfg.batch_size},
        "gates": state["gates"],
        "vision_patch_accuracy": state.get("vision_patch_accuracy"),
        "joint_patch_accuracy": state.get("joint_patch_accuracy"),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "train_wall_s": round(train_s, 1),
        "warm_start": _warm_start_summary(ws_dir) if ws_cfg is not None else None,
        "init_from": state.get("init_from"),
        "eval": report,
        "history": state["history"],
        "versions": _versions(),
    }
    model.config.use_cache = True
    models.save_vlm(model, processor, out, meta)
    meta["sha256"] = sha256_file(out / MODEL_FILE)
    meta["size_bytes"] = int((out / MODEL_FILE).stat().st_size)
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    if not cfg.keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(ws_dir, ignore_errors=True)  # its identity stays in meta["warm_start"]
    log.info("saved %s (%.2f MB) after %.1fs", out, meta["size_bytes"] / 1e6, time.time() - t_start)
    return out


def _warm_start_summary(folder: Path) -> dict:
    """What identifies the warm-start round and what it cost, for this model's meta."""
    meta = json.loads((folder / META_FILE).read_text())
    return {"config_fingerprint": meta["config_fingerprint"], "sha256": meta["sha256"],
            "steps": meta["steps"], "train_wall_s": meta["train_wall_s"],
            "pope_accuracy_clean": meta["eval"]["pope_accuracy"]["clean"]}


def _should_stop(cfg: PretrainConfig, state: dict) -> bool:
    return cfg.stop_after_steps is not None and state["total_steps"] >= cfg.stop_after_steps


def _resumed_processor(cfg: PretrainConfig, folder: Path):
    """The processor built in code, as a fresh run builds it, after checking that it is the
    one the checkpoint was trained with (a loaded one would save extra loader keys, so a
    resumed build would not write the files an uninterrupted one writes)."""
    from csp_utils import models

    processor = models.build_processor(cfg.model)
    saved = folder / "tokenizer.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(processor.tokenizer.backend_tokenizer.to_str()):
        raise ValueError(f"the checkpoint's tokenizer ({saved}) is not the one this code builds; "
                         f"delete {folder.parent.parent} to train from scratch, or use the code that made it")
    return processor


def _patch_accuracy(model, heads, scs, codec: ImageCodec, patch: int) -> dict:
    import torch

    from csp_utils import scenes as sc

    if not scs:
        return {}
    pix = codec.decode(torch.from_numpy(codec.encode([s.image for s in scs])))
    yc, yk = (torch.from_numpy(a) for a in patch_label_rows(scs, patch))
    with torch.no_grad():
        f = _patch_features(model, pix)
        pc, pk = heads["category"](f).argmax(-1), heads["color"](f).argmax(-1)
        present = (heads["presence"](f.mean(1)) > 0).numpy()
    obj = yc < len(sc.CATEGORIES)
    out = {"category": round(float((pc == yc).float().mean()), 4), "color": round(float((pk == yk).float().mean()), 4),
           "category_on_objects": round(float((pc == yc)[obj].float().mean()), 4) if obj.any() else None,
           "color_on_objects": round(float((pk == yk)[obj].float().mean()), 4) if obj.any() else None}
    # the presence head as a POPE answerer (an upper-bound-like probe of what the LM can read)
    row = {s.scene_id: i for i, s in enumerate(scs)}
    try:
        for kind, items in pope_sets(scs).items():
            pred = [present[row[it.image_id], sc.CATEGORIES.index(it.objects[0])] for it in items]
            out[f"presence_pope_{kind}"] = round(float(np.mean([p == (it.label == "yes") for p, it in zip(pred, items)])), 4)
    except ValueError:  # scenes with fewer than 3 shapes (not POPE scenes)
        pass
    return out


def evaluate_pretrained(model, processor, cfg: PretrainConfig) -> dict:
    """Held-out numbers for csp_meta.json, on eval-split scenes with the study's benchmark
    builders: world POPE (random / popular / adversarial) and AMBER (existence / attribute /
    relation), POPE under each natural-uncertainty variant, and the verbalized confidence
    the base model gives (its own answer quoted)."""
    from csp_utils import benchmarks as bm
    from csp_utils import scenes as sc

    world = _world_config(cfg)
    scs = bm.pope_scenes(cfg.eval_scenes, world, split="eval")
    pope = pope_sets(scs)
    stats = sc.world_statistics(scs)
    amber = {k: bm.build_world_amber(scs, k, seed=HELDOUT_SEED, stats=stats).items for k in bm.AMBER_KINDS}
    clean = _by_id(scs)
    rep: dict = {"split": "eval", "scenes": len(scs), "scene_selection": "benchmarks.pope_scenes (>= 3 categories)",
                 "severity": cfg.eval_severity, "items": {f"pope-{k}": len(v) for k, v in pope.items()}}
    rep["items"].update({f"amber-{k}": len(v) for k, v in amber.items()})

    def pope_row(imgs) -> tuple[dict, np.ndarray]:
        probs = unique_probabilities(model, processor, [it for v in pope.values() for it in v], imgs)
        row, k0 = {}, 0
        for kind, items in pope.items():
            row[kind] = _acc(probs[k0:k0 + len(items)], items)
            k0 += len(items)
        row["mean"] = round(float(np.mean([row[k] for k in pope])), 4)
        return row, probs

    row, probs = pope_row(clean)
    rep["pope_accuracy"] = {"clean": row}
    rep["pope_yes_ratio"] = {"clean": round(float((probs >= 0.5).mean()), 4)}
    rep["mean_answer_probability"] = {"clean": round(float(np.maximum(probs, 1 - probs).mean()), 4)}
    ap = unique_probabilities(model, processor, [it for v in amber.values() for it in v], clean)
    rep["amber_accuracy"], k0 = {}, 0
    for kind, items in amber.items():
        rep["amber_accuracy"][kind] = _acc(ap[k0:k0 + len(items)], items)
        k0 += len(items)
    variant_imgs = {}
    for kind in cfg.eval_variants:
        variant_imgs[kind] = {s.scene_id: sc.degrade(s, kind, cfg.eval_severity, world).image for s in scs}
        row, probs = pope_row(variant_imgs[kind])
        rep["pope_accuracy"][kind] = row
        rep["pope_yes_ratio"][kind] = round(float((probs >= 0.5).mean()), 4)
        rep["mean_answer_probability"][kind] = round(float(np.maximum(probs, 1 - probs).mean()), 4)
    # verbalized confidence of the base (its own answer quoted, third and first person)
    sub = pope["random"][: cfg.eval_confidence_items]
    conf: dict = {}
    sets = [("clean", clean)] + [(k, variant_imgs[k]) for k in ("blur", "occlusion") if k in variant_imgs]
    for name, imgs in sets if sub else []:
        pv = yes_no_probabilities(model, processor, sub, imgs)
        answers = ["Yes" if q >= 0.5 else "No" for q in pv]
        correct = np.array([(a.lower() == it.label) for a, it in zip(answers, sub)])
        row = {"accuracy": round(float(correct.mean()), 4)}
        for framing in prompts.FRAMINGS:
            e = confidence_expectations(model, processor, sub, imgs, answers, framing)
            row[f"mean_confidence_{framing}"] = round(float(e.mean()), 2)
            row[f"std_confidence_{framing}"] = round(float(e.std()), 2)
            row[f"ece_{framing}"] = round(_ece(e / 100.0, correct), 4)
        conf[name] = row
    if conf:
        rep["verbalized_confidence"] = conf
    return rep


def pope_sets(scs) -> dict[str, list]:
    """World POPE items (random, popular, adversarial) on scenes, as the study builds them."""
    from csp_utils import benchmarks as bm
    from csp_utils import scenes as sc

    stats = sc.world_statistics(scs)
    return {k: bm.build_world_pope(scs, k, seed=HELDOUT_SEED, stats=stats).items for k in bm.POPE_KINDS}


def unique_probabilities(model, processor, items, images, batch_size: int = 64) -> np.ndarray:
    """``yes_no_probabilities`` computed once per distinct (image, question)."""
    keys = [(it.image_id, it.question) for it in items]
    uniq = list(dict.fromkeys(keys))
    first = {k: it for it, k in zip(reversed(items), reversed(keys))}
    p = yes_no_probabilities(model, processor, [first[k] for k in uniq], images, batch_size)
    table = dict(zip(uniq, p))
    return np.array([table[k] for k in keys])


def _acc(p: np.ndarray, items) -> float:
    if len(items) == 0:
        return float("nan")
    return round(float(np.mean(np.where(p >= 0.5, "yes", "no") == np.array([it.label for it in items]))), 4)


def _ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    try:
        from csp_utils import metrics

        return float(metrics.ece(conf, correct, n_bins))
    except Exception:  # noqa: BLE001 - the metrics module is another engineer's; fall back to a plain ECE
        bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
        return float(sum(abs(conf[bins == b].mean() - correct[bins == b].mean()) * (bins == b).mean()
                         for b in range(n_bins) if (bins == b).any()))


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
            "numpy": np.__version__}


def _default_command(cfg: PretrainConfig) -> str:
    return f"python -m csp_utils.pretrain --seed {cfg.seed} --steps {cfg.joint_steps} --vision-steps {cfg.vision_steps}"


def build_default_model(out_dir=None, config: PretrainConfig | None = None, force: bool = False,
                        command: str | None = None) -> Path:
    """The embedded default model's folder: reused when complete (checksum), else trained.

    ``out_dir=None`` uses ``models.default_model_dir()`` (the shipped copy, else the cache).
    A complete folder trained with another configuration is an error unless ``force``.
    ``force`` retrains from scratch (checkpoints discarded).
    """
    from csp_utils import models

    cfg = config or PretrainConfig()
    out = Path(out_dir) if out_dir is not None else models.default_model_dir()
    if force:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    elif is_complete(out):
        if is_complete(out, cfg):
            log.info("reusing the complete model at %s", out)
            return out
        raise ValueError(f"{out} holds a complete model trained with another configuration; "
                         "pass force=True to retrain it, or another out_dir")
    result = pretrain(out, cfg, command=command)
    if result is None:
        raise RuntimeError("training stopped early (stop_after_steps); rerun to resume")
    return result


# --------------------------------------------------------------------------- CLI
def _parse_sets(items: Sequence[str]) -> dict:
    """``FIELD=JSON`` overrides of PretrainConfig fields (scalars and lists)."""
    names = {f.name for f in dataclasses.fields(PretrainConfig)} - {"model", "world", "warm_start"}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--set {item!r}: expected FIELD=JSON with FIELD one of {sorted(names)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"--set {item!r}: the value is not JSON ({e}); quote strings as '\"text\"'") from None
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def parse_command(argv: Sequence[str]):
    """``(args, config)`` of a command line (``python -m csp_utils.pretrain`` arguments)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m csp_utils.pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="model folder (default: models.default_model_dir())")
    ap.add_argument("--steps", type=int, default=None, help="joint-stage step budget")
    ap.add_argument("--vision-steps", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None, help="cap of the joint stage with gate extensions")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--overconfident-fraction", type=float, default=None)
    ap.add_argument("--gate", type=float, default=None, help="accuracy gate (<= 0 disables)")
    ap.add_argument("--init-from", default=None, help="start from parts of this trained model folder (no warm_start)")
    ap.add_argument("--init-parts", default=None, help=f"comma-separated, of {','.join(INIT_PARTS)}")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="any PretrainConfig field, value as JSON (e.g. --set lr=0.002)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (learns nothing)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="retrain even if a complete model exists")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cfg = PretrainConfig.tiny(progress=True) if args.tiny else PretrainConfig()
    over = {"joint_steps": args.steps, "vision_steps": args.vision_steps, "seed": args.seed,
            "overconfident_fraction": args.overconfident_fraction, "num_threads": args.threads,
            "max_joint_steps": args.max_steps}
    over = {k: v for k, v in over.items() if v is not None}
    if args.gate is not None:
        over["gate_accuracy"] = args.gate if args.gate > 0 else None
    if args.no_progress:
        over["progress"] = False
    if args.init_from is not None:
        over.update(init_from=args.init_from, warm_start=None,
                    init_parts=tuple(p for p in (args.init_parts or "").split(",") if p))
    over.update(_parse_sets(args.set))
    cfg = dataclasses.replace(cfg, **over)
    if cfg.max_joint_steps < cfg.joint_steps:
        cfg = dataclasses.replace(cfg, max_joint_steps=cfg.joint_steps)
    return args, cfg


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, cfg = parse_command(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command = "python -m csp_utils.pretrain " + " ".join(argv)
    path = build_default_model(args.out, cfg, force=args.force, command=command.strip())
    meta = json.loads((Path(path) / META_FILE).read_text())
    print(json.dumps({"path": str(path), "sha256": meta["sha256"], "eval": meta["eval"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
