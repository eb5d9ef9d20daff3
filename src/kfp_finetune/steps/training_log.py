"""Reading the per-step metrics that torchtune's DiskLogger writes, and summarising them."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

_STEP = re.compile(r"^Step (\d+) \| (.*)$")


def read_metric_rows(log_dir: Path) -> list[dict[str, float]]:
    """Every logged step as ``{"step": n, "loss": ..., "lr": ..., ...}``, in step order.

    A step logged twice (a resumed run repeats the steps after its last checkpoint) keeps its
    last value.
    """
    rows: dict[int, dict[str, float]] = {}
    for path in sorted(Path(log_dir).glob("*.txt")):
        for line in path.read_text().splitlines():
            match = _STEP.match(line.strip())
            if not match:
                continue
            row: dict[str, float] = {"step": float(match.group(1))}
            for item in match.group(2).split():
                key, _, value = item.partition(":")
                try:
                    row[key] = float(value)
                except ValueError:
                    continue
            rows[int(match.group(1))] = row
    return [rows[step] for step in sorted(rows)]


def losses(rows: list[dict[str, float]]) -> list[tuple[int, float]]:
    """``(step, loss)`` of the rows that logged a loss, in their order."""
    return [(int(r["step"]), r["loss"]) for r in rows if "loss" in r]


def read_metrics(log_dir: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` for every logged step, in step order."""
    return losses(read_metric_rows(log_dir))


def summarize(rows: list[dict[str, float]], processes: int) -> dict[str, Any]:
    """Figures for the KFP UI: losses, trainable tokens per second, peak memory, steps.

    Args:
        rows: Output of :func:`read_metric_rows`.
        processes: Training processes (GPUs); torchtune logs tokens/s per process.

    Returns:
        ``final_loss``, ``best_loss``, ``steps``, ``trainable_tokens_per_second`` (median
        over steps after the first, all processes) and ``peak_memory_gib`` (None on CPU).
    """
    losses = [r["loss"] for r in rows if "loss" in r]
    tps = [r["tokens_per_second_per_gpu"] for r in rows if "tokens_per_second_per_gpu" in r]
    steady = tps[1:] or tps  # the first step includes warm-up (and compilation)
    peaks = [r[k] for r in rows for k in ("peak_memory_reserved", "peak_memory_active") if k in r]
    return {
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "steps": len(rows),
        "trainable_tokens_per_second": (
            round(statistics.median(steady) * processes, 1) if steady else None
        ),
        "peak_memory_gib": round(max(peaks), 3) if peaks else None,
    }
