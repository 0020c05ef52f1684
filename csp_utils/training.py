"""CSP training: LoRA SFT with trl, then a VLM-aware SimPO, in three regimes.

Stage 1, SFT. The model reads a perturbed image and the (third-person by default)
confidence prompt and learns to say the target ``"c%"``; the loss covers the assistant's
reply only. trl's ``SFTTrainer`` does the work: rows are
``{"image": PIL, "messages": [user(image + prompt), assistant("c%")]}``, ``max_length=None``
so image tokens are never truncated, ``assistant_only_loss=True`` masks everything outside
the chat template's ``{% generation %}`` block.

Stage 2, SimPO (Meng et al. 2024), reference-free and length-normalised::

    loss = -logsigmoid(beta * (mean_logp(chosen) - mean_logp(rejected)) - simpo_gamma)

chosen ``"c%"``, rejected ``"(100 - c)%"``, same prompt, same image; pairs with identical
replies (c = 50) are dropped and counted. trl's only SimPO (experimental ``CPOTrainer``)
never passes pixel values to the model, so this module has its own small trainer on
``transformers.Trainer``: the collator builds the chosen and the rejected rows *each with
its image*, and one concatenated forward scores both halves.

Defaults, from the SimPO paper's search ranges (beta in [2.0, 2.5], gamma/beta in
[0.3, 0.8], with 0.5 the recommended starting ratio): ``beta = 2.0``, ``simpo_gamma = 1.0``
(gamma/beta = 0.5).

Confidence targets: ``"paper"`` (the perturbation level c, CSP's own) or ``"measured"``
(the base model's accuracy in each (level, own answer) cell of the training data, rounded
to an integer percent; the prompt then carries the model's own answer, because the cell is
keyed by it). The second is worth comparing: answers to "no" questions stay right under strong
noise, so the level alone overstates how often a noised answer is wrong.
Grounded datasets (rows quote the base model's own answer, or its flip, and carry
``correct``, ``cell_acc`` and ``internal_p``) give four more: ``"correct"`` (100 x correct),
``"cell"`` (the measured accuracy of the row's (level, answer, kind) cell), ``"internal"``
(the base model's temperature-scaled internal probability of the quoted answer, the
distillation baseline) and ``"blend"`` (their mean, 50 x internal_p + 50 x correct: the
distillation with a proper-scoring correctness term, whose expected optimum is the mean of the
internal probability and the probability of being right).

Option losses. With ``loss="brier"``, a grounded target, or a ``layout`` other than the
paper's single turn, stage 1 scores every confidence option (0%, 10%, ..., 100%) exactly as
the evaluation's single-pass read-out does (summed token log-likelihood of each option as the
reply, all options as a prefix tree behind the prompt in one forward, softmax over options)
and minimises either the expected Brier score ``sum_k p_k (o_k - y)^2`` (ConfTuner-style; y
the target fraction; proper, so its optimum is the calibrated distribution) or, for
``loss="ce"``, the reply cross-entropy of the option nearest the target (summed over its
tokens). The paper's path (paper/measured target, single turn, ``ce``) stays trl's SFTTrainer.

Regimes and artefacts, inside the run folder (DESIGN.md)::

    train_regime("sft", ...)        adapters/sft/          train_logs/sft.csv
    train_regime("simpo", ...)      adapters/simpo_only/   train_logs/simpo_only.csv
    train_regime("sft_simpo", ...)  adapters/sft/ + adapters/sft_simpo/  (+ both logs)
    checkpoints/<adapter>/checkpoint-N   what an interrupted run resumes from
    merged/<adapter>/                    with merge=True: base + adapter as one model

``tag="@s1"`` appends to every name (adapters/sft@s1, ...) for repeated seeds. Presets:
``tiny_default()`` (the embedded model on CPU) and ``paper_llava7b()`` (a 7B LLaVA on one
GPU); ``make_configs(preset, sft={...}, simpo={...})`` applies overrides.

Every adapter folder is standard PEFT (``PeftModel.from_pretrained`` or
``models.load_vlm(base, adapter=folder)``) with ``training_config.json`` beside it.

The same code runs under ``accelerate launch`` (``scripts/train_accelerate.py``): the
Trainer does DDP; files outside the Trainer are written by the main process only.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from csp_utils import models, plots, prompts
from csp_utils.versions import package_versions

REGIMES = ("sft", "simpo", "sft_simpo")
# Regime -> the adapter folders it writes, in order (names from DESIGN.md's run folder).
REGIME_ADAPTERS = {"sft": ("sft",), "simpo": ("simpo_only",), "sft_simpo": ("sft", "sft_simpo")}
GROUNDED_TARGETS = ("correct", "cell", "internal", "blend")
CONFIDENCE_TARGETS = ("paper", "measured") + GROUNDED_TARGETS
LOSSES = ("ce", "brier", "soft_ce")
CONFIG_FILE = "training_config.json"
LOG_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "margin", "reward_acc",
               "chosen_logp", "rejected_logp", "mean_token_accuracy")

# --------------------------------------------------------------------------- configuration


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


@dataclass
class _StageConfig:
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
class SFTConfigCSP(_StageConfig):
    """Stage 1. ``replay_fraction`` of each epoch's examples are clean question-answer
    turns (the ``t == 0`` rows: unperturbed images) so the model keeps answering well."""

    replay_fraction: float = 0.0
    loss: str = "ce"                       # "ce" (reply cross-entropy) | "brier" (expected Brier over options)
                                           # | "soft_ce" (option cross-entropy to a two-point target)
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
class SimPOConfigCSP(_StageConfig):
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
    """For the embedded tiny LLaVA on CPU: wide LoRA, high learning rates, fp32."""
    return TrainingConfigs(
        sft=SFTConfigCSP(lora=LoraSettings(r=16, alpha=32, dropout=0.05), learning_rate=1e-3,
                         num_train_epochs=2, per_device_train_batch_size=16, warmup=0.05,
                         logging_steps=5, save_steps=100),
        simpo=SimPOConfigCSP(lora=LoraSettings(r=16, alpha=32, dropout=0.05), learning_rate=5e-4,
                             num_train_epochs=1, per_device_train_batch_size=8, warmup=0.05,
                             logging_steps=5, save_steps=100),
    )


def paper_llava7b() -> TrainingConfigs:
    """A 7B LLaVA (llava-hf/llava-1.5-7b-hf) on one 80 GB GPU: bf16 weights, LoRA r=16 on the
    attention projections, gradient checkpointing; effective batch 16 through accumulation."""
    lora = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                        target_parts=("language_model",))
    common = dict(dtype="bfloat16", mixed_precision="bf16", gradient_checkpointing=True,
                  per_device_train_batch_size=4, gradient_accumulation_steps=4, warmup=0.03,
                  logging_steps=10, save_steps=200, dataloader_num_workers=2)
    return TrainingConfigs(
        sft=SFTConfigCSP(lora=lora, learning_rate=2e-4, num_train_epochs=1, trl_fused_loss=True, **common),
        # Preference tuning moves further with less: a 10x smaller rate than SFT.
        simpo=SimPOConfigCSP(lora=dataclasses.replace(lora), learning_rate=2e-5, num_train_epochs=1,
                             **common),
    )


# --------------------------------------------------------------------------- data

REQUIRED_COLUMNS = ("image", "question", "answer", "confidence", "confidence_prompt")
# a grounded dataset's columns that training reads (the row schema of the grounded builder)
GROUNDED_COLUMNS = ("image", "question", "answer", "correct", "cell_acc", "internal_p")


def required_columns(target: str | None = None) -> tuple[str, ...]:
    return GROUNDED_COLUMNS if target in GROUNDED_TARGETS else REQUIRED_COLUMNS


def load_perturbed_dataset(dataset, target: str | None = None):
    """A ``datasets.Dataset`` from itself or a folder: the saved dataset itself, or the
    builder's ``out_dir`` (``{run_dir}/dataset``) holding it under ``dataset/``."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        ds = dataset
    else:
        path = Path(dataset)
        candidates = [path, path / "dataset"]
        # save_to_disk writes dataset_info.json; the builder's out_dir has only its own state.json.
        found = next((p for p in candidates if (p / "dataset_info.json").exists()), None)
        if found is None:
            raise FileNotFoundError(
                f"no saved datasets.Dataset at {path} or {path / 'dataset'} "
                "(build it with perturbed_dataset.build_perturbed_dataset)"
            )
        from csp_utils.perturbed_dataset import DIGESTS_FILE, verify_dataset_folder

        if (found / DIGESTS_FILE).exists():  # the builder's output: refuse a damaged copy, naming the file
            verify_dataset_folder(found)
        ds = datasets.load_from_disk(str(found))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{found} holds a DatasetDict ({list(ds)}); pass the split to train on")
    missing = [c for c in required_columns(target) if c not in ds.column_names]
    if missing:
        what = "a grounded dataset" if target in GROUNDED_TARGETS else "the perturbed dataset"
        raise ValueError(f"{what} lacks columns {missing} (confidence target {target!r}); it has {ds.column_names}")
    if len(ds) == 0:
        raise ValueError("the perturbed dataset is empty")
    return ds


