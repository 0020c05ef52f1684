"""The pre-training configuration: one dataclass holding everything that determines the
trained model, plus a few runtime knobs that never change what it computes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from csp_utils.vlm.embedded.build import TinyVLMConfig
from csp_utils.world import scenes

# Example kinds of the joint stage, in the order of PretrainConfig's mix weights.
KINDS = ("caption", "yes_no", "short", "confidence")

# Parts of a LLaVA that ``init_from`` can give, by state-dict key prefix.
INIT_PARTS = {
    "vision_tower": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "embeddings": ("model.language_model.embed_tokens.",),
    "language_layers": ("model.language_model.layers.", "model.language_model.norm."),
    "lm_head": ("lm_head.",),
}
# Fields that change how a run is executed or reported, never what it computes.
RUNTIME_FIELDS = ("checkpoint_every", "stop_after_steps", "num_threads", "progress", "keep_checkpoint", "log_every")


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
        """The first round, trained from scratch (config fingerprint ca61b4593ef83d9d), whose
        language model the default warm-starts."""
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
        # Unused optional fields stay out of the hash, so the fingerprints the shipped models
        # record (and the first round's, ca61b4593ef83d9d) keep matching their configs.
        if d.get("warm_start") is None:
            d.pop("warm_start", None)
        for c in (d, d.get("warm_start") or {}):
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


def world_config(cfg: PretrainConfig) -> scenes.WorldConfig:
    return scenes.WorldConfig(**cfg.world)
