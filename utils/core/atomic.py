"""Atomic file and folder writes: write to a temporary name, then rename into place.

A crash or a kill at any moment leaves either the old content or the new, never half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def replace_file(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Write a file's new content with ``fill(temporary_path)``, then rename it over ``path``.

    The temporary name sits beside ``path`` (same file system), starts with a dot and keeps the
    suffix, so writers that choose a format by extension (PIL, safetensors) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(descriptor)
    try:
        fill(Path(temporary))
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    def fill(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    replace_file(path, fill)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    replace_file(path, lambda temporary: temporary.write_bytes(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def replace_dir(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a folder's new content with ``fill(staging_dir)``, then swap it in for ``folder``.

    The staging folder lives beside ``folder`` (same file system, so renames are atomic)
    and starts with a dot, so a half-written one is never mistaken for a result.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        fill(staging)
        if folder.exists():
            retired = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
            os.replace(folder, retired / folder.name)
            os.replace(staging, folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def save_image(image, path: str | os.PathLike) -> Path:
    """Save a PIL image atomically; PNG when the name has no suffix."""
    return replace_file(path, lambda temporary: image.save(temporary, format=None if Path(path).suffix else "PNG"))


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically and release it."""
    import matplotlib.pyplot as plt

    replace_file(path, lambda temporary: figure.savefig(temporary))
    plt.close(figure)
    return Path(path)
