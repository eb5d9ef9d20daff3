"""The S3 backend (``s3://bucket[/prefix-or-key]``): AWS S3, MinIO and other compatible stores.

Settings come from the environment, which a Kubernetes Secret fills on a cluster:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (optionally ``AWS_SESSION_TOKEN``), the
region from ``AWS_REGION`` or ``AWS_DEFAULT_REGION`` (default ``us-east-1``) and a custom
endpoint from ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or ``S3_ENDPOINT_URL`` (MinIO:
path-style addressing is used then). ``s3://bucket/key`` naming one object takes that object;
otherwise every object under ``key/`` is taken, keeping the paths below the prefix.
:func:`upload_export` is the upload side: the export step's ``push_to=s3://...``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from kfp_finetune.errors import SourceError, WorkspaceError
from kfp_finetune.storage.base import (
    Listing,
    Log,
    RemoteFile,
    TransientError,
    digest,
)
from kfp_finetune.storage.credentials import DEFAULT_S3_SECRET, redact, s3_secret_command
from kfp_finetune.storage.network import network_problem, network_timeout
from kfp_finetune.storage.uris import Destination, StorageUri
from kfp_finetune.storage.workspace import MANIFEST, disk_error, read_manifest

_DENIED = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "401",
    "ExpiredToken", "InvalidToken", "AllAccessDisabled",
}
_TRANSIENT = {
    "500", "502", "503", "504", "InternalError", "SlowDown", "ServiceUnavailable",
    "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ThrottlingException",
}


def s3_endpoint() -> str | None:
    """The custom S3 endpoint from the environment, or None for AWS."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment."""
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=min(10.0, network_timeout()),
        read_timeout=network_timeout(),
        max_pool_connections=16,
        s3={"addressing_style": "path"} if endpoint else {},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, config=config
    )


