"""One run's configuration, and its one serialisation (to and from a plain dict).

``RunConfig`` is what crosses the KFP boundary: check-config builds it from the flat run-form
values (``from_values``), validates it and hands it on as a dict; every later task rebuilds it
with ``RunConfig.from_dict``. The CLI, the Python API and the local runner build the same
object and turn it into run-form values with ``to_values``. The mapping both ways is the
parameter table's ``field`` column (``config/parameters.py``); nothing here names a setting.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from difflib import get_close_matches
from enum import Enum
from typing import Any

from kfp_finetune.config.parameters import ALIASES, BY_NAME, OPS, PARAMETERS, Param
from kfp_finetune.config.tracking import TrackingConfig, tracking_config
from kfp_finetune.config.types import LoraConfig, TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.errors import ConfigError

PEFT_FIELD = "trainer.peft_config"
PEFT_METHODS = ("lora", "qlora", "dora")
_FULL = ("", "none", "full")
_NESTED = {"peft_config": LoraConfig, "dataset_preprocess_config": TorchTuneInstructDataset}


@dataclass
class RunConfig:
    """Everything one run needs besides where it runs.

    Args:
        runtime: Runtime name, e.g. ``torchtune-llama3.2-1b``.
        dataset_uri: Where the dataset comes from.
        model_uri: Where the base model comes from ("" for the runtime's).
        model_ignore_patterns: Glob patterns of model files not to fetch.
        export_name: Folder under ``output/`` for the model ("" for a new one per run).
        push_to: Where the export also copies the model ("" for nowhere).
        copy_to_artifact: Also copy the weights into the KFP artifact store.
        trainer: The training settings (the Kubeflow SDK's ``TorchTuneConfig``, extended).
        tracking: MLflow / W&B settings (None: no tracking).
    """

    runtime: str
    dataset_uri: str
    model_uri: str = ""
    model_ignore_patterns: list[str] = field(default_factory=list)
    export_name: str = ""
    push_to: str = ""
    copy_to_artifact: bool = False
    trainer: TorchTuneConfig = field(default_factory=TorchTuneConfig)
    tracking: TrackingConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: enums as their values, unset (None) fields left out."""
        return _plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Rebuild (and re-validate) a config from ``to_dict``'s output.

        Raises:
            ConfigError: A key is unknown or a value invalid.
        """
        data = _whole_numbers(data)
        trainer = dict(data.pop("trainer", None) or {})
        for key, cls_ in _NESTED.items():
            if trainer.get(key) is not None:
                trainer[key] = cls_(**trainer[key])
        _check_keys(data, cls, "RunConfig")
        _check_keys(trainer, TorchTuneConfig, "TorchTuneConfig")
        if isinstance(data.get("tracking"), dict):  # checked here, before any task runs
            data["tracking"] = tracking_config(**data["tracking"])
        return cls(**data, trainer=TorchTuneConfig(**trainer))


def _whole_numbers(data: dict[str, Any]) -> dict[str, Any]:
    """A copy with the integer settings as ints again.

    A KFP dict output travels as a protobuf Struct, whose numbers are all doubles: the
    batch size 4 comes back as 4.0.
    """
    data = _plain(data)
    for param in PARAMETERS:
        if param.type is not int or param.field in (OPS, PEFT_FIELD):
            continue
        path = param.field.split(".")
        parent = _get(data, path[:-1]) if len(path) > 1 else data
        value = parent.get(path[-1]) if isinstance(parent, dict) else None
        if isinstance(value, float) and value.is_integer():
            parent[path[-1]] = int(value)
    return data


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) is not None}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _check_keys(data: dict[str, Any], cls: type, what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{what} has unknown keys {unknown}; known keys: {sorted(known)}.")


def canonical_names(values: dict[str, Any]) -> dict[str, Any]:
    """Run-form values under their current names; earlier names are accepted with a warning.

    Raises:
        ConfigError: A name is neither a parameter nor an earlier name of one.
    """
    result: dict[str, Any] = {}
    for name, value in values.items():
        if name in ALIASES:
            new = ALIASES[name]
            warnings.warn(f"pipeline parameter {name!r} is now {new!r}; the old name is "
                          "accepted for one release.", DeprecationWarning, stacklevel=3)
            name = new
        if name not in BY_NAME:
            near = list(dict.fromkeys(
                ALIASES.get(n, n) for n in get_close_matches(name, [*BY_NAME, *ALIASES], n=3)))
            raise ConfigError(
                f"{name!r} is not a pipeline parameter"
                f"{'; did you mean ' + ' or '.join(near) + '?' if near else ''} "
                "(`kfp-finetune parameters` lists them all)."
            )
        if name in result:
            raise ConfigError(f"{name!r} is given twice (once under an earlier name).")
        result[name] = value
    return result


def _unset(value: Any) -> bool:
    return value is None or (not isinstance(value, bool) and value in ("", [], {}))


def from_values(runtime: str, values: dict[str, Any]) -> RunConfig:
    """Build the run's config from run-form values (unset values: the defaults decide).

    Args:
        runtime: Runtime name.
        values: Parameter name -> value; cluster-only settings are ignored here.

    Raises:
        ConfigError: A value is invalid (the message names the parameter).
    """
    tree: dict[str, Any] = {"runtime": runtime, "trainer": {}}
    method: Any = None
    for name, value in canonical_names(values).items():
        param = BY_NAME[name]
        if param.field == OPS:
            continue
        value = check_type(param, value)
        if param.field == PEFT_FIELD:
            method = value
            continue
        if not _unset(value):
            _put(tree, param.field.split("."), value)
    tree["trainer"]["peft_config"] = _peft(method, tree["trainer"].pop("peft_config", {}))
    if not tree.get("dataset_uri"):
        raise ConfigError("data_uri is empty; give the dataset's URI, e.g. "
                          "hf://org/repo or /abs/path/to/data.")
    return RunConfig.from_dict(tree)


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text",
          list: "a list", dict: "a mapping"}


def check_type(param: Param, value: Any) -> Any:
    """``value`` if it has the parameter's type (an int for a float, a whole float for an int).

    Raises:
        ConfigError: It has another type (e.g. ``"maybe"`` for an on/off setting).
    """
    if value is None:
        return value
    kind = param.type
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ConfigError(
        f"{param.name}={value!r} must be {_KINDS[kind]}"
        f"{' (leave it empty for the default)' if param.optional else ''}."
    )


def _put(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _peft(method: Any, lora: dict[str, Any]) -> dict[str, Any] | None:
    text = "" if method is None else str(method).strip().lower()
    if text in _FULL:
        if lora:
            given = ", ".join(f"{_name(f'{PEFT_FIELD}.{k}')}={v!r}" for k, v in lora.items())
            raise ConfigError(
                f"{given} given, but lora_method is empty (full fine-tuning), which would "
                "ignore it and train every weight; set lora_method (CLI: --peft) to lora, "
                "qlora or dora, or drop the LoRA options."
            )
        return None
    if text not in PEFT_METHODS:
        raise ConfigError(
            f"lora_method={method!r} is not one of {', '.join(PEFT_METHODS)}; leave it empty "
            "(or none) for full fine-tuning."
        )
    return {**lora, "quantize_base": text == "qlora" or None, "use_dora": text == "dora" or None}


def to_values(run: RunConfig) -> dict[str, Any]:
    """The run-form values of a config: the inverse of ``from_values`` for the set fields."""
    tree = run.to_dict()
    values: dict[str, Any] = {}
    for param in PARAMETERS:
        if param.field == OPS:
            continue
        if param.field == PEFT_FIELD:
            peft = tree.get("trainer", {}).get("peft_config")
            if peft:
                values[param.name] = ("qlora" if peft.get("quantize_base") else
                                      "dora" if peft.get("use_dora") else "lora")
            continue
        value = _get(tree, param.field.split("."))
        if not _unset(value):
            values[param.name] = value
    return values


def _get(tree: Any, path: list[str]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def param_for_field(path: str) -> Param | None:
    """The parameter whose value lands at ``path`` (e.g. ``trainer.learning_rate``)."""
    return next((p for p in PARAMETERS if p.field == path), None)


def _name(path: str) -> str:
    param = param_for_field(path)
    return param.name if param else path
