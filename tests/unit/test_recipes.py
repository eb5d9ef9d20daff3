import pytest

from kfp_finetune.config.runtimes import RUNTIMES, get_runtime
from kfp_finetune.config.types import LoraConfig, TorchTuneConfig
from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.tune_config import base_config_path, resolve, select_recipe


def choose(runtime, gpus, peft=None):
    rt = get_runtime(runtime)
    return select_recipe(rt, resolve(rt, TorchTuneConfig(resources_per_node={"gpu": gpus},
                                                         peft_config=peft)))


@pytest.mark.parametrize(
    ("runtime", "gpus", "peft", "recipe", "config"),
    [
        ("torchtune-llama3.2-1b", 1, None, "full_finetune_single_device",
         "llama3_2/1B_full_single_device"),
        ("torchtune-llama3.2-1b", 2, None, "full_finetune_distributed", "llama3_2/1B_full"),
        ("torchtune-llama3.2-1b", 1, LoraConfig(), "lora_finetune_single_device",
         "llama3_2/1B_lora_single_device"),
        ("torchtune-llama3.2-1b", 1, LoraConfig(quantize_base=True),
         "lora_finetune_single_device", "llama3_2/1B_qlora_single_device"),
        ("torchtune-llama3.2-1b", 4, LoraConfig(), "lora_finetune_distributed",
         "llama3_2/1B_lora"),
        ("torchtune-llama3.2-3b", 8, None, "full_finetune_distributed", "llama3_2/3B_full"),
        ("torchtune-llama3.3-70b", 8, None, "full_finetune_distributed", "llama3_3/70B_full"),
        ("torchtune-llama3.3-70b", 8, LoraConfig(), "lora_finetune_distributed",
         "llama3_3/70B_lora"),
        ("torchtune-llama3.3-70b", 8, LoraConfig(quantize_base=True),
         "lora_finetune_distributed", "llama3_3/70B_qlora"),
        ("torchtune-qwen2.5-1.5b", 1, None, "full_finetune_single_device",
         "qwen2_5/1.5B_full_single_device"),
        ("torchtune-qwen2.5-1.5b", 2, LoraConfig(), "lora_finetune_distributed",
         "qwen2_5/1.5B_lora"),
        ("torchtune-llama3.2-tiny", 0, None, "full_finetune_single_device",
         "llama3_2/1B_full_single_device"),
        ("torchtune-qwen2.5-tiny", 0, LoraConfig(), "lora_finetune_single_device",
         "qwen2_5/0.5B_lora_single_device"),
    ],
)
def test_recipe_and_config_follow_the_kubeflow_table(runtime, gpus, peft, recipe, config):
    choice = choose(runtime, gpus, peft)
    assert (choice.recipe, choice.config) == (recipe, config)
    assert base_config_path(choice.config).is_file()
    assert choice.device == ("cuda" if gpus else "cpu")


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_launch_command_by_gpu_count(gpus, tmp_path):
    cmd = choose("torchtune-llama3.2-1b", gpus).command(tmp_path / "c.yaml")
    if gpus == 1:
        assert cmd == ["tune", "run", "full_finetune_single_device", "--config",
                       str(tmp_path / "c.yaml")]
    else:
        assert cmd[:4] == ["tune", "run", "--nproc_per_node", str(gpus)]
        assert cmd[4] == "full_finetune_distributed"


@pytest.mark.parametrize(
    ("runtime", "gpus", "peft", "words"),
    [
        ("torchtune-llama3.3-70b", 1, None, "70B_full_single_device"),
        ("torchtune-qwen2.5-1.5b", 1, LoraConfig(quantize_base=True), "qwen2_5/1.5B_qlora"),
        ("torchtune-llama3.2-tiny", 0, LoraConfig(quantize_base=True), "QLoRA"),
    ],
)
def test_impossible_combinations_are_refused_with_the_reason(runtime, gpus, peft, words):
    with pytest.raises(ConfigError) as info:
        choose(runtime, gpus, peft)
    assert words in str(info.value)


def test_every_runtime_has_a_config_for_its_default_gpu_count():
    for rt in RUNTIMES.values():
        assert choose(rt.name, rt.default_gpus).config


def test_unknown_runtime_lists_the_runtimes():
    with pytest.raises(ConfigError) as info:
        get_runtime("torchtune-llama9")
    assert "'torchtune-llama9'" in str(info.value)
    assert "torchtune-llama3.2-1b" in str(info.value)
