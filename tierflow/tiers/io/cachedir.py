"""Where tierflow keeps what it makes for later runs (converted models, probe results), and how a
later process tells what a crashed one left behind from what a live one is using.

Files a process makes for itself — a KV spill file, a prefix block being written under a
temporary name, a conversion in progress — are held under an advisory lock (``flock``,
LOCK_EX) on their own descriptor for as long as their owner uses them (``claim``). The kernel
drops a lock when the last descriptor of it closes, on any exit, SIGKILL included. So a later
process that can take the lock of such a leftover knows its owner is gone and removes it
(``remove_orphans``); one whose lock is held is in use and is left alone. A lock is chosen over
a PID (plus boot id) in the name because it cannot be fooled by PID reuse or by a process in
another PID namespace sharing the directory, and it needs no clock.

Taking an orphan is race-free: the remover takes the lock without waiting, checks that the name
still names the inode it locked, then unlinks it. A new owner creates its file, locks it and
checks the same: if a remover took the file in the instant between creating and locking it,
``claim`` says so and the owner makes another. On a filesystem without locks (some FUSE or
network mounts) nothing can be told: files there are used unlocked and kept, unless the caller
gives an age past which a leftover is taken for an orphan.

``exclusive`` serialises one job across processes (the demo model's first conversion) with a lock
file that stays in place: removing a lock file is itself racy.

Before tierflow writes into a directory a user named (``EngineConfig.kv_cache_dir``,
``prefix_cache_dir``, the probe's directory), ``directory_problem`` says what is wrong with it, if
anything: a file, a path under a file, a whole missing tree, a directory that takes no files.
Only a path's last directory may be missing (it is then created): a mistyped path fails instead
of becoming a new tree. Whether files can be made is tried for real (``writable_problem`` makes
and removes a uniquely named file), as permission bits do not tell: root ignores them, and a
read-only mount or an exhausted quota does not show in them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})   # flock unsupported here


def default_cache_dir() -> Path:
    """``$TIERFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/tierflow``, else ``~/.cache/tierflow``."""
    explicit_dir = os.environ.get("TIERFLOW_CACHE_DIR")
    if explicit_dir:
        return Path(explicit_dir).expanduser()
    xdg_cache_home = os.environ.get("XDG_CACHE_HOME")
    if xdg_cache_home and Path(xdg_cache_home).is_absolute():  # the XDG spec ignores relative paths
        return Path(xdg_cache_home) / "tierflow"
    return Path.home() / ".cache" / "tierflow"


def writable_problem(directory: Path) -> str | None:
    """None when a file can be made (and removed) in ``directory``; else why not (the system's
    word for it, e.g. "Read-only file system")."""
    try:
        fd, name = tempfile.mkstemp(prefix=".tierflow-write-check-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return None


def directory_problem(path: Path) -> str | None:
    """What stops ``path`` from being a directory tierflow makes files in, as a phrase that
    follows the path ("is a file, not a directory"); None when nothing does. A ``path`` that
    does not exist is fine when its parent is a directory that takes files: the caller creates
    that last directory (``path.mkdir()``), never a missing tree."""
    kind = _kind(path)
    if kind == "directory":
        why = writable_problem(path)
        return None if why is None else f"is a directory this process cannot create files in ({why})"
    if kind != "missing":
        return kind
    if path.is_symlink():
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    parent = path.parent
    parent_kind = _kind(parent)
    if parent_kind == "directory":
        why = writable_problem(parent)
        return None if why is None else \
            f"does not exist and cannot be created: its parent {parent} takes no new files ({why})"
    ancestor = parent
    while _kind(ancestor) == "missing" and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if _kind(ancestor) == "is a file, not a directory":
        return f"lies under {ancestor}, which is a file, not a directory"
    if parent_kind != "missing":
        return f"lies under {parent}, which {parent_kind}"
    return (f"does not exist, nor does its parent {parent} (only the last directory of a path is created, "
            "so that a mistyped path fails instead of becoming a new tree)")


def remove_empty_dirs(directory: Path) -> None:
    """Remove ``directory`` and the directories under it, deepest first, as far as they are
    empty: what an open that failed created, never a file anyone wrote."""
    for root, _, _ in os.walk(directory, topdown=False):
        try:
            os.rmdir(root)
        except OSError:
            pass                        # not empty, or gone already


def claim(fd: int, path: Path) -> bool:
    """Lock ``fd``, just made at ``path``, for as long as it stays open. False when a remover
    took ``path`` for an orphan before the lock was taken: close ``fd`` and make another file.
    On a filesystem without locks the file is used unlocked (True)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False                    # a remover holds it, for the instant before it unlinks it
    except OSError as exc:
        if exc.errno not in NO_LOCKS:
            raise
        log.debug("no advisory locks on the filesystem of %s: a crash would leave it behind", path)
        return True
    return _names(path, fd)


def remove_orphans(directory: Path, pattern: str, *, unlocked_older_than_s: float | None = None) -> list[Path]:
    """Remove the entries of ``directory`` matching ``pattern`` (files or directories) whose
    owner is gone: their lock can be taken. On a filesystem without locks, remove those not
    modified for ``unlocked_older_than_s`` (None: keep them). Returns what was removed; entries
    that cannot be opened or removed (another user's, a read-only directory) are left."""
    removed = []
    try:
        candidates = sorted(directory.glob(pattern))
    except OSError:
        return removed
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue                    # gone already, a symlink, or not ours to open
        try:
            if _orphaned(fd, path, unlocked_older_than_s) and _names(path, fd):
                _remove(path)
                removed.append(path)
        except OSError as exc:
            log.warning("could not remove %s, left behind by a process that ended: %s", path, exc)
        finally:
            os.close(fd)
    return removed


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold ``lock_path`` (created if need be, never removed) exclusively, waiting for another
    process that holds it; where it cannot be made (a read-only directory) or locked, go on
    unserialised: what needs serialising there fails on its own writes."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        log.debug("cannot make the lock file %s (%s): going on without it", lock_path, exc.strerror)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that holds %s", lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)


def _kind(path: Path) -> str:
    """"directory", "missing", or what else ``path`` is, as a phrase that follows it."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        return f"cannot be looked at ({exc.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    return "is a file, not a directory" if stat.S_ISREG(st.st_mode) else "is not a directory"


def _orphaned(fd: int, path: Path, unlocked_older_than_s: float | None) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False                    # its owner is alive
    except OSError as exc:
        if exc.errno not in NO_LOCKS or unlocked_older_than_s is None:
            return False
        return time.time() - os.fstat(fd).st_mtime > unlocked_older_than_s
    return True


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _remove(path: Path) -> None:
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    for _ in range(3):                  # another remover may be deleting the same tree
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            if not path.exists():
                return
    shutil.rmtree(path)
