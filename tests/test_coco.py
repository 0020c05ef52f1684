"""The COCO-style training source: POPE's protocol on training images, refusal of POPE's own
images, oracle masks on images resized to the model's input size, the size from the processor."""

import json

import numpy as np
import pytest
from PIL import Image

from csp_utils.dataset import coco, buildconfig, paper_rows, sources

CATS = ["person", "dog", "cat", "car", "chair", "cup", "book"]


def _instances(images: dict[int, list[str]], size=(40, 60), prefix="COCO_train2014_") -> dict:
    """images: id -> category names; each object a rectangle polygon in its own column band."""
    h, w = size
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(CATS)]
    anns = []
    for image_id, names in images.items():
        for k, name in enumerate(names):
            x0 = 2 + 8 * k
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CATS.index(name) + 1,
                         "bbox": [x0, 4, 6, 20], "segmentation": [[x0, 4, x0 + 6, 4, x0 + 6, 24, x0, 24]],
                         "area": 120, "iscrowd": 0})
    return {"images": [{"id": i, "file_name": f"{prefix}{i:012d}.jpg", "height": h, "width": w} for i in images],
            "annotations": anns, "categories": cats}


def _folder(tmp_path, instances):
    folder = tmp_path / "train2014"
    folder.mkdir()
    for im in instances["images"]:
        rng = np.random.default_rng(im["id"])
        Image.fromarray(rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)).save(
            folder / im["file_name"], quality=95)
    return folder


IMAGES = {1: ["person", "dog", "cat"], 2: ["person", "car", "chair", "cup"], 3: ["person", "dog", "chair"],
          4: ["cat"]}  # image 4 has too few categories for POPE


def test_pope_protocol_random():
    rows, report = coco.pope_questions(_instances(IMAGES), "random", seed=0)
    assert report["images_used"] == 3 and report["images_with_too_few_categories"] == 1
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    for image_id, qs in by_image.items():
        assert [q["answer"] for q in qs] == ["Yes", "No"] * 3  # interleaved as the official files
        assert {q["object"] for q in qs if q["answer"] == "Yes"} <= set(IMAGES[image_id])
        assert not {q["object"] for q in qs if q["answer"] == "No"} & set(IMAGES[image_id])
        assert all(q["question"] == f"Is there {'an' if q['object'][0] in 'aeiou' else 'a'} {q['object']} in the image?"
                   for q in qs)
    assert rows == coco.pope_questions(_instances(IMAGES), "random", seed=0)[0]  # deterministic
    assert len({r["question_id"] for r in rows}) == len(rows)


def test_pope_protocol_popular_and_adversarial():
    inst = _instances(IMAGES)
    # popular: the absent categories seen in most images, in that order
    rows, _ = coco.pope_questions(inst, "popular")
    neg = [r["object"] for r in rows if r["image_id"] == 2 and r["answer"] == "No"]
    assert neg == ["dog", "cat", "book"]  # dog and cat in 2 images each, then never-seen categories by id
    # adversarial: absent categories that co-occur most with the image's own
    rows, _ = coco.pope_questions(inst, "adversarial")
    neg = [r["object"] for r in rows if r["image_id"] == 1 and r["answer"] == "No"]
    assert neg[0] == "chair"  # with person and dog in image 3, with person in image 2
    # positives are shared across the three kinds, as in the official files
    pos = {k: [r["object"] for r in coco.pope_questions(inst, k)[0] if r["answer"] == "Yes"] for k in coco.POPE_KINDS}
    assert pos["random"] == pos["popular"] == pos["adversarial"]
    with pytest.raises(ValueError, match="POPE kind"):
        coco.pope_questions(inst, "hard")