def _yes_no(text: str) -> str:
    word = str(text).strip().strip(".").lower()
    if word not in ("yes", "no"):
        raise ValueError(f"measured targets need Yes/No answers, got {text!r}")
    return "Yes" if word == "yes" else "No"


@dataclass
class MeasuredTargets:
    """The base model's own answers on the training images and the targets they give."""

    own_answers: list[str]                 # "Yes" / "No" per row
    correct: list[bool]
    targets: list[int]                     # per row: accuracy of its (level, own answer) cell, integer percent
    cells: dict[str, dict]                 # "c=70|Yes" -> {"accuracy": 0.83, "n": 12, "target": 83}


def _with_image(messages: list[dict], image) -> list[dict]:
    """Put the PIL image into the (single) image slot of a prompts.* conversation."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{**part, "image": image} if part.get("type") == "image" else part for part in content]
        out.append({**message, "content": content})
    return out


def _reply_first_tokens(processor) -> tuple[int, int]:
    """Token ids that start the replies "Yes" and "No" right after the generation prompt."""
    tok = processor.tokenizer
    convo = prompts.answer_messages("Is there a circle in the image?")
    prompt_ids = tok(processor.apply_chat_template(convo, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
    firsts = []
    for word in ("Yes", "No"):
        full = processor.apply_chat_template(convo + [prompts.assistant_turn(word)], tokenize=False)
        ids = tok(full, add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template's generation prompt is not a token prefix of the full conversation")
        firsts.append(ids[len(prompt_ids)])
    if firsts[0] == firsts[1]:
        raise ValueError(f"'Yes' and 'No' start with the same token ({firsts[0]}) for this tokenizer; "
                         "next-token yes/no needs distinct first tokens")
    return firsts[0], firsts[1]


def greedy_yes_no(model, processor, images: Sequence, questions: Sequence[str], batch_size: int = 32) -> list[str]:
    """Greedy Yes/No answers from one forward per batch: compare the next-token logits of
    the two replies' first tokens after the answer prompt."""
    import torch

    yes_id, no_id = _reply_first_tokens(processor)
    device = next(model.parameters()).device
    answers: list[str] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(questions), batch_size):
            convs = [_with_image(prompts.answer_messages(q), img.convert("RGB"))
                     for q, img in zip(questions[start:start + batch_size], images[start:start + batch_size])]
            # Right padding keeps positions as in training; the last real token is read by index.
            batch = processor.apply_chat_template(
                convs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                processor_kwargs={"padding": True, "padding_side": "right", "add_special_tokens": False})
            batch = {k: v.to(device) for k, v in batch.items()}
            last = batch["attention_mask"].sum(1) - 1
            logits = model(**batch, use_cache=False).logits
            pick = logits[torch.arange(len(last), device=device), last]
            answers += ["Yes" if y >= n else "No" for y, n in zip(pick[:, yes_id].tolist(), pick[:, no_id].tolist())]
    model.train(was_training)
    return answers


def measured_accuracy_targets(model, processor, dataset, batch_size: int = 32) -> MeasuredTargets:
    """The base model's measured accuracy in each (confidence level, own answer) cell.

    Each row's target is its cell's accuracy as an integer percent: what the model's own
    answer is worth, given how strongly the image was perturbed and what it answered.
    """
    ds = load_perturbed_dataset(dataset)
    questions = ds["question"]
    truth = [_yes_no(a) for a in ds["answer"]]
    if len(set(truth)) == 1:
        import warnings

        # With one gold answer (a build without include_negatives), every cell is 0% or 100%:
        # "own answer == gold" is all the cell can say. Build with negatives for useful targets.
        warnings.warn(f"every training answer is {truth[0]!r}: measured targets collapse to 0% / 100% per "
                      "(level, own answer) cell; build the dataset with include_negatives=True", stacklevel=2)
    levels = [int(c) for c in ds["confidence"]]
    images = _LazyImages(ds)
    own = greedy_yes_no(model, processor, images, questions, batch_size)
    correct = [o == t for o, t in zip(own, truth)]
    tally: dict[str, list[int]] = {}
    for level, answer, ok in zip(levels, own, correct):
        tally.setdefault(f"c={level}|{answer}", []).append(int(ok))
    cells = {}
    for key, oks in sorted(tally.items()):
        accuracy = sum(oks) / len(oks)
        cells[key] = {"accuracy": accuracy, "n": len(oks), "target": int(round(100 * accuracy))}
    targets = [cells[f"c={level}|{answer}"]["target"] for level, answer in zip(levels, own)]
    return MeasuredTargets(own_answers=own, correct=correct, targets=targets, cells=cells)


class _LazyImages:
    """Indexable images of a dataset, decoded on access (no copy of the image column)."""

    def __init__(self, ds):
        self.images = ds.select_columns(["image"])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self.images[i]["image"] for i in range(*item.indices(len(self)))]
        return self.images[item]["image"]


def confidence_examples(ds, target: str, measured: MeasuredTargets | None = None) -> tuple[list[str], list[int]]:
    """(prompt text, target percent) per row for the chosen confidence target."""
    if target == "paper":
        return list(ds["confidence_prompt"]), [int(c) for c in ds["confidence"]]
    if measured is None:
        raise ValueError("confidence_target='measured' needs the base model's measured targets")
    if len(measured.targets) != len(ds):
        raise ValueError(f"measured targets cover {len(measured.targets)} rows, the dataset has {len(ds)}")
    framings = ds["framing"] if "framing" in ds.column_names else ["third"] * len(ds)
    texts = [prompts.confidence_text(q, own, framing=f or "third")
             for q, own, f in zip(ds["question"], measured.own_answers, framings)]
    return texts, list(measured.targets)


def grounded_targets(ds, target: str) -> list[int]:
    """Per row of a grounded dataset, the target as an integer percent: ``correct`` ->
    100 x correct, ``cell`` -> cell_acc, ``internal`` -> round(100 x internal_p), ``blend`` ->
    round(50 x internal_p + 50 x correct). The data
    already states each value for the QUOTED answer (flip rows included)."""
    if target == "correct":
        values = [100 * int(c) for c in ds["correct"]]
    elif target == "cell":
        values = [int(c) for c in ds["cell_acc"]]
    elif target == "internal":
        values = [int(round(100 * float(p))) for p in ds["internal_p"]]
    elif target == "blend":
        values = [int(round(50 * float(p) + 50 * int(c))) for p, c in zip(ds["internal_p"], ds["correct"])]
    else:
        raise ValueError(f"grounded targets are {GROUNDED_TARGETS}, got {target!r}")
    bad = [i for i, v in enumerate(values) if not 0 <= v <= 100]
    if bad:
        raise ValueError(f"target {target!r} lies outside 0..100 at rows {bad[:5]} (values {[values[i] for i in bad[:5]]})")
    return values


