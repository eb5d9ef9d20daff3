"""fine-tune: run torchtune on the GPU node over /workspace/{dataset,model}."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.config.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def fine_tune(
    runtime: str,
    metrics: dsl.Output[dsl.Metrics],
    loss_curve: dsl.Output[dsl.HTML],
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
    eval_split: str = "",
) -> NamedTuple("TrainInfo", [("final_loss", float), ("steps", int), ("checkpoint_dir", str)]):
    """Render the torchtune config, run `tune run` and stream its log.

    The full config is saved as <workspace>/output/checkpoints/torchtune_config.yaml. A re-run
    with the same config finds the finished checkpoint and does not train again.

    Args:
        runtime: Runtime name, e.g. torchtune-llama3.2-1b.
        metrics: Final and best loss, steps, trainable tokens/s, peak GPU memory, wall time.
        loss_curve: The loss per step as a chart (rendered by the KFP UI).
        workspace_path: Where the workspace volume is mounted.
        dtype: Training precision: bf16 or fp32.
        batch_size: Samples per device per step.
        epochs: Passes over the dataset.
        loss: Loss component.
        num_nodes: Nodes (must be 1).
        gpus_per_node: GPUs: 0 trains on CPU, 1 on one GPU, 2-8 with torchrun.
        source: Format of the data files.
        split: Split expression.
        train_on_input: Whether the prompt counts in the loss.
        new_system_prompt: System prompt ("" for none).
        column_map: Column map.
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
        eval_split: Held-out split for base and fine-tuned eval loss, e.g. train[95%:] ("": none).

    Returns:
        final_loss, steps and the checkpoint folder.
    """
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("fine-tune", workspace_path):
        from kfp_finetune.config.params import config_from_params
        from kfp_finetune.steps.fine_tune import run_fine_tune
        from kfp_finetune.steps.report import eval_references, loss_curve_html

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
        result = run_fine_tune(workspace_path, runtime, config, eval_split=eval_split)
        for key, value in result.metrics.items():
            if value is not None:
                metrics.log_metric(key, value)
        metrics.log_metric("resumed_from_epoch", result.resumed_from_epoch)
        with open(loss_curve.path, "w") as handle:
            handle.write(loss_curve_html(result.losses, f"{runtime}: training loss",
                                         eval_references(result.metrics)))
        return (result.final_loss, len(result.losses), result.checkpoint_dir)
