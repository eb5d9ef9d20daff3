"""Credentials: where tokens and keys come from, how to store them, and keeping them out of text.

Tokens never travel as pipeline parameters (KFP stores and shows those). On a cluster they reach
the initializer tasks as environment variables filled from Kubernetes Secrets; locally they are
read from the same environment variables:

* ``HF_TOKEN``: Hugging Face token, Secret named by the pipeline parameter ``secret_hf_token``
  (default ``hf-token``, key ``HF_TOKEN``).
* ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and optionally ``AWS_SESSION_TOKEN``,
  ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``): S3 or MinIO, Secret named by the pipeline
  parameter ``secret_s3`` (default ``s3-credentials``).
* ``MLFLOW_TRACKING_TOKEN`` (or ``MLFLOW_TRACKING_USERNAME`` + ``MLFLOW_TRACKING_PASSWORD``),
  ``WANDB_API_KEY``: experiment trackers, from the tracking Secret
  (:mod:`kfp_finetune.config.tracking`).

Every message this project builds from a third-party exception goes through :func:`redact`.
"""

from __future__ import annotations

import os
import re
import shlex
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kfp_finetune.errors import ConfigError

HF_TOKEN_ENV = "HF_TOKEN"
DEFAULT_HF_SECRET = "hf-token"
S3_SECRET_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
DEFAULT_S3_SECRET = "s3-credentials"
# Environment variables whose values must never appear in logs, messages or files.
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "WANDB_API_KEY",
)
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# Query-string parameters that carry a credential: presigned S3 (SigV4 and the older V2),
# Google Cloud Storage signed URLs, Azure SAS and generic API-key parameters.
_QUERY_SECRETS = (
    "x-amz-credential", "x-amz-signature", "x-amz-security-token", "awsaccesskeyid",
    "signature", "x-goog-credential", "x-goog-signature", "sig", "token", "access_token",
    "api_key", "apikey", "password", "secret", "client_secret", "key",
)
_PATTERNS = (
    (re.compile(r"hf_[A-Za-z0-9]{8,}"), "hf_***"),
    (re.compile(r"(?i)(bearer\s+)[^\s'\"]+"), r"\1***"),
    (re.compile(r"(?i)(basic\s+)[A-Za-z0-9+/=]{6,}"), r"\1***"),
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?!bearer\b|basic\b)"
                r"[^'\"\s,}]+"), r"\1***"),
    (re.compile(r"(?i)([?&;]|\b)((?:" + "|".join(re.escape(k) for k in _QUERY_SECRETS)
                + r")=)[^&\s'\"#]+"), r"\1\2***"),
    (re.compile(r"(?i)(credential=)[^&\s'\"/]+"), r"\1***"),
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{12,}\b"), "***"),
)
# ``user:password@`` in any URI, and ``user@`` (a key or token as user name). In hf://, ``@``
# normally follows a repository name (``hf://org/repo@rev``); ``hf://org@rev`` is a misplaced
# revision, so there only a token-shaped user part (30+ characters; ``hf_...`` is caught by
# its own pattern) counts as a credential. Quotes end a match, so the patterns also work
# inside free text (the repr of a URI).
USERINFO = re.compile(r"//[^/@\s'\"]*:[^/@\s'\"]*@")
USER_ONLY = re.compile(
    r"(?<!hf:)//[^/@\s:'\"]+@|(?<=hf:)//(?:hf_[^/@\s:'\"]*|[^/@\s:'\"]{30,})@")


def hf_token() -> str | None:
    """The Hugging Face token from the environment (``HF_TOKEN``), or None."""
    value = os.environ.get(HF_TOKEN_ENV) or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return value.strip() or None if value else None


def redact_uri(text: str) -> str:
    """``text`` with the user info of every URI in it replaced (``***:***@`` or ``***@``)."""
    return USER_ONLY.sub("//***@", USERINFO.sub("//***:***@", text))


def redact(text: Any, extra: tuple[str, ...] = ()) -> str:
    """``text`` with every known secret value and token-like string replaced by ``***``.

    The one redaction function: every message that echoes user input (a URI, a host, an
    override) or quotes a third-party error goes through it. It hides the values of the
    secret environment variables, tokens in any position (``hf_...``, ``Bearer ...``,
    ``Authorization: ...``, AWS key ids), credential-bearing query parameters (presigned S3
    and GCS URLs, SAS tokens) and the user info of URIs (``scheme://user:password@``).

    Args:
        text: Any object; it is turned into text first.
        extra: Further secret values to hide (e.g. an ``access_token`` argument).

    Returns:
        The redacted text.
    """
    out = str(text)
    values = [os.environ.get(name, "") for name in SECRET_ENV] + list(extra)
    for value in sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True):
        out = out.replace(value, "***")
    for pattern, repl in _PATTERNS:
        out = pattern.sub(repl, out)
    return redact_uri(out)


def check_secret_name(name: str, parameter: str = "secret_hf_token") -> str:
    """Check that ``name`` is a valid Kubernetes Secret name.

    Raises:
        ConfigError: It is not (lowercase letters, digits, '-' and '.', at most 253 characters).
    """
    if not isinstance(name, str) or not _SECRET_NAME.match(name):
        raise ConfigError(
            f"{parameter}={name!r} is not a valid Kubernetes Secret name; use lowercase "
            "letters, digits, '-' and '.', starting and ending with a letter or digit "
            f"(e.g. {DEFAULT_HF_SECRET!r})."
        )
    return name


