"""A known-harmless ERROR line that Ray's C++ core worker writes straight to the driver's stderr,
where no Python logging filter reaches it, dropped on its way out of a `raylm` process.

Ray Data starts each worker of an actor pool (prepare's encoders, evaluation's model replicas)
with its UDF and DataContext as object references that the driver puts and owns, and with
max_restarts=-1; for every such actor Ray's core worker logs "Actor with class name:
'MapWorker(...)' ... has constructor arguments in the object store and max_restarts > 0"
(ray-project/ray#53727: a restart fails if such an argument was evicted). An object the driver
put stays pinned while a reference to it lives, and the pool holds these as long as it runs, so
a restarted worker finds them: nothing is wrong, and `ray job logs` should not say otherwise.
The actor pools and their restarts stay as Ray Data sets them; only that line is dropped.

fd 2 becomes a pipe that a small child process reads, copying every other line (and a partial
line once it has waited HOLD_SECONDS) to the original stderr. A child process rather than a
thread, so that what the driver writes just before it dies (a Ray fatal error, a segfault's
traceback) still comes out; the child ends when the last writer of the pipe has closed it. At a
normal exit the process gives fd 2 back and waits for the child, so that a shell prompt does not
come before the last lines."""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys

HARMLESS = re.compile(
    r"Actor with class name: 'MapWorker\(.*\)' and ID: '\w+' has constructor arguments in the object store "
    r"and max_restarts > 0\."
)
HOLD_SECONDS = 0.2
DRAIN_SECONDS = 5.0  # at exit, the longest wait for the child to pass the rest on

# Runs in the child (python -I -S: no site, no user paths, standard library only). Ctrl-C is for
# the driver, which may still print after it: the child ignores it and reads to the end.
PUMP = r"""
import os, re, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
drop, hold = re.compile(sys.argv[1].encode()), float(sys.argv[2])
def put(data):
    while data:
        data = data[os.write(1, data):]
held = b""
while True:
    if held and not select.select([0], [], [], hold)[0]:
        put(held)
        held = b""
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    *lines, held = (held + chunk).split(b"\n")
    put(b"".join(line + b"\n" for line in lines if not drop.search(line)))
put(held)
"""

_pump: subprocess.Popen | None = None


def drop_harmless_stderr() -> None:
    """From now on, this process's stderr (fd 2, the C++ core worker's and Python's alike) reaches
    the original stderr through the filtering child, minus HARMLESS lines. Once per process; on
    POSIX only (elsewhere, and if the child cannot start, stderr stays as it was)."""
    global _pump
    if _pump is not None or os.name != "posix":
        return
    sys.stderr.flush()
    read, write = os.pipe()
    try:
        _pump = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", PUMP, HARMLESS.pattern, str(HOLD_SECONDS)],
            stdin=read,
            stdout=2,
            stderr=2,
            start_new_session=True,  # not in the terminal's or the Ray job's process group: it drains to the end
        )
    except OSError:
        os.close(write)
        return
    finally:
        os.close(read)
    original = os.dup(2)
    os.dup2(write, 2)
    os.close(write)
    atexit.register(drain, original)


def drain(original: int) -> None:
    """At exit: fd 2 back to the original stderr, which closes this process's end of the pipe;
    then the child, at the end of what was written, passes the rest on and ends."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError):  # closed, or its reader gone: nothing more can reach it anyway
        pass
    os.dup2(original, 2)
    try:
        _pump.wait(timeout=DRAIN_SECONDS)
    except subprocess.TimeoutExpired:  # another process still holds the pipe: it drains when that one ends
        pass
