"""Storage URI parsing: the accepted forms and what they mean."""

from __future__ import annotations

import pytest

from kfp_finetune.errors import SourceError
from kfp_finetune.storage.uris import parse_storage_uri


@pytest.mark.parametrize(
    ("uri", "kind", "scheme", "repo", "revision", "path", "bucket"),
    [
        ("hf://tatsu-lab/alpaca/data", "dataset", "hf", "tatsu-lab/alpaca", None, "data", ""),
        ("hf://tatsu-lab/alpaca/data/x.parquet", "dataset", "hf", "tatsu-lab/alpaca", None,
         "data/x.parquet", ""),
        ("hf://org/repo@v1.0/data/", "dataset", "hf", "org/repo", "v1.0", "data", ""),
        ("hf://org/repo@refs%2Fpr%2F1", "model", "hf", "org/repo", "refs/pr/1", "", ""),
        ("hf://Qwen/Qwen2.5-1.5B", "model", "hf", "Qwen/Qwen2.5-1.5B", None, "", ""),
        ("s3://my-bucket/datasets/alpaca/", "dataset", "s3", "", None, "datasets/alpaca",
         "my-bucket"),
        ("s3://my-bucket", "model", "s3", "", None, "", "my-bucket"),
        ("file:///data/alpaca", "dataset", "file", "", None, "/data/alpaca", ""),
        ("/data/model/", "model", "file", "", None, "/data/model", ""),
        # Issue 15: a local folder whose name holds a space must be usable.
        ("/data/My Models/tiny", "model", "file", "", None, "/data/My Models/tiny", ""),
        ("file:///data/my data", "dataset", "file", "", None, "/data/my data", ""),
    ],
)
def test_valid(uri: str, kind: str, scheme: str, repo: str, revision: str | None, path: str,
               bucket: str) -> None:
    parsed = parse_storage_uri(uri, kind)  # type: ignore[arg-type]
    assert (parsed.scheme, parsed.repo_id, parsed.revision, parsed.path, parsed.bucket) == (
        scheme, repo, revision, path, bucket)


def test_describe_round_trips() -> None:
    for uri in ("hf://org/repo@refs%2Fpr%2F1/data", "s3://b-1/x/y", "file:///a/b"):
        kind = "dataset"
        assert parse_storage_uri(parse_storage_uri(uri, kind).describe(), kind).describe() == uri


@pytest.mark.parametrize(
    ("uri", "names"),
    [
        ("", "''"),
        ("hf://org", "'hf://org'"),
        ("hf://org@v1/repo", "hf://org/repo@<revision>"),
        ("hf://org/repo//data", "'//'"),
        ("hf://-org/repo", "'-org'"),
        ("s3://", "names no bucket"),
        ("s3://ab/x", "'ab'"),
        ("s3://bucket//x", "'//'"),
        ("ftp://host/x", "'ftp'"),
        ("https://huggingface.co/datasets/tatsu-lab/alpaca", "hf://tatsu-lab/alpaca"),
        ("file://relative/x", "three slashes"),
        ("~/data", "'~/data'"),
        ("/data/a\tb", "whitespace"),
        ("hf://org/my repo", "whitespace"),
        ("s3://user:pass@bucket/x", "***:***@"),
    ],
)
def test_invalid(uri: str, names: str) -> None:
    with pytest.raises(SourceError) as err:
        parse_storage_uri(uri, "dataset")
    assert names in str(err.value)
    assert "pass@" not in str(err.value)


# push_to is parsed by the sources' grammar (issue 11: one URI grammar), narrowed to what a
# destination may be. Each row: what the source parser says, and what push_to adds.
@pytest.mark.parametrize(
    ("push_to", "scheme", "target", "prefix"),
    [
        ("hf://org/repo", "hf", "org/repo", ""),
        ("hf://org/repo@v1", "hf", "org/repo", "v1"),
        ("  hf://org/repo/  ", "hf", "org/repo", ""),
        ("s3://bucket", "s3", "bucket", ""),
        ("s3://bucket/a/b/", "s3", "bucket", "a/b"),
    ],
)
def test_push_to_uses_the_source_grammar(push_to: str, scheme: str, target: str,
                                         prefix: str) -> None:
    from kfp_finetune.storage.uris import parse_destination

    dest = parse_destination(push_to)
    assert dest is not None
    assert (dest.scheme, dest.target, dest.prefix) == (scheme, target, prefix)
    assert dest.uri == parse_storage_uri(push_to, "model")  # the same parse, not a copy
    assert dest.raw == push_to.strip()


@pytest.mark.parametrize(
    ("push_to", "words"),
    [
        # Refused by the shared grammar (the same values are refused as sources).
        ("s3://bucket/a/../b", "not an S3 location"),
        ("s3://bucket/a//b", "not an S3 location"),
        ("s3://Bucket/x", "not an S3 location"),
        ("hf://org/re po", "not a Hugging Face model repository"),
        ("hf://org/repo@", "not a Hugging Face model repository"),
        # Push-only rules: a whole repository, a branch name, no local paths.
        ("hf://org/repo/sub", "not a Hugging Face model repository"),
        ("hf://org/repo@refs%2Fpr%2F1", "not a Hugging Face model repository"),
        ("/data/models", "unsupported destination"),
        ("file:///data/models", "unsupported destination"),
    ],
)
def test_push_to_refusals(push_to: str, words: str) -> None:
    from kfp_finetune.errors import ConfigError
    from kfp_finetune.storage.uris import parse_destination

    with pytest.raises(ConfigError, match=words) as err:
        parse_destination(push_to)
    assert f"push_to={push_to!r}" in str(err.value)
    if push_to.startswith(("hf://", "s3://")) and "@" not in push_to and "/sub" not in push_to:
        with pytest.raises(SourceError):
            parse_storage_uri(push_to, "model")
