"""One daemon per state folder: an exclusive ``flock`` on ``daemon.lock`` in it.

Two daemons on one state folder would both write snapshots and both commit to the
database, until one of them dies on a SQLite constraint error. So ``crop-clusterd run``
takes this lock before it writes anything and holds it for its whole life. The kernel
drops an ``flock`` when the process that holds it dies, however it dies, so a
``kill -9`` never leaves a stale lock behind: the file stays, the lock does not.
``crop-clusterd status`` never takes the lock, so it works beside a running daemon.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from .store import StateError

LOCK_NAME = "daemon.lock"


class StateLockedError(StateError):
    """Another process holds the state folder's lock; ``pid`` is its id when known."""

    def __init__(self, folder: Path, pid: int | None) -> None:
        self.folder = folder
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "a process whose id is unknown"
        super().__init__(
            f"state folder {folder} is in use by another crop-clusterd ({who}); "
            "stop that daemon first, or give this one another state folder (--state)"
        )


class StateLock:
    """The exclusive lock on ``folder / LOCK_NAME``; a context manager.

    :meth:`acquire` creates the folder if needed and raises :class:`StateLockedError`
    at once (it never waits) when another process holds the lock, or
    :class:`~crop_clusterd.store.StateError` when the lock file cannot be opened.
    The lock is held until :meth:`release` or the end of the process.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write this process's id into the file."""
        if self._fd is not None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateError(f"cannot open the lock file {self.path}: {exc.strerror}") from exc
        try:
            # flock, not fcntl/lockf: its lock belongs to this open file, so a second
            # Daemon in the same process is refused too, and it is never inherited
            # by a child that outlives us (O_CLOEXEC).
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateLockedError(self.folder, holder) from None
            raise StateError(f"cannot lock {self.path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file releases it); the file itself stays."""
        # The file is not unlinked: a process that opened it just before the unlink
        # would lock an orphan inode while a third one locks a new file.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    """The process id the lock's holder wrote, or None if unreadable (still being written)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
