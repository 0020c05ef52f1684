"""Executing one stage: its notebook through papermill in a kernel that dies with the
driver, time limits per cell, and the marker recorded once it finished.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path


from csp_utils.core.paths import REPO
from csp_utils.pipeline.planning import Stage
from csp_utils.pipeline.stages import BATCH_ENV, notebook_of
from csp_utils.pipeline.markers import (StageFailed, changed_outputs, digest_and_files, hash_json, marker_path,
                                        os_problem, read_marker, running_path, write_json)


# ------------------------------------------------------------------ running
def _timed_out_cell(out_nb: Path) -> str:
    """The last cell that started in the executed copy: the one that hit the limit."""
    try:
        cells = json.loads(out_nb.read_text())["cells"]
    except (OSError, json.JSONDecodeError, KeyError):
        return "unknown cell"
    started = [(i, c) for i, c in enumerate(cells) if (c.get("metadata", {}).get("papermill") or {}).get("start_time")]
    if not started:
        return "unknown cell"
    i, cell = started[-1]
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return f"cell {i} of the executed copy ({source.strip().splitlines()[0][:60] if source.strip() else 'empty'!r})"


PR_SET_PDEATHSIG = 1  # linux/prctl.h
IDLE_LIMIT_S = 120    # a kernel idle this long while its notebook still runs: the client is stuck


def idle_limit() -> float:
    """Seconds a kernel may sit idle while papermill still runs its notebook:
    ``CSP_IDLE_LIMIT_S`` in the environment, else :data:`IDLE_LIMIT_S`."""
    return float(os.environ.get("CSP_IDLE_LIMIT_S", IDLE_LIMIT_S))


class _IdleWatch(threading.Thread):
    """Watches a kernel's status messages (a second subscriber to its IOPub channel) and kills
    it once it has been idle for ``limit`` seconds without a new request: while papermill runs
    a notebook, requests follow each other within milliseconds, so an idle kernel that long
    means a client still waiting on a cell the kernel has finished (nbclient's wait after
    widget cells, papermill #723). The client then sees a dead kernel and the stage fails."""

    def __init__(self, manager, limit: float):
        super().__init__(daemon=True, name="csp-idle-watch")
        self.manager, self.limit = manager, limit
        self.stalled = False
        self.done = threading.Event()

    def run(self) -> None:
        from queue import Empty

        from jupyter_client import BlockingKernelClient

        client = BlockingKernelClient()
        client.load_connection_info(self.manager.get_connection_info())
        client.start_channels(shell=False, iopub=True, stdin=False, hb=False, control=False)
        idle_since = None
        try:
            while not self.done.is_set():
                try:
                    msg = client.get_iopub_msg(timeout=0.5)
                except Empty:
                    if idle_since is not None and time.monotonic() - idle_since > self.limit:
                        self.stalled = True
                        self.manager.provisioner.process.kill()
                        return
                    continue
                state = msg["content"].get("execution_state") if msg["msg_type"] == "status" else None
                idle_since = time.monotonic() if state == "idle" else None
        finally:
            client.stop_channels()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when the process that starts it dies.

    jupyter_client starts each kernel in its own session, so neither a kill of the driver's
    process group nor a Ctrl-C reaches it, and ipykernel's own check polls its parent only once
    a second: a training kernel left behind goes on writing checkpoints into the run folder.
    Linux only (prctl); elsewhere the kernel keeps ipykernel's polling alone."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def _kernel_manager_class():
    """jupyter_client's kernel manager, with kernels that die with the process starting them,
    talk to the driver over Unix sockets, and are shut down without a Ctrl-C.

    Left to its defaults, every kernel warns that it runs "over TCP without encryption", and a
    shutdown first sends the kernel SIGINT: a kernel still handling a message then logs
    "ERROR | KeyboardInterrupt caught in kernel" although its notebook succeeded. Unix sockets
    (next to the connection file) never leave the machine, so there is nothing to encrypt;
    CurveZMQ over TCP, the other way to silence the warning, once left a study test waiting
    forever on a kernel that sat idle. The shutdown request alone ends an idle kernel; a busy
    one (a cell past its limit) still gets SIGTERM, then SIGKILL, from jupyter_client.
    Each kernel is watched for a client stuck on it (:class:`_IdleWatch`; the class's
    ``watches`` list them) and told it runs in a batch (``CSP_BATCH``: no widgets)."""
    from jupyter_client import AsyncKernelManager

    watches: list[_IdleWatch] = []

    class DriverKernelManager(AsyncKernelManager):
        def __init__(self, **kw):
            kw.setdefault("transport", "ipc")
            # a folder of its own: the default socket prefix ("kernel-ipc" in the working
            # directory) is shared by kernels running side by side, which then read each
            # other's messages
            self._socket_dir = tempfile.mkdtemp(prefix="csp-kernel-")
            # removed at shutdown, or with the manager when its kernel never started
            weakref.finalize(self, shutil.rmtree, self._socket_dir, True)
            kw.setdefault("ip", os.path.join(self._socket_dir, "kernel"))
            super().__init__(**kw)
            self._quiet_shutdown = False

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            preexec = _die_with_parent()
            if preexec is not None:
                kw["preexec_fn"] = preexec
            kw["env"] = {**(kw.get("env") or os.environ), BATCH_ENV: "1"}  # no person at this notebook
            await super()._async_launch_kernel(kernel_cmd, **kw)
            self._watch = _IdleWatch(self, idle_limit())
            watches.append(self._watch)
            self._watch.start()

        async def _async_interrupt_kernel(self):
            if not self._quiet_shutdown:
                await super()._async_interrupt_kernel()

        async def shutdown_kernel(self, now: bool = False, restart: bool = False):
            if getattr(self, "_watch", None) is not None:
                self._watch.done.set()
            self._quiet_shutdown = True
            try:
                await super()._async_shutdown_kernel(now=now, restart=restart)
            finally:
                self._quiet_shutdown = False
                if not restart:
                    shutil.rmtree(self._socket_dir, ignore_errors=True)

    DriverKernelManager.watches = watches
    return DriverKernelManager


def execute_stage(stage: Stage, run_dir: Path, out_nb: Path, log_output: bool, notebook: Path | None = None) -> None:
    """Run the notebook; a failing cell, one past the stage's time limit, or a kernel left idle
    while papermill still waits (:func:`idle_limit`) fails the stage."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    notebook = Path(notebook or notebook_of(stage.name))
    manager = _kernel_manager_class()
    try:
        try:
            pm.execute_notebook(str(notebook), str(out_nb),
                                parameters={**stage.parameters, "run_dir": str(run_dir)}, cwd=str(REPO),
                                progress_bar=False, log_output=log_output, kernel_name="python3",
                                execution_timeout=stage.cell_timeout, kernel_manager_class=manager)
        finally:  # a stopped idle kernel surfaces as whatever the client saw: say what happened
            if any(w.stalled for w in manager.watches):
                raise StageFailed(stage.name, f"{notebook.name}: {_timed_out_cell(out_nb)} left papermill waiting on "
                                  f"an idle kernel for more than {idle_limit():g} s; the kernel was stopped",
                                  out_nb) from None
    except pm.PapermillExecutionError as err:
        raise StageFailed(stage.name, f"{err.ename}: {err.evalue}", out_nb) from None
    except CellTimeoutError:
        raise StageFailed(stage.name, f"{_timed_out_cell(out_nb)} ran past the cell limit of "
                          f"{stage.cell_timeout} s (set cell_timeout for this stage to change it)", out_nb) from None
    except DeadKernelError as err:
        raise StageFailed(stage.name, f"the kernel died: {err}", out_nb) from None
    except OSError as err:  # papermill writing the executed copy: disk full, a read-only folder
        raise StageFailed(stage.name, f"cannot write: {os_problem(err)}", out_nb) from None


def finish_stage(run_dir: Path, stage: Stage, key: str, parts: dict, seconds: float) -> None:
    """Record the outputs' digests; check the shared ones still hold what their owner recorded."""
    for owner in owners_of_shared(run_dir, stage):
        changed = [p for p in changed_outputs(run_dir, owner) if p in stage.shared]
        if changed:
            raise StageFailed(stage.name, f"it added to {', '.join(changed)}, an output of {owner['stage']} "
                              "that both stages write; give both the same settings (e.g. the same suite) "
                              "so that the shared results agree", run_dir / "notebooks" / f"{stage.name}.ipynb")
    digests = {rel: digest_and_files(run_dir, rel) for rel in stage.outputs}
    outputs = {rel: digest for rel, (digest, _) in digests.items()}
    files = {rel: per_file for rel, (_, per_file) in digests.items() if per_file is not None}
    write_json(marker_path(run_dir, stage.name),
                {"stage": stage.name, "key": key, "key_parts": parts, "produced": hash_json(outputs),
                 "outputs": outputs, "files": files, "reads": stage.inputs, "seconds": seconds,
                 "parameters": stage.parameters})
    running_path(run_dir, stage.name).unlink(missing_ok=True)


def owners_of_shared(run_dir: Path, stage: Stage) -> list[dict]:
    markers = [read_marker(run_dir, name) for name in stage.inputs]
    return [m for m in markers if m and any(p in m.get("outputs", {}) for p in stage.shared)]