def hf_secret_command(secret_name: str = DEFAULT_HF_SECRET, namespace: str | None = None) -> str:
    """The ``kubectl`` command that stores the token in ``$HF_TOKEN`` as the Secret.

    The token itself is read from the shell variable, so it is neither printed here nor kept
    in the shell history.
    """
    check_secret_name(secret_name)
    ns = f" -n {shlex.quote(namespace)}" if namespace else ""
    return (
        f"kubectl create secret generic {secret_name}{ns} "
        f'--from-literal={HF_TOKEN_ENV}="$HF_TOKEN"'
    )


def s3_secret_command(secret_name: str = DEFAULT_S3_SECRET, namespace: str | None = None) -> str:
    """The ``kubectl`` command that stores S3 keys (from shell variables) as the Secret."""
    check_secret_name(secret_name, "secret_s3")
    ns = f" -n {shlex.quote(namespace)}" if namespace else ""
    literals = " ".join(
        f'--from-literal={key}="${key}"'
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                    "AWS_DEFAULT_REGION")
    )
    return f"kubectl create secret generic {secret_name}{ns} {literals}"


def access_token_guidance(
    owner: str = "HuggingFaceModelInitializer",
    secret_name: str = DEFAULT_HF_SECRET,
    namespace: str | None = None,
) -> str:
    """What to do instead of passing ``access_token`` to a pipeline (the token is not shown).

    Args:
        owner: The class that received the token, named in the message.
        secret_name: The Secret the pipeline reads (its ``secret_hf_token`` parameter).
        namespace: The Kubeflow namespace, when known.

    Returns:
        The guidance text.
    """
    return (
        f"{owner}(access_token=...) is not sent to the pipeline: pipeline parameters are stored "
        "and shown in the KFP UI. Store the token once as a Kubernetes Secret instead — "
        f"`export HF_TOKEN=<token>; {hf_secret_command(secret_name, namespace)}` (or "
        "kfp_finetune.storage.credentials.create_token_secret(token, "
        f"{secret_name!r}, namespace)) — and run the pipeline with "
        f"secret_hf_token={secret_name!r}. Local runs read HF_TOKEN from the environment."
    )


def warn_access_token(
    token: str | None,
    owner: str = "HuggingFaceModelInitializer",
    secret_name: str = DEFAULT_HF_SECRET,
    namespace: str | None = None,
) -> str | None:
    """Warn (``UserWarning``) that ``token`` will not be sent, and say how to store it.

    Returns:
        The guidance, or None when no token was given.
    """
    if not token:
        return None
    message = access_token_guidance(owner, secret_name, namespace)
    warnings.warn(message, UserWarning, stacklevel=2)
    return message


@contextmanager
def token_env(token: str | None) -> Iterator[None]:
    """Expose ``token`` as ``HF_TOKEN`` to this process and its children for a local run.

    The previous value is restored afterwards. Nothing is written to disk.
    """
    if not token:
        yield
        return
    old = os.environ.get(HF_TOKEN_ENV)
    os.environ[HF_TOKEN_ENV] = token
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(HF_TOKEN_ENV, None)
        else:
            os.environ[HF_TOKEN_ENV] = old


def create_token_secret(
    token: str,
    secret_name: str = DEFAULT_HF_SECRET,
    namespace: str = "kubeflow",
    key: str = HF_TOKEN_ENV,
    *,
    replace: bool = False,
    core_api: Any = None,
) -> str:
    """Create (or with ``replace``, update) the Secret that holds the token.

    Args:
        token: The token; sent only to the Kubernetes API server.
        secret_name: Secret name (the pipeline's ``secret_hf_token`` parameter).
        namespace: Namespace the pipeline runs in.
        key: Key in the Secret (``HF_TOKEN``).
        replace: Overwrite an existing Secret of that name.
        core_api: A ``kubernetes.client.CoreV1Api``; by default one from the kube config.

    Returns:
        The Secret's name.

    Raises:
        ConfigError: The name is invalid, the Secret exists (and ``replace`` is False), or the
            API call failed; the message never contains the token.
    """
    check_secret_name(secret_name)
    if not token:
        raise ConfigError("create_token_secret needs a non-empty token.")
    from kubernetes import client, config

    if core_api is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        core_api = client.CoreV1Api()
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=secret_name, labels={"app": "kfp-finetune"}),
        string_data={key: token},
        type="Opaque",
    )
    try:
        core_api.create_namespaced_secret(namespace=namespace, body=body)
    except client.ApiException as exc:
        if exc.status == 409 and replace:
            core_api.replace_namespaced_secret(name=secret_name, namespace=namespace, body=body)
        elif exc.status == 409:
            raise ConfigError(
                f"Secret {secret_name!r} already exists in namespace {namespace!r}; pass "
                "replace=True to update it, or use it as it is."
            ) from None
        else:
            raise ConfigError(
                f"creating Secret {secret_name!r} in namespace {namespace!r} failed "
                f"(HTTP {exc.status}: {redact(exc.reason, (token,))}); check your kube "
                "context and rights, or run: " + hf_secret_command(secret_name, namespace)
            ) from None
    return secret_name

