# -*- test-case-name: tests.unit.test_state -*-
"""
The router's durable state as a document: what a restarted router must not
forget, and its JSON form. Pure: no file, no clock, no reactor.

A restarted router that forgot the fleet's weights would stamp
C{X-Weight-Version: 0} on answers from workers holding step-500 weights,
re-admit workers an operator had quarantined, and lose the owners of images
and videos made before. So the document keeps the fleet's weight version and
the body of its last refit, each worker's registration and quarantine, a
journal of refits (an entry before a refit is sent, its outcome after), and
the image/video owner maps.

The JSON form carries a kind marker and a format number, so a file that is
not ours (or from a later format) is recognised and refused instead of being
half-read; every validation problem is one line naming the bad field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

__all__ = [
    "JOURNAL_LIMIT",
    "STATE_FORMAT",
    "STATE_KIND",
    "JournalEntry",
    "OwnerRow",
    "Owners",
    "StateDocument",
    "StateError",
    "WorkerRecord",
    "document_from_json",
    "document_to_json",
]

#: The kind marker: a file without it is not a router state file.
STATE_KIND = "sglang-d-router-state"
#: The format this code writes and reads.
STATE_FORMAT = 1
#: Refit journal entries kept (newest last): enough to see what happened
#: before a crash, never a file that grows with every refit of a long run.
JOURNAL_LIMIT = 32

#: The outcome of a refit journal entry. C{None} (no outcome yet) means it was
#: in progress when the document was written.
OUTCOMES = ("succeeded", "partial", "rejected", "failed", "interrupted")


class StateError(ValueError):
    """The state file is unusable (corrupt, truncated, foreign); the message is one line."""


@dataclass(frozen=True)
class WorkerRecord:
    """
    One registered worker: its URL, why it is quarantined, if it is, and
    whether it sleeps (memory released): a sleeping worker answers its
    health check but refuses generations and weight updates, so a restarted
    router must not take it for awake.

    @ivar reason: the quarantine's reason; C{None} when the worker is not
        quarantined.
    """

    url: str
    reason: str | None = None
    sleeping: bool = False

    @property
    def quarantined(self) -> bool:
        return self.reason is not None


@dataclass(frozen=True)
class JournalEntry:
    """
    One refit: written (and made durable) before any worker is sent it, and
    again with its outcome after.

    @ivar number: the entry's number, one more than the previous entry's.
    @ivar targets: the URLs of the workers the refit was sent to.
    @ivar outcome: one of L{OUTCOMES}, or C{None} while it runs.
    """

    number: int
    version: str
    model_path: str
    targets: tuple[str, ...]
    outcome: str | None = None

    @property
    def in_progress(self) -> bool:
        return self.outcome is None


#: One owner-map row: C{(item id, worker URL)}.
OwnerRow = tuple[str, str]


class Owners(NamedTuple):
    """
    One owner map (images or video jobs): the rows of running items and of
    finished items (evicted first), each oldest first, as
    L{twisted_router.affinity.OwnerMap.rows} gives them. Plain tuples, not
    objects: the maps hold up to tens of thousands of rows, copied and
    serialised on every owner-map write, and tuples are both the cheapest
    to copy and written by C{json} as the C{[id, url]} rows they are stored as.
    """

    running: tuple[OwnerRow, ...] = ()
    finished: tuple[OwnerRow, ...] = ()

    @property
    def size(self) -> int:
        return len(self.running) + len(self.finished)


@dataclass(frozen=True)
class StateDocument:
    """
    Everything the router keeps across restarts.

    @ivar weight_version: the fleet's weight version (C{"0"}: start-up weights).
    @ivar refits: the fleet's count of successful refits.
    @ivar last_refit: the body of the last successful refit (a JSON object
        with at least C{model_path}), or C{None} before any refit.
    @ivar labels: the checkpoint each used weight-version label names.
    @ivar workers: registered workers, in registration order.
    @ivar journal: the last L{JOURNAL_LIMIT} refits, oldest first.
    @ivar images: image owners, in the owner map's order.
    @ivar videos: video job owners, in the owner map's order.
    """

    weight_version: str = "0"
    refits: int = 0
    last_refit: dict[str, Any] | None = None
    labels: tuple[tuple[str, str], ...] = ()
    workers: tuple[WorkerRecord, ...] = ()
    journal: tuple[JournalEntry, ...] = ()
    images: Owners = Owners()
    videos: Owners = Owners()

    @property
    def model_path(self) -> str | None:
        """The checkpoint of the last refit."""
        return None if self.last_refit is None else self.last_refit["model_path"]

    @property
    def refit_in_progress(self) -> JournalEntry | None:
        """The journal's last entry if it has no outcome: the router stopped during that refit."""
        if self.journal and self.journal[-1].in_progress:
            return self.journal[-1]
        return None

    def with_journal(self, entry: JournalEntry) -> StateDocument:
        """This document with C{entry} added (or replacing the entry of the same number), bounded."""
        kept = [e for e in self.journal if e.number != entry.number]
        kept.append(entry)
        return replace(self, journal=tuple(kept[-JOURNAL_LIMIT:]))


# -- to JSON ---------------------------------------------------------------------------


def document_to_json(doc: StateDocument) -> bytes:
    """The document as UTF-8 JSON, kind marker and format first."""
    data = {
        "kind": STATE_KIND,
        "format": STATE_FORMAT,
        "fleet": {
            "weight_version": doc.weight_version,
            "refits": doc.refits,
            "last_refit": doc.last_refit,
            "labels": dict(doc.labels),
        },
        "workers": [{"url": w.url, "quarantine_reason": w.reason, "sleeping": w.sleeping} for w in doc.workers],
        "journal": [
            {
                "number": e.number,
                "version": e.version,
                "model_path": e.model_path,
                "targets": list(e.targets),
                "outcome": e.outcome,
            }
            for e in doc.journal
        ],
        "images": {"running": doc.images.running, "finished": doc.images.finished},
        "videos": {"running": doc.videos.running, "finished": doc.videos.finished},
    }
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode("utf-8")


