"""The fine-tune step: render the torchtune config, run ``tune run``, resume after a lost pod.

A GPU hour must never be wasted:

* a re-run of a finished run (same inputs: rendered config, and the content of every dataset
  and model file) does not train again, provided its checkpoint is still whole on the volume;
* a retry after a lost pod resumes from the last epoch checkpoint and recipe state on the
  volume (``resume_from_checkpoint``) instead of starting over;
* anything else on the volume (other inputs, a checkpoint that does not load) is cleared and
  training starts from the base model; a folder there that kfp-finetune did not write is
  refused, never deleted;
* a config that would take no optimizer step on the data is refused before ``tune run``, and
  a run that logged no step is never marked finished.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kfp_finetune.config.runtimes import RuntimeSpec, get_runtime
from kfp_finetune.config.splits import check_eval_split
from kfp_finetune.config.tracking import TrackingConfig
from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.errors import (
    DatasetError,
    KfpFinetuneError,
    ModelError,
    TrainingError,
    WorkspaceError,
)
from kfp_finetune.steps import tracking_run as tracked
from kfp_finetune.steps.completion import (
    RUN_FILE,  # noqa: F401 - the name callers import from this module
    changed_inputs,
    check_steps,
    checkpoint_problem,
    inputs_fingerprint,
    prepare_output,
    record_run,
    resumable_epochs,  # noqa: F401 - public before it moved to completion.py
)
from kfp_finetune.steps.gpu_defaults import detect_gpu_memory_gib
from kfp_finetune.steps.gpus import check_gpus_visible
from kfp_finetune.steps.held_out import HeldOut, prepare_held_out
from kfp_finetune.steps.tokenize_dataset import pretokenized_conf
from kfp_finetune.steps.training_log import losses, read_metrics
from kfp_finetune.steps.tune_config import (
    RecipeChoice,
    ResolvedConfig,
    config_fingerprint,
    prepare_run,
    prepare_training,  # noqa: F401 - the name callers import from this module
    resolve,
)
from kfp_finetune.storage.workspace import (
    Workspace,
    check_free_space,
    free_bytes,
    read_manifest,
    tree_bytes,
    workspace_lock,
)

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
        metrics: final/best loss, steps, trainable tokens/s, peak memory; with an
            ``eval_split``, also the held-out ``eval_loss``/``eval_perplexity`` of the
            fine-tuned model and ``eval_loss_base``/``eval_perplexity_base`` of the base model.
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


def run_fine_tune(
    workspace: str | Path,
    runtime_name: str,
    config: TorchTuneConfig,
    log: Any = _print,
    tracking: TrackingConfig | None = None,
    *,
    eval_split: str | None = None,
) -> TrainSummary:
    """Render the torchtune config, run ``tune run`` and stream its log.

    Args:
        workspace: Workspace root.
        runtime_name: RuntimeSpec name.
        config: The training config.
        log: Where progress lines (and torchtune's log) go.
        tracking: MLflow / W&B settings (None: no tracking); see ``steps/tracking_run.py``.
        eval_split: Held-out split expression (e.g. ``train[95%:]``, disjoint from the
            training split); its loss is measured for the base model before training and for
            the fine-tuned model after it. None: ``config.eval_split``; "": none.

    Returns:
        Where the checkpoint is, the loss per step and the run's figures.

    Raises:
        ConfigError: ``eval_split`` is not a split expression or overlaps the training split.
        WorkspaceError: Another fine-tune step works on this workspace (its lock is held), a
            step's output is missing, or the volume is (or becomes) too full for the
            checkpoints.
        DatasetError: ``max_seq_len`` cuts every sampled row before its response.
        TrainingError: The pod sees fewer GPUs than asked, or ``tune run`` failed or wrote
            no complete checkpoint.
        ConfigError: Tracking is on but its client package is not installed.
    """
    runtime = get_runtime(runtime_name)
    # The GPU-memory defaults (activation checkpointing, optimizer offload) need the card.
    resolved = resolve(runtime, config, gpu_memory_gib=detect_gpu_memory_gib())
    preprocess = config.dataset_preprocess_config or TorchTuneInstructDataset()
    eval_split = check_eval_split(preprocess.split,
                                  config.eval_split if eval_split is None else eval_split)
    check_gpus_visible(resolved.gpus)
    tracked.check_tracking(tracking)
    ws = Workspace.at(workspace)
    with workspace_lock(ws.root, "the fine-tune step", LOCK_FILE):
        with tracked.training(tracking, ws, runtime.name, resolved.to_dict(), log) as done:
            done.append(_run_locked(ws, runtime, resolved, preprocess, log, tracking,
                                    eval_split))
    return done[0]


def _run_locked(
    ws: Workspace,
    runtime: RuntimeSpec,
    resolved: ResolvedConfig,
    preprocess: TorchTuneInstructDataset,
    log: Any,
    tracking: TrackingConfig | None = None,
    eval_split: str | None = None,
) -> TrainSummary:
    """The fine-tune step while it holds the workspace's fine-tune lock."""
    from omegaconf import OmegaConf

    choice, conf, plan = prepare_run(ws, runtime, resolved, preprocess)
    fingerprint, inputs = inputs_fingerprint(ws, config_fingerprint(conf))
    held = (prepare_held_out(ws, conf, plan, preprocess, eval_split, inputs, log,
                             resolved.gpu_memory_gib) if eval_split else None)
    out = ws.checkpoints_dir
    config_path = out / CONFIG_FILE
    finished = _finished_run(out, fingerprint, inputs, choice, log)
    if finished is not None:
        return _with_eval(finished, held)
    check_steps(plan.rows, conf, choice.nproc)  # before anything on the volume is cleared
    resume_from = prepare_output(out, fingerprint, inputs, resolved, conf, log)
    # The fingerprint above is of torchtune's own dataset section: the store holds the very
    # same tensors, so a run resumes whichever of the two feeds it.
    pretokenized = pretokenized_conf(ws, conf, log)
    if pretokenized is None:
        check_samples_fit(conf, log)
    else:  # the tokenize step checked every row already
        conf["dataset"] = pretokenized
    weights = _weight_bytes(ws, conf)
    check_free_space(
        out, weights * (resolved.epochs - resume_from),
        f"the checkpoints of {resolved.epochs - resume_from} epoch(s) (at least one model-sized "
        "checkpoint per epoch)",
    )
    if tracking is not None:  # after the fingerprint: where a run is tracked is no input
        conf["metric_logger"] = tracked.metric_logger_conf(out, tracking, tracked.step_params(
            ws, runtime.name, resolved.to_dict(), choice.recipe, choice.config))
    if held is not None:
        held.base()  # before `tune run`: the base model's held-out loss
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
    final, rows, metrics = record_run(out, conf, plan.rows, choice, seconds,
                                      {"fingerprint": fingerprint, "inputs": inputs,
                                    "resolved": resolved.to_dict(),
                                    "resumed_from_epoch": resume_from})
    log(f"[fine-tune] done in {seconds:.1f} s; checkpoint {final}")
    return _with_eval(TrainSummary(str(final), str(config_path), choice.recipe, choice.config,
                                   losses(rows), round(seconds, 3), False, resume_from, metrics),
                      held)


def _with_eval(summary: TrainSummary, held: HeldOut | None) -> TrainSummary:
    """The summary with the held-out Metrics added (unchanged without an eval split)."""
    if held is None:
        return summary
    return replace(summary, metrics={**summary.metrics,
                                     **held.metrics(Path(summary.checkpoint_dir))})


def _finished_run(
    out: Path, fingerprint: str, inputs: dict[str, str], choice: RecipeChoice, log: Any
) -> TrainSummary | None:
    """The finished run of these inputs when it is still whole on the volume, else None."""
    done = read_manifest(out)
    if done is None:
        return None
    if done.get("fingerprint") != fingerprint:
        log(f"[fine-tune] {out} holds a run of other inputs (changed: "
            f"{changed_inputs(done, inputs)}); training again.")
        return None
    problem = checkpoint_problem(out, done)
    if problem is not None:
        log(f"[fine-tune] the finished run in {out} cannot be used: {problem}; training again.")
        return None
    log(f"[fine-tune] {out} already holds the finished run of these inputs (config, data and "
        "model content); not training again.")
    return TrainSummary(str(out / done["final_epoch_dir"]), str(out / CONFIG_FILE), choice.recipe,
                        choice.config, read_metrics(out / "logs"), 0.0, True,
                        done.get("resumed_from_epoch", 0), done.get("metrics", {}))


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
