"""Grounded CSP rows: confidence targets from the base model's own answers, not from the noise.

A grounded row is (image variant, question, quoted answer) with targets that describe how
likely the quoted answer is to be right (schema: ``GROUNDED_COLUMNS``):

* Questions come from CSP-split scenes, with both gold labels: ``questions="world"`` draws
  them with ``language.world_questions``; ``questions="benchmark"`` with the evaluation sets'
  own generators (POPE-style existence with random, popular and adversarial negatives,
  AMBER-style attribute and relation), so the training rows hold the kind of errors the
  clean sets measure (the images stay CSP-split, never evaluation images).
* Each question gets one image variant: clean (``level`` 100, ``noise_on`` "none") for a
  share ``clean_share`` of each scene's questions (rounded up), else CSP noise at a level
  drawn from the build's levels below 100, either on the asked objects (``"key"``, when the
  annotations find them) or on a *distractor* (``"distractor"``): another object of the
  scene whose category the question does not mention, or, where there is none, the mask of
  an object of another CSP scene (the same mask-area distribution). A distractor region never
  touches the asked objects' pixels, so noise does not imply that the answer is "no". With
  ``global_share`` > 0, that share of the noised questions is noised on the whole image
  (``"global"``) instead.
* The quoted answer is the base model's own greedy answer on that image (batched through
  the evaluation path: one shared-prefix prompt pass and ``generate`` per batch);
  ``internal_p`` its temperature-scaled internal yes/no probability, T fitted on the clean
  rows of a held-out share of the training scenes (``split == "heldout"``); ``cell_acc``
  the model's accuracy in the row's (level, quoted answer, kind) cell; ``calibrated_p`` the
  probability that the answer is right given its raw internal probability *and* the
  perturbation it was given under (a logistic model with a temperature and a bias per
  (noise target, level), fitted on every row of the held-out scenes): what the model's own
  probability is worth on an image degraded that way.
* Answer-flip rows (``flip_rows``) quote the opposite answer of the same image and question with the
  complementary targets (``correct`` and ``internal_p`` complemented, ``cell_acc`` of the
  flipped answer's cell).

The build writes shards of (image, own answer, raw internal probability) as it goes and
resumes like the paper build; the dataset-wide quantities (T, cell accuracies, flip rows)
are computed once every shard is there. ``grounded_perturbed_benchmark`` builds the
matching held-out evaluation set from eval-split scenes.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from csp_utils.core.images import png_cell
from csp_utils.dataset import csp_noise
from csp_utils.dataset.buildconfig import (BuildConfig, GroundedOptions, config_hash, grounder_fingerprint,
                                           noised_levels, options_of)
from csp_utils.core import baselines
from csp_utils.dataset.grounders import AnnotationGrounder
from csp_utils.dataset.store import Build, Chunk, build_sharded
from csp_utils.vlm import parsing, prompts
from csp_utils.world import benchmarks, scenes as world, language, catalog
from csp_utils.world.schema import NOISE_ON, QAItem
# Colours whose luma (ITU-R 601) is at least this look like the bright speckles of clipped noise.
BRIGHT_LUMA = 200
BRIGHT_COLORS = tuple(c for c, (r, g, b) in catalog.COLORS.items() if 0.299 * r + 0.587 * g + 0.114 * b >= BRIGHT_LUMA)
# Eval-split scene range of the grounded perturbed evaluation set (suites._STARTS ends at 500_000 + n).
GROUNDED_EVAL_START = 600_000
# POPE's popular/adversarial negatives rank categories by set statistics: counted over a fixed
# run of CSP scenes, so a scene's questions do not depend on which other scenes are built
REFERENCE_SCENES = 1000
# CSP-split scene indices whose object masks serve as random distractor regions (none of them eval images).
_REGION_POOL = 100_000
_REGION_TRIES = 50

GROUNDED_COLUMNS = (
    "sample_id", "source_id", "image_id", "image", "question", "label", "kind", "subtype", "key_objects",
    "level", "noise_on", "noise_region", "mask_area", "bright_scene", "noise_on_bright", "split",
    "raw_answer", "own_answer", "answer", "flipped", "correct", "internal_p_raw", "internal_p", "cell_acc",
    "calibrated_p",
)






# ---------------------------------------------------------------------------------------
# Planning: which image variant each question gets


@dataclass
class Variant:
    qa: object                  # schema.QAItem
    level: int                  # 100 = clean
    noise_on: str               # "none" | "key" | "distractor" | "global"
    mask: np.ndarray | None     # the noised pixels
    region: str                 # "" | "key" | "object" (another object of the scene) | "random" (another scene's mask)
                                # | "global" (the whole image)
    noise_on_bright: bool       # the noised pixels belong to a bright object

    @property
    def sample_id(self) -> str:
        return f"{self.qa.question_id}@{self.noise_on}@c{self.level:03d}"


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng(csp_noise.sample_seed(seed, key))


def _categories(phrases, vocabulary) -> set[str]:
    """Object categories the phrases mention, colour and size words dropped."""
    out = set()
    for p in phrases:
        found = vocabulary.find(str(p))
        out |= {m.object for m in found} if found else {str(p).split()[-1]}
    return out


def asked_mask(scene: world.Scene, phrases, vocabulary) -> np.ndarray:
    """Pixels of every object whose category the question mentions (a red circle counts for
    "a purple circle"): what a distractor must not touch."""
    cats = _categories(phrases, vocabulary)
    mask = np.zeros(scene.image.shape[:2], dtype=bool)
    for o in scene.objects:
        if o.category in cats:
            mask |= o.mask
    return mask


def random_region(shape: tuple[int, int], avoid: np.ndarray, rng: np.random.Generator,
                  world_config: world.WorldConfig) -> np.ndarray:
    """The visible mask of a random object of a random CSP scene, minus ``avoid``."""
    for _ in range(_REGION_TRIES):
        other = world.make_scene("csp", int(rng.integers(_REGION_POOL)), world_config)
        obj = other.objects[int(rng.integers(len(other.objects)))]
        if obj.mask.shape != tuple(shape):
            raise ValueError(f"random regions come from {obj.mask.shape} scenes but the image is {shape}; "
                             "pass the world_config the scenes were made with")
        m = obj.mask & ~avoid
        if m.any():
            return m
    raise RuntimeError(f"no random region outside the asked objects after {_REGION_TRIES} tries")


def distractor(scene: world.Scene, avoid: np.ndarray, cats: set[str], rng: np.random.Generator,
               world_config: world.WorldConfig) -> tuple[np.ndarray, str, bool]:
    """(mask, region, on_bright): another object of the scene the question does not ask about,
    else a random region of the same area distribution; never on the ``avoid`` pixels."""
    cands = [o for o in scene.objects if o.category not in cats and (o.mask & ~avoid).any()]
    if cands:
        o = cands[int(rng.integers(len(cands)))]
        return o.mask & ~avoid, "object", o.color in BRIGHT_COLORS
    return random_region(scene.image.shape[:2], avoid, rng, world_config), "random", False


def plan_scene(scene: world.Scene, questions: Sequence, grounder, levels: Sequence[int], options: GroundedOptions,
               seed: int, world_config: world.WorldConfig, stats: Counter | None = None) -> list[Variant]:
    """One variant per question, drawn from (seed, scene id) alone (so shards can resume)."""
    stats = stats if stats is not None else Counter()
    rng = _rng(seed, f"plan/{scene.scene_id}")
    n = len(questions)
    clean = set(rng.permutation(n)[: math.ceil(options.clean_share * n - 1e-9)].tolist())
    out = []
    for i, qa in enumerate(questions):
        res = grounder.ground(None, list(qa.objects), image_id=scene.scene_id)
        key = np.asarray(res.mask, dtype=bool) if res.mask is not None and np.asarray(res.mask).any() else None
        level = int(levels[int(rng.integers(len(levels)))])
        use_key = bool(rng.random() < options.key_share)
        # drawn only when asked for, so builds without whole-image noise keep their draws
        use_global = options.global_share > 0 and bool(rng.random() < options.global_share)
        choices = ([] if key is None else ["key"]) + (["distractor"] if options.distractor_noise else [])
        if use_global and i not in clean:
            out.append(Variant(qa, level, "global", np.ones(scene.image.shape[:2], dtype=bool), "global",
                               is_bright_scene(scene)))
            continue
        if i in clean or not choices:
            if i not in clean:
                stats["clean_no_noise_target"] += 1  # absent objects and no distractor noise: nothing to noise
            out.append(Variant(qa, 100, "none", None, "", False))
            continue
        target = "key" if "key" in choices and (use_key or len(choices) == 1) else "distractor"
        if target == "key":
            bright = any(o.color in BRIGHT_COLORS and (o.mask & key).any() for o in scene.objects)
            out.append(Variant(qa, level, "key", key, "key", bright))
        else:
            cats = _categories(qa.objects, grounder.vocabulary)
            avoid = asked_mask(scene, qa.objects, grounder.vocabulary)
            mask, region, bright = distractor(scene, avoid, cats, rng, world_config)
            out.append(Variant(qa, level, "distractor", mask, region, bright))
            stats[f"distractor_region/{region}"] += 1
    return out


def variant_image(scene: world.Scene, v: Variant, noise_cfg: csp_noise.NoiseConfig) -> np.ndarray:
    if v.noise_on == "none":
        return scene.image
    return csp_noise.perturb_levels_array(scene.image, v.mask, (v.level,), noise_cfg, key=v.qa.question_id)[0]


def scene_questions(scene: world.Scene, questions_per_scene: int, seed: int, set_name: str = "world-train",
                    source: str = "world", world_config: world.WorldConfig | None = None) -> list:
    """The scene's questions (both labels): as ``sources.world_source`` draws them, or
    from the evaluation sets' generators (:func:`benchmark_questions`)."""
    if source == "benchmark":
        return benchmark_questions(scene, questions_per_scene, seed, set_name, world_config)
    return language.world_questions(scene, _rng(seed, scene.scene_id), questions_per_scene, set_name=set_name)


