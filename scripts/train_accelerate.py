"""CSP training from the command line, for one process or many (``accelerate launch``).

    # one process
    python scripts/train_accelerate.py --regime sft --run-dir runs/main

    # two CPU processes (DDP over gloo), as the test does. Not `--cpu`: in accelerate 1.15
    # that flag starts a single process; see docs/multi_gpu.md
    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 scripts/train_accelerate.py \
        --regime sft_simpo --base-model /path/to/model --run-dir runs/ddp --max-steps 4

    # several GPUs, DeepSpeed or FSDP: see docs/multi_gpu.md for accelerate configs
    accelerate launch --config_file ddp.yaml scripts/train_accelerate.py \
        --preset paper_llava7b --base-model llava-hf/llava-1.5-7b-hf --run-dir runs/llava

Every process runs this same file; transformers' Trainer finds the process group that
``accelerate launch`` set up and shards the batches. The per-device batch size is the
per-process one: the effective batch is ``batch * processes * accumulation``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from csp_utils.train import regimes, settings

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regime", choices=settings.REGIMES, default="sft")
    ap.add_argument("--run-dir", required=True, help="run folder: adapters/, train_logs/, checkpoints/ go here")
    ap.add_argument("--base-model", default="embedded", help='"embedded", a model folder or a hub id')
    ap.add_argument("--dataset", help="saved perturbed dataset (default: <run-dir>/dataset)")
    ap.add_argument("--preset", choices=["tiny_default", "paper_llava7b"], default="tiny_default")
    ap.add_argument("--config", help="JSON file {'sft': {...}, 'simpo': {...}, 'merge': bool} over the preset")
    # The knobs most often changed, applied to both stages.
    ap.add_argument("--max-steps", type=int, help="optimizer steps per stage (overrides epochs)")
    ap.add_argument("--epochs", type=float)
    ap.add_argument("--batch-size", type=int, help="per process")
    ap.add_argument("--grad-accum", type=int)
    ap.add_argument("--learning-rate", type=float, help="SFT learning rate (SimPO keeps its own unless --config)")
    ap.add_argument("--confidence-target", choices=settings.CONFIDENCE_TARGETS)
    ap.add_argument("--save-steps", type=int)
    ap.add_argument("--logging-steps", type=int)
    ap.add_argument("--beta", type=float)
    ap.add_argument("--simpo-gamma", type=float)
    ap.add_argument("--merge", action="store_true", help="also write base + adapter merged under merged/")
    ap.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    ap.add_argument("--tag", default="", help='suffix of adapter / log names, e.g. "@s1" for a second seed')
    ap.add_argument("--seed", type=int, help="seed of both stages (data order, LoRA init)")
    return ap.parse_args(argv)


def build_configs(args: argparse.Namespace) -> settings.TrainingConfigs:
    """Preset, then the --config file, then the flags that were given (flags win)."""
    file = json.loads(Path(args.config).read_text()) if args.config else {}
    both = {"max_steps": args.max_steps, "num_train_epochs": args.epochs,
            "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": args.grad_accum,
            "confidence_target": args.confidence_target, "save_steps": args.save_steps,
            "logging_steps": args.logging_steps, "seed": args.seed}
    flags_sft = {**both, "learning_rate": args.learning_rate}
    flags_simpo = {**both, "beta": args.beta, "simpo_gamma": args.simpo_gamma}
    given = lambda d: {k: v for k, v in d.items() if v is not None}  # noqa: E731
    return settings.make_configs(args.preset, sft={**file.get("sft", {}), **given(flags_sft)},
                                 simpo={**file.get("simpo", {}), **given(flags_simpo)},
                                 merge=file.get("merge", False) or args.merge)


def main(argv=None) -> None:
    args = parse_args(argv)
    configs = build_configs(args)
    dataset = args.dataset or str(Path(args.run_dir) / "dataset")
    results = regimes.train_regime(args.regime, args.base_model, dataset, args.run_dir, configs,
                                    tag=args.tag, resume=not args.no_resume)
    if regimes._is_main():
        for name, result in results.items():
            state = "done" if result.completed else "interrupted"
            print(f"[train] {name}: {state} at step {result.global_step}, adapter: {result.adapter_dir}")


if __name__ == "__main__":
    main()
