"""What a training stage is set to: LoRA shape, optimisation, target, layout and loss
(:class:`SFTConfigCSP`, :class:`SimPOConfigCSP`), and the hardware presets they start from:
``tiny_default()`` (the embedded model on CPU) and ``paper_llava7b()`` (a 7B LLaVA on one GPU).
The method on top of a hardware preset (paper CSP, grounded CSP, distilled) is
:mod:`csp_utils.train.methods`; :func:`make_configs` layers the three.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from csp_utils.train import methods
from csp_utils.vlm import prompts
from csp_utils.vlm.models import GROUNDED_TARGETS


REGIMES = ("sft", "simpo", "sft_simpo")
# Regime -> the adapter folders it writes, in order (names from DESIGN.md's run folder).
REGIME_ADAPTERS = {"sft": ("sft",), "simpo": ("simpo_only",), "sft_simpo": ("sft", "sft_simpo")}
CONFIDENCE_TARGETS = ("paper", "measured") + GROUNDED_TARGETS
LOSSES = ("ce", "brier", "soft_ce", "binomial_ce")
LOG_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "margin", "reward_acc",
               "chosen_logp", "rejected_logp", "mean_token_accuracy")


# --------------------------------------------------------------------------- configuration

LORA_ACTIVATIONS = ("all", "confidence")


@dataclass
class LoraSettings:
    """Which layers get LoRA, and its shape.

    ``target_modules`` names the linear layers by their last name component
    (``("q_proj", "k_proj", "v_proj", "o_proj")``) or is ``"all-linear"``; only layers
    under one of ``target_parts`` are adapted. The vision tower is left out on purpose:
    CSP teaches the language side to *read* the evidence the visual features already
    carry (LLaVA's own recipe keeps CLIP frozen too), and a frozen tower keeps the
    base model's perception identical across regimes. Add ``"vision_tower"`` to
    ``target_parts`` to adapt it as well.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    target_parts: tuple[str, ...] = ("language_model", "multi_modal_projector")
    # "all": the adapter acts on every position. "confidence": PEFT's Activated LoRA
    # (``alora_invocation_tokens``): it acts only from the follow-up confidence question on, so
    # the image, the question and the answer keep the base model's states at every layer and
    # the confidence positions read them as the base model computed them (follow_up layout;
    # language model only: the tower and projector see patches, not the text)
    activation: str = "all"


@dataclass
class StageConfig:
    """What SFT and SimPO share: data, optimisation, precision, bookkeeping."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    confidence_target: str = "paper"       # "paper" (level c) | "measured" (base model's cell accuracy)
                                           # | grounded rows: "correct" | "cell" | "internal" | "blend"
    layout: str = "single_turn"            # confidence prompt layout: prompts.LAYOUTS
    framing: str | None = None             # None: the dataset's framing column (else "third")
    learning_rate: float = 1e-3
    num_train_epochs: float = 1.0
    max_steps: int = -1                    # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"
    warmup: float = 0.03                   # < 1: fraction of the steps; >= 1: steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"                 # base weights: "float32" | "bfloat16" | "float16"
    mixed_precision: str = "no"            # autocast: "no" | "bf16" | "fp16"
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int | None = 2
    dataloader_num_workers: int = 0        # image decoding in worker processes; the resume test uses 0

    def __post_init__(self):
        if isinstance(self.lora, dict):  # configs read back from JSON
            self.lora = LoraSettings(**self.lora)
        if isinstance(self.lora.target_modules, list):
            self.lora.target_modules = tuple(self.lora.target_modules)
        if isinstance(self.lora.target_parts, list):
            self.lora.target_parts = tuple(self.lora.target_parts)
        if self.lora.activation not in LORA_ACTIVATIONS:
            raise ValueError(f"lora.activation must be one of {LORA_ACTIVATIONS}, got {self.lora.activation!r}")
        if self.lora.activation == "confidence" and self.layout != "follow_up":
            raise ValueError(f"lora.activation='confidence' starts the adapter at the follow-up confidence question: "
                             f"it needs layout='follow_up', got {self.layout!r}")
        if self.confidence_target not in CONFIDENCE_TARGETS:
            raise ValueError(f"confidence_target must be one of {CONFIDENCE_TARGETS}, got {self.confidence_target!r}")
        prompts.check_layout(self.layout)
        if self.framing is not None and self.framing not in prompts.FRAMINGS:
            raise ValueError(f"framing must be None or one of {prompts.FRAMINGS}, got {self.framing!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")


@dataclass
class SFTConfigCSP(StageConfig):
    """Stage 1. ``replay_fraction`` of each epoch's examples are clean question-answer
    turns (the ``t == 0`` rows: unperturbed images) so the model keeps answering well."""

    replay_fraction: float = 0.0
    loss: str = "ce"                       # "ce" (reply cross-entropy) | "brier" (expected Brier over options)
                                           # | "soft_ce" (option cross-entropy to a two-point target)
                                           # | "binomial_ce" (to the binomial over the options with mean y)
    # trl's fused LM head scores only the reply positions, in tiles, and logs token accuracy and
    # entropy: it saves memory on large vocabularies (a 7B LLaVA's 32k) but costs ~30% per step
    # on CPU and small models. False: the model's own cross-entropy, same loss value.
    trl_fused_loss: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")

    @property
    def uses_option_loss(self) -> bool:
        """True when stage 1 trains on the option distribution (see the module docstring)."""
        return (self.loss == "brier" or self.layout != "single_turn"
                or self.confidence_target in GROUNDED_TARGETS)


@dataclass
class SimPOConfigCSP(StageConfig):
    """Stage 2. Never call the margin plain ``gamma``: the noise schedule has its own."""

    beta: float = 2.0
    simpo_gamma: float = 1.0               # gamma / beta = 0.5, the SimPO paper's starting ratio
    learning_rate: float = 5e-4
    per_device_train_batch_size: int = 8   # pairs; the forward sees twice as many rows


@dataclass
class TrainingConfigs:
    """Everything ``train_regime`` needs besides model, data and folder."""

    sft: SFTConfigCSP = field(default_factory=SFTConfigCSP)
    simpo: SimPOConfigCSP = field(default_factory=SimPOConfigCSP)
    merge: bool = False                    # also write base + adapter merged, under merged/<adapter>


def tiny_default() -> TrainingConfigs:
    """For the embedded tiny LLaVA on CPU: the configs' own LoRA and learning rates, fp32, a
    short warm-up and frequent logs and checkpoints."""
    tiny = dict(warmup=0.05, logging_steps=5, save_steps=100)
    return TrainingConfigs(sft=SFTConfigCSP(num_train_epochs=2, **tiny), simpo=SimPOConfigCSP(**tiny))


def paper_llava7b() -> TrainingConfigs:
    """A 7B LLaVA (llava-hf/llava-1.5-7b-hf) on one 80 GB GPU: bf16 weights, LoRA on the
    attention projections, gradient checkpointing; effective batch 16 through accumulation."""
    lora = LoraSettings(target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), target_parts=("language_model",))
    common = dict(dtype="bfloat16", mixed_precision="bf16", gradient_checkpointing=True,
                  per_device_train_batch_size=4, gradient_accumulation_steps=4, dataloader_num_workers=2)
    return TrainingConfigs(
        sft=SFTConfigCSP(lora=lora, learning_rate=2e-4, trl_fused_loss=True, **common),
        # Preference tuning moves further with less: a 10x smaller rate than SFT.
        simpo=SimPOConfigCSP(lora=dataclasses.replace(lora), learning_rate=2e-5, **common),
    )


PRESETS = {"tiny_default": tiny_default, "paper_llava7b": paper_llava7b}


def make_configs(preset: str = "tiny_default", sft: dict | None = None, simpo: dict | None = None,
                 merge: bool = False, method: str | None = None) -> TrainingConfigs:
    """A hardware preset, the ``method``'s recipe over it, then what the method tuned on this
    preset (:mod:`csp_utils.train.methods`; None: the preset alone), then the overrides, as notebooks and scripts pass them: ``None`` values
    mean "keep what is there", and a ``"lora"`` dict changes only the keys it names."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    configs = PRESETS[preset]()
    layers = methods.method(method).stage_layers(preset) if method is not None else []
    for sft_changes, simpo_changes in layers + [(sft or {}, simpo or {})]:
        for stage, changes in ((configs.sft, sft_changes), (configs.simpo, simpo_changes)):
            for key, value in changes.items():
                if value is None:
                    continue
                if key == "lora":
                    stage.lora = dataclasses.replace(stage.lora, **{k: v for k, v in value.items() if v is not None})
                elif not hasattr(stage, key):
                    raise ValueError(f"unknown {type(stage).__name__} field {key!r}")
                else:
                    setattr(stage, key, value)
            stage.__post_init__()  # re-validate after the changes
    configs.merge = bool(merge)
    return configs


def check_simpo_layout(layout: str) -> None:
    # the inline reply holds the answer too: a reply-level preference would train the answer tokens
    if layout == "inline":
        raise ValueError("SimPO does not take the inline layout (its reply holds the answer); train it with the "
                         "option losses (SFT stage)")
