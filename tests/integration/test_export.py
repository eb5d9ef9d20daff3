"""The exported model loads in transformers and peft and computes what torchtune computes.

Two real trainings on the tiny Llama 3.2 fixture (full and LoRA, CPU, fp32) feed every test in
this module. Tolerance of every logits comparison: max |difference| < 1e-5 on logits of size
~0.1-2 (fp32; measured ~6e-7: the same math in a different order, e.g. LoRA unmerged vs merged).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml

from kfp_finetune.config.types import LoraConfig, TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.errors import ConfigError, WorkspaceError
from kfp_finetune.steps import fine_tune as finetune
from kfp_finetune.steps.dataset_initializer import initialize_dataset
from kfp_finetune.steps.export_model import (
    ADAPTER_DIR,
    export_model,
    latest_export,
)
from kfp_finetune.steps.model_initializer import initialize_model
from kfp_finetune.storage.upload import push
from kfp_finetune.storage.uris import parse_destination
from kfp_finetune.storage.workspace import MANIFEST, Workspace

RUNTIME = "torchtune-llama3.2-tiny"
# Every test here reads a workspace the module fixtures trained (two real tune runs).
pytestmark = pytest.mark.slow
ATOL = 1e-5
PROMPT = "Name the capital. Italy"

transformers = pytest.importorskip("transformers")


# A Llama 3 style chat template, as Hub instruct models carry.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _train(tiny, root: Path, config: TorchTuneConfig, base: Path | None = None) -> Path:
    quiet = lambda _: None  # noqa: E731
    initialize_dataset(root, str(tiny["alpaca"] / "data"), TorchTuneInstructDataset(),
                       log=quiet)
    initialize_model(root, str(base or tiny["llama3_2"]), RUNTIME, config, log=quiet)
    finetune.run_fine_tune(root, RUNTIME, config, log=quiet)
    return root


@pytest.fixture(scope="module")
def full_ws(tiny, tmp_path_factory) -> Path:
    config = TorchTuneConfig(epochs=1, batch_size=8, resources_per_node={"gpu": 0})
    return _train(tiny, tmp_path_factory.mktemp("full") / "ws", config)


@pytest.fixture(scope="module")
def chat_base(tiny, tmp_path_factory) -> Path:
    """The tiny Llama (same weights) with a chat template and a license, as Hub models have."""
    base = tmp_path_factory.mktemp("chat-base") / "tiny-llama3_2-chat"
    shutil.copytree(tiny["llama3_2"], base)
    # Where recent transformers save it (tokenizer_config.json's chat_template is the older
    # place; model_card.carry_chat_template handles both, see test_model_card.py).
    (base / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny chat model\n")
    return base


@pytest.fixture(scope="module")
def lora_ws(tiny, chat_base, tmp_path_factory) -> Path:
    # No rank or alpha given: the torchtune config's own (64, 128) are used, and must be
    # what the export records.
    config = TorchTuneConfig(epochs=1, batch_size=4, resources_per_node={"gpu": 0},
                             peft_config=LoraConfig())
    return _train(tiny, tmp_path_factory.mktemp("lora") / "ws", config, chat_base)


def _input_ids(folder: Path) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 5
    return ids


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits[0]


def _torchtune_model(export_dir: Path, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """torchtune's own model, built from the run's config, with the given weights."""
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    conf = OmegaConf.load(export_dir / "torchtune_config.yaml")
    model = tt_config.instantiate(conf.model)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected, unexpected
    assert all("lora" in k or "magnitude" in k for k in missing), missing
    return model.eval()


def _tt_weights(folder: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """Load HF shards with torchtune's own checkpointer (HF -> torchtune key conversion)."""
    from torchtune.training import FullModelHFCheckpointer

    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(folder), checkpoint_files=files,
                                   model_type="LLAMA3_2", output_dir=str(folder.parent / "tmp"))
    return ckpt.load_checkpoint()["model"]


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def _tt_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_full_export_is_a_hugging_face_folder_with_torchtunes_logits(full_ws, tiny):
    result = export_model(full_ws, RUNTIME, run_id="run-full-1", log=lambda _: None)
    out = Path(result.path)
    assert out.parent == full_ws / "output" and out.name == "tiny-llama3_2-finetuned-run-full-1"
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "model.safetensors.index.json", "README.md",
                 "torchtune_config.yaml"):
        assert (out / name).is_file(), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(_shards(out))
    assert not list(out.rglob("*.pt")), "torchtune-only files are not exported"
    for shard in _shards(out):  # readable by a serving pod of another user
        assert (out / shard).stat().st_mode & stat.S_IROTH
    assert result.adapter_path is None and not (out / ADAPTER_DIR).exists()

    ids = _input_ids(out)
    hf = _hf_logits(out, ids)
    tt = _tt_logits(_torchtune_model(out, _tt_weights(out, _shards(out))), ids)
    assert hf.shape == tt.shape == (ids.shape[1], 512)
    assert (hf - tt).abs().max().item() < ATOL
    # ...and it is the fine-tuned model, not the base one.
    base = _hf_logits(tiny["llama3_2"], ids)
    print(f"full: max |hf - torchtune| = {(hf - tt).abs().max().item():.2e}, "
          f"|hf - base| = {(hf - base).abs().max().item():.2e}")
    assert (hf - base).abs().max().item() > 100 * ATOL

    meta = result.metadata
    trained = json.loads((full_ws / "output" / "checkpoints" / MANIFEST).read_text())
    assert meta["base_model"] == f"file://{tiny['llama3_2']}"
    assert meta["dataset"] == f"file://{tiny['alpaca']}/data"
    assert meta["runtime"] == RUNTIME and meta["recipe"] == "full_finetune_single_device"
    assert meta["final_loss"] == trained["final_loss"] and meta["training"]["epochs"] == 1
    assert meta["path"] == str(out) and meta["run_id"] == "run-full-1" and not meta["lora"]
    assert json.loads((out / MANIFEST).read_text())["fingerprint"] == trained["fingerprint"]


