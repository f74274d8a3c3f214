"""Settings read in layers, as both daemons read theirs: command-line flags win over the
environment, which wins over a TOML config file, which wins over the defaults.

`load_layers` builds them and turns every problem (a bad file, a bad value, an unknown key) into
a `SettingsError` with one line per problem in the project's own words, each naming its key and
where it can be set.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BeforeValidator, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

__all__ = [
    "LayeredSettings",
    "LogLevel",
    "SettingsError",
    "check_config_file",
    "load_layers",
    "problem_words",
]

# The file of the settings being built now: pydantic-settings asks the class, not the
# instance, for its sources, so the path travels beside the call rather than through it.
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("_CONFIG_FILE", default=None)


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


LogLevel = Annotated[
    Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)
]
"""A log level, accepted in any case (`DEBUG`, `debug`, `Debug`), kept in lower case."""


class SettingsError(Exception):
    """The settings are invalid: one line per problem, each naming its key and its problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class LayeredSettings(BaseSettings):
    """Base of each daemon's settings; build one with `load_layers` (or `from_layers`)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: flags (init), then the environment, then the file.
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        path = _CONFIG_FILE.get()
        if path is not None:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=path),)
        return sources

    @classmethod
    def from_layers(cls, config_file: Path | None, flags: Mapping[str, Any]) -> Self:
        """Flags whose value is None count as not given. Raises pydantic's ValidationError,
        and the TOML parser's ValueError for a malformed file."""
        token = _CONFIG_FILE.set(config_file)
        try:
            return cls(**{k: v for k, v in flags.items() if v is not None})
        finally:
            _CONFIG_FILE.reset(token)


def check_config_file(path: Path) -> None:
    """SettingsError unless `path` is a readable TOML file (a directory, a missing or an
    unreadable file each get their one line)."""
    try:
        tomllib.loads(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise SettingsError([f"config file {path} is a directory, not a file"]) from None
    except OSError as exc:
        raise SettingsError([f"cannot read config file {path}: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise SettingsError([f"config file {path} is not text (UTF-8)"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError([f"config file {path} is not valid TOML: {exc}"]) from None


S = TypeVar("S", bound=LayeredSettings)


def load_layers(
    cls: type[S],
    config_file: Path | None,
    flags: Mapping[str, Any],
    *,
    flags_of: Mapping[str, str] | None = None,
) -> S:
    """Defaults < `config_file` < environment < `flags` (None = not given), as `cls`.

    `flags_of` maps a setting to the command's flag for it (from the command itself, see
    model_runtime.command_line.command_flags): a problem's line names that flag among the places
    the setting can be given. Without it no flag is named, rather than one guessed.
    """
    flags_of = flags_of or {}
    if config_file is not None:
        check_config_file(config_file)
    try:
        return cls.from_layers(config_file, flags)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = [
            _line(err, prefix=prefix, config_file=config_file, flags_of=flags_of)
            for err in exc.errors()
        ]
        raise SettingsError(problems) from None


def _line(
    err: ErrorDetails, *, prefix: str, config_file: Path | None, flags_of: Mapping[str, str]
) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "settings"
    if err["type"] == "extra_forbidden":
        where = f" in {config_file}" if config_file is not None else ""
        program = prefix.rstrip("_").lower().replace("_", "-")  # EDGE_AGENT_: edge-agent
        return f"{key}: unknown setting{where} (`{program} config show --all` lists them all)"
    places = [flags_of[key]] if key in flags_of else []
    places.append(f"{prefix}{key.upper()}")
    if config_file is not None:
        places.append(f"'{key}' in {config_file}")
    where = ", ".join(places[:-1]) + (" or " if len(places) > 1 else "") + places[-1]
    return f"{key}: {problem_words(err)} (set as {where})"


# pydantic's error type -> the bound in its context, and our words for it.
_BOUND_WORDS = {
    "greater_than_equal": ("ge", "must be at least"),
    "greater_than": ("gt", "must be more than"),
    "less_than_equal": ("le", "must be at most"),
    "less_than": ("lt", "must be less than"),
}
# pydantic's error type -> our words for a value of the wrong kind.
_KIND_WORDS = {
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "path_type": "must be a path",
}


def problem_words(err: ErrorDetails) -> str:
    """What is wrong with one value, in the project's words rather than pydantic's."""
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    kind = err["type"]
    given = f", got {err['input']!r}" if "input" in err else ""
    if kind in _BOUND_WORDS:
        bound, words = _BOUND_WORDS[kind]
        return f"{words} {ctx[bound]}{given}"
    if kind in _KIND_WORDS:
        return f"{_KIND_WORDS[kind]}{given}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}{given}"
    if kind == "missing":
        return "is required"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"].removeprefix("Value error, ")))
    return err["msg"]
