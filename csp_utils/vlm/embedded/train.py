"""Training the embedded model: stage 1 (the vision tower with patch heads), stage 2 (the
whole LLaVA on chat examples, extended by an accuracy gate), and the resumable run around them.

``pretrain`` reads top to bottom: build the warm-start round if the config asks for one,
open the run (resuming from its checkpoint), train each stage that is not done, then
evaluate and save. Each stage checkpoints every ``checkpoint_every`` steps; a rerun resumes
there and ends with the weights an uninterrupted run ends with, because every batch is a
function of (seed, stage, step) and the RNG states are checkpointed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from csp_utils.core.lock import pid_lock
from csp_utils.vlm import models
from csp_utils.vlm.embedded import checkpoint, heldout
from csp_utils.vlm.embedded.build import build_processor, build_tiny_vlm
from csp_utils.vlm.embedded.checkpoint import CHECKPOINT_DIR, MODEL_FILE, WARM_START_DIR
from csp_utils.vlm.embedded.config import KINDS, PretrainConfig, world_config
from csp_utils.world import benchmarks
from csp_utils.world import catalog
from csp_utils.vlm.embedded.data import (ChatEncoder, ImageCodec, Pool, build_pool, collate, progress_bar,
                                         sample_joint_batch, step_generator, vision_data)
from csp_utils.vlm.embedded.losses import (align_loss, init_vision_positions, joint_loss, patch_class_weights,
                                           patch_features, patch_heads, patch_loss, tower_features, word_token_ids)

log = logging.getLogger("csp_utils.vlm.embedded")

N_CAT, N_COL = len(catalog.CATEGORIES), len(catalog.COLOR_NAMES)
OnStep = Callable[[str, int, float], None]


# --------------------------------------------------------------------------- schedule and optimizer
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


def segment(start: int, length: int, peak: float, warmup_fraction: float, floor: float) -> dict:
    return {"start": int(start), "length": int(length), "peak": float(peak),
            "warmup": max(1, int(round(warmup_fraction * length))), "floor": float(floor)}


def make_optimizer(params, cfg: PretrainConfig, lr: float):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(cfg.betas))


def optimizer_step(opt, params, loss, lr: float, grad_clip: float, state: dict, step: int, ema,
                    on_step, stage: str) -> float:
    """One optimizer step at ``lr`` (both stages): backward, clip, step; advances the step
    counters in ``state``, calls ``on_step`` and returns the loss's running average."""
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


# --------------------------------------------------------------------------- the run
@dataclass
class Run:
    """One training run in ``out``: the model, its data, the held-out gate set and the
    progress ``state`` that checkpoints carry."""

    cfg: PretrainConfig
    out: Path
    state: dict
    resume: Path | None          # the checkpoint folder this run resumed from
    model: object
    processor: object
    codec: ImageCodec
    pool: Pool
    gate_scenes: list
    gate_sets: dict
    gate_images: dict
    started: float               # for the history's wall times
    clock: float                 # wall time counted into state["elapsed_s"] up to here

    @property
    def ckpt(self) -> Path:
        return self.out / CHECKPOINT_DIR

    def save(self, heads, opt) -> None:
        """Checkpoint the weights, heads, optimizer and state (with the processor once)."""
        now = time.time()
        self.state["elapsed_s"] = self.state.get("elapsed_s", 0.0) + (now - self.clock)
        self.clock = now
        checkpoint.save_checkpoint(self.ckpt, self.model, heads, opt, self.state)
        if not (self.ckpt / "processor").exists():
            self.processor.save_pretrained(self.ckpt / "processor")

    def should_stop(self) -> bool:
        return self.cfg.stop_after_steps is not None and self.state["total_steps"] >= self.cfg.stop_after_steps

    def gate_accuracy(self) -> float:
        return heldout.gate_accuracy(self.model, self.processor, self.gate_sets, self.gate_images)


