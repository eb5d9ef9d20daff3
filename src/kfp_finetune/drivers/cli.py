"""The ``kfp-finetune`` command line."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from kfp_finetune.drivers.cli_options import add_parameter_options
from kfp_finetune.errors import ConfigError, KfpFinetuneError
from kfp_finetune.storage.ownership import check_workspace_path

DEFAULT_WORKSPACE = "kfp-finetune-workspace"


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
    from kfp_finetune.drivers.component_docs import update_component_docs
    from kfp_finetune.drivers.docs import update_readme

    names = [get_runtime(n).name for n in args.runtime] if args.runtime else None
    out = Path(args.output_dir) if args.output_dir else REPO_COMPILED
    readme = REPO_COMPILED.parent / "README.md"
    in_repo = out.resolve() == REPO_COMPILED.resolve() and readme.exists()
    if args.check:
        problems = check_compiled(out, names)
        if in_repo and not update_readme(readme, check=True):
            problems.append(f"{readme}: parameter table stale (run `kfp-finetune compile`)")
        if in_repo:
            problems += update_component_docs(check=True)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return 1
        print(f"{out}: up to date")
        return 0
    for path in compile_all(out, names):
        print(path)
    if in_repo:
        update_readme(readme)
        bad = update_component_docs()  # metadata.yaml problems: fixed by hand
        for line in bad:
            print(line, file=sys.stderr)
        return 1 if bad else 0
    return 0


def _cmd_parameters(_: argparse.Namespace) -> int:
    from kfp_finetune.drivers.docs import parameters_markdown

    print(parameters_markdown(), end="")
    return 0


def _run_from_args(args: argparse.Namespace, cluster: bool):
    """The checked run config and the operations values of ``run``/``submit``'s options."""
    from kfp_finetune.config.parameters import BY_NAME, OPS
    from kfp_finetune.drivers.cli_options import values_from_args
    from kfp_finetune.steps.check_run import check_run

    values = values_from_args(args, cluster)
    if not values.get("data_uri"):
        raise ConfigError("--dataset-uri is required: the dataset's URI, e.g. hf://org/repo, "
                          "s3://bucket/prefix or /abs/path/to/data.")
    ops = {k: v for k, v in values.items() if BY_NAME[k].field == OPS}
    run = check_run(args.runtime, {k: v for k, v in values.items() if k not in ops})
    return run, ops


def _cmd_run(args: argparse.Namespace) -> int:
    from kfp_finetune.drivers.local import run_config_local

    if not args.local:
        raise ConfigError(
            "`kfp-finetune run` runs the pipeline on this machine and needs --local; for a "
            "cluster, upload compiled/<runtime>.yaml to Kubeflow Pipelines."
        )
    check_workspace_path(args.workspace, "--workspace")  # never '' (the current directory)
    run, _ = _run_from_args(args, cluster=False)
    result = run_config_local(run, args.workspace)
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
    print("and run the pipeline with secret_hf_token / secret_s3 naming them (both optional).")
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
    args.data_uri = str(fixtures["alpaca"] / "data")
    return _cmd_run(args)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default=DEFAULT_WORKSPACE,
                   help=f"local folder used as the workspace volume (default: {DEFAULT_WORKSPACE})")
    add_parameter_options(p.add_argument_group("pipeline parameters"), cluster=False)


def _cmd_submit(args: argparse.Namespace) -> int:
    from kfp_finetune.drivers.submit import (
        Connection,
        api_errors,
        make_client,
        normalize_cron,
        submit,
        wait,
    )

    if args.wait and args.schedule:
        raise ConfigError(
            "--wait follows one run; a --schedule creates runs later. Drop one of the two."
        )
    from kfp_finetune.config.run_config import to_values
    from kfp_finetune.drivers.submit_checks import check_ops_values

    run, ops = _run_from_args(args, cluster=True)
    arguments = {**to_values(run), **check_ops_values({**ops, "export_push_to": run.push_to})}
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
    add_parameter_options(p.add_argument_group("pipeline parameters (default: the pipeline's)"),
                          cluster=True)


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

    p = sub.add_parser("parameters", help="list the pipeline parameters (Markdown table)")
    p.set_defaults(func=_cmd_parameters)

    p = sub.add_parser("run", help="run the whole pipeline (--local: on this machine)")
    p.add_argument("--local", action="store_true", help="run with kfp.local on this machine")
    p.add_argument("--runtime", required=True, help="runtime name (kfp-finetune runtimes)")
    _add_run_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "submit", help="upload the pipeline to Kubeflow and start a run (or a recurring run)"
    )
    p.add_argument("--runtime", required=True, help="runtime name (kfp-finetune runtimes)")
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
