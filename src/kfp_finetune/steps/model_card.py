"""The exported folder's model card (README.md) and what it reads from the training config.

The card follows the Hugging Face model card layout: YAML front matter (``base_model``,
``datasets``, ``license``, ``library_name``, ``tags``), then the hyperparameters the run used
(read from the rendered torchtune config saved beside the model, so defaults show their real
values), the prompt format the dataset step chose, and a usage snippet that runs as written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from kfp_finetune.steps.dataset_plan import ALPACA_BUILDER, CHAT_BUILDER

ADAPTER_DIR = "adapter"
# Files that make up a tokenizer and its chat template (Hugging Face names).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_EXAMPLE = "Name the capital of Italy."


def hf_repo_id(source: str) -> str | None:
    """The ``org/name`` of an ``hf://org/name[@rev][/path]`` source, else None."""
    from kfp_finetune.errors import KfpFinetuneError
    from kfp_finetune.storage.uris import parse_storage_uri

    if not source.startswith("hf://"):
        return None
    try:
        return parse_storage_uri(source, "dataset").repo_id or None
    except KfpFinetuneError:
        return None


def _get(conf: dict[str, Any], dotted: str) -> Any:
    node: Any = conf
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def hyperparameters(conf: dict[str, Any], recipe: str) -> dict[str, Any]:
    """The values a run trained with, read from its rendered torchtune config.

    Args:
        conf: The saved ``torchtune_config.yaml`` as a dict.
        recipe: The torchtune recipe that ran.

    Returns:
        Name -> value; LoRA keys only for LoRA runs, unset values left out (but
        ``max_seq_len``: None, no truncation).
    """
    values = {
        "recipe": recipe,
        "epochs": conf.get("epochs"),
        "batch_size": conf.get("batch_size"),
        "gradient_accumulation_steps": conf.get("gradient_accumulation_steps"),
        "learning_rate": _get(conf, "optimizer.lr"),
        "optimizer": _get(conf, "optimizer._component_"),
        "lr_scheduler": _get(conf, "lr_scheduler._component_"),
        "max_seq_len": _get(conf, "tokenizer.max_seq_len"),
        "packed": _get(conf, "dataset.packed"),
        "train_on_input": _get(conf, "dataset.train_on_input"),
        "dtype": conf.get("dtype"),
        "seed": conf.get("seed"),
        "max_steps_per_epoch": conf.get("max_steps_per_epoch"),
        **lora_settings(conf),
    }
    # max_seq_len None means samples were not truncated: worth saying, unlike other unset keys.
    return {k: v for k, v in values.items() if v is not None or k == "max_seq_len"}


def lora_settings(conf: dict[str, Any]) -> dict[str, Any]:
    """LoRA rank, alpha, dropout and target modules from the rendered config ({} if no LoRA)."""
    model = conf.get("model") or {}
    if "lora_rank" not in model:
        return {}
    return {k: model[k] for k in ("lora_rank", "lora_alpha", "lora_dropout",
                                  "lora_attn_modules", "apply_lora_to_mlp",
                                  "apply_lora_to_output", "use_dora", "quantize_base")
            if model.get(k) is not None}


def read_front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a model card ({} when there is none or it is not YAML)."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_license(base_dir: Path) -> dict[str, Any]:
    """``license`` (and ``license_name`` / ``license_link``) the base model declares, if any."""
    found = read_front_matter(base_dir / "README.md")
    try:
        config = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if not found.get("license") and isinstance(config.get("license"), str):
        found = {"license": config["license"]}
    return {k: found[k] for k in ("license", "license_name", "license_link") if found.get(k)}


