"""Key-object extraction (M_desc) on the real POPE / AMBER question files and by hand."""

import json
import re

import pytest

from csp_utils.dataset.keyobjects import (Vocabulary, amber_vocabulary, coco_vocabulary, default_vocabulary,
                                          key_objects, pluralize, scan_objects)
from csp_utils.world import scenes, language

POPE_TEMPLATE = re.compile(r"^Is there an? (?P<obj>.+) in the image\?$")
AMBER_RELATION = re.compile(r"^Is there direct contact between the (?P<a>\S+) and (?P<b>\S+)\?$")
AMBER_EXISTENCE = re.compile(r"^Is there an? (?P<obj>\S+) in this image\?$")
AMBER_ATTRIBUTE = re.compile(r"^(?:Is|Does) the (?P<obj>\S+) .+ in this image\?$")
AMBER_NUMBER = re.compile(r"^(?:Is there one|Are there \w+) (?P<obj>\S+) in this image\?$")
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
             "geese": "goose", "knives": "knife", "monies": "money"}


@pytest.fixture(scope="module")
def amber(benchmarks_dir):
    """(query, type) for every discriminative AMBER question."""
    folder = benchmarks_dir / "amber"
    types = {a["id"]: a["type"] for a in json.loads((folder / "annotations.json").read_text())}
    queries = json.loads((folder / "query_discriminative.json").read_text())
    return [(q["query"], types[q["id"]]) for q in queries]


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_every_pope_question_yields_exactly_its_object(benchmarks_dir, split):
    lines = (benchmarks_dir / "pope" / f"coco_pope_{split}.json").read_text().splitlines()
    assert len(lines) == 3000
    coco = set(coco_vocabulary().phrases)
    for line in lines:
        text = json.loads(line)["text"]
        expected = POPE_TEMPLATE.match(text).group("obj")
        assert key_objects(text) == [expected], text
        assert key_objects(text, vocabulary="coco") == [expected], text
        assert expected in coco  # POPE's objects are COCO class names


def test_amber_coverage(amber):
    """Relation: both objects; existence / attribute / number: exactly the named object."""
    amber_objects = set(amber_vocabulary().phrases)
    counts = {"relation": [0, 0], "existence": [0, 0], "attribute": [0, 0], "number": [0, 0]}
    in_vocab = [0, 0]
    misses = []
    for query, kind in amber:
        objects = key_objects(query)
        if "relation" in kind:
            m = AMBER_RELATION.match(query) or re.match(r"^.* between the (?P<a>.+) and (?P<b>.+)\?$", query)
            group, expected = "relation", list(dict.fromkeys([m.group("a"), m.group("b")]))
        elif kind == "discriminative-hallucination":
            group, expected = "existence", [AMBER_EXISTENCE.match(query).group("obj")]
        elif kind == "discriminative-attribute-number":
            # the object word is plural ("elephants"); AMBER's object list has it singular
            word = AMBER_NUMBER.match(query).group("obj")
            singulars = (IRREGULAR.get(word), word, word[:-1], word[:-2], word[:-3] + "y")
            group, expected = "number", [o for o in singulars if o in amber_objects][:1] or [word]
        else:
            group, expected = "attribute", [AMBER_ATTRIBUTE.match(query).group("obj")]
        counts[group][1] += 1
        in_vocab[1] += 1
        if objects == expected:
            counts[group][0] += 1
        else:
            misses.append((query, objects, expected))
        in_vocab[0] += all(o in amber_objects for o in objects)
    shares = {g: ok / n for g, (ok, n) in counts.items()}
    print("AMBER key-object coverage:", {g: f"{ok}/{n}" for g, (ok, n) in counts.items()},
          f"in AMBER vocabulary: {in_vocab[0]}/{in_vocab[1]}", "misses:", misses[:10])
    assert counts["relation"][1] == 975 + 689 and counts["existence"][1] == 4924
    assert shares["relation"] == 1.0 and shares["existence"] == 1.0 and shares["attribute"] == 1.0
    assert shares["number"] == 1.0
    # AMBER's own typos ("two tenni", "two sunglass") are kept as written: 8 of 14,216
    assert in_vocab[0] / in_vocab[1] >= 0.999
    assert all(len(key_objects(q)) >= 1 for q, _ in amber)


