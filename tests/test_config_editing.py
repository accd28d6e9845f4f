"""The configuration file as the console edits it: secrets never leave, errors point at their
line, a write is atomic and keeps the previous file (llmswap.config.editing)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from llmswap.config import editing
from llmswap.config.values import ConfigError

SECRET = "sk-inline-0123456789abcdefghij"
TOKEN = "hf_0123456789abcdefghijklmnop"
FILE = f"""\
models:
  qwen2.5-7b:
    cmd: llama-server --port ${{PORT}} -m /m/qwen.gguf
    env:
      HF_TOKEN: "{TOKEN}"
      OMP_NUM_THREADS: "4"
auth:
  keys:
    - name: ops
      key: '{SECRET}'
      admin: true
    - name: app
      key_env: APP_KEY
"""


def test_secrets_are_masked_and_nothing_else_is() -> None:
    shown = editing.masked(FILE)
    assert SECRET not in shown and TOKEN not in shown
    assert shown.count(editing.MASK) == 2
    assert 'OMP_NUM_THREADS: "4"' in shown and "key_env: APP_KEY" in shown
    # A broken file has no paths: every key-looking value is masked all the same (more than
    # the paths would: key_env's too), flow mappings and any case included.
    broken = editing.masked(FILE + "  - {name: b, Key: sk-flow-0123456789abcdef}\n  - [unclosed\n")
    assert SECRET not in broken and TOKEN not in broken and "sk-flow" not in broken
    assert "OMP_NUM_THREADS" in broken


def test_a_mask_sent_back_gets_its_secret_with_its_quoting() -> None:
    edited = editing.masked(FILE).replace('OMP_NUM_THREADS: "4"', 'OMP_NUM_THREADS: "8"')
    restored = editing.unmasked(edited, FILE)
    assert restored == FILE.replace('OMP_NUM_THREADS: "4"', 'OMP_NUM_THREADS: "8"')


# Shapes a secret takes in real files: each comes back byte for byte when the masked text is
# sent back unchanged, and none shows in the masked one.
SHAPES = {
    "flow mapping": "models:\n  a:\n    env: {HF_TOKEN: hf_flow_secret, OTHER: y}\n",
    "anchor and alias": "x-env: &hf {HF_TOKEN: hf_anchored_secret}\nmodels:\n  a:\n    env: *hf\n"
    "  b:\n    env: *hf\n",
    "anchored secret": "auth:\n  keys:\n    - name: a\n      key: &k sk-anchored-secret-0123\n",
    "block scalar": "auth:\n  keys:\n    - name: a\n      key: >-\n        sk-block-secret\n"
    "      admin: true\n",
    "cmd string": "models:\n  a:\n    cmd: llama-server --api-key sk-cmd-secret --port 9 "
    "--hf-token=hf_cmd_secret\n",
    "cmd list": "models:\n  a:\n    cmd: [llama-server, --api-key, sk-list-secret, -c, '4096']\n",
    "macro": "macros:\n  OPENAI_API_KEY: sk-macro-secret\nmodels: {}\n",
    "crlf": "auth:\r\n  keys:\r\n    - name: a\r\n      key: sk-crlf-secret-0123\r\n",
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_of_secret_is_masked_and_given_back_unchanged(shape: str) -> None:
    original = SHAPES[shape]
    shown = editing.masked(original)
    assert "secret" not in shown.replace(editing.MASK, ""), shown
    assert yaml.safe_load(shown) is not None  # still valid YAML, the mask a plain value
    assert editing.unmasked(shown, original) == original


def test_check_config_lines_are_shown_without_their_secrets() -> None:
    line = (
        "  a: http://x/v1 (cmd llama-server --api-key sk-1 --hf-token=hf_2; env HF_TOKEN=hf_3 A=4)"
    )
    assert editing.redacted(line) == (
        "  a: http://x/v1 (cmd llama-server --api-key (secret) --hf-token=(secret); "
        "env HF_TOKEN=(secret) A=4)"
    )


def test_a_mask_moved_where_no_secret_was_is_refused_at_its_line() -> None:
    moved = editing.masked(FILE).replace("admin: true", f"admin: true\n      rpm: {editing.MASK}")
    with pytest.raises(ConfigError, match=r"^line 12: "):
        editing.unmasked(moved, FILE)


@given(st.text(alphabet=st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"])))
def test_any_secret_value_survives_a_round_trip(secret: str) -> None:
    # JSON's strings are YAML's double-quoted ones.
    original = f"auth:\n  keys:\n    - name: a\n      key: {json.dumps(secret)}\n"
    assert editing.unmasked(editing.masked(original), original) == original
    assert yaml.safe_load(editing.masked(original))["auth"]["keys"][0]["key"] == editing.MASK


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ("unknown key 'models.qwen2.5-7b.ttll'; valid keys here: ...", 2),
        ("'auth.keys[1]' needs exactly one of 'key', 'key_env' or 'key_file'", 12),
        ("'auth.keys[0].key': too short", 10),
        ("'models.qwen2.5-7b.env.HF_TOKEN' is odd", 5),
        ("no path in this message", None),
    ],
)
def test_an_error_names_the_line_of_the_key_it_quotes(message: str, line: int | None) -> None:
    assert editing.line_of(FILE, message) == line


def test_check_reads_the_text_not_the_file_and_says_the_line(tmp_path: Path) -> None:
    path = tmp_path / "llmswap.yaml"
    path.write_text("models:\n  a:\n    cmd: x --port ${PORT}\n")
    config, problems = editing.check("models:\n  a:\n    cmd: x\n    ttll: 3\n", str(path), None)
    assert config is None
    assert [(p.line, p.message.split(";")[0]) for p in problems] == [
        (4, "unknown key 'models.a.ttll' (did you mean 'ttl'?)")
    ]
    config, problems = editing.check("models:\n  a: [\n", str(path), None)
    assert problems[0].line == 3 and "not valid YAML" in problems[0].message
    config, problems = editing.check("models:\n  b:\n    cmd: y --port ${PORT}\n", str(path), None)
    assert problems == [] and config is not None and list(config.models) == ["b"]
    assert path.read_text() == "models:\n  a:\n    cmd: x --port ${PORT}\n"  # only checked


def test_a_write_is_atomic_keeps_the_previous_file_and_its_mode(tmp_path: Path) -> None:
    real = tmp_path / "etc" / "llmswap.yaml"
    real.parent.mkdir()
    real.write_text(FILE)
    os.chmod(real, 0o600)
    path = tmp_path / "llmswap.yaml"
    path.symlink_to(real)  # as /etc/llmswap.yaml often is: the file is written where it is
    edited = editing.masked(FILE).replace("admin: true", "admin: false")
    backup = editing.write(edited, str(path))
    assert Path(backup) == real.with_name("llmswap.yaml.bak")
    assert Path(backup).read_text() == FILE
    assert path.is_symlink() and real.read_text() == FILE.replace("admin: true", "admin: false")
    for written in (real, Path(backup)):  # the secrets in the backup are no more readable
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert sorted(p.name for p in real.parent.iterdir()) == ["llmswap.yaml", "llmswap.yaml.bak"]
