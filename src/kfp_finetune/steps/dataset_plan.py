"""Checking the dataset against the preprocessing config and choosing the dataset builder.

Runs on CPU in the dataset step, so a typo in a column name never reaches a GPU node. The
choice is made from the data's columns:

* ``instruction`` + ``output`` (after ``column_map``): alpaca-style triplets, read with our
  ``alpaca_instruct_dataset``, which keeps the instruction (Kubeflow Trainer's runtimes drop it).
* ``input`` + ``output``: two-column data, read with torchtune's ``instruct_dataset``.
* ``messages`` (OpenAI style turns) or ``conversations`` (ShareGPT style), and no output
  column: chat data, read with torchtune's ``chat_dataset``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.config.types import DataFormat, TorchTuneInstructDataset
from kfp_finetune.config.validation import normalize_dataset
from kfp_finetune.errors import DatasetError, KfpFinetuneError
from kfp_finetune.steps.dataset_rows import check_rows, file_row_counts, locate
from kfp_finetune.storage.workspace import disk_error

EXTENSIONS = {
    DataFormat.PARQUET: (".parquet",),
    DataFormat.JSON: (".json", ".jsonl"),
    DataFormat.CSV: (".csv",),
    DataFormat.ARROW: (".arrow",),
    DataFormat.TEXT: (".txt",),
    DataFormat.XML: (".xml",),
}
ALPACA_BUILDER = "kfp_finetune.plugins.datasets.alpaca_instruct_dataset"
INSTRUCT_BUILDER = "torchtune.datasets.instruct_dataset"
CHAT_BUILDER = "torchtune.datasets.chat_dataset"


@dataclass(frozen=True)
class DatasetPlan:
    """How the fine-tune step reads the data.

    Attributes:
        builder: torchtune ``dataset._component_``.
        kind: ``"alpaca"``, ``"instruct"`` or ``"chat"``.
        source: ``datasets`` builder name.
        data_files: Absolute paths of the data files.
        split: Split expression.
        column_map: Column map to pass (None when the names already match).
        train_on_input: Whether the prompt counts in the loss.
        new_system_prompt: System prompt, or None.
        rows: Rows the split selects.
        columns: Columns of the data.
        conversation_column: Column of the conversations (chat data).
        conversation_style: ``openai`` or ``sharegpt`` (chat data).
    """

    builder: str
    kind: str
    source: str
    data_files: list[str]
    split: str
    column_map: dict[str, str] | None
    train_on_input: bool
    new_system_prompt: str | None
    rows: int
    columns: list[str]
    conversation_column: str | None = None
    conversation_style: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON."""
        return asdict(self)


def data_files(folder: Path, fmt: DataFormat) -> list[Path]:
    """Files of the declared format under ``folder``.

    Raises:
        DatasetError: There are none; the message lists what was found instead.
    """
    exts = EXTENSIONS[fmt]
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in exts
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        found = sorted(
            {p.suffix or p.name for p in folder.rglob("*") if p.is_file() and p.name[0] != "."}
        )
        raise DatasetError(
            f"source={fmt.value!r} but the dataset has no {'/'.join(exts)} files "
            f"(found: {', '.join(found) or 'nothing'}); set source to the files' format, "
            "e.g. source='json' for .jsonl files."
        )
    return files


def _chat_style(first_row: dict[str, Any], column: str) -> str:
    """``openai`` for [{role, content}], ``sharegpt`` for [{from, value}] conversations."""
    turns = first_row.get(column)
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        if {"role", "content"} <= set(turns[0]):
            return "openai"
        if {"from", "value"} <= set(turns[0]):
            return "sharegpt"
    raise DatasetError(
        f"column {column!r} holds no conversation: expected a list of "
        "{'role': ..., 'content': ...} (OpenAI style) or {'from': ..., 'value': ...} (ShareGPT "
        f"style) turns, found {str(turns)[:80]!r}."
    )


