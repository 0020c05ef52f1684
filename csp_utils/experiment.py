"""The study's evaluation matrix: benchmark suite, models x sets, baselines, headline tables.

Every evaluation set draws its scenes from its own index range of the eval split, so no
image is in two sets (POPE random / popular / adversarial, the AMBER kinds, each transfer
set, the held-out calibration split that fits the temperature baseline, the perturbed set);
:func:`check_disjoint` proves it for a built suite. The base model's own training split
("base") only serves the constant baselines' training accuracy.

Intervals are bootstrap intervals over images by default (``cluster="image"``): all the
questions about one image move together, since they share its evidence.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from csp_utils import baselines, benchmarks, grounded, metrics, scenes as world

CLEAN_SETS = ("pope-random", "pope-popular", "pope-adversarial", "amber-existence", "amber-attribute", "amber-relation")
POOLS = {"pooled-clean": CLEAN_SETS, "pooled-transfer": tuple(f"transfer-{k}" for k in world.DEGRADATIONS)}
# first index of each set's eval-split range; make_scenes takes consecutive indices, pope_scenes
# skips scenes with < 3 categories (about 4 of 5), so a range of 30,000 holds > 5,000 POPE images
_STARTS = {"pope-random": 0, "pope-popular": 30_000, "pope-adversarial": 60_000,
           "amber-existence": 100_000, "amber-attribute": 130_000, "amber-relation": 160_000,
           "calibration": 400_000, "perturbed": 500_000}
_TRANSFER_START, _TRANSFER_STRIDE = 200_000, 20_000
# sets that only serve the baselines (never reported)
FIT_SETS = ("calibration", "train-sample")
GROUNDED_SET = "grounded-perturbed"   # tells "confidence follows the noise" from "follows correctness"


@dataclass
class SuiteConfig:
    n_pope_images: int = 300          # per POPE set, 6 questions each, as POPE
    n_amber_images: int = 450         # per AMBER kind (relation keeps about 2 in 3 after balancing)
    n_transfer_images: int = 150      # per transfer kind
    n_calibration_images: int = 100   # held-out split for the temperature baseline
    n_train_images: int = 100         # base-split scenes for the constant baseline
    n_perturbed_images: int = 40      # held-out CSP-perturbed scenes (confidence vs level)
    transfer_kinds: tuple = world.DEGRADATIONS
    transfer_severity: float = 0.7
    perturbed_levels: tuple = (0, 20, 40, 60, 80, 100)
    n_grounded_images: int = 0        # held-out scenes, both labels, noise on the asked object or a distractor
    grounded_levels: tuple = (10, 40, 70)
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
    for kind in benchmarks.POPE_KINDS:
        if want(f"pope-{kind}"):
            pope = benchmarks.pope_scenes(cfg.n_pope_images, wc, split="eval", start=_STARTS[f"pope-{kind}"])
            suite[f"pope-{kind}"] = benchmarks.build_world_pope(pope, kind, seed=cfg.seed)
    for kind in benchmarks.AMBER_KINDS:
        if want(f"amber-{kind}"):
            amber = world.make_scenes("eval", cfg.n_amber_images, wc, start=_STARTS[f"amber-{kind}"])
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
    if want(GROUNDED_SET) and cfg.n_grounded_images:
        suite[GROUNDED_SET] = grounded.grounded_perturbed_benchmark(
            cfg.n_grounded_images, cfg.grounded_levels, seed=cfg.seed, noise_gamma=cfg.noise_gamma,
            image_size=cfg.image_size, name=GROUNDED_SET)
    check_disjoint(suite)
    return suite


_SCENE_RE = re.compile(r"^(base|csp|eval)-\d{6}")


def scene_of(image_id: str) -> str:
    """The clean world scene behind an image or question id (``eval-000042~blur-0.70`` and
    ``eval-000042-pope-random-0@c40`` -> ``eval-000042``); other ids (official files) are their own."""
    m = _SCENE_RE.match(str(image_id))
    return m.group(0) if m else str(image_id)


def check_disjoint(suite: dict[str, benchmarks.Benchmark]) -> None:
    """Raise ValueError if a world scene is in two sets (a degraded or perturbed image counts
    as its clean scene), or if an evaluation set uses a scene of a training split (base / csp).

    Official files are left out: their POPE variants share COCO images by design.
    """
    owner: dict[str, str] = {}
    for name, bench in suite.items():
        if bench.image_root is not None:
            continue
        for image in {scene_of(i) for i in bench.image_ids()}:
            split = image.split("-", 1)[0]
            if name != "train-sample" and split in ("base", "csp"):
                raise ValueError(f"set {name!r} uses {image}, a scene of the {split!r} training split")
            if image in owner:
                raise ValueError(f"image {image} is in both {owner[image]!r} and {name!r}: evaluation sets must "
                                 "not share images; shrink the SuiteConfig sizes or move the ranges apart")
            owner[image] = name


def set_descriptions(suite: dict[str, benchmarks.Benchmark]) -> dict[str, dict]:
    """Per set: family, positive class, question and image counts and the image ids it used."""
    return {name: {"family": b.family, "positive_class": b.positive_class, "n_questions": len(b.items),
                   "n_images": len(b.image_ids()), "image_ids": b.image_ids()} for name, b in suite.items()}


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


def evaluate_models(specs: list[ModelSpec], suite: dict, results_dir, config=None, sets: list[str] | None = None,
                    load_kwargs: dict | None = None, reuse_answers: bool = True):
    """Every model on every set; resumable (finished rows are skipped by ``evaluation``).
    ``load_kwargs`` go to ``models.load_vlm`` (e.g. ``{"dtype": "bfloat16", "device_map": "auto"}``).

    ``reuse_answers``: a confidence-only adapter takes its answer-turn fields from the rows of
    the first confidence-only adapter evaluated before it in this call on the same base model
    with the same PEFT config (:func:`answer_key`), instead of generating the same answers
    again. Only sets that both evaluations run from the start here qualify, so the answers come
    from the same batches as a new generation would: the rows are identical either way.
    """
    import torch

    from csp_utils import evaluation, models

    kwargs = {k: v for k, v in (load_kwargs or {}).items() if v is not None}
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    paths = []
    sources: dict[tuple, tuple[Path, str]] = {}   # (answer key, set) -> (results file, model)
    for spec in specs:
        model, processor = models.load_vlm(spec.base_model, adapter=spec.adapter, **kwargs)
        cfg = evaluation.config_for_adapter(config or evaluation.EvalConfig(), spec.adapter, spec.adapter_scope,
                                            spec.layout)
        key = answer_key(spec, cfg) if reuse_answers else None
        for name, bench in suite.items():
            if sets is not None and name not in sets:
                continue
            path = results_path(results_dir, spec.name, name)
            fresh = key is not None and not evaluation.load_results(path)
            source = sources.get((key, name)) if fresh else None
            paths.append(evaluation.evaluate(model, processor, bench, path, spec.name, cfg, answers_from=source))
            if fresh and source is None:
                sources[(key, name)] = (path, spec.name)
        del model
    return paths


def answer_key(spec: ModelSpec, cfg) -> tuple | None:
    """What decides a confidence-only adapter's answer turn beyond the evaluation config it
    shares with the other models of one call: the base model and the PEFT config (which
    modules are wrapped shapes the float path even with the adapter disabled, so the base
    model's own rows can differ in the last bits and are never used). None for any other model."""
    if spec.adapter is None or cfg.adapter_scope != "confidence":
        return None
    peft_config = json.loads((Path(spec.adapter) / "adapter_config.json").read_text())
    return spec.base_model, json.dumps(peft_config, sort_keys=True)


def load_rows(results_dir) -> list[dict]:
    from csp_utils import evaluation

    rows = []
    for path in sorted(Path(results_dir).glob("*/*.jsonl")):
        rows += evaluation.load_results(path)
    return rows


# ---------------------------------------------------------------------- baselines
BASELINES = ("constant", "answer_constant", "internal", "temperature")


def baseline_rows(rows: list[dict], base: str = "base", calibration_set: str = "calibration",
                  train_set: str = "train-sample", framing: str = "third", readout: str = "single_pass") -> list[dict]:
    """Rows of the baselines that plant nothing, on the base model's own answers.

    Answers are the base model's, so accuracy is the base's; only the confidence differs:
    ``constant`` (its accuracy on its training questions), ``answer_constant`` (that accuracy
    given its own answer: one value after "yes", one after "no"; an answer without training
    rows of its own, or one that is neither, gets the overall training accuracy),
    ``internal`` (its yes/no token probability), ``temperature`` (that probability scaled,
    T fitted on the calibration set).
    """
    own = [r for r in rows if r["model"] == base and r["framing"] == framing and r["readout"] == readout]
    train = [r for r in own if r["set"] == train_set]
    calib = [r for r in own if r["set"] == calibration_set and r["internal_prob"] is not None]
    if not train or not calib:
        raise ValueError(f"baselines need the {base!r} model's rows on {train_set!r} and {calibration_set!r}")
    train_acc = float(np.mean([r["correct"] for r in train]))
    by_answer = baselines.answer_conditioned_accuracy([r["answer"] for r in train], [r["correct"] for r in train])
    temperature = baselines.fit_temperature([r["internal_prob"] for r in calib], [r["correct"] for r in calib])
    out = []
    for r in own:
        if r["set"] in (train_set, calibration_set):
            continue
        p = r["internal_prob"]
        answer = str(r["answer"]).strip().lower()
        confs = {"constant": (train_acc, {"train_accuracy": train_acc}),
                 "answer_constant": (by_answer.get(answer, train_acc),
                                     {"train_accuracy_given_" + k: v for k, v in by_answer.items()}),
                 "internal": (p, {"temperature": 1.0}),
                 "temperature": (None if p is None else float(baselines.temperature_scale(p, temperature)),
                                 {"temperature": temperature})}
        for name in BASELINES:
            conf, param = confs[name]
            out.append({**r, "model": f"baseline:{name}", "framing": "-", "readout": "-", "confidence": conf,
                        "raw_confidence": None, "baseline_param": json.dumps(param)})
    return out


# ------------------------------------------------------------------ headline numbers
HEADLINE = ("accuracy", "ece", "ece15", "brier", "auroc_within", "auroc")
CALIBRATION_METRICS = ("ece", "ece15", "adaptive_ece", "brier", "auroc")
# auroc_within: the mean over a pool's sets of each set's own AUROC (a set's AUROC for a set);
# "auroc" on a pool mixes sets, so knowing which set is harder earns it (auroc_set_constant)
PAIRED_METRICS = ("accuracy", "ece", "ece15", "brier", "auroc_within", "auroc")
SEED_METRICS = ("accuracy", "ece", "brier", "auroc_within", "auroc")   # reported per seed too


def model_group(name: str) -> str:
    """``sft_simpo@s1`` -> ``sft_simpo``: seeds of one model are pooled."""
    return name.split("@")[0]


def seed_label(name: str) -> str:
    """``sft_simpo@s1`` -> ``s1`` ("" for a name without a seed)."""
    return name.split("@", 1)[1] if "@" in name else ""


def _seed_order(names) -> list[str]:
    """Model names of one group, in the order their seeds pair across groups: s0, s1, ..., s10."""
    key = lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", seed_label(n))]  # noqa: E731
    return sorted(set(names), key=key)


def seed_resample_counts(n_seeds: int, uniform: np.ndarray) -> np.ndarray:
    """(B, n_seeds) counts: how often each seed is drawn in each resample (seeds with replacement).

    ``uniform`` (B, >= n_seeds) uniforms drawn once per table unit: every group with the same
    number of seeds draws the same seed positions, so the k-th seed of a method is paired with
    the k-th seed of another in each resample (s0 with s0, ...). One seed: always drawn once.
    """
    B = uniform.shape[0]
    if n_seeds == 1:
        return np.ones((B, 1))
    draws = np.floor(uniform[:, :n_seeds] * n_seeds).astype(np.int64)
    flat = (np.arange(B)[:, None] * n_seeds + draws).ravel()
    return np.bincount(flat, minlength=B * n_seeds).reshape(B, n_seeds).astype(float)


def two_level_counts(seed_counts: np.ndarray, image_counts: np.ndarray) -> np.ndarray:
    """(B, S * C) counts of the (seed, image) clusters, cluster code ``seed * C + image``: a
    resample draws seeds, then images, and a row weighs (times its seed) x (times its image)."""
    B, S = seed_counts.shape
    return (seed_counts[:, :, None] * image_counts[:, None, :]).reshape(B, S * image_counts.shape[1])


def within_set_auroc(conf, correct, sets, codes, counts) -> np.ndarray:
    """(B,) the mean over sets of each set's AUROC, for B cluster resamples at once
    (``codes``/``counts`` as :func:`metrics.resampled_calibration`; ``counts`` of ones: the point
    estimate). A set whose resample has one class only is left out of that resample's mean."""
    conf, correct, sets = np.asarray(conf, float), np.asarray(correct, float), np.asarray(sets)
    codes = np.asarray(codes, np.int64)
    K = np.atleast_2d(np.asarray(counts, float))
    per_set = []
    for s in pd.unique(sets):
        m = sets == s
        used, local = np.unique(codes[m], return_inverse=True)
        per_set.append(metrics.resampled_calibration(conf[m], correct[m], local, K[:, used], (), adaptive=False)["auroc"])
    if not per_set:
        return np.full(K.shape[0], np.nan)
    stacked = np.vstack(per_set)
    ok = ~np.isnan(stacked)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok.any(0), np.where(ok, stacked, 0.0).sum(0) / ok.sum(0), np.nan)


