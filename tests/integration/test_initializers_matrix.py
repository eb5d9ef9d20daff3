"""Bad inputs to the initializers: each fails with the exact error class and names the value."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.config.validation import normalize_dataset
from kfp_finetune.errors import ConfigError, DatasetError, ModelError, SourceError
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.model_initializer import initialize_model


def _quiet(_: str) -> None:
    return None


def ds(ws: Path, uri: str, ignore: list[str] | None = None, **kw: object) -> Callable[[], object]:
    return lambda: initialize_dataset(ws, uri, TorchTuneInstructDataset(**kw), _quiet,
                                      ignore_patterns=ignore)


def model(ws: Path, uri: str, runtime: str = "torchtune-llama3.2-tiny",
          gpus: int | None = None) -> Callable[[], object]:
    cfg = TorchTuneConfig(resources_per_node={"gpu": gpus}) if gpus is not None else \
        TorchTuneConfig()
    return lambda: initialize_model(ws, uri, runtime, cfg, _quiet)


@pytest.fixture(scope="module")
def bad(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    out: dict[str, Path] = {}
    out["empty_dir"] = root / "empty"
    out["empty_dir"].mkdir()
    out["zero_rows"] = root / "zero-rows"
    out["zero_rows"].mkdir()
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()),
                             "input": pa.array([], pa.string()),
                             "output": pa.array([], pa.string())}),
                   out["zero_rows"] / "train.parquet")
    out["corrupt"] = root / "corrupt"
    out["corrupt"].mkdir()
    (out["corrupt"] / "broken-file.parquet").write_bytes(b"PAR1 this is not parquet")
    out["two_col"] = root / "two-col"
    out["two_col"].mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["c", "d"]}),
                   out["two_col"] / "train.parquet")
    out["no_tok"] = root / "no-tokenizer"
    shutil.copytree(tiny["llama3_2"], out["no_tok"])
    (out["no_tok"] / "original" / "tokenizer.model").unlink()
    out["llama_3b"] = root / "llama-3b"
    shutil.copytree(tiny["llama3_2"], out["llama_3b"])
    cfg = json.loads((out["llama_3b"] / "config.json").read_text())
    cfg.update(hidden_size=3072, num_hidden_layers=28)
    (out["llama_3b"] / "config.json").write_text(json.dumps(cfg))
    out["no_weights"] = root / "no-weights"
    shutil.copytree(tiny["llama3_2"], out["no_weights"])
    (out["no_weights"] / "model.safetensors").unlink()
    return out


CASES: list[tuple[str, type[Exception], str]] = [
    # id, expected class, text the message must contain (the bad value)
    ("malformed-hf-uri", SourceError, "hf://tatsu-lab"),
    ("unsupported-scheme", SourceError, "'gs'"),
    ("traversal-hf", SourceError, "'..'"),
    ("traversal-local", SourceError, "'..'"),
    ("traversal-s3", SourceError, "'..'"),
    ("bad-bucket", SourceError, "'Bad_Bucket'"),
    ("bad-revision", SourceError, "'-bad'"),
    ("relative-path", SourceError, "'data/alpaca'"),
    ("credentials-in-uri", SourceError, "***:***@"),
    ("model-uri-with-path", SourceError, "'extra/dir'"),
    ("missing-local-path", SourceError, "/nonexistent/kfp-finetune-data"),
    ("empty-dataset-folder", SourceError, "holds no files"),
    ("zero-row-dataset", DatasetError, "0 rows, so split='train'"),
    ("wrong-format", DatasetError, "source='csv'"),
    ("corrupt-file", DatasetError, "broken-file.parquet"),
    ("missing-mapped-column", DatasetError, "input->question"),
    ("missing-output-column", DatasetError, "'output'"),
    ("unknown-split", DatasetError, "split='validation'"),
    ("empty-split-slice", DatasetError, "split='train[:0]'"),
    ("bad-split-syntax", ConfigError, "split='train[::]'"),
    ("ignore-everything", SourceError, "'*'"),
    ("wrong-family-model", ModelError, "'qwen2'"),
    ("wrong-size-model", ModelError, "torchtune-llama3.2-3b"),
    ("missing-tokenizer", ModelError, "original/tokenizer.model"),
    ("missing-weights", ModelError, "safetensors"),
]


def _call(case: str, ws: Path, tiny: dict[str, Path], bad: dict[str, Path]) -> object:
    alpaca = tiny["alpaca"] / "data"
    calls: dict[str, Callable[[], object]] = {
        "malformed-hf-uri": ds(ws, "hf://tatsu-lab"),
        "unsupported-scheme": ds(ws, "gs://bucket/data"),
        "traversal-hf": ds(ws, "hf://org/repo/data/../../secrets"),
        "traversal-local": ds(ws, f"{alpaca}/../../etc"),
        "traversal-s3": ds(ws, "s3://bucket/data/../other"),
        "bad-bucket": ds(ws, "s3://Bad_Bucket/data"),
        "bad-revision": ds(ws, "hf://org/repo@-bad/data"),
        "relative-path": ds(ws, "data/alpaca"),
        "credentials-in-uri": ds(ws, "https://user:hunter2@example.com/data"),
        "model-uri-with-path": model(ws, "hf://org/model/extra/dir"),
        "missing-local-path": ds(ws, "/nonexistent/kfp-finetune-data"),
        "empty-dataset-folder": ds(ws, str(bad["empty_dir"])),
        "zero-row-dataset": ds(ws, str(bad["zero_rows"])),
        "wrong-format": ds(ws, str(alpaca), source="csv"),
        "corrupt-file": ds(ws, str(bad["corrupt"])),
        "missing-mapped-column": ds(ws, str(alpaca), column_map={"input": "question"}),
        "missing-output-column": ds(ws, str(bad["two_col"])),
        "unknown-split": ds(ws, str(alpaca), split="validation"),
        "empty-split-slice": ds(ws, str(alpaca), split="train[:0]"),
        # The SDK's class checks nothing when built: checked where it is used.
        "bad-split-syntax": lambda: normalize_dataset(TorchTuneInstructDataset(split="train[::]")),
        "ignore-everything": ds(ws, str(alpaca), ignore=["*"]),
        "wrong-family-model": model(ws, str(tiny["qwen2_5"])),
        "wrong-size-model": model(ws, str(bad["llama_3b"]), "torchtune-llama3.2-1b", gpus=1),
        "missing-tokenizer": model(ws, str(bad["no_tok"])),
        "missing-weights": model(ws, str(bad["no_weights"])),
    }
    return calls[case]()


def test_matrix_has_at_least_15_cases() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize(("case", "error", "names"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: str, error: type[Exception], names: str, tmp_path: Path,
                   tiny: dict[str, Path], bad: dict[str, Path]) -> None:
    with pytest.raises(Exception) as err:
        _call(case, tmp_path / "ws", tiny, bad)
    assert type(err.value) is error, f"{type(err.value).__name__}: {err.value}"
    assert names in str(err.value), str(err.value)
    assert "hunter2" not in str(err.value)
    if isinstance(err.value, (SourceError, ModelError)):
        # a failed fetch never leaves a folder that looks finished
        assert not (tmp_path / "ws" / "dataset" / ".kfp-finetune.json").exists()
        assert not (tmp_path / "ws" / "model" / ".kfp-finetune.json").exists()
