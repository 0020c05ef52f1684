"""Confidence baselines, the evaluation suite's sets and the analysis tables built from result
rows: bootstrap intervals, paired comparisons, seeds, the Markdown results."""

import numpy as np
import pandas as pd
import pytest

from csp_utils.analysis import ablations, tables
from csp_utils.core import baselines, metrics
from csp_utils.evaluate import matrix, suites
from csp_utils.world import benchmarks, scenes


def test_temperature_recovers_overconfidence():
    # Simulate a model whose true accuracy is sigmoid(z / 3) but which reports sigmoid(z):
    # the fitted temperature should come out near 3.
    rng = np.random.default_rng(0)
    z = rng.uniform(0.0, 8.0, 20000)
    p_reported = 1 / (1 + np.exp(-z))
    correct = rng.random(z.size) < 1 / (1 + np.exp(-z / 3.0))
    t = baselines.fit_temperature(p_reported, correct)
    assert 2.6 < t < 3.4
    scaled = baselines.temperature_scale(p_reported, t)
    assert abs(scaled.mean() - correct.mean()) < 0.02
    assert np.all(np.diff(scaled[np.argsort(p_reported)]) >= -1e-12)  # monotone: AUROC unchanged


def test_temperature_one_is_identity_and_errors():
    p = np.array([0.6, 0.9, 0.99])
    np.testing.assert_allclose(baselines.temperature_scale(p, 1.0), p, rtol=1e-6)
    with pytest.raises(ValueError, match="equal"):
        baselines.fit_temperature([0.5, 0.6], [1])


def test_suite_takes_the_official_files(benchmarks_dir, tmp_path):
    # Images are not shipped: the suite builds the sets lazily, a missing image is named on use.

    cfg = suites.SuiteConfig(pope_dir=str(benchmarks_dir / "pope"), coco_images=str(tmp_path),
                                 amber_dir=str(benchmarks_dir / "amber"), amber_images=str(tmp_path),
                                 official_only=True)
    suite = suites.build_suite(cfg)
    assert {"coco-pope-random", "coco-pope-popular", "coco-pope-adversarial"} <= set(suite)
    assert all(name.startswith(("coco-pope-", "official-amber-")) for name in suite)   # no world sets
    assert len(suite["coco-pope-adversarial"].items) == 3000
    assert len(suite["official-amber-relation"].items) == 975 + 689
    assert tables.positive_class("official-amber-existence") == "no"
    with pytest.raises(FileNotFoundError, match="COCO_val2014"):
        suite["coco-pope-random"].image_loader(suite["coco-pope-random"].items[0].image_id)
    with pytest.raises(ValueError, match="coco_images"):
        suites.build_suite(suites.SuiteConfig(pope_dir=str(benchmarks_dir / "pope")))


def _rows(model, set_, n, acc, conf, seed=0, internal=0.9):
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < acc
    return [{"model": model, "set": set_, "framing": "third", "readout": "single_pass", "question_id": f"q{i}",
             "label": "yes", "answer": "yes" if c else "no", "correct": bool(c), "confidence": conf,
             "internal_prob": internal} for i, c in enumerate(correct)]


def test_headline_table_pools_seeds_and_bootstraps_by_question():

    rows = _rows("csp@s0", "pope-random", 200, 0.7, 0.7, seed=1) + _rows("csp@s1", "pope-random", 200, 0.7, 0.9, seed=1)
    table = tables.headline_table(rows, n_boot=200, seed=0)
    r = table.iloc[0]
    assert r["model"] == "csp" and r["seeds"] == 2 and r["n_questions"] == 200
    conf = np.array([x["confidence"] for x in rows])
    correct = np.array([x["correct"] for x in rows], dtype=float)
    assert r["ece"] == pytest.approx(metrics.ece(conf, correct))
    assert r["ece_low"] <= r["ece"] <= r["ece_high"] + 1e-9
    assert r["ece_seed_min"] < r["ece_seed_max"]  # 0.7 is calibrated, 0.9 is not
    assert r["f1"] == pytest.approx(2 * correct.sum() / (len(rows) + correct.sum()))  # all labels yes


def test_tables_scored_in_worker_processes_equal_the_tables_scored_here(monkeypatch):
    """The resamples are drawn before the groups are handed out: any number of workers gives
    the same tables, bit for bit."""
    rng = np.random.default_rng(3)
    rows = []
    for set_ in ("pope-random", "amber-existence"):
        for model, shift in (("csp@s0", 0.0), ("csp@s1", 0.1), ("base", 0.05)):
            rs = _rows(model, set_, 120, 0.7, 0.0, seed=len(rows))
            for i, r in enumerate(rs):
                r.update(confidence=float(np.clip(rng.random() * 0.5 + 0.4 + shift, 0, 1)), image_id=f"{set_}-{i // 4}",
                         question_id=f"{set_}-q{i}")
            rows += rs
    rows += [{**r, "model": "baseline:constant", "framing": "-", "readout": "-", "confidence": 0.7}
             for r in rows if r["model"] == "base"]
    here = tables.evaluation_tables(rows, n_boot=50, workers=1)
    monkeypatch.setattr(tables._Scorer, "MIN_ROWS", 0)
    spawned = tables.evaluation_tables(rows, n_boot=50, workers=2)
    for a, b in zip(here, spawned):
        assert len(a) > 3
        pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("case", ["ties", "continuous", "one_class", "all_missing"])
