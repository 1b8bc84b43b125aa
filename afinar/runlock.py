"""One writer per run: an OS lock on `<output>.lock`, held while a process writes the run.

The lock is `fcntl.flock` (POSIX) or `msvcrt.locking` (Windows) on a small file beside the run,
so the operating system drops it when the process ends in any way, SIGKILL included. A lock
file left behind by a killed process therefore never blocks anyone: its text (the holder's
PID, command and start time) only tells a second writer who holds the run. A clean release
deletes the file.

The lock covers `<output>`, `<output>.partial` and `<output>.old` alike: all of them are
written only by the process that holds it (train, resume, and the final rename).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from afinar import oserrors
from afinar.errors import AfinarError

SUFFIX = ".lock"
_WINDOWS_LOCK_BYTE = 1 << 30  # msvcrt locks a byte range and blocks reading it: lock one far past the text


class RunLocked(AfinarError):
    """Another live process holds the run."""

    exit_code = 2


def lock_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + SUFFIX)


class RunLock:
    """A held run lock. `release()`, leaving the `with` block, or the process ending frees it."""

    def __init__(self, path: Path, file: IO[bytes]):
        self.path = path
        self._file: IO[bytes] | None = file

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is None:
            return
        try:
            if os.name != "nt":  # delete while still locked: a waiter that opened it re-checks the inode
                self.path.unlink(missing_ok=True)
        finally:
            self._file.close()  # closing the descriptor drops the OS lock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(output: str | Path, command: str | None = None) -> RunLock:
    """Lock the run `output` for this process, or raise RunLocked (exit 2) naming the process that holds it.

    `command` is what the holder is doing, shown to a second writer (default: this process's argv).
    Environment failures (read-only disk, `--output` under a regular file) are clean errors too.
    """
    path = lock_path(output)
    with oserrors.writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            file = open(path, "a+b")
            if not _try_lock(file):
                holder = _describe_holder(path)
                file.close()
                raise RunLocked(
                    f"{output} is being written by another afinar process ({holder}; lock file {path}). "
                    "Wait for it to finish, stop it, or choose another --output."
                )
            # The holder we waited on may have deleted the file between our open and our lock: then we
            # locked an orphan inode, and a third process could lock the new file. Lock the real one.
            if os.name == "nt" or _same_file(file, path):
                break
            file.close()
        lock = RunLock(path, file)
        info = {"pid": os.getpid(), "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            file.seek(0)
            file.truncate()
            file.write((json.dumps(info) + "\n").encode())
            file.flush()
        except BaseException:
            lock.release()
            raise
    return lock


def holder(output: str | Path) -> dict | None:
    """What the lock file of `output` says about its last holder (pid, command, started), or None.

    Informative only: the file outlives a killed holder; only `acquire` tells whether it is held.
    """
    try:
        info = json.loads(lock_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def live_holder(output: str | Path) -> dict | None:
    """What `holder` says, if that process is still alive: `output` is then being written now.

    Reads only: a reader such as `ask` must not take the lock, even for a moment (a trainer starting
    then would stop). The one error: a killed holder's PID reused since by another process.
    """
    info = holder(output)
    return info if info and _alive(info.get("pid")) else None


def _describe_holder(path: Path) -> str:
    output = path.with_name(path.name.removesuffix(SUFFIX))
    # The holder writes its line just after locking; until then the file is empty or names a dead process.
    for _ in range(50):
        info = holder(output)
        if info and _alive(info.get("pid")):
            return f"PID {info['pid']}: {info.get('command', '?')}, since {info.get('started', '?')}"
        time.sleep(0.02)
    return "its PID is not recorded in the lock file"


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name == "nt":
        return True  # no cheap check there; the lock itself proves someone holds the run
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Ended but not yet reaped by its parent (Linux): its descriptors, and so its lock, are already gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    return bool(fields) and fields[0] == "Z"


def _try_lock(file: IO[bytes]) -> bool:
    if os.name == "nt":
        import msvcrt

        file.seek(_WINDOWS_LOCK_BYTE)
        try:
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(file: IO[bytes], path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(file.fileno())
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)
