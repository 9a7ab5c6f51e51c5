"""Dataclass configs as command-line flags and as config files: one source of truth for both.

A config is a dataclass whose fields each carry a docstring (the string literal under the field,
as in the recipes' configs). `add_arguments(parser, Config)` turns every field into an argparse
option whose help is that docstring and the default; `build(Config, file_values, flag_values)`
makes the config from the dataclass defaults, then a config file's values, then the flags given on
the command line (each layer overrides the one before). The same dataclass is what the Python
API takes, so a flag, a config-file key and a keyword argument are one thing under one name.

Field metadata (`field(metadata={...})`) shapes the flag: "flag" (its option string; default
`--field-name`), "positional" (an argument, not an option), "nargs", "append" (a repeatable option
collecting a list), "metavar", "choices", "short" (e.g. "-o").

Errors are `ConfigError` (a ValueError) with one line that names the key or flag, the value and
what it must be, and suggests the closest valid name for a typo (`closest`).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["ConfigError", "field_docs", "closest", "convert", "add_arguments", "flag_values", "build",
           "check_keys", "read_config_file", "field_flag"]


class ConfigError(ValueError):
    """A config value, key or file that cannot be used; the message is one line that says the fix."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} of a dataclass and its bases (the string literal written right
    under each field), whitespace collapsed; fields without one are absent."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (e.g. a frozen build): fields stay undocumented
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def closest(name: str, candidates: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the candidate closest to `name` (difflib), or "" if none is close."""
    match = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def field_flag(field: dataclasses.Field) -> str:
    """The option string of a field: its metadata's "flag", else --field-name."""
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parts(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional
    return annotation, False


def _type_name(annotation: Any) -> str:
    base, optional = _parts(annotation)
    origin = typing.get_origin(base)
    if origin is list:
        name = f"a list of {_type_name(typing.get_args(base)[0])}"
    elif origin in (typing.Union, types.UnionType):
        name = " or ".join(_type_name(a) for a in typing.get_args(base))
    else:
        name = {int: "an int", float: "a number", str: "a string", bool: "true or false",
                dict: "a mapping"}.get(base, getattr(base, "__name__", str(base)))
    return name + (" or none" if optional else "")


def convert(value: Any, annotation: Any, where: str) -> Any:
    """`value` (a command-line string, or a value read from JSON/YAML) as the type `annotation`
    says: int, float, str, bool, X | None, list[X], unions of these (the first that fits), Any.
    "none"/"null" give None where it is allowed. ConfigError names `where` otherwise."""
    base, optional = _parts(annotation)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional or base is Any:
            return None
        raise ConfigError(f"{where} cannot be none; it must be {_type_name(annotation)}")
    if base is Any:
        return value
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(base):
            try:
                return convert(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {_type_name(annotation)}; got {value!r}")
    if origin is list:
        (item,) = typing.get_args(base) or (Any,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise ConfigError(f"{where} must be {_type_name(annotation)}; {value!r} is not a JSON "
                                      "list") from None
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or base is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{where} must be a mapping; got {value!r}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where} must be true or false; got {value!r}")
    if base is int:
        number = _number(value, where, annotation)
        if float(number).is_integer():
            return int(number)
        raise ConfigError(f"{where} must be an int; got {value!r}")
    if base is float:
        return float(_number(value, where, annotation))
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string; got {value!r}")
    if isinstance(base, type) and isinstance(value, base):
        return value
    raise ConfigError(f"{where} must be {_type_name(annotation)}; got {value!r}")


def _number(value: Any, where: str, annotation: Any) -> float | int:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be {_type_name(annotation)}; got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                pass
    raise ConfigError(f"{where} must be {_type_name(annotation)}; got {value!r}")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return "none" if value is None else str(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """An argparse argument for every field of the dataclass `cls`, in field order: help from the
    field's docstring plus its default; values converted by `convert` to the field's type. Options
    not given are absent from the parsed namespace (so that a config file's values stand)."""
    hints, docs = _hints(cls), field_docs(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if meta.get("hidden"):
            continue
        annotation = hints[field.name]
        base, optional = _parts(annotation)
        default = _default(field)
        help_text = docs.get(field.name, "")
        if default is not dataclasses.MISSING and "default" not in help_text:
            help_text += f" (default: {_show(default)})"
        kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%"), "default": argparse.SUPPRESS}
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        flag = field_flag(field)
        is_list = typing.get_origin(base) is list
        item = (typing.get_args(base) or (Any,))[0] if is_list else base
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _argparse_type(item if is_list else annotation, flag)
            if is_list:
                if meta.get("append"):
                    kwargs["action"] = "append"
                else:
                    kwargs["nargs"] = meta.get("nargs", "+")
            elif "nargs" in meta:
                kwargs["nargs"] = meta["nargs"]
        if meta.get("positional"):
            kwargs.pop("metavar", None)
            kwargs["metavar"] = meta.get("metavar", field.name.upper())
            if default is not dataclasses.MISSING and "nargs" not in kwargs:
                kwargs["nargs"] = "?"
            parser.add_argument(field.name, **kwargs)
        else:
            names = [flag] + ([meta["short"]] if "short" in meta else [])
            parser.add_argument(*names, dest=field.name, **kwargs)


def _argparse_type(annotation: Any, flag: str):
    def parse(text: str) -> Any:
        try:
            return convert(text, annotation, flag)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{flag} ")) from None

    parse.__name__ = _type_name(annotation)  # argparse names the type in its error message
    return parse


def flag_values(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` given on the command line (present in the parsed `namespace`)."""
    given = vars(namespace)  # not hasattr: a field may share its name with an attribute of every object
    return {f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}


def check_keys(cls: type, values: Mapping[str, Any], where: str) -> None:
    """ConfigError for a key of `values` that is not a field of `cls` (the closest one suggested)."""
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("hidden")]
    for key in values:
        if key not in names:
            normalised = str(key).replace("-", "_")
            if normalised in names:
                raise ConfigError(f"{where}: write the key {key!r} as {normalised!r}")
            raise ConfigError(f"{where}: unknown key {key!r}{closest(normalised, names)} (valid keys: "
                              f"{', '.join(names)})")


def build(cls: type, *layers: Mapping[str, Any], where: Iterable[str] = ()) -> Any:
    """An instance of `cls`: its defaults, overridden by each mapping of `layers` in turn (a config
    file's values, then the flags given). Every value is converted to its field's type; `where`
    names each layer in errors (e.g. the config file's path)."""
    hints = _hints(cls)
    names = list(where) + ["value"] * (len(layers) - len(list(where)))
    merged: dict[str, Any] = {}
    for layer, name in zip(layers, names):
        check_keys(cls, layer, name)
        for key, value in layer.items():
            field = next(f for f in dataclasses.fields(cls) if f.name == key)
            label = f"{name}: {key}" if name != "flags" else field_flag(field)
            merged[key] = convert(value, hints[key], label)
    missing = [f.name for f in dataclasses.fields(cls) if _default(f) is dataclasses.MISSING and f.name not in merged]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    return cls(**merged)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a JSON file, or a YAML file (.yaml/.yml; needs PyYAML, the `yaml` extra)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found" + (" (it is a folder)" if path.is_dir() else ""))
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{str(path)!r}: YAML config files need PyYAML (pip install pyyaml, or the "
                              "'yaml' extra); or write the config as JSON") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{str(path)!r} is not valid YAML: {' '.join(str(error).split())}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{str(path)!r} is not valid JSON ({error}); config files are JSON, or YAML "
                              "named .yaml/.yml") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{str(path)!r} holds a {type(values).__name__}; a config file holds a mapping of "
                          "keys to values")
    return values
