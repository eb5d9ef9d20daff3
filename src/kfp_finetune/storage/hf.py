"""The Hugging Face Hub backend (``hf://org/repo[@revision][/path]``).

Uses the real ``huggingface_hub`` client: one ``repo_info`` call resolves the revision to a
commit, the tree listing gives the files, and ``hf_hub_download(local_dir=...)`` fetches each
file at that commit (a file already finished in the staging folder costs no request; a cut
transfer is resumed with an HTTP Range request by the client). The endpoint is read from
``HF_ENDPOINT`` at call time and the token from ``HF_TOKEN``; neither is ever printed.
:func:`upload_export` is the upload side: the export step's ``push_to=hf://...``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kfp_finetune.errors import SourceError
from kfp_finetune.storage.base import (
    Listing,
    Log,
    RemoteFile,
    TransientError,
)
from kfp_finetune.storage.credentials import DEFAULT_HF_SECRET, hf_secret_command, hf_token, redact
from kfp_finetune.storage.network import network_problem, network_timeout
from kfp_finetune.storage.uris import Destination, StorageUri
from kfp_finetune.storage.workspace import disk_error

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def hf_endpoint() -> str | None:
    """The Hub endpoint from ``HF_ENDPOINT`` (read now, not at import), or None for the default.

    Every Hub client of the project (the initializers, the export's push) asks this first, so
    it also bounds this process's Hub requests (:func:`use_bounded_timeouts`).
    """
    use_bounded_timeouts()
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def _bounded_client() -> Any:
    """huggingface_hub's default client, with a timeout on every request.

    Its own client has none, and its API calls pass ``timeout=None`` per request (``repo_info``
    in hf_api.py: ``get_session().get(path, ..., timeout=timeout)``), which overrides a client
    default; so the transport fills in the limit wherever a request carries none.
    """
    import httpx2
    from huggingface_hub.utils._http import hf_request_event_hook

    limit = network_timeout()
    bounds = {"connect": min(limit, 10.0), "read": limit, "write": limit, "pool": limit}

    class BoundedTransport(httpx2.HTTPTransport):
        def handle_request(self, request: Any) -> Any:
            given = dict(request.extensions.get("timeout") or {})
            request.extensions["timeout"] = {
                k: v if given.get(k) is None else given[k] for k, v in bounds.items()
            }
            return super().handle_request(request)

    return httpx2.Client(
        event_hooks={"request": [hf_request_event_hook]},
        follow_redirects=True,
        timeout=httpx2.Timeout(limit, connect=bounds["connect"]),
        transport=BoundedTransport(),
    )


def use_bounded_timeouts() -> None:
    """Make every Hub request of this process time out.

    huggingface_hub's shared client has no timeout, so API calls such as ``repo_info`` wait
    forever on a server that accepts the connection and never answers.
    """
    from huggingface_hub.utils import _http

    if _http._GLOBAL_CLIENT_FACTORY is _http.default_client_factory \
            or getattr(_http._GLOBAL_CLIENT_FACTORY, "_kfp_finetune_limit", None) \
            != network_timeout():
        factory = _bounded_client
        factory._kfp_finetune_limit = network_timeout()  # type: ignore[attr-defined]
        _http.set_client_factory(factory)


class HfBackend:
    """Files of one Hugging Face repository (a model, or a dataset's file or folder)."""

    def __init__(self, uri: StorageUri, kind: str, log: Log) -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # one line per file in the task log instead of tqdm bars
        self.uri = uri
        self.kind = kind
        self.log = log
        self.repo_type = "dataset" if kind == "dataset" else "model"
        self.endpoint = hf_endpoint()  # also bounds every request with a timeout
        self.token = hf_token()
        self.api = HfApi(endpoint=self.endpoint, token=self.token or None)

    # -- errors ---------------------------------------------------------------------------
    def _translate(self, exc: BaseException) -> BaseException:
        """Our error (or TransientError) for an exception of the client."""
        import httpx2
        from huggingface_hub.errors import (
            DisabledRepoError,
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = self.uri.describe()
        secret = (
            f"create the Secret named by the pipeline parameter secret_hf_token (default "
            f"{DEFAULT_HF_SECRET!r}, key HF_TOKEN): `{hf_secret_command()}`; locally: "
            "export HF_TOKEN=<token>"
        )
        token_state = (
            "the HF_TOKEN given has no access to it" if self.token else "no HF_TOKEN was set"
        )
        if isinstance(exc, GatedRepoError):
            return SourceError(
                f"{where!r} is a gated repository (HTTP {_status(exc)}) and {token_state}. "
                f"Accept its licence on the repository page with your account, then {secret}."
            )
        if isinstance(exc, RevisionNotFoundError):
            return SourceError(
                f"{where!r}: revision {self.uri.revision!r} does not exist in "
                f"{self.repo_type} repository {self.uri.repo_id!r} (HTTP 404); use a branch, "
                "tag or commit of the repository."
            )
        if isinstance(exc, EntryNotFoundError):
            return SourceError(
                f"{where!r}: path {self.uri.path or '(file)'!r} does not exist in "
                f"{self.repo_type} repository {self.uri.repo_id!r} (HTTP 404); check the path "
                "on the repository's 'Files' tab."
            )
        if isinstance(exc, DisabledRepoError):
            return SourceError(f"{where!r}: the repository {self.uri.repo_id!r} is disabled.")
        if isinstance(exc, RepositoryNotFoundError):
            kind_hint = (
                " (is it a model? dataset URIs name dataset repositories)"
                if self.kind == "dataset" else ""
            )
            return SourceError(
                f"{where!r}: {self.repo_type} repository {self.uri.repo_id!r} was not found "
                f"(HTTP {_status(exc)}){kind_hint}; check the name. If it is private, "
                f"{token_state}: {secret}."
            )
        if isinstance(exc, HfHubHTTPError):
            status = _status(exc)
            if status in (401, 403):
                return SourceError(
                    f"{where!r}: access denied (HTTP {status}) and {token_state}; {secret}."
                )
            if status in _RETRY_STATUS or status is None:
                return TransientError(f"HTTP {status} from the Hub")
            return SourceError(f"{where!r}: the Hub answered HTTP {status}; {redact(exc)}")
        if disk_error(exc, ".", where) is not None:
            # A full or read-only volume is not worth retrying: raised as it is, and
            # storage.fetch turns it into a WorkspaceError that names the folder.
            return exc
        if isinstance(exc, (httpx2.TransportError, LocalEntryNotFoundError)):
            problem = network_problem(exc)
            if problem is not None:
                return TransientError(f"{problem} from {self.endpoint or 'the Hub'}")
            return TransientError(f"{type(exc).__name__}: {redact(exc).splitlines()[0]}")
        if isinstance(exc, OSError):
            # e.g. "Consistency check failed": the transfer was cut short.
            return TransientError(f"{type(exc).__name__}: {redact(exc).splitlines()[0]}")
        return exc

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from None

    # -- backend API ----------------------------------------------------------------------
    def version(self) -> str:
        """The commit the revision points at (one metadata request; none for a commit hash)."""
        from huggingface_hub.file_download import REGEX_COMMIT_HASH

        rev = self.uri.revision
        if rev and REGEX_COMMIT_HASH.fullmatch(rev):
            return rev
        info = self._call(
            self.api.repo_info, self.uri.repo_id, repo_type=self.repo_type, revision=rev
        )
        return str(info.sha)

    def listing(self) -> Listing:
        """The files under the URI's path at the resolved commit."""
        from huggingface_hub import RepoFile

        sha = self.version()
        path = self.uri.path
        entries: list[Any]
        if path:
            infos = self._call(
                self.api.get_paths_info, self.uri.repo_id, [path], repo_type=self.repo_type,
                revision=sha,
            )
            if not infos:
                raise SourceError(
                    f"{self.uri.describe()!r}: path {path!r} does not exist in {self.repo_type} "
                    f"repository {self.uri.repo_id!r} at revision "
                    f"{self.uri.revision or 'main'!r} (HTTP 404); check the path on the "
                    "repository's 'Files' tab."
                )
            if isinstance(infos[0], RepoFile):
                entries = list(infos)
            else:
                entries = list(self._call(
                    lambda: list(self.api.list_repo_tree(
                        self.uri.repo_id, path_in_repo=path, recursive=True,
                        repo_type=self.repo_type, revision=sha,
                    ))
                ))
        else:
            entries = self._call(
                lambda: list(self.api.list_repo_tree(
                    self.uri.repo_id, recursive=True, repo_type=self.repo_type, revision=sha
                ))
            )
        files = [
            RemoteFile(e.path, int(e.size) if e.size is not None else None, e.path,
                       getattr(e, "blob_id", None))
            for e in entries if isinstance(e, RepoFile)
        ]
        return Listing(version=sha, files=files, revision=sha)

    def download(self, listing: Listing, item: RemoteFile, dest: Path) -> bool:
        """Download one file at the listing's commit into ``dest`` (skipped when finished)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub._local_folder import read_download_metadata

        meta = read_download_metadata(dest, item.ref)
        if (
            (dest / item.path).is_file()
            and meta is not None
            and meta.commit_hash == listing.version
        ):
            return False
        self._call(
            hf_hub_download,
            self.uri.repo_id,
            filename=item.ref,
            repo_type=self.repo_type,
            revision=listing.version,
            local_dir=str(dest),
            endpoint=self.endpoint,
            token=self.token or None,
        )
        return True


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def upload_export(
    folder: Path, dest: Destination, run_id: str, log: Log, api: Any = None
) -> str:
    """Upload a finished export folder to a (private) model repository, on ``dest``'s branch.

    Args:
        folder: The export folder; hidden files (the manifest) stay behind.
        dest: An ``hf://`` destination.
        run_id: The run's id (in the commit message).
        log: Where progress lines go.
        api: An ``HfApi`` to use instead of a new one (tests).

    Returns:
        ``hf://org/repo@<commit>`` (``hf://org/repo`` when the Hub names no commit).

    Raises:
        SourceError: The Hub refused (the message names the HTTP status, never the token).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if api is None:
        api = HfApi(endpoint=hf_endpoint(), token=hf_token())  # the initializers' Hub
    try:
        api.create_repo(repo_id=dest.target, repo_type="model", private=True, exist_ok=True)
        if dest.prefix:
            api.create_branch(repo_id=dest.target, branch=dest.prefix, exist_ok=True)
        info = api.upload_folder(
            repo_id=dest.target,
            repo_type="model",
            folder_path=str(folder),
            revision=dest.prefix or None,
            commit_message=f"kfp-finetune: fine-tuned model of run {run_id}",
            ignore_patterns=[".*", "**/.*"],
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise SourceError(
            f"pushing to {dest.raw!r} failed (HTTP {status}); check that the token in the "
            "Secret has write access to that repository or organisation, then retry."
        ) from None
    commit = getattr(info, "oid", None) or ""
    log(f"[export] pushed to {dest.raw} (commit {commit[:12] or '?'})")
    return f"hf://{dest.target}@{commit}" if commit else f"hf://{dest.target}"
