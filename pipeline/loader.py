"""WebDataset loader of replayed views, for any number of workers and any rank/world split of shards.

Work is cut into units (seed index, shard). A worker reads a shard tar with webdataset, renders it block by
block (pipeline.views), attaches per-shard extras (cache rows, checked by digest) and hands whole blocks to
the main process, which shuffles them in a pool and cuts batches of a planned size so that every rank takes
the same number of steps and every sample is used exactly once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import seeding
from pipeline.replay import AugmentConfig
from pipeline.shards import Manifest, iter_shard, load_manifest
from pipeline.views import block_views

# extras(seed_index, shard) -> {field: array with one row per sample of the shard}; "digest" is checked.
Extras = Callable[[int, int], dict]


class DigestMismatch(RuntimeError):
    """A stored target belongs to another view than the one replayed."""


@dataclass(frozen=True)
class ViewSource:
    """Everything a worker needs to render units (picklable)."""

    manifest: Manifest
    cfg: AugmentConfig
    run_seed: int
    train: bool = True
    extras: Extras | None = None

    def unit_blocks(self, seed_index: int, shard: int, rng: np.random.Generator | None = None):
        """Yield collated blocks of the unit's views; with rng, blocks and samples come in shuffled order."""
        entry = self.manifest.shards[shard]
        path = self.manifest.shard_path(shard)
        items = [(index, data, label) for index, _key, data, label in iter_shard(path, entry, self.manifest)]
        rows = self.extras(seed_index, shard) if self.extras is not None else None
        g = self.cfg.mix_block
        starts = list(range(0, len(items), g))
        if rng is not None:
            starts = [starts[k] for k in rng.permutation(len(starts))]
        for start in starts:
            views = block_views(items[start:start + g], run_seed=self.run_seed, seed_index=seed_index,
                                cfg=self.cfg, num_classes=self.manifest.num_classes, train=self.train)
            if rng is not None:
                views = [views[k] for k in rng.permutation(len(views))]
            batch = collate(views, seed_index)
            if rows is not None:
                pos = batch["index"].numpy() - entry.first
                for name, arr in rows.items():
                    if name == "digest":
                        _check(batch["digest"], torch.as_tensor(arr[pos].astype(np.int64)), batch["index"], path,
                               seed_index, self.manifest.key_width)
                    else:
                        batch[name] = torch.as_tensor(np.ascontiguousarray(arr[pos]))
            yield batch


def collate(views: list[dict], seed_index: int) -> dict:
    return {
        "index": torch.tensor([v["index"] for v in views], dtype=torch.int64),
        "image": torch.stack([v["image"] for v in views]),
        "target": torch.stack([v["target"] for v in views]),
        "label": torch.tensor([v["label"] for v in views], dtype=torch.int64),
        "digest": torch.tensor([v["digest"] for v in views], dtype=torch.int64),
        "seed": torch.full((len(views),), seed_index, dtype=torch.int64),
    }


def _check(computed: torch.Tensor, stored: torch.Tensor, index: torch.Tensor, path, seed_index: int,
           key_width: int) -> None:
    bad = (computed != stored.to(torch.int64)).nonzero().flatten()
    if len(bad):
        k = int(bad[0])
        key = str(int(index[k])).zfill(key_width)
        raise DigestMismatch(
            f"{path}: key {key}: seed {seed_index}: stored digest {int(stored[k]):#010x} != replayed view "
            f"{int(computed[k]):#010x} ({len(bad)} of {len(index)} in this block differ): the cache was built "
            f"from other views (augmentation, data or code differ)")


class UnitStream(IterableDataset):
    """Units split across DataLoader workers (unit u goes to worker u mod W)."""

    def __init__(self, source: ViewSource, units: list[tuple[int, int]], shuffle_seed: tuple | None):
        self.source, self.units, self.shuffle_seed = source, units, shuffle_seed

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for u in range(wid, len(self.units), nw):
            s, k = self.units[u]
            rng = None if self.shuffle_seed is None else seeding.generator(*self.shuffle_seed, s, k, seeding.SHUFFLE)
            yield from self.source.unit_blocks(s, k, rng)


def batch_sizes(total: int, steps: int) -> list[int]:
    base, extra = divmod(total, steps)
    return [base + 1 if j < extra else base for j in range(steps)]


