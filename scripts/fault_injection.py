"""Run the smoke chain under faults and check each ends equal to an uninterrupted run, or in a
clear refusal.

    python scripts/fault_injection.py --quick            # kill points in 3 stages, a cheaper parameter change
    python scripts/fault_injection.py                    # a kill point in every stage
    python scripts/fault_injection.py --model PATH       # reuse a tiny model instead of training one

    python scripts/fault_injection.py --only-third-round --model PATH   # refusals up front, publishing, notebooks

Cases: ``kill -9`` of the driver and its kernel at a random moment in a stage (then resumed), a
second driver started on the same run folder at once, an output deleted, a byte flipped in a
finished dataset shard, a parameter changed between runs (and changed back). The second
driver is started against the reference run itself, which must then hold no row twice. Results are
compared by the evaluation result files (``results/matrix/*/*.jsonl``): the same rows, equal
ids and answers, floats within 1e-5. Prints one table row per case; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"
TOLERANCE = 1e-5


# ------------------------------------------------------------------ the driver as a process
class Driver:
    """``python -m csp_utils.study`` in its own session; its output lines arrive on a queue."""

    def __init__(self, params: Path, name: str, work: Path, model: Path | None, extra: tuple = (), repo: Path = REPO):
        env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error", "MPLBACKEND": "Agg"}
        cmd = [sys.executable, "-m", "csp_utils.study", str(params), "--name", name, "--runs-root", str(work),
               *(["--set", f"base_model={model}"] if model is not None else []), *extra]
        self.proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float) -> str | None:
        """The first line matching ``pattern``, or None when the driver ended or time ran out."""
        end = time.time() + timeout
        while time.time() < end:
            try:
                line = self.lines.get(timeout=max(0.1, end - time.time()))
            except queue.Empty:
                return None
            if line is None:
                return None
            if re.search(pattern, line):
                return line
        return None

    def finish(self, timeout: float = 3600) -> int:
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # let the reader thread drain
        return rc

    def text(self) -> str:
        return "".join(self.output)

    def kill_tree(self) -> None:
        """SIGKILL the driver and every process under it (the kernel runs in its own session)."""
        victims = [self.proc.pid] + _descendants(self.proc.pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run_to_end(params: Path, name: str, work: Path, model: Path | None, extra: tuple = (),
               repo: Path = REPO) -> tuple[int, str]:
    driver = Driver(params, name, work, model, extra, repo)
    rc = driver.finish()
    return rc, driver.text()


# ------------------------------------------------------------------ comparing results
def _rows(run: Path) -> tuple[dict[tuple, dict], int]:
    """Every result row by (file, model, question, framing, readout), and how many keys repeat."""
    rows, repeated = {}, 0
    for path in sorted((run / "results" / "matrix").glob("*/*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                key = (path.parent.name, path.stem, r["model"], r["question_id"], r["framing"], r["readout"])
                repeated += key in rows
                rows[key] = r
    return rows, repeated


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOLERANCE
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def compare(run: Path, reference: Path) -> tuple[bool, str]:
    (got, got_repeated), (want, want_repeated) = _rows(run), _rows(reference)
    if not want or want_repeated:
        return False, f"the reference has {len(want)} rows, {want_repeated} repeated"
    if got_repeated:
        return False, f"{got_repeated} rows written twice"
    if got.keys() != want.keys():
        return False, f"rows differ: {len(got.keys() - want.keys())} extra, {len(want.keys() - got.keys())} missing"
    bad = [k for k in want if not _same(got[k], want[k])]
    if bad:
        return False, f"{len(bad)} of {len(want)} rows differ (first: {bad[0]})"
    return True, f"equal ({len(want)} rows)"


# ------------------------------------------------------------------ the cases
def stages_of(params: Path) -> list[str]:
    return list(yaml.safe_load(params.read_text())["stages"])


def kill_chain(params, work, model, reference, kill_stages, seconds, rng) -> list[tuple]:
    """One run folder: for each stage in turn, start the driver and kill -9 it (with its kernel)
    at a random moment while that stage runs; then run to the end and compare."""
    rows, name = [], "killed"
    for stage in kill_stages:
        driver = Driver(params, name, work, model)
        if not driver.wait_for(rf"\[study\] {re.escape(stage)}: running", timeout=1800):
            driver.finish()
            rows.append((f"kill -9 in {stage}", "stage never started: " + driver.text()[-200:], "-", "FAIL"))
            continue
        delay = rng.uniform(0.5, max(1.0, 0.9 * seconds.get(stage, 10)))
        time.sleep(delay)
        running = [ln for ln in driver.output if ": running" in ln]
        at = running[-1].split("]")[1].split(":")[0].strip() if running else stage
        ended = driver.proc.poll() is not None
        driver.kill_tree()
        outcome = f"killed while {at} ran" + (" (driver had ended)" if ended else "")
        rows.append([f"kill -9 in {stage} at {delay:.1f} s", outcome, None, None])
    rc, text = run_to_end(params, name, work, model)
    same, detail = compare(work / name, reference) if rc == 0 else (False, f"rerun exit {rc}: {text[-300:]}")
    resumed = text.count("resuming an interrupted run")
    took_over = "taking over a stale lock" in text
    for row in rows:
        if row[2] is None:
            row[2], row[3] = detail, "PASS" if same else "FAIL"
    rows.append(("rerun after the kills", f"exit {rc}; {resumed} stage(s) resumed; stale lock taken over: {took_over}",
                 detail, "PASS" if same else "FAIL"))
    return [tuple(r) for r in rows]


def reference_with_second_driver(params, work, model) -> tuple[tuple, Path]:
    """The uninterrupted reference run, with a second driver started on its folder at once."""
    first = Driver(params, "reference", work, model)
    if not first.wait_for(r"\[study\] .*: running", timeout=600):
        raise SystemExit("the reference run never started a stage:\n" + first.text())
    second = Driver(params, "reference", work, model)
    rc2 = second.finish(timeout=300)
    refused = rc2 != 0 and f"in use by pid {first.proc.pid}" in second.text()
    rc1 = first.finish()
    if rc1 != 0:
        raise SystemExit("the uninterrupted reference run failed:\n" + first.text())
    rows, repeated = _rows(work / "reference")
    last = (second.text().strip().splitlines() or ["(no output)"])[-1]
    row = ("second driver at once", f"second exits {rc2}: {last[:120]}; first exits {rc1}",
           f"refusal naming pid {first.proc.pid}; first run: {len(rows)} rows, {repeated} written twice",
           "PASS" if refused and not repeated and rows else "FAIL")
    return row, work / "reference"


def output_deleted(params, work, model, reference, name="shared") -> tuple:
    shutil.rmtree(work / name / "adapters" / "sft@s0")
    rc, text = run_to_end(params, name, work, model)
    reran = [s for s in stages_of(params) if f"[study] {s}: outputs changed or missing" in text]
    same, detail = compare(work / name, reference) if rc == 0 else (False, f"exit {rc}")
    return ("output deleted (adapters/sft@s0)", f"exit {rc}; rebuilt: {', '.join(reran) or 'none'}", detail,
            "PASS" if same and "03_train_sft" in reran else "FAIL")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def dataset_flipped(params, work, model, reference, name="shared") -> list[tuple]:
    """A byte flipped in the finished dataset: the driver must see it and rebuild the stage. The
    rebuild is killed once its first shard is finished, a byte of that shard is flipped, and the
    build resumed: the damaged shard must be rebuilt or refused, never used."""
    run = work / name
    _flip_byte(sorted((run / "dataset" / "dataset").glob("data-*.arrow"))[0])  # not a reader's cache-*.arrow
    driver = Driver(params, name, work, model)
    noticed = driver.wait_for(r"02_build_perturbed_dataset: outputs changed or missing: dataset", timeout=600)
    first_shard = run / "dataset" / "shards" / "shard-00000"
    end = time.time() + 600
    while not first_shard.exists() and driver.proc.poll() is None and time.time() < end:
        time.sleep(0.05)
    caught = first_shard.exists() and not (run / "dataset" / "build_report.json").exists()
    driver.kill_tree()
    rows = [("finished dataset byte flipped", "driver: " + (noticed.strip()[8:90] if noticed else "not noticed"),
             "rebuilt from scratch (compared below)", "PASS" if noticed else "FAIL")]
    if not caught:
        rows.append(("shard byte flipped mid-build", "the build finished before a shard could be damaged", "-", "FAIL"))
        return rows
    shard_file = sorted((first_shard / "data").glob("data-*.arrow"))[0]
    _flip_byte(shard_file)
    rc, text = run_to_end(params, name, work, model)
    if rc != 0:
        said = [ln for ln in text.splitlines() if "failed:" in ln] or text.strip().splitlines()[-1:]
        refused = "shard-00000" in text
        rows.append(("shard byte flipped mid-build", f"exit {rc}: {said[-1].strip()[:150]}",
                     "clear refusal naming the shard" if refused else "failed without naming the shard",
                     "PASS" if refused else "FAIL"))
        return rows
    same, detail = compare(run, reference)
    said = "rebuilt (the build reported the damaged shard)" if "shard-00000" in text else "resumed"
    rows.append(("shard byte flipped mid-build", f"exit 0; {said}", detail + ("" if same else ": damaged shard used"),
                 "PASS" if same else "FAIL"))
    return rows


def _short(stage: str) -> str:
    """``04_train_simpo@simpo_only`` -> ``04@simpo_only``."""
    return stage.split("_")[0] + ("@" + stage.split("@")[1] if "@" in stage else "")


def _max_step(log: Path) -> int | None:
    import csv

    steps = [int(float(r["step"])) for r in csv.DictReader(log.open()) if r.get("step")] if log.exists() else []
    return max(steps, default=None)


def parameter_changed(params, work, model, reference, stage, key, name="shared") -> tuple:
    """A stage parameter changed: its outputs must be rebuilt (not reused) and its readers rerun;
    changed back, everything must again equal the reference."""
    changed = yaml.safe_load(params.read_text())
    *path, last = key.split(".")  # a dotted key reaches into a config dict
    holder = changed["stages"][stage]
    for part in path:
        holder = holder[part]
    original = holder[last]
    holder[last] = original + 1
    path = work / "changed.yaml"
    path.write_text(yaml.safe_dump(changed, sort_keys=False))
    rc, text = run_to_end(path, name, work, model)
    reran = [s for s in stages_of(params) if f"[study] {s}: changed" in text]
    if stage.startswith("02"):
        ds = json.loads((work / name / "dataset" / "build_report.json").read_text()) if rc == 0 else {}
        effect = f"dataset kept {ds.get('kept_samples')} samples"
    else:
        effect = f"last training step {_max_step(work / name / 'train_logs' / 'simpo_only@s0.csv')}"
    rc2, text2 = run_to_end(params, name, work, model)
    same, detail = compare(work / name, reference) if rc2 == 0 else (False, f"exit {rc2} changing back")
    back = [s for s in stages_of(params) if f"[study] {s}: changed" in text2]
    ok = rc == 0 and stage in reran and same and back == reran
    return (f"parameter changed ({stage} {key} {original} -> {original + 1}, then back)",
            f"exit {rc}; rerun: {', '.join(_short(s) for s in reran)}; "
            f"{effect}; back: exit {rc2}, same stages rerun: {back == reran}",
            f"changed back: {detail}", "PASS" if ok else "FAIL")


# ------------------------------------------------------------------ the cases of issue 25
def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _one_line_refusal(rc: int, text: str, *needles: str) -> tuple[bool, str]:
    """Exit 1, no traceback, and the last line names every needle."""
    last = _last_line(text)
    ok = rc == 1 and "Traceback" not in text and all(n in last for n in needles)
    return ok, f"exit {rc}: {last[:150]}"


def refused_before_anything(params, work, model) -> list[tuple]:
    """Values a stage could drop or check late: refused before the first stage, in one line."""
    rows = []
    cases = [("--set n_scenes=abc (a stage sets its own)", ("--set", "n_scenes=abc"), ("ambiguous", "00_world_and_benchmarks")),
             ("--set n_scenes=200 on a finished run", ("--set", "n_scenes=200"), ("ambiguous", "00_world_and_benchmarks")),
             ("--set 03_train_sft.sft.max_steps=-5", ("--set", "03_train_sft.sft.max_steps=-5"),
              ("03_train_sft", "sft.max_steps", "-5", "at least 1")),
             ("--set 00_world_and_benchmarks.n_scenes=-4", ("--set", "00_world_and_benchmarks.n_scenes=-4"),
              ("00_world_and_benchmarks", "n_scenes", "-4", "at least 1")),
             ("--set noise_gamma=150", ("--set", "noise_gamma=150"), ("01_perturbation_explorer", "noise_gamma", "150"))]
    for case, extra, needles in cases:
        name = "finished" if "finished" in case else "fresh"
        before = sorted(p.name for p in (work / name / "markers").glob("*.json")) if (work / name).exists() else []
        rc, text = run_to_end(params, name, work, model, extra)
        ok, outcome = _one_line_refusal(rc, text, *needles)
        ran = "running ->" in text or "removing old" in text
        after = sorted(p.name for p in (work / name / "markers").glob("*.json")) if (work / name).exists() else []
        rows.append((case, outcome, "refused before any stage, nothing removed" if not ran and before == after
                     else "a stage ran or outputs were removed", "PASS" if ok and not ran and before == after else "FAIL"))
    bad = work / "bad.yaml"
    bad.write_text(params.read_text().replace("n_synthetic: 200}", "n_synthetic: 200", 1))  # an unclosed mapping
    rc, text = run_to_end(bad, "fresh", work, model)
    ok, outcome = _one_line_refusal(rc, text, str(bad), "line", "column")
    rows.append(("YAML syntax error", outcome, "one line naming the file, line and column", "PASS" if ok else "FAIL"))
    blocked = work / "a_file"
    blocked.write_text("")
    rc, text = run_to_end(params, "smoke", blocked, model)
    ok, outcome = _one_line_refusal(rc, text, "cannot be written", str(blocked))
    rows.append(("run folder not writable (its parent is a file)", outcome, "one line naming the path and cause",
                 "PASS" if ok else "FAIL"))
    return rows


def missing_embedded_model(work) -> tuple:
    """A copy of the repository without the shipped model: an immediate error, no training started."""
    import tempfile

    copy = Path(tempfile.mkdtemp(dir=work, prefix="repo_"))
    for part in ("csp_utils", "notebooks", "params"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(copy / "csp_utils" / "data" / "tiny_llava")
    env_cache = work / "empty_cache"
    os.environ["CSP_CACHE"] = str(env_cache)  # the driver's fallback location is empty too
    try:
        rc, text = run_to_end(copy / "params" / "smoke.yaml", "nomodel", work, None, repo=copy)
    finally:
        os.environ.pop("CSP_CACHE")
    ok, outcome = _one_line_refusal(rc, text, "embedded default model is missing", "git checkout",
                                    "python -m csp_utils.pretrain")
    started = "training it now" in text or "running ->" in text
    return ("embedded model moved away", outcome, "no stage started, no rebuild" if not started else "a stage started",
            "PASS" if ok and not started and not env_cache.exists() else "FAIL")


def damaged_adapter_only_evaluate(params, work, model, reference) -> tuple:
    """``--only 05_evaluate --force`` with a damaged adapter it reads: refused, 05's results kept."""
    run = work / "damaged"
    shutil.copytree(reference, run)
    adapter = run / "adapters" / "sft_simpo@s0" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[:8] = (10 ** 12).to_bytes(8, "little")  # a header length past the file: SafetensorError when loaded
    adapter.write_bytes(bytes(data))
    kept = sorted((run / "results" / "matrix").rglob("*.jsonl"))
    rc, text = run_to_end(params, "damaged", work, model, ("--only", "05_evaluate", "--force"))
    ok, outcome = _one_line_refusal(rc, text, "adapters/sft_simpo@s0/adapter_model.safetensors", "04_train_simpo")
    still = all(p.exists() for p in kept) and "removing old" not in text
    return ("--only 05_evaluate --force, damaged adapter", outcome, f"05's {len(kept)} result files kept: {still}",
            "PASS" if ok and still and kept else "FAIL")


