"""Command-line options generated from a settings dataclass (as litgpt does with its argument classes).

Each field becomes ``--field-name`` with the field's type, its default and, as help, the string literal
written under the field (its docstring). A field that is itself a dataclass (``grid: GridConfig``)
contributes its own fields. :func:`settings_from_args` builds the dataclass back from the parsed options,
so the settings are written once: in the dataclass that the Lightning callback also takes.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from typing import Any

__all__ = ["add_settings_options", "field_docs", "settings_from_args"]


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings of a dataclass's fields (the string literal after each field), bases included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _optional_str(value: str) -> str | None:
    return value or None  # '' (or none) on the command line: None


def _kind(hint: Any) -> tuple[Any, bool, bool]:
    """``(scalar type, is_list, is_optional)`` of a field's type; unions with ``str`` read as ``str``."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = str if str in args or len(args) > 1 else args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _nested(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def add_settings_options(
    parser: argparse.ArgumentParser,
    cls: type,
    defaults: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """Add one option per field of the dataclass ``cls`` (and of its dataclass-typed fields).

    ``defaults`` replaces dataclass defaults on the command line; ``skip`` leaves fields out (the
    command then sets them itself).
    """
    hints, docs, nested = typing.get_type_hints(cls), field_docs(cls), _nested(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name in nested:
            add_settings_options(parser, nested[f.name], defaults, skip)
            continue
        scalar, is_list, optional = _kind(hints[f.name])
        default = defaults.get(f.name, _default(f))
        flag = "--" + f.name.replace("_", "-")
        text = re.sub(r":\w+:`~?([^`]*)`", r"\1", docs.get(f.name, "")).replace("``", "").replace("%", "%%")
        if scalar is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
            continue
        kind = _optional_str if scalar is str and optional else scalar
        shown = "none" if default is None else " ".join(map(str, default)) if is_list else default
        parser.add_argument(
            flag,
            type=kind,
            nargs="+" if is_list else None,
            default=default,
            metavar=f.name.upper(),
            help=f"{text} (default: {shown})",
        )


def settings_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The dataclass ``cls`` built from options added by :func:`add_settings_options` (``overrides``
    set fields the command computes itself); its ``__post_init__`` validates."""
    nested = _nested(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif f.name in nested:
            kwargs[f.name] = settings_from_args(nested[f.name], args)
        elif hasattr(args, f.name):
            kwargs[f.name] = getattr(args, f.name)
    return cls(**kwargs)
