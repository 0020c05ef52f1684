"""POPE and AMBER: the official files, official scoring, and the world-built sets."""

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from csp_utils.world import benchmarks, scenes as W, catalog
from csp_utils.world.schema import QAItem


# ------------------------------------------------------------- the vendored official files
def test_vendored_files_are_inside_the_package_and_unchanged():
    import hashlib

    import csp_utils

    package = Path(csp_utils.__file__).resolve().parent
    assert benchmarks.BENCHMARK_DIR.is_relative_to(package)
    assert (benchmarks.pope_dir(), benchmarks.amber_dir()) == (benchmarks.BENCHMARK_DIR / "pope", benchmarks.BENCHMARK_DIR / "amber")
    sums = {}
    for line in (benchmarks.BENCHMARK_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name] = digest
    on_disk = {f"{p.parent.name}/{p.name}" for d in (benchmarks.pope_dir(), benchmarks.amber_dir()) for p in d.iterdir()}
    assert on_disk == set(sums)  # every vendored file is checked, nothing unlisted beside them
    assert {"pope/LICENSE", "amber/LICENSE"} <= on_disk
    for name, digest in sums.items():
        assert hashlib.sha256((benchmarks.BENCHMARK_DIR / name).read_bytes()).hexdigest() == digest, name


def test_loaders_read_the_vendored_folders():
    for kind in benchmarks.POPE_KINDS:
        assert len(benchmarks.load_pope(benchmarks.pope_dir(), None, split_name=kind).items) == 3000
    amber = benchmarks.load_amber(benchmarks.amber_dir(), None)
    assert {k: len(b.items) for k, b in amber.items()} == {"existence": 4924, "attribute": 7628, "relation": 1664}


def test_paper_params_use_the_vendored_folders():
    # notebooks run with the repository as working directory, so relative folders resolve there
    import yaml

    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params" / "paper.yaml").read_text())  # study-wide, so --set reaches them
    assert (repo / params["pope_dir"]).resolve() == benchmarks.pope_dir()
    assert (repo / params["amber_dir"]).resolve() == benchmarks.amber_dir()


# ------------------------------------------------------------------------ official POPE
@pytest.mark.parametrize("kind", benchmarks.POPE_KINDS)
def test_load_official_pope(benchmarks_dir, kind):
    b = benchmarks.load_pope(benchmarks_dir / "pope" / f"coco_pope_{kind}.json", "/no/such/folder")
    assert (b.name, b.family, b.positive_class) == (f"coco-pope-{kind}", "pope", "yes")
    assert len(b.items) == 3000 and len(b.image_ids()) == 500
    assert Counter(it.label for it in b.items) == {"yes": 1500, "no": 1500}
    assert all(it.set == f"pope-{kind}" and it.kind == "existence" and len(it.objects) == 1 for it in b.items)
    first = b.items[0]
    assert (first.question_id, first.image_id, first.question, first.label, first.objects) == (
        "1", "COCO_val2014_000000310196.jpg", "Is there a snowboard in the image?", "yes", ["snowboard"])
    per_image = Counter(it.image_id for it in b.items)
    assert set(per_image.values()) == {6}


def test_pope_other_forms(benchmarks_dir, tmp_path):
    path = benchmarks_dir / "pope" / "coco_pope_popular.json"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:12]
    ref = benchmarks.load_pope(path, tmp_path)
    # a JSON array, an open file, a folder + split name, and field aliases
    (tmp_path / "arr_popular.json").write_text(json.dumps(rows))
    b1 = benchmarks.load_pope(tmp_path / "arr_popular.json", tmp_path)
    b2 = benchmarks.load_pope(io.StringIO("\n".join(json.dumps(r) for r in rows)), tmp_path, split_name="popular")
    b3 = benchmarks.load_pope(benchmarks_dir / "pope", tmp_path, split_name="popular")
    aliased = [{"question_id": r["question_id"], "image": r["image"], "question": r["text"], "answer": r["label"].capitalize()}
               for r in rows]
    b4 = benchmarks.load_pope(io.StringIO(json.dumps(aliased)), tmp_path, split_name="popular")
    for b in (b1, b2, b3, b4):
        assert [(i.question_id, i.image_id, i.question, i.label, i.set) for i in b.items[:12]] == [
            (i.question_id, i.image_id, i.question, i.label, i.set) for i in ref.items[:12]]
    with pytest.raises(ValueError, match="split_name"):
        benchmarks.load_pope(benchmarks_dir / "pope", tmp_path)
    with pytest.raises(ValueError, match="label"):
        benchmarks.load_pope(io.StringIO(json.dumps([{"image": "x.jpg", "text": "Is there a cat in the image?"}])), tmp_path)


