"""Command-line flags for the ESamp/sampling parameters, read from the one parameter table
(:data:`esamp_agents.decoding.params.PARAMS`): each flag's type, default and help come from
the dataclass field, so a command cannot drift from the engine.

A flag is ``--`` + the public name with dashes (``--top-k``, ``--max-tokens``,
``--distiller-lr``); ``n`` is ``-n``. Its ``dest`` is the public name, so
:func:`param_flag_values` hands the parsed values straight to
:func:`~esamp_agents.decoding.params.build_params`.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin

from esamp_agents.decoding.params import ParamSpec, lookup_param

_TABLE_DEFAULT: Any = object()


def flag_name(name: str) -> str:
    """The flag spelling of a public parameter name: ``-n``, ``--top-k``, ``--max-tokens``."""
    spec = lookup_param(name)
    return f"-{spec.name}" if len(spec.name) == 1 else "--" + spec.name.replace("_", "-")


def _value_type(spec: ParamSpec) -> tuple[type, bool]:
    """(the type argparse converts each value to, whether the flag may repeat)."""
    annotation = spec.type
    if get_origin(annotation) in (Union, types.UnionType):  # int | None -> int
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is tuple:  # tuple[str, ...] -> a repeatable str flag
        return get_args(annotation)[0], True
    return annotation, False


def add_param_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    name: str,
    *,
    default: Any = _TABLE_DEFAULT,
    default_text: str | None = None,
    note: str = "",
    **extra: Any,
) -> argparse.Action:
    """Add the flag for parameter ``name``: type and doc from the table, ``default`` the table's
    unless this command has its own (``None`` = "not given", e.g. to keep a preset's value);
    ``extra`` goes to ``add_argument`` (``metavar``...)."""
    spec = lookup_param(name)
    value_type, repeats = _value_type(spec)
    if default is _TABLE_DEFAULT:
        default = [] if repeats else spec.default
    shown = default_text if default_text is not None else f"default {default}"
    text = f"{spec.doc.rstrip('.')} ({shown}){'; ' + note if note else ''}"
    flag = flag_name(name)
    if value_type is bool:
        return parser.add_argument(flag, dest=spec.name, action="store_true", default=default, help=text, **extra)
    action = "append" if repeats else "store"
    return parser.add_argument(
        flag, dest=spec.name, action=action, type=value_type, default=default, help=text, **extra
    )


def param_flag_values(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The parsed values of these parameters' flags, leaving out the ones left at ``None``."""
    values = {lookup_param(name).name: getattr(args, lookup_param(name).name) for name in names}
    return {name: value for name, value in values.items() if value is not None}


__all__ = ["add_param_flag", "flag_name", "param_flag_values"]
