"""The perturbed dataset builder: rows, negatives, failure policies, sources, and resume after a kill.

Most tests use a tiny synthetic source and a stub grounder (masks by image id) so they run in
seconds and pin down the builder alone; one test runs the real object world + annotation grounder.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from csp_utils.dataset import csp_noise as P, paper_rows, sources, store
from csp_utils.dataset.buildconfig import BuildConfig
from csp_utils.dataset.sources import SourceItem

LEVELS = (0, 50, 100)
H = W = 24


def _img(i):
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _mask(i):
    m = np.zeros((H, W), bool)
    m[4 + i % 5:14 + i % 5, 6:16] = True
    return m


class StubGrounder:
    """Masks by image id; "ghost" objects are never found; an image id "empty-*" gives an empty mask."""

    name = "stub"

    def __init__(self):
        self.calls = 0

    def ground(self, image, phrases, image_id=None):
        self.calls += 1
        if any("ghost" in p for p in phrases):
            return SimpleNamespace(mask=None, status="no_detection")
        if str(image_id).startswith("empty"):
            return SimpleNamespace(mask=np.zeros((H, W), bool), status="ok")
        return SimpleNamespace(mask=_mask(int(str(image_id).split("-")[-1])), status="ok")


def toy_items(n=10, slow_after=None):
    """n samples: every 4th answer is "No", every 5th asks about a "ghost" (grounding fails)."""
    for i in range(n):
        if slow_after is not None and i >= slow_after:
            time.sleep(0.5)  # lets a test kill the build mid-way, after the first shard is on disk
        obj = "ghost" if i % 5 == 4 else "red circle"
        yield SourceItem(sample_id=f"toy-{i:03d}", image=_img(i), question=f"Is there a {obj} in the image?",
                         answer="No" if i % 4 == 3 else "Yes", image_id=f"img-{i}", objects=[obj])


def _cfg(**kw):
    kw.setdefault("levels", LEVELS)
    kw.setdefault("shard_size", 4)
    kw.setdefault("grounder", "stub")
    return BuildConfig(**kw)


def _build(tmp, n=10, progress=False, **kw):
    return paper_rows.build_perturbed_dataset(list(toy_items(n)), StubGrounder(), tmp, _cfg(**kw), progress=progress)


def test_rows_follow_the_schema(tmp_path):
    ds = _build(tmp_path / "b")
    report = json.loads((tmp_path / "b" / "build_report.json").read_text())
    expected = {"sample_id", "source_id", "image_id", "image", "question", "answer", "key_objects", "confidence",
                "target_text", "confidence_prompt", "framing", "t", "noise_gamma", "t_max", "schedule", "noise",
                "mask_area", "grounder", "grounding_status"}
    assert set(ds.column_names) == expected
    # 10 samples: ids 3, 7 are "No" (dropped); 4, 9 ask about a ghost (skipped by default): 6 kept
    assert report["negatives_dropped"] == 2 and report["skipped_samples"] == 2 and report["kept_samples"] == 6
    assert report["grounding_status"] == {"ok": 6, "no_detection": 2}
    assert report["rows"] == len(ds) == 6 * len(LEVELS)
    assert report["rows_per_level"] == {"0": 6, "50": 6, "100": 6}
    assert list(report["rows_per_level"]) == ["0", "50", "100"]  # numeric order in the JSON file too
    assert not (tmp_path / "b" / "shards").exists()  # shards only serve resuming
    assert report["shards"] == 3 and report["source_samples"] == 10
    assert report["mean_mask_area"] == pytest.approx(np.mean([_mask(i).mean() for i in (0, 1, 2, 5, 6, 8)]), abs=1e-5)
    row = ds[0]
    assert row["sample_id"] == "toy-000@000" and row["source_id"] == "toy-000"
    assert row["confidence"] == 0 and row["target_text"] == "0%" and row["t"] == 100
    assert row["confidence_prompt"].startswith("A Language model was asked: Is there a red circle")
    assert row["framing"] == "third" and row["noise"] == "local" and row["grounder"] == "stub"
    assert row["mask_area"] == pytest.approx(_mask(0).mean())
    assert len(set(ds["sample_id"])) == len(ds)
    # the images: 100% is the source image, the background is untouched at every level
    for r in ds.select(range(6)):
        i = int(r["source_id"].split("-")[1])
        arr = np.asarray(r["image"])
        assert P.background_max_diff(_img(i), arr, _mask(i)) == 0
        if r["confidence"] == 100:
            assert np.array_equal(arr, _img(i))
        else:
            assert not np.array_equal(arr[_mask(i)], _img(i)[_mask(i)])


def test_first_person_framing(tmp_path):
    ds = _build(tmp_path / "b", n=2, framing="first")
    assert set(ds["framing"]) == {"first"}
    assert ds[0]["confidence_prompt"].startswith("You were asked: Is there a red circle")


@pytest.mark.parametrize("policy", ["skip", "global", "clean"])
def test_failure_policies_are_applied_and_counted(tmp_path, policy):
    ds = _build(tmp_path / policy, failure_policy=policy)
    report = json.loads((tmp_path / policy / "build_report.json").read_text())
    assert report["grounding_failures"] == {"no_detection": 2}
    assert report["failures_by_policy"] == {policy: 2}
    failed = ds.filter(lambda r: r["grounding_status"] != "ok")
    if policy == "skip":
        assert len(failed) == 0 and report["skipped_samples"] == 2 and report["kept_samples"] == 6
    elif policy == "global":
        assert len(failed) == 2 * len(LEVELS) and set(failed["noise"]) == {"global"}
        assert set(failed["mask_area"]) == {1.0}
        zero = np.asarray(failed.filter(lambda r: r["confidence"] == 0)[0]["image"])
        assert (zero != _img(4)).any(axis=-1).mean() > 0.95  # the whole image is noised
        assert report["noise_kinds"] == {"global": 2, "local": 6}
    else:  # kept clean: one unperturbed row at 100%
        assert len(failed) == 2 and set(failed["confidence"]) == {100} and set(failed["t"]) == {0}
        assert set(failed["noise"]) == {"none"}
        assert np.array_equal(np.asarray(failed[0]["image"]), _img(4))
        assert report["rows_per_level"]["100"] == 8


def test_negatives_included_go_through_grounding(tmp_path):
    ds = _build(tmp_path / "b", include_negatives=True)
    report = json.loads((tmp_path / "b" / "build_report.json").read_text())
    assert report["negatives_dropped"] == 0 and report["kept_samples"] == 8
    assert "No" in set(ds["answer"])


def test_empty_mask_counts_as_failure(tmp_path):
    items = [SourceItem("e-0", _img(0), "Is there a red circle?", "Yes", image_id="empty-0", objects=["red circle"]),
             SourceItem("e-1", _img(1), "Is there a red circle?", "Yes", image_id="img-1", objects=[])]
    with pytest.warns(UserWarning, match="no rows"):  # an empty build is loud, never silent
        ds = paper_rows.build_perturbed_dataset(items, StubGrounder(), tmp_path / "b", _cfg(), progress=False)
    assert len(ds) == 0 and "image" in ds.column_names
    report = json.loads((tmp_path / "b" / "build_report.json").read_text())
    assert report["grounding_failures"] == {"empty_mask": 1, "no_objects": 1}
    assert report["skipped_samples"] == 2 and report["rows"] == 0
    assert len(paper_rows.load_perturbed_dataset(tmp_path / "b")) == 0


def test_resume_after_injected_failure_gives_the_same_dataset(tmp_path, monkeypatch):
    reference = store.dataset_sha256(_build(tmp_path / "ref"))
    monkeypatch.setenv(store.FAIL_AFTER_SHARDS_ENV, "1")
    with pytest.raises(store.InjectedFailure):
        _build(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b" / "shards").iterdir()) == ["shard-00000"]
    (tmp_path / "b" / "shards" / "shard-00001.tmp").mkdir()  # a half-written shard of a killed build
    monkeypatch.delenv(store.FAIL_AFTER_SHARDS_ENV)
    grounder = StubGrounder()
    ds = paper_rows.build_perturbed_dataset(list(toy_items(10)), grounder, tmp_path / "b", _cfg(), progress=False)
    assert grounder.calls == 5  # shard 0 was not redone: samples 4..9 remain, 7 is a "No"
    assert store.dataset_sha256(ds) == reference
    report = json.loads((tmp_path / "b" / "build_report.json").read_text())
    assert report["rows"] == len(ds) and report["sha256"] == reference
    # a finished build reloads without rebuilding
    again = paper_rows.build_perturbed_dataset(list(toy_items(10)), StubGrounder(), tmp_path / "b", _cfg(), progress=False)
    assert store.dataset_sha256(again) == reference


def test_killed_build_resumes_to_the_same_dataset(tmp_path):
    """A real SIGKILL of a build in a subprocess, once its first shard is on disk."""
    reference = store.dataset_sha256(_build(tmp_path / "ref", n=12))
    out = tmp_path / "killed"
    script = (
        "import sys; sys.path.insert(0, {tests!r})\n"
        "import test_paper_rows as T\n"
        "from csp_utils.dataset import paper_rows\n"
        "paper_rows.build_perturbed_dataset(T.toy_items(12, slow_after=5), T.StubGrounder(), {out!r}, T._cfg(),"
        " progress=False)\n"
    ).format(tests=str(Path(__file__).parent), out=str(out))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (out / "shards" / "shard-00000").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the first shard never appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / "dataset").exists() and not (out / "shards" / "shard-00002").exists()
    ds = paper_rows.build_perturbed_dataset(list(toy_items(12)), StubGrounder(), out, _cfg(), progress=False)
    assert store.dataset_sha256(ds) == reference


def test_a_folder_of_another_config_or_source_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(store.FAIL_AFTER_SHARDS_ENV, "1")
    with pytest.raises(store.InjectedFailure):
        _build(tmp_path / "b")
    monkeypatch.delenv(store.FAIL_AFTER_SHARDS_ENV)
    with pytest.raises(store.ConfigMismatchError, match="another config"):
        _build(tmp_path / "b", levels=(0, 100))
    with pytest.raises(store.ConfigMismatchError, match="another config"):
        _build(tmp_path / "b", noise=P.NoiseConfig(noise_gamma=0.05))
    other = [SourceItem(f"other-{i}", _img(i), "Is there a red circle?", "Yes", f"img-{i}", ["red circle"])
             for i in range(10)]
    with pytest.raises(store.ConfigMismatchError, match="source"):
        paper_rows.build_perturbed_dataset(other, StubGrounder(), tmp_path / "b", _cfg(), progress=False)


def test_build_config_validation():
    with pytest.raises(ValueError, match="failure_policy"):
        BuildConfig(failure_policy="drop")
    with pytest.raises(ValueError, match="framing"):
        BuildConfig(framing="second")
    with pytest.raises(ValueError, match="integer"):
        BuildConfig(levels=(0.5,))
    cfg = BuildConfig(levels=(10, 90), seed=7)
    assert cfg.effective_noise().levels == (10, 90) and cfg.effective_noise().seed == 7
    assert BuildConfig(**json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()


def test_jsonl_source(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_img(i)).save(folder / f"im{i}.png")
    lines = [{"image": f"im{i}.png", "question": "Is there a red circle?", "answer": "Yes", "image_id": f"img-{i}",
              "objects": ["red circle"]} for i in range(3)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    src = sources.jsonl_source(path, folder)
    assert len(src) == 3
    ds = paper_rows.build_perturbed_dataset(src, StubGrounder(), tmp_path / "b", _cfg(), progress=False)
    assert len(ds) == 9 and ds[0]["source_id"] == "data-000001"
    assert np.array_equal(np.asarray(ds[2]["image"]), _img(0))  # 100% of the first sample
    # clear errors
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "im0.png", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) \['answer'\]"):
        sources.jsonl_source(bad, folder)
    bad.write_text(json.dumps({"image": "nope.png", "question": "q", "answer": "Yes"}) + "\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        sources.jsonl_source(bad, folder)


def test_hf_source_rlaif_v_style(tmp_path):
    """RLAIF-V-style preference rows: the chosen response is the answer; key objects come from
    question + answer through keyobjects (free text)."""
    from datasets import Dataset, Features, Image as HFImage, Value

    rows = [{"image": Image.fromarray(_img(i)), "question": "What is the dog doing?",
             "chosen": "The dog is sleeping on a couch next to a cat.", "rejected": "A bird flies.",
             "idx": f"img-{i}"} for i in range(2)]
    feats = Features({"image": HFImage(), "question": Value("string"), "chosen": Value("string"),
                      "rejected": Value("string"), "idx": Value("string")})
    src = sources.hf_source(Dataset.from_list(rows, features=feats))
    assert len(src) == 2
    first = next(iter(src))
    assert first.answer.startswith("The dog is sleeping") and first.sample_id == "img-0" and first.objects is None

    class Recording(StubGrounder):
        def ground(self, image, phrases, image_id=None):
            self.phrases = phrases
            return SimpleNamespace(mask=_mask(0), status="ok")

    grounder = Recording()
    ds = paper_rows.build_perturbed_dataset(src, grounder, tmp_path / "b", _cfg(), progress=False)
    assert grounder.phrases == ["dog", "couch", "cat"]
    assert len(ds) == 6 and ds[0]["key_objects"] == ["dog", "couch", "cat"]
    assert "Model's answer was The dog is sleeping on a couch" in ds[0]["confidence_prompt"]
    with pytest.raises(ValueError, match="not a column"):
        sources.hf_source(Dataset.from_list(rows, features=feats), question_col="prompt")


def test_world_source_with_the_annotation_grounder(tmp_path):
    """The real object world end to end: questions, key objects, exact masks, the default grounder."""
    from csp_utils.world import scenes

    world = scenes.make_scenes("csp", 4)
    src = sources.world_source(world, questions_per_scene=4, seed=0)
    items = list(src)
    assert {it.answer for it in items} <= {"Yes", "No"} and len(items) == 16
    assert [it.sample_id for it in items] == [it.sample_id for it in sources.world_source(world, 4, seed=0)]
    # grounder=None: "annotations" built from the source's scenes
    ds = paper_rows.build_perturbed_dataset(src, None, tmp_path / "w", BuildConfig(shard_size=5), progress=False)
    report = json.loads((tmp_path / "w" / "build_report.json").read_text())
    n_yes = sum(it.answer == "Yes" for it in items)
    assert report["negatives_dropped"] == 16 - n_yes and report["grounder"] == "annotations"
    assert report["grounded_samples"] == n_yes
    assert report["kept_samples"] + report["skipped_samples"] == n_yes
    assert len(ds) == 11 * report["kept_samples"] and set(ds["confidence"]) == set(range(0, 101, 10))
    by_scene = {sc.scene_id: sc for sc in world}
    for r in ds.filter(lambda r: r["confidence"] in (0, 100)):
        sc = by_scene[r["image_id"]]
        arr = np.asarray(r["image"])
        if r["confidence"] == 100:
            assert np.array_equal(arr, sc.image)
        else:  # only the key objects' pixels changed
            changed = (arr != sc.image).any(-1)
            union = np.zeros(changed.shape, bool)
            for o in sc.objects:
                union |= o.mask
            assert changed.any() and not (changed & ~union).any()
            assert r["mask_area"] == pytest.approx(changed.mean(), abs=0.02)


def test_duplicate_sample_ids_are_refused(tmp_path):
    items = list(toy_items(3)) + [next(toy_items(1))]
    with pytest.raises(ValueError, match="duplicate sample id 'toy-000'"):
        paper_rows.build_perturbed_dataset(items, StubGrounder(), tmp_path / "b", _cfg(), progress=False)


# ---------------------------------------------------------------------------- damaged files


def _arrow(shard: Path) -> Path:
    return next((shard / "data").glob("*.arrow"))


def _flip_byte(path: Path, offset=None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _two_shards_then_stop(tmp, monkeypatch):
    monkeypatch.setenv(store.FAIL_AFTER_SHARDS_ENV, "2")
    with pytest.raises(store.InjectedFailure):
        _build(tmp)
    monkeypatch.delenv(store.FAIL_AFTER_SHARDS_ENV)
    return tmp / "shards"


def test_finished_shards_record_the_sha256_of_their_files(tmp_path, monkeypatch):
    shards = _two_shards_then_stop(tmp_path / "b", monkeypatch)
    stats = json.loads((shards / "shard-00000" / "shard_stats.json").read_text())
    arrow = _arrow(shards / "shard-00000")
    assert stats["files"][f"{arrow.name}"] == store._sha256_file(arrow)
    assert set(stats["files"]) == {p.relative_to(shards / "shard-00000" / "data").as_posix()
                                   for p in (shards / "shard-00000" / "data").rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage", ["flip", "truncate", "stats", "deleted"])
def test_a_damaged_shard_is_rebuilt_on_resume(tmp_path, monkeypatch, capsys, damage):
    reference = store.dataset_sha256(_build(tmp_path / "ref"))
    shards = _two_shards_then_stop(tmp_path / "b", monkeypatch)
    arrow = _arrow(shards / "shard-00001")
    if damage == "flip":
        _flip_byte(arrow)
    elif damage == "truncate":
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    elif damage == "stats":
        (shards / "shard-00001" / "shard_stats.json").write_text("{")
    else:  # the whole shard folder deleted by hand, a later one kept
        (shards / "shard-00001").rename(shards / "shard-00002")
    capsys.readouterr()
    grounder = StubGrounder()
    ds = paper_rows.build_perturbed_dataset(list(toy_items(10)), grounder, tmp_path / "b", _cfg(), progress=False)
    out = capsys.readouterr().out
    assert "shard-00001" in out and ("damaged" in out or "missing" in out) and "shard-00000" not in out
    assert grounder.calls == 5  # shard 0 kept; shard 1 (samples 4..7: 4 ghost, 7 a "No") and 8, 9 built again
    assert store.dataset_sha256(ds) == reference


def test_an_old_shard_without_digests_is_rebuilt(tmp_path, monkeypatch, capsys):
    reference = store.dataset_sha256(_build(tmp_path / "ref"))
    shards = _two_shards_then_stop(tmp_path / "b", monkeypatch)
    stats_path = shards / "shard-00000" / "shard_stats.json"
    stats = json.loads(stats_path.read_text())
    del stats["files"]
    stats_path.write_text(json.dumps(stats))
    ds = paper_rows.build_perturbed_dataset(list(toy_items(10)), StubGrounder(), tmp_path / "b", _cfg(), progress=False)
    assert "shard-00000" in capsys.readouterr().out
    assert store.dataset_sha256(ds) == reference


class DamagingGrounder(StubGrounder):
    """Flips a byte of shard 0's arrow file on the call for sample ``at`` (every build while ``times`` lasts)."""

    def __init__(self, shard_dir: Path, at: int, times: int = 1):
        super().__init__()
        self.shard_dir, self.at, self.times = shard_dir, at, times

    def ground(self, image, phrases, image_id=None):
        if image_id == f"img-{self.at}" and self.times > 0:
            self.times -= 1
            _flip_byte(_arrow(self.shard_dir / "shard-00000"))
        return super().ground(image, phrases, image_id)


