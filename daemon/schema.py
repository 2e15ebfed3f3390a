"""The machinery behind the config schema: TOML tables <-> frozen dataclasses.

`parse_dataclass` walks a dataclass's fields and type hints, so a schema is
just dataclasses. Per-field metadata, made by `field_meta`:

- ``doc``: one-line meaning (with unit), used as the comment by `format_config`;
- ``check``: a `Check` (predicate on the converted value plus the requirement it
  expresses, ``"must be >= 1"``), made by a named helper such as `at_least`;
- ``none``: the TOML spelling of ``None`` for an optional field (default ``""``).

Unknown sections and keys are errors (a typo must not silently fall back to a
default), and every problem is collected before `ConfigError` is raised, so one
run shows them all. Each message reads ``section.key: message``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "Check",
    "ConfigError",
    "above",
    "at_least",
    "build_dataclass",
    "did_you_mean",
    "field_meta",
    "format_config",
    "has_time_directive",
    "is_colour",
    "matches",
    "non_empty",
    "parse_colour",
    "parse_dataclass",
    "within",
]

T = TypeVar("T")


class ConfigError(Exception):
    """Invalid configuration; ``errors`` holds every problem as ``section.key: message``."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)
        self.source = source

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --- value checks -----------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A requirement on a converted value: ``predicate`` and the ``help`` it reports.

    ``help`` reads as the start of an error message (``"must be >= 1"``); the
    loader appends what it got.
    """

    predicate: Callable[[Any], bool]
    help: str

    def __call__(self, value: Any) -> bool:
        return self.predicate(value)


def at_least(low: float) -> Check:
    """``value >= low``; help ``"must be >= {low}"``."""
    return Check(lambda v: v >= low, f"must be >= {low:g}")


def above(low: float) -> Check:
    """``value > low``; help ``"must be > {low}"``."""
    return Check(lambda v: v > low, f"must be > {low:g}")


def within(low: float, high: float) -> Check:
    """``low <= value <= high`` (NaN fails); help ``"must be in [low, high]"``."""
    return Check(lambda v: low <= v <= high, f"must be in [{low:g}, {high:g}]")


def non_empty() -> Check:
    """A string other than ``""``; help ``"must not be empty"``."""
    return Check(lambda v: v != "", "must not be empty")


def matches(pattern: re.Pattern[str], help: str) -> Check:
    """The whole string matches ``pattern``; ``help`` says what that means."""
    return Check(lambda v: pattern.fullmatch(v) is not None, help)


def field_meta(doc: str, *, check: Check | None = None, none: str = "") -> dict[str, Any]:
    """Field metadata for the loader (see the module docstring)."""
    meta: dict[str, Any] = {"doc": doc, "none": none}
    if check is not None:
        meta["check"] = check
    return meta


_HEX_COLOUR = re.compile(r"#([0-9a-fA-F]{6})")
_RGB_COLOUR = re.compile(r"\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*")


def parse_colour(text: str) -> tuple[int, int, int]:
    """Parse ``"#rrggbb"`` or ``"r,g,b"`` (each 0..255) into an RGB triple.

    Raises `ValueError` with the reason when the text is neither.
    """
    if m := _HEX_COLOUR.fullmatch(text):
        h = m.group(1)
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    if m := _RGB_COLOUR.fullmatch(text):
        r, g, b = (int(x) for x in m.groups())
        if max(r, g, b) > 255:
            raise ValueError(f"colour components must be 0..255, got {text!r}")
        return r, g, b
    raise ValueError(f"expected a colour as '#rrggbb' or 'r,g,b', got {text!r}")


def _is_colour(text: str) -> bool:
    try:
        parse_colour(text)
    except ValueError:
        return False
    return True


is_colour = Check(_is_colour, "must be a colour as '#rrggbb' or 'r,g,b' with components 0..255")
"""A colour `parse_colour` accepts."""

# Both the strftime style (%Y) and the old doubled style (%YYYY) start with '%'.
has_time_directive = matches(
    re.compile(r".*%[A-Za-z].*", re.DOTALL), "must contain a % time directive such as %Y"
)
"""A time format with at least one ``%`` directive."""


# --- loading ----------------------------------------------------------------


class _Invalid(Exception):
    """One bad value; the caller prefixes the key.

    A type mismatch carries ``expected`` and ``got`` separately so that an
    optional field can widen ``expected`` with its ``None`` spelling.
    """

    def __init__(self, message: str = "", *, expected: str = "", got: str = "") -> None:
        self.expected = expected
        self.got = got
        super().__init__(message or f"expected {expected}, {got}")


def _toml_repr(value: Any) -> str:
    """Render a value the way TOML would spell it (for messages and output)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_repr(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "a table"
    return repr(value)


def _kind(value: Any) -> str:
    """Name a TOML value's type for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def _got(value: Any) -> str:
    if isinstance(value, Mapping):
        return "got a table"
    return f"got {_kind(value)} ({_toml_repr(value)})"


def _convert(tp: Any, value: Any, none: str) -> Any:
    """Convert one TOML value to the field type ``tp`` or raise `_Invalid`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"unsupported union type {tp!r}; only X | None")
        if value == none and isinstance(value, str):
            return None
        try:
            return _convert(inner[0], value, none)
        except _Invalid as exc:
            if not exc.expected:
                raise
            raise _Invalid(expected=f"{exc.expected} or {json.dumps(none)}", got=exc.got) from None
    if origin is Literal:
        choices = ", ".join(repr(a) for a in args)
        # type() too: TOML true must not match a Literal[1], nor 1 a Literal[True].
        if not any(value == a and type(value) is type(a) for a in args):
            hint = ""
            if isinstance(value, str):
                close = difflib.get_close_matches(value, [str(a) for a in args], n=1)
                if close:
                    hint = f"; did you mean {close[0]!r}?"
            raise _Invalid(f"must be one of {choices}; {_got(value)}{hint}")
        return value
    if origin is tuple:
        if args[-1:] != (Ellipsis,) or len(args) != 2:
            raise TypeError(f"unsupported tuple type {tp!r}; only tuple[X, ...]")
        if not isinstance(value, list):
            raise _Invalid(expected="an array", got=_got(value))
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_convert(args[0], item, none))
            except _Invalid as exc:
                raise _Invalid(f"item {i}: {exc}") from None
        return tuple(out)
    if tp is bool:
        if not isinstance(value, bool):
            raise _Invalid(expected="a boolean (true or false)", got=_got(value))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(expected="an integer", got=_got(value))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(expected="a number", got=_got(value))
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Invalid(expected="a string", got=_got(value))
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise _Invalid(expected="a path string", got=_got(value))
        if value == "":
            raise _Invalid("expected a path, got an empty string")
        return Path(value).expanduser()
    raise TypeError(f"unsupported config field type {tp!r}")


