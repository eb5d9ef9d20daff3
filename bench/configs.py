"""The two configurations the benchmarks compare, rendered from the real code.

* **ours**: the workspace is filled by the real initializer steps
  (``initialize_dataset`` / ``initialize_model``) and the config is rendered by
  ``tune_config.prepare_training`` -> ``tune_config.render_config``, so whatever defaults the
  project currently has (packing, ``max_seq_len``, compile, activation checkpointing, ...)
  are what is measured. Nothing about our defaults is hard-coded here.
* **anchor**: what Kubeflow Trainer's ``torchtune-<model>`` runtime runs: torchtune's
  ``<family>/<size>_full`` config with the manifest's overrides
  (``dataset=torchtune.datasets.instruct_dataset dataset.source=parquet
  dataset.data_dir=/workspace/dataset/data``, ``output_dir``, ``tokenizer.path``,
  ``checkpointer.checkpoint_dir``) and every other value of that config left as it is
  (batch size, gradient accumulation, optimizer, unpacked data, no compile, ...).
  The manifest runs ``full_finetune_distributed`` on 2 GPUs; on one GPU we run the same recipe
  with ``--nproc_per_node 1`` (per-GPU figures; no inter-GPU traffic, which favours the
  anchor). On CPU the distributed recipe cannot run, so the anchor is approximated by
  ``full_finetune_single_device`` with the same config values, ``device=cpu`` and the dtype of
  our CPU runtime (fp32; bf16 matmuls on CPU would only measure the CPU's bf16 support).

Only bench-specific keys are changed on top of both: one epoch of ``warmup + steps`` optimizer
steps, a scratch ``output_dir``, the same seed, and (for the tiny models, whose vocabulary is
not Llama's) the tiny model builder and special-token file in the anchor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.config.runtimes import get_runtime
from kfp_finetune.config.types import LoraConfig, TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.steps import fine_tune as finetune
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.steps.tune_config import base_config_path, resolve
from kfp_finetune.storage.workspace import Workspace


@dataclass
class RunConfig:
    """A rendered torchtune config and how to launch it."""

    label: str
    recipe: str
    nproc: int
    conf: dict[str, Any]

    @property
    def distributed(self) -> bool:
        """Whether torchrun launches it."""
        return self.recipe.endswith("_distributed")


def _quiet(_: str) -> None:
    pass


def _train_config(gpus: int | None, peft: LoraConfig | None = None) -> TorchTuneConfig:
    return TorchTuneConfig(resources_per_node=None if gpus is None else {"gpu": gpus},
                           peft_config=peft)


def fill_workspace(ws: Path, model_dir: Path, dataset_dir: Path, runtime: str,
                   gpus: int | None = None) -> Workspace:
    """Run the real dataset and model initializer steps into ``ws`` (skipped when done)."""
    initialize_dataset(ws, str(dataset_dir / "data"), TorchTuneInstructDataset(),
                       log=_quiet)
    initialize_model(ws, str(model_dir), runtime, _train_config(gpus), log=_quiet)
    return Workspace.at(ws)


def ours(ws: Workspace, runtime_name: str, gpus: int | None = None,
         peft: LoraConfig | None = None, gpu_memory_gib: float | None = None) -> RunConfig:
    """Our pipeline's config for this workspace, rendered by the project's own code.

    Args:
        ws: Workspace filled by ``fill_workspace``.
        runtime_name: Our runtime.
        gpus: GPU count (None: the runtime's default).
        peft: LoRA settings for a LoRA run (``LoraConfig()``: the Kubeflow defaults).
        gpu_memory_gib: Card memory for the runtime's memory rules, as the fine-tune step
            reads it (``tune_config.detect_gpu_memory_gib``); None keeps the config's values.
    """
    runtime = get_runtime(runtime_name)
    resolved = resolve(runtime, _train_config(gpus, peft), gpu_memory_gib=gpu_memory_gib)
    choice, conf = finetune.prepare_training(ws, runtime, resolved, TorchTuneInstructDataset())
    return RunConfig("ours-lora" if peft else "ours", choice.recipe, choice.nproc, conf)


def anchor(ws: Workspace, runtime_name: str, anchor_config: str, device: str,
           tiny: bool, ours_conf: dict[str, Any], lora: bool = False) -> RunConfig:
    """Kubeflow Trainer's config for the same model and data (see the module docstring).

    With ``lora``, what Kubeflow Trainer runs for a ``LoraConfig`` on one GPU (its table:
    n=1, g=1 -> ``lora_finetune_single_device`` with ``<size>_lora_single_device``), same
    manifest overrides.
    """
    from omegaconf import OmegaConf

    runtime = get_runtime(runtime_name)
    if lora:
        anchor_config = anchor_config.replace("_full", "_lora_single_device")
    conf = OmegaConf.to_container(OmegaConf.load(base_config_path(anchor_config)))
    assert isinstance(conf, dict)
    model_dir = ws.model_dir
    # The manifest's overrides.
    conf["dataset"] = {**conf["dataset"], "_component_": "torchtune.datasets.instruct_dataset",
                       "source": "parquet", "data_dir": str(ws.dataset_dir),
                       # not in the manifest: keeps the datasets cache out of ~/.cache
                       "cache_dir": str(ws.cache_dir / "anchor-datasets")}
    conf["tokenizer"] = {**conf["tokenizer"], "path": str(model_dir / runtime.tokenizer.path)}
    if runtime.tokenizer.merges_file:
        conf["tokenizer"]["merges_file"] = str(model_dir / runtime.tokenizer.merges_file)
    conf["checkpointer"] = {**conf["checkpointer"], "checkpoint_dir": str(model_dir)}
    if tiny:
        # Same weights as ours: the tiny builder and the tiny vocabulary's special tokens.
        conf["model"] = copy.deepcopy(ours_conf["model"])
        special = ours_conf["tokenizer"].get("special_tokens_path")
        if special:
            conf["tokenizer"]["special_tokens_path"] = special
        conf["checkpointer"]["checkpoint_files"] = list(
            ours_conf["checkpointer"]["checkpoint_files"])
    elif lora:
        # The same adapters as ours (Kubeflow Trainer passes the LoraConfig's fields as
        # overrides too).
        conf["model"] = {**conf["model"], **{
            k: copy.deepcopy(v) for k, v in ours_conf["model"].items()
            if k.startswith(("lora_", "apply_lora", "use_dora"))}}
    recipe, nproc = ("lora_finetune_single_device" if lora else "full_finetune_distributed"), 1
    if device == "cpu":
        recipe = "lora_finetune_single_device" if lora else "full_finetune_single_device"
        conf.update(device="cpu", dtype=ours_conf["dtype"], log_peak_memory_stats=False)
        if "profiler" in conf:
            conf["profiler"] = {**conf["profiler"], "enabled": False, "cuda": False}
    return RunConfig("anchor", recipe, nproc, conf)


def for_bench(run: RunConfig, out_dir: Path, warmup: int, steps_: int, seed: int = 42,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config to run: ``run.conf`` plus the bench-only keys, interpolations resolved."""
    from omegaconf import OmegaConf

    conf = copy.deepcopy(run.conf)
    conf.update(
        output_dir=str(out_dir), epochs=1, max_steps_per_epoch=warmup + steps_, seed=seed,
        resume_from_checkpoint=False, log_every_n_steps=1,
        metric_logger={"_component_": "torchtune.training.metric_logging.DiskLogger",
                       "log_dir": str(out_dir / "logs"), "filename": "metrics.txt"},
    )
    conf["checkpointer"] = {**conf["checkpointer"], "output_dir": str(out_dir)}
    # Per-step peak memory in the metric log: the worker reads the run's true peak from it.
    conf["log_peak_memory_stats"] = conf.get("device") == "cuda"
    if "profiler" in conf:
        conf["profiler"] = {**conf["profiler"], "enabled": False}
    for dotted, value in (overrides or {}).items():
        node = conf
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    resolved = OmegaConf.to_container(OmegaConf.create(conf), resolve=True)
    assert isinstance(resolved, dict)
    return resolved


def describe(conf: dict[str, Any]) -> str:
    """The throughput-relevant settings of a config, in one short line."""
    ds = conf.get("dataset", {})
    tok = conf.get("tokenizer", {})
    opt = conf.get("optimizer", {})
    parts = [
        f"bs={conf.get('batch_size')}",
        f"ga={conf.get('gradient_accumulation_steps', 1)}",
        f"packed={bool(ds.get('packed'))}",
        f"max_seq_len={tok.get('max_seq_len')}",
        f"dtype={conf.get('dtype')}",
        f"compile={bool(conf.get('compile'))}",
        f"ac={bool(conf.get('enable_activation_checkpointing'))}",
        f"optim={str(opt.get('_component_', '')).rsplit('.', 1)[-1]}"
        + ("(fused)" if opt.get("fused") else ""),
        f"opt_in_bwd={bool(conf.get('optimizer_in_bwd'))}",
        f"data={str(ds.get('_component_', '')).rsplit('.', 1)[-1]}",
    ]
    return " ".join(parts)
