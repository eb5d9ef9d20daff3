"""The checks ``kfp-finetune submit`` runs before anything is sent to the KFP API.

The operations options get the same checks as the pipeline's ``check-config`` task
(:mod:`kfp_finetune.steps.check_config`); a schedule is held to the cron grammar of the backend's
scheduler (``robfig/cron`` v1, ``cron.Parse``, used by
``backend/src/crd/controller/scheduledworkflow/util/cron_schedule.go``): six fields, seconds
first, each within its range.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.check_config import (
    ACCESS_MODES,
    accelerator,
    check_object_name,
    check_positive_quantity,
    check_pvc_size,
)

_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
_CRON_FIELDS = (  # name, low, high, names (robfig/cron v1 spec.go bounds)
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT",
                      "NOV", "DEC")),
    ("day of week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)
_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")  # Go time.ParseDuration
_CRON_HELP = ("use 5 fields (minute hour day month weekday, e.g. '0 3 * * *' for 03:00 "
              "daily), 6 fields with seconds first, or a macro such as @daily or '@every 12h'")


def _cron_value(text: str, spec: tuple[str, int, int, tuple[str, ...]]) -> int:
    name, low, high, names = spec
    if text.upper() in names:
        return names.index(text.upper()) + low
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{name} {text!r} is outside {low}-{high}")
    return int(text)


def _check_cron_field(text: str, spec: tuple[str, int, int, tuple[str, ...]]) -> None:
    for part in text.split(","):
        span, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) < 1):
            raise ValueError(f"{spec[0]} step {step!r} must be a whole number of at least 1")
        if span in ("*", "?"):
            continue
        first, _, last = span.partition("-")
        start = _cron_value(first, spec)
        if last and _cron_value(last, spec) < start:
            raise ValueError(f"{spec[0]} range {span!r} runs backwards")


def normalize_cron(expression: str) -> str:
    """Return KFP's 6-field cron (seconds first) for a 5- or 6-field cron or an ``@`` macro.

    Raises:
        ConfigError: Another number of fields, or a field outside its range.
    """
    text = " ".join(expression.split())
    if text.startswith("@"):
        every = text.split(" ", 1)
        if text in _MACROS or (every[0] == "@every" and len(every) == 2
                               and _DURATION.match(every[1])):
            return text
        raise ConfigError(f"--schedule {expression!r} is not a cron expression; {_CRON_HELP}.")
    fields = text.split(" ")
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ConfigError(f"--schedule {expression!r} is not a cron expression; {_CRON_HELP}.")
    for field_text, spec in zip(fields, _CRON_FIELDS, strict=True):
        try:
            _check_cron_field(field_text, spec)
        except ValueError as exc:
            raise ConfigError(
                f"--schedule {expression!r}: {exc}; {_CRON_HELP} (weekday 0-6 or SUN-SAT)."
            ) from None
    return " ".join(fields)


def _json_arg(text: str | None, name: str, kind: type) -> Any:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        example = ('\'{"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}\'' if kind is dict
                   else '\'[{"key": "nvidia.com/gpu", "operator": "Exists", '
                        '"effect": "NoSchedule"}]\'')
        raise ConfigError(
            f"{name} {text!r} is not a JSON {'object' if kind is dict else 'list'}; write e.g. "
            f"{name} {example}."
        )
    return value


def _check_scheduling(node_selector: str | None, tolerations: str | None) -> tuple[Any, Any]:
    selector = _json_arg(node_selector, "--node-selector", dict)
    if selector is not None and not all(isinstance(v, str) for v in selector.values()):
        raise ConfigError(
            f"--node-selector {node_selector!r}: every label value must be a string; quote "
            "numbers and booleans."
        )
    tols = _json_arg(tolerations, "--tolerations", list)
    for tol in tols or []:
        if not isinstance(tol, dict) or not set(tol) <= _TOLERATION_KEYS:
            raise ConfigError(
                f"--tolerations item {tol!r} is not a Kubernetes toleration; use only the keys "
                f"{', '.join(sorted(_TOLERATION_KEYS))}."
            )
    return selector, tols


def ops_arguments(
    *,
    push_to: str = "",
    delete_workspace: bool = False,
    keep_workspace_on_failure: bool = False,
    copy_to_artifact: bool = False,
    pvc_size: str | None = None,
    pvc_storage_class: str | None = None,
    pvc_access_mode: str | None = None,
    accelerator_type: str | None = None,
    node_selector: str | None = None,
    tolerations: str | None = None,
    cpu_request: str | None = None,
    memory_request: str | None = None,
    hf_token_secret: str | None = None,
    s3_secret: str | None = None,
) -> dict[str, Any]:
    """Validate the operations options and turn the given ones into pipeline parameters.

    Options left as None keep the pipeline's defaults.

    Raises:
        ConfigError: An option is malformed, or ``delete_workspace`` would delete the only copy.
    """
    from kfp_finetune.storage.uris import parse_destination

    dest = parse_destination(push_to)
    if delete_workspace and dest is None:
        raise ConfigError(
            "--delete-workspace without --push-to would delete the only copy of the model (it "
            "lives on the workspace volume); add --push-to hf://org/repo or s3://bucket/prefix, "
            "or keep the volume."
        )
    if pvc_size is not None:
        check_pvc_size(pvc_size, "--pvc-size")
    if cpu_request is not None:
        check_positive_quantity(cpu_request, "--cpu-request", "8 or 7500m")
    if memory_request is not None:
        check_positive_quantity(memory_request, "--memory-request", "64Gi")
    if pvc_access_mode is not None and pvc_access_mode not in ACCESS_MODES:
        raise ConfigError(
            f"--pvc-access-mode {pvc_access_mode!r} is not an access mode; use one of "
            f"{', '.join(ACCESS_MODES)}."
        )
    for name, value, what, example in (
            ("--pvc-storage-class", pvc_storage_class, "StorageClass", "standard"),
            ("--hf-token-secret", hf_token_secret, "Secret", "hf-token"),
            ("--s3-secret", s3_secret, "Secret", "s3-credentials")):
        if value is not None:
            check_object_name(value, name, what, example)
    if accelerator_type is not None:
        accelerator(1, accelerator_type)
    selector, tols = _check_scheduling(node_selector, tolerations)
    args: dict[str, Any] = {
        "push_to": push_to,
        "delete_workspace": delete_workspace,
        "keep_workspace_on_failure": keep_workspace_on_failure,
        "copy_to_artifact": copy_to_artifact,
        "pvc_size": pvc_size,
        "pvc_storage_class": pvc_storage_class,
        "pvc_access_modes": None if pvc_access_mode is None else [pvc_access_mode],
        "accelerator_type": accelerator_type,
        "node_selector": selector,
        "tolerations": tols,
        "cpu_request": cpu_request,
        "memory_request": memory_request,
        "hf_token_secret": hf_token_secret,
        "s3_secret": s3_secret,
    }
    return {k: v for k, v in args.items() if v is not None}
