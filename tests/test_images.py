"""The images pin the same versions as pyproject.toml and are the ones the components use."""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m.group(1): m.group(2) for d in deps if (m := re.match(r"([\w-]+)==(\S+)", d))}


@pytest.mark.parametrize("dockerfile", ["images/cpu/Dockerfile", "images/trainer/Dockerfile"])
def test_dockerfile_pins_match_pyproject(dockerfile):
    text = (ROOT / dockerfile).read_text()
    expected = pins()
    assert set(expected) >= {"kfp", "kfp-kubernetes", "torchtune", "torchao"}
    for name, version in expected.items():
        assert f"{name}=={version}" in text, f"{dockerfile} does not pin {name}=={version}"
    assert "pip install /src" in text


def test_image_names_carry_the_project_version():
    from kfp_finetune import images

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert images.VERSION == version
    assert images.CPU_IMAGE.endswith(f":{version}")
    assert images.TRAINER_IMAGE.endswith(f":{version}")
