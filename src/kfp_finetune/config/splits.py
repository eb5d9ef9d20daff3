"""The held-out evaluation split: a valid split expression, disjoint from the training split.

A held-out loss is only worth reading when no evaluation row was trained on. Two split
expressions are disjoint when they name different splits, or slice the same split into
non-overlapping ranges (``train[:95%]`` and ``train[95%:]``). ``check_eval_split`` decides it
without the data where it can: both slices in percent, or both counted in rows from the first
row. Where it depends on the number of rows (``train[:100]`` with ``train[-50:]``),
``check_disjoint_rows`` decides it in the fine-tune step, where that number is known, with the
``datasets`` library's own slice arithmetic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kfp_finetune.config.validation import check_split_syntax
from kfp_finetune.errors import ConfigError

_PARTS = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")
_FIX = ("set eval_split to rows the training split leaves out, e.g. split='train[:95%]' with "
        "eval_split='train[95%:]', or leave eval_split empty to skip the held-out evaluation")
_ALL = 2**62  # "to the last row" when the row count is not known


@dataclass(frozen=True)
class Slice:
    """A parsed split expression ``name[start:stop]``.

    Attributes:
        name: The split name.
        start: Start bound as written (None: from the first row).
        stop: Stop bound as written (None: to the last row).
        percent: True when a bound is a percentage (``datasets`` then reads both as percent:
            ``datasets/arrow_reader.py``, ``_str_to_read_instruction``).
    """

    name: str
    start: int | None
    stop: int | None
    percent: bool

    @property
    def whole(self) -> bool:
        """Whether it selects the whole split."""
        return self.start in (None, 0) and self.stop is None


def parse_split(split: str, field_name: str = "split") -> Slice:
    """Parse a split expression.

    Args:
        split: The expression, e.g. ``train[95%:]``.
        field_name: Parameter name, used in the error message.

    Raises:
        ConfigError: The expression is not of the form ``name`` or ``name[start:stop]``.
    """
    try:
        check_split_syntax(split)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("split=", f"{field_name}=", 1)) from None
    match = _PARTS.match(split)
    assert match is not None  # check_split_syntax accepted it
    name, start, stop = match.groups()

    def number(bound: str | None) -> int | None:
        return None if not bound else int(bound.rstrip("%"))

    percent = any(b and b.endswith("%") for b in (start, stop))
    return Slice(name, number(start), number(stop), bool(percent))


def _known_range(s: Slice) -> tuple[int, int] | None:
    """``[start, stop)`` in percent or rows; None when it needs the row count."""
    end = 100 if s.percent else _ALL
    bounds = []
    for bound, default in ((s.start, 0), (s.stop, end)):
        if bound is None:
            bounds.append(default)
        elif bound >= 0:
            bounds.append(min(bound, end))
        elif s.percent:
            bounds.append(max(end + bound, 0))
        else:
            return None
    return bounds[0], bounds[1]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def _overlap_error(split: str, eval_split: str, why: str) -> ConfigError:
    return ConfigError(
        f"eval_split={eval_split!r} overlaps the training split split={split!r} ({why}), so "
        f"the held-out loss would be measured on rows the model was trained on; {_FIX}."
    )


def check_eval_split(split: str | None, eval_split: str | None) -> str | None:
    """Check the held-out split against the training split, as far as the data is not needed.

    Args:
        split: The training split expression (``TorchTuneInstructDataset.split``; None or ""
            mean ``train``).
        eval_split: The held-out split expression; None or "" for no held-out evaluation.

    Returns:
        The eval split, stripped, or None when there is none.

    Raises:
        ConfigError: ``eval_split`` is not a valid split expression, or it shares rows with
            ``split``; the message names both values and how to fix them.
    """
    if eval_split is None or (isinstance(eval_split, str) and not eval_split.strip()):
        return None
    if not isinstance(eval_split, str):
        raise ConfigError(f"eval_split={eval_split!r} must be a split expression (text), e.g. "
                          "'train[95%:]'.")
    split = split or "train"
    train, held = parse_split(split), parse_split(eval_split, "eval_split")
    if train.name != held.name:
        return eval_split.strip()
    if train.whole or held.whole:
        raise _overlap_error(split, eval_split,
                             f"{split if train.whole else eval_split!r} is the whole split "
                             f"{train.name!r}")
    if train.percent == held.percent:
        a, b = _known_range(train), _known_range(held)
        if a is not None and b is not None and _overlap(a, b):
            unit = "%" if train.percent else ""
            last = f"{min(a[1], b[1])}{unit}" if min(a[1], b[1]) < _ALL else "the end"
            raise _overlap_error(split, eval_split,
                                 f"both select {max(a[0], b[0])}{unit} to {last} of split "
                                 f"{train.name!r}")
    return eval_split.strip()


def check_disjoint_rows(split: str, eval_split: str, total_rows: int) -> None:
    """Check, with the number of rows known, that the two splits select no common row.

    Uses ``datasets.ReadInstruction`` (``datasets/arrow_reader.py``: ``from_spec`` and
    ``to_absolute``), the arithmetic that selects the rows when the data is loaded, percent
    rounding included.

    Args:
        split: The training split expression.
        eval_split: The held-out split expression.
        total_rows: Rows of the split (the data files form one split, ``train``).

    Raises:
        ConfigError: The two select a common row.
    """
    from datasets import ReadInstruction

    train, held = parse_split(split), parse_split(eval_split, "eval_split")
    if train.name != held.name:
        return
    a, b = (ReadInstruction.from_spec(s).to_absolute({train.name: total_rows})[0]
            for s in (split.strip(), eval_split.strip()))
    if _overlap((a.from_, a.to), (b.from_, b.to)):
        raise _overlap_error(
            split, eval_split,
            f"of the {total_rows} rows, both select rows {max(a.from_, b.from_)} to "
            f"{min(a.to, b.to) - 1}")