_REFERENCE_STATS: dict = {}


def reference_statistics(world_config: world.WorldConfig | None = None) -> dict:
    """``scenes.world_statistics`` of CSP scenes 0 .. REFERENCE_SCENES - 1 (cached per world config)."""
    wc = world_config or world.WorldConfig()
    key = repr(wc)
    if key not in _REFERENCE_STATS:
        _REFERENCE_STATS[key] = world.world_statistics(world.make_scenes("csp", REFERENCE_SCENES, wc))
    return _REFERENCE_STATS[key]


def benchmark_questions(scene: world.Scene, n: int, seed: int, set_name: str = "world-train",
                        world_config: world.WorldConfig | None = None,
                        weights: dict[str, float] | None = None) -> list:
    """Up to ``n`` distinct questions about a training scene from the clean sets' generators:
    existence from POPE (its present objects, and its random, popular and adversarial absent
    ones) and AMBER's absent-object questions, attribute and relation from AMBER; drawn like
    ``language.world_questions`` (labels alternate, kinds by ``weights``, default existence 0.5,
    attribute 0.25, relation 0.25), from (seed, scene id) alone."""
    from dataclasses import replace

    stats = reference_statistics(world_config)
    pool: dict[tuple[str, str], list] = {}
    seen: set[str] = set()

    def add(items):
        for qa in items:
            if qa.question not in seen:
                seen.add(qa.question)
                pool.setdefault((qa.kind, qa.label), []).append(qa)

    n_present = len(scene.categories())
    if n_present:
        for kind in benchmarks.POPE_KINDS:
            add(benchmarks.build_world_pope([scene], kind, n_pos=min(3, n_present), seed=seed, stats=stats).items)
    for kind in benchmarks.AMBER_KINDS:
        add(benchmarks.build_world_amber([scene], kind, seed=seed, stats=stats).items)
    for cands in pool.values():  # a fixed order before drawing: generators' order is not part of the draw
        cands.sort(key=lambda qa: qa.question)
    rng = _rng(seed, f"benchmark/{scene.scene_id}")
    weights = weights or {"existence": 0.5, "attribute": 0.25, "relation": 0.25}
    return [replace(qa, question_id=f"{scene.scene_id}-q{k:02d}", set=set_name)
            for k, _, _, qa in language.draw_balanced(pool, rng, n, weights)]


