"""The images pin the same versions as pyproject.toml and can compile.

The smoke script itself runs in tests/integration/test_images_smoke.py.
"""

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kfp_finetune.config import images
from kfp_finetune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "images" / "smoke.py"
DOCKERFILES = sorted(images.DOCKERFILES.values())


def pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m.group(1): m.group(2) for d in deps if (m := re.match(r"([\w-]+)==(\S+)", d))}


def smoke_module():
    spec = importlib.util.spec_from_file_location("smoke", SMOKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dockerfile_torch(text: str) -> str:
    """The torch release an image carries: the PyTorch base image's tag, or the pip pin."""
    m = re.search(r"^FROM pytorch/pytorch:([\d.]+)-", text, re.M) or re.search(
        r"\btorch==([\d.]+)", text)
    assert m, "the Dockerfile names no torch release"
    return m.group(1)


def smoke_run(text: str) -> str:
    runs = [line for line in logical_lines(text) if line.startswith("RUN") and "smoke.py" in line]
    assert len(runs) == 1, "the image build must run images/smoke.py exactly once"
    return runs[0]


def logical_lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.replace("\\\n", " ").splitlines()]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_pins_match_pyproject(dockerfile):
    text = (ROOT / dockerfile).read_text()
    expected = pins()
    assert set(expected) >= {"kfp", "kfp-kubernetes", "torchtune", "torchao"}
    for name, version in expected.items():
        assert f"{name}=={version}" in text, f"{dockerfile} does not pin {name}=={version}"
    # The project with its [tracking] extra (MLflow client, wandb): the fine-tune task logs to
    # a tracker from the trainer image, the export task from the CPU image.
    assert 'pip install "/src[tracking]"' in text


def test_smoke_script_expects_the_pyproject_pins():
    expected = pins()
    assert smoke_module().EXPECTED == {n: expected[n] for n in ("torchtune", "torchao")}


def test_both_images_carry_one_torch_release():
    # Kubeflow Trainer's torchtune image (kubeflow/trainer cmd/trainers/torchtune/Dockerfile) is
    # pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime with the same torchtune/torchao pins.
    releases = {dockerfile_torch((ROOT / d).read_text()) for d in DOCKERFILES}
    assert releases == {"2.9.1"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_each_build_runs_the_smoke_script_on_its_own_torch(dockerfile):
    text = (ROOT / dockerfile).read_text()
    run = smoke_run(text)
    assert "COPY images/smoke.py /opt/kfp-finetune/smoke.py" in text
    assert "/opt/kfp-finetune/smoke.py --device cpu" in run
    assert f"--torch {dockerfile_torch(text)}" in run
    lines = logical_lines(text)
    installed = next(i for i, line in enumerate(lines) if "pip install \"/src" in line)
    assert lines.index(run) > installed, "the smoke test must run on the finished install"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_an_image_compiles_in_its_smoke_test_only_if_it_has_a_compiler(dockerfile):
    # The PyTorch runtime images have no C compiler and Triton/Inductor need one
    # (pytorch/pytorch#116696; kubeflow/trainer#2884, fixed in #2887 by an apt install).
    text = (ROOT / dockerfile).read_text()
    apt = [line for line in logical_lines(text) if line.startswith("RUN") and "apt-get install"
           in line]
    has_compiler = any({"gcc", "g++"} <= set(line.split()) for line in apt)
    run = smoke_run(text)
    if dockerfile == images.DOCKERFILES[images.TRAINER_NAME]:
        assert has_compiler, "the trainer image must install gcc and g++ for Triton/Inductor"
        assert "--compile none" not in run
        assert logical_lines(text).index(apt[0]) < logical_lines(text).index(run)
    else:
        assert has_compiler or "--compile none" in run


def test_image_names_carry_the_project_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert images.VERSION == version
    assert images.CPU_IMAGE.endswith(f":{version}")
    assert images.TRAINER_IMAGE.endswith(f":{version}")


@pytest.mark.parametrize("registry", ["ghcr.io/my-org", "registry.example.com:5000/ml/team",
                                      "localhost:5000", "docker.io/user", "user",
                                      "ghcr.io/my-org/"])
def test_image_refs_for_a_registry(registry):
    refs = images.image_refs(registry, "1.2.3-rc1")
    base = registry.rstrip("/")
    assert refs == {"kfp-finetune": f"{base}/kfp-finetune:1.2.3-rc1",
                    "kfp-finetune-trainer": f"{base}/kfp-finetune-trainer:1.2.3-rc1"}


@pytest.mark.parametrize("registry", ["https://ghcr.io/my-org", "ghcr.io/My-Org", "ghcr.io/org:1",
                                      "ghcr.io/a b", "", "ghcr.io//org"])
def test_bad_registry_is_refused_with_an_example(registry):
    with pytest.raises(ConfigError, match=r"not an image registry path.*e\.g\. ghcr\.io/my-org"):
        images.image_refs(registry)


@pytest.mark.parametrize("tag", ["", "-rc", ".x", "a/b", "x" * 129])
def test_bad_tag_is_refused(tag):
    with pytest.raises(ConfigError, match="image tag .* is not valid"):
        images.image_refs("ghcr.io/my-org", tag)


def test_bad_registry_in_the_environment_fails_the_compile_at_once(tmp_path):
    env = {**os.environ, "KFP_FINETUNE_REGISTRY": "https://registry.example.com"}
    out = subprocess.run([sys.executable, "-m", "kfp_finetune.drivers.cli", "compile",
                          "--output-dir",
                          str(tmp_path), "--runtime", "torchtune-llama3.2-tiny"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: KFP_FINETUNE_REGISTRY 'https://registry.example.com' is not an image registry")
    assert not list(tmp_path.iterdir())


def test_compile_refuses_to_write_other_images_into_the_repository_compiled(monkeypatch):
    from kfp_finetune.drivers.compile import REPO_COMPILED, compile_all

    before = {p.name: p.read_bytes() for p in REPO_COMPILED.glob("*.yaml")}
    monkeypatch.setenv("KFP_FINETUNE_REGISTRY", "registry.example.com/ml")
    with pytest.raises(ConfigError, match="KFP_FINETUNE_REGISTRY set: compiled/ holds the "
                                          "default images.*--output-dir"):
        compile_all(REPO_COMPILED, ["torchtune-llama3.2-tiny"])
    assert {p.name: p.read_bytes() for p in REPO_COMPILED.glob("*.yaml")} == before
