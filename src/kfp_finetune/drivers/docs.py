"""The README's parameter tables, written from the parameter table (never by hand)."""

from __future__ import annotations

from pathlib import Path

from kfp_finetune.config.parameters import OPS, PARAMETERS, Param

START = "<!-- parameters:start (written by `kfp-finetune compile`; edit config/parameters.py) -->"
END = "<!-- parameters:end -->"
_OWNERS = (("trainer.dataset_preprocess_config.", "TorchTuneInstructDataset."),
           ("trainer.peft_config.", "LoraConfig."), ("trainer.", "TorchTuneConfig."))


def python_name(param: Param) -> str:
    """Where the setting lives in the Python API (the Kubeflow SDK's types, extended)."""
    special = {"trainer.peft_config": "`LoraConfig(quantize_base=…, use_dora=…)`",
               "trainer.resources_per_node.gpu": '`TorchTuneConfig.resources_per_node["gpu"]`',
               "dataset_uri": "`Initializer(dataset=…(storage_uri))`",
               "model_uri": "`Initializer(model=…(storage_uri))`",
               "model_ignore_patterns": "`…ModelInitializer(ignore_patterns)`"}
    if param.field in special:
        return special[param.field]
    for prefix, owner in _OWNERS:
        if param.field.startswith(prefix):
            return f"`{owner}{param.field.removeprefix(prefix)}`"
    if param.field == OPS:
        return "cluster only" if param.cluster_only else "run form and CLI"
    return f"`RunConfig.{param.field}`"


def _default(param: Param) -> str:
    if param.optional:
        return "(unset)"
    if callable(param.default):
        return "runtime's"
    return f"`{param.default!r}`" if param.default not in ("", [], {}) else "(empty)"


def parameters_markdown() -> str:
    """The parameter table and the table of earlier names, as Markdown."""
    rows = ["| parameter | type | default | CLI option | Python API | what it does |",
            "|---|---|---|---|---|---|"]
    for p in PARAMETERS:
        flag = f"`{p.flag}`" + (" (submit)" if p.cluster_only else "") if p.flag else "–"
        text = p.description.replace("|", "\\|")
        rows.append(f"| `{p.name}` | {p.type.__name__} | {_default(p)} | {flag} | "
                    f"{python_name(p)} | {text} |")
    renamed = [(alias, p.name) for p in PARAMETERS for alias in p.aliases]
    rows += ["", "Earlier names (accepted with a deprecation warning by `submit`, "
             "`pipeline_options` and `canonical_names` until the next release):", "",
             "| earlier name | now |", "|---|---|"]
    rows += [f"| `{old}` | `{new}` |" for old, new in sorted(renamed)]
    return "\n".join(rows) + "\n"


def render_readme(text: str) -> str:
    """``text`` with the block between the markers replaced by the current tables."""
    head, sep, rest = text.partition(START)
    if not sep or END not in rest:
        raise ValueError(f"README has no {START!r} ... {END!r} block")
    return f"{head}{START}\n{parameters_markdown()}{END}{rest.split(END, 1)[1]}"


def update_readme(path: Path, check: bool = False) -> bool:
    """Write the tables into the README (or, with ``check``, say whether they are current)."""
    text = path.read_text()
    fresh = render_readme(text)
    if check:
        return fresh == text
    if fresh != text:
        path.write_text(fresh)
    return True
