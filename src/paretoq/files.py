"""Files and folders that appear complete or not at all: the one atomic-write helper of paretoq.

Everything paretoq replaces on disk (results, checkpoints, model folders, GGUF files, caches) is
written under a temporary name in the same folder, flushed to disk, then moved into place with
``os.replace`` (atomic on POSIX). A process killed at any instant leaves the old file or the new
one, plus at most a ``.tmp-*`` leftover that the next run may delete. Files get the permissions
any other file would (0666 less the umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"  # every temporary entry paretoq makes in an output folder starts with this


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk; filesystems that cannot are skipped silently."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file (and folder entry) under ``root`` to disk, each file with the usual permissions
    (0666 less the umask: some writers, e.g. a temporary file renamed into place, leave 0600)."""
    mode = 0o666 & ~umask()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and os.stat(path).st_mode & 0o777 != mode:
                os.chmod(path, mode)
            fsync_path(path)
        fsync_path(folder, directory=True)


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path next to ``path``; when the block ends without error, the file written
    there is flushed and moved to ``path``; on error it is deleted. ``suffix`` keeps an extension
    for writers that look at it (e.g. ``.png``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replace ``path`` by ``data`` (text is written as UTF-8) atomically."""
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def replace_folder(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move folder ``src`` to ``dst`` atomically; a ``dst`` that exists is moved aside first and
    deleted after."""
    src, dst = os.fspath(src), os.fspath(dst)
    old = None
    if os.path.lexists(dst):
        old = os.path.join(os.path.dirname(dst) or ".", f"{TMP_PREFIX}old-{os.path.basename(dst)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_path(os.path.dirname(dst) or ".", directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_folder(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A fresh ``.tmp-<name>-*`` folder inside ``parent``, deleted when the block ends."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=parent))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder next to ``path``; when the block ends without error it replaces
    ``path`` whole (flushed first); on error it is deleted and ``path`` is untouched."""
    path = Path(path)
    with staging_folder(path.parent, path.name) as tmp:
        yield tmp
        fsync_tree(tmp)
        replace_folder(tmp, path)


def publish_files(staging: str | os.PathLike, folder: str | os.PathLike, last: str = "config.json") -> None:
    """Move every entry of ``staging`` into ``folder`` (replacing entries of the same name), ``last``
    after all the others: a reader who finds the new ``config.json`` finds the weights that belong
    to it. Entries of ``folder`` not in ``staging`` are kept."""
    staging, folder = Path(staging), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fsync_tree(staging)
    for entry in sorted(staging.iterdir(), key=lambda p: (p.name == last, p.name)):
        if entry.is_dir():
            replace_folder(entry, folder / entry.name)
        else:
            os.replace(entry, folder / entry.name)
    fsync_path(folder, directory=True)
