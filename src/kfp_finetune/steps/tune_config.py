"""The torchtune config that the fine-tune step runs: defaults resolved, overrides applied.

The recipe and its base config are chosen in ``steps.recipes`` (Kubeflow Trainer's table).
The base config is torchtune's own YAML; the overrides below are applied to it and the whole
result is saved beside the checkpoint, so every value used is visible.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.config.runtimes import RuntimeSpec
from kfp_finetune.config.types import (
    DataType,
    LoraConfig,
    Loss,
    TorchTuneConfig,
    TorchTuneInstructDataset,
    normalize_config,
)
from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.dataset_plan import DatasetPlan, plan_dataset
from kfp_finetune.steps.gpu_defaults import cap_warmup, memory_defaults
from kfp_finetune.steps.model_check import ModelInfo, check_model
from kfp_finetune.steps.recipes import RecipeChoice, base_config_path, select_recipe
from kfp_finetune.steps.tracking_run import metric_logger_conf
from kfp_finetune.storage.content import dataset_cache
from kfp_finetune.storage.workspace import Workspace, require_complete

# Builders of the -tiny runtimes (module kfp_finetune.plugins.hf_models), by (family, LoRA).
BUILDERS = {
    ("llama3_2", False): "kfp_finetune.plugins.hf_models.llama3_2_from_hf_config",
    ("llama3_2", True): "kfp_finetune.plugins.hf_models.lora_llama3_2_from_hf_config",
    ("qwen2_5", False): "kfp_finetune.plugins.hf_models.qwen2_5_from_hf_config",
    ("qwen2_5", True): "kfp_finetune.plugins.hf_models.lora_qwen2_5_from_hf_config",
}


@dataclass(frozen=True)
class ResolvedConfig:
    """``TorchTuneConfig`` with every default filled in from the runtime.

    ``None`` in the optional knobs means "keep the torchtune config's value".
    """

    dtype: DataType
    batch_size: int
    epochs: int
    loss: Loss
    gpus: int
    peft: LoraConfig | None
    learning_rate: float | None = None
    weight_decay: float | None = None
    gradient_accumulation_steps: int | None = None
    max_seq_len: int | None = None
    packed: bool = False
    activation_checkpointing: bool | None = None
    compile: bool | None = None
    max_steps_per_epoch: int | None = None
    seed: int = 42
    overrides: tuple[str, ...] = ()
    fsdp_cpu_offload: bool | None = None
    gpu_memory_gib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON and hashing."""
        data = {k: v for k, v in vars(self).items() if k not in ("peft", "overrides")}
        data.update(
            dtype=self.dtype.value,
            loss=self.loss.value,
            peft=None if self.peft is None else dict(vars(self.peft)),
            overrides=list(self.overrides),
        )
        return data


def resolve(runtime: RuntimeSpec, config: TorchTuneConfig,
            gpu_memory_gib: float | None = None) -> ResolvedConfig:
    """Fill the unset fields of ``config`` with the runtime's defaults.

    On GPU the runtime's speed defaults (packing, ``max_seq_len``, ``compile``) apply unless the
    user set them, and so do its memory rules for cards of ``gpu_memory_gib`` GiB (activation
    checkpointing, optimizer offload); on CPU none do.

    Args:
        runtime: The runtime.
        config: What the user set.
        gpu_memory_gib: Memory of one GPU of the training node, or None when unknown (the
            launcher and the CPU steps; the fine-tune step on the GPU node knows it).

    Raises:
        ConfigError: The combination cannot run (QLoRA on CPU, packing without a length, a
            GPU count torchtune has no config for).
    """
    config = normalize_config(config)  # the SDK's TorchTuneConfig checks nothing itself
    gpus = runtime.default_gpus if config.gpus is None else config.gpus
    speed = {**runtime.defaults, **(runtime.gpu_defaults if gpus > 0 else {}),
             **memory_defaults(runtime, gpus, gpu_memory_gib, config.peft_config is not None)}

    def pick(name: str, default: Any = None) -> Any:
        value = getattr(config, name)
        return value if value is not None else speed.get(name, default)

    resolved = ResolvedConfig(
        dtype=config.dtype or runtime.default_dtype,
        batch_size=config.batch_size or runtime.default_batch_size,
        epochs=config.epochs or runtime.default_epochs,
        loss=config.loss or Loss.CEWithChunkedOutputLoss,
        gpus=gpus,
        peft=config.peft_config,
        learning_rate=config.learning_rate or runtime.learning_rate,
        weight_decay=config.weight_decay,
        gradient_accumulation_steps=pick("gradient_accumulation_steps"),
        max_seq_len=pick("max_seq_len"),
        packed=bool(pick("packed", False)),
        activation_checkpointing=pick("activation_checkpointing"),
        compile=pick("compile"),
        max_steps_per_epoch=config.max_steps_per_epoch,
        seed=42 if config.seed is None else config.seed,
        overrides=tuple(config.overrides or ()),
        fsdp_cpu_offload=speed.get("fsdp_cpu_offload"),
        gpu_memory_gib=gpu_memory_gib if gpus > 0 else None,
    )
    if resolved.packed and resolved.max_seq_len is None:
        raise ConfigError(
            "packed=True needs max_seq_len (the length samples are packed to); set "
            "max_seq_len, e.g. 2048."
        )
    select_recipe(runtime, resolved)  # raises early for impossible combinations
    return resolved


