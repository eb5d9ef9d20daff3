"""Run torchtune recipes in this process and measure them (launched by the benchmarks).

Usage: ``python bench/_worker.py JOB.json`` (single-device recipes) or
``python -m torch.distributed.run --standalone --nproc_per_node N bench/_worker.py JOB.json``
(distributed recipes). ``JOB.json``: ``{"jobs": [{"name", "recipe", "config"}], "warmup",
"out"}`` with exactly one job: every measured run gets a fresh process, so no run inherits
another's compiled graphs (flex attention is recompiled for each new batch shape and
torch._dynamo's recompile limit is 8: a ninth shape in one process would fall back to eager),
allocator state or peak counters. The result is written to ``out`` as a one-entry JSON list.

Each job does what ``tune run <recipe> --config <config>`` does (the recipe class from
torchtune's own ``recipes/<recipe>.py``: ``__init__``, ``setup``, ``train``, ``cleanup``), with
two hooks that do not change the training loop:

* the recipe's dataloader is wrapped so that each batch is counted when the loop asks for it
  (trainable tokens: ``labels != ignore_index``, exactly what the recipe's
  ``tokens_per_second_per_gpu`` counts; real tokens: positions before the right padding;
  padded positions: ``tokens.numel()``) and the time of that request is noted;
* the end-of-epoch checkpoint save is replaced by a timestamp (saving is not training).

**GPU peak memory** comes from the recipe's own per-step statistics: with
``log_peak_memory_stats`` on, torchtune's recipes call ``training.get_memory_stats`` after every
logged step, which reads ``max_memory_allocated`` / ``max_memory_reserved`` /
``active_bytes.all.peak`` and then *resets* the peak counters
(``torchtune/training/memory.py``, ``get_memory_stats(reset_stats=True)``). Reading
``torch.cuda.max_memory_allocated()`` after training would therefore see only what followed the
last step's log (weights and optimizer state, no activations). The worker takes the maximum of
the per-step values in the metric log (all steps, compile warm-up included), and the counter
read after training as a floor.

The measured window runs from the request of the first batch after ``warmup`` optimizer
steps to the end of the loop (after the last step's loss ``.item()``, which synchronises the
GPU), so data loading and the optimizer are inside it and setup, compilation in the first
steps and checkpointing are outside.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

RECIPE_CLASSES = {
    "full_finetune_single_device": "FullFinetuneRecipeSingleDevice",
    "full_finetune_distributed": "FullFinetuneRecipeDistributed",
    "lora_finetune_single_device": "LoRAFinetuneRecipeSingleDevice",
    "lora_finetune_distributed": "LoRAFinetuneRecipeDistributed",
}


def _recipe_class(recipe: str) -> Any:
    import torchtune

    # Where `tune run` finds it: torchtune's `recipes` folder (not an importable package).
    path = Path(torchtune.__file__).parent.parent / "recipes" / f"{recipe}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_recipe_{recipe}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, RECIPE_CLASSES[recipe])


class RssSampler:
    """Peak resident memory of this process while running (CPU memory figure)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        """Resident bytes now."""
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


