"""Tests for L{twisted_router.statefile}: the atomic state file writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.python.filepath import FilePath

from twisted_router.state import StateDocument, WorkerRecord, document_to_json
from twisted_router.statefile import STATE_FILE_NAME, StateFile, StateFileError, open_state_dir

OLD = StateDocument(weight_version="1", refits=1, last_refit={"model_path": "/ckpt/a"})
NEW = StateDocument(
    weight_version="2", refits=2, last_refit={"model_path": "/ckpt/b"}, workers=(WorkerRecord("http://h:1"),)
)


def store(tmp_path: Path, **kwargs: object) -> StateFile:
    return StateFile(FilePath(str(tmp_path)), **kwargs)  # type: ignore[arg-type]


def test_first_start_has_no_document(tmp_path: Path) -> None:
    assert store(tmp_path).load() is None


def test_save_then_load(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save(OLD)
    s.save(NEW)
    assert s.load() == NEW
    assert (tmp_path / STATE_FILE_NAME).read_bytes() == document_to_json(NEW)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE_NAME]  # no temporary file left


def test_crash_between_write_and_rename_keeps_the_old_file(tmp_path: Path) -> None:
    store(tmp_path).save(OLD)

    def crash(src: str, dst: str) -> None:
        raise OSError(5, "simulated crash before rename")

    with pytest.raises(OSError):
        store(tmp_path, replace=crash).save(NEW)
    # The new document was written to the temporary file, never over the state file.
    assert store(tmp_path).load() == OLD
    assert (tmp_path / (STATE_FILE_NAME + ".tmp")).read_bytes() == document_to_json(NEW)
    # The next successful save replaces both.
    store(tmp_path).save(NEW)
    assert store(tmp_path).load() == NEW


def test_the_file_is_fsynced_before_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        os.replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    store(tmp_path, replace=replace).save(NEW)
    assert events == ["fsync-file", "rename", "fsync-dir"]


def test_corrupt_file_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE_NAME).write_bytes(document_to_json(NEW)[:20])
    with pytest.raises(StateFileError) as caught:
        store(tmp_path).load()
    message = str(caught.value)
    assert message.startswith(f"state file {tmp_path / STATE_FILE_NAME}: not valid JSON")
    assert "\n" not in message


def test_open_state_dir_creates_the_directory(tmp_path: Path) -> None:
    loaded = open_state_dir(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()
    assert loaded.document is None
    loaded.file.save(OLD)
    assert open_state_dir(str(tmp_path / "a" / "b")).document == OLD


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateFileError, match="cannot be written"):
        open_state_dir(str(blocker / "state"))
