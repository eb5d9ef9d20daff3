"""Held-out evaluation in the fine-tune step: real training on the tiny fixtures (CPU).

The fine-tuned model's held-out loss must be lower than the base model's on the fixture rows
the training split leaves out; both are reported as the step's Metrics and in its chart.
"""

import json
import math

import pytest

from kfp_finetune.config.types import LoraConfig, TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.errors import ConfigError, DatasetError
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.fine_tune import run_fine_tune
from kfp_finetune.steps.model_initializer import initialize_model

LLAMA = "torchtune-llama3.2-tiny"
SPLIT, EVAL_SPLIT = "train[:75%]", "train[75%:]"  # 48 rows trained, 16 held out
EVAL_KEYS = {"eval_loss_base", "eval_perplexity_base", "eval_loss", "eval_perplexity",
             "eval_tokens"}


def quiet(_line):
    pass


def prepare(ws, tiny, config):
    initialize_dataset(ws, f"{tiny['alpaca']}/data", config.dataset_preprocess_config, log=quiet)
    initialize_model(ws, str(tiny["llama3_2"]), LLAMA, config, log=quiet)


def config(split=SPLIT, **kwargs):
    return TorchTuneConfig(dataset_preprocess_config=TorchTuneInstructDataset(split=split),
                           **kwargs)


def run_args(tiny, ws, *extra):
    return ["run", "--local", "--runtime", LLAMA, "--model-uri", str(tiny["llama3_2"]),
            "--dataset-uri", f"file://{tiny['alpaca']}/data", "--workspace", str(ws), *extra]


@pytest.mark.slow
def test_local_run_with_eval_split_reports_a_lower_held_out_loss_than_the_base(
        tiny, tmp_path, capsys):
    """`kfp-finetune run --local --eval-split`: the fine-tune task's Metrics and chart."""
    from kfp_finetune.drivers.cli import main

    ws = tmp_path / "ws"
    assert main(run_args(tiny, ws, "--epochs", "2", "--split", SPLIT,
                         "--eval-split", EVAL_SPLIT)) == 0
    out = capsys.readouterr().out
    assert "[eval] held-out loss: base" in out
    curve = next((ws / ".kfp-local-outputs").rglob("loss_curve.html"))
    executor_output = json.loads((curve.parent / "executor_output.json").read_text())
    figures = executor_output["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert EVAL_KEYS <= set(figures), figures
    # Measured (CPU, seed 42): base 6.14 (about ln 512, the random tiny model), fine-tuned
    # 2.50 after 24 steps; the fixture's 8 facts recur in the held-out rows.
    assert figures["eval_loss"] < 0.8 * figures["eval_loss_base"], figures
    assert figures["eval_perplexity"] == pytest.approx(math.exp(figures["eval_loss"]), rel=1e-5)
    assert figures["eval_perplexity_base"] == pytest.approx(math.exp(figures["eval_loss_base"]),
                                                            rel=1e-5)
    assert figures["eval_tokens"] > 0
    chart = curve.read_text()
    assert f"base eval loss: {figures['eval_loss_base']:.4f}" in chart
    assert f"fine-tuned eval loss: {figures['eval_loss']:.4f}" in chart


def test_an_overlapping_eval_split_fails_the_cli_before_anything_runs(tiny, tmp_path, capsys):
    from kfp_finetune.drivers.cli import main

    ws = tmp_path / "ws"
    assert main(run_args(tiny, ws, "--eval-split", EVAL_SPLIT)) == 2  # --split: train
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "eval_split='train[75%:]' overlaps the training split split='train'" in err
    assert not ws.exists(), "nothing may be written before the error"
    with pytest.raises(ConfigError, match="overlaps the training split"):
        TorchTuneConfig(eval_split=EVAL_SPLIT)


@pytest.mark.slow
def test_lora_held_out_loss_is_lower_cached_on_rerun_and_absent_without_eval_split(
        tiny, tmp_path):
    lora = config(epochs=2, learning_rate=5e-3,
                  peft_config=LoraConfig(lora_rank=16, lora_alpha=32, apply_lora_to_mlp=True))
    prepare(tmp_path, tiny, lora)
    lines = []
    first = run_fine_tune(tmp_path, LLAMA, lora, lines.append, eval_split=EVAL_SPLIT)
    figures = first.metrics
    # LoRA on a random base learns slowly (measured 6.14 -> 5.57), still clearly lower.
    assert figures["eval_loss"] < figures["eval_loss_base"] - 0.2, figures
    assert any("measuring the base model" in line for line in lines)
    # The base model was measured before `tune run` started.
    base_at = next(i for i, line in enumerate(lines) if "base model: held-out loss" in line)
    tune_at = next(i for i, line in enumerate(lines) if line.startswith("[fine-tune] $ tune"))
    assert base_at < tune_at
    # A re-run finds the finished run and both results in the cache: nothing is measured.
    lines.clear()
    again = run_fine_tune(tmp_path, LLAMA, lora, lines.append, eval_split=EVAL_SPLIT)
    assert again.skipped and again.metrics == figures
    assert not any("measuring" in line for line in lines)
    # Without eval_split the Metrics are those of the training alone, as before.
    plain = run_fine_tune(tmp_path, LLAMA, lora, quiet)
    assert plain.skipped and not EVAL_KEYS & set(plain.metrics)
    assert plain.metrics == {k: v for k, v in figures.items() if k not in EVAL_KEYS}


def test_an_eval_split_overlapping_the_training_split_is_refused_before_anything(tiny, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_fine_tune(tmp_path / "never", LLAMA, config(split="train"), quiet,
                      eval_split=EVAL_SPLIT)
    assert "eval_split='train[75%:]' overlaps the training split split='train'" in str(err.value)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("split", "eval_split", "error", "message"),
    [
        # Decided with the row count (64 rows): rows 34-63 are held out, 0-39 trained.
        ("train[:40]", "train[-30:]", ConfigError, "of the 64 rows, both select rows 34 to 39"),
        ("train[:40]", "train[64:]", DatasetError, "eval_split='train[64:]': split='train[64:]' "
                                                   "selects 0 of 64 rows"),
        ("train[:40]", "test", DatasetError, "eval_split='test': split='test' selects nothing"),
    ],
)
def test_held_out_splits_are_checked_against_the_data_before_training(
        tiny, tmp_path, split, eval_split, error, message):
    cfg = config(split=split)
    prepare(tmp_path, tiny, cfg)
    with pytest.raises(error) as err:
        run_fine_tune(tmp_path, LLAMA, cfg, quiet, eval_split=eval_split)
    assert message in str(err.value), str(err.value)
    assert not (tmp_path / "output" / "checkpoints" / "epoch_0").exists()


@pytest.mark.slow  # measures the base model in a child process (no training)
def test_held_out_rows_cut_before_their_response_fail_before_training(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kfp_finetune.drivers.fixtures import alpaca_rows

    rows = alpaca_rows(40) + [{"instruction": "Repeat this. " * 60, "input": "", "output": "x"}
                              for _ in range(8)]
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), data / "train.parquet")
    cfg = TorchTuneConfig(max_seq_len=400, dataset_preprocess_config=TorchTuneInstructDataset(
        split="train[:40]"))
    ws = tmp_path / "ws"
    initialize_dataset(ws, f"file://{data}", cfg.dataset_preprocess_config, log=quiet)
    initialize_model(ws, str(tiny["llama3_2"]), LLAMA, cfg, log=quiet)
    with pytest.raises(DatasetError) as err:
        run_fine_tune(ws, LLAMA, cfg, quiet, eval_split="train[40:]")
    message = str(err.value)
    assert "eval_split='train[40:]': none of its 8 rows keeps a token" in message
    assert "raise max_seq_len" in message
    assert not (ws / "output" / "checkpoints" / "epoch_0").exists()


