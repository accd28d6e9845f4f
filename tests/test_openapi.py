"""docs/openapi.yaml describes llmswap's routes exactly: every Klein route with its methods, no
path that no route serves, and each API's own error shape.  No daemon, no network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import schemathesis
import yaml
from klein import Klein
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule

from llmswap.ollama.routes import OllamaRoutes
from llmswap.resource import OpenAIResource

DOC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
# The methods an OpenAPI path item can describe; a Klein route without `methods` takes them all.
METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"})
# Where OpenAIResource mounts OllamaRoutes (its `/api/` branch route).
OLLAMA = "/api"
_VARIABLE = re.compile(r"<(?:(?P<converter>\w+)(?:\((?P<args>[^)]*)\))?:)?(?P<name>\w+)>")
_PARAMETER = re.compile(r"\{(\w+)\}")

Table = dict[str, frozenset[str]]


def load() -> dict[str, Any]:
    with open(DOC) as f:
        doc: dict[str, Any] = yaml.safe_load(f)
    return doc


def methods(given: Iterable[str] | None) -> frozenset[str]:
    """A route's methods as compared: all of them for a route that names none; HEAD left out
    where GET is there (werkzeug adds it to every GET route, HTTP implies it)."""
    found = METHODS if given is None else frozenset(m.upper() for m in given)
    return found - {"HEAD"} if "GET" in found else found


def templates(rule: str) -> list[str]:
    """A werkzeug rule as OpenAPI path templates, variables as ``{}`` (their names are the
    code's, the document's are for readers); an ``any(a, b)`` converter is one path for each."""
    paths = [""]
    at = 0
    for match in _VARIABLE.finditer(rule):
        literal = rule[at : match.start()]
        if match.group("converter") == "any":
            choices = [c.strip() for c in (match.group("args") or "").split(",")]
            paths = [p + literal + c for p in paths for c in choices]
        else:
            paths = [p + literal + "{}" for p in paths]
        at = match.end()
    return [p + rule[at:] for p in paths]


def routed(rules: Iterable[tuple[str, Rule]]) -> Table:
    """Path template -> methods, from (prefix, rule) pairs; rules of one path merged."""
    table: dict[str, frozenset[str]] = {}
    for prefix, rule in rules:
        for path in templates(prefix + rule.rule):
            table[path] = table.get(path, frozenset()) | methods(rule.methods)
    return table


def klein_rules(openai: Klein, ollama: Klein) -> list[tuple[str, Rule]]:
    """Every rule of both apps as served: Ollama's under the mount, the mount itself left out."""
    rules = []
    mount = {OLLAMA + "/", OLLAMA + "/<path:__rest__>"}
    mounted = {r.rule for r in openai.url_map.iter_rules()} & mount
    assert mounted == mount, f"OpenAIResource no longer mounts Ollama's routes at {OLLAMA}/"
    rules += [("", r) for r in openai.url_map.iter_rules() if r.rule not in mount]
    rules += [(OLLAMA, r) for r in ollama.url_map.iter_rules()]
    return rules


def documented(doc: dict[str, Any]) -> Table:
    table: dict[str, frozenset[str]] = {}
    for path, item in doc["paths"].items():
        template = _PARAMETER.sub("{}", path)
        assert template not in table, f"{path} describes the same route as another path"
        table[template] = methods(k for k in item if k.upper() in METHODS)
    return table


def served(path: str, openai: Map, ollama: Map) -> frozenset[str]:
    """The methods some route takes for the concrete ``path`` (none: no route serves it)."""
    url_map, below = (
        (ollama, path[len(OLLAMA) :]) if path.startswith(OLLAMA + "/") else (openai, path)
    )
    adapter = url_map.bind("localhost")
    allowed = set()
    for method in METHODS:
        try:
            adapter.match(below, method=method)
        except HTTPException:  # NotFound, MethodNotAllowed; a redirect is not this route
            continue
        allowed.add(method)
    return methods(allowed)


def differences(routes: Table, doc: Table, openai: Map, ollama: Map) -> list[str]:
    """What the document gets wrong about the routes, one line each (empty: nothing)."""
    out = []
    for path, taken in sorted(routes.items()):
        if path not in doc:
            out.append(f"route {path} {sorted(taken)} is not in docs/openapi.yaml")
        elif doc[path] != taken:
            out.append(f"{path}: the route takes {sorted(taken)}, the document {sorted(doc[path])}")
    for path, said in sorted(doc.items()):
        if path in routes:
            continue
        if "{}" in path:
            out.append(f"{path} is in docs/openapi.yaml but no route has this template")
            continue
        taken = served(path, openai, ollama)
        if taken != said:
            out.append(f"{path}: documented {sorted(said)}, the routes serve {sorted(taken)}")
    return out


