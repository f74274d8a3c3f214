"""Settings read in layers, as both daemons read theirs: command-line flags win over the
environment, which wins over a TOML config file, which wins over the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Self

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

__all__ = ["LayeredSettings"]

# The file of the settings being built now: pydantic-settings asks the class, not the
# instance, for its sources, so the path travels beside the call rather than through it.
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("_CONFIG_FILE", default=None)


class LayeredSettings(BaseSettings):
    """Base of each daemon's settings; build one with `from_layers`."""

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
