"""WebDataset shards with a manifest: global sample indices, shard hashes and a dataset fingerprint.

Layout of one split (docs/design.md, section 1)::

    <shards>/<split>/shard-00000.tar      samples [0, n), keys "000000".."000255"
    <shards>/<split>/shard-00001.tar      samples [n, 2n) ...
    <shards>/<split>/manifest.json

Each sample is two tar members: ``<key>.<ext>`` (the encoded image, e.g. png/jpg) and ``<key>.cls`` (the label
as an ASCII integer), plus ``<key>.json`` (``{"filename": "<class>/<file>"}``) where the source has file names
(timm's layout: the reader passes the sidecar by). ``key`` is the global index zero-padded to ``key_width``
digits (no dots: WebDataset cuts keys at the first dot). Tars are written with a fixed mtime/owner, so the same
input gives byte-identical shards and the same fingerprint. A published set (pipeline.data.published) has only
the manifest here: each shard entry names where the shard is read in place (``url``), with its size and ETag.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline import storage
from pipeline.data.tar_samples import Hashing, check_unchanged, parse_sample, tar_members
from pipeline.data.images import check_decodes
from pipeline.errors import ShardError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: class names enter the fingerprint
SHARD_PATTERN = "shard-{:05d}.tar"


def key_of(index: int, width: int) -> str:
    return f"{index:0{width}d}"


# ---------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class ShardInfo:
    name: str
    first: int
    count: int
    sha256: str
    # published shards, read in place (pipeline.data.published): where, and what the server said when indexed
    url: str = ""
    size: int | None = None
    etag: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in ("", None)}


@dataclass
class Manifest:
    split_dir: Path  # where the manifest and shards live (not stored in the JSON)
    split: str
    n: int
    num_classes: int
    class_names: list[str]
    key_width: int
    shard_size: int
    image_exts: list[str]
    source: dict
    shards: list[ShardInfo]
    fingerprint: str
    version: int = MANIFEST_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def own_keys(self) -> bool:
        """Keys are our zero-padded global indices (False: a published set's own keys, kept as they are)."""
        return self.source.get("kind") != "published"

    def shard_path(self, k: int) -> Path:
        url = self.shards[k].url
        return storage.as_path(url) if url else self.split_dir / self.shards[k].name

    def shard_of(self, index: int) -> int:
        """The shard holding global sample ``index``."""
        if not 0 <= index < self.n:
            raise IndexError(f"sample index {index} out of range [0, {self.n}) in {self.split_dir}")
        return int(self.shards_of(np.asarray([index]))[0])

    def shards_of(self, index: np.ndarray) -> np.ndarray:
        """The shard of each global sample index (in range): shards may differ in size (a published set)."""
        return np.searchsorted(self._firsts, np.asarray(index), side="right") - 1

    @cached_property
    def _firsts(self) -> np.ndarray:
        return np.fromiter((s.first for s in self.shards), np.int64, len(self.shards))

    def key(self, index: int) -> str:
        return key_of(index, self.key_width)

    def indices(self, k: int) -> range:
        s = self.shards[k]
        return range(s.first, s.first + s.count)

    def iter_shard(self, k: int) -> Iterator[tuple[int, str, bytes, int]]:
        return iter_shard(self.shard_path(k), self.shards[k], self)

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "split": self.split,
            "N": self.n,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "key_width": self.key_width,
            "shard_size": self.shard_size,
            "image_exts": list(self.image_exts),
            "source": self.source,
            "fingerprint": self.fingerprint,
            "shards": [s.to_json() for s in self.shards],
            **self.extra,
        }


def fingerprint_of(shard_hashes: Iterable[str], n: int, num_classes: int, class_names: Iterable[str]) -> str:
    """The data set's identity (what a cache records): its shards, N and its classes by id and name, so names
    edited or swapped in a manifest are refused rather than reaching a trained model's labels."""
    names = json.dumps([str(c) for c in class_names], ensure_ascii=True)
    h = hashlib.sha256(f"pipeline-shards-v{MANIFEST_VERSION}\nN={n}\nnum_classes={num_classes}\n"
                       f"class_names={names}\n".encode())
    for s in shard_hashes:
        h.update(s.encode("ascii") + b"\n")
    return h.hexdigest()[:16]