def is_bright_scene(scene: world.Scene) -> bool:
    return any(o.color in BRIGHT_COLORS for o in scene.objects)


# ---------------------------------------------------------------------------------------
# The base model's own answers, batched


@dataclass
class Answers:
    raw: list[str]           # the greedy reply
    own: list[str]           # "Yes" / "No"
    p_own: list[float]       # internal probability of the own answer (softmax restricted to yes/no)
    from_decision_step: int  # replies that did not parse: the answer is the yes/no decision itself


def model_answers(model, processor, questions: Sequence[str], images: Sequence, batch_size: int = 128,
                  max_new_tokens: int = 4) -> Answers:
    """Greedy answers and internal yes/no probabilities, batched like ``evaluation.elicit_batch``
    (template head + image once per batch where exact, then ``generate``).

    The internal probability is read where "Yes" and "No" first differ; a reply that does not
    parse as yes/no (rare for a trained model) takes the yes/no decision at that step.
    """
    import torch

    from csp_utils.vlm import engine

    yn = engine.yes_no_tokens(processor)
    c = len(yn.prefix)
    raw_all, own_all, p_all, fallback = [], [], [], 0
    for s in range(0, len(questions), batch_size):
        qs, ims = list(questions[s:s + batch_size]), list(images[s:s + batch_size])
        msgs = [prompts.answer_messages(q) for q in qs]
        turn = engine.answer_turn(model, processor, msgs, ims, max(max_new_tokens, c + 1), parsing.parse_yes_no, yn)
        logits = turn.step_logits
        probs = torch.softmax(logits[c].float(), -1) if c < len(logits) else None
        for i, (r, a, (p_own, _)) in enumerate(zip(turn.raw, turn.parsed, turn.internal)):
            if p_own is None:  # unparsed (or off the yes/no path): the decision step decides
                fallback += 1
                p_yes = float(probs[i, yn.yes].sum() / (probs[i, yn.yes].sum() + probs[i, yn.no].sum()))
                a = a if a in ("yes", "no") else ("yes" if p_yes >= 0.5 else "no")
                p_own = p_yes if a == "yes" else 1.0 - p_yes
            raw_all.append(r)
            own_all.append(a.capitalize())
            p_all.append(float(p_own))
    return Answers(raw_all, own_all, p_all, fallback)


