"""What a Docker engine said of a container, read in a thread: the container backend's threads
return it, and the reactor alone writes the backend's state from it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs


@attrs.frozen
class Seen:
    """What the engine said of a container, read in a thread and applied on the reactor."""

    status: str
    exit_code: int | None
    log_tail: str | None = None  # read only when it does not run
    pid: int = 0  # its main process, on the engine's host; 0: not running

    @classmethod
    def of(cls, container: Any, tail: bool = False) -> Seen:
        """In a thread: ``container`` was just read (or reloaded) from the engine."""
        status = str(container.status)
        state = container.attrs.get("State", {})
        if status == "running":
            return cls(status, None, pid=int(state.get("Pid") or 0))
        code = state.get("ExitCode")
        if not tail:
            return cls(status, code)
        # Its last run's lines only: an earlier run's out-of-memory line is not this run's reason.
        since = _started(state.get("StartedAt"))
        raw = container.logs(tail=8, since=since) if since else container.logs(tail=8)
        return cls(status, code, raw.decode("utf-8", "replace").rstrip())

    @property
    def running(self) -> bool:
        return self.status == "running"


def _started(stamp: object) -> float | None:
    """The engine's ``StartedAt`` (RFC 3339, nanoseconds) as a timestamp; None if never."""
    if not isinstance(stamp, str) or stamp.startswith("0001-"):
        return None
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    try:
        at = datetime.fromisoformat(whole).replace(tzinfo=UTC)
    except ValueError:
        return None
    return at.timestamp() + float("0." + (fraction[:6] or "0"))
