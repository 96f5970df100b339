"""One TOML config file for `skipfleet agent`, `coordinator` and `simulate`, merged with flags,
environment variables and defaults; where each value came from is kept for `skipfleet config show`.

Precedence: flag > environment variable > file > default. The file has one table per command
(`[agent]`, `[coordinator]`, `[simulate]`); its keys are the long flags' names with `_` for `-`
(`--heartbeat-seconds` -> `heartbeat_seconds`). A command reads only its own table, so an agent on
a Pi never needs the coordinator's code to load a file that also configures a coordinator.

How it works: `prepare_parser` wraps every option's default in `Default`, so after parsing a value
that is still a `Default` was not given on the command line; `resolve_args` then fills it from
the environment, the file or the default, converting and checking each value as its flag would.
Standard library only (tomllib: Python 3.11): the agent imports this on a Pi.
"""

from __future__ import annotations

import argparse
import difflib
import json
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_CONFIG = "SKIPFLEET_CONFIG"
SECTIONS = ("agent", "coordinator", "simulate")
DEFAULT, FLAG = "default", "flag"
EXIT_USAGE = 2  # argparse's own code for a bad command line; a bad file is the same mistake
_KINDS = {"bool": "a boolean", "int": "an integer", "float": "a number", "str": "a string"}
_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
               dict: "a table", list: "an array"}  # fmt: skip
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


# custom `type=` callables -> (the type a file value must have, in words; how None is written)
_DESCRIBED: dict[Callable[[str], Any], tuple[str, str | None]] = {}


def describe_type(convert: Callable[[str], Any], expected: str, none_as: str | None = None) -> None:
    """Tell file messages what a custom `type=` accepts ("a number or 'off'"), and `config show`
    how to write its None ("off") so that the output reads back."""
    _DESCRIBED[convert] = (expected, none_as)


class ConfigFileError(ValueError):
    """A config file (or environment variable) that cannot be used: the entry points print it
    and exit with EXIT_USAGE."""


class Default:
    """A parser default that was not overridden on the command line. Prints as its value, so
    `%(default)s` in help texts shows the real default."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return "none" if self.value is None else str(self.value)

    def __repr__(self) -> str:
        return f"Default({self.value!r})"


@dataclass(frozen=True)
class Option:
    """One command-line option as the file and the environment see it."""

    key: str  # the argparse dest, also the file's key
    flag: str  # the long option string, for messages
    convert: Callable[[str], Any] | None  # the flag's `type=`
    choices: tuple[Any, ...] | None
    default: Any
    kind: str  # "bool", "int", "float", "str" or "value" (a custom type= such as 'off'|number)
    env: str | None
    in_file: bool  # False for secrets that belong in a file of their own (a password)

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.convert in _DESCRIBED:
            return _DESCRIBED[self.convert][0]
        return _KINDS.get(self.kind, f"a value {self.flag} accepts")

    def none_as(self) -> str | None:
        """How this option's None is written in a file, if it can be ('off')."""
        return _DESCRIBED[self.convert][1] if self.convert in _DESCRIBED else None


@dataclass(frozen=True)
class Spec:
    """A command's options, attached to its parser's namespace by prepare_parser."""

    section: str
    options: tuple[Option, ...]

    def by_key(self) -> dict[str, Option]:
        return {option.key: option for option in self.options}


def prepare_parser(
    parser: argparse.ArgumentParser,
    section: str,
    env: Mapping[str, str] | None = None,
    not_in_file: tuple[str, ...] = (),
) -> None:
    """Give a command's parser `--config`, help that shows each default and environment
    variable, and defaults that resolve_args can tell apart from values given as flags.
    `env`: option key -> the environment variable that overrides the file for it."""
    env = dict(env or {})
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"TOML config file (its [{section}] table); flags and environment variables "
        f"override it (default: ${ENV_CONFIG}, else none)",
    )
    options = []
    for action in parser._actions:  # argparse has no public list of a parser's actions
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue
        action.default = Default(action.default)
        options.append(_option(action, env.get(action.dest), action.dest not in not_in_file))
    parser.formatter_class = _formatter(env)
    parser.set_defaults(_config_spec=Spec(section, tuple(options)))