# ---------------------------------------------------------------------------------------
# Rows


def _shard_features():
    from datasets import Features, Image as HFImage, Sequence as HFSeq, Value

    return Features({
        "sample_id": Value("string"), "source_id": Value("string"), "image_id": Value("string"), "image": HFImage(),
        "question": Value("string"), "label": Value("string"), "kind": Value("string"), "subtype": Value("string"),
        "key_objects": HFSeq(Value("string")), "level": Value("int32"), "noise_on": Value("string"),
        "noise_region": Value("string"), "mask_area": Value("float64"), "bright_scene": Value("bool"),
        "noise_on_bright": Value("bool"), "split": Value("string"), "raw_answer": Value("string"),
        "own_answer": Value("string"), "own_correct": Value("int32"), "p_own_raw": Value("float64"),
    })


def is_heldout(scene_id: str, seed: int, share: float) -> bool:
    """Scenes whose clean rows fit the temperature; drawn from (seed, scene id) alone."""
    return csp_noise.sample_seed(seed, f"heldout/{scene_id}") / 2.0 ** 63 < share


def shard_rows(scene_list: Sequence[world.Scene], questions: dict, grounder, model, processor,
               config: BuildConfig, options: GroundedOptions, world_config: world.WorldConfig,
               stats: Counter) -> list[dict]:
    """Rows (without the dataset-wide targets) of a run of scenes: plan, noise, answer in batches."""
    noise_cfg = config.effective_noise()
    levels = noised_levels(config)
    seed = noise_cfg.seed
    planned = []
    for scene in scene_list:
        for v in plan_scene(scene, questions[scene.scene_id], grounder, levels, options, seed, world_config, stats):
            planned.append((scene, v, variant_image(scene, v, noise_cfg)))
    t0 = time.perf_counter()
    from PIL import Image

    ans = model_answers(model, processor, [v.qa.question for _, v, _ in planned],
                        [Image.fromarray(a) for _, _, a in planned], options.batch_size, options.max_new_tokens)
    stats["answer_seconds_x1000"] += int(1000 * (time.perf_counter() - t0))
    stats["answers_from_decision_step"] += ans.from_decision_step
    rows = []
    for (scene, v, arr), raw, own, p in zip(planned, ans.raw, ans.own, ans.p_own):
        label = str(v.qa.label).lower()
        rows.append({
            "sample_id": v.sample_id, "source_id": v.qa.question_id, "image_id": scene.scene_id,
            "image": png_cell(arr, config.png_compress_level), "question": v.qa.question, "label": label,
            "kind": v.qa.kind, "subtype": v.qa.subtype, "key_objects": [str(o) for o in v.qa.objects],
            "level": v.level, "noise_on": v.noise_on, "noise_region": v.region,
            "mask_area": float(v.mask.mean()) if v.mask is not None else 0.0,
            "bright_scene": is_bright_scene(scene), "noise_on_bright": v.noise_on_bright,
            "split": "heldout" if is_heldout(scene.scene_id, seed, options.temperature_holdout) else "train",
            "raw_answer": raw, "own_answer": own, "own_correct": int(own.lower() == label), "p_own_raw": p,
        })
        stats[f"rows/{v.noise_on}/{label}"] += 1
    stats["rows"] += len(rows)
    return rows


# ---------------------------------------------------------------------------------------
# Dataset-wide targets


