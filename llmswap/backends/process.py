"""Local process backends (``cmd:`` models), e.g. ``llama-server`` started by llmswap itself.

Each backend runs in its own session and process group, so a stop reaches every process the
server forked (a wrapper script, a CUDA helper) and nothing survives to hold GPU memory.  The stop
is only reported done once the whole group is gone: that confirmation is what lets the swap
manager promise that two models never load at once.  The server also dies with llmswap
(:mod:`llmswap.backends.session`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import implementer

from llmswap import errors
from llmswap.backends.session import group_alive, launcher
from llmswap.backends.stopping import StopRecord
from llmswap.config.model import ModelConfig
from llmswap.interfaces import IBackend

log = Logger()

_TAIL_BYTES = 16 * 1024
_LOG_ROTATE_BYTES = 8 * 1024 * 1024
_LOG_KEEP = 2
# After SIGKILL the kernel needs a moment to tear the group down; past this, something is stuck
# in uninterruptible sleep and we report rather than wait forever.
_KILL_WAIT = 30.0
_GROUP_POLL = 0.02


def log_file_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model) + ".log"


def last_lines(path: Path, lines: int, window: int = 1 << 20) -> list[str]:
    """The last ``lines`` lines of a file, reading at most its last ``window`` bytes
    (blocking: run it in a thread)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - window))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


class _ServerProtocol(ProcessProtocol):
    def __init__(self, backend: ProcessBackend) -> None:
        self._backend = backend

    def outReceived(self, data: bytes) -> None:
        self._backend._output(data)

    def errReceived(self, data: bytes) -> None:
        self._backend._output(data)

    def processEnded(self, reason: Failure) -> None:
        self._backend._ended(reason)


