"""One local job: a folder, a background process running the pipeline, and its log per step.

:func:`run_job` (in the job's own process) runs the job described by
``JOB_DIR/spec.json`` with :func:`kfp_finetune.drivers.local.run_local` (kfp.local, this
interpreter),
its output going to ``JOB_DIR/run.log``, and writes ``JOB_DIR/result.json`` last. Credentials
reach it only through its environment (``HF_TOKEN``, ``AWS_*``), never through the folder.

kfp.local runs the tasks one after the other and frames each task's output with
``Executing task 'NAME'`` and ``Task 'NAME' finished with status SUCCESS|FAILURE`` lines
(kfp/local/task_dispatcher.py ``run_single_task_implementation``), indenting the task's own
lines by four spaces (kfp/local/logging_utils.py ``indented_print``): that is how the log is
split into steps.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp_finetune.drivers.client.steps import FAILED, RUNNING, SUCCEEDED, step_of, strip_ansi

SPEC, LOG, RESULT = "spec.json", "run.log", "result.json"
_START = re.compile(r" - INFO - Executing task '(?P<task>[^']+)'")
_END = re.compile(r"Task '(?P<task>[^']+)' finished with status (?P<status>[A-Z]+)")
_STAMP = re.compile(r"^(?P<time>\d\d:\d\d:\d\d\.\d+) - ")
_INDENT = "    "


@dataclass
class StepLog:
    """One step's lines and state, as read from the job's log so far."""

    status: str = RUNNING
    lines: list[str] = field(default_factory=list)
    started: str | None = None
    finished: str | None = None


class LogSplitter:
    """Feeds on the run log line by line and files each line under its step."""

    def __init__(self) -> None:
        self.steps: dict[str, StepLog] = {}
        self.current: str | None = None

    def feed(self, raw: str) -> tuple[str | None, str | None]:
        """Take one line; return ``(step, line)`` for a step's own line, else ``(step, None)``."""
        line = strip_ansi(raw.rstrip("\n"))
        stamp = _STAMP.match(line)
        start, end = _START.search(line), _END.search(line)
        if start and (step := step_of(start["task"])):
            self.current = step[0]
            self.steps[self.current] = StepLog(started=stamp["time"] if stamp else None)
            return self.current, None
        if end and (step := step_of(end["task"])) and step[0] in self.steps:
            log = self.steps[step[0]]
            log.status = SUCCEEDED if end["status"] == "SUCCESS" else FAILED
            log.finished = stamp["time"] if stamp else None
            self.current = None
            return step[0], None
        if self.current is None or not line.strip() or (stamp and "Streamed logs:" in line):
            return None, None
        if stamp:  # kfp.local's own record inside a task frame
            return self.current, None
        text = line[len(_INDENT):] if line.startswith(_INDENT) else line
        self.steps[self.current].lines.append(text)
        return self.current, text


def split_log(text: str) -> dict[str, StepLog]:
    """Every step's lines and state from a whole run log."""
    splitter = LogSplitter()
    for line in text.splitlines():
        splitter.feed(line)
    return splitter.steps


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_job(job_dir: Path) -> int:
    """Run the job in ``job_dir`` and record its result; return the process exit code."""
    from kfp_finetune.drivers.local import run_config_local
    from kfp_finetune.steps.check_run import check_run
    from kfp_finetune.storage.credentials import redact

    spec = json.loads((job_dir / SPEC).read_text())
    try:
        # The same run-form values a cluster run gets, through the same check.
        run = check_run(spec["runtime"], spec["arguments"])
        result = run_config_local(run, spec["workspace"])
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, then reported
        # run_local raises the failed step's own error, with its name in ``step``.
        message = redact(f"{type(exc).__name__}: {exc}").splitlines()[0]
        print(message, flush=True)
        write_json(job_dir / RESULT, {"status": "Failed", "error": message,
                                      "step": getattr(exc, "step", None)})
        return 1
    write_json(job_dir / RESULT, {"status": "Complete", "model_dir": str(result.model_dir),
                                  "losses": result.losses})
    return 0

