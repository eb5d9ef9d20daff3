"""The fine-tune step's completion record: what a run was trained from, and whether it is whole.

A finished run is trusted only when

* its fingerprint, computed from the *content* of everything that went in (the rendered
  config, every dataset file, every model file: weights, tokenizer, config.json), equals the
  fingerprint of the inputs now on the volume, and
* its final checkpoint is still on the volume: every weight shard present and whole, every
  file with its recorded size.

Also here: the number of optimizer steps a config will take on the data, so that a batch
larger than the data is refused before ``tune run`` instead of "fine-tuning" nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kfp_finetune.errors import KfpFinetuneError, TrainingError, WorkspaceError
from kfp_finetune.steps.model_check import check_safetensors
from kfp_finetune.steps.training_log import read_metric_rows, summarize
from kfp_finetune.storage.content import digest_of, folder_digest, records_intact
from kfp_finetune.storage.ownership import MANIFEST, remove_owned
from kfp_finetune.storage.workspace import Workspace, read_manifest, write_json_atomic

RUN_FILE = ".kfp-finetune-run.json"  # written when training starts: what is being trained


def inputs_fingerprint(ws: Workspace, config_fp: str) -> tuple[str, dict[str, str]]:
    """The fingerprint of a run's inputs, and its parts (config, dataset, model).

    File hashes come from the initializers' manifests where a file's stat is unchanged, so
    this costs one ``stat`` per file on an untouched workspace.
    """
    parts = {
        "config": config_fp,
        "dataset": folder_digest(ws.dataset_dir, read_manifest(ws.dataset_dir)),
        "model": folder_digest(ws.model_dir, read_manifest(ws.model_dir)),
    }
    return digest_of(parts), parts


def changed_inputs(done: dict[str, Any], parts: dict[str, str]) -> str:
    """Which inputs differ from those ``done`` was trained on, for the log."""
    before = done.get("inputs")
    if not isinstance(before, dict):
        return "recorded before content fingerprints"
    return ", ".join(k for k in parts if before.get(k) != parts[k]) or "none"


# --------------------------------------------------------------------------- checkpoints


def epoch_dirs(out: Path) -> list[Path]:
    """The ``epoch_N`` folders of torchtune's output_dir, in epoch order."""
    return sorted(
        (p for p in out.glob("epoch_*") if p.is_dir() and p.name[6:].isdigit()),
        key=lambda p: int(p.name[6:]),
    )


def _whole(path: Path) -> bool:
    """Whether ``path`` is a complete safetensors file (a write cut by a kill is not)."""
    try:
        check_safetensors(path)
    except (KfpFinetuneError, OSError):
        return False
    return True


def shard_names(epoch_dir: Path) -> list[str] | None:
    """Model weight files of an epoch folder in shard order (from its index when it has one).

    Returns None when the index exists but cannot be read.
    """
    index = epoch_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            return None
    return sorted(p.name for p in epoch_dir.glob("*.safetensors")
                  if not p.name.startswith("adapter"))


def checkpoint_complete(epoch_dir: Path) -> bool:
    """Whether every weight shard of the epoch is on disk, whole."""
    names = shard_names(epoch_dir)
    return bool(names) and all(
        (epoch_dir / n).is_file() and _whole(epoch_dir / n) for n in names or ()
    )


def shards(epoch_dir: Path) -> list[str]:
    """Weight files of an epoch folder, relative to its parent, in shard order."""
    return [f"{epoch_dir.name}/{name}" for name in shard_names(epoch_dir) or ()]


def resumable_epochs(out: Path) -> int:
    """Epochs a previous attempt finished and checkpointed with its recipe state, or 0.

    The recipe state must load and the epoch it names must have all its weight shards;
    otherwise the attempt cannot be resumed and 0 is returned.
    """
    state = out / "recipe_state" / "recipe_state.pt"
    if not state.is_file():
        return 0
    try:
        import torch

        epochs_run = int(torch.load(state, map_location="cpu", weights_only=True)["epochs_run"])
    except Exception:  # a state cut short by the kill does not load: start over
        return 0
    epoch_dir = out / f"epoch_{epochs_run - 1}"
    return epochs_run if epochs_run > 0 and checkpoint_complete(epoch_dir) else 0


