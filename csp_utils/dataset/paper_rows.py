"""The perturbed dataset: (image, question, answer) triples -> CSP training rows, resumably.

For every source sample we find its key objects, ground them once (one pass serves every
confidence level), noise the mask at each level with one shared eps (``perturbation``) and
emit one row per level whose target is the verbalized confidence ``"c%"``.

The rows are written through the resumable sharded store (:mod:`csp_utils.dataset.store`),
a shard per ``shard_size`` source samples. Since each sample's noise depends only on (seed,
sample id), a resumed build gives the same dataset as an uninterrupted one (``dataset_sha256``).

Rows (DESIGN.md, refined): ``sample_id`` ("<source_id>@<ccc>", unique per row), ``source_id``
(the source sample), ``image_id``, ``image`` (HF Image), ``question``, ``answer``,
``key_objects``, ``confidence`` (int percent), ``target_text`` ("c%"), ``confidence_prompt``,
``framing``, ``t``, ``noise_gamma``, ``t_max``, ``schedule``, ``noise`` ("local" | "global" |
"none" for a sample kept clean), ``mask_area`` (fraction of the image in the noised region,
the same at every level of a sample; 0 when kept clean), ``grounder``, ``grounding_status``.

Negatives ("No" answers: their key objects are absent, nothing to perturb) are dropped by
default and counted. A grounding failure (statuses "no_detection", "empty_mask",
"no_objects") follows ``failure_policy``: "skip" drops the sample, "global" noises the whole
image at every level, "clean" keeps one unperturbed row at 100% (the only confidence an
unperturbed image supports). Each case is counted in the report, never silent.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from csp_utils.core.images import png_cell
from csp_utils.dataset import csp_noise
from csp_utils.dataset.buildconfig import BuildConfig, config_hash, grounder_fingerprint
from csp_utils.dataset.grounded_rows import build_grounded_dataset
from csp_utils.dataset.grounders import make_grounder
from csp_utils.dataset.keyobjects import key_objects
from csp_utils.dataset.sources import SourceItem, as_source_item
from csp_utils.dataset.store import Build, Chunk, build_sharded, chunked, load_merged
from csp_utils.vlm.prompts import confidence_text, format_confidence

# ---------------------------------------------------------------------------------------
# Rows


def _features():
    from datasets import Features, Image as HFImage, Sequence, Value

    return Features({
        "sample_id": Value("string"), "source_id": Value("string"), "image_id": Value("string"),
        "image": HFImage(), "question": Value("string"), "answer": Value("string"),
        "key_objects": Sequence(Value("string")), "confidence": Value("int32"), "target_text": Value("string"),
        "confidence_prompt": Value("string"), "framing": Value("string"), "t": Value("int32"),
        "noise_gamma": Value("float64"), "t_max": Value("int32"), "schedule": Value("string"),
        "noise": Value("string"), "mask_area": Value("float64"), "grounder": Value("string"),
        "grounding_status": Value("string"),
    })


def is_negative(answer: str) -> bool:
    """A "No" answer (its key objects are absent from the image)."""
    return answer.strip().strip(".!").strip().lower() == "no"


def _key_objects(item: SourceItem, vocabulary) -> list[str]:
    if item.objects is not None:
        return [str(o) for o in item.objects]
    return list(key_objects(item.question, item.answer, vocabulary=vocabulary))


def _ground(grounder, image: Image.Image, phrases: list[str], image_id) -> tuple[np.ndarray | None, str]:
    """(mask or None, status). An "ok" with a missing or empty mask is counted as "empty_mask"."""
    if not phrases:
        return None, "no_objects"
    result = grounder.ground(image, phrases, image_id=image_id)
    status, mask = result.status, result.mask
    if status == "ok":
        if mask is None or not np.asarray(mask).any():
            return None, "empty_mask"
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"grounder {getattr(grounder, 'name', grounder)!r} returned a mask of shape "
                             f"{mask.shape} for an image of (H, W) = {(image.height, image.width)}")
        return mask, "ok"
    return None, status


def sample_rows(item: SourceItem, grounder, config: BuildConfig, stats: Counter, vocabulary=None) -> list[dict]:
    """The rows of one source sample (none if it is dropped); counts what happened in ``stats``."""
    noise_cfg = config.effective_noise()
    grounder_name = str(getattr(grounder, "name", type(grounder).__name__))
    stats["source_samples"] += 1
    if is_negative(item.answer) and not config.include_negatives:
        stats["negatives_dropped"] += 1
        return []
    image = item.load_image()
    phrases = _key_objects(item, vocabulary)
    mask, status = _ground(grounder, image, phrases, item.image_id)  # one pass serves every level
    stats[f"grounding/{status}"] += 1

    levels, noise_kind = noise_cfg.levels, noise_cfg.noise
    if status != "ok":
        stats[f"failure_policy/{config.failure_policy}"] += 1
        if config.failure_policy == "skip":
            stats["skipped_samples"] += 1
            return []
        if config.failure_policy == "global":
            noise_kind = "global"
        else:  # "clean": an unperturbed image honestly supports only 100%
            levels, noise_kind = (100,), "none"
    stats["kept_samples"] += 1

    arr = np.asarray(image)
    if noise_kind == "none":
        images, area = arr[None], 0.0
    else:
        run_cfg = replace(noise_cfg, noise=noise_kind)
        images = csp_noise.perturb_levels_array(arr, mask, levels, run_cfg, key=item.sample_id)
        area = 1.0 if noise_kind == "global" else float(mask.mean())
    stats[f"noise/{noise_kind}"] += 1
    if mask is not None:
        stats["mask_area_sum"] += float(mask.mean())  # grounded area, for the report's mean

    rows = []
    for c, img in zip(levels, images):
        t = csp_noise.level_to_step(c, noise_cfg) if noise_kind != "none" else 0
        rows.append({
            "sample_id": f"{item.sample_id}@{c:03d}", "source_id": item.sample_id,
            "image_id": str(item.image_id if item.image_id is not None else item.sample_id),
            "image": png_cell(img, config.png_compress_level), "question": item.question, "answer": item.answer,
            "key_objects": phrases, "confidence": c, "target_text": format_confidence(c),
            "confidence_prompt": confidence_text(item.question, item.answer, framing=config.framing),
            "framing": config.framing, "t": t, "noise_gamma": float(noise_cfg.noise_gamma),
            "t_max": int(noise_cfg.t_max), "schedule": noise_cfg.schedule, "noise": noise_kind,
            "mask_area": area, "grounder": grounder_name, "grounding_status": status,
        })
        stats[f"level/{c}"] += 1
    stats["rows"] += len(rows)
    return rows


# ---------------------------------------------------------------------------------------
# The build


def build_perturbed_dataset(source: Iterable, grounder=None, out_dir="perturbed", config: BuildConfig | None = None,
                            vocabulary=None, progress: bool = True, model=None, processor=None):
    """Build (or resume, or just load) the perturbed dataset in ``out_dir``; returns the merged Dataset.

    ``source`` yields SourceItem or (sample_id, image, question, answer[, image_id]) tuples in a
    fixed order (resume skips the samples of finished shards and checks their ids); a shard
    holds ``config.shard_size`` source samples (:mod:`csp_utils.dataset.store`).
    ``grounder`` has ``.name`` and ``.ground(image, phrases, image_id=None)``; None builds
    ``grounders.make_grounder(config.grounder, scenes=source.scenes)``. ``vocabulary`` goes to
    key-object extraction for items that do not carry their key objects. A ``noise="global"``
    build (the ablation) still grounds every sample, so that the failure policy keeps the same
    samples as the local build it is compared with.

    ``config.targets == "grounded"`` builds grounded rows instead (``grounded_rows.build_grounded_dataset``):
    it needs a ``world_source`` and the base ``model`` / ``processor`` whose answers it records.
    """
    config = config or BuildConfig()
    if config.targets == "grounded":
        return _build_grounded(source, grounder, out_dir, config, progress, model, processor)
    if grounder is None:
        grounder = make_grounder(config.grounder, scenes=getattr(source, "scenes", None))
    grounder_name = grounder_fingerprint(grounder)
    chash = config_hash(config, grounder_name)
    try:
        total = len(source)  # type: ignore[arg-type]
    except TypeError:
        total = None

    def chunks():
        seen: set[str] = set()  # sample ids seed the noise and name the rows: they must be unique
        for group in chunked(map(as_source_item, source), config.shard_size, lambda item: item.sample_id):
            for item in group:
                if item.sample_id in seen:
                    raise ValueError(f"duplicate sample id {item.sample_id!r} in the source: ids must be unique "
                                     "(they seed each sample's noise and name its rows)")
                seen.add(item.sample_id)
            yield Chunk([item.sample_id for item in group],
                        lambda stats, group=group: [row for item in group
                                                    for row in sample_rows(item, grounder, config, stats, vocabulary)])

    def report(result, shard_stats):
        out = build_report(shard_stats, config, grounder_name, chash, getattr(source, "name", type(source).__name__))
        if len(result) == 0:
            warnings.warn(f"the perturbed dataset in {out_dir} has no rows: {out['source_samples']} source samples, "
                          f"{out['negatives_dropped']} negatives dropped, grounding failures "
                          f"{out['grounding_failures']} under policy {config.failure_policy!r}")
        return out

    return build_sharded(Build(
        out_dir=Path(out_dir), label="perturbed dataset", config_hash=chash, config=config.to_dict(),
        grounder=grounder_name, chunks=chunks, features=_features(), finalise=lambda merged: merged,
        report=report, empty_features=_features, total=total, one_shot=iter(source) is source, progress=progress))


def _build_grounded(source, grounder, out_dir, config: BuildConfig, progress: bool, model, processor):
    if getattr(source, "scenes", None) is None or not hasattr(source, "questions_per_scene"):
        raise ValueError("targets='grounded' needs a world_source(...) (scenes with exact object masks)")
    if model is None or processor is None:
        raise ValueError("targets='grounded' records the base model's own answers: pass model= and processor=")
    if grounder is not None or config.grounder != "annotations":
        raise ValueError("targets='grounded' grounds with the scenes' own annotations; pass no grounder")
    return build_grounded_dataset(source.scenes, model, processor, out_dir, config,
                                  questions_per_scene=source.questions_per_scene,
                                  question_seed=source.question_seed, progress=progress)


def build_report(shard_stats: list[dict], config: BuildConfig, grounder_name: str, chash: str, source_name: str) -> dict:
    total = Counter()
    for st in shard_stats:
        total.update(st["counts"])

    def group(prefix):
        return {k[len(prefix):]: v for k, v in sorted(total.items()) if k.startswith(prefix)}

    levels = config.effective_noise().levels
    per_level = {str(c): total.get(f"level/{c}", 0) for c in sorted(set(levels) | {int(k) for k in group("level/")})}
    grounding = group("grounding/")
    return {
        "source": source_name,
        "grounder": grounder_name,
        "config_hash": chash,
        "config": config.to_dict(),
        "source_samples": total["source_samples"],
        "negatives_dropped": total["negatives_dropped"],
        "grounded_samples": sum(grounding.values()),
        "grounding_status": grounding,
        "grounding_failures": {k: v for k, v in grounding.items() if k != "ok"},
        "failure_policy": config.failure_policy,
        "failures_by_policy": group("failure_policy/"),
        "kept_samples": total["kept_samples"],
        "mean_mask_area": round(total["mask_area_sum"] / grounding["ok"], 5) if grounding.get("ok") else None,
        "skipped_samples": total["skipped_samples"],
        "noise_kinds": group("noise/"),
        "rows": total["rows"],
        "rows_per_level": per_level,
        "shards": len(shard_stats),
        "time_s": {"shards_total": round(sum(st["seconds"] for st in shard_stats), 3)},
    }


def load_perturbed_dataset(out_dir):
    """The merged dataset of a finished build, its files checked against their recorded digests."""
    return load_merged(out_dir, _features)
