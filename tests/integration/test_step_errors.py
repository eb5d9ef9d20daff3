"""How a failing step ends: our errors as one line and exit 2, bugs with their traceback.

The KFP executor (kfp/dsl/executor_main.py, ``executor_main``) calls the component function
and lets any exception escape the process, so Python prints a traceback and exits 1; kfp.local
(kfp/local/pipeline_orchestrator.py) then raises a generic "Inner task failed" RuntimeError.
These tests hold the steps, the local runner, ``train()`` and the CLI to one clear line instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kfp_finetune.config.types import (
    HuggingFaceDatasetInitializer,
    HuggingFaceModelInitializer,
    Initializer,
    TorchTuneConfig,
    TorchTuneInstructDataset,
)
from kfp_finetune.drivers.api import BuiltinTrainer, train
from kfp_finetune.drivers.cli import main
from kfp_finetune.errors import DatasetError, ModelError, TrainingError
from kfp_finetune.steps.gpus import check_gpus_visible
from kfp_finetune.steps.step_errors import PREFIX, error_line, one_line, step_error
from kfp_finetune.storage.workspace import Workspace

TINY = "torchtune-llama3.2-tiny"
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def _step(ws: Path, raising: str, kfp_runtime: bool = True) -> subprocess.CompletedProcess:
    """A process shaped like a KFP task: the step's body inside step_errors, under the env
    variable that kfp's component_factory (``_get_command_and_args_for_lightweight_component``)
    sets for every Python component."""
    code = textwrap.dedent(f"""
        from kfp_finetune.errors import DatasetError, WorkspaceError
        from kfp_finetune.steps.step_errors import step_errors
        print("[dataset] working", flush=True)
        with step_errors("dataset-initializer", {str(ws)!r}):
            raise {raising}
    """)
    env = {k: v for k, v in os.environ.items() if k != "_KFP_RUNTIME"}
    if kfp_runtime:
        env["_KFP_RUNTIME"] = "true"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_domain_error_ends_the_task_with_one_line_and_exit_2(tmp_path: Path) -> None:
    Workspace.at(tmp_path)  # the error is recorded in a workspace only
    proc = _step(tmp_path, 'DatasetError("column_map names a column the data lacks: x")')
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"{PREFIX}DatasetError: column_map names a column the data lacks: x"]
    assert "Traceback" not in proc.stdout + proc.stderr
    record = json.loads((tmp_path / ".kfp-finetune" / "last-error.json").read_text())
    assert record == {"step": "dataset-initializer", "type": "DatasetError",
                      "message": "column_map names a column the data lacks: x"}
    exc = step_error(tmp_path)
    assert type(exc) is DatasetError and exc.step == "dataset-initializer"  # type: ignore
    assert str(exc) == record["message"]


def test_a_bug_keeps_its_traceback_and_records_nothing(tmp_path: Path) -> None:
    proc = _step(tmp_path, 'KeyError("not ours")')
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "KeyError: 'not ours'" in proc.stderr
    assert PREFIX not in proc.stderr
    assert step_error(tmp_path) is None


def test_outside_the_executor_the_error_is_raised_unchanged(tmp_path: Path) -> None:
    proc = _step(tmp_path, 'DatasetError("plain")', kfp_runtime=False)
    assert proc.returncode == 1
    assert "kfp_finetune.errors.DatasetError: plain" in proc.stderr
    assert not (tmp_path / ".kfp-finetune").exists()


def test_a_missing_workspace_is_not_created_to_hold_the_error(tmp_path: Path) -> None:
    proc = _step(tmp_path / "absent", 'DatasetError("x")')
    assert proc.returncode == 2 and proc.stderr.strip() == f"{PREFIX}DatasetError: x"
    assert not (tmp_path / "absent").exists()


def test_nothing_is_written_into_a_folder_that_is_not_a_workspace(tmp_path: Path) -> None:
    # e.g. the user's own folder that the step refused as its workspace (issue 15)
    (tmp_path / "notes.txt").write_text("mine")
    proc = _step(tmp_path, 'WorkspaceError("not a workspace")')
    assert proc.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_multi_line_message_becomes_its_first_and_last_line() -> None:
    text = "`tune run` exited with code 1; last lines:\nstep 3\nRuntimeError: CUDA out of memory"
    assert one_line(text) == ("`tune run` exited with code 1; last lines ... "
                              "RuntimeError: CUDA out of memory")
    assert error_line(TrainingError(text)).startswith(f"{PREFIX}TrainingError: `tune run`")
    assert one_line("  single  ") == "single"


# --- no GPU where GPUs are asked for ----------------------------------------------------------

@NO_GPU
def test_the_fine_tune_step_refuses_at_once_without_a_gpu(tmp_path: Path) -> None:
    # The component's own function, as a test calls it (no executor: the error is raised).
    from kfp import dsl

    from kfp_finetune.components.fine_tune import fine_tune

    start = time.monotonic()
    with pytest.raises(TrainingError) as err:
        from kfp_finetune.config.run_config import RunConfig
        from kfp_finetune.config.types import TorchTuneConfig

        config = RunConfig(runtime=TINY, dataset_uri="/data",
                           trainer=TorchTuneConfig(resources_per_node={"gpu": 1})).to_dict()
        fine_tune.python_func(
            config=config, workspace_path=str(tmp_path / "ws"),
            metrics=dsl.Metrics(name="m", uri=str(tmp_path / "m"), metadata={}),
            loss_curve=dsl.HTML(name="c", uri=str(tmp_path / "c"), metadata={}),
        )
    assert time.monotonic() - start < 20
    text = str(err.value)
    for needle in ("gpus_per_node=1", "sees no GPU", "accelerator", "node selector", "2.4",
                   "gpus_per_node=0"):
        assert needle in text, needle
    assert not (tmp_path / "ws").exists(), "checked before the workspace is touched"


def test_fewer_gpus_than_asked_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mocked: no machine here has GPUs; this stands in for a pod that got 1 of the 2 asked for.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(TrainingError, match=r"gpus_per_node=2 but .* sees only 1 GPU\(s\)"):
        check_gpus_visible(2)
    check_gpus_visible(1)
    check_gpus_visible(0)


def _run_argv(tiny: dict[str, Path], ws: Path, *extra: str) -> list[str]:
    return ["run", "--local", "--runtime", TINY, "--model-uri", str(tiny["llama3_2"]),
            "--dataset-uri", str(tiny["alpaca"] / "data"), "--workspace", str(ws), *extra]


def _cli(argv: list[str], **kw: object) -> subprocess.Popen:
    """The installed ``kfp-finetune`` command, both streams in one pipe as in a terminal."""
    exe = Path(sys.executable).with_name("kfp-finetune")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("_KFP_RUNTIME", None)
    return subprocess.Popen([str(exe), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, **kw)  # type: ignore[call-overload]


@NO_GPU
@pytest.mark.slow
def test_a_cpu_run_asking_for_a_gpu_fails_in_the_fine_tune_step_with_one_line(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    start = time.monotonic()
    proc = _cli(_run_argv(tiny, tmp_path / "ws", "--gpus", "1"))
    out, _ = proc.communicate(timeout=600)
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 2, out[-3000:]
    assert lines[-1].startswith(f"{PREFIX}TrainingError: gpus_per_node=1 but this pod"), lines[-1]
    assert "sees no GPU" in lines[-1]
    assert "on cuda" not in out and "$ tune run" not in out and "device: cuda" not in out
    assert "Traceback" not in out
    assert "Task 'fine-tune' finished" in out.replace("\x1b[96m", "").replace("\x1b[0m", "")
    assert time.monotonic() - start < 180  # the initializers and a refusal; no training
    assert not (tmp_path / "ws" / "output" / "checkpoints" / "epoch_0").exists()


# --- the CLI and train() surface the step's own error -----------------------------------------

@pytest.mark.slow
def test_a_model_runtime_mismatch_ends_the_cli_with_the_model_steps_line(
    tiny: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    argv = _run_argv(tiny, tmp_path / "ws")
    argv[argv.index("--runtime") + 1] = "torchtune-qwen2.5-tiny"
    assert main(argv) == 2
    captured = capfd.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"{PREFIX}ModelError: ") and "torchtune-llama3.2-tiny" in last
    assert last in [line.strip() for line in captured.out.splitlines()]  # the task's last line
    assert "Traceback" not in captured.out + captured.err
    assert "Inner task failed" not in captured.err


@pytest.mark.slow
def test_train_raises_the_steps_own_error(tiny: dict[str, Path], tmp_path: Path) -> None:
    init = Initializer(dataset=HuggingFaceDatasetInitializer(str(tiny["alpaca"] / "data")),
                       model=HuggingFaceModelInitializer(str(tiny["llama3_2"])))
    config = TorchTuneConfig(
        dataset_preprocess_config=TorchTuneInstructDataset(column_map={"output": "answer"}))
    with pytest.raises(DatasetError) as err:
        train(TINY, init, BuiltinTrainer(config), workspace=tmp_path / "ws")
    assert err.value.step == "dataset-initializer"  # type: ignore[attr-defined]
    assert "output->answer" in str(err.value) and "Fix column_map" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert not isinstance(err.value, ModelError)


@pytest.mark.slow
def test_ctrl_c_ends_the_cli_with_one_line_and_exit_130(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    # A terminal's Ctrl-C sends SIGINT to the whole foreground process group: the CLI and the
    # task it runs. Sent once the fine-tune step is running `tune run`.
    proc = _cli(_run_argv(tiny, tmp_path / "ws", "--epochs", "50"), start_new_session=True)
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        seen.append(line)
        if "[fine-tune] $ tune run" in line or time.monotonic() > deadline:
            break
    assert any("$ tune run" in line for line in seen), "".join(seen)[-3000:]
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    lines = [line for line in rest.splitlines() if line.strip()]
    assert proc.returncode == 130, rest[-3000:]
    assert lines[-1] == "kfp-finetune: interrupted"
    # The CLI's own lines after the interrupt: no traceback of the CLI process.
    cli_tail = rest[rest.rfind("[fine-tune]"):] if "[fine-tune]" in rest else rest
    assert "kfp/local" not in cli_tail and "kfp_finetune/cli.py" not in cli_tail