def _peft_without_torchao(monkeypatch) -> None:
    """peft >= 0.18 raises on torchao < 0.16, which torchtune 0.6.1 needs (0.15); a serving
    environment has no torchtune pin. Tell peft torchao is absent (it quantizes nothing here)."""
    import sys

    import peft  # noqa: F401

    for name, module in list(sys.modules.items()):
        if name.startswith("peft") and hasattr(module, "is_torchao_available"):
            monkeypatch.setattr(module, "is_torchao_available", lambda: False)


def test_lora_export_gives_the_merged_model_and_a_peft_adapter(lora_ws, tiny, chat_base,
                                                               monkeypatch):
    _peft_without_torchao(monkeypatch)
    from peft import AutoPeftModelForCausalLM, PeftModel

    result = export_model(lora_ws, RUNTIME, run_id="run-lora-1", log=lambda _: None)
    out = Path(result.path)
    adapter = out / ADAPTER_DIR
    assert result.adapter_path == str(adapter) and result.metadata["lora"] is True
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert not (out / "adapter_model.safetensors").exists()
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    rendered = yaml.safe_load((out / "torchtune_config.yaml").read_text())["model"]
    assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "CAUSAL_LM"
    # The rank actually used (the config's default here), not the unset option (None).
    rank = rendered["lora_rank"]
    assert isinstance(rank, int) and adapter_config["r"] == rank
    meta = result.metadata
    assert meta["training"]["peft"]["lora_rank"] == meta["hyperparameters"]["lora_rank"] == rank
    assert meta["training"]["peft"]["lora_alpha"] == rendered["lora_alpha"]
    # A file:// base: the adapter names that folder, which peft loads (it was empty).
    assert adapter_config["base_model_name_or_path"] == str(chat_base)

    ids = _input_ids(out)
    merged = _hf_logits(out, ids)

    # torchtune's own LoRA model: base weights + the adapter torchtune saved, not merged.
    epoch = lora_ws / "output" / "checkpoints" / "epoch_0"
    weights = _tt_weights(tiny["llama3_2"], ["model.safetensors"])
    weights.update(torch.load(epoch / "adapter_model.pt", weights_only=True))
    tt = _tt_logits(_torchtune_model(out, weights), ids)
    assert (merged - tt).abs().max().item() < ATOL

    # peft: the base model plus the exported adapter computes the merged model's logits.
    base_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny["llama3_2"]), dtype=torch.float32)
    with torch.no_grad():
        base = base_model(ids).logits[0].clone()
        peft_model = PeftModel.from_pretrained(base_model, str(adapter)).eval()
        with_adapter = peft_model(ids).logits[0]
    assert (with_adapter - merged).abs().max().item() < ATOL
    # AutoPeftModelForCausalLM finds the base model from adapter_config.json alone.
    auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (auto(ids).logits[0] - merged).abs().max().item() < ATOL
    # The adapter changes the output (so the comparisons above are not trivially equal).
    print(f"LoRA: max |merged - base| = {(merged - base).abs().max().item():.2e}, "
          f"|merged - torchtune| = {(merged - tt).abs().max().item():.2e}, "
          f"|peft - merged| = {(with_adapter - merged).abs().max().item():.2e}")
    assert (merged - base).abs().max().item() > 10 * ATOL


def _run_card_snippet(out: Path, moved: Path) -> str:
    """Run the card's usage snippet against a copy of the export (its path substituted)."""
    import contextlib
    import io

    card = (out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert json.dumps(str(out)) in snippet
    shutil.copytree(out, moved)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet.replace(json.dumps(str(out)), json.dumps(str(moved))), {})  # noqa: S102
    return snippet


