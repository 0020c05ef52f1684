"""Lock files of one process (pid and host), for a run folder's driver and a model build.

A lock is created atomically; one whose process is gone on this host is taken over (renamed
aside first, so that of two processes taking over, one gets it); any other lock refuses."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def pid_lock(lock: Path, refused: Callable[[object, object], Exception], taken_over: Callable[[object], None]):
    """Hold ``lock`` while the block runs. ``refused(pid, host)`` is the error raised when a live
    process (or one on another host, or an unreadable lock) holds it; ``taken_over(pid)`` is
    told of a stale lock taken over."""
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(lock, me["host"], refused, taken_over)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise refused(None, None)
    try:
        yield
    finally:
        try:
            if json.loads(lock.read_text()) == me:
                lock.unlink()
        except (OSError, json.JSONDecodeError):
            pass


def _take_over_if_stale(lock: Path, host: str, refused, taken_over) -> None:
    try:
        text = lock.read_text()
        holder = json.loads(text)
    except FileNotFoundError:
        return  # released meanwhile: try again
    except json.JSONDecodeError:
        holder, text = {}, None  # being written, or damaged
    pid, where = holder.get("pid"), holder.get("host")
    if text is None or where != host or not isinstance(pid, int) or pid_alive(pid):
        raise refused(pid, where)
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)  # atomic: of two processes taking over, one gets the stale lock
    except FileNotFoundError:
        return
    if aside.read_text() != text:  # a live process's lock replaced the stale one meanwhile: put it back
        os.rename(aside, lock)
        return
    aside.unlink()
    taken_over(pid)
