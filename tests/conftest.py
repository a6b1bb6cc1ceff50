"""Shared fixtures. ``toy_shards``: small toy train/val shards written once per test session."""

from types import SimpleNamespace

import pytest

from pipeline.data import shards, sources

TOY_SEED = 0
TOY_TRAIN, TOY_VAL, TOY_SHARD_SIZE = 512, 128, 64  # 8 train shards, 2 val shards


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory):
    """Namespace: root (dir with train/ and val/), train/val (Manifests), sizes, shard_size, num_classes, seed.

    Read-only: tests that tamper with shards must copy them first.
    """
    root = tmp_path_factory.mktemp("toy_shards")
    manifests = {}
    for split, n in (("train", TOY_TRAIN), ("val", TOY_VAL)):
        s = sources.toy(TOY_SEED, n, split)
        manifests[split] = shards.write_shards(
            s, root / split, shard_size=TOY_SHARD_SIZE, num_classes=len(s.class_names),
            class_names=s.class_names, source=s.source,
        )
    return SimpleNamespace(
        root=root, train=manifests["train"], val=manifests["val"], train_size=TOY_TRAIN, val_size=TOY_VAL,
        shard_size=TOY_SHARD_SIZE, num_classes=len(sources.TOY_CLASSES), class_names=list(sources.TOY_CLASSES),
        seed=TOY_SEED,
    )
