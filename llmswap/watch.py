"""Following the configuration file: a change to it (or to a file ``include:`` matches, a model
file dropped into ``models.d/`` among them) reloads the daemon as SIGHUP does.

Directories are watched, not files: editors and ``mv`` replace a file by renaming another over
it, which a watch on the old file would never see.  Changes are debounced (an editor's save is
several events; a ``cp`` of five files is five), and an invalid file is refused by the reload
itself, logged, and the running configuration kept.  Linux only (Twisted's ``inotify``);
elsewhere the setting logs that it cannot follow and SIGHUP still works.  Twisted's inotify
closes its descriptor when any watched directory is deleted, so a lost one is made again at
once, with every watch the configuration needs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import inotify
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from llmswap.config.config import Config
from llmswap.errors import APIError

log = Logger()

DEBOUNCE = 0.5  # seconds of quiet after the last change before reloading


class _Notify(inotify.INotify):
    """Twisted's inotify, telling its watcher when it closed (a watched directory deleted)."""

    def __init__(self, reactor: Any, lost: Callable[[_Notify], None]) -> None:
        super().__init__(reactor)
        self._lost = lost

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._lost(self)


def _normal(path: str) -> str:
    """As inotify names it: absolute, without ``..`` (a pattern too)."""
    return os.path.normpath(os.path.abspath(path))


def _existing(directory: str) -> str:
    while not os.path.isdir(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    return directory


class ConfigWatcher(Service):
    """Reloads through ``reload`` when a file of ``config()`` changes, while ``watch_config`` is
    on (or ``forced``: ``twistd llmswap --watch-config``)."""

    name = "config watcher"

    def __init__(
        self,
        reload: Callable[[], Deferred[Any]],
        config: Callable[[], Config],
        reactor: Any,
        forced: bool = False,
    ) -> None:
        self._reload = reload
        self._config = config
        self._reactor = reactor
        self.forced = forced
        self._notify: Any = None
        self._watched: set[str] = set()
        self._patterns: tuple[str, ...] = ()
        self._awaited: set[str] = set()
        self._pending: IDelayedCall | None = None
        self.refused = 0  # reloads refused (an invalid file), for tests and tooling

    def startService(self) -> None:
        super().startService()
        self.follow()

    def follow(self) -> None:
        """Watch what the running configuration reads (after a reload: what it reads now).
        Never raises: a watch that cannot be set is logged, and SIGHUP still reloads."""
        try:
            self._follow()
        except Exception:
            log.failure("watch_config: cannot follow the configuration")

    def _follow(self) -> None:
        config = self._config()
        on = self.running and (config.watch_config or self.forced)
        if not on or not config.from_file:
            self._stop_watching()
            return
        source = _normal(config.source)
        self._patterns = (source, *map(_normal, config.include), *map(_normal, config.included))
        wanted = {os.path.dirname(p) for p in self._patterns}
        # A directory not made yet (``models.d/``): its nearest existing parent is watched,
        # and the directory's creation is a change.
        self._awaited = {d for d in wanted if not os.path.isdir(d)}
        directories = {_existing(d) for d in wanted}
        if self._notify is None:
            try:
                self._notify = _Notify(self._reactor, self._closed)
                self._notify.startReading()
            except Exception as e:
                log.warn("watch_config: cannot follow {f}: {e}", f=source, e=e)
                self._notify = None
                return
            self._watched = set()
        mask = (inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM
                | inotify.IN_CREATE | inotify.IN_DELETE)  # fmt: skip
        for gone in self._watched - directories:
            with contextlib.suppress(KeyError):  # deleted: inotify dropped it already
                self._notify.ignore(FilePath(gone))
        for new in directories - self._watched:
            self._notify.watch(FilePath(new), mask=mask, callbacks=[self._changed])
        if directories != self._watched:
            log.info("watch_config: following {files}", files=", ".join(self._patterns))
        self._watched = directories

    def _closed(self, notify: _Notify) -> None:
        """Twisted's inotify closed (a watched directory was deleted): made again, and what
        the deletion changed is reloaded."""
        if notify is not self._notify:
            return  # closed by us
        self._notify, self._watched = None, set()
        if self.running:
            self._reactor.callLater(0, self.follow)
            self._debounce("a watched directory (deleted)")

    def _changed(self, _: Any, path: FilePath[Any], mask: int) -> None:
        name = path.path if isinstance(path.path, str) else path.path.decode()
        made = any(d == name or d.startswith(name + os.sep) for d in self._awaited)
        if not made and not any(fnmatch.fnmatchcase(name, p) for p in self._patterns):
            return  # another file in the same directory (an editor's swap file...)
        self._debounce(name)

    def _debounce(self, name: str) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.reset(DEBOUNCE)
        else:
            clock: IReactorTime = self._reactor
            self._pending = clock.callLater(DEBOUNCE, self._fire, name)

    def _fire(self, name: str) -> None:
        self._pending = None
        log.info("watch_config: {f} changed; reloading", f=name)
        d = self._reload()
        d.addErrback(self._refused)  # the reload logged why; the watch goes on
        d.addBoth(lambda _: self.follow())

    def _refused(self, failure: Failure) -> None:
        failure.trap(APIError)
        self.refused += 1

    def _stop_watching(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._notify is not None:
            notify, self._notify = self._notify, None
            notify.loseConnection()
        self._watched = set()

    def stopService(self) -> None:
        super().stopService()
        self._stop_watching()
