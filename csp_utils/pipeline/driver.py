"""Running a study: the plan checked, the run folder locked, stages started as soon as the
stages they read have finished (up to ``jobs`` at once, each with cores / jobs threads), the
manifest (params, commit, package versions, machine, timings) kept up to date.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import socket
import platform
import subprocess
import time
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

import yaml

from csp_utils.core.lock import pid_lock
from csp_utils.core.paths import REPO
from csp_utils.core.versions import package_versions
from csp_utils.vlm import models
from csp_utils.pipeline.planning import Stage, apply_overrides, load_params, plan_study, within
from csp_utils.pipeline.stages import notebook_of, resolve_run_dir
from csp_utils.pipeline.markers import (StageFailed, check_inputs, clear_outputs, fingerprint_or_none, hash_json,
                                        key_parts, marker_path, model_fingerprint, os_problem, package_digest,
                                        read_marker, running_path, stage_state, write_json)
from csp_utils.pipeline.execute import execute_stage, finish_stage


# ------------------------------------------------------------------ provenance
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class RunLocked(SystemExit):
    pass


def run_lock(run_dir: Path):
    """``<run>/.lock``: one driver per run folder (:func:`csp_utils.core.lock.pid_lock`)."""
    lock = run_dir / ".lock"

    def refused(pid, host) -> RunLocked:
        if pid is None and host is None:
            return RunLocked(f"[study] could not take the lock {lock}; another driver keeps taking it")
        return RunLocked(f"[study] run folder {run_dir} is in use by pid {pid} on host {host} (lock file {lock}). "
                         "Wait for that driver to finish; if it is not running any more, remove the lock file.")

    def taken_over(pid) -> None:
        print(f"[study] taking over a stale lock of pid {pid} (no such process on {socket.gethostname()})", flush=True)

    return pid_lock(lock, refused, taken_over)


def machine_info() -> dict:
    """The host, recorded because float results depend on it: torch picks its CPU kernels by
    instruction set (AVX2 vs AVX-512), so the same code and seed give results that agree to
    float error, not byte for byte, across machines."""
    import torch

    try:  # the model name is in /proc/cpuinfo on Linux; platform.processor() is often empty there
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or None
    return {"system": platform.system(), "machine": platform.machine(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _check_only(only, plan: list[Stage]) -> None:
    names = [s.name for s in plan]
    unknown = [s for s in only or [] if s not in names]
    if unknown:
        raise ValueError(f"--only: no stage {', '.join(map(repr, unknown))} in this study; stages: {', '.join(names)}")


def prepare_run(params_path, name, runs_root, overrides) -> tuple[dict, list[Stage], str, Path]:
    params = apply_overrides(load_params(params_path), overrides)
    plan = plan_study(params)
    name = name or params.get("name") or Path(params_path).stem
    return params, plan, name, resolve_run_dir(Path(runs_root) / name).resolve()


def check_base_models(plan: list[Stage], only) -> None:
    """Every stage that loads a model names one that exists (the lookup ``load_vlm`` makes,
    with its "did you mean"), and every selected one finds it, before anything runs: a missing
    shipped model is an error saying how to restore it, never a rebuild started inside a stage."""
    resolved: set[str] = set()
    for stage in plan:
        if not stage.uses_model:
            continue
        name = str(stage.parameters.get("base_model", "embedded"))
        selected = only is None or stage.name in only
        try:
            if name not in resolved:
                models.resolve_model_name(name)
                resolved.add(name)
            if selected:
                model_fingerprint(name)
        except FileNotFoundError as err:  # an unknown name is quoted first; a missing shipped model says so itself
            if not selected and not isinstance(err, models.ModelNotFoundError):
                continue  # a stage that does not run needs no weights, only a name that exists
            what = "base_model " if isinstance(err, models.ModelNotFoundError) else ""
            raise FileNotFoundError(f"stage {stage.name}: {what}{err}") from None


def ipython_dir_for_kernels() -> None:
    """IPython keeps its settings under ``~/.ipython`` and warns in every kernel (and twice in
    some) when it cannot write there (an unusable HOME): a scratch folder, said once, instead."""
    if os.environ.get("IPYTHONDIR"):
        return
    home = Path(os.path.expanduser("~"))
    folder = home / ".ipython"
    usable = (os.access(folder, os.W_OK) if folder.exists() else home.is_dir() and os.access(home, os.W_OK))
    if usable:
        return
    scratch = tempfile.mkdtemp(prefix="csp-ipython-")
    atexit.register(shutil.rmtree, scratch, True)
    os.environ["IPYTHONDIR"] = scratch
    print(f"[study] HOME ({home}) is not writable: IPython's settings go to {scratch} for this run", flush=True)


def check_jobs(jobs) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive whole number of stages run at once, got {jobs!r}")
    return jobs


def run_study(params_path: str | Path, name: str | None = None, runs_root: str | Path = "runs",
              only: list[str] | None = None, force: bool = False, log_output: bool = False,
              overrides: dict | None = None, jobs: int | None = None) -> Path:
    """Run the chain; ``overrides`` replace global parameters (e.g. ``{"base_model": path}``);
    ``jobs`` (default: the params' ``jobs``, else 1) stages run at once where none reads another's
    outputs. Everything is checked before the first stage starts."""
    params, plan, name, run_dir = prepare_run(params_path, name, runs_root, overrides)
    jobs = check_jobs(params.get("jobs", 1) if jobs is None else jobs)
    _check_only(only, plan)
    check_base_models(plan, only)
    ipython_dir_for_kernels()
    try:
        (run_dir / "markers").mkdir(parents=True, exist_ok=True)
        (run_dir / "notebooks").mkdir(exist_ok=True)
        with run_lock(run_dir):
            _run_locked(params, plan, name, run_dir, only, force, log_output, jobs)
    except OSError as err:  # before or between stages: the run folder itself
        raise RunFolderError(f"run folder {run_dir} cannot be written: {os_problem(err)}") from None
    return run_dir


def show_plan(params_path: str | Path, name: str | None = None, runs_root: str | Path = "runs",
              only: list[str] | None = None, force: bool = False, overrides: dict | None = None,
              jobs: int | None = None) -> Path:
    """``--plan``: every check of a run, then each stage with its resolved parameters and what a
    run would do with it (run, skip, rebuild, resume), read from the run folder's markers
    without writing anything there."""
    params, plan, name, run_dir = prepare_run(params_path, name, runs_root, overrides)
    jobs = check_jobs(params.get("jobs", 1) if jobs is None else jobs)
    _check_only(only, plan)
    check_base_models(plan, only)
    package = package_digest()
    rerun: set[str] = set()
    print(f"[plan] {len(plan)} stages into {run_dir} ({'exists' if run_dir.exists() else 'not created yet'}), "
          f"jobs {jobs}")
    for stage in plan:
        if only is not None and stage.name not in only:
            what = "not selected"
        else:
            parts = key_parts(stage, package, {n: read_marker(run_dir, n) for n in stage.inputs})
            state, why = stage_state(run_dir, stage, hash_json(parts), parts)
            after = [n for n in stage.inputs if n in rerun]
            if after:
                state, why = "fresh", "reads " + ", ".join(after) + ", which run first"
            what = ("skip (up to date)" if state == "done" and not force else
                    "resume (" + why + ")" if state == "resume" and not force else
                    ("run" if read_marker(run_dir, stage.name) is None else "rebuild")
                    + f" ({'forced' if force else why})")
            if not what.startswith("skip"):
                rerun.add(stage.name)
        print(f"[plan] {stage.name}: {what}")
        print(f"         {yaml.safe_dump(stage.parameters, default_flow_style=True, width=10**6).strip()}")
    return run_dir


class RunFolderError(OSError):
    def __str__(self):
        return self.args[0]


def threads_per_job(jobs: int) -> int:
    """Cores per concurrent stage: more torch threads than cores slows every stage many-fold."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def _execute_in_worker(stage: Stage, run_dir: Path, out_nb: Path, log_output: bool, threads: int,
                       notebook: Path) -> None:
    """Runs in a worker process; the notebook's kernel inherits the thread limits set here."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    execute_stage(stage, run_dir, out_nb, log_output, notebook)


class _Inline:
    """A one-slot executor that runs the stage in this process (``jobs == 1``)."""

    def __init__(self, log_output: bool):
        self.log_output = log_output

    def submit(self, stage: Stage, run_dir: Path, out_nb: Path) -> Future:
        future: Future = Future()
        try:
            execute_stage(stage, run_dir, out_nb, self.log_output)
            future.set_result(None)
        except StageFailed as err:
            future.set_exception(err)
        return future

    def shutdown(self) -> None:
        pass

    def abort(self) -> None:
        pass  # the stage ran in this process: its kernel was shut down on the way out


class _Pool:
    """Up to ``jobs`` stages at once, each in its own process with ``cores // jobs`` threads."""

    def __init__(self, jobs: int, log_output: bool):
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        self.log_output, self.threads = log_output, threads_per_job(jobs)

    def submit(self, stage: Stage, run_dir: Path, out_nb: Path) -> Future:
        return self.pool.submit(_execute_in_worker, stage, run_dir, out_nb, self.log_output, self.threads,
                                notebook_of(stage.name))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)

    def abort(self) -> None:
        """Interrupted: end the workers now (their kernels die with them), wait for nothing."""
        for process in list((self.pool._processes or {}).values()):
            if process.is_alive():
                process.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _ready(stage: Stage, finished: set[str], running: list[Stage], names: set[str]) -> bool:
    """Every stage it reads has finished, and no running stage writes a path it writes."""
    if any(name in names and name not in finished for name in stage.inputs):
        return False
    mine = stage.outputs + stage.shared + stage.scratch
    return not any(within(a, b) or within(b, a) for other in running
                   for a in other.outputs + other.shared + other.scratch for b in mine)


