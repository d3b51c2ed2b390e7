"""Payload builders: valid files of any size, .npy and safetensors checked with numpy."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest

from twisted_router.simulator import payloads


def _jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """Walk the marker segments of a JPEG up to the scan."""
    assert data[:2] == b"\xff\xd8"
    pos, out = 2, []
    while True:
        assert data[pos] == 0xFF
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        out.append((marker, data[pos + 4 : pos + 2 + length]))
        pos += 2 + length
        if marker == 0xDA:
            break
    assert data[pos:] == b"\x3f\xff\xd9"
    return out


@pytest.mark.parametrize("size", [0, 159, 163, 1000, 65_537 + 163, 300_000])
def test_jpeg_is_valid_and_exactly_sized(size: int) -> None:
    data = payloads.jpeg_bytes(size)
    assert len(data) == max(size, 159)
    markers = [m for m, _ in _jpeg_segments(data)]
    assert markers[0] == 0xE0  # JFIF
    assert {0xDB, 0xC0, 0xC4, 0xDA} <= set(markers)
    sof = dict(_jpeg_segments(data))[0xC0]
    assert struct.unpack(">BHHB", sof[:6]) == (8, 8, 8, 1)


def test_jpeg_sizes_just_above_minimum_round_up() -> None:
    assert len(payloads.jpeg_bytes(160)) == 163


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append((kind, body))
        pos += 12 + length
    return out


@pytest.mark.parametrize("size", [0, 67, 79, 5000, 2_000_000])
def test_png_is_valid_and_exactly_sized(size: int) -> None:
    data = payloads.png_bytes(size)
    assert len(data) == max(size, 67)
    chunks = _png_chunks(data)
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    assert set(kinds) <= {b"IHDR", b"IDAT", b"IEND", payloads.PNG_PADDING_CHUNK}
    idat = dict(chunks)[b"IDAT"]
    assert zlib.decompress(idat) == b"\x00\x80"
    # Ancillary (lowercase first letter) and private (lowercase second letter).
    assert payloads.PNG_PADDING_CHUNK[0:1].islower() and payloads.PNG_PADDING_CHUNK[1:2].islower()


@pytest.mark.parametrize("size", [0, 100, 4096])
def test_webp_is_a_riff_container_of_the_right_size(size: int) -> None:
    data = payloads.webp_bytes(size)
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP" and data[12:16] == b"VP8X"
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    assert len(data) == max(size, 56)


@pytest.mark.parametrize("size", [0, 40, 1000, 3 * 65536 + 17])
def test_mp4_boxes_and_streamed_length(size: int) -> None:
    mp4 = payloads.mp4_payload(size)
    data = mp4.to_bytes()
    assert len(data) == mp4.length == max(size, 40)
    assert data[4:8] == b"ftyp" and data[8:12] == b"isom"
    (ftyp_len,) = struct.unpack(">I", data[:4])
    (mdat_len,) = struct.unpack(">I", data[ftyp_len : ftyp_len + 4])
    assert data[ftyp_len + 4 : ftyp_len + 8] == b"mdat"
    assert ftyp_len + mdat_len == len(data)


def test_mp4_chunks_are_bounded_and_shared() -> None:
    mp4 = payloads.mp4_payload(10 * payloads.CHUNK_SIZE)
    chunks = list(mp4.chunks())
    assert all(len(c) <= payloads.CHUNK_SIZE for c in chunks)
    assert sum(map(len, chunks)) == mp4.length
    full = [c for c in chunks[1:] if len(c) == payloads.CHUNK_SIZE]
    assert len({id(c) for c in full}) == 1  # one shared zero block, not a copy per chunk


def test_mp4_above_4gib_uses_a_64_bit_box() -> None:
    mp4 = payloads.mp4_payload(5 * 2**30)
    assert mp4.length == 5 * 2**30
    assert mp4.header[32:40] == struct.pack(">I", 1) + b"mdat"
    assert struct.unpack(">Q", mp4.header[40:48])[0] == mp4.length - 32


@pytest.mark.parametrize("shape", [(), (5,), (1, 28), (2, 3, 16, 3, 4, 5), (1, 28, 1024, 64)])
def test_npy_round_trips_through_numpy_byte_for_byte(shape: tuple[int, ...]) -> None:
    data = payloads.npy_bytes(shape)
    array = np.load(io.BytesIO(data))
    assert array.shape == shape
    assert array.dtype == np.float32
    again = io.BytesIO()
    np.save(again, array)
    assert again.getvalue() == data


def test_npy_sizes_match_the_spec() -> None:
    # §7: [1,28,1024,64] is 7,340,160 bytes raw, 9.79 MB base64; a scalar is 132 raw, 176 base64.
    assert len(payloads.npy_bytes((1, 28, 1024, 64))) == 7_340_160
    assert len(payloads.npy_b64((1, 28, 1024, 64))) == 9_786_880
    assert len(payloads.scalar_npy_b64(1000.0)) == 176
    value = np.load(io.BytesIO(base64.b64decode(payloads.scalar_npy_b64(750.0))))
    assert value.shape == () and float(value) == 750.0


def test_log_probs_are_negative_and_finite() -> None:
    array = np.load(io.BytesIO(base64.b64decode(payloads.npy_b64((2, 9), "log_probs").to_bytes())))
    assert np.all(np.isfinite(array)) and np.all(array < 0)


def test_large_payloads_are_cached() -> None:
    assert payloads.npy_b64((1, 3, 64, 64)) is payloads.npy_b64((1, 3, 64, 64))
    assert payloads.image_b64("jpg", 5000) is payloads.image_b64("jpg", 5000)


@pytest.mark.parametrize("head_len", range(7))
@pytest.mark.parametrize("nbytes", [0, 1, 2, 4095, 4096, 12288, 12289, 100_003])
def test_periodic_base64_equals_direct_encoding(head_len: int, nbytes: int) -> None:
    head = bytes(range(head_len))
    block = bytes(range(256)) * 16
    expected = base64.b64encode(head + (block * (nbytes // len(block) + 1))[:nbytes])
    assert payloads.periodic_b64(head, block, nbytes).to_bytes() == expected


def test_big_base64_payloads_share_their_pieces() -> None:
    # §7: a 1024², 50-step Qwen-Image trajectory is about 70 MB of base64.
    big = payloads.npy_b64((1, 50, 4096, 64))
    assert len(big) == 69_905_240
    assert len({id(piece) for piece in big.pieces}) <= 3
    assert big.to_bytes() == base64.b64encode(payloads.npy_bytes((1, 50, 4096, 64)))
    assert payloads.safetensors_b64((3, 64, 64), "output").to_bytes() == base64.b64encode(
        payloads.safetensors_bytes((3, 64, 64), "output")
    )
    assert payloads.mp4_b64(100_000).to_bytes() == base64.b64encode(payloads.mp4_payload(100_000).to_bytes())


def test_safetensors_layout_parses() -> None:
    data = payloads.safetensors_bytes((3, 4, 5), "output")
    (hlen,) = struct.unpack("<Q", data[:8])
    assert hlen % 8 == 0
    header = json.loads(data[8 : 8 + hlen])
    assert header == {"t": {"dtype": "F32", "shape": [3, 4, 5], "data_offsets": [0, 240]}}
    values = np.frombuffer(data[8 + hlen :], dtype="<f4").reshape(3, 4, 5)
    assert np.all(values >= -1.0) and np.all(values <= 1.0)


def test_json_pieces_equal_compact_json_and_keep_blobs_by_reference() -> None:
    blob = payloads.scalar_npy_b64(3.0)
    split = payloads.npy_b64((1, 5000))
    value = {
        "a": [1, 2.5, None, True, "é"], "b": payloads.Blob(blob), "c": {"d": []},
        "e": payloads.Blob(split),
    }
    pieces = payloads.json_pieces(value)
    assert any(p is blob for p in pieces)
    assert any(p is split.pieces[1] for p in pieces)
    decoded = json.loads(b"".join(pieces))
    assert decoded == {
        "a": [1, 2.5, None, True, "é"], "b": blob.decode(), "c": {"d": []},
        "e": split.to_bytes().decode(),
    }
    plain = {"x": 1, "y": ["z"]}
    assert b"".join(payloads.json_pieces(plain)) == json.dumps(plain, separators=(",", ":")).encode()


def test_slices_join_small_pieces_and_cut_big_ones() -> None:
    out = list(payloads.slices([b"ab", b"", b"c", b"x" * 10, b"y"], size=4))
    assert out == [b"abc", b"xxxx", b"xxxx", b"xxy"]
    assert b"".join(out) == b"abc" + b"x" * 10 + b"y"
