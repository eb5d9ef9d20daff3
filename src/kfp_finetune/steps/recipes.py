"""Which torchtune recipe and built-in config a run uses.

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

torchtune's config registry is read from its source file, without importing torchtune
(which pulls in torch).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kfp_finetune.config.runtimes import RuntimeSpec
from kfp_finetune.config.types import LoraConfig
from kfp_finetune.errors import ConfigError


class RecipeInputs(Protocol):
    """What the choice depends on (``tune_config.ResolvedConfig`` has both)."""

    @property
    def gpus(self) -> int:
        """GPUs per node (0: CPU)."""

    @property
    def peft(self) -> LoraConfig | None:
        """The LoRA settings, or None for full fine-tuning."""


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


def select_recipe(runtime: RuntimeSpec, cfg: RecipeInputs) -> RecipeChoice:
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
