"""Markdown tables of an ablation stage (notebook 06's ``ablation<suffix>.csv`` and
``ablation_paired<suffix>.csv``): each variant's pooled clean values, its seeds, and its paired
differences against the reference it ablates (within-set AUROC and Brier first).

    python scripts/ablation_tables.py runs/default/results --suffix _grounded
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from csp_utils.analysis.tables import per_seed_text

CLEAN, TRANSFER = "pooled-clean", "pooled-transfer"


def _cell(p: pd.DataFrame, method: str, set_: str, metric: str) -> str:
    r = p[(p["method"] == method) & (p["set"] == set_) & (p["metric"] == metric)]
    if r.empty:
        return "—"
    r = r.iloc[0]
    return f"{r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}] {r['verdict']}"


def tables(results: Path, suffix: str = "") -> str:
    ab = pd.read_csv(results / f"ablation{suffix}.csv")
    paired = pd.read_csv(results / f"ablation_paired{suffix}.csv")
    out = []
    for ref, p in paired.groupby("reference", sort=False):
        head = ["variant", "seeds", "clean Brier", "clean within-set AUROC", "per seed", "clean ECE10",
                "ΔBrier clean", "Δwithin-set AUROC clean", "ΔECE10 clean", "ΔBrier transfer",
                "Δwithin-set AUROC transfer"]
        lines = [f"### Against `{ref}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in [ref] + list(dict.fromkeys(p["method"])):
            v = ab[(ab["name"] == name) & (ab["set"] == CLEAN)].set_index("metric")
            if v.empty:
                continue
            seeds = int(v["seeds"].iloc[0]) if "seeds" in v else 1
            per_seed = v.loc["auroc_within"].get("per_seed") if "per_seed" in v else None
            per_seed = per_seed_text(per_seed)
            cells = [f"**{name}** (reference)" if name == ref else name, str(seeds), f"{v.loc['brier', 'value']:.3f}",
                     f"{v.loc['auroc_within', 'value']:.3f} [{v.loc['auroc_within', 'low']:.3f}, "
                     f"{v.loc['auroc_within', 'high']:.3f}]", per_seed, f"{v.loc['ece', 'value']:.3f}"]
            cells += (["", "", "", "", ""] if name == ref else
                      [_cell(p, name, CLEAN, "brier"), _cell(p, name, CLEAN, "auroc_within"),
                       _cell(p, name, CLEAN, "ece"), _cell(p, name, TRANSFER, "brier"),
                       _cell(p, name, TRANSFER, "auroc_within")])
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="a run's results folder")
    ap.add_argument("--suffix", default="", help="the ablation stage's file suffix, e.g. _grounded")
    args = ap.parse_args()
    for name in (f"ablation{args.suffix}.csv", f"ablation_paired{args.suffix}.csv"):
        if not (args.results / name).exists():
            raise SystemExit(f"{args.results / name} not found: run notebook 06 (an ablation stage) first")
    print(tables(args.results, args.suffix), end="")


if __name__ == "__main__":
    main()
