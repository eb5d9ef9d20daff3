"""The checks ``kfp-finetune submit`` runs before anything is sent to the KFP API.

The operations options get the same checks as the pipeline's ``check-config`` task
(:mod:`kfp_finetune.steps.check_config`); a schedule is held to the cron grammar of the backend's
scheduler (``robfig/cron`` v1, ``cron.Parse``, used by
``backend/src/crd/controller/scheduledworkflow/util/cron_schedule.go``): six fields, seconds
first, each within its range.
"""

from __future__ import annotations

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


def _check_scheduling(selector: Any, tolerations: Any) -> None:
    if selector is not None and not all(isinstance(v, str) for v in selector.values()):
        raise ConfigError(
            f"--node-selector {selector!r}: every label value must be a string; quote "
            "numbers and booleans."
        )
    for tol in tolerations or []:
        if not isinstance(tol, dict) or not set(tol) <= _TOLERATION_KEYS:
            raise ConfigError(
                f"--tolerations item {tol!r} is not a Kubernetes toleration; use only the keys "
                f"{', '.join(sorted(_TOLERATION_KEYS))}."
            )


def check_ops_values(values: dict[str, Any]) -> dict[str, Any]:
    """Check the operations options given on the command line (the others keep defaults).

    Args:
        values: Run-form values by parameter name (maps and lists already parsed); only the
            operations settings and ``export_push_to`` are looked at.

    Returns:
        The operations settings among ``values``, unchanged.

    Raises:
        ConfigError: An option is malformed (named by its flag), or
            ``--delete-workspace`` would delete the only copy.
    """
    from kfp_finetune.storage.uris import parse_destination

    v = values
    if v.get("workspace_delete_on_success") and parse_destination(
            v.get("export_push_to") or "") is None:
        raise ConfigError(
            "--delete-workspace without --push-to would delete the only copy of the model (it "
            "lives on the workspace volume); add --push-to hf://org/repo or s3://bucket/prefix, "
            "or keep the volume."
        )
    if "workspace_pvc_size" in v:
        check_pvc_size(v["workspace_pvc_size"], "--pvc-size")
    if "cluster_cpu_request" in v:
        check_positive_quantity(v["cluster_cpu_request"], "--cpu-request", "8 or 7500m")
    if "cluster_memory_request" in v:
        check_positive_quantity(v["cluster_memory_request"], "--memory-request", "64Gi")
    mode = (v.get("workspace_access_modes") or [None])[0]
    if mode is not None and mode not in ACCESS_MODES:
        raise ConfigError(
            f"--pvc-access-mode {mode!r} is not an access mode; use one of "
            f"{', '.join(ACCESS_MODES)}."
        )
    for name, flag, what, example in (
            ("workspace_storage_class", "--pvc-storage-class", "StorageClass", "standard"),
            ("secret_hf_token", "--hf-token-secret", "Secret", "hf-token"),
            ("secret_s3", "--s3-secret", "Secret", "s3-credentials"),
            ("secret_tracking", "--tracking-secret", "Secret", "tracking-credentials")):
        if name in v:
            check_object_name(v[name], flag, what, example)
    if "cluster_accelerator_type" in v:
        accelerator(1, v["cluster_accelerator_type"])
    _check_scheduling(v.get("cluster_node_selector"), v.get("cluster_tolerations"))
    from kfp_finetune.config.parameters import BY_NAME, OPS

    return {k: value for k, value in v.items() if BY_NAME[k].field == OPS}


def ops_values(options: dict[str, Any], push_to: str = "") -> dict[str, Any]:
    """Run settings given in Python (``KfpBackendConfig.pipeline_options``), checked.

    Keys are run-form parameter names (earlier names accepted with a warning) of the settings
    the SDK's types do not carry: the operations settings and ``export_*``. Maps and lists may
    be given as JSON text, an access mode as one string.

    Args:
        options: The settings.
        push_to: The run's ``export_push_to`` when ``options`` does not set it.

    Raises:
        ConfigError: A key is not such a setting, or a value is malformed.
    """
    from kfp_finetune.config.parameters import BY_NAME, OPS
    from kfp_finetune.config.run_config import canonical_names, check_type
    from kfp_finetune.drivers.cli_options import json_option

    if "pvc_access_mode" in options:  # the single-mode spelling of earlier releases
        options = {**options, "workspace_access_modes": options["pvc_access_mode"]}
        options.pop("pvc_access_mode")
    allowed = sorted(p.name for p in BY_NAME.values()
                     if p.field == OPS or p.name.startswith("export_"))
    values = canonical_names(options)
    for name, value in values.items():
        param = BY_NAME[name]
        if name not in allowed:
            raise ConfigError(
                f"pipeline_options key {name!r} is not a run setting the SDK's types lack "
                f"(training settings go in TorchTuneConfig); use among: {', '.join(allowed)}."
            )
        if param.cli_style == "json" and isinstance(value, str):
            value = json_option(value, param)
        elif param.cli_style == "single" and isinstance(value, str):
            value = [value]
        values[name] = check_type(param, value)
    ops = check_ops_values({"export_push_to": push_to, **values})
    return {**{k: v for k, v in values.items() if k not in ops}, **ops}
