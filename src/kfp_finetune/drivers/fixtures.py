"""Tiny, self-made fixtures: Hugging Face checkpoints and an alpaca-style dataset.

Nothing is downloaded. The models have the real Llama 3.2 and Qwen2.5 architectures, built with
torchtune's own builders and converted to the Hugging Face layout with torchtune's converters,
so the same code paths as for the real checkpoints run. The byte-level tokenizers keep the
vocabulary at 512 tokens, so a CPU training step takes milliseconds.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

VOCAB_SIZE = 512
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
_MARKER = ".fixture-complete"
_WRITING = ".fixture-writing"  # written first: proves a half-made fixture folder is ours


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table that byte-level BPE vocabularies use."""
    # The GPT-2 byte-to-printable-character table that byte-level BPE vocabularies use.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _special_ids(names_by_real_id: dict[str, int]) -> dict[str, int]:
    ordered = sorted(names_by_real_id, key=names_by_real_id.__getitem__)
    return {name: 256 + i for i, name in enumerate(ordered)}


def _write_hf_tokenizer_json(path: Path, specials: dict[str, int]) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    ordered = sorted(specials, key=specials.__getitem__)
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in ordered])
    tok.save(str(path))
    added = {t["content"]: t["id"] for t in json.loads(path.read_text())["added_tokens"]}
    assert added == specials, "tokenizers assigned unexpected special-token ids"


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def _save_weights(state_dict: dict[str, torch.Tensor], out: Path) -> None:
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _fresh_dir(out: Path) -> Path | None:
    """Return None when a complete fixture is already at ``out``; else an empty folder.

    Raises:
        WorkspaceError: ``out`` holds files that no fixture run wrote (they are kept).
    """
    from kfp_finetune.storage.ownership import remove_owned

    if (out / _MARKER).exists():
        return None
    remove_owned(out, proofs=(_WRITING,))  # a half-made fixture, or an empty folder
    out.mkdir(parents=True)
    (out / _WRITING).write_text("")
    return out


def _finish(out: Path) -> None:
    (out / _MARKER).write_text("ok\n")
    (out / _WRITING).unlink(missing_ok=True)


