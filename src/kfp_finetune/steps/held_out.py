"""The fine-tune step's held-out evaluation: checked before training, measured around it.

``prepare_held_out`` runs before anything is trained or cleared: it reads the held-out split
from the dataset step's files (the same files as the training split), refuses one that selects
nothing or shares a row with the training split, and renders the evaluation config.
``HeldOut.base`` then measures the base model before ``tune run`` and ``HeldOut.metrics`` the
fine-tuned model after it (see ``evaluate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.config.splits import check_disjoint_rows, check_eval_split, parse_split
from kfp_finetune.config.types import TorchTuneInstructDataset
from kfp_finetune.errors import ConfigError, DatasetError
from kfp_finetune.steps.completion import shard_names
from kfp_finetune.steps.dataset_plan import DatasetPlan, plan_dataset
from kfp_finetune.steps.evaluate import EvalResult, Log, eval_conf, eval_metrics, run_evaluation
from kfp_finetune.storage.workspace import Workspace, tree_bytes

EVAL_CACHE = "eval"  # under the workspace's cache folder
_GPU_SHARE = 0.9  # of one card's memory the weights may take (activations, CUDA context)


@dataclass
class HeldOut:
    """What the fine-tune step needs to evaluate on the held-out split.

    Attributes:
        conf: The evaluation config (the rendered config reading ``eval_split``).
        model_dir: The base model folder.
        cache: Cache folder of the results.
        inputs: Content fingerprints of the run's inputs (``config``, ``dataset``, ``model``).
        rows: Held-out rows.
        log: Where progress lines go.
    """

    conf: dict[str, Any]
    model_dir: Path
    cache: Path
    inputs: dict[str, str]
    rows: int
    log: Log
    _base: EvalResult | None = None

    def base(self) -> EvalResult:
        """The base model's held-out loss (cached by model and data content)."""
        if self._base is None:
            files = list(self.conf["checkpointer"]["checkpoint_files"])
            key = {"model": self.inputs["model"], "dataset": self.inputs["dataset"]}
            self._base = run_evaluation(self.conf, self.model_dir, files, self.cache, key,
                                        "base", self.log)
        return self._base

    def tuned(self, checkpoint_dir: Path) -> EvalResult:
        """The fine-tuned model's held-out loss.

        Cached by the training inputs' content and the weight files' size and modification
        time: a checkpoint trained again (GPU training is not bit-for-bit reproducible) is
        measured again.
        """
        files = shard_names(checkpoint_dir) or []
        stats = [(f, (checkpoint_dir / f).stat().st_size, (checkpoint_dir / f).stat().st_mtime_ns)
                 for f in files]
        return run_evaluation(self.conf, checkpoint_dir, files, self.cache,
                              {"trained": dict(self.inputs), "weights": stats}, "fine-tuned",
                              self.log)

    def metrics(self, checkpoint_dir: Path) -> dict[str, float | int]:
        """Metrics of both models: ``eval_loss_base``, ``eval_loss``, their perplexities."""
        base, tuned = self.base(), self.tuned(checkpoint_dir)
        change = tuned.loss - base.loss
        self.log(f"[eval] held-out loss: base {base.loss:.4f} -> fine-tuned {tuned.loss:.4f} "
                 f"({change:+.4f}) on {self.rows} rows")
        return eval_metrics(base, tuned)


def _split_rows(plan: DatasetPlan, name: str, cache_dir: str) -> int:
    """Rows of the whole split ``name`` of the data files."""
    import datasets

    return len(datasets.load_dataset(plan.source, data_files=list(plan.data_files), split=name,
                                     cache_dir=cache_dir))


def check_fits_one_gpu(weight_bytes: int, gpu_memory_gib: float | None,
                       eval_split: str) -> None:
    """Refuse a held-out evaluation whose model cannot fit on the one GPU it runs on.

    Args:
        weight_bytes: Size of the base model's weight files.
        gpu_memory_gib: Memory of one GPU, or None (CPU, or unknown: not checked).
        eval_split: The held-out split, for the message.

    Raises:
        ConfigError: The weights take more than 90 % of one card.
    """
    if not gpu_memory_gib or weight_bytes <= _GPU_SHARE * gpu_memory_gib * 2**30:
        return
    raise ConfigError(
        f"eval_split={eval_split!r}: the held-out evaluation loads the whole model on one GPU, "
        f"and its weights ({weight_bytes / 2**30:.1f} GiB) do not fit on one of "
        f"{gpu_memory_gib:g} GiB; leave eval_split empty for this model, or use cards with "
        "more memory."
    )


def prepare_held_out(ws: Workspace, conf: dict[str, Any], plan: DatasetPlan,
                     preprocess: TorchTuneInstructDataset, eval_split: str,
                     inputs: dict[str, str], log: Log,
                     gpu_memory_gib: float | None = None) -> HeldOut:
    """Check the held-out split against the data and render the evaluation config.

    Args:
        ws: The workspace.
        conf: The rendered torchtune config (its own ``dataset`` section).
        plan: The training split's dataset plan.
        preprocess: The preprocessing config.
        eval_split: The held-out split expression.
        inputs: Content fingerprints of the run's inputs.
        log: Where progress lines go.
        gpu_memory_gib: Memory of one GPU of the node (None on CPU).

    Raises:
        ConfigError: The two splits share a row, or the model does not fit on one GPU.
        DatasetError: The held-out split selects nothing or cannot be read.
    """
    split = str(preprocess.split or "train")
    eval_split = check_eval_split(split, eval_split) or ""
    files = conf["checkpointer"].get("checkpoint_files") or []
    check_fits_one_gpu(sum(tree_bytes(ws.model_dir / str(f)) for f in files), gpu_memory_gib,
                       eval_split)
    cache_dir = str(conf["dataset"].get("cache_dir") or ws.cache_dir / "datasets")
    try:
        held = plan_dataset(ws.dataset_dir, dataclasses.replace(preprocess, split=eval_split),
                            Path(cache_dir))
    except DatasetError as exc:
        raise DatasetError(f"eval_split={eval_split!r}: {exc}") from None
    if parse_split(split).name == parse_split(eval_split, "eval_split").name:
        check_disjoint_rows(split, eval_split, _split_rows(plan, parse_split(split).name,
                                                           cache_dir))
    log(f"[eval] held-out split {eval_split!r}: {held.rows} rows (training split {split!r}: "
        f"{plan.rows} rows)")
    return HeldOut(eval_conf(conf, eval_split), ws.model_dir, ws.cache_dir / EVAL_CACHE,
                   dict(inputs), held.rows, log)
