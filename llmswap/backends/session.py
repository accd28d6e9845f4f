"""A server process's session: it runs in its own, dies with llmswap, and is gone only when
no process of its group is left.

Its own session and process group let a stop reach every process the server forked (a wrapper
script, a CUDA helper).  ``PR_SET_PDEATHSIG`` has the kernel SIGKILL it if llmswap dies
without cleaning up.  util-linux's ``setsid`` and ``setpriv`` do both on the way to the
server's exec, and a shell line after them refuses to run the server if llmswap died before
``setpriv`` asked (its orphan would hold the GPU, unseen by the next daemon); where they are
missing (busybox), a Python shim does all three, about 10 ms later on every load (a Python's
start).  The parent is named at each start, not once: ``twistd`` forks after making the
backends.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

# Runs between fork and exec of the real server: new session (so the group can be signalled as
# one), die with llmswap, and report a missing binary readably instead of as a traceback.
_EXEC_SHIM = """\
import ctypes, os, signal, sys
os.setsid()
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.stderr.write("llmswap: cannot run %r: %s\\n" % (sys.argv[2], e.strerror))
    os._exit(127)
"""


# After setpriv: run the server only while its parent ($0) still is (dash starts in a millisecond).
_PARENT_CHECK = '[ "$PPID" = "$0" ] || exit 1; exec "$@"'


def launcher(parent: int) -> list[str]:
    """What runs the server's command (appended) in its own session, to die with ``parent``."""
    tools = util_linux()
    if tools is not None:
        return _chain(tools, parent)
    # -I -S: the model's env (a PYTHONPATH meant for vLLM) cannot reach the shim, and it
    # starts sooner (no site).
    return [sys.executable, "-I", "-S", "-c", _EXEC_SHIM, str(parent)]


def _chain(tools: tuple[str, str, str], parent: int) -> list[str]:
    setsid, setpriv, sh = tools
    return [setsid, setpriv, "--pdeathsig", "KILL", "--", sh, "-c", _PARENT_CHECK, str(parent)]


@functools.cache
def util_linux() -> tuple[str, str, str] | None:
    """``setsid``, a ``setpriv`` that knows ``--pdeathsig`` (util-linux 2.33 and later) and
    ``sh``, on llmswap's PATH.  Runs them once (a few milliseconds): the daemon asks as it is
    made, so that no load or reload asks on the reactor."""
    setsid, setpriv, sh = shutil.which("setsid"), shutil.which("setpriv"), shutil.which("sh")
    if not (setsid and setpriv and sh):
        return None
    tools = (setsid, setpriv, sh)
    try:
        # setsid(1) execs in place unless it leads a process group: a spawned child does not.
        check = [*_chain(tools, os.getpid()), setpriv, "--help"]
        ran = subprocess.run(check, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return tools if ran.returncode == 0 else None


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is in group ``pgid``.

    Zombies are skipped: an orphan reparented to a PID 1 that never reaps would otherwise look
    alive forever, yet it holds no memory.
    """
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False
