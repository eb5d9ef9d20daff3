"""The device check's CPU dry run (bench/gpu_check.sh --dry-run): every phase on tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    # The device check's own CPU mode: same phases, tiny models, a few steps (~1-3 min here).
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--dry-run", "--work", str(tmp_path / "work"),
         "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    by_phase = {r["phase"]: r for r in rows}
    assert list(by_phase) == ["smoke", "inputs", "full-ours", "full-kf", "lora-ours", "targets"]
    smoke = by_phase["smoke"]["status"]
    assert smoke == "ok" or smoke.startswith("skipped"), by_phase["smoke"]
    training = [by_phase[p] for p in ("full-ours", "full-kf", "lora-ours")]
    for row in training:
        assert "error" not in row, row
        assert row["commit"] not in ("", "-") and row["device"] == "cpu"
        assert row["torchtune"] == "0.6.1" and row["torch"] != "-"
        assert row["trainable_tokens_per_s"] > 0 and row["measured_steps"] >= 1
    assert len({row["pid"] for row in training}) == 3  # one process per run
    full, kf, lora = training
    assert full["flops_per_token"] == 6 * full["params"]
    assert lora["trainable_params"] < lora["params"]
    assert lora["flops_per_token"] < 5 * lora["params"]
    assert "packed=True" in full["settings"] and "packed=False" in kf["settings"]
    assert full["attended_keys_per_s"] > 0
    assert kf["recipe"] == "full_finetune_single_device"  # the anchor's recipe on CPU
    assert by_phase["targets"]["ratio_ours_vs_kubeflow"] > 0
    assert "not measured" in by_phase["targets"]["status"]
    table = (out / "gpu_check.md").read_text()
    assert table.count("not measured") >= 9  # memory, MFU, MFU w/ attention x 3 rows
    assert "| full-ours |" in table and "| lora-ours |" in table
