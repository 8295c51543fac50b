"""Writing files so that a reader never sees half of one: :func:`atomic_path`, the one way ubwlib writes a
file, and its two shorthands for bytes and text."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: Path | str, *, overwrite: bool = True, mode: int | None = 0o644,
                fsync: bool = False) -> Iterator[Path]:
    """The one way ubwlib writes a file: yield a temporary path in ``path``'s folder (named
    ``.<name>.<random>.tmp``, created empty); when the block ends without an error, move it onto ``path`` in one
    step, so that a reader sees the old file or the new one, never a half-written one. On an error the temporary
    file is removed and ``path`` is untouched. Creates the folder.

    The block may write the temporary path in any way, also by replacing it (``torch.save``, an exporter that
    opens the name itself, a rename onto it).

    ``overwrite=False`` refuses to replace a file that exists (also one created meanwhile: the move is a hard
    link, with a checked rename where the file system has none) and raises :class:`FileExistsError`.
    ``mode``: the new file's permissions (``None`` keeps the temporary file's: ``0o600`` unless the block
    replaced it). ``fsync``: flush the file to disk before the move.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists (created meanwhile); it was not overwritten") from None
        except OSError:  # no hard links here: check, then rename
            if os.path.lexists(path):
                raise FileExistsError(f"{path} exists (created meanwhile); it was not overwritten") from None
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes_atomic(path: Path | str, data: bytes, **kwargs: Any) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path` (same keyword arguments)."""
    with atomic_path(path, **kwargs) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path | str, text: str, **kwargs: Any) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path` (same keyword arguments)."""
    write_bytes_atomic(path, text.encode("utf-8"), **kwargs)
