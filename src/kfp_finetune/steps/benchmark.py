"""Benchmark evaluation: lm-evaluation-harness tasks on the exported Hugging Face folder.

The step runs lm-eval's ``hf`` model (``HFLM``) on the folder the export step wrote, and turns
its results into one number per task and metric (``<task>/<metric>``, e.g. ``arc_easy/acc``).

Why lm-eval directly, and not torchtune's ``eleuther_eval`` recipe:

* torchtune 0.6.1's recipe compares ``version("lm-eval") < "0.4.5"`` as *strings*, so it
  refuses every lm-eval from 0.4.10 on ("0.4.13" < "0.4.5"); we would be stuck on 0.4.9.x.
* It only logs a table (``evaluate()`` returns nothing: scores would be scraped from the log)
  and takes no ``num_fewshot``.
* It rebuilds the model from a torchtune config (builder, checkpointer, torchtune tokenizer
  files). The export is a Hugging Face folder whose top level holds the *merged* model for LoRA
  runs too, so ``HFLM`` loads full and LoRA results alike, with no peft (which refuses this
  project's torchao pin) and for any architecture transformers knows, the tiny test models too.
* ``HFLM`` is what users run outside the pipeline (``lm-eval run --model hf``), so the numbers
  compare; on a GPU node it uses CUDA, ``batch_size=auto`` and the checkpoint's dtype.

Offline use: a task is a registered lm-eval name (its data comes from the Hugging Face Hub) or
the path of a task YAML file (lm-eval's ``--include_path`` format) whose ``dataset_path: json``
reads local JSON/JSONL files. When every task is local, the step sets ``HF_HUB_OFFLINE`` and
``HF_DATASETS_OFFLINE``, so nothing reaches the Hub. Task names are checked before the model is
loaded; an unknown one is refused with close matches and how to list valid ones.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from kfp_finetune.errors import ConfigError, ModelError

Log = Callable[[str], None]
_print: Log = partial(print, flush=True)

LM_EVAL_VERSION = "0.4.13"  # the pin of pyproject's `eval` extra and the trainer image
INSTALL_HINT = f"pip install 'kfp-finetune[eval]' (lm-eval[hf]=={LM_EVAL_VERSION})"
LIST_HINT = ("list valid names with `lm-eval ls tasks` (add `--include_path DIR` for your own "
             "task folders), or give the path of a task YAML file")
CPU_BATCH_SIZE = 8  # "auto" on CPU: lm-eval's search for the largest batch is meant for GPUs
_YAML_SUFFIXES = (".yaml", ".yml")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_OFFLINE_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                  ("datasets.config", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"))


@dataclass(frozen=True)
class BenchmarkPlan:
    """Checked arguments of one benchmark run (nothing loaded yet).

    Attributes:
        tasks: Task names, in the order given (a YAML path is replaced by its task name).
        include_paths: Folders lm-eval indexes besides its own tasks.
        limit: Examples per task: None for all, a count (>= 1) or a fraction (0 < x < 1).
        num_fewshot: Few-shot examples, or None for each task's own default.
        batch_size: A positive int, "auto" or "auto:N".
    """

    tasks: tuple[str, ...]
    include_paths: tuple[str, ...] = ()
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int | str = "auto"


@dataclass(frozen=True)
class BenchmarkResult:
    """What a benchmark run gives back.

    Attributes:
        metrics: ``<task>/<metric>`` (``/<filter>`` when lm-eval applied one) -> finite value.
        results: lm-eval's results (without per-sample logs), as written to the JSON file.
        offline: Whether the run was kept off the Hugging Face Hub.
        skipped: Metric names left out because their value was not a finite number.
    """

    metrics: dict[str, float]
    results: dict[str, Any]
    offline: bool
    skipped: list[str] = field(default_factory=list)


def split_list(value: str | Sequence[str]) -> list[str]:
    """Split "a,b , c" (or take a list) into its non-empty, stripped items."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


def _check_batch_size(batch_size: int | str) -> int | str:
    text = str(batch_size).strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) > 0):
        return text
    raise ConfigError(f"eval_lm_batch_size={batch_size!r} is not a positive whole number, "
                      "'auto' or 'auto:N' (N: how often lm-eval re-measures); use e.g. 8 or auto.")


def _check_limit(limit: float | int | None) -> int | float | None:
    if limit is None or limit == 0:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
        raise ConfigError(f"eval_lm_limit={limit!r} is not a number; use 0 for every example.")
    if 0 < limit < 1:
        return float(limit)
    if limit >= 1 and float(limit).is_integer():
        return int(limit)
    raise ConfigError(f"eval_lm_limit={limit!r} is neither a whole count of examples per task "
                      "(>= 1) nor a fraction between 0 and 1; use 0 for every example, e.g. 100 "
                      "or 0.1.")


