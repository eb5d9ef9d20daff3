"""Copying a finished export to its ``push_to`` destination (the upload side of storage).

``push_to`` is parsed by :func:`kfp_finetune.storage.uris.parse_destination` (the sources'
grammar); each scheme's module uploads (``storage.hf``, ``storage.s3``), beside its download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfp_finetune.errors import ConfigError
from kfp_finetune.storage import hf, s3
from kfp_finetune.storage.base import Log
from kfp_finetune.storage.credentials import hf_secret_command, hf_token
from kfp_finetune.storage.uris import Destination, parse_destination


def _print(message: str) -> None:
    print(message, flush=True)


def check_destination(push_to: str) -> Destination | None:
    """Parse ``push_to`` and check that the credentials it needs are in the environment.

    Raises:
        ConfigError: The value is malformed or its credentials are missing.
    """
    dest = parse_destination(push_to)
    if dest is not None and dest.scheme == "hf" and not hf_token():
        raise ConfigError(
            f"push_to={dest.raw!r} needs a Hugging Face token with write access: create the "
            f"Secret (`{hf_secret_command()}`) and name it in secret_hf_token (locally: "
            "export HF_TOKEN)."
        )
    return dest


def push(
    folder: Path, push_to: str, run_id: str, log: Log = _print, client: Any = None
) -> list[str]:
    """Copy a finished export to ``push_to`` (see :func:`parse_destination`).

    Args:
        folder: The export folder (with its manifest).
        push_to: Destination, or "" for none.
        run_id: The run's id (S3: refuses a prefix that holds another run's model).
        log: Where progress lines go.
        client: An ``HfApi`` or boto3 S3 client to use instead of a new one.

    Returns:
        Where copies now are (empty when ``push_to`` is "").
    """
    dest = check_destination(push_to)
    if dest is None:
        return []
    if dest.scheme == "hf":
        return [hf.upload_export(folder, dest, run_id, log, client)]
    return [s3.upload_export(folder, dest, run_id, log, client)]
