"""Hangs and leftovers (issue 15): bounded network calls, children that die with the CLI, no
temporary folders left behind.

The servers are real sockets on 127.0.0.1 started by the test: one accepts connections and
never answers, one answers every request with HTTP 401. The clients are the real
``huggingface_hub``, ``boto3`` and ``kfp.Client``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support import faultkit

from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.drivers.cli import main
from kfp_finetune.errors import SourceError
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.storage.workspace import workspace_lock

TIMEOUT_S = 1  # KFP_FINETUNE_NETWORK_TIMEOUT_S in these tests
LIMIT_S = 15  # what each bounded call may take at most, retries included (load margin)


@pytest.fixture
def silent() -> Iterator[str]:
    """A server that accepts connections (kernel backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


class _Deny(BaseHTTPRequestHandler):
    def _deny(self) -> None:
        body = b'{"error": "Unauthenticated", "code": 16, "message": "Unauthenticated"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = _deny  # noqa: N815

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def denying() -> Iterator[str]:
    """A server that answers every request with HTTP 401."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Deny)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFP_FINETUNE_NETWORK_TIMEOUT_S", str(TIMEOUT_S))
    monkeypatch.setenv("KFP_FINETUNE_DOWNLOAD_ATTEMPTS", "2")
    monkeypatch.setenv("KFP_FINETUNE_RETRY_DELAY_S", "0")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "KFP_TOKEN", "KF_PIPELINES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


def _timed(fn: object) -> tuple[BaseException, float]:
    start = time.monotonic()
    with pytest.raises(Exception) as err:
        fn()  # type: ignore[operator]
    return err.value, time.monotonic() - start


@pytest.mark.usefixtures("bounded")
def test_a_hub_that_never_answers_times_out_with_a_timeout_message(
    silent: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub's repo_info passes timeout=None per request (hf_api.py, dataset_info),
    # so without storage_hf's bounded transport this call waits forever.
    monkeypatch.setenv("HF_ENDPOINT", silent)
    exc, took = _timed(lambda: initialize_dataset(
        tmp_path / "ws", "hf://org/data", TorchTuneInstructDataset(), lambda _: None))
    assert type(exc) is SourceError and took < LIMIT_S, (took, exc)
    text = str(exc)
    assert f"no answer within {TIMEOUT_S} s (timeout" in text and "after 2 attempt(s)" in text
    assert "refused" not in text and "401" not in text


@pytest.mark.usefixtures("bounded")
def test_a_hub_that_answers_401_is_access_denied_not_a_timeout(
    denying: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", denying)
    exc, took = _timed(lambda: initialize_model(
        tmp_path / "ws", "hf://org/model", "torchtune-llama3.2-tiny", TorchTuneConfig(),
        lambda _: None))
    assert type(exc) is SourceError and took < LIMIT_S
    assert "HTTP 401" in str(exc) and "HF_TOKEN" in str(exc) and "timeout" not in str(exc)


@pytest.mark.usefixtures("bounded")
def test_a_closed_hub_port_is_a_refused_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    exc, took = _timed(lambda: initialize_dataset(
        tmp_path / "ws", "hf://org/data", TorchTuneInstructDataset(), lambda _: None))
    assert type(exc) is SourceError and took < LIMIT_S
    assert "connection refused" in str(exc) and "timeout" not in str(exc)


@pytest.mark.usefixtures("bounded")
def test_an_s3_endpoint_that_never_answers_times_out(
    silent: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # botocore's read_timeout comes from KFP_FINETUNE_NETWORK_TIMEOUT_S (storage_s3.s3_client).
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    exc, took = _timed(lambda: initialize_dataset(
        tmp_path / "ws", "s3://bucket/data", TorchTuneInstructDataset(), lambda _: None))
    assert type(exc) is SourceError and took < 3 * LIMIT_S, (took, exc)
    assert "no answer within" in str(exc) and "timeout" in str(exc)


def _submit(host: str) -> list[str]:
    return ["submit", "--host", host, "--runtime", "torchtune-llama3.2-1b",
            "--dataset-uri", "hf://tatsu-lab/alpaca/data"]


@pytest.mark.usefixtures("bounded")
def test_a_kfp_api_that_never_answers_is_one_timeout_line(
    silent: str, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.monotonic()
    assert main(_submit(silent)) == 2
    assert time.monotonic() - start < LIMIT_S
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "cannot reach the KFP API" in err and f"no answer within {TIMEOUT_S} s" in err


@pytest.mark.usefixtures("bounded")
def test_a_wrong_kfp_token_is_one_line_blaming_authentication(
    denying: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # kfp.Client's constructor would retry healthz 5 times, 5 s apart, logging a traceback
    # each time (kfp/client/client.py, Client.get_kfp_healthz), then raise TimeoutError.
    monkeypatch.setenv("KFP_TOKEN", "not-the-right-token")
    start = time.monotonic()
    assert main(_submit(denying)) == 2
    assert time.monotonic() - start < LIMIT_S
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "HTTP 401" in err and "authentication failed" in err and "KFP_TOKEN" in err
    assert "not-the-right-token" not in err and "network" not in err


def test_a_password_in_the_kfp_host_is_refused_and_never_echoed(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_submit("https://admin:Hunter2Secret@kubeflow.example.com/pipeline")) == 2
    err = capsys.readouterr().err
    assert "Hunter2Secret" not in err and "admin" not in err
    assert "embeds credentials" in err and "KFP_TOKEN" in err


# ------------------------------------------------------------------------------ leftovers


def _session_members(sid: int) -> list[int]:
    """Pids of live (not zombie) processes in session ``sid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@pytest.mark.slow
def test_kill_9_of_the_cli_takes_its_tasks_down_and_frees_the_workspace(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch_parent))
    ws = tmp_path / "ws"
    proc = faultkit.start(faultkit.cli_argv(tiny, ws), tmp_path / "cli.log", env=env)
    faultkit.wait_until(proc, faultkit.metrics_has_step(ws, 1), "training (tune run)", 420)
    assert len(_session_members(proc.pid)) >= 3  # CLI, fine-tune task, tune run
    os.kill(proc.pid, signal.SIGKILL)  # the CLI alone, not its process group
    proc.wait()
    deadline = time.monotonic() + 20
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _session_members(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"task processes outlived the CLI: {left}"
    with workspace_lock(ws, "the test"):  # free: no orphan holds it
        pass
    # The killed run's scratch folder is left; the next local run (any workspace) sweeps it.
    assert [p.name for p in scratch_parent.iterdir()]
    from kfp_finetune.drivers.local import task_scope

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tempfile.tempdir", str(scratch_parent))
        with task_scope() as live:
            assert sorted(scratch_parent.iterdir()) == [live]
    assert list(scratch_parent.iterdir()) == []


@pytest.mark.slow
def test_a_local_run_leaves_no_temporary_folders(tiny: dict[str, Path], tmp_path: Path) -> None:
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch_parent))
    proc = faultkit.start(faultkit.cli_argv(tiny, tmp_path / "ws"), tmp_path / "cli.log",
                          env=env)
    assert proc.wait(timeout=600) == 0, (tmp_path / "cli.log").read_text()[-3000:]
    # Before: one `mktemp -d` folder per task (kfp's component script) stayed in $TMPDIR.
    assert list(scratch_parent.iterdir()) == []


