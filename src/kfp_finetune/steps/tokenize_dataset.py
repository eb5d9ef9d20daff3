"""The tokenize-dataset step: tokenize (and plan the packs) on CPU, before the GPU step.

torchtune's ``PackedDataset`` tokenizes and packs single-threaded on every rank while the GPU
pod sets up (~1,100 rows/s). This step does that work on a CPU node, on all its cores, with
torchtune's own code: it renders the very config the fine-tune step will run, builds that
config's tokenizer and dataset (``packed=False``) with ``torchtune.config.instantiate`` and
reads every row through it, so prompt template, message transform, ``train_on_input`` masking
and ``max_seq_len`` truncation are torchtune's. The rows go to ``<workspace>/tokenized`` (see
``token_store``); the fine-tune step feeds them to the recipe through
``kfp_finetune.plugins.packed_data.pretokenized_dataset`` when the store's fingerprint matches its
config, and otherwise lets torchtune tokenize as before (see :func:`pretokenized_conf`).

Rows cut by ``max_seq_len`` (and the tokens lost) are counted over the whole dataset and
reported, instead of being truncated silently.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from kfp_finetune.errors import DatasetError
from kfp_finetune.steps.dataset_plan import ALPACA_BUILDER, CHAT_BUILDER, INSTRUCT_BUILDER
from kfp_finetune.steps.token_store import (
    LABELS,
    OFFSETS,
    PACKS,
    TOKEN_DTYPE,
    TOKENS,
    concatenate,
    pack_starts,
)
from kfp_finetune.steps.tokenize_rows import TokenizeStats, make_reader, tokenize_all, usable_cpus
from kfp_finetune.storage.workspace import (
    Workspace,
    install,
    list_files,
    read_manifest,
    staged,
    workspace_lock,
)

Log = Callable[[str], None]
TOKENIZED_DIR = "tokenized"
LOCK_FILE = ".kfp-finetune-tokenize.lock"
FORMAT = 1  # bump when the store layout or what goes into it changes
BUILDER = "kfp_finetune.plugins.packed_data.pretokenized_dataset"
SUPPORTED_BUILDERS = (ALPACA_BUILDER, INSTRUCT_BUILDER, CHAT_BUILDER)


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class TokenizeSummary:
    """Result of the tokenize-dataset step."""

    folder: str
    stats: TokenizeStats
    packs: int
    max_seq_len: int | None
    seconds: float
    workers: int
    skipped: bool
    reason: str = ""  # why nothing was tokenized here ("" when the store is in place)

    def ui_metrics(self) -> dict[str, float]:
        """Figures for the KFP UI's Metrics view."""
        s = self.stats
        fill = s.tokens / (self.packs * self.max_seq_len) if self.packs and self.max_seq_len \
            else 0.0
        rate = s.rows / self.seconds if self.seconds and not self.skipped else 0.0
        return {"rows": s.rows, "tokens": s.tokens, "trainable_tokens": s.trainable_tokens,
                "rows_truncated": s.rows_truncated, "tokens_lost": s.tokens_lost,
                "rows_without_loss": s.rows_without_loss, "packs": self.packs,
                "pack_fill": round(fill, 4), "seconds": self.seconds,
                "rows_per_second": round(rate, 1), "workers": self.workers,
                "skipped": int(self.skipped), "pretokenized": int(not self.reason)}


def unsupported_reason(conf: dict[str, Any]) -> str | None:
    """Why the rendered config cannot be pre-tokenized, or None when it can."""
    dataset = conf.get("dataset")
    if not isinstance(dataset, dict):
        return "the config has several datasets (a list); torchtune tokenizes them in the recipe"
    builder = dataset.get("_component_")
    if builder not in SUPPORTED_BUILDERS:
        return (f"dataset builder {builder!r} is not one of {', '.join(SUPPORTED_BUILDERS)}; "
                "torchtune tokenizes it in the recipe")
    return None