def fit_heldout_temperature(ds) -> tuple[float, dict]:
    """T fitted on the clean rows of the held-out scenes (never evaluation images)."""
    split, level = np.array(ds["split"]), np.array(ds["level"])
    pick = (split == "heldout") & (level == 100)
    p, y = np.array(ds["p_own_raw"], float)[pick], np.array(ds["own_correct"], float)[pick]
    info = {"rows": int(pick.sum()), "accuracy": float(y.mean()) if y.size else None}
    if y.size < 20 or y.min() == y.max():
        warnings.warn(f"too few held-out clean rows to fit the temperature ({y.size}, accuracy {info['accuracy']}): "
                      "T = 1; build more scenes or raise temperature_holdout", stacklevel=2)
        return 1.0, {**info, "fitted": False}
    return baselines.fit_temperature(p, y), {**info, "fitted": True}


def cell_key(level: int, answer: str, kind: str) -> str:
    return f"c={int(level)}|{answer}|{kind}"


def cell_accuracies(levels, answers, kinds, correct) -> dict[str, dict]:
    """Accuracy of the model's own answers per (level, answer, kind) cell, over both gold labels."""
    tally: dict[str, list[int]] = {}
    for c, a, k, ok in zip(levels, answers, kinds, correct):
        tally.setdefault(cell_key(c, a, k), []).append(int(ok))
    return {k: {"accuracy": sum(v) / len(v), "n": len(v), "target": int(round(100 * sum(v) / len(v)))}
            for k, v in sorted(tally.items())}


def _cell_target(cells: dict, pooled: dict, level: int, answer: str, kind: str, stats: Counter) -> int:
    """A cell's target; an empty cell (the model never gave that answer there) falls back to
    the (level, answer) pool, then to the answer's overall accuracy, counted."""
    key = cell_key(level, answer, kind)
    if key in cells:
        return cells[key]["target"]
    stats["cell_fallbacks"] += 1
    for k in (f"c={int(level)}|{answer}", answer):
        if k in pooled:
            return pooled[k]
    return 50


def _pooled(levels, answers, correct) -> dict[str, int]:
    out: dict[str, list[int]] = {}
    for c, a, ok in zip(levels, answers, correct):
        out.setdefault(f"c={int(c)}|{a}", []).append(int(ok))
        out.setdefault(a, []).append(int(ok))
    return {k: int(round(100 * sum(v) / len(v))) for k, v in out.items()}


def condition_of(noise_on: str, level: int) -> str:
    return "clean" if noise_on == "none" else f"{noise_on}@c{int(level):03d}"


def calibration_features(p_raw, answers, conditions, known: Sequence[str]) -> np.ndarray:
    """(N, 3 + 2 len(known)): constant, logit of the own answer's raw probability, answer "yes";
    per known perturbation condition an indicator and its product with the logit (a condition
    not among ``known`` reads as clean)."""
    x = baselines.answer_logit(p_raw)
    cond = np.asarray(conditions, dtype=object)
    cols = [np.ones_like(x), x, np.array([str(a).lower() == "yes" for a in answers], dtype=float)]
    for c in known:
        ind = (cond == c).astype(float)
        cols += [ind, ind * x]
    return np.stack(cols, axis=1)


def fit_calibration_model(ds, l2: float = 1.0) -> tuple[dict | None, dict]:
    """A logistic model of own correctness on every row of the held-out scenes: a temperature
    and bias for clean images and, shrunk towards them (L2 ``l2``), one per perturbation
    condition. Returns (model or None when too few rows, info)."""
    split = np.array(ds["split"])
    pick = split == "heldout"
    conds = np.array([condition_of(n, c) for n, c in zip(ds["noise_on"], ds["level"])], dtype=object)
    y = np.array(ds["own_correct"], float)[pick]
    info = {"rows": int(pick.sum()), "accuracy": float(y.mean()) if y.size else None}
    if y.size < 20 or y.min() == y.max():
        warnings.warn(f"too few held-out rows to fit the calibration model ({y.size}, accuracy {info['accuracy']}): "
                      "calibrated_p = internal_p; build more scenes or raise temperature_holdout", stacklevel=2)
        return None, {**info, "fitted": False}
    known = sorted({c for c in conds[pick] if c != "clean"})
    X = calibration_features(np.array(ds["p_own_raw"], float)[pick], np.array(ds["own_answer"])[pick],
                             conds[pick], known)
    # l2 / 2 per squared weight: the penalty of a unit Gaussian prior at l2 = 1
    w = baselines.fit_logistic(X, y, l2=[0.0, 0.0, 0.0] + [l2 / 2] * (2 * len(known)))
    model = {"conditions": known, "weights": [float(v) for v in w], "l2": l2}
    return model, {**info, "fitted": True, **model}


