"""The held-out loss: computed as torchtune's recipe computes its training loss (fast tests)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kfp_finetune.steps.evaluate import (
    EvalResult,
    batch_loss,
    eval_conf,
    eval_metrics,
    mean_loss,
    plain_model_conf,
)
from kfp_finetune.steps.report import eval_references, loss_curve_html

IGNORE = -100


def tiny_decoder():
    from torchtune.models.llama3_2._component_builders import llama3_2

    torch.manual_seed(0)
    model = llama3_2(vocab_size=40, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16,
                     max_seq_len=64, intermediate_dim=32)
    for param in model.parameters():  # random weights, so the loss is not uniform
        torch.nn.init.normal_(param, std=0.5)
    return model.eval()


# Three samples of different lengths; the prompt part of each is masked with the ignore index
# (torchtune's SFT datasets mask prompts with CROSS_ENTROPY_IGNORE_IDX = -100).
SAMPLES = [
    {"tokens": [1, 5, 7, 9, 11, 2], "labels": [IGNORE, IGNORE, IGNORE, 9, 11, 2]},
    {"tokens": [1, 6, 8, 2], "labels": [IGNORE, IGNORE, 8, 2]},
    {"tokens": [1, 3, 4, 12, 13, 14, 15, 2], "labels": [IGNORE, 3, 4, 12, 13, 14, 15, 2]},
]


def by_hand(model):
    """Cross-entropy of every unmasked token predicted from the token before it."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in SAMPLES:
            logits = model(torch.tensor([sample["tokens"]]))[0]
            labels = torch.tensor(sample["labels"][1:])
            total += float(F.cross_entropy(logits[:-1], labels, ignore_index=IGNORE,
                                           reduction="sum"))
            count += int((labels != IGNORE).sum())
    return total / count, count


def batches(size):
    from torchtune.data import padded_collate_sft

    return [padded_collate_sft(SAMPLES[i:i + size], padding_idx=0, ignore_idx=IGNORE)
            for i in range(0, len(SAMPLES), size)]


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("chunked", [True, False], ids=["CEWithChunkedOutputLoss", "plain-CE"])
def test_mean_loss_equals_cross_entropy_over_the_unmasked_tokens(size, chunked):
    # The recipe's _loss_step (torchtune recipes/full_finetune_single_device.py): labels
    # shifted left by one with ignore_index appended, chunked logits when the loss is
    # CEWithChunkedOutputLoss (model.set_num_output_chunks), padding labelled ignore_index by
    # padded_collate_sft. Batching and padding must not change the per-token mean.
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    model = tiny_decoder()
    expected, count = by_hand(model)
    if chunked:
        loss_fn = CEWithChunkedOutputLoss(num_output_chunks=4)
        model.set_num_output_chunks(loss_fn.num_output_chunks)
    else:
        loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    loss, tokens = mean_loss(model, loss_fn, batches(size))
    assert tokens == count == 3 + 2 + 7
    assert loss == pytest.approx(expected, rel=1e-5)
    assert expected > 0.5  # the weights are random: a real loss, not a degenerate one


def test_a_batch_with_no_counted_token_adds_nothing():
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    loss_fn = CEWithChunkedOutputLoss()
    # The first token's label is dropped by the shift (nothing predicts it) and the others
    # are masked: no token counts, and the model is not even called.
    batch = {"tokens": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, IGNORE, IGNORE]])}
    assert batch_loss(None, loss_fn, batch) == (0.0, 0)
    assert math.isnan(mean_loss(None, loss_fn, [batch])[0])


def test_eval_conf_reads_the_eval_split_unpacked_and_leaves_the_training_config_alone():
    conf = {"dataset": {"_component_": "x", "split": "train[:95%]", "packed": True},
            "batch_size": 4}
    held = eval_conf(conf, "train[95%:]")
    assert held["dataset"] == {"_component_": "x", "split": "train[95%:]", "packed": False}
    assert conf["dataset"]["split"] == "train[:95%]" and conf["dataset"]["packed"] is True


