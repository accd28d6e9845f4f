"""The configuration file as the console edits it: secrets never leave and cannot be moved,
errors point at their line and quote no secret, a write is atomic and keeps the previous file
(llmswap.config.secrets, llmswap.config.editing)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from llmswap.config import editing, secrets
from llmswap.config.secrets import MASK
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
    "cmd quoted": "models:\n  a:\n    cmd: 'llama-server --api-key \"sk-quoted-secret\" -c 9'\n",
    "cmd list": "models:\n  a:\n    cmd: [llama-server, --api-key, sk-list-secret, -c, '4096']\n",
    "macro": "macros:\n  OPENAI_API_KEY: sk-macro-secret\nmodels: {}\n",
    "crlf": "auth:\r\n  keys:\r\n    - name: a\r\n      key: sk-crlf-secret-0123\r\n",
    "url credentials": "models:\n  a:\n    backend_url: http://bob:url-secret-pw@10.0.0.2:8/v1\n"
    "    env: {HTTP_PROXY: 'http://proxy-secret-token@proxy:3128', "
    "DB: 'postgres://u:raw@secret#1@db/x'}\n",
}


def test_secrets_are_masked_and_nothing_else_is() -> None:
    shown = secrets.masked(FILE)
    assert shown is not None and SECRET not in shown and TOKEN not in shown
    assert shown.count(MASK) == 2
    assert 'OMP_NUM_THREADS: "4"' in shown and "key_env: APP_KEY" in shown
    # A broken file has no paths to find its secrets by: it is not shown at all.
    assert secrets.masked(FILE + "  - [unclosed\n") is None


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_of_secret_is_masked_and_given_back_unchanged(shape: str) -> None:
    original = SHAPES[shape]
    shown = secrets.masked(original)
    assert shown is not None and "secret" not in shown.replace(MASK, ""), shown
    assert yaml.safe_load(shown) is not None  # still valid YAML, the mask a plain value
    assert secrets.unmasked(shown, original) == original


@given(st.text(alphabet=st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"])))
def test_any_secret_value_survives_a_round_trip(secret: str) -> None:
    # JSON's strings are YAML's double-quoted ones.
    original = f"auth:\n  keys:\n    - name: a\n      key: {json.dumps(secret)}\n"
    shown = secrets.masked(original)
    assert shown is not None and yaml.safe_load(shown)["auth"]["keys"][0]["key"] == MASK
    assert secrets.unmasked(shown, original) == original


@pytest.mark.parametrize(
    ("edit", "line"),
    [
        # A mask where no secret was; aliased into a shown place; after another flag; a cmd
        # list's item after another flag; a secret's flags swapped.
        (lambda t: t.replace("admin: true", f"admin: true\n      rpm: {MASK}"), 12),
        (
            lambda t: t.replace(f"HF_TOKEN: {MASK}", f"HF_TOKEN: &x {MASK}").replace(
                'OMP_NUM_THREADS: "4"\n', 'OMP_NUM_THREADS: "4"\n    ttl: *x\n'
            ),
            5,
        ),
    ],
)
def test_a_mask_moved_where_no_secret_was_is_refused_at_its_line(edit: object, line: int) -> None:
    shown = secrets.masked(FILE)
    assert shown is not None
    with pytest.raises(ConfigError, match=rf"^line {line}: "):
        secrets.unmasked(edit(shown), FILE)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("original", "edited"),
    [
        ("cmd: srv --api-key sk-aaaaaaaa\n", f"cmd: srv --model {MASK}\n"),
        ("cmd: srv --api-key sk-aaaaaaaa --hf-token hf_bbbbbbbb\n",
         f"cmd: srv --hf-token {MASK} --api-key {MASK}\n"),
        ("cmd: [srv, --api-key, sk-aaaaaaaa]\n", f"cmd: [srv, --alias, {MASK}]\n"),
        ("cmd: srv --api-key sk-aaaaaaaa\n", f"cmd: srv --api-key {MASK} --port {MASK}\n"),
        ("cmd: srv --url http://u:pw-aaaaaaaa@h\n", f"cmd: srv --api-key {MASK}\n"),
    ],
)  # fmt: skip
def test_a_mask_is_given_back_only_after_the_flag_it_followed(original: str, edited: str) -> None:
    with pytest.raises(ConfigError, match="the same key, the same flag"):
        secrets.unmasked(edited, original)


def test_a_long_text_is_searched_for_urls_in_linear_time() -> None:
    # Quadratic, each of these megabytes takes hours: the run would not end.
    assert secrets.spans("a" * 1_000_000) == secrets.spans("a://" * 250_000) == []
    assert secrets.spans("http://" + "x@" * 500_000) == [("url", 7, 1_000_006)]


def test_a_text_of_nested_aliases_is_not_walked_for_ever() -> None:
    levels = ["a0: &a0 [x, y]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]"
                                  for i in range(1, 12)]  # fmt: skip
    started = time.monotonic()
    assert secrets.masked("\n".join(levels) + "\n") is None  # too many paths: not shown
    assert time.monotonic() - started < 60  # a bound that only a runaway walk could reach


def test_messages_are_scrubbed_of_every_secret_value() -> None:
    line = "  a: http://x/v1 (cmd srv --api-key sk-1 --hf-token=hf_2; env HF_TOKEN=hf_3 A=4)"
    assert secrets.scrubbed(line, ()) == (
        "  a: http://x/v1 (cmd srv --api-key (secret) --hf-token=(secret); "
        "env HF_TOKEN=(secret) A=4)"
    )
    known = secrets.values(FILE)
    assert known == {SECRET, TOKEN}
    assert secrets.scrubbed(f"'models.a.ttl' must be a number, got '{TOKEN}'", known) == (
        "'models.a.ttl' must be a number, got '(secret)'"
    )
    # A URL's credentials, wherever a message quotes one (the user stays: it names no secret).
    assert secrets.scrubbed("a: http://bob:pw-123456@h:8/v1 down", ()) == (
        "a: http://bob:(secret)@h:8/v1 down"
    )


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ("unknown key 'models.qwen2.5-7b.ttll'; valid keys here: ...", 2),
        ("'auth.keys[1]' needs exactly one of 'key', 'key_env' or 'key_file'", 12),
        ("'auth.keys[0].key': too short", 10),
        ("'models.qwen2.5-7b.env.HF_TOKEN' is odd", 5),
        ("line 7: a mask out of place", 7),
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
    assert problems[0].line == 3 and "not valid YAML at line 3, column 1" in problems[0].message
    config, problems = editing.check("models:\n  b:\n    cmd: y --port ${PORT}\n", str(path), None)
    assert problems == [] and config is not None and list(config.models) == ["b"]
    assert path.read_text() == "models:\n  a:\n    cmd: x --port ${PORT}\n"  # only checked


def test_a_check_reads_no_file_outside_the_configurations_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "llmswap.yaml"
    path.write_text("models:\n  a:\n    cmd: x --port ${PORT}\n")
    outside = tmp_path / "credentials.yaml"
    outside.write_text("aws_secret: AKIAEXAMPLEEXAMPLE\n")
    for pattern in (str(outside), "../credentials.yaml", "../*.yaml"):
        text = path.read_text() + f"include: [{json.dumps(pattern)}]\n"
        _, (problem,) = editing.check(text, str(path), None)
        assert "outside" in problem.message and "AKIA" not in problem.message
        assert problem.line == 4


def test_an_error_in_an_included_file_quotes_none_of_its_secrets(tmp_path: Path) -> None:
    path = tmp_path / "llmswap.yaml"
    path.write_text("include: [models.d/*.yaml]\nmodels:\n  a:\n    cmd: x --port ${PORT}\n")
    (tmp_path / "models.d").mkdir()
    token = "hf_included_0123456789"
    (tmp_path / "models.d" / "b.yaml").write_text(
        f"models:\n  b:\n    cmd: x --port ${{PORT}}\n    env: {{HF_TOKEN: {token}}}\n"
        f"    ttl: {token}\n"  # pasted where it does not belong
    )
    os.mkfifo(tmp_path / "models.d" / "pipe.yaml")  # read, it would block for ever
    _, (problem,) = editing.check(path.read_text(), str(path), None)
    assert "ttl" in problem.message and token not in problem.message, problem.message


def test_a_write_is_atomic_keeps_the_previous_file_and_its_mode(tmp_path: Path) -> None:
    real = tmp_path / "etc" / "llmswap.yaml"
    real.parent.mkdir()
    real.write_bytes(FILE.replace("\n", "\r\n").encode())  # written on Windows, say
    os.chmod(real, 0o600)
    path = tmp_path / "llmswap.yaml"
    path.symlink_to(real)  # as /etc/llmswap.yaml often is: the file is written where it is
    shown = editing.read_masked(str(path))
    assert shown is not None and SECRET not in shown
    edited = shown.replace("\r\n", "\n").replace("admin: true", "admin: false")  # a browser's
    backup = editing.write(edited, str(path))
    assert Path(backup) == real.with_name("llmswap.yaml.bak")
    assert Path(backup).read_bytes() == FILE.replace("\n", "\r\n").encode()
    expected = FILE.replace("admin: true", "admin: false").replace("\n", "\r\n")
    assert path.is_symlink() and real.read_bytes() == expected.encode()  # CRLF, secrets kept
    for written in (real, Path(backup)):  # the secrets in the backup are no more readable
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert sorted(p.name for p in real.parent.iterdir()) == ["llmswap.yaml", "llmswap.yaml.bak"]
    # Applies in a row keep the files before each: a hasty second apply loses no good file.
    versions = [real.read_bytes()]
    for ttl in (1, 2, 3):
        editing.write(edited.replace("models:\n", f"ttl_note: {ttl}\nmodels:\n", 1), str(path))
        versions.append(real.read_bytes())
    kept = [real.with_name(n).read_bytes() for n in ("llmswap.yaml.bak", "llmswap.yaml.bak.1",
                                                      "llmswap.yaml.bak.2")]  # fmt: skip
    assert kept == versions[-2::-1][:3]  # the newest backup first; the oldest let go
    assert len(list(real.parent.iterdir())) == 4
    # A link planted at a backup's name is moved along as a name, never written through.
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    real.with_name("llmswap.yaml.bak").unlink()
    real.with_name("llmswap.yaml.bak").symlink_to(victim)
    editing.write(edited, str(path))
    assert victim.read_text() == "untouched"
    assert not real.with_name("llmswap.yaml.bak").is_symlink()
    assert real.with_name("llmswap.yaml.bak.1").is_symlink()
    real.write_bytes(b"models: \xff\n")  # not UTF-8: not shown, never a traceback
    assert editing.read_masked(str(path)) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away takes root")
def test_a_write_by_root_keeps_the_files_owner(tmp_path: Path) -> None:
    path = tmp_path / "llmswap.yaml"
    path.write_text(FILE)
    os.chown(path, 4321, 4321)  # another user's file, edited by llmswap run as root
    editing.write(FILE.replace("admin: true", "admin: false"), str(path))
    for written in (path, tmp_path / "llmswap.yaml.bak"):
        assert (written.stat().st_uid, written.stat().st_gid) == (4321, 4321)
