"""Concurrency: runs on different workspaces do not interfere; one workspace has one writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import faultkit
from support.faultkit import RUNTIME, file_digests, kill, start_python, wait_until

from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.drivers.cli import main
from kfp_finetune.errors import WorkspaceError
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.fine_tune import LOCK_FILE, RUN_FILE, run_fine_tune
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.storage.workspace import LOCK_FILE as WS_LOCK
from kfp_finetune.storage.workspace import workspace_lock

HOLD_LOCK = """
import sys, time
from kfp_finetune.storage.workspace import workspace_lock
with workspace_lock(sys.argv[1], "kfp-finetune run --local"):
    open(sys.argv[2], "w").close()
    time.sleep(600)
"""


def _holder(ws: Path, tmp_path: Path):
    ready = tmp_path / "locked"
    proc = start_python(HOLD_LOCK, str(ws), str(ready))
    wait_until(proc, ready.exists, "the other process to take the lock", 120)
    return proc


@pytest.mark.slow
def test_two_runs_on_different_workspaces_at_once_do_not_interfere(
    tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    cli, api = faultkit.full_runs(tiny, tmp_path_factory.getbasetemp())
    assert cli.returncode == 0, cli.log[-3000:]
    assert api.returncode == 0, api.log[-3000:]
    # They really ran at the same time (both started together; neither ended before the
    # other had been running for a while), and each finished its own model.
    assert max(cli.started, api.started) < min(cli.ended, api.ended)
    assert file_digests(cli.model_dir) == file_digests(api.model_dir), \
        "same inputs, same seed: two concurrent runs must give the same weights"
    for run, other in ((cli, api), (api, cli)):
        for path in run.workspace.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".yaml", ".txt"):
                assert str(other.workspace) not in path.read_text(errors="replace"), path
        meta = json.loads((run.model_dir / ".kfp-finetune.json").read_text())
        assert meta["path"] == str(run.model_dir)


def test_workspace_lock_is_exclusive_across_processes_and_freed_by_sigkill(
    tmp_path: Path,
) -> None:
    ws = tmp_path / "ws"
    proc = _holder(ws, tmp_path)
    try:
        with pytest.raises(WorkspaceError) as err, workspace_lock(ws, "a second run"):
            pass
        text = str(err.value)
        assert str(ws) in text and f"pid {proc.pid}" in text
        assert "kfp-finetune run --local" in text and "--workspace" in text
    finally:
        kill(proc)
    # The kernel dropped the killed holder's lock: no stale lock blocks the retry.
    with workspace_lock(ws, "the retry") as path:
        assert path == ws / WS_LOCK
        assert json.loads(path.read_text())["purpose"] == "the retry"


def test_second_local_run_on_the_same_workspace_is_refused(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    proc = _holder(ws, tmp_path)
    try:
        before = sorted(p.name for p in ws.iterdir())
        assert main(faultkit.cli_argv(tiny, ws)[3:]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: workspace ") and "in use by another process" in err
        assert f"pid {proc.pid}" in err and "--workspace" in err
        assert "Traceback" not in err
        assert sorted(p.name for p in ws.iterdir()) == before, "the refused run wrote files"
    finally:
        kill(proc)


TRAIN = f"""
import sys
from kfp_finetune.steps.fine_tune import run_fine_tune
from kfp_finetune.config.types import TorchTuneConfig
run_fine_tune(sys.argv[1], {RUNTIME!r}, TorchTuneConfig(epochs=1))
"""


@pytest.mark.slow
def test_a_second_fine_tune_on_the_same_workspace_is_refused_not_mixed_in(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    ws = tmp_path / "ws"
    config = TorchTuneConfig(epochs=1)
    initialize_dataset(ws, str(tiny["alpaca"] / "data"), TorchTuneInstructDataset(),
                       lambda _: None)
    initialize_model(ws, str(tiny["llama3_2"]), RUNTIME, config, lambda _: None)
    out = ws / "output" / "checkpoints"
    proc = start_python(TRAIN, str(ws))
    try:
        wait_until(proc, (out / RUN_FILE).exists, "the first fine-tune to start", 300)
        run_file = (out / RUN_FILE).read_bytes()
        with pytest.raises(WorkspaceError) as err:
            run_fine_tune(ws, RUNTIME, config, lambda _: None)
        text = str(err.value)
        assert "the fine-tune step" in text and f"pid {proc.pid}" in text
        assert str(ws / LOCK_FILE) in text
        # The refused attempt touched nothing of the running one.
        assert (out / RUN_FILE).read_bytes() == run_file
        assert proc.poll() is None, "the first fine-tune must still be running"
    finally:
        kill(proc)