def test_resampled_metrics_equal_row_by_row_metrics(case):
    """The bootstrap's one-bincount metrics equal _metric_values on each resample's rows."""

    rng = np.random.default_rng(3)
    n = 120
    conf = {"ties": rng.choice([0.0, 0.3, 0.1 + 0.2, 0.7, 0.9, 1.0], n), "continuous": rng.random(n),
            "one_class": rng.random(n), "all_missing": np.full(n, np.nan)}[case]
    if case != "all_missing":
        conf[rng.random(n) < 0.1] = np.nan                      # unparsed confidences
    correct = (rng.random(n) < 0.7).astype(float)
    if case == "one_class":
        correct[:] = 1.0
    truth, pred = rng.random(n) < 0.5, rng.random(n) < 0.5
    codes = rng.integers(0, 40, n)                               # rows grouped into 40 images
    drawn = np.stack([np.bincount(rng.integers(0, 40, 40), minlength=40) for _ in range(25)])
    fast = tables._resampled_metric_values(conf, correct, truth, pred, codes, drawn)
    for b in range(len(drawn)):
        idx = np.repeat(np.arange(n), drawn[b, codes])
        slow = tables._metric_values(conf[idx], correct[idx], truth[idx], pred[idx])
        assert set(slow) - set(fast) == {"adaptive_ece"}          # a point estimate only
        for k in fast:
            assert fast[k][b] == pytest.approx(slow[k], abs=1e-12, nan_ok=True), (case, b, k)


def test_baseline_rows_use_the_base_models_answers():

    rows = (_rows("base", "train-sample", 100, 0.8, 0.95) + _rows("base", "calibration", 300, 0.75, 0.95, seed=2)
            + _rows("base", "pope-random", 50, 0.7, 0.95, seed=3))
    out = matrix.baseline_rows(rows)
    assert {r["model"] for r in out} == {"baseline:constant", "baseline:answer_constant", "baseline:internal",
                                         "baseline:temperature"}
    const = [r for r in out if r["model"] == "baseline:constant"]
    acc = np.mean([r["correct"] for r in rows if r["set"] == "train-sample"])
    assert len(const) == 50 and all(r["confidence"] == pytest.approx(acc) for r in const)
    temp = [r["confidence"] for r in out if r["model"] == "baseline:temperature"]
    assert all(t < 0.9 for t in temp)  # overconfident 0.9 scaled down towards the held-out accuracy
    with pytest.raises(ValueError, match="calibration"):
        matrix.baseline_rows(_rows("base", "pope-random", 5, 0.5, 0.5))


def test_answer_constant_is_training_accuracy_given_the_own_answer():

    train = _rows("base", "train-sample", 8, 1.0, 0.9)
    for r, (answer, ok) in zip(train, [("yes", 1), ("yes", 1), ("yes", 1), ("yes", 0),
                                       ("no", 1), ("no", 0), ("no", 0), ("no", 0)]):
        r.update(answer=answer, correct=bool(ok))
    test = _rows("base", "pope-random", 3, 1.0, 0.9, seed=3)
    for r, answer in zip(test, ["yes", "no", "unclear"]):
        r["answer"] = answer
    out = matrix.baseline_rows(train + _rows("base", "calibration", 50, 0.7, 0.9) + test)
    conf = [r["confidence"] for r in out if r["model"] == "baseline:answer_constant"]
    assert conf == pytest.approx([0.75, 0.25, 0.5])  # after "yes", after "no", else overall training accuracy


def test_recalibrations_are_fitted_on_the_calibration_set_only():
    from csp_utils.core import baselines
    from csp_utils.evaluate import matrix

    rng = np.random.default_rng(0)
    calib = []
    for model in ("base", "csp@s1"):
        rs = _rows(model, "calibration", 200, 0.7, None, seed=4)
        for r in rs:
            r["confidence"] = float(rng.choice([0.5, 0.9, 1.0]))
            r["internal_prob"] = float(rng.uniform(0.5, 1.0))
        calib += rs
    test = _rows("base", "pope-random", 60, 0.6, 0.9, seed=5) + _rows("csp@s1", "pope-random", 60, 0.6, 0.9, seed=5)
    test[0]["confidence"] = None                       # an unparsed reply stays unparsed
    out = matrix.recalibrated_rows(calib + test)
    names = {r["model"] for r in out}
    assert names == {"baseline:platt", "baseline:isotonic", "baseline:histogram", "base+platt", "base+isotonic",
                     "base+histogram", "csp+platt@s1", "csp+isotonic@s1", "csp+histogram@s1"}
    assert {r["set"] for r in out} == {"pope-random"}
    # the scored set's labels and correctness change nothing: only the calibration set is fitted
    flipped = [{**r, "correct": not r["correct"], "label": "no"} for r in test]
    again = matrix.recalibrated_rows(calib + flipped)
    assert [r["confidence"] for r in again] == [r["confidence"] for r in out]
    iso = [r["confidence"] for r in out if r["model"] == "csp+isotonic@s1"]
    fit = baselines.fit_recalibrator("isotonic", [r["confidence"] for r in calib if r["model"] == "csp@s1"],
                                     [r["correct"] for r in calib if r["model"] == "csp@s1"])
    assert iso == pytest.approx(list(fit.apply([0.9] * 60)))
    internal = [r for r in out if r["model"] == "baseline:platt"]
    assert internal[0]["framing"] == "-" and internal[0]["confidence"] is not None   # from the internal probability
    assert [r["confidence"] for r in out if r["model"] == "base+platt"][0] is None