def option_examples(ds, target: str, measured: MeasuredTargets | None = None,
                    framing: str | None = None) -> dict[str, list]:
    """Columns ``question``, ``response`` (the quoted answer), ``framing`` and ``target``
    (integer percent) per row: what a confidence conversation in any layout is built from."""
    if target in GROUNDED_TARGETS:
        responses, percents = [str(a) for a in ds["answer"]], grounded_targets(ds, target)
    elif target == "paper":
        responses, percents = [str(a) for a in ds["answer"]], [int(c) for c in ds["confidence"]]
    else:
        if measured is None:
            raise ValueError("confidence_target='measured' needs the base model's measured targets")
        responses, percents = list(measured.own_answers), list(measured.targets)
    framings = ([framing] * len(ds) if framing is not None
                else [f or "third" for f in ds["framing"]] if "framing" in ds.column_names else ["third"] * len(ds))
    return {"question": list(ds["question"]), "response": responses, "framing": framings, "target": percents}


def nearest_and_farthest_option(percent: int, options=prompts.CONFIDENCE_LEVELS) -> tuple[int, int]:
    """(option nearest ``percent``, option farthest from it); ties go to the lower option."""
    nearest = min(options, key=lambda o: (abs(o - percent), o))
    farthest = max(options, key=lambda o: (abs(o - percent), -o))
    return nearest, farthest


def _image_table(ds, indices: list[int], columns: dict[str, list]):
    """The dataset's images at ``indices`` with new columns beside them: a plain
    ``datasets.Dataset`` (trl's SFTTrainer takes nothing else). Without reordering no
    image is copied; with it (replay) the image column is materialised once."""
    table = ds.select_columns(["image"])
    if indices != list(range(len(ds))):
        table = table.select(indices)
    for name, values in columns.items():
        table = table.add_column(name, values)
    return table


def sft_rows(ds, target: str = "paper", measured: MeasuredTargets | None = None, replay_fraction: float = 0.0,
             seed: int = 0):
    """SFT rows ``{"image", "messages"}``: one confidence conversation per dataset row, plus
    replayed clean QA turns (drawn with replacement from the ``t == 0`` rows, the
    unperturbed images) making up ``replay_fraction`` of all rows.

    Message contents are plain strings: trl's collator puts the image slot before the user
    text, which renders exactly as ``prompts.confidence_messages`` (and keeps Arrow's
    schema simple). Returns (dataset, number of replay rows)."""
    texts, percents = confidence_examples(ds, target, measured)
    replies = [prompts.format_confidence(p) for p in percents]
    if target == "paper" and "target_text" in ds.column_names:  # the builder's own text wins
        replies = [tt or r for tt, r in zip(ds["target_text"], replies)]
    indices = list(range(len(ds)))
    messages = [[{"role": "user", "content": t}, {"role": "assistant", "content": r}] for t, r in zip(texts, replies)]
    n_replay = 0
    if replay_fraction > 0:
        clean = [i for i, t in enumerate(ds["t"] if "t" in ds.column_names else []) if int(t) == 0]
        if not clean:
            raise ValueError("replay_fraction > 0 needs clean rows (t == 0, i.e. confidence 100) in the dataset")
        n_replay = int(round(replay_fraction / (1 - replay_fraction) * len(indices)))
        rng = random.Random(seed)
        questions, answers = ds["question"], ds["answer"]
        for i in (rng.choice(clean) for _ in range(n_replay)):
            indices.append(i)
            messages.append([{"role": "user", "content": prompts.answer_text(questions[i])},
                             {"role": "assistant", "content": str(answers[i])}])
    return _image_table(ds, indices, {"messages": messages}), n_replay


def simpo_pairs(ds, target: str = "paper", measured: MeasuredTargets | None = None, layout: str = "single_turn",
                framing: str | None = None):
    """Preference pairs ``{"image", "prompt", "chosen", "rejected"}`` (chosen "c%", rejected
    "(100-c)%", same prompt, same image) and the number of rows dropped because both
    replies are the same text (c = 50).

    Grounded targets and other layouts: pairs ``{"image", "question", "response", "framing",
    "chosen", "rejected"}`` whose chosen reply is the option nearest the target and the
    rejected one the option farthest from it (so SimPO sharpens what the option loss
    taught instead of mirroring the target); nothing is dropped."""
    _check_simpo_layout(layout)
    if target in GROUNDED_TARGETS or layout != "single_turn":
        cols = option_examples(ds, target, measured, framing)
        near_far = [nearest_and_farthest_option(p) for p in cols.pop("target")]
        cols["chosen"] = [prompts.format_confidence(n) for n, _ in near_far]
        cols["rejected"] = [prompts.format_confidence(f) for _, f in near_far]
        return _image_table(ds, list(range(len(ds))), cols), 0
    texts, percents = confidence_examples(ds, target, measured)
    keep, chosen, rejected, prompt = [], [], [], []
    for i, (text, p) in enumerate(zip(texts, percents)):
        c, r = prompts.format_confidence(p), prompts.format_confidence(100 - p)
        if c == r:
            continue
        keep.append(i)
        prompt.append(text)
        chosen.append(c)
        rejected.append(r)
    dropped = len(ds) - len(keep)
    if not keep:
        raise ValueError(f"no preference pairs left: all {dropped} rows have confidence 50")
    return _image_table(ds, keep, {"prompt": prompt, "chosen": chosen, "rejected": rejected}), dropped


# --------------------------------------------------------------------------- model helpers

def _load_base(base_model, dtype: str):
    """(model, processor) from "embedded", a folder / hub id, or an already loaded pair."""
    import torch

    if isinstance(base_model, tuple):
        return base_model
    return models.load_vlm(base_model, dtype=getattr(torch, dtype))


def _base_name(base_model) -> str:
    if isinstance(base_model, tuple):
        return str(getattr(base_model[0].config, "_name_or_path", "") or "<in-memory model>")
    return str(base_model)


def lora_target_regex(model, settings: LoraSettings) -> str:
    """A PEFT ``target_modules`` regex naming the chosen linear layers of ``model``.

    Resolved against the model so a typo in a part or a layer name fails here, loudly,
    instead of training nothing."""
    import re

    import torch

    parts, wanted = settings.target_parts, settings.target_modules
    leaves = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        components = name.split(".")
        if not any(p in components for p in parts):
            continue
        if wanted == "all-linear" or components[-1] in wanted:
            leaves.add(components[-1])
    if not leaves:
        raise ValueError(f"LoRA targets {wanted!r} under {parts!r} match no linear layer of this model")
    if wanted != "all-linear" and set(wanted) - leaves:
        raise ValueError(f"LoRA target modules {sorted(set(wanted) - leaves)} do not exist under {parts!r}")
    alt = lambda xs: "|".join(re.escape(x) for x in sorted(xs))  # noqa: E731
    return rf"^(?:.*\.)?(?:{alt(parts)})\.(?:.*\.)?(?:{alt(leaves)})$"


def lora_config(model, settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=lora_target_regex(model, settings), bias="none", task_type="CAUSAL_LM")


def _trainer_kwargs(cfg: _StageConfig, output_dir: Path) -> dict:
    """TrainingArguments fields shared by both stages; offline, fp32 unless asked."""
    return dict(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        # trl turns bf16 and gradient checkpointing on by default; say what we mean.
        bf16=cfg.mixed_precision == "bf16",
        fp16=cfg.mixed_precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,  # the new name of gradient_checkpointing
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        dataloader_num_workers=cfg.dataloader_num_workers,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
        use_cpu=_use_cpu(),
        dataloader_pin_memory=not _use_cpu(),
    )