def _choose(
    columns: list[str], column_map: dict[str, str] | None, first_row: dict[str, Any]
) -> tuple[str, str, str | None, str | None]:
    """Choose how the data is read: (kind, builder, conversation column, conversation style)."""
    cmap = column_map or {}
    col = {key: cmap.get(key, key) for key in ("instruction", "input", "output")}
    missing_named = [f"{k}->{v}" for k, v in cmap.items() if v not in columns]
    if missing_named:
        raise DatasetError(
            f"column_map names columns that the dataset does not have: "
            f"{', '.join(missing_named)}; the dataset's columns are {columns}. Fix column_map."
        )
    if col["output"] not in columns:
        for key in ("messages", "conversations"):
            chat = cmap.get(key, key)
            if chat in columns:
                return "chat", CHAT_BUILDER, chat, _chat_style(first_row, chat)
        raise DatasetError(
            f"the dataset has no output column {col['output']!r} and no conversation column "
            f"('messages' or 'conversations') (columns: {columns}); map one with "
            "column_map={'output': '<your column>'} or {'messages': '<your column>'}."
        )
    if col["instruction"] in columns:
        return "alpaca", ALPACA_BUILDER, None, None
    if col["input"] in columns:
        return "instruct", INSTRUCT_BUILDER, None, None
    raise DatasetError(
        f"the dataset has neither an instruction column {col['instruction']!r} nor an input "
        f"column {col['input']!r} (columns: {columns}); map one with "
        "column_map={'input': '<your prompt column>'}."
    )


def _names(folder: Path, files: list[Path]) -> str:
    rel = [f.relative_to(folder).as_posix() for f in files[:3]]
    return str(rel) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")


