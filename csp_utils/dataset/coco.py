"""COCO-style training data for the perturbed dataset: POPE's protocol on *training* images.

``coco_source(instances, image_folder)`` reads an instances annotation file in the layout of
COCO's ``instances_train2014.json`` (``images``, ``annotations`` with polygon / RLE
``segmentation``, ``categories``) and asks, per image, about ``n_present`` categories that are
annotated in it ("Yes") and ``n_absent`` that are not ("No"), as POPE does on val2014:

- *random*: absent categories drawn uniformly;
- *popular*: the absent categories that appear in the most images of the file;
- *adversarial*: the absent categories that co-occur most often with the image's own.

Images with fewer than ``n_present`` annotated categories are left out (POPE keeps images
with at least three objects) and counted in ``source.report``. The key object of each
question is its category; the oracle masks come from ``annotation_grounder`` (the same
annotations), the detector path from ``grounders.DinoSamGrounder``.

POPE evaluates on val2014 images, so training on any of them would leak the test set: the
source refuses an instances file that holds an image of the evaluation list
(``eval_images``: POPE question files, a folder of them, or file names / numeric ids).

Images are resized to the model's own input size (``processor_image_size``) before the
noise: a 640x480 photo noised at full size and then shrunk by the processor to 336 px would
have its per-pixel noise averaged away (about half the standard deviation at a 2x shrink),
so the model would see a weaker perturbation than the target confidence says.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from csp_utils.core.paths import DATA
from csp_utils.dataset import sources
from csp_utils.dataset.grounders import AnnotationGrounder, GroundingResult, _finish
from csp_utils.dataset.sources import Source, SourceItem
from csp_utils.world import scenes
from csp_utils.world.benchmarks import POPE_KINDS, read_json_rows

VENDORED_POPE = DATA / "benchmarks" / "pope"
_NUMBER = re.compile(r"(\d+)(?:\.[A-Za-z]+)?$")


# ---------------------------------------------------------------------------------------
# Instances and the evaluation images


def load_instances(instances) -> dict:
    """An instances dict from a path (or the dict itself), checked for COCO's three lists."""
    if isinstance(instances, (str, os.PathLike)):
        path = Path(instances)
        if not path.is_file():
            raise FileNotFoundError(f"COCO instances file {path} not found; give e.g. "
                                    "annotations/instances_train2014.json")
        instances = json.loads(path.read_text())
    if not isinstance(instances, dict):
        raise TypeError(f"COCO instances must be a path or a dict, got {type(instances).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(instances.get(key), list):
            raise ValueError(f"COCO instances need an {key!r} list; got keys {sorted(instances)}")
    return instances


def coco_number(name) -> int | None:
    """The COCO image id in a file name or id ("COCO_val2014_000000310196.jpg" -> 310196).
    COCO 2014 ids are unique across train and val, so equal numbers mean the same photo."""
    if isinstance(name, (int, np.integer)):
        return int(name)
    m = _NUMBER.search(Path(str(name)).name)
    return int(m.group(1)) if m else None


def pope_eval_images(path) -> set[str]:
    """Image file names of POPE question files: one file, or every ``*.json*`` of a folder."""
    path = Path(path)
    files = sorted(path.glob("*.json*")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no POPE question files at {path}")
    names = set()
    for f in files:
        for i, row in enumerate(read_json_rows(f.read_text(encoding="utf-8"), str(f))):
            image = row.get("image", row.get("image_source"))
            if image is None:
                raise ValueError(f"{f}, question {i}: no 'image' field; is this a POPE question file?")
            names.add(str(image))
    return names


def _eval_keys(eval_images) -> tuple[set[str], set[int]] | None:
    """(file names, numeric ids) to refuse, or None when no list is at hand."""
    if eval_images is None:
        if not VENDORED_POPE.is_dir():
            return None
        eval_images = VENDORED_POPE
    if isinstance(eval_images, (str, os.PathLike)):
        eval_images = pope_eval_images(eval_images)
    names = {Path(str(n)).name for n in eval_images}
    numbers = {n for n in (coco_number(x) for x in eval_images) if n is not None}
    return names, numbers


def check_no_eval_overlap(instances: dict, eval_images=None) -> None:
    """Raise when the instances file holds an image that the evaluation uses.

    ``eval_images``: POPE question file(s) (a path), or file names / numeric ids; None takes
    the POPE files vendored in the package when present, else refuses val2014 file names
    (POPE's images are all val2014)."""
    keys = _eval_keys(eval_images)
    if keys is None:
        bad = [im["file_name"] for im in instances["images"] if "val2014" in str(im["file_name"])]
        hint = "no POPE question files were given (eval_images=) and none are vendored, so val2014 images are refused"
    else:
        names, numbers = keys
        bad = [im["file_name"] for im in instances["images"]
               if Path(str(im["file_name"])).name in names or int(im["id"]) in numbers]
        hint = "these are POPE's evaluation images"
    if bad:
        raise ValueError(
            f"the COCO training source holds {len(bad)} image(s) that POPE evaluates on (e.g. {bad[:3]}): {hint}. "
            "Train on instances_train2014.json with the train2014 images, or remove these images from the file.")


# ---------------------------------------------------------------------------------------
# POPE's protocol


def _image_categories(instances: dict) -> tuple[dict[int, list[str]], list[str]]:
    """Per image id: its annotated category names in first-annotation order; all names in id order."""
    names = {c["id"]: str(c["name"]).lower() for c in instances["categories"]}
    image_ids = {im["id"] for im in instances["images"]}
    per_image: dict[int, list[str]] = {i: [] for i in image_ids}
    for ann in instances["annotations"]:
        if ann["image_id"] not in per_image:
            raise ValueError(f"annotation {ann.get('id')} refers to image_id {ann['image_id']} that is not in 'images'")
        if ann["category_id"] not in names:
            raise ValueError(f"annotation {ann.get('id')} has category_id {ann['category_id']} that is not in 'categories'")
        cat = names[ann["category_id"]]
        if cat not in per_image[ann["image_id"]]:
            per_image[ann["image_id"]].append(cat)
    return per_image, [names[k] for k in sorted(names)]


def pope_questions(instances, kind: str = "random", n_present: int = 3, n_absent: int = 3,
                   n_images: int | None = None, seed: int = 0) -> tuple[list[dict], dict]:
    """POPE-style questions on the images of ``instances``: (rows, report).

    Rows: {"question_id", "image_id", "file_name", "question", "answer", "object"}, per image
    present / absent interleaved as in the official files. Positives depend only on ``seed``
    and the image, so the three kinds share them, as the official files do.
    """
    if kind not in POPE_KINDS:
        raise ValueError(f"POPE kind must be one of {POPE_KINDS}, got {kind!r}")
    if n_present < 1 or n_absent < 0:
        raise ValueError(f"n_present must be >= 1 and n_absent >= 0, got {n_present}, {n_absent}")
    instances = load_instances(instances)
    per_image, categories = _image_categories(instances)
    freq = Counter(c for cats in per_image.values() for c in cats)
    popular = sorted(categories, key=lambda c: (-freq[c], categories.index(c)))
    co = Counter((a, b) for cats in per_image.values() for a in cats for b in cats if a != b)

    images = sorted(instances["images"], key=lambda im: im["id"])
    order = np.random.default_rng(seed).permutation(len(images))
    rows, used, too_few = [], 0, 0
    for idx in order:
        if n_images is not None and used >= n_images:
            break
        im = images[idx]
        present = per_image[im["id"]]
        absent = [c for c in categories if c not in present]
        if len(present) < n_present or len(absent) < n_absent:
            too_few += 1
            continue
        rng = np.random.default_rng([seed, int(im["id"])])
        pos = [present[i] for i in sorted(rng.choice(len(present), n_present, replace=False))]
        if kind == "random":
            neg = [absent[i] for i in sorted(np.random.default_rng([seed, int(im["id"]), 1]).choice(
                len(absent), n_absent, replace=False))]
        elif kind == "popular":
            neg = [c for c in popular if c in absent][:n_absent]
        else:
            score = Counter({c: sum(co[(p, c)] for p in present) for c in absent})
            neg = sorted(absent, key=lambda c: (-score[c], -freq[c], categories.index(c)))[:n_absent]
        pairs = []
        for k in range(max(len(pos), len(neg))):
            pairs += [(c, "Yes") for c in pos[k:k + 1]] + [(c, "No") for c in neg[k:k + 1]]
        for j, (obj, answer) in enumerate(pairs):
            article = "an" if obj[:1] in "aeiou" else "a"
            rows.append({"question_id": f"coco{im['id']}-{kind}-{j}", "image_id": int(im["id"]),
                         "file_name": str(im["file_name"]), "question": f"Is there {article} {obj} in the image?",
                         "answer": answer, "object": obj})
        used += 1
    report = {"kind": kind, "images_in_file": len(images), "images_used": used,
              "images_with_too_few_categories": too_few, "questions": len(rows),
              "yes": sum(r["answer"] == "Yes" for r in rows), "no": sum(r["answer"] == "No" for r in rows)}
    return rows, report


# ---------------------------------------------------------------------------------------
# Image size from the model's processor


def processor_image_size(base_model) -> int | None:
    """The shortest edge the model's image processor resizes to (336 for LLaVA-1.5), or None for
    the embedded default (its world images are already at the model's size)."""
    if base_model is None or str(base_model) == "embedded":
        return None
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(base_model))
    return image_processor_size(getattr(proc, "image_processor", proc))


def image_processor_size(image_processor) -> int:
    """Shortest-edge target of an image processor: ``size.shortest_edge``, else the smaller of
    ``size`` height / width, else of ``crop_size``."""
    for attr in ("size", "crop_size"):
        size = getattr(image_processor, attr, None)
        size = dict(size) if size is not None else {}
        if size.get("shortest_edge"):
            return int(size["shortest_edge"])
        if size.get("height") and size.get("width"):
            return int(min(size["height"], size["width"]))
    raise ValueError(f"cannot read an input size from {type(image_processor).__name__} "
                     "(no size.shortest_edge, size.height/width or crop_size); pass image_size=")


def resize_shortest_edge(image: Image.Image, size: int | None) -> Image.Image:
    """Resize so the shorter side is ``size`` (aspect kept, bicubic, as CLIP's processor does);
    None leaves the image as it is."""
    if size is None:
        return image
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # transformers' rounding (get_resize_output_image_size)
    new = (size, new_long) if w <= h else (new_long, size)
    return image if new == (w, h) else image.resize(new, Image.BICUBIC)


# ---------------------------------------------------------------------------------------
# The source and its oracle grounder


class ResizedAnnotationGrounder:
    """Annotation masks made at the annotated size, then resized (nearest) to the image given,
    so that the oracle works on images resized for the model."""

    def __init__(self, inner: AnnotationGrounder):
        self.inner, self.name = inner, inner.name

    def ground(self, image, phrases, image_id=None) -> GroundingResult:
        r = self.inner.ground(None, phrases, image_id=image_id)
        if r.mask is None or image is None or r.mask.shape == (image.height, image.width):
            return r
        h0, w0 = r.mask.shape
        mask = np.asarray(Image.fromarray(r.mask).resize((image.width, image.height), Image.NEAREST))
        sx, sy = image.width / w0, image.height / h0
        boxes = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in r.boxes]
        return _finish(mask, boxes, r.scores, r.labels, self.name)


