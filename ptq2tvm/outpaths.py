"""The one check of an output path, used by every command that writes (``quantize --out``, ``compile --out``,
``export --out``, ``bench --out-dir``, ``bundle --out``, ``demo --out``, ``--json``): before any work is done, so a
path that cannot be written fails with one line naming it and nothing is written."""

from __future__ import annotations

from pathlib import Path

from .errors import ArtifactError


def check_output_path(path: str | Path, kind: str, option: str = "--out") -> Path:
    """Raise :class:`ArtifactError` when ``path`` cannot be created as a ``kind`` ("file" or "dir"): it exists as
    the other kind, or one of its parent folders exists as a file. Returns ``path`` as a :class:`Path`. Creates
    nothing."""
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    p = Path(path)
    if p.exists() or p.is_symlink():
        if kind == "dir" and not p.is_dir():
            raise ArtifactError(f"{option} {path}: {p} is an existing file, not a directory")
        if kind == "file" and p.is_dir():
            raise ArtifactError(f"{option} {path}: {p} is a directory, not a file")
        return p
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ArtifactError(f"{option} {path}: {parent} is a file, not a directory")
            break
    return p


__all__ = ["check_output_path"]
