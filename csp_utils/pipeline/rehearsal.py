"""A rehearsal kit for the paper's setting: every input of ``params/paper.yaml``, at toy size.

``make_rehearsal_kit(folder)`` writes, deterministically and without downloads:

    models/llava/            random-weight LLaVA with LLaVA-1.5's layout: "USER: <image>\\n...",
                             CLIP at 336 px, patch 14 (576 image tokens), Llama text model
    models/grounding-dino/   random-weight GroundingDINO (transformers' class, ResNet backbone)
    models/sam/              random-weight SAM
    coco/train2014/          photographs from scikit-image as COCO_train2014_*.jpg
    coco/val2014/            other photographs as COCO_val2014_*.jpg (POPE's images)
    coco/annotations/instances_train2014.json
                             hand-drawn boxes and polygons (one mask as uncompressed RLE)
    pope/coco_pope_{random,popular,adversarial}.json    official layout, on the val2014 photos
    amber/                   annotations.json, query_discriminative*.json, image/AMBER_*.jpg

``study_overrides(folder)`` gives the study-wide parameters that point ``params/paper_smoke.yaml``
(or ``params/paper.yaml``) at the kit. The annotations are rough outlines drawn by eye for a
rehearsal of the code path, not ground truth for measuring anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from csp_utils.dataset import grounders
from csp_utils.vlm.models import save_vlm

# photo -> (split, COCO id, {category: polygon in pixels of the original photo})
_TRAIN = {
    "astronaut": (1, {
        "person": [40, 511, 60, 330, 120, 200, 150, 150, 170, 40, 230, 20, 290, 40, 300, 150, 340, 200, 370, 330,
                   380, 511],
        "flag": [0, 0, 90, 0, 95, 420, 0, 420],
        "rocket": [390, 0, 420, 0, 440, 130, 470, 230, 460, 280, 350, 280, 360, 230, 380, 130],
        "helmet": [290, 360, 350, 340, 430, 345, 490, 400, 500, 511, 290, 511],
    }),
    "coffee": (2, {
        "cup": [190, 20, 410, 20, 420, 150, 380, 300, 240, 300, 200, 150],
        "saucer": [80, 200, 200, 130, 400, 130, 480, 200, 470, 330, 350, 390, 180, 380, 90, 320],
        "spoon": [320, 250, 360, 200, 400, 70, 420, 75, 410, 200, 400, 280, 350, 330],
        "dining table": "full",  # the table fills the photo: written as uncompressed RLE
    }),
}
_VAL = {"chelsea": 3, "rocket": 4}
_CATEGORIES = ["person", "flag", "rocket", "helmet", "cup", "saucer", "spoon", "dining table", "cat", "dog", "car"]
_POPE = {  # (photo, object, label): present / absent interleaved as in the official files
    "random": [("chelsea", "cat", "yes"), ("chelsea", "car", "no"), ("rocket", "rocket", "yes"),
               ("rocket", "dog", "no")],
    "popular": [("chelsea", "cat", "yes"), ("chelsea", "person", "no"), ("rocket", "rocket", "yes"),
                ("rocket", "person", "no")],
    "adversarial": [("chelsea", "cat", "yes"), ("chelsea", "dog", "no"), ("rocket", "rocket", "yes"),
                    ("rocket", "car", "no")],
}
_AMBER_IMAGES = {"AMBER_1.jpg": "chelsea", "AMBER_2.jpg": "coffee"}
_AMBER = [  # (id, image, query, type, truth); ids number annotations.json from 1, as AMBER's do
    (1, "AMBER_1.jpg", "Is there a cat in this image?", "discriminative-hallucination", "yes"),
    (2, "AMBER_1.jpg", "Is there a dog in this image?", "discriminative-hallucination", "no"),
    (3, "AMBER_2.jpg", "Is there a cup in this image?", "discriminative-hallucination", "yes"),
    (4, "AMBER_1.jpg", "Is the cat sleeping in this image?", "discriminative-attribute-action", "no"),
    (5, "AMBER_2.jpg", "Are there two cups in this image?", "discriminative-attribute-number", "no"),
    (6, "AMBER_2.jpg", "Is there direct contact between the cup and the saucer?", "discriminative-relation", "yes"),
]
_AMBER_FILES = {"existence": "query_discriminative-existence.json",
                "attribute": "query_discriminative-attribute.json",
                "relation": "query_discriminative-relation.json"}


def rehearsal_llava_config():
    """LLaVA-1.5's shape at toy width: 336 px, patch 14, image first in the prompt."""
    from csp_utils.vlm.embedded.build import TinyVLMConfig

    return TinyVLMConfig(image_size=336, patch_size=14, vision_hidden=32, vision_layers=2, vision_heads=2,
                         vision_intermediate=64, text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
                         image_first=True, max_position_embeddings=1024, seed=0)


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()[..., :3]).convert("RGB")


