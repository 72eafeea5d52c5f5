"""Publishing files, directories and symlinks atomically and durably, reading inside a directory only, and exclusive
locks between processes.

A writer builds under a temporary name and renames it into place, so a reader sees the old state or the new one,
never half of one. The rename itself survives a power cut only once the parent directory is fsynced too, so each
helper syncs the new content, renames, then syncs the parent. The rename replaces a symlink at the final name rather
than writing through it, so a link planted in a checkpoint cannot redirect a write elsewhere; `contained` is the
reading side: a file of a directory resolved, refused if a link leads out of that directory. Locks are flock()s on a
lock file: the OS releases them when their process dies, so a killed holder never leaves a stale lock (the data
cache and the run dir use them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from xlab.errors import XLabError

# Answers of filesystems that cannot fsync a directory (some network and FUSE filesystems): nothing more can be done.
_NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory `path` (creations, renames, deletions) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        # Windows cannot open a directory as a file (and NTFS journals the rename itself); other errors, such as
        # EIO, mean the rename may be lost and must not pass silently.
        if os.name != "nt" and exc.errno not in _NO_DIR_FSYNC:
            raise


def fsync_tree(path: str | Path) -> None:
    """fsync every regular file below directory `path` and every directory, `path` included (deepest first)."""
    for root, _, files in os.walk(path, topdown=False):  # symlinks are neither followed nor synced
        for name in files:
            file = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(file).st_mode):
                _fsync_file(file)
        fsync_dir(root)


def publish_file(tmp: str | Path, final: str | Path) -> None:
    """Atomically replace file `final` with the finished file `tmp`, durably."""
    _fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def write_file(path: str | Path, data: str | bytes) -> None:
    """Write `path` atomically and durably through a fresh temporary file in its directory. An existing `path` that is
    a symlink is replaced by the new file, never written through."""
    path = Path(path)
    data = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL: never follows a link
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results that write_text would have shared
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def contained(directory: str | Path, name: str | Path) -> Path:
    """The real path of `directory/name`, or a one-line error when a symlink on the way leads out of `directory` (a
    directory given to read is read, not whatever a link planted in it points at) or the file is a hard link with
    names outside it. Links inside it are fine. For a read done at once, `opened_inside` also closes the race between
    this check and the open."""
    root = Path(directory).resolve()
    try:
        real = (root / name).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise XLabError(f"cannot resolve {root / name}: {exc}") from None
    _check_inside(root, root / name, real)
    with contextlib.suppress(OSError):  # a missing file: its reader says so
        _check_hard_links(root, real, real.stat())
    return real


def _check_inside(root: Path, given: Path, real: Path) -> None:
    if not real.is_relative_to(root):
        raise XLabError(f"refusing to read {given}: it is a symlink to {real}, outside {root}; copy the file into the "
                        "directory instead")


def _check_hard_links(root: Path, real: Path, st: os.stat_result) -> None:
    """A regular file with more names (st_nlink) than `root` holds has one elsewhere: a hard link is another way in."""
    if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
        return
    inside = 0
    for base, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                other = os.stat(os.path.join(base, name), follow_symlinks=False)
                inside += (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
    if inside < st.st_nlink:
        raise XLabError(f"refusing to read {real}: it is a hard link with {st.st_nlink - inside} name(s) outside "
                        f"{root}; copy the file into the directory instead")


@contextlib.contextmanager
def opened_inside(directory: str | Path, name: str | Path) -> Iterator[Path]:
    """`directory/name` opened first and checked after (`contained`'s rules, on the file actually opened, so a link
    swapped in between the check and the read cannot redirect it); yields a path that reads that open file
    (/proc/self/fd/N on Linux, where readers that take a path are given one; elsewhere the checked path)."""
    root = Path(directory).resolve()
    path = contained(root, name)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        proc, real = Path(f"/proc/self/fd/{fd}"), path
        if proc.is_symlink():  # Linux: what the descriptor really is
            real = Path(os.readlink(proc))
            _check_inside(root, root / name, real)
        _check_hard_links(root, real, os.fstat(fd))
        yield proc if proc.is_symlink() else path
    finally:
        os.close(fd)


def publish_dir(tmp: str | Path, final: str | Path, replace: bool = False) -> bool:
    """Rename the finished directory `tmp` to `final`, durably; True if `tmp` became `final`.

    replace=False: the first writer wins; if `final` already exists, it is kept and `tmp` is removed (False).
    replace=True: an existing `final` is removed first (not atomic: a crash in between leaves neither name).
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if replace and final.exists():
        shutil.rmtree(final)
    try:
        os.replace(tmp, final)
        published = True
    except OSError:
        if replace or not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process published it first; theirs is complete too
        published = False
    fsync_dir(final.parent)  # either way `final` is durable once this returns
    return published


def publish_symlink(link: str | Path, target_name: str) -> None:
    """Point symlink `link` at `target_name` (relative to the link's directory) atomically, durably: a reader
    always finds the old target or the new one."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash between symlink and replace
    tmp.symlink_to(target_name)
    os.replace(tmp, link)
    fsync_dir(link.parent)


NO_LOCK = "XLAB_NO_LOCK"  # =1: take no file locks (file systems without flock); one writer is then up to you


def file_system(path: Path) -> str:
    """The type of the file system holding `path` (its longest mount point in /proc/mounts), or "unknown"."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    real = str(path.resolve())
    found = [(len(point), kind) for point, kind in mounts if real == point or real.startswith(point.rstrip("/") + "/")]
    return max(found)[1] if found else "unknown"


def _flock(f: IO, path: Path, flags: int) -> None:
    import fcntl  # POSIX only

    try:
        fcntl.flock(f, flags)
    except BlockingIOError:
        raise
    except OSError as exc:  # ENOLCK, EOPNOTSUPP, ENOSYS: the file system has no flock (some NFS and FUSE mounts)
        f.close()
        raise XLabError(f"cannot lock {path}: the {file_system(path.parent)} file system there does not support "
                        f"file locks ({exc.strerror or exc}); set {NO_LOCK}=1 to run without them (then make sure "
                        "only one process writes to that directory)") from None


def try_lock(path: str | Path) -> IO | None:
    """An exclusive lock on file `path` (created if missing), held while the returned file stays open; None when
    another process holds it. With XLAB_NO_LOCK=1 the file is opened and nothing is locked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    if os.environ.get(NO_LOCK) == "1":
        return f
    import fcntl  # POSIX only

    try:
        _flock(f, path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


@contextlib.contextmanager
def locked(path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[IO]:
    """Hold an exclusive lock on file `path` for the block, waiting for another holder (`on_wait()` first)."""
    import fcntl  # POSIX only

    f = try_lock(path)
    if f is None:
        if on_wait is not None:
            on_wait()
        f = open(path, "a+")
        _flock(f, Path(path), fcntl.LOCK_EX)
    with f:
        yield f


__all__ = ["contained", "fsync_dir", "fsync_tree", "locked", "publish_dir", "publish_file", "publish_symlink",
           "try_lock", "write_file"]
