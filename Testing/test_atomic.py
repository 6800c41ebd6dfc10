"""Atomic writes: complete or absent under the final name, with ordinary permissions."""
from __future__ import annotations

import os
import stat

import pytest

from EmphysemaUADLib.atomic import UMASK, atomic_path, scratch_folder, write_text_atomic


def test_written_file_has_ordinary_permissions_and_no_leftovers(tmp_path):
    target = write_text_atomic(tmp_path / "sub" / "report.json", "{}")
    assert target.read_text() == "{}"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~UMASK
    assert os.listdir(target.parent) == ["report.json"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            assert temp.name == "model.pt" and temp.parent.parent == tmp_path
            temp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_scratch_folder_is_readable_by_others_like_any_new_folder(tmp_path):
    with scratch_folder(tmp_path, ".tmp-case-") as folder:
        assert folder.parent == tmp_path and folder.name.startswith(".tmp-case-")
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~UMASK
    assert not folder.exists()
