"""The user-facing types: the Kubeflow SDK's own classes, and our one extension of them.

The SDK's dataclasses (kubeflow/trainer/types/types.py: ``LoraConfig``,
``TorchTuneInstructDataset``, the initializers) check nothing when they are built, so the checks
on them run where they are used: when our ``TorchTuneConfig`` is built (on its nested objects)
and in ``normalize_*`` (what ``train()``, the client and the CLI call). Same messages as when
our own copies checked themselves.
"""

import dataclasses

import kubeflow.trainer as sdk
import pytest

import kfp_finetune
from kfp_finetune.config import types as t
from kfp_finetune.config.validation import normalize_dataset, normalize_initializer, normalize_lora
from kfp_finetune.errors import ConfigError, SourceError

SDK_NAMES = ["LoraConfig", "TorchTuneInstructDataset", "Initializer",
             "HuggingFaceDatasetInitializer", "HuggingFaceModelInitializer",
             "S3DatasetInitializer", "S3ModelInitializer", "DataType", "Loss", "DataFormat",
             "Runtime", "BuiltinTrainer"]


@pytest.mark.parametrize("name", SDK_NAMES)
def test_the_public_types_are_the_sdks_own(name):
    assert getattr(kfp_finetune, name) is getattr(sdk, name)
    assert getattr(t, name) is getattr(sdk, name)


def test_our_torchtune_config_is_an_sdk_one_with_the_extra_settings():
    assert issubclass(kfp_finetune.TorchTuneConfig, sdk.TorchTuneConfig)
    ours = {f.name for f in dataclasses.fields(kfp_finetune.TorchTuneConfig)}
    theirs = {f.name for f in dataclasses.fields(sdk.TorchTuneConfig)}
    assert theirs < ours
    assert ours - theirs == {"learning_rate", "weight_decay", "gradient_accumulation_steps",
                             "max_seq_len",
                             "packed", "activation_checkpointing", "compile",
                             "max_steps_per_epoch", "seed", "overrides", "eval_split"}


def test_an_sdk_config_is_normalized_with_every_check_and_its_enums():
    cfg = t.normalize_config(sdk.TorchTuneConfig(
        dtype="bf16", batch_size=2, peft_config=sdk.LoraConfig(lora_rank=8),
        dataset_preprocess_config=sdk.TorchTuneInstructDataset(source="json")))
    assert type(cfg) is t.TorchTuneConfig
    assert cfg.dtype is sdk.DataType.BF16 and cfg.batch_size == 2
    assert cfg.peft_config.lora_rank == 8
    assert cfg.dataset_preprocess_config.source is sdk.DataFormat.JSON
    assert cfg.dataset_preprocess_config.split == "train"
    with pytest.raises(ConfigError, match="batch_size=0"):
        t.normalize_config(sdk.TorchTuneConfig(batch_size=0))
    with pytest.raises(ConfigError, match="not a TorchTuneConfig"):
        t.normalize_config({"batch_size": 2})


def test_the_nested_objects_passed_in_are_not_changed():
    lora = sdk.LoraConfig(lora_attn_modules=("q_proj",))
    data = sdk.TorchTuneInstructDataset(source="csv")
    t.TorchTuneConfig(peft_config=lora, dataset_preprocess_config=data)
    assert lora.lora_attn_modules == ("q_proj",) and data.source == "csv" and data.split is None


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
    # Checked where it is used (the SDK's class checks nothing when built): alone, and nested.
    with pytest.raises(ConfigError) as info:
        normalize_dataset(t.TorchTuneInstructDataset(**kwargs))
    assert named in str(info.value)
    with pytest.raises(ConfigError) as info:
        t.TorchTuneConfig(dataset_preprocess_config=t.TorchTuneInstructDataset(**kwargs))
    assert named in str(info.value)


def test_split_with_slice_is_accepted():
    for split in ("train[:95%]", "train[10:20]"):
        assert normalize_dataset(t.TorchTuneInstructDataset(split=split)).split == split
    assert normalize_dataset(t.TorchTuneInstructDataset(source="parquet")).source \
        is t.DataFormat.PARQUET


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
    # Checked where it is used (the SDK's LoraConfig checks nothing when built).
    with pytest.raises(ConfigError) as info:
        normalize_lora(t.LoraConfig(**kwargs))
    assert named in str(info.value)
    with pytest.raises(ConfigError) as info:
        t.TorchTuneConfig(peft_config=t.LoraConfig(**kwargs))
    assert named in str(info.value)


def test_initializers_are_checked_where_used_and_their_token_never_shown():
    # The SDK's initializers show access_token in their repr (a plain dataclass field), so
    # our messages never show an initializer's repr, only its class.
    token = "hf_secret123"
    bad = t.HuggingFaceModelInitializer(storage_uri="hf://org/model/sub", access_token=token)
    with pytest.raises(SourceError) as info:
        normalize_initializer(bad, "model")
    assert "'hf://org/model/sub'" in str(info.value) and token not in str(info.value)
    with pytest.raises(ConfigError) as info:
        normalize_initializer(bad, "dataset")
    assert "HuggingFaceModelInitializer(...)" in str(info.value)
    assert token not in str(info.value)
    model = normalize_initializer(t.HuggingFaceModelInitializer(storage_uri="hf://org/model"),
                                  "model")
    assert model.ignore_patterns is None  # the SDK's default patterns count as "not set"


def test_the_old_runtime_class_name_is_a_deprecated_alias():
    from kfp_finetune.config import runtimes

    with pytest.warns(DeprecationWarning, match="RuntimeSpec"):
        assert runtimes.Runtime is runtimes.RuntimeSpec
    assert isinstance(kfp_finetune.get_runtime("torchtune-llama3.2-1b"), sdk.Runtime)