def open_run(out: Path, cfg: PretrainConfig, started: float) -> Run:
    """The run in ``out``: resumed from its checkpoint if one exists, else fresh; the model
    built in code, the example pool and the gate set built from the config."""
    ckpt = out / CHECKPOINT_DIR
    state = checkpoint.load_checkpoint_state(ckpt)
    if state is not None and state["fingerprint"] != cfg.fingerprint():
        raise ValueError(f"{ckpt} holds a run with another configuration; delete it or use force=True")
    resume = Path(state.pop("_folder")) if state is not None else None
    if state is not None:
        processor = checkpoint.resumed_processor(cfg, resume / "processor")
        log.info("resuming from %s (stage %s, step %d)", resume, state["stage"], state["step"])
    else:
        processor = build_processor(cfg.model)
        state = {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict(), "stage": "vision", "step": 0,
                 "segments": [], "history": [], "gates": [], "elapsed_s": 0.0, "total_steps": 0}
    model, processor = build_tiny_vlm(dataclasses.replace(cfg.model, seed=cfg.seed), processor=processor)
    encoder, codec = ChatEncoder(processor), ImageCodec(processor)
    t0 = time.time()
    pool = build_pool(cfg, encoder, codec, progress=cfg.progress)
    log.info("pool: %d scenes, %d examples (%s) in %.1fs", len(pool.images), len(pool.kind),
             ", ".join(f"{k} {len(b)}" for k, b in zip(KINDS, pool.by_kind)), time.time() - t0)
    gate_scenes = benchmarks.pope_scenes(cfg.gate_scenes, world_config(cfg), split="base", start=cfg.heldout_start)
    return Run(cfg=cfg, out=out, state=state, resume=resume, model=model, processor=processor, codec=codec,
               pool=pool, gate_scenes=gate_scenes, gate_sets=heldout.pope_sets(gate_scenes),
               gate_images=heldout.images_by_id(gate_scenes), started=started, clock=started)


# --------------------------------------------------------------------------- stage 1: vision tower
def train_vision(run: Run, on_step: OnStep | None) -> bool:
    """Stage 1: the vision tower and its patch heads; False when stopped early."""
    cfg, state, model, codec = run.cfg, run.state, run.model, run.codec
    heads = patch_heads(cfg.model.vision_hidden, N_CAT, N_COL, cfg.seed)
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = make_optimizer(params, cfg, cfg.vision_lr)
    segs = [segment(0, max(1, cfg.vision_steps), cfg.vision_lr, cfg.warmup_fraction, cfg.vision_lr * cfg.min_lr_ratio)]
    if state["step"] > 0:
        checkpoint.load_weights(model, run.resume / MODEL_FILE)
        checkpoint.load_weights(heads, run.resume / "heads.safetensors")
        checkpoint.load_optimizer(opt, run.resume)
    else:
        init_vision_positions(model, cfg.vision_position_init)
    t0 = time.time()
    vdata = vision_data(cfg, codec, run.pool, progress=cfg.progress)
    log.info("vision data: %d scenes in %.1fs", len(vdata.images), time.time() - t0)
    w_cat, w_col = patch_class_weights(N_CAT, N_COL, cfg.vision_background_weight, vdata.cat_labels,
                                       cfg.vision_class_balance)
    model.train()
    bar = progress_bar(range(state["step"], cfg.vision_steps), cfg.progress, "vision pre-training",
                       total=cfg.vision_steps, initial=state["step"])
    ema = None
    for step in bar:
        g = step_generator(cfg.seed, 1, step)
        idx = torch.randint(0, len(vdata.images), (cfg.batch_size,), generator=g).numpy()
        feats = patch_features(model, codec.decode(torch.from_numpy(vdata.images[idx])))
        lc, lk = heads["category"](feats), heads["color"](feats)
        loss = patch_loss(heads, feats, vdata.cat_labels[idx], vdata.col_labels[idx], w_cat, w_col, (lc, lk),
                          vdata.presence[idx], cfg.presence_weight)
        lr = lr_at(step, segs)
        ema = optimizer_step(opt, params, loss, lr, cfg.grad_clip, state, step, ema, on_step, "vision")
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            log_vision_step(run, bar, step, ema, lr, (lc, lk), vdata.cat_labels[idx], vdata.col_labels[idx])
        if state["step"] >= cfg.vision_steps:
            state["vision_patch_accuracy"] = heldout.patch_accuracy(model, heads, run.gate_scenes, codec,
                                                                   patch=cfg.model.patch_size)
            log.info("vision stage done: held-out patch accuracy %s", state["vision_patch_accuracy"])
            state.update(stage="joint", step=0)
            run.save(heads, opt)  # the joint stage starts fresh (new optimizer), keeps the heads
            break
        if run.should_stop():
            run.save(heads, opt)
            return False
        if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
            run.save(heads, opt)
    return not (state["stage"] == "joint" and run.should_stop())


