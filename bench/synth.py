"""Synthetic benchmark inputs: alpaca-length data, word-level tokenizers, random-weight models.

Nothing is downloaded.

* **Data.** Rows ``(instruction, input, output)`` whose lengths are drawn like alpaca's
  (tatsu-lab/alpaca with a Llama-3 tokenizer: instruction median ~14 tokens, input empty in
  ~60 % of rows, output median ~85 tokens with a long tail; clipped at 80/400/900 tokens). The
  text is made of pseudo-words from a fixed 600-word list (Zipf-distributed), one token each.
* **Tokenizers.** The real Llama-3 / Qwen2.5 vocabularies are not downloadable here. We write a
  tokenizer of the real *kind* (tiktoken file for Llama 3, ``vocab.json`` + ``merges.txt`` for
  Qwen2.5) whose vocabulary holds the 256 bytes plus every prefix of every pre-tokenizer piece
  of the synthetic text and of the prompt templates, so each word (with its leading space)
  becomes one token, as common English words do with the real vocabularies. Token ids of text
  therefore lie below ~10 k; the special tokens keep their real ids (128000+ for Llama 3,
  151643+ for Qwen2.5) in real-shape models, and are renumbered after the vocabulary for tiny
  models. Throughput depends on sequence lengths and on the model's (real) vocabulary size,
  not on which ids occur.
* **Models.** torchtune's own builders (real shapes: ``llama3_2_1b``, ``qwen2_5_1_5b_instruct``;
  tiny: the component builders with ``fixtures.TINY_SHAPE``), random normal weights (std 0.02,
  norms 1), converted with torchtune's ``tune_to_hf`` / ``qwen2_tune_to_hf`` and saved as one
  ``model.safetensors`` with a ``config.json``.
"""

from __future__ import annotations

import base64
import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp_finetune.drivers.fixtures import bytes_to_unicode

MARKER = ".bench-complete"


@dataclass(frozen=True)
class ModelSpec:
    """A model the benchmarks can build.

    Attributes:
        name: Benchmark name, e.g. ``llama3.2-1b``.
        family: ``llama3_2`` or ``qwen2_5``.
        runtime: Our runtime that fine-tunes it.
        anchor_config: Kubeflow Trainer's torchtune config for the same model.
        tiny: Tiny shape (vocabulary sized to the synthetic tokenizer).
        shape: Hugging Face config values.
    """

    name: str
    family: str
    runtime: str
    anchor_config: str
    tiny: bool
    shape: dict[str, Any] = field(default_factory=dict)


def _tiny_shape() -> dict[str, Any]:
    from kfp_finetune.drivers.fixtures import TINY_SHAPE

    return dict(TINY_SHAPE)


SPECS: dict[str, ModelSpec] = {
    "llama3.2-1b": ModelSpec(
        "llama3.2-1b", "llama3_2", "torchtune-llama3.2-1b", "llama3_2/1B_full", False,
        {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128_256,
         "max_position_embeddings": 131_072},
    ),
    "qwen2.5-1.5b": ModelSpec(
        "qwen2.5-1.5b", "qwen2_5", "torchtune-qwen2.5-1.5b", "qwen2_5/1.5B_full", False,
        {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
         "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151_936,
         "max_position_embeddings": 32_768},
    ),
    "tiny-llama3.2": ModelSpec(
        "tiny-llama3.2", "llama3_2", "torchtune-llama3.2-tiny", "llama3_2/1B_full", True
    ),
    "tiny-qwen2.5": ModelSpec(
        "tiny-qwen2.5", "qwen2_5", "torchtune-qwen2.5-tiny", "qwen2_5/1.5B_full", True
    ),
}


# ----------------------------------------------------------------------------- data


def _pseudo_words(rng: random.Random, count: int) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvk"
    words: set[str] = set()
    while len(words) < count:
        n = max(1, min(12, int(rng.lognormvariate(math.log(5), 0.45))))
        words.add("".join(rng.choice(letters) for _ in range(n)))
    return sorted(words)


def _draw(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))


