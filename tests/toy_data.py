"""Toy shards on disk (pipeline.data.sources.toy: sample i depends only on the seed, the split and i)."""

from __future__ import annotations

from pathlib import Path

from pipeline.data import shard_writer, sources


def write_toy(root: Path, train: int, val: int, shard_size: int, seed: int = 0) -> dict:
    """``train`` and ``val`` toy samples as shards of ``shard_size`` under root/train and root/val; the Manifests."""
    manifests = {}
    for split, n in (("train", train), ("val", val)):
        s = sources.toy(seed, n, split)
        manifests[split] = shard_writer.write_shards(s, Path(root) / split, shard_size=shard_size,
                                                     num_classes=len(s.class_names), class_names=s.class_names,
                                                     source=s.source)
    return manifests
