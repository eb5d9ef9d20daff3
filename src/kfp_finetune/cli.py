"""The ``kfp-finetune`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kfp_finetune.errors import ConfigError, KfpFinetuneError

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
    from kfp_finetune.runtimes import RUNTIMES

    rows = [("RUNTIME", "GPUS", "MODEL", "DESCRIPTION")]
    for rt in RUNTIMES.values():
        rows.append((rt.name, str(rt.default_gpus), rt.model_uri or "(give --model-uri)",
                     rt.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from kfp_finetune.compile import REPO_COMPILED, check_compiled, compile_all
    from kfp_finetune.runtimes import get_runtime

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
    from kfp_finetune.types import TorchTuneConfig, TorchTuneInstructDataset

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
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from kfp_finetune.local import run_local

    if not args.local:
        raise ConfigError(
            "`kfp-finetune run` runs the pipeline on this machine and needs --local; for a "
            "cluster, upload compiled/<runtime>.yaml to Kubeflow Pipelines."
        )
    config = _config_from_args(args)
    result = run_local(
        args.runtime, args.model_uri, args.dataset_uri, config, args.workspace, args.export_name
    )
    print("\nloss per step:")
    for step, loss in result.losses:
        print(f"  step {step:4d}  loss {loss:.4f}")
    print(f"\nfine-tuned model: {result.model_dir}")
    return 0


def _cmd_fixtures(args: argparse.Namespace) -> int:
    from kfp_finetune.fixtures import make_fixtures

    for name, path in make_fixtures(args.dir).items():
        print(f"{name}: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kfp_finetune.fixtures import make_fixtures

    fixtures = make_fixtures(Path(args.workspace).resolve().parent / "kfp-finetune-fixtures")
    args.local = True
    args.runtime = "torchtune-llama3.2-tiny"
    args.model_uri = str(fixtures["llama3_2"])
    args.dataset_uri = str(fixtures["alpaca"] / "data")
    return _cmd_run(args)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default=DEFAULT_WORKSPACE,
                   help=f"local folder used as the workspace volume (default: {DEFAULT_WORKSPACE})")
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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KfpFinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "finished with status" in str(exc) or "Task" in str(exc):
            print(f"error: {exc} (the task's log above says why)", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
