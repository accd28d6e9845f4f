"""``pools``: a virtual model name served by whichever of its models suits at the moment.

A pool (``chat: {models: [qwen-14b, gemma-12b]}``) lets clients name a capability rather than a
model: with ``prefer: loaded`` the request goes to a member already loaded, so it costs no swap;
``prefer: order`` keeps to the first member unless crash backoff holds it back.  The choice is
made per request by :mod:`llmswap.swap.pools` from the swap manager's picture; here only the
declaration is read and checked (llama-swap's ``selectors``, Ollama's #3902).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from llmswap.config.settings import POOL
from llmswap.config.values import ConfigError, names

LOADED = "loaded"
ORDER = "order"


@attrs.frozen
class Pool:
    name: str
    # Each member as asked (a model or an alias: a variant keeps its preset).
    members: tuple[str, ...]
    prefer: str = LOADED
    unlisted: bool = False


def read_pools(raw: Any, resolve: Mapping[str, str]) -> dict[str, Pool]:
    """The ``pools`` section; ``resolve``: every model and alias name -> its model."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError("'pools' must map pool names to their settings")
    pools: dict[str, Pool] = {}
    for name, spec in raw.items():
        where = f"pools.{name}"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"pool names must be non-empty strings, got {name!r}")
        if name in resolve:
            raise ConfigError(f"'{where}': '{name}' is already a model's or an alias's name")
        values = POOL.read_all(spec, where)
        members = names(values["models"], f"{where}.models")
        if not members:
            raise ConfigError(f"'{where}.models' must list at least one model")
        for i, member in enumerate(members):
            if member not in resolve:
                hint = " (a pool may not hold a pool)" if member in raw else ""
                raise ConfigError(
                    f"'{where}.models[{i}]' names '{member}', no model or alias{hint}"
                )
        models = [resolve[m] for m in members]
        if len(set(models)) != len(models):
            raise ConfigError(f"'{where}.models' names one model twice")
        pools[name] = Pool(name, members, values["prefer"], values["unlisted"])
    return pools
