"""Loading a configuration: the sources validated into Settings
(ConfigError with every bad field named), and each leaf's origin (a file, an
environment variable or the command line) kept for `rag-grpc config
--show-origin`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic_settings import EnvSettingsSource, SettingsError

from rag_grpc.config.settings import Settings
from rag_grpc.config.sources import ConfigError, ConfigSources, config_files, read_toml


def load_settings(
    config_file: Path | None = None, *, env: str | None = None, **overrides: Any
) -> Settings:
    """Load and validate the configuration (base file, the environment's
    overlay, environment variables, overrides); raise ConfigError with a
    readable message."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return load_from(ConfigSources(config_files(config_file, env), given))


def load_from(sources: ConfigSources) -> Settings:
    """Load a configuration from these sources again (a reload reads the
    files afresh); ConfigError when it is invalid."""
    from pydantic import ValidationError

    layers = tuple((str(path), read_toml(path)) for path in sources.files)
    settings_cls: type[Settings] = Settings
    if layers:
        settings_cls = type("FileSettings", (Settings,), {"config_layers": layers})
    try:
        settings = settings_cls(**sources.overrides)
        environment = EnvSettingsSource(settings_cls)()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    origins: dict[tuple[str, ...], str] = {}
    for name, data in layers:
        origins.update(dict.fromkeys(_leaves(data), name))
    names = {variable.upper() for variable in os.environ}
    for path in _leaves(environment):
        origins[path] = _variable_name(path, names)
    origins.update(dict.fromkeys(_leaves(sources.overrides), "command line"))
    settings._origins = origins
    settings._sources = sources
    return settings


def _leaves(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, path)
        else:
            yield path


def _variable_name(path: tuple[str, ...], names: set[str]) -> str:
    # A section may come whole from one variable (RAG_GRPC_LIMITS='{...}'):
    # the longest name that is set is the one that gave this value.
    for end in range(len(path), 0, -1):
        name = "RAG_GRPC_" + "__".join(path[:end]).upper()
        if name in names:
            return name
    return "RAG_GRPC_" + "__".join(path).upper()
