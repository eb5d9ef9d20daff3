"""The tokenize-dataset step: the store gives torchtune's own tensors, and cut rows are counted.

The reference everywhere is torchtune itself: the rendered config's dataset built by
``torchtune.config.instantiate`` (``SFTDataset`` / ``PackedDataset``, torchtune 0.6.1,
torchtune/datasets/_sft.py and _packed.py), iterated as the recipe's data loader would.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config as tt_config
from torchtune.data import padded_collate_packed, padded_collate_sft
from torchtune.datasets import PackedDataset

from kfp_finetune.config.runtimes import get_runtime
from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.errors import DatasetError
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.fine_tune import prepare_training, run_fine_tune
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.steps.token_store import TokenStore, pack_starts
from kfp_finetune.steps.tokenize_dataset import (
    BUILDER,
    TOKENIZED_DIR,
    pretokenized_conf,
    tokenize_dataset,
)
from kfp_finetune.steps.tune_config import resolve
from kfp_finetune.storage.workspace import Workspace

LLAMA, QWEN = "torchtune-llama3.2-tiny", "torchtune-qwen2.5-tiny"


def quiet(_message):
    pass


# ----------------------------------------------------------------------------- packing alone


class _Rows(torch.utils.data.Dataset):
    def __init__(self, lengths):
        self.rows = [{"tokens": list(range(1, n + 1)),
                      "labels": [-100] * (n // 2) + list(range(n // 2, n))} for n in lengths]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _store_from_rows(tmp_path, lengths, max_seq_len):
    rows = _Rows(lengths).rows
    lens = np.asarray(lengths, dtype=np.int64)
    np.save(tmp_path / "tokens.npy", np.concatenate(
        [np.asarray(r["tokens"], dtype=np.int32) for r in rows]))
    np.save(tmp_path / "labels.npy", np.concatenate(
        [np.asarray(r["labels"], dtype=np.int32) for r in rows]))
    np.save(tmp_path / "offsets.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
    np.save(tmp_path / "packs.npy", pack_starts(lens, max_seq_len))
    return TokenStore(tmp_path)


@pytest.mark.parametrize(
    "lengths",
    [[3, 3, 2, 5, 1, 8, 8, 7, 1], [8, 8, 8], [4, 4, 4, 4], [1], [2, 7, 1, 8, 2, 8, 6, 2, 2]],
    ids=["mixed", "full-rows", "exact-fit", "one-row", "tail"],
)
def test_packs_equal_torchtunes_packed_dataset(tmp_path, lengths):
    # torchtune/datasets/_packed.py PackedDataset._pack/_split_and_add_pack/_pad_pack: greedy
    # packing in order, a row never split (split_across_pack=False), padding 0 / -100, one
    # more seq_lens entry for the padding, padding positions continued and clamped.
    max_seq_len = 8
    reference = PackedDataset(_Rows(lengths), max_seq_len=max_seq_len)
    store = _store_from_rows(tmp_path, lengths, max_seq_len)
    assert store.num_packs == len(reference)
    for i in range(len(reference)):
        ours = store.pack(i, max_seq_len)
        for key in ("tokens", "labels", "input_pos", "seq_lens"):
            theirs = reference[i][key]
            mine = torch.from_numpy(getattr(ours, key))
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), (i, key)


def test_a_row_longer_than_the_pack_is_refused_as_torchtune_does():
    with pytest.raises(ValueError, match="too long"):
        PackedDataset(_Rows([3, 9]), max_seq_len=8)
    with pytest.raises(ValueError, match="too long"):
        pack_starts(np.asarray([3, 9]), 8)


# ----------------------------------------------------------------------------- whole step


def _qa_data(tmp_path):
    data = tmp_path / "qa"
    data.mkdir()
    rows = [{"question": f"What is {i} plus {i * 7}? Say it in words, please.",
             "answer": f"{i + i * 7}" + " exactly" * (i % 6 * 5)} for i in range(24)]
    pq.write_table(pa.Table.from_pylist(rows), data / "train.parquet")
    return str(data)


def _chat_data(tmp_path, style):
    data = tmp_path / f"chat-{style}"
    data.mkdir()
    with open(data / "train.jsonl", "w") as handle:
        for i in range(20):
            ask, answer = f"Count from {i} to {i + 3}, slowly.", " ".join(map(str, range(i, i + 4)))
            if style == "openai":
                row = {"messages": [{"role": "user", "content": ask},
                                    {"role": "assistant", "content": answer},
                                    {"role": "user", "content": "Again."},
                                    {"role": "assistant", "content": answer}]}
            else:
                row = {"conversations": [{"from": "human", "value": ask},
                                         {"from": "gpt", "value": answer}]}
            handle.write(json.dumps(row) + "\n")
    return str(data)


def _prepared(tmp_path, tiny, family, data_uri, config, runtime):
    ws = tmp_path / "ws"
    initialize_dataset(ws, data_uri, config.dataset_preprocess_config or
                       TorchTuneInstructDataset(), log=quiet)
    initialize_model(ws, str(tiny[family]), runtime, config, log=quiet)
    return ws


def _reference_and_ours(ws, runtime, config):
    """torchtune's dataset from the rendered config, and ours from the store."""
    rt = get_runtime(runtime)
    _, conf = prepare_training(Workspace.at(ws), rt, resolve(rt, config),
                               config.dataset_preprocess_config or TorchTuneInstructDataset())
    cfg = OmegaConf.create(conf)
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    reference = tt_config.instantiate(cfg.dataset, tokenizer)
    ours_conf = pretokenized_conf(Workspace.at(ws), conf, quiet)
    assert ours_conf is not None and ours_conf["_component_"] == BUILDER
    ours = tt_config.instantiate(OmegaConf.create(ours_conf), tokenizer)
    return reference, ours, tokenizer


