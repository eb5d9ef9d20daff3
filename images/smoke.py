"""Smoke test of a kfp-finetune image: what the fine-tune step's defaults ask of torch.

Runs the code paths of torchtune's recipes on tiny models with random weights:

1. ``torch.compile``, forward and backward, checked against eager. ``--compile recipe`` (the
   default on CUDA) compiles as the recipes do (``training.compile_model`` per layer of a tiny
   Llama 3.2, ``training.compile_loss`` of the chunked cross-entropy). ``--compile block`` (the
   default on CPU, where every kernel is C++ built by the compiler and the recipe path takes
   over a minute) compiles one torchtune RMSNorm + SwiGLU block. ``--compile none`` skips it.
2. A packed batch (three samples and padding in a row, collated by torchtune's
   ``padded_collate_packed``), forward and backward through the tiny Llama. On CUDA torchtune
   makes it a flex-attention ``BlockMask`` and runs its compiled flex attention (Triton). On CPU
   torchtune makes a dense block-causal mask and runs SDPA; torch's ``flex_attention`` then runs
   eagerly on CPU with the same document mask, forward only (torch has no flex-attention
   backward on CPU), and must match SDPA.

Prints the exact python / torch / torchtune / torchao / triton versions, the compilers found and
the device first; exits non-zero on any failure, its last line naming the step. Usage::

    python smoke.py                      # cuda if a GPU is visible, else cpu
    python smoke.py --device cuda        # the GPU check: fails when no GPU is visible
    python smoke.py --torch 2.9.1        # also require this torch release
    python smoke.py --compile none       # eager only (an image without a C compiler)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import shutil
import sys
import time
import traceback
import warnings

# The pins of pyproject.toml; tests/unit/test_images.py keeps them equal.
EXPECTED = {"torchtune": "0.6.1", "torchao": "0.15.0"}
# Lengths of the samples in a packed row; the last one is the padding PackedDataset appends.
SEQ_LENS = [40, 56, 24, 8]


class SmokeError(Exception):
    """A check whose result is wrong (as opposed to a step that crashed)."""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def report_versions(expect_torch: str | None) -> None:
    """Print the versions and refuse a torchtune, torchao or torch other than expected."""
    import torch

    cuda = torch.version.cuda or "none"
    print(f"smoke: python {platform.python_version()}")
    print(f"smoke: torch {torch.__version__} (cuda build {cuda})")
    found = {name: _version(name) for name in EXPECTED}
    for name, version in found.items():
        print(f"smoke: {name} {version}")
    print(f"smoke: triton {_version('triton')}")
    print(f"smoke: C compiler {shutil.which('cc') or shutil.which('gcc') or 'none'}, "
          f"C++ compiler {shutil.which('c++') or shutil.which('g++') or 'none'}")
    wrong = [f"{n} {v} (expected {EXPECTED[n]})" for n, v in found.items() if v != EXPECTED[n]]
    if expect_torch and torch.__version__.split("+")[0] != expect_torch:
        wrong.append(f"torch {torch.__version__} (expected {expect_torch})")
    if wrong:
        raise SmokeError("wrong versions: " + ", ".join(wrong) + "; rebuild the image from "
                         "images/ so its pins match pyproject.toml")
    import torchao  # noqa: F401  (torchtune imports it lazily; a broken build fails here)
    import torchtune  # noqa: F401


def pick_device(requested: str) -> str:
    """Resolve ``auto`` and refuse ``cuda`` when no GPU is visible."""
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise SmokeError("--device cuda but torch sees no GPU (torch.cuda.is_available() is "
                         "False): run it on a GPU node, or use --device cpu")
    device = "cuda" if requested == "cuda" or (requested == "auto" and available) else "cpu"
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        print(f"smoke: device cuda: {torch.cuda.get_device_name(0)} (sm_{major}{minor}), "
              f"{torch.cuda.device_count()} visible")
    else:
        print(f"smoke: device cpu: {platform.machine()}, torch threads {torch.get_num_threads()}")
    return device


def tiny_model(device: str):
    """A two-layer Llama 3.2 of torchtune's own builder, small enough for a CPU."""
    import torch
    from torchtune.models.llama3_2._component_builders import llama3_2

    torch.manual_seed(0)
    model = llama3_2(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                     max_seq_len=256, intermediate_dim=128)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    # bf16 on a GPU, as the recipes' default dtype; fp32 on CPU.
    return model.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)


