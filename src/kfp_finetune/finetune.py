"""The fine-tune step: render the torchtune config, run ``tune run``, resume after a lost pod.

A GPU hour must never be wasted:

* a re-run of a finished run (same rendered config) does not train again;
* a retry after a lost pod resumes from the last epoch checkpoint and recipe state on the
  volume (``resume_from_checkpoint``) instead of starting over;
* anything else on the volume (a different config, a checkpoint that does not load) is
  cleared and training starts from the base model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp_finetune.dataset_plan import plan_dataset
from kfp_finetune.errors import (
    DatasetError,
    KfpFinetuneError,
    ModelError,
    TrainingError,
    WorkspaceError,
)
from kfp_finetune.gpu_defaults import detect_gpu_memory_gib
from kfp_finetune.gpus import check_gpus_visible
from kfp_finetune.model_check import check_model, check_safetensors
from kfp_finetune.runtimes import Runtime, get_runtime
from kfp_finetune.training_log import losses, read_metric_rows, read_metrics, summarize
from kfp_finetune.tune_config import (
    RecipeChoice,
    ResolvedConfig,
    config_fingerprint,
    render_config,
    resolve,
)
from kfp_finetune.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.workspace import (
    MANIFEST,
    Workspace,
    check_free_space,
    free_bytes,
    read_manifest,
    require_complete,
    tree_bytes,
    workspace_lock,
    write_json_atomic,
)

RUN_FILE = ".kfp-finetune-run.json"  # written when training starts: what is being trained
LOCK_FILE = ".kfp-finetune-fine-tune.lock"  # held while a fine-tune step works on the volume
_SAMPLE_ROWS = 256  # rows tokenized before `tune run` when max_seq_len truncates samples
_DISK_FULL = ("No space left on device", "Errno 28", "file write failed", "Disk quota exceeded")
CONFIG_FILE = "torchtune_config.yaml"


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class TrainSummary:
    """Result of the fine-tune step.

    Attributes:
        checkpoint_dir: The final epoch's checkpoint folder.
        config_path: The full torchtune config that ran.
        recipe: torchtune recipe.
        config: torchtune base config.
        losses: ``(step, loss)`` per logged step.
        seconds: Wall time of ``tune run`` in this attempt.
        skipped: True when a finished run was found and nothing was trained.
        resumed_from_epoch: Epochs already done when this attempt started (0 = fresh start).
        metrics: final/best loss, steps, trainable tokens/s, peak memory.
    """

    checkpoint_dir: str
    config_path: str
    recipe: str
    config: str
    losses: list[tuple[int, float]]
    seconds: float
    skipped: bool
    resumed_from_epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Loss of the last logged step (NaN when none was logged)."""
        return self.losses[-1][1] if self.losses else float("nan")


def prepare_training(
    ws: Workspace, runtime: Runtime, resolved: ResolvedConfig, preprocess: TorchTuneInstructDataset
) -> tuple[RecipeChoice, dict[str, Any]]:
    """Check the workspace's dataset and model and render the torchtune config."""
    require_complete(ws.dataset_dir, "dataset-initializer")
    require_complete(ws.model_dir, "model-initializer")
    info = check_model(ws.model_dir, runtime)
    plan = plan_dataset(ws.dataset_dir, preprocess, ws.cache_dir / "datasets")
    return render_config(
        runtime,
        resolved,
        model_dir=ws.model_dir,
        model=info,
        dataset=plan,
        output_dir=ws.checkpoints_dir,
        cache_dir=ws.cache_dir / "datasets",
    )


def _epoch_dirs(out: Path) -> list[Path]:
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


def _shard_names(epoch_dir: Path) -> list[str] | None:
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


def _checkpoint_complete(epoch_dir: Path) -> bool:
    """Whether every weight shard of the epoch is on disk, whole."""
    names = _shard_names(epoch_dir)
    return bool(names) and all(
        (epoch_dir / n).is_file() and _whole(epoch_dir / n) for n in names or ()
    )


def _shards(epoch_dir: Path) -> list[str]:
    """Weight files of an epoch folder, relative to its parent, in shard order."""
    return [f"{epoch_dir.name}/{name}" for name in _shard_names(epoch_dir) or ()]


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
    return epochs_run if epochs_run > 0 and _checkpoint_complete(epoch_dir) else 0


