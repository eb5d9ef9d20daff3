"""The CLI's run options, made from the parameter table (one option per parameter)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kfp_finetune.config.parameters import PARAMETERS, Param
from kfp_finetune.errors import ConfigError


def parse_column_map(text: str) -> dict[str, str]:
    """Parse ``input=COL,output=COL`` into a dict.

    Raises:
        ConfigError: An item is not ``key=value``.
    """
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(
                f"--column-map item {item!r} is not KEY=COLUMN; write e.g. "
                "--column-map input=question,output=answer."
            )
        result[key.strip()] = value.strip()
    return result


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cli_params(cluster: bool) -> list[Param]:
    """The parameters ``run --local`` (cluster False) or ``submit`` (True) offers."""
    return [p for p in PARAMETERS if p.flag and (cluster or not p.cluster_only)]


def add_parameter_options(parser: argparse.ArgumentParser, cluster: bool) -> None:
    """Add one option per parameter (``dest`` is the parameter's name; unset: None)."""
    for param in cli_params(cluster):
        kwargs: dict[str, Any] = {"dest": param.name, "default": None,
                                  "help": param.description.replace("%", "%%")}
        if param.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif param.cli_style == "append":
            kwargs.update(action="append", metavar="KEY=VALUE")
        elif param.cli_style in ("pairs", "json"):
            kwargs["metavar"] = "K=V,..." if param.cli_style == "pairs" else "JSON"
        elif param.cli_style == "csv":
            kwargs.update(type=_csv, metavar="A,B,...")
        elif param.cli_style == "single":
            kwargs["type"] = lambda text: [text]
        else:
            kwargs["type"] = param.type
        parser.add_argument(param.flag, **kwargs)


def values_from_args(args: argparse.Namespace, cluster: bool) -> dict[str, Any]:
    """The run-form values the command line sets (options not given are left out).

    Raises:
        ConfigError: A map or list option does not parse (the message names the option).
    """
    values: dict[str, Any] = {}
    for param in cli_params(cluster):
        value = getattr(args, param.name, None)
        if value is None:
            continue
        if param.cli_style == "pairs":
            value = parse_column_map(value)
        elif param.cli_style == "json":
            value = json_option(value, param)
        values[param.name] = value
    return values


def json_option(text: str, param: Param) -> Any:
    """A JSON option's value, of the parameter's type.

    Raises:
        ConfigError: Not JSON, or not an object/list as the parameter needs.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, param.type):
        example = ('\'{"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}\''
                   if param.type is dict else
                   '\'[{"key": "nvidia.com/gpu", "operator": "Exists", '
                   '"effect": "NoSchedule"}]\'')
        raise ConfigError(
            f"{param.flag} {text!r} is not a JSON {'object' if param.type is dict else 'list'}; "
            f"write e.g. {param.flag} {example}."
        )
    return value