# --------------------------------------------------------------------------- SimPO


@dataclass
class SimPOCollator:
    """Chosen rows then rejected rows, each conversation with its own image, so pixel
    values reach both halves; labels are -100 outside the assistant's reply."""

    processor: Any
    layout: str = "single_turn"

    def __call__(self, examples: list[dict]) -> dict:
        _check_simpo_layout(self.layout)
        convs = []
        for key in ("chosen", "rejected"):
            for ex in examples:
                if "response" in ex:  # pairs in any layout, built from question and quoted answer
                    msgs = prompts.confidence_messages(ex["question"], ex["response"], framing=ex["framing"],
                                                       layout=self.layout)
                else:
                    msgs = [prompts.user_turn(ex["prompt"])]
                convs.append(_with_image(msgs, ex["image"].convert("RGB")) + [prompts.assistant_turn(ex[key])])
        return collate_conversations(self.processor, convs)


def _check_simpo_layout(layout: str) -> None:
    # the inline reply holds the answer too: a reply-level preference would train the answer tokens
    if layout == "inline":
        raise ValueError("SimPO does not take the inline layout (its reply holds the answer); train it with the "
                         "option losses (SFT stage)")


def collate_conversations(processor, convs: list[list[dict]]) -> dict:
    """Tokenize conversations (images inside) the way trl's VLM collator does: right
    padding, no extra special tokens, labels only on the LAST assistant turn's
    ``{% generation %}`` (earlier assistant turns, such as a quoted answer, are context)."""
    assistant_masks_from_lists()
    out = processor.apply_chat_template(
        convs, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True, "padding_side": "right", "add_special_tokens": False})
    out = dict(out)
    labels = out["input_ids"].clone()
    labels[out["attention_mask"] == 0] = -100
    labels[_last_span(out.pop("assistant_masks")) == 0] = -100
    if (labels != -100).sum(1).min() == 0:
        raise ValueError("a conversation has no assistant tokens: does the chat template mark {% generation %}?")
    out["labels"] = labels
    return out


def _last_span(mask):
    """The last contiguous run of ones in each row of a 0/1 mask; zeros elsewhere."""
    import torch

    mask = torch.as_tensor(mask).long()
    out = torch.zeros_like(mask)
    for i, row in enumerate(mask.tolist()):
        end = max((j for j, v in enumerate(row) if v), default=-1)
        start = end
        while start > 0 and row[start - 1]:
            start -= 1
        if end >= 0:
            out[i, start:end + 1] = 1
    return out


def reply_mean_logps(model, batch: dict):
    """Mean log-probability of the reply tokens (labels != -100) of every row, from one forward.

    Only the logits from the earliest reply position on are computed (``logits_to_keep``):
    the prompt with its hundreds of image tokens needs none."""
    import torch

    labels = batch["labels"]
    length = labels.shape[1]
    first = int((labels != -100).float().argmax(1).min())  # earliest reply token over the rows
    keep = length - first + 1                                # logits at first-1 .. length-1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = labels[:, length - keep + 1:]
    mask = targets != -100
    logp = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1) / mask.sum(-1)


def simpo_losses(chosen_logps, rejected_logps, beta: float, simpo_gamma: float):
    """Per-pair SimPO loss on length-normalised log-probabilities."""
    import torch.nn.functional as F

    return -F.logsigmoid(beta * (chosen_logps - rejected_logps) - simpo_gamma)


def _simpo_trainer_class():
    """Defined on first use so that importing this module stays free of transformers."""
    global SimPOTrainer
    if "SimPOTrainer" in globals():
        return SimPOTrainer
    import torch  # noqa: F811
    from transformers import Trainer

    class SimPOTrainer(Trainer):
        """``transformers.Trainer`` with a reference-free SimPO loss over image-bearing pairs.

        Batches come from ``SimPOCollator``: rows ``[:n]`` chosen, ``[n:]`` rejected, each
        with its image. One concatenated forward scores both (one DDP forward per backward).
        """

        loss_is_scaled_for_ga = False  # a per-batch mean: Trainer divides by accumulation steps

        def __init__(self, *args, beta: float = 2.0, simpo_gamma: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.beta, self.simpo_gamma = beta, simpo_gamma
            self._metrics: dict[str, list[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logps = reply_mean_logps(model, inputs)
            n = logps.shape[0] // 2
            chosen, rejected = logps[:n], logps[n:]
            losses = simpo_losses(chosen, rejected, self.beta, self.simpo_gamma)
            loss = losses.mean()
            # Metrics over all processes; every rank runs this line, so the gather is collective-safe.
            with torch.no_grad():
                stats = torch.stack([(chosen - rejected).mean(), (chosen > rejected).float().mean(),
                                     chosen.mean(), rejected.mean()]).detach()
                stats = self.accelerator.gather(stats[None]).mean(0).tolist()
            for key, value in zip(("margin", "reward_acc", "chosen_logp", "rejected_logp"), stats):
                self._metrics.setdefault(key, []).append(value)
            if return_outputs:
                return loss, {"chosen_logps": chosen, "rejected_logps": rejected}
            return loss

        def log(self, logs: dict, start_time=None):
            if "loss" in logs and self._metrics:  # a training log: attach the means since the last one
                logs.update({k: sum(v) / len(v) for k, v in self._metrics.items()})
                self._metrics = {}
            super().log(logs, start_time)

    return SimPOTrainer


def __getattr__(name: str):
    # `from csp_utils.training import SimPOTrainer` works, yet importing the module stays light.
    if name == "SimPOTrainer":
        return _simpo_trainer_class()
    if name == "OptionLossTrainer":
        return _option_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- option losses


@dataclass
class OptionCollator:
    """Confidence prompts in ``layout`` (generation prompt, no reply), each with its image,
    left padded as the evaluation batches them; ``targets`` are fractions in [0, 1]."""

    processor: Any
    layout: str = "single_turn"

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        from csp_utils import engine

        msgs = [prompts.confidence_messages(ex["question"], ex["response"], framing=ex["framing"], layout=self.layout)
                for ex in examples]
        enc = dict(engine.encode(self.processor, msgs, [ex["image"].convert("RGB") for ex in examples]))
        enc["targets"] = torch.tensor([ex["target"] / 100 for ex in examples], dtype=torch.float32)
        return enc


def option_logliks(model, batch: dict, option_ids):
    """(B, K) summed token log-likelihood of each option as the reply, with gradients: the
    evaluation's single-pass scoring (prefix tree behind the prompt, one forward)."""
    from csp_utils import engine

    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "targets")}
    p = engine.Prompts(batch["input_ids"], batch["attention_mask"], rest)
    attn = engine._attn_implementation(model)
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"option losses need an attention that takes a custom mask (sdpa, eager), not {attn!r}")
    return engine._score_tree(model, p, option_ids, attn).to(batch["input_ids"].device)