def run_fine_tune(
    workspace: str | Path,
    runtime_name: str,
    config: TorchTuneConfig,
    log: Any = _print,
) -> TrainSummary:
    """Render the torchtune config, run ``tune run`` and stream its log.

    Args:
        workspace: Workspace root.
        runtime_name: Runtime name.
        config: The training config.
        log: Where progress lines (and torchtune's log) go.

    Returns:
        Where the checkpoint is, the loss per step and the run's figures.

    Raises:
        WorkspaceError: Another fine-tune step works on this workspace (its lock is held), a
            step's output is missing, or the volume is (or becomes) too full for the
            checkpoints.
        DatasetError: ``max_seq_len`` cuts every sampled row before its response.
        TrainingError: The pod sees fewer GPUs than asked, or ``tune run`` failed or wrote
            no complete checkpoint.
    """
    runtime = get_runtime(runtime_name)
    # The GPU-memory defaults (activation checkpointing, optimizer offload) need the card.
    resolved = resolve(runtime, config, gpu_memory_gib=detect_gpu_memory_gib())
    check_gpus_visible(resolved.gpus)
    ws = Workspace.at(workspace)
    preprocess = config.dataset_preprocess_config or TorchTuneInstructDataset()
    with workspace_lock(ws.root, "the fine-tune step", LOCK_FILE):
        return _run_locked(ws, runtime, resolved, preprocess, log)


def _run_locked(
    ws: Workspace,
    runtime: Runtime,
    resolved: ResolvedConfig,
    preprocess: TorchTuneInstructDataset,
    log: Any,
) -> TrainSummary:
    """The fine-tune step while it holds the workspace's fine-tune lock."""
    from omegaconf import OmegaConf

    choice, conf = prepare_training(ws, runtime, resolved, preprocess)
    fingerprint = config_fingerprint(conf)
    out = ws.checkpoints_dir
    config_path = out / CONFIG_FILE
    done = read_manifest(out)
    if done is not None and done.get("fingerprint") == fingerprint:
        log(f"[fine-tune] {out} already holds the finished run of this config; not training again.")
        return TrainSummary(str(out / done["final_epoch_dir"]), str(config_path), choice.recipe,
                            choice.config, read_metrics(out / "logs"), 0.0, True,
                            done.get("resumed_from_epoch", 0), done.get("metrics", {}))
    started = _read_json(out / RUN_FILE)
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
            conf["checkpointer"]["checkpoint_files"] = _shards(out / f"epoch_{resume_from - 1}")
    else:
        if out.exists():
            log(f"[fine-tune] clearing unfinished or different earlier output in {out}")
            shutil.rmtree(out)
        out.mkdir(parents=True)
        write_json_atomic(out / RUN_FILE, {"fingerprint": fingerprint,
                                           "resolved": resolved.to_dict()})
    check_samples_fit(conf, log)
    weights = _weight_bytes(ws, conf)
    check_free_space(
        out, weights * (resolved.epochs - resume_from),
        f"the checkpoints of {resolved.epochs - resume_from} epoch(s) (at least one model-sized "
        "checkpoint per epoch)",
    )
    OmegaConf.save(OmegaConf.create(conf), config_path)
    cmd = choice.command(config_path)
    log(f"[fine-tune] recipe {choice.recipe}, base config {choice.config}, "
        f"{choice.nproc} process(es) on {choice.device}")
    log(f"[fine-tune] full config: {config_path}")
    log(f"[fine-tune] $ {' '.join(cmd)}")
    start = time.monotonic()
    try:
        _stream(cmd, log)
    except TrainingError as exc:
        full = _disk_full(str(exc), out, weights)
        if full is not None:
            raise full from None
        raise
    seconds = time.monotonic() - start
    epochs = _epoch_dirs(out)
    if not epochs or not _checkpoint_complete(epochs[-1]):
        raise TrainingError(
            f"torchtune finished but wrote no complete checkpoint under {out}; see the log above."
        )
    final = epochs[-1]
    rows = read_metric_rows(out / "logs")
    metrics = summarize(rows, choice.nproc)
    metrics["wall_seconds"] = round(seconds, 3)
    write_json_atomic(
        out / MANIFEST,
        {"fingerprint": fingerprint, "final_epoch_dir": final.name, "recipe": choice.recipe,
         "config": choice.config, "resolved": resolved.to_dict(), "seconds": round(seconds, 3),
         "final_loss": metrics["final_loss"], "resumed_from_epoch": resume_from,
         "metrics": metrics},
    )
    log(f"[fine-tune] done in {seconds:.1f} s; checkpoint {final}")
    return TrainSummary(str(final), str(config_path), choice.recipe, choice.config,
                        losses(rows), round(seconds, 3), False, resume_from, metrics)