def _all_empty(files: list[Path], fmt: DataFormat) -> bool:
    """Whether the files hold no rows (parquet: from the footer; others: empty files)."""
    try:
        if fmt is DataFormat.PARQUET:
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0
        return all(f.stat().st_size == 0 for f in files)
    except Exception:  # noqa: BLE001 - unreadable files are reported by the full read
        return False


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no detail"
    return line[:300]


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (``datasets`` wraps the reader's real error)."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _utf8_error(exc: BaseException) -> BaseException | None:
    """The exception of ``exc``'s chain that says the text is not UTF-8, or None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, UnicodeDecodeError) or "invalid utf8" in str(cur).lower():
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _disk_error(exc: BaseException, cache_dir: Path) -> BaseException | None:
    """A WorkspaceError when ``exc``'s chain holds a full or read-only disk, else None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        translated = disk_error(cur, cache_dir, "writing the dataset cache")
        if translated is not None:
            return translated
        cur = cur.__cause__ or cur.__context__
    return None


def _total_rows(fmt: DataFormat, files: list[Path], cache_dir: Path) -> int | None:
    """Rows of all data files together (the whole 'train' split), or None when unknown."""
    counts = file_row_counts(files, fmt.value)
    if counts is not None:
        return sum(counts)
    try:
        import datasets

        return len(datasets.load_dataset(fmt.value, data_files=[str(f) for f in files],
                                         split="train", cache_dir=str(cache_dir)))
    except Exception:  # noqa: BLE001 - only used to word the message
        return None


def _selects_nothing(split: str, total: int | None) -> DatasetError:
    of = f" of {total}" if total is not None else ""
    return DatasetError(
        f"split={split!r} selects 0{of} rows; widen the slice (e.g. 'train' or "
        "'train[:95%]'), or check the data files."
    )


def _split_start(split: str, total: int) -> int:
    """First row of the data files that the split expression selects."""
    import datasets

    try:
        return datasets.ReadInstruction.from_spec(split).to_absolute({"train": total})[0].from_
    except Exception:  # noqa: BLE001 - positions are then given within the split only
        return 0


def _not_utf8(fmt: DataFormat, names: str, exc: BaseException) -> DatasetError:
    return DatasetError(
        f"the {fmt.value} files {names} hold text that is not valid UTF-8 "
        f"({type(exc).__name__}: {_first_line(str(exc))}); re-encode them as UTF-8, e.g. "
        "`iconv -f latin1 -t utf-8 in.csv > out.csv`, then re-run the dataset step."
    )


def _check_every_row(ds: Any, kind: str, cfg: TorchTuneInstructDataset, chat_column: str | None,
                     style: str | None, folder: Path, files: list[Path]) -> None:
    """Types, nulls and empty text in every row the recipe reads (see ``dataset_rows``)."""
    cmap = cfg.column_map or {}
    cols = {key: cmap.get(key, key) for key in ("instruction", "input", "output")}
    cols["messages"] = chat_column or ""
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    table = getattr(ds.data, "table", ds.data)
    fmt = str(cfg.source.value if hasattr(cfg.source, "value") else cfg.source)
    counts = file_row_counts(files, fmt)
    start = _split_start(cfg.split, sum(counts)) if counts is not None else 0
    check_rows(table, kind, cols, style, lambda row: locate(row, start, counts, files, folder))


def _load_error(exc: BaseException, fmt: DataFormat, folder: Path, files: list[Path],
                split: str, cache_dir: Path) -> BaseException:
    """Our error for an exception of ``datasets.load_dataset``."""
    cause = _root_cause(exc)
    text = str(exc)
    full = _disk_error(exc, cache_dir)
    if full is not None:
        return full
    bad_text = _utf8_error(exc)
    if bad_text is not None:
        return _not_utf8(fmt, _names(folder, files), bad_text)
    if isinstance(exc, ValueError) and "corresponds to no data" in text \
            and split.split("[")[0] == "train":
        total = _total_rows(fmt, files, cache_dir)
        if total:
            return _selects_nothing(split, total)
        return DatasetError(
            f"the {fmt.value} files {_names(folder, files)} hold 0 rows (only blank lines "
            f"or a header), so split={split!r} selects nothing; check that the data "
            "files were written completely."
        )
    if isinstance(exc, ValueError) and ("split" in text.lower()
                                        or "corresponds to no data" in text):
        return DatasetError(
            f"split={split!r} selects nothing from the data files ({_first_line(text)}; "
            "they form one split named 'train'); use e.g. 'train' or 'train[:95%]'."
        )
    detail = cause if cause is not exc else exc
    return DatasetError(
        f"the {fmt.value} files {_names(folder, files)} could not be read "
        f"({type(detail).__name__}: {_first_line(str(detail))}); check that the files are "
        f"valid {fmt.value} and that source={fmt.value!r} is their format."
    )


def plan_dataset(
    folder: Path, cfg: TorchTuneInstructDataset, cache_dir: Path
) -> DatasetPlan:
    """Read the data with ``datasets``, check it against ``cfg``, and choose the builder.

    Args:
        folder: The dataset folder.
        cfg: The preprocessing config.
        cache_dir: Where ``datasets`` may cache arrow files.

    Returns:
        The plan for the fine-tune step.

    Raises:
        DatasetError: Wrong format, unreadable files, missing columns, bad or empty split.
    """
    import datasets

    from kfp_finetune.steps.model_check import check_no_lfs_pointers

    cfg = normalize_dataset(cfg)  # the SDK's class checks nothing itself
    fmt = DataFormat(cfg.source)
    files = data_files(folder, fmt)
    try:
        check_no_lfs_pointers(folder, [f.relative_to(folder).as_posix() for f in files])
    except KfpFinetuneError as exc:
        raise DatasetError(str(exc).replace("model file", "data file").replace(
            "the model step", "the dataset step")) from None
    if _all_empty(files, fmt):
        raise DatasetError(
            f"the dataset files {_names(folder, files)} hold 0 rows, so split={cfg.split!r} "
            "selects nothing; check that the data files were written completely."
        )
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(
            fmt.value,
            data_files=[str(f) for f in files],
            split=cfg.split,
            cache_dir=str(cache_dir),
        )
    except Exception as exc:  # datasets raises many types for unreadable files
        raise _load_error(exc, fmt, folder, files, cfg.split, cache_dir) from None
    columns = list(ds.column_names)
    if len(ds) == 0:
        raise _selects_nothing(cfg.split, _total_rows(fmt, files, cache_dir))
    try:
        # JSON readers accept invalid UTF-8 into string columns; it only fails when read.
        getattr(ds.data, "table", ds.data).validate(full=True)
        first_row = ds[0]
    except Exception as exc:  # noqa: BLE001 - pyarrow.ArrowInvalid or UnicodeDecodeError
        if _utf8_error(exc) is not None:
            raise _not_utf8(fmt, _names(folder, files), exc) from None
        raise DatasetError(
            f"the {fmt.value} files {_names(folder, files)} hold invalid data "
            f"({type(exc).__name__}: {_first_line(str(exc))}); check the files."
        ) from None
    kind, builder, conversation_column, conversation_style = _choose(
        columns, cfg.column_map, first_row
    )
    _check_every_row(ds, kind, cfg, conversation_column, conversation_style, folder, files)
    return DatasetPlan(
        builder=builder,
        kind=kind,
        source=fmt.value,
        data_files=[str(f) for f in files],
        split=cfg.split,
        column_map=cfg.column_map,
        train_on_input=bool(cfg.train_on_input),
        new_system_prompt=cfg.new_system_prompt,
        rows=len(ds),
        columns=columns,
        conversation_column=conversation_column,
        conversation_style=conversation_style,
    )
