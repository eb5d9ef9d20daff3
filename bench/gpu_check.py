"""The one-GPU device check: what the GPU path claims, measured within 8 minutes.

Phases, each with its own time budget (seconds; the whole fits 8 minutes = 480 s, the wheel
install in ``gpu_check.sh`` included):

========  ======  =====================================================================
phase     budget  what
========  ======  =====================================================================
install      25   ``gpu_check.sh``: carried wheels, ``pip install --no-index`` (not here)
smoke        60   ``images/smoke.py``: torch.compile + flex attention on a tiny model
inputs       90   random-weight Llama-3.2-1B checkpoint + 3,000 alpaca-length rows (70 s
                  on 2 loaded cores here)
full-ours   110   our ``torchtune-llama3.2-1b`` defaults, full fine-tune (compile warm-up)
full-kf      80   Kubeflow Trainer's runtime config (``1B_full``, 1 GPU), same data
lora-ours    95   ours with ``LoraConfig()`` (compile warm-up again)
report       10   ratio, targets, the markdown table
========  ======  =====================================================================

A phase past its budget is stopped and its row says so; the rest still run (the whole script
also stops at 480 s minus the install's share). Every row is printed as one JSON line and
stamped with the commit, the device, and the torch / CUDA / torchtune / torchao versions;
at the end a markdown table is printed and written, with the JSON lines, to ``--out``
(``$OUT`` when set). Figures: trainable and total tokens/s of the measured window, true peak
GPU memory (the recipe's per-step stats), MFU with 6N (full) / ~4N (LoRA) FLOPs per token
and, separately, with attention FLOPs (definitions: ``harness.py``).

``--dry-run`` runs the same phases on CPU with the tiny models, a few steps each, so that
the script itself is tested where there is no GPU (about a minute or two on 2 quiet cores;
its budgets are stretched 4x for shared CPUs); its GPU columns say "not measured".

    bash bench/gpu_check.sh              # on the GPU machine (see bench/README.md)
    bash bench/gpu_check.sh --dry-run    # here, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
import configs
import harness
import synth

TOTAL_S = 480
BUDGETS = {"install": 25, "smoke": 60, "inputs": 90, "full-ours": 110, "full-kf": 80,
           "lora-ours": 95, "report": 10}
assert sum(BUDGETS.values()) <= TOTAL_S
TARGET_RATIO, TARGET_MFU = 3.0, 0.45
DRY_RUN_SCALE = 4.0
NOT_MEASURED = "not measured"


class Clock:
    """Phase budgets inside one overall deadline.

    ``scale`` stretches every budget: 1 on the GPU machine; the CPU dry run uses 4, since it
    checks the script on a shared CPU (where a worker's torch import alone can take 30 s),
    not the GPU timing.
    """

    def __init__(self, spent_before: float, scale: float = 1.0) -> None:
        self.start = time.monotonic() - spent_before
        self.scale = scale

    def left(self) -> float:
        """Seconds left of the whole check."""
        return TOTAL_S * self.scale - (time.monotonic() - self.start)

    def budget(self, phase: str) -> float:
        """The phase's budget, cut to what is left (keeping the report's share)."""
        return max(1.0, min(BUDGETS[phase] * self.scale,
                            self.left() - BUDGETS["report"] * self.scale))


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this (main) thread after ``seconds``."""
    def _expired(*_: Any) -> None:
        raise TimeoutError(f"timed out after {seconds:.0f} s (its phase budget)")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def smoke(device: str, clock: Clock) -> dict[str, Any]:
    """Run the image smoke test when the checkout has it."""
    script = common.REPO / "images" / "smoke.py"
    row: dict[str, Any] = {"phase": "smoke", "budget_s": BUDGETS["smoke"]}
    if not script.exists():
        common.log("images/smoke.py is not in this checkout: smoke phase skipped")
        return {**row, "status": "skipped (images/smoke.py absent)"}
    # On GPU: --compile auto = torchtune's recipe compile + flex attention. The dry run checks
    # the call, not the CPU's compiler: eager only there.
    argv = [common.PYTHON, str(script), "--device", device,
            *(["--compile", "none"] if device == "cpu" else [])]
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=clock.budget("smoke"))
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        status, tail = f"timed out after {clock.budget('smoke'):.0f} s", []
    return {**row, "status": status, "seconds": round(time.monotonic() - started, 1),
            "tail": tail}