def _loss_and_grad(model, loss_fn, batch: dict) -> tuple[float, float]:
    import torch

    for p in model.parameters():
        p.grad = None
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = loss_fn(model(**inputs), labels)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        raise SmokeError("backward produced no gradients")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if not (torch.isfinite(loss) and torch.isfinite(norm) and norm > 0):
        raise SmokeError(f"loss {loss.item()} or gradient norm {norm.item()} is not finite "
                         "and positive")
    return loss.item(), norm.item()


def _tokens(seed: int, shape: tuple[int, ...], device: str):
    import torch

    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _compare(step: str, eager: float, compiled: float, device: str) -> None:
    tolerance = 2e-2 if device == "cuda" else 1e-3  # bf16 on a GPU
    if abs(compiled - eager) > tolerance * max(1.0, abs(eager)):
        raise SmokeError(f"{step}: compiled loss {compiled:.6f} differs from eager {eager:.6f}")


def compile_recipe(device: str) -> str:
    """The recipes' compile: every decoder layer, and the chunked cross-entropy loss."""
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    model = tiny_model(device)
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=2)
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    tokens = _tokens(1, (2, 32), device)
    batch = {"tokens": tokens, "labels": tokens.roll(-1, dims=1)}
    eager, _ = _loss_and_grad(model, loss_fn, batch)
    training.compile_model(model, verbose=False)
    compiled, norm = _loss_and_grad(model, training.compile_loss(loss_fn, verbose=False), batch)
    _compare("recipe compile", eager, compiled, device)
    return (f"training.compile_model + compile_loss of a tiny Llama 3.2, loss {compiled:.4f} "
            f"(eager {eager:.4f}), grad norm {norm:.4f}")


