"""Pipeline parameters (flat, never None) to the API's dataclasses."""

import pytest

from kfp_finetune.config.params import config_from_params, lora_from_params, switch
from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.report import loss_curve_html
from kfp_finetune.steps.training_log import summarize

BASE = dict(dtype="bf16", batch_size=2, epochs=1, loss="", num_nodes=1, gpus_per_node=1,
            source="parquet", split="train", train_on_input=False, new_system_prompt="",
            column_map={})


def test_defaults_mean_runtime_or_config_values():
    cfg = config_from_params(**BASE)
    assert cfg.peft_config is None
    assert cfg.learning_rate is None and cfg.max_seq_len is None
    assert cfg.packed is None and cfg.compile is None and cfg.activation_checkpointing is None
    assert cfg.seed == 42 and cfg.overrides is None


def test_knobs_reach_the_config():
    cfg = config_from_params(**BASE, peft_method="dora", lora_rank=4, lora_alpha=8.0,
                             lora_dropout=0.1, lora_attn_modules=["q_proj"],
                             apply_lora_to_mlp="true", learning_rate=1e-4, max_seq_len=512,
                             packed="true", compile="false", overrides=["clip_grad_norm=1.0"])
    assert cfg.peft_config.use_dora is True and cfg.peft_config.quantize_base is None
    assert cfg.peft_config.lora_rank == 4 and cfg.peft_config.lora_dropout == 0.1
    assert cfg.peft_config.apply_lora_to_mlp is True
    assert cfg.peft_config.lora_attn_modules == ["q_proj"]
    assert (cfg.learning_rate, cfg.max_seq_len, cfg.packed, cfg.compile) == (1e-4, 512, True, False)
    assert cfg.overrides == ["clip_grad_norm=1.0"]
    assert lora_from_params("qlora").quantize_base is True


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"peft_method": "adapter"}, "'adapter'"), ({"packed": "maybe"}, "'maybe'"),
     ({"learning_rate": 5.0}, "learning_rate=5.0"), ({"max_seq_len": 8}, "max_seq_len=8"),
     ({"overrides": ["output_dir=/tmp"]}, "'output_dir"), ({"overrides": ["nonsense"]},
                                                          "'nonsense'")],
)
def test_bad_parameters_name_the_value(kwargs, named):
    with pytest.raises(ConfigError) as info:
        config_from_params(**{**BASE, **kwargs})
    assert named in str(info.value)


def test_switch():
    assert switch("AUTO", "x") is None and switch("", "x") is None
    assert switch("Yes", "x") is True and switch(False, "x") is False


def test_summary_and_loss_curve():
    rows = [{"step": 1, "loss": 3.0, "tokens_per_second_per_gpu": 10.0},
            {"step": 2, "loss": 2.0, "tokens_per_second_per_gpu": 100.0, "peak_memory_active": 1.5},
            {"step": 3, "loss": 2.5, "tokens_per_second_per_gpu": 120.0}]
    summary = summarize(rows, processes=2)
    assert summary == {"final_loss": 2.5, "best_loss": 2.0, "steps": 3,
                       "trainable_tokens_per_second": 220.0, "peak_memory_gib": 1.5}
    page = loss_curve_html([(1, 3.0), (2, 2.0), (3, 2.5)], "t <x>")
    assert "<polyline" in page and "t &lt;x&gt;" in page and "final 2.5000" in page
    assert "<script" not in page
    assert "No training step" in loss_curve_html([])
