"""Published WebDataset shards, read in place (``data=published``): nothing is copied or rewritten.

A split's shards are named by timm's ``<data.root>/_info.json`` (or ``_info.yaml``: splits -> filenames,
shard_lengths), or by ``data.<split>_shards``: URLs or brace patterns, comma-separated, absolute or relative to
``data.root``. Locations: a local folder, ``s3://`` (pipeline.storage), ``http(s)://`` and
``hf://datasets/<owner>/<repo>[@<rev>]/<path>`` (pipeline.web). Each sample is timm's layout: an image
(jpg/png/webp/bmp), a ``.cls`` label and an optional ``.json`` sidecar, under the publisher's own keys.

make_shards reads every shard once and writes our manifest to ``<data.shards>/<split>/manifest.json``: each
shard's location, sample count, byte size, sha256 and ETag. Sample ``i`` of the split is the ``i``-th sample in
shard order, so the global indices, the fingerprint (of the shard hashes, as for our own shards) and with them the
replay contract and the cache identity hold as for shards we wrote. A shard that changes on its server afterwards
is refused by name when read (size or ETag before parsing, sha256 as it streams: pipeline.data.shards).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tarfile

from braceexpand import braceexpand

from pipeline import storage
from pipeline.data.shards import MANIFEST, Manifest, ShardInfo, fingerprint_of
from pipeline.data.shard_writer import staging_dir
from pipeline.data.tar_samples import IMAGE_EXTS, Hashing, parse_sample, size_of, tar_members
from pipeline.data.wds_info import INFO_NAMES, parse_info, split_of
from pipeline.errors import ConfigError, ShardError
from pipeline.logs import progress


def locate(root: str | None, name: str) -> str:
    """``name`` if it is a URL or an absolute path, else ``<root>/<name>``."""
    if "://" in name or os.path.isabs(name):
        return name
    if not root:
        raise ConfigError(f"data.root is not set: {name!r} is relative to it; set data.root=<folder or URL>")
    return f"{str(root).rstrip('/')}/{name}"


def read_info(root: str) -> tuple[dict, str]:
    """The published ``_info.json`` (or ``_info.yaml``) under ``root`` and where it was found."""
    tried = []
    for name in INFO_NAMES:
        where = locate(root, name)
        try:
            text = storage.as_path(where).read_text()
        except FileNotFoundError:
            tried.append(where)
            continue
        except OSError as exc:
            raise ShardError(f"{where}: cannot read: {exc}") from None
        return parse_info(text, where), where
    raise ShardError(f"{' or '.join(tried)}: no such file (timm's split table); name the shards instead: "
                     f"data.train_shards=<URLs or brace pattern> data.val_shards=...")


def split_shards(data: dict, split: str) -> tuple[list[str], list[int] | None, dict]:
    """A split's shard locations in order, their sample counts where ``_info.json`` gives them, and that info."""
    root, pattern = data.get("root"), data.get(f"{split}_shards")
    if pattern:
        urls = [locate(root, u) for part in str(pattern).split(",") if part.strip()
                for u in braceexpand(part.strip())]
        return urls, None, {}
    if not root:
        raise ConfigError(f"data.root is not set: data.source=published reads <root>/_info.json, or set "
                          f"data.{split}_shards=<URLs or brace pattern>")
    info, where = read_info(str(root))
    entry = split_of(info, split, where)
    return [locate(root, f) for f in entry["filenames"]], [int(c) for c in entry["shard_lengths"]], info


def _samples(url: str, f):
    """``(key, {ext: bytes})`` per sample of a tar stream (members of one sample are consecutive)."""
    members = tar_members(url, f)
    for key, group in itertools.groupby(members, key=lambda m: m[0].partition(".")[0]):
        yield key, {name.partition(".")[2].lower(): value for name, value in group}


def index_shard(url: str, first: int, num_classes: int, exts: set, bar) -> ShardInfo:
    """Read one published shard to its end: every sample checked (label, one image field) and counted, the bytes
    hashed; with the size and ETag the server gave."""
    path = storage.as_path(url)
    try:
        f = storage.open_binary(path)
    except FileNotFoundError:
        raise ShardError(f"{url}: shard file missing") from None
    except OSError as exc:
        raise ShardError(f"{url}: cannot read: {exc}") from None
    count = 0
    with f:
        size = size_of(f)
        hashing = Hashing(f, url)
        try:
            for key, fields in _samples(url, hashing):
                parse_sample(url, key, fields, num_classes)  # leaves the image field
                exts.add(IMAGE_EXTS[next(iter(fields))])
                count += 1
                bar.update(1)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise ShardError(f"{url}: corrupt or truncated tar (after {count} samples): "
                             f"{type(exc).__name__}: {exc}") from exc
        sha = hashing.hexdigest_to_end()
    if count == 0:
        raise ShardError(f"{url}: no samples")
    where = str(path.resolve()) if isinstance(path, os.PathLike) else str(path)
    return ShardInfo(path.name, first, count, sha, url=where, size=size, etag=getattr(f, "etag", None))


def _class_names(data: dict, info: dict, num_classes: int) -> list:
    """``data.class_names`` (a timm label set: the labels are its ids), else ``_info.json``'s when it names every
    class, else the ids."""
    label_set = data.get("class_names")
    if label_set:
        import timm.data

        try:
            names = timm.data.ImageNetInfo(str(label_set)).label_names()
        except (AssertionError, KeyError, ValueError):  # timm asserts on an unknown subset
            raise ConfigError(f"data.class_names={label_set!r}: not one of timm's ImageNet label sets (imagenet-1k, "
                              f"imagenet-12k, imagenet-21k, imagenet-22k)") from None
        if len(names) != num_classes:
            raise ConfigError(f"data.class_names={label_set!r} names {len(names)} classes, data.num_classes="
                              f"{num_classes}")
        return list(names)
    names = info.get("class_names")
    return list(names) if names and len(names) == num_classes else list(range(num_classes))


def index_split(data: dict, split: str, out_dir) -> tuple:
    """Index ``split`` of the published set into a staged manifest (a temporary directory beside ``out_dir``,
    as pipeline.data.shard_writer.stage_shards stages shards); returns (that directory, the manifest)."""
    urls, lengths, info = split_shards(data, split)
    num_classes = int(data["num_classes"])
    class_names = [str(c) for c in _class_names(data, info, num_classes)]
    shards, exts, first = [], set(), 0
    with progress(sum(lengths) if lengths else None, unit="img", desc=f"{data['name']}/{split} (index)") as bar:
        for k, url in enumerate(urls):
            entry = index_shard(url, first, num_classes, exts, bar)
            if lengths and entry.count != lengths[k]:
                raise ShardError(f"{url}: holds {entry.count} samples, _info.json says {lengths[k]}")
            shards.append(entry)
            first += entry.count
    source = {"name": data["name"], "kind": "published", "root": data.get("root"), "split": split,
              "shards": data.get(f"{split}_shards") or "_info.json"}
    tmp = staging_dir(out_dir)
    try:
        m = Manifest(split_dir=tmp, split=split, n=first, num_classes=num_classes, class_names=class_names,
                     key_width=max(6, len(str(first - 1))), shard_size=max(s.count for s in shards), image_exts=sorted(exts),
                     source=source, shards=shards,
                     fingerprint=fingerprint_of((s.sha256 for s in shards), first, num_classes, class_names))
        (tmp / MANIFEST).write_text(json.dumps(m.to_json(), indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, m
