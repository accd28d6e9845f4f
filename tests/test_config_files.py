"""A configuration in several files (``include:``, ``models.d/*.yaml``) and followed as it
changes (``watch_config``): checked in memory, and through a running daemon whose files a test
edits as a user would (an editor's rename, a file dropped in, a broken save)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.defer import inlineCallbacks

from llmswap.config.config import load
from llmswap.config.values import ConfigError
from tests.support import Daemon, wait_for
from tests.test_daemon import DaemonTestCase

FAKE = {"cmd": "x", "backend_url": "http://127.0.0.1:1/v1"}


def write(path: Path, data: Any) -> None:
    """As editors save: a new file renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp~")
    temporary.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    os.replace(temporary, path)


def test_included_files_join_the_main_one(tmp_path: Path) -> None:
    write(tmp_path / "llmswap.yaml", {
        "include": ["models.d/*.yaml", "pools.yaml"],
        "macros": {"base": "http://127.0.0.1:1"},
        "models": {"main": dict(FAKE)},
    })  # fmt: skip
    write(
        tmp_path / "models.d" / "b.yaml", {"models": {"b": {**FAKE, "backend_url": "${base}/v1"}}}
    )
    write(tmp_path / "models.d" / "a.yaml", {"models": {"a": dict(FAKE)}})
    write(tmp_path / "pools.yaml", {"pools": {"any": {"models": ["a", "b"]}}})
    (tmp_path / "models.d" / "notes.txt").write_text("not yaml: not matched")
    config = load(tmp_path / "llmswap.yaml")
    assert list(config.models) == ["main", "a", "b"]  # the main file's first, then by name
    assert config.models["b"].backend_url == "http://127.0.0.1:1/v1"  # the main file's macro
    assert config.pools["any"].members == ("a", "b")
    assert config.included == tuple(
        str(tmp_path / p) for p in ("models.d/a.yaml", "models.d/b.yaml", "pools.yaml")
    )
    write(tmp_path / "llmswap.yaml", {"include": ["empty.d/*.yaml"], "models": {"m": FAKE}})
    assert list(load(tmp_path / "llmswap.yaml").models) == ["m"]  # a glob may match nothing


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"models.d/a.yaml": {"models": {"main": FAKE}}}, r"'models.main' is already defined in"),
        ({"models.d/a.yaml": {"models": {"x": FAKE}}, "models.d/b.yaml": {"models": {"x": FAKE}}},
         r"b.yaml: 'models.x' is already defined in .*a.yaml"),
        ({"models.d/a.yaml": {"listen": "tcp:1"}}, "may only hold models, pools, macros; it has"),
        ({"models.d/a.yaml": "models: [unclosed"}, "a.yaml is not valid YAML"),
        ({"models.d/a.yaml": {"models": {"x": {**FAKE, "startup_timout": 1}}}},
         "did you mean 'startup_timeout'"),
    ],
)  # fmt: skip
def test_an_included_file_is_checked_as_the_main_one(
    tmp_path: Path, files: dict[str, Any], message: str
) -> None:
    write(tmp_path / "llmswap.yaml", {"include": ["models.d/*.yaml"], "models": {"main": FAKE}})
    for name, data in files.items():
        write(tmp_path / name, data)
    with pytest.raises(ConfigError, match=message):
        load(tmp_path / "llmswap.yaml")


def test_a_plain_include_must_exist(tmp_path: Path) -> None:
    write(tmp_path / "llmswap.yaml", {"include": ["gone.yaml"], "models": {"main": FAKE}})
    with pytest.raises(ConfigError, match=r"names gone\.yaml, which is not a file"):
        load(tmp_path / "llmswap.yaml")


