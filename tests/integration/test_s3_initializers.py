"""The initializers against a local S3-compatible server (moto in server mode on 127.0.0.1)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.errors import SourceError
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.storage.base import RetryPolicy
from kfp_finetune.storage.workspace import read_manifest

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

FAST = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1)
KEY_ID, SECRET = "AKIAKFPFINETUNETEST01", "s3SecretKeyThatMustNeverLeak/0123456789"


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def s3_env(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture(scope="module")
def bucket(s3_url: str, tiny: dict[str, Path]) -> str:
    client = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                          aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
    client.create_bucket(Bucket="kfp-data")
    data = tiny["alpaca"] / "data" / "train-00000-of-00001.parquet"
    client.upload_file(str(data), "kfp-data", "datasets/alpaca/train.parquet")
    client.put_object(Bucket="kfp-data", Key="datasets/alpaca/notes.md", Body=b"notes")
    client.put_object(Bucket="kfp-data", Key="datasets/alpaca/", Body=b"")  # folder marker
    for path in tiny["llama3_2"].rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            rel = path.relative_to(tiny["llama3_2"]).as_posix()
            client.upload_file(str(path), "kfp-data", f"models/tiny-llama/{rel}")
    client.put_object(Bucket="kfp-data", Key="models/tiny-llama/consolidated.00.pth", Body=b"x")
    return "kfp-data"


def test_s3_dataset_prefix_and_rerun(tmp_path: Path, bucket: str) -> None:
    logs: list[str] = []
    result = initialize_dataset(tmp_path, "s3://kfp-data/datasets/alpaca",
                                TorchTuneInstructDataset(), logs.append, retry=FAST)
    assert result.plan.rows == 64 and result.fetch.files == 1
    manifest = read_manifest(tmp_path / "dataset")
    assert manifest["source"] == "s3://kfp-data/datasets/alpaca"
    assert [f["path"] for f in manifest["files"]] == ["train.parquet"]
    start = time.monotonic()
    again = initialize_dataset(tmp_path, "s3://kfp-data/datasets/alpaca",
                               TorchTuneInstructDataset(), logs.append, retry=FAST)
    assert again.fetch.skipped and time.monotonic() - start < 2.0


def test_s3_single_object(tmp_path: Path, bucket: str) -> None:
    result = initialize_dataset(tmp_path, "s3://kfp-data/datasets/alpaca/train.parquet",
                                TorchTuneInstructDataset(), lambda _: None, retry=FAST)
    assert result.plan.rows == 64


def test_s3_changed_object_is_fetched_again(tmp_path: Path, bucket: str, s3_url: str,
                                            tiny: dict[str, Path]) -> None:
    client = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
    data = tiny["alpaca"] / "data" / "train-00000-of-00001.parquet"
    client.upload_file(str(data), "kfp-data", "datasets/moving/a.parquet")
    first = initialize_dataset(tmp_path, "s3://kfp-data/datasets/moving",
                               TorchTuneInstructDataset(), lambda _: None, retry=FAST)
    client.upload_file(str(data), "kfp-data", "datasets/moving/b.parquet")
    second = initialize_dataset(tmp_path, "s3://kfp-data/datasets/moving",
                                TorchTuneInstructDataset(), lambda _: None, retry=FAST)
    assert (first.plan.rows, second.plan.rows) == (64, 128) and not second.fetch.skipped


def test_s3_model_skips_unneeded_weights(tmp_path: Path, bucket: str) -> None:
    summary = initialize_model(tmp_path, "s3://kfp-data/models/tiny-llama",
                               "torchtune-llama3.2-tiny", TorchTuneConfig(), lambda _: None,
                               retry=FAST)
    names = {f["path"] for f in read_manifest(tmp_path / "model")["files"]}
    assert "original/tokenizer.model" in names and "consolidated.00.pth" not in names
    assert summary.info.checkpoint_files == ["model.safetensors"]


def test_s3_missing_bucket_and_prefix(tmp_path: Path, bucket: str) -> None:
    with pytest.raises(SourceError, match=r"bucket 'no-such-bucket' does not exist"):
        initialize_dataset(tmp_path, "s3://no-such-bucket/x", TorchTuneInstructDataset(),
                           lambda _: None, retry=FAST)
    with pytest.raises(SourceError, match=r"no objects under 'datasets/nothing/'"):
        initialize_dataset(tmp_path, "s3://kfp-data/datasets/nothing",
                           TorchTuneInstructDataset(), lambda _: None, retry=FAST)


def test_s3_without_credentials_names_the_secret(tmp_path: Path, bucket: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(SourceError) as err:
        initialize_dataset(tmp_path, "s3://kfp-data/datasets/alpaca",
                           TorchTuneInstructDataset(), lambda _: None, retry=FAST)
    assert "no S3 credentials" in str(err.value) and "s3-credentials" in str(err.value)


def test_s3_unreachable_endpoint_is_retried_then_fails(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    logs: list[str] = []
    with pytest.raises(SourceError, match=r"failed after 2 attempt\(s\)") as err:
        initialize_dataset(tmp_path, "s3://kfp-data/datasets/alpaca",
                           TorchTuneInstructDataset(), logs.append, retry=FAST)
    assert any("retrying in" in line for line in logs)
    assert SECRET not in str(err.value) and KEY_ID not in str(err.value)
