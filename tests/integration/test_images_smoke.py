"""The images' smoke script (images/smoke.py) run as a subprocess on this machine's torch."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "images" / "smoke.py"


def run_smoke(*args, env=None, unset=(), timeout=300):
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    return subprocess.run([sys.executable, str(SMOKE), *args], capture_output=True, text=True,
                          env=environ, timeout=timeout, cwd=ROOT)


def test_smoke_refuses_a_torch_other_than_the_images():
    out = run_smoke("--torch", "0.0.1")
    assert out.returncode == 1
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("smoke: FAIL at versions: SmokeError: wrong versions: torch ")
    assert "(expected 0.0.1)" in last and "Traceback" not in out.stderr


def test_smoke_on_cuda_without_a_gpu_fails_and_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here; the no-GPU failure cannot be shown")
    out = run_smoke("--device", "cuda", "--compile", "none")
    assert out.returncode == 1
    assert out.stdout.strip().splitlines()[-1] == (
        "smoke: FAIL at device: SmokeError: --device cuda but torch sees no GPU "
        "(torch.cuda.is_available() is False): run it on a GPU node, or use --device cpu")


@pytest.mark.slow
def test_smoke_without_a_c_compiler_fails_at_torch_compile(tmp_path):
    # What a runtime base image without gcc/g++ does to the default compile: a fresh Inductor
    # cache (nothing to reuse) and a PATH with no compiler on it.
    empty = tmp_path / "bin"
    empty.mkdir()
    out = run_smoke("--device", "cpu", unset=("CC", "CXX"),
                    env={"PATH": str(empty), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "smoke: C compiler none, C++ compiler none" in out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("smoke: FAIL at torch.compile (block): "), last
    assert last.endswith("; no C/C++ compiler on PATH, which Triton and Inductor need: install "
                         "gcc and g++ in the image, or run with --compile none"), last


@pytest.mark.slow
def test_smoke_passes_on_cpu_with_a_cold_compile_cache(tmp_path):
    # The CPU run the image builds do, here with this venv's torch (not the images' 2.9.1).
    out = run_smoke("--device", "cpu", env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    import torch

    for name in ("torchtune", "torchao"):
        assert f"smoke: {name} {importlib.metadata.version(name)}" in lines
    assert f"smoke: torch {torch.__version__} (cuda build {torch.version.cuda or 'none'})" in lines
    assert any(line.startswith("smoke: triton ") for line in lines)
    assert any(line.startswith("smoke: device cpu: ") for line in lines)
    assert any(line.startswith("smoke: ok torch.compile of a torchtune RMSNorm + SwiGLU block")
               for line in lines)
    assert any(line.startswith("smoke: ok packed batch, Tensor mask, SDPA, forward+backward")
               for line in lines)
    assert any(line.startswith("smoke: ok flex attention on CPU (eager, forward only)")
               for line in lines)
    assert lines[-1].startswith("smoke: PASS in ")


@pytest.mark.slow
def test_smoke_recipe_compile_runs_on_cpu():
    # --compile recipe is what a GPU check runs (training.compile_model + compile_loss); here it
    # runs on CPU so that its code is exercised without a GPU.
    out = run_smoke("--device", "cpu", "--compile", "recipe")
    assert out.returncode == 0, out.stdout + out.stderr
    assert any(line.startswith("smoke: ok training.compile_model + compile_loss of a tiny Llama")
               for line in out.stdout.splitlines())