def make_tiny_llama3_2(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny Llama-3.2-architecture Hugging Face checkpoint.

    Args:
        out: Folder to write (replaced unless it already holds a complete fixture).
        seed: Seed of the random weights.

    Returns:
        The folder: config.json, generation_config.json, model.safetensors,
        original/tokenizer.model (tiktoken), tokenizer.json, tokenizer_config.json.
    """
    from torchtune.models.convert_weights import tune_to_hf
    from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS
    from torchtune.models.llama3_2._component_builders import llama3_2

    out = Path(out)
    if _fresh_dir(out) is None:
        return out
    s = TINY_SHAPE
    specials = _special_ids(LLAMA3_SPECIAL_TOKENS)
    model = llama3_2(
        vocab_size=VOCAB_SIZE,
        num_layers=s["num_hidden_layers"],
        num_heads=s["num_attention_heads"],
        num_kv_heads=s["num_key_value_heads"],
        embed_dim=s["hidden_size"],
        max_seq_len=s["max_position_embeddings"],
        intermediate_dim=s["intermediate_size"],
        tie_word_embeddings=True,
    )
    _init_weights(model, seed)
    hf_sd = tune_to_hf(
        model.state_dict(),
        num_heads=s["num_attention_heads"],
        num_kv_heads=s["num_key_value_heads"],
        dim=s["hidden_size"],
    )
    _save_weights(hf_sd, out)
    bos, eos, eot = (specials[t] for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"))
    _write_json(out / "config.json", _llama3_2_config(bos, [eos, eot]))
    _write_json(
        out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": [eos, eot]}
    )
    (out / "original").mkdir()
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (out / "original" / "tokenizer.model").write_text("\n".join(lines) + "\n")
    _write_hf_tokenizer_json(out / "tokenizer.json", specials)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "pad_token": "<|finetune_right_pad_id|>",
            "model_max_length": s["max_position_embeddings"],
        },
    )
    _finish(out)
    return out

def _llama3_2_config(bos: int, eos: list[int]) -> dict:
    """config.json of the tiny Llama 3.2 checkpoint (the real family's rope scaling)."""
    s = TINY_SHAPE
    return (
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": VOCAB_SIZE,
            **s,
            "head_dim": s["hidden_size"] // s["num_attention_heads"],
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "tie_word_embeddings": True,
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": "float32",
            "use_cache": True,
        }
    )


def make_tiny_qwen2_5(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-architecture Hugging Face checkpoint.

    Args:
        out: Folder to write (replaced unless it already holds a complete fixture).
        seed: Seed of the random weights.

    Returns:
        The folder: config.json, generation_config.json, model.safetensors, vocab.json,
        merges.txt, tokenizer.json, tokenizer_config.json.
    """
    from torchtune.models.qwen2._component_builders import qwen2
    from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf
    from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

    out = Path(out)
    if _fresh_dir(out) is None:
        return out
    s = TINY_SHAPE
    specials = _special_ids(QWEN2_5_SPECIAL_TOKENS)
    model = qwen2(
        vocab_size=VOCAB_SIZE,
        num_layers=s["num_hidden_layers"],
        num_heads=s["num_attention_heads"],
        num_kv_heads=s["num_key_value_heads"],
        embed_dim=s["hidden_size"],
        intermediate_dim=s["intermediate_size"],
        max_seq_len=s["max_position_embeddings"],
        norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    _init_weights(model, seed)
    hf_sd = qwen2_tune_to_hf(
        model.state_dict(),
        num_heads=s["num_attention_heads"],
        num_kv_heads=s["num_key_value_heads"],
        dim=s["hidden_size"],
        tie_word_embeddings=True,
    )
    _save_weights(hf_sd, out)
    eot, im_end = specials["<|endoftext|>"], specials["<|im_end|>"]
    _write_json(
        out / "config.json",
        {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": VOCAB_SIZE,
            **s,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "sliding_window": s["max_position_embeddings"],
            "max_window_layers": s["num_hidden_layers"],
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": eot,
            "eos_token_id": im_end,
            "torch_dtype": "float32",
            "use_cache": True,
        },
    )
    _write_json(out / "generation_config.json", {"bos_token_id": eot, "eos_token_id": im_end})
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    _write_json(out / "vocab.json", vocab)
    (out / "merges.txt").write_text("#version: 0.2\n")
    _write_hf_tokenizer_json(out / "tokenizer.json", specials)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": s["max_position_embeddings"],
        },
    )
    _finish(out)
    return out


# A fixed mapping that a 2-layer model can learn in a few epochs, so tests can see the loss fall.
_FACTS = [
    ("Name the colour of the sky.", "", "Blue."),
    ("Translate to French.", "cat", "chat"),
    ("Add the numbers.", "2 + 3", "5"),
    ("Give the opposite word.", "hot", "cold"),
    ("Spell the word backwards.", "abc", "cba"),
    ("Name the capital.", "Italy", "Rome"),
    ("Say hello politely.", "", "Hello, nice to meet you."),
    ("Count to three.", "", "1, 2, 3"),
]


def alpaca_rows(rows: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-style rows (instruction, input, output) cycling through a fixed mapping."""
    rng = random.Random(seed)
    order = [_FACTS[i % len(_FACTS)] for i in range(rows)]
    rng.shuffle(order)
    return [{"instruction": i, "input": x, "output": o} for i, x, o in order]


def make_alpaca_parquet(out: str | Path, rows: int = 64, seed: int = 0) -> Path:
    """Write a small alpaca-style dataset as ``out/data/train-00000-of-00001.parquet``.

    The layout mirrors ``hf://tatsu-lab/alpaca``, so ``<out>/data`` is a directory URI and the
    parquet file a single-file URI.

    Args:
        out: Folder to write (replaced unless it already holds a complete fixture).
        rows: Number of rows.
        seed: Shuffle seed.

    Returns:
        The folder.
    """
    out = Path(out)
    if _fresh_dir(out) is None:
        return out
    data = out / "data"
    data.mkdir()
    table = pa.Table.from_pylist(alpaca_rows(rows, seed))
    pq.write_table(table, data / "train-00000-of-00001.parquet")
    _finish(out)
    return out


def make_fixtures(root: str | Path) -> dict[str, Path]:
    """Write every fixture under ``root`` (skipping complete ones) and return their folders.

    Args:
        root: Parent folder.

    Returns:
        ``{"llama3_2": ..., "qwen2_5": ..., "alpaca": ...}``.
    """
    from kfp_finetune.drivers.compile import writable_output

    root = Path(root)
    with writable_output(root, "the fixtures", "`kfp-finetune fixtures DIR`"):
        return {
            "llama3_2": make_tiny_llama3_2(root / "models" / "tiny-llama3_2"),
            "qwen2_5": make_tiny_qwen2_5(root / "models" / "tiny-qwen2_5"),
            "alpaca": make_alpaca_parquet(root / "datasets" / "tiny-alpaca"),
        }
