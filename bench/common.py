"""Shared helpers of the benchmarks: machine description, JSON lines, BENCHMARKS.md rows, stats.

Every benchmark prints one JSON object per measurement on stdout (``emit``) and appends one
markdown row per summary to its own table in ``BENCHMARKS.md`` (``append_row``). Each benchmark
owns one ``## <section>`` of that file; other sections are never touched.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
PYTHON = sys.executable


def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo (or platform)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_gib() -> float:
    """Physical memory in GiB."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def gpu_name() -> str | None:
    """Name of GPU 0, or None without CUDA."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA install just means "no GPU"
        pass
    return None


def machine(device: str = "cpu") -> str:
    """One-line machine description for a table row."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu_name()}, {cores} cores, {total_ram_gib():.0f} GiB"
    if device.startswith("cuda"):
        text = f"{gpu_name() or 'GPU?'}; host {text}"
    return text


def versions() -> dict[str, str]:
    """Versions of the packages the figures depend on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "torchtune", "torchao", "kfp", "kfp-finetune"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    try:
        import torch

        if torch.version.cuda:
            out["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return out


def versions_short() -> str:
    """``torch 2.x, torchtune 0.6.1, ..., commit abc1234`` for a table row."""
    v = versions()
    keys = ["torch", "cuda", "torchtune", "kfp"]
    return ", ".join(f"{k} {v[k]}" for k in keys if k in v) + f", commit {git_rev()}"


COMMIT_FILE = ".whl/COMMIT"


def git_rev() -> str:
    """Short commit of the working tree, with ``+dirty`` when it has changes.

    Where the tree is a copy without ``.git`` (the device machine), the commit comes from
    ``$KFP_FINETUNE_COMMIT`` or from ``.whl/COMMIT``, written by ``bench/prepare_wheels.sh``
    when it packed the wheels; ``-`` when none is known.
    """
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    if os.environ.get("KFP_FINETUNE_COMMIT"):
        return os.environ["KFP_FINETUNE_COMMIT"]
    try:
        return (REPO / COMMIT_FILE).read_text().strip() or "-"
    except OSError:
        return "-"


def stamp(device: str = "cpu") -> dict[str, str]:
    """What every result row carries: commit, device, machine, versions, load."""
    v = versions()
    return {
        "commit": git_rev(),
        "device": (gpu_name() or "GPU?") if device.startswith("cuda") else "cpu",
        "machine": machine(device),
        "torch": v.get("torch", "-"), "cuda": v.get("cuda", "-"),
        "torchtune": v.get("torchtune", "-"), "torchao": v.get("torchao", "-"),
        "python": v.get("python", "-"), "load": load_average(),
    }


def load_average() -> str:
    """1-minute load average, to judge how noisy a run was."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "-"


def command_line() -> str:
    """The command that ran this benchmark, as the user would type it."""
    args = " ".join(sys.argv[1:])
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return f"python {script} {args}".strip()


def emit(record: dict[str, Any]) -> None:
    """Print one measurement as a JSON line on stdout."""
    print(json.dumps(record, sort_keys=False, default=str), flush=True)


def log(message: str) -> None:
    """Progress on stderr (stdout carries only JSON lines)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- statistics


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, standard deviation and count."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"),
                "stdev": float("nan"), "n": 0}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def fmt_spread(values: Sequence[float], digits: int = 1) -> str:
    """``median [min–max]`` (or just the value for a single run)."""
    s = summary(values)
    if s["n"] == 0:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def fmt_num(value: float | None, digits: int = 0) -> str:
    """Thousands-separated number, ``-`` for None/NaN."""
    if value is None or value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


# ----------------------------------------------------------------------------- BENCHMARKS.md

_HEADING = re.compile(r"^## ")


def _ensure_file() -> list[str]:
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text(
            "# Benchmarks\n\nFigures measured by the scripts in `bench/` (see `bench/README.md`). "
            "Each row names its machine, versions and the command that produced it.\n"
        )
    return BENCHMARKS_MD.read_text().splitlines()


def append_row(section: str, intro: str, header: Sequence[str], row: Sequence[str]) -> None:
    """Append ``row`` to the table of ``## section`` in BENCHMARKS.md.

    The section (heading, ``intro`` text and table header) is created at the end of the file
    when missing. Only the lines of this section change; other sections stay as they are.
    A table whose header differs from ``header`` gets a new table below it.

    Args:
        section: Heading text after ``## ``.
        intro: Markdown paragraph(s) written under a new heading (definitions, caveats).
        header: Column names.
        row: Cell texts (``|`` is escaped).
    """
    lines = _ensure_file()
    head = "| " + " | ".join(header) + " |"
    rule = "|" + "|".join("---" for _ in header) + "|"
    cells = "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |"
    title = f"## {section}"
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == title)
    except StopIteration:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["", title, "", intro.strip(), "", head, rule, cells]
        BENCHMARKS_MD.write_text("\n".join(lines) + "\n")
        return
    end = next(
        (i for i in range(start + 1, len(lines)) if _HEADING.match(lines[i])), len(lines)
    )
    body = lines[start + 1:end]
    header_at = max((i for i, line in enumerate(body) if line.strip() == head), default=None)
    if header_at is None:
        while body and not body[-1].strip():
            body.pop()
        body += ["", head, rule, cells, ""]
    else:
        last = header_at + 1
        while last + 1 < len(body) and body[last + 1].startswith("|"):
            last += 1
        body.insert(last + 1, cells)
        if end < len(lines) and (not body or body[-1].strip()):
            body.append("")
    BENCHMARKS_MD.write_text("\n".join(lines[:start + 1] + body + lines[end:]) + "\n")


# ----------------------------------------------------------------------------- processes


def run_logged(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
    cwd: Path | None = None, timeout: float | None = None,
) -> tuple[int, float, list[tuple[float, str]]]:
    """Run a command, timestamping every output line (stdout and stderr together).

    Returns:
        Exit code, wall seconds, and ``(seconds since start, line)`` for every line. The log
        file gets the same lines with their timestamps.
    """
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if env:
        full_env.update(env)
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    with open(log_path, "w") as out, subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=full_env, cwd=cwd, bufsize=1, errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # universal newlines: tqdm's \r updates arrive as lines too
            t = time.perf_counter() - start
            line = line.rstrip("\n")
            lines.append((t, line))
            out.write(f"{t:9.3f} {line}\n")
            if timeout is not None and t > timeout:
                proc.kill()
        code = proc.wait()
    return code, time.perf_counter() - start, lines