def _task_name_of(path: Path) -> str:
    """The ``task:`` (or ``group:``) name a task YAML declares, read without running it."""

    class _Loader(yaml.SafeLoader):
        """Reads lm-eval's ``!function`` tags as plain text (we only need the name)."""

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"eval_lm_tasks file {str(path)!r} cannot be read as YAML ({exc}); "
                          "give an lm-eval task YAML (lm-eval's docs/new_task_guide.md).") from exc
    config = config if isinstance(config, dict) else {}
    # A group YAML lists its tasks under 'task:' and is named by 'group:'.
    name = config.get("task") if isinstance(config.get("task"), str) else config.get("group")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"eval_lm_tasks file {str(path)!r} has no 'task:' name; an lm-eval task "
                          "YAML starts with e.g. 'task: my_task'.")
    return name.strip()


def _local_task(entry: str, base_dir: str | Path | None) -> tuple[str, Path] | None:
    """(task name, its YAML file) when the entry is a path to a task YAML, else None."""
    if not entry.lower().endswith(_YAML_SUFFIXES):
        return None
    path = Path(entry).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if not path.is_file():
        raise ConfigError(f"eval_lm_tasks file {entry!r} does not exist (or is not a file); give "
                          "the path of an lm-eval task YAML as the task sees it (on /workspace).")
    path = path.resolve()
    return _task_name_of(path), path


def plan_benchmark(
    tasks: str | Sequence[str],
    include_path: str | Sequence[str] = "",
    limit: float | int | None = 0,
    num_fewshot: int | None = -1,
    batch_size: int | str = "auto",
    base_dir: str | Path | None = None,
) -> BenchmarkPlan:
    """Check the arguments of a benchmark run; nothing is imported or loaded.

    Args:
        tasks: lm-eval task or group names, or paths of task YAML files (comma-separated or a
            list).
        include_path: More folders of task YAML files (comma-separated or a list).
        limit: Examples per task: 0 for all, a count (>= 1) or a fraction (0 < x < 1).
        num_fewshot: Few-shot examples; -1 (or None) for each task's own default.
        batch_size: A positive int, "auto" or "auto:N".
        base_dir: Where relative YAML paths and folders are looked up (None: the current one).

    Returns:
        The checked plan.

    Raises:
        ConfigError: An argument is not valid (its value is named).
    """
    entries = split_list(tasks)
    if not entries:
        raise ConfigError("eval_lm_tasks is empty; name at least one lm-eval task, e.g. "
                          f"'arc_easy,hellaswag' ({LIST_HINT}).")
    folders: list[str] = []
    for folder in split_list(include_path):
        path = Path(base_dir or ".") / Path(folder).expanduser()
        if not path.is_dir():
            raise ConfigError(f"eval_lm_include_path {folder!r} is not a folder; give folders that "
                              "hold lm-eval task YAML files.")
        folders.append(str(path.resolve()))
    names: list[str] = []
    for entry in entries:
        local = _local_task(entry, base_dir)
        if local:
            name, path = local
            if str(path.parent) not in folders:
                folders.append(str(path.parent))
            entry = name
        if entry not in names:
            names.append(entry)
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(
            num_fewshot, int) or num_fewshot < -1):
        raise ConfigError(f"eval_lm_num_fewshot={num_fewshot!r} is not a whole number >= 0 (or -1 "
                          "for each task's default).")
    return BenchmarkPlan(
        tasks=tuple(names), include_paths=tuple(folders), limit=_check_limit(limit),
        num_fewshot=None if num_fewshot in (None, -1) else num_fewshot,
        batch_size=_check_batch_size(batch_size),
    )


def check_model_folder(model_path: str | Path) -> Path:
    """Check that a folder holds a Hugging Face model (config and weights).

    Raises:
        ModelError: It does not.
    """
    folder = Path(model_path)
    weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin")] if folder.is_dir() else []
    if not (folder / "config.json").is_file() or not weights:
        raise ModelError(f"model_path={str(model_path)!r} is not a Hugging Face model folder "
                         "(config.json and *.safetensors expected); give the export step's "
                         "'path' output.")
    return folder


def _lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401 - fails early when it is missing
    except ImportError as exc:
        raise ConfigError(f"benchmark evaluation needs lm-eval, which is not installed here "
                          f"({exc}); {INSTALL_HINT}.") from exc
    return lm_eval


def resolve_tasks(plan: BenchmarkPlan) -> tuple[Any, bool]:
    """Index the tasks lm-eval knows and check that every requested one is among them.

    Local folders are indexed first, alone (a second or so); lm-eval's own ~15,000 task
    configs only when a name is not found there.

    Returns:
        (lm-eval ``TaskManager``, whether every task is local).

    Raises:
        ConfigError: A task is unknown (close matches and how to list names are given).
    """
    from lm_eval import __version__
    from lm_eval.tasks import TaskManager

    def unknown(manager: Any) -> list[str]:  # exact names: a glob would pass, then fail later
        known = set(manager.all_tasks)
        return [name for name in plan.tasks if name not in known]

    paths = list(plan.include_paths)
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        if not unknown(manager):
            return manager, True
    manager = TaskManager(include_path=paths or None)
    missing = unknown(manager)
    if missing:
        close = sorted({m for name in missing
                        for m in difflib.get_close_matches(name, manager.all_tasks, n=3)})
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ConfigError(f"eval_lm_tasks {missing} are not lm-eval tasks (lm-eval "
                          f"{__version__}).{hint} Fix the name: {LIST_HINT}.")
    return manager, False


@contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """Keep the Hugging Face Hub out of reach (env vars, and the flags already read from them).

    ``datasets`` and ``huggingface_hub`` read the variables once, at import; in a task process
    they are set before the import, but a caller that imported them already (a notebook, the
    tests) needs the module flags set as well. Everything is restored on exit.
    """
    saved_env = {name: os.environ.get(name) for name in _OFFLINE_VARS} if enabled else {}
    flags = [(sys.modules.get(mod), attr) for mod, attr in _OFFLINE_FLAGS] if enabled else []
    flags = [(mod, attr, getattr(mod, attr)) for mod, attr in flags if hasattr(mod, attr)]
    os.environ.update({name: "1" for name in saved_env})
    for mod, attr, _ in flags:
        setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in flags:
            setattr(mod, attr, value)
        for name, value in saved_env.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def metrics_from_results(results: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """Turn lm-eval's ``results`` section into ``<task>/<metric>[/<filter>]`` -> value.

    lm-eval keys each score ``"<metric>,<filter>"`` (``"acc,none"``, ``"acc_stderr,none"``,
    ``"exact_match,strict-match"``); other keys (alias, sample counts) are not scores.

    Returns:
        (finite scores, names of scores whose value is not a finite number, e.g. "N/A").
    """
    metrics: dict[str, float] = {}
    skipped: list[str] = []
    for task, scores in results.items():
        for key, value in scores.items():
            if "," not in key:
                continue
            metric, _, filter_name = key.partition(",")
            name = f"{task}/{metric}" + ("" if filter_name == "none" else f"/{filter_name}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                skipped.append(name)
            else:
                metrics[name] = float(value)
    return metrics, skipped


def _device(device: str) -> str:
    """"auto" -> cuda or cpu; "cuda[:N]" only where a GPU is visible (checked before loading)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or (re.fullmatch(r"cuda(:\d+)?", device) and torch.cuda.is_available()):
        return device
    raise ConfigError(f"device={device!r} is not usable here (CUDA visible: "
                      f"{torch.cuda.is_available()}); use auto, cpu, or cuda[:N] on a GPU node.")


def run_benchmark(
    model_path: str | Path,
    plan: BenchmarkPlan,
    results_file: str | Path | None = None,
    device: str = "auto",
    log: Log = _print,
) -> BenchmarkResult:
    """Run lm-eval's tasks on a Hugging Face model folder.

    Args:
        model_path: The exported model folder (for LoRA runs: its merged model).
        plan: Checked arguments (``plan_benchmark``).
        results_file: Where to write lm-eval's results as JSON (None: not written).
        device: "auto" (CUDA when there is a GPU), "cpu", "cuda", "cuda:1", ...
        log: Where progress lines go.

    Returns:
        The scores and lm-eval's results.

    Raises:
        ModelError: The folder holds no Hugging Face model.
        ConfigError: lm-eval is missing, or a task is unknown (both before the model loads).
    """
    folder = check_model_folder(model_path)
    device = _device(device)
    lm_eval = _lm_eval()
    manager, local = resolve_tasks(plan)
    on_cpu = device == "cpu"
    batch_size = CPU_BATCH_SIZE if on_cpu and str(plan.batch_size).startswith("auto") \
        else plan.batch_size
    log(f"benchmark: lm-eval {lm_eval.__version__} on {folder} ({device}, batch size "
        f"{batch_size}): {', '.join(plan.tasks)}" + ("; offline: local tasks" if local else ""))
    with offline(local):
        output = lm_eval.simple_evaluate(
            model="hf",
            # fp32 on CPU (bf16 matmuls are slow there); the checkpoint's own dtype on a GPU.
            model_args={"pretrained": str(folder), "dtype": "float32" if on_cpu else "auto"},
            tasks=list(plan.tasks), task_manager=manager, num_fewshot=plan.num_fewshot,
            batch_size=batch_size, device=device, limit=plan.limit, log_samples=False,
        )
    if output is None:  # lm-eval answers None on every rank but the first
        raise ConfigError("lm-eval returned no results (a non-zero rank); run the benchmark "
                          "step as one process.")
    output.pop("samples", None)
    # Plain JSON: objects as text, NaN/Infinity (which strict parsers refuse) as null.
    results = json.loads(json.dumps(output, default=str), parse_constant=lambda _: None)
    metrics, skipped = metrics_from_results(results.get("results", {}))
    if results_file is not None:  # staged, then renamed: a reader never sees half a file
        target = Path(results_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(results, indent=2, sort_keys=True))
        os.replace(staging, target)
    for name, value in sorted(metrics.items()):
        log(f"benchmark: {name} = {value:.4f}")
    if skipped:
        log(f"benchmark: not a finite number, left out of the metrics: {', '.join(skipped)}")
    return BenchmarkResult(metrics=metrics, results=results, offline=local, skipped=skipped)
