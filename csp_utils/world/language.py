"""Words about a scene: articles and plurals, captions, object phrases, and the world's yes/no questions."""

from __future__ import annotations

import numpy as np

from csp_utils.world.catalog import CATEGORIES, COLOR_NAMES, NUMBER_WORDS, RELATIONS
from csp_utils.world.schema import QAItem
from csp_utils.world.scenes import Scene, relation_truth


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


def caption(scene: Scene) -> str:
    """Objects left to right (then top to bottom): ``"a red circle, a small blue square"``.

    "small" is said, "large" is the unmarked default.
    """
    def key(o):
        x0, y0, x1, y1 = o.box
        return (x0 + x1, y0 + y1, o.category, o.color)

    parts = []
    for o in sorted(scene.objects, key=key):
        words = (["small"] if o.size == "small" else []) + [o.color, o.category]
        parts.append(f"{article(words[0])} {' '.join(words)}")
    return ", ".join(parts)


def object_phrase(scene: Scene, i: int) -> str | None:
    """The shortest unambiguous phrase for object i: its category, else colour + category."""
    o = scene.objects[i]
    if scene.count(o.category) == 1:
        return o.category
    if sum(p.name == o.name for p in scene.objects) == 1:
        return o.name
    return None


def _question_pool(scene: Scene, rng: np.random.Generator) -> dict[tuple[str, str], list[tuple]]:
    """Candidate (question, subtype, objects) per (kind, label)."""
    pool = {(k, l): [] for k in ("existence", "attribute", "relation") for l in ("yes", "no")}
    present = sorted(scene.categories())
    absent = [c for c in CATEGORIES if c not in present]
    names = sorted({o.name for o in scene.objects})
    tmpl = ("Is there {} in the image?", "Is there {} in this image?")  # POPE and AMBER wording

    def exist(label, phrase, sub):
        t = tmpl[int(rng.integers(2))]
        pool["existence", label].append((t.format(f"{article(phrase)} {phrase}"), sub, [phrase]))

    for c in present:
        exist("yes", c, "category")
    for c in absent:
        exist("no", c, "category")
    for nm in names:
        exist("yes", nm, "color")
    for c in present:  # hard negatives: a present shape in a colour it does not have
        have = {o.color for o in scene.objects if o.category == c}
        other = [k for k in COLOR_NAMES if k not in have]
        exist("no", f"{other[int(rng.integers(len(other)))]} {c}", "color")

    for c in present:
        n = scene.count(c)
        if n == 1:
            o = next(o for o in scene.objects if o.category == c)
            wrong_color = [k for k in COLOR_NAMES if k != o.color][int(rng.integers(len(COLOR_NAMES) - 1))]
            pool["attribute", "yes"].append((f"Is the {c} {o.color}?", "color", [c]))
            pool["attribute", "no"].append((f"Is the {c} {wrong_color}?", "color", [c]))
            other_size = "small" if o.size == "large" else "large"
            pool["attribute", "yes"].append((f"Is the {c} {o.size}?", "size", [c]))
            pool["attribute", "no"].append((f"Is the {c} {other_size}?", "size", [c]))
        ask = sorted({2, 3} | ({n} if n >= 2 else set()))
        for k in ask:
            q = f"Are there {NUMBER_WORDS[k]} {plural(c)} in the image?"
            pool["attribute", "yes" if k == n else "no"].append((q, "count", [c]))

    for i in range(len(scene.objects)):
        for j in range(len(scene.objects)):
            a, b = object_phrase(scene, i), object_phrase(scene, j)
            if i == j or a is None or b is None or a == b:
                continue
            for rel in RELATIONS:
                t = relation_truth(scene, i, rel, j)
                if t is not None:
                    pool["relation", "yes" if t else "no"].append((f"Is the {a} {rel} the {b}?", rel, [a, b]))
    return pool


def world_questions(scene: Scene, rng, n: int, set_name: str = "world-train",
                    weights: dict[str, float] | None = None) -> list:
    """Up to ``n`` distinct yes/no questions about a scene, alternating yes and no.

    Kinds: existence ("Is there a circle in the image?" / "... in this image?", also with a
    colour: "Is there a red circle in the image?"), attribute (colour "Is the circle red?",
    size "Is the circle small?", count "Are there two circles in the image?") and relation
    ("Is the circle left of the star?"; ambiguous pairs are never asked). ``weights``
    picks kinds (default existence 0.5, attribute 0.25, relation 0.25) among those that
    have a question of the wanted label left. Fewer than ``n`` come back when the scene
    runs out of questions. ``rng``: a numpy Generator or an int seed.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    weights = weights or {"existence": 0.5, "attribute": 0.25, "relation": 0.25}
    pool = _question_pool(scene, rng)
    return [QAItem(f"{scene.scene_id}-q{k:02d}", scene.scene_id, q, label, set_name, kind, objs, subtype=sub)
            for k, kind, label, (q, sub, objs) in draw_balanced(pool, rng, n, weights)]


def draw_balanced(pool: dict, rng: np.random.Generator, n: int, weights: dict[str, float]) -> list[tuple]:
    """Up to ``n`` candidates drawn from ``pool`` (``{(kind, label): [candidate, ...]}``, drawn
    ones removed), labels alternating yes and no from a random first one, each falling back
    to the other label when its own is used up; kinds by ``weights`` among those with a
    candidate of the label left. Returns ``(k, kind, label, candidate)`` per draw."""
    drawn, first = [], int(rng.integers(2))
    for k in range(n):
        want = ("yes", "no")[(k + first) % 2]
        for label in (want, "no" if want == "yes" else "yes"):
            kinds = [kd for kd in weights if weights[kd] > 0 and pool.get((kd, label))]
            if kinds:
                break
        else:
            break
        w = np.array([weights[kd] for kd in kinds], float)
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        cands = pool[kind, label]
        drawn.append((k, kind, label, cands.pop(int(rng.integers(len(cands))))))
    return drawn