def _option(action: argparse.Action, env: str | None, in_file: bool) -> Option:
    convert: Callable[[str], Any] | None = action.type if callable(action.type) else None
    default = action.default.value
    if isinstance(default, str) and convert is not None:
        default = convert(default)  # as argparse converts a string default
    kinds: dict[object, str] = {None: "str", str: "str", int: "int", float: "float"}
    kind = "bool" if action.nargs == 0 else kinds.get(convert, "value")
    flag = max(action.option_strings, key=len)
    choices = tuple(action.choices) if action.choices else None
    return Option(action.dest, flag, convert, choices, default, kind, env, in_file)


def _formatter(env: Mapping[str, str]) -> type[argparse.HelpFormatter]:
    class ShowDefaults(argparse.HelpFormatter):
        """Appends '(default: X; env NAME)'; 'none' defaults whose help says what they
        mean show only the variable."""

        def _get_help_string(self, action: argparse.Action) -> str:
            text = action.help or ""
            if not action.option_strings or action.default is argparse.SUPPRESS:
                return text
            notes = []
            unset = isinstance(action.default, Default) and action.default.value is None
            if "%(default)" not in text and not (unset and "default" in text):
                notes.append("default: %(default)s")
            if action.dest in env and env[action.dest] not in text:
                notes.append(f"env {env[action.dest]}")
            return f"{text} ({'; '.join(notes)})" if notes else text

    return ShowDefaults


@dataclass(frozen=True)
class Resolved:
    """A command's effective options: values and where each came from."""

    section: str
    values: dict[str, Any]
    sources: dict[str, str]  # key -> "default" | "file:PATH" | "env:NAME" | "flag"
    options: tuple[Option, ...]


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Resolved:
    """Merge flags, environment, file and defaults for a namespace parsed by a prepared parser."""
    spec: Spec = args._config_spec
    path = getattr(args, "config", None) or environ.get(ENV_CONFIG) or None
    table = load_section(Path(path), spec) if path else {}
    values, sources = {}, {}
    for option in spec.options:
        given = getattr(args, option.key, Default(option.default))
        if not isinstance(given, Default):
            values[option.key], sources[option.key] = given, FLAG
        elif option.env and environ.get(option.env, "") != "":
            values[option.key] = _from_env(option, environ[option.env])
            sources[option.key] = f"env:{option.env}"
        elif option.key in table:
            values[option.key], sources[option.key] = table[option.key], f"file:{path}"
        else:
            values[option.key], sources[option.key] = option.default, DEFAULT
    return Resolved(spec.section, values, sources, spec.options)


def resolve_args(args: argparse.Namespace, environ: Mapping[str, str]) -> argparse.Namespace:
    """The namespace with every option's effective value, and `_config_sources`. Idempotent:
    a namespace resolved already is returned as it is."""
    if hasattr(args, "_config_sources") or not hasattr(args, "_config_spec"):
        return args
    resolved = resolve(args, environ)
    plain = argparse.Namespace(**vars(args))
    for key, value in resolved.values.items():
        setattr(plain, key, value)
    plain._config_sources = resolved.sources
    return plain