def checkpoint_files(epoch_dir: Path) -> list[dict[str, Any]]:
    """Relative path and size of every file of an epoch folder (recorded on completion)."""
    return [{"path": p.relative_to(epoch_dir).as_posix(), "bytes": p.stat().st_size}
            for p in sorted(epoch_dir.rglob("*")) if p.is_file()]


def checkpoint_problem(out: Path, done: dict[str, Any]) -> str | None:
    """Why the finished run recorded in ``done`` cannot be used, or None when it is whole."""
    final = out / str(done.get("final_epoch_dir", ""))
    if not done.get("final_epoch_dir") or not final.is_dir():
        return f"its checkpoint folder {str(final)!r} is missing"
    if not checkpoint_complete(final):
        return f"a weight shard of {str(final)!r} is missing or cut short"
    for record in done.get("checkpoint_files") or []:
        path = final / record["path"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            return f"{str(path)!r} is missing or changed size"
    return None


def prepare_output(
    out: Path,
    fingerprint: str,
    inputs: dict[str, str],
    resolved: Any,
    conf: dict[str, Any],
    log: Any,
) -> int:
    """Set ``conf`` up to resume an interrupted attempt of these inputs, or clear ``out``.

    Returns:
        Epochs already done (0: a fresh start in an emptied ``out``).

    Raises:
        WorkspaceError: ``out`` holds something kfp-finetune did not write.
    """
    try:
        started = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        started = None
    resume_from = 0
    if started is not None and started.get("fingerprint") == fingerprint:
        resume_from = resumable_epochs(out)
    if resume_from:
        log(f"[fine-tune] resuming: {resume_from} of {resolved.epochs} epoch(s) are already "
            f"checkpointed in {out}")
        conf["resume_from_checkpoint"] = True
        if resolved.peft is None:
            # Full fine-tuning resumes from the weights saved in output_dir (torchtune looks
            # the files up there); LoRA resumes from the base model plus the saved adapter.
            conf["checkpointer"]["checkpoint_files"] = shards(out / f"epoch_{resume_from - 1}")
        return resume_from
    if out.exists():
        log(f"[fine-tune] clearing unfinished or different earlier output in {out}")
        # Only a folder this step wrote (its manifest or run record) is ever removed.
        remove_owned(out, proofs=(MANIFEST, RUN_FILE))
    out.mkdir(parents=True)
    write_json_atomic(out / RUN_FILE, {"fingerprint": fingerprint, "inputs": inputs,
                                       "resolved": resolved.to_dict()})
    return 0


# --------------------------------------------------------------------------- optimizer steps


def planned_steps(rows: int, conf: dict[str, Any], processes: int) -> int | None:
    """Optimizer steps per epoch that torchtune will take on ``rows`` rows, or None if unknown.

    torchtune's recipes (``recipes/full_finetune_single_device.py``, ``_setup_data`` and
    ``setup``; the LoRA and distributed recipes alike) shard the rows over the processes
    with ``StatefulDistributedSampler`` (drop_last=False: ceil(rows / processes) each),
    batch them with ``DataLoader(drop_last=True)`` and set
    ``_steps_per_epoch = len(dataloader) // gradient_accumulation_steps``, capped by
    ``max_steps_per_epoch``. Packed data has an unknown number of samples: None.
    """
    dataset = conf.get("dataset")
    if not isinstance(dataset, dict) or dataset.get("packed"):
        return None
    batch = int(conf.get("batch_size") or 1)
    accum = int(conf.get("gradient_accumulation_steps") or 1)
    per_process = -(-rows // max(processes, 1))
    steps = (per_process // batch) // accum
    cap = conf.get("max_steps_per_epoch")
    return min(steps, int(cap)) if cap else steps


def check_steps(rows: int, conf: dict[str, Any], processes: int) -> None:
    """Refuse a config that would take no optimizer step on the data.

    Raises:
        TrainingError: Naming batch_size, gradient_accumulation_steps and the rows.
    """
    if planned_steps(rows, conf, processes) != 0:
        return
    batch = int(conf.get("batch_size") or 1)
    accum = int(conf.get("gradient_accumulation_steps") or 1)
    raise TrainingError(no_steps_message(rows, batch, accum, processes))


def no_steps_message(rows: int | None, batch: int, accum: int, processes: int) -> str:
    """The message for a run without any optimizer step."""
    have = f"the dataset has {rows} row(s)" if rows is not None else "the data yields fewer"
    return (
        f"batch_size={batch} with gradient_accumulation_steps={accum} on {processes} "
        f"process(es) needs at least {(batch * accum - 1) * processes + 1} rows for one optimizer "
        f"step, but {have}: torchtune would take no optimizer step and save the base model "
        "unchanged. Lower batch_size or gradient_accumulation_steps, or add data."
    )


# --------------------------------------------------------------------------- export checks


def export_matches(folder: Path, manifest: dict[str, Any] | None, fingerprint: str) -> bool:
    """Whether ``folder`` holds a whole export of the run with training ``fingerprint``."""
    return (
        manifest is not None
        and manifest.get("kind") == "export"
        and manifest.get("fingerprint") == fingerprint
        and isinstance(manifest.get("files"), list)
        and records_intact(folder, manifest["files"])
    )


def check_trained_on_workspace(ws: Workspace, trained: dict[str, Any]) -> None:
    """Refuse to export a checkpoint whose inputs are no longer those in the workspace.

    The export's card and metadata name the workspace's dataset and base model; they must be
    the ones the checkpoint was trained on, and the checkpoint must still be whole.

    Raises:
        WorkspaceError: The dataset or model changed after training, or the checkpoint is
            missing or incomplete; the fix is to re-run the fine-tune step.
    """
    problem = checkpoint_problem(ws.checkpoints_dir, trained)
    inputs = trained.get("inputs")
    if problem is None and isinstance(inputs, dict):
        changed = [kind for kind, folder in (("dataset", ws.dataset_dir), ("model", ws.model_dir))
                   if inputs.get(kind) != folder_digest(folder, read_manifest(folder))]
        if changed:
            problem = (f"the {' and '.join(changed)} in the workspace changed after the "
                       "fine-tune step trained on it")
    if problem is not None:
        raise WorkspaceError(
            f"cannot export the fine-tuned model of {str(ws.checkpoints_dir)!r}: {problem}. "
            "Re-run the fine-tune step (it trains again on the current inputs), then export."
        )


def record_run(out: Path, conf: dict[str, Any], rows_in_data: int, choice: Any, seconds: float,
               record: dict[str, Any]) -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
    """Check what ``tune run`` left and write the completion record (last: the run is done)."""
    epochs = epoch_dirs(out)
    if not epochs or not checkpoint_complete(epochs[-1]):
        raise TrainingError(
            f"torchtune finished but wrote no complete checkpoint under {out}; see the log above."
        )
    final = epochs[-1]
    rows = read_metric_rows(out / "logs")
    if not rows and int(conf.get("log_every_n_steps") or 1) == 1:
        # Every optimizer step is logged, so none logged means none taken: the checkpoint
        # is the base model unchanged, never a "fine-tuned" one.
        raise TrainingError(no_steps_message(
            rows_in_data, int(conf.get("batch_size") or 1),
            int(conf.get("gradient_accumulation_steps") or 1), choice.nproc))
    metrics = summarize(rows, choice.nproc)
    metrics["wall_seconds"] = round(seconds, 3)
    write_json_atomic(out / MANIFEST, {
        **record, "final_epoch_dir": final.name, "checkpoint_files": checkpoint_files(final),
        "recipe": choice.recipe, "config": choice.config, "seconds": round(seconds, 3),
        "final_loss": metrics["final_loss"], "metrics": metrics})
    return final, rows, metrics