class WatchTests(DaemonTestCase):
    def following(self, main: Path, root: Path) -> Daemon:
        """llmswap started from ``main``, as ``twistd llmswap --config`` would."""
        daemon = Daemon.from_config(load(main), str(root / "logs"))
        daemon.start()
        self.addCleanup(daemon.stop)
        self.daemon = daemon
        return daemon

    def listed(self) -> list[str]:
        return sorted(self.daemon.service.config.models)

    @inlineCallbacks
    def test_a_followed_configuration_reloads_as_its_files_change(self) -> Any:
        root = Path(self.mktemp()).absolute()
        main = root / "llmswap.yaml"
        write(main, {"include": ["models.d/*.yaml"], "watch_config": True,
                     "models": {"a": self.fake("a")}})  # fmt: skip
        daemon = self.following(main, root)
        listed = self.listed

        # A model dropped into the directory is served.
        write(root / "models.d" / "b.yaml", {"models": {"b": self.fake("b")}})
        yield wait_for(lambda: listed() == ["a", "b"])
        answer = yield self.chat("b")
        self.assertEqual(answer.choices[0].message.content, "Hello from b")
        # A broken save is refused: the running configuration stays, and keeps serving.
        write(root / "models.d" / "c.yaml", {"models": {"c": {**self.fake("c"), "ttl": "soon"}}})
        write(root / "models.d" / "b.yaml", {"models": {"b": self.fake("b"), "d": self.fake("d")}})
        yield wait_for(lambda: self.refusals(root) >= 1)
        self.assertEqual(listed(), ["a", "b"])
        answer = yield self.chat("a")
        self.assertEqual(answer.choices[0].message.content, "Hello from a")
        # Mended, it applies with everything changed meanwhile.
        write(root / "models.d" / "c.yaml", {"models": {"c": self.fake("c")}})
        yield wait_for(lambda: listed() == ["a", "b", "c", "d"])
        # Its model replaced and the setting gone, the main file applies and the watch stops:
        # later changes wait for a SIGHUP.
        write(main, {"include": ["models.d/*.yaml"], "models": {"e": self.fake("e")}})
        yield wait_for(lambda: listed() == ["b", "c", "d", "e"])
        write(main, {"include": ["models.d/*.yaml"], "models": {"f": self.fake("f")}})
        os.remove(root / "models.d" / "c.yaml")
        yield wait_for(lambda: daemon.service.watcher._notify is None)
        self.assertEqual(listed(), ["b", "c", "d", "e"])

    @inlineCallbacks
    def test_a_deleted_directory_and_an_include_beside_the_file_are_followed(self) -> Any:
        root = Path(self.mktemp()).absolute()
        main = root / "conf" / "llmswap.yaml"
        write(main, {"include": ["../shared/*.yaml", "models.d/*.yaml"], "watch_config": True,
                     "models": {"a": self.fake("a")}})  # fmt: skip
        write(root / "conf" / "models.d" / "c.yaml", {"models": {"c": self.fake("c")}})
        self.following(main, root)
        listed = self.listed

        self.assertEqual(listed(), ["a", "c"])
        write(root / "shared" / "b.yaml", {"models": {"b": self.fake("b")}})
        yield wait_for(lambda: listed() == ["a", "b", "c"])
        # Twisted's inotify closes when a watched directory goes: the watch is made again.
        shutil.rmtree(root / "conf" / "models.d")
        yield wait_for(lambda: listed() == ["a", "b"])
        write(main, {"include": ["../shared/*.yaml", "models.d/*.yaml"], "watch_config": True,
                     "models": {"z": self.fake("z")}})  # fmt: skip
        yield wait_for(lambda: listed() == ["b", "z"])
        write(root / "conf" / "models.d" / "d.yaml", {"models": {"d": self.fake("d")}})
        yield wait_for(lambda: listed() == ["b", "d", "z"])

    def refusals(self, root: Path) -> int:
        return self.daemon.service.watcher.refused


def test_the_options_take_watch_config() -> None:
    from llmswap.tap import Options

    options = Options()
    options.parseOptions(["--watch-config"])
    assert options["watch-config"]