def _weight_bytes(ws: Workspace, conf: dict[str, Any]) -> int:
    """Size of the base model's weight files (one checkpoint is at least this big)."""
    files = conf.get("checkpointer", {}).get("checkpoint_files") or []
    return sum(tree_bytes(ws.model_dir / str(f)) for f in files)


def _disk_full(text: str, out: Path, weights: int) -> WorkspaceError | None:
    """A WorkspaceError when `tune run` failed because the volume filled up, else None."""
    try:
        available = free_bytes(out)
    except OSError:
        available = -1
    if not any(marker in text for marker in _DISK_FULL) and not 0 <= available < max(weights, 1):
        return None
    return WorkspaceError(
        f"the workspace volume filled up while torchtune wrote checkpoints to {str(out)!r} "
        f"({available} bytes available; each checkpoint needs about {weights} bytes, plus the "
        "optimizer state). Make the volume larger (pipeline parameter pvc_size; locally: "
        "another --workspace) or lower epochs, then re-run: the unfinished run is not marked "
        "complete and resumes or starts over."
    )


def check_samples_fit(conf: dict[str, Any], log: Any = _print) -> None:
    """Tokenize the first rows as torchtune will, and refuse data that would teach nothing.

    Only when ``max_seq_len`` truncates samples: a row whose prompt alone is longer than
    ``max_seq_len`` (with ``train_on_input=False``) keeps no token in the loss. When every
    sampled row is like that, training would run on nothing (the loss is NaN), so the step
    stops here, before ``tune run``; when some are, it says how many.

    Args:
        conf: The rendered torchtune config.
        log: Where the warning line goes.

    Raises:
        DatasetError: Every sampled row is cut before its response, or torchtune cannot build
            the dataset from the config.
        ModelError: torchtune cannot load the model's tokenizer.
    """
    max_seq_len = (conf.get("tokenizer") or {}).get("max_seq_len")
    if not max_seq_len or not isinstance(conf.get("dataset"), dict):
        return
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    cfg = OmegaConf.create(conf)
    dataset_cfg = OmegaConf.merge(cfg.dataset, {"packed": False})
    try:
        tokenizer = tt_config.instantiate(cfg.tokenizer)
    except Exception as exc:  # noqa: BLE001 - torchtune raises many types; reported below
        raise ModelError(
            f"torchtune could not load the tokenizer of the model folder "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); "
            "re-run the model step, or check that the model's tokenizer files are complete."
        ) from None
    try:
        dataset = tt_config.instantiate(dataset_cfg, tokenizer)
        rows = min(len(dataset), _SAMPLE_ROWS)
        empty = [i for i in range(rows)
                 if all(label == -100 for label in list(dataset[i]["labels"])[1:])]
    except KfpFinetuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - torchtune raises many types; reported below
        raise DatasetError(
            f"torchtune could not build the dataset from the rendered config "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); "
            "check the dataset step's output and column_map."
        ) from None
    if rows and len(empty) == rows:
        raise DatasetError(
            f"max_seq_len={max_seq_len} cuts every one of the first {rows} rows before its "
            "response begins, so no token would count in the loss (the loss would be NaN). "
            "Raise max_seq_len, set train_on_input=True, or shorten the prompts."
        )
    if empty:
        log(f"[fine-tune] warning: max_seq_len={max_seq_len} cuts {len(empty)} of the first "
            f"{rows} rows before their response (rows {empty[:5]}); they teach nothing.")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tune_executable() -> list[str]:
    # Run torchtune's CLI with this interpreter, so the same environment is used everywhere.
    return [sys.executable, "-m", "torchtune._cli.tune"]


def _die_with_parent() -> None:
    # Linux: if this step's process is killed (a lost pod, a fault test), so is `tune run`.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stream(cmd: list[str], log: Any) -> None:
    argv = _tune_executable() + cmd[1:]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    tail: deque[str] = deque(maxlen=15)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1,
        preexec_fn=_die_with_parent,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            log(line)
            tail.append(line)
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if code != 0:
        raise TrainingError(
            f"`tune run` exited with code {code}; last lines:\n" + "\n".join(tail)
        )