def _start_stage(stage: Stage, run_dir: Path, package: str, force: bool, executor):
    """Submit the stage unless it is up to date: (future, key, key parts, start time), or None."""
    parts = key_parts(stage, package, {n: read_marker(run_dir, n) for n in stage.inputs})
    key = hash_json(parts)
    state, why = stage_state(run_dir, stage, key, parts)
    if state == "done" and not force:
        print(f"[study] {stage.name}: skipped (up to date)")
        return None
    print(f"[study] {stage.name}: {'forced' if force else why}", flush=True)
    out_nb = run_dir / "notebooks" / f"{stage.name}.ipynb"
    check_inputs(run_dir, stage)  # no executed copy to point to: the stage never started
    try:
        if state != "resume" or force:
            marker_path(run_dir, stage.name).unlink(missing_ok=True)
            clear_outputs(run_dir, stage)
        write_json(running_path(run_dir, stage.name), {"stage": stage.name, "key": key, "pid": os.getpid()})
    except OSError as err:  # disk full, a read-only run folder: the stage and the path, not a traceback
        raise StageFailed(stage.name, f"cannot prepare its outputs: {os_problem(err)}", None) from None
    print(f"[study] {stage.name}: running -> {out_nb}", flush=True)
    t0 = time.time()
    return executor.submit(stage, run_dir, out_nb), key, parts, t0


