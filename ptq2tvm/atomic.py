"""Atomic file writes: every artifact is written to a temporary file next to its destination and renamed onto it,
so a failure (or an interrupt) never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds, delete it otherwise.

    ``suffix`` matters to writers that pick a format from the file name (e.g. ``.so``)."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"cannot write {path}: it is an existing directory, not a file; nothing was written")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        reason = not_writable_reason(e)
        if reason:
            raise ArtifactError(f"cannot write {path}: {reason} ({e.filename or path.parent}); nothing was "
                                f"written") from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    except Exception as e:
        reason = _disk_full(e, path.parent)
        if reason:
            raise ArtifactError(f"cannot write {path}: {reason} ({_free(path.parent)} free in {path.parent}); nothing "
                                f"was written, {path.name} is unchanged") from None
        reason = not_writable_reason(e)
        if reason:
            raise ArtifactError(f"cannot write {path}: {reason}; nothing was written, {path.name} is "
                                "unchanged") from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries of ``path`` left by a writer that was killed (SIGKILL, power loss: its ``finally`` never
    ran): ``.{name}.{pid}.*`` whose process no longer exists. Returns what was removed."""
    removed = []
    for p in path.parent.glob(f".{path.name}.*"):
        parts = p.name[len(path.name) + 2:].split(".", 1)
        if not parts[0].isdigit():
            continue
        try:
            os.kill(int(parts[0]), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
            removed.append(p)
        except (PermissionError, OverflowError):
            pass
    return removed


def not_writable_reason(e: BaseException) -> str | None:
    """"read-only file system" / "permission denied" when ``e`` (or its cause) is a write refused for that reason
    (EROFS, EACCES, EPERM); None for any other failure."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return "read-only file system" if err.errno == errno.EROFS else "permission denied"
    return None


def _free(d: Path) -> str:
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        return "unknown"
    return f"{free / 2 ** 20:.1f} MiB" if free >= 2 ** 20 else f"{free} bytes"


def _disk_full(e: BaseException, d: Path) -> str | None:
    """Why a write failed if the file system is full (ENOSPC / EDQUOT / EFBIG), also when a library (torch's zip
    writer, TVM's exporter) reports it as a RuntimeError without an errno; None for any other failure."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}.get(
                err.errno, "file too large (file system or RLIMIT_FSIZE limit)")
    text = str(e).lower()
    if "no space left" in text:
        return "no space left on device"
    # torch's zip writer on a full disk (tmpfs, torch 2.13): "[enforce fail at inline_container.cc:672] . unexpected
    # pos 8128 vs 8016" (a short write; the errno is lost); other libraries say "... write failed"
    if ("write" in text and "fail" in text) or "unexpected pos" in text or "inline_container" in text:
        try:
            if shutil.disk_usage(d).free < (1 << 22):
                return "no space left on device"
        except OSError:
            return None
        if _fsize_limited():
            return "file too large (file system or RLIMIT_FSIZE limit)"
    return None


def _fsize_limited() -> bool:
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        return False


def copy_file(src: str | Path, dst: str | Path) -> Path:
    """Atomic copy of ``src`` to ``dst`` (same rules as every other artifact write)."""
    dst = Path(dst)
    with atomic_path(dst, suffix=Path(dst).suffix or ".tmp") as tmp:
        shutil.copyfile(src, tmp)
    return dst


def write_text(path: str | Path, text: str) -> Path:
    """Atomic text write (flushed to disk before the rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def json_default(o: Any) -> Any:
    """JSON for numpy arrays and scalars and for paths."""
    if hasattr(o, "tolist") and getattr(o, "ndim", 0) > 0:
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Atomic JSON write."""
    return write_text(path, json.dumps(obj, indent=indent, default=json_default))