def compile_block(device: str) -> str:
    """A torchtune RMSNorm + SwiGLU feed-forward block with a residual, compiled whole."""
    import torch
    from torch import nn
    from torchtune.modules import FeedForward, RMSNorm

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = RMSNorm(64)
            self.mlp = FeedForward(gate_proj=nn.Linear(64, 128, bias=False),
                                   down_proj=nn.Linear(128, 64, bias=False),
                                   up_proj=nn.Linear(64, 128, bias=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(self.norm(x))

    torch.manual_seed(0)
    block = Block().to(device)
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(1)).to(device)
    batch = {"x": x, "labels": torch.zeros_like(x)}

    def loss_fn(out, labels):
        return torch.nn.functional.mse_loss(out, labels)

    eager, _ = _loss_and_grad(block, loss_fn, batch)
    block.compile()
    compiled, norm = _loss_and_grad(block, loss_fn, batch)
    _compare("block compile", eager, compiled, device)
    return (f"torch.compile of a torchtune RMSNorm + SwiGLU block, loss {compiled:.6f} "
            f"(eager {eager:.6f}), grad norm {norm:.4f}")


def check_compile(device: str, mode: str) -> None:
    """Step 1: torch.compile forward and backward, checked against eager."""
    if mode == "none":
        print("smoke: skip torch.compile (--compile none)")
        return
    start = time.monotonic()
    what = compile_recipe(device) if mode == "recipe" else compile_block(device)
    print(f"smoke: ok {what}, {time.monotonic() - start:.1f}s")


def packed_batch(device: str) -> dict:
    """Two rows of three packed samples plus padding, collated by torchtune as the recipes do."""
    import torch
    from torchtune.data import padded_collate_packed

    rows = []
    for seed in (2, 3):
        tokens = _tokens(seed, (sum(SEQ_LENS),), "cpu")
        rows.append({"tokens": tokens, "labels": tokens.roll(-1),
                     "input_pos": torch.cat([torch.arange(n) for n in SEQ_LENS]),
                     "seq_lens": torch.tensor(SEQ_LENS)})
    batch = padded_collate_packed(rows)
    return {k: v.to(device) for k, v in batch.items()}


def check_packed(device: str) -> None:
    """Step 2: a packed batch through the tiny Llama (flex attention on CUDA), fwd and bwd."""
    import torch

    start = time.monotonic()
    batch = packed_batch(device)
    mask_kind = type(batch["mask"]).__name__
    if device == "cuda" and mask_kind != "BlockMask":
        raise SmokeError(f"torchtune built a {mask_kind} for a packed batch on CUDA, not a "
                         "BlockMask: flex attention is not in use (GPU capability below sm_75?)")

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    loss, norm = _loss_and_grad(tiny_model(device), loss_fn, batch)
    path = "torchtune's compiled flex attention" if mask_kind == "BlockMask" else "SDPA"
    print(f"smoke: ok packed batch, {mask_kind} mask, {path}, forward+backward, loss {loss:.4f}, "
          f"grad norm {norm:.4f}, {time.monotonic() - start:.1f}s")
    if device == "cpu":
        check_flex_cpu()


def check_flex_cpu() -> None:
    """Torch's flex attention on CPU (eager, forward) with the packed document mask vs SDPA."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torchtune.modules.attention_utils import (
        _get_document_ids_from_seq_lens,
        create_block_causal_mask,
    )

    seq_lens = [torch.tensor(SEQ_LENS)] * 2
    docs = _get_document_ids_from_seq_lens(seq_lens)
    n = sum(SEQ_LENS)

    def mask_mod(b, h, q_idx, kv_idx):  # the rule of torchtune's packed_block_causal_mask
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    block_mask = create_block_mask(mask_mod, 2, None, n, n, device="cpu")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, n, 16, generator=gen) for _ in range(3))
    with warnings.catch_warnings():  # eager flex attention warns that it is not compiled
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=block_mask)
    dense = create_block_causal_mask(seq_lens)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    err = (out - ref).abs().max().item()
    if err > 1e-4:
        raise SmokeError(f"flex attention differs from SDPA by {err:.2e} on the packed mask")
    print(f"smoke: ok flex attention on CPU (eager, forward only), packed document mask, "
          f"matches SDPA within {err:.1e}")


def main(argv: list[str] | None = None) -> int:
    """Run the checks; return 0 when all pass, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--torch", dest="expect_torch", metavar="VERSION",
                        help="require this torch release (the image's pin)")
    parser.add_argument("--compile", choices=("auto", "recipe", "block", "none"), default="auto",
                        help="what to torch.compile; auto: recipe on CUDA, block on CPU")
    args = parser.parse_args(argv)
    start = time.monotonic()
    step = "versions"
    try:
        report_versions(args.expect_torch)
        step = "device"
        device = pick_device(args.device)
        mode = args.compile if args.compile != "auto" else (
            "recipe" if device == "cuda" else "block")
        step = f"torch.compile ({mode})"
        check_compile(device, mode)
        step = "packed batch"
        check_packed(device)
    except Exception as exc:  # noqa: BLE001 - any failure of any step fails the smoke test
        if not isinstance(exc, SmokeError):
            traceback.print_exc()
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = lines[0] if lines else "(no message)"
        more = " (more in the traceback above)" if len(lines) > 1 else ""
        if step not in ("versions", "device") and not (shutil.which("cc") and shutil.which("c++")):
            more += ("; no C/C++ compiler on PATH, which Triton and Inductor need: install gcc "
                     "and g++ in the image, or run with --compile none")
        print(f"smoke: FAIL at {step}: {type(exc).__name__}: {first}{more}", flush=True)
        return 1
    print(f"smoke: PASS in {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