def _model_overrides(
    runtime: RuntimeSpec, peft: LoraConfig | None, model_dir: Path, base_model: dict[str, Any]
) -> dict[str, Any]:
    model: dict[str, Any] = dict(base_model)
    if runtime.tiny:
        model = {"_component_": BUILDERS[(runtime.config_family, peft is not None)],
                 "checkpoint_dir": str(model_dir)}
        if peft is not None:
            for key in ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output",
                        "lora_rank", "lora_alpha", "lora_dropout"):
                if key in base_model:
                    model[key] = base_model[key]
    if peft is not None:
        model["lora_attn_modules"] = list(peft.lora_attn_modules)
        for key in ("apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha",
                    "lora_dropout", "use_dora"):
            value = getattr(peft, key)
            if value is not None:
                model[key] = value
        if peft.quantize_base:
            model["quantize_base"] = True
    return model


def prepare_training(
    ws: Workspace, runtime: RuntimeSpec, resolved: ResolvedConfig,
    preprocess: TorchTuneInstructDataset,
) -> tuple[RecipeChoice, dict[str, Any]]:
    """Check the workspace's dataset and model and render the torchtune config."""
    choice, conf, _ = prepare_run(ws, runtime, resolved, preprocess)
    return choice, conf


def prepare_run(
    ws: Workspace, runtime: RuntimeSpec, resolved: ResolvedConfig,
    preprocess: TorchTuneInstructDataset,
) -> tuple[RecipeChoice, dict[str, Any], DatasetPlan]:
    """Check the workspace's dataset and model; the recipe, torchtune config and dataset plan.

    Shared by the fine-tune and tokenize-dataset steps, so both read the data the same way.

    Raises:
        WorkspaceError: The dataset or model step has not finished.
    """
    dataset = require_complete(ws.dataset_dir, "dataset-initializer")
    require_complete(ws.model_dir, "model-initializer")
    info = check_model(ws.model_dir, runtime)
    cache = dataset_cache(ws.cache_dir / "datasets", ws.dataset_dir, dataset)
    plan = plan_dataset(ws.dataset_dir, preprocess, cache)
    choice, conf = render_config(
        runtime,
        resolved,
        model_dir=ws.model_dir,
        model=info,
        dataset=plan,
        output_dir=ws.checkpoints_dir,
        cache_dir=cache,
    )
    return choice, conf, plan


def render_config(
    runtime: RuntimeSpec,
    cfg: ResolvedConfig,
    *,
    model_dir: Path,
    model: ModelInfo,
    dataset: DatasetPlan,
    output_dir: Path,
    cache_dir: Path,
) -> tuple[RecipeChoice, dict[str, Any]]:
    """Build the full torchtune config for this run.

    Args:
        runtime: The runtime.
        cfg: The resolved training config.
        model_dir: The base model folder.
        model: What the model check found.
        dataset: The dataset plan from the dataset step.
        output_dir: torchtune's output_dir.
        cache_dir: Cache folder for ``datasets``.

    Returns:
        The recipe choice and the config as a plain dict (interpolations resolved).
    """
    from omegaconf import OmegaConf

    choice = select_recipe(runtime, cfg)
    conf = OmegaConf.to_container(OmegaConf.load(base_config_path(choice.config)))
    assert isinstance(conf, dict)
    conf.update(  # the arguments read the base config before it is updated
        output_dir=str(output_dir),
        model=_model_overrides(runtime, cfg.peft, model_dir, conf.get("model", {})),
        tokenizer=_tokenizer_conf(runtime, cfg, model_dir, model, conf),
        dataset=_dataset_conf(dataset, cfg, cache_dir),
        checkpointer=_checkpointer_conf(conf, runtime, model_dir, model, output_dir),
        optimizer=_optimizer_conf(conf, cfg, choice),
        loss={"_component_": cfg.loss.value},
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        dtype=cfg.dtype.value,
        device=choice.device,
        seed=cfg.seed,
        resume_from_checkpoint=False,
        metric_logger=metric_logger_conf(output_dir),
        log_every_n_steps=1,
    )
    if cfg.peft is not None:
        conf["save_adapter_weights_only"] = False
    _set_knobs(conf, cfg, choice)
    return choice, apply_overrides(conf, cfg.overrides)


