"""Benchmark: initializer download throughput versus plain ``huggingface_hub``, and re-run time.

Serves a ~200 MB model repository from the test Hub server on 127.0.0.1 and downloads it
(a) with ``huggingface_hub.snapshot_download(local_dir=...)`` and (b) with the model
initializer (``initialize_model``: listing, checks, staged download, manifest, install), in
alternating rounds, then times a re-run of the initializer over the complete workspace.

Run::

    .venv/bin/python bench/bench_download.py [--mb 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test support package

from support.hub_server import HubServer  # noqa: E402


def make_repo(folder: Path, total_mb: int) -> dict[str, Path]:
    """A tiny Llama checkpoint plus four random safetensors shards of ``total_mb`` in all."""
    from kfp_finetune.drivers.fixtures import make_tiny_llama3_2

    model = make_tiny_llama3_2(folder / "tiny")
    files = {p.relative_to(model).as_posix(): p for p in model.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    shard = total_mb * 2**20 // 4
    for i in range(4):
        # Valid safetensors (one uint8 tensor of random bytes): the model step checks each
        # shard's header, so plain random files would be refused before the figures are taken.
        path = folder / f"model-{i + 1:05d}-of-00004.safetensors"
        size = shard // 2**20 * 2**20
        header = json.dumps({f"bench.pad{i}": {"dtype": "U8", "shape": [size],
                                               "data_offsets": [0, size]}}).encode()
        header += b" " * (-len(header) % 8)
        with path.open("wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for _ in range(size // 2**20):
                f.write(os.urandom(2**20))
        files[path.name] = path
    return files


def settle() -> None:
    """Flush dirty pages of the previous round so that each run starts alike."""
    os.sync()
    time.sleep(0.5)


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="repository size in MB")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds")
    args = parser.parse_args()

    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    from kfp_finetune.config.types import TorchTuneConfig
    from kfp_finetune.steps.model_initializer import initialize_model

    disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp_s, HubServer() as hub:
        tmp = Path(tmp_s)
        files = make_repo(tmp / "repo", args.mb)
        total = sum(p.stat().st_size for p in files.values())
        hub.add_commit("model", "bench/llama-200mb", files)
        os.environ["HF_ENDPOINT"] = hub.url
        os.environ["HF_HOME"] = str(tmp / "hf-home")
        plain: list[float] = []
        ours: list[float] = []

        def run_plain(r: int) -> None:
            out = tmp / f"plain-{r}"
            settle()
            start = time.perf_counter()
            snapshot_download("bench/llama-200mb", local_dir=str(out), endpoint=hub.url)
            plain.append(time.perf_counter() - start)
            shutil.rmtree(out)

        def run_ours(r: int) -> None:
            ws = tmp / f"ws-{r}"
            settle()
            start = time.perf_counter()
            initialize_model(ws, "hf://bench/llama-200mb", "torchtune-llama3.2-tiny",
                             TorchTuneConfig(), lambda _: None)
            ours.append(time.perf_counter() - start)
            if r < args.rounds - 1:
                shutil.rmtree(ws)

        # warm-up (imports, page cache of the served files), not timed
        initialize_model(tmp / "warm", "hf://bench/llama-200mb", "torchtune-llama3.2-tiny",
                         TorchTuneConfig(), lambda _: None)
        shutil.rmtree(tmp / "warm")
        for r in range(args.rounds):  # ABBA order: neither client always goes first
            first, second = (run_plain, run_ours) if r % 2 == 0 else (run_ours, run_plain)
            first(r)
            second(r)
        hub.reset_requests()
        start = time.perf_counter()
        summary = initialize_model(tmp / f"ws-{args.rounds - 1}", "hf://bench/llama-200mb",
                                   "torchtune-llama3.2-tiny", TorchTuneConfig(), lambda _: None)
        rerun = time.perf_counter() - start
        assert summary.fetch.skipped and not hub.content_requests()
    print("plain", [round(x, 2) for x in plain], "ours", [round(x, 2) for x in ours])
    mb = total / 1e6
    p_med, o_med = statistics.median(plain), statistics.median(ours)
    print(f"repository: {mb:.1f} MB in {len(files)} files; {args.rounds} alternating rounds; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| client | median s | MB/s (median) | best MB/s |")
    print("|---|---|---|---|")
    print(f"| huggingface_hub.snapshot_download | {p_med:.2f} | {mb / p_med:.0f} | "
          f"{mb / min(plain):.0f} |")
    print(f"| kfp-finetune model initializer | {o_med:.2f} | {mb / o_med:.0f} | "
          f"{mb / min(ours):.0f} |")
    print(f"throughput ratio initializer/plain (median): {p_med / o_med:.2f}")
    print(f"re-run over the complete workspace: {rerun:.3f} s, 0 content requests")


if __name__ == "__main__":
    main()
