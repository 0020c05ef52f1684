"""The study's evaluation matrix: benchmark suite, models x sets, baselines, headline tables.

Scene index ranges of the eval split keep every set apart (POPE, AMBER, transfer, the
held-out calibration split used to fit the temperature baseline); the base model's own
training split ("base") only serves the constant baseline's training accuracy.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from csp_utils import baselines, benchmarks, scenes as world

CLEAN_SETS = ("pope-random", "pope-popular", "pope-adversarial", "amber-existence", "amber-attribute", "amber-relation")
# first index of each eval-split range: sets never share a scene
_STARTS = {"pope": 0, "amber": 100_000, "calibration": 400_000, "perturbed": 500_000}
_TRANSFER_START, _TRANSFER_STRIDE = 200_000, 20_000


@dataclass
class SuiteConfig:
    n_pope_images: int = 100          # 6 questions each, as POPE
    n_amber_images: int = 100
    n_transfer_images: int = 100
    n_calibration_images: int = 100   # held-out split for the temperature baseline
    n_train_images: int = 100         # base-split scenes for the constant baseline
    n_perturbed_images: int = 40      # held-out CSP-perturbed scenes (confidence vs level)
    transfer_kinds: tuple = world.DEGRADATIONS
    transfer_severity: float = 0.7
    perturbed_levels: tuple = (0, 20, 40, 60, 80, 100)
    noise_gamma: float | None = None  # None: perturbation's default
    seed: int = 0
    image_size: int = 64
    # official benchmark files (the real path): POPE's folder of coco_pope_*.json + COCO images,
    # AMBER's folder of queries/annotations + AMBER images; None leaves them out
    pope_dir: str | None = None
    coco_images: str | None = None
    amber_dir: str | None = None
    amber_images: str | None = None
    official_only: bool = False       # True: skip the world sets (a GPU run on real data)


def _world_config(cfg: SuiteConfig) -> world.WorldConfig:
    return world.WorldConfig(image_size=cfg.image_size)


def _with_set(bench: benchmarks.Benchmark, name: str) -> benchmarks.Benchmark:
    for it in bench.items:
        it.set = name
    bench.name = name
    return bench


def transfer_benchmark(kind: str, cfg: SuiteConfig) -> benchmarks.Benchmark:
    """POPE-random questions on scenes with a natural degradation (never CSP noise)."""
    wc = _world_config(cfg)
    start = _TRANSFER_START + _TRANSFER_STRIDE * world.DEGRADATIONS.index(kind)
    clean = benchmarks.pope_scenes(cfg.n_transfer_images, wc, split="eval", start=start)
    degraded = [world.degrade(s, kind, cfg.transfer_severity, wc) for s in clean]
    return _with_set(benchmarks.build_world_pope(degraded, "random", seed=cfg.seed), f"transfer-{kind}")


def perturbed_benchmark(cfg: SuiteConfig, noise: str = "local") -> benchmarks.Benchmark:
    """Held-out eval scenes with CSP noise on the asked object at each level.

    Only "yes" questions (the object is there to be noised); the level is the suffix of the
    question id (``...@c40``). Used for "confidence vs noise level" and its Spearman.
    """
    from csp_utils import grounding, perturbation

    wc = _world_config(cfg)
    scene_list = benchmarks.pope_scenes(cfg.n_perturbed_images, wc, split="eval", start=_STARTS["perturbed"])
    base = benchmarks.build_world_pope(scene_list, "random", n_pos=2, n_neg=0, seed=cfg.seed)
    grounder = grounding.AnnotationGrounder.from_scenes(scene_list)
    by_id = {s.scene_id: s for s in scene_list}
    noise_cfg = perturbation.NoiseConfig(noise=noise, seed=cfg.seed,
                                         **({"noise_gamma": cfg.noise_gamma} if cfg.noise_gamma else {}))
    images, items = {}, []
    for it in base.items:
        res = grounder.ground(by_id[it.image_id].to_pil(), it.objects, it.image_id)
        if res.mask is None:
            continue
        arrs = perturbation.perturb_levels_array(by_id[it.image_id].image, res.mask, cfg.perturbed_levels,
                                                 noise_cfg, key=it.question_id)
        for level, arr in zip(cfg.perturbed_levels, arrs):
            qid = f"{it.question_id}@c{level}"
            images[qid] = arr
            items.append(benchmarks.QAItem(qid, qid, it.question, it.label, "perturbed", it.kind, list(it.objects)))
    from PIL import Image

    return benchmarks.Benchmark("perturbed", "pope", items, lambda i: Image.fromarray(images[i]), "yes")


def level_of(question_id: str) -> int | None:
    m = re.search(r"@c(\d+)$", question_id)
    return int(m.group(1)) if m else None


def build_suite(cfg: SuiteConfig | None = None, sets: list[str] | None = None) -> dict[str, benchmarks.Benchmark]:
    """All evaluation sets by name (or the named subset)."""
    cfg = cfg or SuiteConfig()
    wc = _world_config(cfg)
    wanted = set(sets) if sets is not None else None
    want = lambda name: wanted is None or name in wanted  # noqa: E731
    suite: dict[str, benchmarks.Benchmark] = official_sets(cfg, want)
    if cfg.official_only:
        return suite
    if any(want(f"pope-{k}") for k in benchmarks.POPE_KINDS):
        pope = benchmarks.pope_scenes(cfg.n_pope_images, wc, split="eval", start=_STARTS["pope"])
        for kind in benchmarks.POPE_KINDS:
            if want(f"pope-{kind}"):
                suite[f"pope-{kind}"] = benchmarks.build_world_pope(pope, kind, seed=cfg.seed)
    if any(want(f"amber-{k}") for k in benchmarks.AMBER_KINDS):
        amber = world.make_scenes("eval", cfg.n_amber_images, wc, start=_STARTS["amber"])
        for kind in benchmarks.AMBER_KINDS:
            if want(f"amber-{kind}"):
                suite[f"amber-{kind}"] = benchmarks.build_world_amber(amber, kind, seed=cfg.seed)
    for kind in cfg.transfer_kinds:
        if want(f"transfer-{kind}"):
            suite[f"transfer-{kind}"] = transfer_benchmark(kind, cfg)
    if want("calibration"):
        calib = benchmarks.pope_scenes(cfg.n_calibration_images, wc, split="eval", start=_STARTS["calibration"])
        suite["calibration"] = _with_set(benchmarks.build_world_pope(calib, "random", seed=cfg.seed), "calibration")
    if want("train-sample"):
        train = world.make_scenes("base", cfg.n_train_images, wc)
        rng = np.random.default_rng(cfg.seed)
        items = [q for s in train for q in world.world_questions(s, rng, 4, set_name="train-sample")]
        suite["train-sample"] = benchmarks.Benchmark("train-sample", "pope", items,
                                                     benchmarks.scene_image_loader(train), "yes")
    if want("perturbed"):
        suite["perturbed"] = perturbed_benchmark(cfg)
    return suite


def official_sets(cfg: SuiteConfig, want=lambda name: True) -> dict[str, benchmarks.Benchmark]:
    """The official POPE (COCO) and AMBER discriminative sets, when their folders are given."""
    out = {}
    if cfg.pope_dir:
        if not cfg.coco_images:
            raise ValueError("SuiteConfig.pope_dir needs coco_images: the folder of COCO val2014 images")
        for kind in benchmarks.POPE_KINDS:
            name = f"coco-pope-{kind}"
            if want(name):
                bench = benchmarks.load_pope(Path(cfg.pope_dir) / f"coco_pope_{kind}.json", cfg.coco_images)
                out[name] = _with_set(bench, name)
    if cfg.amber_dir:
        if not cfg.amber_images:
            raise ValueError("SuiteConfig.amber_dir needs amber_images: the folder of AMBER's images")
        for kind, bench in benchmarks.load_amber(cfg.amber_dir, cfg.amber_images).items():
            name = f"official-{bench.name}"
            if want(name):
                out[name] = _with_set(bench, name)
    return out


# ------------------------------------------------------------------ the evaluation matrix
@dataclass
class ModelSpec:
    name: str                       # e.g. "base", "sft_simpo@s1"
    base_model: str = "embedded"
    adapter: str | None = None      # PEFT adapter folder
    adapter_scope: str | None = None  # "all" | "confidence"; None: the adapter's record decides
    layout: str | None = None         # confidence prompt layout; None: the adapter's record decides


def results_path(results_dir, model: str, set_name: str) -> Path:
    return Path(results_dir) / model.replace("/", "_") / f"{set_name}.jsonl"


def evaluate_models(specs: list[ModelSpec], suite: dict, results_dir, config=None, sets: list[str] | None = None):
    """Every model on every set; resumable (finished rows are skipped by ``evaluation``)."""
    from csp_utils import evaluation, models

    paths = []
    for spec in specs:
        model, processor = models.load_vlm(spec.base_model, adapter=spec.adapter)
        cfg = evaluation.config_for_adapter(config or evaluation.EvalConfig(), spec.adapter, spec.adapter_scope,
                                            spec.layout)
        for name, bench in suite.items():
            if sets is not None and name not in sets:
                continue
            paths.append(evaluation.evaluate(model, processor, bench, results_path(results_dir, spec.name, name),
                                             spec.name, cfg))
        del model
    return paths


def load_rows(results_dir) -> list[dict]:
    from csp_utils import evaluation

    rows = []
    for path in sorted(Path(results_dir).glob("*/*.jsonl")):
        rows += evaluation.load_results(path)
    return rows


# ---------------------------------------------------------------------- baselines
def baseline_rows(rows: list[dict], base: str = "base", calibration_set: str = "calibration",
                  train_set: str = "train-sample", framing: str = "third", readout: str = "single_pass") -> list[dict]:
    """Rows of the three baselines that plant nothing, on the base model's own answers.

    Answers are the base model's, so accuracy is the base's; only the confidence differs:
    ``constant`` (its accuracy on its training questions), ``internal`` (its yes/no token
    probability), ``temperature`` (that probability scaled, T fitted on the calibration set).
    """
    own = [r for r in rows if r["model"] == base and r["framing"] == framing and r["readout"] == readout]
    train = [r for r in own if r["set"] == train_set]
    calib = [r for r in own if r["set"] == calibration_set and r["internal_prob"] is not None]
    if not train or not calib:
        raise ValueError(f"baselines need the {base!r} model's rows on {train_set!r} and {calibration_set!r}")
    train_acc = float(np.mean([r["correct"] for r in train]))
    temperature = baselines.fit_temperature([r["internal_prob"] for r in calib], [r["correct"] for r in calib])
    out = []
    for r in own:
        if r["set"] in (train_set, calibration_set):
            continue
        p = r["internal_prob"]
        for name, conf in (("constant", train_acc), ("internal", p),
                           ("temperature", None if p is None else float(baselines.temperature_scale(p, temperature)))):
            out.append({**r, "model": f"baseline:{name}", "framing": "-", "readout": "-", "confidence": conf,
                        "raw_confidence": None, "baseline_param": {"train_accuracy": train_acc,
                                                                   "temperature": temperature}[
                            "train_accuracy" if name == "constant" else "temperature"]})
    return out


# ------------------------------------------------------------------ headline numbers
HEADLINE = ("accuracy", "ece", "adaptive_ece", "brier", "auroc")


def model_group(name: str) -> str:
    """``sft_simpo@s1`` -> ``sft_simpo``: seeds of one model are pooled."""
    return name.split("@")[0]


def positive_class(set_name: str) -> str:
    """AMBER's official scorer treats "no" as positive; POPE and the rest "yes"."""
    return "no" if set_name.startswith(("amber", "official-amber")) else "yes"