@pytest.mark.parametrize(
    ("component", "plain"),
    [
        ("torchtune.models.llama3_2.lora_llama3_2_1b", "torchtune.models.llama3_2.llama3_2_1b"),
        ("torchtune.models.llama3_2.qlora_llama3_2_1b", "torchtune.models.llama3_2.llama3_2_1b"),
        ("torchtune.models.qwen2_5.lora_qwen2_5_1_5b_instruct",
         "torchtune.models.qwen2_5.qwen2_5_1_5b_instruct"),
        ("kfp_finetune.plugins.hf_models.lora_llama3_2_from_hf_config",
         "kfp_finetune.plugins.hf_models.llama3_2_from_hf_config"),
        ("torchtune.models.llama3_2.llama3_2_1b", "torchtune.models.llama3_2.llama3_2_1b"),
    ],
)
def test_the_merged_lora_checkpoint_is_evaluated_with_the_plain_builder(component, plain):
    # torchtune's LoRA recipe with save_adapter_weights_only=False saves the merged weights
    # (recipes/lora_finetune_single_device.py, save_checkpoint: get_merged_lora_ckpt) under
    # the base model's key names: the plain builder loads them.
    conf = plain_model_conf({"_component_": component, "lora_attn_modules": ["q_proj"],
                             "lora_rank": 8, "lora_alpha": 16, "checkpoint_dir": "/m"})
    assert conf["_component_"] == plain
    assert not {"lora_attn_modules", "lora_rank", "lora_alpha"} & set(conf)
    if "from_hf_config" in plain:
        assert conf["checkpoint_dir"] == "/m"


def test_metrics_and_chart_lines_of_an_evaluation():
    metrics = eval_metrics(EvalResult(5.0, 100, 16), EvalResult(2.0, 100, 16))
    assert metrics["eval_loss_base"] == 5.0 and metrics["eval_loss"] == 2.0
    assert metrics["eval_perplexity_base"] == pytest.approx(math.exp(5.0))
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(2.0))
    lines = eval_references(metrics)
    assert lines == {"base eval loss": 5.0, "fine-tuned eval loss": 2.0}
    page = loss_curve_html([(1, 6.0), (2, 4.0), (3, 3.0)], "t", lines)
    assert page.count('stroke-dasharray="6 4"') == 2
    assert "base eval loss: 5.0000" in page and "fine-tuned eval loss: 2.0000" in page
    # Without an evaluation the chart is what it was.
    assert eval_references({"final_loss": 3.0}) is None
    plain = loss_curve_html([(1, 6.0), (2, 4.0), (3, 3.0)], "t")
    assert "stroke-dasharray" not in plain and "eval loss" not in plain
    assert plain == loss_curve_html([(1, 6.0), (2, 4.0), (3, 3.0)], "t", None)


def test_a_model_too_big_for_one_gpu_is_refused_for_held_out_evaluation():
    from kfp_finetune.errors import ConfigError
    from kfp_finetune.steps.held_out import check_fits_one_gpu

    check_fits_one_gpu(140 * 2**30, None, "train[95%:]")  # CPU / unknown card: not checked
    check_fits_one_gpu(16 * 2**30, 80.0, "train[95%:]")  # 8B in bf16 on an 80 GiB card
    with pytest.raises(ConfigError) as err:
        check_fits_one_gpu(140 * 2**30, 80.0, "train[95%:]")  # 70B in bf16
    message = str(err.value)
    assert "eval_split='train[95%:]'" in message and "140.0 GiB" in message
    assert "80 GiB" in message and "leave eval_split empty" in message


def test_the_base_result_is_cached_by_what_the_measurement_depends_on():
    from kfp_finetune.steps.evaluate import key_conf

    full = {"model": {"_component_": "kfp_finetune.plugins.hf_models.llama3_2_from_hf_config",
                      "checkpoint_dir": "/m"},
            "dataset": {"split": "train[95%:]"}, "loss": {"_component_": "l"}, "batch_size": 4,
            "optimizer": {"lr": 1e-3}, "epochs": 3}
    lora = {**full, "optimizer": {"lr": 5e-3}, "epochs": 1,
            "model": {"_component_": "kfp_finetune.plugins.hf_models."
                                     "lora_llama3_2_from_hf_config",
                      "checkpoint_dir": "/m", "lora_rank": 8, "lora_alpha": 16}}
    # The same base model measured the same way: one result for a full and a LoRA run, and
    # a learning-rate or epoch change does not measure it again ...
    assert key_conf(full) == key_conf(lora)
    # ... but other held-out rows, another loss or batch size do.
    for change in ({"dataset": {"split": "train[90%:]"}}, {"loss": {"_component_": "m"}},
                   {"batch_size": 8}):
        assert key_conf({**full, **change}) != key_conf(full)
