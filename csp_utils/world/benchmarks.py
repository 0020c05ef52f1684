"""POPE and AMBER (discriminative): official-file loaders, world-built sets, official scoring.

* **POPE** (Li et al., EMNLP 2023). Official files are JSON Lines of ``{"question_id",
  "image", "text", "label"}``; :func:`load_pope` also takes a JSON array and the field
  aliases other releases use. Scoring follows the official ``evaluate.py``:
  :func:`pope_parse` keeps the first sentence, drops commas, and calls an answer "no" when
  its words include ``No``, ``not`` or ``no``, "yes" otherwise; metrics take "yes" as the
  positive class and report the share of *predicted* yes.
* **AMBER** (Wang et al., 2023). ``query_discriminative*.json`` + ``annotations.json``
  (a list indexed by id - 1). Types: existence = ``discriminative-hallucination`` (all
  "no"); attribute = ``discriminative-attribute-{state,number,action}``; relation =
  ``discriminative-relation`` (all "yes") **and** ``relation`` (all "no"). The official
  ``inference.py`` compares a reply exactly with ``"Yes"`` / ``"No"`` (anything else is
  wrong for both classes) and takes "no" as the positive class. :func:`normalize_yes_no`
  is our documented lenient alternative for free-form replies; every score says which
  one was used. (Official prints round to 0.1 and add 1e-4 to F1's denominator; we don't.)
* **World sets**: the same protocols on the procedural world (``scenes``), with image
  loaders that render scenes from memory.

The official POPE (COCO) and AMBER discriminative files ship inside the package
(:data:`BENCHMARK_DIR`, :func:`pope_dir`, :func:`amber_dir`; licences and attribution in
its README); images do not.

Task metrics come from :func:`csp_utils.core.metrics.task_metrics`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from csp_utils.core.images import to_rgb
from csp_utils.core.metrics import task_metrics
from csp_utils.core.paths import DATA
from csp_utils.world import scenes as world, catalog, language
from csp_utils.world.schema import QAItem

# The official files, vendored unchanged (checksums in SHA256SUMS beside them).
BENCHMARK_DIR = DATA / "benchmarks"


def pope_dir() -> Path:
    """The vendored POPE (COCO) folder: ``coco_pope_{random,popular,adversarial}.json``."""
    return BENCHMARK_DIR / "pope"


def amber_dir() -> Path:
    """The vendored AMBER folder: ``annotations.json`` + ``query_discriminative*.json``."""
    return BENCHMARK_DIR / "amber"


POPE_KINDS = ("random", "popular", "adversarial")
AMBER_KINDS = ("existence", "attribute", "relation")
# AMBER annotation type -> (our kind, subtype)
AMBER_TYPES = {
    "discriminative-hallucination": ("existence", ""),
    "discriminative-attribute-state": ("attribute", "state"),
    "discriminative-attribute-number": ("attribute", "number"),
    "discriminative-attribute-action": ("attribute", "action"),
    "discriminative-relation": ("relation", ""),
    "relation": ("relation", ""),
}


@dataclass
class Benchmark:
    name: str
    family: str            # "pope" | "amber"
    items: list[QAItem]
    image_loader: Callable[[str], Image.Image]
    positive_class: str    # "yes" for POPE, "no" for AMBER
    image_root: str | None = None   # folder of image files (official sets); None for the world

    def __post_init__(self):
        refuse_duplicate_ids(self.items, f"benchmark {self.name!r}")

    def image_ids(self) -> list[str]:
        return list(dict.fromkeys(it.image_id for it in self.items))

    def check_images(self, progress: bool = True) -> None:
        """Check up front that every image of the benchmark exists and decodes.

        Every image is opened and fully decoded (``Image.load``), not just its header: a
        truncated or garbled JPEG passes a header check and fails only mid-evaluation. The
        official sets are small (POPE 500 COCO images, AMBER 1,004), so this takes seconds;
        ``progress`` shows a bar. Raises FileNotFoundError naming the missing files, or
        :class:`BadImageError` naming every file that does not decode (with PIL's reason).
        World sets render their scenes through the loader instead.
        """
        from tqdm.auto import tqdm

        ids = self.image_ids()
        if self.image_root is None:
            for i in ids:
                self.image_loader(i)
            return
        if not self.image_root:
            raise FileNotFoundError(f"{self.name} has no image folder; load it again with image_folder= set"
                                    f"{_IMAGE_HINT.get(self.family, '')}")
        root = Path(self.image_root)
        missing = [i for i in ids if not (root / i).is_file()]
        if missing:
            shown = (f"all {len(ids)}" if len(missing) == len(ids)
                     else f"{len(missing)} of {len(ids)}: {', '.join(missing)}")
            raise FileNotFoundError(
                f"images of {self.name} missing from {root} ({shown}); pass image_folder= the folder holding them"
                f"{_IMAGE_HINT.get(self.family, '')}"
            )
        bad = []
        for i in tqdm(ids, desc=f"checking {self.name} images", unit="image", disable=not progress):
            try:
                with Image.open(root / i) as im:
                    im.load()
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
                bad.append(f"{i} ({type(e).__name__}: {e})")
        if bad:
            raise BadImageError(
                f"{len(bad)} of {len(ids)} images of {self.name} in {root} do not decode:\n  " + "\n  ".join(bad)
                + "\nReplace these files with intact copies (download them again)"
                f"{_IMAGE_HINT.get(self.family, '')}, or remove their questions from the set."
            )


class BadImageError(ValueError):
    """Image files that exist but do not decode."""


def refuse_duplicate_ids(items: Sequence[QAItem], source: str) -> None:
    """Question ids key answers and results: a repeated id would make one answer stand for two questions."""
    counts = Counter(it.question_id for it in items)
    dup = [q for q, c in counts.items() if c > 1]
    if dup:
        shown = ", ".join(f"{q!r} (x{counts[q]})" for q in dup[:20]) + (f" and {len(dup) - 20} more" if len(dup) > 20 else "")
        raise ValueError(f"{source}: {len(dup)} question id(s) occur more than once: {shown}; "
                         "question ids must be unique, fix or remove the repeated questions")


_IMAGE_HINT = {"pope": " (COCO val2014 for the coco_pope files)", "amber": " (AMBER's image folder)"}


def _file_loader(folder, family: str, source: str) -> Callable[[str], Image.Image]:
    root = Path(folder) if folder is not None else None

    def load(image_id: str) -> Image.Image:
        if root is None:
            raise FileNotFoundError(
                f"image {image_id!r} (from {source}) cannot be loaded: no image_folder was given; pass "
                f"image_folder= the folder holding the images{_IMAGE_HINT.get(family, '')}"
            )
        path = root / image_id
        if not path.is_file():
            raise FileNotFoundError(
                f"image {image_id!r} (from {source}) not found in {root}; pass image_folder= the folder "
                f"holding the images{_IMAGE_HINT.get(family, '')}, or call check_images() to list what is missing"
            )
        with Image.open(path) as im:
            return to_rgb(im)  # transparency onto white, as everywhere (csp_utils.core.images)

    return load


def _root(folder) -> str:
    # "" (not None) marks a file-based benchmark whose folder was not given: check_images() then fails clearly
    return "" if folder is None else str(folder)


def scene_image_loader(scene_list: Sequence[world.Scene]) -> Callable[[str], Image.Image]:
    """image_id (scene_id) -> the scene's image, from scenes kept in memory."""
    by_id = {s.scene_id: s for s in scene_list}

    def load(image_id: str) -> Image.Image:
        if image_id not in by_id:
            raise KeyError(f"scene {image_id!r} is not among this benchmark's {len(by_id)} scenes")
        return by_id[image_id].to_pil()

    return load


def _answers_for(items: Sequence[QAItem], answers) -> list[str]:
    """Answers aligned with items: a sequence in item order, or a mapping question_id -> answer."""
    if isinstance(answers, Mapping):
        missing = [it.question_id for it in items if it.question_id not in answers]
        if missing:
            raise ValueError(f"{len(missing)} items have no answer (first: {missing[:3]}); answers is keyed by question_id")
        return [answers[it.question_id] for it in items]
    answers = list(answers)
    if len(answers) != len(items):
        raise ValueError(f"got {len(answers)} answers for {len(items)} items; pass one per item, in order")
    return answers


# =============================================================================== POPE
_POPE_Q = re.compile(r"^Is there (?:a|an) (.+?) in the (?:image|picture)\?$")


def read_json_rows(text: str, source: str) -> list[dict]:
    """JSON Lines, a JSON array, or an object holding the array under a usual key."""
    text = text.strip()
    if not text:
        raise ValueError(f"{source} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # several JSON values: JSON Lines
    if data is None:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is neither JSON nor JSON Lines ({e})") from None
    if isinstance(data, dict):
        for key in ("questions", "data", "annotations", "items"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]  # a one-line JSON Lines file
    if isinstance(data, list):
        return data
    raise ValueError(f"{source}: expected question objects, got {type(data).__name__}")


def _field(row: dict, names: tuple[str, ...], what: str, source: str, i: int):
    for n in names:
        if n in row:
            return row[n]
    raise ValueError(f"{source}, question {i}: no {what} field (looked for {', '.join(names)}); keys are {sorted(row)}")


def _pope_source(path_or_file, split_name: str | None) -> tuple[str, str]:
    """(text, source name) of a POPE question file; a folder is searched for ``*_{split_name}.json*``."""
    if hasattr(path_or_file, "read"):
        text = path_or_file.read()
        text = text.decode() if isinstance(text, bytes) else text
        return text, getattr(path_or_file, "name", "<file object>")
    path = Path(path_or_file)
    if path.is_dir():
        if split_name is None:
            raise ValueError(f"{path} is a folder: pass split_name= one of {POPE_KINDS} to pick its POPE file")
        found = sorted(p for p in path.glob("*.json*") if p.stem.endswith(f"_{split_name}"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"expected one POPE file named '*_{split_name}.json' in {path}, found {[p.name for p in found]}"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"POPE question file {path} not found; pass the path of e.g. coco_pope_random.json")
    return path.read_text(encoding="utf-8"), str(path)


def load_pope(path_or_file, image_folder, split_name: str | None = None) -> Benchmark:
    """An official POPE question file (path, folder + ``split_name``, or open file) as a Benchmark.

    ``split_name`` ("random" | "popular" | "adversarial") names the set; by default it is
    read from the file name (``coco_pope_random.json`` -> "random"). Images are loaded lazily
    from ``image_folder``: a missing one raises FileNotFoundError naming it; call
    ``bench.check_images()`` to validate them all up front.
    """
    text, source = _pope_source(path_or_file, split_name)
    stem = Path(source).stem
    kind = split_name or next((k for k in POPE_KINDS if stem.endswith(k)), stem)
    rows = read_json_rows(text, source)
    items = []
    for i, row in enumerate(rows):
        q = str(_field(row, ("text", "question", "query", "prompt"), "question text", source, i))
        label = str(_field(row, ("label", "answer", "truth"), "label", source, i)).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{source}, question {i}: label must be yes/no, got {label!r}")
        image = str(_field(row, ("image", "image_source", "image_id", "image_name"), "image", source, i))
        qid = str(row.get("question_id", row.get("id", i + 1)))
        m = _POPE_Q.match(q.strip())
        items.append(QAItem(qid, image, q, label, f"pope-{kind}", "existence", [m.group(1)] if m else []))
    refuse_duplicate_ids(items, source)
    if source.startswith("<"):  # a file object without a name
        name = f"pope-{kind}"
    else:
        name = stem.replace("_", "-") if stem.endswith(kind) else f"{stem.replace('_', '-')}-{kind}"
    return Benchmark(name, "pope", items, _file_loader(image_folder, "pope", source), "yes", _root(image_folder))


def pope_parse(answer: str) -> str:
    """The official POPE rule: first sentence, commas dropped, ``No``/``not``/``no`` among words -> "no".

    Surrounding whitespace is stripped first (LLaVA's answer writer does so before POPE's
    scorer sees the text); otherwise the rule is the official one, quirks included
    (words are split on spaces, so "No!" counts as yes, "No." as no).
    """
    text = str(answer).strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def score_pope(items: Sequence[QAItem], answers) -> dict:
    """Accuracy, precision, recall, F1 (positive = yes), yes_ratio (share of predicted yes).

    ``answers``: raw replies, in item order or keyed by question_id; parsed with :func:`pope_parse`.
    A ``None`` reply (no reply at all) is not text the official rule can read: it counts as
    unanswered, i.e. wrong and neither "yes" nor "no" (as AMBER's unscorable replies), and
    ``unanswered`` reports how many there were. Every real reply is scored by the official rule.
    """
    replies = _answers_for(items, answers)
    preds = ["unanswered" if a is None else pope_parse(a) for a in replies]
    out = task_metrics([it.label for it in items], preds, positive="yes")
    out["unanswered"] = sum(a is None for a in replies)
    out["rule"] = "pope-official"
    return out


def pope_scenes(n: int = 500, config: world.WorldConfig = world.WorldConfig(), split: str = "eval",
                start: int = 0, min_categories: int = 3) -> list[world.Scene]:
    """The first ``n`` scenes of ``split`` (from index ``start``) with >= ``min_categories`` distinct
    categories, as POPE's COCO selection holds at least 3 objects per image."""
    out, index = [], start
    limit = start + 200 * n + 1000
    while len(out) < n:
        if index >= limit:
            raise RuntimeError(
                f"only {len(out)} of {index - start} {split} scenes have >= {min_categories} categories; "
                f"raise WorldConfig.max_objects (now {config.max_objects})"
            )
        s = world.make_scene(split, index, config)
        if len(s.categories()) >= min_categories:
            out.append(s)
        index += 1
    return out


def build_world_pope(scene_list: Sequence[world.Scene], kind: str, n_pos: int = 3, n_neg: int = 3,
                     seed: int = 0, stats: dict | None = None) -> Benchmark:
    """POPE on world scenes, with the official protocol.

    Per scene: ``n_pos`` present categories ("yes") and ``n_neg`` absent ones ("no"),
    interleaved yes/no like the official files. Negatives: *random* (uniform among absent),
    *popular* (absent categories most frequent over the set), *adversarial* (absent
    categories that co-occur most with the present ones). Frequencies and co-occurrences
    are counted over ``scene_list`` as POPE does over its images, unless ``stats``
    (``scenes.world_statistics`` of another set) is given. Positives depend only on
    ``seed``, so the three sets share them (as the official files do).
    """
    if kind not in POPE_KINDS:
        raise ValueError(f"POPE kind must be one of {POPE_KINDS}, got {kind!r}")
    stats = stats or world.world_statistics(scene_list)
    freq, co = stats["image_frequency"], stats["cooccurrence"]
    rank = {c: i for i, c in enumerate(catalog.CATEGORIES)}
    items = []
    for s in scene_list:
        present = sorted(s.categories(), key=rank.get)
        if len(present) < n_pos:
            raise ValueError(
                f"scene {s.scene_id} has {len(present)} distinct categories; POPE asks about {n_pos} present ones: "
                "draw scenes with pope_scenes()"
            )
        absent = [c for c in catalog.CATEGORIES if c not in present]
        if len(absent) < n_neg:
            raise ValueError(f"scene {s.scene_id} leaves only {len(absent)} absent categories for {n_neg} negatives")
        pos_rng = np.random.default_rng([seed, s.index, 0])
        neg_rng = np.random.default_rng([seed, s.index, 1 + POPE_KINDS.index(kind)])
        pos = [present[i] for i in pos_rng.choice(len(present), n_pos, replace=False)]
        if kind == "random":
            neg = [absent[i] for i in neg_rng.choice(len(absent), n_neg, replace=False)]
        elif kind == "popular":
            neg = sorted(absent, key=lambda c: (-freq[c], rank[c]))[:n_neg]
        else:
            score = {c: sum(co[p][c] for p in present) for c in absent}
            neg = sorted(absent, key=lambda c: (-score[c], -freq[c], rank[c]))[:n_neg]
        pairs = []
        for k in range(max(n_pos, n_neg)):
            pairs += [(c, "yes") for c in pos[k:k + 1]] + [(c, "no") for c in neg[k:k + 1]]
        for k, (c, label) in enumerate(pairs):
            q = f"Is there {language.article(c)} {c} in the image?"
            items.append(QAItem(f"{s.scene_id}-pope-{kind}-{k}", s.scene_id, q, label, f"pope-{kind}",
                                "existence", [c]))
    return Benchmark(f"pope-{kind}", "pope", items, scene_image_loader(scene_list), "yes")


# =============================================================================== AMBER
_AMBER_QUERY_FILES = {
    "existence": "query_discriminative-existence.json",
    "attribute": "query_discriminative-attribute.json",
    "relation": "query_discriminative-relation.json",
}


def _find(amber_dir: Path, name: str) -> Path | None:
    # the vendored copy keeps files flat; the official repository keeps data/ and data/query/
    for d in (amber_dir, amber_dir / "data", amber_dir / "data" / "query", amber_dir / "query"):
        if (d / name).is_file():
            return d / name
    return None


def _amber_objects(query: str, subtype_kind: tuple[str, str]) -> list[str]:
    """Key objects of AMBER's templated queries (best effort; [] when no template matches)."""
    patterns = {
        "existence": r"^Is there (?:a|an) (.+?) in this image\?$",
        "state": r"^Is the (.+?) \S+ in this image\?$",
        "number": r"^(?:Are|Is) there \w+ (.+?) in this image\?$",
        "action": r"^(?:Does|Is) the (\S+) ",
        "relation": r"^Is there direct contact between the (.+?) and (?:the )?(.+?)\?$",
    }
    kind, sub = subtype_kind
    m = re.match(patterns[sub or kind], query.strip())
    return list(m.groups()) if m else []


def load_amber(amber_dir, image_folder, types: Sequence[str] = AMBER_KINDS) -> dict[str, Benchmark]:
    """AMBER's discriminative queries with ground truth: one Benchmark per type in ``types``.

    ``amber_dir`` holds ``annotations.json`` and the ``query_discriminative*.json`` files
    (flat, or the official repository's ``data/`` + ``data/query/`` layout). Benchmarks are
    named "amber-existence" etc., positive class "no"; attribute items carry the subtype
    state / number / action. Images load lazily from ``image_folder``.
    """
    amber_dir = Path(amber_dir)
    bad = [t for t in types if t not in AMBER_KINDS]
    if bad:
        raise ValueError(f"AMBER types must be among {AMBER_KINDS}, got {bad}")
    ann_path = _find(amber_dir, "annotations.json")
    if ann_path is None:
        raise FileNotFoundError(f"annotations.json not found under {amber_dir}; pass the AMBER data folder")
    annotations = json.loads(ann_path.read_text(encoding="utf-8"))
    out = {}
    for t in types:
        qpath = _find(amber_dir, _AMBER_QUERY_FILES[t]) or _find(amber_dir, "query_discriminative.json")
        if qpath is None:
            raise FileNotFoundError(
                f"neither {_AMBER_QUERY_FILES[t]} nor query_discriminative.json found under {amber_dir}"
            )
        items = []
        for q in json.loads(qpath.read_text(encoding="utf-8")):
            qid = int(q["id"])
            if not 1 <= qid <= len(annotations):
                raise ValueError(f"{qpath.name}: query id {qid} outside annotations.json (1..{len(annotations)})")
            ann = annotations[qid - 1]
            if ann.get("id", qid) != qid:
                raise ValueError(f"{ann_path}: entry {qid - 1} has id {ann.get('id')}, expected {qid}")
            typ = AMBER_TYPES.get(ann["type"])
            if typ is None or typ[0] != t:
                continue  # another type (query_discriminative.json holds all three)
            label = str(ann["truth"]).strip().lower()
            items.append(QAItem(str(qid), q["image"], q["query"], label, f"amber-{t}", t,
                                _amber_objects(q["query"], typ), typ[1]))
        refuse_duplicate_ids(items, str(qpath))
        out[t] = Benchmark(f"amber-{t}", "amber", items, _file_loader(image_folder, "amber", str(qpath)), "no",
                           _root(image_folder))
    return out


_YES_WORDS = {"yes", "yeah", "yep", "yup", "correct", "true", "sure", "certainly", "definitely"}
_NO_WORDS = {"no", "nope", "nah", "false", "incorrect"}
_NEGATIONS = {"no", "not", "none", "never", "nothing", "nobody", "neither", "nor", "cannot", "without"}


def normalize_yes_no(reply: str) -> str | None:
    """Lenient reading of a free-form reply as "Yes", "No" or None (unscorable).

    1. Take the first sentence (up to the first ``.``, ``!``, ``?``, ``;`` or line break),
       lower-case it and split it into words (``n't`` counts as ``not``).
    2. First word yes-like (yes, yeah, yep, yup, correct, true, sure, certainly, definitely)
       -> "Yes"; no-like (no, nope, nah, false, incorrect) -> "No".
    3. Otherwise any negation (no, not, n't, none, never, nothing, nobody, neither, nor,
       cannot, without) -> "No"; else "yes" among the words -> "Yes"; else None.
    So "Yes." / " yes, there is" -> Yes; "No, there isn't" / "There is no dog" -> No;
    "There is a dog" -> None (no explicit answer: counted wrong, like the official rule).
    """
    text = str(reply).strip().strip("*\"'` ")
    first = re.split(r"[.!?;\n]", text, maxsplit=1)[0].lower().replace("n't", " not")
    words = re.findall(r"[a-z]+", first)
    if not words:
        return None
    if words[0] in _YES_WORDS:
        return "Yes"
    if words[0] in _NO_WORDS:
        return "No"
    if _NEGATIONS & set(words):
        return "No"
    if "yes" in words:
        return "Yes"
    return None


def _amber_pred(reply, normalization: str) -> str:
    if reply is None:  # no reply at all: unscorable under either rule (str(None) would read as a negation)
        return "other"
    if normalization == "official":  # inference.py: exact string comparison
        r = reply
    else:
        r = normalize_yes_no(reply)
    return {"Yes": "yes", "No": "no"}.get(r, "other")


def score_amber(items: Sequence[QAItem], answers, normalization: str = "official") -> dict[str, dict]:
    """AMBER metrics per group, positive class "no" (as the official ``inference.py``).

    ``normalization``: "official" (reply must equal "Yes" or "No" exactly; anything else
    is wrong and not a "no") or "lenient" (:func:`normalize_yes_no` first). Returns
    ``{group: metrics}`` for "overall", each kind present and each attribute subtype
    ("attribute-state", ...); every metrics dict holds accuracy, precision, recall, f1,
    yes_ratio, n, n_other (unscorable replies), ``positive_class`` and ``normalization``.
    """
    if normalization not in ("official", "lenient"):
        raise ValueError(f"normalization must be 'official' or 'lenient', got {normalization!r}")
    replies = _answers_for(items, answers)
    preds = [_amber_pred(r, normalization) for r in replies]
    groups: dict[str, list[int]] = {"overall": list(range(len(items)))}
    for i, it in enumerate(items):
        groups.setdefault(it.kind, []).append(i)
        if it.kind == "attribute" and it.subtype:
            groups.setdefault(f"attribute-{it.subtype}", []).append(i)
    out = {}
    for g, idx in groups.items():
        m = task_metrics([items[i].label for i in idx], [preds[i] for i in idx], positive="no")
        m["normalization"] = normalization
        out[g] = m
    return out


def build_world_amber(scene_list: Sequence[world.Scene], kind: str, seed: int = 0, per_image: int = 2,
                      stats: dict | None = None) -> Benchmark:
    """AMBER-style sets on world scenes (positive class "no", AMBER's wording "in this image").

    existence  ``per_image`` hallucination questions about absent categories, all "no",
               drawn with weight 1 + co-occurrence with the present ones (likely hallucinations).
    attribute  ``per_image`` yes/no pairs about one object each: colour ("Is the circle red
               in this image?"), size, or count ("Are there two stars in this image?").
    relation   per scene one "yes" and one "no" candidate (up to ``per_image`` of each),
               contact ("Is there direct contact between the circle and star?") or spatial
               ("Is the circle left of the star in this image?"); the larger class is then
               subsampled so yes and no are equal in number.
    """
    if kind not in AMBER_KINDS:
        raise ValueError(f"AMBER kind must be one of {AMBER_KINDS}, got {kind!r}")
    rng = np.random.default_rng([seed, AMBER_KINDS.index(kind)])
    stats = stats or world.world_statistics(scene_list)
    co = stats["cooccurrence"]
    rows: list[tuple] = []  # (scene, question, label, subtype, objects)
    for s in scene_list:
        if kind == "existence":
            present = s.categories()
            absent = [c for c in catalog.CATEGORIES if c not in present]
            w = np.array([1.0 + sum(co[p][c] for p in present) for c in absent])
            pick = rng.choice(len(absent), min(per_image, len(absent)), replace=False, p=w / w.sum())
            for i in pick:
                c = absent[i]
                rows.append((s, f"Is there {language.article(c)} {c} in this image?", "no", "", [c]))
        elif kind == "attribute":
            rows += _attribute_pairs(s, rng, per_image)
        else:
            rows += _relation_rows(s, rng, per_image)
    if kind == "relation":  # balance yes/no by subsampling the larger class
        yes = [r for r in rows if r[2] == "yes"]
        no = [r for r in rows if r[2] == "no"]
        n = min(len(yes), len(no))
        keep = {id(r) for group in (yes, no) for r in (group[i] for i in rng.choice(len(group), n, replace=False))}
        rows = [r for r in rows if id(r) in keep]
    items = [QAItem(f"{s.scene_id}-amber-{kind}-{k}", s.scene_id, q, label, f"amber-{kind}", kind, objs, sub)
             for k, (s, q, label, sub, objs) in enumerate(rows)]
    return Benchmark(f"amber-{kind}", "amber", items, scene_image_loader(scene_list), "no")


def _attribute_pairs(s: world.Scene, rng: np.random.Generator, n_pairs: int) -> list[tuple]:
    rows = []
    cands = []
    for c in sorted(s.categories()):
        if s.count(c) == 1:
            cands += [(c, "color"), (c, "size")]
        cands.append((c, "count"))
    for i in rng.permutation(len(cands))[:n_pairs]:
        c, sub = cands[i]
        if sub == "count":
            n = s.count(c)
            wrong = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
            for k, label in ((n, "yes"), (wrong, "no")):
                q = (f"Is there one {c} in this image?" if k == 1
                     else f"Are there {catalog.NUMBER_WORDS[k]} {language.plural(c)} in this image?")
                rows.append((s, q, label, sub, [c]))
            continue
        o = next(o for o in s.objects if o.category == c)
        true = o.color if sub == "color" else o.size
        options = [x for x in (catalog.COLOR_NAMES if sub == "color" else catalog.SIZES) if x != true]
        wrong = options[int(rng.integers(len(options)))]
        rows.append((s, f"Is the {c} {true} in this image?", "yes", sub, [c]))
        rows.append((s, f"Is the {c} {wrong} in this image?", "no", sub, [c]))
    return rows


def _relation_rows(s: world.Scene, rng: np.random.Generator, per_label: int) -> list[tuple]:
    by_label = {"yes": [], "no": []}
    for i in range(len(s.objects)):
        for j in range(len(s.objects)):
            a, b = language.object_phrase(s, i), language.object_phrase(s, j)
            if i == j or a is None or b is None or a == b:
                continue
            for rel in catalog.RELATIONS:
                if rel == "touching" and i > j:
                    continue  # symmetric: ask each pair once
                t = world.relation_truth(s, i, rel, j)
                if t is None:
                    continue
                q = (f"Is there direct contact between the {a} and {b}?" if rel == "touching"
                     else f"Is the {a} {rel} the {b} in this image?")
                by_label["yes" if t else "no"].append((s, q, "yes" if t else "no", rel, [a, b]))
    rows = []
    for label in ("yes", "no"):
        cands = by_label[label]
        rows += [cands[i] for i in rng.permutation(len(cands))[:per_label]]
    return rows


# =============================================================================== summaries
def benchmark_summary(bench: Benchmark) -> dict:
    """Composition of a benchmark: sizes, yes/no balance, kinds, subtypes, object frequencies."""
    items = bench.items
    labels = Counter(it.label for it in items)
    n = len(items)
    return {
        "name": bench.name,
        "family": bench.family,
        "positive_class": bench.positive_class,
        "n_items": n,
        "n_images": len(bench.image_ids()),
        "labels": dict(labels),
        "yes_share": labels.get("yes", 0) / n if n else float("nan"),
        "kinds": dict(Counter(it.kind for it in items)),
        "subtypes": dict(Counter(it.subtype for it in items if it.subtype)),
        "object_frequency": dict(Counter(o for it in items for o in it.objects).most_common()),
        "object_frequency_by_label": {
            lab: dict(Counter(o for it in items if it.label == lab for o in it.objects).most_common())
            for lab in sorted(labels)
        },
    }
