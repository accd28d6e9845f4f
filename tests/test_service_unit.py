"""deploy/llmswap.service: not root, enough descriptors, and sandboxed.

``systemd-analyze security --offline=true`` rates the unit file itself (no running systemd,
no llmswap user needed); the unit must stay at or below an exposure of 5.0 ("MEDIUM" and
better). ``systemd-analyze`` is in Debian's ``systemd`` package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "llmswap.service"
MAX_EXPOSURE = 5.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (it comes with Debian's systemd package)",
)


def _directives(text: str) -> dict[str, dict[str, list[str]]]:
    """The unit's settings: section -> key -> values in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _service() -> dict[str, list[str]]:
    return _directives(UNIT.read_text())["Service"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_unit_runs_as_its_own_user_not_root() -> None:
    service = _service()
    assert service.get("User"), "the unit has no User=, so it runs as root"
    user = service["User"][-1]
    assert user not in ("", "root", "0"), f"User={user} is root"
    assert service.get("Group", ["llmswap"])[-1] not in ("", "root", "0")
    assert service.get("DynamicUser", ["no"])[-1] == "no"  # a static user: it owns the logs


def test_unit_raises_the_descriptor_limit() -> None:
    values = _service().get("LimitNOFILE")
    assert values, "the unit has no LimitNOFILE="
    hard = values[-1].rpartition(":")[2]  # "N" or "soft:hard"
    assert hard == "infinity" or int(hard) >= 65536, f"LimitNOFILE={values[-1]}"


@needs_analyze
def test_unit_security_exposure_is_at_most_5() -> None:
    result = _run("security", "--offline=true", str(UNIT))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no overall exposure rating in:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{output}"


@needs_analyze
def test_unit_file_has_no_syntax_errors(tmp_path: Path) -> None:
    # `verify` also checks that ExecStart's program exists, which /opt/llmswap/venv does not
    # here: verify a copy that starts this Python instead, and fail only on what the unit
    # file itself says wrong (unknown keys, unparsable values: "<file>:<line>: ...").
    # The llmswap user need not exist for it.
    text = UNIT.read_text()
    program = re.search(r"^ExecStart=(\S+)", text, re.MULTILINE)
    assert program, "the unit has no ExecStart="
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={program.group(1)}", f"ExecStart={sys.executable}"))
    result = _run("verify", str(copy))
    output = result.stdout + result.stderr
    complaints = [line for line in output.splitlines() if f"{copy}:" in line]
    assert not complaints, "\n".join(complaints)
