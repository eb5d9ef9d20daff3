"""Each component folder's README.md, written from its own spec and metadata.yaml.

The kubeflow/pipelines-components habit (scripts/generate_readme, scripts/validate_metadata):
every component folder holds ``component.py``, a ``metadata.yaml`` (name, stability, the
Kubeflow Pipelines versions it needs, tags, when it was last verified) and a README generated
from the component, never written by hand. Here the README's text comes from three places that
are already true: the module docstring (overview), the compiled component spec (inputs and
outputs, their types, defaults and docstring descriptions) and metadata.yaml. ``kfp-finetune
compile`` writes them; ``kfp-finetune compile --check`` fails when one is stale.

metadata.yaml follows upstream's schema (name, stability, dependencies, lastVerified in this
order; tags and links optional), with two kubeflow dependencies always stated and checked
against what is in force: ``Pipelines`` is the KFP backend floor of the compiled pipelines
(``kfp_finetune.drivers.backend.MIN_BACKEND``: every component is compiled and run under it),
``Pipelines SDK`` the kfp pin (plus ``Pipelines Kubernetes SDK`` for kfp-kubernetes' op).
External services name what a step talks to; their versions are optional.
"""

from __future__ import annotations

import importlib
import inspect
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

COMPONENTS_DIR = Path(__file__).resolve().parents[3] / "components"
STABILITY = ("experimental", "alpha", "beta", "stable")
FIELDS = ("name", "stability", "dependencies", "lastVerified")  # required, in this order
OPTIONAL_FIELDS = ("tags", "links")
BACKEND = "Pipelines"  # the KFP backend (upstream's name for the Kubeflow Pipelines release)
SDK = "Pipelines SDK"  # the kfp package the YAML is compiled with
KUBERNETES_SDK = "Pipelines Kubernetes SDK"  # kfp-kubernetes
KUBERNETES_OPS = ("create_workspace",)  # kfp-kubernetes' own components: they need its pin
HEADER = "<!-- written by `kfp-finetune compile` from component.py and metadata.yaml -->"


def component_names(root: Path = COMPONENTS_DIR) -> list[str]:
    """The component folders (those holding a component.py), sorted."""
    return sorted(p.parent.name for p in root.glob("*/component.py"))


def load_component(name: str) -> tuple[Any, str]:
    """The component object of folder ``name`` and its module docstring.

    check_config is built from the whole parameter table, as the pipeline builds it.
    """
    module = importlib.import_module(f"kfp_finetune.components.{name}.component")
    if name == "check_config":
        from kfp_finetune.config.parameters import PARAMETERS

        return module.build_check_config(PARAMETERS), module.__doc__ or ""
    return getattr(module, name), module.__doc__ or ""


def expected_versions() -> dict[str, str]:
    """The version each kubeflow dependency must state: the backend floor and the SDK pins."""
    from importlib.metadata import version

    from kfp_finetune.drivers.backend import MIN_BACKEND

    return {BACKEND: ">=" + ".".join(map(str, MIN_BACKEND)), SDK: "==" + version("kfp"),
            KUBERNETES_SDK: "==" + version("kfp-kubernetes")}


