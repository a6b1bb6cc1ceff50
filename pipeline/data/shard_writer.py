"""Writing a split as WebDataset shards with its manifest (pipeline.data.shards), staged beside the destination and
installed only once every shard is written and checked: an existing different set is refused unless overwritten."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import webdataset as wds

from pipeline import storage
from pipeline.atomic import umask
from pipeline.data.shards import (MANIFEST, SHARD_PATTERN, Manifest, ShardInfo, fingerprint_of, key_of,
                                  load_manifest, sha256_file, verify_shards)
from pipeline.data.tar_samples import IMAGE_EXTS
from pipeline.errors import ShardError, WriteError

MTIME = 0  # fixed tar member mtime: re-runs are byte-identical

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
        with open(tmp / name, "wb") as f, wds.TarWriter(f, encoder=False, mtime=MTIME) as writer:
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