def test_a_shard_damaged_during_the_build_is_rebuilt_before_merging(tmp_path, capsys):
    reference = store.dataset_sha256(_build(tmp_path / "ref"))
    grounder = DamagingGrounder(tmp_path / "b" / "shards", at=8)
    ds = paper_rows.build_perturbed_dataset(list(toy_items(10)), grounder, tmp_path / "b", _cfg(), progress=False)
    assert "shard-00000" in capsys.readouterr().out
    assert store.dataset_sha256(ds) == reference


def test_a_shard_damaged_again_after_its_rebuild_is_refused_by_name(tmp_path):
    grounder = DamagingGrounder(tmp_path / "b" / "shards", at=8, times=2)
    with pytest.raises(store.DamagedDataError, match="shard-00000"):
        paper_rows.build_perturbed_dataset(list(toy_items(10)), grounder, tmp_path / "b", _cfg(), progress=False)
    assert not (tmp_path / "b" / "dataset").exists()


def test_a_damaged_merged_dataset_is_refused_on_load_and_rebuilt_by_the_builder(tmp_path, capsys):
    reference = store.dataset_sha256(_build(tmp_path / "b"))
    arrow = next((tmp_path / "b" / "dataset").glob("*.arrow"))
    _flip_byte(arrow)
    with pytest.raises(store.DamagedDataError, match=arrow.name):
        paper_rows.load_perturbed_dataset(tmp_path / "b")
    from csp_utils.train import shaping

    with pytest.raises(store.DamagedDataError, match=arrow.name):
        shaping.load_perturbed_dataset(tmp_path / "b")
    ds = paper_rows.build_perturbed_dataset(list(toy_items(10)), StubGrounder(), tmp_path / "b", _cfg(), progress=False)
    assert "damaged" in capsys.readouterr().out
    assert store.dataset_sha256(ds) == reference
    assert store.dataset_sha256(paper_rows.load_perturbed_dataset(tmp_path / "b")) == reference


def test_rgba_sources_pil_or_array_give_the_rows_of_their_white_composite(tmp_path):
    from transformers.image_transforms import convert_to_rgb

    rgba = np.dstack([_img(0), np.zeros((H, W), np.uint8)])
    rgba[:, : W // 2, 3] = 255  # the left half opaque, the right half transparent
    white = convert_to_rgb(Image.fromarray(rgba), return_numpy=True)

    def build(name, image):
        item = SourceItem("toy-000", image, "Is there a red circle in the image?", "Yes", image_id="img-0",
                          objects=["red circle"])
        return paper_rows.build_perturbed_dataset([item], StubGrounder(), tmp_path / name, _cfg(), progress=False)

    ref = store.dataset_sha256(build("rgb", white))
    assert store.dataset_sha256(build("pil", Image.fromarray(rgba))) == ref
    assert store.dataset_sha256(build("array", rgba)) == ref
    assert store.dataset_sha256(build("loader", lambda: Image.fromarray(rgba))) == ref
