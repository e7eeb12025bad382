"""The workdir of a run: created and checked writable before any compute, and locked while a run uses it.

A run holds `WORKDIR/kdjax.lock` for its whole length: an advisory `fcntl.flock` on the file, which also
records who holds it (`pid host start-time`). A second launch into the same workdir is refused at once,
naming the holder. The kernel drops a flock when its process dies (even on SIGKILL), so a lock file left
by a dead run is taken over by the next launch, with a warning naming the dead holder. On file systems
without flock support (some network or FUSE mounts) the recorded holder decides instead: a lock whose
process runs on this host and is not alive is taken over; any other one refuses the launch.

In a multi-process run only process 0 takes the lock (`kdjax.train` shares its outcome with the others).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import socket
import time

from absl import logging

LOCK_NAME = "kdjax.lock"
# flock unsupported: fall back to the recorded holder (ENOLCK: NFS without lockd; the others: FUSE & co).
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirError(ValueError):
    """A workdir that cannot be used: not a directory, not writable, or held by another live run."""


def prepare(workdir: str | pathlib.Path) -> pathlib.Path:
    """Creates `workdir` (and its parents) and checks that it is a writable directory; returns its path.

    Raises WorkdirError naming the path and the reason (a file is in the way, read-only file system,
    permission denied, ...).
    """
    path = pathlib.Path(workdir).expanduser()
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"workdir {str(path)!r} is an existing file, not a directory; pass a directory "
                           "(new or holding an earlier run) as --workdir.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".kdjax_write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"workdir {str(path)!r} is not writable ({e.strerror or e}); pass a --workdir on a "
                           "writable file system.") from e
    return path


def _holder_text() -> str:
    return f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}"


def _parse_holder(text: str) -> tuple[int, str] | None:
    """(pid, host) of a lock file's contents, or None when it names nobody."""
    parts = text.split()
    if len(parts) < 2 or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _describe(holder: tuple[int, str] | None) -> str:
    return "an unknown process" if holder is None else f"process {holder[0]} on host {holder[1]}"


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `workdir/kdjax.lock` for the block (see the module docstring)."""

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirError naming the live holder."""
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(_parse_holder(self.path.read_text(errors="replace")))
            except OSError as e:
                os.close(fd)
                if e.errno not in NO_FLOCK:
                    raise
                self._acquire_without_flock()
                return
            # The file may have been unlinked by the holder's release between our open and flock: retry.
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self._claim(fd)
            else:
                os.close(fd)

    def _claim(self, fd: int) -> None:
        """Records this process as the holder of the locked `fd`, warning when it replaces a dead one."""
        previous = _parse_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        if previous is not None and previous[0] != os.getpid():
            logging.warning("kdjax: taking over the stale lock %s of %s, which no longer runs.", self.path,
                            _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _acquire_without_flock(self) -> None:
        """The recorded-holder protocol, for file systems without flock."""
        if self.path.exists():
            holder = _parse_holder(self.path.read_text(errors="replace"))
            if holder is not None and (holder[1] != socket.gethostname() or _pid_alive(holder[0])):
                self._refuse(holder)
            self.path.unlink(missing_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another launch won the race
            self._refuse(_parse_holder(self.path.read_text(errors="replace")))
        self._claim(fd)

    def _refuse(self, holder: tuple[int, str] | None) -> None:
        raise WorkdirError(f"workdir {str(self.path.parent)!r} is in use by {_describe(holder)} (lock file "
                           f"{str(self.path)!r}); wait for that run to end or stop it, or pass another --workdir.")

    def release(self) -> None:
        """Removes the lock file, then drops the lock (no-op when not held)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
