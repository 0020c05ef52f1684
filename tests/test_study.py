"""The smoke chain: every notebook, in order, through the study driver, on one tiny model.

Run once per test session (module fixture); the tests then check the files each stage
wrote, the stage markers (a rerun skips), and that a failing notebook stops the chain. The
driver's rules (keys, clearing, resuming, the lock, timeouts) are tested on tiny notebooks,
and parameter checks against the real notebooks without running them.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from csp_utils.pipeline import checks, cli, driver, markers, planning, stages

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    """A tiny LLaVA trained for a few dozen steps: enough to answer in the Yes/No format."""
    from csp_utils.vlm.embedded.config import PretrainConfig
    from csp_utils.vlm.embedded.train import build_default_model

    cfg = PretrainConfig.tiny(joint_steps=60, batch_size=16, n_train_scenes=48)
    return build_default_model(tmp_path_factory.mktemp("smoke_model") / "tiny", cfg)


@contextlib.contextmanager
def _stderr_into(path: Path):
    """File descriptor 2, where the kernels and the driver's workers write their logs, into
    ``path``; afterwards echoed to the test's stderr, so that nothing is hidden."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr.write(path.read_text())


def _git_status() -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def smoke_run(smoke_model, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    before = _git_status()
    with _stderr_into(runs / "stderr.txt"):
        run_dir = driver.run_study(SMOKE, runs_root=runs, overrides={"base_model": str(smoke_model)})
    (runs / "git_status.txt").write_text(json.dumps([before, _git_status()]))
    return run_dir


def test_a_run_writes_nothing_into_the_repository(smoke_run):
    """The whole chain, notebook 07 included, leaves the repository's files as they were."""
    before, after = json.loads((smoke_run.parent / "git_status.txt").read_text())
    assert after == before


def test_a_healthy_chain_prints_no_warning_and_no_error(smoke_run):
    """Not ipykernel's "running over TCP without encryption" per kernel, nor its "ERROR |
    KeyboardInterrupt caught in kernel" when a shutdown interrupted a kernel."""
    err = (smoke_run.parent / "stderr.txt").read_text()
    assert "WARNING" not in err and "ERROR" not in err and "Traceback" not in err, err


def test_every_stage_ran_and_left_a_marker(smoke_run):
    params = yaml.safe_load(SMOKE.read_text())
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    for stage in params["stages"]:
        marker = json.loads((smoke_run / "markers" / f"{stage}.json").read_text())
        assert marker["stage"] == stage and len(marker["key"]) == 16 and marker["outputs"]
        assert (smoke_run / "notebooks" / f"{stage}.ipynb").stat().st_size > 0
        assert stage in manifest["timings_s"]
    assert manifest["params_hash"]
    # the run records the torch it ran with, one of the versions the requirements pin
    torch_version = manifest["packages"]["torch"]
    assert torch_version == metadata.version("torch")
    pins = {line.split("==")[1].strip() for name in ("requirements.txt", "requirements-gpu.txt")
            for line in (REPO / name).read_text().splitlines() if line.startswith("torch==")}
    assert len(pins) == 2 and torch_version.split("+")[0] in pins, (torch_version, pins)
    # the host's instruction set decides torch's CPU kernels, hence the last float digits
    assert manifest["machine"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert manifest["machine"]["cpu_count"] >= 1 and manifest["machine"]["machine"]
    assert "failed" not in manifest


def test_the_explorers_executed_copy_shows_every_slider_position(smoke_run):
    """GitHub renders no widgets: beneath each live view, the executed copy holds the stills."""
    nb = json.loads((smoke_run / "notebooks" / "01_perturbation_explorer.ipynb").read_text())
    stills = [c for c in nb["cells"] if c["cell_type"] == "code" and "slider_stills" in "".join(c["source"])]
    assert len(stills) == 2
    assert all(any("image/jpeg" in o.get("data", {}) for o in c["outputs"]) for c in stills)


def test_stage_outputs(smoke_run):
    figs = smoke_run / "figures"
    # 00 and 01: world figures and the perturbation grid, PNG + PDF
    assert (smoke_run / "results" / "benchmark_composition.csv").exists()
    for stem in ("perturbation_grid",):
        assert (figs / f"{stem}.png").stat().st_size > 0 and (figs / f"{stem}.pdf").stat().st_size > 0
    # 02: the perturbed dataset and its report
    report = json.loads((smoke_run / "dataset" / "build_report.json").read_text())
    assert report["kept_samples"] > 0 and set(report["rows_per_level"]) >= {"0", "50", "100"}
    # 03 / 04: three regimes, each a PEFT adapter with its training config and a curve log
    for name in ("sft@s0", "sft_simpo@s0", "simpo_only@s0"):
        adapter = smoke_run / "adapters" / name
        assert (adapter / "adapter_config.json").exists(), name
        assert (adapter / "adapter_model.safetensors").exists(), name
        assert (adapter / "training_config.json").exists(), name
    logs = sorted(p.stem for p in (smoke_run / "train_logs").glob("*.csv") if not p.stem.startswith("margins_"))
    assert logs
    # each log's curves are drawn once, by notebook 07, from the log
    assert sorted(p.stem.removeprefix("training_") for p in figs.glob("training_*.png")) == logs
    assert not list(figs.glob("train_*"))
    # 05: per-question results, summaries with every combination, baselines
    head = pd.read_csv(smoke_run / "results" / "headline.csv")
    assert {"base", "sft_simpo", "baseline:constant", "baseline:internal", "baseline:temperature"} <= set(head["model"])
    assert {"third", "first"} <= set(head["framing"]) and {"generated", "single_pass"} <= set(head["readout"])
    assert {"pope-random", "amber-attribute", "transfer-blur", "perturbed"} <= set(head["set"])
    ece = head["ece"]
    assert ece.dropna().between(0, 1).all() and ece.notna().any()
    assert (head.loc[ece.isna(), "coverage"] == 0).all()  # no ECE only where no confidence parsed
    summary = pd.read_csv(smoke_run / "results" / "summary.csv")
    assert {"accuracy", "f1", "ece", "auroc", "coverage"} <= set(summary.columns)
    # 06: ablation table over the variants
    ab = pd.read_csv(smoke_run / "results" / "ablation.csv")
    assert {"SFT + SimPO", "SFT only", "SimPO only", "base"} <= set(ab["name"])
    assert {"ece", "ece15", "brier", "auroc_within", "auroc", "accuracy"} == set(ab["metric"])
    # 06@grounded: variants with one adapter per seed, pooled per label and paired seed with seed
    abg = pd.read_csv(smoke_run / "results" / "ablation_grounded.csv")
    assert set(abg["name"]) == {"grounded", "grounded, single-turn"} and set(abg["seeds"]) == {2}
    pg = pd.read_csv(smoke_run / "results" / "ablation_paired_grounded.csv")
    assert set(pg["method"]) == {"grounded, single-turn"} and set(pg["reference"]) == {"grounded"}
    assert set(pg["method_seeds"]) == {2} and set(pg["reference_seeds"]) == {2}
    # 07: every figure regenerated from results
    for stem in ("reliability_clean_sets", "reliability_transfer_sets", "confidence_vs_level", "ablation_ece",
                 "ablation_grounded_auroc_within"):
        assert (figs / f"{stem}.png").stat().st_size > 0 and (figs / f"{stem}.pdf").exists(), stem


def test_rerun_skips_finished_stages_and_resumes_from_a_changed_one(smoke_run, smoke_model, capsys):
    before = {p.name: p.stat().st_mtime for p in (smoke_run / "markers").iterdir()}
    params = yaml.safe_load(SMOKE.read_text())
    params["stages"]["07_figures"] = {"after": "sft"}  # only the last stage changes
    changed = smoke_run.parent / "changed.yaml"
    changed.write_text(yaml.safe_dump(params, sort_keys=False))  # stage order is the chain
    driver.run_study(changed, name=smoke_run.name, runs_root=smoke_run.parent,
                    overrides={"base_model": str(smoke_model)})
    out = capsys.readouterr().out
    after = {p.name: p.stat().st_mtime for p in (smoke_run / "markers").iterdir()}
    assert out.count("skipped (up to date)") == len(params["stages"]) - 1
    assert after["07_figures.json"] > before["07_figures.json"]
    assert all(after[k] == before[k] for k in before if k != "07_figures.json")


def test_a_failing_notebook_stops_the_chain_and_keeps_its_copy(tmp_path, smoke_model):
    # a grounder spec is checked where it is built, inside the stage (names the driver knows are
    # refused before anything runs)
    bad = {"name": "bad", "base_model": str(smoke_model),
           "stages": {"02_build_perturbed_dataset": {"build": {"grounder": "no-such-grounder"}, "data": {"n_scenes": 1}},
                      "07_figures": {}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit, match="02_build_perturbed_dataset failed.*grounder kind"):
        driver.run_study(path, runs_root=tmp_path / "runs")
    run = tmp_path / "runs" / "bad"
    assert (run / "notebooks" / "02_build_perturbed_dataset.ipynb").exists()
    assert not (run / "markers" / "02_build_perturbed_dataset.json").exists()
    assert not (run / "notebooks" / "07_figures.ipynb").exists()
    assert json.loads((run / "manifest.json").read_text())["failed"]["stage"] == "02_build_perturbed_dataset"


def test_new_base_model_weights_change_the_chain(tmp_path):
    """Markers chain from the base model's identity: retraining a model in place (same path)
    must not let finished stages count as up to date."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights-1")
    first = markers.model_fingerprint(folder)
    assert markers.model_fingerprint(folder) == first
    (folder / "model.safetensors").write_bytes(b"weights-two")
    assert markers.model_fingerprint(folder) != first
    (folder / "csp_meta.json").write_text(json.dumps({"sha256": "abc"}))
    assert markers.model_fingerprint(folder) == "abc"
    assert markers.model_fingerprint("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"


def test_params_files_name_existing_notebooks():
    for path in sorted((REPO / "params").glob("*.yaml")):
        params = planning.load_params(path)
        assert params["stages"], path


# ---------------------------------------------------------------- the driver on tiny notebooks
MAKE = '''import os
from pathlib import Path
from csp_utils.pipeline.stages import resolve_run_dir
run_dir = resolve_run_dir(run_dir)
out = run_dir / name
out.mkdir(parents=True, exist_ok=True)
crash_at = int(os.environ.get("CSP_TEST_CRASH_AT", "-1"))
for i in range(n):
    part = out / f"part-{i}.txt"
    if part.exists():
        continue  # resumable, as the real stages are
    if i == crash_at:
        raise RuntimeError("interrupted")
    part.write_text(f"{i}\\n")
    with open(run_dir / "built.log", "a") as f:
        f.write(f"{name}/{i}\\n")
'''
USE = '''from csp_utils.pipeline.stages import resolve_run_dir
run_dir = resolve_run_dir(run_dir)
parts = sorted((run_dir / name).glob("part-*.txt"))
(run_dir / out).write_text("".join(p.read_text() for p in parts))
'''

SLOW = '''import json, os, time
from csp_utils.pipeline.stages import resolve_run_dir
run_dir = resolve_run_dir(run_dir)
start = time.time()
time.sleep(seconds)
(run_dir / f"{name}.json").write_text(json.dumps({"start": start, "end": time.time(),
                                                  "threads": os.environ.get("OMP_NUM_THREADS")}))
'''


# What a client stuck after a widget cell sees (papermill #723): the kernel reports idle for the
# cell, yet no reply comes. The cell says "idle" itself and then keeps the reply back.
STALL = '''
kernel = get_ipython().kernel
kernel._publish_status("idle", "shell")
import time
time.sleep(100)
'''


def _notebook(path: Path, parameters: str, code: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# a stage"), cell, nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, str(path))


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """Two tiny notebooks (10 builds parts, 11 reads them) and a hanging one, declared like the real ones."""
    books = tmp_path / "notebooks"
    books.mkdir()
    _notebook(books / "10_make.ipynb", 'run_dir = "runs/dev"\nseed = 0\nname = "data"\nn = 2\nrate = 0.5', MAKE)
    _notebook(books / "11_use.ipynb", 'run_dir = "runs/dev"\nname = "data"\nout = "summary.txt"', USE)
    _notebook(books / "12_hang.ipynb", 'run_dir = "runs/dev"\nseed = 0', "import time\ntime.sleep(60)")
    _notebook(books / "13_slow.ipynb", 'run_dir = "runs/dev"\nseed = 0\nname = "slow"\nseconds = 3', SLOW)
    _notebook(books / "14_stall.ipynb", 'run_dir = "runs/dev"\nseed = 0', STALL)
    monkeypatch.setattr(stages, "NOTEBOOKS", books)
    monkeypatch.setattr(stages, "STAGES", {
        "10_make": stages.StageSpec(outputs=lambda p: [p["name"]]),
        "11_use": stages.StageSpec(outputs=lambda p: [p["out"]], inputs=lambda p: [p["name"]]),
        "12_hang": stages.StageSpec(outputs=lambda p: [], cell_timeout=3),
        "13_slow": stages.StageSpec(outputs=lambda p: [p["name"] + ".json"]),
        "14_stall": stages.StageSpec(outputs=lambda p: [], cell_timeout=120),
    })

    def run(stages: dict, **kw):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({"name": "toy", "seed": 0, "stages": stages}, sort_keys=False))
        return driver.run_study(path, runs_root=kw.pop("runs_root", tmp_path / "runs"), **kw)

    return run


def test_a_syntax_error_in_a_notebook_stops_the_run_before_any_output_is_removed(toy, tmp_path):
    run = toy({"10_make": {"n": 2}, "11_use": {}})
    book = stages.NOTEBOOKS / "11_use.ipynb"
    nb = json.loads(book.read_text())
    nb["cells"][2]["source"] = "x = 1\nprint((x)\n"
    book.write_text(json.dumps(nb))
    with pytest.raises(ValueError) as err:
        toy({"10_make": {"n": 3}, "11_use": {}})
    assert str(err.value) == f"{book}: cell 3, line 2: SyntaxError: '(' was never closed"
    assert (run / "summary.txt").read_text() == "0\n1\n" and (run / "data" / "part-1.txt").exists()


def test_plan_tells_skip_from_rebuild_and_writes_nothing(toy, tmp_path, capsys):
    run = toy({"10_make": {"n": 2}, "11_use": {}})
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    capsys.readouterr()
    driver.show_plan(tmp_path / "params.yaml", runs_root=tmp_path / "runs")
    out = capsys.readouterr().out
    assert "[plan] 10_make: skip (up to date)" in out and "[plan] 11_use: skip (up to date)" in out
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["stages"]["10_make"]["n"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    driver.show_plan(tmp_path / "params.yaml", runs_root=tmp_path / "runs")
    out = capsys.readouterr().out
    assert "[plan] 10_make: rebuild (changed: parameters)" in out
    assert "[plan] 11_use: rebuild (reads 10_make, which run first)" in out and "{n: 3, seed: 0}" in out
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_an_unusable_home_is_said_once_not_per_kernel(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", "/proc/no-such-home")
    monkeypatch.delenv("IPYTHONDIR", raising=False)
    with _stderr_into(tmp_path / "stderr.txt"):
        toy({"10_make": {"n": 2}, "11_use": {}})
    err = (tmp_path / "stderr.txt").read_text()
    assert "not a writable location" not in err, err
    assert capsys.readouterr().out.count("is not writable: IPython's settings go to") == 1


def _built(run_dir: Path) -> list[str]:
    log = run_dir / "built.log"
    return log.read_text().split() if log.exists() else []


def test_a_changed_stage_rebuilds_from_scratch_and_its_readers_rerun(toy, capsys):
    run = toy({"10_make": {"n": 3}, "11_use": {}})
    assert (run / "summary.txt").read_text() == "0\n1\n2\n"
    run = toy({"10_make": {"n": 2}, "11_use": {}})
    out = capsys.readouterr().out
    assert not (run / "data" / "part-2.txt").exists()  # the old output is gone, not reused
    assert _built(run) == ["data/0", "data/1", "data/2", "data/0", "data/1"]
    assert (run / "summary.txt").read_text() == "0\n1\n"
    assert "10_make: changed: parameters" in out and "11_use: changed: inputs" in out
    toy({"10_make": {"n": 2}, "11_use": {}})
    assert capsys.readouterr().out.count("skipped (up to date)") == 2


def test_an_interrupted_stage_resumes_only_with_the_same_key(toy, monkeypatch):
    monkeypatch.setenv("CSP_TEST_CRASH_AT", "1")
    with pytest.raises(SystemExit, match="10_make failed.*interrupted"):
        toy({"10_make": {"n": 2}})
    monkeypatch.delenv("CSP_TEST_CRASH_AT")
    run = toy({"10_make": {"n": 2}})
    assert _built(run) == ["data/0", "data/1"]  # part 0 kept: same key, resumed
    monkeypatch.setenv("CSP_TEST_CRASH_AT", "1")
    with pytest.raises(SystemExit):
        toy({"10_make": {"n": 3}})  # a new key clears the outputs first, then is interrupted
    assert _built(run) == ["data/0", "data/1", "data/0"]
    monkeypatch.delenv("CSP_TEST_CRASH_AT")
    toy({"10_make": {"n": 4}})  # another key again: the partial outputs of n=3 are not resumed
    assert _built(run)[3:] == ["data/0", "data/1", "data/2", "data/3"]
    assert not (run / "markers" / "10_make.running.json").exists()


def test_deleted_or_changed_outputs_are_rebuilt(toy, capsys):
    run = toy({"10_make": {}, "11_use": {}})
    marker = json.loads((run / "markers" / "10_make.json").read_text())
    assert set(marker["outputs"]) == {"data"} and len(marker["outputs"]["data"]) == 16
    (run / "summary.txt").unlink()
    toy({"10_make": {}, "11_use": {}})
    out = capsys.readouterr().out
    assert "10_make: skipped" in out and "11_use: outputs changed or missing: summary.txt" in out
    assert (run / "summary.txt").read_text() == "0\n1\n"
    (run / "data" / "part-1.txt").write_text("9\n")  # changed by hand
    toy({"10_make": {}, "11_use": {}})
    out = capsys.readouterr().out
    assert "10_make: outputs changed or missing: data" in out
    assert (run / "data" / "part-1.txt").read_text() == "1\n"
    # rebuilt byte for byte: what 11 read is unchanged, so it stays up to date
    assert "11_use: skipped (up to date)" in out


def test_keys_ignore_markdown_saved_outputs_and_the_run_folders_location(toy, tmp_path, capsys):
    import nbformat

    run = toy({"10_make": {}, "11_use": {}})
    book = stages.NOTEBOOKS / "10_make.ipynb"
    before = markers.code_digest(book)
    nb = nbformat.read(str(book), as_version=4)
    nb.cells[0].source = "# edited in JupyterLab"
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="saved output")]
    nb.cells[2].execution_count = 7
    nbformat.write(nb, str(book))
    assert markers.code_digest(book) == before
    moved = tmp_path / "elsewhere"
    shutil.move(str(run.parent), moved)
    capsys.readouterr()
    toy({"10_make": {}, "11_use": {}}, runs_root=moved)
    assert capsys.readouterr().out.count("skipped (up to date)") == 2
    nb.cells[2].source += "\n# a code change"
    nbformat.write(nb, str(book))
    toy({"10_make": {}, "11_use": {}}, runs_root=moved)
    out = capsys.readouterr().out
    assert "10_make: changed: notebook" in out and "11_use: changed: inputs" in out


def test_a_package_change_reruns_the_stages(toy, monkeypatch, capsys):
    toy({"10_make": {}})
    monkeypatch.setattr(driver, "package_digest", lambda: "another-source")
    toy({"10_make": {}})
    assert "10_make: changed: package" in capsys.readouterr().out


def test_only_the_declared_readers_depend_on_a_stage(toy, capsys):
    run = toy({"10_make": {}, "10_make@b": {"name": "other"}, "11_use": {}})
    assert json.loads((run / "markers" / "11_use.json").read_text())["reads"] == ["10_make"]
    toy({"10_make": {}, "10_make@b": {"name": "other", "n": 1}, "11_use": {}})
    out = capsys.readouterr().out
    assert "10_make@b: changed: parameters" in out and "11_use: skipped (up to date)" in out


def test_a_second_driver_refuses_and_a_stale_lock_is_taken_over(toy, tmp_path, capsys):
    import socket
    import subprocess

    run_dir = tmp_path / "runs" / "toy"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(SystemExit, match=f"in use by pid {holder.pid}"):
            toy({"10_make": {}})
        assert not (run_dir / "markers" / "10_make.json").exists()
    finally:
        holder.kill()
        holder.wait()
    toy({"10_make": {}})  # the holder is gone: its lock is stale
    assert f"taking over a stale lock of pid {holder.pid}" in capsys.readouterr().out
    assert not (run_dir / ".lock").exists()  # released at the end


def test_the_lock_is_taken_atomically(tmp_path):
    with driver.run_lock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(SystemExit, match=f"in use by pid {os.getpid()}"):
            with driver.run_lock(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()


def test_a_hanging_cell_fails_naming_the_stage_and_cell(toy):
    limit = r"12_hang failed: cell \d+ of the executed copy \('import time'\) ran past the cell limit of 3 s"
    with pytest.raises(SystemExit, match=limit):
        toy({"12_hang": {}})
    with pytest.raises(SystemExit, match="limit of 1 s"):
        toy({"12_hang": {"cell_timeout": 1}})


def test_a_kernel_left_idle_while_papermill_waits_fails_its_stage_and_the_other_goes_on(toy, monkeypatch, tmp_path):
    """A cell after which the client waits on an idle kernel fails its stage within the idle
    limit (not the cell limit of 120 s), in one line naming the notebook and the cell; the
    stage running beside it finishes."""
    monkeypatch.setenv("CSP_IDLE_LIMIT_S", "3")
    t0 = time.time()
    stalled = r"14_stall failed: 14_stall.ipynb: cell \d+ of the executed copy \('kernel = get_ipython\(\).kernel'\) " \
              r"left papermill waiting on an idle kernel for more than 3 s; the kernel was stopped\n"
    with pytest.raises(SystemExit, match=stalled):
        toy({"14_stall": {}, "13_slow": {"seconds": 8}}, jobs=2)
    assert time.time() - t0 < 60
    run = tmp_path / "runs" / "toy"
    assert (run / "markers" / "13_slow.json").exists() and (run / "slow.json").exists()
    assert not (run / "markers" / "14_stall.json").exists()


def test_kernels_are_encrypted_and_shut_down_without_a_ctrl_c(toy, capfd, monkeypatch):
    """A SIGINT at shutdown reaches a kernel still handling a message as a KeyboardInterrupt,
    which ipykernel logs as an ERROR although the notebook succeeded: none is sent."""
    from jupyter_client import AsyncKernelManager

    sent = []
    signal_kernel = AsyncKernelManager._async_signal_kernel

    async def recording(self, signum):
        sent.append(signum)
        await signal_kernel(self, signum)

    monkeypatch.setattr(AsyncKernelManager, "_async_signal_kernel", recording)
    toy({"10_make": {}, "11_use": {}})
    err = capfd.readouterr().err
    assert "without encryption" not in err and "KeyboardInterrupt" not in err and "ERROR" not in err, err
    assert signal.SIGINT not in sent


def test_a_kernel_manager_whose_kernel_never_starts_leaves_no_socket_folder():
    import gc

    from csp_utils.pipeline import execute

    manager = execute._kernel_manager_class()()
    folder = Path(manager._socket_dir)
    assert folder.is_dir() and manager.ip.startswith(str(folder))
    del manager
    gc.collect()
    assert not folder.exists()


def test_healthy_runs_pass_each_notebook_only_what_it_declares(toy, caplog):
    with caplog.at_level("WARNING"):
        run = toy({"10_make": {"rate": 1}, "11_use": {}})  # int where a float is expected
    assert "Passed unknown parameter" not in caplog.text
    assert "seed" not in json.loads((run / "markers" / "11_use.json").read_text())["parameters"]


def test_the_study_params_pass_only_declared_parameters():
    for path in sorted((REPO / "params").glob("*.yaml")):
        params = planning.load_params(path)
        # study-wide nulls are placeholders given with --set (paper_smoke's model and kit folders)
        params.update({k: "given-with-set" for k, v in params.items() if v is None})
        for stage in planning.plan_study(params):
            declared = checks.notebook_defaults(REPO / "notebooks" / f"{stage.name.split('@')[0]}.ipynb")
            assert set(stage.parameters) <= set(declared), (path.name, stage.name)


def _smoke(**changes) -> dict:
    params = yaml.safe_load(SMOKE.read_text())
    for stage, values in changes.items():
        params["stages"][stage] = {**(params["stages"].get(stage) or {}), **values}
    return params


@pytest.mark.parametrize("params, message", [
    (_smoke(**{"03_train_sft": {"max_stpes": 2}}), "03_train_sft: unknown parameter 'max_stpes'.*sft"),
    (_smoke(**{"03_train_sft": {"sft": {"max_stpes": 2}}}), "03_train_sft: unknown key 'max_stpes' in sft.*max_steps"),
    (_smoke(**{"03_train_sft": {"sft": {"max_steps": "two"}}}), "'sft.max_steps' = 'two' is a str.*int"),
    (_smoke(**{"04_train_simpo": {"simpo": {"max_steps": 2.5}}}), "'simpo.max_steps' = 2.5 is a float"),
    (_smoke(**{"00_world_and_benchmarks": {"n_scenes": True}}), "'n_scenes' = True is a bool"),
    (_smoke(**{"03_train_sft": {"sft": {"replay_fraction": "half"}}}), "'sft.replay_fraction' = 'half' is a str.*int or float"),
    (_smoke(**{"02_build_perturbed_dataset": {"build": {"include_negatives": 1}}}), "'build.include_negatives' = 1 is a int"),
    (_smoke(**{"05_evaluate": {"models": "base"}}), "'models' = 'base' is a str.*list"),
    (_smoke(**{"03_train_sft": {"run_dir": "/tmp/x"}}), "set by the driver"),
    (_smoke(**{"03_train_sft": {"cell_timeout": "long"}}), "cell_timeout must be a positive"),
    ({**_smoke(), "sed": 0}, "global parameter 'sed' is declared by no notebook"),
])
def test_parameters_are_checked_against_the_notebooks_before_anything_runs(params, message):
    with pytest.raises(ValueError, match=message):
        planning.plan_study(params)


def test_accepted_parameter_values():
    ok = _smoke(**{"03_train_sft": {"sft": {"replay_fraction": 0, "learning_rate": 1e-3, "lora": {"r": 8}},
                                    "cell_timeout": 60},
                   "05_evaluate": {"sets": ["pope-random"]},
                   "02_build_perturbed_dataset": {"build": {"grounder": {"detector": "d", "segmenter": "s"}}}})
    plan = {s.name: s for s in planning.plan_study(ok)}
    assert plan["03_train_sft"].cell_timeout == 60 and "cell_timeout" not in plan["03_train_sft"].parameters
    assert "base_model" not in plan["00_world_and_benchmarks"].parameters  # it loads no model
    assert plan["02_build_perturbed_dataset"].parameters["base_model"] == "embedded"  # grounded rows need it
    assert plan["03_train_sft"].parameters["base_model"] == "embedded"


def test_only_with_an_unknown_stage_refuses(tmp_path):
    with pytest.raises(ValueError, match="--only: no stage '07_figurse'.*07_figures"):
        driver.run_study(SMOKE, runs_root=tmp_path, only=["07_figurse"])
    assert not (tmp_path / "smoke").exists()


def test_stage_declarations_follow_the_notebooks():
    plan = {s.name: s for s in planning.plan_study(planning.load_params(REPO / "params" / "full.yaml"))}
    assert plan["03_train_sft@s1"].inputs == ["02_build_perturbed_dataset@s1"]
    assert plan["04_train_simpo@s1"].inputs == ["02_build_perturbed_dataset@s1", "03_train_sft@s1"]
    assert plan["04_train_simpo@only"].inputs == ["02_build_perturbed_dataset"]
    assert "adapters/simpo_only@s0" in plan["04_train_simpo@only"].outputs
    assert "checkpoints/sft@s0" in plan["03_train_sft"].scratch
    # LABEL=ADAPTER entries: rows under the label, the adapter's stage read
    assert "results/matrix/grounded@s0" in plan["05_evaluate"].outputs
    assert set(plan["05_evaluate"].inputs) == {"04_train_simpo", "04_train_simpo@s1", "04_train_simpo@s2",
                                               "03_train_sft@g0", "03_train_sft@g1", "03_train_sft@g2",
                                               "03_train_sft@d0"}
    # a second base model's evaluation writes its own results folder and figure
    assert "results/noconf/matrix/base" in plan["05_evaluate@noconf"].outputs
    assert "figures/reliability_pope_adversarial_preview_noconf.png" in plan["05_evaluate@noconf"].outputs
    assert "03_train_sft@gn0" in plan["05_evaluate@noconf"].inputs
    assert plan["02_build_perturbed_dataset@grounded_noconf"].parameters["base_model"] == "embedded-noconf"
    # the ablations reuse the evaluation's rows for shared models, so they read that stage
    assert "05_evaluate" in plan["06_ablations"].inputs and "results/matrix/base" in plan["06_ablations"].shared
    assert {"05_evaluate", "05_evaluate@noconf", "06_ablations", "03_train_sft@s2"} <= set(plan["07_figures"].inputs)
    assert "00_world_and_benchmarks" not in plan["02_build_perturbed_dataset"].inputs
    # an ablation stage with seeds: every seed's adapter read, the reference's rows shared with 05
    g = plan["06_ablations@grounded"]
    assert {"03_train_sft@gcell", "03_train_sft@gcell1", "03_train_sft@gcell2", "03_train_sft@d2"} <= set(g.inputs)
    assert "results/matrix/grounded@s1" in g.shared and "results/ablation_grounded.csv" in g.outputs
    assert "results/ablation.csv" in plan["06_ablations"].outputs


def test_overlapping_outputs_are_refused():
    params = _smoke(**{"02_build_perturbed_dataset": {"dataset": "results"}})
    with pytest.raises(ValueError, match="overlapping paths"):
        planning.plan_study(params)


def test_every_parameters_cell_parses_fully():
    """papermill skips a parameters line it cannot parse (and then warns about that name)."""
    import ast

    for book in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(book.read_text())["cells"]
        cell = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        names = {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets}
        assert set(checks.notebook_defaults(book)) == names, book.name


def test_relative_run_folders_resolve_under_the_repository():
    assert stages.resolve_run_dir("runs/dev") == REPO / "runs" / "dev"
    assert stages.resolve_run_dir("/tmp/x") == Path("/tmp/x")
    for book in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(book.read_text())["cells"]
        i = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
        first = next(c for c in cells[i + 1:] if c["cell_type"] == "code")
        source = "".join(first["source"]) if isinstance(first["source"], list) else first["source"]
        assert "run_dir = resolve_run_dir(run_dir)" in source, book.name


def test_folder_digests_see_changes_but_not_the_caches_of_readers(tmp_path):
    folder = tmp_path / "dataset" / "dataset"
    folder.mkdir(parents=True)
    (folder / "data-00000-of-00001.arrow").write_bytes(b"rows")
    first = markers.output_digest(tmp_path, "dataset")
    (folder / "cache-5ea600d91a8e3924.arrow").write_bytes(b"mapped by a reader")
    assert markers.output_digest(tmp_path, "dataset") == first
    (folder / "data-00000-of-00001.arrow").write_bytes(b"rowz")
    assert markers.output_digest(tmp_path, "dataset") != first
    (folder / "data-00000-of-00001.arrow").write_bytes(b"rows")
    (folder / "extra.json").write_text("{}")
    assert markers.output_digest(tmp_path, "dataset") != first
    assert markers.output_digest(tmp_path, "missing") is None


def _intervals(run: Path, *names: str) -> list[dict]:
    return [json.loads((run / f"{n}.json").read_text()) for n in names]


def test_jobs_run_independent_stages_at_once_with_a_share_of_the_cores(toy, capsys):
    stages = {"13_slow@a": {"name": "a"}, "13_slow@b": {"name": "b"}, "10_make": {}, "11_use": {}}
    run = toy(stages, jobs=2)
    a, b = _intervals(run, "a", "b")
    assert a["start"] < b["end"] and b["start"] < a["end"]  # they overlapped
    assert a["threads"] == b["threads"] == str(driver.threads_per_job(2))
    assert (run / "summary.txt").read_text() == "0\n1\n"  # 11 waited for 10
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["jobs"] == 2 and manifest["wall_s"] < sum(manifest["timings_s"].values())
    toy(stages, jobs=2)
    assert capsys.readouterr().out.count("skipped (up to date)") == 4


def test_one_job_runs_stages_one_after_another(toy):
    run = toy({"13_slow@a": {"name": "a", "seconds": 1}, "13_slow@b": {"name": "b", "seconds": 1}})
    a, b = _intervals(run, "a", "b")
    assert a["end"] <= b["start"]
    assert json.loads((run / "manifest.json").read_text())["jobs"] == 1


def test_a_failing_stage_in_a_parallel_run_stops_the_chain_after_the_running_ones(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("CSP_TEST_CRASH_AT", "0")
    with pytest.raises(SystemExit, match="10_make failed.*interrupted"):
        toy({"10_make": {}, "13_slow@a": {"name": "a", "seconds": 2}, "11_use": {}}, jobs=2)
    run = tmp_path / "runs" / "toy"
    assert (run / "markers" / "13_slow@a.json").exists()  # the stage already running finished
    assert not (run / "summary.txt").exists()  # the reader of the failed stage never started
    assert json.loads((run / "manifest.json").read_text())["failed"]["stage"] == "10_make"


def test_jobs_must_be_a_positive_whole_number(toy):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="jobs must be a positive whole number"):
            toy({"10_make": {}}, jobs=bad)


def test_a_stage_key_names_its_adapters_and_datasets_unless_given():
    plan = {s.name: s for s in planning.plan_study(_smoke(**{
        "03_train_sft@s1": {"sft": {"max_steps": 2, "seed": 1}},
        "02_build_perturbed_dataset@s1": {"build": {"seed": 1}},
        "02_build_perturbed_dataset@other": {"dataset": "elsewhere"}}))}
    assert plan["03_train_sft@s1"].parameters["tag"] == "@s1" and "adapters/sft@s1" in plan["03_train_sft@s1"].outputs
    assert plan["02_build_perturbed_dataset@s1"].parameters["dataset"] == "dataset@s1"
    assert plan["02_build_perturbed_dataset@other"].parameters["dataset"] == "elsewhere"
    assert plan["03_train_sft"].parameters["tag"] == "@s0"  # given


@pytest.mark.parametrize("changes, message", [
    ({"02_build_perturbed_dataset": {"build": {"noise": {"noise_gama": 0.1}}}}, "unknown key 'noise_gama' in build.noise"),
    ({"02_build_perturbed_dataset": {"build": {"grounded": {"flip_rows": "no"}}}}, "'build.grounded.flip_rows' = 'no'"),
    ({"02_build_perturbed_dataset": {"data": {"seed": 3}}}, "unknown key 'seed' in data"),  # the seed lives in build
    ({"03_train_sft": {"sft": {"lora": {"rank": 8}}}}, "unknown key 'rank' in sft.lora.*LoraSettings"),
    ({"05_evaluate": {"scoring": {"batch": 8}}}, "unknown key 'batch' in scoring.*EvalConfig"),
    ({"05_evaluate": {"suite": {"n_pope": 2}}}, "unknown key 'n_pope' in suite.*SuiteConfig"),
    ({"06_ablations": {"boot": {"n_bootstrap": 2}}}, "unknown key 'n_bootstrap' in boot.*n_boot"),
    ({"06_ablations": {"scoring": {"framings": ["first"]}}}, "unknown key 'framings' in scoring"),  # set by framing
])
def test_config_dicts_are_checked_against_their_dataclasses(changes, message):
    with pytest.raises(ValueError, match=message):
        planning.plan_study(_smoke(**changes))


def test_one_helper_records_package_versions_everywhere():
    from csp_utils.core import versions
    from csp_utils.train import regimes
    from csp_utils.vlm.embedded import heldout

    got = versions.package_versions(("torch", "no-such-package-xyz"))
    assert got["torch"] == metadata.version("torch") and got["no-such-package-xyz"] is None and "python" in got
    assert driver.package_versions is regimes.package_versions is heldout.package_versions is versions.package_versions


# ---------------------------------------------------------------- the driver's kernels end with it
LONG = '''import os, sys, time
from csp_utils.pipeline.stages import resolve_run_dir
run_dir = resolve_run_dir(run_dir)
(run_dir / "kernel.pid").write_text(str(os.getpid()))
# a busy cell (a training step in C, a long Python loop) starves ipykernel's parent-polling thread
sys.setswitchinterval(120)
end = time.time() + 90
while time.time() < end:
    pass
'''

DRIVE = '''import sys
from pathlib import Path
from csp_utils.pipeline import cli, stages
books = Path(sys.argv[1])
stages.NOTEBOOKS = books
stages.STAGES = {"14_long": stages.StageSpec(outputs=lambda p: [])}
cli.main([str(books / "params.yaml"), "--runs-root", sys.argv[2], "--jobs", sys.argv[3]])
'''


def _alive(pid: int) -> bool:
    """A live process (a zombie, killed but not yet reaped by its parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_for(condition, seconds: float = 30) -> bool:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how, jobs", [("sigkill-group", "1"), ("sigkill-group", "2"), ("sigterm", "1"),
                                       ("sigint", "2")])
def test_the_kernels_end_with_the_driver(tmp_path, how, jobs):
    """A kernel runs in its own session: a kill of the driver's process group does not reach
    it, and a kernel left running goes on writing into the run folder (checkpoints, shards)."""
    import signal
    import subprocess

    books = tmp_path / "notebooks"
    books.mkdir()
    _notebook(books / "14_long.ipynb", 'run_dir = "runs/dev"', LONG)
    (books / "params.yaml").write_text(yaml.safe_dump({"name": "long", "stages": {"14_long": {}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVE, str(books), str(tmp_path / "runs"), jobs], env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = tmp_path / "runs" / "long" / "kernel.pid"
    try:
        assert _wait_for(pid_file.exists, 120), "the kernel never started"
        kernel = int(pid_file.read_text())
        assert _alive(kernel)
        if how == "sigkill-group":
            os.killpg(driver.pid, signal.SIGKILL)
        else:
            driver.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        driver.wait(timeout=60)
        assert _wait_for(lambda: not _alive(kernel), 30), f"kernel {kernel} outlived the driver ({how})"
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    if how != "sigkill-group":  # a driver that could clean up released its lock
        assert not (tmp_path / "runs" / "long" / ".lock").exists()


# ---------------------------------------------------------------- --set, ranges, YAML errors
def test_set_on_a_global_that_a_stage_sets_itself_is_refused_naming_the_stage(tmp_path):
    """smoke.yaml's 00 sets its own n_scenes: a global n_scenes would be recorded but never run."""
    for value in ("abc", 200, -5):
        with pytest.raises(ValueError, match=r"--set n_scenes=.* ambiguous: stage\(s\) 00_world_and_benchmarks set "
                                             r"their own 'n_scenes'.*--set 00_world_and_benchmarks.n_scenes="):
            driver.prepare_run(SMOKE, None, tmp_path, {"n_scenes": value})
    assert not list(tmp_path.iterdir())


def test_set_reaches_one_stage_and_is_recorded_as_run(tmp_path):
    params, plan, _, _ = driver.prepare_run(SMOKE, None, tmp_path, {
        "00_world_and_benchmarks.n_scenes": 200, "03_train_sft.sft.max_steps": 3, "03_train_sft@g0.sft.lora.r": 4,
        "noise_gamma": 0.1})
    stages = {s.name: s for s in plan}
    assert stages["00_world_and_benchmarks"].parameters["n_scenes"] == 200
    assert stages["03_train_sft"].parameters["sft"] == {"max_steps": 3}
    assert stages["03_train_sft@g0"].parameters["sft"]["lora"] == {"r": 4}
    assert stages["03_train_sft@g0"].parameters["sft"]["max_steps"] == 2  # the rest of its sft kept
    assert stages["01_perturbation_explorer"].parameters["noise_gamma"] == 0.1  # a global no stage sets
    assert params["stages"]["00_world_and_benchmarks"]["n_scenes"] == 200  # what params.yaml records
    assert yaml.safe_load(SMOKE.read_text())["stages"]["03_train_sft"]["sft"] == {"max_steps": 2}  # file untouched


@pytest.mark.parametrize("overrides, message", [
    ({"00_world_and_benchmarks.n_scenes": "abc"}, "00_world_and_benchmarks: parameter 'n_scenes' = 'abc' is a str"),
    ({"03_train_sft.sft.max_steps": "two"}, "'sft.max_steps' = 'two' is a str"),
    ({"03_train_sfx.sft.max_steps": 2}, "no stage '03_train_sfx' in this study"),
    ({"03_train_sft.sft.max_steps.x": 2}, "03_train_sft's 'max_steps' is 2, not a mapping"),
    ({"image_size": "big"}, "00_world_and_benchmarks: parameter 'image_size' = 'big' is a str"),
])
def test_set_values_are_type_checked(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        driver.prepare_run(SMOKE, None, tmp_path, overrides)


def test_a_global_is_type_checked_even_where_every_stage_sets_its_own():
    params = _smoke()
    params["n_scenes"] = "abc"
    with pytest.raises(ValueError, match="00_world_and_benchmarks: parameter 'n_scenes' = 'abc' is a str"):
        planning.plan_study(params)


def test_set_on_the_command_line_is_parsed_as_yaml_and_refused_in_one_line(tmp_path, capsys):
    assert planning.parse_set("03_train_sft.sft.max_steps=3") == ("03_train_sft.sft.max_steps", 3)
    assert planning.parse_set("base_model=/a/b=c") == ("base_model", "/a/b=c")
    with pytest.raises(SystemExit):
        cli.main([str(SMOKE), "--runs-root", str(tmp_path), "--set", "n_scenes=[1,"])
    assert "--set 'n_scenes=[1,': the value is not YAML" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^\[study\] --set n_scenes='abc' is ambiguous[^\n]*$"):
        cli.main([str(SMOKE), "--runs-root", str(tmp_path), "--set", "n_scenes=abc"])


@pytest.mark.parametrize("changes, message", [
    ({"03_train_sft": {"sft": {"max_steps": -5}}}, r"03_train_sft: 'sft.max_steps' = -5 is out of range; it takes "
                                                    r"numbers at least 1, or -1 \(the default: train num_train_epochs"),
    ({"03_train_sft": {"sft": {"max_steps": 0}}}, "'sft.max_steps' = 0 is out of range"),
    ({"00_world_and_benchmarks": {"n_scenes": -4}}, "00_world_and_benchmarks: 'n_scenes' = -4 is out of range; it "
                                                     "takes numbers at least 1"),
    ({"01_perturbation_explorer": {"noise_gamma": 150}}, "'noise_gamma' = 150 is out of range; it takes numbers "
                                                          "above 0 and below 1"),
    ({"01_perturbation_explorer": {"grid_levels": [100, 150]}}, r"'grid_levels' = \[100, 150\] \(item 150\) is out "
                                                                 "of range; it takes numbers from 0 to 100"),
    ({"02_build_perturbed_dataset": {"data": {"n_scenes": 0}}}, "'data.n_scenes' = 0 is out of range"),
    ({"02_build_perturbed_dataset": {"build": {"noise": {"noise_gamma": 1.5}}}}, "'build.noise.noise_gamma' = 1.5"),
    ({"02_build_perturbed_dataset@grounded": {"build": {"grounded": {"temperature_holdout": 2}}}},
     "'build.grounded.temperature_holdout' = 2 is out of range; it takes numbers from 0 to 1"),
    ({"04_train_simpo": {"simpo": {"learning_rate": 0}}}, "'simpo.learning_rate' = 0 is out of range; it takes "
                                                           "numbers above 0"),
    ({"05_evaluate": {"suite": {"transfer_severity": 1.5}}}, "05_evaluate: 'suite.transfer_severity' = 1.5"),
    ({"06_ablations": {"boot": {"n_boot": 0}}}, "06_ablations: 'boot.n_boot' = 0 is out of range"),
])
def test_values_are_range_checked_before_anything_runs(changes, message):
    with pytest.raises(ValueError, match=message):
        planning.plan_study(_smoke(**changes))


def test_range_sentinels_and_edges_are_accepted():
    plan = {s.name: s for s in planning.plan_study(_smoke(**{
        "03_train_sft": {"sft": {"max_steps": -1, "replay_fraction": 1, "warmup": 5, "lora": {"dropout": 0}}},
        "01_perturbation_explorer": {"grid_levels": [0, 100]},
        "05_evaluate": {"suite": {"n_grounded_images": 0}}}))}
    assert plan["03_train_sft"].parameters["sft"]["max_steps"] == -1


def test_a_noise_gamma_given_with_set_is_refused_before_any_stage(tmp_path):
    with pytest.raises(ValueError, match="01_perturbation_explorer: 'noise_gamma' = 150 is out of range"):
        driver.run_study(SMOKE, runs_root=tmp_path, overrides={"noise_gamma": 150})
    assert not (tmp_path / "smoke").exists()  # nothing ran, nothing was cleared


def test_a_yaml_syntax_error_is_one_line_naming_the_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages:\n  00_world_and_benchmarks: {n_scenes: 4\n  01_perturbation_explorer: {}\n")
    with pytest.raises(SystemExit, match=rf"^\[study\] {bad}: YAML syntax error at line \d+, column \d+: [^\n]+$"):
        cli.main([str(bad), "--runs-root", str(tmp_path / "runs")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="needs a 'stages' mapping"):
        planning.load_params(tmp_path / "list.yaml")


# ---------------------------------------------------------------- a missing shipped model
def test_a_missing_embedded_model_is_an_error_before_anything_runs_not_a_rebuild(tmp_path, monkeypatch):
    from csp_utils.vlm import models
    from csp_utils.vlm.embedded import train

    monkeypatch.setattr(models, "default_model_dir", lambda: tmp_path / "moved_away")
    monkeypatch.setattr(train, "build_default_model", lambda *a, **k: pytest.fail("started a rebuild"))
    restore = r"git checkout -- csp_utils/data/tiny_llava.*python -m csp_utils.pretrain"
    with pytest.raises(FileNotFoundError, match="stage 02_build_perturbed_dataset: the embedded default model is "
                                                rf"missing.*{restore}"):
        driver.run_study(SMOKE, runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(models.MissingEmbeddedModelError, match=restore):
        models.resolve_model_name("embedded")  # what a notebook opened by hand calls
    with pytest.raises(FileNotFoundError, match="embedded default model is missing"):
        markers.model_fingerprint("embedded")  # never the bare name "embedded" as a key part
    with pytest.raises(SystemExit, match=r"^\[study\] stage 02_build_perturbed_dataset: the embedded default[^\n]+$"):
        cli.main([str(SMOKE), "--runs-root", str(tmp_path / "runs")])
    # stages that load no model still run without it; --only checks only what it runs
    driver.check_base_models(planning.plan_study(planning.load_params(SMOKE)), only=["07_figures"])


# ---------------------------------------------------------------- file errors and damaged inputs
def test_a_full_disk_during_a_stage_is_one_line_naming_the_stage_and_path(toy, tmp_path, monkeypatch):
    import errno

    import papermill

    real = papermill.execute_notebook

    def full(path, out, *a, **k):
        if "11_use" in str(out):
            raise OSError(errno.ENOSPC, "No space left on device", str(out))
        return real(path, out, *a, **k)

    monkeypatch.setattr(papermill, "execute_notebook", full)
    run = tmp_path / "runs" / "toy"
    with pytest.raises(SystemExit, match=rf"^\[study\] stage 11_use failed: cannot write: {run}/notebooks/11_use.ipynb: "
                                         "No space left on device$"):
        toy({"10_make": {}, "11_use": {}})
    assert json.loads((run / "manifest.json").read_text())["failed"]["stage"] == "11_use"
    assert (run / "markers" / "10_make.json").exists()


def test_a_read_only_run_folder_is_one_line_naming_the_stage_and_path(toy, tmp_path, monkeypatch):
    import errno

    real = markers.write_json

    def read_only(path, obj):
        if path.name.endswith(".running.json"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real(path, obj)

    monkeypatch.setattr(driver, "write_json", read_only)
    run = tmp_path / "runs" / "toy"
    with pytest.raises(SystemExit, match=r"^\[study\] stage 10_make failed: cannot prepare its outputs: "
                                         rf"{run}/markers/10_make.running.json: Read-only file system$"):
        toy({"10_make": {}})
    assert json.loads((run / "manifest.json").read_text())["failed"]["stage"] == "10_make"
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(SystemExit, match=rf"^\[study\] run folder {blocked}/toy cannot be written: {blocked}/toy"
                                         r"/markers: [^\n]+$"):
        cli.main([str(tmp_path / "params.yaml"), "--runs-root", str(blocked)])


def test_a_damaged_input_is_refused_before_the_stages_outputs_are_removed(toy, tmp_path, capsys):
    run = toy({"10_make": {}, "11_use": {}})
    (run / "data" / "part-1.txt").write_text("damaged\n")
    with pytest.raises(SystemExit, match=r"stage 11_use failed: its input data/part-1.txt changed or went missing "
                                         r"since 10_make finished; nothing was removed.*--only 10_make 11_use"):
        toy({"10_make": {}, "11_use": {}}, only=["11_use"], force=True)
    assert (run / "summary.txt").read_text() == "0\n1\n"  # 11's old result kept
    assert "removing old" not in capsys.readouterr().out
    (run / "data" / "part-1.txt").write_text("1\n")
    (run / "data" / "part-1.txt").rename(run / "data" / "part-1.moved")
    with pytest.raises(SystemExit, match="its input data/part-1.moved, data/part-1.txt changed"):
        toy({"10_make": {}, "11_use": {}}, only=["11_use"], force=True)
    with pytest.raises(SystemExit, match="11_use failed: it reads the outputs of 10_make, which has not finished"):
        toy({"10_make": {}, "11_use": {}}, only=["11_use"], runs_root=tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "toy" / "summary.txt").exists()


# ---------------------------------------------------------------- notebook 01 in a batch run
def _explorer_runs(tmp_path, times: int) -> list[float]:
    """Notebook 01 through papermill ``times`` times in a row, as the driver runs it (its kernel
    manager: kernels marked as batch, watched for a stalled client), with tiny parameters;
    each executed copy must hold no widget, only the stills. Returns each run's seconds."""
    from csp_utils.pipeline import execute
    from csp_utils.pipeline.planning import Stage

    params = {"grid_levels": [100, 10], "photo": "coins", "photo_box": [10, 10, 60, 60]}
    seconds = []
    for i in range(times):
        stage = Stage("01_perturbation_explorer", params, ["figures/perturbation_grid*"], [], [], [], False, 300)
        out = tmp_path / f"01_run{i}.ipynb"
        t0 = time.time()
        execute.execute_stage(stage, tmp_path / "run", out, log_output=False)
        seconds.append(time.time() - t0)
        outputs = [o for c in json.loads(out.read_text())["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
        assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), i
        assert sum("image/jpeg" in o.get("data", {}) for o in outputs) == 4   # two views, two stills
    return seconds


def test_the_explorer_in_a_batch_run_builds_no_widgets(tmp_path):
    seconds = _explorer_runs(tmp_path, 2)
    assert max(seconds) < 120, seconds   # a stalled run sat at the 600 s cell limit


@pytest.mark.slow
def test_the_explorer_runs_ten_times_in_a_row_each_in_its_normal_time(tmp_path):
    seconds = _explorer_runs(tmp_path, 10)
    assert max(seconds) < 3 * sorted(seconds)[len(seconds) // 2] + 10, seconds


def test_a_kernel_started_by_papermill_itself_counts_as_a_batch_kernel(tmp_path, monkeypatch):
    """Outside the driver (no CSP_BATCH), papermill's command line as the kernel's parent
    marks the run as a batch run."""
    import nbformat

    book = tmp_path / "probe.ipynb"
    _notebook(book, "x = 0", "from csp_utils.pipeline.stages import batch_kernel\nprint('batch', batch_kernel())")
    env = {k: v for k, v in os.environ.items() if k != stages.BATCH_ENV}
    papermill = Path(sys.executable).with_name("papermill")
    subprocess.run([str(papermill), str(book), str(tmp_path / "out.ipynb"), "-k", "python3", "--no-progress-bar"],
                   env=env, check=True, capture_output=True, timeout=120)
    out = nbformat.read(str(tmp_path / "out.ipynb"), as_version=4)
    assert "batch True" in "".join(o.get("text", "") for o in out.cells[-1].outputs)
    monkeypatch.delenv(stages.BATCH_ENV, raising=False)
    assert not stages.batch_kernel(), "this process (pytest) is not a batch kernel: the check can fail"
