"""Launching measured training runs: inputs, configs, the worker process, result rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import configs
import synth

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def peak_flops(gpu: str | None, override_tflops: float | None = None) -> float | None:
    """The chip's dense bf16 peak in FLOP/s (None when unknown)."""
    if override_tflops:
        return override_tflops * 1e12
    if not gpu:
        return None
    for key, value in PEAK_BF16.items():
        if key in gpu:
            return value
    return None


@dataclass
class Inputs:
    """A model checkpoint, a dataset and a workspace filled by the real initializer steps."""

    spec: synth.ModelSpec
    model_dir: Path
    dataset_dir: Path
    ws: Any  # kfp_finetune.workspace.Workspace
    gpus: int | None


def prepare(spec: synth.ModelSpec, work: Path, rows: int, device: str) -> Inputs:
    """Build (or reuse) the model and data under ``work`` and fill a workspace from them."""
    dataset_dir = synth.write_dataset(work / "data" / f"alpaca-length-{rows}", rows)
    common.log(f"building/reusing {spec.name} checkpoint under {work / 'models'}")
    model_dir = synth.build_model(spec, work / "models" / spec.name,
                                  synth.read_rows(dataset_dir))
    # Real-shape runtimes default to 1 GPU; on CPU ask for 0 so the CPU recipe is chosen.
    gpus = 0 if device == "cpu" and not spec.tiny else None
    ws_dir = work / "ws" / f"{spec.name}-{rows}"
    ws = configs.fill_workspace(ws_dir, model_dir, dataset_dir, spec.runtime, gpus)
    return Inputs(spec, model_dir, dataset_dir, ws, gpus)


def ours_and_anchor(inputs: Inputs, device: str) -> tuple[configs.RunConfig, configs.RunConfig]:
    """Our rendered config and the anchor's, for the same workspace."""
    ours = configs.ours(inputs.ws, inputs.spec.runtime, inputs.gpus)
    anchor = configs.anchor(inputs.ws, inputs.spec.runtime, inputs.spec.anchor_config, device,
                            inputs.spec.tiny, ours.conf)
    return ours, anchor


def launch(
    runs: list[tuple[str, configs.RunConfig, dict[str, Any]]],
    out_dir: Path,
    warmup: int,
    steps: int,
    timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Run configs in one worker process (same recipe and launcher for all) and return results.

    Args:
        runs: ``(name, run config, dotted-key overrides)``.
        out_dir: Scratch folder for configs, logs and outputs.
        warmup: Optimizer steps before the measured window.
        steps: Measured optimizer steps.
        timeout: Seconds before the worker is killed.
    """
    from omegaconf import OmegaConf

    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for name, run, overrides in runs:
        conf = configs.for_bench(run, out_dir / name, warmup, steps, overrides=overrides)
        path = out_dir / f"{name}.yaml"
        OmegaConf.save(OmegaConf.create(conf), path)
        jobs.append({"name": name, "recipe": run.recipe, "config": str(path)})
    first = runs[0][1]
    assert all(r.recipe == first.recipe and r.nproc == first.nproc for _, r, _ in runs)
    job_file = out_dir / "job.json"
    result_file = out_dir / "results.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({"jobs": jobs, "warmup": warmup, "out": str(result_file)}))
    worker = str(common.BENCH / "_worker.py")
    if first.distributed:
        argv = [common.PYTHON, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(first.nproc), worker, str(job_file)]
    else:
        argv = [common.PYTHON, worker, str(job_file)]
    code, wall, _ = common.run_logged(argv, out_dir / "worker.log", cwd=common.REPO,
                                      timeout=timeout)
    results = json.loads(result_file.read_text()) if result_file.exists() else []
    done = {r["name"] for r in results}
    for name, _, _ in runs:
        if name not in done:
            results.append({"name": name, "error": f"worker exited with code {code}; see "
                                                   f"{out_dir / 'worker.log'}"})
    for r in results:
        r["process_wall_s"] = round(wall, 2)
    return results


def mfu(result: dict[str, Any], peak: float | None) -> float | None:
    """6·N·(real tokens/s) / peak, per GPU (None without a peak or on CPU)."""
    if not peak or "real_tokens_per_s" not in result:
        return None
    per_gpu = result["real_tokens_per_s"] / max(1, int(result.get("world_size", 1)))
    return 6 * result["params"] * per_gpu / peak


def memory_text(result: dict[str, Any]) -> str:
    """Peak memory for a table cell: GPU allocated/reserved, or CPU peak RSS."""
    if "peak_allocated_gib" in result:
        return f"{result['peak_allocated_gib']:.1f} / {result['peak_reserved_gib']:.1f} GiB"
    if "peak_rss_mib" in result:
        return f"{result['peak_rss_mib']:,.0f} MiB RSS"
    return "-"
