"""Tests for L{twisted_router.state}: the durable state document and its JSON form."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_router.state import (
    JOURNAL_LIMIT,
    OUTCOMES,
    STATE_FORMAT,
    STATE_KIND,
    JournalEntry,
    Owners,
    StateDocument,
    StateError,
    WorkerRecord,
    document_from_json,
    document_to_json,
)

A = "http://10.0.0.1:30000"
B = "http://10.0.0.2:30000"


def full_document() -> StateDocument:
    return StateDocument(
        weight_version="3",
        refits=3,
        last_refit={"model_path": "/ckpt/step-3", "weight_version": 3, "flush_cache": True},
        labels=(("1", "/ckpt/step-1"), ("2", "/ckpt/step-2"), ("3", "/ckpt/step-3")),
        workers=(WorkerRecord(A, sleeping=True), WorkerRecord(B, "marked dead by operator")),
        journal=(
            JournalEntry(1, "1", "/ckpt/step-1", (A, B), "succeeded"),
            JournalEntry(2, "2", "/ckpt/step-2", (A,), None),
        ),
        images=Owners(finished=(("img-1", A),)),
        videos=Owners(running=(("video-1", B),), finished=(("video-0", A),)),
    )


def test_round_trip() -> None:
    doc = full_document()
    assert document_from_json(document_to_json(doc)) == doc


def test_kind_and_format_come_first() -> None:
    data = json.loads(document_to_json(StateDocument()))
    assert list(data)[:2] == ["kind", "format"]
    assert data["kind"] == STATE_KIND and data["format"] == STATE_FORMAT


def test_properties() -> None:
    doc = full_document()
    assert doc.model_path == "/ckpt/step-3"
    assert doc.refit_in_progress == doc.journal[-1]
    assert StateDocument().model_path is None
    assert StateDocument().refit_in_progress is None
    assert doc.workers[1].quarantined and not doc.workers[0].quarantined


def test_journal_is_bounded_and_replaces_by_number() -> None:
    doc = StateDocument()
    for n in range(1, JOURNAL_LIMIT + 10):
        doc = doc.with_journal(JournalEntry(n, str(n), f"/ckpt/{n}", (A,)))
    assert len(doc.journal) == JOURNAL_LIMIT
    assert doc.journal[0].number == 10 and doc.journal[-1].number == JOURNAL_LIMIT + 9
    last = doc.journal[-1]
    done = doc.with_journal(JournalEntry(last.number, last.version, last.model_path, last.targets, "failed"))
    assert len(done.journal) == JOURNAL_LIMIT
    assert done.journal[-1].outcome == "failed"
    assert done.refit_in_progress is None


# -- "any document we write reads back equal" -------------------------------------------------

_text = st.text(max_size=20)
_json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text
_json = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def documents(draw: st.DrawFn) -> StateDocument:
    refit = draw(st.none() | st.dictionaries(_text, _json, max_size=3))
    if refit is not None:
        refit["model_path"] = draw(st.text(min_size=1, max_size=20).filter(lambda s: s.strip() != ""))
    urls = draw(st.lists(_text, unique=True, max_size=4))
    numbers = sorted(draw(st.sets(st.integers(min_value=0, max_value=10**6), max_size=4)))
    rows = st.lists(st.tuples(_text, _text), max_size=4).map(tuple)
    owners = st.builds(Owners, rows, rows)
    return StateDocument(
        weight_version=draw(_text),
        refits=draw(st.integers(min_value=0, max_value=10**9)),
        last_refit=refit,
        labels=tuple(draw(st.dictionaries(_text, _text, max_size=4)).items()),
        workers=tuple(WorkerRecord(u, draw(st.none() | _text), draw(st.booleans())) for u in urls),
        journal=tuple(
            JournalEntry(
                n,
                draw(_text),
                draw(_text),
                tuple(draw(st.lists(_text, max_size=3))),
                draw(st.none() | st.sampled_from(OUTCOMES)),
            )
            for n in numbers
        ),
        images=draw(owners),
        videos=draw(owners),
    )


@given(documents())
def test_any_document_reads_back_equal(doc: StateDocument) -> None:
    assert document_from_json(document_to_json(doc)) == doc


# -- corrupt, truncated and foreign files: one line each ------------------------------------------


def _valid() -> dict[str, Any]:
    return json.loads(document_to_json(full_document()))  # type: ignore[no-any-return]


def _mutated(change: Any) -> bytes:
    data = _valid()
    change(data)
    return json.dumps(data).encode()


BAD_INPUTS = {
    "empty": (b"", "not valid JSON"),
    "truncated": (document_to_json(full_document())[:-7], "not valid JSON"),
    "binary": (b"\xff\xfe\x00garbage", "not"),
    "foreign JSON": (b'{"name": "some other program", "version": 1}', "not a sglang-d-router-state file"),
    "a list": (b"[1, 2, 3]", "not a sglang-d-router-state file"),
    "later format": (_mutated(lambda d: d.update(format=99)), "unsupported state format 99"),
    "missing fleet": (_mutated(lambda d: d.pop("fleet")), "state file: missing fleet"),
    "unknown key": (_mutated(lambda d: d.update(extra=1)), "unknown field(s) extra"),
    "version a number": (_mutated(lambda d: d["fleet"].update(weight_version=3)), "fleet.weight_version"),
    "negative refits": (_mutated(lambda d: d["fleet"].update(refits=-1)), "fleet.refits"),
    "refit without path": (_mutated(lambda d: d["fleet"].update(last_refit={"x": 1})), "last_refit.model_path"),
    "worker url a list": (_mutated(lambda d: d["workers"][0].update(url=[])), "workers[0].url"),
    "sleeping not bool": (_mutated(lambda d: d["workers"][0].update(sleeping=1)), "workers[0].sleeping"),
    "worker twice": (_mutated(lambda d: d["workers"].append(d["workers"][0])), "listed twice"),
    "unknown outcome": (_mutated(lambda d: d["journal"][0].update(outcome="maybe")), "journal[0].outcome"),
    "journal out of order": (_mutated(lambda d: d["journal"].reverse()), "increasing order"),
    "owner row short": (_mutated(lambda d: d["images"]["finished"].append(["x"])), "images.finished[1]"),
    "owner id not a string": (_mutated(lambda d: d["videos"]["running"][0].__setitem__(0, 7)), "videos.running[0][0]"),
    "owners a list": (_mutated(lambda d: d.update(images=[])), "images: expected an object"),
    "newline in value": (
        _mutated(lambda d: d["fleet"]["labels"].update({"a\nb": 7})),
        "fleet.labels.a b: expected a string",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error(name: str) -> None:
    raw, expected = BAD_INPUTS[name]
    with pytest.raises(StateError) as caught:
        document_from_json(raw)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    try:
        document_from_json(raw)
    except StateError as exc:
        assert "\n" not in str(exc)


@given(st.integers(min_value=1, max_value=len(document_to_json(full_document())) - 1))
def test_every_truncation_is_refused(cut: int) -> None:
    with pytest.raises(StateError):
        document_from_json(document_to_json(full_document())[:cut])
