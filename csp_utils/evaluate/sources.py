"""Confidence sources beyond the logit, as baselines on the base model's own answers.

- ``baseline:probe``: a P(IK)-style probe (Kadavath et al. 2022): an L2 logistic regression on
  the hidden state at the position that predicts the answer, with its layer chosen on the
  calibration set (two image halves, each scored by the other's fit), refitted on all of it.
- ``baseline:contrast``: the model's probability of its own answer on the clean image, with CSP
  noise on the asked object and with CSP noise on the whole image, combined by a logistic
  regression on the three logits fitted on the calibration set (the BICR / VAUQ family).

Neither uses whether a grounder found the asked object: for the world's questions the
annotation masks exist exactly when the object is present (the gold "no" otherwise), so a
feature that knows it is a label leak. The asked object's region is the set of scene objects of
the asked category, and where there is none a region chosen the same way for every question
(the object sharing the asked colour, else the largest), so every question gets noise on a
region and the region's existence tells nothing.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import numpy as np

from csp_utils.core import baselines, metrics
from csp_utils.dataset import grounded_rows, grounders, csp_noise
from csp_utils.evaluate.suites import scene_of
from csp_utils.world import scenes as world

SOURCES = ("probe", "contrast")
CONTRAST_LEVEL = 50          # CSP level of both noises (c = 50%: about half the signal left)
PROBE_L2 = 1.0               # L2 penalty on standardised hidden states (sum of squares, not mean)


# --------------------------------------------------------------------------- model passes
def answer_pass(model, processor, items, images, batch_size: int = 64, hidden: bool = False):
    """(p_yes, states): the model's yes/no-renormalised probability of "yes" at the answer step
    of the plain answer prompt, and with ``hidden`` the (N, layers + 1, H) hidden states at the
    position that predicts the answer (after the tokens every Yes/No reply starts with)."""
    import torch

    from csp_utils.vlm import engine, prompts

    yn = engine.yes_no_tokens(processor)
    p_yes, states = [], []
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            msgs = [prompts.answer_messages(it.question) for it in items[s:s + batch_size]]
            p = engine.plain_prompts(model, processor, msgs, images[s:s + batch_size], shortcuts=True)
            ids, mask = p.input_ids, p.attention_mask
            if yn.prefix:
                tail = torch.tensor(yn.prefix, dtype=ids.dtype).expand(ids.shape[0], -1)
                ids, mask = torch.cat([ids, tail], 1), torch.cat([mask, torch.ones_like(tail, dtype=mask.dtype)], 1)
            o = model(input_ids=ids, attention_mask=mask, position_ids=engine.position_ids_from_mask(mask),
                      **p.image_inputs, output_hidden_states=hidden, use_cache=False, logits_to_keep=1)
            prob = torch.softmax(o.logits[:, -1].float(), -1)
            y, n = prob[:, yn.yes].sum(-1), prob[:, yn.no].sum(-1)
            p_yes.append((y / (y + n)).numpy())
            if hidden:
                states.append(torch.stack([h[:, -1] for h in o.hidden_states], 1).float().numpy())
    return np.concatenate(p_yes), (np.concatenate(states) if hidden else None)


def own_probability(p_yes: np.ndarray, answers) -> np.ndarray:
    """The probability of each row's own answer ("yes" or "no") from p(yes)."""
    yes = np.array([str(a).strip().lower() == "yes" for a in answers])
    return np.where(yes, p_yes, 1.0 - p_yes)


