"""Training throughput: the trainer path against a bare PyTorch loop, same model, same batches.

    python scripts/bench_training.py                     # tiny random LLaVA, both stages, CPU
    python scripts/bench_training.py --stage sft --steps 60 --batch-size 16
    python scripts/bench_training.py --base-model /path/to/model --device cuda

For each stage (SFT through trl's SFTTrainer, SimPO through training.SimPOTrainer) the
script pre-collates ``steps`` batches once, then trains two identically initialised PEFT
models on exactly those batches: once through the Trainer (fed the pre-collated batches by a
pass-through collator) and once with a bare loop (forward, backward, clip, AdamW step,
scheduler step, zero_grad: what the Trainer does per step). Both skip their first
``--warmup`` steps in the timing. It prints samples/s of both and the time ratio
trainer / bare; the goal is <= 1.25.

What the ratio measures is the Trainer's per-step bookkeeping (callbacks, logging syncs,
trl's token metrics, accelerate's wrappers), not data loading: neither side collates.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from csp_utils.train import settings, shaping, trainers
from csp_utils.vlm import models
from csp_utils.vlm import prompts
from csp_utils.vlm.embedded import build


def synthetic_dataset(n: int, image_size: int, seed: int = 0):
    """Rows in the perturbed dataset's schema with random images (speed does not care)."""
    import datasets

    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        c = int(rng.choice([0, 10, 20, 30, 40, 60, 70, 80, 90, 100]))
        q = f"Is there a red circle number {i % 7}?"
        rows.append({"image": Image.fromarray(rng.randint(0, 255, (image_size, image_size, 3), dtype=np.uint8)),
                     "question": q, "answer": "Yes", "confidence": c, "target_text": f"{c}%",
                     "confidence_prompt": prompts.confidence_text(q, "Yes"), "framing": "third", "t": 100 - c})
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())


class Precollated(torch.utils.data.Dataset):
    """Item i is the i-th pre-collated batch; with batch size 1 and ``first`` as collator the
    Trainer hands each batch to the model exactly as the bare loop does."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def first(items):
    return items[0]


class StepTimer:
    """Wall time of the steps after the warm-up ones (a TrainerCallback made on demand)."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == warmup:
                    timer.start = time.perf_counter()
                timer.end = time.perf_counter()

        self.callback = _CB()
        self.start = self.end = None

    @property
    def seconds(self) -> float:
        return self.end - self.start


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(model, batches, cfg, loss_fn, warmup: int, device) -> float:
    """Forward, backward, clip, step, schedule, zero: the Trainer's step without the Trainer."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps = len(batches)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=int(np.ceil(cfg.warmup * steps)),
                              num_training_steps=steps)
    model.train()
    start = None
    for i, batch in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def sft_loss(model, batch):
    return model(**batch, use_cache=False).loss


def simpo_loss_fn(cfg):
    def loss(model, batch):
        logps = trainers.reply_mean_logps(model, batch)
        n = logps.shape[0] // 2
        return trainers.simpo_losses(logps[:n], logps[n:], cfg.beta, cfg.simpo_gamma).mean()

    return loss


def bench_stage(stage: str, base, processor, ds, args, device) -> dict:
    from peft import get_peft_model

    configs = settings.tiny_default()
    cfg = configs.sft if stage == "sft" else configs.simpo
    cfg.per_device_train_batch_size = args.batch_size
    cfg.max_steps = args.steps
    cfg.save_steps = 10 ** 9  # no checkpoints inside the timing
    cfg.logging_steps = args.logging_steps
    cfg.lora.dropout = 0.0
    if stage == "sft":
        cfg.trl_fused_loss = args.trl_fused_loss
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "sft":
            rows, _ = shaping.sft_rows(ds)
            trainer = trainers.build_sft_trainer(copy.deepcopy(base), processor, rows, cfg, tmp)
            collate = trainer.data_collator
            examples = rows
            loss_fn = sft_loss
        else:
            pairs, _ = shaping.simpo_pairs(ds)
            torch.manual_seed(0)
            peft_model = get_peft_model(copy.deepcopy(base), trainers.lora_config(base, cfg.lora))
            trainer = trainers.build_simpo_trainer(peft_model, processor, pairs, cfg, tmp)
            collate = trainer.data_collator
            examples = pairs
            loss_fn = simpo_loss_fn(cfg)
        # The same batches for both paths, collated once, outside any timing.
        batches = []
        for step in range(args.steps):
            idx = [(step * args.batch_size + j) % len(examples) for j in range(args.batch_size)]
            batches.append(collate([dict(examples[i]) for i in idx]))
        bare_model = copy.deepcopy(trainer.model).to(device)  # same PEFT model, same initial weights

        timer = StepTimer(args.warmup)
        trainer.add_callback(timer.callback)
        trainer.train_dataset = Precollated(batches)
        trainer.data_collator = first
        trainer.args.per_device_train_batch_size = 1  # one pre-collated batch per step
        trainer.train()
        trainer_s = timer.seconds
        bare_s = bare_loop(bare_model, batches, cfg, loss_fn, args.warmup, device)
    timed = (args.steps - args.warmup) * args.batch_size
    return {"stage": stage, "timed_steps": args.steps - args.warmup, "batch": args.batch_size,
            "trainer_samples_s": timed / trainer_s, "bare_samples_s": timed / bare_s, "ratio": trainer_s / bare_s}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["sft", "simpo", "both"], default="both")
    ap.add_argument("--base-model", help="model folder or hub id (default: a random tiny LLaVA)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    ap.add_argument("--batch-size", type=int, default=16, help="rows (SFT) or pairs (SimPO) per step")
    ap.add_argument("--logging-steps", type=int, default=5, help="the Trainer's logging interval (the preset's)")
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--trl-fused-loss", action="store_true", help="SFT through trl's fused LM-head loss")
    ap.add_argument("--repeats", type=int, default=1, help="repeat each measurement; medians are printed")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (1: stable on shared cores)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.base_model:
        base, processor = models.load_vlm(args.base_model, dtype=torch.float32)
        image_size = processor.image_processor.crop_size["height"]
    else:
        base, processor = build.build_tiny_vlm(build.TinyVLMConfig())
        image_size = build.TinyVLMConfig().image_size
    ds = synthetic_dataset(args.rows, image_size)
    stages = ["sft", "simpo"] if args.stage == "both" else [args.stage]
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.steps} steps "
          f"({args.warmup} warm-up) of batch {args.batch_size}, median of {args.repeats}; SFT loss: "
          f"{'trl fused LM head' if args.trl_fused_loss else 'model cross-entropy'}")
    print(f"{'stage':<6} {'trainer samples/s':>18} {'bare samples/s':>15} {'time ratio':>11}")
    for stage in stages:
        runs = [bench_stage(stage, base, processor, ds, args, device) for _ in range(args.repeats)]
        r = {k: float(np.median([x[k] for x in runs])) for k in ("trainer_samples_s", "bare_samples_s", "ratio")}
        verdict = "ok" if r["ratio"] <= 1.25 else "ABOVE the 1.25 goal"
        print(f"{stage:<6} {r['trainer_samples_s']:>18.1f} {r['bare_samples_s']:>15.1f} "
              f"{r['ratio']:>10.2f}x  {verdict}")


if __name__ == "__main__":
    main()