def _image_rows(model, set_, n_images, per_image, seed=0, conf_fn=None, image_prefix="eval-0"):
    """Rows whose correctness is shared within an image (the case a question bootstrap gets wrong)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        image = f"{image_prefix}{i:05d}"
        ok = bool(rng.random() < 0.7)
        for q in range(per_image):
            conf = conf_fn(ok, rng) if conf_fn else 0.7
            rows.append({"model": model, "set": set_, "framing": "third", "readout": "single_pass",
                         "question_id": f"{image}-{set_}-{q}", "image_id": image, "label": "yes",
                         "answer": "yes" if ok else "no", "correct": ok, "confidence": conf, "internal_prob": 0.9})
    return rows


def test_image_bootstrap_is_wider_than_question_bootstrap_for_clustered_rows():

    rows = _image_rows("m", "pope-random", 60, 6, conf_fn=lambda ok, rng: 0.9 if rng.random() < 0.5 else 0.6)
    img = tables.headline_table(rows, n_boot=400, seed=0, cluster="image").iloc[0]
    que = tables.headline_table(rows, n_boot=400, seed=0, cluster="question").iloc[0]
    assert img["cluster"] == "image" and que["cluster"] == "question"
    assert img["n_images"] == 60 and img["n_questions"] == 360
    for k in ("accuracy", "brier"):
        assert img[f"{k}_high"] - img[f"{k}_low"] > 1.8 * (que[f"{k}_high"] - que[f"{k}_low"]), k
    assert img["brier"] == que["brier"]
    with pytest.raises(ValueError, match="cluster"):
        tables.headline_table(rows, cluster="scene")


def test_headline_pools_sets_and_reports_image_share():

    rows = (_image_rows("m", "pope-random", 20, 6, conf_fn=lambda ok, rng: 0.9 if ok else 0.5)
            + _image_rows("m", "amber-existence", 10, 2, seed=1, image_prefix="eval-1")
            + _image_rows("m", "transfer-blur", 10, 6, seed=2, image_prefix="eval-2"))
    table = tables.headline_table(rows, n_boot=50, seed=0)
    clean = table[table["set"] == "pooled-clean"].iloc[0]
    assert clean["n_images"] == 30 and clean["n_questions"] == 140 and clean["n_sets"] == 2
    pooled = [r for r in rows if r["set"] != "transfer-blur"]
    conf = np.array([r["confidence"] for r in pooled])
    ok = np.array([r["correct"] for r in pooled], dtype=float)
    assert clean["brier"] == pytest.approx(metrics.brier(conf, ok))
    assert table[table["set"] == "pooled-transfer"].iloc[0]["n_images"] == 10
    pope = table[table["set"] == "pope-random"].iloc[0]
    assert pope["image_share"] == pytest.approx(1.0)   # confidence set per image


def test_paired_table_same_resamples_and_verdicts():

    good = lambda ok, rng: 0.95 if ok else 0.2  # noqa: E731
    rows = _image_rows("csp@s0", "pope-random", 80, 6, conf_fn=good) + _image_rows("base", "pope-random", 80, 6)
    rows += [{**r, "model": "baseline:constant", "framing": "-", "readout": "-", "confidence": 0.7}
             for r in _image_rows("x", "pope-random", 80, 6)]
    paired = tables.paired_table(rows, n_boot=300, seed=0)
    get = lambda m, r, k: paired[(paired["set"] == "pope-random") & (paired["method"] == m)  # noqa: E731
                                 & (paired["reference"] == r) & (paired["metric"] == k)].iloc[0]
    assert get("csp", "base", "brier")["verdict"] == "better" and get("csp", "base", "auroc")["verdict"] == "better"
    assert get("csp", "base", "accuracy")["diff"] == 0 and get("csp", "base", "accuracy")["verdict"] == "level"
    # the base model and the constant give the same confidence: zero difference on every resample
    same = get("base", "baseline:constant", "brier")
    assert same["diff"] == 0 and same["diff_low"] == 0 and same["diff_high"] == 0 and same["verdict"] == "level"
    assert set(paired["reference"]) == {"base", "baseline:constant"}
    with pytest.raises(ValueError, match="different questions"):
        tables.paired_table(rows[:-6], n_boot=10)


def test_paired_interval_is_narrower_than_the_unpaired_one():
    """Both methods move with the images: the paired difference cancels the image effect."""

    rows = _image_rows("a", "pope-random", 100, 6, conf_fn=lambda ok, rng: 0.8 if ok else 0.4)
    rows += [{**r, "model": "base", "confidence": r["confidence"] + 0.05} for r in rows]
    head = tables.headline_table(rows, n_boot=400, seed=0)
    head = head[head["set"] == "pope-random"].set_index("model")
    paired = tables.paired_table(rows, n_boot=400, seed=0)
    p = paired[(paired["metric"] == "brier") & (paired["method"] == "a") & (paired["set"] == "pope-random")].iloc[0]
    unpaired = (head.loc["a", "brier_high"] - head.loc["a", "brier_low"]) + (head.loc["base", "brier_high"]
                                                                              - head.loc["base", "brier_low"])
    assert p["diff_high"] - p["diff_low"] < 0.5 * unpaired


def test_strongest_baseline_is_the_lowest_pooled_clean_brier():

    head = pd.DataFrame({"model": ["baseline:constant", "baseline:internal", "baseline:internal", "base"],
                         "set": ["pooled-clean", "pooled-clean", "pooled-transfer", "pooled-clean"],
                         "brier": [0.14, 0.12, 0.5, 0.01]})
    assert tables.strongest_baseline(head) == "baseline:internal"
    with pytest.raises(ValueError, match="baseline"):
        tables.strongest_baseline(head[head["model"] == "base"])


SMALL = dict(n_pope_images=4, n_amber_images=4, n_transfer_images=2, n_calibration_images=3, n_train_images=3,
             n_perturbed_images=1, perturbed_levels=(0, 100))


def test_suite_sets_share_no_image_with_each_other_or_a_training_split():

    suite = suites.build_suite(suites.SuiteConfig(**SMALL))
    desc = suites.set_descriptions(suite)
    assert set(desc) == set(suite)
    seen = {}
    for name, d in desc.items():
        assert d["image_ids"] and d["n_images"] == len(d["image_ids"])
        # a degraded or perturbed image counts as its clean scene
        own = {scenes.parse_scene_id(suites.scene_of(i))[:2] for i in d["image_ids"]}
        if name == "train-sample":
            assert {split for split, _ in own} == {"base"}
            continue
        assert {split for split, _ in own} == {"eval"}, name   # never base (pretraining) or csp (CSP training)
        for key in own:
            assert key not in seen, (name, seen.get(key))
            seen[key] = name
    # the three POPE sets draw their images from different ranges
    pope = [{suites.scene_of(i) for i in desc[f"pope-{k}"]["image_ids"]} for k in ("random", "popular", "adversarial")]
    assert not (pope[0] & pope[1]) and not (pope[1] & pope[2]) and not (pope[0] & pope[2])


def test_check_disjoint_names_the_sets_sharing_an_image():

    scene_list = benchmarks.pope_scenes(2)
    shared = {k: benchmarks.build_world_pope(scene_list, k) for k in ("random", "popular")}
    with pytest.raises(ValueError, match="'random'|'popular'|pope"):
        suites.check_disjoint(shared)
    train = benchmarks.build_world_pope(benchmarks.pope_scenes(1, split="csp"), "random")
    with pytest.raises(ValueError, match="training split"):
        suites.check_disjoint({"pope-random": train})


def test_default_sizes():
    """POPE sets hold >= 300 images each at the default, in the config and in what the params run."""
    from pathlib import Path
    from csp_utils.pipeline import planning

    assert suites.SuiteConfig().n_pope_images >= 300
    folder = Path(__file__).parents[1] / "params"
    for name, stages in (("default", ("05_evaluate", "05_evaluate@deep")), ("full", ("05_evaluate", "06_ablations"))):
        params = planning.load_params(folder / f"{name}.yaml")
        for stage in stages:
            suite = suites.SuiteConfig(**params["stages"][stage].get("suite", {}))
            assert suite.n_pope_images >= 300, (name, stage)


def test_compact_markdown_table_and_results_document(tmp_path):
    from csp_utils.analysis import markdown

    rows = []
    for set_, prefix in (("pope-random", "eval-0"), ("transfer-blur", "eval-2")):
        rows += _image_rows("base", set_, 20, 6, image_prefix=prefix)
        rows += _image_rows("sft_simpo@s0", set_, 20, 6, conf_fn=lambda ok, rng: 0.9 if ok else 0.3, image_prefix=prefix)
        for b, c in (("constant", 0.7), ("internal", 0.8)):
            rows += [{**r, "model": f"baseline:{b}", "framing": "-", "readout": "-", "confidence": c}
                     for r in _image_rows("x", set_, 20, 6, image_prefix=prefix)]
    rows += _image_rows("sft@s0", "pope-random", 20, 6) + _image_rows("sft@s0", "transfer-blur", 20, 6, image_prefix="eval-2")
    tables.headline_table(rows, n_boot=50).to_csv(tmp_path / "headline.csv", index=False)
    tables.paired_table(rows, n_boot=50).to_csv(tmp_path / "paired.csv", index=False)
    pooled = markdown.pooled_markdown(tmp_path)
    body = [line for line in pooled.splitlines() if line.startswith("| pooled")]
    # per pool: the base model, the headline methods, the strongest baseline (no other model)
    assert len(body) == 6 and not any("| sft |" in line for line in body)
    assert sum(line.split("|")[3].strip() == "base" for line in body) == 2
    assert "`baseline:constant`" in pooled and "resampling seeds, then images" in pooled
    assert any("better" in line for line in body if "sft_simpo" in line)
    # the README's compact table: per base model and shown model, clean ranking and Brier, transfer Brier
    table = markdown.results_markdown(tmp_path)
    assert table.splitlines()[0] == ("| base model | model | seeds | within-set AUROC (clean) | Brier (clean) | "
                                     "ECE10 (clean) | Brier (transfer) |")
    body = [line.split(" | ") for line in table.splitlines()[2:] if line.startswith("| base |")]
    head = pd.read_csv(tmp_path / "headline.csv")
    row = head[(head["model"] == "sft_simpo") & (head["set"] == "pooled-transfer")].iloc[0]
    assert [b[1] for b in body] == ["base", "sft_simpo", "baseline:constant"]
    assert body[1][6].rstrip(" |") == f"{row['brier']:.3f}" and "[" in body[1][3]
    assert "`baseline:constant`" in table and "docs/results.md" in table
    doc = markdown.results_document(tmp_path)
    assert "| pope-random | sft |" in doc and "paired differences of sft_simpo" in doc
    assert "selective prediction" in doc and "| AURC |" in doc and "isotonic" in doc
    # two base models, two methods: each base model with its own rows and strongest baseline
    (tmp_path / "other").mkdir()
    for name in ("headline.csv", "paired.csv"):
        (tmp_path / "other" / name).write_bytes((tmp_path / name).read_bytes())
    both = {"planted": tmp_path, "noconf": tmp_path / "other"}
    body = [line for line in markdown.pooled_markdown(both, methods=("sft_simpo", "sft")).splitlines()
            if line.startswith("| pooled")]
    assert len(body) == 16 and sum("| noconf |" in line for line in body) == 8
    compact = markdown.results_markdown(both, methods=("sft_simpo", "sft")).splitlines()
    assert sum(line.startswith("| noconf |") for line in compact) == 4
    assert "## Base model `noconf`" in markdown.results_document(both)


# ------------------------------------------------------- evaluating confidence-only adapters
def _tiny_base_and_adapters(tmp_path, n_adapters: int, activated: bool = False):
    """A tiny model's folder and LoRA adapters with random B (same PEFT config) on it;
    ``activated``: PEFT's aLoRA, invoked by the third-person follow-up question."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from csp_utils.train import settings, trainers
    from csp_utils.vlm import models
    from csp_utils.vlm.embedded import build

    model, proc = build.build_tiny_vlm(build.TinyVLMConfig(image_first=True))
    base = models.save_vlm(model, proc, tmp_path / "base")
    folders = []
    for seed in range(n_adapters):
        config = (trainers.lora_config(model, settings.LoraSettings(r=4, activation="confidence"), proc) if activated
                  else LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj",
                                                                     "linear_1"]))
        peft_model = get_peft_model(copy.deepcopy(model), config)
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        peft_model.save_pretrained(tmp_path / f"adapter{seed}")
        folders.append(str(tmp_path / f"adapter{seed}"))
    return str(base), folders