def test_pope_missing_image_error(benchmarks_dir, tmp_path):
    b = benchmarks.load_pope(benchmarks_dir / "pope" / "coco_pope_random.json", tmp_path)  # loads lazily: no error yet
    name = b.items[0].image_id
    with pytest.raises(FileNotFoundError) as e:
        b.image_loader(name)
    assert name in str(e.value) and "image_folder" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"missing .*all 500"):
        b.check_images()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / name)
    img = b.image_loader(name)
    assert img.mode == "RGB" and img.size == (8, 6)
    for i in b.image_ids():  # all present and decodable: the up-front check passes
        if i != name:
            Image.new("RGB", (4, 4)).save(tmp_path / i, format="JPEG")
    b.check_images(progress=False)
    nofolder = benchmarks.load_pope(benchmarks_dir / "pope" / "coco_pope_random.json", None)
    with pytest.raises(FileNotFoundError, match="image_folder"):
        nofolder.image_loader(name)
    with pytest.raises(FileNotFoundError, match="image_folder"):
        nofolder.check_images()


def _pope_file(tmp_path, rows, name="dup_random.json"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _pope_row(qid, image="a.jpg", label="yes"):
    return {"question_id": qid, "image": image, "text": "Is there a dog in the image?", "label": label}


def test_check_images_decodes_every_image_and_names_each_bad_one(tmp_path):
    images = ["ok.jpg", "truncated.jpg", "garbage.jpg", "ok2.png"]
    path = _pope_file(tmp_path, [_pope_row(i + 1, im) for i, im in enumerate(images)], "t_random.json")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg", quality=90)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok2.png")
    good = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])  # the header is intact
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    b = benchmarks.load_pope(path, tmp_path)
    with pytest.raises(benchmarks.BadImageError) as e:
        b.check_images(progress=False)
    msg = str(e.value)
    assert "truncated.jpg" in msg and "garbage.jpg" in msg and "2 of 4" in msg
    assert "ok.jpg (" not in msg and "ok2.png" not in msg
    with pytest.raises(OSError):  # what evaluation would otherwise meet mid-run
        b.image_loader("truncated.jpg")
    (tmp_path / "truncated.jpg").write_bytes(good)
    (tmp_path / "garbage.jpg").write_bytes(good)
    b.check_images(progress=False)


def test_benchmark_images_with_transparency_load_composited_onto_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    b = benchmarks.load_pope(_pope_file(tmp_path, [_pope_row(1, "a.png")], "t_random.json"), tmp_path)
    arr = np.asarray(b.image_loader("a.png"))
    assert (arr[:2] == [200, 0, 0]).all() and (arr[2:] == 255).all()


def test_duplicate_question_ids_are_refused_at_load(tmp_path, benchmarks_dir):
    rows = [_pope_row(1), _pope_row(2), _pope_row(1, label="no"), _pope_row(3), _pope_row(3)]
    path = _pope_file(tmp_path, rows)
    with pytest.raises(ValueError, match=r"dup_random.json.*'1' \(x2\), '3' \(x2\)"):
        benchmarks.load_pope(path, tmp_path)
    # AMBER: a query file that repeats an id
    (tmp_path / "amber").mkdir()
    (tmp_path / "amber" / "annotations.json").symlink_to(benchmarks_dir / "amber" / "annotations.json")
    queries = json.loads((benchmarks_dir / "amber" / "query_discriminative-existence.json").read_text())[:5]
    (tmp_path / "amber" / "query_discriminative-existence.json").write_text(json.dumps(queries + queries[1:2]))
    with pytest.raises(ValueError, match=f"'{queries[1]['id']}' \\(x2\\)"):
        benchmarks.load_amber(tmp_path / "amber", tmp_path, types=("existence",))
    # sets built in code (the world's) go through the same check
    item = QAItem("q1", "s1", "Is there a star in the image?", "yes", "pope-random", "existence", ["star"])
    with pytest.raises(ValueError, match="'q1'"):
        benchmarks.Benchmark("pope-random", "pope", [item, item], lambda i: None, "yes")


