"""Tokens stay secret: not in logs, exceptions, compiled YAML, metadata or workspace files."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.hub_files import model_files, parquet_bytes
from support.hub_server import HubServer

from kfp_finetune.errors import ConfigError, SourceError
from kfp_finetune.storage import credentials

TOKEN = "hf_SecretTokenForLeakTests000000000000001"
WRONG = "hf_WrongTokenThatMustNotLeakEither0000002"


@pytest.fixture(scope="module")
def hub(tiny: dict[str, Path]) -> Iterator[HubServer]:
    with HubServer(tokens=(TOKEN,)) as server:
        server.add_commit("dataset", "org/private-data",
                          {"data/train.parquet": parquet_bytes(16)}, gated=True)
        server.add_commit("model", "org/private-llama", model_files(tiny["llama3_2"]),
                          gated=True)
        yield server


@pytest.fixture(autouse=True)
def env(hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("KFP_FINETUNE_RETRY_DELAY_S", "0.01")
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def _metrics(path: Path) -> Any:
    from kfp import dsl

    return dsl.Metrics(name="metrics", uri=str(path), metadata={})


def _all_text(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_token_never_appears_in_logs_outputs_metadata_or_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from kfp_finetune.components.dataset_initializer import dataset_initializer
    from kfp_finetune.components.model_initializer import model_initializer

    caplog.set_level(logging.DEBUG)
    ws = tmp_path / "ws"
    dm, mm = _metrics(tmp_path / "dm"), _metrics(tmp_path / "mm")
    from kfp_finetune.config.run_config import RunConfig

    config = RunConfig(runtime="torchtune-llama3.2-tiny", dataset_uri="hf://org/private-data/data",
                       model_uri="hf://org/private-llama").to_dict()
    data_out = dataset_initializer.python_func(config=config, metrics=dm, workspace_path=str(ws))
    model_out = model_initializer.python_func(config=config, metrics=mm, workspace_path=str(ws))
    # a re-run (skip path) logs too
    dataset_initializer.python_func(
        config=config, metrics=_metrics(tmp_path / "dm2"), workspace_path=str(ws))
    assert data_out[0] == 16 and data_out[3] == 1 and len(data_out[6]) == 40  # rows, files, sha
    assert model_out[2] == 1 and model_out[7] is False
    assert dm.metadata["files"] == 1 and dm.metadata["rows"] == 16
    captured = capsys.readouterr()
    text = captured.out + captured.err + caplog.text + repr(data_out) + repr(model_out)
    text += json.dumps([dm.metadata, mm.metadata])
    assert TOKEN not in text
    assert TOKEN.encode() not in _all_text(ws)


def test_wrong_token_is_not_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    from kfp_finetune.config.types import TorchTuneInstructDataset
    from kfp_finetune.steps.dataset_initializer import initialize_dataset

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", WRONG)
    logs: list[str] = []
    with pytest.raises(SourceError) as err:
        initialize_dataset(tmp_path, "hf://org/private-data/data", TorchTuneInstructDataset(),
                           logs.append)
    assert "the HF_TOKEN given has no access" in str(err.value)
    assert "403" in str(err.value)
    for text in (str(err.value), repr(err.value), "\n".join(logs), caplog.text):
        assert WRONG not in text
    assert WRONG.encode() not in _all_text(tmp_path)


def test_compiled_yaml_holds_no_token(tmp_path: Path) -> None:
    from kfp_finetune.drivers.compile import compile_runtime

    path = compile_runtime("torchtune-llama3.2-tiny", tmp_path)
    text = path.read_text()
    assert TOKEN not in text
    assert "secret_hf_token" in text  # the Secret's name is the only parameter


def test_access_token_guidance_says_how_to_store_it() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = credentials.warn_access_token(TOKEN, "HuggingFaceModelInitializer",
                                                "my-hf", "team-a")
    assert message is not None and TOKEN not in message
    assert 'kubectl create secret generic my-hf -n team-a --from-literal=HF_TOKEN="$HF_TOKEN"' \
        in message
    assert "secret_hf_token='my-hf'" in message
    assert [str(w.message) for w in caught] == [message]
    assert credentials.warn_access_token(None) is None


def test_create_token_secret_with_a_fake_api() -> None:
    from kubernetes import client

    class FakeApi:
        def __init__(self, conflict: bool) -> None:
            self.conflict, self.created, self.replaced = conflict, [], []

        def create_namespaced_secret(self, namespace: str, body: Any) -> None:
            if self.conflict:
                raise client.ApiException(status=409, reason=f"exists {TOKEN}")
            self.created.append((namespace, body))

        def replace_namespaced_secret(self, name: str, namespace: str, body: Any) -> None:
            self.replaced.append((name, namespace, body))

    api = FakeApi(conflict=False)
    assert credentials.create_token_secret(TOKEN, "hf-token", "ns", core_api=api) == "hf-token"
    namespace, body = api.created[0]
    assert namespace == "ns" and body.string_data == {"HF_TOKEN": TOKEN}
    conflict = FakeApi(conflict=True)
    with pytest.raises(ConfigError) as err:
        credentials.create_token_secret(TOKEN, "hf-token", "ns", core_api=conflict)
    assert TOKEN not in str(err.value) and "replace=True" in str(err.value)
    credentials.create_token_secret(TOKEN, "hf-token", "ns", replace=True, core_api=conflict)
    assert conflict.replaced[0][0] == "hf-token"
    with pytest.raises(ConfigError, match="'Bad_Name'"):
        credentials.create_token_secret(TOKEN, "Bad_Name", "ns", core_api=api)


def test_redact_hides_env_secrets_and_token_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abcd/efgh+ijkl")
    text = credentials.redact(
        f"token {TOKEN} key abcd/efgh+ijkl Authorization: Bearer xyz123 "
        "X-Amz-Signature=deadbeef AKIAABCDEFGHIJKLMNOP")
    for secret in (TOKEN, "abcd/efgh+ijkl", "xyz123", "deadbeef", "AKIAABCDEFGHIJKLMNOP"):
        assert secret not in text


def test_token_env_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with credentials.token_env(TOKEN):
        assert credentials.hf_token() == TOKEN
    assert credentials.hf_token() is None
