"""The run folder of one training job: an exclusive lock for the life of the run and start-up housekeeping.

Two processes writing one run folder interleave ``metrics.jsonl`` and overwrite each other's checkpoints, so a
run holds ``RUN/run.lock`` with ``fcntl.flock`` from before its data check until it exits. The kernel drops the
lock when the process ends in any way (including SIGKILL), so a lock file left by a killed run never blocks the
next one; the file keeps the holder's PID only to name it in the refusal.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

__all__ = ["LOCK_NAME", "RunFolderError", "RunLock", "lock_holder", "remove_orphan_temporaries",
           "check_writable_dir"]

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunFolderError(RuntimeError):
    """The run folder cannot be used: held by another process, not a folder, or not writable."""


def check_writable_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove that files can be written in it, before any long work.

    Raises :class:`RunFolderError` with one line naming the path and the reason.
    """
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(f"{what} {path}: {parent} is a file, not a folder")
        if parent.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".remax-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"cannot write in {what} {path}: {exc.strerror or exc}") from None
    return path


def lock_holder(run_dir: str | os.PathLike[str]) -> int | None:
    """The PID of the process holding ``run_dir``'s lock, or ``None`` when no live process holds it."""
    lock_path = Path(run_dir) / LOCK_NAME
    if not lock_path.is_file():
        return None
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_pid(lock_path) or -1
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(lock_path: Path) -> int | None:
    try:
        return int(lock_path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``RUN/run.lock``; use as a context manager or acquire/release.

    ``created`` tells whether :meth:`acquire` made the folder, so a run that fails before writing anything can
    remove it again (see :meth:`release`).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self.created = False

    def acquire(self) -> "RunLock":
        existed = self.run_dir.exists()
        check_writable_dir(self.run_dir, "run folder")
        self.created = not existed
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunFolderError(f"cannot write in run folder {self.run_dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                pid = _read_pid(self.path)
                who = f"PID {pid}" if pid else "another process"
                raise RunFolderError(f"run folder {self.run_dir} is in use by {who}; wait for it to finish, stop "
                                     f"it, or choose another --out") from None
            raise RunFolderError(f"cannot lock run folder {self.run_dir}: {exc.strerror or exc}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        log.debug("locked %s (PID %d)", self.path, os.getpid())
        return self

    def release(self, remove_if_empty: bool = False) -> None:
        """Drop the lock; with ``remove_if_empty`` also remove the folder if this run created it and wrote
        nothing else into it (a run refused before its first step leaves no empty folder behind)."""
        if self._fd is None:
            return
        try:
            if remove_if_empty and self.created and {p.name for p in self.run_dir.iterdir()} == {LOCK_NAME}:
                self.path.unlink(missing_ok=True)
                self.run_dir.rmdir()
        except OSError:
            pass
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_orphan_temporaries(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.NAME.pt.*.tmp`` files a killed checkpoint writer left (each up to a checkpoint in size).

    Only called while holding the run's lock, so no live writer owns them.
    """
    removed = []
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return removed
    for p in ckpt_dir.glob(".*.pt.*.tmp"):
        try:
            size = p.stat().st_size
            p.unlink()
        except OSError as exc:
            log.warning("could not remove the orphan temporary file %s: %s", p, exc)
            continue
        removed.append(p)
        log.info("removed %s (%.1f MB), left by an interrupted checkpoint write", p, size / 1e6)
    return removed
