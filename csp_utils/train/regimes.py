"""Running a training stage into the run folder: resumable checkpoints keyed by what the
stage depends on, the adapter with ``training_config.json`` beside it, the training log,
regimes (``sft``, ``simpo``, ``sft_simpo``) and the before/after SimPO margins.
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
from typing import Sequence

from csp_utils.core.versions import package_versions
from csp_utils.vlm import models
from csp_utils.train.trainers import (SimPOCollator, base_name, build_option_trainer, build_sft_trainer,
                                      build_simpo_trainer, load_base, lora_config, option_rows, reply_mean_logps,
                                      use_cpu)
from csp_utils.train.shaping import (MeasuredTargets, load_perturbed_dataset, measured_accuracy_targets, sft_rows,
                                     simpo_pairs)
from csp_utils.train.settings import (REGIMES, REGIME_ADAPTERS, SFTConfigCSP, SimPOConfigCSP,
                                      TrainingConfigs, tiny_default)
from csp_utils.train.callbacks import csv_log_callback
from csp_utils.vlm.models import CONFIG_FILE


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


def _state():
    """The process group, made CPU-aware *before* the Trainer asks: without GPUs, several
    processes (``accelerate launch --multi_gpu``, torchrun) join over gloo only when the
    first ``PartialState`` says ``cpu=True``; later calls share that first state."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


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
    blob = json.dumps({"stage": stage, "config": computed, "base": base_name(base_model),
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
                "stage": stage, "adapter": name, "base_model": base_name(base_model),
                "dataset_fingerprint": _dataset_key(ds), "n_rows": len(ds), "n_examples": n_examples,
                "n_dropped_pairs": n_dropped, "global_step": state.global_step,
                "world_size": trainer.args.world_size, "config": dataclasses.asdict(cfg),
                "train_metrics": metrics, "versions": package_versions(), **(extra or {}),
            }
            (adapter_dir / CONFIG_FILE).write_text(json.dumps(record, indent=2, default=str))
            models.write_base_record(adapter_dir, trainer.model, base_name(base_model))  # load_vlm checks it
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


def _one_framing(ds, framing: str | None) -> str:
    """The framing every row is asked in."""
    if framing is not None:
        return framing
    found = set(ds["framing"]) if "framing" in ds.column_names else {"third"}
    if len(found) != 1:
        raise ValueError(f"the dataset mixes framings {sorted(found)}: set the stage's framing")
    return found.pop()


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

    model, processor = load_base(base_model, cfg.dtype)
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
        activated = cfg.lora.activation == "confidence"   # one invocation question: one framing
        framing = _one_framing(ds, cfg.framing) if activated else cfg.framing
        model = get_peft_model(model, lora_config(model, cfg.lora, processor, framing))
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

    model, processor = load_base(base_model, cfg.dtype)
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
        model, processor = load_base(base_model, configs.sft.dtype)
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