def measure(name: str, run: configs.RunConfig, out: Path, steps: tuple[int, int],
            method: str, clock: Clock, args: argparse.Namespace,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One training phase in its own process; the row with MFU and the stamp."""
    warmup, measured = steps
    settings = configs.describe(configs.for_bench(run, out / name, warmup, measured,
                                                  overrides=overrides))
    common.log(f"{name}: {run.recipe}, {settings}; budget {clock.budget(name):.0f} s")
    result = harness.launch(name, run, out, warmup, measured, overrides=overrides,
                            timeout=clock.budget(name))
    result.update(phase=name, method=method, budget_s=BUDGETS[name], settings=settings,
                  **common.stamp(args.device))
    harness.add_mfu(result, args.peak_tflops)
    return result


def targets(ours: dict[str, Any], kf: dict[str, Any], device: str) -> dict[str, Any]:
    """Ours / Kubeflow default (trainable tokens/s) and the issue's targets."""
    row: dict[str, Any] = {"phase": "targets", **common.stamp(device)}
    if "error" in ours or "error" in kf:
        return {**row, "status": "not measured (a training phase failed)"}
    ratio = ours["trainable_tokens_per_s"] / kf["trainable_tokens_per_s"]
    row["ratio_ours_vs_kubeflow"] = round(ratio, 2)
    if device != "cuda":
        return {**row, "status": f"{NOT_MEASURED} on GPU (CPU dry run; ratio of the tiny "
                                 "models says nothing about GPUs)"}
    mfu = ours.get("mfu")
    row.update(ratio_target=TARGET_RATIO, ratio_met=ratio >= TARGET_RATIO,
               mfu=mfu, mfu_target=TARGET_MFU,
               mfu_met=None if mfu is None else mfu >= TARGET_MFU)
    return row


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, float) else NOT_MEASURED


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the training rows (GPU columns: "not measured" on CPU)."""
    head = ["phase", "commit", "device", "torch", "torchtune", "recipe / settings",
            "trainable tok/s", "total tok/s", "padding", "peak GPU memory (alloc / reserved)",
            "MFU (6N full, ~4N LoRA)", "MFU incl. attention", "ours / Kubeflow"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratio = next((r.get("ratio_ours_vs_kubeflow") for r in rows if r["phase"] == "targets"),
                 None)
    for r in rows:
        if r["phase"] not in ("full-ours", "full-kf", "lora-ours"):
            continue
        if "error" in r:
            figures = ["-", "-", "-", r["error"][:100], "-", "-"]
        else:
            gpu = r["device"] != "cpu"
            figures = [
                common.fmt_num(r["trainable_tokens_per_s"]), common.fmt_num(r["real_tokens_per_s"]),
                f"{r['padding_fraction']:.0%}",
                (f"{r['peak_allocated_gib']:.1f} / {r['peak_reserved_gib']:.1f} GiB"
                 if gpu and "peak_allocated_gib" in r else NOT_MEASURED),
                _pct(r.get("mfu")) if gpu else NOT_MEASURED,
                _pct(r.get("mfu_with_attention")) if gpu else NOT_MEASURED,
            ]
        cell = f"{ratio:.2f}x" if r["phase"] == "full-ours" and ratio is not None else ""
        lines.append("| " + " | ".join([
            r["phase"], r["commit"], r["device"], r["torch"], r["torchtune"],
            f"{r.get('recipe', '-')}: {r['settings']}", *figures, cell]) + " |")
    return "\n".join(lines)


def run_check(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All phases; returns the rows (also printed as JSON lines)."""
    clock = Clock(args.install_seconds, DRY_RUN_SCALE if args.dry_run else 1.0)
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> dict[str, Any]:
        common.emit(row)
        rows.append(row)
        return row

    emit(smoke(args.device, clock))
    started = time.monotonic()
    spec = synth.SPECS["tiny-llama3.2" if args.dry_run else "llama3.2-1b"]
    row = {"phase": "inputs", "model": spec.name, "rows": args.rows,
           "budget_s": BUDGETS["inputs"], **common.stamp(args.device)}
    try:
        with deadline(clock.budget("inputs")):
            inputs = harness.prepare(spec, Path(args.work), args.rows, args.device)
    except TimeoutError as exc:
        emit({**row, "error": str(exc)})
        return rows
    emit({**row, "seconds": round(time.monotonic() - started, 1)})
    out = Path(args.work) / "runs" / f"gpu-check-{args.device}"
    ours, kf = harness.ours_and_anchor(inputs, args.device)
    fast = (1, 2) if args.dry_run else (3, 15)  # packed 2048 x bs 4: 8k tokens per step
    # Steps of 8 accumulated batches (the Kubeflow side unpacked; torchtune's LoRA config
    # packed, 64k tokens each: 5 steps use ~1,700 of the 3,000 rows).
    slow = (1, 1) if args.dry_run else (1, 4)
    # The tiny CPU runtime does not pack; the dry run packs anyway (to 256) so that the GPU
    # defaults' data path (packed batches, per-sample positions) is what it exercises.
    packed = {"dataset.packed": True, "tokenizer.max_seq_len": 256} if args.dry_run else None
    full = emit(measure("full-ours", ours, out, fast, "full", clock, args, packed))
    kf_row = emit(measure("full-kf", kf, out, slow, "full", clock, args))
    lora, _ = harness.ours_and_anchor(inputs, args.device, lora=True)
    emit(measure("lora-ours", lora, out, fast if args.dry_run else slow, "lora", clock, args,
                 packed))
    emit(targets(full, kf_row, args.device))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="same phases on CPU with the tiny models (no GPU needed)")
    p.add_argument("--rows", type=int, default=None, help="synthetic rows (3000; dry run 300)")
    p.add_argument("--work", default="/tmp/kfp-finetune-gpu-check")
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="folder for gpu_check.jsonl and gpu_check.md (default $OUT)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--install-seconds", type=float, default=0.0,
                   help="seconds the wheel install took (counted in the 8 minutes)")
    args = p.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    args.rows = args.rows or (300 if args.dry_run else 3000)
    if not args.dry_run and not common.gpu_name():
        raise SystemExit("gpu_check: no CUDA GPU is visible; on a CPU machine run "
                         "`bash bench/gpu_check.sh --dry-run`.")
    started = time.monotonic()
    rows = run_check(args)
    text = table(rows)
    total = time.monotonic() - started + args.install_seconds
    limit = TOTAL_S * (DRY_RUN_SCALE if args.dry_run else 1)
    summary = f"gpu_check: {total:.0f} s of {limit:.0f} s (install {args.install_seconds:.0f} s)"
    print(text + "\n\n" + summary, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.jsonl").write_text(
            "".join(json.dumps(r, default=str) + "\n" for r in rows))
        (out / "gpu_check.md").write_text(text + "\n\n" + summary + "\n")
    failed = [r["phase"] for r in rows if "error" in r or str(r.get("status", "")).startswith(
        ("failed", "timed out"))]
    if failed:
        common.log(f"phases that did not finish: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
