"""The sharded store both dataset builders write through, on a toy builder: a damaged shard is
rebuilt, an interrupted build resumes to the same dataset, a folder of another config is refused."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from csp_utils.dataset import store


def _features():
    from datasets import Features, Value

    return Features({"sample_id": Value("string"), "value": Value("int64")})


def _build(out: Path, n: int = 10, shard: int = 3, config: str = "a", made: list | None = None) -> store.Build:
    ids = [f"s{i:03d}" for i in range(n)]

    def rows(group, stats: Counter) -> list[dict]:
        stats["source_samples"] += len(group)
        if made is not None:
            made.extend(group)
        return [{"sample_id": i, "value": int(i[1:]) * 7} for i in group]

    def chunks():
        for group in store.chunked(ids, shard, str):
            yield store.Chunk(list(group), lambda stats, group=group: rows(group, stats))

    return store.Build(out_dir=out, label="toy", config_hash=f"hash-{config}", config={"config": config},
                       grounder="none", chunks=chunks, features=_features(), finalise=lambda merged: merged,
                       report=lambda ds, shard_stats: {"rows": len(ds), "time_s": {}}, empty_features=_features,
                       total=n, progress=False)


def test_an_interrupted_build_resumes_to_the_same_dataset(tmp_path, monkeypatch):
    reference = store.dataset_sha256(store.build_sharded(_build(tmp_path / "ref")))
    monkeypatch.setenv(store.FAIL_AFTER_SHARDS_ENV, "2")
    with pytest.raises(store.InjectedFailure):
        store.build_sharded(_build(tmp_path / "cut"))
    monkeypatch.delenv(store.FAIL_AFTER_SHARDS_ENV)
    made: list[str] = []
    ds = store.build_sharded(_build(tmp_path / "cut", made=made))
    assert made == [f"s{i:03d}" for i in range(6, 10)]  # the two finished shards were not made again
    assert store.dataset_sha256(ds) == reference and list(ds["value"]) == [i * 7 for i in range(10)]


def test_a_damaged_shard_is_rebuilt_with_the_shards_after_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(store.FAIL_AFTER_SHARDS_ENV, "3")
    with pytest.raises(store.InjectedFailure):
        store.build_sharded(_build(tmp_path / "d"))
    monkeypatch.delenv(store.FAIL_AFTER_SHARDS_ENV)
    arrow = next((tmp_path / "d" / "shards" / "shard-00001" / "data").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-8])
    made: list[str] = []
    ds = store.build_sharded(_build(tmp_path / "d", made=made))
    assert "damaged shard(s), not used (shard-00001" in capsys.readouterr().out
    assert made == [f"s{i:03d}" for i in range(3, 10)]
    assert list(ds["sample_id"]) == [f"s{i:03d}" for i in range(10)]


def test_a_folder_built_with_another_config_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(store.FAIL_AFTER_SHARDS_ENV, "1")
    with pytest.raises(store.InjectedFailure):
        store.build_sharded(_build(tmp_path / "c"))
    monkeypatch.delenv(store.FAIL_AFTER_SHARDS_ENV)
    with pytest.raises(store.ConfigMismatchError, match="another config"):
        store.build_sharded(_build(tmp_path / "c", config="b"))
    with pytest.raises(store.ConfigMismatchError, match="samples differ"):
        store.build_sharded(_build(tmp_path / "c", shard=2))  # same config hash, other chunks: refused too
