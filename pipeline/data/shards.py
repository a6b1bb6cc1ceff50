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
import shutil
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from pipeline import storage
from pipeline.atomic import umask
from pipeline.data.tar_samples import IMAGE_EXTS, Hashing, check_unchanged, parse_sample, tar_members
from pipeline.data.images import check_decodes
from pipeline.errors import ShardError, WriteError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: class names enter the fingerprint
SHARD_PATTERN = "shard-{:05d}.tar"
_MTIME = 0  # fixed tar member mtime: re-runs are byte-identical


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


# ------------------------------------------------------------------------------------------------ writing
def write_shards(samples: Iterable[tuple], out_dir: str | os.PathLike, *, shard_size: int,
                 num_classes: int, class_names: list[str], source: dict, overwrite: bool = False,
                 n: int | None = None, split: str | None = None) -> Manifest:
    """Write ``samples`` (``(image_bytes, ext, label)`` or ``(image_bytes, ext, label, meta)``, meta a dict stored as
    the sample's ``.json``; global index = position) as shards in ``out_dir``.

    The shards go to a temporary directory beside ``out_dir`` first. If ``out_dir`` already holds shards with
    the same fingerprint they are verified (sha256) and kept ("up to date"); a different shard set is refused
    (ShardError naming the directory and both fingerprints) unless ``overwrite``, which replaces it.
    ``n`` defaults to ``len(samples)`` (needed up front for the key width); ``split`` to ``out_dir``'s name.
    """
    out_dir = storage.as_path(out_dir)
    tmp, new = stage_shards(samples, out_dir, shard_size=shard_size, num_classes=num_classes,
                            class_names=class_names, source=source, n=n, split=split)
    try:
        return install_shards(tmp, out_dir, new, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def stage_shards(samples, out_dir, *, shard_size: int, num_classes: int, class_names: list[str], source: dict,
                 n: int | None = None, split: str | None = None) -> tuple[Path, Manifest]:
    """Write the shards into a new temporary directory beside ``out_dir``; returns it and its manifest. On any
    error it is removed again (nothing staged); a full disk or an unwritable directory is a WriteError."""
    out_dir = storage.as_path(out_dir)
    if n is None:
        if not hasattr(samples, "__len__"):
            samples = list(samples)
        n = len(samples)
    n, shard_size, num_classes = int(n), int(shard_size), int(num_classes)
    if n <= 0 or shard_size <= 0 or num_classes <= 0:
        raise ValueError(f"n={n}, shard_size={shard_size}, num_classes={num_classes} must be positive")
    if len(class_names) != num_classes:
        raise ShardError(f"{out_dir}: {len(class_names)} class names for num_classes={num_classes}")
    width = max(6, len(str(n - 1)))
    tmp = staging_dir(out_dir)
    try:
        return tmp, _write_into(tmp, samples, n, width, shard_size, num_classes, class_names, source,
                                split or out_dir.name)
    except OSError as e:
        raise WriteError(f"{out_dir}: cannot write shards: {e}; nothing installed") from e
    finally:
        if sys.exc_info()[0] is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def staging_dir(out_dir) -> Path:
    """A new temporary directory beside ``out_dir`` (in local /tmp for object storage), made as the user's umask
    would make ``out_dir``: installed by rename, it becomes the split's folder. An OSError is a WriteError."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        local = None if storage.is_url(out_dir) else out_dir.parent
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=local))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700
    except OSError as e:
        raise WriteError(f"{out_dir}: cannot write shards here: {e}") from e
    return tmp


def _write_into(tmp: Path, samples, n, width, shard_size, num_classes, class_names, source, split) -> Manifest:
    shards: list[ShardInfo] = []
    exts: set[str] = set()
    it, done = iter(samples), 0
    for first in range(0, n, shard_size):
        name, count = SHARD_PATTERN.format(first // shard_size), min(shard_size, n - first)
        # `with` closes the tar before its file on an abort too (left to the GC, Python 3.12 prints a traceback)
        with open(tmp / name, "wb") as f, wds.TarWriter(f, encoder=False, mtime=_MTIME) as writer:
            for i, (data, ext, label, *meta) in zip(range(first, first + count), it):
                key = key_of(i, width)
                norm = IMAGE_EXTS.get(str(ext).lower().lstrip("."))
                if norm is None:
                    raise ShardError(f"key {key}: unsupported image extension {ext!r} (jpg/jpeg/png/webp/bmp)")
                if isinstance(label, bool) or not isinstance(label, int) and not hasattr(label, "__index__"):
                    raise ShardError(f"key {key}: label {label!r} is not an integer")
                label = int(label)
                if not 0 <= label < num_classes:
                    raise ShardError(f"key {key}: label {label} out of range [0, {num_classes})")
                if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
                    raise ShardError(f"key {key}: image is not non-empty bytes ({type(data).__name__})")
                exts.add(norm)
                sample = {"__key__": key, norm: bytes(data), "cls": str(label).encode("ascii")}
                if meta and meta[0]:  # e.g. the original file name, as timm's shards keep it
                    sample["json"] = json.dumps(meta[0], sort_keys=True).encode()
                writer.write(sample)
                done = i + 1
        if done != first + count:
            raise ShardError(f"{tmp}: the source yielded {done} samples, announced {n}")
        shards.append(ShardInfo(name, first, count, sha256_file(tmp / name)))
    if next(it, None) is not None:
        raise ShardError(f"{tmp}: the source yields more than the announced {n} samples")
    m = Manifest(
        split_dir=tmp, split=split, n=n, num_classes=num_classes, class_names=list(class_names), key_width=width,
        shard_size=shard_size, image_exts=sorted(exts), source=dict(source), shards=shards,
        fingerprint=fingerprint_of((s.sha256 for s in shards), n, num_classes, class_names),
    )
    (tmp / MANIFEST).write_text(json.dumps(m.to_json(), indent=1) + "\n")
    return m


def install_plan(out_dir: Path, new: Manifest, overwrite: bool) -> Manifest | None:
    """What installing ``new`` at ``out_dir`` would do: the existing manifest when it is the same, verified shard
    set (kept), else None (install); a refusal raises (ShardError naming the directory), with nothing touched."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        try:
            old = load_manifest(out_dir)
        except ShardError as exc:
            old, why = None, str(exc)
        if old is not None and old.fingerprint == new.fingerprint and not new.own_keys:
            # a published set's index: its shards were just hashed; kept unless they now live elsewhere
            return old if [e.url for e in old.shards] == [e.url for e in new.shards] else None
        if old is not None and old.fingerprint == new.fingerprint:
            try:
                verify_shards(old, deep=False)
                return old
            except ShardError as exc:
                why = f"same fingerprint {old.fingerprint} but the existing shards fail verification: {exc}"
        elif old is not None:
            why = f"holds a different shard set (fingerprint {old.fingerprint}; new {new.fingerprint})"
        if not overwrite:
            raise ShardError(f"{out_dir}: {why}; refusing to replace it without overwrite=true")
    return None


def install_shards(tmp: Path, out_dir: Path, new: Manifest, overwrite: bool, *, plan="check") -> Manifest:
    """Install shards staged in ``tmp`` at ``out_dir`` (see :func:`write_shards`); ``plan``: the result of
    :func:`install_plan` when the caller already checked it (make_shards checks every split before installing)."""
    out_dir = storage.as_path(out_dir)
    keep = install_plan(out_dir, new, overwrite) if isinstance(plan, str) else plan
    if keep is not None:
        print(f"{out_dir}: up to date (fingerprint {keep.fingerprint}, {keep.n} samples)")
        return keep
    if storage.is_url(out_dir):  # no rename on object storage: the shards first, the manifest last (its commit)
        storage.upload_tree(tmp, out_dir, last=MANIFEST)
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, trash / "old")
        os.rename(tmp, out_dir)
        shutil.rmtree(trash)
    else:
        if out_dir.is_dir():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    print(f"{out_dir}: wrote {new.num_shards} shards, {new.n} samples (fingerprint {new.fingerprint})")
    return load_manifest(out_dir)
