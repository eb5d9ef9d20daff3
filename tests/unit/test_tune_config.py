from pathlib import Path

import pytest

from kfp_finetune.config.runtimes import get_runtime
from kfp_finetune.config.types import FIXED_KEYS, LoraConfig, TorchTuneConfig
from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.dataset_plan import ALPACA_BUILDER, INSTRUCT_BUILDER, DatasetPlan
from kfp_finetune.steps.model_check import ModelInfo
from kfp_finetune.steps.tune_config import render_config, resolve

MODEL = Path("/workspace/model")
OUT = Path("/workspace/output/checkpoints")


def plan(kind="alpaca", **kw):
    base = dict(builder=ALPACA_BUILDER if kind == "alpaca" else INSTRUCT_BUILDER, kind=kind,
                source="parquet", data_files=["/workspace/dataset/data/a.parquet"],
                split="train[:95%]", column_map=None, train_on_input=False,
                new_system_prompt=None, rows=10, columns=["instruction", "input", "output"])
    base.update(kw)
    return DatasetPlan(**base)


def render(runtime, config=None, dataset=None, special=True, files=("model.safetensors",),
           memory=None):
    rt = get_runtime(runtime)
    info = ModelInfo(list(files), str(MODEL / "tokenizer.json") if special else None, 64, 2)
    resolved = resolve(rt, config or TorchTuneConfig(), gpu_memory_gib=memory)
    return render_config(rt, resolved, model_dir=MODEL,
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
    from kfp_finetune.config.types import DataType, Loss

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
    assert ds["_component_"] == "kfp_finetune.plugins.datasets.alpaca_instruct_dataset"
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
    assert conf["model"] == {
        "_component_": "kfp_finetune.plugins.hf_models.llama3_2_from_hf_config",
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


# --------------------------------------------------------------------------- speed defaults
# Each row: what the README's runtime table documents for that runtime, GPU count and card
# memory (GiB per card; None = unknown, the torchtune config's value stays). Rendered on top
# of torchtune 0.6.1's real YAMLs: 1B_full_single_device ships enable_activation_checkpointing
# False, 3B_full_single_device and qwen2_5/1.5B_full_single_device True, llama3_3/70B_full
# True with fsdp_cpu_offload True, fused False and compile False.
H200, H100, L40S, A10G = 140.4, 79.6, 45.0, 22.5


@pytest.mark.parametrize(("runtime", "gpus", "memory", "expected"), [
    ("torchtune-llama3.2-1b", 1, H100, {"enable_activation_checkpointing": False}),
    ("torchtune-llama3.2-1b", 1, A10G, {"enable_activation_checkpointing": True}),
    ("torchtune-llama3.2-1b", 1, None, {"enable_activation_checkpointing": False}),
    ("torchtune-llama3.2-3b", 1, H100, {"enable_activation_checkpointing": False}),
    ("torchtune-llama3.2-3b", 1, L40S, {"enable_activation_checkpointing": True}),
    ("torchtune-llama3.2-3b", 1, None, {"enable_activation_checkpointing": True}),
    ("torchtune-qwen2.5-1.5b", 1, L40S, {"enable_activation_checkpointing": False}),
    ("torchtune-qwen2.5-1.5b", 1, A10G, {"enable_activation_checkpointing": True}),
    ("torchtune-llama3.3-70b", 8, H200, {"fsdp_cpu_offload": False,
                                         "enable_activation_checkpointing": True}),
    ("torchtune-llama3.3-70b", 8, H100, {"fsdp_cpu_offload": True,
                                         "enable_activation_checkpointing": True}),
    # Fewer cards hold a larger share of the 8 bytes/parameter each: 4 x 140 GiB is too little.
    ("torchtune-llama3.3-70b", 4, H200, {"fsdp_cpu_offload": True}),
    ("torchtune-llama3.3-70b", 8, None, {"fsdp_cpu_offload": True}),
])
def test_gpu_defaults_per_runtime_and_card_memory(runtime, gpus, memory, expected):
    choice, conf = render(runtime, TorchTuneConfig(resources_per_node={"gpu": gpus}),
                          memory=memory)
    assert {k: conf.get(k) for k in expected} == expected
    assert conf["dataset"]["packed"] is True and conf["tokenizer"]["max_seq_len"] == 2048
    assert conf["compile"] is True  # the 70B too (torchtune's 70B_full_multinode does)
    assert conf["optimizer"]["fused"] is True
    if not choice.distributed:
        assert "fsdp_cpu_offload" not in conf


def test_lora_on_70b_never_offloads_the_optimizer():
    # LoRA keeps no optimizer state for the frozen base: 140 GB of bf16 weights over 8 cards.
    # torchtune's llama3_3/70B_lora config has no fsdp_cpu_offload key (the recipe's default
    # is False): an 80 GB card must not get the full fine-tune's offload.
    cfg = TorchTuneConfig(resources_per_node={"gpu": 8}, peft_config=LoraConfig())
    _, conf = render("torchtune-llama3.3-70b", cfg, memory=H100)
    assert conf.get("fsdp_cpu_offload") in (None, False)


def test_what_the_user_sets_wins_over_the_memory_rules():
    cfg = TorchTuneConfig(resources_per_node={"gpu": 8}, activation_checkpointing=False,
                          overrides=["fsdp_cpu_offload=true"])
    _, conf = render("torchtune-llama3.3-70b", cfg, memory=H200)
    assert conf["enable_activation_checkpointing"] is False
    assert conf["fsdp_cpu_offload"] is True
    _, conf = render("torchtune-llama3.2-3b", TorchTuneConfig(activation_checkpointing=True),
                     memory=H200)
    assert conf["enable_activation_checkpointing"] is True


def test_cpu_runs_ignore_the_card_rules():
    _, conf = render("torchtune-llama3.2-1b", TorchTuneConfig(resources_per_node={"gpu": 0}),
                     memory=H200)
    assert conf["enable_activation_checkpointing"] is False and conf["compile"] is False
    assert conf["dataset"]["packed"] is False


def test_readme_runtime_table_states_each_memory_threshold():
    from kfp_finetune.config.runtimes import RUNTIMES

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Runtimes", 1)[1].split("\n## ", 1)[0]
    for runtime in RUNTIMES.values():
        for rule in runtime.memory_rules:
            row = next(line for line in section.splitlines() if f"`{runtime.name}`" in line)
            assert f"{rule.min_gib:g} GiB" in row, (runtime.name, rule.setting)


@pytest.mark.parametrize(("training_steps", "warmup"), [(30, 3), (150, 15), (5000, 100),
                                                        (4, 1)])
def test_lora_warmup_is_capped_by_the_steps_packing_leaves(training_steps, warmup):
    # torchtune's LoRA recipes build the scheduler after packing, with the real step count:
    # recipes/lora_finetune_single_device.py, _setup_lr_scheduler ->
    # config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=..., last_epoch=...).
    import torch
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    _, conf = render("torchtune-llama3.2-1b", TorchTuneConfig(peft_config=LoraConfig()),
                     memory=H100)
    assert conf["lr_scheduler"] == {
        "_component_": "kfp_finetune.plugins.lr_schedules.cosine_with_capped_warmup",
        "num_warmup_steps": 100, "max_warmup_fraction": 0.1}
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = tt_config.instantiate(OmegaConf.create(conf["lr_scheduler"]), optimizer,
                                      num_training_steps=training_steps, last_epoch=-1)
    lrs = []
    for _ in range(warmup + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[warmup] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1], strict=True))


