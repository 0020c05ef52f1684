"""Grounders: GroundingDINO -> SAM on tiny random models loaded by path, annotations (world
scenes, COCO polygons / RLE), boxes only, statuses and the config factory."""

import numpy as np
import pytest
from PIL import Image

from csp_utils.dataset.grounders import (AnnotationGrounder, BoxGrounder, DinoSamGrounder, Grounder, boxes_to_mask,
                                         counts_to_rle_string, decode_segmentation, dino_prompt, make_grounder,
                                         rle_decode, rle_encode, rle_string_to_counts, tiny_grounding_dino, tiny_sam)
from csp_utils.world import scenes

H, W = 48, 64  # not square: catches (H, W) / (W, H) mix-ups


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_grounders")
    tiny_grounding_dino(root / "dino")
    tiny_sam(root / "sam")
    return root / "dino", root / "sam"


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def open_grounder(tiny_dirs):
    """Loaded BY PATH, thresholds 0: every query is a detection."""
    dino, sam = tiny_dirs
    return DinoSamGrounder(str(dino), str(sam), box_threshold=0.0, text_threshold=0.0)


def test_dino_sam_from_saved_folders_batches_boxes_into_one_sam_call(open_grounder, image):
    sam_calls, dino_calls = [], []
    hooks = [open_grounder.segmenter.register_forward_hook(lambda *a: sam_calls.append(1)),
             open_grounder.detector.register_forward_hook(lambda *a: dino_calls.append(1))]
    try:
        r = open_grounder.ground(image, ["Red circle", "dog"])
    finally:
        for h in hooks:
            h.remove()
    assert isinstance(open_grounder, Grounder) and open_grounder.name == "dino+sam"
    assert r.status == "ok" and r.grounder == "dino+sam"
    assert r.mask.shape == (H, W) and r.mask.dtype == bool and r.mask.any()
    assert len(r.boxes) == len(r.scores) == len(r.labels) == 10 > 1  # every query of the tiny model
    assert set(r.labels) <= {"red circle", "dog"}
    assert all(0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H for x0, y0, x1, y1 in r.boxes)
    assert r.scores == sorted(r.scores, reverse=True)
    assert sam_calls == [1] and dino_calls == [1]  # all boxes in ONE SAM pass, all phrases in one prompt


def test_dino_statuses(open_grounder, image, monkeypatch):
    assert open_grounder.ground(image, []).status == "no_objects"
    assert open_grounder.ground(image, [" ", "."]).status == "no_objects"
    monkeypatch.setattr(open_grounder, "segment", lambda img, boxes: np.zeros((H, W), bool))
    r = open_grounder.ground(image, ["dog"])
    assert r.status == "empty_mask" and r.mask is None and r.boxes  # boxes kept for the report
    monkeypatch.setattr(open_grounder, "box_threshold", 1.0)
    r = open_grounder.ground(image, ["dog"])
    assert (r.status, r.mask, r.boxes) == ("no_detection", None, [])