def option_losses(logliks, targets, options: Sequence[int], loss: str):
    """Per-row loss from option log-likelihoods (B, K) and target fractions (B,).

    ``"brier"``: expected Brier score under the softmax over options,
    ``sum_k p_k (o_k - y)^2``. ``"ce"``: minus the log-likelihood of the option nearest
    the target (the reply cross-entropy of "c%", summed over its tokens). ``"soft_ce"``:
    cross-entropy of the softmax over options to the target distribution that splits its
    mass between the two options around y so that its mean is y (73% -> 0.7 on 70%, 0.3 on
    80%); unlike the expected Brier score, whose gradient vanishes once the option
    distribution is (nearly) one-hot, its gradient is p - q."""
    import torch

    o = torch.tensor([x / 100 for x in options], dtype=logliks.dtype, device=logliks.device)
    y = targets.to(logliks.dtype)
    if loss == "brier":
        return (logliks.softmax(-1) * (o[None, :] - y[:, None]) ** 2).sum(-1)
    if loss == "soft_ce":
        return -(two_point_targets(y, o) * logliks.log_softmax(-1)).sum(-1)
    if loss == "ce":
        # in whole percents, so that ties are exact and go to the lower option (argmin takes the first)
        percent = torch.tensor(list(options), dtype=logliks.dtype, device=logliks.device)
        nearest = (percent[None, :] - (100 * y).round()[:, None]).abs().argmin(-1)
        return -logliks.gather(1, nearest[:, None]).squeeze(1)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def two_point_targets(y, o):
    """(B, K) distributions over sorted options ``o`` with mean ``y``: the mass sits on the
    two options around each y (all of it on an option y equals)."""
    import torch

    if bool(((o[1:] - o[:-1]) <= 0).any()):
        raise ValueError("options must be sorted and distinct")
    y = y.clamp(float(o[0]), float(o[-1]))
    hi = torch.searchsorted(o, y).clamp(1, len(o) - 1)         # o[hi - 1] <= y <= o[hi]
    lo = hi - 1
    w_hi = (y - o[lo]) / (o[hi] - o[lo])
    q = torch.zeros(y.shape[0], len(o), dtype=y.dtype, device=y.device)
    q.scatter_(1, lo[:, None], (1 - w_hi)[:, None])
    q.scatter_add_(1, hi[:, None], w_hi[:, None])
    return q


def _option_trainer_class():
    """Defined on first use so that importing this module stays free of transformers."""
    global OptionLossTrainer
    if "OptionLossTrainer" in globals():
        return OptionLossTrainer
    import torch  # noqa: F811
    from transformers import Trainer

    class OptionLossTrainer(Trainer):
        """``transformers.Trainer`` with a loss on the single-pass option distribution
        (batches from ``OptionCollator``; see :func:`option_losses`)."""

        loss_is_scaled_for_ga = False

        def __init__(self, *args, loss: str = "brier", option_ids=None, options=prompts.CONFIDENCE_LEVELS,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_kind, self.option_ids, self.options = loss, option_ids, tuple(options)
            self._metrics: dict[str, list[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs["targets"]
            ll = option_logliks(model, inputs, self.option_ids)
            loss = option_losses(ll, targets, self.options, self.loss_kind).mean()
            with torch.no_grad():
                o = torch.tensor([x / 100 for x in self.options], device=ll.device)
                expect = ll.softmax(-1) @ o
                stats = torch.stack([((expect - targets) ** 2).mean(), expect.mean()])
                stats = self.accelerator.gather(stats[None]).mean(0).tolist()
            for key, value in zip(("brier_of_expectation", "mean_expectation"), stats):
                self._metrics.setdefault(key, []).append(value)
            return (loss, {"option_logliks": ll}) if return_outputs else loss

        def log(self, logs: dict, start_time=None):
            if "loss" in logs and self._metrics:
                logs.update({k: sum(v) / len(v) for k, v in self._metrics.items()})
                self._metrics = {}
            super().log(logs, start_time)

    return OptionLossTrainer


def option_rows(ds, target: str, measured: MeasuredTargets | None = None, framing: str | None = None):
    """Training rows ``{"image", "question", "response", "framing", "target"}`` for the option losses."""
    return _image_table(ds, list(range(len(ds))), option_examples(ds, target, measured, framing))


def build_option_trainer(model, processor, rows, cfg: SFTConfigCSP, output_dir, callbacks: Sequence = ()):
    """The option-loss trainer over ``rows`` for an already PEFT-wrapped ``model``."""
    from transformers import TrainingArguments

    from csp_utils import engine

    args = TrainingArguments(**_trainer_kwargs(cfg, output_dir), ddp_find_unused_parameters=False)
    return _option_trainer_class()(
        model=model, args=args, train_dataset=rows, data_collator=OptionCollator(processor, cfg.layout),
        processing_class=processor, callbacks=list(callbacks), loss=cfg.loss,
        option_ids=engine.option_token_ids(processor, prompts.CONFIDENCE_LEVELS, layout=cfg.layout))


# --------------------------------------------------------------------------- callbacks


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def csv_log_callback(path: str | os.PathLike):
    """A TrainerCallback appending each training log to a CSV (``LOG_COLUMNS``)."""
    base = _callback_base()

    class CSVLogCallback(base):
        def __init__(self, path):
            self.path = Path(path)
            self.trimmed = False

        def on_step_begin(self, args, state, control, **kwargs):
            # A resumed run starts at its checkpoint's step: drop rows logged after it by the
            # interrupted run, so the curve holds each step once.
            if self.trimmed or not state.is_world_process_zero:
                return
            self.trimmed = True
            if state.global_step == 0 or not self.path.exists():
                self.path.unlink(missing_ok=True)
                return
            rows = read_training_log(self.path)
            _write_log(self.path, [r for r in rows if r["step"] <= state.global_step])

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True  # the last step always gets a row, whatever logging_steps
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            row = {"step": state.global_step, "epoch": state.epoch, "lr": logs.get("learning_rate"),
                   **{k: logs.get(k) for k in LOG_COLUMNS if k not in ("step", "epoch", "lr")}}
            new = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})

    return CSVLogCallback(path)


def stop_after_steps_callback(steps: int, save: bool = False):
    """Stops training once ``steps`` optimizer steps are done, like a kill: nothing is saved
    beyond the regular checkpoints unless ``save`` (a clean pause for time-boxed sessions)."""
    base = _callback_base()

    class StopAfterSteps(base):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= steps:
                control.should_save = control.should_save or save
                control.should_training_stop = True
            return control

    return StopAfterSteps()


def _write_log(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in LOG_COLUMNS})


