"""Tokenizing every row with torchtune's own dataset, on all CPU cores, in row order.

Used by the tokenize-dataset step (``pretokenize``). Each worker process reads contiguous
shards of rows through the rendered config's dataset (built with ``packed=False``, so
``SFTDataset.__getitem__`` applies the message transform, prompt template, masking and
``max_seq_len`` truncation exactly as in the recipe) and writes them to part files; the parts
are joined in shard order, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kfp_finetune.steps.token_store import IGNORE_INDEX, TOKEN_DTYPE

Log = Callable[[str], None]
_SHARDS_PER_WORKER = 4  # smaller shards even out the workers' load
_MAX_SHARD_ROWS = 20_000  # a shard's rows are held as Python lists until written (~200 MB)


@dataclass
class TokenizeStats:
    """What tokenizing found, over every row.

    Attributes:
        rows: Rows tokenized.
        tokens: Tokens kept (after truncation).
        trainable_tokens: Tokens the loss counts (label not -100, the first of a row excepted,
            as the recipe shifts labels by one).
        rows_truncated: Rows longer than ``max_seq_len``, cut to it.
        tokens_lost: Tokens those rows lost.
        rows_without_loss: Rows with no token that counts in the loss (cut before the response).
        first_rows_without_loss: Indexes of the first few such rows.
    """

    rows: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    rows_truncated: int = 0
    tokens_lost: int = 0
    rows_without_loss: int = 0
    first_rows_without_loss: list[int] = field(default_factory=list)

    def add(self, other: TokenizeStats) -> None:
        """Add the figures of a later shard."""
        for name in ("rows", "tokens", "trainable_tokens", "rows_truncated", "tokens_lost",
                     "rows_without_loss"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first_rows_without_loss = (self.first_rows_without_loss
                                        + other.first_rows_without_loss)[:5]



def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU limit."""
    cpus = len(os.sched_getaffinity(0))
    for path, split in (("/sys/fs/cgroup/cpu.max", None),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/"
                                                                "cpu.cfs_period_us")):
        try:
            if split is None:
                quota, period = Path(path).read_text().split()[:2]
            else:
                quota, period = Path(path).read_text().strip(), Path(split).read_text().strip()
            if quota not in ("max", "-1"):
                return max(1, min(cpus, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError):
            continue
    return cpus


@dataclass
class Reader:
    """Per-process state: torchtune's dataset (unpacked) and a tokenizer that never cuts."""

    dataset: Any
    full_length: Any  # row -> untruncated tokenized sample
    max_seq_len: int | None
    out: Path


_READER: Reader | None = None  # set before the worker processes fork, inherited by them


def make_reader(conf: dict[str, Any], out: Path) -> Reader:
    """Build the rendered config's tokenizer and dataset (unpacked), writing parts to ``out``.

    Args:
        conf: The rendered torchtune config (``tokenizer`` and ``dataset`` sections).
        out: Folder for the part files.
    """
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune.datasets import SFTDataset
    from torchtune.datasets._sft import SFTTransform

    cfg = OmegaConf.create(conf)
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    dataset = tt_config.instantiate(OmegaConf.merge(cfg.dataset, {"packed": False}), tokenizer)
    assert isinstance(dataset, SFTDataset), type(dataset)
    # The same message transform with a copy of the tokenizer without max_seq_len tells how
    # long a cut row was (torchtune/datasets/_sft.py: SFTDataset.__getitem__ is
    # _prepare_sample(_data[i]); the tokenizers cut in tokenize_messages).
    whole = copy.copy(tokenizer)
    whole.max_seq_len = None
    transform = SFTTransform(message_transform=dataset._message_transform,
                             model_transform=whole)
    return Reader(dataset, lambda i: transform(dataset._data[i]), tokenizer.max_seq_len, out)


def _tokenize_shard(task: tuple[int, int, int]) -> tuple[int, TokenizeStats]:
    """Tokenize rows ``[start, end)`` into part files; return the shard index and figures."""
    index, start, end = task
    reader = _READER
    assert reader is not None
    stats = TokenizeStats()
    tokens: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    limit = reader.max_seq_len
    for row in range(start, end):
        sample = reader.dataset[row]
        toks, labs = sample["tokens"], sample["labels"]
        tokens.extend(toks)
        labels.extend(labs)
        lengths.append(len(toks))
        if limit and len(toks) >= limit:
            full = len(reader.full_length(row)["tokens"])
            if full > limit:
                stats.rows_truncated += 1
                stats.tokens_lost += full - limit
        trainable = sum(1 for label in labs[1:] if label != IGNORE_INDEX)
        stats.trainable_tokens += trainable
        if trainable == 0:
            stats.rows_without_loss += 1
            if len(stats.first_rows_without_loss) < 5:
                stats.first_rows_without_loss.append(row)
    stats.rows, stats.tokens = end - start, len(tokens)
    for suffix, values, dtype in (("tokens", tokens, TOKEN_DTYPE), ("labels", labels, TOKEN_DTYPE),
                                  ("lengths", lengths, np.int64)):
        np.save(reader.out / f"part-{index:05d}.{suffix}.npy", np.asarray(values, dtype=dtype))
    return index, stats


def _shards(rows: int, workers: int) -> list[tuple[int, int, int]]:
    wanted = max(workers * _SHARDS_PER_WORKER, math.ceil(rows / _MAX_SHARD_ROWS))
    count = max(1, min(rows, wanted))
    bounds = np.linspace(0, rows, count + 1).astype(int).tolist()
    return [(i, bounds[i], bounds[i + 1]) for i in range(count)]


def _progress(stats: TokenizeStats, shard: TokenizeStats, rows: int, start: float,
              workers: int, log: Log) -> None:
    """Add a finished shard; log about every tenth of the rows."""
    before = stats.rows * 10 // max(rows, 1)
    stats.add(shard)
    if stats.rows * 10 // max(rows, 1) > before:
        rate = stats.rows / max(time.monotonic() - start, 1e-9)
        log(f"[tokenize] {stats.rows}/{rows} rows ({rate:.0f} rows/s, {workers} worker(s))")


def tokenize_all(reader: Reader, workers: int, log: Log) -> tuple[TokenizeStats, int]:
    """Tokenize every row, ``workers`` processes over contiguous shards, in row order.

    Returns:
        The figures over all rows and the number of part files written (``part-NNNNN.*``).
    """
    global _READER
    rows = len(reader.dataset)
    tasks = _shards(rows, workers)
    stats = TokenizeStats()
    start = time.monotonic()
    _READER = reader
    try:
        if workers <= 1 or len(tasks) == 1:
            for _, shard in map(_tokenize_shard, tasks):
                _progress(stats, shard, rows, start, workers, log)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork: the workers inherit the dataset and tokenizer built above (as torch's
            # DataLoader workers do) instead of loading them again; a worker that dies (out
            # of memory) fails the step instead of hanging it.
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for _, shard in pool.map(_tokenize_shard, tasks):  # in order: deterministic
                    _progress(stats, shard, rows, start, workers, log)
    finally:
        _READER = None
    return stats, len(tasks)


