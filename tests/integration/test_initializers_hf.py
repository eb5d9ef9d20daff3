"""The initializers against a Hub-compatible server on 127.0.0.1, with the real huggingface_hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.hub_files import big_parquet_bytes, model_files, parquet_bytes
from support.hub_server import HubServer

from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.errors import ModelError, SourceError
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.storage.base import RetryPolicy
from kfp_finetune.storage.workspace import read_manifest

TOKEN = "hf_kfpFinetuneTestTokenDoNotLeak0123456789"
FAST = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.1)
PARQUET = "train-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def hub(tiny: dict[str, Path]) -> Iterator[HubServer]:
    server = HubServer(tokens=(TOKEN,))
    with server:
        big = big_parquet_bytes(3000)
        server.add_commit("dataset", "org/alpaca", {
            "data/train-00000-of-00002.parquet": parquet_bytes(40, 1),
            "data/train-00001-of-00002.parquet": parquet_bytes(24, 2),
            "other/extra.parquet": parquet_bytes(8, 3),
            "README.md": b"# alpaca\n",
            ".gitattributes": b"*.parquet filter=lfs\n",
        })
        server.add_commit("dataset", "org/big", {f"data/{PARQUET}": big, "data/small.parquet":
                                                 parquet_bytes(16, 4)})
        server.add_commit("dataset", "org/evolving", {f"data/{PARQUET}": parquet_bytes(64)},
                          tags=("v1",))
        server.add_commit("dataset", "org/evolving", {f"data/{PARQUET}": parquet_bytes(32)})
        server.add_commit("dataset", "org/gated-data", {f"data/{PARQUET}": parquet_bytes(16)},
                          gated=True)
        llama = model_files(tiny["llama3_2"])
        server.add_commit("model", "org/tiny-llama", {
            **llama,
            "pytorch_model.bin": b"not needed",
            "original/consolidated.00.pth": b"not needed",
            "flax_model.msgpack": b"not needed",
            "README.md": b"# model\n",
        })
        server.add_commit("model", "org/gated-llama", llama, gated=True)
        binonly = {k: v for k, v in llama.items() if not k.endswith(".safetensors")}
        binonly["pytorch_model.bin"] = b"weights as a pickle"
        binonly["training_args.bin"] = b"not weights"
        binonly["tf_model.h5"] = b"not needed"
        server.add_commit("model", "org/bin-llama", binonly)
        big_cfg = json.loads(llama["config.json"])
        big_cfg.update(hidden_size=3072, num_hidden_layers=28)
        server.add_commit("model", "org/llama-3b", {
            **llama, "config.json": json.dumps(big_cfg).encode()})
        yield server


@pytest.fixture(autouse=True)
def hub_env(hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    hub.reset_requests()
    hub.fail_get.clear()
    hub.cut_get.clear()
    return hub


def dataset(ws: Path, uri: str, **kw: object):
    logs: list[str] = []
    result = initialize_dataset(ws, uri, TorchTuneInstructDataset(**kw), logs.append, retry=FAST)
    return result, logs


def data_paths(ws: Path) -> list[str]:
    return sorted(f["path"] for f in read_manifest(ws / "dataset")["files"])


def test_directory_uri_takes_every_data_file_under_it(tmp_path: Path, hub: HubServer) -> None:
    result, _ = dataset(tmp_path, "hf://org/alpaca/data")
    assert data_paths(tmp_path) == ["data/train-00000-of-00002.parquet",
                                    "data/train-00001-of-00002.parquet"]
    assert result.plan.rows == 64 and result.fetch.files == 2 and not result.fetch.skipped
    manifest = read_manifest(tmp_path / "dataset")
    assert manifest["source"] == "hf://org/alpaca/data"
    assert manifest["revision"] == hub.repos[("dataset", "org/alpaca")].refs["main"]
    assert all(f["bytes"] > 0 for f in manifest["files"])
    # README.md and .gitattributes were never requested
    assert not hub.content_requests("README.md") and not hub.content_requests(".gitattributes")


def test_single_file_uri_takes_only_that_file(tmp_path: Path) -> None:
    result, _ = dataset(tmp_path, "hf://org/alpaca/data/train-00001-of-00002.parquet")
    assert data_paths(tmp_path) == ["data/train-00001-of-00002.parquet"]
    assert result.plan.rows == 24


def test_revision_tag_commit_and_branch(tmp_path: Path, hub: HubServer) -> None:
    repo = hub.repos[("dataset", "org/evolving")]
    v1 = repo.refs["v1"]
    assert dataset(tmp_path / "a", "hf://org/evolving@v1/data")[0].plan.rows == 64
    assert dataset(tmp_path / "b", f"hf://org/evolving@{v1}/data")[0].plan.rows == 64
    assert dataset(tmp_path / "c", "hf://org/evolving/data")[0].plan.rows == 32
    assert read_manifest(tmp_path / "a" / "dataset")["revision"] == v1
    assert read_manifest(tmp_path / "a" / "dataset")["requested_revision"] == "v1"


def test_moved_branch_is_fetched_again(tmp_path: Path, hub: HubServer) -> None:
    hub.add_commit("dataset", "org/moving", {f"data/{PARQUET}": parquet_bytes(10)})
    assert dataset(tmp_path, "hf://org/moving/data")[0].plan.rows == 10
    hub.add_commit("dataset", "org/moving", {f"data/{PARQUET}": parquet_bytes(20)})
    result, logs = dataset(tmp_path, "hf://org/moving/data")
    assert result.plan.rows == 20 and not result.fetch.skipped
    assert any("changed since it was fetched" in line for line in logs)


def test_rerun_is_fast_and_sends_no_content_request(tmp_path: Path, hub: HubServer) -> None:
    dataset(tmp_path, "hf://org/alpaca/data")
    initialize_model(tmp_path, "hf://org/tiny-llama", "torchtune-llama3.2-tiny",
                     TorchTuneConfig(), lambda _: None, retry=FAST)
    hub.reset_requests()
    start = time.monotonic()
    result, logs = dataset(tmp_path, "hf://org/alpaca/data")
    model = initialize_model(tmp_path, "hf://org/tiny-llama", "torchtune-llama3.2-tiny",
                             TorchTuneConfig(), lambda _: None, retry=FAST)
    elapsed = time.monotonic() - start
    assert result.fetch.skipped and model.fetch.skipped
    assert hub.content_requests() == []
    assert elapsed < 2.0, elapsed
    assert any("already complete" in line for line in logs)


def test_changed_source_replaces_old_content(tmp_path: Path) -> None:
    dataset(tmp_path, "hf://org/alpaca/data")
    result, _ = dataset(tmp_path, "hf://org/evolving@v1/data")
    assert data_paths(tmp_path) == [f"data/{PARQUET}"]
    assert result.plan.rows == 64
    assert read_manifest(tmp_path / "dataset")["source"] == "hf://org/evolving@v1/data"
    assert not list((tmp_path / ".staging").glob("dataset-*"))


def test_gated_repo_without_token_names_the_secret(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        dataset(tmp_path, "hf://org/gated-data/data")
    message = str(err.value)
    assert "hf://org/gated-data/data" in message and "gated" in message
    assert "401" in message and "no HF_TOKEN was set" in message
    assert "kubectl create secret generic hf-token" in message and "secret_hf_token" in message
    assert read_manifest(tmp_path / "dataset") is None


def test_gated_repo_with_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert dataset(tmp_path, "hf://org/gated-data/data")[0].plan.rows == 16


def test_missing_repo_is_a_404_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"'org/nope' was not found \(HTTP 40[14]\)"):
        dataset(tmp_path, "hf://org/nope/data")


def test_missing_path_is_a_404_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"path 'nodata' does not exist .*404"):
        dataset(tmp_path, "hf://org/alpaca/nodata")


def test_missing_revision_names_it(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"revision 'v9' does not exist"):
        dataset(tmp_path, "hf://org/evolving@v9/data")


def test_dataset_uri_with_wrong_format_fails_before_download(tmp_path: Path,
                                                             hub: HubServer) -> None:
    from kfp_finetune.errors import DatasetError

    with pytest.raises(DatasetError, match=r"source='json'.*\.parquet"):
        dataset(tmp_path, "hf://org/alpaca/data", source="json")
    assert hub.content_requests() == []


def test_download_cut_mid_file_resumes_with_range(tmp_path: Path, hub: HubServer) -> None:
    size = hub.repos[("dataset", "org/big")].commits[
        hub.repos[("dataset", "org/big")].refs["main"]][f"data/{PARQUET}"].size
    assert size > 11 * 2**20  # more than one 10 MiB chunk of the client
    cut = 11 * 2**20
    hub.cut(f"data/{PARQUET}", after=cut)
    result, _ = dataset(tmp_path, f"hf://org/big/data/{PARQUET}")
    gets = [r for r in hub.content_requests(f"data/{PARQUET}") if r.method == "GET"]
    assert len(gets) == 2 and gets[0].range is None
    assert gets[1].range is not None and gets[1].status == 206
    offset = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= cut  # resumed where the finished chunks ended, not from zero
    assert (tmp_path / "dataset" / "data" / PARQUET).stat().st_size == size
    assert result.plan.rows == 3000


def test_server_errors_are_retried_with_backoff(tmp_path: Path, hub: HubServer) -> None:
    hub.fail(f"data/{PARQUET}", status=503, times=2)
    result, logs = dataset(tmp_path, f"hf://org/big/data/{PARQUET}")
    assert result.plan.rows == 3000
    assert sum("retrying in" in line for line in logs) == 2


def test_failed_download_never_looks_complete_and_rerun_resumes(
    tmp_path: Path, hub: HubServer
) -> None:
    hub.fail(f"data/{PARQUET}", status=500, times=3)  # every attempt of the first run
    with pytest.raises(SourceError, match=r"failed after 3 attempt\(s\).*resumes"):
        dataset(tmp_path, "hf://org/big/data")
    assert not (tmp_path / "dataset").exists()
    staged = list((tmp_path / ".staging").glob("dataset-*/data/small.parquet"))
    assert len(staged) == 1  # the finished file is kept for the re-run
    hub.reset_requests()
    result, _ = dataset(tmp_path, "hf://org/big/data")
    assert result.plan.rows == 3016
    assert hub.content_requests("data/small.parquet") == []
    assert [r.method for r in hub.content_requests(f"data/{PARQUET}")] == ["HEAD", "GET"]


def test_killed_process_mid_file_then_rerun(tmp_path: Path, hub: HubServer) -> None:
    release = hub.stall(f"data/{PARQUET}", after=4096)
    hub.stalled.clear()
    script = textwrap.dedent(f"""
        from kfp_finetune.steps.dataset_initializer import initialize_dataset
        from kfp_finetune.config.types import TorchTuneInstructDataset
        initialize_dataset({str(tmp_path)!r}, "hf://org/big/data", TorchTuneInstructDataset())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.stalled.wait(timeout=60), "the download never reached the stall"
        proc.kill()
        proc.wait(timeout=10)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    assert read_manifest(tmp_path / "dataset") is None
    result, _ = dataset(tmp_path, "hf://org/big/data")
    assert result.plan.rows == 3016 and not result.fetch.skipped
    assert not list((tmp_path / ".staging").glob("*/**/*.incomplete"))


