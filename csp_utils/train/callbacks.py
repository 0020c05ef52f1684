"""Trainer callbacks: the CSV training log (one row per logged step) and a stop after N
steps (the resume tests' interruption).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from csp_utils.train.settings import LOG_COLUMNS



# --------------------------------------------------------------------------- callbacks


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def csv_log_callback(path: str | os.PathLike):
    """A TrainerCallback appending each training log to a CSV (``LOG_COLUMNS``)."""
    base = _callback_base()

    class CSVLogCallback(base):
        def __init__(self, path):
            self.path = Path(path)
            self.trimmed = False

        def on_step_begin(self, args, state, control, **kwargs):
            # A resumed run starts at its checkpoint's step: drop rows logged after it by the
            # interrupted run, so the curve holds each step once.
            if self.trimmed or not state.is_world_process_zero:
                return
            self.trimmed = True
            if state.global_step == 0 or not self.path.exists():
                self.path.unlink(missing_ok=True)
                return
            rows = read_training_log(self.path)
            _write_log(self.path, [r for r in rows if r["step"] <= state.global_step])

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True  # the last step always gets a row, whatever logging_steps
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            row = {"step": state.global_step, "epoch": state.epoch, "lr": logs.get("learning_rate"),
                   **{k: logs.get(k) for k in LOG_COLUMNS if k not in ("step", "epoch", "lr")}}
            new = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})

    return CSVLogCallback(path)


def stop_after_steps_callback(steps: int, save: bool = False):
    """Stops training once ``steps`` optimizer steps are done, like a kill: nothing is saved
    beyond the regular checkpoints unless ``save`` (a clean pause that a later run resumes)."""
    base = _callback_base()

    class StopAfterSteps(base):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= steps:
                control.should_save = control.should_save or save
                control.should_training_stop = True
            return control

    return StopAfterSteps()


def _write_log(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in LOG_COLUMNS})


def read_training_log(path: str | os.PathLike) -> list[dict]:
    """Rows of a training CSV, numbers as floats (``step`` as int), blanks as None."""
    rows = []
    with Path(path).open() as fh:
        for raw in csv.DictReader(fh):
            row = {k: (float(v) if v not in ("", None) else None) for k, v in raw.items()}
            row["step"] = int(row["step"])
            rows.append(row)
    return rows
