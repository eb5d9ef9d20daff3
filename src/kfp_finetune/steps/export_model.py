"""The export step: the fine-tuned model as a Hugging Face folder users can serve.

Layout of one export (``/workspace/output/<name>``, the seed's location)::

    config.json  generation_config.json  tokenizer.json  tokenizer_config.json  ...
    model-00001-of-0000N.safetensors ... model.safetensors.index.json
    torchtune_config.yaml              the full config the run trained with
    README.md                          the model card (front matter, hyperparameters, usage)
    adapter/                           LoRA runs only: the PEFT adapter
        adapter_config.json  adapter_model.safetensors
    .kfp-finetune.json                 completion manifest (the metadata), written last

For LoRA runs the top folder holds the *merged* model (base + adapter), which transformers and
vLLM load like any other checkpoint; ``adapter/`` holds the adapter alone, for
``peft.PeftModel.from_pretrained(base, "<export>/adapter")`` or ``vllm serve --lora-modules``.

Runs never overwrite each other's models. The default name, ``<base model>-finetuned-<run>``,
carries the run id (the KFP run's UUID; locally a timestamp), so every run exports to a folder
of its own; an explicit ``export_name`` that already holds a different model is refused, and
so is an S3 destination that does. A re-run whose model (training fingerprint: config, data and
base model content) is already exported, under the given name or, for the default name, under
any name, finds that export and does nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp_finetune.errors import ConfigError, ModelError, SourceError, WorkspaceError
from kfp_finetune.steps.completion import check_trained_on_workspace, export_matches
from kfp_finetune.steps.export_metadata import adapter_config, export_metadata, load_config
from kfp_finetune.steps.model_card import ADAPTER_DIR, carry_chat_template, render_card
from kfp_finetune.steps.tracking_run import record_export
from kfp_finetune.storage.credentials import hf_secret_command, hf_token
from kfp_finetune.storage.uris import redact_uri
from kfp_finetune.storage.workspace import (
    MANIFEST,
    Workspace,
    check_free_space,
    disk_errors,
    install,
    list_files,
    read_manifest,
    require_complete,
    staged,
)

Log = Callable[[str], None]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
INDEX_FILE = "model.safetensors.index.json"
# torchtune writes these next to the HF files; they are not part of a Hugging Face model.
_SKIP_SUFFIXES = (".pt", ".pth", ".bin")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HF_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_S3_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class ExportSummary:
    """Result of the export step.

    Attributes:
        path: Folder of the exported (merged) model.
        adapter_path: Folder of the PEFT adapter (LoRA runs), else None.
        files: Number of files exported.
        bytes: Their total size.
        metadata: Everything the KFP Model artifact records (also the folder's manifest).
        skipped: True when this run's export was already complete.
        destinations: Where copies were pushed (``hf://...``, ``s3://...``).
    """

    path: str
    adapter_path: str | None
    files: int
    bytes: int
    metadata: dict[str, Any]
    skipped: bool = False
    destinations: list[str] = field(default_factory=list)

    @property
    def exported_elsewhere(self) -> bool:
        """Whether a copy of the model exists outside the workspace volume."""
        return bool(self.destinations)


# --------------------------------------------------------------------------- names and paths


def check_export_name(name: str) -> str:
    """Check that an export name is a plain folder name ("" means the default).

    Raises:
        WorkspaceError: It is not.
    """
    if name and (not _NAME_RE.fullmatch(name) or name == "checkpoints"):
        raise WorkspaceError(
            f"export_name={name!r} is not a plain folder name; use letters, digits, '.', '-' "
            "and '_' (and not 'checkpoints')."
        )
    return name


def new_run_id() -> str:
    """Return a run id for runs outside KFP: UTC time plus a random suffix (sortable, unique)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def run_tag(run_id: str) -> str:
    """Return the short form of a run id used in folder names.

    A KFP run UUID gives its first 8 hex digits; a local id (``20250101-120000-ab12cd``) is
    kept whole.

    Raises:
        ConfigError: The run id has no usable characters.
    """
    text = run_id.strip()
    if re.fullmatch(r"[0-9a-fA-F]{8}-[0-9a-fA-F-]{27}", text):
        return text[:8].lower()
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:40]
    if not tag:
        raise ConfigError(
            f"run_id={run_id!r} has no letters or digits; pass the KFP run id "
            "(dsl.PIPELINE_JOB_ID_PLACEHOLDER) or leave it empty for a generated one."
        )
    return tag


def _base_name(ws: Workspace) -> str:
    base = require_complete(ws.model_dir, "model-initializer")
    source = str(base["source"]).split("@")[0].rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source.split("/")[-1]).strip("-.") or "model"
    return name[:80]