def test_model_takes_only_what_torchtune_needs(tmp_path: Path, hub: HubServer) -> None:
    summary = initialize_model(tmp_path, "hf://org/tiny-llama", "torchtune-llama3.2-tiny",
                               TorchTuneConfig(), lambda _: None, retry=FAST)
    names = {f["path"] for f in read_manifest(tmp_path / "model")["files"]}
    assert "model.safetensors" in names and "original/tokenizer.model" in names
    assert not names & {"pytorch_model.bin", "original/consolidated.00.pth",
                        "flax_model.msgpack"}
    assert "README.md" in names  # the export's model card carries its license over
    assert summary.info.checkpoint_files == ["model.safetensors"]
    assert not hub.content_requests("pytorch_model.bin")


def test_model_without_safetensors_takes_bin_weights(tmp_path: Path) -> None:
    summary = initialize_model(tmp_path, "hf://org/bin-llama", "torchtune-llama3.2-tiny",
                               TorchTuneConfig(), lambda _: None, retry=FAST)
    names = {f["path"] for f in read_manifest(tmp_path / "model")["files"]}
    assert "pytorch_model.bin" in names and "tf_model.h5" not in names
    assert "training_args.bin" not in names
    assert summary.info.checkpoint_files == ["pytorch_model.bin"]


def test_model_ignore_patterns(tmp_path: Path) -> None:
    initialize_model(tmp_path, "hf://org/tiny-llama", "torchtune-llama3.2-tiny",
                     TorchTuneConfig(), lambda _: None, ignore_patterns=["generation_*"],
                     retry=FAST)
    names = {f["path"] for f in read_manifest(tmp_path / "model")["files"]}
    assert "generation_config.json" not in names and "config.json" in names


def test_wrong_size_model_fails_after_config_only(tmp_path: Path, hub: HubServer) -> None:
    with pytest.raises(ModelError, match="torchtune-llama3.2-3b"):
        initialize_model(tmp_path, "hf://org/llama-3b", "torchtune-llama3.2-1b",
                         TorchTuneConfig(resources_per_node={"gpu": 1}), lambda _: None,
                         retry=FAST)
    assert not hub.content_requests("model.safetensors")
    assert [r.method for r in hub.content_requests("config.json")] == ["HEAD", "GET"]
