"""Confidence sources beyond the logit (``evaluate/sources.py``), with the model replaced by
functions of the image: what the fitted confidence can and cannot know."""

import json

import numpy as np
import pytest
from PIL import Image

from csp_utils.evaluate import sources, suites


def _suite(n_pope=6, n_calibration=12):
    cfg = suites.SuiteConfig(n_pope_images=n_pope, n_calibration_images=n_calibration)
    return suites.build_suite(cfg, sets=["pope-random", "calibration"])


def _base_rows(suite, answer_of):
    rows = []
    for name, bench in suite.items():
        for it in bench.items:
            answer = answer_of(it)
            rows.append({"model": "base", "set": name, "framing": "third", "readout": "single_pass",
                         "question_id": it.question_id, "image_id": it.image_id, "label": it.label,
                         "answer": answer, "correct": answer == it.label, "confidence": 0.5, "internal_prob": 0.9})
    return rows


def test_the_asked_region_exists_whether_or_not_the_object_is_there():
    suite = _suite()
    present = absent = 0
    for it in suite["pope-random"].items:
        region = sources.asked_region(it.image_id, it.objects, (64, 64))
        assert region.shape == (64, 64) and region.any()
        present += it.label == "yes"
        absent += it.label == "no"
    assert present and absent
    assert sources.asked_region("COCO_val2014_000000000042.jpg", ["dog"], (64, 64)).sum() == 32 * 32


def test_an_image_blind_model_gives_one_contrast_for_present_and_absent_objects(monkeypatch):
    """The label leak the contrast must not have: the annotation grounder finds a mask exactly
    when the asked object is present. With a model whose probabilities ignore the image, every
    feature the contrast sees is the same for every question: any difference between present
    and absent objects would come from the grounding."""
    suite = _suite()
    rows = _base_rows(suite, lambda it: "yes")
    seen = []

    def blind(model, processor, items, images, batch_size=64, hidden=False):
        seen.append(len(images))
        return np.full(len(items), 0.8), (np.zeros((len(items), 3, 4)) if hidden else None)

    monkeypatch.setattr(sources, "answer_pass", blind)
    out, cost = sources.source_rows(None, None, suite, rows, sources=("contrast",))
    conf = {r["confidence"] for r in out}
    assert len(conf) == 1 and {r["model"] for r in out} == {"baseline:contrast"}
    assert {r["set"] for r in out} == {"pope-random"} and len(out) == len(suite["pope-random"].items)
    assert len(seen) == 6                               # per set: clean, asked object, whole image
    assert cost["contrast"] >= cost["answer_seconds_per_question"]
    assert json.loads(out[0]["baseline_param"])["answer_passes"] == 3


def test_the_contrast_reads_the_models_response_to_noise(monkeypatch):
    """A model whose "yes" falls with the noise on the image: the contrast separates the answers
    whose probability the noise moves (right "yes" on a present object) from the rest."""
    suite = _suite()
    rows = _base_rows(suite, lambda it: "yes")
    clean = {}
    for name, bench in suite.items():
        for it in bench.items:
            clean[it.question_id] = np.asarray(bench.image_loader(it.image_id).convert("RGB"), float)

    def sensitive(model, processor, items, images, batch_size=64, hidden=False):
        change = np.array([np.abs(np.asarray(im, float) - clean[it.question_id]).mean() for it, im in zip(items, images)])
        return 0.9 - change / 255, None

    monkeypatch.setattr(sources, "answer_pass", sensitive)
    out, _ = sources.source_rows(None, None, suite, rows, sources=("contrast",))
    assert len({round(r["confidence"], 9) for r in out}) > 2


def test_the_probe_layer_is_chosen_on_the_calibration_set(monkeypatch):
    suite = _suite(n_pope=20, n_calibration=40)
    rng = np.random.default_rng(0)
    rows = _base_rows(suite, lambda it: "yes" if rng.random() < 0.7 else "no")
    right = {r["question_id"]: r["correct"] for r in rows}

    def states(model, processor, items, images, batch_size=64, hidden=False):
        h = rng.normal(size=(len(items), 4, 8))
        h[:, 2, 0] += 2.0 * np.array([right[it.question_id] for it in items])   # layer 2 knows
        return np.full(len(items), 0.7), h

    monkeypatch.setattr(sources, "answer_pass", states)
    out, _ = sources.source_rows(None, None, suite, rows, sources=("probe",))
    param = json.loads(out[0]["baseline_param"])
    assert param["layer"] == 2 and param["fitted_on"] == "calibration"
    from csp_utils.core import metrics
    scored = [r for r in out if r["set"] == "pope-random"]
    assert metrics.auroc([r["confidence"] for r in scored], [r["correct"] for r in scored]) > 0.75


def test_the_sources_need_the_calibration_set():
    suite = _suite()
    rows = [r for r in _base_rows(suite, lambda it: "yes") if r["set"] != "calibration"]
    with pytest.raises(ValueError, match="calibration"):
        sources.source_rows(None, None, {"pope-random": suite["pope-random"]}, rows)


def test_sources_are_computed_once_and_read_back_where_they_were_made_for_the_same_sets(monkeypatch, tmp_path):
    calls = []

    def fake(base_model, suite, rows, sources=sources.SOURCES, **kw):
        calls.append(sorted(suite))
        return [{"model": "baseline:probe", "set": s, "question_id": "q", "confidence": 0.5} for s in suite], \
            {"answer_seconds_per_question": 0.1}

    monkeypatch.setattr(sources, "base_source_rows", fake)
    suite = {"calibration": None, "pope-random": None}
    first = sources.cached_source_rows(tmp_path / "s", "embedded", suite, [], sources=["probe"])
    again = sources.cached_source_rows(tmp_path / "s", "embedded", suite, [], sources=["probe"])
    assert first == again and len(calls) == 1
    sources.cached_source_rows(tmp_path / "s", "embedded", {**suite, "amber-existence": None}, [], sources=["probe"])
    sources.cached_source_rows(tmp_path / "s", "embedded", suite, [], sources=["probe", "contrast"])
    assert len(calls) == 3, "other sets or sources: made again"
    (tmp_path / "s" / "cost.json").unlink()   # an interrupted write: the rows are not trusted
    sources.cached_source_rows(tmp_path / "s", "embedded", suite, [], sources=["probe", "contrast"])
    assert len(calls) == 4
