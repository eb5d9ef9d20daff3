"""GPU throughput and MFU: our defaults vs the Kubeflow Trainer anchor on real model shapes.

Builds random-weight checkpoints of the real Llama-3.2-1B and Qwen2.5-1.5B shapes (torchtune's
``llama3_2_1b`` / ``qwen2_5_1_5b_instruct`` builders, converted with ``tune_to_hf`` /
``qwen2_tune_to_hf``, bf16 safetensors + config.json, synthetic tokenizer files: see
``bench/synth.py``) and synthetic alpaca-length data, runs our defaults and the anchor for the
same number of optimizer steps on each model (``bench/throughput.py``), then the sequence
length x batch size grid of our defaults on Llama-3.2-1B (``bench/scaling.py``, one process per
point). Prints JSON lines, appends rows to BENCHMARKS.md and ends with a check of the targets
(>= 3x the anchor's trainable tokens/s on Llama-3.2-1B, >= 45 % MFU).

This is the long benchmark; it has never been timed on a GPU (two models, a 16-point grid with
a compile per point: well over a 15-minute device allowance). For a check that fits one, use
``bench/gpu_check.sh`` (under 8 minutes, see bench/README.md).

    python bench/gpu_throughput.py                        # one GPU, long (untimed)
    python bench/gpu_throughput.py --device cpu --tiny    # the same, end to end, tiny models, CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import common
import scaling
import synth
import throughput


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--tiny", action="store_true",
                   help="tiny models of the same architectures (for a CPU run end to end)")
    p.add_argument("--models", default="llama,qwen", help="llama, qwen or both (comma list)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps (compile etc.)")
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps")
    p.add_argument("--repeats", type=int, default=1, help="runs per side")
    p.add_argument("--rows", type=int, default=None, help="rows of synthetic data")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--seq-lens", default="256,512,1024,2048")
    p.add_argument("--batch-sizes", default=None, help="scaling grid (default 1,2,4,8; tiny 1)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU when the GPU is not in bench/harness.py")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    p.add_argument("--work", default="/tmp/kfp-finetune-bench")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not common.gpu_name():
        raise SystemExit("no CUDA GPU is visible; on a CPU machine run with --device cpu --tiny")
    cpu = args.device == "cpu"
    names = {"llama": "tiny-llama3.2" if args.tiny else "llama3.2-1b",
             "qwen": "tiny-qwen2.5" if args.tiny else "qwen2.5-1.5b"}
    models = [names[m.strip()] for m in args.models.split(",") if m.strip()]
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 5)
    steps = args.steps or (2 if cpu else 15)
    rows = args.rows or (600 if cpu else 4000)
    work = Path(args.work)
    started = time.perf_counter()
    checks = []
    for name in models:
        spec = synth.SPECS[name]
        s = throughput.compare(spec, args.device, work, rows, warmup, steps, args.repeats,
                               record=not args.no_record, peak_tflops=args.peak_tflops,
                               timeout=args.timeout)
        mfu = s["ours"]["mfu"]["median"]
        checks.append({
            "benchmark": "gpu-targets", "model": name, "device": args.device,
            "ratio_vs_anchor": s["ours"]["ratio_vs_anchor"],
            "ratio_target_3x_met": (s["ours"]["ratio_vs_anchor"] >= 3.0
                                    if "llama" in name else None),
            "ours_mfu": mfu if mfu == mfu else None,
            "mfu_target_45pct_met": (mfu >= 0.45) if mfu == mfu else None,
        })
    if not args.skip_scaling:
        batch_sizes = args.batch_sizes or ("1" if cpu else "1,2,4,8")
        seq_lens = args.seq_lens if not cpu or args.seq_lens != "256,512,1024,2048" else "256,512"
        scaling.grid(synth.SPECS[models[0]], args.device, work, rows,
                     [int(x) for x in seq_lens.split(",")],
                     [int(x) for x in batch_sizes.split(",")],
                     warmup=1 if cpu else 3, steps=2 if cpu else 10,
                     record=not args.no_record, peak_tflops=args.peak_tflops,
                     timeout=args.timeout)
    for check in checks:
        common.emit(check)
    common.log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
