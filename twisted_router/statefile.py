# -*- test-case-name: tests.unit.test_statefile -*-
"""
The state file on disk: read it, and replace it atomically.

A router killed half-way through a write must find either the old state or
the new one on its next start, never a mixture, so a write goes to a temporary
file in the same directory, is flushed and fsynced, renamed over the state
file (atomic on POSIX), and then the directory itself is fsynced so the
rename survives a power cut. The directory is injected (a L{FilePath}), never
a global, so tests use a temporary one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from twisted.python.filepath import FilePath

from twisted_router.state import StateDocument, StateError, document_from_json, document_to_json

__all__ = ["STATE_FILE_NAME", "LoadedState", "StateFile", "StateFileError", "open_state_dir"]

#: The state file's name inside C{--state-dir}.
STATE_FILE_NAME = "router-state.json"


class StateFileError(Exception):
    """
    The state directory or file cannot be used; the message is one line
    naming the path. The router does not start (exit status 2).
    """


class StateFile:
    """
    The state file inside one directory.

    @param directory: the state directory; created (with its parents) by
        L{prepare} when missing.
    @param replace: renames the temporary file over the state file; tests
        inject a failing one to simulate a crash between write and rename.
    """

    def __init__(
        self, directory: FilePath[str], *, replace: Callable[[str, str], None] = os.replace
    ) -> None:
        self.directory = directory
        self.path = directory.child(STATE_FILE_NAME)
        self._temp = directory.child(STATE_FILE_NAME + ".tmp")
        self._replace = replace

    def prepare(self) -> None:
        """
        Make sure the directory exists and can be written (a router that
        could not save its state must not start and then lose it).

        @raise StateFileError: it cannot be created or written.
        """
        try:
            if not self.directory.isdir():
                self.directory.makedirs(ignoreExistingDirectory=True)
            probe = self.directory.child(".write-test")
            fd = os.open(probe.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(probe.path)
        except OSError as exc:
            raise StateFileError(f"state directory {self.directory.path} cannot be written: {_reason(exc)}") from None

    def load(self) -> StateDocument | None:
        """
        The saved document, or C{None} when there is none yet (a first start).

        @raise StateFileError: the file cannot be read, or is corrupt,
            truncated or not a router state file.
        """
        try:
            with open(self.path.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"state file {self.path.path}: cannot read: {_reason(exc)}") from None
        try:
            return document_from_json(raw)
        except StateError as exc:
            raise StateFileError(f"state file {self.path.path}: {exc}") from None

    def save(self, doc: StateDocument) -> None:
        """
        Replace the state file with C{doc}, durably: when this returns, the
        new document survives a crash; if it raises, the old one is intact.

        @raise OSError: the write failed (disk full, permissions, ...).
        """
        data = document_to_json(doc)
        fd = os.open(self._temp.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._replace(self._temp.path, self.path.path)
        dir_fd = os.open(self.directory.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@dataclass(frozen=True)
class LoadedState:
    """A state directory checked at start-up, and the document found there (C{None}: first start)."""

    file: StateFile
    document: StateDocument | None


def open_state_dir(path: str) -> LoadedState:
    """
    Check C{--state-dir} before the router starts: it can be written, and
    the state file in it (if any) reads back.

    @raise StateFileError: one line saying what is wrong.
    """
    if not path.strip():
        raise StateFileError("--state-dir must name a directory")
    store = StateFile(FilePath(os.path.abspath(os.path.expanduser(path))))
    store.prepare()
    return LoadedState(store, store.load())


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
