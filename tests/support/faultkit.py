"""Helpers of the reliability suite: processes killed on cue, mounts, model comparison.

Also the two undisturbed whole-pipeline runs that several modules compare against (see
:func:`full_runs`): they run once per session, concurrently, with sentinel secrets in their
environment, so one pair of runs serves the concurrency test, the secret scan and the
killed-pipeline test.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNTIME = "torchtune-llama3.2-tiny"
# Sentinel secrets: a Hugging Face token shape and an S3 secret with no recognisable shape
# (so only the environment-based redaction can hide it).
SENTINEL_HF = "hf_KfpSentinelTokenMustNeverLeak0123456789"
SENTINEL_AWS = "SentinelAwsSecret/MustNotLeak+0123456789abc"
SENTINEL_AWS_ID = "AKIASENTINELKEYID0001"
# The whole-pipeline runs: 64 rows / batch 16 = 4 steps, one epoch.
CLI_TRAINING = ["--epochs", "1", "--batch-size", "16"]
EXPORT_NAME = "tuned"


def secret_env(**extra: str) -> dict[str, str]:
    """This process's environment plus the sentinel secrets (and ``extra``)."""
    env = dict(os.environ)
    env.update(HF_TOKEN=SENTINEL_HF, AWS_SECRET_ACCESS_KEY=SENTINEL_AWS,
               AWS_ACCESS_KEY_ID=SENTINEL_AWS_ID, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(argv: list[str], log: Path | None = None, env: dict[str, str] | None = None,
          ) -> subprocess.Popen:
    """Start ``argv`` in a new session (its own process group), output to ``log``."""
    out: Any = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env=env or dict(os.environ), start_new_session=True)
    finally:
        if log:
            out.close()


def start_python(script: str, *args: str, log: Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -c script args...`` in its own process group."""
    return start([sys.executable, "-c", textwrap.dedent(script), *args], log, env)


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], what: str,
               timeout: float = 300, poll: float = 0.02) -> None:
    """Wait until ``ready()`` while ``proc`` runs; fail the test if it ends or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (code {proc.returncode}) before {what}")
        time.sleep(poll)
    kill(proc)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group of ``proc`` (the step and `tune run` under it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def metrics_has_step(ws: Path, step: int) -> Callable[[], bool]:
    """A predicate: torchtune logged step ``step`` in the workspace's metrics file."""
    path = ws / "output" / "checkpoints" / "logs" / "metrics.txt"

    def ready() -> bool:
        try:
            return f"Step {step} " in path.read_text()
        except OSError:
            return False

    return ready


def safetensors_of(folder: Path) -> dict[str, Any]:
    """Every tensor of the top-level safetensors files of ``folder`` (name -> tensor)."""
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    assert tensors, f"no safetensors in {folder}"
    return tensors


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between the weights of two model folders."""
    ta, tb = safetensors_of(a), safetensors_of(b)
    assert ta.keys() == tb.keys()
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def file_digests(folder: Path, suffix: str = ".safetensors") -> dict[str, str]:
    """sha256 of every file ending in ``suffix`` under ``folder`` (dot files left out)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob(f"*{suffix}")) if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


# --------------------------------------------------------------------------- mounts


def _mount(*args: str) -> str | None:
    """Run ``mount args``; None on success, else why it failed."""
    try:
        res = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if res.returncode == 0 else (res.stderr.strip() or f"code {res.returncode}")


def umount(path: Path) -> None:
    """Unmount ``path`` (lazily, so an open file in a killed process cannot block it)."""
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes at ``path``; skips the test where mounting is not allowed."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    why = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here ({why}); the simulated tests cover this")
    try:
        yield path
    finally:
        umount(path)


def resize_tmpfs(path: Path, size: int) -> None:
    """Change the size of the tmpfs at ``path`` (it must hold what is already there)."""
    why = _mount("-o", f"remount,size={size}", str(path))
    assert why is None, why


def used_bytes(path: Path) -> int:
    """Bytes in use on the filesystem of ``path``."""
    import shutil

    usage = shutil.disk_usage(path)
    return usage.total - usage.free


