"""Method against method on the same image resamples (the study's tables pair methods with
baselines and the base model only): grounded CSP against the paper's CSP and against the
distilled model, per base model, on the pooled sets; seeds are resampled and paired seed with
seed (a method with one seed is compared with that seed alone).

    python scripts/paired_methods.py runs/default
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from csp_utils.analysis import tables
from csp_utils.evaluate import matrix

PAIRS = (("sft_simpo", "grounded"), ("distilled", "grounded"))  # (reference, method)
METRICS = ("brier", "auroc_within", "ece")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    out = []
    for base, sub in (("embedded", "results/matrix"), ("embedded-noconf", "results/noconf/matrix")):
        folder = args.run_dir / sub
        if not folder.is_dir():
            raise SystemExit(f"{folder} not found: run the default study first")
        rows = [r for r in matrix.load_rows(folder) if r["set"] not in ("calibration", "train-sample")]
        for ref, method in PAIRS:
            pair = [r for r in rows if tables.model_group(r["model"]) in (ref, method)]
            t = tables.paired_against(pair, ref, n_boot=args.n_boot)
            out.append(t.assign(base_model=base))
    t = pd.concat(out)
    t = t[t["set"].isin(["pooled-clean", "pooled-transfer"]) & t["metric"].isin(METRICS)]
    print("| base model | set | method − reference | metric | difference [95% interval] |\n|---|---|---|---|---|")
    for _, x in t.iterrows():
        print(f"| {x.base_model} | {x.set} | {x.method} − {x.reference} | {x.metric} | "
              f"{x['diff']:+.3f} [{x.diff_low:+.3f}, {x.diff_high:+.3f}] {x.verdict} |")


if __name__ == "__main__":
    main()
