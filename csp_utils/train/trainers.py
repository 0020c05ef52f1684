"""The trainers: trl's SFTTrainer for the paper's reply cross-entropy, an option-loss
trainer (expected Brier, soft CE, option CE over the single-pass option distribution) and a
VLM-aware SimPO trainer whose collator keeps each row's image; LoRA placement and the
Trainer arguments they share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from csp_utils.train.settings import LOSSES, LoraSettings, SFTConfigCSP, SimPOConfigCSP, StageConfig, check_simpo_layout
from csp_utils.train.shaping import MeasuredTargets, image_table, option_examples, with_image
from csp_utils.vlm import models, prompts
from csp_utils.vlm import engine, scoring


# --------------------------------------------------------------------------- model helpers

def use_cpu() -> bool:
    import torch

    asked = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return asked or not torch.cuda.is_available()



def load_base(base_model, dtype: str):
    """(model, processor) from "embedded", a folder / hub id, or an already loaded pair."""
    import torch

    if isinstance(base_model, tuple):
        return base_model
    return models.load_vlm(base_model, dtype=getattr(torch, dtype))


def base_name(base_model) -> str:
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


def lora_config(model, settings: LoraSettings, processor=None, framing: str | None = "third"):
    """PEFT's LoraConfig for ``settings``; an activated adapter (``activation="confidence"``)
    needs the ``processor`` whose tokens of the follow-up question invoke it."""
    import dataclasses

    from peft import LoraConfig

    extra = {}
    if settings.activation == "confidence":
        if processor is None:
            raise ValueError("an activated adapter (lora.activation='confidence') needs the processor to find "
                             "its invocation tokens")
        settings = dataclasses.replace(settings, target_parts=("language_model",))
        extra["alora_invocation_tokens"] = engine.invocation_tokens(processor, framing)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=lora_target_regex(model, settings), bias="none", task_type="CAUSAL_LM", **extra)


def _trainer_kwargs(cfg: StageConfig, output_dir: Path) -> dict:
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
        use_cpu=use_cpu(),
        dataloader_pin_memory=not use_cpu(),
    )


# --------------------------------------------------------------------------- SimPO


@dataclass
class SimPOCollator:
    """Chosen rows then rejected rows, each conversation with its own image, so pixel
    values reach both halves; labels are -100 outside the assistant's reply."""

    processor: Any
    layout: str = "single_turn"

    def __call__(self, examples: list[dict]) -> dict:
        check_simpo_layout(self.layout)
        convs = []
        for key in ("chosen", "rejected"):
            for ex in examples:
                if "response" in ex:  # pairs in any layout, built from question and quoted answer
                    msgs = prompts.confidence_messages(ex["question"], ex["response"], framing=ex["framing"],
                                                       layout=self.layout)
                else:
                    msgs = [prompts.user_turn(ex["prompt"])]
                convs.append(with_image(msgs, ex["image"].convert("RGB")) + [prompts.assistant_turn(ex[key])])
        return collate_conversations(self.processor, convs)


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
    # `from csp_utils.train.trainers import SimPOTrainer` works, yet importing the module stays light.
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

        msgs = [prompts.confidence_messages(ex["question"], ex["response"], framing=ex["framing"], layout=self.layout)
                for ex in examples]
        enc = dict(engine.encode(self.processor, msgs, [ex["image"].convert("RGB") for ex in examples]))
        enc["targets"] = torch.tensor([ex["target"] / 100 for ex in examples], dtype=torch.float32)
        return enc


def option_logliks(model, batch: dict, option_ids, split_activated: bool = True):
    """(B, K) summed token log-likelihood of each option as the reply, with gradients: the
    evaluation's single-pass scoring (prefix tree behind the prompt, one forward). With an
    activated adapter (and ``split_activated``) what precedes its invocation runs once without
    gradient and the rest continues its cache (:func:`scoring.before_invocation`): the same
    loss and gradients, without a backward pass through the image and the question."""
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "targets")}
    p = engine.Prompts(batch["input_ids"], batch["attention_mask"], rest)
    invocation = engine.activated_invocation(model) if split_activated else None
    if invocation is not None:
        p = scoring.before_invocation(model, p, invocation) or p
    attn = engine.attn_implementation(model)
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"option losses need an attention that takes a custom mask (sdpa, eager), not {attn!r}")
    return scoring._score_tree(model, p, option_ids, attn).to(batch["input_ids"].device)