def did_you_mean(name: str, candidates: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def build_dataclass(
    cls: type[T], data: Mapping[str, Any], prefix: str, errors: list[str]
) -> T | None:
    """Build dataclass ``cls`` from a TOML table; append problems to ``errors``.

    Returns ``None`` when any error was found inside this table.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    before = len(errors)
    what = "section" if prefix == "" else "key"
    for key in data:
        if key not in fields:
            errors.append(f"{prefix}{key}: unknown {what}{did_you_mean(key, fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value, tp, where = data[name], hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                errors.append(f"{where}: expected a table ([{where}]), {_got(value)}")
                continue
            sub = build_dataclass(typing.cast(type[Any], tp), value, f"{where}.", errors)
            if sub is not None:
                kwargs[name] = sub
            continue
        none = f.metadata.get("none", "")
        try:
            converted = _convert(tp, value, none)
        except _Invalid as exc:
            errors.append(f"{where}: {exc}")
            continue
        check: Check | None = f.metadata.get("check")
        if converted is not None and check is not None and not check(converted):
            errors.append(f"{where}: {check.help}, {_got(value)}")
            continue
        kwargs[name] = converted
    if len(errors) > before:
        return None
    return cls(**kwargs)


def parse_dataclass(cls: type[T], data: Mapping[str, Any], source: str = "<config>") -> T:
    """Build any schema dataclass ``cls`` from parsed TOML ``data``.

    Missing keys take their defaults. Raises `ConfigError` listing every problem.
    """
    errors: list[str] = []
    result = build_dataclass(cls, data, "", errors)
    if result is None or errors:
        raise ConfigError(errors, source)
    return result


# --- rendering --------------------------------------------------------------


def _render_value(value: Any, none: str) -> str:
    if value is None:
        return json.dumps(none)
    if isinstance(value, Path):
        return _toml_repr(value.as_posix())
    return _toml_repr(value)


def format_config(config: Any) -> str:
    """Render a `Config` (or any schema dataclass of sections) as commented TOML.

    ``load``-ing the result gives back an equal config.
    """
    hints = typing.get_type_hints(type(config))
    blocks: list[str] = []
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if not dataclasses.is_dataclass(hints[section.name]):
            raise TypeError(f"{section.name}: top-level config fields must be sections")
        lines = [f"[{section.name}]"]
        for f in dataclasses.fields(value):
            rendered = _render_value(getattr(value, f.name), f.metadata.get("none", ""))
            if doc := f.metadata.get("doc", ""):
                lines.append(f"# {doc}")
            lines.append(f"{f.name} = {rendered}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