def mean_set_auroc(conf, correct, sets) -> float:
    """The mean over sets of each set's AUROC (rows with no confidence left out, one-class sets
    skipped): the point value of :func:`within_set_auroc`."""
    conf, correct, sets = np.asarray(conf, float), np.asarray(correct, float), np.asarray(sets)
    vals = []
    for s in pd.unique(sets):
        m = (sets == s) & ~np.isnan(conf)
        if 0 < correct[m].sum() < m.sum():
            vals.append(metrics.auroc(conf[m], correct[m]))
    return float(np.mean(vals)) if vals else math.nan


def set_constant_auroc(correct, sets) -> float:
    """The AUROC of a confidence that knows only each set's accuracy: what set difficulty alone
    earns on a pool (0.5 on one set)."""
    correct = np.asarray(correct, float)
    acc = pd.Series(correct).groupby(np.asarray(sets)).transform("mean").to_numpy()
    return metrics.auroc(acc, correct) if 0 < correct.sum() < correct.size else math.nan


def positive_class(set_name: str) -> str:
    """AMBER's official scorer treats "no" as positive; POPE and the rest "yes"."""
    return "no" if set_name.startswith(("amber", "official-amber")) else "yes"


def image_of(row) -> str:
    """A row's bootstrap cluster: the world scene behind its image (its question id when the
    row has no image id, as in older per-question files)."""
    image = row.get("image_id") if hasattr(row, "get") else None
    if image is None or (isinstance(image, float) and math.isnan(image)):
        image = row["question_id"]
    return scene_of(image)


