"""Does a grounded adapter rank its base model's right answers above its wrong ones on held-out
rows of its OWN training distribution, and on the world evaluation sets?

    python scripts/own_distribution.py --adapter RUN/adapters/sft@g0 --dataset RUN/grounded
        [--base embedded] [--scenes 200] [--start auto] [--pope-images 100] [--amber-images 100]
        [--out runs/own_distribution/<adapter>] [--threads 1] [--batch 32]

1. Held-out grounded rows: CSP-split scenes ``start .. start + scenes - 1`` that the adapter
   never saw (``start`` defaults to one past the training dataset's last scene; a range that
   overlaps the training scenes is refused), built by the grounded builder with the training
   dataset's own build config (noise levels, clean / key / distractor shares, question seed),
   the base model's own answers quoted.
2. The adapter's confidence on those rows through the evaluation's code path
   (``evaluation.evaluate`` with the adapter's recorded layout and scope: a grounded adapter is
   confidence-only, so answers are the base model's), and the same on the six clean world sets
   (``suites.build_suite``, small sizes).
3. Within-set AUROC (``metrics.auroc``) and Brier per row kind (clean / key-noised /
   distractor-noised) and per question kind (existence / attribute / relation), and per
   evaluation set with the mean of the sets; beside them the base model's internal probability
   of its own answer, temperature-scaled with the training dataset's T (fitted on training-split
   held-out scenes; scaling does not change AUROC, only Brier).

Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from csp_utils.world.schema import QAItem

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def scene_index(scene_id: str) -> int:
    from csp_utils.world import scenes

    return int(scenes.parse_scene_id(scene_id)[1])


def training_scenes(dataset_dir: Path) -> tuple[set[int], dict]:
    """The CSP scene indices of a grounded training dataset and its build report."""
    from csp_utils.dataset import paper_rows

    ds = paper_rows.load_perturbed_dataset(dataset_dir)
    report = json.loads((Path(dataset_dir) / "build_report.json").read_text())
    if report.get("targets") != "grounded":
        raise ValueError(f"{dataset_dir} is not a grounded dataset")
    return {scene_index(s) for s in ds["image_id"]}, report


def check_adapter_dataset(adapter: Path, dataset_dir: Path) -> dict:
    """The adapter's training record; refuses a dataset other than the one it was trained on."""
    from csp_utils.dataset import paper_rows
    from csp_utils.train import regimes
    from csp_utils.vlm import models

    record = json.loads((adapter / models.CONFIG_FILE).read_text())
    key = regimes._dataset_key(paper_rows.load_perturbed_dataset(dataset_dir))
    if record.get("dataset_fingerprint") not in (None, key):
        raise ValueError(f"{adapter} was trained on dataset {record['dataset_fingerprint']}, "
                         f"not on {dataset_dir} ({key})")
    if record.get("confidence_target") not in models.GROUNDED_TARGETS:
        raise ValueError(f"{adapter} is not a grounded adapter (target {record.get('confidence_target')!r})")
    return record


