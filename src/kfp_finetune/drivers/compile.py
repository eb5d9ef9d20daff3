"""Compiling the pipelines to the YAML that users upload to Kubeflow (``compiled/``)."""

from __future__ import annotations

import difflib
import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kfp_finetune.config.runtimes import RUNTIMES, get_runtime
from kfp_finetune.errors import ConfigError

REPO_COMPILED = Path(__file__).resolve().parents[3] / "compiled"


@contextmanager
def writable_output(path: Path, what: str, option: str) -> Iterator[None]:
    """Turn an OSError while writing under ``path`` into one ConfigError line.

    Args:
        path: The output folder the user chose.
        what: What is written there, for the message.
        option: The option or argument that chose the folder, for the fix.
    """
    try:
        yield
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        if exc.errno == errno.ENAMETOOLONG:
            reason += " (a path component is longer than the file-name limit of 255 bytes)"
        raise ConfigError(
            f"cannot write {what} to {str(path)!r} ({reason}); choose a writable folder with "
            f"{option}."
        ) from None


def compile_runtime(runtime_name: str, out_dir: Path) -> Path:
    """Compile one runtime's pipeline to ``out_dir/<runtime>.yaml``.

    Returns:
        The YAML path.
    """
    from kfp import compiler

    from kfp_finetune.pipelines.finetune import build_pipeline

    runtime = get_runtime(runtime_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{runtime.name}.yaml"
    compiler.Compiler().compile(build_pipeline(runtime.name), str(path))
    return path


def compile_all(out_dir: Path, runtimes: list[str] | None = None) -> list[Path]:
    """Compile the given runtimes (all by default).

    Raises:
        ConfigError: Image variables are set and ``out_dir`` is the repository's compiled/,
            or ``out_dir`` cannot be written (read-only, no permission, name too long).
    """
    from kfp_finetune.config import images

    if images.overridden() and out_dir.resolve() == REPO_COMPILED.resolve():
        raise ConfigError(
            f"{', '.join(images.overridden())} set: compiled/ holds the default images; "
            "compile elsewhere with --output-dir DIR (or unset these variables)."
        )
    with writable_output(out_dir, "the compiled pipelines", "--output-dir"):
        return [compile_runtime(name, out_dir) for name in (runtimes or list(RUNTIMES))]


def check_compiled(compiled_dir: Path, runtimes: list[str] | None = None) -> list[str]:
    """Compare ``compiled_dir`` with a fresh compile.

    Returns:
        One line per stale, missing or extra file (empty when all match), with a short diff.
    """
    from kfp_finetune.config import images

    if images.overridden():
        raise ConfigError(
            f"{', '.join(images.overridden())} set: compiled/ holds the default images, so "
            "--check must run without these variables (unset them)."
        )
    problems: list[str] = []
    names = runtimes or list(RUNTIMES)
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in compile_all(Path(tmp), names):
            committed = compiled_dir / fresh.name
            if not committed.exists():
                problems.append(f"{committed}: missing (run `kfp-finetune compile`)")
                continue
            old, new = committed.read_text(), fresh.read_text()
            if old != new:
                diff = list(difflib.unified_diff(old.splitlines(), new.splitlines(),
                                                 str(committed), "fresh compile", lineterm="", n=1))
                problems.append(f"{committed}: stale (run `kfp-finetune compile`)\n"
                                + "\n".join(diff[:20]))
    if runtimes is None:
        expected = {f"{name}.yaml" for name in RUNTIMES}
        for extra in sorted(p for p in compiled_dir.glob("*.yaml") if p.name not in expected):
            problems.append(f"{extra}: no runtime of that name; delete it")
    return problems
