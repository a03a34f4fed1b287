"""A recipe's config as a frozen dataclass <-> command-line flags, JSON and named presets.

A config is a frozen dataclass whose fields carry a trailing ``# comment`` (the flag's help text);
:func:`parse_cli` turns it into flags (``--batch-size 64``, ``--no-bf16``, ``--preset NAME``,
``--resume [PATH]``). Supported field types: ``int, float, str, bool``, ``X | None``, ``Literal[...]``,
``tuple[X, ...]`` and ``tuple[X, Y]``. :func:`config_to_dict` / :func:`config_from_dict` are the JSON
form written into every checkpoint.

Fields named in the class attribute ``RUN_LOCAL_FIELDS`` (a ``ClassVar``; :class:`TrainConfig` names
``out_dir`` and ``keep_checkpoints``) always come from this run's preset and flags, never from a
checkpoint being resumed: where a run writes and what it deletes is never decided by a loaded file.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import json
import math
import textwrap
import tokenize
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from .checkpoints import find_checkpoint, latest_checkpoint, load_checkpoint

C = TypeVar("C")

_RESERVED = ("preset", "resume", "help")
_AUTO = "<latest>"


def _check_type(value: Any, tp: Any, name: str, *, from_json: bool = False) -> Any:
    """``value`` as an instance of the annotation ``tp``; TypeError naming ``name`` otherwise.

    Supported annotations: ``int, float, str, bool``, ``X | None``, ``Literal[...]``,
    ``tuple[X, ...]`` and ``tuple[X, Y]``. JSON lists are accepted for tuples when ``from_json``.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(TypeError):
                return _check_type(value, arg, name, from_json=from_json)
    elif origin is Literal:
        if value in args:
            return value
        raise TypeError(f"{name}: expected one of {list(args)}, got {value!r}")
    elif origin is tuple:
        if isinstance(value, tuple) or (from_json and isinstance(value, list)):
            items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
            if len(items) == len(value):
                return tuple(_check_type(v, t, f"{name}[{i}]", from_json=from_json)
                             for i, (v, t) in enumerate(zip(value, items)))
            raise TypeError(f"{name}: expected a tuple of {len(items)} values, got {len(value)}")
    else:
        raise TypeError(f"{name}: unsupported config field type {tp!r}")
    raise TypeError(f"{name}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin is tuple:
        inner = [type_name(args[0]), "..."] if len(args) == 2 and args[1] is Ellipsis else map(type_name, args)
        return "comma-separated (" + ", ".join(inner) + ")"
    return {int: "an int", float: "a float", str: "a string", bool: "true/false"}.get(tp, repr(tp))


def parse_value(text: str, tp: Any, flag: str) -> Any:
    """Parse a flag's text into the annotation ``tp``; ValueError naming ``flag`` on failure."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ValueError(f"{flag}: expected {type_name(tp)}, got {text!r}")
    if tp is str:
        return text
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise bad
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise bad from None
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() == "none":
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(ValueError):
                return parse_value(text, arg, flag)
        raise bad
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise bad
    if origin is tuple:
        parts = text.split(",") if text.strip() else []
        items = args[:1] * len(parts) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(parts):
            raise bad
        return tuple(parse_value(p.strip(), t, flag) for p, t in zip(parts, items))
    raise TypeError(f"{flag}: unsupported config field type {tp!r}")


def _to_text(value: Any) -> str:
    """The flag text that :func:`parse_value` parses back into ``value``."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(_to_text(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


@functools.cache
def _class_comments(klass: type) -> dict[str, str]:
    """Field name -> its trailing ``# comment`` (or the comment lines right above it) in ``klass``'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    found = {}
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)).body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        if text or above:
            found[node.target.id] = " ".join(text or above)
    return found


def field_help(cls: type) -> dict[str, str]:
    """Help text per field: ``field(metadata={"help": ...})``, else the field's comment in the source."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            helps.update(_class_comments(klass))
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            helps[f.name] = str(f.metadata["help"])
    return helps


def check_config_types(config: Any) -> None:
    """TypeError naming the field if a dataclass field's value does not match its annotation."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        _check_type(getattr(config, f.name), hints[f.name], f.name)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as JSON-ready primitives (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Rebuild a config from :func:`config_to_dict`'s output; fields missing from ``values`` take defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config: unknown fields {unknown} for {cls.__name__} (known: {sorted(names)})")
    return cls(**{k: _check_type(v, hints[k], k, from_json=True) for k, v in values.items()})


def config_to_flags(config: Any) -> list[str]:
    """Flags that :func:`parse_cli` turns back into ``config``: ``--name=value``, ``--x``/``--no-x`` for booleans
    (also in ``bool | None`` fields, whose None is ``--x=none``).

    Strings inside tuples must not contain commas, and a string ``none`` in an optional field reads as None.
    """
    flags = []
    for f in dataclasses.fields(config):
        value, flag = getattr(config, f.name), f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags.append(f"--{flag}={_to_text(value)}")
    return flags


class RaisingArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises ValueError instead of exiting, so errors can be caught and tested."""

    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(message)


def build_parser(cls: type, presets: dict[str, Any], *, default_preset: str, prog: str | None = None
                 ) -> argparse.ArgumentParser:
    """``--preset``, ``--resume [PATH]`` and one flag per field of ``cls`` (help from the field comments)."""
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    summary = (cls.__doc__ or "").strip().splitlines()
    parser = RaisingArgumentParser(prog=prog, allow_abbrev=False, description=summary[0] if summary else None)
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help=f"starting configuration, one of {sorted(presets)} (default: {default_preset}); "
                             "flags override it")
    parser.add_argument("--resume", nargs="?", const=_AUTO, default=None, metavar="PATH",
                        help="continue a run: a checkpoint file, a run directory, or nothing for the latest "
                             "checkpoint in --out-dir (a fresh start when there is none); the run's saved config "
                             "is used, and flags given here override it")
    for f in dataclasses.fields(cls):
        if f.name in _RESERVED:
            raise TypeError(f"{cls.__name__}.{f.name}: the field name is reserved for a command-line option")
        tp = hints[f.name]
        flag = f"--{f.name.replace('_', '-')}"
        shown = _to_text(getattr(presets[default_preset], f.name))
        text = f"{helps.get(f.name, '')} ({default_preset}: {shown})".strip().replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=text)
        elif _optional_bool(tp):  # --x, --no-x, --x=none (the field's own default rule)
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", default=argparse.SUPPRESS,
                                metavar="true|false|none", help=f"{text} [true/false or none]")
            parser.add_argument(f"--no-{flag[2:]}", dest=f.name, action="store_const", const="false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"{text} [{type_name(tp)}]")
    return parser


def _optional_bool(tp: Any) -> bool:
    """Whether the annotation is ``bool | None``."""
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {bool, type(None)}


class Cli(NamedTuple):
    """What :func:`parse_cli` resolved: the config to run, the checkpoint to resume (or None), the preset."""

    config: Any
    resume: Path | None
    preset: str


def parse_cli(cls: type[C], presets: dict[str, C], argv: Sequence[str] | None = None, *,
              default_preset: str | None = None, prog: str | None = None) -> Cli:
    """Resolve ``preset <- flags`` (or ``checkpoint config <- flags`` with ``--resume``) into a config.

    Raises ValueError naming the flag for an unknown preset or flag, or a value that does not parse.
    """
    if not presets:
        raise ValueError("presets: expected at least one preset, got an empty dict")
    for name, preset in presets.items():
        if not isinstance(preset, cls):
            raise TypeError(f"presets[{name!r}]: expected a {cls.__name__}, got {type(preset).__name__}")
    default_preset = default_preset or next(iter(presets))
    parser = build_parser(cls, presets, default_preset=default_preset, prog=prog)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        options = [o for a in parser._actions for o in a.option_strings]
        hint = difflib.get_close_matches(unknown[0].split("=")[0], options, n=1)
        raise ValueError(f"unknown flag {unknown[0]!r}" + (f" (did you mean {hint[0]}?)" if hint else "")
                         + f"; see --help for the {len(options)} flags")
    preset = namespace.preset or default_preset
    if preset not in presets:
        raise ValueError(f"--preset: expected one of {sorted(presets)}, got {preset!r}")
    hints = typing.get_type_hints(cls)
    overrides = {}
    for f in dataclasses.fields(cls):
        if hasattr(namespace, f.name):
            raw = getattr(namespace, f.name)
            flag = f"--{f.name.replace('_', '-')}"
            overrides[f.name] = raw if isinstance(raw, bool) else parse_value(raw, hints[f.name], flag)
    base = presets[preset]
    resume = None
    if namespace.resume is not None:
        out_dir = overrides.get("out_dir", getattr(base, "out_dir", "."))
        resume = _locate_checkpoint(namespace.resume, out_dir)
        if resume is not None:
            local = {name: getattr(base, name) for name in run_local_fields(cls)}
            base = dataclasses.replace(read_checkpoint_config(cls, resume), **local)
    try:
        return Cli(dataclasses.replace(base, **overrides), resume, preset)
    except (TypeError, ValueError) as e:  # a field check in __post_init__: name the flag, not the field
        raise ValueError(_as_flag_message(str(e), cls)) from None


def run_local_fields(cls: type) -> tuple[str, ...]:
    """The fields a resumed run takes from its own command line, never from the checkpoint (``RUN_LOCAL_FIELDS``)."""
    names = tuple(getattr(cls, "RUN_LOCAL_FIELDS", ()))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TypeError(f"{cls.__name__}.RUN_LOCAL_FIELDS: expected field names, got unknown {unknown}")
    return names


def _as_flag_message(message: str, cls: type) -> str:
    """``"batch_size: expected ..."`` -> ``"--batch-size: expected ..."`` when the message starts with a field name."""
    name, sep, rest = message.partition(":")
    fields = {f.name for f in dataclasses.fields(cls)}
    names = [n.strip() for n in name.split(",")]
    if sep and all(n in fields for n in names):
        return ", ".join("--" + n.replace("_", "-") for n in names) + sep + rest
    return message


def check_finite_floats(config: Any) -> None:
    """ValueError naming the field for a NaN anywhere, or an infinity in a field without the metadata
    ``{"allow_inf": True}``. Looks inside tuples; a non-finite hyper-parameter fails here, before a step is taken.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and not f.metadata.get("allow_inf"))):
                raise ValueError(f"{f.name}: expected a finite float, got {value!r}")


def _locate_checkpoint(arg: str, out_dir: str) -> Path | None:
    return latest_checkpoint(out_dir) if arg == _AUTO else find_checkpoint(arg, name="--resume")


def read_checkpoint_config(cls: type[C], path: str | Path) -> C:
    """The config stored inside a checkpoint (memory-mapped: the weights are not read)."""
    return config_from_dict(cls, load_checkpoint(path, mmap=True)["config"])
