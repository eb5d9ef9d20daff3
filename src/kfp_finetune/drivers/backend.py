"""The KFP backend releases the compiled pipelines need, feature by feature.

Each feature the compiled YAML uses is listed with the first backend release whose source
(kubeflow/pipelines, ``backend/src/v2``) handles it, found by reading each release tag; older
backends drop unknown fields without a word, so a run there would not fail but misbehave (for
example, an ``optional`` Secret that does not exist stalls the pod in
CreateContainerConfigError before 2.15). ``kfp-finetune submit`` refuses an older backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kfp_finetune.errors import ConfigError


@dataclass(frozen=True)
class Feature:
    """A backend feature the compiled pipelines use."""

    name: str
    since: tuple[int, int, int]
    where: str  # the backend function that handles it (file: function)


FEATURES = (
    Feature("timeout per task (activeDeadlineSeconds)", (2, 1, 0),
            "driver/driver.go: extendPodSpecPatch (ActiveDeadlineSeconds)"),
    Feature("in-memory emptyDir (/dev/shm)", (2, 3, 0),
            "driver/driver.go: extendPodSpecPatch (EmptyDirMounts)"),
    Feature("resource placeholders (accelerator type/count, cpu/memory requests)", (2, 4, 0),
            "driver/driver.go: initPodSpecPatch (resolvePodSpecInputRuntimeParameter)"),
    Feature("exit handler as an Argo exit lifecycle hook", (2, 4, 0),
            "compiler/argocompiler/common.go: addExitTask"),
    Feature("Secret names from parameters", (2, 5, 0),
            "driver/driver.go: extendPodSpecPatch (SecretNameParameter)"),
    Feature("PVC names from task outputs", (2, 5, 0),
            "driver/driver.go: makeVolumeMountPatch (PvcNameParameter)"),
    Feature("JSON node selectors and tolerations", (2, 5, 0),
            "driver/driver.go: extendPodSpecPatch (NodeSelectorJson, TolerationJson)"),
    Feature("retries", (2, 5, 0), "compiler/argocompiler/container.go: getTaskRetryStrategy"),
    Feature("{{$.pipeline_job_uuid}} and {{$.pipeline_job_name}}", (2, 5, 0),
            "driver/driver.go: resolveInputParameter (RuntimeValue constants)"),
    Feature("PipelineTaskFinalStatus input of an exit task", (2, 14, 0),
            "driver/resolve.go: resolveInputParameter (TaskFinalStatus)"),
    Feature("optional Secret as environment variables", (2, 15, 0),
            "driver/k8s.go: extendPodSpecPatch (secretAsEnv.Optional)"),
)
MIN_BACKEND = max(f.since for f in FEATURES)


def version_text(version: tuple[int, int, int]) -> str:
    """``(2, 15, 0)`` -> ``2.15.0``."""
    return ".".join(str(part) for part in version)


def parse_version(tag: str | None) -> tuple[int, int, int] | None:
    """The release in a backend tag such as ``2.17.0`` or ``v2.5.0-rc.1``; None if unknown."""
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", (tag or "").strip())
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def check_backend_version(tag: str | None) -> tuple[int, int, int] | None:
    """Refuse a backend older than :data:`MIN_BACKEND`.

    Returns:
        The parsed version, or None when the server does not say (``unknown``).

    Raises:
        ConfigError: The backend is older; the message names the features it lacks.
    """
    version = parse_version(tag)
    if version is None or version >= MIN_BACKEND:
        return version
    missing = [f"{f.name} (from {version_text(f.since)})" for f in FEATURES if version < f.since]
    raise ConfigError(
        f"the KFP backend is {version_text(version)}, older than {version_text(MIN_BACKEND)}, "
        f"which these pipelines need; it lacks: {'; '.join(missing)}. An older backend drops "
        "what it does not know without a word. Upgrade Kubeflow Pipelines to "
        f"{version_text(MIN_BACKEND)} or newer."
    )