def test_overlap_with_pope_images_is_refused(tmp_path):
    pope = tmp_path / "coco_pope_random.json"
    pope.write_text(json.dumps({"question_id": 1, "image": "COCO_val2014_000000000002.jpg",
                                "text": "Is there a car in the image?", "label": "yes"}) + "\n")
    inst = _instances(IMAGES, prefix="COCO_val2014_")
    folder = _folder(tmp_path, inst)
    with pytest.raises(ValueError, match=r"1 image\(s\) that POPE evaluates on .*COCO_val2014_000000000002"):
        coco.coco_source(inst, folder, eval_images=pope)
    with pytest.raises(ValueError, match="POPE evaluates on"):  # a folder of POPE files
        coco.coco_source(inst, folder, eval_images=tmp_path)
    # COCO ids are unique across train and val: the same id is the same photo, whatever the name
    train = _instances(IMAGES)
    with pytest.raises(ValueError, match="POPE evaluates on"):
        coco.check_no_eval_overlap(train, eval_images=pope)
    coco.check_no_eval_overlap(train, eval_images=["COCO_val2014_000000310196.jpg", 5])


def test_unknown_eval_list_refuses_val2014(tmp_path, monkeypatch):
    monkeypatch.setattr(coco, "VENDORED_POPE", tmp_path / "absent")
    inst = _instances(IMAGES, prefix="COCO_val2014_")
    with pytest.raises(ValueError, match="val2014 images are refused"):
        coco.check_no_eval_overlap(inst)
    coco.check_no_eval_overlap(_instances(IMAGES))


def test_source_resizes_and_the_oracle_follows(tmp_path):
    inst = _instances(IMAGES, size=(40, 60))
    folder = _folder(tmp_path, inst)
    src = coco.coco_source(inst, folder, eval_images=[], image_size=80)
    assert len(src) == 18 and src.report["questions"] == 18
    item = next(iter(src))
    img = item.load_image()
    assert img.size == (120, 80)  # shortest edge 40 -> 80, aspect kept
    assert item.objects and item.image_id.startswith("COCO_train2014_")
    oracle = coco.annotation_grounder(inst)
    res = oracle.ground(img, item.objects, item.image_id)
    assert res.ok and res.mask.shape == (80, 120)
    assert np.isclose(res.mask.mean(), 6 * 20 / (40 * 60), rtol=0.15)  # the same fraction at twice the size
    ds = paper_rows.build_perturbed_dataset(src, oracle, tmp_path / "built", buildconfig.BuildConfig(levels=(0, 100)), progress=False)
    assert len(ds) == 2 * 9 and set(ds["grounding_status"]) == {"ok"} and ds[0]["image"].size == (120, 80)


def test_missing_images_and_inputs_fail_early(tmp_path):
    inst = _instances(IMAGES)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not in .*empty"):
        coco.coco_source(inst, empty, eval_images=[])
    with pytest.raises(ValueError, match="'annotations' list"):
        coco.coco_source({"images": [], "categories": []}, empty, eval_images=[])
    with pytest.raises(ValueError, match="coco_instances"):
        coco.make_source("coco", base_model=None, image_size=None)
    with pytest.raises(ValueError, match="source must be"):
        coco.make_source("laion")


def test_image_size_follows_the_processor():
    from transformers import CLIPImageProcessorPil

    llava15 = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert coco.image_processor_size(llava15) == 336
    square = CLIPImageProcessorPil(size={"height": 384, "width": 384}, crop_size={"height": 384, "width": 384})
    assert coco.image_processor_size(square) == 384
    assert coco.processor_image_size("embedded") is None
    img = Image.new("RGB", (640, 480))
    assert coco.resize_shortest_edge(img, 336).size == (448, 336)
    assert coco.resize_shortest_edge(Image.new("RGB", (427, 640)), 336).size == (336, 503)


def test_grounder_spec_takes_checkpoints_from_study_parameters():
    spec = coco.grounder_spec({"kind": "dino_sam", "box_threshold": 0.3}, "ckpt/gdino", "ckpt/sam")
    assert spec == {"box_threshold": 0.3, "detector": "ckpt/gdino", "segmenter": "ckpt/sam"}
    assert coco.grounder_spec("annotations", "ckpt/gdino") == "annotations"
    with pytest.raises(ValueError, match="needs a detector"):
        coco.grounder_spec({"kind": "dino_sam"})


# ---------------------------------------------------------------- triples sources: malformed rows


