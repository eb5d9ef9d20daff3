"""Names and states shared by both backends: KFP tasks as the SDK's TrainJob steps.

Step names follow ``kubeflow.trainer.constants.constants``: ``dataset-initializer``,
``model-initializer`` and ``node-0`` (``NODE + "-0"``, the training step); this pipeline's other
tasks keep their own names (``check-config``, ``create-workspace``, ``tokenize-dataset``,
``export``, ``cleanup-workspace``). On a KFP
cluster the run's tasks are reported under their pipeline task keys (the Argo node names, e.g.
``fine-tune``, ``export-model``, ``createpvc``; see kubeflow/pipelines
backend/src/apiserver/server/api_converter.go ``toModelTask``); kfp.local names them the same.
"""

from __future__ import annotations

import random
import re
import string
import uuid

from kubeflow.trainer.constants import constants

from kfp_finetune.steps.step_errors import PREFIX

TRAINING_STEP = constants.NODE + "-0"
# Task key (and display name) -> step name.
STEP_OF_TASK = {
    "check-config": "check-config",
    "createpvc": "create-workspace",
    "create-workspace": "create-workspace",
    "dataset-initializer": constants.DATASET_INITIALIZER,
    "model-initializer": constants.MODEL_INITIALIZER,
    "tokenize-dataset": "tokenize-dataset",
    "fine-tune": TRAINING_STEP,
    "export-model": "export",
    "export": "export",
    "cleanup-workspace": "cleanup-workspace",
}
# The steps every run has, in pipeline order (create-workspace only on a cluster).
LOCAL_STEPS = (constants.DATASET_INITIALIZER, constants.MODEL_INITIALIZER, "tokenize-dataset",
               TRAINING_STEP, "export")
# Step states, as the SDK reports a step's pod phase.
PENDING, RUNNING, SUCCEEDED, FAILED = "Pending", "Running", "Succeeded", "Failed"
# KFP V2beta1RuntimeState -> (TrainJob status, step status).
KFP_STATES = {
    "RUNTIME_STATE_UNSPECIFIED": (constants.TRAINJOB_CREATED, PENDING),
    "PENDING": (constants.TRAINJOB_CREATED, PENDING),
    "RUNNING": (constants.TRAINJOB_RUNNING, RUNNING),
    "PAUSED": (constants.TRAINJOB_RUNNING, RUNNING),
    "CANCELING": (constants.TRAINJOB_RUNNING, RUNNING),
    "SUCCEEDED": (constants.TRAINJOB_COMPLETE, SUCCEEDED),
    "SKIPPED": (constants.TRAINJOB_COMPLETE, "Skipped"),
    "FAILED": (constants.TRAINJOB_FAILED, FAILED),
    "CANCELED": (constants.TRAINJOB_FAILED, "Canceled"),
}
JOB_STATUSES = {constants.TRAINJOB_CREATED, constants.TRAINJOB_RUNNING,
                constants.TRAINJOB_COMPLETE, constants.TRAINJOB_FAILED}
_ATTEMPT = re.compile(r"^(?P<task>.+?)(\((?P<n>\d+)\))?$")
# "kfp_finetune.errors.DatasetError: message" or "DatasetError: message" (a traceback's last
# line, or our steps' own one-line report).
_ERROR_LINE = re.compile(r"(?:^|\s)(?:[\w.]+\.)?(?P<cls>\w*(?:Error|Exception)): (?P<msg>.+)$")
# Messages of the runners themselves, not of the step.
_GENERIC = ("finished with status", "Inner task failed")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def new_job_name() -> str:
    """A job name in the SDK's form: a letter and 11 hex digits (DNS-safe, unique)."""
    hexes = uuid.uuid4().hex[: constants.JOB_NAME_UUID_LENGTH]
    return random.choice(string.ascii_lowercase) + hexes


def step_of(task_name: str) -> tuple[str, int] | None:
    """``(step name, attempt)`` of a task or Argo node name, or None for other nodes.

    A retried task's attempts are reported as ``fine-tune(0)``, ``fine-tune(1)``, ...
    """
    match = _ATTEMPT.match(task_name or "")
    if not match or match["task"] not in STEP_OF_TASK:
        return None
    return STEP_OF_TASK[match["task"]], int(match["n"] or 0)


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes (kfp.local colours task names)."""
    return _ANSI.sub("", text)


def error_line(lines: list[str]) -> str | None:
    """The step's own one-line error from its log.

    A step that ends on one of our errors writes ``kfp-finetune: error: <Class>: <message>``
    as its last line (``kfp_finetune.steps.step_errors``; on a cluster the KFP launcher's own exit
    line follows it); other failures end with a traceback's ``SomethingError: message``. This
    is the one function that decides what a failed step "said".
    """
    cleaned = [strip_ansi(line).strip() for line in lines]
    for line in reversed(cleaned):
        if line.startswith(PREFIX):
            return line[len(PREFIX):]
    for line in reversed(cleaned):
        match = _ERROR_LINE.search(line)
        if match and not any(generic in match["msg"] for generic in _GENERIC):
            return f"{match['cls']}: {match['msg'].strip()}"
    return None