def test_confidence_only_adapters_take_answers_within_one_call_and_rows_are_unchanged(tmp_path, monkeypatch,
                                                                                       one_torch_thread):
    """The second confidence-only adapter takes the first one's answers (never the base
    model's, never a file written before the call); every file equals a run without reuse."""
    from csp_utils.evaluate import evaluation
    from helpers import make_benchmark

    base, (a0, a1) = _tiny_base_and_adapters(tmp_path, 2)
    specs = [matrix.ModelSpec("base", base),
             matrix.ModelSpec("c0", base, a0, adapter_scope="confidence", layout="follow_up"),
             matrix.ModelSpec("c1", base, a1, adapter_scope="confidence", layout="follow_up")]
    suite = {"pope-test": make_benchmark(6), "amber-test": make_benchmark(5, family="amber")}
    cfg = evaluation.EvalConfig(batch_size=4, max_new_tokens=6, confidence_max_new_tokens=4, progress=False)
    calls = []
    evaluate = evaluation.evaluate

    def spy(model, processor, bench, path, name, config, answers_from=None):
        calls.append((name, bench.name, None if answers_from is None else answers_from[1]))
        return evaluate(model, processor, bench, path, name, config, answers_from=answers_from)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    reused = matrix.evaluate_models(specs, suite, tmp_path / "reuse", cfg)
    assert [c for c in calls if c[2] is not None] == [("c1", "pope-test", "c0"), ("c1", "amber-test", "c0")]
    calls.clear()
    made = matrix.evaluate_models(specs, suite, tmp_path / "made", cfg, reuse_answers=False)
    assert all(c[2] is None for c in calls)
    assert [p.read_bytes() for p in reused] == [p.read_bytes() for p in made]

    # a file that held rows before the call is no source: the batches it was made in are unknown
    calls.clear()
    partial = matrix.results_path(tmp_path / "again", "c0", "pope-test")
    partial.parent.mkdir(parents=True)
    made_c0 = matrix.results_path(tmp_path / "made", "c0", "pope-test").read_text().splitlines(keepends=True)
    partial.write_text("".join(made_c0[:2]))
    matrix.evaluate_models(specs[1:], {"pope-test": suite["pope-test"]}, tmp_path / "again", cfg)
    assert calls and all(c[2] is None for c in calls)