class CountingLoader:
    """Proxy of the recipe's dataloader that counts tokens and notes when batches are asked."""

    def __init__(self, loader: Any, ignore_index: int, pad_ids: set[int]) -> None:
        self._loader = loader
        self.ignore_index = ignore_index
        self.pad_ids = sorted(pad_ids)
        self.requests: list[float] = []
        self.trainable: list[int] = []
        self.real: list[int] = []
        self.padded: list[int] = []
        self.rows: list[int] = []
        self.row_lengths: list[int] = []
        self.attended_keys: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Any:
        import torch

        it = iter(self._loader)
        while True:
            self.requests.append(time.perf_counter())
            try:
                batch = next(it)
            except StopIteration:
                self.requests.pop()
                return
            tokens, labels = batch["tokens"], batch["labels"]
            ignored = labels == self.ignore_index
            pad = ignored & torch.isin(tokens, torch.tensor(self.pad_ids, dtype=tokens.dtype))
            positions = torch.arange(tokens.shape[-1]).expand_as(tokens)
            lengths = torch.where(~pad, positions, -1).max(dim=-1).values + 1
            # Keys each real token attends to (causal): its position in its own sample, +1.
            # Packed batches restart ``input_pos`` at every sample (document masking).
            pos = batch.get("input_pos")
            pos = positions if pos is None else pos.to(positions.device).expand_as(tokens)
            real = positions < lengths.unsqueeze(-1)
            self.attended_keys.append(int(((pos + 1) * real).sum()))
            self.trainable.append(int((~ignored).sum()))
            self.real.append(int(lengths.sum()))
            self.padded.append(int(tokens.numel()))
            self.rows.append(int(tokens.shape[0]))
            self.row_lengths += [int(x) for x in lengths]
            yield batch


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def _attention_shape(model: Any) -> dict[str, int]:
    """Layers and query width (heads x head_dim) of a torchtune TransformerDecoder."""
    try:
        layers = list(model.layers)
        attn = layers[0].attn
        return {"layers": len(layers), "attention_dim": int(attn.num_heads * attn.head_dim)}
    except (AttributeError, IndexError, TypeError):
        return {}


def _metric_rows(cfg: Any) -> list[dict[str, float]]:
    from kfp_finetune.steps.training_log import read_metric_rows

    return read_metric_rows(Path(cfg.metric_logger.log_dir))


def peak_from_rows(rows: list[dict[str, float]],
                   after: dict[str, float]) -> dict[str, Any]:
    """The run's peak GPU memory from the recipe's per-step values.

    The largest per-step value the recipe logged, or the counters read after training
    (``after``) when larger or when no step logged them.

    Args:
        rows: The metric log's rows (``training_log.read_metric_rows``), GiB values under
            torchtune's keys ``peak_memory_alloc`` / ``_reserved`` / ``_active``.
        after: The same keys read from ``torch.cuda`` after training.
    """
    logged = {k: max((r[k] for r in rows if k in r), default=0.0) for k in after}
    steps = sum(1 for r in rows if "peak_memory_alloc" in r)
    return {
        "peak_allocated_gib": max(logged["peak_memory_alloc"], after["peak_memory_alloc"]),
        "peak_reserved_gib": max(logged["peak_memory_reserved"],
                                 after["peak_memory_reserved"]),
        "peak_active_gib": max(logged["peak_memory_active"], after["peak_memory_active"]),
        "peak_source": (f"recipe per-step stats, max over {steps} steps" if steps else
                        "torch.cuda counters after training (no per-step stats logged)"),
    }


