"""The Python API shaped like the Kubeflow Trainer SDK, run for real with kfp.local.

``train()`` takes the SDK's own objects (``kubeflow.trainer``) as they are, including the
``Runtime`` that ``kfp_finetune.get_runtime()`` and ``TrainerClient().get_runtime()`` return.
"""

import kubeflow.trainer as sdk
import pytest

import kfp_finetune as kf
from kfp_finetune.config.runtimes import RUNTIMES
from kfp_finetune.drivers.client import LocalBackendConfig, TrainerClient

SENTINEL = "hf_SENTINELtoken0123456789abcdef"
TINY = "torchtune-llama3.2-tiny"


@pytest.mark.slow
def test_train_runs_the_pipeline_and_keeps_the_token_out_of_the_workspace(tiny, tmp_path, capfd):
    ws = tmp_path / "ws"
    runtime = kf.get_runtime(TINY)
    # The SDK's Runtime, as kfp_finetune.get_runtime and TrainerClient.get_runtime return it
    # (before issue 11, train() crashed on it with "TypeError: unhashable type").
    assert isinstance(runtime, sdk.Runtime)
    assert runtime == TrainerClient(LocalBackendConfig(workspace=tmp_path / "c")).get_runtime(TINY)
    result = kf.train(
        runtime=runtime,
        initializer=sdk.Initializer(
            dataset=sdk.HuggingFaceDatasetInitializer(storage_uri=f"{tiny['alpaca']}/data"),
            model=sdk.HuggingFaceModelInitializer(storage_uri=str(tiny["llama3_2"]),
                                                  access_token=SENTINEL),
        ),
        # Our TorchTuneConfig (an SDK one) for max_steps_per_epoch; the nested objects and
        # enum values are the SDK's, the dataset's source given as text.
        trainer=sdk.BuiltinTrainer(config=kf.TorchTuneConfig(
            dtype="fp32", epochs=1, max_steps_per_epoch=2,
            dataset_preprocess_config=sdk.TorchTuneInstructDataset(
                source="parquet", split="train[:50%]"),
        )),
        workspace=ws,
    )
    assert [s for s, _ in result.losses] == [1, 2]
    assert (result.model_dir / "config.json").is_file()
    captured = capfd.readouterr()
    assert SENTINEL not in captured.out + captured.err
    for path in ws.rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), path


def _initializer(tiny):
    return sdk.Initializer(
        dataset=sdk.HuggingFaceDatasetInitializer(storage_uri=f"{tiny['alpaca']}/data"),
        model=sdk.HuggingFaceModelInitializer(storage_uri=str(tiny["llama3_2"])),
    )


def test_train_takes_every_form_of_runtime(tiny, tmp_path):
    # A name, kfp_finetune.get_runtime's and TrainerClient.get_runtime's SDK Runtime, and the
    # project's own RuntimeSpec all pass the runtime check: the run then stops at the next
    # check (a bad export_name), before anything is written.
    client = TrainerClient(LocalBackendConfig(workspace=tmp_path / "client"))
    for runtime in (TINY, kf.get_runtime(TINY), client.get_runtime(TINY), RUNTIMES[TINY]):
        with pytest.raises(kf.KfpFinetuneError, match="export_name='a/b'"):
            kf.train(runtime, _initializer(tiny), export_name="a/b", workspace=tmp_path / "ws")
    with pytest.raises(kf.ConfigError, match="torchtune-llama4"):
        kf.train("torchtune-llama4", _initializer(tiny), workspace=tmp_path / "ws")
    with pytest.raises(kf.ConfigError, match="neither a runtime name nor a Runtime"):
        kf.train(object(), _initializer(tiny), workspace=tmp_path / "ws")
    assert not (tmp_path / "ws").exists()


def test_an_sdk_config_gets_our_checks_in_train(tiny, tmp_path):
    # The SDK's TorchTuneConfig checks nothing when built; train() checks it, same messages.
    for config, says in ((sdk.TorchTuneConfig(dtype="fp16"), "dtype='fp16'"),
                         (sdk.TorchTuneConfig(peft_config=sdk.LoraConfig(lora_rank=0)),
                          "lora_rank=0"),
                         (sdk.TorchTuneConfig(dataset_preprocess_config=sdk.
                                              TorchTuneInstructDataset(split="train[:150%]")),
                          "150%")):
        with pytest.raises(kf.ConfigError, match=says.replace("[", r"\[")):
            kf.train(TINY, _initializer(tiny), sdk.BuiltinTrainer(config=config),
                     workspace=tmp_path / "ws")
    assert not (tmp_path / "ws").exists()


def test_api_rejects_bad_input_before_running(tmp_path):
    with pytest.raises(kf.ConfigError) as info:
        kf.train(TINY, kf.Initializer(), workspace=tmp_path / "ws")
    assert "initializer.dataset" in str(info.value)
    # The SDK's initializer checks nothing when built (and shows its token in its repr):
    # train() checks the URI, and its message shows the URI, never the token.
    bad = kf.Initializer(
        dataset=kf.HuggingFaceDatasetInitializer(storage_uri="hf://only-org"),
        model=kf.HuggingFaceModelInitializer(storage_uri="hf://a/b", access_token=SENTINEL))
    with pytest.raises(kf.SourceError) as err:
        kf.train(TINY, bad, workspace=tmp_path / "ws")
    assert "'hf://only-org'" in str(err.value) and SENTINEL not in str(err.value)
    assert not (tmp_path / "ws").exists()
