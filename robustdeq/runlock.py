"""One run per output folder: a lock file naming the run that owns the folder.

Two runs writing the same folder corrupt each other's work (one deletes the resume files the
other is saving; a restarted run shares the folder with a still running, killed-but-alive
worker). :func:`hold` takes the folder's lock file ``.robustdeq.lock`` (JSON: pid, host, the
process's start time, command, start time) for the duration of a run and removes it on exit,
also on an exception, an interpreter exit or a signal that Python handles:

- while the owner is alive, another run on the same folder is refused with a
  :class:`FolderLockedError` naming the owner (pid, host, command, start time);
- a lock file left by a dead owner (a killed run) is stale: it is taken over with a warning
  naming the dead run, and the run resumes from what the folder holds as before;
- the same process may hold a folder several times (nested calls); it is released with the
  outermost.

Ownership is an advisory ``flock`` on the lock file, which the operating system releases when
the owning process ends however it ends (``SIGKILL`` included), so a stale lock is never
mistaken for a live one and two runs cannot both take over the same stale lock; the JSON
content only names the owner for messages. (``flock`` is local to one machine: folders shared
between hosts over a network file system are not protected.) Under ``torchrun`` the caller takes
the lock in rank 0 only.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

from .errors import RobustDEQError

logger = logging.getLogger(__name__)

__all__ = ["hold", "hold_group", "acquire", "release", "owner", "FolderLockedError", "LOCK_NAME"]

LOCK_NAME = ".robustdeq.lock"

_held: Dict[str, list] = {}  # resolved folder -> [token, depth, file descriptor, created it]


class FolderLockedError(RobustDEQError):
    """The output folder is owned by another live run."""


def _proc_start(pid: int) -> Optional[str]:
    """Start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, start: Optional[str]) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by a later process
    return True


def owner(folder: Union[str, Path]) -> Optional[dict]:
    """The owner recorded in ``folder``'s lock file (``{}`` if unreadable), or None if no lock."""
    path = Path(folder) / LOCK_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _describe(o: dict) -> str:
    started = o.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {o.get('pid', '?')} on {o.get('host', '?')}, started {when}: {o.get('command', '?')!s}"


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"] + sys.argv[1:])


def acquire(folder: Union[str, Path], command: Optional[str] = None) -> str:
    """Take ``folder``'s lock (creating the folder); returns a token for :func:`release`.

    Raises:
        FolderLockedError: a live run owns the folder.
    """
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:
        _held[key][1] += 1
        return _held[key][0]
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _proc_start(os.getpid()),
              "command": command or _command(), "started": time.time(), "token": uuid.uuid4().hex}
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            o = owner(folder) or {}
            raise FolderLockedError(
                f"output folder {folder} is in use by another run ({_describe(o)}); wait for it to "
                "finish or choose another output folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the owner released (and removed) the file meanwhile: lock the new one
    previous = owner(folder)
    if previous:
        if previous.get("host") == record["host"] and _alive(int(previous.get("pid", -1)),
                                                             previous.get("pid_start")):
            logger.warning("%s: the lock's recorded owner (%s) is alive but does not hold the lock; "
                           "taking it over", folder, _describe(previous))
        else:
            logger.warning("%s: taking over the lock of a run that is no longer running (%s)", folder,
                           _describe(previous))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[key] = [record["token"], 1, fd, created]
    return record["token"]


def release(folder: Union[str, Path], token: Optional[str] = None) -> None:
    """Give ``folder``'s lock back (the outermost release of this process removes the file, if
    it still holds this process's token)."""
    folder = Path(folder)
    try:
        key = str(folder.resolve())
    except OSError:
        return
    entry = _held.get(key)
    if entry is None or (token is not None and token != entry[0]):
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    with contextlib.suppress(FileNotFoundError):
        (folder / LOCK_NAME).unlink()  # while still locked: a waiter re-checks the inode
    os.close(entry[2])
    if entry[3]:  # a folder this run created and left empty (it failed early) is removed
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def hold(folder: Union[str, Path, None], command: Optional[str] = None, *,
         enabled: bool = True) -> Iterator[Optional[str]]:
    """Hold ``folder``'s lock for the ``with`` block (nothing when ``folder`` is None or
    ``enabled`` is false, e.g. on ranks other than 0)."""
    if folder is None or not enabled:
        yield None
        return
    token = acquire(folder, command)
    try:
        yield token
    finally:
        release(folder, token)


@contextlib.contextmanager
def hold_group(folder: Union[str, Path, None], ctx=None, command: Optional[str] = None) -> Iterator[None]:
    """:func:`hold` for a command that may run in a process group (``torchrun``): rank 0 takes
    the lock, and its refusal is raised on every rank (``ctx``: a
    :class:`~robustdeq.distributed.DistContext` or None for one process)."""
    if folder is None or ctx is None:
        with hold(folder, command):
            yield
        return
    from .distributed import run_on_main
    token = run_on_main(lambda: acquire(folder, command), ctx)
    try:
        yield
    finally:
        if token is not None:
            release(folder, token)


@atexit.register
def _release_all() -> None:  # an interpreter exit inside a held block (sys.exit in a callback)
    for key, (token, *_) in list(_held.items()):
        _held[key][1] = 1
        release(key, token)
