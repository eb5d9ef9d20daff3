"""Secrets: sentinel tokens in the environment never reach a log, file, artifact or message.

The whole-pipeline runs of ``faultkit.full_runs`` carry a sentinel Hugging Face token (in
``HF_TOKEN`` for the CLI run, as ``access_token`` for the API run) and sentinel S3 keys; their
output, every file they left (workspace, KFP local outputs and metadata, temporary files) and
every compiled YAML are scanned byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import faultkit
from support.faultkit import SENTINEL_AWS, SENTINEL_AWS_ID, SENTINEL_HF, secret_env, start

from kfp_finetune.config.types import HuggingFaceDatasetInitializer, HuggingFaceModelInitializer
from kfp_finetune.config.validation import normalize_initializer
from kfp_finetune.drivers.cli import main
from kfp_finetune.errors import KfpFinetuneError, SourceError
from kfp_finetune.storage.credentials import redact
from kfp_finetune.storage.uris import parse_storage_uri

SECRETS = (SENTINEL_HF, SENTINEL_AWS, SENTINEL_AWS_ID)
REPO = Path(__file__).resolve().parents[2]


def _leaks(data: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in data]


def _scan_tree(root: Path) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            leaked = _leaks(path.read_bytes())
            if leaked:
                found.append(f"{path}: {leaked}")
    return found


@pytest.mark.slow
def test_full_local_runs_leak_no_secret(
    tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    runs = faultkit.full_runs(tiny, tmp_path_factory.getbasetemp())
    root = runs[0].workspace.parent  # both workspaces, the logs and TMPDIR
    for run in runs:
        assert run.returncode == 0, run.log[-3000:]
        assert _leaks(run.log.encode()) == []
        # The KFP local outputs (artifacts, executor metadata) are inside the workspace.
        assert (run.workspace / ".kfp-local-outputs").is_dir()
        assert list(run.model_dir.glob("*.safetensors"))
    assert len(list(root.rglob("*"))) > 50, "the scan must see the runs' files"
    assert _scan_tree(root) == []


@pytest.mark.slow
def test_a_failing_local_run_leaks_no_secret(tiny: dict[str, Path], tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    argv = faultkit.cli_argv(tiny, ws, "--column-map", "output=answer")
    proc = start(argv, tmp_path / "run.log", secret_env(TMPDIR=str(tmp_path)))
    assert proc.wait(timeout=420) == 2  # the dataset step's DatasetError (one line, exit 2)
    log = (tmp_path / "run.log").read_bytes()
    assert b"output->answer" in log  # it failed where expected, with its message
    assert _leaks(log) == [] and _scan_tree(tmp_path) == []


def test_compiled_yaml_holds_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in secret_env().items():
        monkeypatch.setenv(name, value)
    assert main(["compile", "--output-dir", str(tmp_path)]) == 0
    fresh = sorted(tmp_path.glob("*.yaml"))
    committed = sorted((REPO / "compiled").glob("*.yaml"))
    assert len(fresh) == len(committed) >= 6
    for path in fresh + committed:
        text = path.read_bytes()
        assert _leaks(text) == [], path
        assert b"HF_TOKEN" in text  # the token arrives from a Secret, named, not inlined


CREDENTIAL_URIS = [
    ("https://alice:pa55word@huggingface.co/datasets/org/data", "pa55word", "alice"),
    ("s3://AKIAEMBEDDEDKEY:embeddedSecret42@bucket/data", "embeddedSecret42", "AKIAEMBEDDEDKEY"),
    ("s3://AKIAKEYASUSERONLY99@bucket/data", "AKIAKEYASUSERONLY99", None),
    ("hf://user:hf_EmbeddedTok12345678@org/repo", "hf_EmbeddedTok12345678", "user"),
    ("https://ghp_TokenAsUserName123@github.com/org/data", "ghp_TokenAsUserName123", None),
    ("file://admin:rootpw@/data/alpaca", "rootpw", "admin"),
]


@pytest.mark.parametrize(("uri", "secret", "user"), CREDENTIAL_URIS,
                         ids=[u.split("://")[0] + str(i) for i, (u, _, _) in
                              enumerate(CREDENTIAL_URIS)])
def test_uris_with_credentials_are_rejected_and_redacted_everywhere(
    uri: str, secret: str, user: str | None, tiny: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    messages = []
    for call in (
        lambda: parse_storage_uri(uri, "dataset"),
        # The SDK's initializers check nothing when built: checked where train() uses them.
        lambda: normalize_initializer(HuggingFaceDatasetInitializer(storage_uri=uri), "dataset"),
        lambda: normalize_initializer(HuggingFaceModelInitializer(storage_uri=uri), "model"),
    ):
        with pytest.raises(SourceError) as err:
            call()
        messages.append(str(err.value))
    ws = tmp_path / "ws"
    for flag in ("--dataset-uri", "--model-uri"):
        argv = faultkit.cli_argv(tiny, ws)[3:]
        argv[argv.index(flag) + 1] = uri
        assert main(argv) == 2
        messages.append(capsys.readouterr().err)
    assert not ws.exists()
    from kfp import dsl

    from kfp_finetune.components.dataset_initializer import dataset_initializer

    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "m"), metadata={})
    with pytest.raises(KfpFinetuneError) as err:
        from kfp_finetune.config.run_config import RunConfig

        # A config built without check-config's checks: the step refuses the URI itself.
        config = RunConfig(runtime=faultkit.RUNTIME, dataset_uri=uri).to_dict()
        dataset_initializer.python_func(config=config, metrics=metrics, workspace_path=str(ws))
    messages.append(str(err.value))
    for text in messages:
        assert "embeds credentials" in text and "Secret" in text, text
        assert secret not in text and (user is None or f"{user}:" not in text), text
        assert "***" in text
    # Third-party error text that quotes such a URI is redacted too.
    assert secret not in redact(f"ConnectionError: cannot reach {uri}")


@pytest.mark.parametrize("push_to", ["s3://AKIAPUSHKEY:pushSecret99@bucket/models",
                                     "hf://user:hf_PushTokenInUri12345@org/repo"])
def test_push_to_with_credentials_is_rejected_and_redacted(push_to: str) -> None:
    from kfp_finetune.storage.uris import parse_destination

    with pytest.raises(KfpFinetuneError) as err:
        parse_destination(push_to)
    text = str(err.value)
    assert "pushSecret99" not in text and "hf_PushTokenInUri12345" not in text, text
    assert "embeds credentials" in text and "Secret" in text and "***" in text