def killed_group_while_saving(params, work, model) -> list[tuple]:
    """03 saving every step; SIGKILL to the driver's process group mid-03 (the kernel is in its
    own session): the kernel must die with it, no checkpoint may appear afterwards, and a
    checkpoint cut short (an empty folder, as a kill while saving leaves) must not block the rerun."""
    changed = yaml.safe_load(params.read_text())
    for stage in ("03_train_sft", "04_train_simpo"):
        changed["stages"][stage].setdefault("sft" if stage.startswith("03") else "simpo", {}).update(
            max_steps=4, save_steps=1)
    path = work / "save_every_step.yaml"
    path.write_text(yaml.safe_dump(changed, sort_keys=False))
    ckpts = work / "saving" / "checkpoints" / "sft@s0"
    driver = Driver(path, "saving", work, model)
    end = time.time() + 1800
    while not (ckpts / "checkpoint-1" / "trainer_state.json").exists() and driver.proc.poll() is None \
            and time.time() < end:
        time.sleep(0.05)
    if driver.proc.poll() is not None:
        return [("kill of the driver's group mid-03", "03 never saved a checkpoint: " + _last_line(driver.text()),
                 "-", "FAIL")]
    kernels = [pid for pid in _descendants(driver.proc.pid) if "ipykernel" in _cmdline(pid)]
    os.killpg(driver.proc.pid, signal.SIGKILL)  # the driver's group only, as a terminal or scheduler does
    driver.proc.wait()
    seen = sorted(p.name for p in ckpts.glob("checkpoint-*"))
    time.sleep(5)
    later = sorted(p.name for p in ckpts.glob("checkpoint-*"))
    kernels = [pid for pid in kernels if _alive(pid)]
    for pid in kernels:  # leave nothing behind for the next case
        os.kill(pid, signal.SIGKILL)
    quiet = seen == later and not kernels
    top = max((int(n.split("-")[1]) for n in later), default=0)
    (ckpts / f"checkpoint-{top + 1}").mkdir()  # what a kill in the middle of a save leaves behind
    rc, text = run_to_end(path, "saving", work, model)
    # the training line goes to the kernel: it is in the executed copy (and on the terminal with --log-output)
    executed = work / "saving" / "notebooks" / "03_train_sft.ipynb"
    said = executed.exists() and f"checkpoint-{top + 1} is incomplete" in executed.read_text()
    set_aside = said and (ckpts / "incomplete" / f"checkpoint-{top + 1}").is_dir()
    return [("kill of the driver's group mid-03 (save every step)", f"checkpoints after the kill: {later}; "
             f"still written 5 s later: {seen != later}", "nothing outlived the driver" if quiet else
             f"kernel {kernels} kept running", "PASS" if quiet else "FAIL"),
            ("rerun with an empty checkpoint-N+1 (killed while saving)", f"exit {rc}; set aside: {set_aside}; "
             f"{text.count('resuming an interrupted run')} resumed", "exit 0 through every stage",
             "PASS" if rc == 0 and set_aside else "FAIL")]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def issue25_cases(params, work, model, reference) -> list[tuple]:
    shutil.copytree(reference, work / "finished")
    rows = refused_before_anything(params, work, model)
    rows.append(missing_embedded_model(work))
    rows.append(damaged_adapter_only_evaluate(params, work, model, reference))
    rows += killed_group_while_saving(params, work, model)
    return rows


