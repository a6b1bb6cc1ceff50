"""Repeated augmentation (`train.repeats`): every sample r times per epoch under r distinct seed
indices, the same views under any loader layout, the seed schedule in slots, cached rows of each view's own seed.

Ranks are emulated in one process (tests/test_loader.py's way). Small on purpose (2 shared cores): 160 toy
samples in 5 shards of 32, r = 3.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir

from pipeline.cache.reader import CacheTargets
from pipeline.cache.store import CacheStore
from pipeline.data import shard_writer, shards, sources
from pipeline.replay.loader import ViewLoader
from pipeline.errors import ConfigError, DigestMismatch, ScheduleError
from pipeline.replay.view_params import AugmentConfig
from pipeline.train.schedule import plan_schedule

REPO = Path(__file__).resolve().parents[1]
N, SHARD, R, SEEDS = 160, 32, 3, (0, 1, 2)
CFG = AugmentConfig(image_size=32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("repeats")
    for split, n in (("train", N), ("val", 32)):
        src = sources.toy(5, n, split)
        shard_writer.write_shards(src, root / "data" / split, shard_size=SHARD, num_classes=10,
                            class_names=src.class_names, source=src.source)
    return root


@pytest.fixture(scope="module")
def reference(data):
    """(seed, sample) -> (image, digest, target), each seed rendered alone (r = 1)."""
    loader = ViewLoader(data / "data" / "train", CFG, run_seed=7, batch_size=64)
    out = {}
    for s in SEEDS:
        for b in loader.epoch(s):
            for j, i in enumerate(b["index"].tolist()):
                out[(s, i)] = (b["image"][j].clone(), int(b["digest"][j]), b["target"][j].clone())
    return out


def _collect(loader, seeds, epoch, world):
    """Every rank's epoch: {(seed, sample): count}, per-rank step counts, the batches' index lists, and views."""
    counts, steps, batches, views = Counter(), [], [], {}
    for rank in range(world):
        loader.rank = rank
        n = 0
        for b in loader.epoch(seeds, epoch):
            n += 1
            batches.append((rank, n - 1, b["index"].tolist()))
            for j, (s, i) in enumerate(zip(b["seed"].tolist(), b["index"].tolist())):
                counts[(s, i)] += 1
                views[(s, i)] = (b["image"][j], int(b["digest"][j]), b["target"][j])
        steps.append(n)
    loader.rank = 0
    return counts, steps, batches, views


LAYOUTS = [
    dict(num_workers=0, batch_size=64, shuffle=True, world=1, epoch=0),
    dict(num_workers=2, batch_size=7, shuffle=True, world=2, epoch=5),
    dict(num_workers=1, batch_size=32, shuffle=False, world=3, epoch=1),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_every_sample_r_times_under_distinct_seeds_any_layout(data, reference, layout):
    world = layout["world"]
    loader = ViewLoader(data / "data" / "train", CFG, run_seed=7, batch_size=layout["batch_size"],
                        num_workers=layout["num_workers"], shuffle=layout["shuffle"], world_size=world, repeats=R)
    counts, steps, _, views = _collect(loader, SEEDS, layout["epoch"], world)
    assert set(counts.values()) == {1} and len(counts) == R * N, "each (seed, sample) exactly once"
    per_sample = Counter(i for _, i in counts)
    assert set(per_sample.values()) == {R}, "every sample exactly r times"
    most = max(sum(loader.manifest.shards[k].count for k in loader.rank_shards(layout["epoch"], r))
               for r in range(world))
    assert steps == [math.ceil(R * most / layout["batch_size"])] * world, "the same step count on every rank"
    for key, (image, digest, target) in views.items():
        ref = reference[key]
        assert digest == ref[1] and torch.equal(image, ref[0]) and torch.equal(target, ref[2]), key


def test_copies_of_a_sample_land_in_different_steps(data):
    """With shuffling, a batch holds two copies of a sample only at the very end of a rank's epoch."""
    for batch_size, world in ((32, 1), (16, 2)):
        loader = ViewLoader(data / "data" / "train", CFG, run_seed=7, batch_size=batch_size, shuffle=True,
                            world_size=world, repeats=R)
        _, steps, batches, _ = _collect(loader, SEEDS, 2, world)
        for rank, step, index in batches:
            if len(index) != len(set(index)):
                assert step >= steps[rank] - 2, (rank, step, steps[rank])