def finalize(ds, options: GroundedOptions, stats: Counter):
    """Add the quoted answer and the targets, then the flip rows; returns (dataset, T, temperature info,
    cells, calibration info)."""
    from datasets import concatenate_datasets

    T, t_info = fit_heldout_temperature(ds)
    cal, cal_info = fit_calibration_model(ds)
    levels, kinds, own = list(ds["level"]), list(ds["kind"]), list(ds["own_answer"])
    own_ok = [int(x) for x in ds["own_correct"]]
    p_raw = np.array(ds["p_own_raw"], float)
    p_t = baselines.temperature_scale(p_raw, T)
    p_cal = p_t if cal is None else baselines.logistic_predict(
        calibration_features(p_raw, own, [condition_of(n, c) for n, c in zip(ds["noise_on"], levels)],
                             cal["conditions"]), cal["weights"])
    cells = cell_accuracies(levels, own, kinds, own_ok)
    pooled = _pooled(levels, own, own_ok)

    def with_targets(d, answers, flipped, correct, p_quoted, p_quoted_raw, p_quoted_cal):
        cell = [_cell_target(cells, pooled, c, a, k, stats) for c, a, k in zip(levels, answers, kinds)]
        cols = {"answer": answers, "flipped": [flipped] * len(answers), "correct": correct,
                "internal_p_raw": [float(x) for x in p_quoted_raw], "internal_p": [float(x) for x in p_quoted],
                "cell_acc": cell, "calibrated_p": [float(x) for x in p_quoted_cal]}
        for name, values in cols.items():
            d = d.add_column(name, values)
        return d

    base = with_targets(ds, own, False, own_ok, p_t, p_raw, p_cal)
    parts = [base]
    if options.flip_rows:
        flip = ds.remove_columns(["sample_id"]).add_column("sample_id", [f"{s}~flip" for s in ds["sample_id"]])
        flip = flip.select_columns(ds.column_names)
        other = ["No" if a == "Yes" else "Yes" for a in own]
        parts.append(with_targets(flip, other, True, [1 - x for x in own_ok], 1.0 - p_t, 1.0 - p_raw, 1.0 - p_cal))
    out = concatenate_datasets(parts) if len(parts) > 1 else base
    out = out.select_columns([c for c in GROUNDED_COLUMNS] + ["own_correct", "p_own_raw"])
    return out, T, t_info, cells, cal_info


# ---------------------------------------------------------------------------------------
# Checks and summaries


def bright_balance(bright_scene: Sequence[bool], noise_on: Sequence[str], tolerance: float = 0.03) -> dict:
    """Share of clean rows whose scene holds a bright (white / yellow) object vs that share among
    noised rows. "Bright means noisy" is learnable when bright scenes are rarer clean than noised:
    ``ok`` is False when the clean share falls more than ``tolerance`` below the noised one."""
    b = np.asarray(bright_scene, dtype=bool)
    noised = np.asarray([n != "none" for n in noise_on], dtype=bool)
    if b.shape != noised.shape:
        raise ValueError(f"bright_scene and noise_on need equal lengths, got {b.shape} and {noised.shape}")
    if noised.all() or not noised.any():
        return {"clean_share": None, "noised_share": None, "ok": False, "reason": "needs both clean and noised rows",
                "bright_colors": list(BRIGHT_COLORS)}
    clean_share, noised_share = float(b[~noised].mean()), float(b[noised].mean())
    return {"clean_share": round(clean_share, 4), "noised_share": round(noised_share, 4),
            "clean_rows": int((~noised).sum()), "noised_rows": int(noised.sum()),
            "ok": bool(clean_share >= noised_share - tolerance), "tolerance": tolerance,
            "bright_colors": list(BRIGHT_COLORS)}


def accuracy_table(ds) -> dict[str, dict]:
    """The base model's accuracy per (level, noise_on, label), over the unflipped rows."""
    t: dict[str, list[int]] = {}
    for c, n, lab, ok, f in zip(ds["level"], ds["noise_on"], ds["label"], ds["own_correct"], ds["flipped"]):
        if not f:
            t.setdefault(f"c={c}|{n}|{lab}", []).append(int(ok))
    return {k: {"n": len(v), "accuracy": round(sum(v) / len(v), 4)} for k, v in sorted(t.items())}


# ---------------------------------------------------------------------------------------
# The build


def _fingerprint(model) -> str:
    """The answering model as its weights' digest, so that a moved or copied checkout (another
    path to the same weights) resumes its builds; its path only where the weights cannot be read."""
    from csp_utils.vlm.models import base_fingerprint

    n = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else 0
    digest = base_fingerprint(model) if hasattr(model, "state_dict") else None
    if digest is None:
        cfg = getattr(model, "config", None)
        return f"{getattr(cfg, '_name_or_path', '') or type(model).__name__}({n} params)"
    return f"weights {digest[:16]}({n} params)"


