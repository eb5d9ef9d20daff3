"""The operations settings of a cluster run, checked before the KFP backend ever uses them.

The backend (kubeflow/pipelines, ``backend/src/v2/driver``, read at release 2.17.0) is strict
in ways that fail late or silently:

* ``initPodSpecPatch`` (driver.go) resolves the fine-tune pod's accelerator type and count and
  its CPU and memory requests with ``resolvePodSpecInputRuntimeParameter`` (resolve.go), which
  reads the input's *string* value: an integer parameter resolves to "" and the accelerator
  limit is dropped without a word; "" for CPU or memory fails ``k8sres.ParseQuantity``.
* ``resolveInputParameterStr`` (resolve.go) fails a task whose Secret name resolves to ""
  ("Expected a non-empty string").
* ``createPVC`` (k8s.go) parses the size with ``k8sres.MustParse``: a bad size crashes the driver.

So the pipeline's first task (``check-config``) calls :func:`check_cluster_settings`, which
refuses bad values with one clear message and hands the fine-tune task and ``CreatePVC`` only
validated *strings*. ``kfp-finetune submit`` runs the same checks before anything is sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from kfp_finetune.errors import ConfigError

GPU_RESOURCE = "nvidia.com/gpu"
MAX_GPUS = 8
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany")
PVC_PREFIX = "kfp-finetune-"
SKIPPED_CPU_REQUEST = "100m"
SKIPPED_MEMORY_REQUEST = "256Mi"
ANNOTATION_PREFIX = "kfp-finetune/"
# Kubernetes quantity grammar (k8s.io/apimachinery pkg/api/resource, ParseQuantity): a decimal
# number, then a binary suffix (Ki..Ei), a decimal suffix (n u m "" k M G T P E) or an exponent.
_QUANTITY = re.compile(
    r"^(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)
_SUFFIX = {"": 0, "n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
# DNS-1123 subdomain: the names of Secrets, PVCs and StorageClasses.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# An extended resource name such as nvidia.com/gpu or amd.com/gpu (domain-prefixed).
_RESOURCE_NAME = re.compile(
    r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_MIN_PVC_BYTES = 2**20  # a workspace smaller than 1Mi is a typo (20m is 0.02 bytes)


def parse_quantity(value: Any, name: str, example: str) -> Decimal:
    """Parse a Kubernetes quantity such as ``100Gi``, ``8`` or ``7500m``.

    Args:
        value: The text to parse.
        name: Parameter name for the message.
        example: A valid value for the message.

    Returns:
        The value in base units (bytes, cores).

    Raises:
        ConfigError: ``value`` is not a Kubernetes quantity.
    """
    match = _QUANTITY.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(
            f"{name}={value!r} is not a Kubernetes quantity; write e.g. {example} (digits, then "
            "a suffix such as Mi, Gi, Ti or m)."
        )
    try:
        number = Decimal(match["num"])
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise ConfigError(f"{name}={value!r} is not a number.") from None
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        return number * (2 ** _BINARY[suffix])
    if suffix[:1] in ("e", "E"):
        return number.scaleb(int(suffix[1:]))
    return number.scaleb(_SUFFIX[suffix])


def check_positive_quantity(value: Any, name: str, example: str) -> str:
    """Check a CPU or memory request: a Kubernetes quantity above zero.

    Raises:
        ConfigError: It is empty, malformed or zero.
    """
    if parse_quantity(value, name, example) <= 0:
        raise ConfigError(f"{name}={value!r} must be above zero; write e.g. {example}.")
    return value


def check_pvc_size(value: Any, name: str = "workspace_pvc_size") -> str:
    """Check the workspace volume's size (``createPVC`` would ``MustParse`` it and crash).

    Raises:
        ConfigError: It is not a quantity, or is under 1Mi (``20m`` is 0.02 bytes).
    """
    if parse_quantity(value, name, "100Gi") < _MIN_PVC_BYTES:
        raise ConfigError(
            f"{name}={value!r} is less than 1Mi; a workspace holds a model and a dataset: write "
            "e.g. 100Gi (Gi, not G or m)."
        )
    return value


def check_object_name(value: Any, name: str, what: str, example: str) -> str:
    """Check the name of a Kubernetes object (Secret, StorageClass): a DNS-1123 subdomain.

    Raises:
        ConfigError: It is empty or not a valid name.
    """
    if (value == "" or value is None) and what == "Secret":
        raise ConfigError(
            f"{name} is empty; the KFP backend fails any task given an empty Secret name "
            f"('Expected a non-empty string'). Name one, e.g. {example!r} (the Secret need "
            "not exist: tasks run without it)."
        )
    if value == "" or value is None:
        raise ConfigError(
            f"{name} is empty; name a {what}, e.g. {example!r} (kubectl get storageclass). An "
            "empty class disables provisioning: the volume would wait for a matching "
            "pre-made one, and the run with it."
        )
    if not isinstance(value, str) or len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise ConfigError(
            f"{name}={value!r} is not a valid Kubernetes {what} name; use lowercase letters, "
            f"digits, '-' and '.', starting and ending with a letter or digit (e.g. {example!r})."
        )
    return value


def check_access_modes(value: Any, name: str = "workspace_access_modes") -> list[str]:
    """Check the volume's access modes (``createPVC`` maps an unknown one to "").

    Raises:
        ConfigError: Not a non-empty list of known modes.
    """
    if not isinstance(value, list) or not value or any(v not in ACCESS_MODES for v in value):
        raise ConfigError(
            f"{name}={value!r} must be a list of access modes among {', '.join(ACCESS_MODES)}, "
            'e.g. ["ReadWriteOnce"].'
        )
    return list(value)


def accelerator(gpus_per_node: Any, accelerator_type: Any) -> tuple[str, str]:
    """The fine-tune pod's accelerator type and limit, as the strings the backend needs.

    ``initPodSpecPatch`` (driver.go) adds a limit only when both strings are non-empty, so a CPU
    run (``gpus_per_node=0``) gets ``("", "")``: no accelerator limit at all.

    Raises:
        ConfigError: ``gpus_per_node`` is not 0-8, or the type is not a resource name.
    """
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or not (
            0 <= gpus_per_node <= MAX_GPUS):
        raise ConfigError(
            f"train_gpus_per_node={gpus_per_node!r} must be a whole number from 0 (train on "
            f"CPU) to {MAX_GPUS} (one node's GPUs)."
        )
    if gpus_per_node == 0:
        return "", ""
    if not isinstance(accelerator_type, str) or not _RESOURCE_NAME.match(accelerator_type):
        raise ConfigError(
            f"cluster_accelerator_type={accelerator_type!r} is not a Kubernetes resource name; "
            f"with train_gpus_per_node={gpus_per_node} name the GPU resource, e.g. "
            f"{GPU_RESOURCE!r} or 'amd.com/gpu'."
        )
    return accelerator_type, str(gpus_per_node)


def workspace_pvc_name(run_id: str) -> str:
    """The run's workspace volume name, ``kfp-finetune-<run id>``.

    ``CreatePVC`` takes it from ``check-config``; the exit task derives the same name from the
    run id alone (an exit task may not take another task's outputs).

    Raises:
        ConfigError: The run id is empty or was not resolved by the backend.
    """
    name = PVC_PREFIX + (run_id or "")
    if not run_id or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise ConfigError(
            f"run id {run_id!r} cannot name a volume; the KFP backend resolves "
            "{{$.pipeline_job_uuid}} to the run's UUID from release 2.5 on: upgrade the backend."
        )
    return name


def pvc_annotations(pipeline: str, run_id: str, run_name: str) -> dict[str, str]:
    """Annotations that let ``kubectl get pvc -o yaml`` name the pipeline and run of a volume."""
    return {
        f"{ANNOTATION_PREFIX}pipeline": pipeline,
        f"{ANNOTATION_PREFIX}run-id": run_id,
        f"{ANNOTATION_PREFIX}run-name": run_name,
    }


@dataclass(frozen=True)
class ClusterSettings:
    """What ``check-config`` hands on: validated strings only, ready for the backend."""

    accelerator_type: str
    accelerator_limit: str
    cpu_request: str
    memory_request: str
    pvc_name: str
    pvc_annotations: dict[str, str] = field(default_factory=dict)
    # The optional lm-eval task's pod: the fine-tune pod's resources when eval_lm_tasks is
    # set, else a few seconds of CPU (it only says it was skipped).
    bench_accelerator_type: str = ""
    bench_accelerator_limit: str = ""
    bench_cpu_request: str = SKIPPED_CPU_REQUEST
    bench_memory_request: str = SKIPPED_MEMORY_REQUEST


def check_secret_names(hf_token_secret: Any, s3_secret: Any,
                       tracking_secret: Any = "tracking-credentials") -> None:
    """Check the Secret names (non-empty DNS names; the Secrets themselves are optional)."""
    check_object_name(hf_token_secret, "secret_hf_token", "Secret", "hf-token")
    check_object_name(s3_secret, "secret_s3", "Secret", "s3-credentials")
    check_object_name(tracking_secret, "secret_tracking", "Secret", "tracking-credentials")


def check_cluster_settings(
    values: dict[str, Any], run_id: str = "", run_name: str = "", pipeline: str = ""
) -> ClusterSettings:
    """Check every operations parameter of a cluster run; return what the backend needs.

    Args:
        values: Run-form values by parameter name (``cluster_*``, ``workspace_*``,
            ``secret_*``, ``train_gpus_per_node``, ``export_push_to``).
        run_id: The run's UUID (names the volume).
        run_name: The run's display name (annotated on the volume).
        pipeline: The pipeline's name (annotated on the volume).

    Raises:
        ConfigError: The first bad value, named, with what was expected.
    """
    v = values
    acc_type, acc_limit = accelerator(v["train_gpus_per_node"], v["cluster_accelerator_type"])
    check_positive_quantity(v["cluster_cpu_request"], "cluster_cpu_request", "8 or 7500m")
    check_positive_quantity(v["cluster_memory_request"], "cluster_memory_request", "64Gi")
    check_pvc_size(v["workspace_pvc_size"])
    check_object_name(v["workspace_storage_class"], "workspace_storage_class", "StorageClass",
                      "standard")
    check_access_modes(v["workspace_access_modes"])
    check_secret_names(v["secret_hf_token"], v["secret_s3"],
                       v.get("secret_tracking", "tracking-credentials"))
    if v.get("workspace_delete_on_success") and not (v.get("export_push_to") or "").strip():
        raise ConfigError(
            "workspace_delete_on_success=true without export_push_to would delete the only "
            "copy of the model (it lives on the workspace volume); set export_push_to to "
            "hf://org/repo or s3://bucket/prefix, or set workspace_delete_on_success=false."
        )
    bench = bool((v.get("eval_lm_tasks") or "").strip())
    return ClusterSettings(
        accelerator_type=acc_type,
        accelerator_limit=acc_limit,
        cpu_request=v["cluster_cpu_request"],
        memory_request=v["cluster_memory_request"],
        pvc_name=workspace_pvc_name(run_id),
        pvc_annotations=pvc_annotations(pipeline, run_id, run_name),
        bench_accelerator_type=acc_type if bench else "",
        bench_accelerator_limit=acc_limit if bench else "",
        bench_cpu_request=v["cluster_cpu_request"] if bench else SKIPPED_CPU_REQUEST,
        bench_memory_request=v["cluster_memory_request"] if bench else SKIPPED_MEMORY_REQUEST,
    )
