"""Grounders: where in the image are the key objects? One interface, three backends.

``grounder.ground(image, phrases, image_id=None) -> GroundingResult`` returns one (H, W)
bool mask, the union over all phrases, plus the boxes behind it.

- ``DinoSamGrounder``: GroundingDINO -> SAM through transformers' own classes, from a hub id
  or a local folder (or ready model / processor objects). All phrases go into one detector
  prompt ("cat. dog."), all boxes of an image into one SAM call; the best of SAM's three
  masks per box (by predicted IoU) is kept and the masks are united. ``segmenter=None``:
  box masks from the detector alone.
- ``AnnotationGrounder``: exact masks from annotations, an oracle for ablations:
  ``from_scenes`` (the object world) or ``from_coco`` (COCO instance JSON; polygons and
  RLE decoded here, no pycocotools needed).
- ``BoxGrounder(inner)``: another grounder's boxes filled as masks (no segmenter).

Statuses (``GroundingResult.status``); failures never raise, they come back with mask=None:
  "ok"            mask has at least one pixel
  "no_objects"    no phrases to ground (nothing named by question / answer)
  "no_detection"  nothing above the detector's thresholds / no annotated object matches
  "empty_mask"    detections or matches exist but their mask has no pixel (e.g. fully occluded)
What to do on a failure (skip the sample, noise the whole image, keep it clean) is the
dataset builder's failure policy (``buildconfig.BuildConfig.failure_policy``).
Wrong inputs (unknown image id, mismatched image size, bad spec) do raise, naming the input.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from csp_utils.core.images import to_rgb
from csp_utils.dataset.keyobjects import Vocabulary, coco_vocabulary, get_vocabulary, singularize, default_vocabulary
from csp_utils.world import catalog
from csp_utils.world.scene_io import load_scenes

STATUSES = ("ok", "no_detection", "empty_mask", "no_objects")
Box = tuple[float, float, float, float]


@dataclass
class GroundingResult:
    mask: np.ndarray | None          # (H, W) bool: union over all key objects; None when grounding failed
    boxes: list[Box]                 # x0, y0, x1, y1 pixels
    scores: list[float]
    labels: list[str]                # the phrase each box was found for
    status: str                      # one of STATUSES
    grounder: str                    # backend name, recorded in the dataset

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def area(self) -> float:
        """Masked fraction of the image (0 when grounding failed)."""
        return float(self.mask.mean()) if self.mask is not None else 0.0


@runtime_checkable
class Grounder(Protocol):
    name: str

    def ground(self, image: Image.Image, phrases: list[str], image_id: str | None = None) -> GroundingResult: ...


def _clean_phrases(phrases) -> list[str]:
    if isinstance(phrases, str):
        raise TypeError(f"phrases must be a list of strings, got the string {phrases!r}; wrap it in a list")
    # GroundingDINO separates phrases with '.', so a phrase must not contain one
    out = [" ".join(str(p).replace(".", " ").split()).lower() for p in phrases]
    return list(dict.fromkeys(p for p in out if p))


def _finish(mask: np.ndarray | None, boxes, scores, labels, name: str) -> GroundingResult:
    """Result with the status that ``mask`` implies: no boxes -> no_detection, no pixel -> empty_mask."""
    if not boxes:
        return GroundingResult(None, [], [], [], "no_detection", name)
    if mask is None or not mask.any():
        return GroundingResult(None, list(boxes), list(scores), list(labels), "empty_mask", name)
    return GroundingResult(mask.astype(bool, copy=False), list(boxes), list(scores), list(labels), "ok", name)


def boxes_to_mask(boxes, size: tuple[int, int]) -> np.ndarray:
    """Union of filled boxes as an (H, W) bool mask; a box covers every pixel it touches."""
    h, w = size
    mask = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def _image_size(image) -> tuple[int, int] | None:
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image.height, image.width
    return tuple(np.asarray(image).shape[:2])


# ---------------------------------------------------------------------------------------
# GroundingDINO -> SAM


def dino_prompt(phrases: list[str]) -> str:
    """The GroundingDINO text prompt: lower case, each phrase ended by a period ("cat. dog.")."""
    return " ".join(f"{p}." for p in _clean_phrases(phrases))


def _short_name(obj) -> str:
    """'IDEA-Research/grounding-dino-tiny' -> 'grounding-dino-tiny'; a model object -> its source."""
    if isinstance(obj, (str, os.PathLike)):
        return Path(str(obj).rstrip("/")).name
    src = getattr(getattr(obj, "config", None), "_name_or_path", "") or ""
    return Path(src.rstrip("/")).name or type(obj).__name__


class DinoSamGrounder:
    """GroundingDINO boxes for the phrases, SAM masks inside the boxes, united.

    ``detector`` / ``segmenter``: a hub id, a local folder, or a model object (then pass its
    processor as ``detector_processor`` / ``segmenter_processor``). ``segmenter=None``: box
    masks. A box is kept when its best token score is above ``box_threshold`` and its best
    phrase's score above ``text_threshold``; its label is that phrase. ``max_boxes`` keeps the
    highest-scoring boxes only (bounds SAM's cost when thresholds are low).
    ``from_pretrained_kwargs`` go to both ``from_pretrained`` calls (e.g. ``revision``).
    """

    def __init__(self, detector: Any = "IDEA-Research/grounding-dino-tiny",
                 segmenter: Any = "facebook/sam-vit-base", box_threshold: float = 0.35,
                 text_threshold: float = 0.25, device: str | None = None, dtype: Any = None,
                 detector_processor: Any = None, segmenter_processor: Any = None, max_boxes: int = 32,
                 name: str | None = None, from_pretrained_kwargs: dict | None = None):
        import torch
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor, SamModel, SamProcessor

        if not 0.0 <= box_threshold <= 1.0 or not 0.0 <= text_threshold <= 1.0:
            raise ValueError(f"box_threshold and text_threshold must lie in [0, 1], got {box_threshold}, {text_threshold}")
        if max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
        self.box_threshold, self.text_threshold, self.max_boxes = float(box_threshold), float(text_threshold), max_boxes
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        kwargs = {"use_safetensors": True, **(from_pretrained_kwargs or {})}  # no pickle, no remote code
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype

        self.detector, self.detector_processor = self._load(
            "detector", detector, detector_processor, GroundingDinoForObjectDetection, GroundingDinoProcessor, kwargs)
        self.segmenter, self.segmenter_processor = (None, None) if segmenter is None else self._load(
            "segmenter", segmenter, segmenter_processor, SamModel, SamProcessor, kwargs)
        self.name = name or (f"{_short_name(detector)}+{_short_name(segmenter)}" if segmenter is not None
                             else f"{_short_name(detector)}+boxes")

    def _load(self, role, obj, processor, model_cls, processor_cls, kwargs):
        if isinstance(obj, (str, os.PathLike)):
            try:
                model = model_cls.from_pretrained(str(obj), **kwargs)
                processor = processor or processor_cls.from_pretrained(str(obj))
            except OSError as err:
                raise OSError(f"could not load the {role} {str(obj)!r} as {model_cls.__name__}: give a hub id "
                              f"(downloaded or cached) or a folder written by save_pretrained ({err})") from err
        else:
            model = obj
            if processor is None:
                raise ValueError(f"{role} was given as a model object ({type(obj).__name__}); "
                                 f"pass its processor as {role}_processor=")
        model = model.to(self.device)
        if self.dtype is not None:
            model = model.to(self.dtype)
        return model.eval(), processor

    def detect(self, image: Image.Image, phrases: list[str]) -> tuple[list[Box], list[float], list[str]]:
        """Boxes (pixels), scores and phrase labels, highest score first."""
        import torch

        phrases = _clean_phrases(phrases)
        image = to_rgb(image)  # transparency onto white, as everywhere (csp_utils.core.images)
        proc = self.detector_processor
        inputs = proc(images=image, text=dino_prompt(phrases), return_tensors="pt")
        n_tokens, max_len = inputs["input_ids"].shape[1], self.detector.config.max_text_len
        if n_tokens > max_len:
            raise ValueError(f"{len(phrases)} phrases make {n_tokens} prompt tokens, more than the detector's "
                             f"max_text_len {max_len}; ground fewer phrases per call")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if self.dtype is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.detector(**inputs)
        det = proc.post_process_grounded_object_detection(
            out, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)])[0]
        # Label each kept box by phrase: best token score inside each phrase's token span.
        # post-processing keeps queries with max prob > threshold, in query order: same mask here.
        probs = torch.sigmoid(out.logits[0])
        kept = probs[probs.max(-1).values > self.box_threshold].float().cpu()
        if len(kept) != len(det["boxes"]):
            raise RuntimeError(f"GroundingDINO post-processing kept {len(det['boxes'])} boxes, the score mask "
                               f"{len(kept)}: this transformers version changed the rule; labels would be wrong")
        spans = _phrase_token_spans(inputs["input_ids"][0].tolist(), proc.tokenizer, len(phrases))
        boxes, scores, labels = [], [], []
        for box, score, p in zip(det["boxes"].float().cpu().tolist(), det["scores"].float().cpu().tolist(), kept):
            per_phrase = [float(p[s].max()) if s else -1.0 for s in spans]
            best = int(np.argmax(per_phrase))
            if per_phrase[best] <= self.text_threshold:
                continue
            x0, y0, x1, y1 = box  # clip: predicted boxes may reach past the border
            boxes.append((min(max(x0, 0.0), image.width), min(max(y0, 0.0), image.height),
                          min(max(x1, 0.0), image.width), min(max(y1, 0.0), image.height)))
            scores.append(score)
            labels.append(phrases[best])
        order = np.argsort(scores, kind="stable")[::-1][: self.max_boxes]
        return [boxes[i] for i in order], [scores[i] for i in order], [labels[i] for i in order]

    def segment(self, image: Image.Image, boxes: list[Box]) -> np.ndarray:
        """Union of SAM's best mask per box; all boxes in ONE forward pass (one image embedding)."""
        import torch

        image = to_rgb(image)  # transparency onto white, as everywhere (csp_utils.core.images)
        proc = self.segmenter_processor
        inputs = proc(images=image, input_boxes=[[list(map(float, b)) for b in boxes]], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype or torch.float32)
        input_boxes = inputs["input_boxes"].to(self.device, self.dtype or torch.float32)
        with torch.inference_mode():
            out = self.segmenter(pixel_values=pixel_values, input_boxes=input_boxes, multimask_output=True)
        # pick the best of the 3 candidate masks per box first: post-processing then upsamples 1, not 3
        best = out.iou_scores[0].float().argmax(-1)                                  # (boxes,)
        low = out.pred_masks[0, torch.arange(len(boxes), device=best.device), best]  # (boxes, h, w)
        masks = proc.image_processor.post_process_masks(
            [low[:, None].float().cpu()], inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
        return masks[:, 0].any(0).numpy()

    def ground(self, image: Image.Image, phrases: list[str], image_id: str | None = None) -> GroundingResult:
        phrases = _clean_phrases(phrases)
        if not phrases:
            return GroundingResult(None, [], [], [], "no_objects", self.name)
        boxes, scores, labels = self.detect(image, phrases)
        if not boxes:
            return _finish(None, boxes, scores, labels, self.name)
        if self.segmenter is None:
            mask = boxes_to_mask(boxes, (image.height, image.width))
        else:
            mask = self.segment(image, boxes)
        return _finish(mask, boxes, scores, labels, self.name)


def _phrase_token_spans(input_ids: list[int], tokenizer, n_phrases: int) -> list[list[int]]:
    """Token positions of each phrase in "p1. p2. ...": the tokens between the periods."""
    sep = tokenizer.convert_tokens_to_ids(".")
    special = set(tokenizer.all_special_ids)
    spans, current = [], []
    for pos, tok in enumerate(input_ids):
        if tok == sep:
            spans.append(current)
            current = []
        elif tok not in special:
            current.append(pos)
    spans = spans[:n_phrases]
    return spans + [[] for _ in range(n_phrases - len(spans))]  # truncated prompts: no tokens


# ---------------------------------------------------------------------------------------
# Annotations (oracle): object world scenes and COCO instances


@dataclass(eq=False)
class AnnotatedObject:
    """One annotated instance. ``attributes`` (colour, size words) None = unknown: any modifier
    in a phrase is then ignored. The mask is decoded on first use (COCO files are large)."""

    label: str
    box: Box
    size: tuple[int, int]                        # (H, W) of the annotated image
    attributes: frozenset[str] | None = None
    segmentation: Any = None                     # COCO polygons / RLE, decoded lazily
    _mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def mask(self) -> np.ndarray:
        if self._mask is None:
            if self.segmentation is None:  # no segmentation: the box is the best we have
                self._mask = boxes_to_mask([self.box], self.size)
            else:
                self._mask = decode_segmentation(self.segmentation, *self.size)
        return self._mask


class AnnotationGrounder:
    """Exact masks from annotations, looked up by ``image_id``.

    A phrase matches an object when the vocabulary reads the phrase's object as the object's
    label and every modifier in it ("red", "small") is one of the object's attributes: "circle"
    matches every circle, "red circle" only red ones.
    """

    def __init__(self, records: dict[str, list[AnnotatedObject]], vocabulary: Vocabulary,
                 name: str = "annotations", aliases: dict[str, str] | None = None):
        self.records, self.vocabulary, self.name = records, vocabulary, name
        self.aliases = aliases or {}

    @classmethod
    def from_scenes(cls, scenes, name: str = "annotations") -> AnnotationGrounder:
        """Object-world scenes; ``image_id`` is the scene_id."""
        scenes = list(scenes)
        if not scenes:
            raise ValueError("from_scenes needs at least one scene")
        records, categories, modifiers = {}, set(), set()
        for sc in scenes:
            h, w = sc.image.shape[:2]
            records[sc.scene_id] = [
                AnnotatedObject(o.category, tuple(float(v) for v in o.box), (h, w),
                                frozenset({o.color, o.size}), _mask=np.asarray(o.mask, dtype=bool))
                for o in sc.objects]
            categories |= {o.category for o in sc.objects}
            modifiers |= {o.color for o in sc.objects} | {o.size for o in sc.objects}
        # the world's whole vocabulary, so that an absent category is still understood
        categories |= set(catalog.CATEGORIES)
        modifiers |= set(catalog.COLORS) | set(catalog.SIZES)
        vocab = Vocabulary(sorted(categories), name="scene-annotations", modifiers=sorted(modifiers))
        return cls(records, vocab, name=name)

    @classmethod
    def from_coco(cls, instances, vocabulary: Vocabulary | str | None = None,
                  name: str = "annotations") -> AnnotationGrounder:
        """COCO instances (a path to instances_*.json or its dict); ``image_id`` is the image's
        file_name (a path to it or the numeric id as a string work too). Phrases are read with
        ``vocabulary`` (default: COCO's, whose synonyms map "man" to "person")."""
        if isinstance(instances, (str, os.PathLike)):
            path = Path(instances)
            if not path.exists():
                raise FileNotFoundError(f"COCO instances file {path} not found")
            instances = json.loads(path.read_text())
        for key in ("images", "annotations", "categories"):
            if key not in instances:
                raise ValueError(f"COCO instances need an {key!r} list; got keys {sorted(instances)}")
        vocab = coco_vocabulary() if vocabulary is None else get_vocabulary(vocabulary)
        categories = {c["id"]: vocab.canonical(c["name"]) or c["name"].lower() for c in instances["categories"]}
        images = {im["id"]: im for im in instances["images"]}
        records = {im["file_name"]: [] for im in images.values()}
        aliases = {str(i): im["file_name"] for i, im in images.items()}
        for ann in instances["annotations"]:
            im = images.get(ann["image_id"])
            if im is None:
                raise ValueError(f"annotation {ann.get('id')} refers to image_id {ann['image_id']} "
                                 "that is not in 'images'")
            x, y, bw, bh = ann["bbox"]
            records[im["file_name"]].append(AnnotatedObject(
                categories[ann["category_id"]], (float(x), float(y), float(x + bw), float(y + bh)),
                (int(im["height"]), int(im["width"])), None, ann.get("segmentation") or None))
        return cls(records, vocab, name=name, aliases=aliases)

    def objects(self, image_id) -> list[AnnotatedObject]:
        key = str(image_id) if image_id is not None else None
        if key is None:
            raise ValueError(f"{self.name}: ground() needs image_id (scene_id or COCO file_name)")
        for candidate in (key, self.aliases.get(key), Path(key).name):
            if candidate in self.records:
                return self.records[candidate]
        examples = ", ".join(list(self.records)[:3])
        raise KeyError(f"{self.name}: image_id {key!r} is not among the {len(self.records)} annotated images "
                       f"(e.g. {examples}); build the grounder from the scenes / instances of this split")

    def matches(self, phrase: str, obj: AnnotatedObject) -> bool:
        mentions = self.vocabulary.find(phrase)
        if not mentions:  # outside the vocabulary: compare the words themselves
            words = phrase.split()
            return bool(words) and singularize(words[-1]) == obj.label or phrase == obj.label
        for m in mentions:
            if m.object == obj.label and (obj.attributes is None or set(m.modifiers) <= obj.attributes):
                return True
        return False

    def ground(self, image: Image.Image | None, phrases: list[str], image_id: str | None = None) -> GroundingResult:
        phrases = _clean_phrases(phrases)
        if not phrases:
            return GroundingResult(None, [], [], [], "no_objects", self.name)
        objects = self.objects(image_id)
        size = _image_size(image)
        if size is not None and objects and objects[0].size != size:
            raise ValueError(f"{self.name}: image {image_id!r} is {size[::-1]} (W, H) but was annotated at "
                             f"{objects[0].size[::-1]}; ground the original image, before any resizing")
        hits = [(o, p) for o in objects for p in phrases if self.matches(p, o)]
        hits = list({id(o): (o, p) for o, p in hits}.values())  # an object once, first phrase wins
        if not hits:
            return _finish(None, [], [], [], self.name)
        mask = np.zeros(hits[0][0].size, dtype=bool)
        for o, _ in hits:
            mask |= o.mask
        return _finish(mask, [o.box for o, _ in hits], [1.0] * len(hits), [p for _, p in hits], self.name)


# --- COCO segmentation decoding (the pycocotools formats) ---------------------------------


def rle_string_to_counts(s: str | bytes) -> list[int]:
    """Compressed COCO RLE string -> run lengths (pycocotools' rleFrString): 5 bits per char
    (offset 48), 0x20 = more chars follow, sign from 0x10 of the last; runs after the third are
    stored as differences to the run two before."""
    s = s.decode("ascii") if isinstance(s, bytes) else s
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def counts_to_rle_string(counts: list[int]) -> str:
    """Run lengths -> compressed COCO RLE string (pycocotools' rleToString); inverse of the above."""
    out = []
    for i, cnt in enumerate(counts):
        x = int(cnt) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_decode(counts: list[int], height: int, width: int) -> np.ndarray:
    """Run lengths (alternating 0s and 1s, starting with 0s, column-major) -> (H, W) bool."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != height * width or (counts < 0).any():
        raise ValueError(f"RLE runs sum to {int(counts.sum())}, not height*width = {height}*{width}; "
                         "is 'size' [height, width]?")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape(width, height).T.copy()  # COCO runs go down columns (Fortran order)


def rle_encode(mask: np.ndarray) -> dict:
    """(H, W) bool -> uncompressed COCO RLE {"size": [H, W], "counts": [...]}."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs  # runs start with zeros
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons ([x1, y1, x2, y2, ...] each) -> (H, W) bool: a pixel is in when its centre
    is inside (even-odd rule). Coordinates are pixel edges, so the square 2..6 covers pixels
    2..5 as pycocotools does; PIL's polygon fill also paints the far edge (one row / column more)."""
    mask = np.zeros((height, width), dtype=bool)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(pts) < 3:
            continue
        inside = np.zeros((height, width), dtype=bool)
        for (x1, y1), (x2, y2) in zip(pts, np.roll(pts, -1, axis=0)):
            if y1 == y2:
                continue  # horizontal edges never cross a horizontal ray
            crosses = (y1 > ys) != (y2 > ys)
            x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
            inside ^= crosses & (xs < x_at)
        mask |= inside
    return mask


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Any COCO segmentation (polygon list, uncompressed or compressed RLE) -> (H, W) bool."""
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        h, w = segmentation.get("size", (height, width))
        if (h, w) != (height, width):
            raise ValueError(f"RLE size {[h, w]} differs from the image's {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, (str, bytes)):
            counts = rle_string_to_counts(counts)
        return rle_decode(counts, h, w)
    raise ValueError(f"unknown COCO segmentation {str(segmentation)[:80]!r}: expected a list of polygons "
                     "or a dict with 'counts' and 'size'")


# ---------------------------------------------------------------------------------------
# Boxes only


class BoxGrounder:
    """Another grounder's boxes, filled, as the mask: no segmenter needed."""

    def __init__(self, inner: Grounder, name: str | None = None):
        self.inner = inner
        self.name = name or f"boxes({inner.name})"

    def ground(self, image: Image.Image | None, phrases: list[str], image_id: str | None = None) -> GroundingResult:
        r = self.inner.ground(image, phrases, image_id=image_id)
        if not r.boxes:  # no_objects / no_detection pass through
            return GroundingResult(None, [], [], [], r.status, self.name)
        size = _image_size(image) or (r.mask.shape if r.mask is not None else None)
        if size is None and isinstance(self.inner, AnnotationGrounder):
            size = self.inner.objects(image_id)[0].size
        if size is None:
            raise ValueError(f"{self.name}: pass the image, its size is needed for the box mask")
        return _finish(boxes_to_mask(r.boxes, size), r.boxes, r.scores, r.labels, self.name)


# ---------------------------------------------------------------------------------------
# Factory for configs

_DINO_KEYS = ("detector", "segmenter", "box_threshold", "text_threshold", "device", "dtype", "max_boxes", "name",
              "from_pretrained_kwargs")


def make_grounder(spec: dict | str | Grounder = "annotations", scenes=None) -> Grounder:
    """A grounder from a config value.

    - ``"annotations"``: exact masks of ``scenes`` (or ``{"kind": "annotations", "scenes_dir": folder}``,
      or ``{"kind": "annotations", "coco": instances.json, "vocabulary": "coco"}``).
    - ``"boxes"``: the same annotations' boxes as masks (or with a ``"detector"``: detector boxes).
    - ``"dino_sam"`` or ``{"detector": id_or_path, "segmenter": id_or_path_or_None,
      "box_threshold": 0.35, "text_threshold": 0.25, "device": ..., "dtype": ..., "max_boxes": 32}``.
    A ready grounder is returned as is.
    """
    if not isinstance(spec, (str, dict)):
        if hasattr(spec, "ground") and hasattr(spec, "name"):
            return spec
        raise TypeError(f"grounder spec must be a string, a dict or a grounder, got {type(spec).__name__}")
    spec = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = spec.pop("kind", None) or ("dino_sam" if "detector" in spec or "segmenter" in spec else None)
    kinds = ("annotations", "boxes", "dino_sam")
    if kind not in kinds:
        raise ValueError(f"grounder kind must be one of {kinds} (or a dict with 'detector'), got {kind!r}")

    if kind == "dino_sam" or (kind == "boxes" and "detector" in spec):
        if kind == "boxes":
            spec["segmenter"] = None
        unknown = sorted(set(spec) - set(_DINO_KEYS))
        if unknown:
            raise ValueError(f"unknown GroundingDINO+SAM grounder settings {unknown}; accepted: {list(_DINO_KEYS)}")
        return DinoSamGrounder(**spec)

    if "coco" in spec:
        inner = AnnotationGrounder.from_coco(spec["coco"], vocabulary=spec.get("vocabulary"))
    else:
        if scenes is None and "scenes_dir" in spec:
            scenes = load_scenes(spec["scenes_dir"])
        if scenes is None:
            raise ValueError(f"the {kind!r} grounder needs annotations: pass scenes=..., or a spec with "
                             "'scenes_dir' (saved scenes) or 'coco' (an instances JSON)")
        inner = AnnotationGrounder.from_scenes(scenes)
    return inner if kind == "annotations" else BoxGrounder(inner, name="boxes(annotations)")


# ---------------------------------------------------------------------------------------
# tiny random models for tests and benchmarks
#
# Real architectures at toy sizes, random weights, built from configs (no download). Three
# pitfalls: GroundingDINO needs decoder_layers >= 2 (weight tying);
# a BERT tokenizer must get vocab= as a dict (vocab_file= is silently ignored in 5.x);
# SAM's vision num_pos_feats must equal the prompt encoder's hidden_size // 2. The Pil image
# processors are built explicitly: no torchvision in the CPU environment.


def _tiny_words() -> list[str]:
    """Word-level vocabulary for the tiny detector's tokenizer: every word of the built-in
    vocabularies, so prompts tokenise into real ids rather than [UNK]."""
    vocab = default_vocabulary()
    words = {w for p in vocab.phrases + vocab.modifiers for w in p.replace("-", " ").split()}
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "-", "a", "an", "the"] + sorted(words)


def tiny_grounding_dino(folder: str | os.PathLike | None = None, image_size: int = 64, num_queries: int = 10,
                        seed: int = 0):
    """(model, processor): a random-weight GroundingDINO with a ResNet backbone, ~1 s per image
    on CPU. Saved with save_pretrained to ``folder`` when given (loadable by path)."""
    import torch
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessorPil, GroundingDinoProcessor, ResNetConfig)

    words = _tiny_words()
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    backbone = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                            out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_queries=num_queries, num_feature_levels=4,
                                 max_text_len=64, encoder_n_points=2, decoder_n_points=2)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessorPil(
        size={"shortest_edge": image_size, "longest_edge": int(image_size * 1.5)})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if folder is not None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return model, processor