def store_fingerprint(ws: Workspace, conf: dict[str, Any]) -> str:
    """What the store depends on: tokenizer and dataset config, data and model, versions.

    The data and model enter by content (the initializers' sha256 records, re-hashed only
    where a file's stat changed), as the fine-tune step's own inputs fingerprint does.
    """
    from kfp_finetune.storage.content import folder_digest
    from kfp_finetune.version import __version__

    parts = {"format": FORMAT, "kfp_finetune": __version__, "torchtune": version("torchtune"),
             "tokenizer": conf.get("tokenizer"), "dataset": conf.get("dataset"),
             "data": folder_digest(ws.dataset_dir, read_manifest(ws.dataset_dir)),
             "model": folder_digest(ws.model_dir, read_manifest(ws.model_dir))}
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _store_intact(folder: Path, manifest: dict[str, Any]) -> bool:
    try:
        return all((folder / f["path"]).stat().st_size == f["bytes"] for f in manifest["files"])
    except (OSError, KeyError, TypeError):
        return False


def pretokenized_conf(ws: Workspace, conf: dict[str, Any], log: Log = _print) -> dict | None:
    """The ``dataset`` section that reads the store, or None to let torchtune tokenize.

    The fine-tune step falls back to torchtune's own tokenizing (slower, same tensors) rather
    than failing: it also runs where no tokenize step ran before it (``run_fine_tune`` called
    directly, pipelines compiled before this step existed). The log line says why.
    """
    folder = ws.root / TOKENIZED_DIR
    reason = unsupported_reason(conf)
    manifest = read_manifest(folder)
    if reason is None and manifest is None:
        reason = f"no pre-tokenized data in {folder} (the tokenize-dataset step did not run)"
    elif reason is None and manifest.get("fingerprint") != store_fingerprint(ws, conf):
        reason = (f"the pre-tokenized data in {folder} was made for another config, dataset or "
                  "model")
    elif reason is None and not _store_intact(folder, manifest):
        reason = f"the pre-tokenized data in {folder} is incomplete"
    if reason is not None:
        log(f"[fine-tune] {reason}; torchtune tokenizes the dataset during setup.")
        return None
    assert manifest is not None
    log(f"[fine-tune] reading the pre-tokenized dataset in {folder} ({manifest['rows']} rows"
        + (f", {manifest['packs']} packs" if manifest.get("packs") else "") + ")")
    return {"_component_": BUILDER, "path": str(folder), "fingerprint": manifest["fingerprint"],
            "packed": bool(conf["dataset"].get("packed")),
            "source_builder": conf["dataset"]["_component_"]}


def _write_store(out: Path, parts: int, stats: TokenizeStats, pack_to: int | None) -> int:
    """Join the part files into the store's arrays; return the number of packs."""
    names = [f"part-{i:05d}" for i in range(parts)]
    lengths = np.concatenate([np.load(out / f"{n}.lengths.npy") for n in names])
    for n in names:
        (out / f"{n}.lengths.npy").unlink()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(out / OFFSETS, offsets)
    for suffix, name in (("tokens", TOKENS), ("labels", LABELS)):
        concatenate((out / f"{n}.{suffix}.npy" for n in names), out / name, stats.tokens,
                    TOKEN_DTYPE)
    if pack_to is None:
        return 0
    packs = pack_starts(lengths, pack_to)
    np.save(out / PACKS, packs)
    return len(packs) - 1


def _check_some_loss(stats: TokenizeStats, max_seq_len: int | None, log: Log) -> None:
    if stats.rows and stats.rows_without_loss == stats.rows:
        raise DatasetError(
            f"max_seq_len={max_seq_len} cuts every one of the {stats.rows} rows before its "
            "response begins, so no token would count in the loss (the loss would be NaN). "
            "Raise max_seq_len, set train_on_input=True, or shorten the prompts."
            if max_seq_len else
            f"none of the {stats.rows} rows has a token that counts in the loss; check the "
            "output column and train_on_input."
        )
    if stats.rows_without_loss:
        log(f"[tokenize] warning: {stats.rows_without_loss} of {stats.rows} rows have no token "
            f"in the loss (cut by max_seq_len={max_seq_len} before their response; rows "
            f"{stats.first_rows_without_loss}); they teach nothing.")


