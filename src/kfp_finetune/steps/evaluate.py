"""Held-out evaluation: the loss and perplexity of the base and the fine-tuned model.

torchtune 0.6.1's recipes have no validation loop, so the fine-tune step measures the held-out
loss itself, on the same node (the GPU when there is one): the base model before ``tune run``,
the fine-tuned model after it. Each measurement runs in a child process, so its GPU memory is
all given back before ``tune run`` starts.

Everything is built from the rendered torchtune config, as the recipe builds it: the model
with the config's builder (for LoRA its plain counterpart, because the recipe saves the merged
weights, ``save_adapter_weights_only=False``), the weights through the config's checkpointer,
the tokenizer and the dataset (``packed=False``, the split replaced by ``eval_split``) and the
loss class. The loss is computed as the recipe's ``_loss_step`` computes it (labels shifted by
one with the loss's ``ignore_index``, chunked output when the loss is
``CEWithChunkedOutputLoss``; ``recipes/full_finetune_single_device.py``), in eval mode and
without gradients, and averaged over every held-out token that counts (not over batches).

Results are cached under ``<workspace>/cache/eval`` by the content of what they depend on
(model or training fingerprint, data, evaluation config), so a re-run does not evaluate again.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.errors import DatasetError, TrainingError
from kfp_finetune.storage.content import digest_of
from kfp_finetune.storage.workspace import write_json_atomic

Log = Callable[[str], None]
_COLLATE = "torchtune.data.padded_collate_sft"  # the recipes' default collate_fn
# What a measurement depends on besides the weights (optimizer, schedule etc. do not count).
_EVAL_KEYS = ("tokenizer", "dataset", "loss", "checkpointer", "dtype", "device", "batch_size",
              "collate_fn")
_LORA_ARGS = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank",
              "lora_alpha", "lora_dropout", "use_dora", "quantize_base")


@dataclass(frozen=True)
class EvalResult:
    """One model's loss on the held-out split.

    Attributes:
        loss: Mean cross-entropy per held-out token that counts in the loss.
        tokens: Tokens that count (label not ignored, after the shift by one).
        rows: Held-out rows.
        seconds: Wall time of the measurement (0 when it came from the cache).
    """

    loss: float
    tokens: int
    rows: int
    seconds: float = 0.0

    @property
    def perplexity(self) -> float:
        """``exp(loss)`` (inf when it overflows)."""
        try:
            return math.exp(self.loss)
        except OverflowError:
            return float("inf")


def eval_conf(conf: dict[str, Any], eval_split: str) -> dict[str, Any]:
    """The rendered config with the dataset reading ``eval_split``, unpacked.

    Args:
        conf: The rendered torchtune config (its ``dataset`` section as rendered, not a
            pre-tokenized store of the training split).
        eval_split: The held-out split expression.
    """
    conf = copy.deepcopy(conf)
    conf["dataset"] = {**conf["dataset"], "split": eval_split, "packed": False}
    return conf


def plain_model_conf(model_conf: dict[str, Any]) -> dict[str, Any]:
    """The model section that builds the model without LoRA/DoRA/QLoRA layers.

    ``torchtune.models.llama3_2.lora_llama3_2_1b`` becomes ``...llama3_2_1b`` (likewise our
    ``lora_*_from_hf_config`` builders); arguments the plain builder does not take (the LoRA
    ones) are dropped.

    Raises:
        TrainingError: The builder has no plain counterpart.
    """
    component = str(model_conf["_component_"])
    module_name, _, name = _plain_name(component).rpartition(".")
    try:
        builder = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise TrainingError(
            f"the held-out evaluation needs the plain model builder of {component!r} "
            f"({module_name}.{name}), which does not exist; leave eval_split empty for this "
            "model."
        ) from None
    accepted = set(inspect.signature(builder).parameters)
    args = {k: v for k, v in model_conf.items() if k != "_component_" and k in accepted}
    return {"_component_": f"{module_name}.{name}", **args}


def _plain_name(component: str) -> str:
    """``a.b.lora_x`` (or ``qlora_x``) -> ``a.b.x``."""
    module_name, _, name = component.rpartition(".")
    for prefix in ("qlora_", "lora_"):
        if name.startswith(prefix):
            return f"{module_name}.{name[len(prefix):]}"
    return component


def key_conf(conf: dict[str, Any]) -> dict[str, Any]:
    """The parts of an evaluation config a measurement depends on (the cache key's part).

    The model section is that of the model actually evaluated (LoRA arguments left out), so
    the base model's result is shared by full and LoRA runs and survives a learning-rate change.
    """
    model = {k: v for k, v in conf.get("model", {}).items() if k not in _LORA_ARGS}
    model["_component_"] = _plain_name(str(model.get("_component_", "")))
    return {"model": model, **{k: conf.get(k) for k in _EVAL_KEYS}}


def load_model(conf: dict[str, Any], checkpoint_dir: Path, files: list[str]) -> Any:
    """Build the model from the config and load a Hugging Face checkpoint into it.

    The weights go through the config's checkpointer (its key conversion for the model type);
    the model is built under the config's dtype and device, as the recipe builds it.

    Args:
        conf: The rendered torchtune config.
        checkpoint_dir: Folder of the checkpoint (the base model or an ``epoch_N`` folder).
        files: Its weight files.

    Returns:
        The model, in eval mode.
    """
    import torch
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune import training

    ckpt_conf = {**conf["checkpointer"], "checkpoint_dir": str(checkpoint_dir),
                 "checkpoint_files": list(files), "recipe_checkpoint": None,
                 "adapter_checkpoint": None, "resume_from_checkpoint": False}
    with tempfile.TemporaryDirectory(prefix="kfp-finetune-eval-") as scratch:
        ckpt_conf["output_dir"] = scratch  # the checkpointer creates it; nothing is saved
        ckpt_conf.pop("should_load_recipe_state", None)
        checkpointer = tt_config.instantiate(OmegaConf.create(ckpt_conf))
        state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    device = torch.device(conf.get("device") or "cpu")
    dtype = training.get_dtype(conf.get("dtype"), device=device)
    with training.set_default_dtype(dtype), device:
        model = tt_config.instantiate(OmegaConf.create(plain_model_conf(conf["model"])))
    model.load_state_dict(state)
    return model.eval()


def batch_loss(model: Any, loss_fn: Any, batch: dict[str, Any]) -> tuple[float, int]:
    """Summed loss and counted tokens of one batch, as the recipe's ``_loss_step`` computes it.

    Args:
        model: The decoder (``set_num_output_chunks`` already applied for a chunked loss).
        loss_fn: The config's loss (mean over tokens whose label is not ``ignore_index``).
        batch: ``tokens`` and ``labels`` of shape ``[b, s]``, padded by the collate function.

    Returns:
        The loss summed over the counted tokens, and their number.
    """
    import torch

    labels = batch["labels"]
    ignore = torch.full((labels.shape[0], 1), loss_fn.ignore_index, device=labels.device,
                        dtype=labels.dtype)
    labels = torch.hstack((labels[..., 1:], ignore))  # predict token i+1 from position i
    count = int((labels != loss_fn.ignore_index).sum())
    if count == 0:
        return 0.0, 0
    logits = model(batch["tokens"])
    if not isinstance(logits, list):
        labels = labels.reshape(-1)
        logits = logits.reshape(-1, logits.size(-1))
    return float(loss_fn(logits, labels)) * count, count


def mean_loss(model: Any, loss_fn: Any, batches: Iterable[dict[str, Any]]) -> tuple[float, int]:
    """Mean loss per counted token over all batches, without gradients.

    Returns:
        The mean loss (NaN when no token counts) and the number of counted tokens.
    """
    import torch

    total, tokens = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            loss, count = batch_loss(model, loss_fn, batch)
            total += loss
            tokens += count
    return (total / tokens if tokens else float("nan")), tokens


def _batches(conf: dict[str, Any], loss_fn: Any, device: Any) -> tuple[int, Iterator[dict]]:
    """The held-out rows through the config's tokenizer, dataset and collate function."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune.config._utils import _get_component_from_path

    cfg = OmegaConf.create(conf)
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    dataset = tt_config.instantiate(cfg.dataset, tokenizer)
    collate = _get_component_from_path(conf.get("collate_fn") or _COLLATE)
    size = int(conf.get("batch_size") or 1)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=size, shuffle=False, drop_last=False,
        collate_fn=lambda rows: collate(rows, padding_idx=tokenizer.pad_id,
                                        ignore_idx=loss_fn.ignore_index))

    def moved() -> Iterator[dict]:
        for batch in loader:
            yield {k: v.to(device) for k, v in batch.items() if k in ("tokens", "labels")}

    return len(dataset), moved()