def check_metadata(name: str, data: Any, now: datetime | None = None) -> list[str]:
    """What is wrong with folder ``name``'s metadata.yaml (empty when it follows the schema).

    The schema follows kubeflow/pipelines-components' scripts/validate_metadata/
    validate_metadata.py (validate_required_fields, validate_date_verified): required fields
    in order, a known stability, a Pipelines dependency, lastVerified an RFC 3339 time within a
    year. Ours also names the SDK pin, and every stated version must equal the one in force.
    """
    where = f"components/{name}/metadata.yaml"
    if not isinstance(data, dict):
        return [f"{where}: expected a mapping with {', '.join(FIELDS)}"]
    keys = [k for k in data if k not in OPTIONAL_FIELDS]
    problems = []
    if keys != list(FIELDS):
        problems.append(f"{where}: fields {keys}; expected {list(FIELDS)} in this order "
                        f"(optional: {', '.join(OPTIONAL_FIELDS)})")
    if data.get("name") != name:
        problems.append(f"{where}: name {data.get('name')!r}; expected the folder name {name!r}")
    if data.get("stability") not in STABILITY:
        problems.append(f"{where}: stability {data.get('stability')!r}; expected one of "
                        f"{', '.join(STABILITY)}")
    deps = data.get("dependencies")
    problems += _check_dependencies(where, deps)
    if name in KUBERNETES_OPS and KUBERNETES_SDK not in str(deps):
        problems.append(f"{where}: dependencies.kubeflow lacks {KUBERNETES_SDK!r} (kfp-kubernetes)")
    problems += _check_verified(where, data.get("lastVerified"), now)
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        problems.append(f"{where}: tags {tags!r}; expected a list of strings")
    return problems


def _check_dependencies(where: str, deps: Any) -> list[str]:
    if not isinstance(deps, dict) or not isinstance(deps.get("kubeflow"), list):
        return [f"{where}: dependencies must hold a kubeflow list ({BACKEND}, {SDK})"]
    if set(deps) - {"kubeflow", "external_services"}:
        return [f"{where}: dependencies {sorted(deps)}; expected kubeflow, external_services"]
    stated = {d.get("name"): d.get("version") for d in deps["kubeflow"] if isinstance(d, dict)}
    problems = [f"{where}: dependencies.kubeflow lacks {n!r}" for n in (BACKEND, SDK)
                if n not in stated]
    for dep_name, want in expected_versions().items():
        if dep_name in stated and stated[dep_name] != want:
            problems.append(f"{where}: {dep_name} version {stated[dep_name]!r}; expected "
                            f"{want!r} (kfp_finetune.drivers.backend.MIN_BACKEND, pyproject pins)")
    for ext in deps.get("external_services") or []:
        if not isinstance(ext, dict) or not isinstance(ext.get("name"), str):
            problems.append(f"{where}: external service {ext!r}; expected {{name: ...}}")
    return problems


def _check_verified(where: str, value: Any, now: datetime | None) -> list[str]:
    now = now or datetime.now(timezone.utc)
    if not isinstance(value, datetime) or value.tzinfo is None:
        return [f"{where}: lastVerified {value!r}; expected YYYY-MM-DDT00:00:00Z"]
    if not 0 <= (now - value).days < 365:
        return [f"{where}: lastVerified {value:%Y-%m-%d} is not within the past year; "
                "re-verify the component and update it"]
    return []


def _type_name(spec: Any) -> str:
    if getattr(spec, "type", None):
        return spec.type.removeprefix("system.").split("@")[0]
    return "?"


def _cell(text: Any) -> str:
    return re.sub(r"\s+", " ", str(text or "")).replace("|", "\\|").strip()


def _default(spec: Any) -> str:
    if not getattr(spec, "optional", False):
        return "required"
    return "(unset)" if spec.default is None else f"`{spec.default!r}`"


def _docstring(func: Any) -> tuple[dict[str, str], str]:
    """The Args descriptions and the Returns text of a Google-style docstring."""
    args: dict[str, str] = {}
    returns: list[str] = []
    section, current = "", ""
    for line in (inspect.getdoc(func) or "").splitlines():
        if line in ("Args:", "Returns:"):
            section = line
            continue
        if not line.startswith("    "):
            section = ""
        elif section == "Returns:":
            returns.append(line.strip())
        elif section == "Args:":
            match = re.match(r"    (\w+): (.*)", line)
            if match:
                current = match[1]
                args[current] = match[2]
            elif current:
                args[current] += " " + line.strip()
    return args, " ".join(returns)


