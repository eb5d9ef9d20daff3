"""A full or read-only workspace: a clear error naming the path and the space, nothing half done.

Where the test process may mount (root in a container with CAP_SYS_ADMIN), the workspace is a
real tmpfs of a chosen size, or a real read-only bind mount (root ignores file permissions,
so chmod cannot make a read-only workspace). Where it may not, those tests skip and the
``simulated`` tests below cover the same code paths by raising ENOSPC/EROFS from the lowest
write call the code uses (``shutil.copy2``, ``os.replace``) or by reporting little free space
from ``shutil.disk_usage``.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from support import faultkit
from support.faultkit import RUNTIME, read_only_view, resize_tmpfs, tmpfs, used_bytes

from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.drivers.cli import main
from kfp_finetune.errors import WorkspaceError
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.export_model import export_model, latest_export
from kfp_finetune.steps.fine_tune import _disk_full, run_fine_tune
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.storage import fetch as storage
from kfp_finetune.storage import local as local_backend
from kfp_finetune.storage import workspace
from kfp_finetune.storage.workspace import (
    MANIFEST,
    Workspace,
    check_free_space,
    install,
    read_manifest,
    tree_bytes,
)

CONFIG = TorchTuneConfig(epochs=2, max_steps_per_epoch=2)
MiB = 2**20


def quiet(_: str) -> None:
    return None


def _init(ws: Path, tiny: dict[str, Path]) -> None:
    initialize_dataset(ws, str(tiny["alpaca"] / "data"), TorchTuneInstructDataset(), quiet)
    initialize_model(ws, str(tiny["llama3_2"]), RUNTIME, CONFIG, quiet)


def _fake_training(ws: Path) -> None:
    """A finished fine-tune step's output (the base weights stand in for trained ones)."""
    out = ws / "output" / "checkpoints"
    shutil.copytree(ws / "model", out / "epoch_0", ignore=shutil.ignore_patterns(".*"))
    (out / MANIFEST).write_text(json.dumps({
        "fingerprint": "f" * 16, "final_epoch_dir": "epoch_0", "recipe": "r", "config": "c",
        "resolved": {}, "final_loss": 1.0}))


def _names_space(text: str, path: Path) -> None:
    assert str(path) in text, text
    assert "needed" in text and "available" in text and "bytes" in text, text
    assert "pvc_size" in text and "--workspace" in text, text


# --------------------------------------------------------------------------- real tmpfs


def test_model_download_refused_up_front_on_a_too_small_volume(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "vol", 256 * 1024) as vol:
        ws = vol / "ws"
        with pytest.raises(WorkspaceError) as err:
            initialize_model(ws, str(tiny["llama3_2"]), RUNTIME, CONFIG, quiet)
        _names_space(str(err.value), ws / ".staging")
        assert read_manifest(ws / "model") is None
        assert not list((ws / ".staging").glob("model-*/*")), "nothing may be half-copied"


