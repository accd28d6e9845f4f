"""llmswap attacked as a client on the LAN would attack it: no key, a key scoped to one model, a
browser on the box.  Each test is one finding of the security review (docs/security.md), shown
closed through real sockets against ``twistd llmswap`` in a subprocess, with fake backends as
real processes that witness what reached them.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import websocket
import yaml

from tests.support import FAKE, fake_model, free_port, read_ledger, terminate
from tests.test_twistd import TWISTD

pytestmark = pytest.mark.slow

ADMIN = "sk-admin-" + "a" * 32
ALICE = "sk-alice-" + "b" * 32  # alpha and the remote models, with upstream: true
BOB = "sk-bob-" + "c" * 32  # alpha only, no permission beyond it
EJECTOR = "sk-ejector-" + "d" * 32  # unload: true
REMOTE_SECRET = "sk-remote-" + "e" * 32
MAX_BODY = 1 << 20
HI = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}


@attrs.define
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    tmp: Path  # the daemon's TMPDIR
    log: Path
    ledger: str
    remote_ledger: str
    config: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def peak_rss(self) -> int:
        """The daemon's peak resident memory (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def spooled(self) -> int:
        """Bytes in the daemon's open files under its TMPDIR (Twisted's body spool files are
        unlinked at once, so the directory itself shows nothing)."""
        total = 0
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
                if target.startswith(str(self.tmp)):
                    total += os.stat(f"/proc/{self.proc.pid}/fd/{fd}").st_size
            except OSError:
                continue
        return total


