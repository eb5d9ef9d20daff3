"""The parameter table drives the run form, check-config, the CLI and the README; one config."""

import argparse
import math
import warnings
from pathlib import Path

import pytest
import yaml

from kfp_finetune.config.parameters import ALIASES, BY_NAME, OPS, PARAMETERS
from kfp_finetune.config.run_config import RunConfig, canonical_names, from_values, to_values
from kfp_finetune.config.types import LoraConfig, TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.report import loss_curve_html
from kfp_finetune.steps.training_log import summarize

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "compiled"
RUNTIME = "torchtune-llama3.2-1b"


def _root_inputs(runtime: str) -> dict:
    spec = next(yaml.safe_load_all((COMPILED / f"{runtime}.yaml").read_text()))
    return spec["root"]["inputDefinitions"]["parameters"]


@pytest.mark.parametrize("runtime", ["torchtune-llama3.2-1b", "torchtune-llama3.2-tiny"])
def test_the_run_form_is_the_table(runtime):
    from kfp_finetune.config.runtimes import get_runtime

    inputs = _root_inputs(runtime)
    assert list(inputs) == sorted(p.name for p in PARAMETERS)
    rt = get_runtime(runtime)
    for p in PARAMETERS:
        spec = inputs[p.name]
        assert spec["description"].replace("\n", " ").split() == p.description.split(), p.name
        if p.optional:
            # Unset is empty in the form: no 0 / -1 / "auto" stand-in. The backend takes a root
            # parameter with neither value nor default when it is optional: the Argo compiler
            # fills a null (backend/src/v2/compiler/argocompiler/argo.go, root default
            # parameters) and the driver skips a null input whose component input is optional
            # (backend/src/v2/driver/resolve.go: resolveInputs, ErrResolvedParameterNull),
            # from release 2.14.0, under our 2.15 floor.
            assert spec["isOptional"] is True and "defaultValue" not in spec, p.name
        else:
            default = spec["defaultValue"]
            expected = p.default_for(rt)
            assert default == expected or (p.type is int and default == float(expected)), p.name


def test_no_magic_placeholder_in_any_default():
    from kfp_finetune.config.runtimes import RUNTIMES

    for rt in RUNTIMES.values():
        for p in PARAMETERS:
            assert p.default_for(rt) not in ("auto", "none", -1, -1.0), p.name
            if p.type in (int, float) and p.default is not None:
                assert p.default_for(rt) != 0 or p.name == "train_gpus_per_node", p.name


def test_names_carry_their_stage_so_the_sorted_form_groups_them():
    stages = {"cluster", "data", "eval", "export", "lora", "model", "registry", "secret",
              "serve", "track", "train", "workspace"}
    assert {p.name.split("_")[0] for p in PARAMETERS} == stages
    cluster_only = {p.name for p in PARAMETERS if p.cluster_only}
    assert all(BY_NAME[n].field == OPS for n in cluster_only)


def test_check_config_takes_every_parameter_and_nothing_else_does():
    from kfp_finetune.components.check_config import FIXED_INPUTS, build_check_config

    component = build_check_config(PARAMETERS)
    assert set(component.component_spec.inputs) == {p.name for p in PARAMETERS} | set(
        FIXED_INPUTS)
    from kfp_finetune.components.fine_tune import fine_tune

    assert set(fine_tune.component_spec.inputs) == {"config", "workspace_path"}


def _parser_dests(command: str) -> set[str]:
    from kfp_finetune.drivers.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest for a in sub.choices[command]._actions}


def test_the_cli_offers_the_table():
    run = _parser_dests("run")
    submit = _parser_dests("submit")
    for p in PARAMETERS:
        assert p.name in submit, p.name
        assert (p.name in run) is (not p.cluster_only), p.name


def test_the_readme_table_is_the_table():
    from kfp_finetune.drivers.docs import parameters_markdown, update_readme

    readme = ROOT / "README.md"
    assert update_readme(readme, check=True), "run `kfp-finetune compile`"
    table = parameters_markdown()
    for p in PARAMETERS:
        assert f"| `{p.name}` | {p.type.__name__} |" in table
        for alias in p.aliases:
            assert f"| `{alias}` | `{p.name}` |" in table


