"""Property-based layer (hypothesis): any input parses or is refused with one of our errors.

For storage URIs, split expressions, column maps and overrides, arbitrary and near-valid input
either parses or raises ``ConfigError``/``SourceError`` with a message; never another
exception (a ``TypeError``, ``AttributeError``, ``re.error``, a YAML or OmegaConf error).
Each property is bounded: ``max_examples`` and a per-example ``deadline``.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kfp_finetune.config.overrides import OWNED, check_overrides
from kfp_finetune.config.types import TorchTuneInstructDataset, check_column_map, check_split_syntax
from kfp_finetune.config.validation import normalize_dataset
from kfp_finetune.errors import ConfigError, SourceError
from kfp_finetune.storage.credentials import redact
from kfp_finetune.storage.uris import parse_storage_uri

BOUNDED = settings(max_examples=300, deadline=500,
                   suppress_health_check=[HealthCheck.too_slow])

# Anything a user may paste or a program may pass.
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=20),
    st.text(max_size=60), st.lists(st.text(max_size=10), max_size=3),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)
URI_PIECES = st.sampled_from([
    "hf://", "s3://", "file://", "/", "//", "@", ":", "..", ".", "%2F", "?", "&", "=", "#",
    "org", "repo", "bucket", "data", "main", "hf_abcdefghijklmnop", "X-Amz-Signature=",
    "user:pw@", " ", "\t", "\\", "\x00", "é", "~", "https://huggingface.co/", "a" * 300,
])
NEAR_URIS = st.lists(URI_PIECES, min_size=1, max_size=8).map("".join)
SPLIT_PIECES = st.sampled_from([
    "train", "test", "validation", "[", "]", ":", "%", "-", "0", "5", "95", "100", "150",
    "+", " ", ".", "_", "a", "train[", "[:", ":]", "1e3", "\n",
])
NEAR_SPLITS = st.lists(SPLIT_PIECES, min_size=1, max_size=8).map("".join)
KEY_PIECES = st.sampled_from([
    "~", "output_dir", "tokenizer", ".", "path", "special_tokens_path", "dataset",
    "data_files", "metric_logger", "log_dir", "checkpointer", "_component_", "optimizer",
    "lr", "=", "[", "]", "0", " ", "${", "}", "{", "a", ":", "'", '"', "\n", "!!", "-",
    "hf_SecretTokenInOverride123",
])
NEAR_OVERRIDES = st.lists(KEY_PIECES, min_size=1, max_size=8).map("".join)


def _refused_well(exc: BaseException) -> None:
    assert isinstance(exc, (ConfigError, SourceError)), f"{type(exc).__name__}: {exc}"
    assert str(exc).strip(), "an error without a message"
    assert "hf_SecretTokenInOverride123" not in str(exc)
    assert "hf_abcdefghijklmnop" not in str(exc)


@BOUNDED
@given(st.one_of(ANY, NEAR_URIS), st.sampled_from(["dataset", "model"]))
def test_any_storage_uri_parses_or_is_refused_with_a_message(uri: object, kind: str) -> None:
    try:
        parsed = parse_storage_uri(uri, kind)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - the property is about the type
        _refused_well(exc)
        return
    assert parsed.scheme in ("hf", "s3", "file")
    assert redact(parsed.describe()) == parsed.describe(), "a parsed URI still holds a secret"


@BOUNDED
@given(st.one_of(ANY, NEAR_SPLITS))
def test_any_split_parses_or_is_refused_with_a_message(split: object) -> None:
    try:
        check_split_syntax(split)  # type: ignore[arg-type]
        # The SDK's class checks nothing when built: checked where it is used.
        normalize_dataset(TorchTuneInstructDataset(split=split))  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001
        _refused_well(exc)


COLUMN_KEYS = st.sampled_from(["instruction", "input", "output", "messages", "conversations",
                               "prompt", "", "Input"])
COLUMN_NAMES = st.one_of(st.text(max_size=12), st.none(), st.integers(), st.just(" "))


@BOUNDED
@given(st.one_of(ANY, st.dictionaries(COLUMN_KEYS, COLUMN_NAMES, max_size=5)))
def test_any_column_map_parses_or_is_refused_with_a_message(column_map: object) -> None:
    try:
        result = check_column_map(column_map)
    except Exception as exc:  # noqa: BLE001
        _refused_well(exc)
        return
    if result is not None:
        assert len(set(result.values())) == len(result), "two keys share one column"
        assert all(v.strip() for v in result.values())


@BOUNDED
@given(st.one_of(ANY, st.lists(st.one_of(NEAR_OVERRIDES, ANY), max_size=3), NEAR_OVERRIDES))
def test_any_override_parses_or_is_refused_with_a_message(overrides: object) -> None:
    try:
        result = check_overrides(overrides)
    except Exception as exc:  # noqa: BLE001
        _refused_well(exc)
        return
    for item in result or []:
        key = item.lstrip("~").partition("=")[0]
        for owned in OWNED:
            assert not (key == owned or owned.startswith(key + ".")
                        or key.startswith(owned + ".")), f"{item!r} sets the owned {owned!r}"


@BOUNDED
@given(st.sampled_from(sorted(OWNED)), st.sampled_from(["", "~"]),
       st.sampled_from(["=x", "={}", "=[1]", "=", "=${output_dir}/y"]))
def test_no_spelling_of_an_owned_key_slips_through(key: str, tilde: str, value: str) -> None:
    # Every owned key, its parent sections and its sub-keys, set or deleted.
    parts = key.split(".")
    for spelled in {key, parts[0], key + ".sub"}:
        item = f"{tilde}{spelled}" + ("" if tilde else value)
        with pytest.raises(ConfigError):
            check_overrides([item])


@settings(max_examples=200, deadline=500)
@given(st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=8, max_size=40))
def test_redaction_hides_tokens_in_every_credential_position(secret: str) -> None:
    forms = [
        f"hf://hf_{secret}@org/repo",
        f"s3://AKIA{secret.upper()}:{secret}@bucket/x",
        f"https://user:{secret}@kubeflow.example.com/pipeline",
        f"https://b.s3.amazonaws.com/k?X-Amz-Credential={secret}&X-Amz-Signature={secret}",
        f"https://b.s3.amazonaws.com/k?X-Amz-Security-Token={secret}",
        f"Authorization: Bearer {secret}",
        f"authorization={secret}",
    ]
    for form in forms:
        assert secret not in redact(form), form
    # Free text: Hub tokens are letters and digits after hf_ (a parameter name such as
    # hf_token_secret must stay readable).
    alnum = "".join(c for c in secret if c.isalnum())
    if len(alnum) >= 8:
        assert alnum not in redact(f"error near 'hf_{alnum}' in line 3")


NUMBERS = st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.floats(), st.none(),
                    st.booleans(), st.text(max_size=5))


@BOUNDED
@given(st.one_of(st.sampled_from(["none", "lora", "qlora", "dora", "LoRA", " lora "]), ANY),
       NUMBERS, NUMBERS, NUMBERS,
       st.one_of(st.none(), st.lists(st.sampled_from(["q_proj", "v_proj", "x", ""]),
                                     max_size=3)),
       st.sampled_from(["auto", "true", "false", "maybe", "", True]))
def test_any_lora_parameters_build_a_config_or_are_refused(
    method: object, rank: object, alpha: object, dropout: object, modules: object,
    mlp: object,
) -> None:
    from kfp_finetune.config.run_config import from_values

    values = {"lora_method": method, "lora_rank": rank, "lora_alpha": alpha,
              "lora_dropout": dropout, "lora_attn_modules": modules, "lora_apply_to_mlp": mlp}
    try:
        from_values("torchtune-llama3.2-1b", {"data_uri": "hf://org/data", **values})
    except Exception as exc:  # noqa: BLE001
        _refused_well(exc)