def test_dino_sam_composites_transparency_onto_white(open_grounder, image):
    rgba = np.dstack([np.asarray(image), np.full((H, W), 255, np.uint8)])
    rgba[:, W // 2:, 3] = 0  # the right half transparent
    white = np.asarray(image).copy()
    white[:, W // 2:] = 255
    from_rgba = open_grounder.ground(Image.fromarray(rgba), ["dog"])
    from_white = open_grounder.ground(Image.fromarray(white), ["dog"])
    assert from_rgba.boxes == from_white.boxes and np.array_equal(from_rgba.mask, from_white.mask)
    assert from_rgba.boxes != open_grounder.ground(image, ["dog"]).boxes  # the alpha was not just dropped


def test_boxes_only_detector_from_ready_objects(open_grounder, image):
    boxes_only = DinoSamGrounder(open_grounder.detector, None, detector_processor=open_grounder.detector_processor,
                                 box_threshold=0.0, text_threshold=0.0, max_boxes=3, name="dino+boxes")
    r = boxes_only.ground(image, ["dog"])
    assert r.status == "ok" and r.grounder == "dino+boxes" and len(r.boxes) == 3
    assert r.boxes == open_grounder.detect(image, ["dog"])[0][:3]  # the 3 best of the same detector
    assert np.array_equal(r.mask, boxes_to_mask(r.boxes, (H, W)))
    boxed = BoxGrounder(open_grounder).ground(image, ["dog"])  # SAM's boxes, filled
    assert boxed.status == "ok" and np.array_equal(boxed.mask, boxes_to_mask(boxed.boxes, (H, W)))
    with pytest.raises(ValueError, match="detector_processor"):
        DinoSamGrounder(open_grounder.detector, None)


def test_dino_prompt_format():
    assert dino_prompt(["Cat", "traffic light", "cat", "a.b"]) == "cat. traffic light. a b."


# --- annotations --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    return scenes.make_scenes("eval", 30)


def test_annotation_grounder_on_world_scenes_is_the_union_of_matching_masks(world):
    g = AnnotationGrounder.from_scenes(world)
    checked = 0
    for sc in world:
        for o in sc.objects:
            for phrase, match in [(o.category, lambda p: p.category == o.category),
                                  (f"{o.color} {o.category}", lambda p: (p.category, p.color) == (o.category, o.color)),
                                  (f"{o.size} {o.category}", lambda p: (p.category, p.size) == (o.category, o.size))]:
                r = g.ground(sc.to_pil(), [phrase], image_id=sc.scene_id)
                expected = np.zeros(sc.image.shape[:2], bool)
                for p in sc.objects:
                    if match(p):
                        expected |= p.mask
                assert r.status == "ok" and np.array_equal(r.mask, expected), (sc.scene_id, phrase)
                checked += 1
    assert checked > 50
    # two phrases: the union of both; an absent category: no_detection
    sc = next(s for s in world if len(s.categories()) >= 2)
    a, b = sorted(sc.categories())[:2]
    r = g.ground(sc.to_pil(), [a, b], image_id=sc.scene_id)
    assert np.array_equal(r.mask, np.any([o.mask for o in sc.objects if o.category in (a, b)], axis=0))
    from csp_utils.world.catalog import CATEGORIES, COLORS

    absent = next(c for c in CATEGORIES if c not in sc.categories())
    assert g.ground(sc.to_pil(), [absent], image_id=sc.scene_id).status == "no_detection"
    wrong = next(c for c in COLORS if c not in {o.color for o in sc.objects if o.category == a})
    assert g.ground(sc.to_pil(), [f"{wrong} {a}"], image_id=sc.scene_id).status == "no_detection"
    assert g.ground(None, [], image_id=sc.scene_id).status == "no_objects"
    with pytest.raises(KeyError, match="not among"):
        g.ground(sc.to_pil(), [a], image_id="eval-999999")
    with pytest.raises(ValueError, match="annotated at"):
        g.ground(sc.to_pil().resize((32, 32)), [a], image_id=sc.scene_id)


def test_box_grounder_fills_the_annotation_boxes(world):
    g = BoxGrounder(AnnotationGrounder.from_scenes(world))
    sc = world[0]
    o = sc.objects[0]
    r = g.ground(sc.to_pil(), [o.category], image_id=sc.scene_id)
    expected = np.zeros(sc.image.shape[:2], bool)
    for p in sc.objects:
        if p.category == o.category:
            x0, y0, x1, y1 = p.box  # x1 / y1 exclusive
            expected[y0:y1, x0:x1] = True
    assert r.status == "ok" and r.grounder == "boxes(annotations)" and np.array_equal(r.mask, expected)
    assert g.ground(sc.to_pil(), ["zebra"], image_id=sc.scene_id).status == "no_detection"


def test_compressed_rle_by_hand_and_round_trip():
    # counts [5, 1, 5, 21]: the 4th is stored as 21 - 1 = 20 -> 0b10100 needs a 2nd char:
    # 20 | 0x20 -> 'd', then 0 -> '0'
    assert counts_to_rle_string([5, 1, 5, 21]) == "515d0"
    assert rle_string_to_counts("515d0") == [5, 1, 5, 21]
    mask = decode_segmentation({"size": [4, 8], "counts": "515d0"}, 4, 8)
    expected = np.zeros((4, 8), bool)
    expected[1, 1] = True        # run 6 in column-major order: column 1, row 1
    expected[3, 2] = True        # ones from flat index 11: column 2, row 3 ...
    expected[:, 3:] = True       # ... then every later column
    assert np.array_equal(mask, expected)
    rng = np.random.default_rng(1)
    for _ in range(20):  # blobs and noise: growing and shrinking runs (negative deltas)
        m = rng.random((13, 17)) < rng.uniform(0.05, 0.95)
        rle = rle_encode(m)
        assert np.array_equal(rle_decode(rle["counts"], 13, 17), m)
        assert np.array_equal(decode_segmentation({"size": [13, 17], "counts": counts_to_rle_string(rle["counts"])},
                                                  13, 17), m)
    with pytest.raises(ValueError, match="height\\*width"):
        rle_decode([1, 2], 4, 8)


def test_annotation_grounder_from_coco(tmp_path):
    full = np.zeros((10, 12), bool)
    full[0:3, 8:12] = True
    instances = {
        "images": [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "height": 10, "width": 12}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [2, 2, 4, 4], "iscrowd": 0,
             "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},                       # polygon square
            {"id": 2, "image_id": 7, "category_id": 18, "bbox": [8, 0, 4, 3], "iscrowd": 1,
             "segmentation": rle_encode(full)},                                 # uncompressed RLE
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [0, 7, 3, 2], "iscrowd": 0, "segmentation": []},
        ],
    }
    path = tmp_path / "instances.json"
    import json

    path.write_text(json.dumps(instances))
    g = AnnotationGrounder.from_coco(path)
    img = Image.new("RGB", (12, 10))
    person = g.ground(img, ["man"], image_id="COCO_val2014_000000000007.jpg")  # "man" -> person
    square = np.zeros((10, 12), bool)
    square[2:6, 2:6] = True  # polygon edges at 2 and 6: pixels 2..5, as pycocotools
    assert person.status == "ok" and np.array_equal(person.mask, square)
    assert person.boxes == [(2.0, 2.0, 6.0, 6.0)] and person.labels == ["man"]
    both = g.ground(img, ["dogs", "person"], image_id="/data/val2014/COCO_val2014_000000000007.jpg")
    assert np.array_equal(both.mask, square | full)
    car = g.ground(img, ["car"], image_id="7")  # numeric id; no segmentation -> its box
    expected = np.zeros((10, 12), bool)
    expected[7:9, 0:3] = True
    assert np.array_equal(car.mask, expected)
    assert g.ground(img, ["giraffe"], image_id="7").status == "no_detection"
    boxes = BoxGrounder(g).ground(img, ["person", "dog"], image_id="7")
    assert np.array_equal(boxes.mask, boxes_to_mask([(2, 2, 6, 6), (8, 0, 12, 3)], (10, 12)))
    # compressed RLE of the same dog
    instances["annotations"][1]["segmentation"] = {"size": [10, 12],
                                                   "counts": counts_to_rle_string(rle_encode(full)["counts"])}
    dog = AnnotationGrounder.from_coco(instances).ground(img, ["dog"], image_id="7")
    assert np.array_equal(dog.mask, full)


def test_boxes_to_mask_covers_touched_pixels():
    m = boxes_to_mask([(1.5, 0, 3, 2.2), (-5, 9, 100, 100)], (10, 6))
    expected = np.zeros((10, 6), bool)
    expected[0:3, 1:3] = True
    expected[9:, :] = True
    assert np.array_equal(m, expected)


def test_make_grounder(world, tiny_dirs):
    assert make_grounder("annotations", scenes=world).name == "annotations"
    assert make_grounder("boxes", scenes=world).name == "boxes(annotations)"
    dino, sam = tiny_dirs
    g = make_grounder({"detector": str(dino), "segmenter": None, "box_threshold": 0.2})
    assert isinstance(g, DinoSamGrounder) and g.segmenter is None and g.box_threshold == 0.2
    assert make_grounder(g) is g
    with pytest.raises(ValueError, match="needs annotations"):
        make_grounder("annotations")
    with pytest.raises(ValueError, match="kind must be one of"):
        make_grounder("sam2")
    with pytest.raises(ValueError, match="unknown GroundingDINO"):
        make_grounder({"detector": str(dino), "box_thresh": 0.3})