def test_task_commands_exec_the_executor_so_it_keeps_the_parent_death_signal() -> None:
    # The rule this relies on: kfp's lightweight-component command (kfp/dsl/component_factory.py,
    # _get_command_and_args_for_lightweight_component) ends its sh script with the executor
    # line `_KFP_RUNTIME=true python3 -m kfp.dsl.executor_main ...`; dash does not exec the
    # last command of `sh -c` by itself.
    from kfp_finetune.components.dataset_initializer import dataset_initializer
    from kfp_finetune.drivers.local import _exec_executor

    command = list(dataset_initializer.component_spec.implementation.container.command)
    rewritten = _exec_executor(command)
    assert rewritten != command
    assert "\nexec env _KFP_RUNTIME=true " in rewritten[2]
    assert sys.executable  # the task runs this interpreter (SubprocessRunner(use_venv=False))


def test_concurrent_runs_never_sweep_each_others_scratch_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two runs sharing one TMPDIR (the secrets scan runs two at once): each sweep removes only
    # folders whose owner is gone, and a folder is locked before it carries the swept prefix.
    from kfp_finetune.drivers.local import task_scope

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with task_scope() as first, task_scope() as second:
        assert first.is_dir() and second.is_dir() and first != second
    assert list(tmp_path.iterdir()) == []