def tiny_sam(folder: str | os.PathLike | None = None, image_size: int = 64, seed: int = 0):
    """(model, processor): a random-weight SAM at ``image_size`` (patch 8). Saved to ``folder``
    when given."""
    import torch
    from transformers import (SamConfig, SamImageProcessorPil, SamMaskDecoderConfig, SamModel,
                              SamPromptEncoderConfig, SamProcessor, SamVisionConfig)

    prompt_hidden = 16
    vision = SamVisionConfig(hidden_size=32, output_channels=prompt_hidden, num_hidden_layers=2, num_attention_heads=2,
                             image_size=image_size, patch_size=8, window_size=4, global_attn_indexes=[1],
                             num_pos_feats=prompt_hidden // 2, mlp_dim=32)
    prompt = SamPromptEncoderConfig(hidden_size=prompt_hidden, image_size=image_size, patch_size=8)
    decoder = SamMaskDecoderConfig(hidden_size=prompt_hidden, mlp_dim=32, num_attention_heads=2,
                                   iou_head_hidden_dim=16)
    torch.manual_seed(seed)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)).eval()
    low = image_size // 2  # SAM's masks come out at 4x the embedding grid (image_size / 8)
    processor = SamProcessor(SamImageProcessorPil(
        size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low}))
    if folder is not None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return model, processor


__all__ = ["GroundingResult", "Grounder", "STATUSES", "DinoSamGrounder", "AnnotationGrounder", "AnnotatedObject",
           "BoxGrounder", "make_grounder", "boxes_to_mask", "dino_prompt", "decode_segmentation", "rle_decode",
           "rle_encode", "rle_string_to_counts", "counts_to_rle_string", "polygons_to_mask", "tiny_grounding_dino",
           "tiny_sam"]
