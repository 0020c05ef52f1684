"""What a confidence turn reads under shift: its mean confidence against a degradation's strength
and against the noise on the asked object, beside the base model's accuracy (what a calibrated
confidence follows) and its temperature-scaled probability.

    python scripts/shift_readout.py --base embedded-deep \
        --adapters distilled_activated=runs/default/adapters/sft@ad0 calibrated_activated=runs/default/adapters/sft@cd0 \
        [--images 40] [--severities 0 0.35 0.7 1.0] [--out docs/shift] [--held-out]

1. Degradations (blur, clutter, low light, occlusion, small; never trained on) at each severity
   on eval-split scenes from ``START`` (past every set of the suite, so none of them is an
   evaluation image), POPE-random questions. ``--held-out``: haze, pixelation and JPEG instead,
   degradations outside the suite that no set and no choice has seen (``HELD_OUT_DEGRADATIONS``).
2. CSP noise on the asked object at levels 100 (clean) / 70 / 40 / 10 on eval-split scenes from
   ``START`` + 50,000 (the grounded perturbed set's construction; key-noise rows only).
3. Temperature fitted on the validation calibration set of ``learning_curve`` (CSP-split scenes).

Writes ``shift_readout.csv`` (one row per condition and model: accuracy, mean confidence, Brier),
``shift_summary.csv`` (each degradation over its severities above 0: accuracy, mean confidence,
Brier, ECE10, beside a constant at the validation accuracy) and ``shift_readout.png``/``.pdf``
(``heldout_*`` with ``--held-out``). Nothing here chooses a setting: it describes trained adapters.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from learning_curve import VALIDATION_STARTS, elicit  # scripts/ is on the path: the script's own folder

START = 700_000


def degraded_sets(n_images: int, severities, kinds):
    from csp_utils.world import benchmarks, degradations, scenes as world

    wc = world.WorldConfig()
    clean = benchmarks.pope_scenes(n_images, wc, split="eval", start=START)
    out = {}
    for kind in kinds:
        for sev in severities:
            scenes = [degradations.degrade(s, kind, float(sev), wc) for s in clean]
            out[(kind, float(sev))] = benchmarks.build_world_pope(scenes, "random", seed=0)
    return out


def noise_sets(n_images: int, levels=(70, 40, 10)):
    """The asked object noised at each level, and the same questions clean (level 100)."""
    from csp_utils.dataset import grounded_rows
    from csp_utils.world import benchmarks

    bench = grounded_rows.grounded_perturbed_benchmark(n_images, levels=levels, start=START + 50_000)
    out = {}
    for it in bench.items:
        on, level = it.question_id.split("@")[-2], int(it.question_id.split("@c")[-1])
        if on in ("none", "key"):
            out.setdefault(level, []).append(it)
    return {lv: benchmarks.Benchmark(f"noise-{lv}", "pope", items, bench.image_loader, "yes")
            for lv, items in sorted(out.items())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="embedded-deep")
    ap.add_argument("--adapters", nargs="*", default=[], metavar="LABEL=DIR")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--severities", nargs="+", type=float, default=[0.0, 0.35, 0.7, 1.0])
    ap.add_argument("--out", default="docs/shift")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--held-out", action="store_true", help="haze, pixelation and JPEG instead of the suite's kinds")
    args = ap.parse_args(argv)

    import numpy as np
    import pandas as pd
    import torch

    from csp_utils.core import baselines, metrics
    from csp_utils.vlm import models
    from csp_utils.vlm.models import CONFIG_FILE
    from csp_utils.world import benchmarks, catalog, scenes as world

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*records no base model.*")
    adapters = []
    for spec in args.adapters:
        label, _, folder = spec.partition("=")
        if not folder or not (Path(folder) / CONFIG_FILE).exists():
            raise SystemExit(f"--adapters takes LABEL=DIR with a trained adapter folder, got {spec!r}")
        adapters.append((label, folder))
    base, proc = models.load_vlm(args.base, dtype=torch.float32)
    wc = world.WorldConfig()
    calib = benchmarks.build_world_pope(benchmarks.pope_scenes(100, wc, split="csp", start=VALIDATION_STARTS["calibration"]),
                                        "random", seed=0)
    cal_rows = [r for r in elicit(base, proc, calib, "single_turn", "all") if r["internal_prob"] is not None]
    T = baselines.fit_temperature([r["internal_prob"] for r in cal_rows], [r["correct"] for r in cal_rows])
    constant = float(np.mean([r["correct"] for r in cal_rows]))
    kinds = catalog.HELD_OUT_DEGRADATIONS if args.held_out else catalog.DEGRADATIONS
    conditions = [("degradation", kind, sev, b) for (kind, sev), b in
                  degraded_sets(args.images, args.severities, kinds).items()]
    if not args.held_out:
        conditions += [("asked-object noise", "key", lv, b) for lv, b in noise_sets(args.images).items()]
    records, scored = [], []   # scored: (kind, severity, model, confidences, correctness) for the summary

    def record(family, kind, x, label, conf, ok):
        conf, ok = np.asarray(conf, float), np.asarray(ok, float)
        keep = ~np.isnan(conf)
        records.append({"family": family, "kind": kind, "x": x, "n": int(keep.sum()), "accuracy": ok[keep].mean(),
                        "model": label, "confidence": conf[keep].mean(),
                        "brier": float(np.mean((conf[keep] - ok[keep]) ** 2))})
        scored.append((family, kind, x, label, conf[keep], ok[keep]))

    for family, kind, x, bench in conditions:
        rows = elicit(base, proc, bench, "single_turn", "all")
        p = np.array([r["internal_prob"] if r["internal_prob"] is not None else np.nan for r in rows])
        ok = np.array([bool(r["correct"]) for r in rows])
        record(family, kind, x, "temperature", baselines.temperature_scale(p, T), ok)
        record(family, kind, x, "constant", np.full(len(ok), constant), ok)
        print(f"[{family}] {kind} {x}: accuracy {ok.mean():.3f}", flush=True)
    for label, folder in adapters:
        model, _ = models.load_vlm(args.base, adapter=folder, dtype=torch.float32)
        layout = __import__("json").loads((Path(folder) / CONFIG_FILE).read_text())["config"]["layout"]
        for family, kind, x, bench in conditions:
            rows = elicit(model, proc, bench, layout, "confidence")
            record(family, kind, x, label, [np.nan if r["confidence"] is None else r["confidence"] for r in rows],
                   [bool(r["correct"]) for r in rows])
    df = pd.DataFrame(records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "heldout_" if args.held_out else "shift_"
    df.to_csv(out / f"{stem}readout.csv", index=False, float_format="%.4f")
    summary = summarize(scored, metrics)
    summary.to_csv(out / f"{stem}summary.csv", index=False, float_format="%.4f")
    figure(df[df["model"] != "constant"], out / f"{stem}readout")
    print(df.pivot_table(index=["family", "kind", "x"], columns="model", values="confidence").round(3).to_string())
    print(summary.round(3).to_string(index=False))


def summarize(scored, metrics):
    """Each degradation over its severities above 0 (each noise level below 100), per model:
    accuracy, mean confidence, Brier and ECE10 of the pooled rows."""
    import numpy as np
    import pandas as pd

    pooled = {}
    for family, kind, x, label, conf, ok in scored:
        if (family == "degradation" and x > 0) or (family != "degradation" and x < 100):
            c, y = pooled.setdefault((kind, label), ([], []))
            c.append(conf)
            y.append(ok)
    out = []
    for (kind, label), (c, y) in pooled.items():
        c, y = np.concatenate(c), np.concatenate(y)
        out.append({"kind": kind, "model": label, "n": len(c), "accuracy": y.mean(), "confidence": c.mean(),
                    "brier": float(np.mean((c - y) ** 2)), "ece10": metrics.ece(c, y, 10)})
    return pd.DataFrame(out)


def figure(df, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csp_utils.analysis import plots

    panels = list(dict.fromkeys(zip(df["family"], df["kind"])))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.4), sharey=True, squeeze=False)
    models = list(dict.fromkeys(df["model"]))
    for ax, (family, kind) in zip(axes[0], panels):
        g = df[(df["family"] == family) & (df["kind"] == kind)].sort_values("x")
        acc = g.drop_duplicates("x")
        ax.plot(acc["x"], acc["accuracy"], color="black", lw=2.2, label="accuracy (calibrated)")
        for i, m in enumerate(models):
            gm = g[g["model"] == m]
            ax.plot(gm["x"], gm["confidence"], marker=plots.MARKERS[i % len(plots.MARKERS)], color=plots.PALETTE(i),
                    ls=plots.LINESTYLES[i % len(plots.LINESTYLES)], label=m)
        ax.set_title(kind if family == "degradation" else "asked object noised", fontsize=10)
        ax.set_xlabel("severity" if family == "degradation" else "CSP level (100 = clean)", fontsize=10)
        if family != "degradation":
            ax.invert_xaxis()
    axes[0][0].set_ylabel("mean confidence / accuracy", fontsize=10)
    axes[0][-1].legend(fontsize=8, frameon=False, loc="lower left")
    fig.tight_layout()
    plots.save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
