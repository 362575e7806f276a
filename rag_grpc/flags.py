"""Feature flags: named switches in the configuration (``[flags.<name>]``),
evaluated per request by tenant or namespace, and reloaded without a restart.

A flag is on for a request when it is enabled, its key (the request's tenant
or namespace) is not denied, and the key is allowed or its stable hash bucket
falls within the rollout percentage. A known flag the configuration does not
name is on for everyone: the server behaves as it did before flags existed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from rag_grpc.config import ConfigError, FlagConfig, Settings, load_from
from rag_grpc.documents import resolve_namespace
from rag_grpc.security import tenancy

log = logging.getLogger(__name__)

# The flags the code consults, with what turning one off does.
KNOWN_FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "hybrid_search": (
            "a Search that leaves the mode to the server runs retrieval.default_mode "
            "(hybrid); off: dense"
        ),
        "answer_cache": "Ask replays and stores cached answers; off: always generates afresh",
    }
)

# Hash buckets per flag: percentages resolve to 0.01 %.
BUCKETS = 10_000


def bucket(flag: str, key: str) -> int:
    """The key's stable bucket (0..BUCKETS-1) for this flag: the same on every
    replica and restart, and independent between flags (the name is hashed
    too, so the first 10 % of one rollout is not the first 10 % of all)."""
    digest = hashlib.sha256(f"{flag}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def is_on(flag: str, config: FlagConfig, key: str) -> bool:
    """Whether a flag so configured is on for this key."""
    if not config.enabled or key in config.deny:
        return False
    if key in config.allow:
        return True
    return bucket(flag, key) < round(config.percentage * BUCKETS / 100)


def flag_key(config: FlagConfig, namespace: str) -> str:
    """The key a request is evaluated by: its tenant ("" without one) or its
    namespace as stored ("" means "default")."""
    stored = resolve_namespace(namespace)
    if config.key == "tenant":
        return tenancy.split(stored)[0] or ""
    return stored


class FeatureFlags:
    """The flags in force: read lock-free per request, replaced as a whole by
    reload() (a broken configuration keeps the flags in force)."""

    def __init__(
        self,
        flags: Mapping[str, FlagConfig],
        load: Callable[[], Mapping[str, FlagConfig]] | None = None,
    ) -> None:
        # Readers take self._flags without the lock: rebinding one attribute
        # is atomic, so a request sees the old flags or the new, never a mix.
        self._flags: Mapping[str, FlagConfig] = MappingProxyType(dict(flags))
        self._load = load
        self._reload_lock = threading.Lock()
        self.loaded_at = time.time()

    @classmethod
    def from_settings(cls, settings: Settings) -> FeatureFlags:
        """The settings' flags, reloaded from the same files and environment."""
        sources = settings.sources
        load = (lambda: load_from(sources).flags) if sources is not None else None
        return cls(settings.flags, load)

    @property
    def current(self) -> Mapping[str, FlagConfig]:
        """The configured flags in force now, by name."""
        return self._flags

    def enabled(self, flag: str, namespace: str) -> bool:
        """Whether the flag is on for a request on this (stored) namespace."""
        config = self._flags.get(flag)
        if config is None:
            return True
        return is_on(flag, config, flag_key(config, namespace))

    def reload(self) -> str | None:
        """Read the configuration again and put its flags in force; on error
        keep the flags in force and return the error text (None on success)."""
        if self._load is None:
            return None
        with self._reload_lock:
            try:
                new = self._load()
            except ConfigError as error:
                log.error("flags reload failed, the previous flags stay in force: %s", error)
                return str(error)
            old, self._flags = self._flags, MappingProxyType(dict(new))
            self.loaded_at = time.time()
        changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
        log.info("flags reloaded: %s", ", ".join(changed) if changed else "no change")
        return None

    def default_mode(self, configured: str) -> Callable[[str], str]:
        """Searcher.default_mode_for: the server's default mode for a
        namespace, dense where hybrid_search is off."""

        def default_mode_for(namespace: str) -> str:
            if configured == "hybrid" and not self.enabled("hybrid_search", namespace):
                return "dense"
            return configured

        return default_mode_for

    def register_metrics(self, meter_provider: MeterProvider) -> None:
        """Gauges per flag, read at collection time: rag_feature_flag_enabled
        (0/1) and rag_feature_flag_rollout_percent (100 unless configured)."""
        meter = meter_provider.get_meter("rag_grpc.flags")

        def names() -> Iterable[str]:
            return sorted({*KNOWN_FLAGS, *self._flags})

        def enabled(options: CallbackOptions) -> Iterable[Observation]:
            flags = self._flags
            return [
                Observation(int(flags[name].enabled if name in flags else True), {"flag": name})
                for name in names()
            ]

        def percent(options: CallbackOptions) -> Iterable[Observation]:
            flags = self._flags
            return [
                Observation(flags[name].percentage if name in flags else 100.0, {"flag": name})
                for name in names()
            ]

        meter.create_observable_gauge(
            "rag_feature_flag_enabled",
            callbacks=[enabled],
            description="1 while a feature flag is enabled (0: off for everyone)",
        )
        meter.create_observable_gauge(
            "rag_feature_flag_rollout_percent",
            callbacks=[percent],
            description="Share of tenants or namespaces a feature flag's rollout covers",
        )
