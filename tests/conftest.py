"""Test-suite wide configuration."""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # A shell that runs a command as a background job (`cmd &` in a script, CI wrappers) starts it
    # with SIGINT ignored, and an ignored signal stays ignored across exec: every router the process
    # tests start would then ignore the SIGINT they send it (Twisted handles SIGINT only where
    # Python's own handler is in place). A handled signal is reset to the default across exec, so
    # handle it here and the children start as from a terminal.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/integration starts real processes; mark it so it can be selected.
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def _state_homes() -> Iterator[int]:
    return itertools.count()


@pytest.fixture(autouse=True)
def _private_state_home(
    tmp_path_factory: pytest.TempPathFactory, _state_homes: Iterator[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Launcher runs keep their durable state under $XDG_STATE_HOME by default: each test gets its
    # own (created only if a router uses it), so no test restores another's fleet (or the developer's).
    base = tmp_path_factory.getbasetemp() / "state-homes"
    monkeypatch.setenv("XDG_STATE_HOME", str(base / str(next(_state_homes))))
