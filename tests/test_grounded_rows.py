"""Grounded rows: schema, both labels, distractor noise, flip rows, shares, own answers, and the
paper build left as it was. One small build with the tiny random model serves most tests."""

import json
from pathlib import Path

import numpy as np
import pytest

from csp_utils.core import baselines
from csp_utils.dataset import buildconfig, grounded_rows, csp_noise, paper_rows, sources, store
from csp_utils.evaluate.suites import level_of
from csp_utils.vlm import engine
from csp_utils.vlm import parsing, prompts
from csp_utils.world import scenes, schema

LEVELS = (10, 40, 70, 100)
N_SCENES = 24


def _cfg(**grounded):
    # noised rows, flipped rows and world questions: every part of the builder runs
    grounded = {"batch_size": 32, "clean_share": 0.5, "flip_rows": True, "questions": "world", **grounded}
    return buildconfig.BuildConfig(levels=LEVELS, targets="grounded", shard_size=30, seed=0, grounded=grounded)


def _build(model, processor, out, n=N_SCENES, **grounded):
    src = sources.world_source(scenes.make_scenes("csp", n), 4, seed=0)
    return paper_rows.build_perturbed_dataset(src, out_dir=out, config=_cfg(**grounded), model=model,
                                      processor=processor, progress=False)


