"""The model card's parts and the loss chart, on their own (no training: see test_export.py
for the card of real exports and its snippet run against the exported model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kfp_finetune.steps.export_metadata import adapter_base
from kfp_finetune.steps.model_card import (
    carry_chat_template,
    front_matter,
    has_chat_template,
    hyperparameters,
    prompt_format,
    read_front_matter,
    render_card,
)
from kfp_finetune.steps.report import loss_curve_html, nice_ticks

META = {
    "base_model": "hf://meta-llama/Llama-3.2-1B-Instruct@main",
    "base_model_revision": "0123abcd",
    "dataset": "hf://tatsu-lab/alpaca@v1/data",
    "recipe": "lora_finetune_single_device",
    "config": "llama3_2/1B_lora_single_device",
    "runtime": "torchtune-llama3.2-1b",
    "final_loss": 1.25,
    "run_id": "r1",
    "path": "/workspace/output/m",
    "adapter_path": "/workspace/output/m/adapter",
}
CONF = {
    "epochs": 2, "batch_size": 4, "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-4},
    "tokenizer": {"_component_": "torchtune.models.llama3.llama3_tokenizer", "max_seq_len": 512},
    "model": {"_component_": "x", "lora_rank": 64, "lora_alpha": 128, "lora_dropout": 0.0},
    "dataset": {"_component_": "torchtune.datasets.chat_dataset", "packed": True,
                "conversation_column": "messages", "conversation_style": "openai",
                "new_system_prompt": "Be brief."},
}


def test_front_matter_names_hub_sources_and_the_base_license(tmp_path):
    # Keys as the Hub's model card metadata spec names them (huggingface_hub ModelCardData:
    # base_model, datasets, license, library_name, tags).
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: llama3.2\n---\nx\n")
    front = front_matter(META, tmp_path)
    assert front["base_model"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert front["datasets"] == ["tatsu-lab/alpaca"]
    assert front["license"] == "other" and front["license_name"] == "llama3.2"
    assert front["library_name"] == "transformers" and {"lora", "peft"} <= set(front["tags"])
    local = {**META, "base_model": "file:///models/x", "dataset": "s3://b/d",
             "adapter_path": None}
    (tmp_path / "README.md").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"license": "mit"}))
    front = front_matter(local, tmp_path)
    assert "base_model" not in front and "datasets" not in front and front["license"] == "mit"
    assert "lora" not in front["tags"]


def test_card_lists_hyperparameters_prompt_format_and_a_chat_snippet(tmp_path):
    params = hyperparameters(CONF, META["recipe"])
    assert params["lora_rank"] == 64 and params["packed"] is True
    assert params["learning_rate"] == 3e-4 and "gradient_accumulation_steps" not in params
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    card = render_card(META, CONF, tmp_path, tmp_path)
    (tmp_path / "card.md").write_text(card)
    assert read_front_matter(tmp_path / "card.md")["base_model"] == (
        "meta-llama/Llama-3.2-1B-Instruct")
    for row in ("| recipe | `lora_finetune_single_device` |", "| epochs | `2` |",
                "| batch_size | `4` |", "| learning_rate | `0.0003` |",
                "| max_seq_len | `512` |", "| packed | `True` |", "| lora_alpha | `128` |"):
        assert row in card, row
    assert "**chat**" in card and "openai" in card and '"Be brief."' in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    compile(snippet, "snippet", "exec")  # valid Python; run for real in test_export.py
    assert "apply_chat_template" in snippet and '"role": "system"' in snippet
    assert "AutoPeftModelForCausalLM" in card and "torchao" in card


def test_prompt_format_follows_the_dataset_builder():
    alpaca, example = prompt_format({"dataset": {
        "_component_": "kfp_finetune.plugins.datasets.alpaca_instruct_dataset"}})
    assert "**alpaca**" in alpaca and example.endswith("### Response:\n")
    instruct, example = prompt_format({"dataset": {
        "_component_": "torchtune.datasets.instruct_dataset"}})
    assert "**instruct**" in instruct and "###" not in example


def test_chat_template_is_carried_when_the_checkpoint_lost_it(tmp_path):
    base, export = tmp_path / "base", tmp_path / "export"
    base.mkdir()
    export.mkdir()
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    (base / "chat_template.jinja").write_text("{{ x }}")
    (base / "tokenizer.json").write_text("{}")  # e.g. over torchtune's 100 MiB copy limit
    (export / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert not has_chat_template(export)
    carried = carry_chat_template(base, export)
    assert set(carried) == {"chat_template.jinja", "tokenizer.json",
                            "tokenizer_config.json:chat_template"}
    config = json.loads((export / "tokenizer_config.json").read_text())
    assert config == {"eos_token": "</s>", "chat_template": "{{ x }}"}
    assert has_chat_template(export) and carry_chat_template(base, export) == []


def test_adapter_base_is_something_peft_can_load(tmp_path: Path):
    assert adapter_base({"source": "hf://org/m@rev", "revision": "abc"}, tmp_path) == (
        "org/m", "abc")
    assert adapter_base({"source": "hf://org/m"}, tmp_path) == ("org/m", None)
    assert adapter_base({"source": "file:///models/m"}, tmp_path) == ("/models/m", None)
    assert adapter_base({"source": "s3://b/m"}, tmp_path) == (str(tmp_path), None)


def _y_of(page: str, label: str) -> float:
    match = re.search(rf'<text x="[\d.]+" y="([\d.]+)"[^>]*text-anchor="end">{label}</text>',
                      page)
    assert match, label
    return float(match.group(1))


def test_loss_curve_has_axes_and_does_not_zoom_a_small_change_into_a_cliff():
    losses = [(s, 6.14 - 0.05 * (s - 1) / 19) for s in range(1, 21)]
    page = loss_curve_html(losses)
    assert ">step</text>" in page and ">loss</text>" in page
    assert _y_of(page, "0") > _y_of(page, "6")  # the y axis starts at 0, below 6
    points = [tuple(map(float, p.split(","))) for p in
              re.search(r'<polyline[^>]*points="([^"]+)"', page).group(1).split()]
    drop = points[-1][1] - points[0][1]  # SVG y grows downwards
    height = _y_of(page, "0") - _y_of(page, "8")
    assert 0 < drop < 0.02 * height  # 0.05 of ~8 units: under 2% of the chart's height
    assert "first loss 6.1400, final 6.0900 (change -0.0500)" in page
    assert "<title>step 20: loss 6.0900</title>" in page
    assert nice_ticks(0, 6.14) == [0, 2, 4, 6, 8]
    assert "No training step" in loss_curve_html([])
