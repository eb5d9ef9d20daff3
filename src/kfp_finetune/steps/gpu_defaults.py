"""GPU defaults that depend on the machine: the card's memory, the run's length.

The runtimes' memory rules (``runtimes.MemoryRule``: activation checkpointing, the 70B
optimizer's CPU offload) are applied for the memory of the training node's cards, which the
fine-tune step reads on that node (``detect_gpu_memory_gib``); the LoRA configs' warm-up is
capped at a share of the optimizer steps the recipe counts after packing
(``kfp_finetune.plugins.lr_schedules``). The README's runtime table gives each value and its reason.
"""

from __future__ import annotations

from typing import Any

from kfp_finetune.config.runtimes import RuntimeSpec

# The cosine warm-up of torchtune's LoRA configs (100 steps) is capped at this share of the
# run's optimizer steps, counted by the recipe after packing
# (see kfp_finetune.plugins.lr_schedules).
MAX_WARMUP_FRACTION = 0.1
_COSINE = "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup"
CAPPED_COSINE = "kfp_finetune.plugins.lr_schedules.cosine_with_capped_warmup"


def memory_defaults(runtime: RuntimeSpec, gpus: int, gpu_memory_gib: float | None,
                    lora: bool = False) -> dict[str, Any]:
    """The runtime's GPU-memory-dependent defaults for cards of ``gpu_memory_gib`` GiB.

    Args:
        runtime: The runtime (its ``memory_rules``).
        gpus: GPUs per node of this run (0: CPU).
        gpu_memory_gib: Memory of one card, or None when unknown.
        lora: A LoRA/QLoRA run (rules for full fine-tuning only are skipped).

    Returns:
        ``{setting: value}``; empty on CPU or when the memory is unknown (the torchtune
        config's values stay).
    """
    if gpus <= 0 or gpu_memory_gib is None:
        return {}
    out = {}
    for rule in runtime.memory_rules:
        if rule.full_only and lora:
            continue
        need = rule.threshold_gib(gpus, runtime.default_gpus, runtime.param_count)
        out[rule.setting] = rule.value if gpu_memory_gib >= need else rule.below
    return out


def detect_gpu_memory_gib() -> float | None:
    """Memory of the smallest visible NVIDIA GPU in GiB, from ``nvidia-smi`` (None without).

    ``nvidia-smi`` rather than torch: a CUDA context in the step's own process would hold
    ~0.5 GiB of GPU 0 for the whole of ``tune run``.
    """
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        sizes = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return round(min(sizes) / 1024, 1) if sizes else None


def cap_warmup(conf: dict[str, Any]) -> None:
    """Cap the config's cosine warm-up at a share of the run (counted after packing).

    Args:
        conf: The rendered config; its ``lr_scheduler`` is replaced in place when it is
            torchtune's cosine schedule with warm-up (the LoRA configs').
    """
    scheduler = conf.get("lr_scheduler")
    if isinstance(scheduler, dict) and scheduler.get("_component_") == _COSINE:
        conf["lr_scheduler"] = {**scheduler, "_component_": CAPPED_COSINE,
                                "max_warmup_fraction": MAX_WARMUP_FRACTION}