def _tokenizer_conf(runtime: RuntimeSpec, cfg: ResolvedConfig, model_dir: Path, model: ModelInfo,
                    conf: dict[str, Any]) -> dict[str, Any]:
    tokenizer = {
        "_component_": runtime.tokenizer.component,
        "path": str(model_dir / runtime.tokenizer.path),
        "max_seq_len": cfg.max_seq_len or conf.get("tokenizer", {}).get("max_seq_len"),
    }
    if runtime.tokenizer.merges_file:
        tokenizer["merges_file"] = str(model_dir / runtime.tokenizer.merges_file)
    if model.special_tokens_path:
        tokenizer["special_tokens_path"] = model.special_tokens_path
    return tokenizer


def _dataset_conf(dataset: DatasetPlan, cfg: ResolvedConfig, cache_dir: Path) -> dict[str, Any]:
    dataset_conf: dict[str, Any] = {
        "_component_": dataset.builder,
        "source": dataset.source,
        "data_files": list(dataset.data_files),
        "split": dataset.split,
        "train_on_input": dataset.train_on_input,
        "packed": cfg.packed,
        "cache_dir": str(cache_dir),
    }
    if dataset.kind == "chat":
        dataset_conf.update(conversation_column=dataset.conversation_column,
                            conversation_style=dataset.conversation_style)
    elif dataset.column_map:
        dataset_conf["column_map"] = dict(dataset.column_map)
    if dataset.new_system_prompt:
        dataset_conf["new_system_prompt"] = dataset.new_system_prompt
    return dataset_conf


def _checkpointer_conf(conf: dict[str, Any], runtime: RuntimeSpec, model_dir: Path,
                       model: ModelInfo, output_dir: Path) -> dict[str, Any]:
    checkpointer = dict(conf["checkpointer"])
    checkpointer.update(
        checkpoint_dir=str(model_dir),
        checkpoint_files=list(model.checkpoint_files),
        output_dir=str(output_dir),
        model_type=runtime.checkpoint_model_type,
        recipe_checkpoint=None,
    )
    return checkpointer


def _optimizer_conf(conf: dict[str, Any], cfg: ResolvedConfig, choice: RecipeChoice
                    ) -> dict[str, Any]:
    optimizer = dict(conf.get("optimizer", {}))
    if "bitsandbytes" in str(optimizer.get("_component_", "")) or choice.device == "cpu":
        # bitsandbytes is not in the trainer image and has no CPU kernels; torch's fused
        # AdamW runs on both CUDA and CPU (torch >= 2.4).
        optimizer = {"_component_": "torch.optim.AdamW", "lr": optimizer.get("lr", 2e-5),
                     "fused": True}
    elif optimizer.get("_component_") == "torch.optim.AdamW":
        # torchtune's llama3_3/70B_full: "highly recommended to use fused=True" (it ships False).
        optimizer["fused"] = True
    if cfg.learning_rate is not None:
        optimizer["lr"] = cfg.learning_rate
    if cfg.weight_decay is not None:
        optimizer["weight_decay"] = cfg.weight_decay
    return optimizer


def _set_knobs(conf: dict[str, Any], cfg: ResolvedConfig, choice: RecipeChoice) -> None:
    """Set the speed and memory knobs the user or the runtime chose, and the CPU limits."""
    knobs = {
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "compile": cfg.compile,
        "enable_activation_checkpointing": cfg.activation_checkpointing,
        "max_steps_per_epoch": cfg.max_steps_per_epoch,
        "fsdp_cpu_offload": cfg.fsdp_cpu_offload if choice.distributed else None,
    }
    conf.update({k: v for k, v in knobs.items() if v is not None})
    cap_warmup(conf)
    if (conf.get("gradient_accumulation_steps") or 1) > 1:
        conf["optimizer_in_bwd"] = False  # torchtune refuses it with gradient accumulation
    if choice.device == "cpu":
        conf.update(
            optimizer_in_bwd=False,
            enable_activation_offloading=False,
            log_peak_memory_stats=False,
        )
        if cfg.compile is None:
            conf["compile"] = False
        if cfg.activation_checkpointing is None:
            conf["enable_activation_checkpointing"] = False
        if "profiler" in conf:
            conf["profiler"] = {**conf["profiler"], "enabled": False, "cuda": False}
    else:
        conf["log_peak_memory_stats"] = True


def apply_overrides(conf: dict[str, Any], overrides: tuple[str, ...]) -> dict[str, Any]:
    """Apply raw ``key=value`` overrides (already checked) on top of the rendered config.

    ``~key`` removes a key, as on torchtune's command line. Values are parsed as YAML.
    """
    import yaml

    for item in overrides:
        key, _, raw = item.partition("=")
        remove = key.startswith("~")
        parts = key.lstrip("~").split(".")
        node = conf
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        if remove:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return conf


def config_fingerprint(conf: dict[str, Any]) -> str:
    """Stable hash of a rendered config, used to tell a finished run from a changed one."""
    return hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest()[:16]
