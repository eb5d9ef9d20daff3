"""Real torchtune training on the tiny fixtures (CPU): full, LoRA, data formats, resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kfp_finetune.config.types import LoraConfig, TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.fine_tune import run_fine_tune
from kfp_finetune.steps.model_initializer import initialize_model

pytestmark = pytest.mark.slow


def prepare(ws, model_dir, data_uri, runtime, config):
    initialize_dataset(ws, data_uri, config.dataset_preprocess_config, log=lambda m: None)
    initialize_model(ws, str(model_dir), runtime, config, log=lambda m: None)


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize(
    ("family", "runtime", "peft"),
    [
        ("llama3_2", "torchtune-llama3.2-tiny", None),
        ("llama3_2", "torchtune-llama3.2-tiny", LoraConfig(lora_rank=16, lora_alpha=32,
                                                            apply_lora_to_mlp=True)),
        ("qwen2_5", "torchtune-qwen2.5-tiny", None),
        ("qwen2_5", "torchtune-qwen2.5-tiny", LoraConfig(lora_rank=16, lora_alpha=32,
                                                          apply_lora_to_mlp=True)),
    ],
    ids=["llama-full", "llama-lora", "qwen-full", "qwen-lora"],
)
def test_training_reduces_the_loss(tiny, tmp_path, family, runtime, peft):
    # LoRA warms up for 10 % of the 48 steps, then decays (lr_schedules): a peak of 5e-3.
    lr = 5e-3 if peft else None
    config = TorchTuneConfig(epochs=3, peft_config=peft, learning_rate=lr)
    prepare(tmp_path, tiny[family], f"{tiny['alpaca']}/data", runtime, config)
    result = run_fine_tune(tmp_path, runtime, config, log=lambda m: None)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 48  # 64 rows / batch 4 * 3 epochs
    # LoRA starts its adapters at zero on a random base model, so it learns more slowly.
    assert mean(losses[-4:]) < (0.92 if peft else 0.7) * mean(losses[:4]), losses
    assert result.metrics["best_loss"] == min(losses)
    assert result.metrics["trainable_tokens_per_second"] > 0
    ckpt = Path(result.checkpoint_dir)
    assert list(ckpt.glob("model-*.safetensors"))
    if peft:
        assert (ckpt / "adapter_config.json").is_file()


def test_alpaca_instruction_reaches_the_tokenized_prompt(tiny):
    from torchtune.models.llama3 import llama3_tokenizer

    from kfp_finetune.plugins.datasets import alpaca_instruct_dataset

    tok = llama3_tokenizer(str(tiny["llama3_2"] / "original" / "tokenizer.model"),
                           special_tokens_path=str(tiny["llama3_2"] / "tokenizer.json"))
    files = [str(p) for p in (tiny["alpaca"] / "data").glob("*.parquet")]
    ds = alpaca_instruct_dataset(tok, source="parquet", data_files=files,
                                 new_system_prompt="Answer briefly.")
    row = pq.read_table(files[0]).to_pylist()[0]
    sample = ds[0]
    text = tok.decode([t for t in sample["tokens"]], skip_special_tokens=False)
    assert row["instruction"] in text
    assert "### Instruction:" in text and "Answer briefly." in text
    # The prompt is masked (train_on_input=False): only the response counts in the loss.
    labels = [t for t in sample["labels"] if t != -100]
    assert row["output"] in tok.decode(labels)
    assert row["instruction"] not in tok.decode(labels)


def test_column_mapped_two_column_data_trains(tiny, tmp_path):
    data = tmp_path / "qa"
    data.mkdir()
    rows = [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(16)]
    pq.write_table(pa.Table.from_pylist(rows), data / "train.parquet")
    config = TorchTuneConfig(
        epochs=1,
        dataset_preprocess_config=TorchTuneInstructDataset(
            column_map={"input": "question", "output": "answer"}, new_system_prompt="Be exact."),
    )
    ws = tmp_path / "ws"
    prepare(ws, tiny["llama3_2"], str(data), "torchtune-llama3.2-tiny", config)
    result = run_fine_tune(ws, "torchtune-llama3.2-tiny", config, log=lambda m: None)
    assert len(result.losses) == 4
    conf = (ws / "output" / "checkpoints" / "torchtune_config.yaml").read_text()
    assert "torchtune.datasets.instruct_dataset" in conf and "question" in conf


@pytest.mark.parametrize("style", ["openai", "sharegpt"])
def test_chat_data_trains(tiny, tmp_path, style):
    data = tmp_path / "chat"
    data.mkdir()
    with open(data / "train.jsonl", "w") as handle:
        for i in range(8):
            if style == "openai":
                turns = {"messages": [{"role": "user", "content": f"Say {i}."},
                                      {"role": "assistant", "content": f"{i}"}]}
            else:
                turns = {"conversations": [{"from": "human", "value": f"Say {i}."},
                                           {"from": "gpt", "value": f"{i}"}]}
            handle.write(json.dumps(turns) + "\n")
    config = TorchTuneConfig(epochs=1, dataset_preprocess_config=TorchTuneInstructDataset(
        source="json", new_system_prompt="You count."))
    ws = tmp_path / "ws"
    prepare(ws, tiny["qwen2_5"], str(data), "torchtune-qwen2.5-tiny", config)
    result = run_fine_tune(ws, "torchtune-qwen2.5-tiny", config, log=lambda m: None)
    assert len(result.losses) == 2
    import yaml

    conf = yaml.safe_load(Path(result.config_path).read_text())["dataset"]
    assert conf["_component_"] == "torchtune.datasets.chat_dataset"
    assert conf["conversation_style"] == style
    assert conf["new_system_prompt"] == "You count."


def test_overrides_reach_the_config_and_fixed_keys_are_refused(tiny, tmp_path):
    with pytest.raises(ConfigError) as info:
        TorchTuneConfig(overrides=["checkpointer.checkpoint_dir=/tmp/x"])
    assert "checkpointer.checkpoint_dir" in str(info.value)
    with pytest.raises(ConfigError):
        TorchTuneConfig(overrides=["tokenizer={}"])
    config = TorchTuneConfig(epochs=1, max_steps_per_epoch=2, gradient_accumulation_steps=2,
                             overrides=["optimizer.weight_decay=0.05", "clip_grad_norm=1.0"])
    prepare(tmp_path, tiny["llama3_2"], f"{tiny['alpaca']}/data", "torchtune-llama3.2-tiny",
            config)
    result = run_fine_tune(tmp_path, "torchtune-llama3.2-tiny", config, log=lambda m: None)
    assert len(result.losses) == 2
    import yaml

    conf = yaml.safe_load(Path(result.config_path).read_text())
    assert conf["optimizer"]["weight_decay"] == 0.05 and conf["clip_grad_norm"] == 1.0
    assert conf["gradient_accumulation_steps"] == 2 and conf["max_steps_per_epoch"] == 2


def test_finished_run_is_not_trained_again(tiny, tmp_path):
    config = TorchTuneConfig(epochs=1, max_steps_per_epoch=2)
    prepare(tmp_path, tiny["llama3_2"], f"{tiny['alpaca']}/data", "torchtune-llama3.2-tiny",
            config)
    first = run_fine_tune(tmp_path, "torchtune-llama3.2-tiny", config, log=lambda m: None)
    start = time.monotonic()
    again = run_fine_tune(tmp_path, "torchtune-llama3.2-tiny", config, log=lambda m: None)
    assert again.skipped and not first.skipped
    assert again.checkpoint_dir == first.checkpoint_dir
    assert time.monotonic() - start < 5
    changed = TorchTuneConfig(epochs=1, max_steps_per_epoch=3)
    third = run_fine_tune(tmp_path, "torchtune-llama3.2-tiny", changed, log=lambda m: None)
    assert not third.skipped and len(third.losses) == 3


RUN_STEP = """
import sys
from kfp_finetune.steps.fine_tune import run_fine_tune
from kfp_finetune.config.types import TorchTuneConfig
run_fine_tune(sys.argv[1], "torchtune-llama3.2-tiny", TorchTuneConfig(epochs=2))
"""


def test_a_killed_run_resumes_at_the_next_epoch(tiny, tmp_path):
    config = TorchTuneConfig(epochs=2)
    prepare(tmp_path, tiny["llama3_2"], f"{tiny['alpaca']}/data", "torchtune-llama3.2-tiny",
            config)
    metrics = tmp_path / "output" / "checkpoints" / "logs" / "metrics.txt"
    proc = subprocess.Popen([sys.executable, "-c", RUN_STEP, str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        # Epoch 1 has 16 steps; once step 17 is logged, epoch 1's checkpoint is complete.
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and re.search(r"^Step 1[7-9] ", metrics.read_text(), re.M):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = tmp_path / "output" / "checkpoints"
    assert not (out / ".kfp-finetune.json").exists(), "a killed run must not look finished"
    assert (out / "epoch_0").is_dir() and not (out / "epoch_1").exists()

    lines = []
    result = run_fine_tune(tmp_path, "torchtune-llama3.2-tiny", config, log=lines.append)
    log = "\n".join(lines)
    assert result.resumed_from_epoch == 1
    assert "resuming: 1 of 2 epoch(s)" in log
    assert "Loading the recipe state" in log
    # Only epoch 2's steps ran in the second attempt; the curve still has all 32 steps.
    second_attempt_steps = re.findall(r"^Step (\d+) ", metrics.read_text(), re.M)
    assert [s for _, s in result.losses] and len(result.losses) == 32
    assert int(second_attempt_steps[-1]) == 32
    assert Path(result.checkpoint_dir).name == "epoch_1"
    done = json.loads((out / ".kfp-finetune.json").read_text())
    assert done["resumed_from_epoch"] == 1