class ViewLoader:
    """Batches of replayed views of one split: `epoch(seed_index, epoch)` for training, `units(...)` for stage one.

    Batches are dicts of tensors: index, image (uint8 NCHW), target (float, mixed + smoothed), label, digest,
    seed, plus any extras fields.
    """

    def __init__(self, split_dir, cfg: AugmentConfig, *, run_seed: int, batch_size: int, num_workers: int = 0,
                 train: bool = True, shuffle: bool = False, rank: int = 0, world_size: int = 1,
                 extras: Extras | None = None, pool_blocks: int = 8, pin_memory: bool = False):
        self.manifest = load_manifest(split_dir)
        self.source = ViewSource(self.manifest, cfg, int(run_seed), train, extras)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.shuffle, self.rank, self.world_size = shuffle, int(rank), int(world_size)
        self.pool_blocks, self.pin_memory = pool_blocks, pin_memory
        if self.manifest.num_shards < self.world_size:
            raise ValueError(f"{split_dir}: {self.manifest.num_shards} shards cannot feed {self.world_size} ranks; "
                             f"write smaller shards (data.shard_size)")

    def rank_shards(self, epoch: int, rank: int | None = None) -> list[int]:
        order = np.arange(self.manifest.num_shards)
        if self.shuffle:
            order = seeding.generator(self.source.run_seed, epoch, seeding.SHUFFLE).permutation(order)
        r = self.rank if rank is None else rank
        return [int(k) for k in order[r::self.world_size]]

    def _count(self, shards: list[int]) -> int:
        return sum(self.manifest.shards[k].count for k in shards)

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """The same on every rank: enough steps for the rank with the most samples."""
        most = max(self._count(self.rank_shards(epoch, r)) for r in range(self.world_size))
        return math.ceil(most / self.batch_size)

    def epoch(self, seed_index: int, epoch: int = 0) -> Iterator[dict]:
        shards = self.rank_shards(epoch)
        sizes = batch_sizes(self._count(shards), self.steps_per_epoch(epoch))
        seed = (self.source.run_seed, epoch, self.rank) if self.shuffle else None
        return self._batches([(seed_index, k) for k in shards], sizes, seed)

    def units(self, units: list[tuple[int, int]]) -> Iterator[dict]:
        """Stage one: the given units in order, batches of batch_size (the last may be smaller)."""
        total = self._count([k for _, k in units])
        steps = max(1, math.ceil(total / self.batch_size))
        return self._batches(list(units), batch_sizes(total, steps) if total else [], None)

    def _batches(self, units, sizes: list[int], shuffle_seed) -> Iterator[dict]:
        stream = UnitStream(self.source, units, shuffle_seed)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.num_workers else None,
                            persistent_workers=False)
        rng = np.random.default_rng(list(shuffle_seed)) if shuffle_seed is not None else None
        pool: list[dict] = []
        blocks = iter(loader)
        try:
            yield from self._cut(blocks, sizes, pool, rng)
        finally:
            _shutdown(blocks)

    def _cut(self, blocks, sizes, pool, rng):
        pooled = 0
        for size in sizes:
            while pooled < size or (rng is not None and len(pool) < self.pool_blocks):
                block = next(blocks, None)
                if block is None:
                    break
                pool.append(block)
                pooled += len(block["index"])
            if pooled < size:
                raise RuntimeError(f"loader ran dry: planned {sum(sizes)} samples, got fewer")
            yield _take(pool, size, rng)
            pooled -= size
        if next(blocks, None) is not None or pooled:
            raise RuntimeError("loader produced more samples than planned")


def _shutdown(blocks) -> None:
    """Stop DataLoader workers now (an error mid-epoch would otherwise leave them to the garbage collector,
    whose shutdown waits out a 5 s timeout per worker)."""
    shutdown = getattr(blocks, "_shutdown_workers", None)
    if shutdown is not None:
        for w in getattr(blocks, "_workers", []):
            if w.is_alive():
                w.terminate()
        shutdown()


def _take(pool: list[dict], size: int, rng: np.random.Generator | None) -> dict:
    """Cut `size` samples from the pool (random rows when shuffling, else in arrival order)."""
    merged = {k: torch.cat([b[k] for b in pool]) for k in pool[0]}
    n = len(merged["index"])
    if rng is not None:
        perm = torch.from_numpy(rng.permutation(n))
        take, keep = perm[:size], perm[size:]
    else:
        take, keep = torch.arange(size), torch.arange(size, n)
    pool.clear()
    if len(keep):
        pool.append({k: v[keep] for k, v in merged.items()})
    return {k: v[take] for k, v in merged.items()}
