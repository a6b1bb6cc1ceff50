"""Test helpers: damage, remove or copy ONE unit's chunk inside the file that packs it with other seed indices'
chunks (pipeline.cache.layout, format 4: Zarr v3's sharding codec, index at the end of the file: an (offset,
nbytes) little-endian uint64 pair per chunk, empty = 2**64-1, then the index's crc32c). Works on a local path and on
an object (pipeline.storage.ObjectPath: read_bytes / write_bytes)."""

from __future__ import annotations

import google_crc32c
import numpy as np
import zarr

from pipeline.cache.layout import seeds_per_file

EMPTY = 2**64 - 1


def _chunks(raw: bytes, n: int) -> list[bytes | None]:
    index = np.frombuffer(raw[len(raw) - 16 * n - 4:len(raw) - 4], "<u8").reshape(n, 2)
    assert google_crc32c.value(index.tobytes()) == int.from_bytes(raw[-4:], "little"), "not a sharded file"
    return [None if off == EMPTY else raw[int(off):int(off) + int(size)] for off, size in index]


def _pack(chunks: list[bytes | None]) -> bytes:
    body, index = b"", []
    for c in chunks:
        index.append((EMPTY, EMPTY) if c is None else (len(body), len(c)))
        body += c or b""
    idx = np.array(index, "<u8").tobytes()
    return body + idx + google_crc32c.value(idx).to_bytes(4, "little")


def chunk(store, name: str, s: int, k: int) -> bytes | None:
    """The encoded chunk of unit (s, k) of per-view array ``name`` (None: not in its file)."""
    n = seeds_per_file(store.num_seeds)
    return _chunks(store.unit_file(name, s, k).read_bytes(), n)[s % n]


def put_chunk(store, name: str, s: int, k: int, data: bytes | None) -> None:
    """Replace (``None``: remove) the encoded chunk of unit (s, k) in its file; the other units' stay as they are."""
    path, n = store.unit_file(name, s, k), seeds_per_file(store.num_seeds)
    chunks = _chunks(path.read_bytes(), n)
    chunks[s % n] = data
    path.write_bytes(_pack(chunks))


def flip_chunk_byte(store, name: str, s: int, k: int) -> None:
    """Flip the middle byte of unit (s, k)'s encoded chunk (its crc32c codec then fails)."""
    b = bytearray(chunk(store, name, s, k))
    b[len(b) // 2] ^= 0xFF
    put_chunk(store, name, s, k, bytes(b))


def copy_unit(a, src: tuple[int, int], b, dst: tuple[int, int]) -> None:
    """Copy one unit by hand from store ``a`` to unit ``dst`` of store ``b``: its chunk of every per-view array
    (bytes as stored), its checksum record and its commit marker."""
    for name in a.fields:
        put_chunk(b, name, *dst, chunk(a, name, *src))
    for name in ("checksums", "done"):
        zarr.open_array(str(b.path / name), mode="r+")[dst] = zarr.open_array(str(a.path / name), mode="r")[src]


def unset(store, name: str, s: int, k: int) -> None:
    """Unit (s, k)'s element of ``done`` or record of ``checksums`` back to the fill value (never written)."""
    arr = zarr.open_array(str(store.path / name), mode="r+")
    arr[s, k] = arr.fill_value