def _f1(truth: np.ndarray, pred: np.ndarray) -> float:
    tp = float(np.sum(truth & pred))
    denom = float(np.sum(truth) + np.sum(pred))
    return 2 * tp / denom if denom else 0.0


def _metric_values(conf: np.ndarray, correct: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> dict:
    """``truth``/``pred``: bool arrays, True = the set's positive class."""
    ok = ~np.isnan(conf)
    c, y = conf[ok], correct[ok]
    out = {"accuracy": float(correct.mean()) if correct.size else math.nan, "f1": _f1(truth, pred),
           "coverage": float(ok.mean()) if ok.size else math.nan}
    if c.size == 0:
        return out | {k: math.nan for k in CALIBRATION_METRICS}
    return out | {"ece": metrics.ece(c, y), "ece15": metrics.ece(c, y, 15), "adaptive_ece": metrics.adaptive_ece(c, y),
                  "brier": metrics.brier(c, y), "auroc": metrics.auroc(c, y)}


def _resampled_metric_values(conf: np.ndarray, correct: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                             codes: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`_metric_values` of B cluster resamples at once: ``codes`` (n,) each row's cluster,
    ``counts`` (B, C) how often each cluster was drawn. Task metrics from per-cluster sums
    times the counts; calibration metrics from :func:`metrics.resampled_calibration`."""
    K = counts.astype(float)
    C = K.shape[1]
    per = lambda w: K @ np.bincount(codes, weights=np.asarray(w, dtype=float), minlength=C)  # noqa: E731
    total = per(np.ones(codes.size))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"accuracy": per(correct) / total,
               "f1": 2.0 * per(truth & pred) / (per(truth) + per(pred))}
        out["f1"] = np.where(np.isnan(out["f1"]), 0.0, out["f1"])
        out["coverage"] = per(~np.isnan(conf)) / total
    # adaptive ECE: point estimate only (the tables report 10- and 15-bin ECE with intervals)
    return out | metrics.resampled_calibration(conf, correct, codes, counts, (10, 15), adaptive=False)


def _frame(rows, pool_seeds: bool = True) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["group"] = df["model"].map(model_group) if pool_seeds else df["model"].astype(str)
    df["conf"] = pd.to_numeric(df["confidence"], errors="coerce").astype(float)
    df["ok"] = df["correct"].astype(float)
    ids = df["image_id"].where(df["image_id"].notna(), df["question_id"]) if "image_id" in df else df["question_id"]
    df["image"] = ids.astype(str).map(scene_of)
    df["pos"] = df["set"].map(positive_class)
    df["truth"] = (df["label"].astype(str).str.strip().str.lower() == df["pos"]).to_numpy()
    df["pred"] = (df["answer"].astype(str).str.strip().str.lower() == df["pos"]).to_numpy()
    return df


def _units(df: pd.DataFrame, pools: dict | None):
    """(unit name, its rows): every set, then every pool of the sets present."""
    for set_, g in df.groupby("set", sort=False):
        yield set_, g
    for pool, members in (pools or {}).items():
        g = df[df["set"].isin(members)]
        if g["set"].nunique() >= 1 and len(g):
            yield pool, g


def _codes(g: pd.DataFrame, key: str, uniq) -> np.ndarray:
    return pd.Index(uniq).get_indexer(g[key])


def _scored(g: pd.DataFrame, key: str, uniq, image_counts: np.ndarray, uniform: np.ndarray):
    """(point values, resampled values) of one model group's rows. A resample draws the
    group's seeds with replacement (:func:`seed_resample_counts`), then images
    (``image_counts``): seed-to-seed variation is in every interval."""
    seeds = _seed_order(g["model"])
    codes = pd.Index(seeds).get_indexer(g["model"]) * len(uniq) + _codes(g, key, uniq)
    counts = two_level_counts(seed_resample_counts(len(seeds), uniform), image_counts)
    arrays = (g["conf"].to_numpy(), g["ok"].to_numpy(), g["truth"].to_numpy(), g["pred"].to_numpy())
    boots = _resampled_metric_values(*arrays, codes, counts)
    boots["auroc_within"] = within_set_auroc(arrays[0], arrays[1], g["set"].to_numpy(), codes, counts)
    return _point_values(g), boots


def _point_values(g: pd.DataFrame) -> dict:
    """:func:`_metric_values` of a group's rows, with the within-set AUROC."""
    point = _metric_values(g["conf"].to_numpy(), g["ok"].to_numpy(), g["truth"].to_numpy(), g["pred"].to_numpy())
    point["auroc_within"] = mean_set_auroc(g["conf"].to_numpy(), g["ok"].to_numpy(), g["set"].to_numpy())
    return point


def per_seed_text(value, digits: int = 3) -> str:
    """A ``<metric>_per_seed`` cell (``0.512;0.519``) as ``0.512 / 0.519`` ("" when missing)."""
    return " / ".join(f"{float(x):.{digits}f}" for x in value.split(";")) if isinstance(value, str) else ""


def _seed_uniforms(df: pd.DataFrame, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.random((n_boot, int(df.groupby("group")["model"].nunique().max())))


def headline_table(rows: list[dict], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                   cluster: str = "image", pools: dict | None = POOLS) -> pd.DataFrame:
    """Per (model group, set or pool, framing, read-out): metrics with bootstrap intervals.

    ``cluster="image"`` resamples images (all their questions, and all seeds' rows of them,
    move together); ``"question"`` resamples questions. The ``cluster`` column says which.
    Seeds of one model (``name@s0``, ``name@s1``, ...) are pooled for the point values and
    resampled before the images (two levels), so the intervals hold the seed spread; each
    seed's own value is in ``<metric>_per_seed`` (``seed_labels`` gives the order) and
    ``<metric>_seed_min/max``. ``auroc_within`` is the mean of the per-set AUROCs of a pool
    (a set's own AUROC for a set); a pool's ``auroc`` mixes its sets and is shown beside
    ``auroc_set_constant``, what a confidence knowing only each set's accuracy earns there.
    Pools (``pooled-clean``, ``pooled-transfer``) gather the rows of their member sets and
    resample the images of all of them at once. ``image_share`` is the between-image share of
    the confidence variance (:func:`metrics.image_variance_share`), the mean over seeds.
    """
    if cluster not in metrics.CLUSTERS:
        raise ValueError(f"cluster must be one of {metrics.CLUSTERS}, got {cluster!r}")
    df = _frame(rows)
    if df.empty:
        return df
    key = "image" if cluster == "image" else "question_id"
    out = []
    rng = np.random.default_rng(seed)
    seed_rng = np.random.default_rng([seed, 1])   # its own stream: one-seed models keep their image resamples
    for unit, gu in _units(df, pools):
        uniform = _seed_uniforms(df, n_boot, seed_rng)
        for (group, framing, readout), g in gu.groupby(["group", "framing", "readout"], sort=False):
            uniq = pd.unique(g[key])
            point, boots = _scored(g, key, uniq, metrics.resample_counts(len(uniq), n_boot, rng), uniform)
            pos = sorted(set(g["pos"]))
            rec = {"model": group, "set": unit, "framing": framing, "readout": readout,
                   "positive_class": pos[0] if len(pos) == 1 else "per set",
                   "n_questions": g["question_id"].nunique(), "n_images": g["image"].nunique(),
                   "n_sets": g["set"].nunique(), "seeds": g["model"].nunique(), "cluster": cluster}
            for k, v in point.items():
                rec[k] = v
                rec[f"{k}_low"], rec[f"{k}_high"] = metrics.interval(boots[k], alpha) if k in boots else (math.nan,) * 2
            rec["auroc_set_constant"] = (set_constant_auroc(g["ok"].to_numpy(), g["set"].to_numpy())
                                         if rec["n_sets"] > 1 else math.nan)
            # per seed, then averaged: seeds disagreeing about an image is not within-image variation
            shares = [metrics.image_variance_share(s["conf"].to_numpy(), s["image"].to_numpy())
                      for _, s in g.groupby("model")]
            rec["image_share"] = float(np.mean(shares)) if not np.all(np.isnan(shares)) else math.nan
            if rec["seeds"] > 1:
                names = _seed_order(g["model"])
                per_seed = [_point_values(g[g["model"] == name]) for name in names]
                rec["seed_labels"] = ";".join(seed_label(n) for n in names)
                for k in SEED_METRICS:
                    vals = [v[k] for v in per_seed]
                    rec[f"{k}_per_seed"] = ";".join(f"{x:.6f}" for x in vals)
                    rec[f"{k}_seed_min"], rec[f"{k}_seed_max"] = float(np.nanmin(vals)), float(np.nanmax(vals))
            out.append(rec)
    return pd.DataFrame(out)


def paired_table(rows: list[dict], framing: str = "third", readout: str = "single_pass", n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, cluster: str = "image", pools: dict | None = POOLS,
                 base: str = "base", pool_seeds: bool = True) -> pd.DataFrame:
    """Every method against every baseline and against ``base``, on the same resamples.

    Methods are the model groups at (``framing``, ``readout``; with ``pool_seeds=False`` each
    model name is its own group, ``@`` not read as a seed); references are the
    ``baseline:*`` groups and the base model. Per set and pool and metric: ``diff`` =
    method - reference, its percentile interval over resamples drawn once per set (each
    resample scores both on the same images and, for groups with the same number of seeds,
    the same seed positions: s0 with s0), and ``verdict`` (better / worse / level by whether
    the interval excludes 0; lower is better for ECE and Brier, higher for AUROC and
    accuracy). A group with several seeds has them resampled too (:func:`_scored`). Both must
    have answered the same questions.
    """
    if cluster not in metrics.CLUSTERS:
        raise ValueError(f"cluster must be one of {metrics.CLUSTERS}, got {cluster!r}")
    df = _frame(rows, pool_seeds)
    if df.empty:
        return pd.DataFrame()
    df = df[((df["framing"] == framing) & (df["readout"] == readout)) | df["group"].str.startswith("baseline:")]
    key = "image" if cluster == "image" else "question_id"
    out = []
    rng = np.random.default_rng(seed)
    seed_rng = np.random.default_rng([seed, 1])
    for unit, gu in _units(df, pools):
        groups = list(dict.fromkeys(gu["group"]))
        refs = [g for g in groups if g.startswith("baseline:")] + ([base] if base in groups else [])
        methods = [g for g in groups if not g.startswith("baseline:")]
        if not refs or not methods:
            continue
        uniq = pd.unique(gu[key])
        counts = metrics.resample_counts(len(uniq), n_boot, rng)
        uniform = _seed_uniforms(gu, n_boot, seed_rng)
        point, boots, qids = {}, {}, {}
        for name in dict.fromkeys(methods + refs):
            g = gu[gu["group"] == name]
            point[name], boots[name] = _scored(g, key, uniq, counts, uniform)
            qids[name] = frozenset(g["question_id"])
        for m in methods:
            for r in refs:
                if m == r:
                    continue
                if qids[m] != qids[r]:
                    raise ValueError(f"{unit}: {m!r} and {r!r} answered different questions "
                                     f"({len(qids[m] ^ qids[r])} differ); pair them on the same set")
                for k in PAIRED_METRICS:
                    lo, hi = metrics.interval(boots[m][k] - boots[r][k], alpha)
                    out.append({"set": unit, "method": m, "reference": r, "metric": k,
                                "method_value": point[m][k], "reference_value": point[r][k],
                                "diff": point[m][k] - point[r][k], "diff_low": lo, "diff_high": hi,
                                "verdict": metrics.verdict(lo, hi, k), "cluster": cluster,
                                "method_seeds": gu.loc[gu["group"] == m, "model"].nunique(),
                                "reference_seeds": gu.loc[gu["group"] == r, "model"].nunique(),
                                "n_images": gu["image"].nunique(), "framing": framing, "readout": readout})
    return pd.DataFrame(out)


def strongest_baseline(headline: pd.DataFrame, pool: str = "pooled-clean", metric: str = "brier") -> str:
    """The baseline with the lowest ``metric`` on ``pool`` (fixed before any method is compared);
    without that pool, the lowest mean over the sets present."""
    b = headline[headline["model"].str.startswith("baseline:")]
    if b.empty:
        raise ValueError("no baseline rows in the headline table: compute experiment.baseline_rows first")
    on_pool = b[b["set"] == pool]
    scores = (on_pool.set_index("model")[metric] if len(on_pool)
              else b[~b["set"].isin(list(POOLS) + ["perturbed"])].groupby("model")[metric].mean())
    return str(scores.idxmin())


def _fmt(r, k, digits=3):
    v, lo, hi = r.get(k), r.get(f"{k}_low"), r.get(f"{k}_high")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if lo == lo and hi == hi else f"{v:.{digits}f}"


def _main(df: pd.DataFrame, framing: str, readout: str) -> pd.DataFrame:
    return df[((df["framing"] == framing) & (df["readout"] == readout)) | (df["framing"] == "-")]


def _diff_cell(paired: pd.DataFrame | None, set_, method, reference, metric) -> str:
    if paired is None or paired.empty or method == reference:
        return "—"
    p = paired[(paired["set"] == set_) & (paired["method"] == method) & (paired["reference"] == reference)
               & (paired["metric"] == metric)]
    if p.empty:
        return "—"
    r = p.iloc[0]
    return f"{r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}] {r['verdict']}"


def markdown_table(df: pd.DataFrame, framing: str = "third", readout: str = "single_pass",
                   sets: tuple = CLEAN_SETS, paired: pd.DataFrame | None = None,
                   reference: str | None = None) -> str:
    """Results table: one row per model/baseline x set, intervals in brackets.

    With ``paired`` and ``reference`` (e.g. the strongest baseline), two more columns give
    each row's paired Brier and within-set AUROC difference against it, with interval and verdict.
    """
    keep = _main(df, framing, readout)
    keep = keep[keep["set"].isin(sets)]
    cl = ", ".join(sorted(set(keep["cluster"]))) if "cluster" in keep else "question"
    ref = f" vs {reference}" if reference else ""
    head = ["set", "model", "seeds", "accuracy", "F1 (positive)", "ECE10", "ECE15", "Brier", "within-set AUROC",
            "AUROC (pooled: mixes sets)", "per-set constant AUROC", "coverage", "image share"] \
        + ([f"ΔBrier{ref}", f"Δwithin-set AUROC{ref}"] if reference else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for set_ in sets:
        for _, r in keep[keep["set"] == set_].iterrows():
            const = r.get("auroc_set_constant", math.nan)
            cells = [set_, r["model"], str(int(r.get("seeds", 1))), _fmt(r, "accuracy"),
                     f"{_fmt(r, 'f1')} ({r['positive_class']})", _fmt(r, "ece"), _fmt(r, "ece15"), _fmt(r, "brier"),
                     _fmt(r, "auroc_within"), _fmt(r, "auroc"), "—" if const != const else f"{const:.3f}",
                     f"{r['coverage']:.2f}",
                     "n/a" if r.get("image_share") != r.get("image_share") else f"{r.get('image_share', math.nan):.2f}"]
            if reference:
                cells += [_diff_cell(paired, set_, r["model"], reference, k) for k in ("brier", "auroc_within")]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"95% percentile bootstrap intervals, resampling seeds (models with several), then {cl}s "
                 f"({framing} person, {readout.replace('_', ' ')} read-out for the models). Within-set AUROC: "
                 "a set's own AUROC, and for a pool the mean over its sets; per-set constant AUROC: what a "
                 "confidence knowing only each set's accuracy earns on a pool.")
    return "\n".join(lines)


def seed_markdown(df: pd.DataFrame, framing: str = "third", readout: str = "single_pass",
                  sets: tuple = ("pooled-clean", "pooled-transfer"), metrics_=SEED_METRICS) -> str:
    """Each seed's own value for the models with several seeds (pooled sets)."""
    keep = _main(df, framing, readout)
    keep = keep[keep["set"].isin(sets) & (keep.get("seeds", 1) > 1)]
    if keep.empty:
        return "_no model with several seeds_"
    head = ["set", "model", "seeds"] + [METRIC_NAMES.get(m, m) + " per seed" for m in metrics_]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in keep.iterrows():
        cells = [r["set"], r["model"], str(r["seed_labels"]).replace(";", " / ")]
        cells += [per_seed_text(r[f"{m}_per_seed"]) for m in metrics_]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


METRIC_NAMES = {"ece": "ECE10", "ece15": "ECE15", "brier": "Brier", "auroc": "AUROC", "auroc_within": "within-set AUROC",
                "accuracy": "accuracy"}


def paired_markdown(paired: pd.DataFrame, sets=None, methods=None,
                    metrics_=("ece", "ece15", "brier", "auroc_within", "auroc", "accuracy")) -> str:
    """Paired differences (method - reference) as a table: one row per set x method x reference."""
    if paired is None or paired.empty:
        return "_no paired differences_"
    p = paired
    if sets is not None:
        p = p[p["set"].isin(sets)]
    if methods is not None:
        p = p[p["method"].isin(methods)]
    head = ["set", "method", "reference"] + ["Δ" + METRIC_NAMES[m] for m in metrics_]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = list(dict.fromkeys(p["set"]))
    for set_ in order:
        sp = p[p["set"] == set_]
        for (m, r), _ in sp.groupby(["method", "reference"], sort=False):
            lines.append("| " + " | ".join([set_, m, r] + [_diff_cell(sp, set_, m, r, k) for k in metrics_]) + " |")
    cl = ", ".join(sorted(set(p["cluster"]))) if len(p) else "image"
    lines += ["", f"Difference = method - reference on the same bootstrap resamples (seeds paired by position, "
                  f"then {cl}s), 95% interval; verdict: better / worse when the interval excludes 0 (lower ECE and "
                  "Brier, higher AUROC and accuracy are better), level otherwise. On a pool, ΔAUROC mixes sets: "
                  "rank claims use Δwithin-set AUROC."]
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
def results_suffix(results: str) -> str:
    """File-name suffix of an evaluation's own figures: "" for "results", "_noconf" for "results/noconf"."""
    parts = Path(results).parts
    return "" if parts == ("results",) else "_" + "_".join(parts[1:] if parts[0] == "results" else parts)


def model_names(entries) -> list[str]:
    """The names results carry: ``"LABEL=ADAPTER"`` entries are reported as LABEL."""
    return [str(e).split("=", 1)[0] for e in entries]


def model_specs(run_dir, base_model: str, names) -> list[ModelSpec]:
    """``"base"`` is the base model itself; any other name is the adapter ``adapters/<name>``,
    reported under that name, or ``"LABEL=ADAPTER"``: the adapter ``adapters/ADAPTER`` reported
    as LABEL (e.g. ``"grounded@s0=sft@g0"``: one SFT stage's adapter, named for its method)."""
    specs = []
    for entry in names:
        name, _, folder = str(entry).partition("=")
        if not name or (_ and not folder):
            raise ValueError(f"model entry {entry!r}: expected NAME or LABEL=ADAPTER")
        if name == "base" and not folder:
            specs.append(ModelSpec("base", base_model, None))
            continue
        adapter = Path(run_dir) / "adapters" / (folder or name)
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


FIGURE_COLUMNS = ("model", "set", "framing", "readout", "question_id", "image_id", "label", "answer", "correct",
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


def noise_table(rows: list[dict] | pd.DataFrame, framing: str = "third", readout: str = "single_pass") -> pd.DataFrame:
    """The grounded perturbed set per model and noise target (none / key / distractor): accuracy,
    mean confidence, ECE, Brier and AUROC. Confidence that follows correctness drops with key noise
    only where answers go wrong, and stays up under distractor noise."""
    from csp_utils import metrics

    df = pd.DataFrame(rows)
    df = df[(df["set"] == GROUNDED_SET) & df["framing"].isin([framing, "-"]) & df["readout"].isin([readout, "-"])]
    df = df.dropna(subset=["confidence"])
    if df.empty:
        return pd.DataFrame()
    df = df.assign(noise_on=df["question_id"].map(grounded.noise_on_of))
    out = []
    for (model, noise_on), g in df.groupby(["model", "noise_on"]):
        conf, correct = g["confidence"].to_numpy(float), g["correct"].to_numpy(int)
        out.append({"model": model, "noise_on": noise_on, "n": len(g), "accuracy": correct.mean(),
                    "confidence": conf.mean(), "ece": metrics.ece(conf, correct), "brier": metrics.brier(conf, correct),
                    "auroc": metrics.auroc(conf, correct) if 0 < correct.sum() < len(correct) else math.nan})
    return pd.DataFrame(out)


def level_spearman(df: pd.DataFrame) -> pd.DataFrame:
    """Spearman of verbalized confidence against the noise level, per model/framing/read-out."""
    from csp_utils import metrics

    out = []
    for (model, framing, readout), g in df.groupby(["model", "framing", "readout"]):
        g = g.dropna(subset=["confidence"])
        rho, p = metrics.spearman(g["level"], g["confidence"]) if len(g) >= 3 else (math.nan, math.nan)
        out.append({"model": model, "framing": framing, "readout": readout, "spearman_level": rho, "p": p, "n": len(g)})
    return pd.DataFrame(out)


def variant_seeds(variants: dict) -> dict[str, list[str]]:
    """Ablation variants ``{label: model name or [model name per seed]}`` -> ``{label: [names]}``;
    labels must not hold ``@`` (it marks the seed of a reported name)."""
    out = {}
    for label, names in variants.items():
        if "@" in str(label):
            raise ValueError(f"variant label {label!r} holds '@', which marks seeds; rename it")
        names = [names] if isinstance(names, str) else list(names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"variant {label!r}: expected a model name or a list of them, got {names!r}")
        out[str(label)] = names
    return out


def variant_labels(seeded: dict[str, list[str]]) -> dict[str, str]:
    """Model name (as its rows carry it: ``LABEL`` of a ``LABEL=ADAPTER`` entry) -> the name its
    rows are reported under: the variant label for a one-seed variant, ``label@s<k>`` for the
    k-th seed of a variant with several (seeds pair by position)."""
    out = {}
    for label, entries in seeded.items():
        for k, name in enumerate(model_names(entries)):
            if name in out:
                raise ValueError(f"model {name!r} is listed under two variants ({out[name]!r} and {label!r})")
            out[name] = label if len(entries) == 1 else f"{label}@s{k}"
    return out


def paired_against(rows: list[dict], reference: str, framing: str = "third", readout: str = "single_pass",
                   pool_seeds: bool = True, **boot) -> pd.DataFrame:
    """Every other model group against ``reference`` (an ablation's full variant, or another
    method), on the same resamples; ``boot``: :func:`paired_table`'s keywords (n_boot, alpha,
    seed, cluster, pools).

    Seeds (``name@s0``, ``name@s1``, ...) are pooled per group and resampled seed with seed:
    the k-th seed of each group is drawn together. ``pool_seeds=False`` takes every model
    name whole (each its own one-seed model)."""
    models = [r for r in rows if not str(r["model"]).startswith("baseline:")]
    names = {str(r["model"]) if not pool_seeds else model_group(str(r["model"])) for r in models}
    if reference not in names:
        raise ValueError(f"reference {reference!r} has no rows; models: {sorted(names)}")
    table = paired_table(models, framing, readout, base=reference, pool_seeds=pool_seeds, **boot)
    if table.empty:
        return table
    return table[table["reference"] == reference].reset_index(drop=True)