def _limit_descriptors() -> None:
    """systemd's default: a soft limit of 1,024 (the hard one higher)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 8192))


def launch(tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> Running:
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    cfg = tmp_path / "llmswap.yaml"
    cfg.write_text(yaml.safe_dump(config))
    listen = config.get("listen") or f"tcp:{free_port()}:interface=127.0.0.1"
    port = int(listen.split(":")[1])
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "llmswap", "--config", str(cfg), "--listen", listen],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp), **(env or {})},
        preexec_fn=_limit_descriptors,
    )
    running = Running(proc, port, tmp, log, str(tmp_path / "ledger"),
                      str(tmp_path / "remote-ledger"), cfg)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, running.output()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return running
        except OSError:
            assert time.monotonic() < deadline, "llmswap did not start listening"
            time.sleep(0.1)


def stop(running: Running) -> None:
    terminate(running.proc)
    assert "Traceback" not in running.output()


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the client got to send before the answer came

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Answer:
    """One request on a fresh connection; the answer read to its end."""
    head = {"Host": f"127.0.0.1:{port}", "Content-Length": str(len(body)), **(headers or {})}
    return _exchange(port, method, path, head, iter([body]), timeout)


def flood(
    port: int, path: str, headers: dict[str, str], total: int, chunked: bool, probe: Any = None
) -> Answer:
    """A body of ``total`` zero bytes (declared, or chunked), sent until the answer comes."""
    head = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", **headers}
    if chunked:
        head["Transfer-Encoding"] = "chunked"
    else:
        head["Content-Length"] = str(total)
    block = b"\0" * 65536

    def body() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            if probe is not None:
                probe()
            sent += len(block)
            yield b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
        if chunked:
            yield b"0\r\n\r\n"

    return _exchange(port, "POST", path, head, body(), 120.0)


def _exchange(
    port: int,
    method: str,
    path: str,
    head: dict[str, str],
    body: Iterator[bytes],
    timeout: float,
) -> Answer:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
        sock.sendall("\r\n".join(lines).encode("latin-1"))
        sent = 0
        answered = select.poll()
        answered.register(sock, select.POLLIN)
        for block in body:
            if answered.poll(0):  # the answer came before the body was all sent
                break
            try:
                sock.sendall(block)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(block)
        raw = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
            if _complete(raw):
                break
    finally:
        sock.close()
    head_bytes, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        rest = _unchunk(rest)
    return Answer(int(status_line.split()[1]), headers, rest, sent)


def _complete(raw: bytes) -> bool:
    head, found, rest = raw.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value)
    return rest.endswith(b"0\r\n\r\n")


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(port: int, key: str, payload: dict[str, Any] = HI) -> Answer:
    body = json.dumps(payload).encode()
    return call(port, "POST", "/v1/chat/completions", body,
                {**bearer(key), "Content-Type": "application/json"})  # fmt: skip


# -- the keyed daemon ----------------------------------------------------------------------------


def keyed_config(tmp_path: Path, remote_port: int) -> dict[str, Any]:
    ledger = str(tmp_path / "ledger")
    remote = f"http://127.0.0.1:{remote_port}/v1"
    (tmp_path / "admin.key").write_text(ADMIN)
    return {
        "log_dir": str(tmp_path / "logs"),
        "max_body_bytes": MAX_BODY,
        "models": {
            "alpha": fake_model("alpha", ledger, sleep_mode=True, log_requests=True),
            "beta": fake_model("beta", ledger, log_requests=True),
            "broken": {**fake_model("broken", ledger), "cmd": [
                sys.executable, "-c",
                "print('SECRET PROMPT: the user asked about their diagnosis'); raise SystemExit(3)",
            ]},
            "hidden": {**fake_model("hidden", ledger), "unlisted": True},
            "hosted": {"remote": {"url": remote, "key_env": "REMOTE_KEY", "upstream": True}},
            "closed": {"remote": {"url": remote, "key_env": "REMOTE_KEY"}},
        },
        "auth": {
            "keys": [
                {"name": "admin", "key_file": str(tmp_path / "admin.key"), "admin": True},
                {"name": "alice", "key_env": "ALICE_KEY", "upstream": True,
                 "models": ["alpha", "hosted", "closed"]},
                {"name": "bob", "key_env": "BOB_KEY", "models": ["alpha", "broken"]},
                {"name": "ejector", "key_env": "EJECTOR_KEY", "unload": True},
            ],
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp_path = tmp_path_factory.mktemp("keyed")
    remote_port = free_port()
    remote = subprocess.Popen(
        [sys.executable, FAKE, "--port", str(remote_port), "--name", "hosted", "--log-requests",
         "--ledger", str(tmp_path / "remote-ledger")],
    )  # fmt: skip
    env = {"ALICE_KEY": ALICE, "BOB_KEY": BOB, "EJECTOR_KEY": EJECTOR,
           "REMOTE_KEY": REMOTE_SECRET}  # fmt: skip
    running = launch(tmp_path, keyed_config(tmp_path, remote_port), env)
    try:
        yield running
    finally:
        remote.terminate()
        remote.wait(timeout=10)
        stop(running)


def health(running: Running, key: str | None = None) -> Any:
    answer = call(running.port, "GET", "/health", headers=bearer(key) if key else None)
    assert answer.status == 200, answer.body
    return answer.json()


def wait_state(running: Running, model: str, state: str) -> None:
    deadline = time.monotonic() + 30
    while health(running)["models"][model]["state"] != state:
        assert time.monotonic() < deadline, f"{model} never {state}"
        time.sleep(0.05)


# Finding 1: bodies bounded before they are read.


def test_a_body_without_a_key_is_refused_at_its_headers(keyed: Running) -> None:
    chat(keyed.port, BOB)  # warm up: the daemon's own peak comes from serving, not the attack
    before = keyed.peak_rss()
    answer = flood(keyed.port, "/api/chat", {}, 700 << 20, chunked=False)
    assert answer.status == 401
    assert answer.json() == {"error": "Missing API key: send it as 'Authorization: Bearer "
                             "<key>' or 'x-api-key: <key>'"}  # fmt: skip
    assert answer.sent < 64 << 20  # the refusal came at once, not after 700 MB
    answer = flood(keyed.port, "/v1/chat/completions", bearer("sk-wrong-" + "x" * 30),
                   300 << 20, chunked=True)  # fmt: skip
    assert answer.status == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    assert keyed.peak_rss() - before < 16 << 20
    assert keyed.spooled() == 0


def test_a_declared_length_over_the_limit_is_refused_before_one_byte(keyed: Running) -> None:
    before = keyed.peak_rss()
    seen: list[int] = []
    answer = flood(keyed.port, "/v1/chat/completions", bearer(BOB), 700 << 20, chunked=False,
                   probe=lambda: seen.append(keyed.spooled()))  # fmt: skip
    assert answer.status == 413
    assert answer.json()["error"]["code"] == "request_too_large"
    assert f"the limit of {MAX_BODY} bytes (max_body_bytes)" in answer.json()["error"]["message"]
    assert answer.sent < 64 << 20
    assert max(seen, default=0) == 0  # no spool file was ever opened
    anthropic = flood(keyed.port, "/v1/messages", bearer(BOB), 50 << 20, chunked=False)
    assert anthropic.status == 413 and anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "request_too_large"
    assert keyed.peak_rss() - before < 16 << 20


def test_a_chunked_body_is_cut_at_the_limit(keyed: Running) -> None:
    before = keyed.peak_rss()
    seen: list[int] = []
    answer = flood(keyed.port, "/api/chat", bearer(BOB), 300 << 20, chunked=True,
                   probe=lambda: seen.append(keyed.spooled()))  # fmt: skip
    assert answer.status == 413
    assert "exceeds the limit of" in answer.json()["error"]  # Ollama's shape
    assert answer.sent < 64 << 20
    assert max(seen, default=0) <= MAX_BODY
    assert keyed.peak_rss() - before < 16 << 20
    # The daemon still serves, and the refused connections are gone.
    assert chat(keyed.port, BOB).status == 200


# Findings 2 and 3: /upstream is an operator's tool.


def test_upstream_never_escalates_a_scoped_key_on_a_remote_model(keyed: Running) -> None:
    before = len(read_ledger(keyed.remote_ledger))
    post = {**bearer(ALICE), "Content-Type": "application/json"}
    body = json.dumps({"model": "hosted", "purpose": "fine-tune"}).encode()
    for path in ("/upstream/hosted/v1/files", "/upstream/hosted/v1/fine_tuning/jobs",
                 "/upstream/hosted/v1/chat/completions/../../files",
                 "/upstream/closed/v1/chat/completions", "/v1/files", "/v1/batches",
                 "/v1/fine_tuning/jobs"):  # fmt: skip
        answer = call(keyed.port, "POST", path, body, post)
        assert answer.status == 404, (path, answer.body)
        assert answer.json()["error"]["code"] == "unknown_url"
    listed = call(keyed.port, "GET", "/upstream/hosted/v1/models", headers=bearer(ALICE))
    assert listed.status == 404
    served = call(keyed.port, "POST", "/upstream/hosted/v1/chat/completions",
                  json.dumps({"model": "hosted", "messages": []}).encode(), post)  # fmt: skip
    assert served.status == 200
    reached = [e for e in read_ledger(keyed.remote_ledger)[before:] if e["event"] == "request"]
    assert [e["path"] for e in reached] == ["/v1/chat/completions"]


def test_upstream_needs_its_permission(keyed: Running) -> None:
    answer = call(keyed.port, "GET", "/upstream/alpha/v1/models", headers=bearer(BOB))
    assert answer.status == 403
    assert answer.json()["error"]["code"] == "upstream_not_allowed"


def test_a_scoped_key_never_reaches_a_backends_management_routes(keyed: Running) -> None:
    assert chat(keyed.port, ALICE).status == 200  # alpha loaded
    post = {**bearer(ALICE), "Content-Type": "application/json"}
    for path in ("/upstream/alpha/sleep?level=1", "/upstream/alpha/%73leep",
                 "/upstream/alpha/%2573leep", "/upstream/alpha//sleep", "/upstream/alpha/./sleep",
                 "/upstream/alpha/x/../sleep", "/upstream/alpha/SLEEP",
                 "/upstream/alpha/collective_rpc", "/upstream/alpha/slots/0?action=erase",
                 "/upstream/alpha/props"):  # fmt: skip
        answer = call(keyed.port, "POST", path, b"{}", post)
        assert answer.status == 403, (path, answer.body)
        assert answer.json()["error"]["code"] == "management_route"
    slots = call(keyed.port, "GET", "/upstream/alpha/slots", headers=bearer(ALICE))
    assert slots.status == 403
    assert not [e for e in read_ledger(keyed.ledger) if e["event"] == "sleep"]
    assert health(keyed)["models"]["alpha"]["state"] == "ready"
    # An admin may: the operator's tool.
    admin = call(keyed.port, "GET", "/upstream/alpha/is_sleeping", headers=bearer(ADMIN))
    assert admin.status == 200 and admin.json() == {"is_sleeping": False}


# Finding 4: unloading is a permission.


def _eject(port: int, key: str) -> Answer:
    body = json.dumps({"model": "alpha", "keep_alive": 0}).encode()
    return call(port, "POST", "/api/generate", body, bearer(key))


def test_unloading_is_a_permission(keyed: Running) -> None:
    assert chat(keyed.port, BOB).status == 200
    for _ in range(3):  # an eject in a loop does nothing without the permission
        answer = _eject(keyed.port, BOB)
        assert answer.status == 200 and answer.json()["done_reason"] == "load"
    one = {**HI, "keep_alive": 0}
    ollama_chat = call(keyed.port, "POST", "/api/chat", json.dumps({**one, "stream": False})
                       .encode(), bearer(BOB))  # fmt: skip
    assert ollama_chat.status == 200
    assert call(keyed.port, "POST", "/admin/unload", headers=bearer(BOB)).status == 403
    unload_one = call(keyed.port, "POST", "/admin/models/alpha/unload", headers=bearer(BOB))
    assert unload_one.status == 403
    assert unload_one.json()["error"]["code"] == "unload_not_allowed"
    # An unload is begun before the answer is sent: it would show now.
    assert health(keyed)["models"]["alpha"]["state"] == "ready"
    answer = _eject(keyed.port, EJECTOR)
    assert answer.status == 200 and answer.json()["done_reason"] == "unload"
    assert health(keyed)["models"]["alpha"]["state"] == "stopped"
    assert call(keyed.port, "POST", "/admin/unload", headers=bearer(EJECTOR)).status == 200
    assert call(keyed.port, "POST", "/admin/reload", headers=bearer(EJECTOR)).status == 403


def test_the_router_api_keeps_the_admin_routes_rules(keyed: Running) -> None:
    """llama.cpp's router API: listing per key, loading for admins, unloading with the
    permission, a backend's /props only for a model the key may use and only once loaded."""
    for method, path in (("GET", "/models"), ("GET", "/models/sse"), ("GET", "/props"),
                         ("POST", "/models/load"), ("POST", "/models/unload")):  # fmt: skip
        anonymous = call(keyed.port, method, path, b'{"model": "alpha"}')
        assert anonymous.status == 401 and b"alpha" not in anonymous.body, path
    assert chat(keyed.port, BOB, {**HI, "model": "broken"}).status == 503
    listed = call(keyed.port, "GET", "/models", headers=bearer(BOB))
    models = {m["id"]: m for m in listed.json()["data"]}
    assert sorted(models) == ["alpha", "broken"]  # bob's models only
    assert models["broken"]["status"] == {"value": "unloaded", "args": [], "preset": "",
                                          "exit_code": 3, "failed": True}  # fmt: skip
    assert b"SECRET" not in listed.body and b"127.0.0.1" not in listed.body
    body = json.dumps({"model": "alpha"}).encode()
    refused = call(keyed.port, "POST", "/models/load", body, bearer(BOB))
    assert (refused.status, refused.json()["error"]["code"]) == (403, "admin_required")
    refused = call(keyed.port, "POST", "/models/load", b'{"model": "beta"}', bearer(ADMIN))
    assert refused.status == 200  # an admin loads any model
    wait_state(keyed, "beta", "ready")
    assert call(keyed.port, "GET", "/props?model=beta", headers=bearer(BOB)).status == 404
    not_loaded = call(keyed.port, "GET", "/props?model=alpha", headers=bearer(BOB))
    assert not_loaded.status == 400 and not_loaded.json()["error"]["code"] == "model_not_loaded"
    assert health(keyed)["models"]["beta"]["state"] == "ready"  # asking did not swap
    refused = call(keyed.port, "POST", "/models/unload", b'{"model": "beta"}', bearer(BOB))
    assert (refused.status, refused.json()["error"]["code"]) == (403, "unload_not_allowed")
    ejected = call(keyed.port, "POST", "/models/unload", b'{"model": "beta"}', bearer(EJECTOR))
    assert ejected.status == 200 and ejected.json() == {"success": True}
    wait_state(keyed, "beta", "stopped")
    big = json.dumps({"model": "alpha", "pad": "x" * 70_000}).encode()
    assert call(keyed.port, "POST", "/models/load", big, bearer(ADMIN)).status == 413
    hostile = call(keyed.port, "POST", "/models/load", b'{"model": "' + b"q" * 5000 + b'"}',
                   bearer(ADMIN))  # fmt: skip
    assert hostile.status == 404 and len(hostile.body) < 1000


