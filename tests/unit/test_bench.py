"""The benchmark's arithmetic and plumbing.

The device check's CPU dry run is in tests/integration/test_bench_dry_run.py.

No GPU here: the GPU-only reads (``torch.cuda`` counters) are not called; the rules they feed
(peak memory from the recipe's per-step stats, MFU per rank) are tested on real inputs.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))  # the bench scripts import each other by module name

import _worker  # noqa: E402
import common  # noqa: E402
import gpu_check  # noqa: E402
import harness  # noqa: E402

N = 1_235_814_400  # Llama-3.2-1B, tied embedding once


def test_mfu_divides_per_rank_tokens_by_nothing():
    # The worker counts the batches of its own rank (CountingLoader wraps that rank's
    # dataloader), so real_tokens_per_s is already per GPU; dividing by world_size again
    # (the old harness.mfu) under-reported 8 GPUs by 8x.
    result = {"params": N, "trainable_params": N, "real_tokens_per_s": 40_000.0,
              "world_size": 8}
    assert harness.mfu(result, 989e12) == pytest.approx(6 * N * 40_000 / 989e12)


def test_lora_is_counted_with_4n_plus_the_adapters():
    adapters = 5_636_096
    result = {"params": N + adapters, "trainable_params": adapters}
    # Forward 2N, backward through activations 2N, weight gradients only for the adapters.
    assert harness.flops_per_token(result) == 4 * (N + adapters) + 2 * adapters
    assert harness.flops_per_token({"params": N, "trainable_params": N}) == 6 * N


def test_attention_flops_are_stated_separately():
    result = {"params": N, "trainable_params": N, "real_tokens_per_s": 10_000.0,
              "layers": 16, "attention_dim": 2048, "attended_keys_per_s": 1e6}
    peak = 989e12
    attention = 12 * 16 * 2048 * 1e6  # (QK^T + AV) x (forward + 2x backward), per key
    assert harness.attention_flops_per_s(result) == attention
    assert harness.mfu(result, peak, with_attention=True) == pytest.approx(
        (6 * N * 10_000 + attention) / peak)
    harness.add_mfu(result)  # no GPU name: no peak, so no MFU rather than a made-up one
    assert result["mfu"] is None and result["mfu_with_attention"] is None


def test_peak_memory_is_the_largest_per_step_value(tmp_path):
    # torchtune resets the CUDA peak after each logged step
    # (torchtune/training/memory.py get_memory_stats(reset_stats=True), called per step by
    # the recipes when log_peak_memory_stats is on), so the counter after training holds
    # only the tail; the step with the activations is in the metric log.
    from torchtune.training.metric_logging import DiskLogger

    from kfp_finetune.steps.training_log import read_metric_rows

    logger = DiskLogger(log_dir=str(tmp_path), filename="metrics.txt")
    for step, alloc in enumerate([21.5, 24.25, 23.0], start=1):
        logger.log_dict({"loss": 1.0, "peak_memory_active": alloc, "peak_memory_alloc": alloc,
                         "peak_memory_reserved": alloc + 2}, step=step)
    logger.close()
    after = {"peak_memory_alloc": 7.5, "peak_memory_reserved": 30.0, "peak_memory_active": 7.5}
    peak = _worker.peak_from_rows(read_metric_rows(tmp_path), after)
    assert peak["peak_allocated_gib"] == 24.25 and peak["peak_active_gib"] == 24.25
    assert peak["peak_reserved_gib"] == 30.0  # the later counter is larger: kept
    assert peak["peak_source"] == "recipe per-step stats, max over 3 steps"
    fallback = _worker.peak_from_rows([], after)
    assert fallback["peak_allocated_gib"] == 7.5 and "no per-step" in fallback["peak_source"]


def test_bench_configs_log_peak_memory_on_gpu_only():
    import configs

    gpu = configs.RunConfig("x", "full_finetune_single_device", 1,
                            {"device": "cuda", "checkpointer": {}})
    cpu = configs.RunConfig("x", "full_finetune_single_device", 1,
                            {"device": "cpu", "checkpointer": {}})
    assert configs.for_bench(gpu, Path("/tmp/o"), 1, 2)["log_peak_memory_stats"] is True
    assert configs.for_bench(cpu, Path("/tmp/o"), 1, 2)["log_peak_memory_stats"] is False


def test_worker_runs_exactly_one_job_per_process(tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"jobs": [{"name": "a", "recipe": "r", "config": "c"},
                                        {"name": "b", "recipe": "r", "config": "c"}],
                               "warmup": 1, "out": str(tmp_path / "out.json")}))
    proc = subprocess.run([sys.executable, str(BENCH / "_worker.py"), str(job)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "exactly one per process" in proc.stderr


def test_phase_budgets_fit_eight_minutes():
    assert sum(gpu_check.BUDGETS.values()) <= gpu_check.TOTAL_S == 480
    clock = gpu_check.Clock(spent_before=0)
    assert clock.budget("full-ours") == gpu_check.BUDGETS["full-ours"]
    late = gpu_check.Clock(spent_before=gpu_check.TOTAL_S - 40)
    # What is left after keeping the report's share, never more.
    assert late.budget("full-ours") <= 40 - gpu_check.BUDGETS["report"]
    dry = gpu_check.Clock(spent_before=0, scale=gpu_check.DRY_RUN_SCALE)
    assert dry.budget("full-kf") == gpu_check.BUDGETS["full-kf"] * gpu_check.DRY_RUN_SCALE


def test_commit_stamp_without_git(tmp_path, monkeypatch):
    # The device machine gets a copy of the tree without .git: the commit comes from the
    # wheel folder that bench/prepare_wheels.sh wrote, or from the environment.
    monkeypatch.setattr(common, "REPO", tmp_path)
    monkeypatch.delenv("KFP_FINETUNE_COMMIT", raising=False)
    assert common.git_rev() == "-"
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "COMMIT").write_text("abc1234+dirty\n")
    assert common.git_rev() == "abc1234+dirty"
    monkeypatch.setenv("KFP_FINETUNE_COMMIT", "def5678")
    assert common.git_rev() == "def5678"


def test_git_rev_in_the_checkout_names_the_commit():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                          capture_output=True, check=True).stdout.strip()
    assert common.git_rev().startswith(head)