# -- from JSON -------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _expect(value: Any, kind: type | tuple[type, ...], where: str, name: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise StateError(f"{where}: expected {name}, got a boolean")
    if not isinstance(value, kind):
        raise StateError(f"{where}: expected {name}, got {_kind(value)}")
    return value


def _str(value: Any, where: str) -> str:
    return _expect(value, str, where, "a string")  # type: ignore[no-any-return]


def _opt_str(value: Any, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _int(value: Any, where: str) -> int:
    number = _expect(value, int, where, "an integer")
    if number < 0:
        raise StateError(f"{where}: expected 0 or more, got {number}")
    return number  # type: ignore[no-any-return]


def _list(value: Any, where: str) -> list[Any]:
    return _expect(value, list, where, "a list")  # type: ignore[no-any-return]


def _object(value: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    obj: dict[str, Any] = _expect(value, dict, where, "an object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise StateError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(k for k in obj if k not in keys)
    if unknown:
        raise StateError(f"{where}: unknown field(s) {', '.join(unknown)}")
    return obj


def _rows(value: Any, where: str) -> tuple[OwnerRow, ...]:
    rows = []
    for i, item in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        row = _list(item, at)
        if len(row) != 2:
            raise StateError(f"{at}: expected [id, worker URL], got {len(row)} item(s)")
        rows.append((_str(row[0], at + "[0]"), _str(row[1], at + "[1]")))
    return tuple(rows)


def _owners(value: Any, where: str) -> Owners:
    owners = _object(value, where, ("running", "finished"))
    return Owners(_rows(owners["running"], where + ".running"), _rows(owners["finished"], where + ".finished"))


def _document_from_json(raw: bytes) -> StateDocument:
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise StateError("not UTF-8 text (corrupt file?)") from None
    except (ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StateError(f"not valid JSON (corrupt or truncated file?): {first}") from None
    if not isinstance(data, dict) or data.get("kind") != STATE_KIND:
        raise StateError(f"not a {STATE_KIND} file (no \"kind\": \"{STATE_KIND}\" marker)")
    if data.get("format") != STATE_FORMAT:
        raise StateError(f"unsupported state format {data.get('format')!r} (this router reads format {STATE_FORMAT})")
    top = _object(data, "state file", ("kind", "format", "fleet", "workers", "journal", "images", "videos"))
    fleet = _object(top["fleet"], "fleet", ("weight_version", "refits", "last_refit", "labels"))
    last_refit = fleet["last_refit"]
    if last_refit is not None:
        _expect(last_refit, dict, "fleet.last_refit", "an object or null")
        model_path = last_refit.get("model_path")
        if not isinstance(model_path, str) or not model_path.strip():
            raise StateError("fleet.last_refit.model_path: expected a non-empty string")
    labels = _expect(fleet["labels"], dict, "fleet.labels", "an object")
    workers = []
    seen: set[str] = set()
    for i, item in enumerate(_list(top["workers"], "workers")):
        record = _object(item, f"workers[{i}]", ("url", "quarantine_reason", "sleeping"))
        url = _str(record["url"], f"workers[{i}].url")
        if url in seen:
            raise StateError(f"workers[{i}].url: {url} is listed twice")
        seen.add(url)
        reason = _opt_str(record["quarantine_reason"], f"workers[{i}].quarantine_reason")
        workers.append(WorkerRecord(url, reason, _expect(record["sleeping"], bool, f"workers[{i}].sleeping", "a boolean")))
    journal: list[JournalEntry] = []
    for i, item in enumerate(_list(top["journal"], "journal")):
        at = f"journal[{i}]"
        entry = _object(item, at, ("number", "version", "model_path", "targets", "outcome"))
        outcome = _opt_str(entry["outcome"], at + ".outcome")
        if outcome is not None and outcome not in OUTCOMES:
            raise StateError(f"{at}.outcome: expected one of {', '.join(OUTCOMES)} or null, got {outcome!r}")
        number = _int(entry["number"], at + ".number")
        if journal and number <= journal[-1].number:
            raise StateError(f"{at}.number: entries must be in increasing order")
        journal.append(
            JournalEntry(
                number=number,
                version=_str(entry["version"], at + ".version"),
                model_path=_str(entry["model_path"], at + ".model_path"),
                targets=tuple(_str(t, f"{at}.targets[{j}]") for j, t in enumerate(_list(entry["targets"], at + ".targets"))),
                outcome=outcome,
            )
        )
    return StateDocument(
        weight_version=_str(fleet["weight_version"], "fleet.weight_version"),
        refits=_int(fleet["refits"], "fleet.refits"),
        last_refit=last_refit,
        labels=tuple((k, _str(v, f"fleet.labels.{k}")) for k, v in labels.items()),
        workers=tuple(workers),
        journal=tuple(journal),
        images=_owners(top["images"], "images"),
        videos=_owners(top["videos"], "videos"),
    )


def document_from_json(raw: bytes) -> StateDocument:
    """
    Read a document written by L{document_to_json}.

    @raise StateError: not JSON (corrupt or truncated), not a router state
        file (no kind marker), another format, or a field of the wrong shape;
        the message is one line, even when it quotes a value with line breaks.
    """
    try:
        return _document_from_json(raw)
    except StateError as exc:
        raise StateError(" ".join(str(exc).split())) from None