# ------------------------------------------------------------------ third round: late refusals, repository writes
DEFAULT = REPO / "params" / "default.yaml"


def _variant(work: Path, name: str, change, base: Path = DEFAULT) -> Path:
    params = yaml.safe_load(base.read_text())
    change(params)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _git_status(repo: Path = REPO) -> str:
    return subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True).stdout


def third_round_cases(params, work, model, reference) -> list[tuple]:
    """Stage settings beside bases/seeds, generated names, names and types resolved up front, a
    syntax error in a notebook, figures from damaged compact results, an unusable HOME, an
    interrupt's message and notebooks saved in an editor."""
    rows = []
    # stage settings beside bases/seeds: --plan shows them merged into every generated stage
    merged = _variant(work, "merged", lambda p: p["stages"].update({
        "03_train_sft": {"sft": {"max_steps": 2}},
        "02_build_perturbed_dataset": {"build": {"levels": [0, 50, 100], "shard_size": 4}}}))
    rc, text = run_to_end(merged, "plan", work, None, ("--plan",))
    sft = [ln for ln in text.splitlines() if ln.strip().startswith("{") and "tag:" in ln and "sft:" in ln]
    builds = [ln for ln in text.splitlines() if "shard_size: 4" in ln]
    ok = rc == 0 and len(sft) == 14 and all("max_steps: 2" in ln for ln in sft) and len(builds) == 5 \
        and not (work / "plan").exists()
    rows.append(("stage settings beside bases/seeds (--plan)", f"exit {rc}; {len(sft)} SFT stages with max_steps 2, "
                 f"{len(builds)} builds with shard_size 4", "merged into every generated stage; run folder untouched",
                 "PASS" if ok else "FAIL"))
    # two bases whose tags share a first letter; a tag that collides with the first base's names
    twins = _variant(work, "twins", lambda p: p["bases"].update({"embedded-deep": "nodeep"}))
    rc, text = run_to_end(twins, "plan", work, None, ("--plan",))
    names = re.findall(r"\[plan\] (03_train_sft@g\S+):", text)
    ok = rc == 0 and len(names) == len(set(names)) == 9
    rows.append(("bases tagged noconf and nodeep", f"exit {rc}; grounded SFT stages: {', '.join(names)}",
                 "distinct names" if ok else "names collide", "PASS" if ok else "FAIL"))
    clash = _variant(work, "clash", lambda p: p["bases"].update({"embedded-deep": "s"}))
    rc, text = run_to_end(clash, "clash", work, None)
    ok, outcome = _one_line_refusal(rc, text, "two stages named 03_train_sft@s1", "base embedded-deep")
    rows.append(("a tag whose names collide with the first base's", outcome, "refused naming both origins",
                 "PASS" if ok and not (work / "clash").exists() else "FAIL"))
    # names and types resolved before the first stage
    for case, change, needles in [
            ("bases: embedded-nocnf", lambda p: p.update(bases={"embedded": None, "embedded-nocnf": "noconf"}),
             ('Did you mean "embedded-noconf"',)),
            ("seeds: paper_csp '3'", lambda p: p["seeds"].update(paper_csp="3"), ("paper_csp = '3'",)),
            ("seeds: paper_csp [3]", lambda p: p["seeds"].update(paper_csp=[3]), ("paper_csp = [3]",)),
            ("seeds: paper_csp -2", lambda p: p["seeds"].update(paper_csp=-2), ("paper_csp = -2",)),
            ("transfer_kinds: [blurr]",
             lambda p: p["stages"]["05_evaluate"].setdefault("suite", {}).update(transfer_kinds=["blurr"]),
             ('Did you mean "blur"',))]:
        path = _variant(work, "names", change)
        rc, text = run_to_end(path, "names", work, None)
        ok, outcome = _one_line_refusal(rc, text, *needles)
        rows.append((case, outcome, "refused before any stage" if "running ->" not in text else "a stage ran",
                     "PASS" if ok and "running ->" not in text else "FAIL"))
    rc, text = run_to_end(params, "typo", work, None, ("--set", "base_model=embeded"))
    ok, outcome = _one_line_refusal(rc, text, 'Did you mean "embedded"')
    rows.append(("--set base_model=embeded", outcome, "refused before any stage" if "running ->" not in text
                 else "a stage ran", "PASS" if ok and "running ->" not in text else "FAIL"))
    # a syntax error in a code cell of 05: refused before 05's results are removed
    copy = work / "repo_syntax"
    for part in ("csp_utils", "notebooks", "params"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    book = copy / "notebooks" / "05_evaluate.ipynb"
    nb = json.loads(book.read_text())
    cell = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and "parameters" not in
                c["metadata"].get("tags", []))
    nb["cells"][cell]["source"] = ["x = 1\n", "print((x)\n"] + nb["cells"][cell]["source"]
    book.write_text(json.dumps(nb))
    shutil.copytree(reference, work / "syntax")
    kept = sorted((work / "syntax" / "results").rglob("*.*"))
    rc, text = run_to_end(copy / "params" / "smoke.yaml", "syntax", work, model, ("--force",), repo=copy)
    ok, outcome = _one_line_refusal(rc, text, "05_evaluate.ipynb", f"cell {cell + 1}", "line 2", "never closed")
    still = all(p.exists() for p in kept) and "running ->" not in text
    rows.append(("unclosed parenthesis in a code cell of 05", outcome, f"nothing ran; {len(kept)} result files kept: "
                 f"{still}", "PASS" if ok and still else "FAIL"))
    # figures from a truncated per_question.csv.gz: one line naming it, the figures kept
    results, figures = work / "published" / "results", work / "published"
    shutil.copytree(REPO / "figures", figures)
    pq = results / "per_question.csv.gz"
    pq.write_bytes(pq.read_bytes()[: pq.stat().st_size // 2])
    before = {p: p.read_bytes() for p in figures.glob("*.png")}
    proc = subprocess.run([sys.executable, "-m", "csp_utils.study", "--figures-only", str(results)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}, capture_output=True,
                          text=True)
    ok, outcome = _one_line_refusal(proc.returncode, proc.stdout + proc.stderr, str(pq), "damaged")
    same = before == {p: p.read_bytes() for p in figures.glob("*.png")}
    rows.append(("--figures-only, truncated per_question.csv.gz", outcome, f"figures unchanged: {same}",
                 "PASS" if ok and same else "FAIL"))
    # an unusable HOME: said once, not per kernel
    shutil.copytree(reference, work / "home")
    saved = os.environ.get("HOME")
    os.environ["HOME"] = "/proc/no-such-home"
    try:
        rc, text = run_to_end(params, "home", work, model, ("--only", "00_world_and_benchmarks", "--force"))
    finally:
        os.environ["HOME"] = saved or ""
    warned = text.count("not a writable location")
    ok = rc == 0 and warned == 0 and text.count("is not writable: IPython's settings go to") == 1
    rows.append(("unusable HOME (00 rerun)", f"exit {rc}; IPython warnings: {warned}", "one line from the driver",
                 "PASS" if ok else "FAIL"))
    # SIGINT while a stage runs: the message names the signal
    shutil.copytree(reference, work / "sigint")
    driver = Driver(params, "sigint", work, model, ("--only", "05_evaluate", "--force"))
    driver.wait_for(r"05_evaluate: running", 600)
    time.sleep(2)
    os.kill(driver.proc.pid, signal.SIGINT)
    rc = driver.finish(600)
    last = _last_line(driver.text())
    ok = rc == 1 and "interrupted (signal SIGINT)" in last
    rows.append(("SIGINT during 05", f"exit {rc}: {last[:120]}", "names its signal", "PASS" if ok else "FAIL"))
    rows.append(notebook_saved_in_editor(work))
    return rows


def notebook_saved_in_editor(work: Path) -> tuple:
    """A clone with the notebook filter registered; notebook 00 saved with outputs as JupyterLab
    does: no diff, and staging it leaves nothing to commit."""
    sys.path.insert(0, str(REPO))
    from csp_utils import nbclean

    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    nbclean.install(clone)
    path = clone / "notebooks" / "00_world_and_benchmarks.ipynb"
    nb = json.loads(path.read_text())
    nb["metadata"]["kernelspec"]["display_name"] = "Python 3 (ipykernel)"
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "code":
            c["execution_count"], c["outputs"] = i, [{"output_type": "stream", "name": "stdout", "text": "x" * 50000}]
    path.write_text(json.dumps(nb, indent=2))
    diff = subprocess.run(["git", "-C", str(clone), "diff", "--stat"], capture_output=True, text=True).stdout
    subprocess.run(["git", "-C", str(clone), "add", "-A"], check=True)
    status = _git_status(clone)
    return ("notebook 00 run and saved as JupyterLab does", f"git diff: {diff.strip() or 'empty'}; after git add, "
            f"git status: {status.strip() or 'clean'}", "no output diff",
            "PASS" if not diff.strip() and not status.strip() else "FAIL")


# ------------------------------------------------------------------ main
def build_model(work: Path) -> Path:
    from csp_utils.vlm.embedded.config import PretrainConfig
    from csp_utils.vlm.embedded.train import build_default_model

    folder = work / "model" / "tiny"
    if not (folder / "csp_meta.json").exists():
        cfg = PretrainConfig.tiny(joint_steps=60, batch_size=16, n_train_scenes=48)
        build_default_model(folder, cfg)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/csp_fault_injection", help="scratch folder (emptied first)")
    ap.add_argument("--model", help="a tiny model folder (default: train one, as the tests do)")
    ap.add_argument("--quick", action="store_true", help="kill points in 3 stages instead of every stage")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--only-third-round", action="store_true",
                    help="only the reference run and the third round's cases (stage settings beside bases, "
                         "generated names, names resolved up front, a notebook syntax error, damaged compact results, "
                         "a run leaving the repository as it was, HOME, SIGINT, notebooks saved in an editor)")
    ap.add_argument("--only-issue25", action="store_true",
                    help="only the reference run and the cases of issue 25 (refusals, a missing model, a damaged "
                         "adapter, a kill of the driver's group while 03 saves every step)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.time()
    model = Path(args.model) if args.model else build_model(work)
    status = _git_status()
    second, reference = reference_with_second_driver(SMOKE, work, model)
    untouched = ("the repository during a run", "git status before and after the reference run: "
                 + ("the same" if _git_status() == status else "different"), "a run writes only its run folder",
                 "PASS" if _git_status() == status else "FAIL")
    seconds = json.loads((reference / "manifest.json").read_text())["timings_s"]
    print(f"[fault] reference run: {sum(seconds.values()):.0f} s; stages {seconds}", flush=True)
    if args.only_issue25:
        return _table(issue25_cases(SMOKE, work, model, reference) + [second], t0)
    if args.only_third_round:
        return _table(third_round_cases(SMOKE, work, model, reference) + [untouched], t0)
    stages = stages_of(SMOKE)
    kill_stages = ["02_build_perturbed_dataset", "03_train_sft", "05_evaluate"] if args.quick else stages
    rows = kill_chain(SMOKE, work, model, reference, kill_stages, seconds, random.Random(args.seed))
    print(f"[fault] kill cases done at {time.time() - t0:.0f} s", flush=True)
    rows.append(second)
    shutil.copytree(reference, work / "shared")  # the damage cases start from a finished run (moved: same keys)
    rows.append(output_deleted(SMOKE, work, model, reference))
    rows += dataset_flipped(SMOKE, work, model, reference)
    shutil.copytree(reference, work / "changed")  # its own copy: a failed case above must not cascade
    if args.quick:
        rows.append(parameter_changed(SMOKE, work, model, reference, "04_train_simpo@simpo_only", "simpo.max_steps",
                                      name="changed"))
    else:
        rows.append(parameter_changed(SMOKE, work, model, reference, "02_build_perturbed_dataset", "data.n_scenes",
                                      name="changed"))
    rows += issue25_cases(SMOKE, work, model, reference)
    rows += third_round_cases(SMOKE, work, model, reference) + [untouched]
    return _table(rows, t0)


def _table(rows: list[tuple], t0: float) -> int:
    print(f"\n{'case':<44} | {'outcome':<70} | {'equal to an uninterrupted run or clear refusal':<50} | result")
    for case, outcome, detail, verdict in rows:
        print(f"{case:<44} | {outcome:<70} | {detail:<50} | {verdict}")
    print(f"\n[fault] {sum(r[3] == 'PASS' for r in rows)}/{len(rows)} pass in {time.time() - t0:.0f} s")
    return 0 if all(r[3] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
