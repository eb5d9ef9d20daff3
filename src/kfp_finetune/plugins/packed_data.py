"""The dataset builder that feeds the pre-tokenized store to torchtune's recipes.

The fine-tune step's rendered config names :func:`pretokenized_dataset` as
``dataset._component_`` when the tokenize-dataset step left a store for this very config. The
recipe calls it as any dataset builder (``config.instantiate(cfg.dataset, tokenizer)``) and
gets items in the form torchtune's own datasets yield, without tokenizing anything:

* packed (``dataset.packed: true``, so the recipe collates with ``padded_collate_packed`` and
  builds the block-causal mask from ``seq_lens``): ``tokens``, ``labels``, ``input_pos``,
  ``seq_lens`` as ``torch.long`` tensors padded to ``max_seq_len``, as ``PackedDataset`` does;
* unpacked (``padded_collate_sft``): ``tokens``, ``mask`` and ``labels`` lists, as
  ``SFTDataset`` does.

The arrays are memory-mapped, so every rank of a distributed run shares one copy in the page
cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kfp_finetune.errors import DatasetError
from kfp_finetune.steps.token_store import IGNORE_INDEX, TokenStore
from kfp_finetune.storage.workspace import read_manifest


class PretokenizedRows(Dataset):
    """One sample per row, as ``torchtune.datasets.SFTDataset`` yields it."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return self.store.rows

    def __getitem__(self, index: int) -> dict[str, list]:
        tokens, labels = self.store.row(index)
        # SFTDataset: labels = where(mask, -100, tokens); token ids are never -100.
        return {"tokens": tokens.tolist(), "mask": (labels == IGNORE_INDEX).tolist(),
                "labels": labels.tolist()}


class PretokenizedPacks(Dataset):
    """One sample per pack, as ``torchtune.datasets.PackedDataset`` yields it."""

    def __init__(self, store: TokenStore, max_seq_len: int, padding_idx: int = 0) -> None:
        self.store = store
        self.max_seq_len = max_seq_len
        self.padding_idx = padding_idx

    def __len__(self) -> int:
        return self.store.num_packs

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pack = self.store.pack(index, self.max_seq_len, self.padding_idx)
        return {"tokens": torch.from_numpy(pack.tokens), "labels": torch.from_numpy(pack.labels),
                "input_pos": torch.from_numpy(pack.input_pos),
                "seq_lens": torch.from_numpy(pack.seq_lens)}


def pretokenized_dataset(
    tokenizer: Any,
    *,
    path: str,
    fingerprint: str,
    packed: bool = False,
    source_builder: str = "",
) -> PretokenizedRows | PretokenizedPacks:
    """Open the store the tokenize-dataset step wrote (a torchtune dataset builder).

    Args:
        tokenizer: The recipe's tokenizer (only its ``max_seq_len`` is checked).
        path: The store folder.
        fingerprint: The store fingerprint the fine-tune step matched against its config.
        packed: Whether the recipe packs (its collate function follows ``dataset.packed``).
        source_builder: The builder the store was tokenized with (shown in the saved config).

    Returns:
        A map-style dataset of packs or of rows.

    Raises:
        DatasetError: The store changed or does not match ``packed`` / ``max_seq_len``.
    """
    folder = Path(path)
    manifest = read_manifest(folder) or {}
    max_seq_len = getattr(tokenizer, "max_seq_len", None)
    problem = None
    if manifest.get("fingerprint") != fingerprint:
        problem = (f"its fingerprint is {manifest.get('fingerprint')!r}, the config expects "
                   f"{fingerprint!r}")
    elif bool(manifest.get("packed")) != bool(packed):
        problem = f"it was written with packed={manifest.get('packed')}, the config has {packed}"
    elif manifest.get("max_seq_len") != max_seq_len:
        problem = (f"it was cut to max_seq_len={manifest.get('max_seq_len')}, the tokenizer has "
                   f"{max_seq_len}")
    if problem is not None:
        raise DatasetError(
            f"the pre-tokenized dataset in {str(folder)!r} does not belong to this config "
            f"({problem}; tokenized with {source_builder or 'an unknown builder'}). Re-run the "
            "tokenize-dataset step, or remove the folder to let torchtune tokenize."
        )
    store = TokenStore(folder)
    if packed:
        return PretokenizedPacks(store, int(max_seq_len), int(manifest.get("padding_idx", 0)))
    return PretokenizedRows(store)
