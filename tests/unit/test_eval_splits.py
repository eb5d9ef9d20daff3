"""The held-out split checks (config layer): valid, and disjoint from the training split."""

import pytest

from kfp_finetune.config.splits import check_disjoint_rows, check_eval_split, parse_split
from kfp_finetune.errors import ConfigError

FIX = "split='train[:95%]' with eval_split='train[95%:]'"


@pytest.mark.parametrize(
    ("split", "eval_split"),
    [
        ("train[:95%]", "train[95%:]"),
        ("train[:90%]", "train[90%:95%]"),
        ("train[10%:]", "train[:10%]"),
        ("train[:100]", "train[100:]"),
        ("train[:100]", "train[200:300]"),
        ("train", "test"),  # another split name
        ("train[:95%]", " train[95%:] "),
        (None, "validation"),
    ],
)
def test_disjoint_splits_are_accepted(split, eval_split):
    assert check_eval_split(split, eval_split) == eval_split.strip()


@pytest.mark.parametrize("eval_split", [None, "", "   "])
def test_no_eval_split_means_no_evaluation(eval_split):
    assert check_eval_split("train", eval_split) is None


@pytest.mark.parametrize(
    ("split", "eval_split", "why"),
    [
        ("train", "train[95%:]", "'train' is the whole split 'train'"),
        (None, "train[95%:]", "'train' is the whole split 'train'"),
        ("train[:95%]", "train", "'train' is the whole split 'train'"),
        ("train[:95%]", "train[0%:]", "'train[0%:]' is the whole split 'train'"),
        ("train[:95%]", "train[90%:]", "both select 90% to 95% of split 'train'"),
        ("train[10%:]", "train[-5%:]", "both select 95% to 100% of split 'train'"),
        ("train[:100]", "train[50:150]", "both select 50 to 100 of split 'train'"),
        ("train[100:]", "train[150:200]", "both select 150 to 200 of split 'train'"),
        ("train[:95%]", "train[:95%]", "both select 0% to 95% of split 'train'"),
    ],
)
def test_overlapping_splits_are_refused_naming_both_and_the_fix(split, eval_split, why):
    with pytest.raises(ConfigError) as err:
        check_eval_split(split, eval_split)
    message = str(err.value)
    assert f"eval_split={eval_split!r}" in message
    assert f"split={split or 'train'!r}" in message
    assert why in message, message
    assert "rows the model was trained on" in message
    assert FIX in message and "leave eval_split empty" in message


@pytest.mark.parametrize("bad", ["train[95%", "train[:95%]]", "[95%:]", "train[x:]", "tr ain"])
def test_an_invalid_eval_split_is_refused_by_name(bad):
    with pytest.raises(ConfigError) as err:
        check_eval_split("train[:95%]", bad)
    assert f"eval_split={bad!r} is not a valid split expression" in str(err.value)
    assert "'train[:95%]'" in str(err.value)  # an example of the right form


def test_a_percentage_over_100_is_refused_by_name():
    with pytest.raises(ConfigError) as err:
        check_eval_split("train[:95%]", "train[95%:120%]")
    assert "eval_split='train[95%:120%]' has the percentage 120%" in str(err.value)


def test_an_eval_split_that_is_not_text_is_refused():
    with pytest.raises(ConfigError) as err:
        check_eval_split("train[:95%]", 5)
    assert "eval_split=5 must be a split expression (text)" in str(err.value)


def test_mixed_units_are_read_as_percent_like_datasets():
    # datasets/arrow_reader.py, _str_to_read_instruction: a '%' on either bound makes the
    # unit '%' for both (datasets.ReadInstruction.from_spec("train[10:50%]") -> from 10%).
    assert parse_split("train[10:50%]").percent


def test_row_counts_from_the_end_are_decided_with_the_row_count():
    # Whether train[:100] and train[-50:] overlap depends on the number of rows: the config
    # layer lets it through, the fine-tune step decides it with the row count.
    assert check_eval_split("train[:100]", "train[-50:]") == "train[-50:]"
    check_disjoint_rows("train[:100]", "train[-50:]", 150)  # rows 0-99 and 100-149
    with pytest.raises(ConfigError) as err:
        check_disjoint_rows("train[:100]", "train[-50:]", 120)
    message = str(err.value)
    assert "eval_split='train[-50:]' overlaps the training split split='train[:100]'" in message
    assert "of the 120 rows, both select rows 70 to 99" in message
    assert FIX in message


def test_percent_rounding_keeps_adjacent_slices_disjoint():
    # datasets rounds both bounds with the same rule ('closest'), so train[:95%] and
    # train[95%:] never share a row, whatever the row count.
    for rows in (1, 7, 19, 64, 101):
        check_disjoint_rows("train[:95%]", "train[95%:]", rows)
    check_disjoint_rows("train", "test", 10)  # different split names