def load_manifest(split_dir: str | os.PathLike) -> Manifest:
    """Read and check ``<split_dir>/manifest.json``; any problem is a ShardError naming the file."""
    split_dir = storage.as_path(split_dir)  # a local Path, or an s3://... ObjectPath
    path = split_dir / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: missing manifest (write the shards with: python -m pipeline.make_shards)")
    try:
        d = json.loads(path.read_text())
        if d.get("version") == 1:
            raise ShardError(f"{path}: manifest version 1, written before class names entered the fingerprint: "
                             f"write the shards again with python -m pipeline.make_shards overwrite=true (the "
                             f"shards come out byte-identical; the fingerprint, and so any cache of them, is new)")
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"version {d.get('version')!r}, expected {MANIFEST_VERSION}")
        known = {"version", "split", "N", "num_classes", "class_names", "key_width", "shard_size", "image_exts",
                 "source", "fingerprint", "shards"}
        m = Manifest(
            split_dir=split_dir,
            split=str(d["split"]),
            n=int(d["N"]),
            num_classes=int(d["num_classes"]),
            class_names=[str(c) for c in d["class_names"]],
            key_width=int(d["key_width"]),
            shard_size=int(d["shard_size"]),
            image_exts=[str(e) for e in d["image_exts"]],
            source=dict(d["source"]),
            shards=[ShardInfo(str(s["name"]), int(s["first"]), int(s["count"]), str(s["sha256"]), str(s.get("url", "")),
                              None if s.get("size") is None else int(s["size"]), s.get("etag"))
                    for s in d["shards"]],
            fingerprint=str(d["fingerprint"]),
            extra={k: v for k, v in d.items() if k not in known},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise ShardError(f"{path}: invalid manifest: {type(exc).__name__}: {exc}") from exc
    problem = _check_manifest(m)
    if problem:
        raise ShardError(f"{path}: invalid manifest: {problem}")
    return m


def _check_manifest(m: Manifest) -> str | None:
    if m.n <= 0 or m.shard_size <= 0 or m.num_classes <= 0:
        return f"N={m.n}, shard_size={m.shard_size}, num_classes={m.num_classes} must be positive"
    if len(m.class_names) != m.num_classes:
        return f"{len(m.class_names)} class names for num_classes={m.num_classes}"
    if m.key_width < len(str(m.n - 1)):
        return f"key_width {m.key_width} too small for N={m.n}"
    problem = _check_cover(m)
    if problem:
        return problem
    for s in m.shards:
        if "/" in s.name or "\\" in s.name or s.name.startswith("."):
            return f"bad shard name {s.name!r}"
    if fingerprint_of((s.sha256 for s in m.shards), m.n, m.num_classes, m.class_names) != m.fingerprint:
        return (f"fingerprint does not match the shard hashes and class_names {m.class_names} (a class name or a "
                f"shard hash was edited)")
    return None


def _check_cover(m: Manifest) -> str | None:
    """The shards cover samples 0..N-1 in order. Ours hold shard_size each (the last the rest); a published set's
    may differ in size, each in [1, shard_size] (the cache gives every shard shard_size rows: cache.layout)."""
    if m.own_keys:
        expect = -(-m.n // m.shard_size)
        if len(m.shards) != expect:
            return f"{len(m.shards)} shards listed, expected {expect} for N={m.n}, shard_size={m.shard_size}"
    first = 0
    for k, s in enumerate(m.shards):
        count = min(m.shard_size, m.n - first) if m.own_keys else s.count
        if s.first != first or s.count != count or not 1 <= count <= m.shard_size:
            return f"shard {k} ({s.name}) covers first={s.first} count={s.count}, expected first={first} and " + \
                (f"count={count}" if m.own_keys else f"a count in [1, shard_size={m.shard_size}]")
        first += s.count
    if first != m.n:
        return f"the shards hold {first} samples, N={m.n}"
    return None


# ------------------------------------------------------------------------------------------------ reading
def iter_shard(path: str | os.PathLike, entry: ShardInfo, manifest: Manifest, *, fileobj=None,
               check_hash: bool = True) -> Iterator[tuple[int, str, bytes, int]]:
    """Yield ``(index, key, image_bytes, label)`` for one shard, in order, with cheap checks only:
    keys are exactly ``entry.first .. entry.first+count-1`` in order, each sample has a ``cls`` field with an
    integer label in ``[0, num_classes)``, exactly one image field and at most a ``json`` sidecar (a published
    set's own keys are taken as they are: pipeline.data.published); the tar reads to its end. With
    ``check_hash`` (every stage) the bytes are hashed as they stream by and the sha256 must equal the manifest's
    ``entry.sha256``, checked *before the last sample is yielded*: no consumer ever holds every sample of a shard
    that differs from its manifest. No decode (see :func:`verify_shards`). Errors: ``ShardError("<path>: key
    <key>: ...")``.

    ``fileobj`` (optional): an open binary stream of the shard (e.g. from fsspec); ``path`` then only names it.
    """
    j = 0
    last = None

    def finish(key: str, fields: dict) -> tuple[int, str, bytes, int]:
        nonlocal j
        if j >= entry.count:
            raise ShardError(f"{path}: key {key}: more samples than the manifest's count {entry.count}")
        index = entry.first + j
        expected = key_of(index, manifest.key_width)
        if key != expected and manifest.own_keys:
            raise ShardError(f"{path}: key {key}: expected key {expected} (sample {j} of the shard)")
        data, label = parse_sample(path, key, fields, manifest.num_classes)
        j += 1
        return index, key, data, label

    own = fileobj is None
    try:
        ahead = [manifest.split_dir / s.name for s in manifest.shards]  # object storage: whole objects, read
        f = storage.open_binary(path, ahead) if own else fileobj  # ahead along this process's stride
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file missing") from None
    except OSError as exc:
        if entry.url:  # a published shard's server: named, stage exits 2 (a local read error stays a traceback)
            raise ShardError(f"{path}: cannot read: {exc}") from None
        raise
    if own:
        check_unchanged(path, entry, f)
    try:
        key, fields = None, {}
        f = Hashing(f, path, check_hash)
        try:
            for name, data in tar_members(path, f):
                k, dot, ext = name.partition(".")
                if not dot:
                    raise ShardError(f"{path}: key {k}: tar member {name!r} has no extension")
                if k != key:
                    if key is not None:
                        last = key
                        yield finish(key, fields)
                    key, fields = k, {}
                ext = ext.lower()
                if ext in fields:
                    raise ShardError(f"{path}: key {k}: duplicate field {ext!r}")
                fields[ext] = data
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            where = f"after key {last}" if last is not None else "at the start"
            raise ShardError(f"{path}: corrupt or truncated tar ({where}): {type(exc).__name__}: {exc}") from exc
        last_sample = finish(key, fields) if key is not None else None
        if j != entry.count:
            raise ShardError(f"{path}: holds {j} samples, the manifest says {entry.count} "
                             f"(truncated or corrupt tar; last key {key})")
        got = f.hexdigest_to_end()
        if check_hash and got != entry.sha256:
            raise ShardError(f"{path}: sha256 {got} does not match the manifest's {entry.sha256}: the shard changed "
                             f"after its manifest was written; nothing computed from it is kept")
        yield last_sample
    finally:
        if own:
            f.f.close()


def sha256_file(path: Path) -> str:
    return storage.sha256(path)  # a local file, or an object (pipeline.storage)


def verify_shards(manifest: Manifest, deep: bool = True) -> None:
    """Check every shard's sha256 against the manifest; with ``deep``, also read every sample (keys in order,
    labels in range, one image field) and decode every image, in the same pass. Raises ShardError naming the file
    (and key)."""
    for k, entry in enumerate(manifest.shards):
        path = manifest.shard_path(k)
        if not path.is_file():
            raise ShardError(f"{path}: shard file missing")
        if deep:
            for _, key, data, _ in iter_shard(path, entry, manifest):  # sha256 checked as the shard streams
                check_decodes(data, f"{path}: key {key}", full=True)
            continue
        got = sha256_file(path)
        if got != entry.sha256:
            raise ShardError(f"{path}: sha256 {got} does not match the manifest's {entry.sha256}")
