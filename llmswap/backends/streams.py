"""A Docker engine's streams (a container's events, its log lines), read in a thread and
closed from the reactor: a close must never fail what asked for it."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

log = Logger()


class Watch:
    """One container's event stream being followed; closing it ends the thread's read."""

    def __init__(self) -> None:
        self.stream: Any = None
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.stream is not None:
            close_stream(self.stream)


def close_stream(stream: Any) -> None:
    """Close a docker-py stream from either side: the reader's close racing ours (EBADF) or an
    ``ssh://`` engine's stream (docker-py's close raises there) must not fail what closed it
    (a load that was ready, a stop)."""
    try:
        stream.close()
    except Exception as e:
        log.debug("closing a Docker stream: {e}", e=e)