def alpaca_length_rows(rows: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows with alpaca-like field lengths (in tokens of the synthetic tokenizer)."""
    rng = random.Random(seed)
    words = _pseudo_words(rng, 600)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]

    def text(tokens: int) -> str:
        # One token per word; a sentence ends every ~12 words ("." is one more token).
        out: list[str] = []
        budget = tokens
        while budget > 0:
            n = min(budget, max(1, int(rng.expovariate(1 / 12))))
            out.append(" ".join(rng.choices(words, weights, k=n)))
            budget -= n
            if budget > 0:
                out[-1] += "."
                budget -= 1
        return " ".join(out)

    result = []
    for _ in range(rows):
        instruction = text(_draw(rng, 14, 0.5, 3, 80))
        inp = text(_draw(rng, 18, 0.9, 1, 400)) if rng.random() < 0.4 else ""
        output = text(_draw(rng, 85, 0.9, 1, 900))
        result.append({"instruction": instruction, "input": inp, "output": output})
    return result


def write_dataset(out: Path, rows: int, seed: int = 0) -> Path:
    """Write ``out/data/train-00000-of-00001.parquet`` (alpaca's layout); reused when complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"rows": rows, "seed": seed}
    if (out / MARKER).exists() and json.loads((out / MARKER).read_text()) == meta:
        return out
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(alpaca_length_rows(rows, seed)),
                   out / "data" / "train-00000-of-00001.parquet")
    (out / MARKER).write_text(json.dumps(meta))
    return out


def read_rows(dataset_dir: Path) -> list[dict[str, str]]:
    """The rows of a dataset written by ``write_dataset``."""
    import pyarrow.parquet as pq

    return pq.read_table(dataset_dir / "data" / "train-00000-of-00001.parquet").to_pylist()


# ----------------------------------------------------------------------------- tokenizers


def _template_texts(rows: list[dict[str, str]]) -> list[str]:
    """The texts a tokenizer sees: the rows as our builder and the anchor's render them."""
    from torchtune.data import AlpacaToMessages, InputOutputToMessages

    texts = ["system", "user", "assistant", "\n\n", "\n", "You are a helpful assistant."]
    alpaca, inout = AlpacaToMessages(), InputOutputToMessages()
    for row in rows[:200]:
        for transform in (alpaca, inout):
            for message in transform(row)["messages"]:
                texts.append(message.text_content)
    for row in rows:
        texts += [row["instruction"], row["input"], row["output"]]
    return texts


def _pieces(texts: list[str], pattern: str) -> list[bytes]:
    import regex

    pat = regex.compile(pattern)
    found: set[bytes] = set()
    for text in texts:
        for piece in pat.findall(text):
            found.add(piece.encode("utf-8"))
    return sorted(found)


def _prefix_vocab(pieces: list[bytes]) -> list[bytes]:
    """Every prefix (length >= 2) of every piece, shortest first: each piece encodes to 1 token.

    With byte-pair merges, the leftmost token of a piece is always a prefix and joining it
    with its right neighbour gives a longer prefix, so merging only stops at the whole piece.
    """
    prefixes = {p[:k] for p in pieces for k in range(2, len(p) + 1)}
    return sorted(prefixes, key=lambda b: (len(b), b))


def write_llama3_tokenizer(model_dir: Path, rows: list[dict[str, str]], tiny: bool) -> int:
    """Write ``original/tokenizer.model`` (tiktoken); for tiny models also ``tokenizer.json``.

    Returns:
        The vocabulary size the model needs (0 for real shapes: the real 128256 applies).
    """
    from torchtune.models.llama3._tokenizer import CL100K_PATTERN, LLAMA3_SPECIAL_TOKENS

    tokens = [bytes([b]) for b in range(256)] + _prefix_vocab(
        _pieces(_template_texts(rows), CL100K_PATTERN))
    (model_dir / "original").mkdir(parents=True, exist_ok=True)
    (model_dir / "original" / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    if not tiny:
        assert len(tokens) < min(LLAMA3_SPECIAL_TOKENS.values())
        return 0
    ordered = sorted(LLAMA3_SPECIAL_TOKENS, key=LLAMA3_SPECIAL_TOKENS.__getitem__)
    _write_special_tokens(model_dir, {name: len(tokens) + i for i, name in enumerate(ordered)})
    return len(tokens) + len(ordered)


def write_qwen2_5_tokenizer(model_dir: Path, rows: list[dict[str, str]], tiny: bool) -> int:
    """Write ``vocab.json`` + ``merges.txt``; for tiny models also ``tokenizer.json``.

    Returns:
        The vocabulary size the model needs (0 for real shapes: the real 151936 applies).
    """
    from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX
    from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

    table = bytes_to_unicode()

    def uni(b: bytes) -> str:
        return "".join(table[x] for x in b)

    prefixes = _prefix_vocab(_pieces(_template_texts(rows), PRETOKENIZE_REGEX))
    vocab = {table[b]: b for b in range(256)}
    for p in prefixes:
        vocab[uni(p)] = len(vocab)
    merges = [f"{uni(p[:i])} {uni(p[i:])}" for p in prefixes for i in range(1, len(p))]
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (model_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    if not tiny:
        assert len(vocab) < min(QWEN2_5_SPECIAL_TOKENS.values())
        return 0
    ordered = sorted(QWEN2_5_SPECIAL_TOKENS, key=QWEN2_5_SPECIAL_TOKENS.__getitem__)
    _write_special_tokens(model_dir, {name: len(vocab) + i for i, name in enumerate(ordered)})
    return len(vocab) + len(ordered)


def _write_special_tokens(model_dir: Path, ids: dict[str, int]) -> None:
    # torchtune's special_tokens_path format (a Hugging Face tokenizer.json's added_tokens).
    added = [{"id": i, "content": name, "special": True} for name, i in ids.items()]
    (model_dir / "tokenizer.json").write_text(json.dumps({"added_tokens": added}, indent=1))


# ----------------------------------------------------------------------------- models


def _random_state_dict(model: Any, seed: int, dtype: Any) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in model.state_dict().items():
        if "norm" in name:
            out[name] = torch.ones(tensor.shape, dtype=dtype)
        else:
            out[name] = (torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * 0.02
                         ).to(dtype)
    return out


def _llama_config(s: dict[str, Any], dtype: str, bos: int, eos: list[int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **s,
        "head_dim": s["hidden_size"] // s["num_attention_heads"], "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
        "initializer_range": 0.02, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": dtype, "use_cache": True,
    }


def _qwen_config(s: dict[str, Any], dtype: str, bos: int, eos: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **s,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "use_sliding_window": False,
        "sliding_window": s["max_position_embeddings"], "max_window_layers": s["num_hidden_layers"],
        "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": bos,
        "eos_token_id": eos, "torch_dtype": dtype, "use_cache": True,
    }


def build_model(spec: ModelSpec, out: Path, rows: list[dict[str, str]], seed: int = 0) -> Path:
    """Write a random-weight Hugging Face checkpoint of ``spec`` with a synthetic tokenizer.

    Reused when ``out`` already holds a complete one. Real shapes are built on the meta device
    and filled tensor by tensor (bf16), so a 1.5B model needs no full fp32 copy in memory.
    """
    import torch
    from safetensors.torch import save_file

    if (out / MARKER).exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    s = _tiny_shape() if spec.tiny else dict(spec.shape)
    dtype, dtype_name = (torch.float32, "float32") if spec.tiny else (torch.bfloat16, "bfloat16")
    if spec.family == "llama3_2":
        from torchtune.models.convert_weights import tune_to_hf
        from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS
        from torchtune.models.llama3_2 import llama3_2_1b
        from torchtune.models.llama3_2._component_builders import llama3_2

        vocab = write_llama3_tokenizer(out, rows, spec.tiny)
        with torch.device("meta"):
            if spec.tiny:
                s["vocab_size"] = vocab
                model = llama3_2(
                    vocab_size=vocab, num_layers=s["num_hidden_layers"],
                    num_heads=s["num_attention_heads"], num_kv_heads=s["num_key_value_heads"],
                    embed_dim=s["hidden_size"], max_seq_len=s["max_position_embeddings"],
                    intermediate_dim=s["intermediate_size"], tie_word_embeddings=True)
            else:
                model = llama3_2_1b()
        sd = tune_to_hf(_random_state_dict(model, seed, dtype), num_heads=s["num_attention_heads"],
                        num_kv_heads=s["num_key_value_heads"], dim=s["hidden_size"])
        if spec.tiny:
            ids = {t["content"]: t["id"] for t in
                   json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
        else:
            ids = dict(LLAMA3_SPECIAL_TOKENS)
        config = _llama_config(s, dtype_name, ids["<|begin_of_text|>"],
                               [ids["<|end_of_text|>"], ids["<|eot_id|>"]])
    else:
        from torchtune.models.qwen2._component_builders import qwen2
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf
        from torchtune.models.qwen2_5 import qwen2_5_1_5b_instruct
        from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

        vocab = write_qwen2_5_tokenizer(out, rows, spec.tiny)
        with torch.device("meta"):
            if spec.tiny:
                s["vocab_size"] = vocab
                model = qwen2(
                    vocab_size=vocab, num_layers=s["num_hidden_layers"],
                    num_heads=s["num_attention_heads"], num_kv_heads=s["num_key_value_heads"],
                    embed_dim=s["hidden_size"], intermediate_dim=s["intermediate_size"],
                    max_seq_len=s["max_position_embeddings"], norm_eps=1e-6,
                    tie_word_embeddings=True)
            else:
                model = qwen2_5_1_5b_instruct()
        sd = qwen2_tune_to_hf(_random_state_dict(model, seed, dtype),
                              num_heads=s["num_attention_heads"],
                              num_kv_heads=s["num_key_value_heads"], dim=s["hidden_size"],
                              tie_word_embeddings=True)
        if spec.tiny:
            ids = {t["content"]: t["id"] for t in
                   json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
        else:
            ids = dict(QWEN2_5_SPECIAL_TOKENS)
        config = _qwen_config(s, dtype_name, ids["<|endoftext|>"], ids["<|im_end|>"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / MARKER).write_text("ok\n")
    return out