def _save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)


def _instances(sizes: dict[str, tuple[int, int]]) -> dict:
    cats = [{"id": i + 1, "name": c, "supercategory": "rehearsal"} for i, c in enumerate(_CATEGORIES)]
    cat_id = {c["name"]: c["id"] for c in cats}
    images, annotations = [], []
    for photo, (image_id, objects) in _TRAIN.items():
        w, h = sizes[photo]
        images.append({"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "width": w, "height": h})
        for name, poly in objects.items():
            if poly == "full":
                seg, bbox, area = {"counts": [0, w * h], "size": [h, w]}, [0.0, 0.0, float(w), float(h)], float(w * h)
            else:
                xs, ys = poly[0::2], poly[1::2]
                seg = [[float(v) for v in poly]]
                bbox = [float(min(xs)), float(min(ys)), float(max(xs) - min(xs)), float(max(ys) - min(ys))]
                area = float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[name],
                                "segmentation": seg, "bbox": bbox, "area": area, "iscrowd": 0})
    return {"info": {"description": "CSP rehearsal kit: scikit-image photographs, outlines drawn by eye"},
            "images": images, "annotations": annotations, "categories": cats}


def make_rehearsal_kit(folder, models: bool = True) -> Path:
    """Write the kit into ``folder`` (see the module docstring); returns the folder."""
    folder = Path(folder)
    sizes = {}
    for photo, (image_id, _) in _TRAIN.items():
        img = _photo(photo)
        sizes[photo] = img.size
        _save_jpeg(img, folder / "coco" / "train2014" / f"COCO_train2014_{image_id:012d}.jpg")
    for photo, image_id in _VAL.items():
        _save_jpeg(_photo(photo), folder / "coco" / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    ann = folder / "coco" / "annotations" / "instances_train2014.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(_instances(sizes)))

    (folder / "pope").mkdir(parents=True, exist_ok=True)
    for kind, rows in _POPE.items():
        lines = [json.dumps({"question_id": i, "image": f"COCO_val2014_{_VAL[photo]:012d}.jpg",
                             "text": f"Is there a {obj} in the image?", "label": label})
                 for i, (photo, obj, label) in enumerate(rows, 1)]
        (folder / "pope" / f"coco_pope_{kind}.json").write_text("\n".join(lines) + "\n")

    amber = folder / "amber"
    for name, photo in _AMBER_IMAGES.items():
        _save_jpeg(_photo(photo), amber / "image" / name)
    (amber / "annotations.json").write_text(json.dumps(
        [{"id": i, "type": typ, "truth": truth} for i, _, _, typ, truth in _AMBER], indent=1))
    queries = [{"id": i, "image": image, "query": q} for i, image, q, _, _ in _AMBER]
    (amber / "query_discriminative.json").write_text(json.dumps(queries, indent=1))
    for kind, fname in _AMBER_FILES.items():
        prefix = {"existence": "discriminative-hallucination", "attribute": "discriminative-attribute",
                  "relation": "discriminative-relation"}[kind]
        subset = [q for q, row in zip(queries, _AMBER) if row[3].startswith(prefix)]
        (amber / fname).write_text(json.dumps(subset, indent=1))

    if models:
        from csp_utils.vlm.embedded.build import build_tiny_vlm

        model, processor = build_tiny_vlm(rehearsal_llava_config())
        save_vlm(model, processor, folder / "models" / "llava", meta={"kind": "rehearsal: random weights"})
        # 128 px: at 64 the detector's coarsest feature level of a square photo is 1x1, which GroupNorm refuses
        grounders.tiny_grounding_dino(folder / "models" / "grounding-dino", image_size=128)
        grounders.tiny_sam(folder / "models" / "sam")
    return folder


def study_overrides(folder) -> dict:
    """Study-wide parameters that point a paper params file at the kit in ``folder``."""
    folder = Path(folder).resolve()
    return {
        "base_model": str(folder / "models" / "llava"),
        "detector": str(folder / "models" / "grounding-dino"),
        "segmenter": str(folder / "models" / "sam"),
        "coco_instances": str(folder / "coco" / "annotations" / "instances_train2014.json"),
        "coco_train_images": str(folder / "coco" / "train2014"),
        "coco_val_images": str(folder / "coco" / "val2014"),
        "pope_dir": str(folder / "pope"),
        "amber_dir": str(folder / "amber"),
        "amber_images": str(folder / "amber" / "image"),
    }


def set_arguments(folder) -> str:
    """The ``--set`` arguments of the study command for the kit in ``folder``."""
    return " ".join(f"{k}={v}" for k, v in study_overrides(folder).items())


__all__ = ["make_rehearsal_kit", "study_overrides", "set_arguments", "rehearsal_llava_config"]