@contextlib.contextmanager
def read_only_view(src: Path, view: Path) -> Iterator[Path | None]:
    """``src`` bind-mounted read-only at ``view``; yields None where mounting is not allowed."""
    view.mkdir(parents=True, exist_ok=True)
    why = _mount("--bind", str(src), str(view))
    if why is not None:
        yield None
        return
    try:
        why = _mount("-o", "remount,bind,ro", str(view))
        yield None if why is not None else view
    finally:
        umount(view)


# --------------------------------------------------------------------------- whole runs


@dataclass
class FullRun:
    """One finished whole-pipeline run."""

    workspace: Path
    model_dir: Path
    log: str
    returncode: int
    started: float
    ended: float


_RUNS: dict[str, tuple[FullRun, FullRun]] = {}

API_RUN = """
import sys
from kfp_finetune import (BuiltinTrainer, HuggingFaceDatasetInitializer,
                          HuggingFaceModelInitializer, Initializer, TorchTuneConfig, train)
result = train(
    runtime="torchtune-llama3.2-tiny",
    initializer=Initializer(
        dataset=HuggingFaceDatasetInitializer(storage_uri=sys.argv[2], access_token=sys.argv[4]),
        model=HuggingFaceModelInitializer(storage_uri=sys.argv[3], access_token=sys.argv[4]),
    ),
    trainer=BuiltinTrainer(config=TorchTuneConfig(epochs=1, batch_size=16)),
    workspace=sys.argv[1],
    export_name="tuned",
)
print("fine-tuned model:", result.model_dir)
"""


def cli_argv(tiny: dict[str, Path], ws: Path, *extra: str) -> list[str]:
    """``kfp-finetune run --local`` on the tiny fixtures (the whole-run settings)."""
    return [sys.executable, "-m", "kfp_finetune.drivers.cli", "run", "--local",
            "--runtime", RUNTIME,
            "--model-uri", str(tiny["llama3_2"]), "--dataset-uri",
            f"file://{tiny['alpaca']}/data", "--workspace", str(ws), *CLI_TRAINING,
            "--export-name", EXPORT_NAME, *extra]


def full_runs(tiny: dict[str, Path], base: Path) -> tuple[FullRun, FullRun]:
    """Two undisturbed whole-pipeline runs, started at the same time on two workspaces.

    The first is ``kfp-finetune run --local`` with the sentinel token in ``HF_TOKEN``; the
    second is the Python API ``train()`` with the sentinel passed as ``access_token`` (and no
    ``HF_TOKEN`` in its environment). Both have the sentinel S3 keys in their environment,
    and their temporary files go under ``base`` (``TMPDIR``) so that they can be scanned.
    Made once per test session.
    """
    key = str(tiny["llama3_2"])
    if key in _RUNS:
        return _RUNS[key]
    root = base / "full-runs"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    ws1, ws2 = root / "ws-cli", root / "ws-api"
    env1 = secret_env(TMPDIR=str(tmp))
    env2 = secret_env(TMPDIR=str(tmp))
    env2.pop("HF_TOKEN")
    t0 = time.time()
    p1 = start(cli_argv(tiny, ws1), root / "cli.log", env1)
    p2 = start_python(API_RUN, str(ws2), str(tiny["alpaca"] / "data"), str(tiny["llama3_2"]),
                      SENTINEL_HF, log=root / "api.log", env=env2)
    ends: dict[int, float] = {}
    deadline = time.monotonic() + 540
    while len(ends) < 2 and time.monotonic() < deadline:
        for proc in (p1, p2):
            if proc.pid not in ends and proc.poll() is not None:
                ends[proc.pid] = time.time()
        time.sleep(0.2)
    for proc in (p1, p2):
        if proc.poll() is None:
            kill(proc)
            ends[proc.pid] = time.time()
    runs = tuple(
        FullRun(ws, ws / "output" / EXPORT_NAME, (root / name).read_text(errors="replace"),
                proc.returncode, t0, ends[proc.pid])
        for ws, name, proc in ((ws1, "cli.log", p1), (ws2, "api.log", p2))
    )
    _RUNS[key] = runs  # type: ignore[assignment]
    return _RUNS[key]
