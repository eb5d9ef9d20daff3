"""Checking every row the recipe will read: types per column, nulls and empty text.

Runs in the dataset step on CPU, vectorised with pyarrow over the split that ``datasets``
loaded (the same rows torchtune's ``SFTDataset`` reads), so a null or a number in a text
column is reported with its row, column and file instead of failing inside ``tune run``:

* alpaca data (``AlpacaToMessages``, torchtune/data/_messages.py): ``instruction`` and
  ``output`` are message text; ``input`` is optional (``if key_input in sample and
  sample[key_input]``), so null or empty is fine there;
* instruct data (``InputOutputToMessages``): ``input`` and ``output`` become message
  content as they are;
* chat data (``OpenAIToMessages`` / ``ShareGPTToMessages``): every turn needs a role and
  text content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfp_finetune.errors import DatasetError


def _is_text(type_: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def file_row_counts(files: list[Path], fmt: str) -> list[int] | None:
    """Rows per data file (footer or a fast pyarrow read), or None when not known cheaply."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return [pq.ParquetFile(f).metadata.num_rows for f in files]
        if fmt == "json" and all(f.suffix.lower() == ".jsonl" for f in files):
            return [sum(1 for line in f.open("rb") if line.strip()) for f in files]
        if fmt == "csv":
            import pyarrow.csv as pcsv

            return [pcsv.read_csv(f).num_rows for f in files]
    except Exception:  # noqa: BLE001 - the position is then given within the split only
        return None
    return None


def locate(index: int, split_start: int, counts: list[int] | None,
           files: list[Path], folder: Path) -> str:
    """Where row ``index`` of the split lies: file and row (0-based) within that file."""
    absolute = split_start + index
    if counts is not None:
        for path, count in zip(files, counts, strict=False):
            if absolute < count:
                return f"file {path.relative_to(folder).as_posix()!r}, row {absolute}"
            absolute -= count
    names = ", ".join(repr(f.relative_to(folder).as_posix()) for f in files[:3])
    return f"one of the files {names}"


def _first_bad(mask: Any, null_is_bad: bool = True) -> int | None:
    import pyarrow.compute as pc

    hits = pc.indices_nonzero(pc.fill_null(mask, null_is_bad))
    return int(hits[0].as_py()) if len(hits) else None


def _text_problem(table: Any, column: str, required: bool) -> tuple[int, str] | None:
    """(row, what is wrong) for the first bad value of a text column, or None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(column)
    if not required:
        return None  # AlpacaToMessages skips a null or empty input; any other value is formatted
    if col.null_count == len(col):
        return (0, "is null in every row") if len(col) else None
    if isinstance(col.type, pa.BaseExtensionType) and _is_text(col.type.storage_type):
        # Mixed JSON values arrive as JSON text (``arrow.json``): strings start with '"'.
        storage = pa.chunked_array([c.storage for c in col.chunks], col.type.storage_type)
        i = _first_bad(pc.invert(pc.starts_with(pc.utf8_ltrim_whitespace(storage), '"')),
                       False)
        if i is not None:
            return i, f"holds the non-text value {str(storage[i].as_py())[:40]}"
        return None
    if not _is_text(col.type):
        first = next((v for v in col.to_pylist()[:1000] if v is not None), None)
        return 0, f"holds {col.type} values, not text (e.g. {str(first)[:40]!r})"
    nulls = _first_bad(pc.is_null(col))
    empty = _first_bad(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), False)
    bad = [(i, w) for i, w in ((nulls, "is null"), (empty, "is empty")) if i is not None]
    return min(bad) if bad else None


def _chat_problem(table: Any, column: str, style: str) -> tuple[int, str] | None:
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(column).combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) \
            or not pa.types.is_struct(col.type.value_type):
        return 0, f"holds {col.type} values, not a list of turns"
    bad = _first_bad(pc.or_(pc.is_null(col), pc.equal(pc.list_value_length(col), 0)))
    problems = [(bad, "holds no turns")] if bad is not None else []
    role, content = ("role", "content") if style == "openai" else ("from", "value")
    parents = pc.list_parent_indices(col)
    turns = pc.list_flatten(col)
    for name in (role, content):
        if col.type.value_type.get_field_index(name) < 0:
            return 0, f"has turns without a {name!r} field"
        field = pc.struct_field(turns, name)
        if not _is_text(field.type):
            return 0, f"has turns whose {name!r} is {field.type}, not text"
        i = _first_bad(pc.is_null(field))
        if i is not None:
            problems.append((int(parents[i].as_py()), f"has a turn whose {name!r} is null"))
    return min(problems) if problems else None


def check_rows(table: Any, kind: str, columns: dict[str, str], style: str | None,
               where: Any) -> None:
    """Check the columns the builder reads in every row of ``table``.

    Args:
        table: The split as a pyarrow table.
        kind: ``"alpaca"``, ``"instruct"`` or ``"chat"``.
        columns: The data's column for each expected name (after ``column_map``).
        style: ``openai`` or ``sharegpt`` for chat data.
        where: Callable ``row -> "file 'x', row n"``.

    Raises:
        DatasetError: The first bad value, with its row, column and file.
    """
    if kind == "chat":
        checks = [(columns["messages"], None)]
    elif kind == "alpaca":
        checks = [(columns["instruction"], True), (columns["output"], True)]
        if columns["input"] in table.column_names:
            checks.append((columns["input"], False))
    else:
        checks = [(columns["input"], True), (columns["output"], True)]
    found = []
    for column, required in checks:
        problem = (_chat_problem(table, column, style or "openai") if required is None
                   else _text_problem(table, column, required))
        if problem is not None:
            found.append((problem[0], column, problem[1]))
    if not found:
        return
    row, column, what = min(found)
    raise DatasetError(
        f"column {column!r} {what} at row {row} of the split ({where(row)}); torchtune would "
        "fail on it inside the fine-tune step. Fix or drop that row (every row of the split "
        "needs text there), or choose a split without it."
    )
