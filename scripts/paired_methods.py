"""Method against method on the same image resamples (the study's tables pair methods with
baselines and the base model only): grounded CSP against the paper's CSP and against the
distilled model, per base model, on the pooled sets; seeds are resampled and paired seed with
seed (a method with one seed is compared with that seed alone). Reads the per-question results
of a run folder or of figures/results (``analysis.loading.per_question``).

    python scripts/paired_methods.py runs/default
    python scripts/paired_methods.py figures/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from csp_utils.analysis import loading, tables
from csp_utils.evaluate import suites

PAIRS = (("sft_simpo", "grounded"), ("distilled", "grounded"))  # (reference, method)
METRICS = ("brier", "auroc_within", "ece")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a run folder, or a results folder such as figures/results")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    out = []
    table = loading.per_question(args.run_dir)
    for base, df in table.groupby("base", sort=False):
        rows = loading.as_rows(df[~df["set"].isin(suites.FIT_SETS)])
        for ref, method in PAIRS:
            pair = [r for r in rows if r["method"] in (ref, method)]
            if pair:
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
