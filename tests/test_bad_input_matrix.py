"""Bad-input matrix across the API, the CLI, the components and the steps.

Each case states where it is caught (the layer), the error class, and text the message must
contain: the bad value and the fix. No case may surface as a raw traceback from torchtune or
datasets: the error is one of ours, raised ``from None`` (no chained third-party exception),
and on the CLI it is one ``error:`` line with exit code 2 and nothing written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kfp_finetune.api import BuiltinTrainer, train
from kfp_finetune.cli import build_parser, main
from kfp_finetune.errors import (
    ConfigError,
    DatasetError,
    ModelError,
    SourceError,
    WorkspaceError,
)
from kfp_finetune.fixtures import alpaca_rows
from kfp_finetune.steps import initialize_dataset, initialize_model
from kfp_finetune.types import (
    HuggingFaceDatasetInitializer,
    HuggingFaceModelInitializer,
    Initializer,
    LoraConfig,
    TorchTuneConfig,
    TorchTuneInstructDataset,
)

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


def T(**kw: object) -> Callable[..., object]:  # noqa: N802 - reads like the class
    return lambda *_: TorchTuneConfig(**kw)


def D(**kw: object) -> Callable[..., object]:  # noqa: N802
    return lambda *_: TorchTuneInstructDataset(**kw)


def L(**kw: object) -> Callable[..., object]:  # noqa: N802
    return lambda *_: LoraConfig(**kw)


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
    def call(ws: Path, tiny: dict[str, Path], bad: dict[str, Path]) -> object:
        from kfp import dsl

        module = __import__(f"kfp_finetune.components.{name}", fromlist=[name])
        func = getattr(module, name).python_func
        out = {"metrics": dsl.Metrics(name="m", uri=str(ws.parent / "m"), metadata={})}
        if name == "fine_tune":
            out["loss_curve"] = dsl.HTML(name="c", uri=str(ws.parent / "c"), metadata={})
        uri = {"dataset_initializer": {"dataset_uri": str(tiny["alpaca"] / "data")},
               "model_initializer": {"model_uri": str(tiny["llama3_2"])}}.get(name, {})
        args = {"runtime": RUNTIME, "workspace_path": str(ws), **uri, **out, **kw}
        return func(**args)
    return call


CliArgs = Callable[[dict[str, Path], dict[str, Path]], list[str]]


def _in_task(call: Callable[..., object], argv: CliArgs) -> Callable[..., object]:
    call.cli = argv  # type: ignore[attr-defined]  # the same bad input through `run --local`
    return call


def _dataset(folder: str, **kw: object) -> Callable[..., object]:
    flags = [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]
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
        from kfp_finetune.finetune import check_samples_fit, prepare_training
        from kfp_finetune.runtimes import get_runtime
        from kfp_finetune.tune_config import resolve
        from kfp_finetune.workspace import Workspace

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
         lambda *_: HuggingFaceModelInitializer(storage_uri="hf://org/model/sub")),
    Case("web-url-for-hub", "api", SourceError,
         ("'https'", "hf://org/alpaca"),
         lambda *_: HuggingFaceDatasetInitializer("https://huggingface.co/datasets/org/alpaca")),
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
         ("peft_method='adapter'", "none, lora, qlora, dora"),
         _component("model_initializer", peft_method="adapter")),
    Case("component-switch", "component", ConfigError,
         ("apply_lora_to_mlp='maybe'", "auto, true or false"),
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
    return out


def test_the_matrix_has_at_least_40_cases_across_every_layer() -> None:
    assert len(CASES) >= 40
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
        argv = _cli_argv(tiny, ws, case.argv)
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


@pytest.mark.slow
def test_rows_that_fit_max_seq_len_pass_the_preflight(
    tmp_path: Path, tiny: dict[str, Path]
) -> None:
    _preflight("alpaca", 512)(tmp_path / "ws", tiny, {"alpaca": tiny["alpaca"] / "data"})


IN_TASK = [c for c in CASES if hasattr(c.call, "cli")]


def test_every_step_layer_case_also_runs_through_the_cli() -> None:
    assert {c.layer for c in IN_TASK} == {"dataset-step", "model-step", "fine-tune-preflight"}
    assert len(IN_TASK) == sum(c.layer.endswith(("-step", "-preflight")) for c in CASES)


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
    from kfp_finetune.step_errors import PREFIX

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
