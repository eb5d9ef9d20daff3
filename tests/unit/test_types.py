import pytest

from kfp_finetune.config import types as t
from kfp_finetune.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "expected"),
    [("bf16", t.DataType.BF16), ("BF16", t.DataType.BF16), ("DataType.FP32", t.DataType.FP32),
     (t.DataType.FP32, t.DataType.FP32)],
)
def test_dtype_accepts_value_name_and_member(value, expected):
    assert t.TorchTuneConfig(dtype=value).dtype is expected


def test_loss_accepts_short_name_and_component_path():
    assert t.TorchTuneConfig(loss="CEWithChunkedOutputLoss").loss is t.Loss.CEWithChunkedOutputLoss
    assert (
        t.TorchTuneConfig(loss="torchtune.modules.loss.CEWithChunkedOutputLoss").loss
        is t.Loss.CEWithChunkedOutputLoss
    )


def test_defaults_follow_the_seed():
    cfg = t.TorchTuneConfig()
    pre = cfg.dataset_preprocess_config
    assert pre.source is t.DataFormat.PARQUET
    assert pre.split == "train"
    assert pre.train_on_input is False
    assert pre.new_system_prompt is None and pre.column_map is None
    assert cfg.gpus is None
    assert t.TorchTuneConfig(resources_per_node={"gpu": 2}).gpus == 2


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"dtype": "fp16"}, "'fp16'"),
        ({"loss": "mse"}, "'mse'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"epochs": 0}, "epochs=0"),
        ({"epochs": 1.5}, "epochs=1.5"),
        ({"num_nodes": 2}, "num_nodes=2"),
        ({"resources_per_node": {"gpu": -1}}, "resources_per_node['gpu']=-1"),
        ({"resources_per_node": {"gpu": 16}}, "resources_per_node['gpu']=16"),
        ({"resources_per_node": {"tpu": 1}}, "'tpu'"),
        ({"peft_config": {"lora_rank": 8}}, "peft_config="),
    ],
)
def test_bad_training_config_names_the_value(kwargs, named):
    with pytest.raises(ConfigError) as info:
        t.TorchTuneConfig(**kwargs)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"source": "yaml"}, "'yaml'"),
        ({"split": "train[:95"}, "'train[:95'"),
        ({"split": "train[:150%]"}, "150%"),
        ({"column_map": {"prompt": "q"}}, "'prompt'"),
        ({"column_map": {"input": ""}}, "column_map['input']"),
        ({"column_map": "input=q"}, "'input=q'"),
        ({"train_on_input": "yes"}, "'yes'"),
    ],
)
def test_bad_dataset_config_names_the_value(kwargs, named):
    with pytest.raises(ConfigError) as info:
        t.TorchTuneInstructDataset(**kwargs)
    assert named in str(info.value)


def test_split_with_slice_is_accepted():
    assert t.TorchTuneInstructDataset(split="train[:95%]").split == "train[:95%]"
    assert t.TorchTuneInstructDataset(split="train[10:20]").split == "train[10:20]"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"lora_attn_modules": ["q_proj", "gate"]}, "lora_attn_modules"),
        ({"lora_rank": 0}, "lora_rank=0"),
        ({"lora_alpha": -1}, "lora_alpha=-1"),
        ({"lora_dropout": 1.5}, "lora_dropout=1.5"),
        ({"quantize_base": True, "use_dora": True}, "quantize_base"),
    ],
)
def test_bad_lora_config(kwargs, named):
    with pytest.raises(ConfigError) as info:
        t.LoraConfig(**kwargs)
    assert named in str(info.value)


def test_access_token_is_not_in_repr():
    init = t.HuggingFaceModelInitializer(storage_uri="hf://org/model", access_token="hf_secret123")
    assert "hf_secret123" not in repr(init)
