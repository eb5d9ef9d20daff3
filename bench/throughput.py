"""Training throughput: our runtime defaults versus Kubeflow Trainer's torchtune config.

Same model weights, same data (synthetic, alpaca-length rows), same number of optimizer
steps; each side in its own process, alternating, ``--repeats`` times. Prints one JSON line
per run and per summary, and appends one row per side to BENCHMARKS.md.

    python bench/throughput.py                       # CPU, tiny Llama 3.2 (~3-5 min, 2 cores)
    python bench/throughput.py --model tiny-qwen2.5
    python bench/throughput.py --device cuda --model llama3.2-1b   # real shape, random weights
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

import common
import configs
import harness
import synth

SECTION = "Training throughput: our defaults vs the Kubeflow Trainer anchor"
INTRO = """
Our runtime defaults (the config `render_config` produces, from the real initializer steps)
against the configuration of Kubeflow Trainer's runtime for the same model: torchtune's
`<family>/<size>_full` config with the manifest's overrides (`instruct_dataset`, parquet,
unpacked, its batch size / gradient accumulation / optimizer / no compile). Same weights, same
data, same number of optimizer steps. `bench/configs.py` documents both sides.

* **Data**: synthetic rows with alpaca's length distribution (`bench/synth.py`): with our
  alpaca builder a sample has median ~158, p90 ~344, max ~1000 tokens; the anchor's
  `instruct_dataset` drops the `instruction` column and the prompt template (median ~112).
* **Trainable tokens** = tokens whose label is not `-100` (the loss counts them); this is
  exactly what torchtune's `tokens_per_second_per_gpu` counts. **Total tokens** = real
  (non-padding) tokens, prompt included; padding is reported separately.
* **tok/s** = tokens in the measured window / its seconds; the window starts at the request
  of the first batch after the warm-up steps and ends after the last step, so data loading
  and the optimizer count, setup/compile-warm-up/checkpointing do not. Figures are
  `median [min–max]` over runs; one run each on GPU unless stated.
* **Memory**: GPU = the largest per-step peak (allocated / reserved) in the recipe's own metric
  log (`log_peak_memory_stats`: torchtune resets the CUDA peak after each logged step, so the
  counter read after training would miss the activations); CPU = peak RSS of the worker
  process (Python and libraries included, ~0.5–1 GiB of it).
* **MFU** (GPU, per GPU) = model FLOPs/s / chip's dense bf16 peak (H100 SXM / H200: 989
  TFLOP/s). Model FLOPs per token: 6N for full fine-tuning, 4N + 2·(adapter parameters) ≈ 4N
  for LoRA (frozen weights get no weight gradients); N = all parameters (tied embedding once).
  Attention FLOPs are *not* in MFU; the figure in brackets adds them: 12 · layers · heads ·
  head_dim · (keys each real token attends to, causal within its packed sample), counted from
  the data.
* **CPU rows** approximate the anchor with `full_finetune_single_device`, `device=cpu` and our
  CPU dtype (fp32), since `full_finetune_distributed` needs GPUs; the tiny model (2 layers,
  hidden 64, ~5k vocabulary) makes per-step overhead dominate, so CPU ratios say little about
  GPU ratios. **GPU rows** run the anchor's `full_finetune_distributed` on 1 GPU
  (`--nproc_per_node 1`, per-GPU figures, no inter-GPU traffic: favourable to the anchor).