def test_activated_adapters_share_one_answer_turn_and_each_gets_its_own_rows(tmp_path, monkeypatch,
                                                                            one_torch_thread):
    """Activated adapters are evaluated batch-major on one model (one answer turn per batch,
    every adapter continuing its cache); each file equals the adapter evaluated alone."""
    from csp_utils.evaluate import evaluation
    from helpers import make_benchmark

    base, adapters = _tiny_base_and_adapters(tmp_path, 3, activated=True)
    specs = [matrix.ModelSpec("base", base)] + [
        matrix.ModelSpec(f"a{k}", base, a, adapter_scope="confidence", layout="follow_up") for k, a in enumerate(adapters)]
    suite = {"pope-test": make_benchmark(7), "amber-test": make_benchmark(5, family="amber")}
    cfg = evaluation.EvalConfig(batch_size=3, max_new_tokens=6, confidence_max_new_tokens=4, progress=False)
    turns, real = [], evaluation._answer_turn
    monkeypatch.setattr(evaluation, "_answer_turn", lambda *a, **k: turns.append(1) or real(*a, **k))
    shared = matrix.evaluate_models(specs, suite, tmp_path / "shared", cfg)
    # base: 3 + 2 batches; the three adapters together: 3 + 2 more
    assert len(turns) == 10
    alone = matrix.evaluate_models(specs, suite, tmp_path / "alone", cfg, reuse_answers=False, share_answer_turn=False)
    assert len(turns) == 10 + 20
    assert [p.relative_to(tmp_path / "shared") for p in shared] == [p.relative_to(tmp_path / "alone") for p in alone]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(shared, alone))
    confs = {p.parent.name: [r["confidence"] for r in evaluation.load_results(p)] for p in shared
             if p.name == "pope-test.jsonl"}
    assert confs["a0"] != confs["a1"] != confs["a2"], "each adapter acts in its own rows"

    # a file with rows already is resumed on its own; the fresh ones still go together
    partial = matrix.results_path(tmp_path / "again", "a1", "pope-test")
    partial.parent.mkdir(parents=True)
    partial.write_text("".join(matrix.results_path(tmp_path / "alone", "a1", "pope-test")
                               .read_text().splitlines(keepends=True)[:3]))
    again = matrix.evaluate_models(specs[1:], {"pope-test": suite["pope-test"]}, tmp_path / "again", cfg)
    # the resumed file restarts at its unfinished question, so its batches hold other questions than
    # the run alone: on some CPUs' kernels a confidence then moves in its last bits (1e-16)
    for got, s in zip(again, specs[1:]):
        want = matrix.results_path(tmp_path / "alone", s.name, "pope-test")
        if got != partial:
            assert got.read_bytes() == want.read_bytes()
            continue
        rows, ref = evaluation.load_results(got), evaluation.load_results(want)
        assert [(r["question_id"], r["readout"]) for r in rows] == [(r["question_id"], r["readout"]) for r in ref]
        for r, w in zip(rows, ref):
            assert {k: v for k, v in r.items() if not isinstance(v, float)} == \
                {k: v for k, v in w.items() if not isinstance(v, float)}
            assert {k: pytest.approx(v, rel=1e-12, abs=1e-15) for k, v in r.items() if isinstance(v, float)} == \
                {k: v for k, v in w.items() if isinstance(v, float)}


