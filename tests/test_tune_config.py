from pathlib import Path

import pytest

from kfp_finetune.dataset_plan import ALPACA_BUILDER, INSTRUCT_BUILDER, DatasetPlan
from kfp_finetune.model_check import ModelInfo
from kfp_finetune.runtimes import get_runtime
from kfp_finetune.tune_config import render_config, resolve
from kfp_finetune.types import FIXED_KEYS, LoraConfig, TorchTuneConfig

MODEL = Path("/workspace/model")
OUT = Path("/workspace/output/checkpoints")


def plan(kind="alpaca", **kw):
    base = dict(builder=ALPACA_BUILDER if kind == "alpaca" else INSTRUCT_BUILDER, kind=kind,
                source="parquet", data_files=["/workspace/dataset/data/a.parquet"],
                split="train[:95%]", column_map=None, train_on_input=False,
                new_system_prompt=None, rows=10, columns=["instruction", "input", "output"])
    base.update(kw)
    return DatasetPlan(**base)


def render(runtime, config=None, dataset=None, special=True, files=("model.safetensors",)):
    rt = get_runtime(runtime)
    info = ModelInfo(list(files), str(MODEL / "tokenizer.json") if special else None, 64, 2)
    return render_config(rt, resolve(rt, config or TorchTuneConfig()), model_dir=MODEL,
                         model=info, dataset=dataset or plan(), output_dir=OUT,
                         cache_dir=Path("/workspace/.cache/datasets"))


def get(conf, dotted):
    for part in dotted.split("."):
        conf = conf[part]
    return conf


def test_fixed_keys_point_at_the_workspace():
    _, conf = render("torchtune-llama3.2-1b")
    assert {k: get(conf, k) for k in FIXED_KEYS if k != "tokenizer.merges_file"} == {
        "output_dir": str(OUT),
        "tokenizer.path": "/workspace/model/original/tokenizer.model",
        "checkpointer.checkpoint_dir": str(MODEL),
    }
    assert conf["checkpointer"]["output_dir"] == str(OUT)
    assert conf["checkpointer"]["model_type"] == "LLAMA3_2"
    assert conf["tokenizer"]["special_tokens_path"] == "/workspace/model/tokenizer.json"


def test_training_fields_use_torchtune_values():
    from kfp_finetune.types import DataType, Loss

    cfg = TorchTuneConfig(dtype=DataType.FP32, batch_size=7, epochs=3,
                          loss=Loss.CEWithChunkedOutputLoss, resources_per_node={"gpu": 1})
    _, conf = render("torchtune-llama3.2-1b", cfg)
    assert conf["dtype"] == "fp32"
    assert conf["batch_size"] == 7 and conf["epochs"] == 3
    assert conf["loss"] == {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"}
    assert conf["device"] == "cuda"
    # bitsandbytes (the base config's optimizer) is not in the trainer image.
    assert conf["optimizer"]["_component_"] == "torch.optim.AdamW"
    assert conf["optimizer"]["fused"] is True


def test_checkpoint_shards_are_listed_in_order():
    files = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    _, conf = render("torchtune-llama3.2-3b", files=files)
    assert conf["checkpointer"]["checkpoint_files"] == list(files)


def test_alpaca_data_keeps_the_instruction_column():
    _, conf = render("torchtune-llama3.2-1b", dataset=plan(new_system_prompt="Be brief."))
    ds = conf["dataset"]
    assert ds["_component_"] == "kfp_finetune.datasets.alpaca_instruct_dataset"
    assert ds["source"] == "parquet" and ds["split"] == "train[:95%]"
    assert ds["data_files"] == ["/workspace/dataset/data/a.parquet"]
    assert ds["new_system_prompt"] == "Be brief."
    assert ds["train_on_input"] is False


def test_two_column_data_uses_instruct_dataset_with_column_map():
    cmap = {"input": "incorrect", "output": "correct"}
    _, conf = render("torchtune-qwen2.5-1.5b",
                     dataset=plan("instruct", column_map=cmap, train_on_input=True))
    ds = conf["dataset"]
    assert ds["_component_"] == "torchtune.datasets.instruct_dataset"
    assert ds["column_map"] == cmap and ds["train_on_input"] is True
    assert conf["tokenizer"]["merges_file"] == "/workspace/model/merges.txt"
    assert conf["tokenizer"]["path"] == "/workspace/model/vocab.json"
    assert conf["checkpointer"]["model_type"] == "QWEN2"


def test_tiny_runtime_builds_from_config_json_on_cpu():
    choice, conf = render("torchtune-llama3.2-tiny")
    assert conf["model"] == {"_component_": "kfp_finetune.hf_models.llama3_2_from_hf_config",
                             "checkpoint_dir": str(MODEL)}
    assert choice.device == "cpu" and conf["device"] == "cpu"
    assert conf["dtype"] == "fp32"
    assert conf["optimizer"] == {"_component_": "torch.optim.AdamW", "lr": 3e-3, "fused": True}
    assert conf["optimizer_in_bwd"] is False and conf["compile"] is False
    assert conf["metric_logger"]["filename"] == "metrics.txt"


@pytest.mark.parametrize("runtime", ["torchtune-llama3.2-tiny", "torchtune-llama3.2-1b"])
def test_lora_fields_reach_the_model(runtime):
    peft = LoraConfig(lora_rank=4, lora_alpha=8, lora_attn_modules=["q_proj", "k_proj"],
                      apply_lora_to_mlp=False, use_dora=True)
    _, conf = render(runtime, TorchTuneConfig(peft_config=peft))
    model = conf["model"]
    assert model["lora_rank"] == 4 and model["lora_alpha"] == 8
    assert model["lora_attn_modules"] == ["q_proj", "k_proj"]
    assert model["use_dora"] is True and model["apply_lora_to_mlp"] is False
    assert conf["save_adapter_weights_only"] is False
    assert "lora" in model["_component_"]
