"""Fault injection: real processes SIGKILLed at chosen points, then re-run as a KFP retry would.

Every scenario compares the final exported model with an undisturbed run's. Measured on the
tiny Llama 3.2 fixture on CPU (fp32, seed 42): a fresh run is bit-for-bit reproducible, and so
is a run resumed from its epoch checkpoint (max |difference| 0.0). The resumed comparison is
asserted with a stated tolerance of 1e-6 (absolute, on weights of size ~0.02-1) so that a
platform whose kernels reorder sums after a reload still passes; the fresh ones are asserted
bit for bit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import faultkit
from support.faultkit import (
    RUNTIME,
    file_digests,
    kill,
    max_abs_diff,
    metrics_has_step,
    start,
    start_python,
    wait_until,
)
from support.hub_files import model_files
from support.hub_server import HubServer

from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.errors import WorkspaceError
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.export_model import export_model, latest_export
from kfp_finetune.steps.fine_tune import run_fine_tune
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.steps.training_log import read_metrics
from kfp_finetune.storage.workspace import MANIFEST, Workspace, read_manifest

pytestmark = pytest.mark.slow

RESUME_ATOL = 1e-6
# Two epochs of three steps: the first checkpoint (epoch_0) is written after step 3.
CONFIG = TorchTuneConfig(epochs=2, max_steps_per_epoch=3)
CONFIG_SRC = "TorchTuneConfig(epochs=2, max_steps_per_epoch=3)"
RUN_ID = "fault-run-1"
NAME = "tuned"
DATA_URI = "hf://org/alpaca/data"
MODEL_URI = "hf://org/tiny-llama"
PARQUET = "data/train-00000-of-00001.parquet"

DATASET_STEP = """
import sys
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.config.types import TorchTuneInstructDataset
initialize_dataset(sys.argv[1], sys.argv[2], TorchTuneInstructDataset())
"""
MODEL_STEP = f"""
import sys
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.config.types import TorchTuneConfig
initialize_model(sys.argv[1], sys.argv[2], {RUNTIME!r}, {CONFIG_SRC})
"""
TRAIN_STEP = f"""
import sys
from kfp_finetune.steps.fine_tune import run_fine_tune
from kfp_finetune.config.types import TorchTuneConfig
run_fine_tune(sys.argv[1], {RUNTIME!r}, {CONFIG_SRC})
"""
# The export step, made to stop after writing half of the first weight file: a marker file
# says so, and the test SIGKILLs it there (a pod lost in the middle of the copy).
EXPORT_STEP = f"""
import shutil, sys, time
from pathlib import Path
real_copy = shutil.copy2
def half_then_hang(src, dst, *args, **kwargs):
    if str(src).endswith(".safetensors"):
        data = Path(src).read_bytes()
        with open(dst, "wb") as handle:
            handle.write(data[: len(data) // 2])
        Path(sys.argv[2]).touch()
        time.sleep(600)
    return real_copy(src, dst, *args, **kwargs)
shutil.copy2 = half_then_hang
from kfp_finetune.steps.export_model import export_model
export_model(sys.argv[1], {RUNTIME!r}, {NAME!r}, {RUN_ID!r})
"""


def quiet(_: str) -> None:
    return None


@pytest.fixture(scope="module")
def hub(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with HubServer() as server, pytest.MonkeyPatch.context() as mp:
        server.add_commit("dataset", "org/alpaca", {
            p.relative_to(tiny["alpaca"]).as_posix(): p.read_bytes()
            for p in (tiny["alpaca"] / "data").glob("*.parquet")
        })
        server.add_commit("model", "org/tiny-llama", model_files(tiny["llama3_2"]))
        mp.setenv("HF_ENDPOINT", server.url)
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
        mp.setenv("KFP_FINETUNE_RETRY_DELAY_S", "0.01")
        mp.delenv("HF_TOKEN", raising=False)
        yield server


@pytest.fixture(scope="module")
def reference(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The undisturbed run: every step once, in this process."""
    ws = tmp_path_factory.mktemp("reference") / "ws"
    initialize_dataset(ws, DATA_URI, TorchTuneInstructDataset(), quiet)
    initialize_model(ws, MODEL_URI, RUNTIME, CONFIG, quiet)
    run_fine_tune(ws, RUNTIME, CONFIG, quiet)
    return Path(export_model(ws, RUNTIME, NAME, RUN_ID, log=quiet).path)


def _no_complete_output(folder: Path) -> None:
    assert read_manifest(folder) is None, f"{folder} looks complete after a kill"


def test_kills_in_every_step_then_reruns_give_the_undisturbed_model_bit_for_bit(
    hub: HubServer, reference: Path, tmp_path: Path
) -> None:
    ws = tmp_path / "ws"
    staging = ws / ".staging"

    # 1. SIGKILL during the dataset download (the Hub stalls mid-file).
    release = hub.stall(PARQUET, after=512)
    hub.stalled.clear()
    proc = start_python(DATASET_STEP, str(ws), DATA_URI)
    try:
        wait_until(proc, hub.stalled.is_set, "the dataset download to start")
        kill(proc)
    finally:
        release.set()
    _no_complete_output(ws / "dataset")
    assert not list(staging.glob(f"dataset-*/{PARQUET}")), "a cut file is in place"

    # 2. SIGKILL during the model download (mid-way through the weights).
    release = hub.stall("model.safetensors", after=64 * 1024)
    hub.stalled.clear()
    proc = start_python(MODEL_STEP, str(ws), MODEL_URI)
    try:
        wait_until(proc, hub.stalled.is_set, "the weights download to start")
        kill(proc)
    finally:
        release.set()
    _no_complete_output(ws / "model")
    assert not list(staging.glob("model-*/model.safetensors")), "cut weights are in place"

    # Re-runs of both initializers complete from where they were.
    data = initialize_dataset(ws, DATA_URI, TorchTuneInstructDataset(), quiet)
    model = initialize_model(ws, MODEL_URI, RUNTIME, CONFIG, quiet)
    assert not data.fetch.skipped and not model.fetch.skipped
    ref_ws = reference.parent.parent
    for folder in ("dataset", "model"):
        assert file_digests(ws / folder, "") == file_digests(ref_ws / folder, ""), folder

    # 3. SIGKILL during training, before the first checkpoint.
    out = ws / "output" / "checkpoints"
    proc = start_python(TRAIN_STEP, str(ws))
    wait_until(proc, (out / "logs" / "metrics.txt").exists, "torchtune to start training")
    kill(proc)
    assert not (out / "epoch_0").exists(), "killed too late: the first checkpoint exists"
    _no_complete_output(out)
    lines: list[str] = []
    trained = run_fine_tune(ws, RUNTIME, CONFIG, lines.append)
    assert trained.resumed_from_epoch == 0 and not trained.skipped
    assert any("clearing unfinished" in line for line in lines)

    # 4. SIGKILL during the export, with half of the weights copied.
    marker = tmp_path / "half-written"
    proc = start_python(EXPORT_STEP, str(ws), str(marker))
    wait_until(proc, marker.exists, "the export to write half a weight file")
    kill(proc)
    assert not (ws / "output" / NAME).exists()
    half = list(staging.glob("export-*/*.safetensors"))
    assert half, "the half-written file should be in the staging folder"
    with pytest.raises(WorkspaceError, match="no finished export"):
        latest_export(Workspace.at(ws), NAME)
    exported = export_model(ws, RUNTIME, NAME, RUN_ID, log=quiet)
    assert not exported.skipped

    final = Path(exported.path)
    assert file_digests(final) == file_digests(reference), "the final model differs"
    assert max_abs_diff(final, reference) == 0.0
    assert json.loads((final / MANIFEST).read_text())["run_id"] == RUN_ID


def test_kill_after_the_first_checkpoint_resumes_and_matches_within_tolerance(
    reference: Path, tmp_path: Path
) -> None:
    ref_ws = reference.parent.parent
    ws = tmp_path / "ws"
    for folder in ("dataset", "model"):  # finished initializers (manifests included)
        shutil.copytree(ref_ws / folder, ws / folder)
    out = ws / "output" / "checkpoints"
    proc = start_python(TRAIN_STEP, str(ws))
    wait_until(proc, metrics_has_step(ws, 4), "the first step of epoch 2")
    kill(proc)
    assert (out / "epoch_0").is_dir() and (out / "recipe_state" / "recipe_state.pt").is_file()
    assert not (out / "epoch_1").exists(), "killed too late: the run finished epoch 2"
    _no_complete_output(out)

    lines: list[str] = []
    resumed = run_fine_tune(ws, RUNTIME, CONFIG, lines.append)
    assert resumed.resumed_from_epoch == 1
    assert any("resuming: 1 of 2 epoch(s)" in line for line in lines)
    ref_losses = dict(read_metrics(ref_ws / "output" / "checkpoints" / "logs"))
    assert sorted(ref_losses) == [step for step, _ in resumed.losses] == list(range(1, 7))
    for step, loss in resumed.losses:
        if step >= 4:
            assert abs(loss - ref_losses[step]) <= 1e-5, (step, loss, ref_losses[step])
    final = Path(export_model(ws, RUNTIME, NAME, RUN_ID, log=quiet).path)
    diff = max_abs_diff(final, reference)
    print(f"resumed vs undisturbed: max |weight difference| = {diff}")
    assert diff <= RESUME_ATOL


def test_killed_local_pipeline_rerun_completes_and_matches_an_undisturbed_run(
    tiny: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    undisturbed, _ = faultkit.full_runs(tiny, tmp_path_factory.getbasetemp())
    assert undisturbed.returncode == 0, undisturbed.log[-3000:]
    ws = tmp_path / "ws"
    proc = start(faultkit.cli_argv(tiny, ws), tmp_path / "killed.log")
    wait_until(proc, metrics_has_step(ws, 1), "training inside the local pipeline", 420)
    kill(proc)
    _no_complete_output(ws / "output" / "checkpoints")
    assert not (ws / "output" / faultkit.EXPORT_NAME).exists()

    proc = start(faultkit.cli_argv(tiny, ws), tmp_path / "rerun.log")
    assert proc.wait(timeout=540) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    log = (tmp_path / "rerun.log").read_text()
    assert "already complete" in log  # the finished downloads were not fetched again
    final = ws / "output" / faultkit.EXPORT_NAME
    assert file_digests(final) == file_digests(undisturbed.model_dir)