def test_every_training_setting_round_trips_through_the_one_dict():
    run = RunConfig(
        runtime=RUNTIME, dataset_uri="hf://org/data", model_uri="hf://org/model",
        model_ignore_patterns=["*.pth"], export_name="mine", push_to="s3://b/p",
        copy_to_artifact=True,
        trainer=TorchTuneConfig(
            dtype="fp32", batch_size=3, epochs=2, num_nodes=1, resources_per_node={"gpu": 2},
            peft_config=LoraConfig(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1,
                                   lora_attn_modules=["q_proj"], apply_lora_to_mlp=True,
                                   use_dora=True),
            dataset_preprocess_config=TorchTuneInstructDataset(
                source="json", split="train[:90%]", train_on_input=True,
                new_system_prompt="Be brief.", column_map={"input": "q"}),
            learning_rate=1e-4, gradient_accumulation_steps=2, max_seq_len=512, packed=True,
            compile=False, activation_checkpointing=True, max_steps_per_epoch=5, seed=7,
            overrides=["optimizer.eps=1e-6"], eval_split="train[90%:]"),
    )
    data = run.to_dict()
    assert RunConfig.from_dict(data) == run
    values = to_values(run)
    assert values["lora_method"] == "dora" and values["train_gpus_per_node"] == 2
    assert from_values(RUNTIME, values) == run
    # Through KFP a dict output is a protobuf Struct (google.protobuf.Value has one number
    # kind, a double): every number comes back a double, 3 -> 3.0.
    doubled = yaml.safe_load(yaml.safe_dump(data).replace(": 3\n", ": 3.0\n"))
    assert RunConfig.from_dict(doubled).trainer.batch_size == 3


def test_unset_values_leave_the_defaults_to_the_runtime():
    run = from_values(RUNTIME, {"data_uri": "hf://org/data", "train_learning_rate": None,
                                "lora_method": "", "export_name": ""})
    assert run.trainer.learning_rate is None and run.trainer.peft_config is None
    assert to_values(run) == {"data_uri": "hf://org/data", "export_copy_to_artifact": False,
                              # what TorchTuneInstructDataset fills in itself
                              "data_format": "parquet", "data_split": "train",
                              "data_train_on_input": False}


def test_earlier_names_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="'batch_size' is now 'train_batch_size'"):
        values = canonical_names({"batch_size": 2, "peft_method": "lora"})
    assert values == {"train_batch_size": 2, "lora_method": "lora"}
    assert all(ALIASES[a] == p.name for p in PARAMETERS for a in p.aliases)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="given twice"):
            canonical_names({"batch_size": 2, "train_batch_size": 3})


@pytest.mark.parametrize(("values", "named"), [
    ({"train_batch_sise": 2}, "did you mean train_batch_size"),
    ({"lora_method": "adapter"}, "lora_method='adapter'"),
    ({"train_packed": "maybe"}, "train_packed='maybe' must be true or false"),
    ({"train_learning_rate": 5.0}, "learning_rate=5.0"),
    ({"train_max_seq_len": 8}, "max_seq_len=8"),
    ({"train_overrides": ["output_dir=/tmp"]}, "'output_dir"),
    ({"train_overrides": ["nonsense"]}, "'nonsense'"),
    ({"lora_rank": 8}, "lora_method is empty"),
    ({"train_seed": math.inf}, "train_seed=inf must be a whole number"),
])
def test_bad_values_name_the_parameter(values, named):
    with pytest.raises(ConfigError) as info:
        from_values(RUNTIME, {"data_uri": "hf://org/data", **values})
    assert named in str(info.value)


def test_summary_and_loss_curve():
    rows = [{"step": 1, "loss": 3.0, "tokens_per_second_per_gpu": 10.0},
            {"step": 2, "loss": 2.0, "tokens_per_second_per_gpu": 100.0, "peak_memory_active": 1.5},
            {"step": 3, "loss": 2.5, "tokens_per_second_per_gpu": 120.0}]
    summary = summarize(rows, processes=2)
    assert summary == {"final_loss": 2.5, "best_loss": 2.0, "steps": 3,
                       "trainable_tokens_per_second": 220.0, "peak_memory_gib": 1.5}
    page = loss_curve_html([(1, 3.0), (2, 2.0), (3, 2.5)], "t <x>")
    assert "<polyline" in page and "t &lt;x&gt;" in page and "final 2.5000" in page
    assert "<script" not in page
    assert "No training step" in loss_curve_html([])