def _f1(truth: np.ndarray, pred: np.ndarray) -> float:
    tp = float(np.sum(truth & pred))
    denom = float(np.sum(truth) + np.sum(pred))
    return 2 * tp / denom if denom else 0.0


def _metric_values(conf: np.ndarray, correct: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> dict:
    """``truth``/``pred``: bool arrays, True = the set's positive class."""
    from csp_utils import metrics

    ok = ~np.isnan(conf)
    c, y = conf[ok], correct[ok]
    out = {"accuracy": float(correct.mean()) if correct.size else math.nan, "f1": _f1(truth, pred),
           "coverage": float(ok.mean()) if ok.size else math.nan}
    if c.size == 0:
        return out | {k: math.nan for k in ("ece", "adaptive_ece", "brier", "auroc")}
    return out | {"ece": metrics.ece(c, y), "adaptive_ece": metrics.adaptive_ece(c, y),
                  "brier": metrics.brier(c, y), "auroc": metrics.auroc(c, y)}


def _resampled_metric_values(conf: np.ndarray, correct: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                             weights: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """:func:`_metric_values` of B resamples at once; ``weights`` (B, n): how often each row
    was drawn. Every metric only needs, per resample, the count of rows at each distinct
    confidence that were right / wrong, so one bincount replaces B sorts (equal to the
    row-by-row computation within float rounding; tested)."""
    from csp_utils import metrics

    W = weights.astype(np.int64)
    B = W.shape[0]
    total = W.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"accuracy": W @ correct / total,
               "f1": 2.0 * (W @ (truth & pred)) / (W @ truth.astype(np.int64) + W @ pred.astype(np.int64))}
        out["f1"] = np.where(np.isnan(out["f1"]), 0.0, out["f1"])
        ok = ~np.isnan(conf)
        out["coverage"] = W @ ok / total
        u, inv = np.unique(conf[ok], return_inverse=True)
        y = correct[ok].astype(np.int64)
        U, Wk = len(u), W[:, ok]
        if U == 0:
            return out | {k: np.full(B, math.nan) for k in ("ece", "adaptive_ece", "brier", "auroc")}
        # tab[b, v, k]: rows of resample b with the v-th distinct confidence and correct == k
        flat = (np.arange(B)[:, None] * 2 * U + (2 * inv.ravel() + y)[None, :]).ravel()
        tab = np.bincount(flat, weights=Wk.ravel(), minlength=B * 2 * U).reshape(B, U, 2).round().astype(np.int64)
        right, count = tab[..., 1], tab.sum(-1)
        n = count.sum(1)

        def binned_gap(value_bin):  # sum over bins of |right - sum of confidences| / n
            idx = (np.arange(B)[:, None] * n_bins + value_bin).ravel()
            conf_sum = np.bincount(idx, weights=(count * u).ravel(), minlength=B * n_bins).reshape(B, n_bins)
            acc_sum = np.bincount(idx, weights=right.ravel().astype(float), minlength=B * n_bins).reshape(B, n_bins)
            return np.abs(acc_sum - conf_sum).sum(1) / n

        out["ece"] = binned_gap(np.broadcast_to(metrics.bin_index(u, n_bins), (B, U)))
        first_rank = np.cumsum(count, 1) - count                     # as adaptive_bin_index, per resample
        out["adaptive_ece"] = binned_gap(np.minimum(first_rank * n_bins // np.maximum(n, 1)[:, None], n_bins - 1))
        out["brier"] = (right * (u - 1.0) ** 2 + (count - right) * u ** 2).sum(1) / n
        n_pos = right.sum(1)
        n_neg = n - n_pos
        midrank = first_rank + (count + 1) / 2.0                     # as metrics._midranks
        auroc = ((right * midrank).sum(1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
        out["auroc"] = np.where((n_pos == 0) | (n_neg == 0), math.nan, auroc)
    return out


def headline_table(rows: list[dict], n_boot: int = 300, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Per (model group, set, framing, read-out): metrics with bootstrap intervals.

    Seeds of one model are pooled; the bootstrap resamples *questions* (all of a question's
    rows across seeds move together), so intervals reflect which questions were asked.
    The spread across seeds is reported separately (``seeds``, ``ece_seed_min/max``).
    """
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["group"] = df["model"].map(model_group)
    df["conf"] = pd.to_numeric(df["confidence"], errors="coerce").astype(float)
    df["ok"] = df["correct"].astype(float)
    out = []
    rng = np.random.default_rng(seed)
    for (group, set_, framing, readout), g in df.groupby(["group", "set", "framing", "readout"], sort=False):
        codes, uniq = pd.factorize(g["question_id"])
        conf, correct = g["conf"].to_numpy(), g["ok"].to_numpy()
        pos = positive_class(set_)
        truth, pred = (g["label"] == pos).to_numpy(), (g["answer"] == pos).to_numpy()
        point = _metric_values(conf, correct, truth, pred)
        # resample questions: a row is drawn as often as its question is
        drawn = np.stack([np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))
                          for _ in range(n_boot)])
        boots = _resampled_metric_values(conf, correct, truth, pred, drawn[:, codes])
        rec = {"model": group, "set": set_, "framing": framing, "readout": readout, "positive_class": pos,
               "n_questions": len(uniq), "seeds": g["model"].nunique()}
        for k, v in point.items():
            vals = boots[k][~np.isnan(boots[k])]
            rec[k] = v
            rec[f"{k}_low"] = float(np.quantile(vals, alpha / 2)) if vals.size else math.nan
            rec[f"{k}_high"] = float(np.quantile(vals, 1 - alpha / 2)) if vals.size else math.nan
        if rec["seeds"] > 1:
            per_seed = [_metric_values(s["conf"].to_numpy(), s["ok"].to_numpy(), (s["label"] == pos).to_numpy(),
                                       (s["answer"] == pos).to_numpy())["ece"] for _, s in g.groupby("model")]
            rec["ece_seed_min"], rec["ece_seed_max"] = float(np.min(per_seed)), float(np.max(per_seed))
        out.append(rec)
    return pd.DataFrame(out)


def markdown_table(df: pd.DataFrame, framing: str = "third", readout: str = "single_pass",
                   sets: tuple = CLEAN_SETS) -> str:
    """The README's results table: one row per model/baseline x set, intervals in brackets."""
    keep = df[((df["framing"] == framing) & (df["readout"] == readout)) | (df["framing"] == "-")]
    keep = keep[keep["set"].isin(sets)]

    def fmt(r, k, digits=3):
        v, lo, hi = r[k], r.get(f"{k}_low"), r.get(f"{k}_high")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if lo == lo and hi == hi else f"{v:.{digits}f}"

    lines = ["| set | model | accuracy | F1 (positive) | ECE | adaptive ECE | Brier | AUROC | coverage |",
             "|---|---|---|---|---|---|---|---|---|"]
    for set_ in sets:
        for _, r in keep[keep["set"] == set_].iterrows():
            f1s = f"{fmt(r, 'f1')} ({r['positive_class']})"
            lines.append(f"| {set_} | {r['model']} | {fmt(r, 'accuracy')} | {f1s} | {fmt(r, 'ece')} | "
                         f"{fmt(r, 'adaptive_ece')} | {fmt(r, 'brier')} | {fmt(r, 'auroc')} | {r['coverage']:.2f} |")
    return "\n".join(lines)


def write_readme_section(readme, text: str, tag: str = "results") -> None:
    """Replace the text between ``<!-- {tag}:start -->`` and ``<!-- {tag}:end -->``."""
    readme = Path(readme)
    body = readme.read_text()
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    if start not in body or end not in body:
        raise ValueError(f"{readme} has no {start} ... {end} markers to write the table between")
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def save_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
    return path


# ------------------------------------------------------------- notebook conveniences
def model_specs(run_dir, base_model: str, names) -> list[ModelSpec]:
    """``"base"`` is the base model itself; any other name is the adapter ``adapters/<name>``."""
    specs = []
    for name in names:
        if name == "base":
            specs.append(ModelSpec("base", base_model, None))
            continue
        adapter = Path(run_dir) / "adapters" / name
        if not (adapter / "adapter_config.json").exists():
            raise FileNotFoundError(f"model {name!r}: no PEFT adapter at {adapter}; run the training notebooks first")
        specs.append(ModelSpec(name, base_model, str(adapter)))
    return specs


def summary_table(rows: list[dict], n_bins: int = 10) -> pd.DataFrame:
    """``evaluation.summarize`` per set, each with its benchmark's positive class."""
    from csp_utils import evaluation

    by_set: dict[str, list[dict]] = {}
    for r in rows:
        by_set.setdefault(r["set"], []).append(r)
    out = []
    for set_, rs in by_set.items():
        out += evaluation.summarize(rs, positive_class(set_), n_bins)
    return pd.DataFrame(out)


FIGURE_COLUMNS = ("model", "set", "framing", "readout", "question_id", "label", "answer", "correct",
                  "confidence", "internal_prob")


def figure_data(rows: list[dict]) -> pd.DataFrame:
    """The per-question columns the figures need (small enough to commit, gzip-compressed)."""
    df = pd.DataFrame(rows)
    return df[[c for c in FIGURE_COLUMNS if c in df.columns]]


def level_table(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Rows of the held-out perturbed set -> (model, level, confidence, correct)."""
    df = pd.DataFrame(rows)
    df = df[df["set"] == "perturbed"].copy()
    df["level"] = df["question_id"].map(level_of)
    return df


def level_spearman(df: pd.DataFrame) -> pd.DataFrame:
    """Spearman of verbalized confidence against the noise level, per model/framing/read-out."""
    from csp_utils import metrics

    out = []
    for (model, framing, readout), g in df.groupby(["model", "framing", "readout"]):
        g = g.dropna(subset=["confidence"])
        rho, p = metrics.spearman(g["level"], g["confidence"]) if len(g) >= 3 else (math.nan, math.nan)
        out.append({"model": model, "framing": framing, "readout": readout, "spearman_level": rho, "p": p, "n": len(g)})
    return pd.DataFrame(out)