def _gpu_peak(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Peak GPU memory of the run from the recipe's per-step stats (see module docstring)."""
    import torch

    after = {"peak_memory_alloc": torch.cuda.max_memory_allocated() / 2**30,
             "peak_memory_reserved": torch.cuda.max_memory_reserved() / 2**30,
             "peak_memory_active": torch.cuda.memory_stats().get("active_bytes.all.peak", 0)
             / 2**30}
    return peak_from_rows(rows, after)


def _window(loader: CountingLoader, first: int, ga: int, steps: int,
            t_end: float) -> dict[str, Any]:
    """Token counts and rates of the measured window (batches ``first`` on, until ``t_end``)."""
    seconds = t_end - loader.requests[first]
    trainable = sum(loader.trainable[first:])
    real = sum(loader.real[first:])
    padded = sum(loader.padded[first:])
    step_starts = loader.requests[first::ga] + [t_end]
    step_tokens = [sum(loader.trainable[first + k * ga: first + (k + 1) * ga])
                   for k in range(steps)]
    spans = [b - a for a, b in zip(step_starts, step_starts[1:], strict=False)]
    step_rates = [n / s for n, s in zip(step_tokens, spans, strict=False)]
    return dict(
        seconds=round(seconds, 4),
        samples=sum(loader.rows[first:]),
        trainable_tokens=trainable, real_tokens=real, padded_tokens=padded,
        trainable_tokens_per_s=trainable / seconds, real_tokens_per_s=real / seconds,
        attended_keys_per_s=sum(loader.attended_keys[first:]) / seconds,
        padded_tokens_per_s=padded / seconds,
        step_trainable_tokens_per_s_min=min(step_rates),
        step_trainable_tokens_per_s_max=max(step_rates),
        padding_fraction=1 - real / padded if padded else 0.0,
        row_length_median=_percentile(loader.row_lengths, 0.5),
        row_length_p90=_percentile(loader.row_lengths, 0.9),
        row_length_max=max(loader.row_lengths) if loader.row_lengths else 0,
    )


def run_job(job: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Run one recipe config and return its measurements."""
    import torch
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(job["config"])
    device = str(cfg.get("device", "cpu"))
    cls = _recipe_class(job["recipe"])
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with RssSampler() as rss:
        rss_before = rss.rss()
        t_start = time.perf_counter()
        recipe = cls(cfg=cfg)
        recipe.setup(cfg=cfg)
        setup_s = time.perf_counter() - t_start
        ga = int(cfg.get("gradient_accumulation_steps", 1) or 1)
        loader = CountingLoader(recipe._dataloader, recipe._loss_fn.ignore_index,
                                {int(recipe._tokenizer.pad_id), 0})
        recipe._dataloader = loader
        ended: dict[str, float] = {}

        def _end(*_: Any, **__: Any) -> None:
            _sync(device)
            ended["t"] = time.perf_counter()

        recipe.save_checkpoint = _end
        if hasattr(recipe, "_checkpoint_client"):
            recipe._checkpoint_client.save_checkpoint = _end
        params = sum(p.numel() for p in recipe._model.parameters())
        trainable_params = sum(p.numel() for p in recipe._model.parameters() if p.requires_grad)
        shape = _attention_shape(recipe._model)
        recipe.train()
        t_end = ended.get("t", time.perf_counter())
        recipe.cleanup()
    steps_run = len(loader.requests) // ga
    first = warmup * ga
    measured_steps = steps_run - warmup
    result: dict[str, Any] = {
        "name": job["name"], "recipe": job["recipe"], "device": device, "pid": os.getpid(),
        "setup_s": round(setup_s, 3), "steps_run": steps_run, "warmup_steps": warmup,
        "measured_steps": measured_steps, "params": params,
        "trainable_params": trainable_params, **shape,
        "gradient_accumulation_steps": ga, "batch_size": int(cfg.batch_size),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if measured_steps <= 0:
        result["error"] = (f"only {steps_run} steps ran (dataset too small for {warmup} warmup "
                           "steps); use more rows or fewer steps")
        return result
    result.update(
        _window(loader, first, ga, measured_steps, t_end),
        peak_rss_mib=rss.peak / 2**20, rss_before_mib=rss_before / 2**20,
        max_rss_mib_process=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    rows = _metric_rows(cfg) if rank0 else []
    if device == "cuda":
        result.update(_gpu_peak(rows), gpu=torch.cuda.get_device_name(0))
    logged = [r["tokens_per_second_per_gpu"] for r in rows[warmup:]
              if "tokens_per_second_per_gpu" in r]
    if logged:
        result["recipe_logged_tokens_per_second_median"] = sorted(logged)[len(logged) // 2]
    del recipe, loader
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    """Run the job of the job file."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if len(spec["jobs"]) != 1:
        raise SystemExit(f"{sys.argv[1]} holds {len(spec['jobs'])} jobs; the worker runs exactly "
                         "one per process (compiled graphs and peak counters must not carry "
                         "over between runs): launch one worker per run.")
    results: list[dict[str, Any]] = []
    for job in spec["jobs"]:
        try:
            result = run_job(job, int(spec["warmup"]))
        except Exception as exc:  # noqa: BLE001 - record OOM and friends, go on
            traceback.print_exc()
            oom = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
            result = {"name": job["name"], "recipe": job["recipe"],
                      "error": "OOM" if oom else f"{type(exc).__name__}: {exc}"[:500]}
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
        results.append(result)
        if rank0:
            Path(spec["out"]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