def export_folder_name(ws: Workspace, name: str, run_id: str) -> str:
    """Folder name under ``output/``: ``name``, or ``<base model>-finetuned-<run tag>``."""
    if check_export_name(name):
        return name
    return f"{_base_name(ws)}-finetuned-{run_tag(run_id)}"


def export_path(ws: Workspace, name: str, run_id: str) -> Path:
    """Folder of the export of run ``run_id`` (see :func:`export_folder_name`)."""
    return ws.output_dir / export_folder_name(ws, name, run_id)


def list_exports(ws: Workspace) -> list[dict[str, Any]]:
    """Manifests of the finished exports under ``output/``, oldest first."""
    found = []
    if ws.output_dir.is_dir():
        for folder in ws.output_dir.iterdir():
            manifest = read_manifest(folder) if folder.is_dir() else None
            if manifest is not None and manifest.get("kind") == "export":
                # The manifest is written last, so its mtime is when the export completed.
                found.append(((folder / MANIFEST).stat().st_mtime_ns, manifest))
    return [m for _, m in sorted(found, key=lambda item: item[0])]


def latest_export(ws: Workspace, name: str = "") -> Path:
    """Folder of the most recent finished export (of ``name`` when given).

    Raises:
        WorkspaceError: There is none.
    """
    if check_export_name(name):
        folder = ws.output_dir / name
        if read_manifest(folder) is not None:
            return folder
    else:
        exports = list_exports(ws)
        if exports:
            return Path(exports[-1]["path"])
    raise WorkspaceError(
        f"no finished export{f' named {name!r}' if name else ''} in {str(ws.output_dir)!r}; "
        "run the export step first."
    )


# --------------------------------------------------------------------------- destinations


@dataclass(frozen=True)
class Destination:
    """A parsed ``push_to`` value.

    Attributes:
        scheme: ``hf`` or ``s3``.
        target: ``org/repo`` (hf) or ``bucket`` (s3).
        prefix: Key prefix inside the bucket (s3), or the branch (hf, "" for main).
        raw: The value as given.
    """

    scheme: str
    target: str
    prefix: str
    raw: str


def parse_destination(push_to: str) -> Destination | None:
    """Parse ``push_to``: "" (none), ``hf://org/repo[@branch]`` or ``s3://bucket[/prefix]``.

    Raises:
        ConfigError: The value is neither.
    """
    text = push_to.strip()
    if not text:
        return None
    if redact_uri(text) != text:
        raise ConfigError(
            f"push_to={redact_uri(text)!r} embeds credentials; never put secrets in a URI. "
            "Store them in the Kubernetes Secret named by hf_token_secret (HF_TOKEN) or "
            "s3_secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and remove them from push_to."
        )
    if text.startswith("hf://"):
        repo, _, branch = text[len("hf://"):].rstrip("/").partition("@")
        if _HF_REPO_RE.fullmatch(repo) and (not branch or _NAME_RE.fullmatch(branch)):
            return Destination("hf", repo, branch, text)
        raise ConfigError(
            f"push_to={push_to!r} is not a Hugging Face model repository; write "
            "hf://<org>/<repo> (optionally hf://<org>/<repo>@<branch>)."
        )
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://"):].partition("/")
        prefix = prefix.strip("/")
        if _S3_BUCKET_RE.fullmatch(bucket) and ".." not in prefix.split("/"):
            return Destination("s3", bucket, prefix, text)
        raise ConfigError(
            f"push_to={push_to!r} is not an S3 location; write s3://<bucket>[/<prefix>] "
            "(bucket names are 3-63 lowercase letters, digits, '.' or '-')."
        )
    raise ConfigError(
        f"push_to={push_to!r}: unsupported destination; use hf://<org>/<repo>, "
        "s3://<bucket>[/<prefix>], or leave it empty to keep the model on the workspace volume."
    )


def check_destination(push_to: str) -> Destination | None:
    """Parse ``push_to`` and check that the credentials it needs are in the environment.

    Raises:
        ConfigError: The value is malformed or its credentials are missing.
    """
    dest = parse_destination(push_to)
    if dest is not None and dest.scheme == "hf" and not hf_token():
        raise ConfigError(
            f"push_to={dest.raw!r} needs a Hugging Face token with write access: create the "
            f"Secret (`{hf_secret_command()}`) and name it in hf_token_secret (locally: "
            "export HF_TOKEN)."
        )
    return dest


def _push_hf(folder: Path, dest: Destination, run_id: str, log: Log, api: Any = None) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if api is None:
        from kfp_finetune.storage.hf import hf_endpoint  # the same Hub as the initializers

        api = HfApi(endpoint=hf_endpoint(), token=hf_token())
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