def read_training_log(path: str | os.PathLike) -> list[dict]:
    """Rows of a training CSV, numbers as floats (``step`` as int), blanks as None."""
    rows = []
    with Path(path).open() as fh:
        for raw in csv.DictReader(fh):
            row = {k: (float(v) if v not in ("", None) else None) for k, v in raw.items()}
            row["step"] = int(row["step"])
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What a stage left behind."""

    stage: str                     # "sft" | "simpo"
    adapter_dir: Path | None       # None when the run was interrupted before its last step
    log_csv: Path
    checkpoint_dir: Path
    completed: bool
    global_step: int
    n_examples: int
    n_dropped_pairs: int = 0
    metrics: dict = field(default_factory=dict)
    merged_dir: Path | None = None


def _use_cpu() -> bool:
    import torch

    asked = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return asked or not torch.cuda.is_available()


def _state():
    """The process group, made CPU-aware *before* the Trainer asks: without GPUs, several
    processes (``accelerate launch --multi_gpu``, torchrun) join over gloo only when the
    first ``PartialState`` says ``cpu=True``; later calls share that first state."""
    from accelerate import PartialState

    return PartialState(cpu=_use_cpu())


def _is_main() -> bool:
    return _state().is_main_process


def _barrier() -> None:
    _state().wait_for_everyone()


def _dataset_key(ds) -> str:
    return getattr(ds, "_fingerprint", None) or str(len(ds))


def _prepare_checkpoints(ckpt_dir: Path, key: str, resume: bool) -> str | None:
    """The checkpoint to resume from, or None. Checkpoints from another configuration are
    an error (resuming them would silently mix two runs); ``resume=False`` clears them."""
    from transformers.trainer_utils import get_last_checkpoint

    stamp = ckpt_dir / "csp_run_key.json"
    if ckpt_dir.is_dir():
        _barrier()
        if _is_main():
            set_aside_incomplete_checkpoints(ckpt_dir)
        _barrier()
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last and resume:
        old = json.loads(stamp.read_text()).get("key") if stamp.exists() else None
        if old != key:
            raise ValueError(f"checkpoints in {ckpt_dir} come from a different configuration, base model or "
                             "dataset; delete them or pass resume=False to start over")
        return last
    _barrier()
    if _is_main():
        if ckpt_dir.is_dir():
            import shutil

            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"key": key}))
    _barrier()
    return None


INCOMPLETE_DIR = "incomplete"  # under a checkpoint folder: checkpoints a kill cut short, kept for inspection


def checkpoint_problem(folder: Path) -> str | None:
    """Why a ``checkpoint-N`` folder cannot be resumed from, or None when it is complete.

    The Trainer writes the weights, then the optimizer, scheduler and RNG states, then
    ``trainer_state.json``; a kill while saving leaves the folder without the later files or
    with one cut short. Complete: the trainer state parses, a weights file's safetensors
    header fits the file, and every torch pickle (``*.pt``, ``*.pth``) is a whole zip archive."""
    import zipfile

    state = folder / "trainer_state.json"
    try:
        if not isinstance(json.loads(state.read_text()).get("global_step"), int):
            return f"{state.name} has no global_step"
    except FileNotFoundError:
        return f"no {state.name}"
    except (OSError, ValueError, AttributeError) as err:
        return f"{state.name} is unreadable ({err})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no weights (*.safetensors)"
    from safetensors import safe_open

    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own SafetensorError for a cut file
            return f"{path.name} is damaged ({type(err).__name__}: {err})"
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth")]):
        if not zipfile.is_zipfile(path):
            return f"{path.name} is cut short (not a whole torch archive)"
    return None


def set_aside_incomplete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Move every incomplete ``checkpoint-N`` under ``incomplete/`` (out of the Trainer's sight:
    it resumes from the highest-numbered folder and would fail on an empty one), saying so."""
    import re
    import shutil

    moved = []
    for folder in sorted(ckpt_dir.iterdir()):
        if not (folder.is_dir() and re.fullmatch(r"checkpoint-\d+", folder.name)):
            continue
        problem = checkpoint_problem(folder)
        if problem is None:
            continue
        aside = ckpt_dir / INCOMPLETE_DIR / folder.name
        if aside.exists():
            shutil.rmtree(aside)
        aside.parent.mkdir(exist_ok=True)
        os.replace(folder, aside)
        print(f"[training] {folder} is incomplete ({problem}): set aside as {aside}; resuming from the "
              "last complete checkpoint", flush=True)
        moved.append(aside)
    return moved


# Fields that change how a run is logged or saved, not what it computes: a resumed run may differ in them.
_BOOKKEEPING = ("logging_steps", "save_steps", "save_total_limit", "dataloader_num_workers")


