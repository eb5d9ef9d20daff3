"""benchmark: lm-evaluation-harness tasks on the exported model, scores as KFP Metrics."""

from kfp import dsl

from kfp_finetune.config.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def benchmark_model(
    model_path: str,
    tasks: str,
    metrics: dsl.Output[dsl.Metrics],
    results: dsl.Output[dsl.Artifact],
    workspace_path: str = "/workspace",
    include_path: str = "",
    limit: float = 0.0,
    num_fewshot: int = -1,
    batch_size: str = "auto",
    device: str = "auto",
):
    """Run lm-eval tasks on the exported Hugging Face folder (merged model for LoRA runs).

    Runs in the trainer image (lm-eval and transformers are installed there), on the GPU node
    when it gets one. Task names are checked before the model loads. When every task is a local
    YAML file, the Hugging Face Hub is never contacted (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE).

    Args:
        model_path: The export step's 'path' output.
        tasks: Comma-separated lm-eval task or group names (e.g. arc_easy,hellaswag), or paths
            of task YAML files (relative paths: under the workspace).
        metrics: One metric per task and score, named <task>/<metric>, e.g. arc_easy/acc.
        results: lm-eval's full results as JSON.
        workspace_path: Where the workspace volume is mounted.
        include_path: Comma-separated folders of more task YAML files ("" for none).
        limit: Examples per task: 0 for all, a count, or a fraction below 1.
        num_fewshot: Few-shot examples per prompt (-1: each task's default).
        batch_size: A number, auto (largest that fits the GPU; 8 on CPU) or auto:N ("": auto).
        device: auto (CUDA when there is a GPU), cpu or cuda.
    """
    if not tasks.strip():  # the pipeline's eval_lm_tasks is empty: nothing to do
        print("[benchmark] skipped: eval_lm_tasks is empty")
        with open(results.path, "w") as handle:
            handle.write("{}")
        return
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("benchmark", workspace_path):
        from kfp_finetune.steps.benchmark import plan_benchmark, run_benchmark

        plan = plan_benchmark(tasks, include_path, limit, num_fewshot, batch_size or "auto",
                              base_dir=workspace_path)
        result = run_benchmark(model_path, plan, results_file=results.path, device=device)
        for name, value in sorted(result.metrics.items()):
            metrics.log_metric(name, value)
        results.metadata.update({"tasks": list(plan.tasks), "offline": result.offline,
                                 "lm_eval_version": result.results.get("lm_eval_version", "")})