def _run_locked(params, plan, name, run_dir: Path, only, force: bool, log_output: bool, jobs: int = 1) -> None:
    """Run the selected stages, up to ``jobs`` at once, each as soon as the stages it reads are done."""
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(name=name, params=params, params_hash=hash_json(params), git_commit=git_commit(),
                    packages=package_versions(), machine=machine_info(),
                    base_model_fingerprint=fingerprint_or_none(params.get("base_model", "embedded")))
    manifest.setdefault("timings_s", {})
    package = package_digest()
    names = {s.name for s in plan}
    finished: set[str] = set()
    for stage in plan:
        if only is not None and stage.name not in only:
            print(f"[study] {stage.name}: not selected")
            finished.add(stage.name)
    waiting = [s for s in plan if s.name not in finished]
    running: dict[Future, tuple[Stage, str, dict, float]] = {}
    failed: StageFailed | None = None
    executor = _Inline(log_output) if jobs == 1 else _Pool(jobs, log_output)
    wall0 = time.time()
    try:
        while waiting or running:
            while failed is None and len(running) < jobs:
                stage = next((s for s in waiting if _ready(s, finished, [r[0] for r in running.values()], names)),
                             None)
                if stage is None:
                    break
                waiting.remove(stage)
                try:
                    started = _start_stage(stage, run_dir, package, force, executor)
                except StageFailed as err:
                    failed = failed or err
                    print(f"[study] {stage.name}: failed", flush=True)
                    continue
                if started is None:
                    finished.add(stage.name)
                else:
                    running[started[0]] = (stage, *started[1:])
            if not running:
                if waiting and failed is None:
                    raise RuntimeError("stages wait on each other: " + ", ".join(s.name for s in waiting))
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                stage, key, parts, t0 = running.pop(future)
                seconds = round(time.time() - t0, 1)
                try:
                    future.result()
                    try:
                        finish_stage(run_dir, stage, key, parts, seconds)
                    except OSError as err:
                        raise StageFailed(stage.name, f"cannot record its outputs: {os_problem(err)}",
                                          run_dir / "notebooks" / f"{stage.name}.ipynb") from None
                except StageFailed as err:
                    failed = failed or err
                    print(f"[study] {stage.name}: failed", flush=True)
                    continue
                finished.add(stage.name)
                manifest["timings_s"][stage.name] = seconds
                write_json(manifest_path, manifest)
                print(f"[study] {stage.name}: done in {seconds:.0f} s", flush=True)
    except BaseException:  # Ctrl-C, SIGTERM (see main): no stage left running behind the driver
        executor.abort()
        raise
    else:
        executor.shutdown()
    if failed is not None:
        manifest["failed"] = {"stage": failed.stage, "error": failed.error,
                              "notebook": None if failed.notebook is None else str(failed.notebook)}
        try:
            write_json(manifest_path, manifest)
            recorded = ""
        except OSError as err:  # the disk that failed the stage may refuse this too
            recorded = f"\n        (the manifest could not record it: {os_problem(err)})"
        kept = (f"\n        executed copy kept at {failed.notebook}"
                if failed.notebook is not None and failed.notebook.exists() else "")
        raise SystemExit(f"[study] stage {failed.stage} failed: {failed.error}{kept}{recorded}") from None
    manifest.pop("failed", None)
    manifest["jobs"] = jobs
    manifest["wall_s"] = round(time.time() - wall0, 1)
    write_json(manifest_path, manifest)
