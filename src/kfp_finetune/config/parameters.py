"""The parameter table: every pipeline parameter once, with its type, default, text and CLI flag.

This table drives the pipeline's signature and docstring (the KFP run form), the first task
(check-config, which turns the flat values into one validated config), the CLI options of
``run`` and ``submit``, and the README's parameter table; ``tests`` fail when they disagree.

Names carry their stage as a prefix: the KFP UI lists a run's parameters alphabetically
without their descriptions, so the prefix is what keeps a stage's settings together (the
approach of ilab-on-ocp's pipelines). ``cluster_`` pod placement and size, ``data_`` the
dataset, ``export_`` the result, ``lora_`` parameter-efficient tuning, ``model_`` the base
model, ``secret_`` Kubernetes Secret names, ``track_`` experiment tracking (MLflow, W&B),
``train_`` the training run, ``workspace_`` the per-run volume.

Unset is empty: a number or on/off setting whose default is decided later (by the runtime, the
torchtune config or the GPU node) is ``Optional`` with no value, and its description says what
the default is. Text, lists and maps use their empty value.

To add a setting end to end: a field on ``TorchTuneConfig`` (``config/types.py``) or
``RunConfig`` (``config/run_config.py``), one ``Param`` here whose ``field`` names it, and its
use (for a training setting, the ``tune run`` key in ``steps/tune_config.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kfp_finetune.config.runtimes import RuntimeSpec

DEFAULT_DATASET_URI = "hf://tatsu-lab/alpaca/data"
DEFAULT_HF_SECRET = "hf-token"
DEFAULT_S3_SECRET = "s3-credentials"
GPU_RESOURCE = "nvidia.com/gpu"

# Where a parameter's value goes: a RunConfig field ("model_uri"), a TorchTuneConfig field
# ("trainer.learning_rate", "trainer.peft_config.lora_rank"), or OPS for the settings that the
# pipeline hands to its tasks itself (cluster settings, the optional steps after the export).
OPS = "ops"


@dataclass(frozen=True)
class Param:
    """One pipeline parameter.

    Args:
        name: Name in the run form and in ``arguments=`` (stage prefix first).
        type: ``str``, ``int``, ``float``, ``bool``, ``dict`` or ``list``.
        description: One or two sentences; for an unset default, what is used then.
        field: Where the value goes (see ``OPS`` above).
        default: The default, a function of the runtime, or None: unset (empty in the form).
        flag: CLI option of ``run --local`` and ``submit`` (None: not on the CLI).
        cluster_only: Only a cluster run uses it (the CLI offers it on ``submit`` only).
        aliases: Earlier names, accepted with a deprecation warning for one release.
        cli_style: How the CLI reads a list or map: ``csv`` (a,b), ``append`` (repeat the
            flag), ``pairs`` (k=v,k=v), ``json``, ``single`` (one value, as a list of one).
    """

    name: str
    type: type
    description: str
    field: str
    default: Any = None
    flag: str | None = None
    cluster_only: bool = False
    aliases: tuple[str, ...] = ()
    cli_style: str = ""

    def default_for(self, runtime: RuntimeSpec) -> Any:
        """The default for one runtime (a copy for lists and maps)."""
        value = self.default(runtime) if callable(self.default) else self.default
        return list(value) if isinstance(value, list) else \
            dict(value) if isinstance(value, dict) else value

    @property
    def optional(self) -> bool:
        """Whether the parameter is unset (empty in the run form) unless given."""
        return self.default is None


def _ops_cpu(rt: RuntimeSpec) -> str:
    return str(4 * rt.default_gpus) if rt.default_gpus else "2"


def _ops_memory(rt: RuntimeSpec) -> str:
    return f"{32 * rt.default_gpus}Gi" if rt.default_gpus else "8Gi"


_rt: Callable[[str], Callable[[RuntimeSpec], Any]] = lambda attr: (  # noqa: E731
    lambda rt: getattr(rt, attr).value if hasattr(getattr(rt, attr), "value")
    else getattr(rt, attr))

PARAMETERS: tuple[Param, ...] = (
    # --- cluster: where and how big the fine-tune pod is
    Param("cluster_accelerator_type", str, "Accelerator resource of the fine-tune task, e.g. "
          "nvidia.com/gpu or amd.com/gpu; its count is train_gpus_per_node (none when 0).",
          OPS, GPU_RESOURCE, "--accelerator-type", True, ("accelerator_type",)),
    Param("cluster_cpu_request", str, "CPUs requested for the fine-tune task, e.g. 8 or 7500m.",
          OPS, _ops_cpu, "--cpu-request", True, ("cpu_request",)),
    Param("cluster_memory_request", str, "Memory requested for the fine-tune task, e.g. 64Gi.",
          OPS, _ops_memory, "--memory-request", True, ("memory_request",)),
    Param("cluster_node_selector", dict, "Node labels the fine-tune task must run on, e.g. "
          '{"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"} (empty: any node).',
          OPS, {}, "--node-selector", True, ("node_selector",), cli_style="json"),
    Param("cluster_tolerations", list, "More taints the fine-tune task tolerates, as a list of "
          'Kubernetes tolerations, e.g. [{"key": "dedicated", "operator": "Equal", "value": '
          '"ml", "effect": "NoSchedule"}] (GPU runtimes always tolerate '
          "nvidia.com/gpu:NoSchedule).", OPS, [], "--tolerations", True, ("tolerations",),
          cli_style="json"),
    # --- data: the dataset and how its rows become prompts
    Param("data_column_map", dict, 'Expected column -> your column, e.g. {"input": "question", '
          '"output": "answer"} (empty: instruction, input, output).',
          "trainer.dataset_preprocess_config.column_map", {}, "--column-map",
          aliases=("column_map",), cli_style="pairs"),
    Param("data_format", str, "Format of the data files: parquet, json, csv, arrow, text or xml.",
          "trainer.dataset_preprocess_config.source", "parquet", "--source",
          aliases=("source",)),
    Param("data_split", str, "Split expression, e.g. train or train[:95%].",
          "trainer.dataset_preprocess_config.split", "train", "--split", aliases=("split",)),
    Param("data_system_prompt", str, "System prompt prepended to every sample (empty: none).",
          "trainer.dataset_preprocess_config.new_system_prompt", "", "--new-system-prompt",
          aliases=("new_system_prompt",)),
    Param("data_train_on_input", bool, "Whether the prompt tokens count in the loss.",
          "trainer.dataset_preprocess_config.train_on_input", False, "--train-on-input",
          aliases=("train_on_input",)),
    Param("data_uri", str, "Dataset: hf://org/repo[/dir-or-file], s3://bucket/prefix, "
          "file:///abs/path or /abs/path.", "dataset_uri", DEFAULT_DATASET_URI, "--dataset-uri",
          aliases=("dataset_uri",)),
    # --- eval: held-out loss, and benchmarks after the export (optional)
    Param("eval_lm_batch_size", str, "lm-eval batch size: a number or auto:N (empty: auto, "
          "the largest that fits).", OPS, "", "--lm-eval-batch-size"),
    Param("eval_lm_include_path", str, "Folder of your own lm-eval task YAML files (on the "
          "workspace volume or in the image).", OPS, "", "--lm-eval-include-path"),
    Param("eval_lm_limit", float, "Examples per lm-eval task: a count, or a fraction below 1 "
          "(empty: all).", OPS, None, "--lm-eval-limit"),
    Param("eval_lm_num_fewshot", int, "Few-shot examples per lm-eval prompt (empty: each "
          "task's own).", OPS, None, "--lm-eval-num-fewshot"),
    Param("eval_lm_tasks", str, "lm-evaluation-harness tasks to run on the exported model, "
          "comma-separated names or task YAML paths (empty: no benchmark step).", OPS, "",
          "--lm-eval-tasks"),
    # held-out loss of the base and the fine-tuned model (fine-tune task)
    Param("eval_split", str, "Held-out split, e.g. train[95%:] with data_split=train[:95%]; "
          "it must not share a row with data_split. The fine-tune task reports the base and "
          "the fine-tuned model's loss and perplexity on it (empty: no held-out evaluation).",
          "trainer.eval_split", "", "--eval-split"),
    # --- export: where the fine-tuned model goes
    Param("export_copy_to_artifact", bool, "Also copy the model files into the KFP artifact "
          "store (the Model artifact holds only metadata otherwise; weights can be many GB).",
          "copy_to_artifact", False, "--copy-to-artifact", aliases=("copy_to_artifact",)),
    Param("export_name", str, "Folder under /workspace/output for the model (empty: "
          "<model>-finetuned-<run id>, a new folder per run). A name that holds another run's "
          "model is refused, never overwritten.", "export_name", "", "--export-name"),
    Param("export_push_to", str, "Also copy the exported model to hf://org/repo[@branch] (token "
          "from secret_hf_token) or s3://bucket/prefix (keys from secret_s3); empty: the model "
          "stays on the workspace volume only.", "push_to", "", "--push-to",
          aliases=("push_to",)),
    # --- lora: parameter-efficient fine-tuning
    Param("lora_alpha", float, "LoRA scaling alpha (empty: the torchtune config's).",
          "trainer.peft_config.lora_alpha", None, "--lora-alpha"),
    Param("lora_apply_to_mlp", bool, "LoRA on the MLP layers too (empty: the torchtune "
          "config's).", "trainer.peft_config.apply_lora_to_mlp", None, "--lora-apply-to-mlp",
          aliases=("apply_lora_to_mlp",)),
    Param("lora_apply_to_output", bool, "LoRA on the final output projection (empty: the "
          "torchtune config's).", "trainer.peft_config.apply_lora_to_output", None,
          "--lora-apply-to-output", aliases=("apply_lora_to_output",)),
    Param("lora_attn_modules", list, "Attention projections that get LoRA, among q_proj, "
          "k_proj, v_proj, output_proj (empty: q_proj, v_proj, output_proj).",
          "trainer.peft_config.lora_attn_modules", [], "--lora-attn-modules", cli_style="csv"),
    Param("lora_dropout", float, "Dropout on the LoRA path, in [0, 1) (empty: the torchtune "
          "config's).", "trainer.peft_config.lora_dropout", None, "--lora-dropout"),
    Param("lora_method", str, "Parameter-efficient method: lora, qlora (4-bit base, one GPU) "
          "or dora (empty: full fine-tuning of every weight).", "trainer.peft_config", "",
          "--peft", aliases=("peft_method",)),
    Param("lora_rank", int, "LoRA rank, 1 to 1024 (empty: the torchtune config's, e.g. 64).",
          "trainer.peft_config.lora_rank", None, "--lora-rank"),
    # --- model: the base model
    Param("model_ignore_patterns", list, 'Glob patterns of model files not to download, e.g. '
          '["original/*.pth"] (other weight formats are skipped when safetensors exist).',
          "model_ignore_patterns", [], "--model-ignore-patterns", cli_style="csv"),
    Param("model_uri", str, "Base model: hf://org/repo, s3://bucket/prefix, file:///abs/path or "
          "/abs/path.", "model_uri", lambda rt: rt.model_uri, "--model-uri"),
    # --- registry: the Kubeflow Model Registry (optional)
    Param("registry_author", str, "Author recorded with the registered model.", OPS,
          "kfp-finetune", "--registry-author"),
    Param("registry_model_name", str, "Registered model name (empty: <base model>-finetuned).",
          OPS, "", "--registry-model-name"),
    Param("registry_url", str, "Model Registry REST address, e.g. "
          "https://model-registry.kubeflow.svc:8443 (empty: the model is not registered).",
          OPS, "", "--registry-url"),
    Param("registry_version", str, "Version name (empty: the export folder's name, which "
          "carries the run id).", OPS, "", "--registry-version"),
    # --- secret: names of Kubernetes Secrets (never the values)
    Param("secret_hf_token", str, "Name of the Kubernetes Secret with key HF_TOKEN, for gated "
          "or private repos and export_push_to=hf://... It need not exist, but the name must "
          "not be empty.", OPS, DEFAULT_HF_SECRET, "--hf-token-secret", True,
          ("hf_token_secret",)),
    Param("secret_registry_token", str, "Name of the Kubernetes Secret with key "
          "MODEL_REGISTRY_TOKEN for the Model Registry (optional; without it the pod's service "
          "account token is used).", OPS, "model-registry-token", "--registry-token-secret",
          True),
    Param("secret_s3", str, "Name of the Kubernetes Secret with keys AWS_ACCESS_KEY_ID, "
          "AWS_SECRET_ACCESS_KEY and optionally AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, "
          "AWS_DEFAULT_REGION. It need not exist, but the name must not be empty.", OPS,
          DEFAULT_S3_SECRET, "--s3-secret", True, ("s3_secret",)),
    Param("secret_tracking", str, "Name of the Kubernetes Secret with the experiment trackers' "
          "credentials: MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
          "MLFLOW_TRACKING_PASSWORD; WANDB_API_KEY and WANDB_BASE_URL (each key optional). It "
          "need not exist, but the name must not be empty.", OPS, "tracking-credentials",
          "--tracking-secret", True),
    # --- serve: a KServe InferenceService for the model (optional)
    Param("serve_apply", bool, "Create or update the InferenceService in the cluster (needs "
          "RBAC on inferenceservices.serving.kserve.io); otherwise only its YAML is written.",
          OPS, False, "--serve-apply", True),
    Param("serve_cpu", str, "CPU request of the predictor, e.g. 4 (empty: KServe's default).",
          OPS, "", "--serve-cpu"),
    Param("serve_gpus", int, "GPUs of the predictor (0: the Hugging Face backend on CPU; "
          "otherwise vLLM).", OPS, 1, "--serve-gpus"),
    Param("serve_max_model_len", int, "Longest context the server accepts (empty: the "
          "model's).", OPS, None, "--serve-max-model-len"),
    Param("serve_memory", str, "Memory request of the predictor, e.g. 24Gi (empty: KServe's "
          "default).", OPS, "", "--serve-memory"),
    Param("serve_name", str, "InferenceService name (empty: no serving step), at most 53 "
          "characters.", OPS, "", "--serve-name"),
    Param("serve_namespace", str, "Namespace of the InferenceService (empty: the run's).", OPS,
          "", "--serve-namespace"),
    Param("serve_runtime", str, "ServingRuntime name (empty: KServe picks the Hugging Face "
          "runtime).", OPS, "", "--serve-runtime"),
    Param("serve_service_account", str, "Service account of the predictor, for storage "
          "credentials (empty: the namespace's default).", OPS, "", "--serve-service-account"),
    # --- track: experiment tracking (settings only; credentials from secret_tracking)
    Param("track_mlflow_experiment", str, "MLflow experiment of the run (empty: kfp-finetune; "
          "created when missing).", "tracking.mlflow_experiment", "",
          "--track-mlflow-experiment"),
    Param("track_mlflow_uri", str, "MLflow tracking server, http(s)://host[:port][/path]; "
          "the run logs params, per-step loss, final metrics and the model's location there "
          "(empty: no MLflow).", "tracking.mlflow_tracking_uri", "", "--track-mlflow-uri"),
    Param("track_run_name", str, "Name of the tracked run (empty: the tracker's choice).",
          "tracking.run_name", "", "--track-run-name"),
    Param("track_wandb_entity", str, "W&B entity (team or user) of the project (empty: the API "
          "key's default).", "tracking.wandb_entity", "", "--track-wandb-entity"),
    Param("track_wandb_project", str, "W&B project the run logs to (empty: no W&B).",
          "tracking.wandb_project", "", "--track-wandb-project"),
    # --- train: the training run
    Param("train_activation_checkpointing", bool, "Recompute activations to save memory "
          "(empty: off where the card's memory allows, see README Runtimes).",
          "trainer.activation_checkpointing", None, "--activation-checkpointing",
          aliases=("activation_checkpointing",)),
    Param("train_batch_size", int, "Samples per device per step.", "trainer.batch_size",
          _rt("default_batch_size"), "--batch-size", aliases=("batch_size",)),
    Param("train_compile", bool, "torch.compile the model and loss (empty: on for GPU "
          "runtimes).", "trainer.compile", None, "--compile", aliases=("compile",)),
    Param("train_dtype", str, "Training precision: bf16 or fp32.", "trainer.dtype",
          _rt("default_dtype"), "--dtype", aliases=("dtype",)),
    Param("train_epochs", int, "Passes over the dataset.", "trainer.epochs",
          _rt("default_epochs"), "--epochs", aliases=("epochs",)),
    Param("train_gpus_per_node", int, "GPUs for the fine-tune task (0: CPU); also the "
          "process count.", "trainer.resources_per_node.gpu", _rt("default_gpus"), "--gpus",
          aliases=("gpus_per_node",)),
    Param("train_gradient_accumulation_steps", int, "Batches per optimizer update (empty: "
          "the torchtune config's).", "trainer.gradient_accumulation_steps", None,
          "--gradient-accumulation-steps", aliases=("gradient_accumulation_steps",)),
    Param("train_learning_rate", float, "Learning rate (empty: the torchtune config's).",
          "trainer.learning_rate", None, "--learning-rate", aliases=("learning_rate",)),
    Param("train_weight_decay", float, "AdamW weight decay, in [0, 1) (empty: the torchtune "
          "config's).", "trainer.weight_decay", None, "--weight-decay"),
    Param("train_loss", str, "Loss component (torchtune.modules.loss.CEWithChunkedOutputLoss).",
          "trainer.loss", "torchtune.modules.loss.CEWithChunkedOutputLoss", "--loss",
          aliases=("loss",)),
    Param("train_max_seq_len", int, "Longest tokenized sample; longer ones are truncated "
          "(empty: the runtime's 2048 on GPU, no limit on CPU).", "trainer.max_seq_len", None,
          "--max-seq-len", aliases=("max_seq_len",)),
    Param("train_max_steps_per_epoch", int, "Stop each epoch after this many steps (empty: "
          "the whole epoch).", "trainer.max_steps_per_epoch", None, "--max-steps-per-epoch",
          aliases=("max_steps_per_epoch",)),
    Param("train_num_nodes", int, "Nodes; only 1 is supported.", "trainer.num_nodes", 1,
          "--num-nodes", aliases=("num_nodes",)),
    Param("train_overrides", list, 'Raw torchtune key=value overrides applied last, e.g. '
          '["optimizer.eps=1e-6"]; the keys the pipeline owns (output_dir, paths, the metric '
          "logger, ...) are refused.", "trainer.overrides", [], "--override",
          aliases=("overrides",), cli_style="append"),
    Param("train_packed", bool, "Pack samples into train_max_seq_len sequences (empty: on for "
          "GPU runtimes).", "trainer.packed", None, "--packed", aliases=("packed",)),
    Param("train_seed", int, "Random seed, for reproducible runs.", "trainer.seed", 42,
          "--seed", aliases=("seed",)),
    # --- workspace: the per-run volume
    Param("workspace_access_modes", list, "Access modes of the volume; ReadWriteMany lets the "
          "two initializers run on different nodes at once.", OPS, ["ReadWriteOnce"],
          "--pvc-access-mode", True, ("pvc_access_modes",), cli_style="single"),
    Param("workspace_delete_on_success", bool, "Delete the run's volume after a successful run, "
          "but only when export_push_to copied the model elsewhere.", OPS, False,
          "--delete-workspace", True, ("delete_workspace",)),
    Param("workspace_keep_on_failure", bool, "Keep the volume of a failed run, for debugging or "
          "the UI's retry (default: a failed run's volume is deleted).", OPS, False,
          "--keep-workspace-on-failure", True, ("keep_workspace_on_failure",)),
    Param("workspace_pvc_size", str, "Size of the per-run volume kfp-finetune-<run id>, e.g. "
          "20Gi.", OPS, lambda rt: rt.pvc_size, "--pvc-size", True, ("pvc_size",)),
    Param("workspace_storage_class", str, "StorageClass of the volume (kubectl get "
          "storageclass; one that does not exist leaves the run Pending).", OPS, "standard",
          "--pvc-storage-class", True, ("pvc_storage_class",)),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMETERS}
ALIASES: dict[str, str] = {alias: p.name for p in PARAMETERS for alias in p.aliases}
