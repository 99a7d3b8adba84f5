"""A dataclass's fields as command-line flags: each field carries its help
text (and optional choices) in its metadata, so a new setting is one field
and nothing else. Torch-free (the HTTP process imports it)."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, field, fields
from typing import Any


def arg(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field with its flag's help text and, optionally, its allowed values."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The flag as the user types it, so error messages point at the right thing."""
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass `cls`: bools are switches, `X | None`
    parses as X (None only means "not given")."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        help_text = f.metadata["help"]
        base = _base_type(hints[f.name])
        if base is bool:
            parser.add_argument(flag(f.name), dest=f.name, action="store_true", help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "type": base, "help": help_text}
        if f.default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if "choices" in f.metadata:
            # Shown in --help only; `check_choices` validates, so programmatic
            # construction gets the same message as the CLI.
            kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        parser.add_argument(flag(f.name), **kwargs)


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


def check_choices(obj: Any) -> None:
    """ValueError naming the flag when a field holds a value outside its choices."""
    for f in fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices is not None and value is not None and value not in choices:
            raise ValueError(f"{flag(f.name)} must be one of {', '.join(choices)}; got {value!r}")


def _base_type(hint: Any) -> type:
    """`X | None` -> X: the CLI parses the value; None only means "not given"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported field type {hint!r}")
        return args[0]
    return hint
