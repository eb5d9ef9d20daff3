"""The KFP backend's rules for a compiled pipeline, as plain functions over the YAML.

Each rule mirrors backend code of kubeflow/pipelines at release 2.17.0 (cited beside it) and
returns a list of problems (empty: the YAML obeys it).
``tests/reliability/test_backend_conformance.py``
holds every compiled YAML to them and proves that each one fails on a YAML that breaks it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from kfp_finetune.drivers.backend import FEATURES
from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.check_config import parse_quantity

# backend/src/v2/driver/util.go: fullInputParameterRe, the placeholder of a resource field.
PLACEHOLDER = re.compile(r"^\{\{\$\.inputs\.parameters\['(.+?)'\]\}\}$")
RESOURCE_FIELDS = ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest",
                   "resourceMemoryLimit")
EXIT_STRATEGY = "ALL_UPSTREAM_TASKS_COMPLETED"
# The kfp-kubernetes executor settings this project uses -> the feature (backend.FEATURES).
PLATFORM_FEATURES = {
    "activeDeadlineSeconds": "timeout per task (activeDeadlineSeconds)",
    "emptyDirMounts": "in-memory emptyDir (/dev/shm)",
    "pvcMount": "PVC names from task outputs",
    "secretAsEnv": "Secret names from parameters",
    "nodeSelector": "JSON node selectors and tolerations",
    "tolerations": "JSON node selectors and tolerations",
}


# ----------------------------------------------------------------------------- strict parse


def strict_parse(spec: dict[str, Any], platform: dict[str, Any] | None) -> list[str]:
    """Parse the pipeline spec and every executor's Kubernetes config, unknown fields refused.

    Mirrors backend/src/apiserver/template/v2_template.go: NewV2SpecTemplate (``protojson``
    without DiscardUnknown: an unknown field rejects the upload; schema 2.1.0; a DNS-like
    pipeline name; a root) and backend/src/v2/compiler/argocompiler/container.go:
    containerExecutorTask (each executor's KubernetesExecutorConfig, strictly). The
    deployment spec (executors, their images and resources) is a Struct there, which
    backend/src/v2/compiler/visitor.go: GetDeploymentConfig parses with DiscardUnknown: an
    unknown field would vanish without a word, so this rule refuses it.
    """
    problems: list[str] = []
    try:
        parsed = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec(),
                                       ignore_unknown_fields=False)
        json_format.ParseDict(spec.get("deploymentSpec", {}),
                              pipeline_spec_pb2.PipelineDeploymentConfig(),
                              ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        return [f"pipeline spec: {exc}"]
    if parsed.schema_version != "2.1.0":
        problems.append(f"schemaVersion {parsed.schema_version!r} is not 2.1.0")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
                        parsed.pipeline_info.name):
        problems.append(f"pipeline name {parsed.pipeline_info.name!r} is not DNS-like")
    if not parsed.HasField("root"):
        problems.append("no root component")
    if platform is None:
        return problems
    try:
        json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec(),
                              ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        return [*problems, f"platform spec: {exc}"]
    for label, config in executor_configs(platform).items():
        try:
            json_format.ParseDict(config, kubernetes_executor_config_pb2.KubernetesExecutorConfig(),
                                  ignore_unknown_fields=False)
        except json_format.ParseError as exc:
            problems.append(f"{label}: {exc}")
    return problems


def executor_configs(platform: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Executor label -> its Kubernetes config."""
    if not platform:
        return {}
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


# ----------------------------------------------------------------------------- tracing


@dataclass(frozen=True)
class Origin:
    """Where an input parameter's value comes from, after following every DAG level."""

    kind: str  # "parameter" (a pipeline parameter), "output" (a task output), "constant"
    name: str  # parameter name, "task.output", or the constant
    parameter_type: str  # STRING, NUMBER_INTEGER, ... as declared at the origin


def _tasks(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(DAG component name, task name, task) for every task at every level."""
    stack = ["root"]
    while stack:
        comp = stack.pop()
        body = spec["root"] if comp == "root" else spec["components"][comp]
        for name, task in body.get("dag", {}).get("tasks", {}).items():
            yield comp, name, task
            ref = task["componentRef"]["name"]
            if "dag" in spec["components"].get(ref, {}):
                stack.append(ref)


def _caller(spec: dict[str, Any], dag_comp: str) -> tuple[str, dict[str, Any]]:
    for parent, _, task in _tasks(spec):
        if task["componentRef"]["name"] == dag_comp:
            return parent, task
    raise KeyError(f"no task runs {dag_comp}")


def trace(spec: dict[str, Any], dag_comp: str, source: dict[str, Any]) -> Origin:
    """Follow an input parameter spec, read in DAG ``dag_comp``, to where its value starts.

    Mirrors backend/src/v2/driver/resolve.go: resolveInputParameter (component input ->
    the parent DAG's input; task output -> the producer's output; runtime constant). A task
    input is ``task["inputs"]["parameters"][key]``; a Kubernetes setting's parameter (e.g.
    ``secretNameParameter``) is read in the task's DAG the same way.
    """
    while True:
        if "runtimeValue" in source:
            value = source["runtimeValue"]["constant"]
            return Origin("constant", str(value), "STRING" if isinstance(value, str) else "?")
        if "taskOutputParameter" in source:
            out = source["taskOutputParameter"]
            producer = _find_task(spec, dag_comp, out["producerTask"])
            comp = spec["components"][producer["componentRef"]["name"]]
            ptype = comp["outputDefinitions"]["parameters"][out["outputParameterKey"]]
            return Origin("output", f"{out['producerTask']}.{out['outputParameterKey']}",
                          ptype["parameterType"])
        if "taskFinalStatus" in source:
            return Origin("constant", "final status", "TASK_FINAL_STATUS")
        name = source["componentInputParameter"]
        if dag_comp == "root":
            ptype = spec["root"]["inputDefinitions"]["parameters"][name]["parameterType"]
            return Origin("parameter", name, ptype)
        dag_comp, caller = _caller(spec, dag_comp)
        source = caller["inputs"]["parameters"][name]


def _find_task(spec: dict[str, Any], dag_comp: str, name: str) -> dict[str, Any]:
    body = spec["root"] if dag_comp == "root" else spec["components"][dag_comp]
    return body["dag"]["tasks"][name]


def tasks_of_executor(spec: dict[str, Any], label: str) -> list[tuple[str, str, dict]]:
    """(DAG component, task name, task) of every task that runs executor ``label``."""
    found = []
    for comp, name, task in _tasks(spec):
        if spec["components"][task["componentRef"]["name"]].get("executorLabel") == label:
            found.append((comp, name, task))
    return found


# ----------------------------------------------------------------------------- resources


def resource_placeholders(resources: dict[str, Any]) -> dict[str, str]:
    """Resource field -> the text the backend resolves (``accelerator.resourceCount``...)."""
    fields = {f: resources[f] for f in RESOURCE_FIELDS if f in resources}
    for key in ("resourceType", "resourceCount"):
        if key in resources.get("accelerator", {}):
            fields[f"accelerator.{key}"] = resources["accelerator"][key]
    return fields


def resources_from_strings(spec: dict[str, Any]) -> list[str]:
    """Every resource placeholder must trace to a STRING parameter or output.

    backend/src/v2/driver/driver.go: initPodSpecPatch resolves them with
    resolvePodSpecInputRuntimeParameter (resolve.go), which returns ``GetStringValue()``: an
    integer resolves to "", so the accelerator limit is dropped without a word and a CPU or
    memory field fails ``k8sres.ParseQuantity``.
    """
    problems = []
    for label, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor.get("container", {}).get("resources", {})
        for field, text in resource_placeholders(resources).items():
            match = PLACEHOLDER.match(str(text))
            if match is None:
                continue  # a constant: checked by the simulation
            for comp, name, task in tasks_of_executor(spec, label):
                origin = trace(spec, comp, task["inputs"]["parameters"][match[1]])
                if origin.parameter_type != "STRING":
                    problems.append(
                        f"{name}: {field} comes from {origin.kind} {origin.name!r} of type "
                        f"{origin.parameter_type}; the backend reads only STRING values there")
    return problems


def value_of(spec: dict[str, Any], dag_comp: str, source: dict[str, Any],
             params: dict[str, Any], outputs: dict[str, Any]) -> Any:
    """The value ``source`` resolves to, as a protobuf Value's Python form (None: missing)."""
    origin = trace(spec, dag_comp, source)
    if origin.kind == "constant":
        return origin.name
    if origin.kind == "output":
        return outputs.get(origin.name)
    defaults = spec["root"]["inputDefinitions"]["parameters"][origin.name]
    value = params.get(origin.name, defaults.get("defaultValue"))
    # A NUMBER parameter travels as a protobuf number, whatever its Python form.
    if origin.parameter_type.startswith("NUMBER") and isinstance(value, (int, float)):
        return float(value)
    return value


def string_value(value: Any) -> str:
    """structpb ``GetStringValue()``: the string, or "" for any other kind."""
    return value if isinstance(value, str) else ""


def simulate_resources(spec: dict[str, Any], label: str, params: dict[str, Any],
                       outputs: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The pod's limits and requests as initPodSpecPatch (driver.go) would set them.

    Raises:
        ValueError: A field the driver would fail on (``k8sres.ParseQuantity`` error).
    """
    resources = spec["deploymentSpec"]["executors"][label]["container"].get("resources", {})
    (comp, _, task), *_ = tasks_of_executor(spec, label)

    def resolve(text: str) -> str:  # resolvePodSpecInputRuntimeParameter
        match = PLACEHOLDER.match(text)
        if match is None:
            return text
        source = task["inputs"]["parameters"][match[1]]
        return string_value(value_of(spec, comp, source, params, outputs))

    def quantity(text: str, field: str) -> str:  # k8sres.ParseQuantity
        try:
            parse_quantity(text, field, "1")
        except ConfigError:
            raise ValueError(f"{field}: {text!r} is not a quantity (driver fails)") from None
        return text

    pod: dict[str, dict[str, str]] = {"limits": {}, "requests": {}}
    for field in RESOURCE_FIELDS:
        if field in resources:
            kind = "limits" if field.endswith("Limit") else "requests"
            name = "cpu" if "Cpu" in field else "memory"
            pod[kind][name] = quantity(resolve(resources[field]), field)
    accel = resources.get("accelerator", {})
    acc_type = resolve(accel.get("resourceType", "")) if accel.get("resourceType") else ""
    count = resolve(accel.get("resourceCount", "")) if accel.get("resourceCount") else ""
    if acc_type and count:  # both non-empty, or no accelerator limit at all
        pod["limits"][acc_type] = quantity(count, "accelerator.resourceCount")
    return pod


# ----------------------------------------------------------------------------- secrets


def secret_names(spec: dict[str, Any], platform: dict[str, Any] | None,
                 params: dict[str, Any], outputs: dict[str, Any]) -> list[str]:
    """Every Secret name must resolve to a non-empty string.

    backend/src/v2/driver/k8s.go: extendPodSpecPatch resolves ``secretNameParameter`` with
    resolveInputParameterStr (resolve.go), which fails the task on "" ("Expected a non-empty
    string") and on anything but a string.
    """
    problems = []
    for label, config in executor_configs(platform).items():
        for kind in ("secretAsEnv", "secretAsVolume"):
            for item in config.get(kind, []):
                if "secretNameParameter" not in item:
                    if not item.get("secretName"):
                        problems.append(f"{label}: {kind} with neither name nor parameter")
                    continue
                for comp, name, _ in tasks_of_executor(spec, label):
                    origin = trace(spec, comp, item["secretNameParameter"])
                    value = value_of(spec, comp, item["secretNameParameter"], params, outputs)
                    if not isinstance(value, str) or not value:
                        problems.append(f"{name}: {kind} Secret name ({origin.kind} "
                                        f"{origin.name!r}) resolves to {value!r}; the driver "
                                        "needs a non-empty string")
    return problems


# ----------------------------------------------------------------------------- features


def features_used(spec: dict[str, Any], platform: dict[str, Any] | None) -> dict[str, str]:
    """Feature name -> where the YAML uses it (names as in ``kfp_finetune.drivers.backend``)."""
    used: dict[str, str] = {}
    for label, config in executor_configs(platform).items():
        for key in config:
            used[PLATFORM_FEATURES.get(key, f"unlisted platform setting {key}")] = label
        if any(item.get("optional") for item in config.get("secretAsEnv", [])):
            used["optional Secret as environment variables"] = label
    for label, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor.get("container", {}).get("resources", {})
        if any(PLACEHOLDER.match(str(t)) for t in resource_placeholders(resources).values()):
            used["resource placeholders (accelerator type/count, cpu/memory requests)"] = label
    for _, name, task in _tasks(spec):
        if "retryPolicy" in task:
            used["retries"] = name
        if task.get("triggerPolicy", {}).get("strategy") == EXIT_STRATEGY:
            used["exit handler as an Argo exit lifecycle hook"] = name
        for source in task.get("inputs", {}).get("parameters", {}).values():
            if "taskFinalStatus" in source:
                used["PipelineTaskFinalStatus input of an exit task"] = name
            constant = source.get("runtimeValue", {}).get("constant")
            if constant in ("{{$.pipeline_job_uuid}}", "{{$.pipeline_job_name}}"):
                used["{{$.pipeline_job_uuid}} and {{$.pipeline_job_name}}"] = name
    return used


def unlisted_features(spec: dict[str, Any], platform: dict[str, Any] | None) -> list[str]:
    """Features the YAML uses that ``kfp_finetune.drivers.backend.FEATURES`` does not list."""
    listed = {f.name for f in FEATURES}
    return [f"{name} (in {where})" for name, where in features_used(spec, platform).items()
            if name not in listed]
