"""The whole pipeline run for real with kfp.local on CPU, and bad input caught before it runs."""

import json
import re

import pytest
from safetensors import safe_open

from kfp_finetune.drivers.cli import main


def run_args(tiny, ws, *extra):
    return ["run", "--local", "--runtime", "torchtune-llama3.2-tiny",
            "--model-uri", str(tiny["llama3_2"]), "--dataset-uri", f"file://{tiny['alpaca']}/data",
            "--workspace", str(ws), *extra]


@pytest.mark.slow
def test_local_pipeline_leaves_a_hugging_face_checkpoint(tiny, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(run_args(tiny, ws, "--epochs", "2", "--export-name", "my-model")) == 0
    out = capsys.readouterr().out
    model = ws / "output" / "my-model"
    assert f"fine-tuned model: {model}" in out
    assert "loss per step:" in out
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "original/tokenizer.model",
                 "model.safetensors.index.json"):
        assert (model / name).is_file(), name
    shards = sorted(model.glob("*.safetensors"))
    assert shards, "no weights exported"
    with safe_open(str(shards[0]), "pt") as handle:
        keys = set(handle.keys())
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert json.loads((model / "config.json").read_text())["model_type"] == "llama"
    # Loss per step from the run, printed and falling on the learnable fixture.
    losses = [float(m.group(1)) for m in re.finditer(r"^\s+step\s+\d+\s+loss (\S+)$", out, re.M)]
    assert len(losses) == 32  # 64 rows / batch 4 * 2 epochs
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4
    manifest = json.loads((model / ".kfp-finetune.json").read_text())
    assert manifest["runtime"] == "torchtune-llama3.2-tiny"
    assert manifest["base_model"] == f"file://{tiny['llama3_2']}"
    # The full torchtune config is kept beside the checkpoint; the tokenize-dataset task's
    # store fed the recipe (no tokenizing in the fine-tune step).
    used = (ws / "output" / "checkpoints" / "torchtune_config.yaml").read_text()
    assert "kfp_finetune.plugins.packed_data.pretokenized_dataset" in used
    # kfp.local writes the chart as an artifact without extension; the run copies it to
    # loss_curve.html beside it and the task's metrics (executor_output.json) and prints where.
    curve = next((ws / ".kfp-local-outputs").rglob("loss_curve.html"))
    assert "final_loss" in (curve.parent / "executor_output.json").read_text()
    assert f"loss curve: {curve}" in out
    assert curve.read_text().startswith("<!DOCTYPE html>") and ">step</text>" in curve.read_text()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--runtime", "torchtune-llama4-1b"], "'torchtune-llama4-1b'"),
        (["--dtype", "fp8"], "'fp8'"),
        (["--loss", "hinge"], "'hinge'"),
        (["--source", "excel"], "'excel'"),
        (["--num-nodes", "2"], "num_nodes=2"),
        (["--epochs", "0"], "epochs=0"),
        (["--batch-size", "0"], "batch_size=0"),
        (["--column-map", "input"], "'input'"),
        (["--split", "train[:"], "'train[:'"),
        (["--gpus", "-1"], "-1"),
        (["--export-name", "../x"], "'../x'"),
    ],
)
def test_bad_parameters_fail_before_anything_runs(tiny, tmp_path, capsys, extra, named):
    ws = tmp_path / "ws"
    args = run_args(tiny, ws)
    if extra[0] == "--runtime":
        args[args.index("--runtime") + 1] = extra[1]
    else:
        args += extra
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err
    assert not ws.exists(), "nothing may be written before the error"


@pytest.mark.parametrize(
    ("uri", "named"),
    [("hf://onlyorg", "'hf://onlyorg'"), ("gs://bucket/data", "'gs'"),
     ("relative/path", "'relative/path'"), ("hf://org/repo/../x", "'..'")],
)
def test_malformed_dataset_uri_fails_before_anything_runs(tiny, tmp_path, capsys, uri, named):
    args = run_args(tiny, tmp_path / "ws")
    args[args.index("--dataset-uri") + 1] = uri
    assert main(args) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


@pytest.mark.slow
def test_missing_column_is_reported_by_the_dataset_step(tiny, tmp_path, capfd):
    ws = tmp_path / "ws"
    assert main(run_args(tiny, ws, "--column-map", "output=answer")) == 2
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert "DatasetError" in text and "output->answer" in text
    assert "dataset-initializer" in text
    # The step's one line, not a traceback, ends the run (test_step_errors.py has more).
    assert captured.err.strip().splitlines()[-1].startswith("kfp-finetune: error: DatasetError")
    assert "Traceback" not in text
    assert not (ws / "output").exists(), "the fine-tune step must not have started"