@pytest.mark.parametrize(("family", "runtime"), [("llama3_2", LLAMA),
                                                  ("qwen2_5", "torchtune-qwen2.5-tiny")])
def test_held_out_loss_of_the_base_model_matches_transformers(tiny, tmp_path, family, runtime):
    """An independent reading of the same checkpoint (transformers' own model classes) gives
    the same loss over the same held-out rows: the weights reach the model intact."""
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from transformers import AutoModelForCausalLM

    from kfp_finetune.config.runtimes import get_runtime
    from kfp_finetune.steps.evaluate import eval_conf, evaluate_checkpoint
    from kfp_finetune.steps.fine_tune import prepare_training
    from kfp_finetune.steps.tune_config import resolve
    from kfp_finetune.storage.workspace import Workspace

    cfg = config()
    initialize_dataset(tmp_path, f"{tiny['alpaca']}/data", cfg.dataset_preprocess_config,
                       log=quiet)
    initialize_model(tmp_path, str(tiny[family]), runtime, cfg, log=quiet)
    rt = get_runtime(runtime)
    _, conf = prepare_training(Workspace.at(tmp_path), rt, resolve(rt, cfg),
                               cfg.dataset_preprocess_config)
    held = eval_conf(conf, EVAL_SPLIT)
    assert held["dtype"] == "fp32"
    result = evaluate_checkpoint(held, tmp_path / "model",
                                 list(held["checkpointer"]["checkpoint_files"]))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"),
                                              dtype=torch.float32).eval()
    tokenizer = tt_config.instantiate(OmegaConf.create(held["tokenizer"]))
    dataset = tt_config.instantiate(OmegaConf.create(held["dataset"]), tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            row = dataset[i]
            logits = hf(torch.tensor([row["tokens"]])).logits[0]
            labels = torch.tensor(row["labels"][1:])
            total += float(F.cross_entropy(logits[:-1], labels, ignore_index=-100,
                                           reduction="sum"))
            count += int((labels != -100).sum())
    assert (result.rows, result.tokens) == (16, count)
    assert result.loss == pytest.approx(total / count, rel=1e-4)
