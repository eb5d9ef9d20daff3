"""How a step ends on one of our errors: one clear line, a non-zero exit, no traceback.

Every component body runs its work inside ``step_errors(step, workspace_path)``. Under the KFP
executor (a pod on a cluster, or a ``kfp.local`` subprocess) a ``KfpFinetuneError`` then ends
the process with exit code 2 and ``kfp-finetune: error: <class>: <message>`` as its last
line (on a cluster the KFP launcher, backend/src/v2/cmd/launcher-v2/main.go, then logs its own
"failed to execute component: exit status 2"); any other exception is a bug and keeps its
traceback. The step also records the error in
``<workspace>/.kfp-finetune/last-error.json`` so that the local runner, which only learns from
kfp.local that "a task failed", can raise the step's own error class and message.

Called outside the executor (``component.python_func(...)`` in tests, a notebook), the error is
raised unchanged.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kfp_finetune import errors
from kfp_finetune.errors import KfpFinetuneError
from kfp_finetune.storage.ownership import WORKSPACE_MARKER

PREFIX = "kfp-finetune: error: "
INTERRUPTED = "kfp-finetune: interrupted"
EXIT_CODE = 2  # as the CLI's exit code for bad input
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
RECORD = Path(".kfp-finetune") / "last-error.json"


def under_executor() -> bool:
    """Whether this process is a KFP task (the executor sets ``_KFP_RUNTIME=true``).

    kfp's component_factory (``_get_command_and_args_for_lightweight_component``) starts every
    Python component as ``_KFP_RUNTIME=true python3 -m kfp.dsl.executor_main``.
    """
    return os.environ.get("_KFP_RUNTIME", "").lower() == "true"


def one_line(message: str) -> str:
    """The message as one line: itself, or its first and last lines when it has several."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    if len(lines) == 1:
        return lines[0]
    return f"{lines[0].rstrip(':')} ... {lines[-1]}"


def error_line(exc: BaseException) -> str:
    """The line a step (and the CLI, after a failed local run) ends with.

    ``kfp-finetune: error: DatasetError: column_map names columns that ...``
    """
    return f"{PREFIX}{type(exc).__name__}: {one_line(str(exc))}"


def record_path(workspace: str | Path) -> Path:
    """Where a step records its error in the workspace."""
    return Path(workspace) / RECORD


def clear_record(workspace: str | Path) -> None:
    """Forget the error of an earlier run (the local runner calls this before a run)."""
    record_path(workspace).unlink(missing_ok=True)


def _write_record(workspace: str | Path | None, step: str, exc: KfpFinetuneError) -> None:
    if workspace is None:  # a task that mounts no workspace (check-config, cleanup)
        return
    root = Path(workspace)
    # Never create a workspace just to write an error into it, and never write into a folder
    # that is not one (an empty path, a user's folder the step refused).
    if not str(workspace).strip() or not (root / WORKSPACE_MARKER).is_file():
        return
    path = record_path(root)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = {"step": step, "type": type(exc).__name__, "message": str(exc)}
    try:
        path.parent.mkdir(exist_ok=True)
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, path)  # a reader sees the whole record or none
    except OSError:  # a full or read-only volume: the log line below still says it
        tmp.unlink(missing_ok=True)


@contextmanager
def step_errors(step: str, workspace: str | Path | None) -> Iterator[None]:
    """End the step with one line on a ``KfpFinetuneError`` (under the KFP executor).

    Args:
        step: The task's name, e.g. ``dataset-initializer``.
        workspace: The workspace root, where the error is recorded for the local runner
            (None for a task that mounts none).

    Raises:
        SystemExit: Code 2 after our error, 130 after Ctrl-C (under the executor only).
        KfpFinetuneError: Unchanged, when not running under the executor.
    """
    try:
        yield
    except KfpFinetuneError as exc:
        if not under_executor():
            raise
        _write_record(workspace, step, exc)
        sys.stdout.flush()  # the pod log interleaves both streams: keep the line last
        if len(str(exc).splitlines()) > 1:
            print(str(exc), file=sys.stderr)
        print(error_line(exc), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODE) from None
    except KeyboardInterrupt:
        if not under_executor():
            raise
        sys.stdout.flush()
        print(INTERRUPTED, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None


def _error_class(name: str) -> type[KfpFinetuneError]:
    found = getattr(errors, name, None)
    if isinstance(found, type) and issubclass(found, KfpFinetuneError):
        return found
    return KfpFinetuneError


def step_error(workspace: str | Path) -> KfpFinetuneError | None:
    """The error a step of this run recorded, as its own class; None when none did.

    The exception carries the failed step's name in its ``step`` attribute.
    """
    try:
        data = json.loads(record_path(workspace).read_text())
        step, name, message = str(data["step"]), str(data["type"]), str(data["message"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    exc = _error_class(name)(message)
    exc.step = step  # type: ignore[attr-defined]
    return exc