def test_the_document_is_valid_openapi_with_unique_operation_ids() -> None:
    doc = load()
    assert doc["openapi"].startswith("3.")
    schemathesis.openapi.from_path(str(DOC)).validate()  # raises on a schema error
    ids = [
        op["operationId"]
        for item in doc["paths"].values()
        for method, op in item.items()
        if method.upper() in METHODS
    ]
    assert all(ids) and len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_every_route_is_documented_with_its_methods_and_nothing_else() -> None:
    openai, ollama = OpenAIResource.app, OllamaRoutes.app
    routes = routed(klein_rules(openai, ollama))
    problems = differences(routes, documented(load()), openai.url_map, ollama.url_map)
    assert problems == []
    # The walk sees what it should: Ollama's routes mounted, `any(...)` expanded.
    assert routes["/api/tags"] == {"GET"}
    assert routes["/api/delete"] == {"POST", "DELETE"}
    assert routes["/upstream/{}"] == METHODS - {"HEAD"}
    assert "/api/" not in routes


def test_a_route_added_or_a_method_changed_without_the_document_fails() -> None:
    """The comparison above can fail: an app with one more route, or one changed method."""
    extra = Klein()
    extra.route("/v1/batches/<batch_id>", methods=["GET"])(lambda request, batch_id: b"")
    extra.route("/health", methods=["GET", "POST"])(lambda request: b"")
    openai, ollama = OpenAIResource.app, OllamaRoutes.app
    rules = klein_rules(openai, ollama) + [("", r) for r in extra.url_map.iter_rules()]
    problems = differences(routed(rules), documented(load()), openai.url_map, ollama.url_map)
    assert problems == [
        "/health: the route takes ['GET', 'POST'], the document ['GET']",
        "route /v1/batches/{} ['GET'] is not in docs/openapi.yaml",
    ]
    # And a documented path that no route serves.
    doc = documented(load()) | {"/v2/chat": frozenset({"POST"}), "/api/{}/x": frozenset({"GET"})}
    problems = differences(routed(klein_rules(openai, ollama)), doc, openai.url_map, ollama.url_map)
    assert problems == [
        "/api/{}/x is in docs/openapi.yaml but no route has this template",
        "/v2/chat: documented ['POST'], the routes serve []",
    ]


def _resolved(doc: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in obj:
        *_, kind, name = obj["$ref"].split("/")
        obj = doc["components"][kind][name]
    return obj


def test_path_parameters_are_declared() -> None:
    doc = load()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method.upper() not in METHODS:
                continue
            listed = [*item.get("parameters", []), *op.get("parameters", [])]
            parameters = [_resolved(doc, p) for p in listed]
            declared = {p["name"] for p in parameters if p["in"] == "path" and p["required"]}
            assert declared == set(_PARAMETER.findall(path)), (path, method)


def _error_schema(response: dict[str, Any], doc: dict[str, Any]) -> str:
    """The component schema an error response's JSON body refers to."""
    ref: str = _resolved(doc, response)["content"]["application/json"]["schema"]["$ref"]
    return ref.rsplit("/", 1)[1]


def test_each_api_documents_its_own_error_shape() -> None:
    """Errors under /api/ are Ollama's, on /v1/messages Anthropic's, elsewhere OpenAI's; every
    relayed operation names the statuses llmswap answers itself (no 500 anywhere)."""
    doc = load()
    for path, item in doc["paths"].items():
        if path.startswith("/api/"):
            shape = "OllamaErrorBody"
        elif path.startswith("/v1/messages"):
            shape = "AnthropicErrorBody"
        else:
            shape = "OpenAIError"
        for method, op in item.items():
            if method.upper() not in METHODS:
                continue
            statuses = set(op["responses"])
            assert "500" not in statuses and "default" not in statuses, (path, method)
            for status, response in op["responses"].items():
                if int(status) >= 400 and method != "head":
                    assert _error_schema(response, doc) == shape, (path, method, status)
    relayed = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(relayed) == {"200", "400", "401", "403", "404", "413", "429", "502", "503", "504"}
    assert set(doc["paths"]["/api/pull"]["post"]["responses"]) == {"401", "403", "413", "501"}
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert (schemes["apiKeyHeader"]["in"], schemes["apiKeyHeader"]["name"]) == (
        "header",
        "x-api-key",
    )
    assert (schemes["sessionCookie"]["in"], schemes["sessionCookie"]["name"]) == (
        "cookie",
        "llmswap_session",
    )
