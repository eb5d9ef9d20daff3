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
    ws: Any  # kfp_finetune.storage.workspace.Workspace
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


def card_memory_gib(device: str) -> float | None:
    """The card memory the fine-tune step would read on this machine (None on CPU)."""
    if device != "cuda":
        return None
    from kfp_finetune.steps.gpu_defaults import detect_gpu_memory_gib

    return detect_gpu_memory_gib()


def ours_and_anchor(inputs: Inputs, device: str,
                    lora: bool = False) -> tuple[configs.RunConfig, configs.RunConfig]:
    """Our rendered config and the anchor's, for the same workspace (LoRA: both LoRA)."""
    from kfp_finetune.config.types import LoraConfig

    ours = configs.ours(inputs.ws, inputs.spec.runtime, inputs.gpus,
                        peft=LoraConfig() if lora else None,
                        gpu_memory_gib=card_memory_gib(device))
    anchor = configs.anchor(inputs.ws, inputs.spec.runtime, inputs.spec.anchor_config, device,
                            inputs.spec.tiny, ours.conf, lora=lora)
    return ours, anchor


def launch(
    name: str,
    run: configs.RunConfig,
    out_dir: Path,
    warmup: int,
    steps: int,
    overrides: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run one config in a fresh worker process and return its result.

    One process per run: flex attention is compiled per batch shape and torch._dynamo stops
    recompiling after 8 shapes (then runs eager), and the CUDA allocator's peak counters and
    cached blocks would carry over from one run to the next.

    Args:
        name: Run name (result ``name``, config file name).
        run: Config and recipe.
        out_dir: Scratch folder for the config, the log and the outputs.
        warmup: Optimizer steps before the measured window.
        steps: Measured optimizer steps.
        overrides: Dotted-key overrides on top of ``run.conf``.
        timeout: Seconds before the worker is killed (the result then says so).
    """
    from omegaconf import OmegaConf

    out_dir.mkdir(parents=True, exist_ok=True)
    conf = configs.for_bench(run, out_dir / name, warmup, steps, overrides=overrides)
    path = out_dir / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create(conf), path)
    job_file = out_dir / f"{name}.job.json"
    result_file = out_dir / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({"jobs": [{"name": name, "recipe": run.recipe,
                                              "config": str(path)}],
                                    "warmup": warmup, "out": str(result_file)}))
    worker = str(common.BENCH / "_worker.py")
    if run.distributed:
        argv = [common.PYTHON, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(run.nproc), worker, str(job_file)]
    else:
        argv = [common.PYTHON, worker, str(job_file)]
    log_path = out_dir / f"{name}.log"
    code, wall, _ = common.run_logged(argv, log_path, cwd=common.REPO, timeout=timeout)
    results = json.loads(result_file.read_text()) if result_file.exists() else []
    if results:
        result = results[0]
    elif timeout is not None and wall > timeout:
        result = {"name": name, "error": f"timed out after {timeout:.0f} s (its phase budget); "
                                         f"see {log_path}"}
    else:
        result = {"name": name, "error": f"worker exited with code {code}; see {log_path}"}
    result["process_wall_s"] = round(wall, 2)
    return result


def flops_per_token(result: dict[str, Any]) -> float | None:
    """Model FLOPs per trained token, attention excluded.

    2N forward + 2N backward through the activations + 2 x trainable parameters for the
    weight gradients. Full fine-tuning: 6N. LoRA: frozen weights get no weight gradient, so
    ~4N (+ 2 x the adapters' few parameters). N = all parameters, the tied embedding once (it
    is also the output projection's matmul).
    """
    if "params" not in result:
        return None
    n = result["params"]
    return 4 * n + 2 * result.get("trainable_params", n)


def attention_flops_per_s(result: dict[str, Any]) -> float | None:
    """Attention score and value matmuls, forward + backward, per second.

    Per layer, a query attending to k keys costs 2kd (QK^T) + 2kd (AV) forward and twice that
    backward: 12·d·k, d = heads x head_dim. k is counted from the data (causal, within each
    packed sample): ``attended_keys_per_s`` = sum over real tokens of (position in sample + 1).
    """
    if not all(k in result for k in ("layers", "attention_dim", "attended_keys_per_s")):
        return None
    return 12 * result["layers"] * result["attention_dim"] * result["attended_keys_per_s"]


def mfu(result: dict[str, Any], peak: float | None,
        with_attention: bool = False) -> float | None:
    """Model FLOPs utilisation of one GPU (None without a peak or on CPU).

    The worker counts the tokens of its own rank, so ``real_tokens_per_s`` is already per GPU.
    """
    per_token = flops_per_token(result)
    if not peak or per_token is None or "real_tokens_per_s" not in result:
        return None
    flops = per_token * result["real_tokens_per_s"]
    if with_attention:
        attention = attention_flops_per_s(result)
        if attention is None:
            return None
        flops += attention
    return flops / peak


def add_mfu(result: dict[str, Any], peak_tflops: float | None = None) -> None:
    """Set ``mfu`` (model FLOPs: 6N full / ~4N LoRA) and ``mfu_with_attention`` in place."""
    peak = peak_flops(result.get("gpu"), peak_tflops)
    result["flops_per_token"] = flops_per_token(result)
    result["mfu"] = mfu(result, peak)
    result["mfu_with_attention"] = mfu(result, peak, with_attention=True)


def memory_text(result: dict[str, Any]) -> str:
    """Peak memory for a table cell: GPU allocated/reserved (per-step peak), or CPU peak RSS."""
    if "peak_allocated_gib" in result:
        return (f"{result['peak_allocated_gib']:.1f} / {result['peak_reserved_gib']:.1f} GiB "
                "alloc/reserved")
    if "peak_rss_mib" in result:
        return f"{result['peak_rss_mib']:,.0f} MiB RSS"
    return "-"
