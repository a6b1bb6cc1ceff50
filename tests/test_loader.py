"""The replay contract under every loader layout: same (run_seed, s, i) -> same view and digest."""

import multiprocessing
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.data import sources
from pipeline.replay.loader import ViewLoader
from pipeline.errors import DigestMismatch
from pipeline.replay.view_params import AugmentConfig
from pipeline.data.shards import load_manifest
from pipeline.data.shard_writer import write_shards

N_TRAIN, SHARD = 640, 64
CFG = AugmentConfig(image_size=32)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_shards")
    s = sources.toy(0, N_TRAIN, "train")
    write_shards(iter(s), root / "train", shard_size=SHARD, num_classes=10, class_names=s.class_names,
                 source=s.source, n=s.n)
    return root / "train"


def _collect(loader, seed_index, epoch=0, world=1):
    views = {}
    steps = []
    for rank in range(world):
        loader.rank = rank
        n = 0
        for batch in loader.epoch(seed_index, epoch):
            n += 1
            for k, i in enumerate(batch["index"].tolist()):
                assert i not in views, f"sample {i} seen twice in one epoch"
                views[i] = (batch["image"][k].clone(), int(batch["digest"][k]), batch["target"][k].clone(),
                            int(batch["seed"][k]))
        steps.append(n)
    loader.rank = 0
    return views, steps


@pytest.fixture(scope="module")
def reference(train_dir):
    loader = ViewLoader(train_dir, CFG, run_seed=7, batch_size=64, num_workers=0)
    return {s: _collect(loader, s)[0] for s in (0, 1)}


LAYOUTS = [
    dict(num_workers=1, batch_size=7, shuffle=True, world=1, epoch=0),
    dict(num_workers=2, batch_size=64, shuffle=False, world=2, epoch=0),
    dict(num_workers=3, batch_size=1, shuffle=True, world=1, epoch=5),
    dict(num_workers=2, batch_size=7, shuffle=True, world=2, epoch=5),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_views_identical_under_any_layout(train_dir, reference, layout):
    world, epoch = layout["world"], layout["epoch"]
    loader = ViewLoader(train_dir, CFG, run_seed=7, batch_size=layout["batch_size"],
                        num_workers=layout["num_workers"], shuffle=layout["shuffle"], world_size=world)
    for s in (0, 1):
        views, steps = _collect(loader, s, epoch=epoch, world=world)
        assert sorted(views) == list(range(N_TRAIN)), "every sample exactly once per epoch"
        assert len(set(steps)) == 1, f"ranks took different step counts: {steps}"
        for i, (img, digest, target, seed) in views.items():
            ref = reference[s][i]
            assert seed == s
            assert digest == ref[1], f"digest of sample {i} differs"
            assert torch.equal(img, ref[0]), f"pixels of sample {i} differ"
            assert torch.equal(target, ref[2])


def test_seed_indices_differ_and_targets_sum_to_one(reference):
    d0 = {i: v[1] for i, v in reference[0].items()}
    d1 = {i: v[1] for i, v in reference[1].items()}
    assert sum(d0[i] == d1[i] for i in d0) == 0
    for img, _, target, _ in reference[0].values():
        assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
        assert abs(float(target.sum()) - 1.0) < 1e-5


def test_world_size_split_balances_steps(train_dir):
    # 10 shards over 3 ranks: 4/3/3 shards, yet every rank takes the same number of steps.
    loader = ViewLoader(train_dir, CFG, run_seed=7, batch_size=64, world_size=3)
    counts = [sum(loader.manifest.shards[k].count for k in loader.rank_shards(0, r)) for r in range(3)]
    assert counts == [256, 192, 192]
    views, steps = _collect(loader, 0, world=3)
    assert steps == [4, 4, 4] and len(views) == N_TRAIN


def test_shuffle_changes_order_not_content(train_dir):
    loader = ViewLoader(train_dir, CFG, run_seed=7, batch_size=64, shuffle=True)
    order0 = torch.cat([b["index"] for b in loader.epoch(0, epoch=0)]).tolist()
    order1 = torch.cat([b["index"] for b in loader.epoch(0, epoch=1)]).tolist()
    assert order0 != order1 and sorted(order0) == sorted(order1) == list(range(N_TRAIN))
    labels = Counter()
    first = next(iter(loader.epoch(0, epoch=0)))
    labels.update(first["label"].tolist())
    assert len(labels) >= 5, "a shuffled batch mixes classes"


def test_extras_attached_by_index_and_digest_checked(train_dir, reference):
    manifest = load_manifest(train_dir)
    table = {i: d for i, (_, d, _, _) in reference[0].items()}

    def extras(s, k):
        idx = np.arange(manifest.shards[k].first, manifest.shards[k].first + manifest.shards[k].count)
        return {"digest": np.array([table[i] for i in idx], dtype=np.uint32), "row_id": idx * 10}

    loader = ViewLoader(train_dir, CFG, run_seed=7, batch_size=64, num_workers=2, shuffle=True, extras=extras)
    for batch in loader.epoch(0):
        assert torch.equal(batch["row_id"], batch["index"] * 10)

    def tampered(s, k):
        rows = extras(s, k)
        if k == 3:
            rows["digest"][5] ^= 1
        return rows

    bad = ViewLoader(train_dir, CFG, run_seed=7, batch_size=64, num_workers=2, extras=tampered)
    with pytest.raises(DigestMismatch, match=r"shard-00003\.tar: key 000197: seed 0"):
        for _ in bad.epoch(0):
            pass
    assert not multiprocessing.active_children()  # the error stopped its workers, none left to the GC
    # Another seed index replays other views: every stored digest mismatches.
    with pytest.raises(DigestMismatch):
        for _ in loader.epoch(1):
            pass


def test_eval_loader_is_deterministic_and_unmixed(train_dir):
    loader = ViewLoader(train_dir, CFG, run_seed=7, batch_size=100, train=False)
    a = torch.cat([b["image"] for b in loader.epoch(0)])
    b = torch.cat([b["image"] for b in loader.epoch(3)])
    assert torch.equal(a, b)
    batch = next(iter(loader.epoch(0)))
    assert torch.equal(batch["target"].argmax(1), batch["label"]) and float(batch["target"].max()) == 1.0
