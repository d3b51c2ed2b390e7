# -*- test-case-name: tests.unit.test_simulator_payloads -*-
"""
Realistic answer bodies, built with the standard library and cached.

The router is tested for memory and throughput with the sizes real workers
send (§7 of C{docs/worker-api.md}): JPEGs of a few hundred kB, PNGs of a
few MB, trajectories of tens of MB of base64, MP4s of hundreds of MB. So the
simulator must send bodies of those sizes that are still I{valid} files (the
router's tests decode them), without costing the simulator that much memory
per request, nor memory that grows with the configured sizes. Every builder
here is pure and cached by size or shape, so a payload is built once and
shared by every answer that needs it, and no large payload is ever
materialised: images are described as runs of a few repeated blocks
(L{Runs}), MP4s by their header, and their base64 is a tuple of pieces that
mostly reference one cached encoded unit (L{Base64}).

Nothing here needs numpy: C{.npy} and safetensors containers are written by
hand (the tests check them with numpy).
"""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack

#: Size of the slices written to a response at a time; the same as Twisted's
#: transport buffer, so a push producer pauses after about one chunk.
CHUNK_SIZE = 64 * 1024

# ---------------------------------------------------------------------------
# Base64 held as pieces


@dataclass(frozen=True)
class Base64:
    """
    Base64 text held as pieces whose concatenation is the whole encoding.

    Every piece but the last encodes a multiple of 3 bytes, so the pieces
    can be written one after another with no re-encoding. Tensor data and
    MP4 padding repeat with a short period, so most pieces are the I{same}
    16 KiB object referenced many times: a 1.5 GB trajectory costs a list
    of references, not 1.5 GB.
    """

    pieces: tuple[bytes, ...]

    def __len__(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    def to_bytes(self) -> bytes:
        """The whole text (tests and small payloads only)."""
        return b"".join(self.pieces)


def periodic_b64(head: bytes, block: bytes, nbytes: int) -> Base64:
    """
    Base64 of C{head} followed by C{nbytes} bytes of C{block} repeated.

    After a prefix that ends on a 3-byte boundary, the byte stream repeats
    every C{lcm(len(block), 3)} bytes, and so does its base64 (4 characters
    per 3 bytes): one encoded unit is reused for the whole periodic part.
    """
    pieces, tail = _periodic_pieces(head, block, nbytes)
    if tail:
        pieces.append(base64.b64encode(tail))
    return Base64(tuple(pieces))


def _periodic_pieces(head: bytes, block: bytes, nbytes: int) -> tuple[list[bytes], bytes]:
    """
    L{periodic_b64} without its end: the base64 pieces of the stream up to
    the last whole unit, and the raw bytes after it (less than one unit, to
    be encoded alone or continued by whatever follows).
    """
    prefix_len = -(-len(head) // 3) * 3
    total = len(head) + nbytes
    if prefix_len >= total or not block:
        return [], head + (block * (nbytes // max(1, len(block)) + 1))[:nbytes]
    offset = prefix_len - len(head)
    rotated = block[offset % len(block):] + block[: offset % len(block)]
    prefix = head + (block * (offset // len(block) + 1))[:offset]
    copies = 3 // _gcd(len(block), 3)
    unit = rotated * copies
    remaining = nbytes - offset
    count, tail_len = divmod(remaining, len(unit))
    pieces = [base64.b64encode(prefix)] if prefix else []
    if count:
        pieces.extend([_encoded_unit(unit)] * count)
    return pieces, unit[:tail_len]


def runs_b64(runs: Iterable[tuple[bytes, int]]) -> Base64:
    """
    Base64 of the concatenation of C{(block, count)} runs, as shared pieces.

    Long runs of one block are encoded by L{_periodic_pieces}, so their
    base64 is one cached unit referenced many times; short runs are encoded
    directly. Nothing as large as the whole is ever built.
    """
    pieces: list[bytes] = []
    carry = b""
    for block, count in runs:
        if not block or count <= 0:
            continue
        if count <= 6:
            data = carry + block * count
            cut = len(data) - len(data) % 3
            if cut:
                pieces.append(base64.b64encode(data[:cut]))
            carry = data[cut:]
        else:
            more, tail = _periodic_pieces(carry, block, len(block) * count)
            pieces.extend(more)
            cut = len(tail) - len(tail) % 3
            if cut:
                pieces.append(base64.b64encode(tail[:cut]))
            carry = tail[cut:]
    if carry:
        pieces.append(base64.b64encode(carry))
    return Base64(tuple(pieces))


@dataclass(frozen=True)
class Runs:
    """
    A file held as runs of repeated blocks: C{(block, count)} pairs in order.

    Padded images are a head, one or two padding segments repeated many
    times, and a tail, so a 100 MB image costs a few 64 KiB blocks however
    many clients download it. Every block is at most L{CHUNK_SIZE} bytes.
    """

    runs: tuple[tuple[bytes, int], ...]

    @property
    def length(self) -> int:
        return sum(len(block) * count for block, count in self.runs)

    def chunks(self) -> Iterator[bytes]:
        """The file as its blocks, in order (the same objects, never copies)."""
        for block, count in self.runs:
            for _ in range(count):
                yield block

    def to_bytes(self) -> bytes:
        """The whole file (tests and small payloads only)."""
        return b"".join(self.chunks())

    def b64(self) -> Base64:
        """The base64 of the file, as shared pieces (see L{runs_b64})."""
        return runs_b64(self.runs)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@lru_cache(maxsize=64)
def _encoded_unit(unit: bytes) -> bytes:
    return base64.b64encode(unit)


# ---------------------------------------------------------------------------
# Images


def _segment(marker: int, data: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(data) + 2) + data


#: An 8×8 mid-grey baseline JPEG: one DC-only block whose Huffman tables have
#: a single one-bit code each (DC category 0, AC end-of-block), so the whole
#: entropy-coded scan is the byte 0x3F.
_JPEG_HEAD = (
    b"\xff\xd8"
    + _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
)
_JPEG_TAIL = (
    _segment(0xDB, b"\x00" + b"\x01" * 64)
    + _segment(0xC0, b"\x08\x00\x08\x00\x08\x01\x01\x11\x00")
    + _segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00")
    + _segment(0xC4, b"\x10" + b"\x01" + b"\x00" * 15 + b"\x00")
    + _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    + b"\x3f"
    + b"\xff\xd9"
)
#: Largest payload of one COM segment: 4 bytes of marker and length, so a
#: segment is at most one L{CHUNK_SIZE} (the format allows 65533).
_COM_MAX = CHUNK_SIZE - 4


def _pad_segments(padding: int, overhead: int, max_payload: int) -> list[int]:
    """
    Split C{padding} bytes into container segments of C{overhead + payload}.

    @return: the payload sizes; empty when no exact split exists (padding of
        less than one segment's overhead), in which case the caller rounds up.
    """
    if padding <= 0:
        return []
    count = -(-padding // (overhead + max_payload))
    payload = padding - overhead * count
    if payload < 0:
        return []
    sizes = [payload // count] * count
    for i in range(payload % count):
        sizes[i] += 1
    return sizes


def _segment_runs(
    padding: int, overhead: int, max_payload: int, build: Callable[[int], bytes]
) -> list[tuple[bytes, int]]:
    """
    The runs of padding segments that fill C{padding} bytes exactly.

    L{_pad_segments} gives at most two distinct payload sizes (the first
    ones one byte larger), so the padding is at most two segments repeated;
    C{build(n)} makes the segment with an C{n}-byte payload. Padding too
    small to split rounds up to one empty segment.
    """
    if padding <= 0:
        return []
    sizes = _pad_segments(padding, overhead, max_payload)
    if not sizes:
        return [(build(0), 1)]
    runs: list[tuple[bytes, int]] = []
    big = sizes[0]
    n_big = sizes.count(big)
    runs.append((build(big), n_big))
    if n_big < len(sizes):
        runs.append((build(big - 1), len(sizes) - n_big))
    return runs


def _jpeg_runs(size: int) -> Runs:
    """
    A valid baseline JPEG of exactly C{size} bytes (at least the minimal file).

    Padding goes into COM (comment) segments, which every decoder skips. A
    size one to three bytes above the minimum cannot be padded exactly and
    is rounded up to the next possible size.
    """
    padding = size - len(_JPEG_HEAD) - len(_JPEG_TAIL)
    filler = _segment_runs(padding, 4, _COM_MAX, lambda n: _segment(0xFE, b"S" * n))
    return Runs(((_JPEG_HEAD, 1), *filler, (_JPEG_TAIL, 1)))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


_PNG_HEAD = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
_PNG_TAIL = _png_chunk(b"IDAT", zlib.compress(b"\x00\x80")) + _png_chunk(b"IEND", b"")
#: A private, ancillary, safe-to-copy chunk type: decoders must ignore it.
PNG_PADDING_CHUNK = b"sgPd"


def _png_runs(size: int) -> Runs:
    """
    A valid 1×1 greyscale PNG of exactly C{size} bytes (at least the minimum).

    Padding goes into C{sgPd} chunks of at most one L{CHUNK_SIZE} each,
    which are ancillary and private, so decoders skip them. Sizes 1-11 bytes
    above the minimum round up.
    """
    padding = size - len(_PNG_HEAD) - len(_PNG_TAIL)
    filler = _segment_runs(
        padding, 12, CHUNK_SIZE - 12, lambda n: _png_chunk(PNG_PADDING_CHUNK, bytes(n))
    )
    return Runs(((_PNG_HEAD, 1), *filler, (_PNG_TAIL, 1)))


#: A 1×1 lossless WebP bitstream (the payload of a C{VP8L} chunk).
_VP8L_1X1 = bytes.fromhex("2f000000000750c00216b0ff8188e87f00")


def _webp_runs(size: int) -> Runs:
    """
    A valid 1×1 WebP (extended format) of exactly C{size} bytes.

    The extended format (C{VP8X}) allows unknown chunks, which readers
    ignore; padding goes into one C{PADD} chunk of zeros. RIFF chunks have
    even sizes, so odd sizes and sizes 1-7 bytes above the minimum round up.
    """
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + b"\x00\x00\x00" + b"\x00\x00\x00"
    image = b"VP8L" + struct.pack("<I", len(_VP8L_1X1)) + _VP8L_1X1
    if len(_VP8L_1X1) % 2:
        image += b"\x00"
    body = b"WEBP" + vp8x + image
    base = 8 + len(body)
    padding = size - base
    zeros = 0
    if padding > 0:
        # RIFF chunks are always an even number of bytes, so an odd size
        # (or one less than a chunk header above the minimum) rounds up.
        padding = max(padding + padding % 2, 8)
        zeros = padding - 8
        body += b"PADD" + struct.pack("<I", zeros)
    head = b"RIFF" + struct.pack("<I", len(body) + zeros) + body
    return Runs(((head, 1), *_zero_runs(zeros)))


def _zero_runs(n: int) -> list[tuple[bytes, int]]:
    """C{n} zero bytes as runs of the shared zero chunk."""
    whole, rest = divmod(n, CHUNK_SIZE)
    runs: list[tuple[bytes, int]] = []
    if whole:
        runs.append((_zeros(CHUNK_SIZE), whole))
    if rest:
        runs.append((bytes(rest), 1))
    return runs


@lru_cache(maxsize=16)
def image_payload(ext: str, size: int) -> Runs:
    """
    The image file for extension C{jpg}, C{png} or C{webp}, described as runs.

    Cached, but small whatever C{size}: at most a few L{CHUNK_SIZE} blocks.
    """
    if ext == "png":
        return _png_runs(size)
    if ext == "webp":
        return _webp_runs(size)
    return _jpeg_runs(size)


def jpeg_bytes(size: int = 0) -> bytes:
    """The whole JPEG of L{image_payload} (tests and small sizes only)."""
    return image_payload("jpg", size).to_bytes()


def png_bytes(size: int = 0) -> bytes:
    """The whole PNG of L{image_payload} (tests and small sizes only)."""
    return image_payload("png", size).to_bytes()


def webp_bytes(size: int = 0) -> bytes:
    """The whole WebP of L{image_payload} (tests and small sizes only)."""
    return image_payload("webp", size).to_bytes()


def image_bytes(ext: str, size: int) -> bytes:
    """The whole image of L{image_payload} (tests and small sizes only)."""
    return image_payload(ext, size).to_bytes()


@lru_cache(maxsize=16)
def image_b64(ext: str, size: int) -> Base64:
    """
    The base64 of L{image_payload}, as shared pieces: a 16 MB image's
    21 MB of base64 costs a few hundred kB, not a copy of the text.
    """
    return image_payload(ext, size).b64()


# ---------------------------------------------------------------------------
# Video


@dataclass(frozen=True)
class Mp4Payload:
    """
    An ISO-BMFF file of exactly C{length} bytes: C{ftyp} then one C{mdat}.

    It is described, not stored: L{chunks} yields the header and then slices
    of one shared zero block, so serving a 200 MB video costs one 64 KiB
    buffer however many clients download it.
    """

    length: int
    header: bytes

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The file as slices of at most C{size} bytes."""
        yield self.header
        zero = _zeros(size)
        remaining = self.length - len(self.header)
        while remaining > 0:
            n = min(size, remaining)
            yield zero if n == size else zero[:n]
            remaining -= n

    def to_bytes(self) -> bytes:
        """The whole file (only for the native endpoint, which base64s it)."""
        return b"".join(self.chunks())


_FTYP = struct.pack(">I", 32) + b"ftypisom" + struct.pack(">I", 0x200) + b"isomiso2avc1mp41"


@lru_cache(maxsize=4)
def _zeros(size: int) -> bytes:
    return b"\x00" * size


@lru_cache(maxsize=16)
def mp4_payload(size: int = 0) -> Mp4Payload:
    """
    Describe an MP4 of C{size} bytes (at least the 40-byte minimum).

    The C{mdat} box uses a 64-bit size above 4 GiB. There is no C{moov}
    box, so players refuse to play it, but it is a well-formed ISO-BMFF
    container with the C{video/mp4} signature the router's tests check.
    """
    length = max(size, len(_FTYP) + 8)
    payload = length - len(_FTYP) - 8
    if payload + 8 <= 0xFFFFFFFF:
        mdat = struct.pack(">I", payload + 8) + b"mdat"
    else:
        length = max(length, len(_FTYP) + 16)
        payload = length - len(_FTYP) - 16
        mdat = struct.pack(">I", 1) + b"mdat" + struct.pack(">Q", payload + 16)
    return Mp4Payload(length=length, header=_FTYP + mdat)


@lru_cache(maxsize=16)
def mp4_b64(size: int) -> Base64:
    """Base64 of a whole MP4 (the native endpoint returns outputs inline), as pieces."""
    mp4 = mp4_payload(size)
    return periodic_b64(mp4.header, _zeros(4096), mp4.length - len(mp4.header))


# ---------------------------------------------------------------------------
# Tensors: .npy and safetensors containers of float32 data

_FLOAT_BLOCK = 1024  # floats per pattern block (4 KiB)


@lru_cache(maxsize=8)
def _pattern(kind: str) -> bytes:
    """
    A 4 KiB block of plausible float32 values, repeated to fill a tensor.

    C{log_probs} are negative log-densities, C{output} is an image in
    [-1, 1], anything else looks like unit-variance latents. Deterministic,
    so identical requests give identical bytes.
    """
    rng = random.Random(kind)
    if kind == "log_probs":
        values = [-1.0 - abs(rng.gauss(0.0, 0.25)) for _ in range(_FLOAT_BLOCK)]
    elif kind == "output":
        values = [rng.uniform(-1.0, 1.0) for _ in range(_FLOAT_BLOCK)]
    else:
        values = [rng.gauss(0.0, 1.0) for _ in range(_FLOAT_BLOCK)]
    return struct.pack(f"<{_FLOAT_BLOCK}f", *values)


def float32_data(count: int, kind: str = "latents") -> bytes:
    """C{count} little-endian float32 values from the pattern of C{kind}."""
    block = _pattern(kind)
    nbytes = count * 4
    whole, rest = divmod(nbytes, len(block))
    return block * whole + block[:rest]


def _count(shape: Sequence[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def npy_header(shape: Sequence[int]) -> bytes:
    """
    The C{.npy} (format 1.0) header of a C-order float32 array, as C{np.save} writes it.

    Same dict text, the same spare room for growing the first axis, and the
    same padding to a multiple of 64 bytes ending in a newline.
    """
    shape_repr = repr(tuple(shape))
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape_repr + ", }"
    if shape:
        text += " " * (21 - len(repr(shape[0])))
    raw = text.encode("latin1")
    hlen = len(raw) + 1
    padlen = 64 - ((6 + 2 + 2 + hlen) % 64)
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", hlen + padlen) + raw + b" " * padlen + b"\n"


def npy_bytes(shape: Sequence[int], kind: str = "latents", value: float | None = None) -> bytes:
    """
    A float32 C{.npy} file of C{shape}; C{np.load} gives back the same shape.

    @param value: fill every element with this value instead of the pattern
        of C{kind} (used for the 0-d timestep scalars).
    """
    count = _count(shape)
    if value is not None:
        data = struct.pack("<f", value) * count
    else:
        data = float32_data(count, kind)
    return npy_header(shape) + data


@lru_cache(maxsize=64)
def npy_b64(shape: tuple[int, ...], kind: str = "latents") -> Base64:
    """
    Base64 of L{npy_bytes}, as pieces: a 1024², 50-step Qwen-Image
    trajectory is about 70 MB of base64 but costs a few hundred kB here.
    """
    return periodic_b64(npy_header(shape), _pattern(kind), _count(shape) * 4)


@lru_cache(maxsize=4096)
def scalar_npy_b64(value: float) -> bytes:
    """Base64 of the 0-d float32 C{.npy} of one timestep (176 characters)."""
    return base64.b64encode(npy_bytes((), value=value))


def safetensors_header(shape: Sequence[int], name: str = "t") -> bytes:
    """
    The start of a safetensors file holding one float32 tensor called C{name}.

    Layout: an 8-byte little-endian header length, then a JSON header padded
    with spaces to a multiple of 8; the raw little-endian data follows.
    """
    nbytes = _count(shape) * 4
    header = json.dumps(
        {name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def safetensors_bytes(shape: Sequence[int], kind: str = "latents", name: str = "t") -> bytes:
    """A whole safetensors file of one float32 tensor (see L{safetensors_header})."""
    return safetensors_header(shape, name) + float32_data(_count(shape), kind)


@lru_cache(maxsize=64)
def safetensors_b64(shape: tuple[int, ...], kind: str = "latents") -> Base64:
    """Base64 of L{safetensors_bytes}, as pieces."""
    return periodic_b64(safetensors_header(shape), _pattern(kind), _count(shape) * 4)


# ---------------------------------------------------------------------------
# JSON bodies made of pieces


@dataclass(frozen=True)
class Blob:
    """
    A JSON string whose content is already safe ASCII (base64).

    L{json_pieces} emits its bytes (or each piece of a L{Base64}) by
    reference, so a 70 MB trajectory is never copied into a larger string.
    """

    data: bytes | Base64


def json_pieces(value: Any) -> list[bytes]:
    """
    Encode C{value} as JSON, as a list of byte pieces.

    Equivalent to C{json.dumps(value, ensure_ascii=False,
    separators=(",", ":")).encode()} (the compact UTF-8 JSON FastAPI sends)
    where every L{Blob} is a string, but each blob stays its own piece (the
    same object as in the cache) and everything between blobs is joined into
    one piece.
    """
    pieces: list[bytes] = []
    text: list[str] = []

    def flush() -> None:
        if text:
            pieces.append("".join(text).encode("utf-8"))
            text.clear()

    def emit(item: Any) -> None:
        if isinstance(item, Blob):
            text.append('"')
            flush()
            if isinstance(item.data, Base64):
                pieces.extend(item.data.pieces)
            else:
                pieces.append(item.data)
            text.append('"')
        elif isinstance(item, dict):
            text.append("{")
            for i, (key, sub) in enumerate(item.items()):
                if i:
                    text.append(",")
                text.append(json.dumps(str(key), ensure_ascii=False))
                text.append(":")
                emit(sub)
            text.append("}")
        elif isinstance(item, (list, tuple)):
            text.append("[")
            for i, sub in enumerate(item):
                if i:
                    text.append(",")
                emit(sub)
            text.append("]")
        else:
            text.append(json.dumps(item, ensure_ascii=False))

    emit(value)
    flush()
    return pieces


def slices(pieces: Iterable[bytes], size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """
    Re-cut pieces into writes of about C{size} bytes.

    Small pieces are joined (fewer, larger writes), large ones are cut;
    nothing bigger than C{size} is ever built.
    """
    held: list[bytes] = []
    held_len = 0
    for piece in pieces:
        if not piece:
            continue
        if held_len + len(piece) <= size:
            held.append(piece)
            held_len += len(piece)
            continue
        if held:
            yield b"".join(held)
            held, held_len = [], 0
        if len(piece) <= size:
            held, held_len = [piece], len(piece)
            continue
        for start in range(0, len(piece), size):
            part = piece[start : start + size]
            if len(part) == size:
                yield part
            else:
                held, held_len = [part], len(part)
    if held:
        yield b"".join(held)


# ---------------------------------------------------------------------------
# msgpack bodies made of pieces (upstream's /rollout/generate)


@dataclass(frozen=True)
class RawTensor:
    """
    The raw little-endian float32 data of a tensor, for a msgpack C{bin}.

    L{msgpack_pieces} writes its bytes as references to the shared 4 KiB
    pattern block, so a 1 GB trajectory costs a list of references.
    """

    shape: tuple[int, ...]
    kind: str = "latents"

    @property
    def nbytes(self) -> int:
        return _count(self.shape) * 4

    def pieces(self) -> Iterator[bytes]:
        block = _pattern(self.kind)
        whole, rest = divmod(self.nbytes, len(block))
        for _ in range(whole):
            yield block
        if rest:
            yield block[:rest]


def _bin_header(n: int) -> bytes:
    """The msgpack C{bin 8/16/32} header of C{n} bytes of data (spec: "bin format family")."""
    if n < 1 << 8:
        return b"\xc4" + struct.pack(">B", n)
    if n < 1 << 16:
        return b"\xc5" + struct.pack(">H", n)
    return b"\xc6" + struct.pack(">I", n)


def msgpack_pieces(value: Any) -> list[bytes]:
    """
    Encode C{value} as msgpack, as a list of byte pieces.

    Equivalent to C{msgpack.packb(value)} (what upstream's
    C{msgspec.msgpack.encode} sends: maps keep their order, floats are
    float64, bytes are C{bin}) where every L{RawTensor} is a C{bin} of its
    data; the data is never joined. The C{msgpack} library writes every
    header and scalar but the C{bin} header (its C{Packer} has no
    C{pack_bin_header}), so only the walk and that header are ours.
    """
    packer = msgpack.Packer(autoreset=True, use_bin_type=True)
    pieces: list[bytes] = []
    held: list[bytes] = []

    def flush() -> None:
        if held:
            pieces.append(b"".join(held))
            held.clear()

    def emit(item: Any) -> None:
        if isinstance(item, RawTensor):
            held.append(_bin_header(item.nbytes))
            flush()
            pieces.extend(item.pieces())
        elif isinstance(item, dict):
            held.append(packer.pack_map_header(len(item)))
            for key, sub in item.items():
                held.append(packer.pack(str(key)))
                emit(sub)
        elif isinstance(item, (list, tuple)):
            held.append(packer.pack_array_header(len(item)))
            for sub in item:
                emit(sub)
        else:
            held.append(packer.pack(item))

    emit(value)
    flush()
    return pieces


def byte_range(chunks: Iterable[bytes], start: int, stop: int) -> Iterator[bytes]:
    """The bytes C{[start, stop)} of the stream C{chunks}, cut from its chunks (a Range download)."""
    offset = 0
    for chunk in chunks:
        end = offset + len(chunk)
        if end > start and offset < stop:
            yield chunk[max(0, start - offset) : min(len(chunk), stop - offset)]
        offset = end
        if offset >= stop:
            return
