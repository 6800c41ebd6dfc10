"""Writing files so that a crash never leaves a half-written file under the final name.

Everything is written under a temporary name beside the target and renamed onto it (an
atomic step on one file system) only once complete. Temporary files and folders get the
permissions of ordinary new files (the umask's), not tempfile's private 0600 / 0700, so
that models and results stay readable by the other users of a shared machine.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same extension, for writers that go by it);
    when the block succeeds it is flushed to disk and renamed onto `path`, when it fails it
    is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{target.name}", dir=target.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~UMASK)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> Path:
    with atomic_path(path) as temp:
        temp.write_text(text)
    return Path(path)


@contextmanager
def scratch_folder(parent, prefix: str = ".tmp-") -> Iterator[Path]:
    """A new folder in `parent` (ordinary permissions) to write into and then move into place
    (`replace_folder`, `move_into_place`); removed afterwards with whatever is left in it."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, 0o777 & ~UMASK)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def move_into_place(source, target) -> Path:
    """Rename a complete file onto its final name (one atomic step on one file system)."""
    os.replace(source, target)
    return Path(target)


def replace_folder(folder, final) -> Path:
    """Put a complete folder in the place of `final`, removing an earlier one first."""
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(folder, final)
    return final