def tokenize_dataset(
    workspace: str | Path,
    runtime_name: str,
    config: Any,
    log: Log = _print,
    *,
    workers: int = 0,
) -> TokenizeSummary:
    """Tokenize the workspace's dataset as the fine-tune step's torchtune config would.

    Args:
        workspace: Workspace root, with finished dataset and model steps.
        runtime_name: Runtime name.
        config: The ``TorchTuneConfig`` of the run.
        log: Where progress lines go.
        workers: Processes (0: every CPU this task may use).

    Returns:
        The figures (rows, rows truncated, tokens lost, packs, seconds); ``skipped`` when the
        store for this config was already complete, ``reason`` when this config cannot be
        pre-tokenized (the fine-tune step then tokenizes as before).

    Raises:
        WorkspaceError: A step's output is missing, or another tokenize step holds the lock.
        DatasetError: No row keeps a token in the loss.
    """
    from kfp_finetune.config.runtimes import get_runtime
    from kfp_finetune.config.types import TorchTuneInstructDataset
    from kfp_finetune.steps.tune_config import prepare_training, resolve

    start = time.monotonic()
    runtime = get_runtime(runtime_name)
    resolved = resolve(runtime, config)
    ws = Workspace.at(workspace)
    folder = ws.root / TOKENIZED_DIR
    workers = workers if workers > 0 else usable_cpus()
    preprocess = config.dataset_preprocess_config or TorchTuneInstructDataset()
    with workspace_lock(ws.root, "the tokenize-dataset step", LOCK_FILE):
        _, conf = prepare_training(ws, runtime, resolved, preprocess)
        max_seq_len = conf["tokenizer"].get("max_seq_len")
        reason = unsupported_reason(conf)
        if reason is not None:
            log(f"[tokenize] not pre-tokenizing: {reason}.")
            return TokenizeSummary(str(folder), TokenizeStats(), 0, max_seq_len, 0.0, 0, True,
                                   reason)
        fingerprint = store_fingerprint(ws, conf)
        done = read_manifest(folder)
        if done is not None and done.get("fingerprint") == fingerprint \
                and _store_intact(folder, done):
            log(f"[tokenize] {folder} already holds this dataset tokenized for this config; "
                "skipping.")
            return TokenizeSummary(str(folder), TokenizeStats(**done["stats"]), done["packs"],
                                   max_seq_len, 0.0, done["workers"], True)
        packed = bool(conf["dataset"].get("packed"))
        with staged(ws, TOKENIZED_DIR) as out:
            reader = make_reader(conf, out)
            log(f"[tokenize] {len(reader.dataset)} rows with {conf['dataset']['_component_']}, "
                f"max_seq_len={max_seq_len}, packed={packed}, {workers} worker(s)")
            stats, parts = tokenize_all(reader, workers, log)
            _check_some_loss(stats, max_seq_len, log)
            packs = _write_store(out, parts, stats, max_seq_len if packed else None)
            seconds = round(time.monotonic() - start, 3)
            install(out, folder, {
                "fingerprint": fingerprint, "format": FORMAT, "rows": stats.rows,
                "tokens": stats.tokens, "packs": packs, "packed": packed,
                "max_seq_len": max_seq_len, "padding_idx": 0,
                "source_builder": conf["dataset"]["_component_"], "stats": asdict(stats),
                "workers": workers, "seconds": seconds, "files": list_files(out),
            })
    summary = TokenizeSummary(str(folder), stats, packs, max_seq_len, seconds, workers, False)
    log(f"[tokenize] {stats.rows} rows, {stats.tokens} tokens"
        + (f" in {packs} packs of {max_seq_len}" if packed else "")
        + f" in {seconds:.1f} s ({summary.ui_metrics()['rows_per_second']} rows/s); "
        f"max_seq_len cut {stats.rows_truncated} rows ({stats.tokens_lost} tokens lost)")
    return summary
