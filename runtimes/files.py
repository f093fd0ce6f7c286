"""Crash-safe file writing and checksums, shared by the exporter (ispa_export) and the runtime.

Standard library only. Every writer here builds its result under a temporary sibling name and moves
it into place with one rename, so a crash leaves the old file (or directory) or the new one, never
a half-written one that a later load would accept.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

CHUNK_BYTES = 1 << 20  # hashing reads in 1 MiB pieces: multi-GB weights never sit in memory at once


def sha256_file(path: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest's `files` entry of one file: {"sha256": hex, "bytes": size}."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def file_records(directory: str | os.PathLike, exclude: tuple[str, ...] = ("manifest.json",)) -> dict[str, dict]:
    """`files` entries of every regular file under `directory` (POSIX relative paths, sorted),
    except those named in `exclude` (relative paths)."""
    root = Path(directory)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not p.is_symlink() and rel not in exclude:
            out[rel] = file_record(p)
    return out


def _fsync_dir(path: str | os.PathLike) -> None:
    # Makes a rename durable; not possible on every platform/filesystem, where it is skipped.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_sibling(target: Path, kind: str) -> Path:
    # Keeps the suffix so tools that pick a format from the extension (imageio) still work.
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{target.suffix}"


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yields a temporary path next to `target`; write the file there. On normal exit it is fsynced
    and renamed onto `target`; on an exception it is removed and `target` is left as it was.

    durable=False skips the fsyncs: the rename is still atomic and survives the writer being killed
    (the page cache outlives a process), but not a power loss; for files rewritten many times a
    second whose last durable version is good enough (a run's progress record)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target, "tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        # Some writers (safetensors) create their file 0600; the result gets a new file's usual mode.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
        if durable:
            _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview, durable: bool = True) -> None:
    with atomic_path(path, durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, durable: bool = True) -> None:
    """JSON (UTF-8, sorted keys, trailing newline) written with one rename. NaN/inf are refused:
    they are not JSON and other readers would choke on them. durable: as for atomic_path."""
    text = json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), durable)


# -- directories --------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) where the OS offers it (Linux >= 3.15,
    glibc >= 2.28); False when unavailable, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_siblings(target: Path) -> None:
    # Leftovers of builds whose process died (a crash mid-build); live builds are left alone.
    prefix = f".{target.name}."
    for p in target.parent.glob(prefix + "*"):
        rest = p.name[len(prefix):]
        kind, _, tail = rest.partition("-")
        if kind not in ("build", "old") or not p.is_dir():
            continue
        pid = tail.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a sibling temporary directory, then put it in place of `target`.

    On normal exit the new tree is fsynced and swapped in; an existing `target` is removed only
    after the new one is in place. On Linux the swap is one renameat2(RENAME_EXCHANGE), so at every
    instant `target` is the complete old or the complete new directory. Elsewhere it is two renames
    (old aside, new in): a crash between them leaves no `target` but both complete trees as hidden
    siblings. On an exception the temporary tree is deleted and `target` is untouched.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(target)
    build = _temp_sibling(target, "build")
    build.mkdir()
    try:
        yield build
        _fsync_tree(build)
        if not target.exists():
            os.rename(build, target)
        elif _exchange(build, target):
            # `build` now holds the old tree.
            shutil.rmtree(build)
        else:
            old = _temp_sibling(target, "old")
            os.rename(target, old)
            os.rename(build, target)
            shutil.rmtree(old)
        _fsync_dir(target.parent)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)


def output_file_problem(out: Path, expected: str) -> str | None:
    """Why a file cannot be written at `out`, or None: checked before slow work starts, so the
    refusal comes first. Missing parents are fine (atomic_path creates them)."""
    if out.is_dir():
        return f"is a directory; expected {expected}"
    parent = out.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory; expected a writable directory above the output"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    return None