def test_model_card_has_front_matter_hyperparameters_and_a_snippet_that_runs(full_ws,
                                                                             tmp_path):
    from kfp_finetune.steps.model_card import read_front_matter

    out = Path(export_model(full_ws, RUNTIME, run_id="card-full", log=lambda _: None).path)
    card = (out / "README.md").read_text()
    front = read_front_matter(out / "README.md")
    # A file:// base and dataset have no Hub id; the fixture's card declares no license.
    assert front["library_name"] == "transformers" and "torchtune" in front["tags"]
    assert not {"base_model", "datasets", "license"} & set(front)
    rendered = yaml.safe_load((out / "torchtune_config.yaml").read_text())
    for name, value in (("recipe", "full_finetune_single_device"), ("epochs", 1),
                        ("batch_size", 8), ("learning_rate", rendered["optimizer"]["lr"]),
                        ("max_seq_len", rendered["tokenizer"]["max_seq_len"] or "none"),
                        ("packed", False)):
        assert f"| {name} | `{value}` |" in card, name
    assert "lora_rank" not in card and "**alpaca**" in card and "### Instruction:" in card
    snippet = _run_card_snippet(out, tmp_path / "moved")
    # No chat template in this base: the snippet uses the plain alpaca prompt.
    assert "apply_chat_template" not in snippet and "### Response:" in snippet


def test_lora_card_and_chat_template_come_from_the_base(lora_ws, chat_base, tmp_path):
    from kfp_finetune.steps.model_card import read_front_matter

    out = Path(export_model(lora_ws, RUNTIME, run_id="card-lora", log=lambda _: None).path)
    assert read_front_matter(out / "README.md")["license"] == "apache-2.0"
    card = (out / "README.md").read_text()
    rank = yaml.safe_load((out / "torchtune_config.yaml").read_text())["model"]["lora_rank"]
    assert f"| lora_rank | `{rank}` |" in card and "torchao" in card
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "apply_chat_template" in _run_card_snippet(out, tmp_path / "moved")


def test_a_second_run_never_overwrites_the_first_runs_export(full_ws):
    quiet = lambda _: None  # noqa: E731
    ws = Workspace.at(full_ws)
    first = export_model(full_ws, RUNTIME, log=quiet)  # local run ids are generated
    before = _digest(Path(first.path))
    # A second run of the same model (same training fingerprint) finds that export instead
    # of writing an identical copy; a retry of the same run, too.
    second = export_model(full_ws, RUNTIME, log=quiet)
    assert second.path == first.path and second.skipped
    again = export_model(full_ws, RUNTIME, run_id=first.metadata["run_id"], log=quiet)
    assert again.skipped and again.path == first.path
    assert _digest(Path(first.path)) == before
    assert latest_export(ws) == Path(first.path)

    # An explicit name: the first run gets it, a re-run of the same model is skipped as done,
    # and a different model under that name is refused and changes nothing. (A different
    # model stands in here as another training fingerprint in the export's manifest; the
    # real retraining case is in test_stale_and_loss.py.)
    named = export_model(full_ws, RUNTIME, name="my-model", run_id="run-a", log=quiet)
    assert export_model(full_ws, RUNTIME, name="my-model", run_id="run-b", log=quiet).skipped
    manifest = json.loads((Path(named.path) / MANIFEST).read_text())
    (Path(named.path) / MANIFEST).write_text(json.dumps({**manifest, "fingerprint": "other"}))
    kept = _digest(Path(named.path))
    with pytest.raises(WorkspaceError, match="different model .run 'run-a'.*never overwrites"):
        export_model(full_ws, RUNTIME, name="my-model", run_id="run-b", log=quiet)
    assert _digest(Path(named.path)) == kept
    assert latest_export(ws, "my-model") == Path(named.path)


def test_export_refuses_a_folder_it_did_not_write(full_ws):
    (full_ws / "output" / "hand-made").mkdir(parents=True)
    with pytest.raises(WorkspaceError, match="not exported by this step"):
        export_model(full_ws, RUNTIME, name="hand-made", run_id="x", log=lambda _: None)


