"""Nothing lost, nothing stale (issue 15): the workspace resolver, guarded deletion, content
fingerprints, zero-step runs, deleted checkpoints and re-run exports.

Fast tests use the initializers (file copies of the tiny fixtures) and never train; the few
real trainings (tiny Llama 3.2, CPU, about 15 s each) are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from support.faultkit import file_digests, max_abs_diff

from kfp_finetune import (
    HuggingFaceDatasetInitializer,
    HuggingFaceModelInitializer,
    Initializer,
    train,
)
from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.drivers.cli import main as cli_main
from kfp_finetune.drivers.client.local_backend import LocalBackend, LocalBackendConfig
from kfp_finetune.errors import TrainingError, WorkspaceError
from kfp_finetune.steps.completion import planned_steps
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.export_model import export_model
from kfp_finetune.steps.fine_tune import run_fine_tune
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.storage.ownership import WORKSPACE_MARKER, owned, remove_owned
from kfp_finetune.storage.workspace import MANIFEST, Workspace, install, read_manifest

RUNTIME = "torchtune-llama3.2-tiny"
CONFIG = TorchTuneConfig(epochs=1, batch_size=16)  # 64 rows: 4 optimizer steps


def quiet(_: str) -> None:
    return None


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (dot files included): proof nothing changed."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(root: Path) -> Path:
    """A folder of the user's own: a model, a dataset and outputs kfp-finetune never wrote."""
    for rel, text in (("model/model.safetensors", "my weights"), ("dataset/mine.csv", "a,b\n"),
                      ("output/checkpoints/notes.txt", "keep"), ("report.docx", "draft")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def init_both(ws: Path, tiny: dict[str, Path], config: TorchTuneConfig = CONFIG,
              data_uri: str | None = None, model_uri: str | None = None) -> tuple:
    pre = config.dataset_preprocess_config or TorchTuneInstructDataset()
    data = initialize_dataset(ws, data_uri or f"file://{tiny['alpaca']}/data", pre, quiet)
    model = initialize_model(ws, model_uri or str(tiny["llama3_2"]), RUNTIME, config, quiet)
    return data, model


def same_size_edit(path: Path, edit) -> None:
    """Rewrite ``path`` with ``edit(bytes)`` (same length), then put its mtime back."""
    st = path.stat()
    data = path.read_bytes()
    new = edit(data)
    assert len(new) == len(data) and new != data
    path.write_bytes(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def perturb_weights(data: bytes) -> bytes:
    """The same safetensors file with one float32 tensor set to 0.01 (same size, valid)."""
    import numpy as np

    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"
                and "norm" not in k)
    start, end = (8 + size + o for o in header[name]["data_offsets"])
    fill = np.full((end - start) // 4, 0.01, dtype=np.float32).tobytes()
    return data[:start] + fill + data[end:]


# --------------------------------------------------------------------------- the resolver


def test_an_empty_workspace_path_is_refused_and_the_current_directory_is_untouched(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = user_folder(tmp_path / "home")
    before = snapshot(home)
    monkeypatch.chdir(home)
    for call in (
        lambda: Workspace.at(""),
        lambda: initialize_dataset("", f"file://{tiny['alpaca']}/data",
                                   TorchTuneInstructDataset(), quiet),
        lambda: initialize_model("  ", str(tiny["llama3_2"]), RUNTIME, CONFIG, quiet),
        lambda: run_fine_tune("", RUNTIME, CONFIG, quiet),
        lambda: export_model("", RUNTIME, run_id="r1", log=quiet),
        lambda: train(RUNTIME, Initializer(
            dataset=HuggingFaceDatasetInitializer(storage_uri=f"file://{tiny['alpaca']}/data"),
            model=HuggingFaceModelInitializer(storage_uri=str(tiny["llama3_2"]))), workspace=""),
        lambda: LocalBackend(LocalBackendConfig(workspace="")),  # TrainerClient's local backend
    ):
        with pytest.raises(WorkspaceError, match=r"workspace='\s*' names no folder.*--workspace"):
            call()
    code = cli_main(["run", "--local", "--runtime", RUNTIME, "--model-uri",
                     str(tiny["llama3_2"]), "--dataset-uri", f"file://{tiny['alpaca']}/data",
                     "--workspace", ""])
    assert code == 2
    assert "--workspace='' names no folder" in capsys.readouterr().err
    assert snapshot(home) == before, "a file of the current directory changed"


def test_the_filesystem_root_and_a_foreign_folder_are_refused_with_the_path_named(
    tmp_path: Path,
) -> None:
    with pytest.raises(WorkspaceError, match="filesystem root"):
        Workspace.at("/")
    mine = user_folder(tmp_path / "project")
    before = snapshot(mine)
    with pytest.raises(WorkspaceError, match=f"{mine}.*did not create.*--workspace") as err:
        Workspace.at(mine)
    assert "report.docx" in str(err.value)
    # A folder holding only a model/ without a manifest is somebody's model, not a workspace.
    bare = tmp_path / "bare"
    (bare / "model").mkdir(parents=True)
    (bare / "model" / "config.json").write_text("{}")
    with pytest.raises(WorkspaceError, match="did not create"):
        Workspace.at(bare)
    assert snapshot(mine) == before and not (bare / WORKSPACE_MARKER).exists()


def test_new_empty_and_older_workspaces_are_adopted_with_a_marker(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    new = Workspace.at(tmp_path / "new" / "ws")
    assert json.loads((new.root / WORKSPACE_MARKER).read_text())["created_by"] == "kfp-finetune"
    volume = tmp_path / "volume"  # a fresh ext4 volume holds lost+found
    (volume / "lost+found").mkdir(parents=True)
    assert Workspace.at(volume).root == volume.resolve()
    # A workspace of an earlier version (no marker, the known layout with manifests).
    older = tmp_path / "older"
    init_both(older, tiny)
    (older / WORKSPACE_MARKER).unlink()
    assert Workspace.at(older).root == older.resolve()
    assert (older / WORKSPACE_MARKER).is_file()
    data, _ = init_both(older, tiny)
    assert data.fetch.skipped


# --------------------------------------------------------------------------- deletion


def test_a_users_own_model_dataset_or_checkpoints_folder_is_refused_never_replaced(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    ws = Workspace.at(tmp_path / "ws").root  # an adopted workspace ...
    user_folder(ws)  # ... into which the user copied folders of their own
    (ws / "report.docx").unlink()
    before = snapshot(ws / "model"), snapshot(ws / "dataset")
    with pytest.raises(WorkspaceError, match=f"{ws / 'model'}.*did not write.*Move it"):
        initialize_model(ws, str(tiny["llama3_2"]), RUNTIME, CONFIG, quiet)
    with pytest.raises(WorkspaceError, match=f"{ws / 'dataset'}.*did not write"):
        initialize_dataset(ws, f"file://{tiny['alpaca']}/data", TorchTuneInstructDataset(), quiet)
    assert (snapshot(ws / "model"), snapshot(ws / "dataset")) == before

    for name in ("model", "dataset"):  # moved away: the steps run
        (ws / name).rename(tmp_path / f"kept-{name}")
    init_both(ws, tiny)
    notes = snapshot(ws / "output" / "checkpoints")
    with pytest.raises(WorkspaceError, match=f"{ws / 'output' / 'checkpoints'}.*did not write"):
        run_fine_tune(ws, RUNTIME, CONFIG, quiet)
    assert snapshot(ws / "output" / "checkpoints") == notes


def test_the_one_deletion_helper_needs_a_proof(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws").root
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "a.txt").write_text("x")
    ours = ws / "model"
    ours.mkdir()
    (ours / MANIFEST).write_text("{}")
    staged = ws / ".staging" / "model-0123" / "part.bin"
    staged.parent.mkdir(parents=True)
    staged.write_text("x")
    # A `.cache` or `.staging` folder counts only inside a marked workspace (not ~/.cache).
    foreign_cache = tmp_path / "home" / ".cache" / "x.bin"
    foreign_cache.parent.mkdir(parents=True)
    foreign_cache.write_text("x")
    assert owned(ours) and owned(staged) and owned(tmp_path / "missing")
    assert not owned(theirs) and not owned(foreign_cache) and not owned(theirs / "a.txt")
    for path in (theirs, theirs / "a.txt", foreign_cache):
        with pytest.raises(WorkspaceError, match="did not write it"):
            remove_owned(path)
    with pytest.raises(WorkspaceError, match="did not write it"):
        install(ws / ".staging" / "model-0123", theirs, {"source": "x"})
    assert (theirs / "a.txt").is_file() and foreign_cache.is_file()
    remove_owned(ours)
    remove_owned(staged)
    assert not ours.exists() and not staged.exists()


# --------------------------------------------------------------------------- content


def test_a_source_file_replaced_with_its_size_and_mtime_kept_is_fetched_again(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    src = tmp_path / "src-model"
    shutil.copytree(tiny["llama3_2"], src)
    ws = tmp_path / "ws"
    init_both(ws, tiny, model_uri=f"file://{src}")
    same_size_edit(src / "model.safetensors", perturb_weights)  # swapped weights, same name
    _, model = init_both(ws, tiny, model_uri=f"file://{src}")
    assert not model.fetch.skipped
    assert file_digests(ws / "model") == file_digests(src)


def test_a_workspace_copy_edited_in_place_is_not_taken_as_complete(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    ws = tmp_path / "ws"
    init_both(ws, tiny)
    parquet = next((ws / "dataset").rglob("*.parquet"))
    original = parquet.read_bytes()
    same_size_edit(parquet, lambda b: b[:-100] + bytes(x ^ 1 for x in b[-100:-90]) + b[-90:])
    data, model = init_both(ws, tiny)
    assert not data.fetch.skipped and model.fetch.skipped
    assert parquet.read_bytes() == original
    record = next(f for f in read_manifest(ws / "dataset")["files"] if f["path"].endswith(
        ".parquet"))
    assert record["sha256"] == hashlib.sha256(original).hexdigest()


# --------------------------------------------------------------------------- zero steps


def test_planned_steps_follow_torchtunes_dataloader() -> None:
    # recipes/full_finetune_single_device.py (torchtune 0.6.1), _setup_data and setup:
    # StatefulDistributedSampler shards ceil(rows / world) rows to each process, the
    # DataLoader drops the last partial batch (drop_last=True), and
    # _steps_per_epoch = len(dataloader) // gradient_accumulation_steps, capped by
    # max_steps_per_epoch.
    conf = {"dataset": {"packed": False}, "batch_size": 4, "gradient_accumulation_steps": 2}
    assert planned_steps(64, conf, 1) == 8
    assert planned_steps(7, conf, 1) == 0
    assert planned_steps(8, conf, 1) == 1
    assert planned_steps(64, conf, 8) == 1  # 8 rows per process
    assert planned_steps(63, conf, 8) == 1  # the sampler pads: ceil(63 / 8) = 8 each
    assert planned_steps(56, conf, 8) == 0  # 7 rows per process
    assert planned_steps(64, {**conf, "max_steps_per_epoch": 3}, 1) == 3
    assert planned_steps(64, {**conf, "dataset": {"packed": True}}, 1) is None


@pytest.mark.parametrize(("config", "shown"), [
    (TorchTuneConfig(epochs=1, batch_size=128),
     "batch_size=128 with gradient_accumulation_steps=1"),
    (TorchTuneConfig(epochs=1, batch_size=16, gradient_accumulation_steps=8),
     "batch_size=16 with gradient_accumulation_steps=8"),
], ids=["batch", "accumulation"])
def test_a_batch_larger_than_the_data_is_refused_before_tune_run(
    tiny: dict[str, Path], tmp_path: Path, config: TorchTuneConfig, shown: str
) -> None:
    ws = tmp_path / "ws"
    init_both(ws, tiny, config)
    with pytest.raises(TrainingError, match=rf"{shown} .*needs at least 128 rows.*64 row\(s\)"
                       r".*Lower batch_size or gradient_accumulation_steps"):
        run_fine_tune(ws, RUNTIME, config, quiet)
    assert not (ws / "output" / "checkpoints").exists(), "tune run started"


@pytest.mark.slow
def test_a_run_that_took_no_optimizer_step_fails_and_is_never_marked_finished(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    # Packed data has an unknown number of samples before torchtune packs it, so the
    # pre-check cannot decide; 64 short rows pack into a few 2048-token sequences, fewer
    # than one batch of 32: torchtune runs, takes no step and saves the base model.
    config = TorchTuneConfig(epochs=1, batch_size=32, packed=True, max_seq_len=2048)
    ws = tmp_path / "ws"
    init_both(ws, tiny, config)
    with pytest.raises(TrainingError, match=r"batch_size=32 .*no optimizer step"):
        run_fine_tune(ws, RUNTIME, config, quiet)
    assert read_manifest(ws / "output" / "checkpoints") is None
    with pytest.raises(WorkspaceError, match="no finished fine-tune output"):
        export_model(ws, RUNTIME, run_id="r1", log=quiet)


# --------------------------------------------------------------------------- whole re-runs


def alpaca_jsonl(tiny: dict[str, Path], folder: Path) -> Path:
    """The tiny alpaca rows as a JSON-lines file (so an edit can keep the byte size)."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rows = pq.read_table(next((tiny["alpaca"] / "data").glob("*.parquet"))).to_pylist()
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_run(ws: Path, tiny: dict[str, Path], data: Path, run_id: str, name: str = "") -> dict:
    config = TorchTuneConfig(epochs=1, batch_size=16,
                             dataset_preprocess_config=TorchTuneInstructDataset(source="json"))
    fetched = init_both(ws, tiny, config, data_uri=f"file://{data}")
    trained = run_fine_tune(ws, RUNTIME, config, quiet)
    exported = export_model(ws, RUNTIME, name, run_id, log=quiet)
    return {"data": fetched[0].fetch, "model": fetched[1].fetch, "trained": trained,
            "exported": exported}


@pytest.mark.slow
def test_changed_inputs_train_again_and_a_finished_run_is_reused_whole(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    ws = tmp_path / "ws"
    data = alpaca_jsonl(tiny, tmp_path / "src-data")
    first = one_run(ws, tiny, data.parent, "r1")
    assert not first["trained"].skipped and not first["exported"].skipped
    first_model = Path(first["exported"].path)

    # A re-run of the finished run: every step finds its work; the default-named export
    # of a new run id is the existing one, not a second identical copy.
    again = one_run(ws, tiny, data.parent, "r2")
    assert again["data"].skipped and again["model"].skipped and again["trained"].skipped
    assert again["exported"].skipped and again["exported"].path == str(first_model)
    assert len(list((ws / "output").iterdir())) == 2  # checkpoints + one export
    # An explicit export_name: the second run of the same model is skipped as done (the
    # README's promise); a different model under that name is refused further down.
    assert not export_model(ws, RUNTIME, "tuned", "r2", log=quiet).skipped
    assert export_model(ws, RUNTIME, "tuned", "r3", log=quiet).skipped

    # The final checkpoint deleted after the run finished: the export says to re-run the
    # fine-tune step, which trains again (bit for bit the same model), instead of trusting
    # its manifest forever.
    for shard in (ws / "output" / "checkpoints").glob("epoch_*/*.safetensors"):
        shard.unlink()
    with pytest.raises(WorkspaceError, match=r"missing or cut short.*Re-run the fine-tune step"):
        export_model(ws, RUNTIME, run_id="r4", log=quiet)
    lines: list[str] = []
    retrained = run_fine_tune(ws, RUNTIME, TorchTuneConfig(
        epochs=1, batch_size=16, dataset_preprocess_config=TorchTuneInstructDataset(
            source="json")), lines.append)
    assert not retrained.skipped
    assert any("cannot be used" in line and "training again" in line for line in lines)
    reused = export_model(ws, RUNTIME, run_id="r4", log=quiet)  # the newest same-model export
    assert reused.skipped and reused.path == str(ws / "output" / "tuned")
    assert file_digests(Path(reused.path)) == file_digests(first_model)

    # The dataset edited in place at its source, size and mtime kept: fetched again, trained
    # again, exported anew; the card and manifest name the new content.
    same_size_edit(data, lambda b: b.replace(b'"output": "Rome"', b'"output": "ROME"'))
    edited = one_run(ws, tiny, data.parent, "r5")
    assert not edited["data"].skipped and edited["model"].skipped
    assert not edited["trained"].skipped and not edited["exported"].skipped
    second_model = Path(edited["exported"].path)
    assert second_model != first_model and max_abs_diff(second_model, first_model) > 0
    old_meta = json.loads((first_model / MANIFEST).read_text())
    new_meta = json.loads((second_model / MANIFEST).read_text())
    assert new_meta["inputs"]["dataset"] != old_meta["inputs"]["dataset"]
    assert new_meta["inputs"]["model"] == old_meta["inputs"]["model"]
    assert f"dataset `{new_meta['inputs']['dataset']}`" in (second_model / "README.md").read_text()
    with pytest.raises(WorkspaceError, match=r"tuned.*already holds a different model"):
        export_model(ws, RUNTIME, "tuned", "r5", log=quiet)

    # The base model's weights swapped in the workspace under the same name (mtime kept):
    # the fine-tune step alone notices and trains again.
    same_size_edit(ws / "model" / "model.safetensors", perturb_weights)
    lines.clear()
    swapped = run_fine_tune(ws, RUNTIME, TorchTuneConfig(
        epochs=1, batch_size=16, dataset_preprocess_config=TorchTuneInstructDataset(
            source="json")), lines.append)
    assert not swapped.skipped
    assert any("changed: model" in line for line in lines), lines[:3]
