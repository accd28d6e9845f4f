"""API keys: the ``auth`` section of the configuration.

A key comes from the file, the environment or a file of its own; a key that is empty, short or
a well-known example value stops the daemon at start-up (a homelab box on a LAN is reached by
everything on it), with the command that generates a good one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from llmswap.config.settings import AUTH, KEY
from llmswap.config.values import ConfigError, known_model


@attrs.frozen
class APIKey:
    """A client's key: who it is (``name``, what logs show), what it may do, its limits."""

    name: str
    secret: str = attrs.field(repr=False)
    env: str | None = None  # the environment variable it came from (backends never see it)
    models: frozenset[str] | None = None
    priority: int = KEY["priority"].default
    rpm: int | None = None
    max_concurrent: int | None = None
    admin: bool = KEY["admin"].default
    unload: bool = KEY["unload"].default
    upstream: bool = KEY["upstream"].default

    @property
    def may_unload(self) -> bool:
        return self.admin or self.unload


@attrs.frozen
class Auth:
    keys: tuple[APIKey, ...]
    # /health and /metrics without a key (monitoring, load balancers): "true" (states and
    # counts), "full" (backend details too) or "false".
    open_health: str = AUTH["open_health"].default


# Keys copied from examples and tutorials: refused wherever they appear in a key.
_EXAMPLE_KEYS = ("sk-1234", "changeme", "change-me", "password", "secret", "example",
                 "your-api-key", "your_api_key", "xxxx", "sk-xxx", "test", "unused")  # fmt: skip
_GENERATE = (
    "generate one with: python3 -c 'import secrets; print(\"sk-\" + secrets.token_urlsafe(32))'"
)


def _secret(raw: Mapping[str, Any], where: str) -> str:
    sources = [k for k in ("key", "key_env", "key_file") if k in raw]
    if len(sources) != 1:
        raise ConfigError(f"'{where}' needs exactly one of 'key', 'key_env' or 'key_file'")
    source = sources[0]
    value = raw[source]
    if not isinstance(value, str):
        raise ConfigError(f"'{where}.{source}' must be a string")
    if source == "key_env":
        secret = os.environ.get(value, "")
        origin = f"environment variable {value}"
    elif source == "key_file":
        try:
            secret = Path(value).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"'{where}.key_file': cannot read {value}: {e.strerror}") from None
        origin = f"file {value}"
    else:
        secret, origin = value, "the configuration"
    secret = secret.strip()
    lowered = secret.lower()
    if not secret:
        raise ConfigError(f"'{where}': the key from {origin} is empty; {_GENERATE}")
    if len(secret) < 16 or any(example in lowered for example in _EXAMPLE_KEYS):
        raise ConfigError(
            f"'{where}': the key from {origin} is too short or a well-known example value; "
            + _GENERATE
        )
    return secret


def parse_auth(raw: Any, models: Mapping[str, Any]) -> Auth | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("'auth' must be a mapping with 'keys'")
    AUTH.check_keys(raw, "auth")
    keys_raw = raw.get("keys")
    if not isinstance(keys_raw, list) or not keys_raw:
        raise ConfigError("'auth.keys' must list at least one key ({name: ..., key_env: ...})")
    keys: list[APIKey] = []
    for i, entry in enumerate(keys_raw):
        where = f"auth.keys[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"'{where}' must be a mapping with 'name' and a key source")
        KEY.check_keys(entry, where)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"'{where}.name' is required (what logs show instead of the key)")
        where = f"auth.keys[{name}]"
        allowed = entry.get("models")
        if allowed is not None:
            if not isinstance(allowed, list) or not all(isinstance(m, str) for m in allowed):
                raise ConfigError(f"'{where}.models' must be a list of model names")
            for m in allowed:
                known_model(m, models, f"{where}.models")
        keys.append(
            APIKey(
                name=name,
                secret=_secret(entry, where),
                env=entry.get("key_env"),
                models=None if allowed is None else frozenset(allowed),
                priority=KEY["priority"].read(entry, where),
                rpm=KEY["rpm"].read(entry, where),
                max_concurrent=KEY["max_concurrent"].read(entry, where),
                admin=KEY["admin"].read(entry, where),
                unload=KEY["unload"].read(entry, where),
                upstream=KEY["upstream"].read(entry, where),
            )
        )
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise ConfigError("'auth.keys': every key needs its own name")
    if len({k.secret for k in keys}) != len(keys):
        raise ConfigError("'auth.keys': two entries have the same key")
    open_health = raw.get("open_health", AUTH["open_health"].default)
    if isinstance(open_health, bool):  # YAML's true/false
        open_health = str(open_health).lower()
    return Auth(tuple(keys), AUTH["open_health"].check(open_health, "auth.open_health"))
