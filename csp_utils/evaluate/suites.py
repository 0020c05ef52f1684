"""The benchmark suite: every evaluation set and where its images come from.

Every evaluation set draws its scenes from its own index range of the eval split, so no
image is in two sets (POPE random / popular / adversarial, the AMBER kinds, each transfer
set, the held-out calibration split that fits the temperature baseline, the perturbed set);
:func:`check_disjoint` proves it for a built suite. The base model's own training split
("base") only serves the constant baselines' training accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csp_utils.dataset import grounded_rows
from csp_utils.dataset import grounders, csp_noise
from csp_utils.world import benchmarks, scenes as world, catalog, degradations, language
from csp_utils.world.schema import (CLEAN_SETS, FIT_SETS, GROUNDED_SET, POOLS, QAItem,  # noqa: F401 (the suite's names)
                                    level_of, scene_of)


# first index of each set's eval-split range; make_scenes takes consecutive indices, pope_scenes
# skips scenes with < 3 categories (about 4 of 5), so a range of 30,000 holds > 5,000 POPE images
_STARTS = {"pope-random": 0, "pope-popular": 30_000, "pope-adversarial": 60_000,
           "amber-existence": 100_000, "amber-attribute": 130_000, "amber-relation": 160_000,
           "calibration": 400_000, "perturbed": 500_000}
_TRANSFER_START, _TRANSFER_STRIDE = 200_000, 20_000


@dataclass
class SuiteConfig:
    n_pope_images: int = 300          # per POPE set, 6 questions each, as POPE
    n_amber_images: int = 450         # per AMBER kind (relation keeps about 2 in 3 after balancing)
    n_transfer_images: int = 150      # per transfer kind
    n_calibration_images: int = 100   # held-out split for the temperature baseline
    n_train_images: int = 100         # base-split scenes for the constant baseline
    n_perturbed_images: int = 40      # held-out CSP-perturbed scenes (confidence vs level)
    transfer_kinds: tuple = catalog.DEGRADATIONS
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


def _evaluation(**parts) -> dict:
    return {"05_evaluate": parts, "06_ablations": parts}


# Study sizes by name. A params file's top-level ``sizes: NAME`` puts them under every stage of the
# notebooks they name (a stage's own values win), so each size is written here once.
SIZES = {
    # the embedded studies (params/default.yaml, full.yaml): the suite's defaults, a grounded set beside them
    "study": {"00_world_and_benchmarks": {"n_pope_images": 100},
              **_evaluation(suite={"n_grounded_images": 60}, scoring={"batch_size": 32})},
    # the chain in minutes (params/smoke.yaml, paper_smoke.yaml): every set at its smallest
    "smoke": {"00_world_and_benchmarks": {"n_scenes": 4, "n_pope_images": 10, "n_synthetic": 200},
              **_evaluation(suite={"n_pope_images": 2, "n_amber_images": 2, "n_transfer_images": 1,
                                   "n_calibration_images": 2, "n_train_images": 2, "n_perturbed_images": 1,
                                   "transfer_kinds": ["blur"], "perturbed_levels": [0, 100]},
                            scoring={"batch_size": 8}, boot={"n_boot": 20})},
    # params/paper.yaml: the world sets, a controlled check beside the official files
    "paper": _evaluation(suite={"n_pope_images": 500, "n_amber_images": 500}),
}


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
    start = _TRANSFER_START + _TRANSFER_STRIDE * catalog.DEGRADATIONS.index(kind)
    clean = benchmarks.pope_scenes(cfg.n_transfer_images, wc, split="eval", start=start)
    degraded = [degradations.degrade(s, kind, cfg.transfer_severity, wc) for s in clean]
    return _with_set(benchmarks.build_world_pope(degraded, "random", seed=cfg.seed), f"transfer-{kind}")


def perturbed_benchmark(cfg: SuiteConfig, noise: str = "local") -> benchmarks.Benchmark:
    """Held-out eval scenes with CSP noise on the asked object at each level.

    Only "yes" questions (the object is there to be noised); the level is the suffix of the
    question id (``...@c40``). Used for "confidence vs noise level" and its Spearman.
    """
    wc = _world_config(cfg)
    scene_list = benchmarks.pope_scenes(cfg.n_perturbed_images, wc, split="eval", start=_STARTS["perturbed"])
    base = benchmarks.build_world_pope(scene_list, "random", n_pos=2, n_neg=0, seed=cfg.seed)
    grounder = grounders.AnnotationGrounder.from_scenes(scene_list)
    by_id = {s.scene_id: s for s in scene_list}
    noise_cfg = csp_noise.NoiseConfig(noise=noise, seed=cfg.seed,
                                         **({"noise_gamma": cfg.noise_gamma} if cfg.noise_gamma else {}))
    images, items = {}, []
    for it in base.items:
        res = grounder.ground(by_id[it.image_id].to_pil(), it.objects, it.image_id)
        if res.mask is None:
            continue
        arrs = csp_noise.perturb_levels_array(by_id[it.image_id].image, res.mask, cfg.perturbed_levels,
                                                 noise_cfg, key=it.question_id)
        for level, arr in zip(cfg.perturbed_levels, arrs):
            qid = f"{it.question_id}@c{level}"
            images[qid] = arr
            items.append(QAItem(qid, qid, it.question, it.label, "perturbed", it.kind, list(it.objects)))
    from PIL import Image

    return benchmarks.Benchmark("perturbed", "pope", items, lambda i: Image.fromarray(images[i]), "yes")


def perturbation_examples(levels=(100, 70, 40, 10), n_scenes: int = 3, seed: int = 0) -> tuple[list, list[str]]:
    """CSP noise on the first object of a few held-out scenes at each level (deterministic, no
    model): the images and their titles, for the perturbation figure."""
    scene_list = benchmarks.pope_scenes(n_scenes, split="eval", start=900_000)
    grounder = grounders.AnnotationGrounder.from_scenes(scene_list)
    images, titles = [], []
    for s in scene_list:
        obj = s.objects[0]
        res = grounder.ground(s.to_pil(), [obj.category], s.scene_id)
        arrs = csp_noise.perturb_levels_array(s.image, res.mask, levels,
                                                 csp_noise.NoiseConfig(seed=seed), key=s.scene_id)
        for level, arr in zip(levels, arrs):
            images.append(arr)
            titles.append(f"{obj.category}, c={level}%")
    return images, titles


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
        items = [q for s in train for q in language.world_questions(s, rng, 4, set_name="train-sample")]
        suite["train-sample"] = benchmarks.Benchmark("train-sample", "pope", items,
                                                     benchmarks.scene_image_loader(train), "yes")
    if want("perturbed"):
        suite["perturbed"] = perturbed_benchmark(cfg)
    if want(GROUNDED_SET) and cfg.n_grounded_images:
        suite[GROUNDED_SET] = grounded_rows.grounded_perturbed_benchmark(
            cfg.n_grounded_images, cfg.grounded_levels, seed=cfg.seed, noise_gamma=cfg.noise_gamma,
            image_size=cfg.image_size, name=GROUNDED_SET)
    check_disjoint(suite)
    return suite


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
