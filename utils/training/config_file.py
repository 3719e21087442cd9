"""Training flags from a TOML file (``--config_file run.toml``) and back (``--output_config``,
``run_config.toml``).

Every key is a training flag by its command-line name, without the dashes (``lora_rank = 8``,
``random_flip = true``); keys may sit in tables, whose names only group them (``[lora]``), as kohya
sd-scripts' config files do. Flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from pathlib import Path
from typing import Any

from utils.core.atomic import write_text
from utils.core.errors import UserError
from utils.core.secrets import scrub

RUN_CONFIG_FILE = "run_config.toml"
UNSET = object()  # `random_crop = false` and the like: the switch not given
NOT_WRITTEN = {"config_file", "output_config"}  # flags about config files themselves
SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
            argparse.BooleanOptionalAction)


class ConfigFileError(UserError):
    """A config file that cannot be read as training flags; the message names the file, key and reason."""


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    config = p.add_argument_group("config files")
    config.add_argument("--config_file", default=None,
                        help="read flags from this TOML file (keys: the flag names); command-line flags win")
    config.add_argument("--output_config", nargs="?", const="-", default=None, metavar="FILE",
                        help="write the effective flags as TOML to FILE (no FILE: standard output) and exit "
                             "without training")


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """When ``argv`` names a --config_file, its values become the parser's defaults."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("--config_file", default=None)
    path = probe.parse_known_args(argv)[0].config_file
    if path:
        parser.set_defaults(**config_values(parser, Path(path)))


def read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigFileError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"{path}: not valid TOML ({error})") from error
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in items:
            if isinstance(item, dict):
                raise ConfigFileError(f"{path}: key '{key}.{name}': tables nest one level at most")
            if name in flat:
                raise ConfigFileError(f"{path}: key '{name}': given twice")
            flat[name] = item
    return flat


def config_values(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """{dest: value} of a config file, each value checked as the flag's parser would check it."""
    actions = _actions_by_name(parser)
    values = {}
    for key, value in read_toml(path).items():
        action = actions.get(key)
        if action is None or action.dest in NOT_WRITTEN:
            raise ConfigFileError(f"{path}: key '{key}': not a training flag (see --help for the names)")
        try:
            converted = _convert(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ConfigFileError(f"{path}: key '{key}': {error}") from None
        if converted is not UNSET:
            values[action.dest] = converted
    return values


def _actions_by_name(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each flag by its name without dashes, and by its destination when no flag has that name."""
    named = {opt.lstrip("-"): action for action in parser._actions for opt in action.option_strings}
    for action in parser._actions:
        named.setdefault(action.dest, action)
    return named


def _convert(action: argparse.Action, value: Any) -> Any:
    if isinstance(action, SWITCHES):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction) or action.const is True:
            return value
        return action.const if value else UNSET
    if action.nargs in ("+", "*"):
        if not isinstance(value, list) or (action.nargs == "+" and not value):
            raise TypeError(f"expected a list, got {value!r}")
        return [_one(action, item) for item in value]
    return _one(action, value)


def _one(action: argparse.Action, value: Any) -> Any:
    kind = action.type
    if kind not in (None, int, float):  # a parsing function, e.g. auto_or_int: given the text
        value = kind(str(value).lower() if isinstance(value, bool) else str(value))
    elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"expected a whole number, got {value!r}")
    elif kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"expected a number, got {value!r}")
    elif kind is None and not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    if kind is float:
        value = float(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


# ----------------------------------------------------------------------------- writing


def config_toml(args: argparse.Namespace) -> str:
    """The flags of ``args`` as a config file that --config_file reads back to the same flags (flags left
    unset, None, are left out: their default is None)."""
    lines = ["# Training flags; read back with: train_sdxl_lora.py --config_file THIS_FILE"]
    for key, value in scrub(vars(args)).items():
        if key not in NOT_WRITTEN and value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else "nan" if math.isnan(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string


def output_config(args: argparse.Namespace) -> None:
    """--output_config: the effective flags to the file named (or standard output)."""
    text = config_toml(args)
    if args.output_config == "-":
        sys.stdout.write(text)
    else:
        write_text(args.output_config, text)