def heldout_rows(model, processor, report: dict, start: int, n: int, out: Path):
    """Grounded rows on CSP scenes start .. start + n - 1 with the training build's config."""
    import warnings

    from csp_utils.dataset import buildconfig, paper_rows, sources
    from csp_utils.world import scenes

    build = buildconfig.BuildConfig(**report["config"])
    # the builder records "<k> q/scene, question seed <s>" in its grounder name
    found = re.search(r"(\d+) q/scene, question seed (\d+)", report["grounder"])
    if found is None:
        raise ValueError(f"the build report does not name its questions per scene: {report['grounder']!r}")
    questions, question_seed = int(found.group(1)), int(found.group(2))
    src = sources.world_source(scenes.make_scenes("csp", n, start=start), questions, seed=question_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the held-out T fit of these rows is not used
        return paper_rows.build_perturbed_dataset(src, out_dir=out, config=build, model=model, processor=processor,
                                          progress=False)


def as_benchmark(ds, name: str = "own-heldout"):
    from csp_utils.world import benchmarks

    cols = ds.select_columns(["sample_id", "question", "label", "kind", "key_objects"])
    items = [QAItem(r["sample_id"], r["sample_id"], r["question"], r["label"], name, r["kind"],
                               list(r["key_objects"])) for r in cols]
    images = ds.select_columns(["image"])
    index = {s: i for i, s in enumerate(ds["sample_id"])}
    return benchmarks.Benchmark(name, "pope", items, lambda k: images[index[k]]["image"], "yes")


def scores(conf, correct) -> dict:
    import numpy as np

    from csp_utils.core import metrics

    conf, correct = np.asarray(conf, float), np.asarray(correct, bool)
    ok = ~np.isnan(conf)
    conf, correct = conf[ok], correct[ok]
    both = 0 < correct.sum() < len(correct)
    return {"n": int(len(conf)), "accuracy": round(float(correct.mean()), 4) if len(conf) else None,
            "auroc": round(metrics.auroc(conf, correct), 4) if both else None,
            "brier": round(metrics.brier(conf, correct), 4) if len(conf) else None,
            "mean_confidence": round(float(conf.mean()), 4) if len(conf) else None}


def grouped(rows, key, T: float) -> dict:
    """Adapter confidence and temperature-scaled internal probability per group of rows."""
    import numpy as np

    from csp_utils.core import baselines

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    out = {}
    for g, rs in sorted(groups.items()):
        correct = [bool(r["correct"]) for r in rs]
        internal = np.array([np.nan if r["internal_prob"] is None else r["internal_prob"] for r in rs], float)
        out[g] = {"adapter": scores([r["confidence"] for r in rs], correct),
                  "internal_T": scores(baselines.temperature_scale(internal, T), correct)}
    return out


def run_eval(model, processor, bench, path: Path, name: str, config):
    from csp_utils.evaluate import evaluation as ev

    return [r for r in ev.load_results(ev.evaluate(model, processor, bench, path, name, config))
            if r["model"] == name]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, help="a grounded adapter folder (training_config.json beside it)")
    ap.add_argument("--dataset", required=True, help="the grounded dataset folder it was trained on")
    ap.add_argument("--base", default=None, help="base model (default: the adapter record's)")
    ap.add_argument("--scenes", type=int, default=200, help="held-out CSP scenes")
    ap.add_argument("--start", type=int, default=None,
                    help="first held-out CSP scene (default: after the training ones)")
    ap.add_argument("--pope-images", type=int, default=100)
    ap.add_argument("--amber-images", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from csp_utils.evaluate import evaluation as ev
    from csp_utils.vlm import models
    from csp_utils.evaluate import suites

    torch.set_num_threads(args.threads)
    adapter, dataset_dir = Path(args.adapter), Path(args.dataset)
    record = check_adapter_dataset(adapter, dataset_dir)
    base_name = args.base or record["base_model"]
    trained, report = training_scenes(dataset_dir)
    start = args.start if args.start is not None else max(trained) + 1
    held = set(range(start, start + args.scenes))
    if held & trained:
        raise ValueError(f"held-out scenes {start}..{start + args.scenes - 1} overlap the training scenes "
                         f"({min(trained)}..{max(trained)}, {len(held & trained)} shared)")
    out = Path(args.out or f"runs/own_distribution/{adapter.name}")
    out.mkdir(parents=True, exist_ok=True)
    T = float(report["temperature"]["T"])
    t0 = time.time()

    base, processor = models.load_vlm(base_name, dtype=torch.float32)
    base.eval()
    rows_ds = heldout_rows(base, processor, report, start, args.scenes, out / "heldout")
    t_build = time.time() - t0
    model, processor = models.load_vlm(base_name, adapter=adapter, dtype=torch.float32)
    config = ev.config_for_adapter(ev.EvalConfig(framings=("third",), readouts=("single_pass",),
                                                 batch_size=args.batch, progress=False), adapter)

    t1 = time.time()
    bench = as_benchmark(rows_ds)
    got = run_eval(model, processor, bench, out / "heldout_rows.jsonl", adapter.name, config)
    by_id = {r["question_id"]: r for r in got}
    meta = {s: (n, k, a) for s, n, k, a in zip(rows_ds["sample_id"], rows_ds["noise_on"], rows_ds["kind"],
                                                rows_ds["answer"])}
    same_answer = float(np.mean([by_id[s]["response"] == meta[s][2] for s in meta]))
    own = {"all": grouped(got, lambda r: "all", T)["all"],
           "noise_on": grouped(got, lambda r: meta[r["question_id"]][0], T),
           "kind": grouped(got, lambda r: meta[r["question_id"]][1], T),
           "noise_on_x_kind": grouped(got, lambda r: f"{meta[r['question_id']][0]}|{meta[r['question_id']][1]}", T)}
    t_own = time.time() - t1

    t2 = time.time()
    suite = suites.build_suite(suites.SuiteConfig(n_pope_images=args.pope_images,
                                                          n_amber_images=args.amber_images, seed=0),
                                   sets=list(suites.CLEAN_SETS))
    sets = {}
    for name in suites.CLEAN_SETS:
        rs = run_eval(model, processor, suite[name], out / f"{name}.jsonl", adapter.name, config)
        sets[name] = grouped(rs, lambda r: "all", T)["all"]
    # a set whose answers are all right (or all wrong) has no AUROC and is left out of the mean
    within = {who: (round(float(np.mean(v)), 4) if (v := [s[who]["auroc"] for s in sets.values()
                                                          if s[who]["auroc"] is not None]) else None)
              for who in ("adapter", "internal_T")}
    t_sets = time.time() - t2

    results = {"adapter": str(adapter), "dataset": str(dataset_dir), "base_model": base_name,
               "layout": config.layout, "adapter_scope": config.adapter_scope,
               "confidence_target": record.get("confidence_target"), "training_seed": record["config"].get("seed"),
               "training_scenes": [min(trained), max(trained)], "heldout_scenes": [start, start + args.scenes - 1],
               "heldout_rows": len(rows_ds), "temperature_T": T, "quoted_answer_equals_eval_response": same_answer,
               "own_distribution": own, "eval_sets": sets, "eval_within_set_auroc_mean": within,
               "sizes": {"pope_images": args.pope_images, "amber_images": args.amber_images},
               "seconds": {"build": round(t_build, 1), "own_eval": round(t_own, 1), "sets_eval": round(t_sets, 1)}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def markdown(res: dict) -> str:
    def line(name, s):
        a, b, f = s["adapter"], s["internal_T"], fmt
        return (f"| {name} | {a['n']} | {f(a['accuracy'])} | {f(a['auroc'])} | {f(a['brier'])} | "
                f"{f(a['mean_confidence'])} | {f(b['auroc'])} | {f(b['brier'])} |")

    head = ["| rows | n | accuracy | adapter AUROC | adapter Brier | adapter mean conf | internal(T) AUROC | "
            "internal(T) Brier |", "|---|---|---|---|---|---|---|---|"]
    own = res["own_distribution"]
    lines = [f"adapter {res['adapter']} ({res['layout']}, {res['adapter_scope']}); held-out CSP scenes "
             f"{res['heldout_scenes'][0]}..{res['heldout_scenes'][1]} (training {res['training_scenes'][0]}.."
             f"{res['training_scenes'][1]}); T = {res['temperature_T']:.3f}", "", *head,
             line("all held-out rows", own["all"])]
    lines += [line(f"noise on: {k}", v) for k, v in own["noise_on"].items()]
    lines += [line(f"kind: {k}", v) for k, v in own["kind"].items()]
    lines += [line(f"{k}", v) for k, v in own["noise_on_x_kind"].items()]
    lines += ["", *head, *[line(k, v) for k, v in res["eval_sets"].items()],
              f"| mean of the {len(res['eval_sets'])} sets (within-set AUROC) | | | "
              f"{fmt(res['eval_within_set_auroc_mean']['adapter'])} | | | "
              f"{fmt(res['eval_within_set_auroc_mean']['internal_T'])} | |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