def build_grounded_dataset(scene_list: Sequence[world.Scene], model, processor, out_dir, config: BuildConfig,
                           questions_per_scene: int = 4, question_seed: int = 0,
                           world_config: world.WorldConfig | None = None, progress: bool = True):
    """Build (or resume, or load) grounded rows from CSP-split scenes; returns the merged Dataset.

    ``config.targets`` must be "grounded"; its levels below 100 are the noise levels, its
    ``grounded`` options set the shares. Shards hold ``config.shard_size`` questions or a
    little more (a scene is never split), written through :mod:`csp_utils.dataset.store`;
    the dataset-wide quantities (T, cell accuracies, flip rows) are computed on the merged
    shards. Resuming needs the same scenes, model and config.
    """
    if config.targets != "grounded":
        raise ValueError(f"build_grounded_dataset needs BuildConfig(targets='grounded'), got {config.targets!r}")
    scene_list = list(scene_list)
    if not scene_list:
        raise ValueError("build_grounded_dataset needs at least one scene")
    bad = [s.scene_id for s in scene_list if s.split != "csp" or s.variant != "clean"]
    if bad:
        raise ValueError(f"grounded training rows come from clean CSP-split scenes only; got {bad[:3]} "
                         "(never evaluation images, never the natural degradations)")
    options = options_of(config)
    noised_levels(config)
    if config.effective_noise().noise != "local":
        raise ValueError("grounded rows noise the asked object or a distractor: BuildConfig.noise.noise must be "
                         f"'local', got {config.effective_noise().noise!r}")
    world_config = world_config or world.WorldConfig(image_size=scene_list[0].image.shape[0])
    grounder = AnnotationGrounder.from_scenes(scene_list)
    grounder_name = f"grounded[{grounder_fingerprint(grounder)}; model {_fingerprint(model)}; " \
                    f"{questions_per_scene} q/scene, question seed {question_seed}]"
    chash = config_hash(config, grounder_name)
    questions = {s.scene_id: scene_questions(s, questions_per_scene, question_seed, source=options.questions,
                                             world_config=world_config) for s in scene_list}
    groups, cur, n = [], [], 0  # scenes per shard
    for s in scene_list:
        cur.append(s)
        n += len(questions[s.scene_id])
        if n >= config.shard_size:
            groups.append(cur)
            cur, n = [], 0
    if cur:
        groups.append(cur)

    def rows(group, stats):
        out = shard_rows(group, questions, grounder, model, processor, config, options, world_config, stats)
        stats["source_samples"] += sum(len(questions[s.scene_id]) for s in group)
        stats["scenes"] += len(group)
        return out

    def chunks():
        for group in groups:
            yield Chunk([q.question_id for s in group for q in questions[s.scene_id]],
                        lambda stats, group=group: rows(group, stats))

    derived = {}

    def finalise(merged):
        if merged is None:
            raise ValueError("the grounded build produced no rows")
        derived["stats"] = Counter()
        final, derived["T"], derived["t_info"], derived["cells"], derived["calibration"] = finalize(
            merged, options, derived["stats"])
        return final

    def report(result, shard_stats):
        out = grounded_report(result, shard_stats, derived["stats"], config, options, grounder_name, chash,
                              derived["T"], derived["t_info"], derived["cells"], derived["calibration"])
        if not out["bright_balance"]["ok"]:
            warnings.warn(f"bright objects are rarer in clean rows than in noised ones: {out['bright_balance']}")
        return out

    return build_sharded(Build(
        out_dir=Path(out_dir), label="grounded dataset", config_hash=chash, config=config.to_dict(),
        grounder=grounder_name, chunks=chunks, features=_shard_features(), finalise=finalise, report=report,
        empty_features=_shard_features, total=sum(len(q) for q in questions.values()), progress=progress))


def _noise_on_bright(noise_on, on_bright) -> dict[str, float]:
    """Per noise target: the share of rows whose noised pixels cover a bright object."""
    t: dict[str, list[bool]] = {}
    for n, b in zip(noise_on, on_bright):
        if n != "none":
            t.setdefault(n, []).append(bool(b))
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(t.items())}


