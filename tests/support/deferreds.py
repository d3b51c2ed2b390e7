"""Synchronous helpers for Deferreds in reactor-free tests."""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


def success_result_of(d: Deferred[T] | Any) -> T:
    """Return the result of a Deferred that must already have succeeded.

    pytest has no C{SynchronousTestCase.successResultOf}; this is the same contract.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"Deferred {d!r} has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_result_of(d: Deferred[Any], *types: type[BaseException]) -> Failure:
    """Return the Failure of a Deferred that must already have failed (with one of C{types})."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"Deferred {d!r} has not fired"
    assert isinstance(results[0], Failure), f"Deferred succeeded with {results[0]!r}"
    if types:
        assert results[0].check(*types), f"unexpected failure {results[0]!r}"
    return results[0]


def assert_no_result(d: Deferred[Any]) -> None:
    """Assert that a Deferred has not fired yet (without consuming a later result)."""
    results: list[Any] = []

    def grab(r: Any) -> Any:
        results.append(r)
        return r

    d.addBoth(grab)
    assert not results, f"Deferred fired with {results[0]!r}"
