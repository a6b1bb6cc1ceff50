"""One shard tar as samples: its bytes hashed as they stream by, its members grouped by key and checked (a label,
one image, at most a ``.json`` sidecar), and a published shard's size and ETag against its manifest entry."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import webdataset as wds
from webdataset import tariterators as wds_tar

from pipeline.errors import ShardError

IMAGE_EXTS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp"}


class Hashing:
    """A binary stream that hashes every byte read through it (the shard's sha256, at no extra read)."""

    def __init__(self, f, path, enabled: bool = True):
        self.f, self.path, self.h = f, path, hashlib.sha256() if enabled else None

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        if self.h is not None:
            self.h.update(b)
        return b

    def hexdigest_to_end(self) -> str | None:
        if self.h is None:
            return None
        for chunk in iter(lambda: self.f.read(1 << 20), b""):  # the tar's end padding
            self.h.update(chunk)
        return self.h.hexdigest()

    def __repr__(self):
        return str(self.path)


def tar_members(path: Path, fileobj) -> Iterator[tuple[str, bytes]]:
    # webdataset's streaming tar expansion; errors are re-raised and named by iter_shard.
    for member in wds_tar.tar_file_iterator(fileobj, handler=wds.reraise_exception):
        yield member["fname"], member["data"]


def parse_sample(path, key: str, fields: dict, num_classes: int) -> tuple[bytes, int]:
    """``(image_bytes, label)`` of one sample's tar members ``{ext: bytes}``: a ``cls`` integer label in
    ``[0, num_classes)``, exactly one image field, at most a ``json`` sidecar; else a ShardError naming the key."""
    raw = fields.pop("cls", None)
    if raw is None:
        raise ShardError(f"{path}: key {key}: missing cls (label) field")
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ShardError(f"{path}: key {key}: label {raw[:20]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise ShardError(f"{path}: key {key}: label {label} out of range [0, {num_classes})")
    fields.pop("json", None)  # metadata sidecar (original file name): not part of the sample
    if len(fields) != 1 or next(iter(fields)) not in IMAGE_EXTS:
        raise ShardError(f"{path}: key {key}: expected one image field ({'/'.join(sorted(set(IMAGE_EXTS.values())))}), "
                         f"found {sorted(fields)}")
    return next(iter(fields.values())), label


def size_of(f) -> int:
    """Bytes of an open shard: a fetched one (in memory) or a local file."""
    return len(f.getbuffer()) if hasattr(f, "getbuffer") else os.fstat(f.fileno()).st_size


def check_unchanged(path, entry, f) -> None:
    """A published shard's size and ETag against the manifest's, before a byte is parsed (the sha256 is checked
    as it streams): a shard replaced on its server is refused by name, not half-read."""
    if entry.size is None and entry.etag is None:
        return
    size, etag = size_of(f), getattr(f, "etag", None)
    why = (f"size {size} bytes, the manifest's {entry.size}" if entry.size is not None and size != entry.size else
           f"ETag {etag}, the manifest's {entry.etag}" if entry.etag and etag and etag != entry.etag else None)
    if why:
        f.close()
        raise ShardError(f"{path}: {why}: the shard changed since its manifest was made; index it again "
                         f"(python -m pipeline.make_shards, overwrite=true) and rebuild what was computed from it")
