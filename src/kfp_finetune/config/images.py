"""The container images the components run in: the one place that names them.

Override the registry for a private mirror with ``KFP_FINETUNE_REGISTRY`` (or each image with
``KFP_FINETUNE_CPU_IMAGE`` / ``KFP_FINETUNE_TRAINER_IMAGE``) when you compile:

    KFP_FINETUNE_REGISTRY=registry.example.com/ml kfp-finetune compile --output-dir my-compiled

``compiled/`` in this repository always uses the defaults. ``scripts/publish_images.sh`` builds
and pushes both images to a registry and compiles against it; it asks this module for the
Dockerfiles and image references (``python -m kfp_finetune.config.images REGISTRY [TAG]``).
"""

from __future__ import annotations

import os
import re
import sys

from kfp_finetune.errors import ConfigError

VERSION = "0.1.0"
DEFAULT_REGISTRY = "ghcr.io/kfp-finetune"
ENV_VARS = ("KFP_FINETUNE_REGISTRY", "KFP_FINETUNE_CPU_IMAGE", "KFP_FINETUNE_TRAINER_IMAGE")
CPU_NAME = "kfp-finetune"
TRAINER_NAME = "kfp-finetune-trainer"
# Image name -> its Dockerfile, relative to the repository root (the build context).
DOCKERFILES = {CPU_NAME: "images/cpu/Dockerfile", TRAINER_NAME: "images/trainer/Dockerfile"}
# Image name -> the variable that points the compiled pipelines at it.
IMAGE_VARS = {CPU_NAME: "KFP_FINETUNE_CPU_IMAGE", TRAINER_NAME: "KFP_FINETUNE_TRAINER_IMAGE"}

# The reference grammar of distribution/reference (what docker and podman accept): an optional
# domain (dots, dashes, a port), then lowercase path components separated by '.', '_', '__', '-'.
_DOMAIN = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REGISTRY = re.compile(rf"^(?:(?:{_DOMAIN}(?::[0-9]+)?/)?{_PATH}(?:/{_PATH})*|{_DOMAIN}:[0-9]+)$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_IMAGE = re.compile(r"^(?P<repo>[^@]+?)(?::(?P<tag>[^:/@]+))?(?:@sha256:[0-9a-f]{64})?$")


def check_registry(registry: str, what: str = "registry") -> str:
    """Return ``registry`` without a trailing slash, or raise ConfigError saying what is wrong."""
    value = registry.strip().rstrip("/")
    if not _REGISTRY.match(value):
        raise ConfigError(
            f"{what} {registry!r} is not an image registry path: expected a host with optional "
            "port and lowercase path, without scheme or tag, e.g. ghcr.io/my-org, "
            "registry.example.com:5000/ml or localhost:5000")
    return value


def check_tag(tag: str) -> str:
    """Return ``tag`` if docker accepts it as an image tag, else raise ConfigError."""
    if not _TAG.match(tag):
        raise ConfigError(f"image tag {tag!r} is not valid: expected up to 128 letters, digits, "
                          f"'_', '.' or '-', not starting with '.' or '-', e.g. {VERSION}")
    return tag


def check_image(image: str, what: str) -> str:
    """Return ``image`` if it is a valid reference (``repo[:tag][@sha256:...]``), else raise."""
    m = _IMAGE.match(image.strip())
    if not m or not _REGISTRY.match(m["repo"]) or (m["tag"] and not _TAG.match(m["tag"])):
        raise ConfigError(f"{what} {image!r} is not a valid image reference: expected "
                          f"REGISTRY/NAME:TAG, e.g. {DEFAULT_REGISTRY}/{CPU_NAME}:{VERSION}")
    return image.strip()


def image_refs(registry: str, tag: str = VERSION) -> dict[str, str]:
    """The image reference of each image for ``registry`` and ``tag``, by image name."""
    registry, tag = check_registry(registry), check_tag(tag)
    return {name: f"{registry}/{name}:{tag}" for name in DOCKERFILES}


def _from_env() -> tuple[str, str]:
    registry = os.environ.get("KFP_FINETUNE_REGISTRY") or DEFAULT_REGISTRY
    refs = image_refs(check_registry(registry, "KFP_FINETUNE_REGISTRY"))
    chosen = {}
    for name, var in IMAGE_VARS.items():
        value = os.environ.get(var)
        chosen[name] = check_image(value, var) if value else refs[name]
    return chosen[CPU_NAME], chosen[TRAINER_NAME]


# Initializers and export: CPU-only torch, torchtune, this project (images/cpu/Dockerfile).
# Fine-tune: PyTorch CUDA base, a C compiler, torchtune, torchao, this project
# (images/trainer/Dockerfile).
CPU_IMAGE, TRAINER_IMAGE = _from_env()
REGISTRY = (os.environ.get("KFP_FINETUNE_REGISTRY") or DEFAULT_REGISTRY).strip().rstrip("/")


def overridden() -> list[str]:
    """Names of the image variables set in the environment."""
    return [name for name in ENV_VARS if os.environ.get(name)]


def main(argv: list[str] | None = None) -> int:
    """``python -m kfp_finetune.config.images REGISTRY [TAG]``: print image lines.

    One ``DOCKERFILE IMAGE VARIABLE`` line per image.

    Exits 2 with one line on stderr when the registry or tag is not valid.
    """
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m kfp_finetune.config.images REGISTRY [TAG] "
              f"(TAG defaults to {VERSION})",
              file=sys.stderr)
        return 2
    try:
        refs = image_refs(*args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, ref in refs.items():
        print(f"{DOCKERFILES[name]} {ref} {IMAGE_VARS[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