def _tables(spec: Any, func: Any) -> list[str]:
    described, returns = _docstring(func)
    rows = ["## Inputs", "", "| name | type | default | description |", "|---|---|---|---|"]
    for key, item in (spec.inputs or {}).items():
        rows.append(f"| `{key}` | {_type_name(item)} | {_default(item)} | "
                    f"{_cell(item.description)} |")
    rows += ["", "## Outputs", ""]
    outputs = spec.outputs or {}
    if not outputs:
        return [*rows, "None.", ""]
    rows += ["| name | type | description |", "|---|---|---|"]
    # Artifacts are described under Args; the returned values in the Returns prose below
    # (kfp's own per-output descriptions cut that prose at the first line).
    rows += [f"| `{key}` | {_type_name(item)} | {_cell(described.get(key))} |"
             for key, item in outputs.items()]
    return [*rows, "", *([f"Returns: {_cell(returns)}", ""] if returns else [])]


def _example(name: str, spec: Any) -> list[str]:
    required = [k for k, v in (spec.inputs or {}).items() if not getattr(v, "optional", False)]
    args = ", ".join(f"{k}={k}" for k in required)
    if name == "check_config":
        head = ("from kfp_finetune.components.check_config import build_check_config\n"
                "from kfp_finetune.config.parameters import PARAMETERS\n\n"
                "check_config = build_check_config(PARAMETERS)\n")
    else:
        head = f"from kfp_finetune.components.{name} import {name}\n\n"
    call = f"task = {name}({args})  # inside a @dsl.pipeline function"
    return ["## Example", "", "```python", f"{head}{call}", "```", "",
            "The whole wiring (volume, resources, retries) is in "
            "`pipelines/finetune/pipeline.py`.", ""]


def _metadata_lines(meta: dict[str, Any]) -> list[str]:
    kubeflow = ", ".join(f"{d['name']} {d['version']}" for d in meta["dependencies"]["kubeflow"])
    ext = ", ".join(e["name"] for e in meta["dependencies"].get("external_services") or [])
    return ["## Metadata", "", f"- stability: {meta['stability']}",
            f"- Kubeflow: {kubeflow}", f"- external services: {ext or 'none'}",
            f"- tags: {', '.join(meta.get('tags') or []) or 'none'}",
            f"- last verified: {meta['lastVerified']:%Y-%m-%d}", ""]


def render_readme(name: str, root: Path = COMPONENTS_DIR) -> str:
    """The README.md of component folder ``name``."""
    component, doc = load_component(name)
    spec = component.component_spec
    meta = yaml.safe_load((root / name / "metadata.yaml").read_text())
    summary, _, rest = doc.strip().partition("\n")
    lines = [f"# {name}", "", HEADER, "", summary.strip(), ""]
    if rest.strip():
        lines += [rest.strip(), ""]
    if getattr(spec, "description", None):
        lines += [spec.description.strip(), ""]
    lines += _tables(spec, getattr(component, "python_func", None))
    lines += _example(name, spec) + _metadata_lines(meta)
    return "\n".join(lines).rstrip() + "\n"


def update_component_docs(root: Path = COMPONENTS_DIR, check: bool = False) -> list[str]:
    """Write each component's README.md (or, with ``check``, list what is missing or stale).

    Returns:
        One line per problem: a metadata.yaml missing or off the schema, a README stale.
    """
    problems = []
    for name in component_names(root):
        meta_path = root / name / "metadata.yaml"
        if not meta_path.exists():
            problems.append(f"components/{name}/metadata.yaml: missing (see another "
                            "component's for the fields)")
            continue
        bad = check_metadata(name, yaml.safe_load(meta_path.read_text()))
        if bad:
            problems += bad
            continue
        readme, fresh = root / name / "README.md", render_readme(name, root)
        if readme.exists() and readme.read_text() == fresh:
            continue
        if check:
            problems.append(f"components/{name}/README.md: missing or stale "
                            "(run `kfp-finetune compile`)")
        else:
            readme.write_text(fresh)
    return problems
