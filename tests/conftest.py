"""Test-suite wide configuration."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest


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
