"""The HTTP surface fuzzed from its OpenAPI documents with Schemathesis.

llmswap runs as users run it, ``twistd llmswap`` in a subprocess listening on 127.0.0.1 only,
with fake backends (tests/fakebackend.py), once open and once with API keys.  Schemathesis
generates requests for every operation of docs/openapi.yaml, valid ones and ones that break the
schema; llmswap's /api/ routes are also driven by Ollama's own document
(tests/data/ollama-openapi.yaml, vendored) and their 2xx answers checked against Ollama's
schemas.  A few directed requests add what generators rarely reach: every method a path does
not take (405), bodies over the limit (413), a key over its rate (429), a backend that cannot
start (503) or never gets ready (504), and inputs that once broke llmswap.

What every answer must satisfy: no 500, and no other 5xx than 502/503/504 (and the 501 that
/api/pull and its kind answer by design); an answer within the client's timeout (no hang);
llmswap's own answers with a status the document lists, valid against its schema, in the error
shape of the API called (OpenAI's, Ollama's under /api/, Anthropic's on /v1/messages).  At the
end the daemon is alive, idle and answers /health.  Bounded: a few examples per operation
(about 1,500 requests for the whole file), each request 20 s at most.  The examples are the
same every run (derandomized); ``LLMSWAP_FUZZ_RANDOM=1`` draws new ones.  ``pytest -s`` prints
the figures.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup

from llmswap.ollama.routes import OllamaRoutes
from llmswap.resource import OpenAIResource
from tests.support import fake_model, free_port, terminate
from tests.test_openapi import DOC, METHODS, served

pytestmark = pytest.mark.slow

OLLAMA_DOC = Path(__file__).resolve().parent / "data" / "ollama-openapi.yaml"
TWISTD = str(Path(sys.executable).with_name("twistd"))
TIMEOUT = 20.0  # seconds one request may take (a backend's start included)
EVENTS_TIMEOUT = 1.5  # /admin/events and /models/sse never end: read this long
STREAMS = ("/admin/events", "/models/sse")
MAX_BODY = 256 * 1024
SERVER_ERRORS = {502, 503, 504}  # a backend could not be reached, could not start, was silent
JSON, NDJSON = "application/json", "application/x-ndjson"
RELAYED = "x-llmswap-queue-position"  # on every answer that went through a backend's lease
ADMIN_ENV = "LLMSWAP_FUZZ_ADMIN_KEY"
# Examples per operation: (valid, schema-breaking); with keys fewer, most are refused.  Fewer
# where a request costs more, or where eight methods share one handler.
EXAMPLES = (6, 2)
KEYED_EXAMPLES = (4, 1)
FEWER = {
    "GET /admin/events": (1, 0),
    "GET /models/sse": (1, 0),
    "POST /models/load": (3, 1),
    "POST /admin/reload": (2, 1),
    "POST /admin/unload": (2, 1),
    "POST /admin/models/{model}/load": (3, 1),
}
SHARED_HANDLER = ("/ui/", "/ui/{file}", "/upstream/{rest}")
OLLAMA_IMPLEMENTED = (
    # chat, generate and embed first: they load models, which /api/ps then lists
    *("/api/chat", "/api/generate", "/api/embed", "/api/show"),
    *("/api/tags", "/api/ps", "/api/version"),
)
OLLAMA_NOT_HERE = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete")
MODELS = ("alpha", "beta", "gamma")
GAMMA_INFO = {
    "family": "gemma3",
    "parameter_size": "270M",
    "quantization_level": "Q4_K_M",
    "context_length": 2048,
    "capabilities": ["completion", "tools"],
}

# Schemathesis's generic classes, as these tests use them.
AnyCase = Case[Any]
Operation = schemathesis.APIOperation[Any, Any, Any, Any]


# -- the daemon ---------------------------------------------------------------------------------


def _key() -> str:
    # Hex after the prefix: never one of the example values keys.py refuses ("test", "xxxx"...).
    return "fz-" + secrets.token_hex(24)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    callers: dict[str, dict[str, str]]  # who calls -> the headers that say so
    admin: dict[str, str]  # the headers that reach every route
    weights: dict[str, int] = field(default_factory=dict)  # how often each calls (default 1)

    def who(self) -> list[str]:
        return [name for name in sorted(self.callers) for _ in range(self.weights.get(name, 1))]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tracebacks(self) -> list[str]:
        """The last line of every traceback llmswap logged (its internal errors)."""
        lines = self.log.read_text(errors="replace").splitlines()
        return [line.strip() for line in lines if line.lstrip("\t ").startswith("builtins.")]


def _start(tmp: Path, keys: bool) -> Daemon:
    models: dict[str, Any] = {name: fake_model(name) for name in MODELS[:2]}
    models["gamma"] = fake_model("gamma", info=GAMMA_INFO)
    # One that cannot start (503) and one that never becomes ready (504).
    models["broken"] = {
        "cmd": [sys.executable, "-c", "import sys; sys.exit(3)"],
        "backend_url": f"http://127.0.0.1:{free_port()}/v1",
    }
    models["sluggish"] = fake_model("sluggish", never_ready=True, startup_timeout=1)
    config: dict[str, Any] = {
        "log_dir": str(tmp / "logs"),
        "request_timeout": 15,
        "max_body_bytes": MAX_BODY,
        "models": models,
    }
    env = dict(os.environ)
    callers: dict[str, dict[str, str]] = {"anonymous": {}}
    admin: dict[str, str] = {}
    if keys:
        env[ADMIN_ENV], user, limited = _key(), _key(), _key()
        config["auth"] = {
            "keys": [
                {"name": "admin", "key_env": ADMIN_ENV, "admin": True},
                {"name": "user", "key": user, "models": ["alpha"]},
                {"name": "limited", "key": limited, "rpm": 1},
            ]
        }
        admin = {"Authorization": f"Bearer {env[ADMIN_ENV]}"}
        callers = {
            "admin": admin,
            "admin by x-api-key": {"x-api-key": env[ADMIN_ENV]},
            "user": {"Authorization": f"Bearer {user}"},
            "limited": {"Authorization": f"Bearer {limited}"},
            "anonymous": {},
            "unknown key": {"Authorization": f"Bearer {_key()}"},
        }
    path = tmp / "llmswap.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "llmswap.log"
    command = [TWISTD, "-n", "--pidfile=", "llmswap", "--config", str(path)]
    command += ["--listen", f"tcp:{port}:interface=127.0.0.1"]
    with open(log, "wb") as out:  # a file, not a pipe nobody reads: the daemon never blocks
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, env=env)
    # The admin key reaches every route: most generated requests use it.
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", log, callers, admin, {"admin": 8})
    deadline = time.monotonic() + 30
    while True:
        assert daemon.alive(), log.read_text()
        try:
            requests.get(daemon.url + "/health", headers=admin, timeout=5)
            return daemon
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "llmswap did not start listening"
            time.sleep(0.1)


def _stop(daemon: Daemon) -> None:
    terminate(daemon.proc)


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = _start(tmp_path_factory.mktemp("open"), keys=False)
    yield daemon
    _stop(daemon)


@pytest.fixture(scope="module")
def keyed_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = _start(tmp_path_factory.mktemp("keys"), keys=True)
    yield daemon
    _stop(daemon)


# -- what an answer must look like --------------------------------------------------------------


def api_of(path: str) -> str:
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai"


def _nullable_text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def shape_problem(api: str, content: bytes) -> str | None:
    """Why ``content`` is not an error body in ``api``'s shape (None: it is)."""
    try:
        body = json.loads(content)
    except ValueError:
        return f"not JSON: {content[:120]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if api == "ollama":
        ok = isinstance(error, str) and set(body) == {"error"}
    elif api == "anthropic":
        ok = (
            isinstance(error, dict)
            and set(body) == {"type", "error"}
            and body["type"] == "error"
            and set(error) == {"type", "message"}
            and all(isinstance(v, str) for v in error.values())
        )
    else:
        ok = (
            isinstance(error, dict)
            and set(body) == {"error"}
            and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str)
            and isinstance(error["type"], str)
            and _nullable_text(error["param"])
            and _nullable_text(error["code"])
        )
    return None if ok else f"not {api}'s error shape: {content[:200]!r}"