@pytest.fixture(scope="module")
def built(tiny_vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("grounded")
    model, processor = tiny_vlm
    ds = _build(model, processor, out, temperature_holdout=0.6)  # enough held-out clean rows to fit T
    return ds, json.loads((out / "build_report.json").read_text()), out


def _scene(image_id):
    _, index, _, _ = scenes.parse_scene_id(image_id)
    return scenes.make_scene("csp", index)


def _changed(row):
    return (np.asarray(row["image"].convert("RGB")) != _scene(row["image_id"]).image).any(-1)


def test_rows_follow_the_interface_schema(built):
    ds, report, _ = built
    need = {"image", "sample_id", "source_id", "image_id", "question", "label", "kind", "level", "noise_on",
            "answer", "own_answer", "flipped", "correct", "internal_p", "cell_acc"}
    assert need <= set(ds.column_names)
    assert len(set(ds["sample_id"])) == len(ds)
    assert set(ds["label"]) == {"yes", "no"}
    assert set(ds["answer"]) <= {"Yes", "No"} and set(ds["own_answer"]) <= {"Yes", "No"}
    assert set(ds["noise_on"]) == {"none", "key", "distractor"}
    assert set(ds["kind"]) <= {"existence", "attribute", "relation"}
    assert set(ds["level"]) <= set(LEVELS)
    for noise_on, level in zip(ds["noise_on"], ds["level"]):
        assert (noise_on == "none") == (level == 100)
    p = np.array(ds["internal_p"])
    assert ((p >= 0) & (p <= 1)).all()
    assert all(isinstance(c, int) and 0 <= c <= 100 for c in ds["cell_acc"])
    for a, lab, ok in zip(ds["answer"], ds["label"], ds["correct"]):
        assert ok == int(a.lower() == lab)
    assert all(s.startswith("csp-") for s in ds["image_id"])
    assert report["rows"] == len(ds) and report["temperature"]["T"] > 0


def test_both_labels_are_noised_on_key_and_distractor(built):
    ds, report, _ = built
    seen = {(n, lab) for n, lab, f in zip(ds["noise_on"], ds["label"], ds["flipped"]) if not f}
    assert {("none", "yes"), ("none", "no"), ("distractor", "yes"), ("distractor", "no"), ("key", "yes")} <= seen
    assert report["rows_per_noise_on"]["distractor"] > 0


def test_distractor_noise_stays_off_the_asked_objects(built):
    ds, _, _ = built
    rows = [i for i, (n, f) in enumerate(zip(ds["noise_on"], ds["flipped"])) if n == "distractor" and not f]
    assert rows
    grounder = None
    moved = 0
    for i in rows:
        r = ds[i]
        scene = _scene(r["image_id"])
        from csp_utils.dataset.grounders import AnnotationGrounder

        grounder = grounder or AnnotationGrounder.from_scenes([scene])
        asked = grounded_rows.asked_mask(scene, r["key_objects"], grounder.vocabulary)
        changed = _changed(r)
        moved += int(changed.any())
        assert not (changed & asked).any(), r["sample_id"]
    assert moved >= len(rows) // 2  # the noise does show somewhere else


def test_key_noise_stays_on_the_asked_objects(built):
    ds, _, _ = built
    from csp_utils.dataset.grounders import AnnotationGrounder

    for i, (n, f) in enumerate(zip(ds["noise_on"], ds["flipped"])):
        if n != "key" or f:
            continue
        r = ds[i]
        scene = _scene(r["image_id"])
        key = AnnotationGrounder.from_scenes([scene]).ground(None, r["key_objects"], r["image_id"]).mask
        assert not (_changed(r) & ~key).any()


def test_clean_rows_are_the_scene_itself(built):
    ds, _, _ = built
    for i in [i for i, n in enumerate(ds["noise_on"]) if n == "none"][:10]:
        assert not _changed(ds[i]).any()


def test_flip_rows_are_complementary(built):
    ds, report, _ = built
    by_id = {s: i for i, s in enumerate(ds["sample_id"])}
    originals = [s for s in ds["sample_id"] if not s.endswith("~flip")]
    assert len(originals) * 2 == len(ds)
    cells = report["cells"]
    for s in originals:
        a, b = ds[by_id[s]], ds[by_id[s + "~flip"]]
        assert not a["flipped"] and b["flipped"]
        assert a["answer"] == a["own_answer"] == b["own_answer"] != b["answer"]
        assert b["correct"] == 1 - a["correct"]
        assert b["internal_p"] == pytest.approx(1 - a["internal_p"])
        key = grounded_rows.cell_key(b["level"], b["answer"], b["kind"])
        if key in cells:
            assert b["cell_acc"] == cells[key]["target"]
        assert a["cell_acc"] == cells[grounded_rows.cell_key(a["level"], a["answer"], a["kind"])]["target"]
        assert a["image"].tobytes() == b["image"].tobytes()


def test_cells_and_temperature_are_recomputed_from_the_rows(built):
    ds, report, _ = built
    unflipped = [i for i, f in enumerate(ds["flipped"]) if not f]
    col = {c: [ds[c][i] for i in unflipped] for c in ("level", "answer", "kind", "correct", "split", "p_own_raw")}
    assert grounded_rows.cell_accuracies(col["level"], col["answer"], col["kind"], col["correct"]) == report["cells"]
    pick = [k for k, (s, c) in enumerate(zip(col["split"], col["level"])) if s == "heldout" and c == 100]
    assert 0 < len(pick) < len(unflipped) // 2  # a held-out share of the scenes, clean rows only
    assert report["temperature"]["rows"] == len(pick)
    assert report["temperature"]["fitted"]
    T = baselines.fit_temperature(np.array(col["p_own_raw"])[pick], np.array(col["correct"])[pick])
    assert report["temperature"]["T"] == pytest.approx(T, rel=1e-4)
    for i in unflipped[:5]:
        assert ds["internal_p"][i] == pytest.approx(float(baselines.temperature_scale(ds["p_own_raw"][i], T)), rel=1e-4)


def test_clean_share_is_respected(tiny_vlm, tmp_path, built):
    ds, report, _ = built
    share = np.mean([n == "none" for n in ds["noise_on"]])
    assert share >= 0.5 and report["clean_share"] == pytest.approx(share, abs=1e-4)
    model, processor = tiny_vlm
    more = _build(model, processor, tmp_path / "c75", n=8, clean_share=0.75, flip_rows=False)
    assert np.mean([n == "none" for n in more["noise_on"]]) >= 0.75
    assert not any(more["flipped"])


def test_without_distractor_noise_only_key_rows_are_noised(tiny_vlm, tmp_path):
    model, processor = tiny_vlm
    ds = _build(model, processor, tmp_path / "nodis", n=8, distractor_noise=False, flip_rows=False)
    assert set(ds["noise_on"]) == {"none", "key"}
    report = json.loads((tmp_path / "nodis" / "build_report.json").read_text())
    assert report["clean_no_noise_target"] > 0  # absent objects, nothing to noise: kept clean, counted


def test_global_noise_covers_the_whole_image_and_keeps_other_builds(tiny_vlm, tmp_path, built):
    model, processor = tiny_vlm
    ds = _build(model, processor, tmp_path / "glob", n=12, clean_share=0.5, global_share=0.5, flip_rows=False)
    on = list(ds["noise_on"])
    assert {"none", "global"} <= set(on) and set(on) <= set(grounded_rows.NOISE_ON)
    for i in [k for k, n in enumerate(on) if n == "global"][:3]:
        row = ds[i]
        assert row["mask_area"] == 1.0 and row["noise_region"] == "global"
        # noise lands beyond the scene's objects: the background changes too
        objects = np.zeros(_scene(row["image_id"]).image.shape[:2], dtype=bool)
        for o in _scene(row["image_id"]).objects:
            objects |= o.mask
        assert _changed(row)[~objects].mean() > 0.3
    # without whole-image noise the config, its hash and the draws stay what they were
    assert "global_share" not in _cfg().to_dict()["grounded"]
    assert "global_share" in _cfg(global_share=0.5).to_dict()["grounded"]
    again = _build(model, processor, tmp_path / "again", temperature_holdout=0.6)
    assert list(again["sample_id"]) == list(built[0]["sample_id"])


def test_calibrated_target_is_a_perturbation_aware_logistic_model(tiny_vlm, tmp_path):
    model, processor = tiny_vlm
    ds = _build(model, processor, tmp_path / "cal", n=24, clean_share=0.5, global_share=0.5, flip_rows=False,
                temperature_holdout=0.6)
    report = json.loads((tmp_path / "cal" / "build_report.json").read_text())
    cal = report["calibration_model"]
    assert cal["fitted"] and cal["rows"] == sum(s == "heldout" for s in ds["split"])
    conds = [grounded_rows.condition_of(n, c) for n, c in zip(ds["noise_on"], ds["level"])]
    assert set(cal["conditions"]) == {c for c, s in zip(conds, ds["split"]) if c != "clean" and s == "heldout"}
    # refitted from the held-out rows alone, the model gives every row's target
    pick = [i for i, s in enumerate(ds["split"]) if s == "heldout"]
    X = grounded_rows.calibration_features(np.array(ds["p_own_raw"])[pick], np.array(ds["own_answer"])[pick],
                                      np.array(conds, dtype=object)[pick], cal["conditions"])
    w = baselines.fit_logistic(X, np.array(ds["own_correct"])[pick], l2=[0, 0, 0] + [cal["l2"] / 2] * (X.shape[1] - 3))
    assert np.allclose(w, cal["weights"], atol=1e-4)
    Xall = grounded_rows.calibration_features(np.array(ds["p_own_raw"]), np.array(ds["own_answer"]),
                                         np.array(conds, dtype=object), cal["conditions"])
    assert np.allclose(baselines.logistic_predict(Xall, w), ds["calibrated_p"], atol=1e-3)
    from csp_utils.train import shaping

    assert shaping.grounded_targets(ds, "calibrated") == [int(round(100 * p)) for p in ds["calibrated_p"]]


def test_logistic_fit_matches_the_closed_form_of_one_feature():
    # with a constant alone the maximum-likelihood probability is the mean
    y = np.array([1, 1, 1, 0] * 10, float)
    w = baselines.fit_logistic(np.ones((40, 1)), y)
    assert baselines.logistic_predict(np.ones((1, 1)), w)[0] == pytest.approx(0.75, abs=1e-5)
    # an L2 penalty shrinks the weight towards zero
    w2 = baselines.fit_logistic(np.ones((40, 1)), y, l2=[100.0])
    assert 0 < w2[0] < w[0]


def _reference_answer(model, processor, question, image):
    """One question at a time: the greedy reply, parsed, else the yes/no decision at its first step."""
    import torch

    yn = engine.yes_no_tokens(processor)
    (raw,), new_ids, logits = engine.generate_replies(model, processor, [prompts.answer_messages(question)],
                                                          [image], 4)
    p = torch.softmax(logits[len(yn.prefix)][0], -1)
    p_yes = float(p[yn.yes].sum() / (p[yn.yes].sum() + p[yn.no].sum()))
    parsed = parsing.parse_yes_no(raw)
    own = parsed if parsed in ("yes", "no") else ("yes" if p_yes >= 0.5 else "no")
    return own.capitalize(), p_yes if own == "yes" else 1 - p_yes


def test_own_answers_match_a_one_at_a_time_computation(built, tiny_vlm):
    ds, _, _ = built
    model, processor = tiny_vlm
    picks = [i for i, f in enumerate(ds["flipped"]) if not f][:: max(1, len(ds) // 16)][:6]
    images = [ds[i]["image"].convert("RGB") for i in picks]
    for i, img in zip(picks, images):
        own, p_own = _reference_answer(model, processor, ds["question"][i], img)
        assert ds["own_answer"][i] == own
        assert ds["p_own_raw"][i] == pytest.approx(p_own, abs=1e-4)


def test_build_is_deterministic_and_resumes(tiny_vlm, tmp_path, monkeypatch, built):
    model, processor = tiny_vlm
    ds, report, _ = built
    monkeypatch.setenv(store.FAIL_AFTER_SHARDS_ENV, "1")
    with pytest.raises(store.InjectedFailure):
        _build(model, processor, tmp_path / "again", temperature_holdout=0.6)
    monkeypatch.delenv(store.FAIL_AFTER_SHARDS_ENV)
    again = _build(model, processor, tmp_path / "again", temperature_holdout=0.6)
    assert store.dataset_sha256(again) == report["sha256"]
    with pytest.raises(store.ConfigMismatchError):
        _build(model, processor, tmp_path / "again", clean_share=0.75)


def test_damaged_shard_is_rebuilt_not_used(tiny_vlm, tmp_path, monkeypatch, built, capsys):
    model, processor = tiny_vlm
    _, report, _ = built
    monkeypatch.setenv(store.FAIL_AFTER_SHARDS_ENV, "1")
    with pytest.raises(store.InjectedFailure):
        _build(model, processor, tmp_path, temperature_holdout=0.6)
    monkeypatch.delenv(store.FAIL_AFTER_SHARDS_ENV)
    arrow = next((tmp_path / "shards").glob("*/data/*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    again = _build(model, processor, tmp_path, temperature_holdout=0.6)
    assert "damaged shard" in capsys.readouterr().out
    assert store.dataset_sha256(again) == report["sha256"]
    # a damaged merged copy is rebuilt as well
    final_arrow = next((tmp_path / "dataset").glob("*.arrow"))
    final_arrow.write_bytes(final_arrow.read_bytes()[:-10])
    assert store.dataset_sha256(_build(model, processor, tmp_path, temperature_holdout=0.6)) == report["sha256"]


def test_heldout_scenes_are_a_share_of_the_training_scenes():
    ids = [scenes.scene_id("csp", i) for i in range(2000)]
    share = np.mean([grounded_rows.is_heldout(s, 0, 0.2) for s in ids])
    assert 0.17 < share < 0.23


def test_bright_balance_flags_bright_only_noised_rows():
    balanced = grounded_rows.bright_balance([True, False, True, False], ["none", "none", "key", "distractor"])
    assert balanced["ok"] and balanced["clean_share"] == balanced["noised_share"] == 0.5
    skewed = grounded_rows.bright_balance([False, False, True, True], ["none", "none", "key", "distractor"])
    assert not skewed["ok"]
    assert grounded_rows.bright_balance([True, False], ["none", "key"], tolerance=1.0)["ok"]
    assert set(grounded_rows.BRIGHT_COLORS) == {"white", "yellow"}


def test_build_report_carries_the_bright_check(built):
    ds, report, _ = built
    b = report["bright_balance"]
    clean = [x for x, n in zip(ds["bright_scene"], ds["noise_on"]) if n == "none"]
    assert b["clean_share"] == pytest.approx(np.mean(clean), abs=1e-4) and b["ok"]
    key = [x for x, n in zip(ds["noise_on_bright"], ds["noise_on"]) if n == "key"]
    assert report["noise_on_bright_share"]["key"] == pytest.approx(np.mean(key), abs=1e-4)
    for i in range(len(ds)):
        if i % 7 == 0:
            assert ds["bright_scene"][i] == grounded_rows.is_bright_scene(_scene(ds["image_id"][i]))


def test_grounded_config_and_inputs_are_checked(tiny_vlm, tmp_path):
    with pytest.raises(ValueError, match="targets"):
        buildconfig.BuildConfig(targets="mine")
    with pytest.raises(ValueError, match="grounded options"):
        buildconfig.BuildConfig(grounded={"clean_share": 0.5})
    with pytest.raises(ValueError, match="clean_share"):
        _cfg(clean_share=1.5)
    src = sources.world_source(scenes.make_scenes("csp", 2), 2)
    with pytest.raises(ValueError, match="model"):
        paper_rows.build_perturbed_dataset(src, out_dir=tmp_path / "x", config=_cfg())
    model, processor = tiny_vlm
    with pytest.raises(ValueError, match="CSP-split"):
        grounded_rows.build_grounded_dataset(scenes.make_scenes("eval", 2), model, processor, tmp_path / "y", _cfg())
    with pytest.raises(ValueError, match="below 100"):
        grounded_rows.build_grounded_dataset(scenes.make_scenes("csp", 2), model, processor, tmp_path / "z",
                                 buildconfig.BuildConfig(levels=(100,), targets="grounded"))
    with pytest.raises(ValueError, match="local"):
        grounded_rows.build_grounded_dataset(scenes.make_scenes("csp", 2), model, processor, tmp_path / "w",
                                 buildconfig.BuildConfig(levels=(10, 100), targets="grounded",
                                                noise=csp_noise.NoiseConfig(noise="global")))


def test_paper_build_is_unchanged(tmp_path):
    cfg = buildconfig.BuildConfig(levels=(0, 50, 100), shard_size=3, include_negatives=True, failure_policy="clean")
    assert buildconfig.config_hash(cfg, "annotations") == "453af6f42b1d4b98"  # old folders still resume
    assert "targets" not in cfg.to_dict()
    src = sources.world_source(scenes.make_scenes("csp", 3), 2, seed=0)
    ds = paper_rows.build_perturbed_dataset(src, out_dir=tmp_path / "a", config=cfg, progress=False)
    explicit = paper_rows.build_perturbed_dataset(src, out_dir=tmp_path / "b", progress=False,
                                          config=buildconfig.BuildConfig(levels=(0, 50, 100), shard_size=3, targets="paper",
                                                                include_negatives=True, failure_policy="clean"))
    digest = store.dataset_sha256(ds)
    assert store.dataset_sha256(explicit) == digest
    assert digest == "3a869c9f34648583551871b1dfb191e4475b940e922b201910c20fdfab52564d"


def test_grounded_evaluation_set():
    b = grounded_rows.grounded_perturbed_benchmark(n_images=6, levels=(20, 60))
    ids = [it.question_id for it in b.items]
    assert len(set(ids)) == len(ids)
    assert {it.label for it in b.items} == {"yes", "no"}
    combos = {(schema.noise_on_of(q), level_of(q)) for q in ids}
    assert combos == {("none", 100), ("key", 20), ("key", 60), ("distractor", 20), ("distractor", 60)}
    for it in b.items:
        sid = it.question_id.split("-q")[0]
        _, index, _, _ = scenes.parse_scene_id(sid)
        assert grounded_rows.GROUNDED_EVAL_START <= index < grounded_rows.GROUNDED_EVAL_START + 6
    from csp_utils.dataset.grounders import AnnotationGrounder

    for it in b.items[:40]:
        sid = it.question_id.split("-q")[0]
        scene = scenes.make_scene("eval", scenes.parse_scene_id(sid)[1])
        changed = (np.asarray(b.image_loader(it.question_id)) != scene.image).any(-1)
        asked = grounded_rows.asked_mask(scene, it.objects, AnnotationGrounder.from_scenes([scene]).vocabulary)
        if schema.noise_on_of(it.question_id) == "distractor":
            assert not (changed & asked).any()
        elif schema.noise_on_of(it.question_id) == "none":
            assert not changed.any()
    again = grounded_rows.grounded_perturbed_benchmark(n_images=6, levels=(20, 60))
    assert all((np.asarray(b.image_loader(q)) == np.asarray(again.image_loader(q))).all() for q in ids[::7])


def test_notebook_builds_grounded_rows(tmp_path):
    import papermill as pm

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    pm.execute_notebook(str(repo / "notebooks" / "02_build_perturbed_dataset.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters=dict(run_dir=str(run), data={"n_scenes": 10},
                                        build={"levels": [10, 50, 100], "targets": "grounded", "shard_size": 20,
                                               "grounded": {"temperature_holdout": 0.5, "flip_rows": True,
                                                            "clean_share": 0.5, "questions": "world"}}),
                        cwd=str(repo), progress_bar=False, kernel_name="python3")
    report = json.loads((run / "dataset" / "build_report.json").read_text())
    assert report["targets"] == "grounded" and report["rows"] == 80 and report["flip_rows"] == 40
    assert (run / "figures").exists()


def test_a_build_is_named_by_the_model_weights_not_their_path(tiny_vlm, tmp_path):
    import shutil

    from csp_utils.vlm import models

    model, _ = tiny_vlm
    src = Path(models.__file__).parent.parent / "data" / "tiny_llava_deep"
    shutil.copytree(src, tmp_path / "moved")
    a = models.load_vlm(str(src))[0]
    b = models.load_vlm(str(tmp_path / "moved"))[0]
    assert grounded_rows._fingerprint(a) == grounded_rows._fingerprint(b) != grounded_rows._fingerprint(model)
    assert str(src) not in grounded_rows._fingerprint(a)
