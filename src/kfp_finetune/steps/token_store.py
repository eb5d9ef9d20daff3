"""The pre-tokenized dataset on the volume: layout, packing plan and memory-mapped reads.

One store serves both modes of torchtune's recipes::

    <workspace>/tokenized/
        tokens.npy     int32, every row's token ids, rows one after another
        labels.npy     int32, the rows' labels (-100 where the loss ignores the token)
        offsets.npy    int64, rows + 1 entries: row i is tokens[offsets[i]:offsets[i + 1]]
        packs.npy      int64, packs + 1 entries: pack p holds rows packs[p]..packs[p + 1] - 1
                       (only when packing is on)
        .kfp-finetune.json   the manifest, written last

Packs are not stored padded: a pack is a run of consecutive rows, so its padded ``tokens``,
``labels``, ``input_pos`` and ``seq_lens`` are rebuilt from the rows in microseconds, exactly
as torchtune's ``PackedDataset._pad_pack`` pads them. Only numpy is needed here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKENS = "tokens.npy"
LABELS = "labels.npy"
OFFSETS = "offsets.npy"
PACKS = "packs.npy"
IGNORE_INDEX = -100  # torchtune.data.CROSS_ENTROPY_IGNORE_IDX
TOKEN_DTYPE = np.int32  # the largest vocabulary we run (Qwen2.5, 151,936 ids) fits


def pack_starts(lengths: np.ndarray, max_seq_len: int) -> np.ndarray:
    """First row of every pack, plus ``len(lengths)`` at the end.

    The greedy plan of torchtune 0.6.1's ``PackedDataset._pack`` with
    ``split_across_pack=False`` and no ``max_packs`` (torchtune/datasets/_packed.py): rows are
    appended in order; a row that would overflow ``max_seq_len`` closes the current pack and
    starts the next one; the last, partial pack is kept.

    Args:
        lengths: Token count of every row, in dataset order.
        max_seq_len: Length packs are filled to.

    Raises:
        ValueError: A row is longer than ``max_seq_len`` (torchtune raises the same).
    """
    starts = [0]
    current = 0
    for row, length in enumerate(lengths.tolist()):
        if length > max_seq_len:
            raise ValueError(
                f"Dataset sample is too long ({length} > {max_seq_len}). "
                "Please set `split_across_pack=True` or increase `max_seq_len`."
            )
        if current + length > max_seq_len:
            starts.append(row)
            current = length
        else:
            current += length
    if current == 0:  # nothing after the last start: no final pack (torchtune adds none)
        starts.pop()
    starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


def concatenate(parts: Iterable[Path], out: Path, total: int, dtype: type) -> None:
    """Write the 1-D arrays saved in ``parts``, in order, as one ``.npy`` of ``total`` items.

    Streams through a memory map, so memory stays at one part's size; each part is deleted
    once copied.
    """
    target = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=(total,))
    at = 0
    for part in parts:
        chunk = np.load(part)
        target[at:at + len(chunk)] = chunk
        at += len(chunk)
        part.unlink()
    if at != total:
        raise ValueError(f"{out.name}: wrote {at} items, expected {total}")
    target.flush()
    del target


@dataclass(frozen=True)
class PackView:
    """One pack rebuilt from the store: numpy arrays as ``PackedDataset`` pads them."""

    tokens: np.ndarray
    labels: np.ndarray
    input_pos: np.ndarray
    seq_lens: np.ndarray


class TokenStore:
    """Read-only, memory-mapped view of a store folder.

    Args:
        folder: The store folder.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.tokens = np.load(self.folder / TOKENS, mmap_mode="r")
        self.labels = np.load(self.folder / LABELS, mmap_mode="r")
        self.offsets = np.load(self.folder / OFFSETS, mmap_mode="r")
        packs = self.folder / PACKS
        self.packs = np.load(packs, mmap_mode="r") if packs.is_file() else None

    @property
    def rows(self) -> int:
        """Number of rows (samples)."""
        return len(self.offsets) - 1

    @property
    def num_packs(self) -> int:
        """Number of packs (0 when the store was written without packing)."""
        return 0 if self.packs is None else len(self.packs) - 1

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and labels of one row (int32 arrays)."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.tokens[start:end], self.labels[start:end]

    def pack(self, index: int, max_seq_len: int, padding_idx: int = 0) -> PackView:
        """One pack, padded to ``max_seq_len`` as ``PackedDataset._pad_pack`` does.

        Tokens are padded with ``padding_idx``, labels with -100; ``seq_lens`` gets one more
        entry for the padding; the padding's positions continue from the last token's and are
        clamped to ``max_seq_len - 1`` (torchtune/datasets/_packed.py).
        """
        assert self.packs is not None, "the store was written without packing"
        first, last = int(self.packs[index]), int(self.packs[index + 1])
        start, end = int(self.offsets[first]), int(self.offsets[last])
        lengths = np.diff(self.offsets[first:last + 1]).astype(np.int64)
        used = end - start
        pad = max_seq_len - used
        tokens = np.full(max_seq_len, padding_idx, dtype=np.int64)
        tokens[:used] = self.tokens[start:end]
        labels = np.full(max_seq_len, IGNORE_INDEX, dtype=np.int64)
        labels[:used] = self.labels[start:end]
        # Position within its own row: 0..len-1 for every row of the pack.
        row_starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = np.arange(used, dtype=np.int64) - row_starts
        following = np.arange(positions[-1] + 1, positions[-1] + pad + 1, dtype=np.int64)
        input_pos = np.concatenate([positions, np.clip(following, 0, max_seq_len - 1)])
        seq_lens = np.concatenate([lengths, [pad]]) if pad > 0 else lengths
        return PackView(tokens, labels, input_pos, seq_lens.astype(np.int64))