def test_score_pope_counts_a_missing_reply_as_unanswered():
    items = [QAItem(str(i), "img", "Is there a cat in the image?", lab, "pope-random", "existence", ["cat"])
             for i, lab in enumerate(["yes", "yes", "no", "no"])]
    m = benchmarks.score_pope(items, ["Yes", None, "No", None])
    # pred yes, -, no, -: the two missing replies are wrong and not "yes"
    assert m["unanswered"] == 2 and m["n_other"] == 2
    assert m["accuracy"] == pytest.approx(2 / 4) and m["yes_ratio"] == pytest.approx(1 / 4)
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(1 / 2)
    # real replies keep the official rule, quirks included: "" and "None" are read as "yes"
    real = benchmarks.score_pope(items, ["Yes", "", "No", "None"])
    assert real["unanswered"] == 0 and real["yes_ratio"] == pytest.approx(3 / 4)
    # AMBER too: a missing reply is unscorable under both rules (not a "no" through str(None))
    amber_items = [QAItem("1", "i", "q", "no", "amber-existence", "existence", [])]
    for rule in ("official", "lenient"):
        assert benchmarks.score_amber(amber_items, [None], normalization=rule)["overall"]["accuracy"] == 0.0


def test_pope_parse_official_rule():
    cases = {
        "No, there is not.": "no", "Yes, there is a dog.": "yes", "I do not think so": "no",
        "No": "no", "no": "no", "Yes": "yes", "There is a dog. No doubt.": "yes",  # first sentence only
        "No.": "no", "not sure": "no", "Nope": "yes", "no\n": "no", " Yes": "yes",
        "There is no, dog": "no",  # commas are dropped before splitting
        "Now I see it": "yes",
    }
    for answer, expected in cases.items():
        assert benchmarks.pope_parse(answer) == expected, answer


def test_score_pope_hand_case():
    items = [QAItem(str(i), "img", "Is there a cat in the image?", lab, "pope-random", "existence", ["cat"])
             for i, lab in enumerate(["yes", "yes", "yes", "no", "no", "no"])]
    answers = ["Yes.", "No, there is not.", "Yes", "Yes, there is.", "No", "I do not see one"]
    m = benchmarks.score_pope(items, answers)
    # pred yes,no,yes,yes,no,no: TP 2, FN 1, FP 1, TN 2
    assert m["accuracy"] == pytest.approx(4 / 6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6) and m["positive_class"] == "yes" and m["rule"] == "pope-official"
    assert m["unanswered"] == 0
    assert benchmarks.score_pope(items, {it.question_id: a for it, a in zip(items, answers)}) == m
    with pytest.raises(ValueError, match="answers"):
        benchmarks.score_pope(items, answers[:5])


# ----------------------------------------------------------------------- official AMBER
@pytest.fixture(scope="module")
def amber(benchmarks_dir):
    return benchmarks.load_amber(benchmarks_dir / "amber", "/no/such/folder")


def test_load_official_amber(amber):
    assert set(amber) == set(benchmarks.AMBER_KINDS)
    ex, at, rel = amber["existence"], amber["attribute"], amber["relation"]
    assert all(b.family == "amber" and b.positive_class == "no" for b in amber.values())
    assert len(ex.items) == 4924 and {it.label for it in ex.items} == {"no"}
    assert Counter(it.label for it in rel.items) == {"yes": 975, "no": 689}
    assert Counter((it.subtype, it.label) for it in at.items) == {
        ("state", "yes"): 2382, ("state", "no"): 2382, ("number", "yes"): 1036, ("number", "no"): 1036,
        ("action", "yes"): 396, ("action", "no"): 396}
    assert ex.items[0].question == "Is there a cloud in this image?" and ex.items[0].objects == ["cloud"]
    assert rel.items[0].objects == ["person", "grass"] and rel.items[0].image_id == "AMBER_1.jpg"
    assert all(len(it.objects) == 2 for it in rel.items) and all(it.objects for it in at.items)
    with pytest.raises(FileNotFoundError, match="AMBER_1.jpg"):
        ex.image_loader("AMBER_1.jpg")