def option_losses(logliks, targets, options: Sequence[int], loss: str):
    """Per-row loss from option log-likelihoods (B, K) and target fractions (B,).

    ``"brier"``: expected Brier score under the softmax over options,
    ``sum_k p_k (o_k - y)^2``. ``"ce"``: minus the log-likelihood of the option nearest
    the target (the reply cross-entropy of "c%", summed over its tokens). ``"soft_ce"``:
    cross-entropy of the softmax over options to the target distribution that splits its
    mass between the two options around y so that its mean is y (73% -> 0.7 on 70%, 0.3 on
    80%); unlike the expected Brier score, whose gradient vanishes once the option
    distribution is (nearly) one-hot, its gradient is p - q. ``"binomial_ce"``: the same
    cross-entropy to the whole distribution y implies over the K evenly spaced options,
    Binomial(K - 1, y) (mean y; every option weighted, the nearer the heavier)."""
    import torch

    o = torch.tensor([x / 100 for x in options], dtype=logliks.dtype, device=logliks.device)
    y = targets.to(logliks.dtype)
    if loss == "brier":
        return (logliks.softmax(-1) * (o[None, :] - y[:, None]) ** 2).sum(-1)
    if loss == "soft_ce":
        return -(two_point_targets(y, o) * logliks.log_softmax(-1)).sum(-1)
    if loss == "binomial_ce":
        return -(binomial_targets(y, o) * logliks.log_softmax(-1)).sum(-1)
    if loss == "ce":
        # in whole percents, so that ties are exact and go to the lower option (argmin takes the first)
        percent = torch.tensor(list(options), dtype=logliks.dtype, device=logliks.device)
        nearest = (percent[None, :] - (100 * y).round()[:, None]).abs().argmin(-1)
        return -logliks.gather(1, nearest[:, None]).squeeze(1)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def binomial_targets(y, o):
    """(B, K) Binomial(K - 1, y) over the K options ``o``, which must be evenly spaced from 0 to 1
    (0%, 10%, ..., 100%): option k's mass is the chance of k successes in K - 1 draws of y."""
    import torch

    K = len(o)
    grid = torch.linspace(0, 1, K, dtype=o.dtype, device=o.device)
    if not torch.allclose(o, grid):
        raise ValueError("binomial targets need options evenly spaced from 0 to 1")
    k = torch.arange(K, dtype=y.dtype, device=y.device)
    logc = torch.lgamma(torch.tensor(float(K), dtype=y.dtype)) - torch.lgamma(k + 1) - torch.lgamma(K - k)
    y = y.clamp(1e-6, 1 - 1e-6)[:, None]
    return torch.exp(logc[None, :] + k[None, :] * torch.log(y) + (K - 1 - k[None, :]) * torch.log1p(-y))


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
        split_activated = True   # see option_logliks; False: the whole prompt with gradient

        def __init__(self, *args, loss: str = "brier", option_ids=None, options=prompts.CONFIDENCE_LEVELS,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_kind, self.option_ids, self.options = loss, option_ids, tuple(options)
            self._metrics: dict[str, list[float]] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs["targets"]
            ll = option_logliks(model, inputs, self.option_ids, self.split_activated)
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
    return image_table(ds, list(range(len(ds))), option_examples(ds, target, measured, framing))


def build_option_trainer(model, processor, rows, cfg: SFTConfigCSP, output_dir, callbacks: Sequence = ()):
    """The option-loss trainer over ``rows`` for an already PEFT-wrapped ``model``."""
    from transformers import TrainingArguments

    args = TrainingArguments(**_trainer_kwargs(cfg, output_dir), ddp_find_unused_parameters=False)
    return _option_trainer_class()(
        model=model, args=args, train_dataset=rows, data_collator=OptionCollator(processor, cfg.layout),
        processing_class=processor, callbacks=list(callbacks), loss=cfg.loss,
        option_ids=engine.option_token_ids(processor, prompts.CONFIDENCE_LEVELS, layout=cfg.layout))


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
