"""The ``kfp-finetune`` command line."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from kfp_finetune.errors import ConfigError, KfpFinetuneError
from kfp_finetune.storage.ownership import check_workspace_path

DEFAULT_WORKSPACE = "kfp-finetune-workspace"


def parse_column_map(text: str) -> dict[str, str]:
    """Parse ``input=COL,output=COL`` into a dict.

    Raises:
        ConfigError: An item is not ``key=value``.
    """
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(
                f"--column-map item {item!r} is not KEY=COLUMN; write e.g. "
                "--column-map input=question,output=answer."
            )
        result[key.strip()] = value.strip()
    return result


def _cmd_runtimes(_: argparse.Namespace) -> int:
    from kfp_finetune.config.runtimes import RUNTIMES

    rows = [("RUNTIME", "GPUS", "MODEL", "DESCRIPTION")]
    for rt in RUNTIMES.values():
        rows.append((rt.name, str(rt.default_gpus), rt.model_uri or "(give --model-uri)",
                     rt.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from kfp_finetune.config.runtimes import get_runtime
    from kfp_finetune.drivers.compile import REPO_COMPILED, check_compiled, compile_all

    names = [get_runtime(n).name for n in args.runtime] if args.runtime else None
    out = Path(args.output_dir) if args.output_dir else REPO_COMPILED
    if args.check:
        problems = check_compiled(out, names)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return 1
        print(f"{out}: up to date")
        return 0
    for path in compile_all(out, names):
        print(path)
    return 0


def _config_from_args(args: argparse.Namespace):
    from kfp_finetune.config.params import lora_from_params
    from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset

    column_map = parse_column_map(args.column_map) if args.column_map else None
    return TorchTuneConfig(
        dtype=args.dtype,
        batch_size=args.batch_size,
        epochs=args.epochs,
        loss=args.loss,
        num_nodes=args.num_nodes,
        resources_per_node=None if args.gpus is None else {"gpu": args.gpus},
        dataset_preprocess_config=TorchTuneInstructDataset(
            source=args.source,
            split=args.split,
            train_on_input=args.train_on_input,
            new_system_prompt=args.new_system_prompt,
            column_map=column_map,
        ),
        peft_config=lora_from_params(
            args.peft, args.lora_rank or 0, args.lora_alpha or 0.0,
            -1.0 if args.lora_dropout is None else args.lora_dropout,
            args.lora_attn_modules.split(",") if args.lora_attn_modules else None,
        ),
        learning_rate=args.learning_rate,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_seq_len=args.max_seq_len,
        packed=args.packed,
        compile=args.compile,
        activation_checkpointing=args.activation_checkpointing,
        max_steps_per_epoch=args.max_steps_per_epoch,
        seed=args.seed,
        overrides=args.override or None,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from kfp_finetune.drivers.local import run_local

    if not args.local:
        raise ConfigError(
            "`kfp-finetune run` runs the pipeline on this machine and needs --local; for a "
            "cluster, upload compiled/<runtime>.yaml to Kubeflow Pipelines."
        )
    check_workspace_path(args.workspace, "--workspace")  # never '' (the current directory)
    config = _config_from_args(args)
    result = run_local(
        args.runtime, args.model_uri, args.dataset_uri, config, args.workspace, args.export_name
    )
    print("\nloss per step:")
    for step, loss in result.losses:
        print(f"  step {step:4d}  loss {loss:.4f}")
    if result.loss_curve is not None:
        print(f"\nloss curve: {result.loss_curve}")
    print(f"\nfine-tuned model: {result.model_dir}")
    return 0


def _cmd_secret_help(args: argparse.Namespace) -> int:
    from kfp_finetune.storage.credentials import hf_secret_command, s3_secret_command

    print("Store credentials as Kubernetes Secrets (never as pipeline parameters). With the")
    print("values in shell variables (HF_TOKEN, AWS_ACCESS_KEY_ID, ...), run:\n")
    print(f"  {hf_secret_command(args.hf_secret, args.namespace)}")
    print(f"  {s3_secret_command(args.s3_secret, args.namespace)}\n")
    print("and run the pipeline with hf_token_secret / s3_secret naming them (both optional).")
    return 0


def _cmd_fixtures(args: argparse.Namespace) -> int:
    from kfp_finetune.drivers.fixtures import make_fixtures

    for name, path in make_fixtures(args.dir).items():
        print(f"{name}: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kfp_finetune.drivers.fixtures import make_fixtures

    workspace = check_workspace_path(args.workspace, "--workspace")
    fixtures = make_fixtures(workspace.parent / "kfp-finetune-fixtures")
    args.local = True
    args.runtime = "torchtune-llama3.2-tiny"
    args.model_uri = str(fixtures["llama3_2"])
    args.dataset_uri = str(fixtures["alpaca"] / "data")
    return _cmd_run(args)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default=DEFAULT_WORKSPACE,
                   help=f"local folder used as the workspace volume (default: {DEFAULT_WORKSPACE})")
    _add_training_options(p)


def _add_training_options(p: argparse.ArgumentParser) -> None:
    # The options `run` and `submit` share (everything but where the run happens).
    p.add_argument("--dtype", help="bf16 or fp32 (default: the runtime's)")
    p.add_argument("--batch-size", type=int, help="samples per device per step")
    p.add_argument("--epochs", type=int, help="passes over the dataset")
    p.add_argument("--loss", help="loss: CEWithChunkedOutputLoss (default)")
    p.add_argument("--num-nodes", type=int, default=None, help="nodes (only 1 is supported)")
    p.add_argument("--gpus", type=int, help="GPUs per node (0 = CPU; default: the runtime's)")
    p.add_argument("--source", help="format of the data files: parquet (default), json, csv, ...")
    p.add_argument("--split", help="split expression, e.g. train[:95%%] (default: train)")
    p.add_argument("--train-on-input", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the prompt counts in the loss (default: no)")
    p.add_argument("--new-system-prompt", help="system prompt prepended to every sample")
    p.add_argument("--column-map", help="expected=yours pairs, e.g. input=question,output=answer")
    p.add_argument("--export-name", default="", help="folder name under output/ for the model")
    p.add_argument("--peft", default="none", help="none (full), lora, qlora or dora")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default: the torchtune config's)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout")
    p.add_argument("--lora-attn-modules", help="e.g. q_proj,v_proj,output_proj")
    p.add_argument("--learning-rate", type=float, help="learning rate")
    p.add_argument("--gradient-accumulation-steps", type=int, help="batches per update")
    p.add_argument("--max-seq-len", type=int, help="longest tokenized sample (needed to pack)")
    for flag, text in (("packed", "pack samples into max_seq_len sequences"),
                       ("compile", "torch.compile the model and loss"),
                       ("activation-checkpointing", "recompute activations to save memory")):
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None,
                       help=f"{text} (default: the runtime's)")
    p.add_argument("--max-steps-per-epoch", type=int, help="stop each epoch after N steps")
    p.add_argument("--seed", type=int, help="random seed (default 42)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="raw torchtune override, applied last (repeatable)")


def _cmd_submit(args: argparse.Namespace) -> int:
    from kfp_finetune.drivers.local import pipeline_arguments
    from kfp_finetune.drivers.submit import (
        Connection,
        api_errors,
        make_client,
        normalize_cron,
        ops_arguments,
        submit,
        wait,
    )

    if args.wait and args.schedule:
        raise ConfigError(
            "--wait follows one run; a --schedule creates runs later. Drop one of the two."
        )
    config = _config_from_args(args)
    arguments = pipeline_arguments(
        args.runtime, args.model_uri, args.dataset_uri, config, args.export_name
    )
    arguments.update(ops_arguments(
        push_to=args.push_to, delete_workspace=args.delete_workspace,
        keep_workspace_on_failure=args.keep_workspace_on_failure,
        copy_to_artifact=args.copy_to_artifact, pvc_size=args.pvc_size,
        pvc_storage_class=args.pvc_storage_class, pvc_access_mode=args.pvc_access_mode,
        accelerator_type=args.accelerator_type, node_selector=args.node_selector,
        tolerations=args.tolerations, cpu_request=args.cpu_request,
        memory_request=args.memory_request, hf_token_secret=args.hf_token_secret,
        s3_secret=args.s3_secret,
    ))
    if args.schedule is not None:
        normalize_cron(args.schedule)  # checked before anything is sent
    conn = Connection(
        host=args.host, namespace=args.namespace, kube_context=args.kube_context,
        token_file=args.token_file, ssl_ca_cert=args.ssl_ca_cert,
    )
    with api_errors(conn):
        client = make_client(conn)
        result = submit(
            client, args.runtime, arguments, experiment=args.experiment, run_name=args.run_name,
            schedule=args.schedule, max_concurrency=args.max_concurrency,
            namespace=args.namespace,
        )
        if result.recurring_run_id:
            print(f"recurring run: {result.recurring_run_id}")
            return 0
        print(f"run: {result.run_id}")
        if not args.wait:
            return 0
        state = wait(client, result.run_id or "", args.wait_timeout, poll_s=args.poll_interval)
    return 0 if state == "SUCCEEDED" else 1


def _add_submit_options(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("connection (authentication as kfp.Client does it)")
    c.add_argument("--host", help="KFP endpoint, e.g. http://localhost:8080 or "
                   "https://kubeflow.example.com/pipeline (default: $KF_PIPELINES_ENDPOINT; "
                   "none: in-cluster service, else the kubeconfig context)")
    c.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
    c.add_argument("--kube-context", help="kubeconfig context (when no --host is given)")
    c.add_argument("--token-file", help="file with a bearer token (default: $KFP_TOKEN if set)")
    c.add_argument("--ssl-ca-cert", help="CA bundle of a self-signed endpoint")
    r = p.add_argument_group("run")
    r.add_argument("--experiment", default="kfp-finetune", help="experiment (created if missing)")
    r.add_argument("--run-name", help="display name of the run or recurring run")
    r.add_argument("--schedule", metavar="CRON",
                   help="create a recurring run instead: '0 3 * * *' (5 fields), 6 fields with "
                   "seconds first, or @daily / '@every 12h'")
    r.add_argument("--max-concurrency", type=int, default=1,
                   help="runs of the schedule allowed at once (default: 1)")
    r.add_argument("--wait", action="store_true", help="follow the run to its end; exit 1 "
                   "unless it succeeded")
    r.add_argument("--wait-timeout", type=float, default=7 * 24 * 3600,
                   help="seconds --wait waits (default: 7 days)")
    r.add_argument("--poll-interval", type=float, default=30.0, help=argparse.SUPPRESS)
    o = p.add_argument_group("operations (default: the pipeline's)")
    o.add_argument("--push-to", default="",
                   help="also copy the model to hf://org/repo[@branch] or s3://bucket/prefix")
    o.add_argument("--delete-workspace", action="store_true",
                   help="delete the run's volume after the export (needs --push-to)")
    o.add_argument("--keep-workspace-on-failure", action="store_true",
                   help="keep a failed run's volume (for debugging or the UI's retry)")
    o.add_argument("--copy-to-artifact", action="store_true",
                   help="also copy the weights into the KFP artifact store")
    o.add_argument("--pvc-size", help="size of the per-run volume, e.g. 100Gi")
    o.add_argument("--pvc-storage-class", help="StorageClass of the volume")
    o.add_argument("--pvc-access-mode", help="ReadWriteOnce (default) or ReadWriteMany")
    o.add_argument("--accelerator-type", help="accelerator resource, e.g. nvidia.com/gpu")
    o.add_argument("--node-selector", metavar="JSON",
                   help='node labels for fine-tune, e.g. \'{"gpu": "a100"}\'')
    o.add_argument("--tolerations", metavar="JSON", help="JSON list of tolerations for fine-tune")
    o.add_argument("--cpu-request", help="CPUs for fine-tune, e.g. 8")
    o.add_argument("--memory-request", help="memory for fine-tune, e.g. 64Gi")
    o.add_argument("--hf-token-secret", help="Secret with key HF_TOKEN (default: hf-token)")
    o.add_argument("--s3-secret", help="Secret with AWS_* keys (default: s3-credentials)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kfp-finetune``."""
    parser = argparse.ArgumentParser(
        prog="kfp-finetune",
        description="Fine-tune LLMs with torchtune on Kubeflow Pipelines.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("runtimes", help="list the runtimes")
    p.set_defaults(func=_cmd_runtimes)

    p = sub.add_parser("compile", help="compile the pipelines to compiled/")
    p.add_argument("--runtime", action="append", help="only this runtime (repeatable)")
    p.add_argument("--check", action="store_true",
                   help="exit non-zero when compiled/ differs from a fresh compile")
    p.add_argument("--output-dir", help="write here instead of the repository's compiled/")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("run", help="run the whole pipeline (--local: on this machine)")
    p.add_argument("--local", action="store_true", help="run with kfp.local on this machine")
    p.add_argument("--runtime", required=True, help="runtime name (kfp-finetune runtimes)")
    p.add_argument("--model-uri", default="", help="hf://org/repo, file:///path or /path")
    p.add_argument("--dataset-uri", required=True,
                   help="hf://org/repo[/dir-or-file], file:///path or /path")
    _add_run_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "submit", help="upload the pipeline to Kubeflow and start a run (or a recurring run)"
    )
    p.add_argument("--runtime", required=True, help="runtime name (kfp-finetune runtimes)")
    p.add_argument("--model-uri", default="", help="hf://org/repo (default: the runtime's)")
    p.add_argument("--dataset-uri", required=True, help="hf://org/repo[/dir-or-file]")
    _add_training_options(p)
    _add_submit_options(p)
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("secret-help", help="print how to store the HF token / S3 keys as Secrets")
    p.add_argument("--namespace", help="Kubeflow namespace of your runs")
    p.add_argument("--hf-secret", default="hf-token", help="Secret name for HF_TOKEN")
    p.add_argument("--s3-secret", default="s3-credentials", help="Secret name for S3 keys")
    p.set_defaults(func=_cmd_secret_help)

    p = sub.add_parser("fixtures", help="write the tiny test models and dataset")
    p.add_argument("dir", help="folder to write them under")
    p.set_defaults(func=_cmd_fixtures)

    p = sub.add_parser(
        "demo", help="make the tiny fixtures and run the whole pipeline locally on CPU"
    )
    _add_run_options(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kfp-finetune``."""
    from kfp_finetune.steps.step_errors import EXIT_INTERRUPTED, INTERRUPTED, error_line

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KfpFinetuneError as exc:
        sys.stdout.flush()  # the error stays the last line when both streams share a terminal
        # A step's error (a failed local run) ends with the very line that ended the step.
        line = error_line(exc) if getattr(exc, "step", None) else f"error: {exc}"
        print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as exc:
        if "finished with status" in str(exc) or "Task" in str(exc):
            # Not one of our errors: a bug, whose traceback is in the task's log.
            sys.stdout.flush()
            print(f"error: {_plain(str(exc))} (the task's traceback above says why)",
                  file=sys.stderr)
            return 1
        raise


def _plain(text: str) -> str:
    # kfp.local colours task names with ANSI escapes; a log file should not carry them.
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


if __name__ == "__main__":
    sys.exit(main())
