"""Run first on a GPU machine: the paper's whole chain on toy models, in minutes, on CUDA.

    python scripts/rehearse_gpu.py                    # CUDA: bf16 training, bf16 + device_map="auto" evaluation
    python scripts/rehearse_gpu.py --cpu              # the same chain as params/paper_smoke.yaml on CPU

It writes the rehearsal kit (random-weight LLaVA-1.5-layout / GroundingDINO / SAM folders,
photographs, official-format POPE / AMBER files; ``csp_utils.pipeline.rehearsal``), then runs the stages of
``params/paper.yaml`` through the study driver. On CUDA the params are those of
``params/paper_smoke.yaml`` with the GPU settings of ``params/paper.yaml`` put back: the
``paper_llava7b`` training preset as it is (bf16 weights, bf16 autocast, gradient checkpointing)
and evaluation in bf16 with ``device_map="auto"``; GroundingDINO and SAM run on CUDA (their
default when it is available). The derived params file is written beside the run. A stage that
fails stops the chain with its executed notebook kept; the stage timings are printed at the end.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from csp_utils.pipeline import rehearsal, driver

SMOKE = REPO / "params" / "paper_smoke.yaml"
GPU_EVAL = {"dtype": "bfloat16", "device_map": "auto"}
CPU_TRAINING = ("dtype", "mixed_precision", "dataloader_num_workers")  # paper_smoke's CPU overrides of the preset


def gpu_params(smoke: dict) -> dict:
    """paper_smoke's params with the GPU settings of paper.yaml: no CPU overrides of the preset,
    bf16 evaluation placed by device_map."""
    params = json.loads(json.dumps(smoke))  # a deep copy
    params["name"] = "paper_gpu_rehearsal"
    for stage, values in params["stages"].items():
        if stage.startswith(("03_", "04_")):
            config = values.get("sft" if stage.startswith("03_") else "simpo", {})
            for key in CPU_TRAINING:
                config.pop(key, None)
        if stage.startswith("05_"):
            values.update(GPU_EVAL)
    return params


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kit", default="runs/rehearsal_kit", help="folder for the rehearsal kit (made if absent)")
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--cpu", action="store_true", help="run params/paper_smoke.yaml as it is, on CPU")
    args = ap.parse_args(argv)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible to torch: install the GPU extra (README), or pass --cpu")
    kit = Path(args.kit)
    t0 = time.time()
    if not (kit / "models" / "llava" / "config.json").exists():
        rehearsal.make_rehearsal_kit(kit)
    print(f"[rehearsal] kit in {kit} ({time.time() - t0:.0f} s)", flush=True)

    params_path = SMOKE
    if not args.cpu:
        params_path = Path(args.runs_root) / "paper_gpu_rehearsal.yaml"
        params_path.parent.mkdir(parents=True, exist_ok=True)
        params_path.write_text(yaml.safe_dump(gpu_params(yaml.safe_load(SMOKE.read_text())), sort_keys=False))
        print(f"[rehearsal] CUDA: {torch.cuda.get_device_name(0)}; params {params_path}", flush=True)
    run_dir = driver.run_study(params_path, runs_root=args.runs_root, overrides=rehearsal.study_overrides(kit))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    print("[rehearsal] stage timings (s):", json.dumps(manifest["timings_s"]))
    print(f"[rehearsal] run folder: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
