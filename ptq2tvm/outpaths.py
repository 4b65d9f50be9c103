"""The one check of an output path, used by every command that writes (``quantize --out``, ``compile --out``,
``export --out``, ``bench --out-dir``, ``bundle --out``, ``demo --out``, ``--json``, and the run directory of the
commands that write into it): before any work is done, so a path that cannot be written fails with one line naming
it and nothing is written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ArtifactError


def check_output_path(path: str | Path, kind: str, option: str = "--out") -> Path:
    """Raise :class:`ArtifactError` when ``path`` cannot be created as a ``kind`` ("file" or "dir"): it exists as
    the other kind, one of its parent folders exists as a file, or (kind "dir") it is a symbolic link to a missing
    path; a dangling symbolic link as a "file" is fine (it is replaced). Returns ``path`` as a :class:`Path`.
    Creates nothing."""
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    p = Path(path)
    if p.exists() or p.is_symlink():
        if kind == "dir" and p.is_symlink() and not p.exists():
            raise ArtifactError(f"{option} {path}: {p} is a symbolic link to a missing path ({os.readlink(p)})")
        if kind == "dir" and not p.is_dir():
            raise ArtifactError(f"{option} {path}: {p} is an existing file, not a directory")
        if kind == "file" and p.is_dir():
            raise ArtifactError(f"{option} {path}: {p} is a directory, not a file")
        _check_writable(p if kind == "dir" else p.absolute().parent, option, path)
        return p
    for parent in p.absolute().parents:
        if parent.is_symlink() and not parent.exists():
            raise ArtifactError(f"{option} {path}: {parent} is a symbolic link to a missing path "
                                f"({os.readlink(parent)})")
        if parent.exists():
            if not parent.is_dir():
                raise ArtifactError(f"{option} {path}: {parent} is a file, not a directory")
            _check_writable(parent, option, path)
            break
    return p


def _check_writable(folder: Path, option: str, path: str | Path) -> None:
    """ArtifactError when files cannot be created in ``folder``: a read-only file system, no write permission for
    this user (``os.access`` answers for the real user, root included on a read-only mount), or a folder that
    refuses new entries although ``os.access`` allows them (a pseudo file system such as /proc or /sys; found by
    creating and removing an empty probe folder, so nothing is left behind)."""
    if os.access(folder, os.W_OK | os.X_OK):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".ptq2tvm-probe-", dir=folder))
            return
        except OSError as e:
            raise ArtifactError(f"{option} {path}: {folder} does not accept new files or folders "
                                f"({e.strerror or e}); nothing was written") from None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    reason = "is on a read-only file system" if read_only else "is not writable by this user"
    raise ArtifactError(f"{option} {path}: {folder} {reason}; nothing was written")


@contextlib.contextmanager
def removed_on_failure(folder: str | Path) -> Iterator[None]:
    """Run the block; when it raises an ``Exception``, remove what it created in ``folder`` before re-raising.

    - ``folder`` did not exist before: it is removed with its contents (this run created it). The parent folders
      that did not exist either are removed only when they are empty afterwards (``os.rmdir``, innermost first,
      never a recursive removal): another run may have written into them meanwhile (two runs into a fresh
      ``root/a`` and ``root/b``: when ``a`` fails, ``root/b`` and ``root`` stay).
    - ``folder`` existed: the entries of ``folder`` that were not there before are removed (what was there stays,
      rewritten or not). A concurrent writer into the same ``folder`` is not protected: its new entries look like
      this run's and are removed too.

    A ``KeyboardInterrupt`` removes nothing (a reconstruction checkpoint in the folder resumes the run). Raises
    whatever the block raises."""
    folder = Path(folder).absolute()
    existed = folder.exists() or folder.is_symlink()
    before = {p.name for p in folder.iterdir()} if existed and folder.is_dir() else set()
    created_parents: list[Path] = []  # the parent folders of the path that do not exist yet, innermost first
    top = folder
    while not existed and not (top.parent.exists() or top.parent.is_symlink()) and top.parent != top:
        top = top.parent
        created_parents.append(top)
    try:
        yield
    except Exception:
        if not existed:
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
            for parent in created_parents:
                try:
                    os.rmdir(parent)      # only when empty: another run may have written into it
                except OSError:
                    break
        elif folder.is_dir():
            for p in folder.iterdir():
                if p.name not in before:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
        raise


__all__ = ["check_output_path", "removed_on_failure"]
