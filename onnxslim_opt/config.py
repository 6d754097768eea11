"""Recipe files: `--config optimize.toml` holds any command-line option, so a pipeline keeps its
optimization as a reviewed file. Keys are long flag names without the leading dashes (`-` or
`_` alike); flags given on the command line override the file (repeatable flags add to it).

    model = "model.onnx"
    skip = "fuse_pad"
    benchmark = "cpu"
    batch = [1, 8]
    fail-if = ["cosine<0.999", "latency_ratio>1.05"]
    [pass_options.fold_constants]
    size_limit = 4096
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import OptimizeError

#: options that make no sense in a recipe
_NOT_IN_CONFIG = {"help", "version", "config", "list_passes"}


def read_toml(path: str | Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - depends on the interpreter
        try:
            import tomli as tomllib
        except ImportError:
            raise OptimizeError("--config needs Python 3.11+ or the 'tomli' package (pip install tomli)") from None
    p = Path(path)
    if not p.is_file():
        raise OptimizeError(f"--config file not found: {p}")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise OptimizeError(f"--config {p} is not valid TOML: {exc}") from None


def config_defaults(parser: argparse.ArgumentParser, data: dict[str, Any], source: str) -> dict[str, Any]:
    """Parser defaults from a recipe: checked against the parser's own options and types."""
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_IN_CONFIG}
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest in ("pass_options", "pass_option") and isinstance(value, dict):
            dest, value = "pass_option", _pass_option_items(value, source)
        action = actions.get(dest)
        if action is None:
            raise OptimizeError(f"{source}: unknown option {key!r} (keys are long flag names, e.g. 'skip', 'fail-if')")
        defaults[dest] = _convert(action, value, key, source)
    return defaults


def _convert(action: argparse.Action, value: Any, key: str, source: str) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise OptimizeError(f"{source}: {key!r} is a switch; give true or false")
        return value
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
    if many:
        items = value if isinstance(value, list) else [value]
        return [_typed(action, v, key, source) for v in items]
    if isinstance(value, list):  # lists of simple values become the comma-separated form of the flag
        value = ",".join(str(v) for v in value)
    return _typed(action, value, key, source)


def _typed(action: argparse.Action, value: Any, key: str, source: str) -> Any:
    if isinstance(value, (dict, list)):
        raise OptimizeError(f"{source}: {key!r} takes a single value")
    if action.type is None:
        return str(value) if not isinstance(value, str) else value
    try:
        return action.type(str(value)) if not isinstance(value, bool) else value
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise OptimizeError(f"{source}: bad value {value!r} for {key!r}") from None


def _pass_option_items(table: dict[str, Any], source: str) -> list[str]:
    items = []
    for pass_name, options in table.items():
        if not isinstance(options, dict):
            raise OptimizeError(f"{source}: [pass_options.{pass_name}] must be a table of KEY = VALUE")
        for field, value in options.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            items.append(f"{pass_name}.{field}={text}")
    return items


def config_path(argv: list[str]) -> str | None:
    """The --config value, found before the real parse (so the file can set the defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    return known.config