def test_full_configs_keep_their_constant_learning_rate():
    _, conf = render("torchtune-llama3.2-1b", memory=H100)
    assert "lr_scheduler" not in conf


def test_card_memory_comes_from_nvidia_smi(tmp_path, monkeypatch):
    from kfp_finetune.steps.gpu_defaults import detect_gpu_memory_gib

    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpu_memory_gib() is None  # no nvidia-smi: unknown, the config's values stay
    # A stand-in for nvidia-smi (no GPU here): two cards, the smaller one decides.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '143771\\n81559\\n'\n")
    fake.chmod(0o755)
    assert detect_gpu_memory_gib() == 79.6


def test_weight_decay_from_the_run_form_reaches_the_optimizer():
    # One setting end to end: the table row (run form, CLI), the config field, the tune key.
    from kfp_finetune.drivers.cli import build_parser
    from kfp_finetune.drivers.cli_options import values_from_args
    from kfp_finetune.steps.check_run import check_run

    args = build_parser().parse_args(["run", "--local", "--runtime", "torchtune-llama3.2-1b",
                                      "--dataset-uri", "hf://org/data", "--weight-decay", "0.05"])
    run = check_run("torchtune-llama3.2-1b", values_from_args(args, cluster=False))
    assert run.trainer.weight_decay == 0.05
    _, conf = render("torchtune-llama3.2-1b", run.trainer)
    assert conf["optimizer"]["weight_decay"] == 0.05
    _, default = render("torchtune-llama3.2-1b")
    assert default["optimizer"].get("weight_decay") != 0.05  # unset: the torchtune config's
    with pytest.raises(ConfigError, match=r"weight_decay=1.5 must be a number in \[0, 1\)"):
        TorchTuneConfig(weight_decay=1.5)