def _adapter_digest(adapter) -> str | None:
    """The adapter's weights, not its folder: a moved run folder still resumes its checkpoints."""
    if adapter is None:
        return None
    h = hashlib.sha256()
    for f in sorted(Path(adapter).glob("*.safetensors")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _run_key(stage: str, cfg, base_model, ds, init_adapter) -> str:
    computed = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _BOOKKEEPING}
    blob = json.dumps({"stage": stage, "config": computed, "base": _base_name(base_model),
                       "dataset": _dataset_key(ds), "init": _adapter_digest(init_adapter)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _finish(trainer, stage: str, cfg, run_dir: Path, name: str, ckpt_dir: Path, log_csv: Path, *,
            base_model, ds, n_examples: int, n_dropped: int = 0, extra: dict | None = None,
            train_output=None) -> TrainResult:
    """Save the adapter and its config if the run reached its last step."""
    state = trainer.state
    completed = state.global_step >= state.max_steps
    metrics = dict(getattr(train_output, "metrics", {}) or {})
    adapter_dir = None
    if completed:
        adapter_dir = run_dir / "adapters" / name
        trainer.save_model(str(adapter_dir))  # PEFT adapter (+ processor files); main process writes
        if trainer.is_world_process_zero():
            record = {
                "stage": stage, "adapter": name, "base_model": _base_name(base_model),
                "dataset_fingerprint": _dataset_key(ds), "n_rows": len(ds), "n_examples": n_examples,
                "n_dropped_pairs": n_dropped, "global_step": state.global_step,
                "world_size": trainer.args.world_size, "config": dataclasses.asdict(cfg),
                "train_metrics": metrics, "versions": package_versions(), **(extra or {}),
            }
            (adapter_dir / CONFIG_FILE).write_text(json.dumps(record, indent=2, default=str))
            models.write_base_record(adapter_dir, trainer.model, _base_name(base_model))  # load_vlm checks it
        _barrier()
    return TrainResult(stage=stage, adapter_dir=adapter_dir, log_csv=log_csv, checkpoint_dir=ckpt_dir,
                       completed=completed, global_step=state.global_step, n_examples=n_examples,
                       n_dropped_pairs=n_dropped, metrics=metrics)


def _run_state(stage: str, name: str, cfg, base_model, ds, init_adapter, run_dir: Path, resume: bool):
    """``(checkpoint dir, log CSV, checkpoint to resume or None, result if already finished
    or None)`` of the run ``name`` of ``stage`` in ``run_dir``."""
    ckpt_dir = run_dir / "checkpoints" / name
    log_csv = run_dir / "train_logs" / f"{name}.csv"
    last = _prepare_checkpoints(ckpt_dir, _run_key(stage, cfg, base_model, ds, init_adapter), resume)
    return ckpt_dir, log_csv, last, _finished_before(stage, last, run_dir / "adapters" / name, ckpt_dir, log_csv)


def _finished_before(stage: str, last: str | None, adapter_dir: Path, ckpt_dir: Path,
                     log_csv: Path) -> TrainResult | None:
    """The result of a run that already reached its last step and saved its adapter, or None.
    Checked before the model loads: a finished run needs neither it nor its training rows.

    Resuming such a run is not a no-op in transformers 5.24: the Trainer takes one more
    optimizer step past ``max_steps`` (logged as step max + 1). The checkpoint's run key
    was checked by :func:`_prepare_checkpoints`; the adapter must record the same step."""
    if last is None or not adapter_complete(adapter_dir):
        return None
    state = json.loads((Path(last) / "trainer_state.json").read_text())
    record = json.loads((adapter_dir / CONFIG_FILE).read_text())
    if not (state.get("max_steps") and state["global_step"] >= state["max_steps"]
            and record.get("global_step") == state["global_step"] and record.get("stage") == stage):
        return None
    if _is_main():
        print(f"[training] {adapter_dir.name} already finished at step {state['global_step']}: kept")
    return TrainResult(stage=stage, adapter_dir=adapter_dir, log_csv=log_csv, checkpoint_dir=ckpt_dir,
                       completed=True, global_step=state["global_step"], n_examples=record["n_examples"],
                       n_dropped_pairs=record.get("n_dropped_pairs", 0), metrics=record.get("train_metrics", {}))


def _weights_key(model) -> str:
    """A cheap identity of a model's weights: names, shapes and float64 sums of every tensor."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}{float(t.double().sum()) if t.is_floating_point() else int(t.sum())}"
                     .encode())
    return h.hexdigest()[:16]


def _measured_if_asked(cfg, model, processor, ds, measured, run_dir: Path):
    """The measured-accuracy targets when ``cfg`` asks for them and none were given: the base
    model's (call before any adapter goes on), saved under ``run_dir``. SFT and then SimPO on
    the same dataset and base model measure the same thing: the second reuses the first's
    (``train_logs/measured_targets.json``, keyed by the weights and the dataset)."""
    if cfg.confidence_target != "measured" or measured is not None:
        return measured
    return cached_measured_targets(model, processor, ds, run_dir)


def cached_measured_targets(model, processor, ds, run_dir: Path) -> MeasuredTargets:
    """:func:`measured_accuracy_targets` of ``model`` on ``ds``, measured once per run folder
    (``train_logs/measured_targets.json``, keyed by the weights and the dataset)."""
    cache = Path(run_dir) / "train_logs" / "measured_targets.json"
    key = f"{_weights_key(model)}|{_dataset_key(ds)}"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return MeasuredTargets(**saved["targets"])
    measured = measured_accuracy_targets(model, processor, ds)
    _save_measured(run_dir, measured)
    if _is_main():
        cache.write_text(json.dumps({"key": key, "targets": dataclasses.asdict(measured)}))
    return measured


def _save_measured(run_dir: Path, measured: MeasuredTargets) -> None:
    if not _is_main():
        return
    path = run_dir / "train_logs" / "measured_targets.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["cell", "accuracy", "n", "target"])
        for key, cell in measured.cells.items():
            writer.writerow([key, cell["accuracy"], cell["n"], cell["target"]])


def assistant_masks_from_lists() -> bool:
    """Make transformers' assistant-mask step read the token offsets as lists.

    ``ProcessorMixin._adjust_assistant_masks_indices`` (transformers 5.24) walks the
    ``offset_mapping`` tensor one element at a time: about half of every SFT / SimPO
    collation here (33 of 69 ms per batch of 16). Given the same offsets as lists it runs
    the same code and returns the same masks (tested). The wrapper is installed once, on
    the class, only where the method exists with that signature; True when it is in place."""
    import functools
    import inspect

    from transformers.processing_utils import ProcessorMixin

    orig = getattr(ProcessorMixin, "_adjust_assistant_masks_indices", None)
    if orig is None:
        return False
    if getattr(orig, "_csp_lists", False):
        return True
    if list(inspect.signature(orig).parameters) != ["self", "processed_dict", "generation_indices"]:
        return False

    @functools.wraps(orig)
    def with_lists(self, processed_dict, generation_indices):
        offsets = processed_dict.get("offset_mapping")
        if hasattr(offsets, "tolist"):
            processed_dict["offset_mapping"] = offsets.tolist()
        return orig(self, processed_dict, generation_indices)

    with_lists._csp_lists = True
    ProcessorMixin._adjust_assistant_masks_indices = with_lists
    return True


def build_sft_trainer(model, processor, rows, cfg: SFTConfigCSP, output_dir, callbacks: Sequence = ()):
    """trl's SFTTrainer as CSP uses it: LoRA from ``cfg.lora``, loss on the reply only,
    no truncation (``max_length=None``: image tokens must all stay)."""
    from trl import SFTConfig, SFTTrainer

    assistant_masks_from_lists()

    args = SFTConfig(**_trainer_kwargs(cfg, output_dir), max_length=None, assistant_only_loss=True,
                     packing=False, padding_free=False)
    cls = SFTTrainer if cfg.trl_fused_loss else _plain_loss_sft_trainer_class()
    return cls(model=model, args=args, train_dataset=rows, processing_class=processor,
               peft_config=lora_config(model, cfg.lora), callbacks=list(callbacks))


def _plain_loss_sft_trainer_class():
    """SFTTrainer with the model's own cross-entropy on the labels (``trl_fused_loss=False``):
    trl's data handling (VLM collator, assistant masks, PEFT) with transformers' loss."""
    from transformers import Trainer
    from trl import SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return PlainLossSFTTrainer


def build_simpo_trainer(model, processor, pairs, cfg: SimPOConfigCSP, output_dir, callbacks: Sequence = ()):
    """The VLM-aware SimPO trainer over ``pairs`` for an already PEFT-wrapped ``model``."""
    from transformers import TrainingArguments

    # All LoRA weights take part in every forward, so DDP need not search for unused ones.
    args = TrainingArguments(**_trainer_kwargs(cfg, output_dir), ddp_find_unused_parameters=False)
    return _simpo_trainer_class()(model=model, args=args, train_dataset=pairs, data_collator=SimPOCollator(processor, cfg.layout),
                                  processing_class=processor, callbacks=list(callbacks),
                                  beta=cfg.beta, simpo_gamma=cfg.simpo_gamma)


def train_sft(base_model, dataset, run_dir, config: SFTConfigCSP | None = None, *, name: str = "sft",
              measured: MeasuredTargets | None = None, resume: bool = True, callbacks: Sequence = ()) -> TrainResult:
    """Stage 1: LoRA SFT with trl's SFTTrainer. A passed ``(model, processor)`` gets LoRA
    layers injected in place; pass a name or folder to keep it untouched."""
    cfg = config or tiny_default().sft
    run_dir = Path(run_dir)
    _state()
    ds = load_perturbed_dataset(dataset, cfg.confidence_target)
    ckpt_dir, log_csv, last, done = _run_state("sft", name, cfg, base_model, ds, None, run_dir, resume)
    if done is not None:
        return done

    model, processor = _load_base(base_model, cfg.dtype)
    measured = _measured_if_asked(cfg, model, processor, ds, measured, run_dir)
    logs = [csv_log_callback(log_csv), *callbacks]
    if cfg.uses_option_loss:
        if cfg.replay_fraction > 0:
            raise ValueError("replay_fraction applies to the paper's SFT path only; the option losses train the "
                             "confidence turn alone (evaluate with adapter_scope='confidence')")
        from peft import get_peft_model
        from transformers import set_seed

        rows, n_replay = option_rows(ds, cfg.confidence_target, measured, cfg.framing), 0
        set_seed(cfg.seed)  # LoRA A starts random
        model = get_peft_model(model, lora_config(model, cfg.lora))
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        trainer = build_option_trainer(model, processor, rows, cfg, ckpt_dir, logs)
    else:
        rows, n_replay = sft_rows(ds, cfg.confidence_target, measured, cfg.replay_fraction, cfg.seed)
        trainer = build_sft_trainer(model, processor, rows, cfg, ckpt_dir, logs)
    out = trainer.train(resume_from_checkpoint=last)
    return _finish(trainer, "sft", cfg, run_dir, name, ckpt_dir, log_csv, base_model=base_model, ds=ds,
                   n_examples=len(rows), train_output=out,
                   extra={"confidence_target": cfg.confidence_target,
                          "n_replay": n_replay, "layout": cfg.layout,
                          "loss": cfg.loss if cfg.uses_option_loss else "ce"})


def train_simpo(base_model, dataset, run_dir, config: SimPOConfigCSP | None = None, *,
                init_adapter: str | os.PathLike | None = None, name: str | None = None,
                measured: MeasuredTargets | None = None, resume: bool = True,
                callbacks: Sequence = ()) -> TrainResult:
    """Stage 2: SimPO on image-bearing preference pairs. Starts from ``init_adapter`` (the
    SFT adapter, loaded trainable: the paper's order) or, when None, from a fresh LoRA on
    the base model. ``name`` defaults to "sft_simpo" after SFT and "simpo_only" otherwise."""
    from peft import PeftModel, get_peft_model

    cfg = config or tiny_default().simpo
    run_dir = Path(run_dir)
    _state()
    name = name or ("sft_simpo" if init_adapter else "simpo_only")
    ds = load_perturbed_dataset(dataset, cfg.confidence_target)
    if init_adapter is not None and not (Path(init_adapter) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{init_adapter} is not a PEFT adapter folder (no adapter_config.json)")
    ckpt_dir, log_csv, last, done = _run_state("simpo", name, cfg, base_model, ds, init_adapter, run_dir, resume)
    if done is not None:
        return done

    model, processor = _load_base(base_model, cfg.dtype)
    measured = _measured_if_asked(cfg, model, processor, ds, measured, run_dir)
    pairs, dropped = simpo_pairs(ds, cfg.confidence_target, measured, cfg.layout, cfg.framing)

    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA A starts random: seed it, as SFTTrainer does, so runs repeat exactly
    if init_adapter is not None:
        models.check_adapter_base(model, init_adapter)  # an SFT adapter of another base is refused
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(model, cfg.lora))
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # PEFT + checkpointing: inputs must carry grad
    trainer = build_simpo_trainer(model, processor, pairs, cfg, ckpt_dir, [csv_log_callback(log_csv), *callbacks])
    out = trainer.train(resume_from_checkpoint=last)
    return _finish(trainer, "simpo", cfg, run_dir, name, ckpt_dir, log_csv, base_model=base_model, ds=ds,
                   n_examples=len(pairs), n_dropped=dropped, train_output=out,
                   extra={"init_adapter": str(init_adapter) if init_adapter else None,
                          "confidence_target": cfg.confidence_target, "layout": cfg.layout,
                          "beta": cfg.beta, "simpo_gamma": cfg.simpo_gamma})


def adapter_complete(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "adapter_config.json").exists() and (folder / CONFIG_FILE).exists()


def merge_adapter(base_model, adapter_dir, out_dir, dtype: str = "float32") -> Path:
    """Base + adapter as one ordinary transformers model folder (``merge_and_unload``)."""
    import torch

    model, processor = models.load_vlm(base_model, adapter=adapter_dir, merge_adapter=True,
                                       dtype=getattr(torch, dtype))
    meta = {"base_model": str(base_model), "adapter": str(adapter_dir), "merged": True}
    return models.save_vlm(model, processor, out_dir, meta)


SFT_ADAPTER_POLICIES = ("reuse", "retrain", "require")


def train_regime(regime: str, base_model, dataset, out_dir, configs: TrainingConfigs | None = None, *,
                 sft_adapter: str = "reuse", tag: str = "", resume: bool = True,
                 callbacks: Sequence = ()) -> dict[str, TrainResult]:
    """One ablation regime in one call: "sft", "simpo" (from the base model) or
    "sft_simpo" (SFT, then SimPO from its adapter). ``out_dir`` is the run folder.

    ``sft_adapter`` says what "sft_simpo" does with a finished ``adapters/sft`` (notebook
    03's): "reuse" it (train SFT only if it is missing), "retrain" it, or "require" it
    (an error if missing: notebook 04 must not quietly redo notebook 03 with its own
    parameters). ``tag`` is appended to every adapter / log / checkpoint name, e.g. "@s1"
    for a second seed. Returns {adapter name: TrainResult}."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    if sft_adapter not in SFT_ADAPTER_POLICIES:
        raise ValueError(f"sft_adapter must be one of {SFT_ADAPTER_POLICIES}, got {sft_adapter!r}")
    if isinstance(base_model, tuple):
        raise TypeError("train_regime needs base_model as 'embedded', a folder or a hub id: each stage loads "
                        "a fresh copy (LoRA is injected in place)")
    configs = configs or tiny_default()
    run_dir = Path(out_dir)
    _state()
    sft_name, simpo_name = "sft" + tag, REGIME_ADAPTERS[regime][-1] + tag
    sft_dir = run_dir / "adapters" / sft_name
    train_sft_now = regime == "sft" or (
        regime == "sft_simpo" and (sft_adapter == "retrain" or not adapter_complete(sft_dir)))
    # the rows are read for the first stage trained here: SimPO alone reads them with its own target
    ds = load_perturbed_dataset(dataset, (configs.sft if train_sft_now else configs.simpo).confidence_target)
    if regime == "sft_simpo" and sft_adapter == "require" and not adapter_complete(sft_dir):
        raise FileNotFoundError(f"regime 'sft_simpo' starts from the SFT adapter, and {sft_dir} holds none: "
                                "train it first (notebook 03, or regime 'sft')")
    measured = None
    needs = [configs.sft.confidence_target] * train_sft_now + [configs.simpo.confidence_target] * (regime != "sft")
    if "measured" in needs:
        model, processor = _load_base(base_model, configs.sft.dtype)
        # once per run folder: both stages here, notebook 04 after 03, and the margin table
        measured = cached_measured_targets(model, processor, ds, run_dir)
        del model

    results: dict[str, TrainResult] = {}
    if train_sft_now:
        results[sft_name] = train_sft(base_model, ds, run_dir, configs.sft, name=sft_name, measured=measured,
                                      resume=resume, callbacks=callbacks)
        if not results[sft_name].completed:
            return results  # interrupted: SimPO waits for a finished SFT adapter
    elif regime == "sft_simpo" and _is_main():
        print(f"[training] SimPO starts from the existing SFT adapter {sft_dir}")
    if regime != "sft":
        results[simpo_name] = train_simpo(base_model, ds, run_dir, configs.simpo, name=simpo_name,
                                          init_adapter=sft_dir if regime == "sft_simpo" else None,
                                          measured=measured, resume=resume, callbacks=callbacks)
    if configs.merge:
        for name, result in results.items():
            if result.completed and _is_main():
                result.merged_dir = merge_adapter(base_model, result.adapter_dir, run_dir / "merged" / name,
                                                  configs.sft.dtype)
        _barrier()
    return results


def make_configs(preset: str = "tiny_default", sft: dict | None = None, simpo: dict | None = None,
                 merge: bool = False) -> TrainingConfigs:
    """A preset with overrides, as notebooks and scripts pass them: ``None`` values mean
    "keep the preset's", and a ``"lora"`` dict changes only the keys it names."""
    presets = {"tiny_default": tiny_default, "paper_llava7b": paper_llava7b}
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    configs = presets[preset]()
    for stage, changes in ((configs.sft, sft or {}), (configs.simpo, simpo or {})):
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


def pair_margins(model, processor, pairs, batch_size: int = 16, layout: str = "single_turn"):
    """Per preference pair: mean reply log-prob of chosen minus rejected, each scored with
    its image (the quantity SimPO widens). Returns a float numpy array."""
    import numpy as np
    import torch

    collate = SimPOCollator(processor, layout)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
            logps = reply_mean_logps(model, {k: v.to(device) for k, v in batch.items()})
            n = logps.shape[0] // 2
            out.append((logps[:n] - logps[n:]).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def margin_table(base_model, dataset, adapters: dict, target: str = "paper", max_pairs: int | None = 512,
                 batch_size: int = 16, seed: int = 0, run_dir=None, layout: str = "single_turn"):
    """Chosen-over-rejected margins on the training pairs, one row per model.

    ``adapters``: {label: adapter folder, or None for the base model itself}. At most
    ``max_pairs`` pairs (a seeded sample) keep it cheap for a 7B model. With ``run_dir``,
    the measured-accuracy targets come from the run's cache (what training used)."""
    import numpy as np
    import pandas as pd

    ds = load_perturbed_dataset(dataset, target)
    measured = None
    if target == "measured":
        model, processor = models.load_vlm(base_model)
        measured = (cached_measured_targets(model, processor, ds, run_dir) if run_dir is not None
                    else measured_accuracy_targets(model, processor, ds))
    pairs, _ = simpo_pairs(ds, target, measured, layout)
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = pairs.select(sorted(random.Random(seed).sample(range(len(pairs)), max_pairs)))
    rows = []
    for label, adapter in adapters.items():
        model, processor = models.load_vlm(base_model, adapter=adapter)
        m = pair_margins(model, processor, pairs, batch_size, layout)
        rows.append({"model": label, "pairs": len(m), "mean_margin": float(np.mean(m)),
                     "median_margin": float(np.median(m)), "chosen_preferred": float(np.mean(m > 0))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- curves


def plot_training_curves(csv_paths, title: str | None = None):
    """Loss and learning rate per step for every log; SimPO margin and reward accuracy where
    logged (:func:`plots.training_curves`)."""
    return plots.training_curves(csv_paths, title)