def test_repeats_one_is_the_plain_loader(data):
    plain = ViewLoader(data / "data" / "train", CFG, run_seed=7, batch_size=48, shuffle=True, world_size=2, rank=1)
    one = ViewLoader(data / "data" / "train", CFG, run_seed=7, batch_size=48, shuffle=True, world_size=2, rank=1,
                     repeats=1)
    assert one.steps_per_epoch(3) == plain.steps_per_epoch(3)
    for a, b in zip(plain.epoch(1, 3), one.epoch([1], 3), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_needs_r_distinct_seed_indices(data):
    loader = ViewLoader(data / "data" / "train", CFG, run_seed=7, batch_size=32, repeats=R)
    for bad in ((0, 1), (0, 1, 1), 0):
        with pytest.raises(ConfigError, match="train.repeats=3"):
            loader.epoch(bad)


def test_extras_rows_of_each_views_own_seed(data, reference):
    """The extras hook is called once per (seed, shard); each view gets its own seed's row; digests checked."""
    manifest = shards.load_manifest(data / "data" / "train")
    calls = []

    def extras(s, k):
        calls.append((s, k))
        first, count = manifest.shards[k].first, manifest.shards[k].count
        idx = np.arange(first, first + count)
        return {"digest": np.array([reference[(s, i)][1] for i in idx], dtype=np.uint32), "row": idx * 10 + s}

    loader = ViewLoader(data / "data" / "train", CFG, run_seed=7, batch_size=40, shuffle=True, repeats=R,
                        extras=extras)
    n = 0
    for b in loader.epoch(SEEDS, 4):
        assert torch.equal(b["row"], b["index"] * 10 + b["seed"])
        n += len(b["index"])
    assert n == R * N and sorted(calls) == sorted((s, k) for s in SEEDS for k in range(N // SHARD))

    def tampered(s, k):
        rows = extras(s, k)
        if (s, k) == (1, 2):
            rows["digest"][3] ^= 1
        return rows

    bad = ViewLoader(data / "data" / "train", CFG, run_seed=7, batch_size=40, repeats=R, extras=tampered)
    with pytest.raises(DigestMismatch, match=r"shard-00002\.tar: key 000067: seed 1"):
        for _ in bad.epoch(SEEDS):
            pass


# ------------------------------------------------------------------------------------------- schedule


def test_schedule_in_slots_refusals_named():
    assert plan_schedule(2, 6, repeats=3) == [[0, 1, 2], [3, 4, 5]]
    assert plan_schedule(3, 4, repeats=3, cycle=True) == [[0, 1, 2], [3, 0, 1], [2, 3, 0]]
    assert plan_schedule(2, 4, [3, 1], repeats=2) == [[3, 1], [3, 1]]  # an explicit list, read 2 slots an epoch
    assert plan_schedule(3, 4) == [0, 1, 2] and plan_schedule(3, 4, repeats=1) == [0, 1, 2]  # r = 1: as before
    with pytest.raises(ScheduleError, match=r"3 epochs x train.repeats=3 need 9 seed indices.*S=6 "
                                            r"\(cache.num_seeds\).*cache.cycle=true"):
        plan_schedule(3, 6, repeats=3)
    for cycle in (False, True):  # r views of one epoch need r distinct seeds: never cycled into duplicates
        with pytest.raises(ScheduleError, match=r"train.repeats=3 needs 3 distinct seed indices.*S=2 "
                                                r"\(cache.num_seeds\)"):
            plan_schedule(1, 2, repeats=3, cycle=cycle)
    with pytest.raises(ScheduleError, match=r"train.repeats=2: epoch 0 would read seed indices \[0, 0\]"):
        plan_schedule(1, 4, [0, 4], cycle=True, repeats=2)
    with pytest.raises(ScheduleError, match=r"\[5\].*S=4"):
        plan_schedule(1, 4, [0, 5], repeats=2)
    with pytest.raises(ScheduleError, match="train.repeats=0"):
        plan_schedule(1, 4, repeats=0)


# ------------------------------------------------------------------------------------------- stage two


def make_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "pipeline" / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_student_epoch_with_repeats_reads_cached_rows_of_each_seed(data, monkeypatch):
    """Stage two end to end: a 3-seed cache, train.repeats=3: one epoch of r*N views in ceil(r*N/B) steps, each
    sample r times, the teacher's argmax of each view's own seed; r = 4 > S is refused naming both keys."""
    from pipeline.cache.builder import build_cache
    from pipeline.train.student_run import train_student

    torch.manual_seed(0)
    teacher = data / "teacher.pt"
    torch.save(timm.create_model("regnety_002", num_classes=10).state_dict(), teacher)
    store_path = data / "cache.zarr"

    def overrides(*extra):
        return ["teacher=regnety_002", f"workdir={data}", f"data.shards={data / 'data'}",
                f"teacher.checkpoint={teacher}", "teacher.input_size=32", f"cache.path={store_path}",
                "cache.num_seeds=3", "cache.topk=5", "cache.batch_size=64", "cache.num_workers=0", "num_threads=1",
                "train.epochs=1", "train.batch_size=32", "train.warmup_epochs=0", "train.num_workers=0",
                "train.val=false", "train.dvclive=false", "++student.kwargs.depth=1", "student.patch_size=8",
                f"train.out_dir={data / 'run'}", *extra]

    build_cache(make_cfg(overrides()))
    store = CacheStore.open(store_path)
    argmax = {(s, i): int(store.read_unit(s, i // SHARD)["argmax"][i % SHARD]) for s in SEEDS for i in range(N)}
    reads = Counter()
    real_call = CacheTargets.__call__

    def counted(self, seed_index, shard):
        reads[(seed_index, shard)] += 1
        return real_call(self, seed_index, shard)

    monkeypatch.setattr(CacheTargets, "__call__", counted)
    steps = []
    metrics = train_student(make_cfg(overrides("train.repeats=3")),
                            step_callback=lambda info: steps.append((info["index"].tolist(),
                                                                     info["teacher"].argmax.tolist())))
    assert metrics["seed_schedule"] == [[0, 1, 2]] and metrics["history"][0]["steps"] == math.ceil(R * N / 32)
    assert len(steps) == math.ceil(R * N / 32) and set(Counter(i for idx, _ in steps for i in idx).values()) == {R}
    # each row's target is one of its sample's cached argmaxes; over the epoch, exactly the r of them
    got = Counter((i, a) for idx, am in steps for i, a in zip(idx, am))
    want = Counter((i, argmax[(s, i)]) for s in SEEDS for i in range(N))
    assert got == want
    assert sorted(reads) == sorted((s, k) for s in SEEDS for k in range(N // SHARD)) and set(reads.values()) == {1}
    with pytest.raises(ScheduleError, match=r"train.repeats=4 needs 4 distinct seed indices.*S=3 \(cache.num_seeds\)"):
        train_student(make_cfg(overrides("train.repeats=4", f"train.out_dir={data / 'run4'}")))
