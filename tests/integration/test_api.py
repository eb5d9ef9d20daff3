"""The Python API shaped like the Kubeflow Trainer SDK, run for real with kfp.local."""

import warnings

import pytest

import kfp_finetune as kf

SENTINEL = "hf_SENTINELtoken0123456789abcdef"


@pytest.mark.slow
def test_train_runs_the_pipeline_and_keeps_the_token_out_of_the_workspace(tiny, tmp_path, capfd):
    ws = tmp_path / "ws"
    result = kf.train(
        runtime="torchtune-llama3.2-tiny",
        initializer=kf.Initializer(
            dataset=kf.HuggingFaceDatasetInitializer(storage_uri=f"{tiny['alpaca']}/data"),
            model=kf.HuggingFaceModelInitializer(storage_uri=str(tiny["llama3_2"]),
                                                 access_token=SENTINEL),
        ),
        trainer=kf.BuiltinTrainer(config=kf.TorchTuneConfig(
            dtype=kf.DataType.FP32, epochs=1, max_steps_per_epoch=2,
            dataset_preprocess_config=kf.TorchTuneInstructDataset(split="train[:50%]"),
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


def test_api_rejects_bad_input_before_running(tmp_path):
    with pytest.raises(kf.ConfigError) as info:
        kf.train("torchtune-llama3.2-tiny", kf.Initializer(), workspace=tmp_path / "ws")
    assert "initializer.dataset" in str(info.value)
    with pytest.raises(kf.SourceError):
        kf.HuggingFaceDatasetInitializer(storage_uri="hf://only-org")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init = kf.HuggingFaceModelInitializer(storage_uri="hf://a/b", access_token=SENTINEL)
    assert SENTINEL not in repr(init)
    assert not (tmp_path / "ws").exists()
