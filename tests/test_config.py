"""Configuration loading: the seed's file unchanged, precise errors, the check-config command."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from llmswap.__main__ import main
from llmswap.config import settings
from llmswap.config.config import Config, load, parse
from llmswap.config.values import ConfigError
from llmswap.memory import footprints

SEED = textwrap.dedent(
    """\
    queue_size: 50
    request_timeout: 600
    models:
      qwen3-coder:
        container_name: qwen3-server
        backend_url: http://localhost:8081/v1
        health_url: http://localhost:8081/health
        startup_timeout: 120
      gpt-oss-120b:
        container_name: gptoss-server
        backend_url: http://localhost:8082/v1
        health_url: http://localhost:8082/health
        startup_timeout: 180
    """
)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "llmswap.yaml"
    p.write_text(text)
    return p


def refusal(raw: Any) -> str:
    """The error a configuration is refused with (it must be refused)."""
    with pytest.raises(ConfigError) as e:
        parse(raw)
    return str(e.value)


def test_seed_config_loads_unchanged(tmp_path: Path) -> None:
    config = load(write(tmp_path, SEED))
    assert (config.queue_size, config.request_timeout) == (50, 600)
    model = config.models["qwen3-coder"]
    assert model.kind == "docker"
    assert model.container_name == "qwen3-server"
    assert model.health_url == "http://localhost:8081/health"
    assert model.startup_timeout == 120
    assert config.listen == "tcp:8888"


def test_process_model_with_string_cmd_and_derived_health_url() -> None:
    config = parse(
        {"models": {"m": {"backend_url": "http://127.0.0.1:9000/v1/", "cmd": "srv --port '9000'"}}}
    )
    m = config.models["m"]
    assert m.cmd == ("srv", "--port", "9000")
    assert m.backend_url == "http://127.0.0.1:9000/v1"
    assert m.health_url == "http://127.0.0.1:9000/health"
    assert m.startup_timeout == 180


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            SEED.replace("startup_timeout: 120", "startup_timout: 120"),
            "unknown key 'models.qwen3-coder.startup_timout' (did you mean 'startup_timeout'?)",
        ),
        ("queue_sise: 3\nmodels: {}\n", "unknown key 'queue_sise' (did you mean 'queue_size'?)"),
        ("models:\n  m: {backend_url: 'http://x/v1'}\n", "needs exactly one of 'container_name'"),
        ("models:\n  m: {cmd: x}\n", "'models.m.backend_url' is required"),
        ("models:\n  m: {cmd: x, backend_url: 'localhost:8081'}\n", "must be an http(s) URL"),
        (
            "queue_size: 0\nmodels:\n  m: {cmd: x, backend_url: 'http://x/v1'}\n",
            "'queue_size' must be greater than 0",
        ),
        (
            "queue_size: 2.5\nmodels:\n  m: {cmd: x, backend_url: 'http://x/v1'}\n",
            "'queue_size' must be a whole number",
        ),
        (
            "models:\n  m: {cmd: x, backend_url: 'http://x/v1', startup_timeout: soon}\n",
            "'models.m.startup_timeout' must be a number",
        ),
        ("models: [a, b]\n", "'models' must map"),
        ("models:\n  m: {cmd: x, backend_url: 'http://x/v1'\n", "not valid YAML"),
    ],
)
def test_invalid_configs_name_the_offending_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text))
    assert expected in str(e.value)


def test_check_config_prints_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(write(tmp_path, SEED))]) == 0
    out = capsys.readouterr().out
    assert "2 models" in out
    assert "qwen3-coder: http://localhost:8081/v1 (container qwen3-server" in out


def test_check_config_fails_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, SEED.replace("backend_url", "backend_ur", 1))
    assert main(["check-config", str(path)]) == 1
    assert "unknown key 'models.qwen3-coder.backend_ur'" in capsys.readouterr().err


def test_example_config_is_valid() -> None:
    config = load(Path(__file__).parent.parent / "llmswap.yaml")
    assert config.models


def _models(**extra: object) -> dict[str, object]:
    return {
        n: {"cmd": "x", "backend_url": f"http://127.0.0.1:{8081 + i}/v1", **extra.get(n, {})}  # type: ignore[dict-item]
        for i, n in enumerate(("a", "b", "c"))
    }


def test_scheduler_settings_and_memory_budget() -> None:
    config = parse(
        {
            "scheduler": "fifo",
            "max_wait_before_swap": 30,
            "preload": ["a", "b"],
            "devices": {"gpu0": {"memory": "24GiB"}},
            "models": _models(
                a={"memory": "8GiB", "concurrency": 4, "ttl": 600},
                b={"memory": "16000MiB", "max_wait_before_swap": 5},
                c={},
            ),
        }
    )
    a, b = config.models["a"], config.models["b"]
    assert config.scheduler == "fifo" and config.preload == ("a", "b")
    assert (a.concurrency, a.ttl, a.max_wait_before_swap) == (4, 600.0, 30.0)
    assert b.max_wait_before_swap == 5.0
    assert config.footprint("a") == ("gpu0", 8 * 2**30)
    assert config.footprint("b") == ("gpu0", 16000 * 2**20)
    assert config.footprint("c") == ("gpu0", 24 * 2**30)  # no memory: the whole device
    plain = parse({"models": _models()})
    assert plain.capacities() == {"default": 1.0}
    assert {plain.footprint(n) for n in "abc"} == {("default", 1.0)}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"scheduler": "lifo"}, "'scheduler' must be one of swap-aware, fifo"),
        ({"preload": ["a", "b"]}, "'preload' models do not fit together on device 'default'"),
        ({"preload": ["aa"]}, "'preload' names unknown model 'aa' (did you mean 'a'?)"),
        ({"devices": {"gpu0": {"memory": "lots"}}}, "'devices.gpu0.memory' must be a memory size"),
        (
            {"devices": {"gpu0": {"memory": "8GiB"}}, "models": _models(a={"memory": "9GiB"})},
            "'models.a.memory' (9.0 GiB) exceeds device 'gpu0' (8.0 GiB)",
        ),
        (
            {"devices": {"g0": {"memory": 8}, "g1": {"memory": 8}}},
            "'models.a.device' is required when several devices are declared",
        ),
        ({"models": _models(a={"memory": "2GiB"})}, "declares 'memory'/'device' but no 'devices'"),
        (
            {"models": _models(a={"concurrency": 0})},
            "'models.a.concurrency' must be greater than 0",
        ),
        ({"models": _models(a={"concurency": 2})}, "did you mean 'concurrency'?"),
        ({"access_log": "no"}, "'access_log' must be true or false, got 'no'"),
    ],
)
def test_invalid_scheduler_settings(extra: dict[str, object], expected: str) -> None:
    assert expected in refusal({"models": _models(), **extra})


GOOD_KEY = "sk-0123456789abcdefghijklmnop"


def test_api_keys_from_config_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOB_KEY", "sk-bob-0123456789abcdefghijkl")
    (tmp_path / "carol.key").write_text("sk-carol-0123456789abcdefghij\n")
    config = parse(
        {
            "models": _models(),
            "auth": {
                "open_health": False,
                "keys": [
                    {"name": "alice", "key": GOOD_KEY, "models": ["a"], "priority": 3},
                    {"name": "bob", "key_env": "BOB_KEY", "rpm": 30, "max_concurrent": 2},
                    {"name": "carol", "key_file": str(tmp_path / "carol.key"), "admin": True},
                ],
            },
        }
    )
    assert config.auth is not None and config.auth.open_health == "false"
    alice, bob, carol = config.auth.keys
    assert (alice.models, alice.priority) == (frozenset({"a"}), 3)
    assert (bob.secret, bob.rpm, bob.max_concurrent) == ("sk-bob-0123456789abcdefghijkl", 30, 2)
    assert (carol.secret, carol.admin) == ("sk-carol-0123456789abcdefghij", True)
    assert "sk-" not in repr(config.auth)  # secrets stay out of reprs and logs


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ({"key": "sk-1234"}, "too short or a well-known example value; generate one with"),
        ({"key": "changeme-changeme-changeme"}, "well-known example value"),
        ({"key_env": "LLMSWAP_UNSET_VARIABLE"}, "the key from environment variable"),
        ({"key_file": "/nonexistent/key"}, "cannot read /nonexistent/key"),
        ({}, "needs exactly one of 'key', 'key_env' or 'key_file'"),
        ({"key": GOOD_KEY, "models": ["zz"]}, "names unknown model 'zz'"),
    ],
)
def test_weak_or_missing_keys_are_refused_at_start_up(
    key: dict[str, object], expected: str
) -> None:
    message = refusal({"models": _models(), "auth": {"keys": [{"name": "k", **key}]}})
    assert expected in message
    assert "sk-1234" not in message


def test_duplicate_keys_are_refused() -> None:
    keys = [{"name": "a", "key": GOOD_KEY}, {"name": "b", "key": GOOD_KEY}]
    with pytest.raises(ConfigError, match="two entries have the same key"):
        parse({"models": _models(), "auth": {"keys": keys}})


def test_readme_lists_every_setting_as_the_schema_declares_it() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert settings.markdown_table() in readme, "regenerate it: python -m llmswap settings"


def test_settings_command_prints_every_key_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    for path, setting in settings.documented():
        assert f"| `{path}` |" in out
        assert setting.help
    assert "| `queue_size` | `50` | requests |" in out
    assert "| `models.<name>.drain_timeout` | global value | s |" in out


def test_defaults_are_the_schemas_whether_parsed_or_built() -> None:
    parsed = parse({"models": {"m": {"cmd": "x", "backend_url": "http://127.0.0.1:1/v1"}}})
    built = Config(models=parsed.models)
    for key in ("listen", "queue_size", "request_timeout", "health_interval", "max_body_bytes",
                "scheduler", "keepalive_interval", "linger", "access_log"):  # fmt: skip
        assert getattr(parsed, key) == getattr(built, key) == settings.GLOBAL[key].default, key
    m = parsed.models["m"]
    for key in ("startup_timeout", "stop_timeout", "concurrency"):
        assert getattr(m, key) == settings.MODEL[key].default, key
    assert m.drain_timeout == parsed.request_timeout
    assert parsed.docker.timeout == settings.DOCKER["timeout"].default


def test_check_config_shows_what_differs_from_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = SEED.replace("queue_size: 50", "queue_size: 5\nlinger: 0.5").replace(
        "startup_timeout: 120", "startup_timeout: 120\n    concurrency: 2\n    ttl: 300"
    )
    assert main(["check-config", str(write(tmp_path, text))]) == 0
    out = capsys.readouterr().out
    assert "  settings: queue_size 5 requests; linger 0.5 s" in out
    assert (
        "(container qwen3-server; startup_timeout 120 s; concurrency 2 requests; ttl 300 s)" in out
    )
    assert (
        "gpt-oss-120b: http://localhost:8082/v1 (container gptoss-server; startup_timeout 180 s)"
        in out
    )


def test_check_config_shows_what_the_daemon_measured_and_warns_of_a_low_guess(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        f"state_dir: {tmp_path}\n"
        "devices: {ram: {memory: 16GiB, probe: ram}}\n"
        "models:\n"
        "  small: {cmd: server -c 2048, backend_url: 'http://127.0.0.1:9001/v1', memory: 1GiB}\n"
        "  guessed: {cmd: server -c 8192, backend_url: 'http://127.0.0.1:9002/v1', memory: 1GiB}\n"
    )
    config = load(write(tmp_path, text))
    kept = footprints.Footprints()
    kept.record(config.instances["small"], 300 * 2**20)
    kept.record(config.instances["guessed"], 3 * 2**30)
    footprints.write(tmp_path, kept.as_json())
    assert main(["check-config", str(write(tmp_path, text))]) == 0
    out = capsys.readouterr().out
    assert "    memory on ram: declared 1024 MiB, measured 300 MiB\n" in out
    assert (
        "    memory on ram: declared 1024 MiB, measured 3072 MiB\n"
        "    warning: it declares 1024 MiB, less than"
    ) in out
    assert out.count("warning") == 1


def _sleepy(sleep: object, **more: object) -> dict[str, object]:
    return {"backend_url": "http://127.0.0.1:8001/v1", "cmd": "vllm serve m", "sleep": sleep,
            **more}  # fmt: skip


def test_sleep_mode_urls_come_from_the_kind_and_host_memory_is_its_own_device() -> None:
    devices = {"gpu0": {"memory": "24GiB"}, "ram": {"memory": "64GiB"}}
    models = {
        "v": _sleepy({"kind": "vllm", "level": 2, "memory": "16GiB"}, memory="20GiB"),
        "s": _sleepy({"kind": "sglang"}),
        "h": _sleepy({"kind": "http", "sleep_url": "http://x:1/off", "wake_url": "http://x:1/on"}),
    }
    config = parse({"models": models, "devices": devices})
    v, s, h = (config.models[n] for n in "vsh")
    # A device that only counts sleepers is nobody's default device.
    assert (v.device, s.device) == ("gpu0", "gpu0")
    assert v.sleep is not None and s.sleep is not None and h.sleep is not None
    assert (v.sleep.sleep_url, v.sleep.wake_url, v.sleep.status_url) == (
        "http://127.0.0.1:8001/sleep?level=2",
        "http://127.0.0.1:8001/wake_up",
        "http://127.0.0.1:8001/is_sleeping",
    )
    assert config.sleep_footprint("v") == ("ram", 16 * 2**30)
    assert s.sleep.status_url is None and s.sleep.sleep_url.endswith("/release_memory_occupation")
    assert config.sleep_footprint("s") is None  # no memory declared: not counted
    assert (h.sleep.sleep_url, h.sleep.status_url) == ("http://x:1/off", None)


@pytest.mark.parametrize(
    ("sleep", "devices", "expected"),
    [
        ({"level": 1}, None, "'models.v.sleep.kind' is required"),
        ({"kind": "tgi"}, None, "'models.v.sleep.kind' must be one of vllm, sglang, http"),
        ({"kind": "http", "wake_url": "http://x:1/on"}, None, "needs 'sleep_url' and 'wake_url'"),
        ({"kind": "vllm", "memory": "8GiB"}, None, "no 'devices' are declared"),
        ({"kind": "vllm", "memory": "8GiB"}, {"gpu": {"memory": "24GiB"}},
         "'models.v.sleep.device' names unknown device 'ram'"),
        ({"kind": "vllm", "memory": "80GiB"}, {"gpu": {"memory": "24GiB"},
         "ram": {"memory": "64GiB"}}, "'models.v.sleep.memory' (80.0 GiB) exceeds device 'ram'"),
        ({"kind": "vllm", "levle": 1}, None, "unknown key 'models.v.sleep.levle' (did you mean"),
    ],
)  # fmt: skip
def test_invalid_sleep_settings_name_the_key(sleep: object, devices: object, expected: str) -> None:
    raw: dict[str, object] = {"models": {"v": _sleepy(sleep)}}
    if devices is not None:
        raw["devices"] = devices
    assert expected in refusal(raw)


def test_macros_ports_and_model_ids_expand_and_ports_are_kept_across_reloads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODELS_DIR", "/srv/models")
    raw: dict[str, Any] = {
        "start_port": 9000,
        "macros": {"server": "llama-server --port ${PORT}", "ctx": 4096,
                   "dir": "${env.MODELS_DIR}"},
        "models": {
            "a": {"cmd": "${server} -m ${dir}/${MODEL_ID}.gguf -c ${ctx}"},
            "b": {"cmd": "${server} -c ${ctx}", "macros": {"ctx": 8192}},
            "remote": {"cmd": "x", "backend_url": "http://10.0.0.5:8000/v1"},
        },
    }  # fmt: skip
    config = parse(raw)
    a, b = config.models["a"], config.models["b"]
    assert a.cmd == ("llama-server", "--port", "9000", "-m", "/srv/models/a.gguf", "-c", "4096")
    assert b.cmd == ("llama-server", "--port", "9001", "-c", "8192")
    assert (a.backend_url, a.health_url) == (
        "http://127.0.0.1:9000/v1",
        "http://127.0.0.1:9000/health",
    )
    assert config.ports == {"a": 9000, "b": 9001}
    # A reload that adds a model before them keeps their ports (and so does not restart them).
    raw["models"] = {"new": {"cmd": "${server}"}, **raw["models"]}
    reloaded = parse(raw, previous_ports=config.ports)
    assert reloaded.ports == {"new": 9002, "a": 9000, "b": 9001}
    assert reloaded.models["a"] == a


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"models": {"a": {"cmd": "x --port ${PROT}"}}},
         "'models.a.cmd' uses unknown macro ${PROT} (did you mean 'PORT'?)"),
        ({"models": {"a": {"cmd": "x ${env.LLMSWAP_TEST_UNSET}"}}},
         "'models.a.cmd' uses ${env.LLMSWAP_TEST_UNSET}, but LLMSWAP_TEST_UNSET is not set"),
        ({"macros": {"PORT": 1}, "models": {"a": {"cmd": "x"}}},
         "'macros.PORT': PORT is set by llmswap"),
        ({"models": {"a": {"cmd": "x"}}}, "'models.a.backend_url' is required"),
        ({"models": {"a": {"cmd": "x --port ${PORT}", "aliases": ["b"]},
                     "b": {"cmd": "x --port ${PORT}"}}},
         "'models.a.aliases' names 'b', which is already 'models.b'"),
        ({"models": {"a": {"cmd": "x --port ${PORT}", "aliases": ["z"]},
                     "b": {"cmd": "x --port ${PORT}", "aliases": ["z"]}}},
         "'models.b.aliases' names 'z', which is already 'models.a.aliases'"),
        ({"models": {"a": {"cmd": "x --port ${PORT}", "strip_params": "top_k, model"}}},
         "'models.a.strip_params' cannot remove 'model'"),
        ({"models": {"a": {"cmd": "x --port ${PORT}", "set_params": {"model": "y"}}}},
         "'models.a.set_params' cannot set 'model' (use 'use_model_name')"),
        ({"models": {"a": {"cmd": "x --port ${PORT}", "loading_status": "spinner"}}},
         "'models.a.loading_status' must be one of comments, reasoning"),
    ],
)  # fmt: skip
def test_invalid_llama_swap_habits_name_the_key(raw: dict[str, Any], expected: str) -> None:
    assert expected in refusal(raw)


def test_a_remote_model_needs_its_url_and_takes_no_local_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BOX2_KEY", "sk-box2")
    remote = {"remote": {"url": "https://box2.lan:8888/v1", "key_env": "BOX2_KEY"}}
    config = parse({"models": {"far": remote, "near": {"cmd": "x --port ${PORT}"}},
                    "devices": {"gpu": {"memory": "24GiB"}}})  # fmt: skip
    far = config.models["far"]
    assert (far.kind, far.backend_url, far.authorization()) == (
        "remote",
        "https://box2.lan:8888/v1",
        b"Bearer sk-box2",
    )
    assert config.footprint("far") == ("remote", 0.0)
    assert config.capacities()["remote"] == float("inf")
    for extra, expected in (
        ({"ttl": 60}, "'models.far.ttl' does not apply to a remote model"),
        ({"cmd": "x"}, "exactly one of 'container_name'"),
    ):
        with pytest.raises(ConfigError, match=expected):
            parse({"models": {"far": {**remote, **extra}}})
    with pytest.raises(ConfigError, match=r"'models\.far\.remote\.key_env' names NOPE_UNSET"):
        parse({"models": {"far": {"remote": {"url": "https://x/v1", "key_env": "NOPE_UNSET"}}}})


def test_plain_tcp_to_another_boxs_engine_is_refused_unless_said_insecure(tmp_path: Path) -> None:
    models = {"a": {"backend_url": "http://box2:8000/v1", "container_name": "a"}}
    with pytest.raises(ConfigError, match="plain TCP to another box"):
        parse({"models": models, "docker": {"base_url": "tcp://box2.lan:2375"}})
    for docker in (
        {"base_url": "tcp://box2.lan:2375", "insecure": True},
        {"base_url": "tcp://127.0.0.1:2375"},
        {"base_url": "ssh://me@box2.lan"},
    ):
        assert parse({"models": models, "docker": docker}).docker.base_url == docker["base_url"]
    pems = {}
    for name in ("ca", "cert", "key"):
        (tmp_path / f"{name}.pem").write_text("-----BEGIN-----")
        pems[name] = str(tmp_path / f"{name}.pem")
    tls = parse({"models": models, "docker": {"base_url": "tcp://box2.lan:2376", "tls": pems}})
    assert tls.docker.tls is not None and tls.docker.tls.ca == pems["ca"]
    with pytest.raises(ConfigError, match=r"'docker\.tls\.key' must name a PEM file"):
        bad = {**pems, "key": str(tmp_path / "nope.pem")}
        parse({"models": models, "docker": {"base_url": "tcp://box2.lan:2376", "tls": bad}})
