"""Learning-rate schedules named in the rendered torchtune configs.

torchtune's LoRA configs warm up for a fixed ``num_warmup_steps: 100``. How many optimizer
steps a run has is only known inside the recipe, after the dataset is packed
(``steps_per_epoch = len(dataloader) // gradient_accumulation_steps``, times the epochs): a
packed alpaca-sized set on one GPU may give ~150 steps, two thirds of them warm-up. The
recipe passes that number to the scheduler builder (``_setup_lr_scheduler`` in torchtune's
``recipes/lora_finetune_single_device.py`` and ``lora_finetune_distributed.py``:
``config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=..., last_epoch=...)``),
so a builder of ours caps the warm-up there, at the moment the count is exact.
"""

from __future__ import annotations

import math
from typing import Any


def warmup_steps(num_warmup_steps: int, num_training_steps: int,
                 max_warmup_fraction: float) -> int:
    """The warm-up length: the config's, at most ``max_warmup_fraction`` of all steps.

    Args:
        num_warmup_steps: Warm-up steps the config asks for.
        num_training_steps: Optimizer steps of the whole run (all epochs).
        max_warmup_fraction: Largest share of the run spent warming up (0 < f <= 1).

    Returns:
        ``min(num_warmup_steps, ceil(f * num_training_steps))``, at least 1 when the config
        asks for any warm-up and the run has steps.
    """
    if num_warmup_steps <= 0 or num_training_steps <= 0:
        return max(0, num_warmup_steps)
    cap = max(1, math.ceil(max_warmup_fraction * num_training_steps))
    return min(num_warmup_steps, cap)


def cosine_with_capped_warmup(
    optimizer: Any,
    num_warmup_steps: int,
    num_training_steps: int,
    max_warmup_fraction: float = 0.1,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
) -> Any:
    """The cosine schedule of torchtune with warm-up, the warm-up capped by the run's length.

    Args:
        optimizer: The optimizer (passed by the recipe).
        num_warmup_steps: Warm-up steps from the config (the upper bound).
        num_training_steps: Optimizer steps of the run (passed by the recipe).
        max_warmup_fraction: Largest share of the run spent warming up.
        num_cycles: As torchtune's ``get_cosine_schedule_with_warmup``.
        last_epoch: As torchtune's (the recipe passes it when resuming).

    Returns:
        The ``LambdaLR`` that torchtune's ``get_cosine_schedule_with_warmup`` builds.

    Raises:
        ValueError: ``max_warmup_fraction`` is not in (0, 1].
    """
    from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

    if not 0 < max_warmup_fraction <= 1:
        raise ValueError(
            f"lr_scheduler.max_warmup_fraction={max_warmup_fraction!r} must be in (0, 1], e.g. "
            "0.1 for at most a tenth of the run."
        )
    steps = warmup_steps(int(num_warmup_steps), int(num_training_steps), max_warmup_fraction)
    return get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=steps, num_training_steps=num_training_steps,
        num_cycles=num_cycles, last_epoch=last_epoch,
    )