def test_paired_against_compares_each_variant_with_the_reference_on_the_same_resamples():

    ref = _rows("full@g0", "pope-random", 300, 0.7, 0.7, seed=1)
    worse = _rows("variant@x", "pope-random", 300, 0.7, 0.99, seed=1)      # same answers, overconfident
    same = [{**r, "model": "variant@y"} for r in ref]                        # identical confidences
    for rows in (ref, worse, same):
        for i, r in enumerate(rows):
            r["image_id"] = f"img{i // 6}"
    table = tables.paired_against(ref + worse + same, "full@g0", n_boot=300, pools=None, pool_seeds=False)
    ece = table[table["metric"] == "ece"].set_index("method")
    assert set(ece.index) == {"variant@x", "variant@y"} and set(ece["reference"]) == {"full@g0"}
    assert ece.loc["variant@x", "verdict"] == "worse" and ece.loc["variant@x", "diff"] > 0.2
    assert ece.loc["variant@y", "diff"] == 0 and ece.loc["variant@y", "verdict"] == "level"
    with pytest.raises(ValueError, match="reference 'nope' has no rows"):
        tables.paired_against(ref, "nope")


def _two_sets(model, conf_by_set, seed=0, n=300):
    """Rows on an easy set (90% right) and a hard one (60% right), one image per question."""
    rows = []
    for set_, acc in (("pope-random", 0.9), ("amber-relation", 0.6)):
        for r in _rows(model, set_, n, acc, conf_by_set[set_], seed=seed + len(set_)):
            rows.append({**r, "question_id": f"{set_}-{r['question_id']}", "image_id": f"{set_}-{r['question_id']}"})
    return rows


def test_a_per_set_constant_ranks_nothing_within_sets_whatever_its_pooled_auroc():
    """Knowing which set is harder earns pooled AUROC but no within-set AUROC, and is level
    with a constant baseline on within-set AUROC."""

    knows_sets = _two_sets("setwise", {"pope-random": 0.9, "amber-relation": 0.6})
    constant = [{**r, "model": "baseline:constant", "confidence": 0.75} for r in knows_sets]
    pools = {"pooled-clean": ("pope-random", "amber-relation")}
    head = tables.headline_table(knows_sets + constant, n_boot=200, pools=pools)
    r = head[(head["model"] == "setwise") & (head["set"] == "pooled-clean")].iloc[0]
    assert r["auroc"] > 0.6                                  # pooled: set difficulty
    assert r["auroc_within"] == pytest.approx(0.5)           # within sets: nothing
    assert r["auroc_within_low"] == pytest.approx(0.5) and r["auroc_within_high"] == pytest.approx(0.5)
    assert r["auroc_set_constant"] == pytest.approx(r["auroc"])
    paired = tables.paired_table(knows_sets + constant, n_boot=200, pools=pools)
    p = paired[(paired["set"] == "pooled-clean") & (paired["metric"] == "auroc_within")].iloc[0]
    assert p["diff"] == pytest.approx(0.0) and p["verdict"] == "level"
    pooled = paired[(paired["set"] == "pooled-clean") & (paired["metric"] == "auroc")].iloc[0]
    assert pooled["verdict"] == "better"                     # what the pooled metric would have claimed


