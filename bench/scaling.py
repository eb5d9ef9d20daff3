"""Scaling of our defaults: tokens/s and peak memory against sequence length and batch size.

Our rendered config (from the real steps, so the current defaults) with only
``tokenizer.max_seq_len`` and ``batch_size`` changed, and packing on (so a batch holds
``batch_size x max_seq_len`` positions and the sequence length really varies). Every grid point
runs in its own worker process, smallest batch first; one JSON line per point, one BENCHMARKS.md
row per point (our default point is marked). Each point runs in its own worker process.

    python bench/scaling.py                         # CPU, tiny Llama 3.2 (~4-6 min, 2 cores)
    python bench/scaling.py --device cuda --model llama3.2-1b --batch-sizes 1,2,4,8,16
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
from throughput import default_device

SECTION = "Scaling with sequence length and batch size (our defaults)"
INTRO = """
Our rendered config with `dataset.packed=True`, `tokenizer.max_seq_len=L` and `batch_size=B`
changed, everything else as our defaults have it; ★ marks the point our defaults use (when
they pack). Same synthetic alpaca-length data as the throughput table; trainable/total tokens,
window, memory and MFU are defined there. Each grid point runs in its own process (flex
attention recompiles per shape and torch._dynamo stops after 8 recompiles; peaks and caches
must not carry over).
"""
HEADER = ["date", "machine", "versions", "command", "model", "max_seq_len", "batch", "steps",
          "trainable tok/s", "total tok/s", "padding", "peak memory", "MFU", "load"]


def grid(
    spec: synth.ModelSpec, device: str, work: Path, rows: int, seq_lens: list[int],
    batch_sizes: list[int], warmup: int, steps: int, record: bool,
    peak_tflops: float | None = None, timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Run the grid and emit/record one row per point."""
    inputs = harness.prepare(spec, work, rows, device)
    ours = configs.ours(inputs.ws, spec.runtime, inputs.gpus,
                        gpu_memory_gib=harness.card_memory_gib(device))
    default_len = ours.conf.get("tokenizer", {}).get("max_seq_len")
    default_bs = ours.conf.get("batch_size")
    default_packed = bool(ours.conf.get("dataset", {}).get("packed"))
    points = sorted(((s, b) for s in seq_lens for b in batch_sizes), key=lambda p: p[0] * p[1])
    common.log(f"scaling grid of {len(points)} points on {device}, one process each; our "
               f"default: packed={default_packed} max_seq_len={default_len} "
               f"batch_size={default_bs}")
    out = work / "runs" / f"scaling-{spec.name}-{device}"
    results = [
        harness.launch(f"L{seq}-B{bs}", ours, out, warmup, steps, timeout=timeout,
                       overrides={"dataset.packed": True, "tokenizer.max_seq_len": seq,
                                  "batch_size": bs})
        for seq, bs in points
    ]
    by_name = {r["name"]: r for r in results}
    today = datetime.date.today().isoformat()
    for seq, bs in points:
        r = by_name[f"L{seq}-B{bs}"]
        r.update(benchmark="scaling", model=spec.name, max_seq_len=seq, batch_size=bs,
                 is_default=default_packed and seq == default_len and bs == default_bs,
                 default={"packed": default_packed, "max_seq_len": default_len,
                          "batch_size": default_bs})
        r.update(common.stamp(device))
        harness.add_mfu(r, peak_tflops)
        common.emit(r)
        if not record:
            continue
        if "error" in r:
            figures = ["-", "-", "-", r["error"][:120], "-"]
        else:
            figures = [common.fmt_num(r["trainable_tokens_per_s"]),
                       common.fmt_num(r["real_tokens_per_s"]),
                       f"{r['padding_fraction']:.0%}", harness.memory_text(r),
                       f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"]
        common.append_row(SECTION, INTRO, HEADER, [
            today, common.machine(device), common.versions_short(), f"`{common.command_line()}`",
            f"{spec.name} ({device})", f"{seq}{' ★' if r['is_default'] else ''}", str(bs),
            f"{warmup}+{steps}", *figures, common.load_average(),
        ])
    if record and not default_packed:
        common.log(f"note: our defaults do not pack (max_seq_len={default_len}, "
                   f"batch_size={default_bs}); no grid point is marked")
    return results


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, choices=sorted(synth.SPECS))
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--seq-lens", default="256,512,1024,2048")
    p.add_argument("--batch-sizes", default=None, help="default: 1,2 on CPU, 1,2,4,8 on GPU")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--work", default="/tmp/kfp-finetune-bench")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    device = args.device or default_device()
    gpu = device == "cuda"
    grid(
        synth.SPECS[args.model or ("llama3.2-1b" if gpu else "tiny-llama3.2")], device,
        Path(args.work), rows=args.rows or (4000 if gpu else 1000),
        seq_lens=_ints(args.seq_lens),
        batch_sizes=_ints(args.batch_sizes or ("1,2,4,8" if gpu else "1,2")),
        warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
        steps=args.steps or (10 if gpu else 2),
        record=not args.no_record, peak_tflops=args.peak_tflops,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
