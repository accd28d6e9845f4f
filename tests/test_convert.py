"""``convert-llama-swap`` on llama-swap's own ``config.example.yaml`` (a copy in tests/data):
what a new user converts first must pass ``check-config`` once they have done what the list of
what did not carry over says (here: set the keys' variables)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmswap.__main__ import main
from llmswap.config import convert
from llmswap.config.config import load

EXAMPLE = Path(__file__).resolve().parent / "data" / "llama-swap-config.example.yaml"
STRONG = "sk-" + "Q7v" * 12


def test_llama_swaps_example_converts_to_a_file_check_config_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text, left = convert.render(yaml.safe_load(EXAMPLE.read_text()), str(EXAMPLE))
    # What the list says to do: each key written in the file becomes a variable to set.
    variables = ["LLMSWAP_KEY_1", "LLMSWAP_KEY_2", "API_KEY_1", "API_KEY_2"]
    assert sum("set LLMSWAP_KEY_" in line for line in left) == 2
    for i, name in enumerate(variables):
        monkeypatch.setenv(name, f"{STRONG}{i}")
    converted = tmp_path / "llmswap.yaml"
    converted.write_text(text)
    assert main(["check-config", str(converted)]) == 0, capsys.readouterr()
    config = load(converted)
    assert "sk-hunter2" not in text  # no secret of the file carried into the new one
    assert [k.env for k in config.auth.keys] == variables  # type: ignore[union-attr]
    # llama-swap's default proxy: the model's ${PORT}.
    assert config.models["unlisted-model"].backend_url == "http://127.0.0.1:10002/v1"
    # setParamsByID: the model's own ID its set_params, the others aliases with presets.
    gpt = config.models["gpt-oss-120b"]
    assert gpt.set_params["chat_template_kwargs"] == {"reasoning_effort": "medium"}
    assert gpt.aliases == ("gpt-4o-mini", "gpt-oss-120b:high", "gpt-oss-120b:low")
    high = config.preset("gpt-oss-120b", "gpt-oss-120b:high")
    assert high is not None and high.set_params == {
        "chat_template_kwargs": {"reasoning_effort": "high"}
    }
    # Selectors as pools, with the targets that are models here; the preload hook's selector
    # is its pool's first model.
    assert {n: (p.members, p.prefer) for n, p in config.pools.items()} == {
        "coding-model": (("gpt-oss-120b",), "loaded"),
        "llm-plan": (("gpt-oss-120b",), "order"),
        "llama": (("docker-llama",), "loaded"),
    }
    assert config.preload == ("docker-llama",)
    for said in ("selectors.llm-plan.targets: z-ai/glm-4.7 is not a model here",
                 "hooks.on_startup.preload: llama is a pool", "peers:", "routing:"):  # fmt: skip
        assert any(line.startswith(said) for line in left), said


def test_aliases_named_by_set_params_by_id_and_proxies_on_localhost() -> None:
    source = {
        "models": {
            "m": {
                "cmd": "server --port ${PORT}",
                "proxy": "http://localhost:${PORT}",
                "aliases": ["fast", "other"],
                "filters": {"setParamsByID": {"fast": {"temperature": 0.1, "model": "x"}}},
            },
            "n": {"cmd": "server", "proxy": "http://mylocalhost.lan:8080"},
        },
        "selectors": {"s": {"strategy": "roundrobin", "targets": ["m"]}},
    }
    out, left = convert.convert(source)
    m = out["models"]["m"]
    # The alias listed already carries the preset (once), without the protected "model".
    assert m["aliases"] == [{"fast": {"set_params": {"temperature": 0.1}}}, "other"]
    assert m["backend_url"] == "http://127.0.0.1:${PORT}/v1"
    assert out["models"]["n"]["backend_url"] == "http://mylocalhost.lan:8080/v1"
    assert out["pools"] == {"s": {"models": ["m"], "prefer": "loaded"}}
    assert any(line.startswith("selectors.s.strategy: roundrobin: unknown") for line in left)