def test_amber_from_combined_query_file(benchmarks_dir, amber, tmp_path):
    # the official repository layout, with only query_discriminative.json
    (tmp_path / "data" / "query").mkdir(parents=True)
    (tmp_path / "data" / "annotations.json").symlink_to(benchmarks_dir / "amber" / "annotations.json")
    (tmp_path / "data" / "query" / "query_discriminative.json").symlink_to(
        benchmarks_dir / "amber" / "query_discriminative.json")
    combined = benchmarks.load_amber(tmp_path, tmp_path, types=("relation", "existence"))
    for t in ("relation", "existence"):
        assert [(i.question_id, i.label) for i in combined[t].items] == [(i.question_id, i.label) for i in amber[t].items]
    with pytest.raises(FileNotFoundError, match="annotations.json"):
        benchmarks.load_amber(tmp_path / "data" / "query", tmp_path)


def test_normalize_yes_no():
    cases = {"Yes": "Yes", "Yes.": "Yes", " yes, there is": "Yes", "**No**": "No", "No, there isn't.": "No",
             "There is no dog.": "No", "I don't think so": "No", "Nope": "No", "Correct.": "Yes",
             "There is a dog in the image.": None, "": None, "Yes. No.": "Yes"}
    for reply, expected in cases.items():
        assert benchmarks.normalize_yes_no(reply) == expected, reply


def test_score_amber_official_and_lenient():
    labels = ["no", "no", "yes", "yes", "no", "yes"]
    items = [QAItem(str(i), "img", "q?", lab, "amber-attribute", "attribute", ["x"], sub)
             for i, (lab, sub) in enumerate(zip(labels, ["state", "state", "state", "number", "number", "number"]))]
    answers = ["No", "No.", "Yes", "no", "Yes", "Yes"]
    off = benchmarks.score_amber(items, answers)  # exact match: "No." and "no" are neither Yes nor No
    o = off["overall"]
    # preds no, other, yes, other, yes, yes; positive "no": TP 1, FN 2, FP 0 -> P 1, R 1/3
    assert o["accuracy"] == pytest.approx(3 / 6) and o["precision"] == pytest.approx(1.0)
    assert o["recall"] == pytest.approx(1 / 3) and o["f1"] == pytest.approx(0.5) and o["n_other"] == 2
    assert o["positive_class"] == "no" and o["normalization"] == "official"
    assert set(off) == {"overall", "attribute", "attribute-state", "attribute-number"}
    assert off["attribute-state"]["n"] == 3 and off["attribute-state"]["accuracy"] == pytest.approx(2 / 3)
    len_ = benchmarks.score_amber(items, answers, normalization="lenient")["overall"]
    # preds no, no, yes, no, yes, yes: TP 2, FN 1, FP 1
    assert len_["accuracy"] == pytest.approx(4 / 6) and len_["precision"] == pytest.approx(2 / 3)
    assert len_["n_other"] == 0 and len_["normalization"] == "lenient"
    with pytest.raises(ValueError, match="normalization"):
        benchmarks.score_amber(items, answers, normalization="fuzzy")


# ---------------------------------------------------------------------------- world sets
@pytest.fixture(scope="module")
def pope_world():
    return benchmarks.pope_scenes(120)


def test_pope_scenes(pope_world):
    assert len(pope_world) == 120 and all(len(s.categories()) >= 3 for s in pope_world)
    idx = [s.index for s in pope_world]
    assert idx == sorted(idx) and all(s.split == "eval" for s in pope_world)
    skipped = set(range(idx[-1])) - set(idx)
    assert all(len(W.make_scene("eval", i).categories()) < 3 for i in sorted(skipped)[:20])