def evaluate_checkpoint(conf: dict[str, Any], checkpoint_dir: Path, files: list[str]) -> EvalResult:
    """Measure one checkpoint's held-out loss in this process.

    Args:
        conf: The evaluation config (``eval_conf``).
        checkpoint_dir: Folder of the checkpoint.
        files: Its weight files.
    """
    import torch
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    start = time.monotonic()
    model = load_model(conf, checkpoint_dir, files)
    loss_fn = tt_config.instantiate(OmegaConf.create(conf["loss"]))
    if type(loss_fn).__name__ == "CEWithChunkedOutputLoss":
        model.set_num_output_chunks(loss_fn.num_output_chunks)  # as the recipe does
    rows, batches = _batches(conf, loss_fn, torch.device(conf.get("device") or "cpu"))
    loss, tokens = mean_loss(model, loss_fn, batches)
    return EvalResult(loss, tokens, rows, round(time.monotonic() - start, 3))


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: ``python -m kfp_finetune.steps.evaluate CONF.json OUT.json``.

    ``CONF.json`` holds ``conf``, ``checkpoint_dir`` and ``files``; the result is written
    to ``OUT.json``.
    """
    conf_path, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    job = json.loads(Path(conf_path).read_text())
    result = evaluate_checkpoint(job["conf"], Path(job["checkpoint_dir"]), job["files"])
    write_json_atomic(Path(out_path), asdict(result))
    return 0


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-8:])


def run_evaluation(conf: dict[str, Any], checkpoint_dir: Path, files: list[str],
                   cache: Path, key: dict[str, Any], what: str, log: Log) -> EvalResult:
    """The held-out loss of one checkpoint: from the cache, or measured in a child process.

    Args:
        conf: The evaluation config (``eval_conf``).
        checkpoint_dir: Folder of the checkpoint.
        files: Its weight files.
        cache: Cache folder of the results.
        key: What the result depends on (model or training fingerprint, data); the
            evaluation config is added to it.
        what: ``base`` or ``fine-tuned``, for the log.
        log: Where progress lines go.

    Raises:
        TrainingError: The measurement failed; the message holds the end of its output.
        DatasetError: No held-out token counts in the loss.
    """
    path = cache / f"{digest_of({**key, 'conf': key_conf(conf)})}.json"
    if path.is_file():
        try:
            result = EvalResult(**{**json.loads(path.read_text()), "seconds": 0.0})
            log(f"[eval] {what} model: held-out loss {result.loss:.4f} (cached: {path.name})")
            return result
        except (ValueError, TypeError):
            pass  # unreadable: measured again below
    log(f"[eval] measuring the {what} model's loss on eval_split="
        f"{conf['dataset']['split']!r} ({checkpoint_dir})")
    with tempfile.TemporaryDirectory(prefix="kfp-finetune-eval-") as scratch:
        job, out = Path(scratch) / "job.json", Path(scratch) / "result.json"
        job.write_text(json.dumps({"conf": conf, "checkpoint_dir": str(checkpoint_dir),
                                   "files": list(files)}))
        proc = subprocess.run([sys.executable, "-m", "kfp_finetune.steps.evaluate", str(job),
                               str(out)], capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.is_file():
            raise TrainingError(
                f"the held-out evaluation of the {what} model failed (exit code "
                f"{proc.returncode}); last lines:\n{_tail(proc.stdout + proc.stderr)}"
            )
        result = EvalResult(**json.loads(out.read_text()))
    if result.tokens == 0:
        raise DatasetError(
            f"eval_split={conf['dataset']['split']!r}: none of its {result.rows} rows keeps a "
            "token that counts in the loss (max_seq_len cuts each before its response), so "
            "there is nothing to measure; raise max_seq_len or choose other held-out rows."
        )
    cache.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, asdict(result))
    log(f"[eval] {what} model: held-out loss {result.loss:.4f}, perplexity "
        f"{result.perplexity:.4g} over {result.tokens} tokens of {result.rows} rows "
        f"({result.seconds:.1f} s)")
    return result


def eval_metrics(base: EvalResult, tuned: EvalResult) -> dict[str, float | int]:
    """The step's Metrics of a held-out evaluation."""
    return {"eval_loss_base": round(base.loss, 6), "eval_perplexity_base": base.perplexity,
            "eval_loss": round(tuned.loss, 6), "eval_perplexity": tuned.perplexity,
            "eval_tokens": tuned.tokens}


if __name__ == "__main__":
    sys.exit(main())