@implementer(IBackend)
class ProcessBackend:
    """A server process started from a model's ``cmd``, ``env`` and ``cwd``."""

    def __init__(
        self,
        model: ModelConfig,
        reactor: Any,
        log_dir: Path | None,
        hidden_env: frozenset[str] = frozenset(),
    ) -> None:
        """``hidden_env``: variables of llmswap's environment the backend does not inherit
        (API keys, remote models' keys, Docker engine settings)."""
        assert model.cmd is not None
        self.name = model.name
        self._model = model
        self._hidden_env = hidden_env
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._log_path = log_dir / log_file_name(model.name) if log_dir else None
        self._logfile: LogFile | None = None
        self._tail = bytearray()
        # Who follows the output live (log views, a load's readiness), and the line in part.
        self._followers: list[Callable[[str], None]] = []
        self._partial = b""
        self._transport: IProcessTransport | None = None
        self._pgid: int | None = None
        self._stopping = False
        self._exit_waiters: list[Deferred[None]] = []
        self._exit_callback: Callable[[str], None] | None = None
        self._last_exit: str | None = None
        self._killed = 0  # stops that took SIGKILL: it ignored SIGTERM for stop_timeout
        self._stops = StopRecord()

    # -- IBackend -------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        if self._transport is not None:
            return succeed(None)
        inherited = {k: v for k, v in os.environ.items() if k not in self._hidden_env}
        env = {**inherited, **self._model.env}
        assert self._model.cmd is not None
        argv0 = self._model.cmd[0]
        if shutil.which(argv0, path=env.get("PATH")) is None:
            raise errors.backend_unavailable(
                f"Model '{self.name}': command '{argv0}' not found (check 'cmd' in the config)"
            )
        if self._model.cwd and not os.path.isdir(self._model.cwd):
            raise errors.backend_unavailable(
                f"Model '{self.name}': working directory '{self._model.cwd}' does not exist"
            )
        self._open_log()
        self._tail.clear()
        self._partial = b""  # the last run's unended line is not this one's
        self._last_exit = None
        self._stopping = False
        argv = [*launcher(os.getpid()), *self._model.cmd]
        reactor: IReactorProcess = self._reactor
        self._transport = reactor.spawnProcess(
            _ServerProtocol(self),
            argv[0],
            argv,
            env=env,
            path=self._model.cwd,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self._pgid = self._transport.pid
        log.info(
            "model {model}: started pid {pid}: {cmd}",
            model=self.name,
            pid=self._pgid,
            cmd=" ".join(self._model.cmd),
        )
        return succeed(None)

    def stop(self) -> Deferred[None]:
        if self._pgid is None:
            return succeed(None)
        self._stopping = True
        pgid, began, timeout = self._pgid, self._clock.seconds(), self._model.stop_timeout
        asked = self._transport is not None
        if asked:
            self._signal_group(pgid, signal.SIGTERM)
        grace = self._stops.grace(timeout) if asked else None
        again = None if grace is None else self._clock.callLater(grace, self._ask_again, pgid)
        d = self._wait_exit(timeout)

        def stopped(result: Any) -> Any:
            if again is not None and again.active():
                again.cancel()
            if asked and not isinstance(result, Failure):
                self._stops.took.append(self._clock.seconds() - began)
            return result

        def escalate(f: Failure) -> Deferred[None]:
            f.trap(TimeoutError)
            log.warn(
                "model {model}: pid {pid} still running after its stop_timeout of {t:g} s; "
                "sending SIGKILL",
                model=self.name,
                pid=pgid,
                t=self._model.stop_timeout,
            )
            self._signal_group(pgid, signal.SIGKILL)
            self._killed += 1
            return self._wait_exit(_KILL_WAIT)

        d.addBoth(stopped).addErrback(escalate)
        d.addCallback(lambda _: self._reap_group(pgid))
        return d

    def _ask_again(self, pgid: int) -> None:
        if self._transport is None:
            return
        log.warn("model {model}: pid {pid} slow to stop; sending a second SIGTERM",
                 model=self.name, pid=pgid)  # fmt: skip
        self._stops.asked_again += 1
        self._signal_group(pgid, signal.SIGTERM)

    def adopt(self) -> Deferred[bool]:
        # A process from an earlier llmswap cannot be re-attached (and PDEATHSIG killed it).
        return succeed(False)

    def shutdown(self) -> Deferred[None]:
        d = self.stop()

        def closed(result: Any) -> Any:
            self.close()
            return result

        d.addBoth(closed)
        return d

    def alive(self) -> bool:
        return self._transport is not None

    def on_exit(self, callback: Callable[[str], None]) -> None:
        self._exit_callback = callback

    def pids(self) -> list[int]:
        return [self._pgid] if self.alive() and self._pgid else []

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": "process", "pid": self._pgid if self.alive() else None,
                                "killed": self._killed,
                                "asked_again": self._stops.asked_again}  # fmt: skip
        if self._log_path is not None:
            info["log"] = str(self._log_path)
        if self._last_exit is not None:
            info["last_exit"] = self._last_exit
            info["output"] = self.output_tail(lines=8).splitlines()
        return info

    def failure_detail(self) -> str:
        return self._last_exit or "not running"

    # -- helpers --------------------------------------------------------------------------

    def output(self, lines: int) -> Deferred[list[str]]:
        if self._log_path is None:
            return succeed(self.output_tail(lines).splitlines())
        pool = self._reactor.getThreadPool()
        d: Deferred[list[str]] = deferToThreadPool(
            self._reactor, pool, last_lines, self._log_path, lines
        )
        return d

    def follow(self, line: Callable[[str], None]) -> Callable[[], None]:
        self._followers.append(line)

        def stop() -> None:
            if line in self._followers:
                self._followers.remove(line)

        return stop

    def output_tail(self, lines: int) -> str:
        text = self._tail.decode("utf-8", "replace").rstrip()
        return "\n".join(text.splitlines()[-lines:])

    def reopen_log(self) -> None:
        """Reopen the log file (after logrotate moved it); called on SIGHUP."""
        if self._logfile is not None:
            self._logfile.reopen()

    def close(self) -> None:
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None

    def _open_log(self) -> None:
        if self._log_path is None or self._logfile is not None:
            return
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._logfile = LogFile(
            self._log_path.name,
            str(self._log_path.parent),
            rotateLength=_LOG_ROTATE_BYTES,
            maxRotatedFiles=_LOG_KEEP,
        )

    def _output(self, data: bytes) -> None:
        self._tail += data
        if len(self._tail) > _TAIL_BYTES:
            del self._tail[: len(self._tail) - _TAIL_BYTES]
        if self._logfile is not None:
            self._logfile.write(data.decode("utf-8", "replace"))
            self._logfile.flush()
        *complete, partial = (self._partial + data).split(b"\n")
        self._partial = partial[-_TAIL_BYTES:]  # a progress bar's \r never ends a line
        for raw in complete if self._followers else ():  # cut always: a new follower's
            text = raw.decode("utf-8", "replace")  # first line is whole
            for line in list(self._followers):
                line(text)

    def _ended(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ierror.ProcessTerminated) and value.signal is not None:
            self._last_exit = f"killed by signal {value.signal}"
        elif isinstance(value, ierror.ProcessTerminated):
            self._last_exit = f"exited with code {value.exitCode}"
        else:
            self._last_exit = "exited with code 0"
        self._transport = None
        expected = self._stopping
        waiters, self._exit_waiters = self._exit_waiters, []
        for w in waiters:
            w.callback(None)
        if not expected:
            log.warn(
                "model {model}: backend {what} unexpectedly", model=self.name, what=self._last_exit
            )
            if self._exit_callback is not None:
                self._exit_callback(self._last_exit)

    def _wait_exit(self, timeout: float) -> Deferred[None]:
        if self._transport is None:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._exit_waiters.remove(d))
        self._exit_waiters.append(d)
        d.addTimeout(timeout, self._clock)
        return d

    def _signal_group(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            log.error(
                "model {model}: cannot signal group {pgid}: {e}", model=self.name, pgid=pgid, e=e
            )

    def _reap_group(self, pgid: int) -> Deferred[None]:
        """Wait until no process of the group is left (children the server forked included)."""
        done: Deferred[None] = Deferred()
        deadline = self._clock.seconds() + _KILL_WAIT
        killed = [False]

        def check() -> None:
            if not group_alive(pgid):
                self._pgid = None
                done.callback(None)
                return
            if not killed[0]:
                killed[0] = True
                self._signal_group(pgid, signal.SIGKILL)
            if self._clock.seconds() > deadline:
                done.errback(
                    errors.backend_unavailable(
                        f"Model '{self.name}': process group {pgid} survived SIGKILL for "
                        f"{_KILL_WAIT:g} s; refusing to start another model"
                    )
                )
                return
            self._clock.callLater(_GROUP_POLL, check)

        check()
        return done