def test_model_artifact_holds_metadata_not_weights_unless_asked(full_ws, tmp_path):
    from kfp import dsl

    from kfp_finetune.components.export_model import export_model as component

    art = dsl.Model(name="model", uri=str(tmp_path / "meta"), metadata={})
    from kfp_finetune.config.run_config import RunConfig

    config = RunConfig(runtime=RUNTIME, dataset_uri="/data").to_dict()
    path, elsewhere = component.python_func(
        config=config, model=art, workspace_path=str(full_ws), run_id="art-1")
    assert elsewhere is False and Path(path).is_dir()
    described = json.loads((tmp_path / "meta").read_text())
    assert described["path"] == path and described["base_model"].startswith("file://")
    assert art.metadata["runtime"] == RUNTIME and art.metadata["weights_in_artifact"] is False
    assert "final_loss" in art.metadata and "files" in art.metadata

    art2 = dsl.Model(name="model", uri=str(tmp_path / "copy"), metadata={})
    config = RunConfig(runtime=RUNTIME, dataset_uri="/data", copy_to_artifact=True).to_dict()
    component.python_func(config=config, model=art2, workspace_path=str(full_ws),
                          run_id="art-2")
    assert (tmp_path / "copy" / "config.json").is_file()
    assert _shards(tmp_path / "copy") and art2.metadata["weights_in_artifact"] is True


# ------------------------------------------------------------------ destinations


class FakeS3:
    """The two calls the S3 push makes, in memory (the cluster-side service is not here)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.order: list[str] = []

    def get_object(self, Bucket: str, Key: str):  # noqa: N803 - boto3's names
        from botocore.exceptions import ClientError

        if (Bucket, Key) not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")
        import io

        return {"Body": io.BytesIO(self.objects[(Bucket, Key)])}

    def upload_file(self, filename: str, bucket: str, key: str) -> None:
        self.objects[(bucket, key)] = Path(filename).read_bytes()
        self.order.append(key)


def test_s3_push_copies_every_file_manifest_last_and_never_over_another_run(full_ws):
    quiet = lambda _: None  # noqa: E731
    s3 = FakeS3()
    result = export_model(full_ws, RUNTIME, run_id="s3-run-1", push_to="s3://models/tiny",
                          log=quiet, client=s3)
    folder = Path(result.path)
    prefix = f"tiny/{folder.name}"
    assert result.destinations == [f"s3://models/{prefix}"] and result.exported_elsewhere
    assert s3.order[-1] == f"{prefix}/{MANIFEST}"
    files = {k[1] for k in s3.objects}
    assert f"{prefix}/config.json" in files and f"{prefix}/model.safetensors.index.json" in files
    # A second run of another model that names the same prefix is refused (it would
    # overwrite); a second run of the same model (training fingerprint) finds it uploaded.
    count = len(s3.order)
    push(folder, "s3://models/tiny", "s3-run-2", quiet, s3)
    assert len(s3.order) == count
    other = folder.parent / ".other" / folder.name
    other.mkdir(parents=True)
    manifest = json.loads((folder / MANIFEST).read_text())
    (other / MANIFEST).write_text(json.dumps({**manifest, "fingerprint": "other"}))
    with pytest.raises(WorkspaceError, match="different model"):
        push(other, "s3://models/tiny", "s3-run-2", quiet, s3)
    shutil.rmtree(other.parent)
    # A retry of the same run is a no-op.
    count = len(s3.order)
    push(folder, "s3://models/tiny", "s3-run-1", quiet, s3)
    assert len(s3.order) == count


def test_destinations_are_checked_before_anything_is_copied(full_ws, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert parse_destination("") is None
    assert parse_destination("hf://org/repo@main").target == "org/repo"
    assert parse_destination("s3://bucket/a/b").prefix == "a/b"
    for bad in ("gs://bucket/x", "hf://just-a-name", "s3://B/x", "hf://org/repo/extra"):
        with pytest.raises(ConfigError, match="push_to="):
            parse_destination(bad)
    before = sorted(p.name for p in (full_ws / "output").iterdir())
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        export_model(full_ws, RUNTIME, run_id="no-token", push_to="hf://org/repo",
                     log=lambda _: None)
    assert sorted(p.name for p in (full_ws / "output").iterdir()) == before


def test_hf_push_uploads_the_folder_with_the_token_from_the_environment(full_ws, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_0000")
    calls = []

    class Api:  # records what huggingface_hub.HfApi would be asked to do
        def create_repo(self, **kw):
            calls.append(("create_repo", kw))

        def create_branch(self, **kw):
            calls.append(("create_branch", kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return type("Commit", (), {"oid": "abc123def4567890"})()

    logs: list[str] = []
    result = export_model(full_ws, RUNTIME, run_id="hf-run", push_to="hf://me/tiny@v1",
                          log=logs.append, client=Api())
    assert result.destinations == ["hf://me/tiny@abc123def4567890"]
    names = [c[0] for c in calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    upload = calls[-1][1]
    assert upload["folder_path"] == result.path and upload["revision"] == "v1"
    assert ".*" in upload["ignore_patterns"]
    assert calls[0][1]["private"] is True
    assert not any("hf_not_a_real" in line for line in logs)
    assert "hf_not_a_real" not in json.dumps(result.metadata)
