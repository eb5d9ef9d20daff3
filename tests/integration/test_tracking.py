"""Experiment tracking: settings checked up front, the plug-in, a real MLflow server, W&B offline.

The MLflow tests run against a real ``mlflow server`` (SQLite store) that the session fixture
starts on 127.0.0.1 and stops; they query it with ``MlflowClient``. W&B has no server that
runs here: its tests use ``WANDB_MODE=offline`` and read the run's local files.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from kfp_finetune.config.overrides import check_override
from kfp_finetune.config.tracking import TrackingConfig, tracking_config
from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.export_model import export_model
from kfp_finetune.steps.fine_tune import run_fine_tune
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.steps.tracking_run import check_tracking, metric_logger_conf, state_path
from kfp_finetune.steps.training_log import read_metric_rows, read_metrics
from kfp_finetune.storage.workspace import Workspace

RUNTIME = "torchtune-llama3.2-tiny"
SENTINEL = "sentinel-tracking-secret-8c1f2e"
SERVER_START_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite store) on 127.0.0.1, stopped after the module."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
           f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", (root / "art").as_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n"
                                   + (root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("uri, fragment", [
    ("ftp://mlflow:5000", "scheme 'ftp'"),
    ("file:///tmp/mlruns", "scheme 'file'"),
    ("mlflow.example.com:5000", "has scheme"),
    (f"http://user:{SENTINEL}@mlflow:5000", "carries credentials"),
    (f"https://mlflow:5000/?token={SENTINEL}", "carries credentials"),
    ("http://:5000", "no valid host"),
    ("http://mlflow:50x0", "no valid host or port"),
    ("http://mlflow 5000", "no valid host"),
])
def test_a_bad_tracking_uri_is_refused_up_front_without_echoing_a_secret(uri, fragment):
    with pytest.raises(ConfigError) as err:
        tracking_config(mlflow_tracking_uri=uri)
    assert fragment in str(err.value)
    assert "track_mlflow_uri=" in str(err.value)
    assert SENTINEL not in str(err.value)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"mlflow_experiment": "exp"}, "track_mlflow_uri is empty"),
    ({"wandb_entity": "team"}, "track_wandb_project is empty"),
    ({"wandb_project": "a/b"}, "not a valid W&B project name"),
    ({"wandb_project": "p", "wandb_entity": "team name"}, "not a valid W&B entity name"),
    ({"mlflow_tracking_uri": "http://m:5000", "mlflow_experiment": "a\nb"}, "experiment name"),
])
def test_a_setting_without_its_tracker_or_malformed_is_refused(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tracking_config(**kwargs)


def test_no_setting_means_no_tracking_and_the_plain_disk_logger():
    assert tracking_config() is None
    assert tracking_config("", "", "", "", "name") is None
    config = tracking_config(mlflow_tracking_uri="https://mlflow.example.com/")
    assert config == TrackingConfig("https://mlflow.example.com", "kfp-finetune")
    assert TrackingConfig.from_dict(config.to_dict()) == config
    # Without tracking the rendered metric_logger is torchtune's DiskLogger exactly as before
    # (the config fingerprint of finished runs must not change).
    assert metric_logger_conf(Path("/w/out")) == {
        "_component_": "torchtune.training.metric_logging.DiskLogger",
        "log_dir": "/w/out/logs", "filename": "metrics.txt"}


def test_a_missing_client_package_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(ConfigError, match=r"kfp-finetune\[tracking\]"):
        check_tracking(tracking_config(mlflow_tracking_uri="http://127.0.0.1:1"))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"'wandb' package.*kfp-finetune\[tracking\]"):
        check_tracking(tracking_config(wandb_project="p"))


def test_the_step_refuses_tracking_without_its_package_before_touching_the_workspace(
        monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"kfp-finetune\[tracking\]"):
        run_fine_tune(tmp_path / "ws", RUNTIME, TorchTuneConfig(epochs=1), lambda _: None,
                      tracking=tracking_config(mlflow_tracking_uri="http://127.0.0.1:1"))
    assert not (tmp_path / "ws").exists()


def test_metric_logger_overrides_stay_refused():
    # The torchtune route to a tracker (metric_logger._component_=...) would drop the file our
    # Metrics read; tracking goes through the tracking settings instead.
    with pytest.raises(ConfigError, match="metric_logger._component_"):
        check_override("metric_logger._component_=torchtune.training.metric_logging.MLFlowLogger")


def test_the_tracking_secret_reaches_the_tasks_as_optional_env(tmp_path):
    # kfp-kubernetes writes use_secret_as_env into the platform spec's secretAsEnv; optional
    # (honoured by the backend from 2.15) lets a run without the Secret go on untracked.
    from kfp import compiler, dsl

    from kfp_finetune.config.tracking import TRACKING_SECRET_KEYS
    from kfp_finetune.pipelines.finetune.cluster import use_tracking_secret

    @dsl.component(base_image="python:3.11-slim")
    def step():
        pass

    @dsl.pipeline(name="tracking-secret")
    def pipeline(tracking_secret: str = "tracking-credentials"):
        use_tracking_secret([step()], tracking_secret)

    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline, str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (secret,) = executors["exec-step"]["secretAsEnv"]
    assert secret["optional"] is True
    assert {(kv["secretKey"], kv["envVar"]) for kv in secret["keyToEnv"]} == {
        (key, key) for key in TRACKING_SECRET_KEYS}


# --------------------------------------------------------------------------- the plug-in


def _disk_lines(logger_cls, folder: Path, calls, **kwargs) -> str:
    logger = logger_cls(str(folder), "metrics.txt", **kwargs)
    for payload, step in calls:
        logger.log_dict(payload, step=step)
    logger.close()
    return (folder / "metrics.txt").read_text()


def test_the_plugin_writes_the_disk_logger_file_byte_for_byte_and_only_rank_0_forwards(
        mlflow_server, tmp_path, monkeypatch):
    import torch
    from mlflow.tracking import MlflowClient
    from torchtune.training.metric_logging import DiskLogger

    from kfp_finetune.plugins.metric_logger import TrackingLogger

    calls = [({"loss": 2.5, "lr": 1e-3, "tokens_per_second_per_gpu": 10.0,
               "grad_norm": torch.tensor(0.25)}, 1),
             ({"loss": torch.tensor(2.0).item(), "lr": 5e-4, "tokens_per_second_per_gpu": 11.5}, 2)]
    plain = _disk_lines(DiskLogger, tmp_path / "plain", calls)
    client = MlflowClient(mlflow_server)

    monkeypatch.setenv("RANK", "1")
    off = tracking_config(mlflow_server, "rank-one").to_dict()
    assert _disk_lines(TrackingLogger, tmp_path / "rank1", calls, tracking=off) == plain
    assert client.get_experiment_by_name("rank-one") is None  # rank 1 never reached MLflow

    monkeypatch.setenv("RANK", "0")
    on = tracking_config(mlflow_server, "rank-zero").to_dict()
    assert _disk_lines(TrackingLogger, tmp_path / "rank0", calls, tracking=on,
                       params={"runtime": RUNTIME}) == plain
    assert [(s, loss) for s, loss in read_metrics(tmp_path / "rank0")] == [(1, 2.5), (2, 2.0)]
    (run,) = client.search_runs([client.get_experiment_by_name("rank-zero").experiment_id])
    assert run.data.params == {"runtime": RUNTIME}
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.5), (2, 2.0)]
    grad = client.get_metric_history(run.info.run_id, "grad_norm")  # a tensor, as torchtune logs
    assert [(m.step, m.value) for m in grad] == [(1, 0.25)]


# --------------------------------------------------------------------------- real training

CONFIG = TorchTuneConfig(epochs=1, batch_size=8, resources_per_node={"gpu": 0})
WANDB_KEY = (SENTINEL + "0" * 40)[:40]  # W&B keys are 40 characters


def quiet(_: str) -> None:
    pass


def _workspace(tiny, root: Path) -> Path:
    initialize_dataset(root, str(tiny["alpaca"] / "data"), TorchTuneInstructDataset(),
                             log=quiet)
    initialize_model(root, str(tiny["llama3_2"]), RUNTIME, CONFIG, log=quiet)
    return root


@pytest.fixture(scope="module")
def untracked(tiny, tmp_path_factory):
    """The same training without tracking: what our Metrics must still say with it."""
    return run_fine_tune(_workspace(tiny, tmp_path_factory.mktemp("plain") / "ws"), RUNTIME,
                         CONFIG, quiet)


def _same_metrics(result, untracked) -> None:
    assert result.metrics["steps"] == untracked.metrics["steps"] > 0
    # fp32 on CPU with the same seed is deterministic (measured: identical to the last bit).
    assert result.losses == untracked.losses
    assert result.metrics["final_loss"] == result.losses[-1][1] == untracked.metrics["final_loss"]
    assert result.metrics["best_loss"] == untracked.metrics["best_loss"]


def _text_files(root: Path) -> dict[Path, str]:
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            out[path] = path.read_bytes().decode("utf-8", "replace")
    return out


def _wandb_payloads(path: Path):
    """The records of a W&B transaction log (``run-<id>.wandb``), as protobuf bytes.

    The framing is LevelDB's log format as W&B writes it (wandb's former
    ``wandb/sdk/internal/datastore.py``, ``DataStore.scan_data``; wandb-core's leveldb writer):
    a 7-byte file header ``<4sHB`` (``:W&B``, 0xBEE1, version), then 32 KiB blocks of records,
    each a 7-byte header ``<IHB`` (checksum, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) and
    its data; a block's tail shorter than a header is padding.
    """
    import struct

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += room
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield parts
            parts = b""


def _wandb_records(run_dir: Path) -> tuple[dict, list[dict]]:
    """Config and history of an offline W&B run, read from its transaction log."""
    import json

    from wandb.proto import wandb_internal_pb2

    config: dict = {}
    history: list[dict] = []
    for payload in _wandb_payloads(next(run_dir.glob("run-*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                key = item.key or "/".join(item.nested_key)
                config[key] = json.loads(item.value_json)
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return config, history


@pytest.mark.slow
def test_a_tracked_run_shows_in_mlflow_and_wandb_and_our_metrics_are_unchanged(
        tiny, tmp_path, mlflow_server, monkeypatch, untracked):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SENTINEL)  # the Secret's key; server ignores it
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    ws = _workspace(tiny, tmp_path / "ws")
    lines: list[str] = []
    tracking = tracking_config(mlflow_server, "tracked", "kfp-finetune-test", run_name="tiny")
    result = run_fine_tune(ws, RUNTIME, CONFIG, lines.append, tracking=tracking)
    _same_metrics(result, untracked)
    out = Workspace.at(ws).checkpoints_dir
    rows = read_metric_rows(out / "logs")

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    run_id = run.info.run_id
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["runtime"] == RUNTIME
    assert params["recipe"] == "full_finetune_single_device"
    assert params["resolved.batch_size"] == "8" and params["torchtune.batch_size"] == "8"
    assert str(tiny["alpaca"] / "data") in params["dataset_uri"]
    assert str(tiny["llama3_2"]) in params["model_uri"]
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert loss == result.losses  # every step, exactly what our Metrics read
    for key in ("lr", "tokens_per_second_per_gpu"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(int(r["step"]), r[key]) for r in rows]
    assert run.data.metrics["final_loss"] == result.metrics["final_loss"]
    assert run.data.metrics["steps"] == result.metrics["steps"]

    exported = export_model(ws, RUNTIME, "tracked-model", "run-1", log=lines.append,
                            tracking=tracking)
    tags = client.get_run(run_id).data.tags
    assert tags["kfp_finetune.model_path"] == exported.path
    assert len(client.search_runs([run.info.experiment_id])) == 1  # one run for all steps

    offline = sorted((out / "logs" / "wandb").glob("offline-run-*"))
    assert offline, "no offline W&B run was written"
    config, history = _wandb_records(offline[0])
    assert config["runtime"] == RUNTIME and config["torchtune.batch_size"] == "8"
    logged = sorted((int(h["global_step"]), h["loss"]) for h in history if "loss" in h)
    assert logged == result.losses

    assert not any("[tracking] warning" in line for line in lines), lines
    for path, text in {**_text_files(ws), **_text_files(Path(exported.path))}.items():
        assert SENTINEL not in text, f"the secret leaked into {path}"
    assert SENTINEL not in "\n".join(lines)
    assert SENTINEL not in repr((params, tags))


@pytest.mark.slow
def test_a_tracker_that_never_answers_costs_one_bounded_warning_and_training_goes_on(
        tiny, tmp_path, monkeypatch, untracked):
    # A server that accepts connections and never answers: each request waits the network
    # timeout (set low here), with MLflow's retries bounded; then tracking is off for the step.
    monkeypatch.setenv("KFP_FINETUNE_NETWORK_TIMEOUT_S", "2")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        ws = _workspace(tiny, tmp_path / "ws")
        lines: list[str] = []
        start = time.monotonic()
        result = run_fine_tune(ws, RUNTIME, CONFIG, lines.append,
                               tracking=tracking_config(url, "down"))
        seconds = time.monotonic() - start
    _same_metrics(result, untracked)
    warnings = [line for line in lines if "[tracking] warning" in line]
    # One from the training process, one from the step's summary: each warns once, then stops.
    assert len(warnings) == 2, lines
    assert all("MLflow" in w and "timeout" in w and "training goes on" in w for w in warnings)
    assert seconds < untracked.seconds + 120
    assert state_path(Workspace.at(ws).checkpoints_dir).exists() is False


def test_mlflow_requests_are_bounded_by_the_network_timeout_and_a_users_choice_is_kept(
        monkeypatch):
    # mlflow/utils/rest_utils.py http_request reads these variables at every request; its
    # defaults (120 s, 7 retries with backoff) would let a dead tracker stall a step for long.
    from kfp_finetune.storage.trackers import bound_mlflow_requests

    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "KFP_FINETUNE_MLFLOW_BOUNDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KFP_FINETUNE_NETWORK_TIMEOUT_S", "7")
    bound_mlflow_requests()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    monkeypatch.setenv("KFP_FINETUNE_NETWORK_TIMEOUT_S", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # the user's own choice
    bound_mlflow_requests()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"  # ours follows the timeout
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"


# --------------------------------------------------------------------------- the local pipeline


def _local_args(tiny, ws, *extra):
    return ["run", "--local", "--runtime", RUNTIME, "--model-uri", str(tiny["llama3_2"]),
            "--dataset-uri", f"file://{tiny['alpaca']}/data", "--workspace", str(ws), *extra]


def test_the_cli_refuses_a_bad_tracking_uri_before_anything_runs(tiny, tmp_path, capsys):
    from kfp_finetune.drivers.cli import main

    bad = f"http://user:{SENTINEL}@mlflow:5000"
    assert main(_local_args(tiny, tmp_path / "ws", "--track-mlflow-uri", bad)) != 0
    captured = capsys.readouterr()
    assert "track_mlflow_uri=" in captured.err + captured.out
    assert SENTINEL not in captured.err + captured.out
    assert not (tmp_path / "ws" / "output").exists()


@pytest.mark.slow
def test_a_local_pipeline_run_with_mlflow_tracking_shows_in_the_server(
        tiny, tmp_path, mlflow_server, capsys, monkeypatch):
    import re

    from mlflow.tracking import MlflowClient

    from kfp_finetune.drivers.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SENTINEL)
    ws = tmp_path / "ws"
    assert main(_local_args(tiny, ws, "--epochs", "1", "--export-name", "tracked-local",
                            "--track-mlflow-uri", mlflow_server,
                            "--track-mlflow-experiment", "local-pipeline",
                            "--track-run-name", "local")) == 0
    out = capsys.readouterr().out
    printed = [float(m.group(1)) for m in re.finditer(r"^\s+step\s+\d+\s+loss (\S+)$", out, re.M)]
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("local-pipeline").experiment_id])
    assert run.info.run_name == "local" and run.info.status == "FINISHED"
    assert run.data.params["runtime"] == RUNTIME
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert len(history) == len(printed) > 0  # every step the run printed (our Metrics)
    assert [v for _, v in history] == pytest.approx(printed, rel=1e-3)  # printed rounded
    assert run.data.metrics["steps"] == len(printed)
    assert run.data.tags["kfp_finetune.model_path"] == str(ws / "output" / "tracked-local")
    assert "[tracking] warning" not in out and SENTINEL not in out