def _push_s3(
    folder: Path, dest: Destination, run_id: str, log: Log, client: Any = None
) -> str:
    from botocore.exceptions import BotoCoreError, ClientError

    if client is None:
        from kfp_finetune.storage.s3 import s3_client  # the same client as the initializers

        client = s3_client()
    prefix = "/".join(p for p in (dest.prefix, folder.name) if p)
    location = f"s3://{dest.target}/{prefix}"
    manifest_key = f"{prefix}/{MANIFEST}"
    try:
        try:
            existing = json.loads(client.get_object(Bucket=dest.target, Key=manifest_key)
                                  ["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                raise
            existing = None
        if existing is not None:
            ours = read_manifest(folder) or {}
            if existing.get("run_id") == run_id or (
                    ours.get("fingerprint") and existing.get("fingerprint") == ours["fingerprint"]):
                log(f"[export] {location} already holds this run's model; not uploading again.")
                return location
            raise WorkspaceError(
                f"{location} already holds a different model (run {existing.get('run_id')!r});"
                " exports never overwrite each other: leave export_name empty (every run gets "
                "its own folder) or choose another push_to prefix."
            )
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and not any(p.startswith(".") for p in rel.parts):
                client.upload_file(str(path), dest.target, f"{prefix}/{rel.as_posix()}")
        # The manifest goes last: an object prefix without it is an unfinished upload.
        client.upload_file(str(folder / MANIFEST), dest.target, manifest_key)
    except (BotoCoreError, ClientError) as exc:
        raise SourceError(
            f"uploading to {location} failed ({type(exc).__name__}); check the bucket, the "
            "endpoint (AWS_ENDPOINT_URL) and the credentials in the S3 Secret, then retry."
        ) from None
    log(f"[export] uploaded to {location}")
    return location


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
        return [_push_hf(folder, dest, run_id, log, client)]
    return [_push_s3(folder, dest, run_id, log, client)]


# --------------------------------------------------------------------------- HF folder checks


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(size))


def _tensor_bytes(info: dict[str, Any]) -> int:
    start, end = info["data_offsets"]
    return int(end) - int(start)


def ensure_index(folder: Path) -> dict[str, Any]:
    """Check the safetensors shards of ``folder`` and write their index if it is missing.

    Raises:
        ModelError: No shards, or the index names a missing file or misses a shard.
    """
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise ModelError(
            f"{str(folder)!r} has no .safetensors weights; the fine-tune step must save with "
            "torchtune's FullModelHFCheckpointer (safe_serialization=True)."
        )
    index_path = folder / INDEX_FILE
    if index_path.exists():
        index = json.loads(index_path.read_text())
        named = set(index.get("weight_map", {}).values())
        missing = sorted(named - set(shards))
        unlisted = sorted(set(shards) - named)
        if missing or unlisted:
            raise ModelError(
                f"{str(index_path)!r} does not match the shards (missing files {missing}, "
                f"unlisted shards {unlisted}); the checkpoint is incomplete: re-run fine-tune."
            )
        return index
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        for key, info in _safetensors_header(folder / shard).items():
            if key != "__metadata__":
                weight_map[key] = shard
                total += _tensor_bytes(info)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return index


def ensure_generation_config(folder: Path) -> None:
    """Write ``generation_config.json`` from ``config.json`` when the checkpoint has none.

    Raises:
        ModelError: ``config.json`` is missing or has no ``model_type``.
    """
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if not config.get("model_type"):
        raise ModelError(
            f"{str(folder)!r} has no valid config.json with a model_type, so transformers "
            "cannot load it; the base model folder must contain the Hugging Face config.json."
        )
    gen = folder / "generation_config.json"
    if not gen.exists():
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        gen.write_text(json.dumps({k: config[k] for k in keys if k in config}, indent=2) + "\n")


# --------------------------------------------------------------------------- the step


def _existing_export(
    ws: Workspace, final: Path, name: str, run_id: str, fingerprint: str
) -> dict[str, Any] | None:
    """The manifest of a whole export of this model to reuse, or None to export now.

    The export at ``final`` is reused when it holds the same model (training fingerprint);
    with the default name, so is any finished export of the same model.

    Raises:
        WorkspaceError: ``final`` holds a different model of another run, or something
            this step did not write.
    """
    done = read_manifest(final)
    if export_matches(final, done, fingerprint):
        return done
    if final.exists() and (done is None or done.get("run_id") != run_id) and not (
            done is not None and done.get("fingerprint") == fingerprint):
        owner = (f"a different model (run {done.get('run_id')!r})" if done
                 else "something not exported by this step")
        raise WorkspaceError(
            f"{str(final)!r} already holds {owner}; an export never overwrites another: leave "
            "export_name empty (every run gets its own folder), choose another name, or move "
            "that folder away."
        )
    if not name and not final.exists():
        for manifest in reversed(list_exports(ws)):
            path = ws.output_dir / Path(str(manifest.get("path", ""))).name
            if export_matches(path, manifest, fingerprint):
                return manifest
    return None


def export_model(
    workspace: str | Path,
    runtime_name: str,
    name: str = "",
    run_id: str = "",
    push_to: str = "",
    log: Log = _print,
    client: Any = None,
    tracking: Any = None,
) -> ExportSummary:
    """Write the final checkpoint to ``<workspace>/output/<name>`` as a Hugging Face folder.

    Args:
        workspace: Workspace root.
        runtime_name: Runtime name (recorded in the metadata).
        name: Folder name under ``output/``; "" for ``<base model>-finetuned-<run tag>``.
        run_id: Id of this run (the KFP run UUID); "" for a new local one.
        push_to: Also copy the model there: ``hf://org/repo`` or ``s3://bucket/prefix``.
        log: Where progress lines go.
        client: An ``HfApi`` or S3 client for ``push_to`` (tests); None for a real one.
        tracking: A ``TrackingConfig``: record the model's location in the tracked run.

    Returns:
        Where the model is, and its metadata.

    Raises:
        WorkspaceError: A step's output is missing, or ``name`` holds another run's model.
        ModelError: The checkpoint is not a complete Hugging Face model.
        ConfigError: ``push_to`` is malformed or lacks credentials.
    """
    from kfp_finetune.config.runtimes import get_runtime

    runtime = get_runtime(runtime_name)
    check_export_name(name)
    check_destination(push_to)  # before any copying: a bad destination fails fast
    run_id = run_id.strip() or new_run_id()
    ws = Workspace.at(workspace)
    trained = require_complete(ws.checkpoints_dir, "fine-tune")
    base = require_complete(ws.model_dir, "model-initializer")
    dataset = require_complete(ws.dataset_dir, "dataset-initializer")
    check_trained_on_workspace(ws, trained)  # checkpoint whole, inputs as trained
    final = export_path(ws, name, run_id)
    src = ws.checkpoints_dir / trained["final_epoch_dir"]

    done = _existing_export(ws, final, name, run_id, trained["fingerprint"])
    if done is not None:
        final = ws.output_dir / Path(str(done.get("path") or final)).name
        log(f"[export] {final} already holds this model (training fingerprint "
            f"{trained['fingerprint']}); not copying again.")
        destinations = push(final, push_to, run_id, log, client)
        record_export(tracking, ws.checkpoints_dir, str(final), destinations, log)
        return ExportSummary(str(final), done.get("adapter_path"), len(done["files"]),
                             sum(f["bytes"] for f in done["files"]), done, True, destinations)

    adapter = all((src / f).is_file() for f in ADAPTER_FILES)
    needed = sum(p.stat().st_size for p in src.rglob("*")
                 if p.is_file() and p.suffix not in _SKIP_SUFFIXES)
    check_free_space(ws.output_dir, needed, f"the export of {src.name} to {final.name}")
    with disk_errors(final, "exporting the model"), staged(ws, f"export-{final.name}") as staging:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if (not path.is_file() or any(p.startswith(".") for p in rel.parts)
                    or rel.suffix in _SKIP_SUFFIXES):
                continue
            target = staging / (ADAPTER_DIR if rel.name in ADAPTER_FILES else "") / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            # torchtune writes weights 0600; a serving pod of another user must read them.
            target.chmod(0o644)
        ensure_index(staging)
        ensure_generation_config(staging)
        carry_chat_template(ws.model_dir, staging)
        if adapter:
            adapter_config(staging / ADAPTER_DIR / "adapter_config.json", base, ws.model_dir)
        config_yaml = ws.checkpoints_dir / "torchtune_config.yaml"
        if config_yaml.is_file():
            shutil.copy2(config_yaml, staging / "torchtune_config.yaml")
        conf = load_config(config_yaml)
        metadata = export_metadata(trained, base, dataset, conf, runtime.name, run_id, final,
                                   adapter)
        (staging / "README.md").write_text(render_card(metadata, conf, staging, ws.model_dir))
        files = list_files(staging)
        metadata["files"] = files
        install(staging, final, metadata)
    total = sum(f["bytes"] for f in files)
    log(f"[export] fine-tuned model: {final} ({len(files)} files, {total} bytes)"
        + (f"; PEFT adapter: {final / ADAPTER_DIR}" if adapter else ""))
    destinations = push(final, push_to, run_id, log, client)
    record_export(tracking, ws.checkpoints_dir, str(final), destinations, log)
    return ExportSummary(str(final), metadata["adapter_path"], len(files), total, metadata,
                         False, destinations)