def log_vision_step(run: Run, bar, step: int, ema: float, lr: float, logits, cat_labels, col_labels) -> None:
    """The training batch's patch accuracy, into the history, the log and the progress bar."""
    with torch.no_grad():
        acc_c = float((logits[0].argmax(-1) == torch.from_numpy(cat_labels)).float().mean())
        acc_k = float((logits[1].argmax(-1) == torch.from_numpy(col_labels)).float().mean())
    run.state["history"].append({"stage": "vision", "step": step + 1, "loss": round(ema, 4),
                                 "patch_acc_category": round(acc_c, 4), "patch_acc_color": round(acc_k, 4),
                                 "lr": lr, "t": round(time.time() - run.started, 1)})
    log.info("vision step %d loss %.4f patch acc category %.3f colour %.3f", step + 1, ema, acc_c, acc_k)
    if run.cfg.progress and hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{ema:.3f}", cat=f"{acc_c:.2f}", col=f"{acc_k:.2f}")


# --------------------------------------------------------------------------- stage 2: whole LLaVA
def _keep_patch_hidden(captured: dict, layer: int, module, args, output) -> None:
    captured["h"] = output.hidden_states[layer][:, 1:]


def _keep_projected(captured: dict, module, args, output) -> None:
    captured["p"] = output


class JointObjective:
    """The joint stage's loss of a batch: next-token loss on the assistant tokens (from the
    frozen tower's cached features, or from pixels), plus stage 1's patch loss on an unfrozen
    tower (``aux_patch_weight``) and the grounding alignment (``align_weight``). Forward hooks
    hand the tower's and the projector's outputs to those extra losses."""

    def __init__(self, run: Run, heads):
        cfg, model = run.cfg, run.model
        self.cfg, self.model, self.pool, self.codec, self.heads = cfg, model, run.pool, run.codec, heads
        self.aux = cfg.aux_patch_weight > 0 and not cfg.freeze_vision
        self.align = cfg.align_weight > 0
        self.pad = run.processor.tokenizer.pad_token_id
        self.w_cat, self.w_col = patch_class_weights(N_CAT, N_COL, cfg.vision_background_weight)
        self.features = tower_features(model, run.pool, run.codec) if cfg.freeze_vision else None
        self.captured: dict = {}
        self.hooks = []
        if self.aux:
            hook = functools.partial(_keep_patch_hidden, self.captured, model.config.vision_feature_layer)
            self.hooks.append(model.model.vision_tower.register_forward_hook(hook))
        if self.align:
            self.cat_words = word_token_ids(run.processor.tokenizer, catalog.CATEGORIES)
            self.col_words = word_token_ids(run.processor.tokenizer, catalog.COLOR_NAMES)
            if self.features is None:
                hook = functools.partial(_keep_projected, self.captured)
                self.hooks.append(model.model.multi_modal_projector.register_forward_hook(hook))

    def __call__(self, examples: np.ndarray):
        cfg, pool = self.cfg, self.pool
        batch = collate(pool, self.codec, examples, self.pad, pixels=self.features is None)
        sid = pool.scene[examples]
        feats = None if self.features is None else self.features[torch.from_numpy(sid)]
        loss = joint_loss(self.model, batch, cfg.loss_per_example, feats, self.captured)
        if self.aux:
            loss = loss + cfg.aux_patch_weight * patch_loss(
                self.heads, self.captured.pop("h"), pool.cat_labels[sid], pool.col_labels[sid], self.w_cat,
                self.w_col, presence=pool.presence[sid], presence_weight=cfg.presence_weight)
        if self.align:
            loss = loss + cfg.align_weight * align_loss(self.model, self.captured.pop("p"), pool.cat_labels[sid],
                                                        pool.col_labels[sid], self.cat_words, self.col_words)
        return loss

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()


def restore_joint(run: Run, heads, opt, warm_start_dir: Path | None) -> None:
    """The joint stage's starting weights: the checkpoint's (stage 1's tower and heads, or a
    joint run's progress), then at step 0 the warm start's language model or ``init_from``'s parts."""
    cfg, state, model = run.cfg, run.state, run.model
    folder = run.resume or run.ckpt
    if (folder / MODEL_FILE).exists():
        checkpoint.load_weights(model, folder / MODEL_FILE)
        if (folder / "heads.safetensors").exists():
            checkpoint.load_weights(heads, folder / "heads.safetensors")
        if state["step"] > 0:
            checkpoint.load_optimizer(opt, folder)
    if warm_start_dir is not None and state["step"] == 0:
        checkpoint.load_language(model, warm_start_dir)
    if cfg.init_from and state["step"] == 0:
        fresh = model.get_input_embeddings().weight.detach().clone()
        state["init_from"] = checkpoint.load_parts(model, cfg.init_from, cfg.init_parts)
        if cfg.init_fresh_unseen_tokens:
            state["init_from"]["fresh_tokens"] = checkpoint.refresh_unseen_tokens(model, fresh, run.pool.ids)