def test_a_websocket_through_upstream_keeps_its_rules(keyed: Running) -> None:
    """The upgrade is refused to a key without upstream rights, and a tunnel carries neither
    the client's llmswap key nor its console session to the backend."""
    url = f"ws://127.0.0.1:{keyed.port}/upstream/alpha/ws"
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, timeout=30, header=[f"Authorization: Bearer {BOB}"])
    assert refused.value.status_code == 403
    ws = websocket.create_connection(url, timeout=30, cookie="llmswap_session=stolen",
                                     header=[f"Authorization: Bearer {ALICE}"])  # fmt: skip
    try:
        ws.send("hi")
        seen = json.loads(ws.recv())
    finally:
        ws.close()
    assert seen["name"] == "alpha" and seen["authorization"] is None
    # An upgrade the backend refuses is answered by llmswap and never becomes a raw connection
    # to the backend: the next request on the socket is llmswap's again.
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=30) as raw:
        raw.sendall(b"GET /upstream/alpha/nothing HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nAuthorization: Bearer " + ALICE.encode() + b"\r\n"
                    b"Content-Length: 0\r\n\r\n"
                    b"GET /slots HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # fmt: skip
        answers = b""
        while chunk := raw.recv(65536):
            answers += chunk
    assert answers.startswith(b"HTTP/1.1 404") and b'"upgrade_refused"' in answers
    assert answers.count(b"HTTP/1.1 ") == 2
    second = answers[answers.index(b"HTTP/1.1 ", 10) :]
    assert second.startswith(b"HTTP/1.1 401"), second[:200]  # llmswap's: /slots needs a key
    beta = f"ws://127.0.0.1:{keyed.port}/upstream/beta/ws"
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(beta, timeout=30, header=[f"Authorization: Bearer {ALICE}"])
    assert refused.value.status_code == 403  # beta is not alice's, as for any request


# Finding 6: what leaks.


def test_health_without_a_key_shows_states_and_counts_only(keyed: Running) -> None:
    assert chat(keyed.port, BOB).status == 200
    failed = chat(keyed.port, BOB, {**HI, "model": "broken"})
    assert failed.status == 503
    message = failed.json()["error"]["message"]
    assert "exited" in message and "code 3" in message
    assert "SECRET" not in message
    anonymous = health(keyed)
    assert anonymous["status"] == "ok" and "current_model" in anonymous  # the seed's keys
    text = json.dumps(anonymous)
    for leak in ("SECRET", "pid", "127.0.0.1", "/logs", "remote-ledger", "unix://", "engine"):
        assert leak not in text, leak
    assert anonymous["models"]["broken"]["state"] == "failed"
    assert "SECRET" not in json.dumps(health(keyed, BOB))
    assert chat(keyed.port, BOB).status == 200
    full = health(keyed, ADMIN)
    assert full["models"]["alpha"]["pid"] > 0
    assert any("SECRET PROMPT" in line for line in full["models"]["broken"]["output"])
    assert full["models"]["hosted"]["url"].startswith("http://127.0.0.1")


def test_no_route_lists_models_before_the_key(keyed: Running) -> None:
    anonymous = call(keyed.port, "GET", "/upstream/nothing/v1/models")
    assert anonymous.status == 401 and b"alpha" not in anonymous.body
    scoped = call(keyed.port, "GET", "/upstream/nothing/x", headers=bearer(ALICE))
    assert scoped.status == 404
    message = scoped.json()["error"]["message"]
    assert "alpha" in message and "hidden" not in message and "beta" not in message
    for path in ("/v1/models", "/api/tags", "/api/ps", "/v1/models/alpha"):
        assert call(keyed.port, "GET", path).status == 401


# Finding 7: backends get a clean environment.


def test_backends_never_inherit_llmswaps_secrets(keyed: Running) -> None:
    assert chat(keyed.port, BOB).status == 200
    pid = health(keyed, ADMIN)["models"]["alpha"]["pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"TMPDIR=" in environ  # the rest of llmswap's environment is there
    for secret in (ALICE, BOB, EJECTOR, REMOTE_SECRET):
        assert secret.encode() not in environ
    for name in (b"ALICE_KEY=", b"REMOTE_KEY=", b"DOCKER_HOST="):
        assert name not in environ


# Finding 8: log lines cannot be forged.


def test_client_text_cannot_forge_a_log_line(keyed: Running) -> None:
    forged = "nope\n2026-01-01T00:00:00+0000 [llmswap.access#info] POST /admin/reload model=x"
    answer = chat(keyed.port, BOB, {**HI, "model": forged})
    assert answer.status == 404
    deadline = time.monotonic() + 10
    while "model=nope" not in keyed.output():
        assert time.monotonic() < deadline, keyed.output()
        time.sleep(0.05)
    lines = keyed.output().splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01T00:00:00")]
    assert any("model=nope\\n2026-01-01" in line for line in lines)


# Finding 10: sessions, cookies, the console's headers.


def _login(port: int, key: str) -> str:
    answer = call(port, "POST", "/admin/session", headers=bearer(key))
    assert answer.status == 200, answer.body
    cookie = answer.headers["set-cookie"].split(";")[0]
    assert cookie.startswith("llmswap_session=")
    return cookie


def test_a_logout_ends_the_sessions_open_streams(keyed: Running) -> None:
    cookie = _login(keyed.port, ADMIN)
    sock = socket.create_connection(("127.0.0.1", keyed.port), timeout=15)
    sock.sendall(f"GET /admin/events HTTP/1.1\r\nHost: 127.0.0.1:{keyed.port}\r\n"
                 f"Cookie: {cookie}\r\n\r\n".encode())  # fmt: skip
    assert b"200 OK" in sock.recv(65536)
    out = call(keyed.port, "DELETE", "/admin/session",
               headers={"Cookie": cookie, "X-Requested-With": "test"})  # fmt: skip
    assert out.status == 200
    received = b""
    while not received.endswith(b"0\r\n\r\n"):  # the stream's last chunk
        chunk = sock.recv(65536)
        assert chunk, "the connection closed without ending the stream"
        received += chunk
    sock.close()
    again = call(keyed.port, "GET", "/admin/timeline", headers={"Cookie": cookie})
    assert again.status == 401


def test_a_rotated_admin_secret_ends_its_sessions(keyed: Running) -> None:
    cookie = _login(keyed.port, ADMIN)
    assert call(keyed.port, "GET", "/admin/timeline", headers={"Cookie": cookie}).status == 200
    key_file = keyed.config.parent / "admin.key"
    key_file.write_text(ADMIN + "-rotated")
    try:
        keyed.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while call(keyed.port, "GET", "/admin/timeline", headers={"Cookie": cookie}).status != 401:
            assert time.monotonic() < deadline, "the old session outlived the rotation"
            time.sleep(0.1)
    finally:
        key_file.write_text(ADMIN)
        keyed.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while (
            health(keyed).get("status") != "ok"
            or call(keyed.port, "GET", "/admin/timeline", headers=bearer(ADMIN)).status != 200
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_llmswaps_cookie_never_reaches_a_backend(keyed: Running) -> None:
    cookie = _login(keyed.port, ADMIN)
    before = len(read_ledger(keyed.ledger))
    answer = call(keyed.port, "POST", "/upstream/alpha/v1/chat/completions",
                  json.dumps(HI).encode(),
                  {**bearer(ALICE), "Cookie": f"theme=dark; {cookie}; lang=en"})  # fmt: skip
    assert answer.status == 200
    seen = [e["cookie"] for e in read_ledger(keyed.ledger)[before:]
            if e["event"] == "request" and e["path"] == "/v1/chat/completions"]  # fmt: skip
    assert seen == ["theme=dark; lang=en"]


def test_the_console_is_sent_with_its_protective_headers(keyed: Running) -> None:
    page = call(keyed.port, "GET", "/ui/")
    assert page.status == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    data = call(keyed.port, "GET", "/admin/timeline", headers=bearer(ADMIN))
    assert data.headers["x-content-type-options"] == "nosniff"


# -- without auth: the browser on the box, connections ------------------------------------------


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp_path = tmp_path_factory.mktemp("open")
    ledger = str(tmp_path / "ledger")
    config = {
        "log_dir": str(tmp_path / "logs"),
        "listen": f"tcp:{free_port()}:interface=0.0.0.0",
        "idle_timeout": 60,
        "models": {"alpha": fake_model("alpha", ledger), "beta": fake_model("beta", ledger)},
    }
    running = launch(tmp_path, config)
    try:
        yield running
    finally:
        stop(running)


def test_without_auth_a_warning_says_the_lan_may_use_every_model(open_daemon: Running) -> None:
    assert "beyond loopback without an auth section" in open_daemon.output()


def test_without_auth_no_other_site_and_no_rebound_name_reaches_admin(open_daemon: Running) -> None:
    port = open_daemon.port
    for headers in (
        {"Origin": "http://evil.example"},  # CSRF from a page on another site
        {"Origin": "null"},
        {"Host": f"evil.example:{port}"},  # DNS rebinding: the attacker's name, our address
        {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
    ):
        for method, path in (("POST", "/admin/reload"), ("POST", "/admin/unload"),
                             ("GET", "/admin/logs"), ("GET", "/admin/events")):  # fmt: skip
            answer = call(port, method, path, headers=headers, timeout=5)
            assert answer.status == 403, (headers, path, answer.body)
            assert answer.json()["error"]["code"] in ("cross_site_request", "foreign_host")
    own = call(port, "GET", "/admin/logs", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert own.status == 200
    assert call(port, "GET", "/admin/timeline", headers={"Host": f"localhost:{port}"}).status == 200
    assert call(port, "POST", "/admin/unload").status == 200


def test_idle_connections_leave_room_for_requests_and_swaps(open_daemon: Running) -> None:
    """1,200 idle connections under a soft descriptor limit of 1,024 at start."""
    assert "descriptor limit raised from 1024 to 8192" in open_daemon.output()
    idle = [socket.create_connection(("127.0.0.1", open_daemon.port)) for _ in range(1200)]
    try:
        for model in ("alpha", "beta", "alpha"):
            answer = chat(open_daemon.port, "", {**HI, "model": model})
            assert answer.status == 200, answer.body
    finally:
        for sock in idle:
            sock.close()


def _closed_by_llmswap(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_an_idle_connection_is_closed(tmp_path: Path) -> None:
    config = {"idle_timeout": 1, "models": {"alpha": fake_model("alpha")}}
    running = launch(tmp_path, config)
    try:
        quiet = socket.create_connection(("127.0.0.1", running.port), timeout=30)
        assert _closed_by_llmswap(quiet)  # by llmswap, not by us: it was idle
        quiet.close()
        assert call(running.port, "GET", "/health").status == 200
    finally:
        stop(running)


def test_connections_beyond_the_cap_are_refused_at_once(tmp_path: Path) -> None:
    config = {"max_connections": 50, "models": {"alpha": fake_model("alpha")}}
    running = launch(tmp_path, config)
    try:
        held, refused = [], 0
        for _ in range(60):  # each asks for /health on its connection, kept alive
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=30)
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\n\r\n"
                         .encode())  # fmt: skip
            try:
                answered = sock.recv(65536)
            except ConnectionResetError:
                answered = b""
            if answered.startswith(b"HTTP/1.1 200"):
                held.append(sock)
            else:  # closed at once: an accepted one would have answered
                assert answered == b""
                refused += 1
                sock.close()
        # At most 50 at once (the start-up probe's connection may still have counted).
        assert 45 <= len(held) <= 50 and refused == 60 - len(held)
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10
        while True:  # room again as they close
            try:
                if call(running.port, "GET", "/health", timeout=2).status == 200:
                    break
            except (OSError, IndexError, ValueError):
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "connection(s) refused so far" in running.output()
    finally:
        stop(running)


def test_a_unix_socket_is_not_loopback_unless_the_setting_says_so(tmp_path: Path) -> None:
    for trusted in (False, True):
        path = tmp_path / f"llmswap-{trusted}.sock"
        ledger = str(tmp_path / "ledger")
        config = {"listen": f"unix:{path}", "console": {"unix_is_loopback": trusted},
                  "models": {"alpha": fake_model("alpha", ledger)}}  # fmt: skip
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "llmswap", "--config", _write(tmp_path, config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not path.exists():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            status = _unix_get(path, "/admin/timeline")
            assert status == (200 if trusted else 403)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _write(tmp_path: Path, config: dict[str, Any]) -> str:
    cfg = tmp_path / "unix.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return str(cfg)


def _unix_get(path: Path, target: str) -> int:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(str(path))
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                return int(sock.recv(65536).split()[1])
        except (ConnectionRefusedError, FileNotFoundError, IndexError):
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_urllib_gets_the_413_of_a_large_upload(keyed: Running) -> None:
    """The lingering close: a client that writes its whole body before it reads (urllib) gets
    the refusal, not a connection reset."""
    body = b"{" + b" " * (8 << 20) + b"}"
    request = urllib.request.Request(
        keyed.url + "/v1/chat/completions", data=body, headers=bearer(BOB), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413
    assert json.load(caught.value)["error"]["code"] == "request_too_large"


# From the review: the relayed routes, keep_alive, what /upstream/ pages may do.


def test_relayed_routes_never_reach_management_or_resolve_elsewhere(keyed: Running) -> None:
    assert chat(keyed.port, BOB).status == 200
    before = len(read_ledger(keyed.ledger))
    body = json.dumps({"model": "alpha", "lora_name": "x", "lora_path": "/tmp/x"}).encode()
    post = {**bearer(BOB), "Content-Type": "application/json"}
    for path in ("/v1/load_lora_adapter", "/v1/models/load"):
        answer = call(keyed.port, "POST", path, body, post)
        assert answer.status == 403 and answer.json()["error"]["code"] == "management_route"
    for path in ("/v1/../sleep", "/v1/x/../../sleep", "/v1/chat%2F..%2F..%2Fsleep",
                 "/%76%31/../sleep?level=1"):  # fmt: skip
        answer = call(keyed.port, "POST", path, body, post)
        assert answer.status in (400, 404), (path, answer.body)
    reached = [e["path"] for e in read_ledger(keyed.ledger)[before:] if e["event"] == "request"]
    assert [p for p in reached if p != "/health"] == []


def test_a_short_keep_alive_is_an_unload_too(keyed: Running) -> None:
    assert chat(keyed.port, BOB).status == 200
    body = json.dumps({"model": "alpha", "messages": [], "keep_alive": "1ms"}).encode()
    assert call(keyed.port, "POST", "/api/chat", body, bearer(BOB)).status == 200
    one = {**HI, "stream": False, "keep_alive": 0.001}
    assert (
        call(keyed.port, "POST", "/api/chat", json.dumps(one).encode(), bearer(BOB)).status == 200
    )
    # Its ttl (none) stands: the unload's timer would have been armed with the answer.
    assert health(keyed)["models"]["alpha"]["state"] == "ready"
    show = call(keyed.port, "POST", "/api/show", json.dumps({"model": "alpha"}).encode(),
                bearer(BOB))  # fmt: skip
    assert show.status == 200 and "127.0.0.1" not in show.body.decode()


def test_a_page_served_through_upstream_runs_sandboxed(keyed: Running) -> None:
    answer = call(keyed.port, "GET", "/upstream/alpha/v1/models", headers=bearer(ALICE))
    assert answer.status == 200
    assert answer.headers["content-security-policy"].startswith("sandbox")
    assert "set-cookie" not in answer.headers


def test_without_auth_no_other_site_unloads_through_keep_alive(open_daemon: Running) -> None:
    port = open_daemon.port
    assert chat(port, "", HI).status == 200
    body = json.dumps({"model": "alpha", "keep_alive": 0}).encode()
    foreign = {"Host": f"evil.example:{port}", "Origin": "http://evil.example",
               "Content-Type": "text/plain"}  # fmt: skip
    answer = call(port, "POST", "/api/generate", body, foreign)
    assert answer.status == 200 and answer.json()["done_reason"] == "load"
    assert health(open_daemon)["models"]["alpha"]["state"] == "ready"
    assert call(port, "POST", "/api/generate", body).json()["done_reason"] == "unload"