"""
HEADER = ["date", "machine", "versions", "command", "model", "side", "recipe", "settings",
          "steps×runs", "trainable tok/s", "total tok/s", "padding", "peak memory", "MFU",
          "ours/anchor (trainable tok/s)", "load"]


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if common.gpu_name() else "cpu"


def compare(
    spec: synth.ModelSpec, device: str, work: Path, rows: int, warmup: int, steps: int,
    repeats: int, record: bool, peak_tflops: float | None = None,
    timeout: float | None = None, lora: bool = False,
) -> dict[str, Any]:
    """Run ours and the anchor ``repeats`` times each; emit and record the summaries.

    With ``lora``, both sides fine-tune LoRA adapters (ours: our runtime with ``LoraConfig()``;
    the anchor: Kubeflow Trainer's single-GPU LoRA config), MFU counted with ~4N FLOPs/token.
    """
    inputs = harness.prepare(spec, work, rows, device)
    ours, anchor = harness.ours_and_anchor(inputs, device, lora=lora)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "anchor": []}
    sides = {"ours": ours, "anchor": anchor}
    kind = "lora" if lora else "full"
    for rep in range(repeats):
        order = ["ours", "anchor"] if rep % 2 == 0 else ["anchor", "ours"]
        for side in order:
            common.log(f"{spec.name} {kind} {side} run {rep + 1}/{repeats} "
                       f"({sides[side].recipe})")
            out = work / "runs" / f"throughput-{spec.name}-{kind}-{device}" / f"{side}-{rep}"
            result = harness.launch(side, sides[side], out, warmup, steps, timeout=timeout)
            result.update(benchmark="throughput", model=spec.name, side=side, repeat=rep,
                          method=kind, **common.stamp(device))
            harness.add_mfu(result, peak_tflops)
            common.emit(result)
            runs[side].append(result)
    summaries = {}
    for side in ("ours", "anchor"):
        ok = [r for r in runs[side] if "error" not in r]
        summaries[side] = {
            "benchmark": "throughput-summary", "model": spec.name, "side": side,
            "method": kind, **common.stamp(device), "recipe": sides[side].recipe,
            "settings": configs.describe(configs.for_bench(sides[side], work, warmup, steps)),
            "runs": len(ok), "errors": [r["error"] for r in runs[side] if "error" in r],
            "trainable_tokens_per_s": common.summary(
                [r["trainable_tokens_per_s"] for r in ok]),
            "real_tokens_per_s": common.summary([r["real_tokens_per_s"] for r in ok]),
            "padding_fraction": common.summary([r["padding_fraction"] for r in ok]),
            "mfu": common.summary([r["mfu"] for r in ok if r.get("mfu") is not None]),
            "mfu_with_attention": common.summary(
                [r["mfu_with_attention"] for r in ok if r.get("mfu_with_attention") is not None]),
            "memory": harness.memory_text(ok[0]) if ok else "-",
            "params": ok[0]["params"] if ok else None,
            "gpu": ok[0].get("gpu") if ok else None,
        }
    o, a = (summaries[s]["trainable_tokens_per_s"]["median"] for s in ("ours", "anchor"))
    ratio = o / a if a == a and a else float("nan")
    summaries["ours"]["ratio_vs_anchor"] = ratio
    for side in ("ours", "anchor"):
        common.emit(summaries[side])
    if record:
        _record(spec, device, warmup, steps, summaries, runs, ratio, kind)
    return summaries


def _record(spec: synth.ModelSpec, device: str, warmup: int, steps: int,
            summaries: dict[str, Any], runs: dict[str, list[dict[str, Any]]],
            ratio: float, kind: str = "full") -> None:
    today = datetime.date.today().isoformat()
    for side in ("ours", "anchor"):
        s = summaries[side]
        ok = [r for r in runs[side] if "error" not in r]
        if not ok:
            cells = ["-"] * 5 + [f"failed: {'; '.join(s['errors'])[:200]}"]
        else:
            mfu = s["mfu"]
            cells = [
                common.fmt_spread([r["trainable_tokens_per_s"] for r in ok], 0),
                common.fmt_spread([r["real_tokens_per_s"] for r in ok], 0),
                f"{s['padding_fraction']['median']:.0%}",
                s["memory"],
                _mfu_cell(mfu, s["mfu_with_attention"]),
                f"{ratio:.2f}x" if side == "ours" else "",
            ]
        common.append_row(SECTION, INTRO, HEADER, [
            today, common.machine(device), common.versions_short(), f"`{common.command_line()}`",
            f"{spec.name} ({device}, N={s['params'] or 0:,}, {kind})", side, s["recipe"],
            s["settings"], f"{warmup}+{steps} × {len(ok)}", *cells, common.load_average(),
        ])


def _mfu_cell(mfu: dict[str, float], with_attention: dict[str, float]) -> str:
    if not mfu["n"]:
        return "-"
    extra = f" ({with_attention['median']:.1%} w/ attn)" if with_attention["n"] else ""
    return f"{mfu['median']:.1%}{extra}"


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, choices=sorted(synth.SPECS),
                   help="model (default: tiny-llama3.2 on CPU, llama3.2-1b on GPU)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--warmup", type=int, default=None, help="unmeasured optimizer steps")
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps")
    p.add_argument("--repeats", type=int, default=None, help="runs per side")
    p.add_argument("--rows", type=int, default=None, help="rows of synthetic data")
    p.add_argument("--work", default="/tmp/kfp-finetune-bench", help="scratch folder")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the GPU for MFU (default: known chips)")
    p.add_argument("--lora", action="store_true",
                   help="LoRA on both sides (ours: LoraConfig(); anchor: the model's "
                   "<size>_lora_single_device config)")
    p.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    device = args.device or default_device()
    gpu = device == "cuda"
    model = args.model or ("llama3.2-1b" if gpu else "tiny-llama3.2")
    compare(
        synth.SPECS[model], device, Path(args.work),
        rows=args.rows or (4000 if gpu else 1000),
        warmup=args.warmup if args.warmup is not None else (5 if gpu else 1),
        steps=args.steps or (15 if gpu else 3),
        repeats=args.repeats or (1 if gpu else 3),
        record=not args.no_record, peak_tflops=args.peak_tflops, lora=args.lora,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
