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
    """Yields a temporary path with `path`'s own name, in a hidden folder beside it (writers
    go by the name: the extension picks a format, and torch names a checkpoint's records
    after it, so the same weights give the same bytes); when the block succeeds it is
    flushed to disk and renamed onto `path`, when it fails it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    temp = folder / target.name
    try:
        yield temp
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~UMASK)
        os.replace(temp, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(folder: Path, target: Path) -> None:
    """Create and remove one file in `folder`: the only sure test that writing works there
    (permissions, read-only or immutable folders, /proc)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".tmp-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        from .errors import InputError
        raise InputError(f"{target}: cannot write there ({exc.strerror or exc} in "
                         f"{folder}); choose another output location.") from None


def check_output_folder(path) -> Path:
    """Raise InputError unless `path` is, or can become, a folder that files can be written
    into. Creates nothing."""
    from .errors import InputError
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: is a file, not a folder; the output must name a folder.")
    existing = _nearest_existing(target)
    if not existing.is_dir():
        raise InputError(f"{target}: cannot be created, {existing} is a file, not a folder.")
    _probe(existing, target)
    return target


def check_output_file(path) -> Path:
    """Raise InputError unless a file can be written at `path`. Creates nothing."""
    from .errors import InputError
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{target}: is a folder; the output must name a file, e.g. "
                         f"{target / 'out.nii.gz'}.")
    if str(path).endswith(("/", os.sep)):
        raise InputError(f"{target}: names a folder; the output must name a file.")
    check_output_folder(target.parent if str(target.parent) else Path("."))
    return target


def write_failure(exc: OSError, path=None) -> str:
    """One line for a failed write (disk full, read-only file system, permissions)."""
    import errno
    where = exc.filename or path or ""
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied"}.get(exc.errno, exc.strerror or str(exc))
    return f"{where}: cannot write ({reason})." if where else f"cannot write ({reason})."
