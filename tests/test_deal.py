"""DeiT's repeated augmentation under replay (train.repeat_mode=ranks, pipeline/replay/deal.py): the deal as pure
functions, the loader that renders it, the seed schedule in blocks, and real torchrun ranks (world 2 and 3) that
log (step, sample, seed index) of every view they trained on.

Small on purpose (2 shared cores): 96 toy samples in 6 shards of 16, r = 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import shard_writer, shards, sources
from pipeline.replay import deal
from pipeline.replay.loader import ViewLoader
from pipeline.errors import ConfigError, DigestMismatch, ScheduleError
from pipeline.replay.view_params import AugmentConfig
from pipeline.train.schedule import plan_schedule

REPO = Path(__file__).resolve().parents[1]
N, SHARD, R = 96, 16, 3
CFG = AugmentConfig(image_size=32)
SHARDS = [(first, min(SHARD, N - first)) for first in range(0, N, SHARD)]


def deal_of(epoch, world, batch, rank, shards_=SHARDS, seeds=None):
    return deal.epoch_deal(shards_, mix_block=8, window=2, run_seed=7, epoch=epoch, world=world, batch_size=batch,
                           rank=rank, seeds=seeds or deal.block_seeds(epoch, R))


# ----------------------------------------------------------------------------------------------- pure functions


def test_each_block_of_r_epochs_draws_every_image_once():
    for block in (0, 1, 5):
        parts = [deal.epoch_images(SHARDS, 8, 2, 7, R * block + j, R) for j in range(R)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(N))
        assert sorted(map(len, parts)) == [32, 32, 32]
    uneven = [(0, 16), (16, 16), (32, 3)]  # 35 samples: parts of 12, 12, 11
    assert [len(deal.epoch_images(uneven, 8, 2, 7, j, R)) for j in range(R)] == [12, 12, 11]
    assert not np.array_equal(deal.block_order(SHARDS, 8, 2, 7, 0), deal.block_order(SHARDS, 8, 2, 7, 1))
    assert np.array_equal(deal.block_order(SHARDS, 8, 2, 7, 1), deal.block_order(SHARDS, 8, 2, 7, 1))


def test_block_order_streams_shards_and_windows():
    """Each shard's samples are contiguous in the order (a rank reads a shard front to back, once), and so are
    each window of `window` mixup blocks."""
    order = deal.block_order(SHARDS, 8, 1, 7, 3).tolist()
    assert all(len({i // SHARD for i in order[k:k + SHARD]}) == 1 for k in range(0, N, SHARD))
    assert all(len({i // 8 for i in order[k:k + 8]}) == 1 for k in range(0, N, 8))  # windows of 1 x 8
    assert order[:8] != sorted(order[:8])  # shuffled inside a window


@pytest.mark.parametrize("world, batch", [(1, 16), (1, 7), (2, 8), (2, 64), (3, 8), (4, 5), (8, 4)])
def test_copies_share_a_global_step_on_distinct_ranks_under_their_seeds(world, batch):
    """Every image of the epoch: its r copies in one global step, copy c under seed r*t + c; on r distinct ranks
    when world >= r (else spread over all ranks); local batches differ by at most one; world = 1 keeps the copies
    side by side."""
    for epoch in (0, 4):
        t = epoch // R
        per_rank = [deal_of(epoch, world, batch, r) for r in range(world)]
        steps = len(per_rank[0])
        assert all(len(p) == steps for p in per_rank)
        assert steps == deal.epoch_steps(N, epoch=epoch, repeats=R, world=world, batch_size=batch)
        where = defaultdict(list)  # image -> [(step, rank, seed)]
        for rank, rank_steps in enumerate(per_rank):
            for step, views in enumerate(rank_steps):
                for i, s in views:
                    where[i].append((step, rank, s))
        assert sorted(where) == sorted(deal.epoch_images(SHARDS, 8, 2, 7, epoch, R).tolist())
        for i, copies in where.items():
            assert sorted(s for _, _, s in copies) == [R * t + c for c in range(R)], (i, copies)
            assert len({step for step, _, _ in copies}) == 1, (i, copies)
            assert len({rank for _, rank, _ in copies}) == min(R, world), (i, copies)
        for step in range(steps):
            sizes = [len(p[step]) for p in per_rank]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1 and max(sizes) <= batch + 1, sizes
        if world == 1:
            flat = [i for views in per_rank[0] for i, _ in views]
            assert flat == [i for i in flat[::R] for _ in range(R)]  # i i i j j j ...
        if world == R:
            assert all(s == R * t + rank for rank, p in enumerate(per_rank) for v in p for _, s in v)


def rasampler_deal(images: list[int], world: int, rank: int, repeats: int = 3) -> list[int]:
    """DeiT's RASampler.__iter__ (facebookresearch/deit samplers.py) on an already drawn order, without its
    padding and truncation: each index repeated, then every world-th position from rank."""
    repeated = [i for i in images for _ in range(repeats)]
    return repeated[rank::world]


@pytest.mark.parametrize("world, batch", [(3, 8), (2, 3), (6, 2), (1, 3)])
def test_the_deal_is_rasamplers_where_a_step_holds_whole_images(world, batch):
    """world x batch divisible by r: a rank's views, step after step, are exactly RASampler's deal of the epoch's
    images, and each step is its next batch of them."""
    images = deal.epoch_images(SHARDS, 8, 2, 7, 1, R).tolist()
    for rank in range(world):
        ours = deal_of(1, world, batch, rank)
        theirs = rasampler_deal(images, world, rank)
        assert [i for views in ours for i, _ in views] == theirs
        assert all(len(v) == batch for v in ours[:-1])


def test_refusals_name_the_keys():
    with pytest.raises(ConfigError, match=r"train.batch_size=1 x 2 rank\(s\).*train.repeats=3"):
        deal.step_sizes(32, 2, 1, 3)
    with pytest.raises(ConfigError, match=r"leaves some of 8 ranks without a sample"):
        deal.step_sizes(2, 8, 4, 3)  # 2 images x 3 copies for 8 ranks
    assert deal.step_sizes(32, 3, 8, 3) == [8, 8, 8, 8]
    assert deal.step_sizes(32, 2, 8, 3) == [5, 5, 5, 5, 4, 4, 4]  # G = 16 // 3 = 5 whole images a step


# ------------------------------------------------------------------------------------------------ seed schedule


def test_schedule_in_blocks_of_r_epochs():
    plan = plan_schedule(7, 9, repeats=3, repeat_mode="ranks")
    assert plan == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3 + [[6, 7, 8]]
    assert plan_schedule(300, 300, repeats=3, repeat_mode="ranks")[299] == [297, 298, 299]
    with pytest.raises(ScheduleError, match=r"7 epochs with train.repeats=3, train.repeat_mode=ranks need 9 seed "
                                            r"indices but the cache holds S=7.*cache.cycle=true"):
        plan_schedule(7, 7, repeats=3, repeat_mode="ranks")
    assert plan_schedule(7, 6, cycle=True, repeats=3, repeat_mode="ranks")[6] == [0, 1, 2]
    assert plan_schedule(2, 6, repeats=3) == [[0, 1, 2], [3, 4, 5]]  # local: unchanged


# ------------------------------------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("deal")
    src = sources.toy(5, N, "train")
    shard_writer.write_shards(src, root / "train", shard_size=SHARD, num_classes=10, class_names=src.class_names,
                        source=src.source)
    return root / "train"


@pytest.fixture(scope="module")
def reference(data):
    """(seed, sample) -> (image, digest, target), each seed index rendered alone, unshuffled."""
    loader = ViewLoader(data, CFG, run_seed=7, batch_size=48)
    out = {}
    for s in range(6):
        for b in loader.epoch(s):
            for j, i in enumerate(b["index"].tolist()):
                out[(s, i)] = (b["image"][j].clone(), int(b["digest"][j]), b["target"][j].clone())
    return out


@pytest.mark.parametrize("world, batch, workers, backend, epoch", [
    (1, 16, 0, "per_sample", 0), (2, 8, 2, "per_sample", 4), (3, 8, 1, "batched", 5)])
def test_loader_renders_exactly_the_deal(data, reference, world, batch, workers, backend, epoch):
    seeds = deal.block_seeds(epoch, R)
    for rank in range(world):
        loader = ViewLoader(data, CFG, run_seed=7, batch_size=batch, num_workers=workers, shuffle=True, rank=rank,
                            world_size=world, repeats=R, repeat_mode="ranks", backend=backend)
        dealt = loader.deal(epoch, seeds)
        batches = list(loader.epoch(seeds, epoch))
        assert len(batches) == loader.steps_per_epoch(epoch) == len(dealt)
        for b, views in zip(batches, dealt):
            assert list(zip(b["index"].tolist(), b["seed"].tolist())) == views
            assert "position" not in b
            for j, key in enumerate(views):
                image, digest, target = reference[(key[1], key[0])]
                assert int(b["digest"][j]) == digest and torch.equal(b["target"][j], target), key
                assert torch.equal(b["image"][j], image), key


def test_loader_attaches_each_views_own_cache_row_and_checks_digests(data, reference):
    manifest = shards.load_manifest(data)

    def extras(s, k):
        first, count = manifest.shards[k].first, manifest.shards[k].count
        idx = np.arange(first, first + count)
        return {"digest": np.array([reference[(s, i)][1] for i in idx], dtype=np.uint32), "row": idx * 10 + s}

    loader = ViewLoader(data, CFG, run_seed=7, batch_size=8, shuffle=True, world_size=2, rank=1, repeats=R,
                        repeat_mode="ranks", extras=extras)
    seen = Counter()
    for b in loader.epoch([0, 1, 2], 1):
        assert torch.equal(b["row"], b["index"] * 10 + b["seed"])
        seen.update(b["seed"].tolist())
    assert set(seen) == {0, 1, 2}

    def tampered(s, k):
        rows = extras(s, k)
        rows["digest"] ^= 1
        return rows

    bad = ViewLoader(data, CFG, run_seed=7, batch_size=8, shuffle=True, repeats=R, repeat_mode="ranks",
                     extras=tampered)
    with pytest.raises(DigestMismatch, match=r"shard-0000\d\.tar: key 0000\d\d: seed \d"):
        list(bad.epoch([0, 1, 2], 0))


def test_unknown_repeat_mode_is_refused(data):
    with pytest.raises(ConfigError, match="train.repeat_mode='global' is unknown"):
        ViewLoader(data, CFG, run_seed=7, batch_size=8, repeats=R, repeat_mode="global")


# ---------------------------------------------------------------------------------------------- torchrun ranks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("deal_run")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    made = subprocess.run([sys.executable, "-m", "pipeline.make_shards", f"workdir={work}", f"data.train_size={N}",
                           "data.val_size=16", f"data.shard_size={SHARD}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    return work


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_torchrun_ranks_put_an_images_copies_in_one_global_step(workdir, world):
    """train_student under torchrun (stages/launch.sh, NPROC=world), train.repeat_mode=ranks, 2 epochs: every
    rank logs (step, sample, seed index) of each view; each image of an epoch has its 3 copies in one global
    step, under seeds 0, 1, 2 (block 0), on min(3, world) distinct ranks; the two epochs draw disjoint images."""
    out = workdir / f"run{world}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "NPROC": str(world)}
    proc = subprocess.run(
        ["bash", str(REPO / "stages" / "launch.sh"), "train_student", f"workdir={workdir}", f"data.train_size={N}",
         "data.val_size=16", f"data.shard_size={SHARD}", "distill=none", "train.repeats=3",
         "train.repeat_mode=ranks", "train.epochs=2", "cache.num_seeds=3", "train.batch_size=8",
         "train.num_workers=0", "train.val=false", "train.dvclive=false", "train.log_indices=true",
         "++student.kwargs.depth=1", f"train.out_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = {r: [json.loads(line) for line in (out / "indices" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(world)}
    drawn = []
    for epoch in range(2):
        where = defaultdict(list)
        for rank, lines in logs.items():
            line = lines[epoch]
            assert line["epoch"] == epoch and line["seed"] == [0, 1, 2]
            for step, i, s in line["views"]:
                where[i].append((step, rank, s))
        assert len(where) == N // R  # a third of the images, each with its copies
        for i, copies in where.items():
            assert sorted(s for _, _, s in copies) == [0, 1, 2], (i, copies)
            assert len({step for step, _, _ in copies}) == 1, (i, copies)
            assert len({rank for _, rank, _ in copies}) == min(R, world), (i, copies)
        drawn.append(set(where))
    assert not drawn[0] & drawn[1]


@pytest.mark.slow
def test_torchrun_ranks_killed_mid_block_then_resumed_equals_uninterrupted(workdir, tmp_path):
    """DeiT's repeats across 2 ranks (one block of 3 epochs) killed with SIGKILL after its first checkpoint, in the
    middle of the block, then resumed by the same command: every rank trains the very views of the uninterrupted
    run (its index logs equal, line for line) and ends with the same weights."""
    import time

    from procs import kill_tree, start_logged
    from pipeline.train.checkpoint import CHECKPOINT_LAST, load_checkpoint_file
    from pipeline.train.student_run import METRICS, STUDENT

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "NPROC": "2", "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return ["bash", str(REPO / "stages" / "launch.sh"), "train_student", f"workdir={workdir}",
                f"data.train_size={N}", "data.val_size=16", f"data.shard_size={SHARD}", "distill=none",
                "train.repeats=3", "train.repeat_mode=ranks", "train.epochs=3", "cache.num_seeds=3",
                "train.batch_size=8", "train.num_workers=0", "train.val=false", "train.dvclive=false",
                "train.log_indices=true", "++student.kwargs.depth=1", "num_threads=1", f"train.out_dir={out}"]

    ref = tmp_path / "uninterrupted"
    done = subprocess.run(command(ref), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    proc = start_logged(command(out), REPO, env, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 300
        while not (out / CHECKPOINT_LAST).exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
    finally:
        kill_tree(proc)  # the launcher, torchrun and both ranks
    assert not (out / METRICS).exists(), "killed after the end"
    assert load_checkpoint_file(out / CHECKPOINT_LAST)["epoch"] < 3  # inside the block of 3 epochs

    resumed = subprocess.run(command(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    for rank in (0, 1):
        log = f"indices/rank{rank}.jsonl"
        assert (out / log).read_text() == (ref / log).read_text(), log
    a, b = torch.load(ref / STUDENT), torch.load(out / STUDENT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
