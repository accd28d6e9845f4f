"""``python -m llmswap convert-llama-swap FILE``: a llama-swap configuration as an llmswap one.

The common shape carries over: models with ``cmd`` (its ``${PORT}``, ``${MODEL_ID}`` and the
user's macros keep working), ``proxy`` (llama-swap's default, ``http://localhost:${PORT}``, when
there is none), ``checkEndpoint``, ``ttl``, ``aliases``, ``unlisted``, ``useModelName``,
``filters`` (``stripParams``, ``setParams``, and ``setParamsByID`` as aliases with their own
presets), ``env``; and the global ``macros``, ``startPort``, ``healthCheckTimeout``,
``globalTTL``, ``includeAliasesInList``, ``sendLoadingState``, ``selectors`` (as pools),
``apiKeys`` and the startup preload hook.  Every key that does not carry over is listed with the
reason, at the top of the output and on stderr: never silently dropped.  A key written in the
file becomes an environment variable to set (the list says which): a secret kept in a
configuration file is one copied with it, and one copied from an example is weak.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from llmswap.config.values import ConfigError

# llama-swap keys llmswap has no use for, and why.
_NOT_CARRIED = {
    "logLevel": "llmswap logs through twistd (`--logfile`, or stdout with -n)",
    "logTimeFormat": "llmswap's log lines carry ISO times",
    "logToStdout": "each backend's output is in `log_dir`/<model>.log and the console's Logs",
    "metricsMaxInMemory": "see `console.activity` and `/metrics`",
    "captureBuffer": "llmswap does not capture request bodies",
    "groups": "declare `devices` with memory budgets: models that fit run together",
    "matrix": "declare `devices` with memory budgets: models that fit run together",
    "peers": "one llmswap per box for now",
    "name": "not shown by llmswap",
    "description": "not shown by llmswap",
    "metadata": "not shown by llmswap",
    "concurrencyLimit": "llmswap queues beyond `concurrency` instead of answering 429",
    "timeouts": "see `request_timeout` and `startup_timeout`",
    "cmdStop": "llmswap stops the process group (SIGTERM, then SIGKILL after `stop_timeout`); "
    "for a container use `container_name`",
}
# llama-swap's selector strategies as pools' preferences.
_STRATEGIES = {"warm": "loaded", "pin": "order", "spillover": "loaded"}

# What carries over (the keys convert() and _model() read).
_GLOBAL_CARRIED = frozenset(
    {
        "models",
        "macros",
        "startPort",
        "includeAliasesInList",
        "sendLoadingState",
        "apiKeys",
        "healthCheckTimeout",
        "globalTTL",
        "selectors",
        "hooks",
    }
)
_MODEL_CARRIED = frozenset(
    {
        "cmd",
        "proxy",
        "checkEndpoint",
        "ttl",
        "aliases",
        "unlisted",
        "useModelName",
        "macros",
        "env",
        "filters",
        "sendLoadingState",
    }
)


def convert(data: Any) -> tuple[dict[str, Any], list[str]]:
    """(llmswap configuration, what was not carried over) for a parsed llama-swap config."""
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), Mapping):
        raise ConfigError("not a llama-swap configuration: it has no 'models' mapping")
    left: list[str] = []
    out: dict[str, Any] = {}
    for key in ("macros", "startPort", "includeAliasesInList", "sendLoadingState"):
        if key in data:
            name = {"startPort": "start_port", "includeAliasesInList": "list_aliases"}.get(key, key)
            value = data[key]
            if key == "sendLoadingState":
                name, value = "loading_status", "reasoning" if value else "comments"
            out[name] = value
    if data.get("apiKeys"):
        out["auth"] = {"keys": [_key(i, k, left) for i, k in enumerate(data["apiKeys"], 1)]}
    for key in data:
        if key == "hooks":
            if set(data["hooks"] or {}) - {"on_startup"}:
                left.append("hooks: only on_startup.preload carries over (as `preload`)")
        elif key not in _GLOBAL_CARRIED:
            left.append(f"{key}: {_NOT_CARRIED.get(key, 'unknown to llmswap')}")
    models = {}
    for name, raw in data["models"].items():
        models[str(name)] = _model(str(name), raw, data, left)
    pools = _pools(data.get("selectors") or {}, models, left)
    if pools:
        out["pools"] = pools
    preload = ((data.get("hooks") or {}).get("on_startup") or {}).get("preload")
    if preload:
        out["preload"] = _preload(preload, models, pools, left)
    out["models"] = models
    return out, left


def _key(i: int, key: str, left: list[str]) -> dict[str, str]:
    if key.startswith("${env.") and key.endswith("}"):
        return {"name": f"key-{i}", "key_env": key[len("${env.") : -1]}
    variable = f"LLMSWAP_KEY_{i}"
    left.append(f"apiKeys[{i - 1}]: a key written in the file; set {variable} to it, or to a "
                "new one if it came from an example (llmswap refuses weak keys)")  # fmt: skip
    return {"name": f"key-{i}", "key_env": variable}


def _pools(
    selectors: Mapping[str, Any], models: Mapping[str, Any], left: list[str]
) -> dict[str, Any]:
    """llama-swap's selectors as pools, with the targets that are models (or aliases) here."""
    names = set(models) | {a for m in models.values() for a in _alias_names(m)}
    pools: dict[str, Any] = {}
    for name, raw in selectors.items():
        where = f"selectors.{name}"
        targets = [str(t) for t in (raw or {}).get("targets") or []]
        kept = [t for t in targets if t in names]
        for gone in (t for t in targets if t not in names):
            left.append(f"{where}.targets: {gone} is not a model here (a peer's, or a profile's)")
        strategy = (raw or {}).get("strategy", "warm")
        if strategy not in _STRATEGIES:
            left.append(f"{where}.strategy: {strategy}: unknown; the pool prefers loaded members")
        if strategy == "spillover":
            left.append(
                f"{where}.strategy: spillover: the pool serves with a loaded member first "
                "(prefer: loaded); llmswap queues, not spills over"
            )
        for key in sorted(set(raw or {}) - {"targets", "strategy"}):
            left.append(f"{where}.{key}: not shown by llmswap")
        if not kept:
            left.append(f"{where}: none of its targets is a model here; no pool")
            continue
        pools[str(name)] = {"models": kept, "prefer": _STRATEGIES.get(strategy, "loaded")}
    return pools