def test_jsonl_malformed_rows_are_counted_not_dropped_silently(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    lines = [json.dumps({"image": "a.png", "question": "Is there a cat?", "answer": "Yes", "id": "ok1"}),
             "{not json",
             json.dumps({"image": "a.png", "question": "Is there a cat?"}),
             json.dumps({"image": "a.png", "question": "", "answer": "Yes"}),
             json.dumps({"image": "gone.png", "question": "q", "answer": "Yes"}),
             json.dumps({"image": "a.png", "question": "q", "answer": "No", "objects": "cat"}),
             json.dumps(["a.png", "q", "Yes"]),
             "",
             json.dumps({"image": "a.png", "question": "Is there a dog?", "answer": "No", "id": "ok2"})]
    path = tmp_path / "triples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"triples.jsonl:2: not valid JSON"):
        sources.jsonl_source(path, folder)
    src = sources.jsonl_source(path, folder, on_error="report")
    assert [it.sample_id for it in src] == ["ok1", "ok2"] and len(src) == 2
    assert src.report["rows"] == 2 and src.report["malformed"] == 6
    assert src.report["malformed_by_reason"] == {"invalid_json": 1, "missing_field": 1, "empty_field": 1,
                                                  "image_not_found": 1, "bad_objects": 1, "not_an_object": 1}
    assert [m["where"].rsplit(":", 1)[1] for m in src.report["malformed_rows"]] == ["2", "3", "4", "5", "6", "7"]
    with pytest.raises(ValueError, match="on_error"):
        sources.jsonl_source(path, folder, on_error="skip")


def test_hf_malformed_rows_are_counted(tmp_path):
    from datasets import Dataset, Features, Image as HFImage, Value

    img = Image.new("RGB", (8, 8))
    rows = [{"image": img, "question": "Is there a cat?", "answer": "Yes"},
            {"image": None, "question": "Is there a cat?", "answer": "Yes"},
            {"image": img, "question": None, "answer": "Yes"},
            {"image": img, "question": "Is there a dog?", "answer": "  "},
            {"image": img, "question": "Is there a dog?", "answer": "No"}]
    ds = Dataset.from_list(rows, features=Features({"image": HFImage(), "question": Value("string"),
                                                    "answer": Value("string")}))
    with pytest.raises(ValueError, match="row 1: column 'image' holds no image"):
        sources.hf_source(ds)
    src = sources.hf_source(ds, on_error="report")
    assert [it.sample_id for it in src] == ["hf-0000000", "hf-0000004"]
    assert src.report["malformed_by_reason"] == {"missing_image": 1, "empty_field": 2}
    # notebook 02 reaches it through make_source: a dataset saved to disk, the same modes
    ds.save_to_disk(str(tmp_path / "hf"))
    dino = {"kind": "dino_sam"}
    src, grounder, size = coco.make_source("hf", hf_dataset=tmp_path / "hf", on_error="report", image_size=8,
                                           grounder=dino)
    assert [it.sample_id for it in src] == ["hf-0000000", "hf-0000004"] and grounder is None and size == 8
    with pytest.raises(ValueError, match="row 1: column 'image' holds no image"):
        coco.make_source("hf", hf_dataset=tmp_path / "hf", image_size=8, grounder=dino)
    with pytest.raises(ValueError, match="needs hf_dataset"):
        coco.make_source("hf", image_size=8, grounder=dino)
    with pytest.raises(ValueError, match="hf source carries no annotations"):
        coco.make_source("hf", hf_dataset=tmp_path / "hf", image_size=8)


def test_a_build_folder_refuses_another_source(tmp_path):
    out = tmp_path / "dataset"
    first = {"source": "coco-pope-random(2 images x 3+3, size 336)", "image_size": 336, "questions": 12}
    assert coco.record_source(out, first) == first
    coco.record_source(out, first)  # before any build: rewritten freely
    (out / "state.json").write_text("{}")  # a build has started here
    coco.record_source(out, first)  # the same source resumes
    with pytest.raises(ValueError, match="another source.*size 336.*now.*size 224"):
        coco.record_source(out, {**first, "source": "coco-pope-random(2 images x 3+3, size 224)", "image_size": 224})