def front_matter(meta: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The card's Hugging Face metadata (only keys whose value is known)."""
    data: dict[str, Any] = {}
    base = hf_repo_id(str(meta.get("base_model", "")))
    # The Hub wants a repo id here; a local or S3 base is named in the card's text instead.
    if base:
        data["base_model"] = base
    data.update(base_license(base_dir))
    dataset = hf_repo_id(str(meta.get("dataset", "")))
    if dataset:
        data["datasets"] = [dataset]
    data["library_name"] = "transformers"
    tags = ["kfp-finetune", "torchtune", "text-generation"]
    if meta.get("adapter_path"):
        tags += ["lora", "peft"]
    data["tags"] = tags
    data["pipeline_tag"] = "text-generation"
    return data


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer in ``folder`` has a chat template (either place HF keeps it)."""
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text())
                    .get("chat_template"))
    except (OSError, ValueError):
        return False


def carry_chat_template(base_dir: Path, export_dir: Path) -> list[str]:
    """Give the export the base model's tokenizer files and chat template it lacks.

    torchtune copies the base folder's small files into each checkpoint, but skips files over
    100 MiB and never edits ``tokenizer_config.json``; this fills what is missing.

    Returns:
        The names copied or updated.
    """
    carried = []
    for name in TOKENIZER_FILES:
        src, dst = base_dir / name, export_dir / name
        if src.is_file() and not dst.exists():
            shutil.copy2(src, dst)
            dst.chmod(0o644)
            carried.append(name)
    src, dst = base_dir / "tokenizer_config.json", export_dir / "tokenizer_config.json"
    try:
        template = json.loads(src.read_text()).get("chat_template")
        config = json.loads(dst.read_text())
    except (OSError, ValueError):
        return carried
    if template and not config.get("chat_template"):
        config["chat_template"] = template
        dst.write_text(json.dumps(config, indent=2) + "\n")
        carried.append("tokenizer_config.json:chat_template")
    return carried


def prompt_format(conf: dict[str, Any]) -> tuple[str, str]:
    """How training prompts looked: (markdown description, an example user message)."""
    dataset = conf.get("dataset") or {}
    builder = str(dataset.get("_component_", ""))
    tokenizer = _get(conf, "tokenizer._component_") or "the model's tokenizer"
    wrap = (f"torchtune's `{tokenizer}` wrapped it in the model family's chat format (role "
            "headers and end-of-turn tokens) before training.")
    system = dataset.get("new_system_prompt")
    if system:
        wrap += f" Every sample started with the system message {json.dumps(system)}."
    if builder == ALPACA_BUILDER:
        text = ("**alpaca**: each sample's user message was the Alpaca prompt\n\n```text\n"
                + _ALPACA_PROMPT + "```\n\n(with `### Input:\\n{input}\\n\\n` before "
                "`### Response:` when the row has an input); " + wrap)
        return text, _ALPACA_PROMPT.format(instruction=_EXAMPLE)
    if builder == CHAT_BUILDER:
        style = dataset.get("conversation_style", "openai")
        text = (f"**chat**: multi-turn conversations ({style} style, column "
                f"`{dataset.get('conversation_column')}`); " + wrap)
        return text, _EXAMPLE
    text = ("**instruct**: each sample's `input` column was the user message as it is, the "
            "`output` column the answer; " + wrap)
    return text, _EXAMPLE


def usage_snippet(path: str, example: str, chat: bool, system: str | None) -> str:
    """Python that loads the model and generates an answer (runs on CPU as written)."""
    lines = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"path = {json.dumps(path)}  # or the Hub repo you pushed the model to",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
    ]
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": example}]
        lines += [
            f"messages = {json.dumps(messages)}",
            "inputs = tokenizer.apply_chat_template(",
            "    messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
        ]
    else:
        lines += [f"prompt = {json.dumps(example)}",
                  "inputs = tokenizer(prompt, return_tensors=\"pt\")"]
    lines += [
        "output = model.generate(**inputs, max_new_tokens=64)",
        "answer = tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], "
        "skip_special_tokens=True)",
        "print(answer)",
    ]
    return "\n".join(lines) + "\n"


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def render_card(meta: dict[str, Any], conf: dict[str, Any], export_dir: Path,
                base_dir: Path) -> str:
    """The README.md of an export.

    Args:
        meta: The export's metadata (base model, dataset, recipe, loss, paths, run id).
        conf: The rendered torchtune config the run trained with ({} if it is missing).
        export_dir: The folder being written (its tokenizer decides the snippet's form).
        base_dir: The base model folder (its card's license is carried over).

    Returns:
        The card's text.
    """
    loss = meta.get("final_loss")
    revision = meta.get("base_model_revision")
    params = hyperparameters(conf, str(meta.get("recipe", "")))
    fmt, example = prompt_format(conf)
    chat = has_chat_template(export_dir)
    snippet = usage_snippet(str(meta["path"]), example, chat,
                            _get(conf, "dataset.new_system_prompt"))
    lines = [
        "---", _yaml(front_matter(meta, base_dir)).rstrip(), "---",
        f"# {Path(meta['path']).name}", "",
        f"Fine-tuned with torchtune ({meta['recipe']}, base config {meta['config']}) by the "
        f"kfp-finetune runtime `{meta['runtime']}`.", "",
        f"- base model: `{meta['base_model']}`" + (f" (revision `{revision}`)" if revision
                                                   else ""),
        f"- dataset: `{meta['dataset']}`",
        f"- final training loss: {loss:.4f}" if isinstance(loss, float) else "- final loss: n/a",
        f"- run: `{meta['run_id']}`",
    ]
    if isinstance(meta.get("inputs"), dict):
        lines.append(f"- trained on content: dataset `{meta['inputs'].get('dataset')}`, base "
                     f"model `{meta['inputs'].get('model')}`, config "
                     f"`{meta['inputs'].get('config')}` (kfp-finetune content digests)")
    lines += ["", "## Training hyperparameters", "", "| name | value |", "| --- | --- |"]
    lines += [f"| {k} | `{'none' if v is None else v}` |" for k, v in params.items()]
    lines += ["", "The full config is in `torchtune_config.yaml`.", "", "## Prompt format", "",
              fmt, "", "## Usage", "", "```python", snippet.rstrip(), "```"]
    if meta.get("adapter_path"):
        lines += _adapter_usage()
    return "\n".join(lines) + "\n"


def _adapter_usage() -> list[str]:
    return [
        "", "## LoRA adapter", "",
        f"This folder holds the merged model; the PEFT adapter alone is in `{ADAPTER_DIR}/` "
        "(its `adapter_config.json` names the base model it was trained on):", "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        f"model = AutoPeftModelForCausalLM.from_pretrained(path + \"/{ADAPTER_DIR}\")",
        "```", "",
        "peft >= 0.18 refuses torchao older than 0.16, and torchtune 0.6.1 needs torchao "
        "0.15: load the adapter in an environment without torchao (or with torchao >= 0.16), "
        "not in the training image.",
    ]
