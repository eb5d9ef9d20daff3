"""Recipe choice and the torchtune config that the fine-tune step runs.

The recipe and base config follow Kubeflow Trainer's table (GPU count, LoRA, QLoRA):

========================  ===============================  ===================================
GPUs per node              recipe                           config
========================  ===============================  ===================================
0 (CPU) or 1               ``full_finetune_single_device``  ``<family>/<size>_full_single_device``
0 (CPU) or 1, LoRA         ``lora_finetune_single_device``  ``..._lora_single_device`` (QLoRA:
                                                            ``..._qlora_single_device``)
2..8                       ``full_finetune_distributed``    ``<family>/<size>_full``
2..8, LoRA                 ``lora_finetune_distributed``    ``..._lora`` (QLoRA: ``..._qlora``)
========================  ===============================  ===================================

The base config is torchtune's own YAML; the overrides below are applied to it and the whole
result is saved beside the checkpoint, so every value used is visible.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.config.runtimes import Runtime
from kfp_finetune.config.types import DataType, LoraConfig, Loss, TorchTuneConfig
from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.dataset_plan import DatasetPlan
from kfp_finetune.steps.gpu_defaults import cap_warmup, memory_defaults
from kfp_finetune.steps.model_check import ModelInfo
from kfp_finetune.steps.tracking_run import metric_logger_conf

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


@dataclass(frozen=True)
class RecipeChoice:
    """The torchtune recipe, its base config and how to launch it."""

    recipe: str
    config: str
    nproc: int
    device: str

    @property
    def distributed(self) -> bool:
        """Whether torchrun starts several processes."""
        return self.nproc > 1

    def command(self, config_path: Path) -> list[str]:
        """The ``tune run`` command line."""
        launch = ["--nproc_per_node", str(self.nproc)] if self.distributed else []
        return ["tune", "run", *launch, self.recipe, "--config", str(config_path)]


def resolve(runtime: Runtime, config: TorchTuneConfig,
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


def _torchtune_dir() -> Path:
    """Find torchtune's package folder without importing it (importing pulls in torch)."""
    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("torchtune is not installed; install kfp-finetune with its dependencies.")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def _available_configs() -> dict[str, str]:
    """List torchtune's built-in configs (name -> recipe) from its registry module alone."""
    path = _torchtune_dir() / "_recipe_registry.py"
    spec = importlib.util.spec_from_file_location("_kfp_finetune_recipe_registry", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks the module up while building classes
    spec.loader.exec_module(module)
    return {c.name: r.name for r in module.get_all_recipes() for c in r.configs}


def select_recipe(runtime: Runtime, cfg: ResolvedConfig) -> RecipeChoice:
    """Choose recipe and base config by GPU count and PEFT settings (table above).

    Raises:
        ConfigError: torchtune has no config for the combination; the message says why.
    """
    peft = cfg.peft
    if peft is None:
        method, recipe_kind = "full", "full_finetune"
    elif peft.quantize_base:
        method, recipe_kind = "qlora", "lora_finetune"
    else:
        method, recipe_kind = "lora", "lora_finetune"
    if cfg.gpus <= 1:
        recipe = f"{recipe_kind}_single_device"
        config = f"{runtime.config_family}/{runtime.config_size}_{method}_single_device"
    else:
        recipe = f"{recipe_kind}_distributed"
        config = f"{runtime.config_family}/{runtime.config_size}_{method}"
    if cfg.gpus == 0 and method == "qlora":
        raise ConfigError(
            "QLoRA (quantize_base=True) needs a GPU; set resources_per_node={'gpu': 1} or use "
            "LoRA without quantize_base on CPU."
        )
    known = _available_configs()
    if known.get(config) != recipe:
        options = sorted(
            name for name in known if name.startswith(f"{runtime.config_family}/"
                                                      f"{runtime.config_size}_")
        )
        raise ConfigError(
            f"runtime {runtime.name!r} with {cfg.gpus} GPU(s) and {method} fine-tuning needs "
            f"torchtune config {config!r} for recipe {recipe!r}, which torchtune 0.6.1 does not "
            f"have; configs for this model: {', '.join(options) or 'none'}. Change the GPU count "
            "or the PEFT settings."
        )
    return RecipeChoice(recipe, config, max(cfg.gpus, 1), "cuda" if cfg.gpus > 0 else "cpu")


def base_config_path(config_name: str) -> Path:
    """Path of a torchtune built-in config YAML."""
    return _torchtune_dir().parent / "recipes" / "configs" / f"{config_name}.yaml"


def _model_overrides(
    runtime: Runtime, peft: LoraConfig | None, model_dir: Path, base_model: dict[str, Any]
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


def render_config(
    runtime: Runtime,
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
    tokenizer = {
        "_component_": runtime.tokenizer.component,
        "path": str(model_dir / runtime.tokenizer.path),
        "max_seq_len": cfg.max_seq_len or conf.get("tokenizer", {}).get("max_seq_len"),
    }
    if runtime.tokenizer.merges_file:
        tokenizer["merges_file"] = str(model_dir / runtime.tokenizer.merges_file)
    if model.special_tokens_path:
        tokenizer["special_tokens_path"] = model.special_tokens_path
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
    checkpointer = dict(conf["checkpointer"])
    checkpointer.update(
        checkpoint_dir=str(model_dir),
        checkpoint_files=list(model.checkpoint_files),
        output_dir=str(output_dir),
        model_type=runtime.checkpoint_model_type,
        recipe_checkpoint=None,
    )
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
    conf.update(
        output_dir=str(output_dir),
        model=_model_overrides(runtime, cfg.peft, model_dir, conf.get("model", {})),
        tokenizer=tokenizer,
        dataset=dataset_conf,
        checkpointer=checkpointer,
        optimizer=optimizer,
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
    return choice, apply_overrides(conf, cfg.overrides)


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