def test_within_set_metrics_resampled_equal_row_by_row():

    rng = np.random.default_rng(5)
    n = 200
    conf, correct = rng.random(n), (rng.random(n) < 0.7).astype(float)
    conf[rng.random(n) < 0.05] = np.nan
    conf[:40] = np.round(conf[:40], 1)                      # ties too
    sets = np.where(rng.random(n) < 0.4, "a", "b")
    codes = rng.integers(0, 50, n)
    drawn = np.stack([np.bincount(rng.integers(0, 50, 50), minlength=50) for _ in range(20)])
    fast = tables.within_set_metrics(conf, correct, sets, codes, drawn)
    assert set(fast) == set(tables.WITHIN_SET) and {"aurc", "eaurc", "sel_acc80", "prr"} <= set(fast)
    for b in range(len(drawn)):
        idx = np.repeat(np.arange(n), drawn[b, codes])
        per_set = []
        for s in ("a", "b"):
            m = (sets[idx] == s) & ~np.isnan(conf[idx])
            c, y = conf[idx][m], correct[idx][m]
            per_set.append({"auroc_within": metrics.auroc(c, y)} | metrics.selective_metrics(c, y))
        for k in fast:
            assert fast[k][b] == pytest.approx(np.mean([p[k] for p in per_set]), abs=1e-9), k
    point = tables.within_set_metrics(conf, correct, sets, codes, np.ones((1, 50)))
    for k, v in tables.mean_set_metrics(conf, correct, sets).items():
        assert point[k][0] == pytest.approx(v, abs=1e-12), k


def test_seed_spread_is_in_the_interval_and_seeds_pair_by_position():

    # the same questions and answers under three seeds; seed s2's confidence is noise
    rows = []
    rng = np.random.default_rng(0)
    base = _rows("m@s0", "pope-random", 400, 0.7, 0.5, seed=3)
    for seed_name, informative in (("s0", True), ("s1", True), ("s2", False)):
        for r in base:
            c = (0.8 if r["correct"] else 0.4) if informative else float(rng.random())
            rows.append({**r, "model": f"m@{seed_name}", "confidence": c})
    one_seed = [r for r in rows if r["model"] == "m@s0"]
    pools = {}
    head = tables.headline_table(rows, n_boot=300, pools=pools).iloc[0]
    alone = tables.headline_table(one_seed, n_boot=300, pools=pools).iloc[0]
    assert head["seeds"] == 3 and head["seed_labels"] == "s0;s1;s2"
    per_seed = [float(v) for v in head["auroc_within_per_seed"].split(";")]
    assert per_seed[0] == pytest.approx(1.0) and per_seed[2] < 0.6
    assert head["auroc_within_seed_min"] == pytest.approx(per_seed[2])
    # resampling seeds: some resamples hold s2 twice or not at all, so the interval is wide
    assert head["auroc_within_high"] - head["auroc_within_low"] > 5 * (alone["auroc_within_high"] - alone["auroc_within_low"] + 1e-3)
    # a copy of the same seeds under another name pairs s0 with s0: every difference is exactly 0
    twin = [{**r, "model": r["model"].replace("m@", "twin@")} for r in rows]
    base_rows = [{**r, "model": "base"} for r in one_seed]
    paired = tables.paired_table(rows + twin + base_rows, n_boot=200, pools=pools, base="base")
    assert set(paired["method"]) == {"m", "twin"}
    m, t = (paired[(paired["method"] == x) & (paired["metric"] == "auroc_within")].iloc[0] for x in ("m", "twin"))
    assert (m["diff_low"], m["diff_high"]) == (t["diff_low"], t["diff_high"])
    assert m["method_seeds"] == 3 and m["reference_seeds"] == 1


def test_paired_against_pairs_seed_with_seed():
    """A method against another, both with seeds: the same seed positions are drawn for both,
    so a method against a copy of itself differs by exactly 0 in every resample."""

    rows = []
    rng = np.random.default_rng(1)
    for seed_name in ("s0", "s1", "s2"):
        for r in _rows(f"a@{seed_name}", "pope-random", 200, 0.7, 0.5, seed=4):
            rows.append({**r, "confidence": float(rng.random())})
    copy = [{**r, "model": r["model"].replace("a@", "b@")} for r in rows]
    t = tables.paired_against(rows + copy, "a", n_boot=200, pools={})
    assert set(t["method"]) == {"b"} and set(t["reference"]) == {"a"}
    assert (t["diff_low"] == 0).all() and (t["diff_high"] == 0).all() and set(t["verdict"]) == {"level"}


