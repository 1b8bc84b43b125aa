"""Failures of the machine, not of afinar: a full disk, a read-only filesystem, a missing folder.

A write the environment refuses raises OSError, or, from libraries that wrap it, an error whose
text carries the OS message (safetensors: "No space left on device (os error 28)"; torch's zip
writer: "unexpected pos 123 vs 456" / "PytorchStreamWriter failed writing file" when a write
stopped part-way, which in practice is a full disk). `writing()` turns those into an
`EnvironmentFailure`: an AfinarError naming the path and what to do, with an exit code of
2 before training starts (nothing was done) or 3 mid-run (checkpoints so far are kept).
Any other exception passes through unchanged: it is a bug, and keeps its traceback.
"""

from __future__ import annotations

import errno
import getpass
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from afinar.errors import AfinarError
from afinar.runpaths import output_of

BEFORE_TRAINING = 2  # exit code: nothing was trained, nothing was lost
MID_RUN = 3  # exit code: training stopped; the run's checkpoints are kept for --resume

NO_SPACE, READ_ONLY, NO_PERMISSION, NOT_A_FOLDER, RUN_REMOVED = (
    "no_space", "read_only", "no_permission", "not_a_folder", "run_removed")

_ERRNO = {getattr(errno, name): reason for name, reason in (  # getattr: not every OS has EDQUOT
    ("ENOSPC", NO_SPACE), ("EDQUOT", NO_SPACE), ("EFBIG", NO_SPACE), ("EROFS", READ_ONLY),
    ("EACCES", NO_PERMISSION), ("EPERM", NO_PERMISSION), ("ENOTDIR", NOT_A_FOLDER)) if hasattr(errno, name)}
# The OS message as libraries quote it when they do not raise OSError themselves.
_TEXT = (
    ("No space left on device", NO_SPACE), ("Disk quota exceeded", NO_SPACE),
    ("unexpected pos", NO_SPACE), ("PytorchStreamWriter failed", NO_SPACE), ("file write failed", NO_SPACE),
    ("Read-only file system", READ_ONLY), ("Permission denied", NO_PERMISSION), ("Not a directory", NOT_A_FOLDER),
)


class EnvironmentFailure(AfinarError):
    """A write the machine refused; `reason` is one of the constants above, `path` what was being written."""

    def __init__(self, message: str, reason: str, path: Path, exit_code: int):
        super().__init__(message)
        self.reason, self.path, self.exit_code = reason, path, exit_code


def reason_of(error: BaseException) -> str | None:
    """Which environment failure `error` is (errno first, then the OS message in its text), or None."""
    if isinstance(error, OSError) and error.errno in _ERRNO:
        return _ERRNO[error.errno]
    text = str(error)
    return next((reason for pattern, reason in _TEXT if pattern in text), None)


def explain(error: BaseException, path: str | Path, run: str | Path | None = None,
            mid_run: bool = False, resumable: bool = True, flag: str = "--output") -> EnvironmentFailure | None:
    """The clean error for `error` raised while writing `path` (inside the run folder `run`), or None if
    it is not the environment's fault. A missing file counts only when the run folder itself is gone.
    `mid_run`: training had started (exit 3); `resumable`: the run has a checkpoint to resume from;
    `flag`: how the user named `path` (`--merged`, `OUT.gguf`), for the advice."""
    path = Path(path)
    code = MID_RUN if mid_run else BEFORE_TRAINING
    if run is not None and not Path(run).is_dir() and (
            isinstance(error, FileNotFoundError) or reason_of(error) is None and "No such file" in str(error)):
        return run_removed(run, path, code)
    reason = reason_of(error)
    if reason is None and isinstance(error, FileExistsError) and _file_above(path):
        reason = NOT_A_FOLDER  # mkdir(exist_ok=True) of a folder that is a regular file
    if reason is None:
        return None
    # The file the OS refused, when it says: a folder whose permissions are the problem, not the target inside it.
    refused = getattr(error, "filename", None)
    where = _nearest_existing(Path(refused) if isinstance(refused, (str, Path)) else path)
    if reason == NO_SPACE:
        free = shutil.disk_usage(where).free / 2**20 if where else None
        left = f" ({free:.0f} MB free there now)" if free is not None else ""
        text = (f"No space left on the disk holding {path}{left}: the write stopped part-way ({_short(error)}). "
                f"Free some space, or choose another {flag} on a disk with room.")
    elif reason == READ_ONLY:
        text = f"Cannot write {path}: its filesystem is read-only. Choose another {flag} on a writable disk."
    elif reason == NO_PERMISSION:
        text = (f"No permission to write {path} (as user {_user()}). Fix the permissions of {where}, "
                f"or choose another {flag}.")
    else:
        blocker = _file_above(path)
        text = (f"Cannot write {path}: {blocker or 'a folder above it'} is a regular file, not a folder "
                f"(is {flag} under a file?). Choose another {flag} whose parent folders are folders.")
    if mid_run and resumable and run is not None:
        text += f" The checkpoints written so far are kept: once fixed, continue with: afinar train --resume {output_of(run)}"
    return EnvironmentFailure(text, reason, path, code)


def run_removed(run: str | Path, path: str | Path, exit_code: int = MID_RUN) -> EnvironmentFailure:
    """The error for a run folder that disappeared while this process was writing it."""
    return EnvironmentFailure(
        f"The run folder {run} was removed while training (could not write {path}). Nothing more can be "
        f"saved into it; start again with: afinar train --output {output_of(run)}",
        RUN_REMOVED, Path(path), exit_code)


@contextmanager
def writing(path: str | Path, run: str | Path | None = None, mid_run: bool = False,
            resumable: bool = True, flag: str = "--output") -> Iterator[None]:
    """Run a write to `path`; an environment failure inside becomes an `EnvironmentFailure` (see `explain`)."""
    try:
        yield
    except AfinarError:
        raise
    except Exception as e:
        clean = explain(e, path, run, mid_run, resumable, flag)
        if clean is None:
            raise
        raise clean from e


def check_writable(path: str | Path, flag: str = "--output", file_name: str | None = None) -> None:
    """Say now, before the work, what would stop `path` from being written when the work is done: a
    regular file above it, or a folder above it this user or its filesystem does not let us write.
    `file_name`: `path` names a file (suggested inside it when `path` is a folder); else a folder."""
    path = Path(path)
    if file_name is not None and path.is_dir():
        raise AfinarError(f"{path} is a folder, but {flag} names the file to write. Give a file path, "
                          f"e.g. {path / file_name}")
    above = _nearest_existing(path.parent)
    if above is None:
        return
    if not above.is_dir():
        refused = errno.ENOTDIR
    elif os.access(above, os.W_OK | os.X_OK):
        return
    else:
        refused = errno.EROFS if _read_only(above) else errno.EACCES
    raise explain(OSError(refused, os.strerror(refused), str(above)), path, flag=flag)


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs on Windows: the message says permission instead
        return False


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - a container without a passwd entry: the name is only informative
        return "this user"


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _nearest_existing(path: Path) -> Path | None:
    for p in (path, *path.parents):
        try:
            if p.exists():
                return p
        except OSError:  # a path under a regular file: exists() raises ENOTDIR on some systems
            continue
    return None


def _file_above(path: Path) -> Path | None:
    """The first ancestor of `path` that is a regular file (why the OS said ENOTDIR)."""
    for p in reversed(path.parents):
        if p.is_file():
            return p
    return None

