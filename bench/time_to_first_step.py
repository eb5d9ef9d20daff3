"""Time from the fine-tune step's start to its first optimizer step, with and without the store.

*Before*: the fine-tune step as it was: torchtune's ``PackedDataset`` tokenizes and packs the
whole dataset (single-threaded) during the recipe's setup. *After*: the tokenize-dataset step
has written ``<workspace>/tokenized`` first, and the fine-tune step feeds it to the recipe
through ``kfp_finetune.plugins.packed_data.pretokenized_dataset``.

Both sides call the real ``finetune.run_fine_tune`` on the same workspace (filled by the real
initializer steps from ``synth``'s alpaca-length rows and tiny Llama-3.2 checkpoint), packed to
``--max-seq-len``; the clock starts when ``run_fine_tune`` is called and stops when the recipe's
``DiskLogger`` writes step 1 (``log_every_n_steps=1``: after the first optimizer step). Runs
alternate ABBA. The tokenize-dataset step is timed on its own, with each ``--workers`` count.

    python bench/time_to_first_step.py [--rows 52000] [--repeats 2] [--workers 1,2]

Prints one JSON line per measurement and a markdown table; appends the rows to BENCHMARKS.md
(``--no-record`` to skip).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import synth  # noqa: E402
from configs import fill_workspace  # noqa: E402

from kfp_finetune.config.types import TorchTuneConfig  # noqa: E402
from kfp_finetune.steps.fine_tune import run_fine_tune  # noqa: E402
from kfp_finetune.steps.tokenize_dataset import TOKENIZED_DIR, tokenize_dataset  # noqa: E402

SECTION = "Time to first step: tokenizing before the GPU step"
INTRO = """\
What: the fine-tune step's time from its start (`run_fine_tune` called) to its first optimizer
step (the recipe logs step 1), **before** (torchtune's `PackedDataset` tokenizes and packs the
dataset single-threaded in the recipe's setup, on the GPU node) and **after** (the
tokenize-dataset task wrote `<workspace>/tokenized` on a CPU node first; the recipe reads it
through `kfp_finetune.plugins.packed_data.pretokenized_dataset`).
Data: `bench/synth.py`'s alpaca-length
rows (52k, as tatsu-lab/alpaca), tiny Llama-3.2 checkpoint (`torchtune-llama3.2-tiny`, CPU
recipe), packed to 2048, batch 4. Both sides include starting `tune run` (Python, torch and
torchtune imports), model and optimizer setup, the first step. The tokenize-dataset task is
timed separately, with 1 and with all cores. `median [min–max]` over ABBA-ordered runs.
"""
HEADER = ["date", "commit", "machine", "versions", "command", "rows", "packs", "before s",
          "after s", "saved s", "tokenize task s (workers)", "tokenize rows/s (workers)", "load"]


def _first_step_seconds(ws: Path, config: TorchTuneConfig) -> tuple[float, list[str]]:
    """Run the fine-tune step; return seconds until step 1 is logged, and its log lines."""
    out = ws / "output"
    shutil.rmtree(out, ignore_errors=True)  # a finished run would be skipped, not re-trained
    metrics = out / "checkpoints" / "logs" / "metrics.txt"
    lines: list[str] = []
    first: list[float] = []
    done = threading.Event()

    def watch(start: float) -> None:
        while not done.is_set():
            try:
                if "Step 1 " in metrics.read_text():
                    first.append(time.monotonic() - start)
                    return
            except OSError:
                pass
            time.sleep(0.02)

    start = time.monotonic()
    watcher = threading.Thread(target=watch, args=(start,), daemon=True)
    watcher.start()
    try:
        run_fine_tune(ws, "torchtune-llama3.2-tiny", config, log=lines.append)
    finally:
        done.set()
        watcher.join()
    if not first:
        raise RuntimeError("no step was logged; last lines:\n" + "\n".join(lines[-15:]))
    return first[0], lines


def _tokenize(ws: Path, config: TorchTuneConfig, workers: int) -> dict[str, float]:
    shutil.rmtree(ws / TOKENIZED_DIR, ignore_errors=True)
    result = tokenize_dataset(ws, "torchtune-llama3.2-tiny", config, log=common.log,
                              workers=workers)
    return result.ui_metrics()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print JSON lines and the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=52_000)
    parser.add_argument("--repeats", type=int, default=2, help="ABBA pairs")
    parser.add_argument("--workers", default="1,0", help="tokenize worker counts (0: all)")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kfp-finetune-bench"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)

    spec = synth.SPECS["tiny-llama3.2"]
    data = synth.write_dataset(args.work / "data" / f"alpaca-length-{args.rows}", args.rows)
    model = synth.build_model(spec, args.work / "models" / spec.name, synth.read_rows(data))
    ws = args.work / "ws" / f"ttfs-{args.rows}"
    fill_workspace(ws, model, data, spec.runtime)
    config = TorchTuneConfig(packed=True, max_seq_len=args.max_seq_len, batch_size=4, epochs=1,
                             max_steps_per_epoch=2)

    tokenize: dict[int, dict[str, float]] = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        figures = _tokenize(ws, config, workers)
        tokenize[int(figures["workers"])] = figures
        common.emit({"bench": "tokenize_task", "rows": args.rows, **figures})
    times: dict[str, list[float]] = {"before": [], "after": []}
    order = ["before", "after", "after", "before"] * args.repeats
    for side in order[: 2 * args.repeats]:
        if side == "before":
            shutil.rmtree(ws / TOKENIZED_DIR, ignore_errors=True)
        elif not (ws / TOKENIZED_DIR).exists():
            _tokenize(ws, config, 0)
        seconds, lines = _first_step_seconds(ws, config)
        used_store = any("reading the pre-tokenized dataset" in line for line in lines)
        assert used_store == (side == "after"), lines[:8]
        times[side].append(seconds)
        common.emit({"bench": "time_to_first_step", "side": side, "rows": args.rows,
                     "seconds": round(seconds, 2), "load": common.load_average()})
        common.log(f"{side}: {seconds:.1f} s to the first step")

    saved = [b - a for b, a in zip(times["before"], times["after"], strict=True)]
    packs = next(iter(tokenize.values()))["packs"]
    row = [time.strftime("%Y-%m-%d"), common.git_rev(), common.machine(),
           common.versions_short(), f"`{common.command_line()}`", f"{args.rows:,}",
           f"{packs:,}", common.fmt_spread(times["before"]), common.fmt_spread(times["after"]),
           common.fmt_spread(saved),
           ", ".join(f"{t['seconds']:.1f} ({w})" for w, t in sorted(tokenize.items())),
           ", ".join(f"{t['rows_per_second']:,.0f} ({w})" for w, t in sorted(tokenize.items())),
           common.load_average()]
    common.emit({"bench": "time_to_first_step_summary", **dict(zip(HEADER, row, strict=True))})
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER) + "\n| "
          + " | ".join(row) + " |")
    if not args.no_record:
        common.append_row(SECTION, INTRO, HEADER, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