def test_variant_seeds_and_labels():

    seeded = ablations.variant_seeds({"full": ["sft@g0", "sft@g1"], "base": "base"})
    assert seeded == {"full": ["sft@g0", "sft@g1"], "base": ["base"]}
    assert ablations.variant_labels(seeded) == {"sft@g0": "full@s0", "sft@g1": "full@s1", "base": "base"}
    with pytest.raises(ValueError, match="holds '@'"):
        ablations.variant_seeds({"a@b": "x"})
    with pytest.raises(ValueError, match="two variants"):
        ablations.variant_labels({"a": ["x"], "b": ["x", "y"]})


def _ablation_rows():
    """Two seeds of a full method, a one-seed variant, the full method's first-person rows, and
    rows the ablation never reads (a fit set, another read-out)."""
    rows = []
    for model, conf, seed in (("sft@g0", 0.7, 1), ("sft@g1", 0.75, 2), ("other", 0.99, 1)):
        rows += _rows(model, "pope-random", 120, 0.7, conf, seed=seed)
    rows += [{**r, "framing": "first", "confidence": 0.8} for r in _rows("sft@g0", "pope-random", 120, 0.7, 0.7, seed=1)]
    rows += _rows("other", "calibration", 20, 0.7, 0.5)
    rows += [{**r, "readout": "generation"} for r in _rows("other", "pope-random", 20, 0.7, 0.5)]
    return rows


def test_ablation_rows_go_under_their_labels_and_give_the_long_and_paired_tables():
    seeded = ablations.variant_seeds({"full": ["sft@g0", "sft@g1"], "less": "other"})
    label_of = ablations.variant_labels(seeded)
    rows = _ablation_rows()
    picked = ablations.variant_rows(rows, label_of, {"pope-random"}, "third", "single_pass", reference="sft@g0")
    assert {r["model"] for r in picked} == {"full@s0", "full@s1", "less", "full (first person)"}
    assert {r["set"] for r in picked} == {"pope-random"} and {r["readout"] for r in picked} == {"single_pass"}
    assert len(picked) == 4 * 120
    without = ablations.variant_rows(rows, label_of, {"pope-random"}, "third", "single_pass")
    assert {r["model"] for r in without} == {"full@s0", "full@s1", "less"}

    boot = {"n_boot": 50, "pools": None}
    long = ablations.ablation_table(picked, n_boot=50)
    assert list(long.columns) == ["name", "set", "metric", "cluster", "value", "low", "high", "seeds", "per_seed"]
    assert set(long["name"]) == {"full", "less", "full (first person)"}
    assert len(long) == len(set(long["name"])) * long["set"].nunique() * len(ablations.ABLATION_METRICS)
    full = long[(long["name"] == "full") & (long["set"] == "pope-random")].set_index("metric")
    head = tables.headline_table(picked, n_boot=50)
    row = head[(head["model"] == "full") & (head["set"] == "pope-random")].iloc[0]
    assert full.loc["brier", "value"] == row["brier"] and full.loc["brier", "seeds"] == 2
    assert set(ablations.ablation_view(long).index) == set(long["name"])

    paired = ablations.ablation_paired(picked, {"full": ["less"]}, seeded, "third", "single_pass", **boot)
    assert set(paired["reference"]) == {"full"} and set(paired["method"]) == {"less"}
    brier = paired[paired["metric"] == "brier"].iloc[0]
    assert brier["verdict"] == "worse"            # 0.99 on 70% right answers
    shown = ablations.paired_view(paired, pool="pope-random")
    assert list(shown.columns) == list(ablations.PAIRED_SHOWN) and set(shown["metric"]) == {"brier", "auroc_within", "ece"}
    assert ablations.ablation_paired(picked, {}, seeded, "third", "single_pass").empty
    assert ablations.paired_view(pd.DataFrame()).empty
    with pytest.raises(ValueError, match="not variant labels"):
        ablations.ablation_paired(picked, {"full": ["nope"]}, seeded, "third", "single_pass")


def test_evaluation_tables_leave_out_the_fit_sets_and_pair_no_recalibration():
    rows = (_rows("base", "pope-random", 150, 0.7, 0.9, seed=1) + _rows("m@s0", "pope-random", 150, 0.7, 0.7, seed=1)
            + _rows("m+isotonic", "pope-random", 150, 0.7, 0.72, seed=1)
            + _rows("m@s0", "calibration", 40, 0.7, 0.7, seed=2))
    for r in rows:
        r["image_id"] = f"img{r['question_id']}"
    headline, paired = tables.evaluation_tables(rows, n_boot=40)
    assert "calibration" not in set(headline["set"]) and "m+isotonic" in set(headline["model"])
    assert "m+isotonic" not in set(paired["method"]) and set(paired["method"]) == {"m"}
    reported = [r for r in rows if r["set"] not in suites.FIT_SETS]
    pd.testing.assert_frame_equal(headline, tables.headline_table(reported, n_boot=40))

    pooled = tables.pooled_headline(headline)
    assert list(pooled.columns) == list(tables.HEADLINE_SHOWN) and len(pooled)
    assert pooled["set"].str.startswith("pooled").all()
    verdicts = tables.pooled_verdicts(paired)
    assert verdicts.index.names == ["set", "method", "reference"]
    assert set(verdicts.columns.get_level_values(0)) == {"diff", "verdict"}
    assert set(verdicts.columns.get_level_values(1)) == {"ece", "brier", "auroc_within"}
    assert tables.pooled_verdicts(pd.DataFrame()).empty
