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

import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp_finetune.errors import ConfigError, WorkspaceError
from kfp_finetune.steps.completion import check_trained_on_workspace, export_matches
from kfp_finetune.steps.export_metadata import adapter_config, export_metadata, load_config
from kfp_finetune.steps.hf_folder import ensure_generation_config, ensure_index
from kfp_finetune.steps.model_card import ADAPTER_DIR, carry_chat_template, render_card
from kfp_finetune.steps.tracking_run import record_export
from kfp_finetune.storage.upload import check_destination, push
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
# torchtune writes these next to the HF files; they are not part of a Hugging Face model.
_SKIP_SUFFIXES = (".pt", ".pth", ".bin")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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
        SourceError: The copy to ``push_to`` failed.
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
    done = _existing_export(ws, final, name, run_id, trained["fingerprint"])
    if done is not None:
        final = ws.output_dir / Path(str(done.get("path") or final)).name
        log(f"[export] {final} already holds this model (training fingerprint "
            f"{trained['fingerprint']}); not copying again.")
        destinations = push(final, push_to, run_id, log, client)
        record_export(tracking, ws.checkpoints_dir, str(final), destinations, log)
        return ExportSummary(str(final), done.get("adapter_path"), len(done["files"]),
                             sum(f["bytes"] for f in done["files"]), done, True, destinations)

    metadata = _write_export(ws, final, trained, base, dataset, runtime.name, run_id)
    files = metadata["files"]
    total = sum(f["bytes"] for f in files)
    log(f"[export] fine-tuned model: {final} ({len(files)} files, {total} bytes)"
        + (f"; PEFT adapter: {metadata['adapter_path']}" if metadata["adapter_path"] else ""))
    destinations = push(final, push_to, run_id, log, client)
    record_export(tracking, ws.checkpoints_dir, str(final), destinations, log)
    return ExportSummary(str(final), metadata["adapter_path"], len(files), total, metadata,
                         False, destinations)


def _copy_checkpoint(src: Path, staging: Path) -> None:
    """Copy the Hugging Face files of ``src`` into ``staging`` (the adapter's to ``adapter/``)."""
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


def _write_export(
    ws: Workspace,
    final: Path,
    trained: dict[str, Any],
    base: dict[str, Any],
    dataset: dict[str, Any],
    runtime_name: str,
    run_id: str,
) -> dict[str, Any]:
    """Stage the export of the final checkpoint, install it at ``final``; its metadata.

    The metadata (with the list of files) is also the folder's manifest, written last.

    Raises:
        WorkspaceError: The volume is too small or failed while writing.
        ModelError: The checkpoint is not a complete Hugging Face model.
    """
    src = ws.checkpoints_dir / trained["final_epoch_dir"]
    adapter = all((src / f).is_file() for f in ADAPTER_FILES)
    needed = sum(p.stat().st_size for p in src.rglob("*")
                 if p.is_file() and p.suffix not in _SKIP_SUFFIXES)
    check_free_space(ws.output_dir, needed, f"the export of {src.name} to {final.name}")
    with disk_errors(final, "exporting the model"), staged(ws, f"export-{final.name}") as staging:
        _copy_checkpoint(src, staging)
        ensure_index(staging)
        ensure_generation_config(staging)
        carry_chat_template(ws.model_dir, staging)
        if adapter:
            adapter_config(staging / ADAPTER_DIR / "adapter_config.json", base, ws.model_dir)
        config_yaml = ws.checkpoints_dir / "torchtune_config.yaml"
        if config_yaml.is_file():
            shutil.copy2(config_yaml, staging / "torchtune_config.yaml")
        conf = load_config(config_yaml)
        metadata = export_metadata(trained, base, dataset, conf, runtime_name, run_id, final,
                                   adapter)
        (staging / "README.md").write_text(render_card(metadata, conf, staging, ws.model_dir))
        metadata["files"] = list_files(staging)
        install(staging, final, metadata)
    return metadata