def grounded_report(ds, shard_stats, fin_stats, config, options, grounder_name, chash, T, t_info, cells,
                    calibration: dict) -> dict:
    total = Counter()
    for st in shard_stats:
        total.update(st["counts"])
    total.update(fin_stats)
    noise_on, level, flipped = list(ds["noise_on"]), list(ds["level"]), list(ds["flipped"])
    n = len(ds)
    unflipped = [not f for f in flipped]
    return {
        "targets": "grounded",
        "grounder": grounder_name,
        "config_hash": chash,
        "config": config.to_dict(),
        "source_samples": total["source_samples"],
        "scenes": total["scenes"],
        "rows": n,
        "rows_unflipped": sum(unflipped),
        "flip_rows": n - sum(unflipped),
        "clean_share": round(sum(x == "none" for x in noise_on) / n, 4) if n else None,
        "rows_per_noise_on": dict(Counter(noise_on)),
        "rows_per_level": {str(c): k for c, k in sorted(Counter(level).items())},
        "rows_per_noise_on_label": {k[len("rows/"):]: v for k, v in sorted(total.items()) if k.startswith("rows/")},
        "distractor_regions": {k.split("/", 1)[1]: v for k, v in total.items() if k.startswith("distractor_region/")},
        "clean_no_noise_target": total["clean_no_noise_target"],
        "answers_from_decision_step": total["answers_from_decision_step"],
        "cell_fallbacks": total["cell_fallbacks"],
        "temperature": {"T": round(T, 5), **t_info},
        "calibration_model": calibration,
        "base_accuracy": accuracy_table(ds),
        "cells": cells,
        "bright_balance": bright_balance(ds["bright_scene"], noise_on, options.bright_tolerance),
        "noise_on_bright_share": _noise_on_bright(noise_on, ds["noise_on_bright"]),
        "shards": len(shard_stats),
        "time_s": {"shards_total": round(sum(st["seconds"] for st in shard_stats), 3),
                   "answers": round(total["answer_seconds_x1000"] / 1000, 3)},
    }


# ---------------------------------------------------------------------------------------
# The held-out grounded perturbed evaluation set


def grounded_perturbed_benchmark(n_images: int = 40, levels: Sequence[int] = (10, 40, 70),
                                 start: int = GROUNDED_EVAL_START, seed: int = 0, questions_per_scene: int = 4, noise_gamma: float | None = None,
                                 image_size: int = 64, name: str = "grounded-perturbed"):
    """Eval-split scenes ``start .. start + n_images - 1`` with both gold labels: every question
    clean, and at each level with noise on its objects (where present) and on a distractor.

    Question ids end in ``@<noise_on>@c<level>`` (``suites.level_of`` reads the level,
    :func:`csp_utils.world.schema.noise_on_of` the target); each is its own image_id, as in ``perturbed_benchmark``.
    """
    from PIL import Image

    levels = tuple(c for c in csp_noise.validate_levels(levels) if c < 100)
    if not levels:
        raise ValueError("grounded_perturbed_benchmark needs at least one level below 100")
    if not 0 < n_images <= 100_000:
        raise ValueError(f"n_images must be in 1..100000 (the set's eval-split range), got {n_images}")
    wc = world.WorldConfig(image_size=image_size)
    scene_list = world.make_scenes("eval", n_images, wc, start=start)
    grounder = AnnotationGrounder.from_scenes(scene_list)
    noise_cfg = csp_noise.NoiseConfig(noise="local", seed=seed,
                                         **({"noise_gamma": noise_gamma} if noise_gamma else {}))
    images, items = {}, []
    for scene in scene_list:
        for qa in scene_questions(scene, questions_per_scene, seed, set_name=name):
            res = grounder.ground(None, list(qa.objects), image_id=scene.scene_id)
            key = np.asarray(res.mask, dtype=bool) if res.mask is not None else None
            cats = _categories(qa.objects, grounder.vocabulary)
            avoid = asked_mask(scene, qa.objects, grounder.vocabulary)
            dmask, _, _ = distractor(scene, avoid, cats, _rng(seed, f"distractor/{qa.question_id}"), wc)
            variants = [("none", 100, None)]
            for c in levels:
                if key is not None and key.any():
                    variants.append(("key", c, key))
                variants.append(("distractor", c, dmask))
            for noise_on, c, mask in variants:
                qid = f"{qa.question_id}@{noise_on}@c{c}"
                images[qid] = scene.image if mask is None else csp_noise.perturb_levels_array(
                    scene.image, mask, (c,), noise_cfg, key=qa.question_id)[0]
                items.append(QAItem(qid, qid, qa.question, qa.label, name, qa.kind, list(qa.objects),
                                               subtype=qa.subtype))
    return benchmarks.Benchmark(name, "pope", items, lambda i: Image.fromarray(images[i]), "yes")

