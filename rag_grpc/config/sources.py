"""Where the configuration comes from: the TOML files to read (the base file
and an environment's overlay), reading them, and merging them in order as
one pydantic-settings source (tables key by key, other values replaced)."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource


class ConfigError(Exception):
    """The configuration is invalid; the message names each bad field."""


@dataclass(frozen=True)
class ConfigSources:
    """Where a Settings was loaded from: its TOML files, lowest priority
    first, and the explicit values given on top (CLI flags)."""

    files: tuple[Path, ...]
    overrides: Mapping[str, Any]


# An environment names a file: letters, digits, - and _ only.
_ENV_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEFAULT_CONFIG_FILE = Path("rag-grpc.toml")


def config_files(config_file: Path | None = None, env: str | None = None) -> tuple[Path, ...]:
    """The TOML files to read, lowest priority first: the base file
    (config_file, else $RAG_GRPC_CONFIG) and, for an environment (env, else
    $RAG_GRPC_ENV), its overlay beside it: base rag-grpc.toml, env prod ->
    rag-grpc.prod.toml. With an environment and no base named,
    ./rag-grpc.toml is the base when it exists. ConfigError when a named
    file or the overlay is missing."""
    if config_file is None and os.environ.get("RAG_GRPC_CONFIG"):
        config_file = Path(os.environ["RAG_GRPC_CONFIG"])
    env = env or os.environ.get("RAG_GRPC_ENV") or None
    files: list[Path] = []
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        files.append(config_file)
    if env is None:
        return tuple(files)
    if not _ENV_NAME_RE.match(env):
        raise ConfigError(
            f"environment name {env!r} must be letters, digits, '-' or '_' (like prod)"
        )
    base = config_file or DEFAULT_CONFIG_FILE
    if config_file is None and base.is_file():
        files.append(base)
    overlay = base.with_name(f"{base.stem}.{env}{base.suffix or '.toml'}")
    if not overlay.is_file():
        raise ConfigError(f"environment {env!r} needs its overlay file {overlay}, which is missing")
    files.append(overlay)
    return tuple(files)


def read_toml(path: Path) -> dict[str, Any]:
    """A configuration file's tables; ConfigError when it cannot be read or
    is not valid TOML."""
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def deep_merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """base with overlay on top: tables merged key by key, any other value
    (arrays included) replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class TomlLayers(PydanticBaseSettingsSource):
    """The configuration files, merged in order (tables key by key)."""

    def __init__(
        self, settings_cls: type[BaseSettings], layers: tuple[tuple[str, dict[str, Any]], ...]
    ) -> None:
        super().__init__(settings_cls)
        self.layers = layers

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ gives the whole merged mapping

    def __call__(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for _, data in self.layers:
            merged = deep_merge(merged, data)
        return merged
