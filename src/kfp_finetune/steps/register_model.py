"""Register an exported model with the Kubeflow Model Registry (optional step).

Uses the registry's own Python client (``model-registry``, ``model_registry.ModelRegistry``):
one registered model (``registry_model_name``, default ``<base model>-finetuned``), one version
per export (``registry_version``, default the export folder's name, which carries the run id),
and one model artifact whose URI is where the model can be fetched from
(:func:`kfp_finetune.steps.serving_manifest.model_uri`: the push destination, else
``pvc://<workspace volume>/output/<export>``), format ``huggingface`` version ``1`` (the format
KServe's Hugging Face runtime serves). The version's custom properties carry the base model,
dataset, run id, training fingerprint, final loss, any evaluation metrics and the
hyperparameters (``hyperparameters.<name>``); the artifact names the run as its source
(``model_source_kind=pipelines``, ``model_source_class=pipelinerun``, as the registry's
``docs/logical_model.md`` shows for Kubeflow pipeline runs).

Re-running is safe: a version of that name that holds the same model (same training
fingerprint) is reused, and completed if an interrupted registration left it without its
artifact; a version of that name holding a different model is refused, never overwritten.

The token comes from the environment (``MODEL_REGISTRY_TOKEN``, set from a Kubernetes Secret),
never from a parameter; without it the client falls back to the pod's service-account token.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

from kfp_finetune.errors import ConfigError, SourceError
from kfp_finetune.steps.serving_manifest import model_uri, run_namespace
from kfp_finetune.storage.workspace import WORKSPACE_MOUNT

Log = Callable[[str], None]

TOKEN_ENV = "MODEL_REGISTRY_TOKEN"
CA_ENV = "MODEL_REGISTRY_CA"  # path of a CA bundle for an https registry (optional)
DEFAULT_TOKEN_SECRET = "model-registry-token"
MODEL_FORMAT, MODEL_FORMAT_VERSION = "huggingface", "1"
_EVAL_KEY = re.compile(r"(base_)?eval_\w+")
_RECORDED = ("run_id", "fingerprint", "base_model", "base_model_revision", "dataset", "runtime",
             "recipe", "config", "format", "lora", "final_loss", "exported_at", "path",
             "adapter_path")


@dataclass(frozen=True)
class Registration:
    """What the registry now holds for this export.

    Attributes:
        name: Registered model name.
        version: Model version name.
        uri: The model artifact's URI.
        model_id: Registered model id.
        version_id: Model version id.
        already: True when this version was registered before (nothing new was written
            except, for an interrupted registration, the missing artifact).
    """

    name: str
    version: str
    uri: str
    model_id: str
    version_id: str
    already: bool


def _scalar(value: Any) -> bool | int | float | str | None:
    """A custom property value (the client's ``SupportedTypes``), or None to leave it out."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def registry_properties(metadata: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The version's custom properties from the export's metadata.

    The recorded keys (base model, dataset, run id, fingerprint, final loss, ...), every
    ``eval_*``/``base_eval_*`` metric, and each hyperparameter as ``hyperparameters.<name>``;
    unset and non-finite values are left out, lists and dicts become JSON.
    """
    props: dict[str, Any] = {k: metadata.get(k) for k in _RECORDED}
    props.update({k: v for k, v in metadata.items() if _EVAL_KEY.fullmatch(str(k))})
    for key, value in (metadata.get("hyperparameters") or {}).items():
        props[f"hyperparameters.{key}"] = value
    return {k: v for k, v in ((k, _scalar(v)) for k, v in props.items()) if v is not None}


def default_names(metadata: Mapping[str, Any], name: str, version: str) -> tuple[str, str]:
    """Registered model and version names: the given ones, else derived from the export."""
    if not name:
        base = str(metadata.get("base_model") or "model").split("@")[0].rstrip("/")
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", base.split("/")[-1]).strip("-.") or "model"
        name = f"{name}-finetuned"
    version = version or PurePosixPath(str(metadata.get("path") or "")).name or str(
        metadata.get("run_id") or "")
    if not version.strip():
        raise ConfigError("registry_version is empty and the export names no folder or run id;"
                          " pass registry_version.")
    return name, version


def check_server(url: str) -> str:
    """Check ``registry_url``: ``http(s)://host[:port]`` (https needs a token).

    Raises:
        ConfigError: It is not such a URL, or embeds credentials.
    """
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path.strip("/"):
        raise ConfigError(
            f"registry_url={url!r} is not a Model Registry address; write http(s)://host[:port],"
            " e.g. https://model-registry-service.kubeflow.svc.cluster.local:8443 (no path)."
        )
    if parsed.username or parsed.password:
        raise ConfigError("registry_url embeds credentials; put the token in the Secret named "
                          f"by registry_token_secret (key {TOKEN_ENV}) instead.")
    return url.strip().rstrip("/")


def _runner(timeout_s: float) -> Callable[[Any], Any]:
    """The client's ``async_runner``: each call on a fresh loop, bounded by ``timeout_s``."""

    def run(coro: Any) -> Any:
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        bounded = asyncio.wait_for(coro, timeout_s)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(bounded)
        # Called from a running loop (a notebook): run on a loop of its own, in a thread.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, bounded).result()

    return run


def _failure(exc: BaseException, url: str, timeout_s: float) -> ConfigError | SourceError:
    import asyncio

    from aiohttp import ClientError
    from model_registry.exceptions import StoreError
    from mr_openapi.exceptions import ApiException

    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return SourceError(f"the Model Registry at {url} did not answer within {timeout_s:g} s;"
                           " check registry_url and that the registry is up, then retry.")
    if isinstance(exc, ApiException):
        status = getattr(exc, "status", None)
        if status in (401, 403):
            return ConfigError(
                f"the Model Registry at {url} refused the request (HTTP {status}); put a token "
                f"with access in the Secret named by registry_token_secret (key {TOKEN_ENV}).")
        if status == 404:
            return SourceError(
                f"the Model Registry at {url} answered HTTP 404 to {api_prefix()}: it does not "
                "serve the API this client speaks; check registry_url (the REST port, e.g. "
                "8080 or 8443), and that the registry's release matches the model-registry "
                "client (0.3.14 and older speak v1alpha3, 0.3.15 and newer v1).")
        return SourceError(f"the Model Registry at {url} answered HTTP {status} "
                           f"({getattr(exc, 'reason', '')}); the registration was not completed;"
                           " retry (a re-run resumes it).")
    if isinstance(exc, ClientError):
        return SourceError(f"cannot reach the Model Registry at {url} ({type(exc).__name__}); "
                           "check registry_url and the network policy, then retry.")
    if isinstance(exc, StoreError):
        return ConfigError(f"the Model Registry client refused: {exc}; for an https registry "
                           f"put a token in the Secret named by registry_token_secret (key "
                           f"{TOKEN_ENV}) or run where the pod's service-account token is.")
    raise exc



def api_prefix() -> str:
    """The REST prefix the installed client calls, e.g. ``/api/model_registry/v1alpha3``."""
    import inspect

    from mr_openapi.api.model_registry_service_api import ModelRegistryServiceApi

    found = re.search(r"/api/model_registry/v\w+",
                      inspect.getsource(ModelRegistryServiceApi._get_registered_models_serialize))
    return found.group(0) if found else "/api/model_registry"


def connect(url: str, author: str, timeout_s: float = 60.0) -> Any:
    """A ``ModelRegistry`` client for ``url`` (token from ``MODEL_REGISTRY_TOKEN``).

    Raises:
        ConfigError: Bad URL, or refused credentials.
        SourceError: The registry cannot be reached or does not answer in time.
    """
    url = check_server(url)
    try:
        import model_registry  # noqa: F401 - present? (lazily: only this step needs it)
    except ImportError:
        raise ConfigError("the model-registry package is not installed; "
                          "pip install model-registry (the CPU image has it).") from None
    token = os.environ.get(TOKEN_ENV, "").strip() or None
    parsed = urlparse(url)
    secure = parsed.scheme == "https"
    try:
        with warnings.catch_warnings():
            # Its "User access token is missing" is expected for a plain-HTTP registry.
            warnings.simplefilter("ignore" if not secure else "default", UserWarning)
            return _client(url, secure, parsed.port, author, token, timeout_s)
    except Exception as exc:  # noqa: BLE001 - mapped to one clear error, or re-raised
        raise _failure(exc, url, timeout_s) from None


def _client(url: str, secure: bool, port: int | None, author: str, token: str | None,
            timeout_s: float) -> Any:
    import logging

    from model_registry import ModelRegistry

    # Port and TLS given explicitly (older clients default to 443 and TLS whatever the
    # scheme); the client probes the server at once (a one-item list of models).
    return ModelRegistry(url, port or (443 if secure else 80), author=author,
                         is_secure=secure, user_token=token, custom_ca_envvar=CA_ENV,
                         log_level=logging.ERROR, async_runner=_runner(timeout_s))


def register_model(
    metadata: Mapping[str, Any],
    url: str,
    *,
    name: str = "",
    version: str = "",
    author: str = "kfp-finetune",
    pvc_name: str = "",
    workspace_root: str = WORKSPACE_MOUNT,
    namespace: str = "",
    timeout_s: float = 60.0,
    client: Any = None,
    log: Log = print,
) -> Registration:
    """Register the exported model (see the module docstring).

    Args:
        metadata: The export's metadata (ExportSummary.metadata plus ``destinations``).
        url: The registry's REST address, ``http(s)://host[:port]``.
        name: Registered model name ("" for ``<base model>-finetuned``).
        version: Version name ("" for the export folder's name).
        author: Author and owner recorded.
        pvc_name: The workspace volume holding the export ("" outside a cluster).
        workspace_root: Where that volume was mounted in the export's pod.
        namespace: The run's namespace (the artifact's source group; "" for the pod's).
        timeout_s: Longest wait for any one registry call.
        client: A ``ModelRegistry`` to use (None: :func:`connect`).
        log: Where progress lines go.

    Raises:
        ConfigError: Bad settings, refused credentials, or the version holds another model.
        SourceError: The registry cannot be reached, times out or fails.
    """
    name, version = default_names(metadata, name, version)
    uri = model_uri(metadata, pvc_name, workspace_root, allow_local=True)
    props = registry_properties(metadata)
    run_id = str(metadata.get("run_id") or "")
    namespace = namespace or run_namespace()
    artifact = dict(
        model_format_name=MODEL_FORMAT, model_format_version=MODEL_FORMAT_VERSION,
        model_source_kind="pipelines", model_source_class="pipelinerun",
        model_source_group=namespace or None, model_source_id=run_id or None,
        model_source_name="/".join(p for p in (namespace, run_id) if p) or None,
    )
    mr = client or connect(url, author, timeout_s)
    try:
        done = _existing(mr, name, version, props, uri, artifact, log)
        if done is None:
            mr.register_model(
                name, uri, version=version, author=author, owner=author, metadata=props,
                version_description=_description(metadata), **artifact)
            log(f"[register] registered {name} version {version} -> {uri}")
        mv = mr.get_model_version(name, version)
        rm = mr.get_registered_model(name)
    except (ConfigError, SourceError):
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to one clear error, or re-raised
        raise _failure(exc, url, timeout_s) from None
    return Registration(name, version, uri, str(rm.id), str(mv.id), done is not None)


def _description(metadata: Mapping[str, Any]) -> str:
    return (f"{metadata.get('base_model')} fine-tuned on {metadata.get('dataset')} with "
            f"torchtune {metadata.get('recipe')} (KFP run {metadata.get('run_id')})")


def _existing(mr: Any, name: str, version: str, props: Mapping[str, Any], uri: str,
              artifact: Mapping[str, Any], log: Log) -> Any:
    """The version already registered for this model, or None to register it now.

    Raises:
        ConfigError: The version exists and holds a different model.
    """
    if mr.get_registered_model(name) is None:
        return None
    mv = mr.get_model_version(name, version)
    if mv is None:
        return None
    held = mv.custom_properties or {}
    key = "fingerprint" if props.get("fingerprint") else "run_id"
    if held.get(key) != props.get(key):
        raise ConfigError(
            f"Model Registry: {name} version {version} already holds another model (run "
            f"{held.get('run_id')!r}, {key} {held.get(key)!r}); versions are never "
            "overwritten: set registry_version to a new name, or leave it empty."
        )
    if mr.get_model_artifact(name, version) is None:
        # An interrupted registration (version written, artifact not): finish it with the
        # client's own last step of register_model (ModelRegistry._register_model_artifact).
        mr.async_runner(mr._register_model_artifact(mv, name, uri, **artifact))
        log(f"[register] completed {name} version {version}: its model artifact was missing")
    else:
        log(f"[register] {name} version {version} is already registered for this model")
    return mv