def _assert_identical(reference, ours, tokenizer, packed):
    assert len(ours) == len(reference) > 0
    for i in range(len(reference)):
        theirs, mine = reference[i], ours[i]
        keys = ("tokens", "labels", "input_pos", "seq_lens") if packed else ("tokens", "labels",
                                                                             "mask")
        for key in keys:
            if packed:
                assert mine[key].dtype == theirs[key].dtype, (i, key)
                assert torch.equal(mine[key], theirs[key]), (i, key)
            else:
                assert [int(x) for x in mine[key]] == [int(x) for x in theirs[key]], (i, key)
    # What the recipe's data loader hands the model: the collated batches.
    batch = [reference[i] for i in range(min(4, len(reference)))]
    mine = [ours[i] for i in range(len(batch))]
    if packed:
        a, b = padded_collate_packed(batch), padded_collate_packed(mine)
    else:
        a = padded_collate_sft(batch, padding_idx=tokenizer.pad_id)
        b = padded_collate_sft(mine, padding_idx=tokenizer.pad_id)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key


CASES = {
    # name: (family, runtime, data, packed, max_seq_len, train_on_input, column_map, prompt,
    #        workers). Row lengths: alpaca 182-260 tokens, qa 68-270, openai 87-97, sharegpt
    # 58-64 (byte-level fixture tokenizers); "-cut" cases cut some rows.
    "alpaca-packed-masked": ("llama3_2", LLAMA, "alpaca", True, 512, False, None, None, 2),
    "alpaca-rows-train-on-input-cut": ("llama3_2", LLAMA, "alpaca", False, 200, True, None,
                                       "Answer briefly.", 1),
    "alpaca-rows-no-limit": ("qwen2_5", QWEN, "alpaca", False, None, False, None, None, 1),
    "instruct-column-map-packed-cut": ("llama3_2", LLAMA, "qa", True, 160, False,
                                       {"input": "question", "output": "answer"}, "Be exact.",
                                       2),
    "instruct-column-map-rows-train-on-input-cut": ("qwen2_5", QWEN, "qa", False, 80, True,
                                                    {"input": "question", "output": "answer"},
                                                    None, 1),
    "chat-openai-packed-cut": ("qwen2_5", QWEN, "openai", True, 90, False, None, "You count.", 2),
    "chat-sharegpt-rows-train-on-input-cut": ("llama3_2", LLAMA, "sharegpt", False, 60, True,
                                              None, None, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_store_gives_torchtunes_own_tensors(tiny, tmp_path, case):
    family, runtime, data, packed, max_seq_len, on_input, cmap, prompt, workers = CASES[case]
    uri = {"alpaca": f"{tiny['alpaca']}/data", "qa": None}.get(data)
    uri = uri or (_qa_data(tmp_path) if data == "qa" else _chat_data(tmp_path, data))
    source = "json" if data in ("openai", "sharegpt") else "parquet"
    config = TorchTuneConfig(
        max_seq_len=max_seq_len, packed=packed,
        dataset_preprocess_config=TorchTuneInstructDataset(
            source=source, train_on_input=on_input, column_map=cmap, new_system_prompt=prompt))
    ws = _prepared(tmp_path, tiny, family, uri, config, runtime)
    summary = tokenize_dataset(ws, runtime, config, log=quiet, workers=workers)
    assert not summary.skipped and summary.reason == "" and summary.workers == workers
    reference, ours, tokenizer = _reference_and_ours(ws, runtime, config)
    _assert_identical(reference, ours, tokenizer, packed)
    if max_seq_len and case.endswith("-cut"):
        assert summary.stats.rows_truncated > 0, "the case must exercise truncation"


def test_cut_rows_and_lost_tokens_are_counted_and_reported(tiny, tmp_path):
    limit = 240
    config = TorchTuneConfig(max_seq_len=limit,
                             dataset_preprocess_config=TorchTuneInstructDataset(
                                 train_on_input=True))
    ws = _prepared(tmp_path, tiny, "llama3_2", f"{tiny['alpaca']}/data", config, LLAMA)
    lines = []
    summary = tokenize_dataset(ws, LLAMA, config, log=lines.append, workers=2)
    # Oracle: torchtune's own dataset with a tokenizer that has no max_seq_len.
    rt = get_runtime(LLAMA)
    _, conf = prepare_training(Workspace.at(ws), rt, resolve(rt, config),
                               config.dataset_preprocess_config)
    cfg = OmegaConf.create(conf)
    whole = tt_config.instantiate(OmegaConf.merge(cfg.tokenizer, {"max_seq_len": None}))
    full = [len(row["tokens"]) for row in tt_config.instantiate(cfg.dataset, whole)]
    cut = [n for n in full if n > limit]
    assert 0 < len(cut) < len(full), "the fixture must have rows on both sides of the limit"
    assert summary.stats.rows == len(full) == 64
    assert summary.stats.rows_truncated == len(cut)
    assert summary.stats.tokens_lost == sum(n - limit for n in cut) > 0
    assert summary.stats.tokens == sum(min(n, limit) for n in full)
    metrics = summary.ui_metrics()
    assert metrics["rows_truncated"] == len(cut)
    assert metrics["tokens_lost"] == sum(n - limit for n in cut)
    assert any(f"cut {len(cut)} rows" in line for line in lines), lines
    # A re-run with the same inputs finds the store and keeps the figures.
    again = tokenize_dataset(ws, LLAMA, config, log=quiet)
    assert again.skipped and again.stats.rows_truncated == len(cut)


def test_no_response_left_fails_on_cpu_and_installs_nothing(tiny, tmp_path):
    config = TorchTuneConfig(max_seq_len=64)
    ws = _prepared(tmp_path, tiny, "llama3_2", f"{tiny['alpaca']}/data", config, LLAMA)
    with pytest.raises(DatasetError, match="max_seq_len=64 cuts every one of the 64 rows"):
        tokenize_dataset(ws, LLAMA, config, log=quiet, workers=1)
    assert not (ws / TOKENIZED_DIR).exists()
    assert not list((ws / ".staging").glob(f"{TOKENIZED_DIR}-*"))


def test_a_store_of_another_config_is_not_used(tiny, tmp_path):
    config = TorchTuneConfig(max_seq_len=512, packed=True)
    ws = _prepared(tmp_path, tiny, "llama3_2", f"{tiny['alpaca']}/data", config, LLAMA)
    tokenize_dataset(ws, LLAMA, config, log=quiet, workers=1)
    other = TorchTuneConfig(max_seq_len=300, packed=True)
    rt = get_runtime(LLAMA)
    _, conf = prepare_training(Workspace.at(ws), rt, resolve(rt, other),
                               TorchTuneInstructDataset())
    lines = []
    assert pretokenized_conf(Workspace.at(ws), conf, lines.append) is None
    assert "made for another config" in lines[0] and "torchtune tokenizes" in lines[0]
    # The builder itself refuses a store whose fingerprint is not the one it was given.
    _, same = prepare_training(Workspace.at(ws), rt, resolve(rt, config),
                               TorchTuneInstructDataset())
    good = pretokenized_conf(Workspace.at(ws), same, quiet)
    bad = OmegaConf.create({**good, "fingerprint": "0" * 16})
    tokenizer = tt_config.instantiate(OmegaConf.create(same).tokenizer)
    with pytest.raises(DatasetError, match="does not belong to this config"):
        tt_config.instantiate(bad, tokenizer)


@pytest.mark.slow
def test_training_on_the_store_gives_the_same_losses(tiny, tmp_path):
    # Same seed, same data: the recipe must see the same batches through either feed.
    config = TorchTuneConfig(epochs=1, max_seq_len=512, packed=True, batch_size=2)
    losses = {}
    for name, pretokenize in (("torchtune", False), ("store", True)):
        ws = _prepared(tmp_path / name, tiny, "llama3_2", f"{tiny['alpaca']}/data", config,
                       LLAMA)
        if pretokenize:
            tokenize_dataset(ws, LLAMA, config, log=quiet)
        lines = []
        result = run_fine_tune(ws, LLAMA, config, log=lines.append)
        used = (ws / "output" / "checkpoints" / "torchtune_config.yaml").read_text()
        assert (BUILDER in used) == pretokenize, lines[:5]
        losses[name] = [loss for _, loss in result.losses]
    assert len(losses["store"]) > 2
    assert losses["store"] == losses["torchtune"]
