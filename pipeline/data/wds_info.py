"""timm's ``_info.json``: the split table beside WebDataset shards (timm.data.readers.reader_wds).

timm opens a shard set by name with ``create_dataset("wds/<name>", root=<root>, split=<split>)``: it reads
``<root>/_info.json`` (or ``_info.yaml``) and takes, per split, ``num_samples``, ``filenames`` (relative to the
root) and ``shard_lengths``. make_shards writes one beside our splits; the published source reads one to find a
split's shards and their sizes.
"""

from __future__ import annotations

import json

from pipeline import storage
from pipeline.atomic import atomic_write_text
from pipeline.errors import ShardError

INFO_NAMES = ("_info.json", "_info.yaml")
# timm's own sets and scripts call the held-out split "validation"; ours is "val": both names are written
ALIASES = {"val": ("val", "validation"), "train": ("train",)}


def split_entry(split_name: str, rel_dir: str, manifest) -> dict:
    return {"name": split_name, "num_samples": manifest.n,
            "filenames": [f"{rel_dir}/{s.name}" if rel_dir else s.name for s in manifest.shards],
            "shard_lengths": [s.count for s in manifest.shards]}


def info_of(name: str, manifests: dict) -> dict:
    """The ``_info.json`` of our splits ``{split: Manifest}`` stored as ``<root>/<split>/shard-*.tar``."""
    splits = {}
    for split, m in manifests.items():
        for alias in ALIASES.get(split, (split,)):
            splits[alias] = split_entry(alias, split, m)
    first = next(iter(manifests.values()))
    return {"name": name, "num_classes": first.num_classes, "class_names": list(first.class_names),
            "splits": splits}


def write_info(root, name: str, manifests: dict) -> None:
    """Write ``<root>/_info.json`` (atomically where local; an object where ``root`` is a bucket prefix)."""
    text = json.dumps(info_of(name, manifests), indent=1) + "\n"
    path = root / INFO_NAMES[0]
    if storage.is_url(path):  # one PUT is atomic
        path.write_text(text)
    else:
        atomic_write_text(path, text)


def parse_info(text: str, where: str) -> dict:
    """A published ``_info.json``/``_info.yaml`` (its text): the dict, with ``splits`` checked."""
    try:
        if where.endswith(".yaml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
        splits = d["splits"]
        for name, s in splits.items():
            files, lengths = list(s["filenames"]), [int(c) for c in s["shard_lengths"]]
            if len(files) != len(lengths) or not files:
                raise ValueError(f"split {name}: {len(files)} filenames, {len(lengths)} shard_lengths")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ShardError(f"{where}: not a timm split table (splits -> filenames, shard_lengths): "
                         f"{type(exc).__name__}: {exc}") from None
    return d


def split_of(info: dict, split: str, where: str) -> dict:
    """The entry of our ``split`` (``val`` also finds ``validation``), or a ShardError listing the splits."""
    for alias in ALIASES.get(split, (split,)):
        if alias in info["splits"]:
            return info["splits"][alias]
    raise ShardError(f"{where}: no split {split!r} (has {sorted(info['splits'])})")
