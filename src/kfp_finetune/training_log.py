"""Reading the per-step metrics that torchtune's DiskLogger writes."""

from __future__ import annotations

import re
from pathlib import Path

_STEP = re.compile(r"^Step (\d+) \| (.*)$")


def read_metric_rows(log_dir: Path) -> list[dict[str, float]]:
    """Every logged step as ``{"step": n, "loss": ..., "lr": ..., ...}``, oldest first."""
    rows: list[dict[str, float]] = []
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
            rows.append(row)
    return rows


def read_metrics(log_dir: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` for every logged step, oldest first."""
    return [(int(r["step"]), r["loss"]) for r in read_metric_rows(log_dir) if "loss" in r]
