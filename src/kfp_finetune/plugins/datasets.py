"""Dataset builders used in the rendered torchtune config.

torchtune's ``alpaca_dataset`` has no ``new_system_prompt`` and Kubeflow Trainer's runtimes feed
alpaca triplets to ``instruct_dataset``, which silently drops the ``instruction`` column. This
builder keeps all three columns, uses the original alpaca prompt, and prepends a system message
when asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torchtune.data import AlpacaToMessages, Message
from torchtune.datasets import PackedDataset, SFTDataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer


class AlpacaWithSystemPrompt(AlpacaToMessages):
    """``AlpacaToMessages`` that can prepend a system message to every sample."""

    def __init__(
        self,
        train_on_input: bool,
        column_map: dict[str, str] | None,
        new_system_prompt: str | None,
    ) -> None:
        super().__init__(train_on_input=train_on_input, column_map=column_map)
        self.new_system_prompt = new_system_prompt

    def __call__(self, sample: Mapping[str, Any]) -> Mapping[str, Any]:
        """Turn one row into the user and assistant messages (and the system message)."""
        messages = super().__call__(sample)["messages"]
        if self.new_system_prompt:
            messages = [
                Message(role="system", content=self.new_system_prompt, masked=True, eot=True),
                *messages,
            ]
        return {"messages": messages}


def alpaca_instruct_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str,
    column_map: dict[str, str] | None = None,
    train_on_input: bool = False,
    new_system_prompt: str | None = None,
    packed: bool = False,
    split: str = "train",
    **load_dataset_kwargs: Any,
) -> SFTDataset | PackedDataset:
    """Alpaca-style (instruction, input, output) data with every column kept.

    Args:
        tokenizer: The model's tokenizer.
        source: ``datasets`` builder name (``parquet``, ``json``, ``csv``, ``arrow``).
        column_map: Maps ``instruction``, ``input``, ``output`` to the data's column names.
        train_on_input: Whether the prompt counts in the loss.
        new_system_prompt: System message prepended to every sample, or None.
        packed: Pack samples to the tokenizer's ``max_seq_len``.
        split: Split expression, e.g. ``train[:95%]``.
        **load_dataset_kwargs: Passed to ``datasets.load_dataset`` (``data_files``, ...).

    Returns:
        The tokenized dataset.
    """
    transform = AlpacaWithSystemPrompt(train_on_input, column_map, new_system_prompt)
    ds = SFTDataset(
        source=source,
        message_transform=transform,
        model_transform=tokenizer,
        split=split,
        **load_dataset_kwargs,
    )
    if packed:
        if tokenizer.max_seq_len is None:
            raise ValueError("packed=True needs tokenizer.max_seq_len to be set.")
        return PackedDataset(ds, max_seq_len=tokenizer.max_seq_len)
    return ds
