"""The procedural object world: rendering, ground truth, statistics, splits, variants, I/O."""

import hashlib
import re

import numpy as np
import pytest

from csp_utils.world import scenes as W, catalog, scene_io, language, degradations, patch_labels, rendering


@pytest.fixture(scope="module")
def eval_scenes():
    return W.make_scenes("eval", 300)


def _hash(scene):
    return hashlib.sha1(scene.image.tobytes()).hexdigest()


def _same(a: W.Scene, b: W.Scene) -> bool:
    if (a.scene_id, a.split, a.index, a.variant, a.severity, a.meta) != (b.scene_id, b.split, b.index, b.variant, b.severity, b.meta):
        return False
    if a.image.dtype != b.image.dtype or not np.array_equal(a.image, b.image) or len(a.objects) != len(b.objects):
        return False
    return all(
        (p.category, p.color, p.size, tuple(p.box)) == (q.category, q.color, q.size, tuple(q.box))
        and p.mask.dtype == q.mask.dtype == bool and np.array_equal(p.mask, q.mask)
        for p, q in zip(a.objects, b.objects)
    )


def test_vocabulary():
    assert len(catalog.CATEGORIES) >= 12 and len(set(catalog.CATEGORIES)) == len(catalog.CATEGORIES)
    assert 6 <= len(catalog.COLORS) <= 8 and catalog.SIZES == ("small", "large")
    assert set(catalog.RELATIONS) == {"left of", "right of", "above", "below", "touching"}
    members = [c for t in catalog.THEMES.values() for c in t]
    assert sorted(members) == sorted(catalog.CATEGORIES)  # every category in exactly one theme
    rgb = np.array(list(catalog.COLORS.values()), float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert dist[~np.eye(len(rgb), dtype=bool)].min() > 60  # well separated colours


def test_scene_ground_truth(eval_scenes):
    cfg = W.WorldConfig()
    for s in eval_scenes[:80]:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.split == "eval" and s.scene_id == f"eval-{s.index:06d}" and s.variant == "clean"
        assert cfg.min_objects <= len(s.objects) <= cfg.max_objects
        cover = np.zeros((64, 64), int)
        for o in s.objects:
            assert o.category in catalog.CATEGORIES and o.color in catalog.COLORS and o.size in catalog.SIZES
            assert o.mask.shape == (64, 64) and o.mask.dtype == bool and o.mask.any()
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert o.name == f"{o.color} {o.category}"
            # interior pixels (not on an anti-aliased rim) show the object's colour
            inner = o.mask.copy()
            inner[1:-1, 1:-1] &= o.mask[:-2, 1:-1] & o.mask[2:, 1:-1] & o.mask[1:-1, :-2] & o.mask[1:-1, 2:]
            if inner[1:-1, 1:-1].any():
                med = np.median(s.image[1:-1, 1:-1][inner[1:-1, 1:-1]].astype(float), axis=0)
                assert np.abs(med - catalog.COLORS[o.color]).max() <= 12, (s.scene_id, o.name, med)
            cover += o.mask
        assert cover.max() <= 1  # visible masks never overlap
        assert s.categories() == {o.category for o in s.objects}
    sizes = {o.size: [] for o in eval_scenes[0].objects}
    for s in eval_scenes:
        for o in s.objects:
            sizes.setdefault(o.size, []).append(o.box[2] - o.box[0])
    assert np.median(sizes["large"]) > 1.6 * np.median(sizes["small"])


def test_deterministic_and_seeded():
    a, b = W.make_scene("csp", 17), W.make_scene("csp", 17)
    assert _same(a, b)
    c = W.make_scene("csp", 17, W.WorldConfig(seed=1))
    assert not np.array_equal(a.image, c.image)
    assert [s.scene_id for s in W.make_scenes("base", 3, start=10)] == ["base-000010", "base-000011", "base-000012"]
    with pytest.raises(ValueError, match="split"):
        W.make_scene("train", 0)


def test_splits_disjoint(eval_scenes):
    n = 300
    by_split = {"eval": eval_scenes, "base": W.make_scenes("base", n), "csp": W.make_scenes("csp", n)}
    ids = {k: {s.scene_id for s in v} for k, v in by_split.items()}
    hashes = {k: {_hash(s) for s in v} for k, v in by_split.items()}
    for k in by_split:
        assert len(ids[k]) == n and len(hashes[k]) == n  # no repeats inside a split either
        for j in by_split:
            if j != k:
                assert not ids[k] & ids[j] and not hashes[k] & hashes[j], (k, j)
    assert W.parse_scene_id("eval-000042") == ("eval", 42, "clean", 0.0)
    assert W.parse_scene_id("csp-000007~low_light-0.50") == ("csp", 7, "low_light", 0.5)


def test_frequency_skew_and_cooccurrence(eval_scenes):
    st = W.world_statistics(eval_scenes)
    freq = st["image_frequency"]
    top, bottom = catalog.CATEGORIES[:4], catalog.CATEGORIES[-4:]
    assert sum(freq[c] for c in top) > 2 * sum(freq[c] for c in bottom)
    # categories of a theme co-occur more often than categories of different themes
    theme = {c: t for t, cs in catalog.THEMES.items() for c in cs}
    same, other = [], []
    for a in catalog.CATEGORIES:
        for b in catalog.CATEGORIES:
            if a < b:
                rate = st["cooccurrence"][a][b] / max(1, min(freq[a], freq[b]))
                (same if theme[a] == theme[b] else other).append(rate)
    assert np.mean(same) > 2 * np.mean(other)
    assert sum(s.count(o.category) > 1 for s in eval_scenes for o in s.objects) > 0  # counts > 1 occur


def _two_object_scene(box_a, box_b, shape=(40, 40)):
    objs = []
    for cat, (x0, y0, x1, y1) in (("circle", box_a), ("square", box_b)):
        m = np.zeros(shape, bool)
        m[y0:y1, x0:x1] = True
        objs.append(W.WorldObject(cat, "red", "large", (x0, y0, x1, y1), m))
    return W.Scene("eval-000000", "eval", 0, np.zeros((*shape, 3), np.uint8), objs, meta={"relation_margin": 2})


def test_relations_from_boxes():
    s = _two_object_scene((2, 2, 10, 10), (14, 20, 22, 28))  # a left of and above b, apart
    t = lambda i, r, j: W.relation_truth(s, i, r, j)
    assert t(0, "left of", 1) is True and t(1, "right of", 0) is True and t(0, "above", 1) is True
    assert t(0, "right of", 1) is False and t(0, "below", 1) is False and t(0, "touching", 1) is False
    assert set(s.relations()) == {(0, "left of", 1), (0, "above", 1), (1, "right of", 0), (1, "below", 0)}
    s = _two_object_scene((2, 2, 10, 10), (11, 2, 19, 10))  # one-pixel gap: thinner than the margin
    assert W.relation_truth(s, 0, "left of", 1) is None and W.relation_truth(s, 0, "touching", 1) is None
    s = _two_object_scene((2, 2, 10, 10), (10, 4, 18, 12))  # adjacent: touching, left/right ambiguous
    assert W.relation_truth(s, 0, "touching", 1) is True and W.relation_truth(s, 0, "left of", 1) is None
    assert W.relation_truth(s, 0, "above", 1) is None  # vertical ranges overlap


def test_save_load_roundtrip(tmp_path, eval_scenes):
    originals = eval_scenes[:12] + [degradations.degrade(eval_scenes[0], "occlusion", 0.7),
                                    degradations.degrade(eval_scenes[1], "clutter", 0.5)]
    path = scene_io.save_scenes(originals, tmp_path / "world")
    assert path.name == "annotations.json" and len(list((tmp_path / "world" / "images").glob("*.png"))) == 14
    loaded = scene_io.load_scenes(tmp_path / "world")
    assert len(loaded) == len(originals) and all(_same(a, b) for a, b in zip(originals, loaded))
    with pytest.raises(FileNotFoundError, match="annotations.json"):
        scene_io.load_scenes(tmp_path)


def _diff(a, b):
    return float(np.abs(a.image.astype(float) - b.image.astype(float)).mean())


@pytest.mark.parametrize("kind", catalog.DEGRADATIONS + catalog.HELD_OUT_DEGRADATIONS)
def test_degrade_severity(kind, eval_scenes):
    pool = [s for s in eval_scenes[:60] if len(s.objects) >= 2][:6]
    for s in pool:
        zero = degradations.degrade(s, kind, 0.0)
        assert np.array_equal(zero.image, s.image) and zero.variant == kind and zero.severity == 0.0
        assert all(np.array_equal(o.mask, p.mask) for o, p in zip(zero.objects, s.objects))
        levels = [degradations.degrade(s, kind, v) for v in (0.25, 0.5, 0.75, 1.0)]
        d = [_diff(s, v) for v in levels]
        assert d[0] > 0 and d[-1] > d[0]
        assert all(b >= a * 0.9 for a, b in zip(d, d[1:])), (kind, d)  # monotone, give or take
        assert levels[1].scene_id == f"{s.scene_id}~{kind}-0.50"
        assert np.array_equal(degradations.degrade(s, kind, 0.5).image, levels[1].image)  # deterministic
        for v in levels:
            assert [o.category for o in v.objects] == [o.category for o in s.objects]
            for o in v.objects:
                assert o.mask.any()
                ys, xs = np.nonzero(o.mask)
                assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        area = lambda sc: sum(o.mask.sum() for o in sc.objects)
        if kind in ("small", "occlusion"):
            assert area(levels[-1]) < 0.7 * area(s) and area(levels[-1]) <= area(levels[0])
        else:  # pixels change, objects stay where they were
            assert area(levels[-1]) == area(s)
        if kind == "occlusion":
            assert all((o.mask <= p.mask).all() for o, p in zip(levels[-1].objects, s.objects))


def test_the_held_out_degradations_are_in_no_set_of_the_suite():
    from csp_utils.evaluate import suites

    held_out = set(catalog.HELD_OUT_DEGRADATIONS)
    assert held_out and not held_out & set(catalog.DEGRADATIONS)
    assert not held_out & set(suites.SuiteConfig().transfer_kinds)


def test_degrade_errors(eval_scenes):
    s = eval_scenes[0]
    with pytest.raises(ValueError, match="kind"):
        degradations.degrade(s, "noise", 0.5)
    with pytest.raises(ValueError, match="severity"):
        degradations.degrade(s, "blur", 1.5)
    with pytest.raises(ValueError, match="clean"):
        degradations.degrade(degradations.degrade(s, "blur", 0.5), "small", 0.5)


def _check_question(scene, item):
    """Recompute the label of a world question from the scene's ground truth."""
    q, cats = item.question, scene.categories()
    names = {o.name for o in scene.objects}
    if m := re.match(r"^Is there an? (.+) in (?:the|this) image\?$", q):
        phrase = m.group(1)
        truth = phrase in (names if " " in phrase else cats)
    elif m := re.match(r"^Are there (\w+) (\w+) in the image\?$", q):
        n = {v: k for k, v in catalog.NUMBER_WORDS.items()}[m.group(1)]
        truth = scene.count(item.objects[0]) == n
    elif m := re.match(r"^Is the (\w+) (\w+)\?$", q):
        o = next(o for o in scene.objects if o.category == m.group(1))
        truth = m.group(2) in (o.color, o.size)
    elif m := re.match(r"^Is the (.+) (left of|right of|above|below|touching) the (.+)\?$", q):
        find = lambda p: next(i for i, o in enumerate(scene.objects) if p in (o.name, o.category) and language.object_phrase(scene, i) == p)
        truth = W.relation_truth(scene, find(m.group(1)), m.group(2), find(m.group(3)))
    else:
        raise AssertionError(f"unexpected question {q!r}")
    return "yes" if truth else "no"


def test_world_questions(eval_scenes):
    rng = np.random.default_rng(0)
    items = []
    for s in eval_scenes[:150]:
        qs = language.world_questions(s, rng, 8)
        assert len(qs) == 8 and len({q.question for q in qs}) == 8
        for q in qs:
            assert q.image_id == s.scene_id and q.set == "world-train" and q.objects
            assert q.label == _check_question(s, q), (s.scene_id, q.question, q.label)
        items += qs
    labels = [q.label for q in items]
    assert abs(labels.count("yes") / len(labels) - 0.5) < 0.05
    kinds = {q.kind for q in items}
    assert kinds == {"existence", "attribute", "relation"}
    assert {q.subtype for q in items if q.kind == "attribute"} == {"color", "size", "count"}
    assert any(" in this image?" in q.question for q in items) and any(" in the image?" in q.question for q in items)
    again = language.world_questions(eval_scenes[0], np.random.default_rng(3), 8)
    assert [q.question for q in again] == [q.question for q in language.world_questions(eval_scenes[0], 3, 8)]


def test_caption(eval_scenes):
    for s in eval_scenes[:40]:
        parts = language.caption(s).split(", ")
        assert len(parts) == len(s.objects)
        centres = sorted((o.box[0] + o.box[2], o.box[1] + o.box[3], o.category, o.color) for o in s.objects)
        for part, (_, _, cat, col) in zip(parts, centres):
            assert part.endswith(f"{col} {cat}") and part.split()[0] in ("a", "an")
    s = _two_object_scene((20, 2, 28, 10), (2, 2, 10, 10))
    s.objects[1].size, s.objects[1].color = "small", "orange"
    assert language.caption(s) == "a small orange square, a red circle"


def test_scene_labels(eval_scenes):
    for s in eval_scenes[:20]:
        cat, col = patch_labels.scene_labels(s, 8)
        assert cat.shape == col.shape == (8, 8) and cat.dtype == np.int64
        assert ((cat == -1) == (col == -1)).all()
        present = {catalog.CATEGORIES.index(c) for c in s.categories()}
        assert set(cat[cat >= 0].tolist()) <= present
        for o in s.objects:  # a patch entirely inside the object takes its labels
            full = o.mask.reshape(8, 8, 8, 8).all(axis=(1, 3))
            assert (cat[full] == catalog.CATEGORIES.index(o.category)).all()
            assert (col[full] == catalog.COLOR_NAMES.index(o.color)).all()
    with pytest.raises(ValueError, match="patch"):
        patch_labels.scene_labels(eval_scenes[0], 7)


def test_rendering_draws_each_shape_once_and_tests_pixels_in_bulk():
    """What rendering's speed rests on (timings: scripts/bench_rendering.py): a shape's alpha is
    computed once per category and side and reused by every later scene, and the polygon test
    covers the whole grid at once, agreeing with a point-by-point test."""
    from matplotlib.path import Path as PolygonPath

    rendering._template.cache_clear()
    made = W.make_scenes("base", 200, start=100_000)
    layouts = [o for s in made for o in s.meta["layout"]]
    drawn = {(o["category"], o["side"]) for o in layouts}
    assert rendering._template.cache_info().misses == len(drawn) < len(layouts) / 3
    W.make_scenes("base", 200, start=100_000)
    assert rendering._template.cache_info().misses == len(drawn)  # drawn again: every shape from the cache
    u, v = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64))
    points = np.column_stack([u.ravel(), v.ravel()])
    for corners in (rendering._star_points(), [(0, -0.92), (0.95, 0.82), (-0.95, 0.82)]):
        one_by_one = PolygonPath(corners).contains_points(points).reshape(u.shape)
        assert np.array_equal(rendering._polygon(u, v, corners), one_by_one)