# ------------------------------------------------------------------------ noise regions
def asked_region(image_id: str, phrases, shape: tuple[int, int], vocabulary=None) -> np.ndarray:
    """The region CSP noises for "the asked object", never empty and the same rule whether or
    not the object is there: the scene's objects of the asked category; without one, the object
    sharing a word of the asked phrase (its colour), else the largest object; for an image that
    is no world scene, the central quarter of the image."""
    scene_id = scene_of(image_id)
    split, _, index = scene_id.partition("-")
    if split not in ("base", "csp", "eval") or not index.isdigit():
        mask = np.zeros(shape, dtype=bool)
        h, w = shape
        mask[h // 4: h - h // 4, w // 4: w - w // 4] = True
        return mask
    scene = _scene(split, int(index), shape[0])
    mask = grounded_rows.asked_mask(scene, phrases, vocabulary or _vocabulary())
    if not mask.any() and scene.objects:
        words = {w for p in phrases for w in str(p).lower().split()}
        near = [o for o in scene.objects if o.color in words] or scene.objects
        mask = max(near, key=lambda o: int(o.mask.sum())).mask.copy()
    if not mask.any():
        mask[:] = True
    return mask


@functools.lru_cache(maxsize=4096)
def _scene(split: str, index: int, size: int) -> world.Scene:
    return world.make_scene(split, index, world.WorldConfig(image_size=size))


@functools.lru_cache(maxsize=1)
def _vocabulary():
    # the world's whole vocabulary whatever the scene: an absent category is still read
    return grounders.AnnotationGrounder.from_scenes([_scene("eval", 0, 64)]).vocabulary


def noised(images, items, level: int = CONTRAST_LEVEL, seed: int = 0, where: str = "object") -> list:
    """Each image with CSP noise at ``level`` on its asked region (``where="object"``) or on the
    whole image (``"image"``); the noise of a question is seeded by its id."""
    from PIL import Image

    cfg = csp_noise.NoiseConfig(noise="local" if where == "object" else "global", seed=seed)
    out = []
    for img, it in zip(images, items):
        arr = np.asarray(img.convert("RGB"))
        mask = (asked_region(it.image_id, it.objects, arr.shape[:2]) if where == "object"
                else np.ones(arr.shape[:2], dtype=bool))
        out.append(Image.fromarray(csp_noise.perturb_levels_array(arr, mask, (level,), cfg, key=it.question_id)[0]))
    return out


# ------------------------------------------------------------------------------ fitting
def _standardise(x_fit: np.ndarray, x: np.ndarray) -> np.ndarray:
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    return (x - mu) / sd


def fit_predict(x_fit, y_fit, x, l2: float = 0.0) -> np.ndarray:
    """An L2 logistic regression of correctness on standardised features, fitted on
    (``x_fit``, ``y_fit``) and applied to ``x``."""
    x_fit, x = np.asarray(x_fit, float), np.asarray(x, float)
    ones = lambda a: np.column_stack([_standardise(x_fit, a), np.ones(len(a))])  # noqa: E731
    w = baselines.fit_logistic(ones(x_fit), y_fit, l2)
    return 1.0 / (1.0 + np.exp(-(ones(x) @ w)))


def choose_layer(states: np.ndarray, correct: np.ndarray, images, l2: float = PROBE_L2) -> tuple[int, list[float]]:
    """The layer whose probe ranks best on the calibration set: fitted on one half of its
    images and scored (AUROC) on the other, both ways, averaged; returns (layer, scores)."""
    codes, uniq = metrics.cluster_codes(images)
    half = (np.random.default_rng(0).permutation(len(uniq)) % 2)[codes].astype(bool)
    scores = []
    for layer in range(states.shape[1]):
        x = states[:, layer]
        s = [metrics.auroc(fit_predict(x[a], correct[a], x[~a], l2), correct[~a])
             if 0 < correct[a].sum() < a.sum() and 0 < correct[~a].sum() < (~a).sum() else np.nan
             for a in (half, ~half)]
        scores.append(float(np.nanmean(s)) if not np.all(np.isnan(s)) else -np.inf)
    return int(np.argmax(scores)), scores


# ---------------------------------------------------------------------------- the rows
def source_rows(model, processor, suite: dict, base_rows: list[dict], calibration_set: str = "calibration",
                skip_sets=("calibration", "train-sample"), sources=SOURCES, batch_size: int = 64,
                seed: int = 0) -> tuple[list[dict], dict]:
    """Rows of ``baseline:<source>`` for each source, on the base model's own answers
    (``base_rows``: its rows at one framing and read-out, one per question), fitted on the
    calibration set's rows and applied to every set but ``skip_sets``; and the cost of each
    source: seconds per question of its passes beside the plain answer pass's."""
    by_q = {(r["set"], r["question_id"]): r for r in base_rows}
    if calibration_set not in suite or not any(s == calibration_set for s, _ in by_q):
        raise ValueError(f"the confidence sources need the base model's rows on {calibration_set!r}")
    feats, costs, order = {}, {}, []
    for name, bench in suite.items():
        items = [it for it in bench.items if (name, it.question_id) in by_q]
        if not items or (name in skip_sets and name != calibration_set):
            continue
        images = [bench.image_loader(it.image_id).convert("RGB") for it in items]
        answers = [by_q[(name, it.question_id)]["answer"] for it in items]
        t = time.perf_counter()
        p_yes, states = answer_pass(model, processor, items, images, batch_size, hidden="probe" in sources)
        costs["answer"] = costs.get("answer", 0.0) + time.perf_counter() - t
        f = {"probe": states, "clean": own_probability(p_yes, answers)}
        if "contrast" in sources:
            t = time.perf_counter()
            for where in ("object", "image"):
                p_noised, _ = answer_pass(model, processor, items, noised(images, items, seed=seed, where=where),
                                          batch_size)
                f[where] = own_probability(p_noised, answers)
            costs["contrast"] = costs.get("contrast", 0.0) + time.perf_counter() - t
        feats[name] = f
        order += [by_q[(name, it.question_id)] for it in items]
    n = len(order)
    stack = lambda key: np.concatenate([feats[s][key] for s in feats])  # noqa: E731
    sets = np.array([r["set"] for r in order])
    correct = np.array([float(r["correct"]) for r in order])
    fit = sets == calibration_set
    confs, params = {}, {}
    per_q = costs["answer"] / n
    if "probe" in sources:
        states = stack("probe")
        layer, scores = choose_layer(states[fit], correct[fit], [r["image_id"] for r, f in zip(order, fit) if f])
        confs["probe"] = fit_predict(states[fit, layer], correct[fit], states[:, layer], PROBE_L2)
        params["probe"] = {"layer": layer, "layer_auroc": [round(s, 4) for s in scores], "l2": PROBE_L2,
                           "seconds_per_question": per_q, "answer_passes": 1}
    if "contrast" in sources:
        x = np.column_stack([baselines.answer_logit(stack(k)) for k in ("clean", "object", "image")])
        confs["contrast"] = fit_predict(x[fit], correct[fit], x)
        params["contrast"] = {"level": CONTRAST_LEVEL, "features": ["clean", "noise on the asked object",
                                                                    "noise on the whole image"],
                              "seconds_per_question": per_q + costs["contrast"] / n, "answer_passes": 3}
    cost = {"answer_seconds_per_question": per_q} | {k: v["seconds_per_question"] for k, v in params.items()}
    out = []
    for name in confs:
        param = json.dumps({"fitted_on": calibration_set, "n_fit": int(fit.sum())} | params[name])
        out += [{**r, "model": f"baseline:{name}", "framing": "-", "readout": "-", "confidence": float(c),
                 "raw_confidence": None, "baseline_param": param}
                for r, c in zip(order, confs[name]) if r["set"] not in skip_sets]
    return out, cost


def base_source_rows(base_model: str, suite: dict, rows: list[dict], base: str = "base", framing: str = "third",
                     readout: str = "single_pass", sources=SOURCES, load_kwargs: dict | None = None,
                     **kw) -> tuple[list[dict], dict]:
    """:func:`source_rows` for the notebooks: the base model loaded as the evaluation loads it,
    its own rows at (``framing``, ``readout``) as the answers."""
    from csp_utils.evaluate import matrix
    from csp_utils.vlm import models

    own = [r for r in rows if r["model"] == base and r["framing"] == framing and r["readout"] == readout]
    model, processor = models.load_vlm(base_model, **matrix.model_kwargs(load_kwargs))
    model.eval()
    return source_rows(model, processor, suite, own, sources=sources, **kw)


def cached_source_rows(folder, base_model: str, suite: dict, rows: list[dict], sources=SOURCES,
                       **kw) -> tuple[list[dict], dict]:
    """:func:`base_source_rows`, kept in ``folder`` (``rows.jsonl``, then ``cost.json``) and read
    back where the folder holds them for the same sources and sets: the stage that evaluates the
    base model computes them, a later one over the same rows (a split evaluation's tables) reads them."""
    folder = Path(folder)
    rows_path, cost_path = folder / "rows.jsonl", folder / "cost.json"
    made_for = {"sources": list(sources), "sets": sorted(suite)}
    if cost_path.exists() and rows_path.exists():
        saved = json.loads(cost_path.read_text())
        if saved.get("made_for") == made_for:
            with open(rows_path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()], saved["cost"]
    out, cost = base_source_rows(base_model, suite, rows, sources=sources, **kw)
    folder.mkdir(parents=True, exist_ok=True)
    cost_path.unlink(missing_ok=True)   # written last: its presence says the rows are whole
    tmp = rows_path.with_name(rows_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in out), encoding="utf-8")
    os.replace(tmp, rows_path)
    cost_path.write_text(json.dumps({"made_for": made_for, "cost": cost}, indent=2))
    return out, cost