def test_world_questions_match_the_worlds_own_objects():
    n = 0
    for scene in scenes.make_scenes("eval", 20):
        for item in language.world_questions(scene, 0, 12):
            assert key_objects(item.question) == list(item.objects), item.question
            n += 1
    assert n > 100


@pytest.mark.parametrize("question, answer, expected", [
    # world wording: prenominal modifiers kept, predicative attribute not
    ("Is there a circle in the image?", None, ["circle"]),
    ("Is there a red circle in the image?", None, ["red circle"]),
    ("Is the circle red?", None, ["circle"]),
    ("Is the small star left of the heart?", None, ["small star", "heart"]),
    ("Is the red star to the left of the blue star?", None, ["red star", "blue star"]),
    ("Are there two squares in the image?", None, ["square"]),
    # AMBER wording
    ("Is the dog running in this image?", None, ["dog"]),
    ("Are there two cats in this image?", None, ["cat"]),
    ("Are there three people in this image?", None, ["person"]),
    ("Is the sky blue in this image?", None, ["sky"]),
    ("Does the man play the piano in this image?", None, ["man"]),
    ("Is there direct contact between the person and grass?", None, ["person", "grass"]),
    ("Is there direct contact between the cat and air-conditioning?", None, ["cat", "air-conditioning"]),
    # templated spans outside every vocabulary stay whole
    ("Is there a tennis ball in the image?", None, ["tennis ball"]),
    ("Are there two wombats in the image?", None, ["wombat"]),
    ("Is there a cat and a dog in the image?", None, ["cat", "dog"]),
    # free form + answers: longest match, plurals, negation, ambiguous words
    ("Is there a dog?", "Yes, there is a dog next to the bench.", ["dog", "bench"]),
    ("What is the man holding?", "He holds a hair drier, not a dog.", ["man", "hair drier"]),
    ("Describe the image.", "Two traffic lights and a stop sign. There are no cats.", ["traffic light", "stop sign"]),
    ("How many people are there?", "Three; it can run.", ["person"]),
    ("Is there a red circle in the image?", "Yes, the circle is red.", ["red circle"]),
    ("Is there an orange in the image?", None, ["orange"]),
    ("Yes or no?", "No.", []),
])
def test_hand_cases(question, answer, expected):
    assert key_objects(question, answer) == expected


def test_custom_vocabulary_longest_match_plurals_and_boundaries():
    vocab = Vocabulary(["light", "traffic light", "cat", "person"], synonyms={"kitty": "cat"},
                       modifiers=["red"])
    assert scan_objects("two red traffic lights, a kitty and people", vocab) == ["red traffic light", "cat", "person"]
    assert scan_objects("a catalogue of concatenations", vocab) == []  # whole words only
    assert key_objects("Where is the kitty?", vocabulary=vocab) == ["cat"]
    assert pluralize("bus") == {"buses"} and pluralize("hair drier") == {"hair driers"}
    assert "men" in default_vocabulary().surfaces  # man -> men
    with pytest.raises(ValueError, match="vocabulary must be"):
        key_objects("Is there a dog?", vocabulary="imagenet")
    with pytest.raises(ValueError, match="no phrases"):
        Vocabulary([])


def test_vocabulary_files_carry_their_source():
    from csp_utils.dataset.keyobjects import VOCAB_DIR

    for name, n in [("coco80.txt", 80), ("amber_objects.txt", 340)]:
        lines = (VOCAB_DIR / name).read_text().splitlines()
        assert lines[0].startswith("#") and "Source" in "".join(lines[:3])
        assert len([ln for ln in lines if ln and not ln.startswith("#")]) == n
