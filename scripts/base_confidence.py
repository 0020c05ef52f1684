"""How a base model's confidence read-out responds to evidence: world POPE (random) on clean
eval-split scenes and on the same scenes heavily degraded, through ``csp_utils.evaluate.evaluation``
(greedy answer, then the single-pass expected confidence, third person, own answer quoted).

    python scripts/base_confidence.py [--model embedded embedded-noconf ...] [--scenes 100]
                                      [--severity 1.0] [--out runs/base_confidence]

Per model and condition: accuracy, "yes" ratio, the confidence distribution (mean, std,
5/50/95th percentiles, share >= 85%, mean probability of the top option), its ECE / Brier / AUROC against correctness, and the
AUROC of the internal yes/no probability; pooled over conditions, the AUROC of each
confidence (does it fall where the evidence is poor?).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEGRADED = ("blur", "low_light", "occlusion", "small")


def conditions(n_scenes: int, severity: float) -> dict:
    """{"clean": Benchmark, kind: Benchmark}: the same eval scenes, clean and degraded."""
    from csp_utils.world import benchmarks, degradations
    from csp_utils.vlm.embedded.config import PretrainConfig, world_config

    wc = world_config(PretrainConfig())
    clean = benchmarks.pope_scenes(n_scenes, wc, split="eval")
    out = {"clean": benchmarks.build_world_pope(clean, "random")}
    for kind in DEGRADED:
        degraded = [degradations.degrade(s, kind, severity, wc) for s in clean]
        out[kind] = benchmarks.build_world_pope(degraded, "random")
    return out


def summarize(rows: list[dict]) -> dict:
    import numpy as np

    from csp_utils.core import metrics

    conf = np.array([r["confidence"] for r in rows], float)
    internal = np.array([r["internal_prob"] if r["internal_prob"] is not None else np.nan for r in rows], float)
    correct = np.array([bool(r["correct"]) for r in rows])
    ok = ~np.isnan(internal)
    q = np.percentile(conf, [5, 50, 95])
    return {
        "n": len(rows), "accuracy": round(float(correct.mean()), 4),
        "yes_ratio": round(float(np.mean([r["answer"] == "yes" for r in rows])), 4),
        "confidence_mean": round(float(conf.mean()), 4), "confidence_std": round(float(conf.std()), 4),
        "confidence_p5_p50_p95": [round(float(v), 4) for v in q],
        "share_confidence_ge_85": round(float((conf >= 0.85).mean()), 4),
        # how peaked the option distribution is (1/11 = uniform over 0%..100%)
        "top_option_prob_mean": round(float(np.mean([max(r["option_probs"]) for r in rows])), 4),
        "ece10": round(float(metrics.ece(conf, correct, 10)), 4),
        "brier": round(float(metrics.brier(conf, correct)), 4),
        "auroc": round(float(metrics.auroc(conf, correct)), 4),
        "internal_mean": round(float(internal[ok].mean()), 4),
        "internal_auroc": round(float(metrics.auroc(internal[ok], correct[ok])), 4),
        "internal_ece10": round(float(metrics.ece(internal[ok], correct[ok], 10)), 4),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["embedded", "embedded-noconf"])
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--severity", type=float, default=1.0)
    ap.add_argument("--out", default="runs/base_confidence")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from csp_utils.evaluate import evaluation
    from csp_utils.vlm import models

    if args.threads:
        torch.set_num_threads(args.threads)
    sets = conditions(args.scenes, args.severity)
    cfg = evaluation.EvalConfig(readouts=("single_pass",), framings=("third",), progress=False)
    out_dir = Path(args.out)
    report: dict = {"scenes": args.scenes, "severity": args.severity, "set": "world POPE random, eval split",
                    "readout": "single_pass expected confidence, third person", "models": {}}
    for name in args.model:
        model, processor = models.load_vlm(name)
        model.eval()
        per, pooled = {}, []
        for cond, bench in sets.items():
            path = evaluation.evaluate(model, processor, bench, out_dir / f"{Path(name).name}_{cond}.jsonl", name, cfg)
            rows = evaluation.load_results(path)
            per[cond] = summarize(rows)
            pooled += rows
        per["pooled"] = summarize(pooled)
        report["models"][name] = per
        print(json.dumps({name: per}, indent=1), flush=True)
    (out_dir / "summary.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