def train_joint(run: Run, warm_start_dir: Path | None, on_step: OnStep | None) -> bool:
    """Stage 2: the planned budget, then gate-driven extensions; False when stopped early."""
    cfg, state, model = run.cfg, run.state, run.model
    heads = patch_heads(cfg.model.vision_hidden, N_CAT, N_COL, cfg.seed)
    aux = cfg.aux_patch_weight > 0 and not cfg.freeze_vision
    if cfg.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + (list(heads.parameters()) if aux else [])
    opt = make_optimizer(params, cfg, cfg.lr)
    if not state["segments"]:
        state["segments"] = [segment(0, cfg.joint_steps, cfg.lr, cfg.warmup_fraction, cfg.lr * cfg.min_lr_ratio)]
    restore_joint(run, heads, opt, warm_start_dir)
    objective = JointObjective(run, heads)
    model.train()
    ema = None
    while True:
        end = state["segments"][-1]["start"] + state["segments"][-1]["length"]
        ema, stopped = joint_segment(run, objective, opt, params, heads, end, ema, on_step)
        if stopped:
            run.save(heads, opt)
            return False
        if not extend_after_gate(run):
            break
        run.save(heads, opt)
        if run.should_stop():
            return False
    objective.remove_hooks()
    if aux:
        state["joint_patch_accuracy"] = heldout.patch_accuracy(model, heads, run.gate_scenes, run.codec,
                                                              cfg.model.patch_size)
        log.info("joint stage done: held-out patch accuracy %s", state["joint_patch_accuracy"])
    run.save(heads, opt)
    return True


def joint_segment(run: Run, objective: JointObjective, opt, params, heads, end: int, ema,
                  on_step: OnStep | None) -> tuple[float | None, bool]:
    """Joint steps up to ``end``; returns the loss average and whether the run stopped early."""
    cfg, state = run.cfg, run.state
    bar = progress_bar(range(state["step"], end), cfg.progress, "joint training", total=end, initial=state["step"])
    for step in bar:
        examples = sample_joint_batch(run.pool, cfg, step)
        lr = lr_at(step, state["segments"])
        loss = objective(examples)
        ema = optimizer_step(opt, params, loss, lr, cfg.grad_clip, state, step, ema, on_step, "joint")
        evaluate = bool(cfg.eval_every) and (step + 1) % cfg.eval_every == 0 and step + 1 < end
        if evaluate or (cfg.log_every and (step + 1) % cfg.log_every == 0):
            log_joint_step(run, bar, step, ema, lr, evaluate)
        if state["step"] < end and run.should_stop():
            return ema, True
        if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["step"] < end:
            run.save(heads, opt)
    return ema, False


def log_joint_step(run: Run, bar, step: int, ema: float, lr: float, evaluate: bool) -> None:
    """Loss (and, when ``evaluate``, the gate set's accuracy) into the history, log and bar."""
    rec = {"stage": "joint", "step": step + 1, "loss": round(ema, 4), "lr": lr,
           "t": round(time.time() - run.started, 1)}
    if evaluate:
        rec["gate_accuracy"] = round(run.gate_accuracy(), 4)
        run.model.train()
    run.state["history"].append(rec)
    log.info("joint step %d loss %.4f lr %.2e%s", step + 1, ema, lr,
             f" held-out acc {rec['gate_accuracy']:.3f}" if "gate_accuracy" in rec else "")
    if run.cfg.progress and hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{ema:.3f}", **({"acc": f"{rec['gate_accuracy']:.3f}"} if "gate_accuracy" in rec else {}))


def extend_after_gate(run: Run) -> bool:
    """The accuracy gate at the end of the planned steps: True when it adds a warm-restart
    segment (accuracy below ``gate_accuracy`` and steps left under ``max_joint_steps``);
    else the stage is final."""
    cfg, state = run.cfg, run.state
    if cfg.gate_accuracy is None:
        state["stage"] = "final"
        return False
    acc = run.gate_accuracy()
    run.model.train()
    state["gates"].append({"step": state["step"], "accuracy": round(acc, 4)})
    log.info("gate at joint step %d: held-out accuracy %.4f (threshold %.3f)", state["step"], acc, cfg.gate_accuracy)
    if acc >= cfg.gate_accuracy or state["step"] >= cfg.max_joint_steps:
        if acc < cfg.gate_accuracy:
            log.warning("accuracy gate not passed (%.4f < %.3f) at the step cap %d", acc, cfg.gate_accuracy,
                        cfg.max_joint_steps)
        state["stage"] = "final"
        return False
    length = min(cfg.gate_chunk_steps, cfg.max_joint_steps - state["step"])
    state["segments"].append(segment(state["step"], length, cfg.lr * cfg.gate_restart_lr_ratio,
                                     cfg.warmup_fraction, cfg.lr * cfg.min_lr_ratio))
    log.info("extending the joint stage by %d steps", length)
    return True


