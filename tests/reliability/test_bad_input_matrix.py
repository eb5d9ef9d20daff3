"""Bad-input matrix across the API, the CLI, the components and the steps.

Each case states where it is caught (the layer), the error class, and text the message must
contain: the bad value and the fix. No case may surface as a raw traceback from torchtune or
datasets: the error is one of ours, raised ``from None`` (no chained third-party exception),
and on the CLI it is one ``error:`` line with exit code 2 and nothing written.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kfp_finetune.config.types import (
    HuggingFaceDatasetInitializer,
    HuggingFaceModelInitializer,
    Initializer,
    LoraConfig,
    TorchTuneConfig,
    TorchTuneInstructDataset,
)
from kfp_finetune.config.validation import normalize_dataset, normalize_initializer, normalize_lora
from kfp_finetune.drivers.api import BuiltinTrainer, train
from kfp_finetune.drivers.cli import build_parser, main
from kfp_finetune.drivers.fixtures import alpaca_rows
from kfp_finetune.errors import (
    ConfigError,
    DatasetError,
    ModelError,
    SourceError,
    WorkspaceError,
)
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.model_initializer import initialize_model

RUNTIME = "torchtune-llama3.2-tiny"


@dataclass(frozen=True)
class Case:
    """One bad input: where it is caught, the error class, what the message must say."""

    id: str
    layer: str  # api | cli | component | dataset-step | model-step | fine-tune-preflight
    error: type[BaseException]
    says: tuple[str, ...]  # the value, and words of the fix
    call: Callable[[Path, dict[str, Path], dict[str, Path]], object] | None = None
    argv: tuple[str, ...] = ()
    hides: tuple[str, ...] = ()  # secrets the message must not contain
    full_argv: bool = False  # argv is a whole command line ({file}: an existing file)


def T(**kw: object) -> Callable[..., object]:  # noqa: N802 - reads like the class
    return lambda *_: TorchTuneConfig(**kw)


# The SDK's TorchTuneInstructDataset, LoraConfig and initializers check nothing when built
# (kubeflow/trainer/types/types.py): they are checked where they are used, with the messages
# our own copies gave when built.
def D(**kw: object) -> Callable[..., object]:  # noqa: N802
    return lambda *_: normalize_dataset(TorchTuneInstructDataset(**kw))


def L(**kw: object) -> Callable[..., object]:  # noqa: N802
    return lambda *_: normalize_lora(LoraConfig(**kw))


def I(role: str, *args: object, **kw: object) -> Callable[..., object]:  # noqa: N802, E743
    """A dataset or model initializer as ``train()`` gets it (a good one for the other role)."""
    def call(ws: Path, tiny: dict[str, Path], bad: dict[str, Path]) -> object:
        parts: dict[str, object] = {
            "dataset": HuggingFaceDatasetInitializer(str(tiny["alpaca"] / "data")),
            "model": HuggingFaceModelInitializer(str(tiny["llama3_2"])),
        }
        cls = HuggingFaceDatasetInitializer if role == "dataset" else HuggingFaceModelInitializer
        parts[role] = cls(*args, **kw)
        return train(RUNTIME, Initializer(**parts), workspace=ws)  # type: ignore[arg-type]
    return call


def _train(config: TorchTuneConfig | None = None, runtime: str = RUNTIME,
           dataset: bool = True) -> Callable[..., object]:
    def call(ws: Path, tiny: dict[str, Path], bad: dict[str, Path]) -> object:
        init = Initializer(
            dataset=HuggingFaceDatasetInitializer(str(tiny["alpaca"] / "data"))
            if dataset else None,
            model=HuggingFaceModelInitializer(str(tiny["llama3_2"])),
        )
        return train(runtime, init, BuiltinTrainer(config or TorchTuneConfig()), workspace=ws)
    return call


def _component(name: str, **kw: object) -> Callable[..., object]:
    """Bad run-form values: the first task, check-config, refuses them (``name`` says which
    task used to take them as loose arguments; today they reach only check-config)."""
    def call(ws: Path, tiny: dict[str, Path], bad: dict[str, Path]) -> object:
        from kfp_finetune.components.check_config import build_check_config
        from kfp_finetune.config.parameters import ALIASES, PARAMETERS

        values = {"data_uri": str(tiny["alpaca"] / "data"), "model_uri": str(tiny["llama3_2"]),
                  **{ALIASES.get(k, k): v for k, v in kw.items()}}
        func = build_check_config(PARAMETERS).python_func
        return func(runtime=RUNTIME, workspace_path=str(ws), **values)
    return call


CliArgs = Callable[[dict[str, Path], dict[str, Path]], list[str]]


def _in_task(call: Callable[..., object], argv: CliArgs) -> Callable[..., object]:
    call.cli = argv  # type: ignore[attr-defined]  # the same bad input through `run --local`
    return call


def _dataset(folder: str, **kw: object) -> Callable[..., object]:
    flags = [a for k, v in kw.items() for a in (
        f"--{k.replace('_', '-')}",
        ",".join(f"{ck}={cv}" for ck, cv in v.items()) if isinstance(v, dict) else str(v))]
    return _in_task(lambda ws, tiny, bad: initialize_dataset(
        ws, str(bad[folder]), TorchTuneInstructDataset(**kw), lambda _: None),
        lambda tiny, bad: ["--dataset-uri", str(bad[folder]), *flags])


def _model(folder: str, runtime: str = RUNTIME) -> Callable[..., object]:
    return _in_task(lambda ws, tiny, bad: initialize_model(
        ws, str(bad[folder] if folder in bad else tiny[folder]), runtime, TorchTuneConfig(),
        lambda _: None),
        lambda tiny, bad: ["--runtime", runtime,
                           "--model-uri", str(bad[folder] if folder in bad else tiny[folder])])


def _preflight(folder: str, max_seq_len: int) -> Callable[..., object]:
    def call(ws: Path, tiny: dict[str, Path], bad: dict[str, Path]) -> object:
        from kfp_finetune.config.runtimes import get_runtime
        from kfp_finetune.steps.fine_tune import check_samples_fit, prepare_training
        from kfp_finetune.steps.tune_config import resolve
        from kfp_finetune.storage.workspace import Workspace

        config = TorchTuneConfig(max_seq_len=max_seq_len)
        initialize_dataset(ws, str(bad[folder]), TorchTuneInstructDataset(), lambda _: None)
        initialize_model(ws, str(tiny["llama3_2"]), RUNTIME, config, lambda _: None)
        runtime = get_runtime(RUNTIME)
        _, conf = prepare_training(Workspace.at(ws), runtime, resolve(runtime, config),
                                   TorchTuneInstructDataset())
        return check_samples_fit(conf, lambda _: None)
    return _in_task(call, lambda tiny, bad: ["--dataset-uri", str(bad[folder]),
                                             "--max-seq-len", str(max_seq_len)])


CLI = ("cli", SystemExit)

CASES: list[Case] = [
    # --- API: types and ranges ---------------------------------------------------------
    Case("batch-size-text", "api", ConfigError, ("batch_size='4'", "whole number"),
         T(batch_size="4")),
    Case("epochs-float", "api", ConfigError, ("epochs=1.5", "whole number"), T(epochs=1.5)),
    Case("epochs-bool", "api", ConfigError, ("epochs=True", "integer"), T(epochs=True)),
    Case("learning-rate-range", "api", ConfigError, ("learning_rate=5.0", "(0, 1)"),
         T(learning_rate=5.0)),
    Case("max-seq-len-small", "api", ConfigError, ("max_seq_len=8", "16 or more"),
         T(max_seq_len=8)),
    Case("seed-negative", "api", ConfigError, ("seed=-1", "0 or more"), T(seed=-1)),
    Case("grad-accum-zero", "api", ConfigError, ("gradient_accumulation_steps=0", "1 or more"),
         T(gradient_accumulation_steps=0)),
    Case("gpus-over-8", "api", ConfigError, ("['gpu']=9", "1 to 8 GPUs"),
         T(resources_per_node={"gpu": 9})),
    Case("resources-unknown-key", "api", ConfigError, ("['tpu']", "allowed keys"),
         T(resources_per_node={"tpu": 1})),
    Case("num-nodes-2", "api", ConfigError, ("num_nodes=2", "num_nodes=1"), T(num_nodes=2)),
    Case("packed-text", "api", ConfigError, ("packed='yes'", "true or false"),
         T(packed="yes")),
    # --- API: enums --------------------------------------------------------------------
    Case("dtype-fp16", "api", ConfigError, ("dtype='fp16'", "'bf16'", "'fp32'"),
         T(dtype="fp16")),
    Case("loss-unknown", "api", ConfigError, ("loss='mse'", "CEWithChunkedOutputLoss"),
         T(loss="mse")),
    Case("source-excel", "api", ConfigError, ("source='excel'", "'parquet'"),
         D(source="excel")),
    Case("train-on-input-text", "api", ConfigError, ("train_on_input='yes'", "true or false"),
         D(train_on_input="yes")),
    # --- API: column maps and splits ---------------------------------------------------
    Case("column-map-unknown-key", "api", ConfigError, ("'prompt'", "keys must be among"),
         D(column_map={"prompt": "q"})),
    Case("column-map-empty-value", "api", ConfigError, ("column_map['input']=''", "non-empty"),
         D(column_map={"input": ""})),
    Case("column-map-not-a-dict", "api", ConfigError, ("column_map=['input']", "mapping"),
         D(column_map=["input"])),
    Case("split-percent-over-100", "api", ConfigError, ("split='train[:150%]'", "0..100%"),
         D(split="train[:150%]")),
    Case("split-step", "api", ConfigError, ("split='train[1:2:3]'", "train[:95%]"),
         D(split="train[1:2:3]")),
    # --- API: forbidden overrides ------------------------------------------------------
    Case("override-output-dir", "api", ConfigError, ("'output_dir=/tmp/x'", "remove it"),
         T(overrides=["output_dir=/tmp/x"])),
    Case("override-tokenizer-path", "api", ConfigError, ("'tokenizer.path", "remove it"),
         T(overrides=["tokenizer.path=/x/tok.model"])),
    Case("override-parent-of-fixed", "api", ConfigError,
         ("'checkpointer={}'", "checkpointer.checkpoint_dir"), T(overrides=["checkpointer={}"])),
    Case("override-not-key-value", "api", ConfigError, ("'lr 0.1'", "key=value"),
         T(overrides=["lr 0.1"])),
    # --- API: PEFT ---------------------------------------------------------------------
    Case("lora-rank-zero", "api", ConfigError, ("lora_rank=0", "1 or more"), L(lora_rank=0)),
    Case("lora-module-unknown", "api", ConfigError, ("'gate_proj'", "q_proj"),
         L(lora_attn_modules=["q_proj", "gate_proj"])),
    Case("lora-dropout-1", "api", ConfigError, ("lora_dropout=1.0", "[0, 1)"),
         L(lora_dropout=1.0)),
    Case("qlora-and-dora", "api", ConfigError, ("quantize_base=True", "not both"),
         L(quantize_base=True, use_dora=True)),
    Case("peft-as-dict", "api", ConfigError, ("peft_config={'lora_rank': 8}", "LoraConfig("),
         T(peft_config={"lora_rank": 8})),
    # --- API: whole runs refused before anything runs ----------------------------------
    Case("train-without-dataset", "api", ConfigError, ("initializer.dataset", "Initializer("),
         _train(dataset=False)),
    Case("train-unknown-runtime", "api", ConfigError,
         ("'torchtune-llama4-1b'", "kfp-finetune runtimes"), _train(runtime="torchtune-llama4-1b")),
    Case("qlora-on-cpu", "api", ConfigError, ("QLoRA", "needs a GPU", "resources_per_node"),
         _train(TorchTuneConfig(peft_config=LoraConfig(quantize_base=True)))),
    Case("70b-on-one-gpu", "api", ConfigError,
         ("'torchtune-llama3.3-70b' with 1 GPU", "Change the GPU count"),
         _train(TorchTuneConfig(resources_per_node={"gpu": 1}), "torchtune-llama3.3-70b")),
    Case("qlora-on-qwen", "api", ConfigError, ("qlora", "qwen2_5/1.5B_lora_single_device"),
         _train(TorchTuneConfig(peft_config=LoraConfig(quantize_base=True),
                                resources_per_node={"gpu": 1}), "torchtune-qwen2.5-1.5b")),
    Case("model-uri-with-path", "api", SourceError, ("'hf://org/model/sub'", "drop the path"),
         I("model", storage_uri="hf://org/model/sub")),
    Case("web-url-for-hub", "api", SourceError,
         ("'https'", "hf://org/alpaca"),
         I("dataset", "https://huggingface.co/datasets/org/alpaca")),
    # --- CLI -----------------------------------------------------------------------------
    Case("cli-unknown-runtime", "cli", ConfigError, ("'torchtune-llama4'", "kfp-finetune runtimes"),
         argv=("--runtime", "torchtune-llama4")),
    Case("cli-batch-size-not-int", "cli", SystemExit, ("'abc'", "--batch-size"),
         argv=("--batch-size", "abc")),
    Case("cli-column-map-key", "cli", ConfigError, ("'prompt'", "keys must be among"),
         argv=("--column-map", "input=q,prompt=x")),
    Case("cli-column-map-syntax", "cli", ConfigError, ("'output'", "KEY=COLUMN"),
         argv=("--column-map", "output")),
    Case("cli-split-percent", "cli", ConfigError, ("split='train[:200%]'", "0..100%"),
         argv=("--split", "train[:200%]")),
    Case("cli-source-xlsx", "cli", ConfigError, ("source='xlsx'", "'json'"),
         argv=("--source", "xlsx")),
    Case("cli-export-name-path", "cli", WorkspaceError, ("export_name='a/b'", "plain folder name"),
         argv=("--export-name", "a/b")),
    Case("cli-relative-model-uri", "cli", SourceError, ("'models/tiny'", "absolute path"),
         argv=("--model-uri", "models/tiny")),
    Case("cli-without-local", "cli", ConfigError, ("needs --local", "compiled/"),
         argv=("--no-local",)),
    # --- components (python_func, before the workspace is touched) ----------------------
    Case("component-column-map-key", "component", ConfigError, ("'bogus'", "keys must be among"),
         _component("dataset_initializer", column_map={"bogus": "x"})),
    Case("component-peft-method", "component", ConfigError,
         ("lora_method='adapter'", "lora, qlora, dora", "empty (or none) for full"),
         _component("model_initializer", peft_method="adapter")),
    Case("component-switch", "component", ConfigError,
         ("lora_apply_to_mlp='maybe'", "true or false", "empty for the default"),
         _component("model_initializer", peft_method="lora", apply_lora_to_mlp="maybe")),
    Case("component-fixed-override", "component", ConfigError,
         ("'output_dir=/elsewhere'", "remove it"),
         _component("fine_tune", overrides=["output_dir=/elsewhere"])),
    Case("component-qlora-cpu", "component", ConfigError, ("QLoRA", "needs a GPU"),
         _component("model_initializer", peft_method="qlora")),
    Case("component-batch-size-zero", "component", ConfigError, ("batch_size=0", "1 or more"),
         _component("dataset_initializer", batch_size=0)),
    # --- model step: checkpoint content ------------------------------------------------
    Case("corrupt-safetensors", "model-step", ModelError,
         ("model.safetensors", "not a valid safetensors file", "re-convert"),
         _model("garbage_weights")),
    Case("truncated-safetensors", "model-step", ModelError,
         ("model.safetensors", "cut short", "re-convert"), _model("truncated_weights")),
    Case("empty-safetensors", "model-step", ModelError,
         ("has 0 bytes", "re-upload"), _model("empty_weights")),
    Case("empty-config-json", "model-step", ModelError, ("config.json", "not valid JSON"),
         _model("empty_config")),
    Case("wrong-family-llama-on-qwen", "model-step", ModelError,
         ("'llama'", "torchtune-qwen2.5-tiny", "torchtune-llama3.2-tiny"),
         _model("llama3_2", "torchtune-qwen2.5-tiny")),
    # --- dataset step: data content ----------------------------------------------------
    Case("non-utf8-csv", "dataset-step", DatasetError,
         ("train.csv", "not valid UTF-8", "iconv"), _dataset("latin1_csv", source="csv")),
    Case("non-utf8-jsonl", "dataset-step", DatasetError,
         ("train.jsonl", "not valid UTF-8", "re-encode"), _dataset("latin1_json", source="json")),
    Case("empty-jsonl", "dataset-step", DatasetError, ("train.jsonl", "0 rows"),
         _dataset("empty_json", source="json")),
    Case("header-only-csv", "dataset-step", DatasetError, ("train.csv", "0 rows", "header"),
         _dataset("header_csv", source="csv")),
    Case("malformed-jsonl", "dataset-step", DatasetError,
         ("train.jsonl", "could not be read", "valid json"), _dataset("bad_json", source="json")),
    Case("messages-not-a-conversation", "dataset-step", DatasetError,
         ("'messages'", "'role'", "ShareGPT"), _dataset("bad_chat", source="json")),
    # --- fine-tune pre-flight: rows longer than max_seq_len ------------------------------
    Case("huge-rows-over-max-seq-len", "fine-tune-preflight", DatasetError,
         ("max_seq_len=512", "Raise max_seq_len", "train_on_input=True"),
         _preflight("huge_rows", 512)),
]


def _full_disk(ws: Path, tiny: dict[str, Path], bad: dict[str, Path]) -> object:
    # Simulated: the kernel's ENOSPC raised from the lowest write call `datasets` makes while
    # it writes its arrow cache (a real tmpfs needs mount rights; test_disk.py does those).
    from unittest import mock

    import datasets.arrow_writer

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with mock.patch.object(datasets.arrow_writer.ArrowWriter, "write_table", full):
        return initialize_dataset(ws, str(tiny["alpaca"] / "data"), TorchTuneInstructDataset(),
                                  lambda _: None)


_full_disk.cli = None  # type: ignore[attr-defined]  # simulated in this process: no CLI twin


NAN, INF = math.nan, math.inf
SECRET = "hf_MatrixSecretToken1234567890"
SIG = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
PRESIGNED = ("https://my-bucket.s3.amazonaws.com/data/train.parquet?X-Amz-Algorithm="
             "AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20250101%2Fus-east-1%2Fs3"
             f"%2Faws4_request&X-Amz-Date=20250101T000000Z&X-Amz-Signature={SIG}"
             "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLESESSIONTOKEN")
LONG = "x" * 300

CASES += [
    # --- issue 15: values ------------------------------------------------------------------
    Case("lora-alpha-nan", "api", ConfigError, ("lora_alpha=nan", "finite"), L(lora_alpha=NAN)),
    Case("lora-alpha-inf", "api", ConfigError, ("lora_alpha=inf", "finite"), L(lora_alpha=INF)),
    Case("lora-alpha-negative", "api", ConfigError, ("lora_alpha=-2", "(0, inf)"),
         L(lora_alpha=-2)),
    Case("lora-dropout-nan", "api", ConfigError, ("lora_dropout=nan", "[0, 1)"),
         L(lora_dropout=NAN)),
    Case("lora-rank-unbounded", "api", ConfigError, ("lora_rank=100000", "above 1024"),
         L(lora_rank=100000)),
    Case("learning-rate-nan", "api", ConfigError, ("learning_rate=nan", "finite"),
         T(learning_rate=NAN)),
    Case("learning-rate-inf", "api", ConfigError, ("learning_rate=inf", "finite"),
         T(learning_rate=INF)),
    # torchtune.training.seed.set_seed: seed must lie in [0, 2**32 - world_size].
    Case("seed-over-uint32", "api", ConfigError, ("seed=4294967296", "0..4294967288"),
         T(seed=2**32)),
    Case("seed-huge", "api", ConfigError, ("seed=10000000000000000000000", "out of range"),
         T(seed=10**22)),
    Case("column-map-input-is-output", "api", ConfigError,
         ("'input' and 'output'", "'text'", "own column"),
         D(column_map={"input": "text", "output": "text"})),
    Case("column-map-instruction-is-output", "api", ConfigError,
         ("'instruction' and 'output'", "own column"),
         D(column_map={"instruction": "q", "output": " q "})),
    # --- issue 15: overrides the pipeline owns, however spelled ------------------------------
    Case("override-special-tokens-path", "api", ConfigError,
         ("'tokenizer.special_tokens_path'", "tokenizer.json", "remove it"),
         T(overrides=["tokenizer.special_tokens_path=/elsewhere/tokenizer.json"])),
    Case("override-dataset-data-files", "api", ConfigError,
         ("'dataset.data_files'", "remove it"), T(overrides=["dataset.data_files=[/etc/x]"])),
    Case("override-dataset-source", "api", ConfigError, ("'dataset.source'", "source parameter"),
         T(overrides=["dataset.source=csv"])),
    Case("override-dataset-split", "api", ConfigError, ("'dataset.split'", "split parameter"),
         T(overrides=["dataset.split=test"])),
    Case("override-metric-logger-dir", "api", ConfigError,
         ("'metric_logger.log_dir'", "remove it"), T(overrides=["metric_logger.log_dir=/tmp"])),
    Case("override-metric-logger-alias", "api", ConfigError,
         ("'metric_logger._component_'", "DiskLogger"),
         T(overrides=["metric_logger=torchtune.training.metric_logging.WandBLogger"])),
    Case("override-checkpointer-output-dir", "api", ConfigError,
         ("'checkpointer.output_dir'", "workspace layout"),
         T(overrides=["checkpointer.output_dir=/mnt/elsewhere"])),
    Case("override-profiler-output-dir", "api", ConfigError,
         ("'profiler.output_dir'", "outside the pipeline's workspace"),
         T(overrides=["profiler.output_dir=/tmp/prof"])),
    Case("override-any-cache-dir", "api", ConfigError, ("'foo.cache_dir'", "outside"),
         T(overrides=["foo.cache_dir=/tmp"])),
    Case("override-delete-dataset", "api", ConfigError, ("'~dataset'", "deletes"),
         T(overrides=["~dataset"])),
    Case("override-delete-checkpointer-dir", "api", ConfigError,
         ("'~checkpointer.checkpoint_dir'", "deletes"),
         T(overrides=["~checkpointer.checkpoint_dir"])),
    Case("override-tokenizer-alias", "api", ConfigError,
         ("'tokenizer=torchtune.models.llama2.llama2_tokenizer'", "'tokenizer._component_'"),
         T(overrides=["tokenizer=torchtune.models.llama2.llama2_tokenizer"])),
    Case("override-delete-component", "api", ConfigError, ("'~optimizer._component_'",
                                                            "torchtune refuses"),
         T(overrides=["~optimizer._component_"])),
    Case("override-resume", "api", ConfigError, ("'resume_from_checkpoint'", "resumes"),
         T(overrides=["resume_from_checkpoint=true"])),
    Case("override-bad-yaml", "api", ConfigError, ("'optimizer.lr'", "not valid YAML", "quote"),
         T(overrides=["optimizer.lr=[0.1,"])),
    Case("override-bad-interpolation", "api", ConfigError,
         ("'optimizer.lr'", "malformed OmegaConf interpolation"),
         T(overrides=["optimizer.lr=${optimizer.base"])),
    Case("override-not-text", "api", ConfigError, ("override 42", "not text"),
         T(overrides=[42])),
    Case("override-bracket-key", "api", ConfigError, ("'dataset[source]=csv'", "key=value"),
         T(overrides=["dataset[source]=csv"])),
    Case("override-token-redacted", "api", ConfigError, ("hf_***", "'output_dir'"),
         T(overrides=[f"output_dir={SECRET}"]), hides=(SECRET,)),
    # --- issue 15: storage URIs and initializers ---------------------------------------------
    Case("storage-uri-none", "api", SourceError, ("storage_uri is None", "hf://org/repo"),
         I("dataset", None)),
    Case("storage-uri-int", "api", SourceError, ("of type int", "not text"),
         I("model", 7)),
    Case("storage-uri-token-as-hf-user", "api", SourceError, ("embeds credentials", "Secret"),
         I("model", f"hf://{SECRET}@meta-llama/Llama-3.2-1B"),
         hides=(SECRET[3:],)),
    Case("storage-uri-presigned-s3", "api", SourceError,
         ("embeds credentials", "X-Amz-Signature=***"),
         I("dataset", PRESIGNED),
         hides=(SIG, "AKIAIOSFODNN7EXAMPLE", "FwoGZXIvYXdzEXAMPLESESSIONTOKEN")),
    Case("storage-uri-signed-gcs", "api", SourceError, ("embeds credentials",),
         I("dataset", f"https://storage.googleapis.com/b/o.parquet?X-Goog-Signature={SIG}"),
         hides=(SIG,)),
    Case("storage-uri-component-too-long", "api", SourceError,
         ("300 bytes", "file-name limit of 255"),
         I("dataset", f"/data/{LONG}/train")),
    Case("initializer-none", "api", ConfigError, ("initializer=None", "Initializer(dataset="),
         lambda ws, *_: train(RUNTIME, None, workspace=ws)),  # type: ignore[arg-type]
    Case("initializer-dataset-as-text", "api", ConfigError,
         ("Initializer(dataset='hf://org/ds')", "HuggingFaceDatasetInitializer(storage_uri="),
         lambda ws, *_: train(RUNTIME, Initializer(dataset="hf://org/ds"),  # type: ignore
                              workspace=ws)),
    # --- issue 15: components (pipeline parameters) -----------------------------------------
    Case("component-lora-without-peft", "component", ConfigError,
         ("lora_rank=8", "lora_method is empty", "lora, qlora or dora"),
         _component("model_initializer", lora_rank=8)),
    Case("component-lora-modules-without-peft", "component", ConfigError,
         ("lora_attn_modules=['q_proj']", "lora_method"),
         _component("fine_tune", lora_attn_modules=["q_proj"])),
    Case("component-lora-alpha-nan", "component", ConfigError, ("lora_alpha=nan", "finite"),
         _component("model_initializer", peft_method="lora", lora_alpha=NAN)),
    Case("component-seed-out-of-range", "component", ConfigError,
         ("seed=8589934592", "0..4294967288"), _component("fine_tune", seed=2**33)),
    Case("component-owned-override", "component", ConfigError,
         ("'dataset.data_files'", "remove it"),
         _component("fine_tune", overrides=["dataset.data_files=[/x.json]"])),
    # --- issue 15: CLI ----------------------------------------------------------------------
    Case("cli-lora-rank-without-peft", "cli", ConfigError, ("lora_rank=8", "--peft"),
         argv=("--lora-rank", "8")),
    Case("cli-lora-alpha-without-peft", "cli", ConfigError, ("lora_alpha=32.0", "--peft"),
         argv=("--lora-alpha", "32")),
    Case("cli-lora-alpha-nan", "cli", ConfigError, ("lora_alpha=nan", "finite"),
         argv=("--peft", "lora", "--lora-alpha", "nan")),
    Case("cli-lora-rank-unbounded", "cli", ConfigError, ("lora_rank=65536", "above 1024"),
         argv=("--peft", "lora", "--lora-rank", "65536")),
    Case("cli-learning-rate-nan", "cli", ConfigError, ("learning_rate=nan", "finite"),
         argv=("--learning-rate", "nan")),
    Case("cli-seed-out-of-range", "cli", ConfigError, ("seed=99999999999", "out of range"),
         argv=("--seed", "99999999999")),
    Case("cli-column-map-same-column", "cli", ConfigError, ("'input' and 'output'", "'text'"),
         argv=("--column-map", "input=text,output=text")),
    Case("cli-override-log-dir", "cli", ConfigError, ("'metric_logger.log_dir'", "remove it"),
         argv=("--override", "metric_logger.log_dir=/tmp/x")),
    Case("cli-override-bad-yaml", "cli", ConfigError, ("'seed'", "not valid YAML"),
         argv=("--override", "seed={")),
    Case("cli-dataset-uri-token", "cli", SourceError, ("embeds credentials", "hf://***@org/ds"),
         argv=("--dataset-uri", f"hf://{SECRET}@org/ds"), hides=(SECRET,)),
    Case("cli-model-uri-userinfo", "cli", SourceError, ("***:***@", "embeds credentials"),
         argv=("--model-uri", "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIK7MDENG@bucket/m"),
         hides=("wJalrXUtnFEMIK7MDENG", "AKIAIOSFODNN7EXAMPLE")),
    Case("cli-compile-output-not-a-folder", "cli", ConfigError,
         ("cannot write the compiled pipelines", "Not a directory", "--output-dir"),
         argv=("compile", "--runtime", RUNTIME, "--output-dir", "{file}/compiled"),
         full_argv=True),
    Case("cli-compile-name-too-long", "cli", ConfigError,
         ("cannot write the compiled pipelines", "255 bytes"),
         argv=("compile", "--runtime", RUNTIME, "--output-dir", "{tmp}/" + LONG),
         full_argv=True),
    Case("cli-fixtures-output-not-a-folder", "cli", ConfigError,
         ("cannot write the fixtures", "Not a directory"),
         argv=("fixtures", "{file}/fixtures"), full_argv=True),
    Case("cli-fixtures-name-too-long", "cli", ConfigError,
         ("cannot write the fixtures", "file-name limit"),
         argv=("fixtures", "{tmp}/" + LONG), full_argv=True),
    Case("cli-submit-host-password", "cli", ConfigError, ("embeds credentials", "KFP_TOKEN"),
         argv=("submit", "--host", "https://admin:Pa55wordSecret@kf.example.com/pipeline",
               "--runtime", "torchtune-llama3.2-1b", "--dataset-uri", "hf://org/ds"),
         full_argv=True, hides=("Pa55wordSecret", "admin")),
    Case("cli-submit-lora-without-peft", "cli", ConfigError, ("lora_dropout=0.1", "--peft"),
         argv=("submit", "--host", "http://127.0.0.1:9", "--runtime", "torchtune-llama3.2-1b",
               "--dataset-uri", "hf://org/ds", "--lora-dropout", "0.1"), full_argv=True),
    # --- issue 15: dataset step, every row ------------------------------------------------
    Case("row-null-output", "dataset-step", DatasetError,
         ("column 'output' is null", "row 5", "file 'train.jsonl', row 5", "Fix or drop"),
         _dataset("null_output", source="json")),
    Case("row-empty-output", "dataset-step", DatasetError,
         ("column 'output' is empty", "file 'train.jsonl', row 3"),
         _dataset("empty_output", source="json")),
    Case("row-number-output", "dataset-step", DatasetError,
         ("column 'output' holds int64 values, not text", "train.jsonl"),
         _dataset("number_output", source="json")),
    Case("row-null-instruction-parquet", "dataset-step", DatasetError,
         ("column 'instruction' is null", "file 'train.parquet', row 2"),
         _dataset("null_instruction")),
    Case("row-null-in-second-file", "dataset-step", DatasetError,
         ("column 'output' is null", "row 9 of the split", "file 'b.parquet', row 1"),
         _dataset("two_files")),
    Case("row-null-in-sliced-split", "dataset-step", DatasetError,
         ("row 2 of the split", "file 'train.jsonl', row 6"),
         _dataset("null_row_6", source="json", split="train[50%:]")),
    Case("row-null-input-of-instruct-data", "dataset-step", DatasetError,
         ("column 'question' is null", "row 1"),
         _dataset("instruct_null", source="json",
                  column_map={"input": "question", "output": "answer"})),
    Case("row-empty-csv-output", "dataset-step", DatasetError,
         ("column 'output' is null", "file 'train.csv', row 1"), _dataset("csv_gap", source="csv")),
    Case("row-chat-null-content", "dataset-step", DatasetError,
         ("column 'messages' has a turn whose 'content' is null", "row 4"),
         _dataset("chat_null", source="json")),
    Case("row-chat-no-turns", "dataset-step", DatasetError,
         ("column 'messages' holds no turns", "row 2"), _dataset("chat_empty", source="json")),
    Case("split-selects-nothing", "dataset-step", DatasetError,
         ("split='train[5:5]' selects 0 of 8 rows", "widen"),
         _dataset("null_row_6", source="json", split="train[5:5]")),
    Case("split-beyond-the-data", "dataset-step", DatasetError,
         ("split='train[100:200]' selects 0 of 8 rows",),
         _dataset("null_row_6", source="json", split="train[100:200]")),
    Case("mixed-types-in-a-json-column", "dataset-step", DatasetError,
         ("column 'output' holds the non-text value 5", "file 'train.jsonl', row 3"),
         _dataset("mixed_json", source="json")),
    Case("dataset-lfs-pointer", "dataset-step", DatasetError,
         ("data file 'train.parquet'", "Git LFS pointer", "git lfs pull"), _dataset("lfs_data")),
    Case("dataset-cache-disk-full", "dataset-step", WorkspaceError,
         ("no space left", "writing the dataset cache", "pvc_size"), _full_disk),
    # --- issue 15: model step ---------------------------------------------------------------
    Case("lfs-pointer-tokenizer", "model-step", ModelError,
         ("'original/tokenizer.model'", "Git LFS pointer", "git lfs pull"),
         _model("lfs_tokenizer")),
    Case("lfs-pointer-weights", "model-step", ModelError,
         ("'model.safetensors'", "Git LFS pointer"), _model("lfs_weights")),
    Case("lfs-pointer-config", "model-step", ModelError,
         ("'config.json'", "Git LFS pointer"), _model("lfs_config")),
    Case("vocab-size-disagrees-with-embedding", "model-step", ModelError,
         ("vocab_size=300", "512 rows", "different models"), _model("vocab_300")),
    Case("tokenizer-larger-than-embedding", "model-step", ModelError,
         ("token ids up to", "512 rows", "index past"), _model("big_tokenizer")),
    Case("tokenizer-not-tiktoken", "model-step", ModelError,
         ("cannot load the tokenizer files", "original/tokenizer.model"),
         _model("garbage_tokenizer")),
    Case("config-hidden-size-text", "model-step", ModelError,
         ("config.json", "'hidden_size' is '64'", "positive whole number"),
         _model("hidden_text")),
    Case("config-rope-theta-text", "model-step", ModelError,
         ("'rope_theta' is 'high'", "positive number"), _model("rope_text")),
    Case("config-layers-bool", "model-step", ModelError,
         ("'num_hidden_layers' is True",), _model("layers_bool")),
    Case("config-vocab-negative", "model-step", ModelError,
         ("'vocab_size' is -5",), _model("vocab_negative")),
]

@pytest.fixture(scope="module")
def bad(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-matrix")
    out: dict[str, Path] = {}

    def folder(name: str) -> Path:
        out[name] = root / name
        out[name].mkdir()
        return out[name]

    def model_copy(name: str) -> Path:
        out[name] = root / name
        shutil.copytree(tiny["llama3_2"], out[name])
        return out[name]

    weights = (tiny["llama3_2"] / "model.safetensors").read_bytes()
    model_copy("garbage_weights").joinpath("model.safetensors").write_bytes(b"\x00garbage" * 99)
    model_copy("truncated_weights").joinpath("model.safetensors").write_bytes(
        weights[: len(weights) // 2])
    model_copy("empty_weights").joinpath("model.safetensors").write_bytes(b"")
    model_copy("empty_config").joinpath("config.json").write_bytes(b"")
    (folder("latin1_csv") / "train.csv").write_bytes(
        "instruction,input,output\nCaf\xe9 cr\xe8me,,r\xe9sum\xe9\n".encode("latin-1"))
    (folder("latin1_json") / "train.jsonl").write_bytes(
        '{"instruction": "Caf\xe9", "input": "", "output": "cr\xe8me"}\n'.encode("latin-1"))
    (folder("empty_json") / "train.jsonl").write_bytes(b"")
    (folder("header_csv") / "train.csv").write_bytes(b"instruction,input,output\n")
    (folder("bad_json") / "train.jsonl").write_bytes(b'{"instruction": "a", "output": \n')
    (folder("bad_chat") / "train.jsonl").write_text(
        json.dumps({"messages": "just a string"}) + "\n")
    rows = alpaca_rows(8, 0)
    for row in rows:
        row["instruction"] = "Explain this at length: " + "lorem ipsum " * 200
    pq.write_table(pa.Table.from_pylist(rows), folder("huge_rows") / "train.parquet")
    _rows_with_bad_values(folder)
    _models_with_bad_files(model_copy)
    return out


def _jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _alpaca(**changes: dict[str, object]) -> list[dict[str, object]]:
    """8 alpaca rows; ``changes`` maps "row<i>" to the fields to overwrite in row i."""
    rows: list[dict[str, object]] = [dict(r) for r in alpaca_rows(8, 0)]
    for key, fields in changes.items():
        rows[int(key[3:])].update(fields)
    return rows


LFS = ("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22"
       "eadbb8f32b1258daaa5e2ca24d17e2393\nsize 2183982\n")


def _rows_with_bad_values(folder: Callable[[str], Path]) -> None:
    _jsonl(folder("null_output") / "train.jsonl", _alpaca(row5={"output": None}))
    _jsonl(folder("empty_output") / "train.jsonl", _alpaca(row3={"output": "  "}))
    _jsonl(folder("number_output") / "train.jsonl",
           [{**r, "output": i} for i, r in enumerate(alpaca_rows(8, 0))])
    pq.write_table(pa.Table.from_pylist(_alpaca(row2={"instruction": None})),
                   folder("null_instruction") / "train.parquet")
    two = folder("two_files")
    pq.write_table(pa.Table.from_pylist(_alpaca()), two / "a.parquet")
    pq.write_table(pa.Table.from_pylist(_alpaca(row1={"output": None})), two / "b.parquet")
    _jsonl(folder("null_row_6") / "train.jsonl", _alpaca(row6={"output": None}))
    _jsonl(folder("instruct_null") / "train.jsonl",
           [{"question": None if i == 1 else f"q{i}", "answer": f"a{i}"} for i in range(4)])
    (folder("csv_gap") / "train.csv").write_text(
        "instruction,input,output\nSay hi.,,Hi\nSay bye.,,\nCount.,,1 2 3\n")
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    _jsonl(folder("chat_null") / "train.jsonl",
           [{"messages": turns if i != 4 else [turns[0], {"role": "assistant", "content": None}]}
            for i in range(6)])
    _jsonl(folder("chat_empty") / "train.jsonl",
           [{"messages": turns if i != 2 else []} for i in range(6)])
    _jsonl(folder("mixed_json") / "train.jsonl", _alpaca(row3={"output": 5}))
    (folder("lfs_data") / "train.parquet").write_text(LFS)


def _models_with_bad_files(model_copy: Callable[[str], Path]) -> None:
    import base64

    model_copy("lfs_tokenizer").joinpath("original", "tokenizer.model").write_text(LFS)
    model_copy("lfs_weights").joinpath("model.safetensors").write_text(LFS)
    model_copy("lfs_config").joinpath("config.json").write_text(LFS)

    def config(name: str, **fields: object) -> None:
        path = model_copy(name) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    config("vocab_300", vocab_size=300)
    config("hidden_text", hidden_size="64")
    config("rope_text", rope_theta="high")
    config("layers_bool", num_hidden_layers=True)
    config("vocab_negative", vocab_size=-5)
    tok = model_copy("big_tokenizer") / "original" / "tokenizer.model"
    pairs = [bytes([a, b]) for a in range(97, 123) for b in range(97, 123)]
    tok.write_text(tok.read_text() + "".join(
        f"{base64.b64encode(p).decode()} {256 + i}\n" for i, p in enumerate(pairs)))
    model_copy("garbage_tokenizer").joinpath("original", "tokenizer.model").write_text(
        "this is not a tiktoken file\n")


def test_the_matrix_has_at_least_100_cases_across_every_layer() -> None:
    assert len(CASES) >= 100
    assert {c.layer for c in CASES} == {"api", "cli", "component", "dataset-step",
                                        "model-step", "fine-tune-preflight"}
    assert len({c.id for c in CASES}) == len(CASES)


def _cli_argv(tiny: dict[str, Path], ws: Path, extra: tuple[str, ...]) -> list[str]:
    argv = ["run", "--local", "--runtime", RUNTIME, "--model-uri", str(tiny["llama3_2"]),
            "--dataset-uri", str(tiny["alpaca"] / "data"), "--workspace", str(ws)]
    if extra == ("--no-local",):
        return [a for a in argv if a != "--local"]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_caught_early_with_a_clear_message(
    case: Case, tmp_path: Path, tiny: dict[str, Path], bad: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    ws = tmp_path / "ws"
    if case.layer == "cli":
        (tmp_path / "afile").write_text("a file, not a folder\n")
        argv = ([a.replace("{file}", str(tmp_path / "afile")).replace("{tmp}", str(tmp_path))
                 for a in case.argv] if case.full_argv else _cli_argv(tiny, ws, case.argv))
        if case.error is SystemExit:  # argparse's own type check
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            assert exit_info.value.code == 2
        else:
            args = build_parser().parse_args(argv)
            with pytest.raises(case.error):
                args.func(args)
            capsys.readouterr()
            assert main(argv) == 2
        text = capsys.readouterr().err
        assert "Traceback" not in text
        assert text.count("\n") <= 2 or case.error is SystemExit, text
        assert not ws.exists(), "nothing may be written before the error"
    else:
        assert case.call is not None
        with pytest.raises(Exception) as err:
            case.call(ws, tiny, bad)
        assert type(err.value) is case.error, f"{type(err.value).__name__}: {err.value}"
        assert err.value.__cause__ is None, "a third-party exception is chained"
        assert err.value.__suppress_context__ or err.value.__context__ is None, \
            f"raw chained traceback: {err.value.__context__!r}"
        text = str(err.value)
        if case.layer in ("api", "component"):
            assert not (ws / "dataset").exists() and not (ws / "model").exists()
    for needle in case.says:
        assert needle in text, f"{needle!r} not in: {text}"
    for secret in case.hides:
        assert secret not in text, f"secret {secret!r} echoed in: {text}"


@pytest.mark.slow
def test_rows_that_fit_max_seq_len_pass_the_preflight(
    tmp_path: Path, tiny: dict[str, Path]
) -> None:
    _preflight("alpaca", 512)(tmp_path / "ws", tiny, {"alpaca": tiny["alpaca"] / "data"})


def test_a_local_folder_with_a_space_and_a_path_object_work_in_both_steps(
    tmp_path: Path, tiny: dict[str, Path]
) -> None:
    # Issue 15: a folder named "My Data" was refused ("contains whitespace"), a pathlib.Path
    # as storage_uri was called empty.
    data = tmp_path / "My Data" / "alpaca set"
    model = tmp_path / "My Models" / "tiny llama"
    shutil.copytree(tiny["alpaca"] / "data", data)
    shutil.copytree(tiny["llama3_2"], model)
    init = Initializer(dataset=HuggingFaceDatasetInitializer(data),  # type: ignore[arg-type]
                       model=HuggingFaceModelInitializer(f"file://{model}"))
    dataset = normalize_initializer(init.dataset, "dataset")  # as train() and the client do
    assert dataset.storage_uri == str(data)
    ws = tmp_path / "ws"
    summary = initialize_dataset(ws, dataset.storage_uri, TorchTuneInstructDataset(),
                                 lambda _: None)
    assert summary.plan.rows == 64 and summary.plan.kind == "alpaca"
    info = initialize_model(ws, str(model), RUNTIME, TorchTuneConfig(), lambda _: None).info
    assert info.checkpoint_files == ["model.safetensors"]


def test_rows_with_null_input_are_fine_for_alpaca_data(tmp_path: Path) -> None:
    # AlpacaToMessages (torchtune/data/_messages.py) skips a null or empty input, so the
    # every-row check must not refuse it.
    folder = tmp_path / "data"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", _alpaca(row2={"input": None}, row4={"input": ""}))
    summary = initialize_dataset(tmp_path / "ws", str(folder),
                                 TorchTuneInstructDataset(source="json"), lambda _: None)
    assert summary.plan.rows == 8


IN_TASK = [c for c in CASES if getattr(c.call, "cli", None)]


def test_every_step_layer_case_also_runs_through_the_cli() -> None:
    assert {c.layer for c in IN_TASK} == {"dataset-step", "model-step", "fine-tune-preflight"}
    in_process_only = sum(hasattr(c.call, "cli") and c.call.cli is None for c in CASES)
    assert len(IN_TASK) == sum(c.layer.endswith(("-step", "-preflight")) for c in CASES) \
        - in_process_only


@pytest.mark.slow
@pytest.mark.parametrize("case", IN_TASK, ids=[c.id for c in IN_TASK])
def test_in_task_errors_end_the_cli_with_the_steps_one_line(
    case: Case, tmp_path: Path, tiny: dict[str, Path], bad: dict[str, Path],
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The error raised inside a kfp.local task is the CLI's last line: one line, exit 2.

    kfp.local (kfp/local/pipeline_orchestrator.py) only raises "Inner task failed"; the step
    records its own error and the CLI repeats the line the task ended with.
    """
    from kfp_finetune.steps.step_errors import PREFIX

    ws = tmp_path / "ws"
    argv = _cli_argv(tiny, ws, tuple(case.call.cli(tiny, bad)))  # type: ignore[union-attr]
    assert main(argv) == 2
    captured = capfd.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"{PREFIX}{case.error.__name__}: "), last
    for needle in case.says:
        assert needle in last, f"{needle!r} not in: {last}"
    # The task's own log (kfp.local prints it on stdout) ends with the same line.
    assert last in [line.strip() for line in captured.out.splitlines()]
    assert "Traceback" not in captured.out + captured.err
    assert not (ws / "output" / "checkpoints" / "epoch_0").exists()
