"""The QEMU presets (nac_client.qemu.CATALOG) as command-line options.

Each preset's options come from its builder's signature: a str parameter becomes an option with
a value (``top`` -> ``--top PATH``; underscores become dashes), a sequence parameter (a chain)
a comma-separated list (``--chain TOP,MID,BASE``), a bool a flag (``--share-rw``; a bool that
defaults to True also gets ``--no-...``). A parameter without a default is a required option.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from nac_client import qemu

# Preset options are stored under this prefix, apart from the command's own parameters.
DEST_PREFIX = "preset_arg_"


class PresetError(ValueError):
    """A preset that does not exist, or options it cannot be built from; says what is wrong."""


class PathList(click.ParamType[tuple[str, ...], Any]):
    """A comma-separated list of image paths, top first."""

    name = "list"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        paths = tuple(part.strip() for part in str(value).split(","))
        if not all(paths):
            self.fail(f"{value!r} has an empty path; give PATH[,PATH...]", param, ctx)
        return paths


PATH_LIST = PathList()


@dataclass(frozen=True)
class PresetOption:
    """One parameter of a preset's builder, as a command-line option."""

    parameter: str
    kind: str  # "path", "value", "list" or "flag"
    required: bool
    default: Any

    @property
    def flag(self) -> str:
        return "--" + self.parameter.replace("_", "-")

    @property
    def dest(self) -> str:
        return DEST_PREFIX + self.parameter

    @property
    def metavar(self) -> str:
        if self.kind == "list":
            return "PATH[,PATH...]"
        return "PATH" if self.kind == "path" else self.parameter.upper()

    def usage(self) -> str:
        """How the option is written: "--chain PATH[,PATH...]", "[--top PATH]", "[--writable]"."""
        if self.kind == "flag":
            return f"[--no-{self.flag[2:]}]" if self.default else f"[{self.flag}]"
        text = f"{self.flag} {self.metavar}"
        return text if self.required else f"[{text}]"

    def click_option(self) -> click.Option:
        about = f"The preset's {self.parameter} parameter."
        if self.kind == "flag":
            decls = [f"{self.flag}/--no-{self.flag[2:]}" if self.default else self.flag, self.dest]
            return click.Option(
                decls, is_flag=True, default=bool(self.default), show_default=True, help=about
            )
        what = {
            "list": "Image paths, comma-separated, top first.",
            "path": "An image path.",
            "value": "A value.",
        }[self.kind]
        extra: dict[str, Any] = {} if self.required else {"default": self.default}
        return click.Option(
            [self.flag, self.dest],
            type=PATH_LIST if self.kind == "list" else click.STRING,
            required=self.required,
            show_default=self.default is not None,
            metavar=self.metavar,
            help=f"{what} {about}",
            **extra,
        )

    def json(self) -> dict[str, Any]:
        return {
            "option": self.flag,
            "parameter": self.parameter,
            "kind": self.kind,
            "required": self.required,
            "default": self.default,
        }


def names() -> list[str]:
    return list(qemu.CATALOG)


def builder(name: str) -> qemu.PresetBuilder:
    """The preset's builder.

    Raises:
        PresetError: No preset has this name.
    """
    try:
        return qemu.CATALOG[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r}; known: {', '.join(qemu.CATALOG)}") from None


def description(name: str) -> str:
    """The first line of the builder's docstring."""
    doc = inspect.getdoc(builder(name)) or ""
    return doc.splitlines()[0] if doc else ""


def _kind(name: str, parameter: inspect.Parameter) -> str:
    annotation = parameter.annotation
    if annotation is bool:
        return "flag"
    if annotation is str or _optional_str(annotation):
        default = parameter.default
        return "value" if isinstance(default, str) else "path"
    if typing.get_origin(annotation) in (collections.abc.Sequence, tuple, list):
        return "list"
    raise TypeError(f"preset {name}: no option for parameter {parameter.name}: {annotation!r}")


def _optional_str(annotation: Any) -> bool:
    return isinstance(annotation, types.UnionType) and set(typing.get_args(annotation)) == {
        str,
        type(None),
    }


def options(name: str) -> tuple[PresetOption, ...]:
    """The preset's options, in the order of its builder's parameters.

    Raises:
        PresetError: No preset has this name.
    """
    signature = inspect.signature(builder(name), eval_str=True)
    found = []
    for parameter in signature.parameters.values():
        required = parameter.default is inspect.Parameter.empty
        found.append(
            PresetOption(
                parameter=parameter.name,
                kind=_kind(name, parameter),
                required=required,
                default=None if required else parameter.default,
            )
        )
    return tuple(found)


def usage(name: str) -> str:
    """The preset's options in one line: "--chain PATH[,PATH...] [--top PATH] [--base PATH]"."""
    return " ".join(option.usage() for option in options(name))


def build(name: str, values: Mapping[str, Any]) -> qemu.Preset:
    """Builds the preset from parsed option values, keyed by each option's dest.

    Raises:
        PresetError: No preset has this name, or the builder refused the values (a top that
            is not in the chain, say).
    """
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    signature = inspect.signature(builder(name))
    for option in options(name):
        value = values.get(option.dest, option.default)
        kind = signature.parameters[option.parameter].kind
        if kind is inspect.Parameter.KEYWORD_ONLY:
            keywords[option.parameter] = value
        else:
            positional.append(value)
    try:
        return builder(name)(*positional, **keywords)
    except ValueError as err:
        raise PresetError(f"preset {name}: {err}") from err


def click_options(name: str) -> Sequence[click.Option]:
    return [option.click_option() for option in options(name)]