# --------------------------------------------------------------------------- the whole run
def pretrain(out_dir, config: PretrainConfig | None = None, command: str | None = None,
             on_step: OnStep | None = None) -> Path | None:
    """Train (or resume) the default VLM into ``out_dir``; returns the path, or None if stopped early.

    ``config.stop_after_steps`` (a testing hook) checkpoints and returns None after that
    many optimizer steps in total (vision + joint). ``on_step(stage, step, loss)`` is
    called after every optimizer step.
    """
    cfg = config or PretrainConfig()
    cfg.check_init()
    out = Path(out_dir)
    started = time.time()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    ws_cfg = cfg.warm_start_config()
    ws_dir = out / WARM_START_DIR if ws_cfg is not None else None
    if ws_cfg is not None and not checkpoint.is_complete(ws_dir, ws_cfg):
        log.info("building the warm-start round in %s", ws_dir)
        if pretrain(ws_dir, ws_cfg, on_step=on_step) is None:
            return None
    run = open_run(out, cfg, started)
    if run.state["stage"] == "vision" and cfg.vision_steps <= 0:
        run.state.update(stage="joint", step=0)  # the tower comes from init_from (or stays random)
    if run.state["stage"] == "vision" and not train_vision(run, on_step):
        return None
    if run.state["stage"] == "joint":
        if not train_joint(run, ws_dir, on_step):
            return None
    else:
        checkpoint.load_weights(run.model, (run.resume or run.ckpt) / MODEL_FILE)
    return finish(run, command, ws_dir)


def finish(run: Run, command: str | None, warm_start_dir: Path | None) -> Path:
    """Evaluate, save the model folder with its meta, and remove the checkpoints."""
    run.model.eval()
    rep = heldout.evaluate_pretrained(run.model, run.processor, run.cfg)
    meta = heldout.model_meta(run.cfg, run.state, run.model, rep, command, warm_start_dir)
    meta = heldout.save_model(run.model, run.processor, run.out, meta)
    if not run.cfg.keep_checkpoint:
        shutil.rmtree(run.ckpt, ignore_errors=True)
        shutil.rmtree(run.out / WARM_START_DIR, ignore_errors=True)  # its identity stays in meta["warm_start"]
    log.info("saved %s (%.2f MB) after %.1fs", run.out, meta["size_bytes"] / 1e6, time.time() - run.started)
    return run.out


def build_default_model(out_dir=None, config: PretrainConfig | None = None, force: bool = False,
                        command: str | None = None) -> Path:
    """The embedded default model's folder: reused when complete (checksum), else trained.

    ``out_dir=None`` uses ``models.default_model_dir()`` (the shipped copy, else the cache).
    A complete folder trained with another configuration is an error unless ``force``.
    ``force`` retrains from scratch (checkpoints discarded).
    """
    cfg = config or PretrainConfig()
    out = Path(out_dir) if out_dir is not None else models.default_model_dir()
    if force:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    elif checkpoint.is_complete(out):
        if checkpoint.is_complete(out, cfg):
            log.info("reusing the complete model at %s", out)
            return out
        raise ValueError(f"{out} holds a complete model trained with another configuration; "
                         "pass force=True to retrain it, or another out_dir")
    with _build_lock(out):
        result = pretrain(out, cfg, command=command)
    if result is None:
        raise RuntimeError("training stopped early (stop_after_steps); rerun to resume")
    return result


class ModelBuildInProgress(RuntimeError):
    """Another process is training a model into the same folder."""


def _build_lock(out: Path):
    """``<out>.building``: two builds into one folder would train over each other's checkpoints;
    a lock whose builder was killed is taken over and its checkpoints resumed."""
    lock = out.with_name(out.name + ".building")
    lock.parent.mkdir(parents=True, exist_ok=True)

    def refused(pid, host) -> ModelBuildInProgress:
        if pid is None and host is None:
            return ModelBuildInProgress(f"could not take the build lock {lock}")
        return ModelBuildInProgress(f"{out} is being built by pid {pid} on host {host} (lock {lock}); wait for "
                                    "it to finish, or remove the lock if that process is gone")

    return pid_lock(lock, refused, lambda pid: None)