def annotation_grounder(instances, name: str = "annotations") -> ResizedAnnotationGrounder:
    """The oracle: masks decoded from the instances' polygons / RLE (no pycocotools needed)."""
    return ResizedAnnotationGrounder(AnnotationGrounder.from_coco(load_instances(instances), name=name))


def coco_source(instances, image_folder, kind: str = "random", n_present: int = 3, n_absent: int = 3,
                n_images: int | None = None, seed: int = 0, eval_images=None,
                image_size: int | None = None) -> Source:
    """POPE-protocol questions on COCO-style training images (see the module docstring).

    ``image_size``: shortest edge the images are resized to before grounding and noise (the
    model's, :func:`processor_image_size`); None keeps them as stored. Every image used must
    exist in ``image_folder`` (checked here, before any work). ``source.report`` counts the
    images used and those left out.
    """
    instances = load_instances(instances)
    check_no_eval_overlap(instances, eval_images)
    folder = Path(image_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"COCO image folder {folder} not found")
    rows, report = pope_questions(instances, kind, n_present, n_absent, n_images, seed)
    missing = sorted({r["file_name"] for r in rows if not (folder / r["file_name"]).is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of the instances file are not in {folder} "
                                f"(e.g. {missing[:3]}); give the folder of these images (e.g. train2014/)")

    def load(path):
        return resize_shortest_edge(Image.open(path).convert("RGB"), image_size)

    def items():
        for r in rows:
            yield SourceItem(sample_id=r["question_id"], image=lambda p=folder / r["file_name"]: load(p),
                             question=r["question"], answer=r["answer"], image_id=r["file_name"],
                             objects=[r["object"]])

    source = Source(items, len(rows), f"coco-pope-{kind}({report['images_used']} images x "
                                      f"{n_present}+{n_absent}, size {image_size or 'as stored'})")
    source.report = report
    return source


__all__ = ["POPE_KINDS", "make_source", "record_source", "resize_source", "grounder_spec", "load_instances", "coco_number", "pope_eval_images", "check_no_eval_overlap",
           "pope_questions", "processor_image_size", "image_processor_size", "resize_shortest_edge",
           "ResizedAnnotationGrounder", "annotation_grounder", "coco_source"]


# ---------------------------------------------------------------------------------------
# Notebook 02's sources by parameters


def resize_source(source: Source, size: int | None) -> Source:
    """The same source with every image resized to ``size`` (shortest edge) when it is loaded."""
    if size is None:
        return source

    def items():
        for item in source:
            yield SourceItem(item.sample_id, lambda it=item: resize_shortest_edge(it.load_image(), size),
                             item.question, item.answer, item.image_id, item.objects)

    out = Source(items, len(source), f"{source.name} at {size} px", scenes=source.scenes)
    out.report = getattr(source, "report", None)
    return out


def grounder_spec(grounder, detector=None, segmenter=None):
    """A dino_sam grounder spec with the checkpoints filled in from ``detector`` / ``segmenter``
    (study-wide parameters, so that ``--set detector=...`` reaches them); other specs as given."""
    is_dino = grounder == "dino_sam" or (isinstance(grounder, dict) and (
        grounder.get("kind") == "dino_sam" or "detector" in grounder or "segmenter" in grounder))
    if not is_dino:
        return grounder
    spec = {} if isinstance(grounder, str) else {k: v for k, v in grounder.items() if k != "kind"}
    if detector is not None:
        spec["detector"] = detector
    if segmenter is not None:
        spec["segmenter"] = segmenter
    if "detector" not in spec:
        raise ValueError("a dino_sam grounder needs a detector: set the 'detector' parameter (hub id or folder)")
    return spec


def make_source(source: str = "world", *, base_model="embedded", seed: int = 0, image_size="auto", n_scenes: int = 200,
                questions_per_scene: int = 4, coco_instances=None, coco_train_images=None, pope_kind: str = "random",
                n_images: int | None = None, eval_images=None, jsonl=None, jsonl_images=None, hf_dataset=None,
                hf_columns: dict | None = None, on_error: str = "raise", grounder="annotations"):
    """(source, grounder or None, image size) for notebook 02's parameters.

    ``source``: "world" (the object world's CSP split), "coco" (``coco_instances`` +
    ``coco_train_images``), "jsonl" (``jsonl`` + ``jsonl_images``) or "hf" (``hf_dataset``: a
    Hugging Face dataset saved with ``save_to_disk``; ``hf_columns``: ``sources.hf_source``'s
    column keywords). ``image_size="auto"``
    takes the base model's input size for photographs (None for the world, whose images are
    made at the model's size). The grounder is None when the builder's default fits (the world's
    annotations, or a detector spec); the COCO oracle when ``grounder="annotations"``.
    """
    if source not in ("world", "coco", "jsonl", "hf"):
        raise ValueError(f"source must be 'world', 'coco', 'jsonl' or 'hf', got {source!r}")
    if source == "world":
        size = None if image_size == "auto" else image_size
        src = sources.world_source(scenes.make_scenes("csp", n_scenes), questions_per_scene=questions_per_scene, seed=seed)
        return resize_source(src, size), None, size
    size = processor_image_size(base_model) if image_size == "auto" else image_size
    if source == "coco":
        if coco_instances is None or coco_train_images is None:
            raise ValueError("source='coco' needs coco_instances (e.g. instances_train2014.json) and "
                             "coco_train_images (its image folder): pass them with --set")
        src = coco_source(coco_instances, coco_train_images, kind=pope_kind, n_images=n_images, seed=seed,
                          eval_images=eval_images, image_size=size)
        return src, (annotation_grounder(coco_instances) if grounder == "annotations" else None), size
    if grounder in ("annotations", "boxes"):
        raise ValueError(f"a {source} source carries no annotations: use a dino_sam grounder")
    if source == "hf":
        if hf_dataset is None:
            raise ValueError("source='hf' needs hf_dataset (a folder written by datasets' save_to_disk)")
        import datasets

        src = sources.hf_source(datasets.load_from_disk(str(hf_dataset)), on_error=on_error, **(hf_columns or {}))
        return resize_source(src, size), None, size
    if jsonl is None or jsonl_images is None:
        raise ValueError("source='jsonl' needs jsonl (the file) and jsonl_images (its image folder)")
    return resize_source(sources.jsonl_source(jsonl, jsonl_images, on_error=on_error), size), None, size


def record_source(out_dir, record: dict) -> dict:
    """Write ``record`` (the source's name and report) to ``out_dir/source_report.json``; refuse
    when ``out_dir`` already holds a build from a source with another record. The builder's
    own config check cannot see the source (how many images, which size), so without this a
    changed source would silently get the old dataset back."""
    out_dir = Path(out_dir)
    path = out_dir / "source_report.json"
    record = json.loads(json.dumps(record))  # as it reads back
    if (out_dir / "state.json").exists() and path.exists():
        old = json.loads(path.read_text())
        if old != record:
            raise ValueError(f"{out_dir} holds a build from another source: {old.get('source')!r} "
                             f"(image size {old.get('image_size')}), now {record.get('source')!r} "
                             f"(image size {record.get('image_size')}). Use another `dataset` folder name, "
                             "or delete this one to rebuild.")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return record
