"""Durable, atomic replacement of checkpoint directories, and storage failures in one line.

A checkpoint is complete on disk before anything points at it: every file and directory is
fsync'd before the directory is renamed into place and before `latest` moves (a power loss
after the rename must not leave a renamed directory of empty files). An existing directory of
the same name (`best`, a named checkpoint) is replaced by an atomic swap: `renameat2(...,
RENAME_EXCHANGE)` where the filesystem has it, else two renames through `<name>.old`, which
`recover_interrupted_swaps` rolls back at start-up. Never delete-then-rename: a crash between
the two would lose the only `best`.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from pathlib import Path

# OSErrors that are the storage's fault, reported in one line (path + errno), not as a bug
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
OLD_SUFFIX = ".old"
TMP_SUFFIX = ".tmp"


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync a directory; data is still synced
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file, then every directory bottom-up, under `root` (root included)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(directory, name))
        fsync_dir(directory)


@contextlib.contextmanager
def naming(path: str | Path):
    """OSErrors raised inside carry `path`: a failed write() (disk full) names no file, and the
    one-line report must say which (docs/reliability.md)."""
    try:
        yield
    except OSError as err:
        if err.errno and err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def write_text_durably(path: str | Path, text: str) -> None:
    """Write via `<path>.tmp`, fsync, rename, fsync the directory. On failure the `.tmp` is
    removed (it would only hold part of the text) and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with naming(path), open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_whole_lines(path: str | Path, text: str) -> None:
    """Append `text` (whole lines) to `path`, or nothing: on a failed write (disk full) the file
    is cut back to its length before, so no torn JSON line is left for a resume to trip over,
    and the OSError names `path`. Not fsync'd: a log, rewritten up to the checkpoint on resume."""
    data = text.encode()
    with naming(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size_before = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(data):  # a short write (space ran out mid-way) raises on the next
                    written += os.write(fd, data[written:])
            except OSError:
                os.ftruncate(fd, size_before)
                raise
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # e.g. NFS, old kernels: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def replace_directory(new: str | Path, final: str | Path, *, _between=None) -> None:
    """Put the complete directory `new` at `final`; `final` (if any) is replaced atomically.

    `_between` is a test hook called between the two renames of the fallback path.
    """
    new, final = Path(new), Path(final)
    if not final.exists():
        os.rename(new, final)
    elif _between is None and _exchange(new, final):
        fsync_dir(final.parent)
        shutil.rmtree(new)  # now holds the previous version
    else:
        old = final.with_name(final.name + OLD_SUFFIX)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        fsync_dir(final.parent)
        if _between is not None:
            _between()
        os.rename(new, final)
        fsync_dir(final.parent)
        shutil.rmtree(old)
    fsync_dir(final.parent)


def recover_interrupted_swaps(root: str | Path) -> list[str]:
    """At start-up (under the run lock): roll back half-done swaps and remove `*.tmp` leftovers.

    `<name>.old` without `<name>` is the complete previous version (the crash came between the
    two renames): it is restored. Any `*.tmp` is an unfinished write and is deleted. Returns
    what was done, for the log.
    """
    root = Path(root)
    actions = []
    if not root.is_dir():
        return actions
    for old in sorted(root.glob("*" + OLD_SUFFIX)):
        final = old.with_name(old.name[:-len(OLD_SUFFIX)])
        if final.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
            actions.append(f"removed {old.name}")
        else:
            os.rename(old, final)
            actions.append(f"restored {final.name} from an interrupted swap")
    for tmp in sorted(root.glob("*" + TMP_SUFFIX)):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
        actions.append(f"removed stale {tmp.name}")
    if actions:
        fsync_dir(root)
    return actions


def find_os_error(exc: BaseException) -> OSError | None:
    """The OSError (with an errno) behind an exception, following __cause__ / __context__."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def probe_write(directory: str | Path, size: int = 1 << 20) -> OSError | None:
    """Try to write and fsync `size` bytes in `directory`: the OSError a full or read-only disk
    gives, or None. Used when a writer's error hides the cause (torch's serializer reports a
    full disk as 'unexpected pos ...')."""
    probe = Path(directory) / ".write_probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as err:
        return err
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def describe_failure(exc: BaseException, directory: str | Path) -> str:
    """One line: the path and errno when there is an OSError behind `exc`, else its first line."""
    os_error = find_os_error(exc)
    if os_error is None:
        os_error = probe_write(directory if Path(directory).is_dir() else Path(directory).parent)
    if os_error is not None:
        where = os_error.filename or directory
        name = errno.errorcode.get(os_error.errno, str(os_error.errno))
        return f"{where}: [Errno {os_error.errno} {name}] {os_error.strerror}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{directory}: {type(exc).__name__}: {first}"