@dataclass
class Tally:
    """What one run sent and saw, and what went wrong: each kind of failure once per path, with
    the methods it happened with and its first example."""

    name: str
    cases: int = 0
    unsendable: int = 0
    relayed: int = 0
    operations: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: dict[tuple[str, str], tuple[set[str], str]] = field(default_factory=dict)

    def fail(self, label: str, what: str, example: str) -> None:
        """``label``: "METHOD /path ...", the operation as the report names it."""
        method, _, where = label.partition(" ")
        methods, _ = self.failures.setdefault((where, what), (set(), example))
        methods.add(method)

    def saw(self, response: requests.Response | schemathesis.Response) -> None:
        self.statuses[response.status_code] += 1
        self.relayed += RELAYED in {name.lower() for name in response.headers}

    def report(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (
            f"fuzz [{self.name}]: {self.cases} requests over {len(self.operations)} operations "
            f"({self.relayed} relayed to a backend, {self.unsendable} not sendable by the "
            f"client); statuses {{{statuses}}}; {len(self.failures)} distinct failures"
        )

    def assert_clean(self, daemon: Daemon) -> None:
        print("\n" + self.report())
        details = [
            f"{','.join(sorted(methods))} {where}: {what}\n    {example}"
            for (where, what), (methods, example) in sorted(self.failures.items())
        ]
        details += [f"llmswap logged: {line}" for line in sorted(set(daemon.tracebacks()))]
        assert not self.failures, "\n".join(details)


def conforms(
    tally: Tally,
    label: str,
    case: AnyCase,
    response: schemathesis.Response,
    example: str,
    checks: list[Any],
) -> None:
    """Schemathesis's ``checks`` on ``response``; on each line of an NDJSON answer."""
    content_type = (response.headers.get("content-type") or [""])[0]
    parts = [response]
    if content_type.startswith("application/x-ndjson"):
        lines = [line for line in response.content.split(b"\n") if line.strip()]
        if not lines:
            tally.fail(label, "an empty NDJSON stream", example)
        parts = [
            schemathesis.Response(
                status_code=response.status_code,
                headers={"content-type": [content_type]},
                content=line,
                request=response.request,
                elapsed=response.elapsed,
                verify=response.verify,
            )
            for line in lines
        ]
    for part in parts:
        try:
            case.validate_response(part, checks=checks)
        except FailureGroup as e:
            for failure in e.exceptions:
                detail = f"{failure.message[:400]} -- {part.content[:300]!r} -- {example}"
                tally.fail(label, f"{response.status_code}: {failure.title}", detail)


@schemathesis.deserializer("application/x-ndjson")
def _ndjson_line(ctx: schemathesis.DeserializationContext, response: schemathesis.Response) -> Any:
    """One line of an NDJSON answer (:func:`conforms` validates a stream line by line)."""
    return json.loads(response.content)


def check_answer(
    tally: Tally,
    label: str,
    documented: set[str],
    case: AnyCase | None,
    response: schemathesis.Response,
    example: str,
) -> None:
    """Every rule of the module docstring on one answer to a request of docs/openapi.yaml."""
    status = response.status_code
    relayed = RELAYED in response.headers
    method, path = label.split(" ", 2)[:2]
    api = api_of(path)
    own = not relayed or api == "ollama"  # Ollama's answers are llmswap's translation
    problems = []
    if status == 500:
        problems.append("500")
    elif status >= 500 and not relayed and status not in SERVER_ERRORS:
        if not (status == 501 and "501" in documented):
            problems.append(f"undocumented server error {status}")
    elif not relayed and str(status) not in documented:
        problems.append(f"status {status} is not documented")
    if status >= 400 and own and method != "HEAD":
        problem = shape_problem(api, response.content)
        if status == 405 and api == "anthropic":  # routing answers before the API is known
            problem = problem and shape_problem("openai", response.content)
        if problem:
            problems.append(f"{status} {problem[:60]}")
    for problem in problems:
        tally.fail(label, problem, example)
    if case is not None and own and not problems:
        checks = [response_schema_conformance, content_type_conformance]
        if not relayed:
            checks.append(response_headers_conformance)
        conforms(tally, label, case, response, example, checks)


def check_ollama_answer(
    tally: Tally, label: str, case: AnyCase, response: schemathesis.Response, example: str
) -> None:
    """An answer to a request of Ollama's document: no server error, Ollama's error shape,
    2xx answers valid against Ollama's schemas, 501 where llmswap has no such thing."""
    status = response.status_code
    not_here = case.path in OLLAMA_NOT_HERE
    if status == 500 or (status > 500 and status not in SERVER_ERRORS and not not_here):
        tally.fail(label, f"server error {status}", example)
    if not_here and status != 501:
        tally.fail(label, f"{status} where 501 was expected", example)
    if status >= 400:
        problem = shape_problem("ollama", response.content)
        if problem:
            tally.fail(label, f"{status} {problem[:60]}", example)
        return
    conforms(tally, label, case, response, example, [response_schema_conformance])


# -- generated requests -------------------------------------------------------------------------


def _aim(case: AnyCase, model: str | None) -> None:
    """Point a generated case at a configured model now and then, so requests get past the
    model lookup to the queue, the backends and the translations; keep it finite."""
    body = case.body
    if isinstance(body, dict):
        if model is not None and "model" in body:
            body["model"] = model
        options = body.get("options")
        tokens = options.get("num_predict") if isinstance(options, dict) else None
        if isinstance(options, dict) and isinstance(tokens, int):
            options["num_predict"] = min(abs(tokens), 8)  # the fake backend's tokens
    if model is not None and case.path_parameters:
        bare = model.removesuffix(":latest")
        for name in ("model", "model_id"):
            if name in case.path_parameters:
                case.path_parameters[name] = bare
        if "rest" in case.path_parameters:
            case.path_parameters["rest"] = f"{bare}/health"
    if case.query:
        case.query.pop("follow", None)  # a followed log never ends (tests/test_console.py's)


def _send(
    tally: Tally, base: str, case: AnyCase, headers: dict[str, str]
) -> schemathesis.Response | None:
    label = f"{case.method.upper()} {case.path}"
    timeout = EVENTS_TIMEOUT if case.path in STREAMS else TIMEOUT
    tally.cases += 1
    try:
        return case.call(base_url=base, headers=headers, timeout=timeout)
    except requests.Timeout:
        what = "no answer within the timeout (a hang)"
    except requests.ConnectionError as e:
        what = f"the connection failed: {type(e).__name__}"
    except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, ValueError):
        tally.unsendable += 1  # the client refuses it (a header with a newline...)
        return None
    tally.fail(label, what, case.as_curl_command(headers=headers))
    return None


