# -*- test-case-name: tests.unit.test_logformat -*-
"""
C{--log-format}: how log events are written, for the console script and twistd.

C{text} is Twisted's own line format. C{json} writes one JSON object per
line with plain keys a log shipper reads without knowing Twisted: C{time}
(ISO 8601, UTC), C{level}, C{namespace}, C{message} (the formatted text),
the failure's traceback when there is one, and every structured field of
the event (C{request_id}, C{worker}, C{status}, ...) under its own name.
Twisted's own C{jsonFileLogObserver} is not used: it writes
record-separator-framed events with Twisted's internal C{log_*} keys, made
to be read back by Twisted, not by a shipper.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)

__all__ = ["event_as_json_line", "json_file_log_observer", "log_observer"]

_JSONABLE = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    """A field as JSON: plain values as they are, anything else as its text."""
    if isinstance(value, _JSONABLE):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)) and all(isinstance(v, _JSONABLE) for v in value):
        return list(value)
    return str(value)


def event_as_json_line(event: dict[str, Any]) -> str:
    """One log event as one line of JSON (newline-terminated)."""
    level = event.get("log_level")
    timestamp = event.get("log_time")
    record: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")
            if isinstance(timestamp, (int, float))
            else None
        ),
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # noqa: BLE001 - a broken failure must not lose the event
            record["traceback"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in record or key == "format":
            continue
        record[key] = _plain(value)
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_file_log_observer(out: IO[str]) -> FileLogObserver:
    """Write every event to C{out} as one JSON object per line."""
    return FileLogObserver(out, event_as_json_line)


def log_observer(out: IO[str], *, log_format: str, level_name: str) -> ILogObserver:
    """
    The observer for C{--log-format} and C{--log-level}: events at
    C{level_name} and above, written to C{out} as text or JSON lines.
    """
    make: Callable[[IO[str]], ILogObserver] = (
        json_file_log_observer if log_format == "json" else textFileLogObserver
    )
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level_name))
    return FilteringLogObserver(make(out), [predicate])