class S3Backend:
    """Objects under one S3 key or prefix."""

    def __init__(self, uri: StorageUri, kind: str, log: Log) -> None:
        self.uri = uri
        self.kind = kind
        self.log = log
        self.client = s3_client()

    def _translate(self, exc: BaseException, key: str | None = None) -> BaseException:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        where = self.uri.describe()
        secret = (
            f"store the keys in the Secret named by the pipeline parameter secret_s3 (default "
            f"{DEFAULT_S3_SECRET!r}): `{s3_secret_command()}`; locally: export "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL"
        )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return SourceError(f"{where!r}: no S3 credentials were found; {secret}.")
        if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError)):
            problem = network_problem(exc) or type(exc).__name__
            return TransientError(f"{problem} at {redact(s3_endpoint() or 'AWS S3')}")
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",):
                return SourceError(
                    f"{where!r}: bucket {self.uri.bucket!r} does not exist at "
                    f"{s3_endpoint() or 'AWS S3'} (HTTP 404); check the bucket name and "
                    "AWS_ENDPOINT_URL."
                )
            if code in ("NoSuchKey", "404"):
                return SourceError(
                    f"{where!r}: object {key or self.uri.path!r} does not exist in bucket "
                    f"{self.uri.bucket!r} (HTTP 404); re-run the step if it was just replaced."
                )
            if code in _DENIED or status in (401, 403):
                return SourceError(
                    f"{where!r}: access denied ({code or status}); {secret}."
                )
            if code in _TRANSIENT or (isinstance(status, int) and status >= 500):
                return TransientError(f"S3 error {code or status}")
            return SourceError(f"{where!r}: S3 error {code or status}: {redact(exc)}")
        if disk_error(exc, ".", where) is not None:
            # A full or read-only volume is not worth retrying: raised as it is, and
            # storage.fetch turns it into a WorkspaceError that names the folder.
            return exc
        if isinstance(exc, OSError):
            return TransientError(f"{type(exc).__name__}: {redact(exc)}")
        return exc

    def _call(self, fn: Any, *args: Any, key: str | None = None, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - translated below
            translated = self._translate(exc, key)
            if translated is exc:
                raise
            raise translated from None

    def _objects(self) -> list[RemoteFile]:
        bucket, key = self.uri.bucket, self.uri.path
        if key:
            from botocore.exceptions import ClientError

            try:
                head = self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code not in ("404", "NoSuchKey", "NotFound"):
                    raise
            else:
                name = PurePosixPath(key).name
                return [RemoteFile(name, int(head["ContentLength"]), key,
                                   str(head.get("ETag", "")).strip('"'))]
        prefix = f"{key}/" if key else ""
        files = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if not rel or rel.endswith("/"):
                    continue  # folder markers
                files.append(RemoteFile(rel, int(obj["Size"]), obj["Key"],
                                        str(obj.get("ETag", "")).strip('"')))
        if not files:
            raise SourceError(
                f"{self.uri.describe()!r}: no object {key!r} and no objects under "
                f"{prefix or '(bucket root)'!r} in bucket {bucket!r} (HTTP 404); check the "
                "prefix (it is case-sensitive)."
            )
        return files

    def version(self) -> str:
        """Digest of the keys, sizes and ETags (a listing: no object content is read)."""
        files = self._call(self._objects)
        return digest((f.ref, f.size, f.etag) for f in files)

    def listing(self) -> Listing:
        """The objects under the URI."""
        files = self._call(self._objects)
        return Listing(digest((f.ref, f.size, f.etag) for f in files), files)

    def download(self, listing: Listing, item: RemoteFile, dest: Path) -> bool:
        """Download one object (to a temporary name, then rename); skip a finished one."""
        from boto3.s3.transfer import TransferConfig

        target = dest / item.path
        stamp = dest / ".cache" / "s3" / f"{item.path}.json"
        want = {"etag": item.etag, "size": item.size}
        if target.is_file() and stamp.is_file():
            try:
                if json.loads(stamp.read_text()) == want:
                    return False
            except ValueError:
                pass
        target.parent.mkdir(parents=True, exist_ok=True)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(f"{PurePosixPath(item.path).name}.part")
        config = TransferConfig(multipart_threshold=64 * 2**20, max_concurrency=4)
        self._call(self.client.download_file, self.uri.bucket, item.ref, str(tmp),
                   Config=config, key=item.ref)
        os.replace(tmp, target)
        stamp.write_text(json.dumps(want))
        return True


def _uploaded_before(
    client: Any, dest: Destination, folder: Path, prefix: str, run_id: str, log: Log
) -> bool:
    """Whether ``prefix`` already holds this model (True) or nothing finished (False).

    Raises:
        WorkspaceError: It holds a different model: exports never overwrite each other.
    """
    from botocore.exceptions import ClientError

    location = f"s3://{dest.target}/{prefix}"
    try:
        existing = json.loads(client.get_object(Bucket=dest.target, Key=f"{prefix}/{MANIFEST}")
                              ["Body"].read())
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
            raise
        return False
    ours = read_manifest(folder) or {}
    if existing.get("run_id") == run_id or (
            ours.get("fingerprint") and existing.get("fingerprint") == ours["fingerprint"]):
        log(f"[export] {location} already holds this run's model; not uploading again.")
        return True
    raise WorkspaceError(
        f"{location} already holds a different model (run {existing.get('run_id')!r});"
        " exports never overwrite each other: leave export_name empty (every run gets "
        "its own folder) or choose another push_to prefix."
    )


def upload_export(
    folder: Path, dest: Destination, run_id: str, log: Log, client: Any = None
) -> str:
    """Upload a finished export folder under ``<prefix>/<folder name>/``, manifest last.

    A prefix that already holds this model (same run, or same training fingerprint) is left
    as it is; one that holds another model is refused.

    Args:
        folder: The export folder (with its manifest).
        dest: An ``s3://`` destination.
        run_id: The run's id.
        log: Where progress lines go.
        client: A boto3 S3 client to use instead of a new one (tests).

    Returns:
        ``s3://bucket/<prefix>/<folder name>``.

    Raises:
        SourceError: The store refused or could not be reached.
        WorkspaceError: The prefix holds a different model.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    if client is None:
        client = s3_client()  # the same client as the initializers
    prefix = "/".join(p for p in (dest.prefix, folder.name) if p)
    location = f"s3://{dest.target}/{prefix}"
    try:
        if _uploaded_before(client, dest, folder, prefix, run_id, log):
            return location
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and not any(p.startswith(".") for p in rel.parts):
                client.upload_file(str(path), dest.target, f"{prefix}/{rel.as_posix()}")
        # The manifest goes last: an object prefix without it is an unfinished upload.
        client.upload_file(str(folder / MANIFEST), dest.target, f"{prefix}/{MANIFEST}")
    except (BotoCoreError, ClientError) as exc:
        raise SourceError(
            f"uploading to {location} failed ({type(exc).__name__}); check the bucket, the "
            "endpoint (AWS_ENDPOINT_URL) and the credentials in the S3 Secret, then retry."
        ) from None
    log(f"[export] uploaded to {location}")
    return location