Check = Callable[[AnyCase, schemathesis.Response, str], None]


def explore(
    tally: Tally,
    daemon: Daemon,
    operation: Operation,
    examples: tuple[int, int],
    models: tuple[str | None, ...],
    check: Check,
) -> None:
    """Send generated requests of ``operation`` (``examples``: how many valid, how many that
    break its schema) as the daemon's callers; ``check`` each answer."""
    for mode, count in zip(
        (GenerationMode.POSITIVE, GenerationMode.NEGATIVE), examples, strict=True
    ):
        if count == 0:
            continue

        @settings(
            max_examples=count,
            deadline=None,
            database=None,
            derandomize=not os.environ.get("LLMSWAP_FUZZ_RANDOM"),
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(
            case=operation.as_strategy(generation_mode=mode),
            who=st.sampled_from(daemon.who()),
            model=st.sampled_from(models),
        )
        def run(case: AnyCase, who: str, model: str | None) -> None:
            _aim(case, model)
            headers = daemon.callers[who]
            response = _send(tally, daemon.url, case, headers)
            if response is not None:
                tally.saw(response)
                example = f"as {who}: {case.as_curl_command(headers=headers)}"
                check(case, response, example[:1500])

        try:
            run()
        except Unsatisfiable:
            pass  # nothing of this operation can be made invalid (no parameters, no body)


def _operations(doc: Path) -> list[Operation]:
    schema = schemathesis.openapi.from_path(str(doc))
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"{doc}: {result.err()}"
        operations.append(result.ok())
    return operations


# -- directed requests --------------------------------------------------------------------------


def _raw(tally: Tally, daemon: Daemon, method: str, path: str, **kw: Any) -> requests.Response:
    response = requests.request(method, daemon.url + path, timeout=TIMEOUT, **kw)
    tally.cases += 1
    tally.saw(response)
    return response


def _sweep_methods(daemon: Daemon, tally: Tally) -> None:
    """Every method a path does not take: 405 with ``Allow``, in its API's shape."""
    names = {"model": "alpha", "model_id": "alpha", "digest": "sha256:0", "rest": "alpha/props"}
    names |= {"endpoint": "chat/completions", "file": "app.js"}
    openai, ollama = OpenAIResource.app.url_map, OllamaRoutes.app.url_map
    for path in yaml.safe_load(DOC.read_text())["paths"]:
        concrete = path.format(**names)
        taken = served(concrete, openai, ollama)
        for method in sorted(METHODS - taken - ({"HEAD"} if "GET" in taken else set())):
            label = f"{method} {path} (a method it does not take)"
            tally.operations.add(label)
            response = _raw(tally, daemon, method, concrete, headers=daemon.admin)
            example = f"curl -X {method} {daemon.url}{concrete}"
            answer = schemathesis.Response.from_any(response)
            check_answer(tally, label, {"405"}, None, answer, example)
            if response.status_code == 405 and not response.headers.get("Allow"):
                tally.fail(label, "405 without Allow", example)


def _expect(tally: Tally, label: str, response: requests.Response, status: int, api: str) -> None:
    tally.operations.add(label)
    problem = shape_problem(api, response.content)
    # A model that failed to load before is held back a while (crash backoff): 503, with
    # Retry-After, is its answer then.
    allowed = {status, 503} if status == 504 else {status}
    says_when = response.status_code not in (429, 503) or response.headers.get("Retry-After")
    if response.status_code not in allowed or problem or not says_when:
        tally.fail(label, f"{response.status_code} {problem or ''}", response.text[:300])


def _limits(daemon: Daemon, tally: Tally) -> None:
    """The statuses few generated requests reach: 413 (over max_body_bytes), 503 (a backend
    that cannot start), 504 (one never ready; 503 once it is held back for failing again) and,
    with keys, 429 (over rpm), in each API."""
    paths = {"/v1/chat/completions": "openai", "/api/chat": "ollama", "/v1/messages": "anthropic"}
    big = json.dumps({"model": "alpha", "padding": "x" * MAX_BODY})
    cases = [(413, big, "over max_body_bytes")]
    for model, status in (("broken", 503), ("sluggish", 504)):
        cases.append((status, json.dumps({"model": model, "stream": False}), model))
    headers = {"Content-Type": "application/json", **daemon.admin}
    for status, body, what in cases:
        for path, api in paths.items():
            response = _raw(tally, daemon, "POST", path, data=body, headers=headers)
            _expect(tally, f"POST {path} ({what}: {status})", response, status, api)
    if "limited" not in daemon.callers:
        return
    headers = {"Content-Type": "application/json", **daemon.callers["limited"]}
    small = json.dumps({"model": "alpha", "stream": False, "messages": []})
    _raw(tally, daemon, "POST", "/v1/chat/completions", data=small, headers=headers)
    for path, api in paths.items():  # its one request a minute is spent
        response = _raw(tally, daemon, "POST", path, data=small, headers=headers)
        _expect(tally, f"POST {path} (over rpm: 429)", response, 429, api)


# Requests the generators rarely or never make, each of which once answered 500, an error in no
# API's shape, or (keep_alive "nan") set llmswap's reactor spinning; expected: a 2xx or a 4xx.
EDGES: list[tuple[str, str, str, Any]] = [
    ("GET", "/api", "ollama", None),  # the mount point without its slash
    ("POST", "/ui", "openai", None),
    ("GET", "/v1/models/%FF", "openai", None),  # not UTF-8
    ("GET", "/admin/activity?limit=%C2%B2", "openai", None),  # "²".isdigit(), int("²") fails
    ("GET", "/admin/logs?lines=%C2%B2", "openai", None),
    (
        "POST",
        "/api/chat",
        "ollama",
        {"model": "alpha", "stream": False, "messages": [{"role": "assistant", "tool_calls": 5}]},
    ),
    (
        "POST",
        "/api/generate",
        "ollama",
        {"model": "alpha", "prompt": "hi", "stream": False, "keep_alive": 1e15},
    ),
    ("GET", "/api/ps", "ollama", None),  # alpha kept loaded for 31 million years
    (
        "POST",
        "/api/generate",
        "ollama",
        {"model": "beta", "prompt": "hi", "stream": False, "keep_alive": "nan"},
    ),
    ("GET", "/api/ps", "ollama", None),
]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _edges(daemon: Daemon, tally: Tally) -> None:
    for method, path, api, body in EDGES:
        label = f"{method} {path}" + (f" {json.dumps(body)}" if body else "")
        tally.operations.add(label)
        response = _raw(tally, daemon, method, path, json=body, headers=daemon.admin)
        problem = shape_problem(api, response.content) if response.status_code >= 400 else None
        if response.status_code >= 500 or problem:
            tally.fail(label, f"{response.status_code} {problem or ''}", response.text[:300])
    # Idle, llmswap uses next to no CPU (a reactor looping on callLater(0) uses a core).
    before, started = _cpu_seconds(daemon.proc.pid), time.monotonic()
    time.sleep(1.5)
    used = _cpu_seconds(daemon.proc.pid) - before
    if used > 0.5 * (time.monotonic() - started):
        tally.fail("idle", f"llmswap used {used:.2f} s of CPU in 1.5 s idle", "after the above")
    for model in MODELS:  # their keep_alive ends with their backends
        _raw(tally, daemon, "POST", f"/admin/models/{model}/unload", headers=daemon.admin)


# -- the tests ----------------------------------------------------------------------------------


def fuzz(daemon: Daemon, name: str, per_operation: tuple[int, int]) -> Tally:
    tally = Tally(name)
    # Mostly configured models (alpha twice: the user key may use it), now and then another.
    models: tuple[str | None, ...] = (None, "alpha", *MODELS, "alpha:latest")
    for operation in _operations(DOC):
        label = f"{operation.method.upper()} {operation.path}"
        tally.operations.add(label)
        examples = FEWER.get(label, per_operation)
        if operation.path in SHARED_HANDLER and operation.method != "get":
            examples = (1, 1)
        documented = set(operation.definition.raw["responses"])
        check: Check = functools.partial(check_answer, tally, label, documented)
        explore(tally, daemon, operation, examples, models, check)
        if not daemon.alive():
            tally.fail(label, "llmswap exited", daemon.log.read_text()[-2000:])
            return tally
    _sweep_methods(daemon, tally)
    _limits(daemon, tally)
    _edges(daemon, tally)
    assert daemon.alive(), daemon.log.read_text()[-2000:]
    health = requests.get(daemon.url + "/health", headers=daemon.admin, timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    return tally


def test_fuzz_without_keys(open_daemon: Daemon) -> None:
    fuzz(open_daemon, "no auth", EXAMPLES).assert_clean(open_daemon)


def test_fuzz_with_keys(keyed_daemon: Daemon) -> None:
    fuzz(keyed_daemon, "auth with keys", KEYED_EXAMPLES).assert_clean(keyed_daemon)


def test_ollama_routes_answer_as_ollamas_own_schemas_say(open_daemon: Daemon) -> None:
    """The /api/ routes llmswap implements, driven by Ollama's document: no server error, and
    every 2xx answer (each NDJSON line of a stream) valid against Ollama's response schema;
    pull, push, create, copy and delete answer 501 in Ollama's shape."""
    tally = Tally("Ollama's openapi.yaml")
    by_path = {op.path: op for op in _operations(OLLAMA_DOC)}
    assert set(OLLAMA_IMPLEMENTED + OLLAMA_NOT_HERE) <= set(by_path), sorted(by_path)
    models = ("alpha", "alpha:latest", "beta", "gamma", "gamma:latest", None)
    plan = [(p, (12, 3)) for p in OLLAMA_IMPLEMENTED] + [(p, (1, 1)) for p in OLLAMA_NOT_HERE]
    for path, examples in plan:
        operation = by_path[path]
        label = f"{operation.method.upper()} {path}"
        tally.operations.add(label)
        check: Check = functools.partial(check_ollama_answer, tally, label)
        explore(tally, open_daemon, operation, examples, models, check)
    listed = requests.get(open_daemon.url + "/api/ps", timeout=TIMEOUT)
    assert open_daemon.alive()
    tally.assert_clean(open_daemon)
    # Models were loaded: the checks above saw /api/ps answers with entries in them.
    assert listed.status_code == 200 and listed.json()["models"], listed.text


def _answer(path: str, status: int, body: bytes, content_type: str) -> schemathesis.Response:
    request = requests.Request("GET", "http://127.0.0.1:9" + path).prepare()
    headers = {"content-type": [content_type]}
    return schemathesis.Response(status, headers, body, request, elapsed=0.0, verify=True)


def test_the_checks_catch_what_they_look_for() -> None:
    """The checks above can fail (no daemon): answers made up to break each rule."""
    ollama = {op.path: op for op in _operations(OLLAMA_DOC)}
    ours = {f"{op.method.upper()} {op.path}": op for op in _operations(DOC)}
    tally = Tally("made up")
    detail = {"format": "gguf", "family": "", "families": None}  # Ollama's says: an array
    tags = {"models": [{"name": "a:latest", "size": 0, "details": detail}]}
    answer = _answer("/api/tags", 200, json.dumps(tags).encode(), JSON)
    check_ollama_answer(tally, "GET /api/tags", ollama["/api/tags"].Case(), answer, "tags")
    line = b'{"model": "a", "created_at": "2026-01-01T00:00:00Z", "done": false}\n'
    stream = line + b'{"model": "a", "done": "yes"}\n'  # done: a boolean
    chat = ollama["/api/chat"].Case(body={"model": "a", "messages": []})
    for status, body, content_type, example in [
        (200, stream, NDJSON, "chat"),
        (200, line, NDJSON, "a good stream"),
        (400, b'{"error": {"message": "x"}}', JSON, "shape"),
    ]:
        answer = _answer("/api/chat", status, body, content_type)
        check_ollama_answer(tally, "POST /api/chat", chat, answer, example)
    models = ours["GET /v1/models"]
    documented = set(models.definition.raw["responses"])
    no_code = json.dumps({"error": {"message": "m", "type": "t", "param": None}}).encode()
    internal = json.dumps({"error": {"message": "m", "type": "t", "param": None, "code": None}})
    for status, text, content_type in [
        (500, internal, JSON),
        (401, no_code.decode(), JSON),
        (404, "<html>No Such Resource</html>", "text/html"),
        (200, json.dumps({"object": "list", "data": [{"id": "a"}]}), JSON),  # no owned_by...
    ]:
        answer = _answer("/v1/models", status, text.encode(), content_type)
        check_answer(tally, "GET /v1/models", documented, models.Case(), answer, str(status))
    assert {(where, what.split(":")[0]) for where, what in tally.failures} == {
        ("/api/tags", "200"),
        ("/api/chat", "200"),
        ("/api/chat", "400 not ollama's error shape"),
        ("/v1/models", "500"),
        ("/v1/models", "401 not openai's error shape"),
        ("/v1/models", "status 404 is not documented"),
        ("/v1/models", "404 not JSON"),
        ("/v1/models", "200"),
    }
    examples = {example.rsplit(" -- ", 1)[-1] for _, example in tally.failures.values()}
    assert examples >= {"tags", "chat", "shape"} and "a good stream" not in examples