def load_section(path: Path, spec: Spec) -> dict[str, Any]:
    """The file's table for this command, each value checked and converted as its flag's."""
    try:
        with open(path, "rb") as stream:
            document = tomllib.load(stream)
    except OSError as err:
        raise ConfigFileError(f"config file {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigFileError(f"config file {path}: not valid TOML: {err}") from None
    for name, table in document.items():
        if name not in SECTIONS:
            raise ConfigFileError(
                f"config file {path}: unknown table or key {name!r} at the top level "
                f"(expected tables: {', '.join(f'[{s}]' for s in SECTIONS)})"
            )
        if not isinstance(table, dict):
            raise ConfigFileError(f"config file {path}: {name!r} must be a table ([{name}])")
    options = spec.by_key()
    return {
        key: _from_file(path, spec.section, key, value, options)
        for key, value in document.get(spec.section, {}).items()
    }


def _from_file(path: Path, section: str, key: str, value: Any, options: dict[str, Option]) -> Any:
    where = f"config file {path}: [{section}] {key}"
    option = options.get(key)
    if option is None:
        close = difflib.get_close_matches(key.replace("-", "_"), list(options), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigFileError(f"{where}: unknown key{hint}")
    if not option.in_file:
        raise ConfigFileError(f"{where}: a secret is never read from this file: use {key}_file")
    if isinstance(value, str) and _url_password(value) is not None:
        raise ConfigFileError(
            f"{where}: a secret is never read from this file: a password in a URL "
            f"(user:password@); give the password as password_file"
        )
    try:
        return _typed(option, value)
    except TypeError:
        got = _TOML_TYPES.get(type(value), type(value).__name__)
        raise ConfigFileError(
            f"{where} = {toml_value(value)}: expected {option.expected()}, got {got}"
        ) from None
    except (ValueError, argparse.ArgumentTypeError):  # the right type, not an accepted value
        raise ConfigFileError(
            f"{where} = {toml_value(value)}: expected {option.expected()}"
        ) from None


def _typed(option: Option, value: Any) -> Any:
    """A TOML value as the option's type; TypeError/ValueError when it is not one."""
    if option.kind == "bool":
        if not isinstance(value, bool):
            raise TypeError
        return value
    if isinstance(value, bool | dict | list):
        raise TypeError  # TOML booleans are not numbers; no option takes a table or array
    if option.kind == "int":
        if not isinstance(value, int):
            raise TypeError
    elif option.kind == "float":
        if not isinstance(value, int | float):
            raise TypeError
        value = float(value)
    elif option.kind == "str":
        if not isinstance(value, str):
            raise TypeError
        value = option.convert(value) if option.convert not in (None, str) else value
    else:  # a custom type= reads the text the flag would get ('off', '0.5')
        value = option.convert(str(value)) if option.convert else value
    if option.choices and value not in option.choices:
        raise ValueError
    return value


def source_rank(source: str) -> int:
    """Lower wins: flag 0, environment 1, file 2, default 3 (for options that combine, such as
    a password and a password file)."""
    return {FLAG: 0, "env": 1, "file": 2}.get(source.split(":", 1)[0], 3)


def _from_env(option: Option, text: str) -> Any:
    try:
        if option.kind == "bool":
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        value = option.convert(text) if option.convert else text
        if option.choices and value not in option.choices:
            raise ValueError
        return value
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigFileError(
            f"environment variable {option.env}={text!r}: expected {option.expected()}"
        ) from None


def show(resolved: Resolved) -> str:
    """The effective configuration as a TOML table (unset values commented out, secrets hidden),
    each line with its source; pasted into a file, it reproduces the configuration."""
    lines = [f"[{resolved.section}]"]
    width = max((len(o.key) for o in resolved.options), default=0)
    for option in resolved.options:
        value, source = resolved.values[option.key], resolved.sources[option.key]
        off = option.none_as()
        if value is None and off:
            line = f"{option.key:<{width}} = {toml_value(off)}"
        elif value is None:
            line = f"# {option.key} unset"
        elif not option.in_file:  # a secret: never printed, and never read from a file
            line = f"# {option.key} = <hidden>"
        elif isinstance(value, str) and _url_password(value) is not None:  # from a flag or env
            line = f"# {option.key} = {toml_value(_hide_url_password(value))}"
        else:
            line = f"{option.key:<{width}} = {toml_value(value)}"
        lines.append(f"{line:<{width + 30}}  # {source}")
    return "\n".join(lines)


def _url_password(text: str) -> str | None:
    """The password of a URL's `user:password@` part (mqtt://pi-07:secret@host), else None."""
    try:
        parts = urllib.parse.urlsplit(text)
        return parts.password if parts.scheme and parts.netloc else None
    except ValueError:
        return None


def _hide_url_password(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{user.split(':', 1)[0]}:<hidden>@{host}").geturl()


def toml_value(value: Any) -> str:
    if isinstance(value, dict | list):
        return "[...]" if isinstance(value, list) else "{...}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # A JSON string is a TOML basic string (no \u escapes of surrogates: TOML refuses them).
    return json.dumps(str(value), ensure_ascii=False)


class SecretFileError(ValueError):
    """A password file that cannot serve: unreadable, not UTF-8 text, or empty."""


def read_secret_file(path: str | Path, where: str) -> str:
    """The MQTT password in `path`, stripped; `where` says which option or variable named it."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as err:
        why = err.strerror or str(err)
        raise SecretFileError(f"{where} {path}: cannot read the MQTT password: {why}") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{where} {path}: the MQTT password file is not UTF-8 text") from None
    if not secret:
        raise SecretFileError(f"{where} {path}: the MQTT password file is empty")
    return secret
