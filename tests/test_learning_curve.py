"""Grounded rows from the clean sets' question generators, and the learning-curve script."""

import argparse
import json
import sys
from pathlib import Path

import pytest

from csp_utils.dataset import buildconfig, grounded_rows
from csp_utils.world import scenes as world, benchmarks, language

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_questions_are_deterministic_per_scene_and_come_from_the_clean_sets_generators():
    scenes = world.make_scenes("csp", 40)
    a = [grounded_rows.benchmark_questions(s, 4, 0) for s in scenes]
    b = [grounded_rows.benchmark_questions(s, 4, 0) for s in reversed(scenes)][::-1]
    assert [[q.question for q in qs] for qs in a] == [[q.question for q in qs] for qs in b]
    kinds, labels = set(), set()
    for s, qs in zip(scenes, a):
        assert len({q.question for q in qs}) == len(qs) == 4
        assert [q.question_id for q in qs] == [f"{s.scene_id}-q{k:02d}" for k in range(4)]
        # every question is one a clean-set generator asks about this scene, with its label
        asked = {}
        for kind in benchmarks.POPE_KINDS:
            if s.categories():
                pope = benchmarks.build_world_pope([s], kind, n_pos=min(3, len(s.categories())),
                                                   stats=grounded_rows.reference_statistics())
                asked.update({q.question: q.label for q in pope.items})
        for kind in benchmarks.AMBER_KINDS:
            amber = benchmarks.build_world_amber([s], kind, stats=grounded_rows.reference_statistics())
            asked.update({q.question: q.label for q in amber.items})
        for q in qs:
            assert asked[q.question] == q.label
            assert q.set == "world-train"
            kinds.add(q.kind)
            labels.add(q.label)
    assert kinds == {"existence", "attribute", "relation"} and labels == {"yes", "no"}
    # another question seed draws other questions
    assert any([q.question for q in grounded_rows.benchmark_questions(s, 4, 1)] != [q.question for q in qs]
               for s, qs in zip(scenes[:5], a))


def test_question_source_is_checked_and_the_benchmark_generators_are_the_default():
    assert buildconfig.GroundedOptions().questions == "benchmark"
    with pytest.raises(ValueError, match="questions must be one of"):
        buildconfig.GroundedOptions(questions="pope")
    s = world.make_scenes("csp", 1)[0]
    assert [q.question for q in grounded_rows.scene_questions(s, 4, 0)] == \
        [q.question for q in language.world_questions(s, grounded_rows._rng(0, s.scene_id), 4)]


def _script():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import learning_curve
    finally:
        sys.path.pop(0)
    return learning_curve


def test_recipe_flags_override_the_lora_only_where_given():
    lc = _script()
    flags = dict(lr=None, batch=None, loss=None, r=None, dropout=None, target_modules=None)
    recipe = lc.recipe_config(argparse.Namespace(**flags), layout="follow_up", lora={"activation": "confidence"})
    changed = lc.recipe_config(argparse.Namespace(**{**flags, "dropout": 0.0, "r": 8}), layout="follow_up",
                               lora={"activation": "confidence"})
    assert recipe.lora.dropout > 0 and changed.lora.dropout == 0.0
    assert (changed.lora.r, changed.lora.alpha) == (8, 16) and changed.lora.activation == "confidence"
    assert changed.lora.target_modules == recipe.lora.target_modules
    attention = lc.recipe_config(argparse.Namespace(**{**flags, "target_modules": ["q_proj", "v_proj"]}),
                                 layout="follow_up", lora={"activation": "confidence"})
    assert recipe.lora.target_modules == "all-linear" and attention.lora.target_modules == ("q_proj", "v_proj")
    assert (attention.lora.r, attention.lora.dropout, attention.lora.target_parts) == \
        (recipe.lora.r, recipe.lora.dropout, recipe.lora.target_parts)


def test_learning_curve_points_and_validation_scenes_are_checked():
    lc = _script()
    assert lc.parse_point("600:200") == (600, 200)
    for bad in ("600", "a:b", "0:10"):
        with pytest.raises(argparse.ArgumentTypeError):
            lc.parse_point(bad)
    suite = lc.validation_suite(3)
    lc.check_disjoint(suite, 10_000)
    with pytest.raises(ValueError, match="inside the training scenes"):
        lc.check_disjoint(suite, lc.VALIDATION_STARTS["amber-existence"] + 1)


def test_learning_curve_script_scores_every_checkpoint_on_validation_and_resumes(tmp_path):
    lc = _script()
    args = ["--out", str(tmp_path), "--points", "12:4", "--targets", "internal", "--layouts", "follow_up",
            "--val-images", "4", "--checkpoints", "2"]
    rows = lc.main(args)
    assert [(r["scenes"], r["steps"], r["step"], r["rows_seen"]) for r in rows] == [(12, 4, 2, 32), (12, 4, 4, 64)]
    for r in rows:
        assert set(r["per_set_auroc"]) == set(lc.VALIDATION_SETS)
        assert 0.0 <= r["brier"] <= 1.0 and r["questions"] == "benchmark" and r["clean_share"] == 1.0
        assert set(r["mode"]["per_set_auroc"]) == set(lc.VALIDATION_SETS) and 0.0 <= r["mode"]["brier"] <= 1.0
    data = tmp_path / "data" / "benchmark-cs100"
    report = json.loads((data / "build_report.json").read_text())
    assert report["config"]["grounded"]["questions"] == "benchmark"
    assert (tmp_path / "learning_curve.png").exists() and (tmp_path / "learning_curve.pdf").exists()
    table = (tmp_path / "results.md").read_text()
    assert "temperature-scaled internal probability" in table and "| benchmark | 1.00 | internal | follow_up | 12 |" in table
    again = lc.main(args)  # resumes: nothing scored twice
    assert len(again) == 2 and len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


def test_blend_target_is_the_mean_of_distillation_and_correctness():
    import datasets

    from csp_utils.train import settings, shaping

    rows = [{"internal_p": p, "correct": c, "answer": "Yes", "question": "Is there a star in the image?"}
            for p, c in ((0.9, 1), (0.9, 0), (0.31, 1), (0.05, 0))]
    ds = datasets.Dataset.from_list(rows)
    assert shaping.grounded_targets(ds, "blend") == [95, 45, 66, 2]
    assert "blend" in settings.GROUNDED_TARGETS
    assert settings.SFTConfigCSP(confidence_target="blend").uses_option_loss