def test_world_pope(pope_world):
    stats = W.world_statistics(pope_world)
    sets = {k: benchmarks.build_world_pope(pope_world, k, seed=0) for k in benchmarks.POPE_KINDS}
    negs = {}
    for k, b in sets.items():
        assert (b.name, b.family, b.positive_class) == (f"pope-{k}", "pope", "yes")
        assert len(b.items) == 6 * len(pope_world) and set(Counter(i.image_id for i in b.items).values()) == {6}
        assert Counter(i.label for i in b.items) == {"yes": 3 * len(pope_world), "no": 3 * len(pope_world)}
        assert [i.label for i in b.items[:6]] == ["yes", "no"] * 3  # interleaved like the official files
        by_id = {s.scene_id: s for s in pope_world}
        for it in b.items:
            assert re.match(r"^Is there an? \w+ in the image\?$", it.question)
            assert (it.objects[0] in by_id[it.image_id].categories()) == (it.label == "yes")
        assert len({i.question_id for i in b.items}) == len(b.items)
        negs[k] = [(by_id[i.image_id], i.objects[0]) for i in b.items if i.label == "no"]
    # the three sets share their positives, as the official ones do
    pos = {k: [(i.image_id, i.question) for i in b.items if i.label == "yes"] for k, b in sets.items()}
    assert pos["random"] == pos["popular"] == pos["adversarial"]
    freq = lambda k: np.mean([stats["image_frequency"][c] for _, c in negs[k]])
    co = lambda k: np.mean([sum(stats["cooccurrence"][p][c] for p in s.categories()) for s, c in negs[k]])
    assert freq("popular") > 1.3 * freq("random")
    assert co("adversarial") > 1.3 * co("random")
    img = sets["random"].image_loader(pope_world[0].scene_id)
    assert img.size == (64, 64) and np.array_equal(np.asarray(img), pope_world[0].image)
    with pytest.raises(KeyError, match="not among"):
        sets["random"].image_loader("eval-999999")
    with pytest.raises(ValueError, match="pope_scenes"):
        benchmarks.build_world_pope([s for s in W.make_scenes("eval", 30) if len(s.categories()) < 3][:2], "random")
    with pytest.raises(ValueError, match="kind"):
        benchmarks.build_world_pope(pope_world, "hard")


def test_world_amber(pope_world):
    by_id = {s.scene_id: s for s in pope_world}
    ex = benchmarks.build_world_amber(pope_world, "existence")
    assert ex.name == "amber-existence" and ex.positive_class == "no" and len(ex.items) == 2 * len(pope_world)
    assert all(i.label == "no" and i.objects[0] not in by_id[i.image_id].categories() for i in ex.items)
    assert all(i.question.endswith(" in this image?") for i in ex.items)
    at = benchmarks.build_world_amber(pope_world, "attribute")
    assert Counter(i.label for i in at.items) == {"yes": 2 * len(pope_world), "no": 2 * len(pope_world)}
    assert {i.subtype for i in at.items} == {"color", "size", "count"}
    for i in at.items:
        s = by_id[i.image_id]
        if m := re.match(r"^Is the (\w+) (\w+) in this image\?$", i.question):
            o = next(o for o in s.objects if o.category == m.group(1))
            assert (m.group(2) in (o.color, o.size)) == (i.label == "yes"), i.question
        else:
            word = re.match(r"^(?:Is|Are) there (\w+) ", i.question).group(1)
            n = {v: k for k, v in catalog.NUMBER_WORDS.items()}[word]
            assert (s.count(i.objects[0]) == n) == (i.label == "yes"), i.question
    rel = benchmarks.build_world_amber(pope_world, "relation")
    labels = Counter(i.label for i in rel.items)
    assert labels["yes"] == labels["no"] > len(pope_world) // 2
    assert any(i.question.startswith("Is there direct contact between") for i in rel.items)
    assert all(len(i.objects) == 2 for i in rel.items)
    # deterministic under the seed
    again = benchmarks.build_world_amber(pope_world, "relation")
    assert [(i.question_id, i.question) for i in again.items] == [(i.question_id, i.question) for i in rel.items]


def test_benchmark_summary(pope_world, amber):
    s = benchmarks.benchmark_summary(benchmarks.build_world_pope(pope_world, "popular"))
    assert s["n_items"] == 6 * len(pope_world) and s["n_images"] == len(pope_world)
    assert s["labels"] == {"yes": 3 * len(pope_world), "no": 3 * len(pope_world)} and s["yes_share"] == 0.5
    assert sum(s["object_frequency"].values()) == s["n_items"] and s["kinds"] == {"existence": s["n_items"]}
    a = benchmarks.benchmark_summary(amber["attribute"])
    assert a["subtypes"] == {"state": 4764, "number": 2072, "action": 792} and a["positive_class"] == "no"