def test_disk_filling_up_mid_download_is_a_workspace_error(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another writer fills the volume after the pre-flight check: the real ENOSPC of the
    # kernel must still become a clear error, and no cut file may stay behind.
    monkeypatch.setattr(storage, "check_free_space", lambda *a, **k: None)
    with tmpfs(tmp_path / "vol", 256 * 1024) as vol:
        ws = vol / "ws"
        with pytest.raises(WorkspaceError) as err:
            initialize_model(ws, str(tiny["llama3_2"]), RUNTIME, CONFIG, quiet)
        text = str(err.value)
        assert "no space left" in text and str(ws / ".staging") in text and "pvc_size" in text
        assert read_manifest(ws / "model") is None
        assert not list(ws.rglob("*.part")) and not list(ws.rglob("model.safetensors"))


def test_hub_download_on_a_full_disk_is_not_retried_and_names_the_folder(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from support.hub_files import model_files
    from support.hub_server import HubServer

    monkeypatch.setattr(storage, "check_free_space", lambda *a, **k: None)
    with HubServer() as hub, tmpfs(tmp_path / "vol", 256 * 1024) as vol:
        hub.add_commit("model", "org/tiny-llama", model_files(tiny["llama3_2"]))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("KFP_FINETUNE_RETRY_DELAY_S", "0.01")
        ws = vol / "ws"
        with pytest.raises(WorkspaceError, match="no space left") as err:
            initialize_model(ws, "hf://org/tiny-llama", RUNTIME, CONFIG, quiet)
        assert str(ws / ".staging") in str(err.value)
        gets = [r for r in hub.content_requests("model.safetensors") if r.method == "GET"]
        assert len(gets) == 1, "a full disk is not a network error: no retry"
        assert read_manifest(ws / "model") is None


def test_training_refused_up_front_when_the_checkpoints_cannot_fit(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "vol", 8 * MiB) as vol:
        ws = vol / "ws"
        _init(ws, tiny)
        weights = tree_bytes(ws / "model" / "model.safetensors")
        resize_tmpfs(vol, used_bytes(vol) + weights)  # room for one epoch, not two
        with pytest.raises(WorkspaceError) as err:
            run_fine_tune(ws, RUNTIME, CONFIG, quiet)
        _names_space(str(err.value), ws / "output" / "checkpoints")
        assert "2 epoch(s)" in str(err.value)
        out = ws / "output" / "checkpoints"
        assert not (out / "logs").exists(), "torchtune must not have started"
        assert read_manifest(out) is None


@pytest.mark.slow
def test_volume_filling_up_during_training_then_a_bigger_volume_completes(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "vol", 8 * MiB) as vol:
        ws = vol / "ws"
        _init(ws, tiny)
        weights = tree_bytes(ws / "model" / "model.safetensors")
        # The pre-flight estimate (one checkpoint per epoch) fits, but the optimizer state
        # (about twice the weights) that torchtune saves with the first checkpoint does not.
        resize_tmpfs(vol, used_bytes(vol) + 2 * weights + 64 * 1024)
        with pytest.raises(WorkspaceError) as err:
            run_fine_tune(ws, RUNTIME, CONFIG, quiet)
        text = str(err.value)
        out = ws / "output" / "checkpoints"
        assert "filled up" in text and str(out) in text and "pvc_size" in text, text
        assert read_manifest(out) is None, "a run cut by a full disk must not look finished"
        resize_tmpfs(vol, 16 * MiB)
        result = run_fine_tune(ws, RUNTIME, CONFIG, quiet)
        assert not result.skipped and len(result.losses) == 4
        assert read_manifest(out) is not None


def test_export_on_a_full_volume_leaves_nothing_that_looks_complete(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "vol", 8 * MiB) as vol:
        ws = vol / "ws"
        _init(ws, tiny)
        _fake_training(ws)
        resize_tmpfs(vol, used_bytes(vol) + 128 * 1024)
        with pytest.raises((OSError, WorkspaceError)):
            export_model(ws, RUNTIME, "tuned", "run-1", log=quiet)
        assert not (ws / "output" / "tuned").exists()
        with pytest.raises(WorkspaceError, match="no finished export"):
            latest_export(Workspace.at(ws), "tuned")
        assert not list((ws / ".staging").glob("export-*")), "the staging copy is removed"


def test_export_on_a_full_volume_names_the_path_and_the_space(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "vol", 8 * MiB) as vol:
        ws = vol / "ws"
        _init(ws, tiny)
        _fake_training(ws)
        resize_tmpfs(vol, used_bytes(vol) + 128 * 1024)
        with pytest.raises(WorkspaceError) as err:
            export_model(ws, RUNTIME, "tuned", "run-1", log=quiet)
        _names_space(str(err.value), ws)


# --------------------------------------------------------------------------- read-only


@pytest.fixture
def read_only_ws(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A workspace with finished initializers and training, seen read-only.

    Yields (path, how): a real read-only bind mount, or where mounting is not allowed, the
    same folder with ``os.access`` reporting it unwritable (simulated).
    """
    src = tmp_path / "ws"
    _init(src, tiny)
    _fake_training(src)
    with read_only_view(src, tmp_path / "ro") as view:
        if view is None:
            real_access = workspace.os.access
            monkeypatch.setattr(workspace.os, "access",
                                lambda p, mode, **kw: False if mode == workspace.os.W_OK
                                else real_access(p, mode, **kw))
            yield src, "simulated"
        else:
            yield view, "mount"


@pytest.mark.parametrize("step", ["dataset", "model", "fine-tune", "export", "cli"])
def test_read_only_workspace_is_refused_by_every_step(
    step: str, read_only_ws, tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ws, how = read_only_ws
    before = faultkit.file_digests(ws, "")
    calls = {
        "dataset": lambda: initialize_dataset(ws, str(tiny["alpaca"] / "data"),
                                              TorchTuneInstructDataset(), quiet),
        "model": lambda: initialize_model(ws, str(tiny["llama3_2"]), RUNTIME, CONFIG, quiet),
        "fine-tune": lambda: run_fine_tune(ws, RUNTIME, CONFIG, quiet),
        "export": lambda: export_model(ws, RUNTIME, "tuned", "run-1", log=quiet),
    }
    if step == "cli":
        assert main(faultkit.cli_argv(tiny, ws)[3:]) == 2
        text = capsys.readouterr().err
    else:
        with pytest.raises(WorkspaceError) as err:
            calls[step]()
        text = str(err.value)
    assert str(ws) in text and "not writable" in text and "read-write" in text, (how, text)
    assert "--workspace" in text
    assert faultkit.file_digests(ws, "") == before


# --------------------------------------------------------------------------- simulated


def test_simulated_little_free_space_refuses_with_path_and_sizes(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workspace, "free_bytes", lambda path: 1000)
    ws = tmp_path / "ws"
    with pytest.raises(WorkspaceError) as err:
        initialize_model(ws, str(tiny["llama3_2"]), RUNTIME, CONFIG, quiet)
    text = str(err.value)
    _names_space(text, ws / ".staging")
    assert "1000 bytes available" in text
    listed = sum(p.stat().st_size for p in tiny["llama3_2"].rglob("*")
                 if p.is_file() and not p.name.startswith("."))
    assert f"({listed} bytes) needed" in text
    assert read_manifest(ws / "model") is None


def test_simulated_enospc_in_the_copy_leaves_no_cut_file(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = shutil.copy2

    def full_disk(src: str, dst: str, *args: object, **kwargs: object) -> object:
        if str(src).endswith(".safetensors"):
            Path(dst).write_bytes(b"x" * 100)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(local_backend.shutil, "copy2", full_disk)
    ws = tmp_path / "ws"
    with pytest.raises(WorkspaceError, match="no space left") as err:
        initialize_model(ws, str(tiny["llama3_2"]), RUNTIME, CONFIG, quiet)
    assert str(ws / ".staging") in str(err.value)
    assert read_manifest(ws / "model") is None and not list(ws.rglob("*.part"))


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "no space left"),
                                             (errno.EROFS, "read-only")])
def test_simulated_failure_while_installing_keeps_the_previous_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    final = tmp_path / "model"
    (tmp_path / "s1").mkdir()
    install(tmp_path / "s1", final, {"v": 1})
    assert read_manifest(final) == {"v": 1}
    staging = tmp_path / "s2"
    staging.mkdir()
    (staging / "weights").write_text("new")
    monkeypatch.setattr(workspace.os, "replace",
                        lambda *a: (_ for _ in ()).throw(OSError(code, "injected")))
    with pytest.raises(WorkspaceError, match=words) as err:
        install(staging, final, {"v": 2})
    assert str(staging) in str(err.value)  # where it was writing
    assert read_manifest(final) == {"v": 1}, "the previous complete result must stay"
    assert not list(staging.glob(".*.tmp")), "no temporary manifest may stay behind"


def test_a_tune_run_killed_by_a_full_disk_is_reported_as_such(tmp_path: Path) -> None:
    tail = ("RuntimeError: [enforce fail at inline_container.cc:626] . PytorchStreamWriter "
            "failed writing file data/3: file write failed")
    err = _disk_full(f"`tune run` exited with code 1; last lines:\n{tail}", tmp_path, 10)
    assert isinstance(err, WorkspaceError)
    assert str(tmp_path) in str(err) and "filled up" in str(err) and "pvc_size" in str(err)
    assert _disk_full("ValueError: bad config", tmp_path, 10) is None


def test_free_space_check_message() -> None:
    with pytest.raises(WorkspaceError) as err:
        check_free_space("/", 2**62, "the model hf://org/repo")
    text = str(err.value)
    assert "'/'" in text and "the model hf://org/repo" in text and f"({2**62} bytes)" in text
