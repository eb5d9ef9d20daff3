"""Bounded network calls for the Hub, S3 and the KFP API.

One timeout for every request, and messages that tell a timeout from a refused connection from
an authentication failure.
"""

from __future__ import annotations

import os
from typing import Any

from kfp_finetune.errors import ConfigError
from kfp_finetune.storage.credentials import redact

DEFAULT_NETWORK_TIMEOUT_S = 60.0


def network_timeout() -> float:
    """Seconds any one network request may wait for an answer (Hub, S3, KFP API).

    From ``KFP_FINETUNE_NETWORK_TIMEOUT_S`` (default 60); a server that accepts the connection
    and never answers costs at most this long per try, and the bounded retries multiply it by
    ``KFP_FINETUNE_DOWNLOAD_ATTEMPTS`` at most.
    """
    try:
        value = float(os.environ.get("KFP_FINETUNE_NETWORK_TIMEOUT_S", DEFAULT_NETWORK_TIMEOUT_S))
    except ValueError:
        return DEFAULT_NETWORK_TIMEOUT_S
    return value if value > 0 else DEFAULT_NETWORK_TIMEOUT_S


def network_problem(exc: BaseException) -> str | None:
    """A short diagnosis of a network error, telling a timeout from a refused connection.

    Returns:
        ``"no answer within N s (timeout)"``, ``"connection refused"``, ... or None when
        ``exc`` is not a network error.
    """
    import socket

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        if isinstance(cur, (TimeoutError, socket.timeout)) or "Timeout" in name:
            return (f"no answer within {network_timeout():g} s (timeout; "
                    "KFP_FINETUNE_NETWORK_TIMEOUT_S sets it)")
        if isinstance(cur, ConnectionRefusedError) or "refused" in str(cur).lower():
            return "connection refused (nothing listens at that address and port)"
        if isinstance(cur, socket.gaierror) or "name or service not known" in str(cur).lower():
            return "the host name does not resolve"
        if isinstance(cur, ConnectionError):
            return f"the connection failed ({name})"
        cur = cur.__cause__ or cur.__context__
    return None


def probe_kfp(host: str, token: str | None, token_env: str = "KFP_TOKEN") -> None:
    """One bounded GET of the KFP API's healthz before ``kfp.Client`` is made.

    A wrong token, a refused connection and a server that never answers each get one line;
    kfp.Client's constructor would retry healthz five times (``Client.get_kfp_healthz``, 5 s
    apart), log a traceback each time, then blame the network.

    Raises:
        ConfigError: The API refused the token, or could not be reached in time.
    """
    import urllib.error
    import urllib.request

    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    shown = redact(host)
    try:
        with urllib.request.urlopen(request, timeout=network_timeout()):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            state = "the token given was refused" if token else "no token was given"
            raise ConfigError(
                f"the KFP API at {shown} answered HTTP {exc.code} ({exc.reason}): "
                f"authentication failed, {state}. Put a valid bearer token in {token_env} or "
                "--token-file (e.g. `kubectl create token <service-account> -n <namespace>`)."
            ) from None
        if exc.code == 404:
            raise ConfigError(
                f"{shown} answered HTTP 404 for the KFP API's healthz; --host is not a KFP API "
                "endpoint (write the KFP UI or API URL, e.g. "
                "https://kubeflow.example.com/pipeline)."
            ) from None
        return  # other answers: kfp.Client reports them
    except (urllib.error.URLError, OSError) as exc:
        problem = network_problem(exc) or f"{type(exc).__name__}: {redact(exc)}"
        raise ConfigError(
            f"cannot reach the KFP API at {shown}: {problem}; check --host, the port-forward "
            "(kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80) or the network."
        ) from None


def bound_kfp_requests(client: Any) -> None:
    """Give every later request of ``client`` a timeout (kfp_server_api sets none)."""
    import urllib3

    limit = network_timeout()
    api_client = getattr(getattr(client, "_run_api", None), "api_client", None)
    pool = getattr(getattr(api_client, "rest_client", None), "pool_manager", None)
    if pool is not None:
        pool.connection_pool_kw["timeout"] = urllib3.Timeout(connect=min(limit, 10.0),
                                                             read=limit)
        pool.clear()
