"""model-initializer: fetch the base model into /workspace/model and check it on CPU."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def model_initializer(
    runtime: str,
    model_uri: str,
    metrics: dsl.Output[dsl.Metrics],
    workspace_path: str = "/workspace",
    dtype: str = "",
    batch_size: int = 1,
    epochs: int = 1,
    loss: str = "",
    num_nodes: int = 1,
    gpus_per_node: int = 0,
    source: str = "parquet",
    split: str = "train",
    train_on_input: bool = False,
    new_system_prompt: str = "",
    column_map: dict = {},
    peft_method: str = "none",
    lora_rank: int = 0,
    lora_alpha: float = 0.0,
    lora_dropout: float = -1.0,
    lora_attn_modules: list = [],
    apply_lora_to_mlp: str = "auto",
    apply_lora_to_output: str = "auto",
    learning_rate: float = 0.0,
    gradient_accumulation_steps: int = 0,
    max_seq_len: int = 0,
    packed: str = "auto",
    compile: str = "auto",
    activation_checkpointing: str = "auto",
    max_steps_per_epoch: int = 0,
    seed: int = 42,
    overrides: list = [],
    ignore_patterns: list = [],
) -> NamedTuple(
    "ModelInfo",
    [("recipe", str), ("config", str), ("weight_files", int), ("files", int), ("bytes", int),
     ("seconds", float), ("revision", str), ("skipped", bool)],
):
    """Fetch the base model into <workspace>/model and check it against the runtime.

    The whole training config is validated before anything is downloaded, and the model's
    architecture and size are checked against the runtime (a 3B checkpoint on the 1B runtime
    is an error that names the right runtime).

    Args:
        runtime: Runtime name, e.g. torchtune-llama3.2-1b.
        model_uri: hf://org/repo, file:///abs/path or /abs/path ("" for the runtime default).
        metrics: Files, bytes and seconds fetched (shown in the KFP UI).
        workspace_path: Where the workspace volume is mounted.
        dtype: Training precision: bf16 or fp32.
        batch_size: Samples per device per step.
        epochs: Passes over the dataset.
        loss: Loss component (torchtune.modules.loss.CEWithChunkedOutputLoss).
        num_nodes: Nodes (must be 1).
        gpus_per_node: GPUs; decides the recipe.
        source: Format of the data files, checked here.
        split: Split expression, checked here.
        train_on_input: Whether the prompt counts in the loss.
        new_system_prompt: System prompt, checked here.
        column_map: Column map, checked here.
        peft_method: none (full fine-tuning), lora, qlora or dora.
        lora_rank: LoRA rank (0: the torchtune config's).
        lora_alpha: LoRA alpha (0: the torchtune config's).
        lora_dropout: LoRA dropout (negative: the torchtune config's).
        lora_attn_modules: Attention projections with LoRA ([]: q_proj, v_proj, output_proj).
        apply_lora_to_mlp: auto, true or false.
        apply_lora_to_output: auto, true or false.
        learning_rate: Learning rate (0: the runtime's or torchtune config's).
        gradient_accumulation_steps: Steps per optimizer update (0: the config's).
        max_seq_len: Longest tokenized sample (0: the runtime's on GPU, else none).
        packed: Pack samples into max_seq_len sequences: auto, true or false.
        compile: torch.compile the model: auto, true or false.
        activation_checkpointing: auto, true or false.
        max_steps_per_epoch: Stop each epoch after this many steps (0: no limit).
        seed: Random seed.
        overrides: Raw torchtune key=value overrides, applied last.
        ignore_patterns: Glob patterns of files not to fetch (as the Kubeflow SDK's), e.g.
            ["original/*"]; *.bin, *.pt, *.pth, *.h5 and *.msgpack are skipped anyway when
            the repository has safetensors.

    Returns:
        recipe and config: the torchtune recipe and base config that will run; weight_files,
        files, bytes, seconds: what was fetched; revision: the commit or version fetched;
        skipped: True when a complete copy was already in the workspace.
    """
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("model-initializer", workspace_path):
        from kfp_finetune.config.params import config_from_params
        from kfp_finetune.steps.model_initializer import initialize_model

        config = config_from_params(
            dtype=dtype, batch_size=batch_size, epochs=epochs, loss=loss, num_nodes=num_nodes,
            gpus_per_node=gpus_per_node, source=source, split=split, train_on_input=train_on_input,
            new_system_prompt=new_system_prompt, column_map=column_map,
            peft_method=peft_method, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, lora_attn_modules=lora_attn_modules,
            apply_lora_to_mlp=apply_lora_to_mlp, apply_lora_to_output=apply_lora_to_output,
            learning_rate=learning_rate, gradient_accumulation_steps=gradient_accumulation_steps,
            max_seq_len=max_seq_len, packed=packed, compile=compile,
            activation_checkpointing=activation_checkpointing,
            max_steps_per_epoch=max_steps_per_epoch, seed=seed, overrides=overrides,
        )
        result = initialize_model(
            workspace_path, model_uri, runtime, config, ignore_patterns=list(ignore_patterns or [])
        )
        fetched = result.fetch
        revision = fetched.revision
        for key, value in fetched.ui_metrics().items():
            metrics.log_metric(key, value)
        metrics.log_metric("weight_files", len(result.info.checkpoint_files))
        metrics.metadata["source"] = fetched.source
        metrics.metadata["revision"] = revision
        return (result.recipe, result.config, len(result.info.checkpoint_files), fetched.files,
                fetched.bytes, float(fetched.seconds), revision, fetched.skipped)