def _alias_names(model: Mapping[str, Any]) -> list[str]:
    return [a if isinstance(a, str) else next(iter(a)) for a in model.get("aliases") or []]


def _preload(
    names: list[Any], models: Mapping[str, Any], pools: Mapping[str, Any], left: list[str]
) -> list[str]:
    """The startup hook's models; a selector's name is its pool's first member."""
    out: list[str] = []
    for name in map(str, names):
        if name in pools:
            first = pools[name]["models"][0]
            member = next((m for m, c in models.items() if first == m or first in
                           _alias_names(c)), first)  # fmt: skip
            left.append(f"hooks.on_startup.preload: {name} is a pool; its first model, "
                        f"{member}, is preloaded")  # fmt: skip
            name = member
        if name in models:
            out.append(name)
        else:
            left.append(f"hooks.on_startup.preload: {name} is not a model here")
    return list(dict.fromkeys(out))


def _model(name: str, raw: Any, top: Mapping[str, Any], left: list[str]) -> dict[str, Any]:
    where = f"models.{name}"
    if not isinstance(raw, Mapping) or "cmd" not in raw:
        raise ConfigError(f"'{where}' has no 'cmd'")
    out: dict[str, Any] = {"cmd": _command(raw["cmd"])}
    # llama-swap's default proxy: the model's ${PORT} on this machine.
    proxy = _loopback(str(raw.get("proxy", "")).rstrip("/") or "http://127.0.0.1:${PORT}")
    out["backend_url"] = proxy + "/v1"
    endpoint = raw.get("checkEndpoint")
    if endpoint == "none":
        left.append(f"{where}.checkEndpoint: none: llmswap always waits for /health")
    elif endpoint:
        out["health_url"] = proxy + endpoint
    if "healthCheckTimeout" in top:
        out["startup_timeout"] = max(15, top["healthCheckTimeout"])
    ttl = raw.get("ttl", -1)
    if ttl == -1:
        ttl = top.get("globalTTL", 0)
    if ttl:
        out["ttl"] = ttl
    aliases = []
    for alias in raw.get("aliases") or []:
        if isinstance(alias, Mapping):
            aliases.append(alias["id"])
            if alias.get("unlisted") or alias.get("name"):
                left.append(f"{where}.aliases[{alias['id']}]: its own name/unlisted")
        else:
            aliases.append(alias)
    if aliases:
        out["aliases"] = aliases
    for theirs, ours in (("unlisted", "unlisted"), ("useModelName", "use_model_name"),
                         ("macros", "macros")):  # fmt: skip
        if raw.get(theirs):
            out[ours] = raw[theirs]
    if "sendLoadingState" in raw:
        out["loading_status"] = "reasoning" if raw["sendLoadingState"] else "comments"
    if raw.get("env"):
        out["env"] = dict(str(e).split("=", 1) for e in raw["env"])
    filters = raw.get("filters") or {}
    if filters.get("stripParams"):
        out["strip_params"] = [p.strip() for p in str(filters["stripParams"]).split(",") if p]
    if filters.get("setParams"):
        out["set_params"] = dict(filters["setParams"])
    for id_, params in (filters.get("setParamsByID") or {}).items():
        variant = str(id_).replace("${MODEL_ID}", name)
        preset = {k: v for k, v in dict(params or {}).items() if k != "model"}  # protected
        if variant == name:  # its own name: its own parameters, after setParams
            out["set_params"] = {**out.get("set_params", {}), **preset}
            continue
        # An alias with its own preset: the alias listed already, or made (as llama-swap does).
        listed = out.setdefault("aliases", [])
        entry = {variant: {"set_params": preset}}
        if variant in listed:
            listed[listed.index(variant)] = entry
        else:
            listed.append(entry)
    for key in raw:
        if key not in _MODEL_CARRIED:
            left.append(f"{where}.{key}: {_NOT_CARRIED.get(key, 'unknown to llmswap')}")
    return out


def _loopback(url: str) -> str:
    """``localhost`` as the loopback address (llmswap's URLs name it so), no other host."""
    parts = urlsplit(url)
    host, colon, port = parts.netloc.partition(":")
    if host != "localhost":
        return url
    return urlunsplit(parts._replace(netloc="127.0.0.1" + colon + port))


def _command(cmd: Any) -> str:
    """llama-swap's ``cmd``: a string whose lines may be ``#`` comments."""
    lines = [line.strip() for line in str(cmd).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("#"))


def render(data: Any, source: str) -> tuple[str, list[str]]:
    """The llmswap YAML for a parsed llama-swap config, with what was not carried over as
    comments at its top; and that list."""
    config, left = convert(data)
    head = [f"# llmswap configuration converted from the llama-swap configuration {source}"]
    if left:
        head.append("# Not carried over:")
        head += [f"#   {line}" for line in left]
    return "\n".join(head) + "\n" + yaml.safe_dump(config, sort_keys=False), left
