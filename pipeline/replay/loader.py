"""WebDataset loader of replayed views, for any number of workers and any rank/world split of shards.

Work is cut into units (seed index, shard), or (seed indices, shard) when one pass over a shard renders its
views under several seed indices (stage one's seed groups, stage two's repeats: each image decoded once for
all of them). A worker reads a shard tar with webdataset, renders it block by block (pipeline.replay.views),
attaches per-(seed, shard) extras (cache rows, checked by digest) and hands whole blocks to the main process,
which shuffles them in a pool and cuts batches of a planned size so that every rank takes the same number of
steps and every sample is used exactly once (r times with repeats) per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import storage
from pipeline.errors import ConfigError, DigestMismatch
from pipeline.replay import deal
from pipeline.replay.deal_loader import dealt_batches
from pipeline.replay import seeding
from pipeline.data.images import named_decode_errors
from pipeline.data.shards import Manifest, iter_shard, load_manifest
from pipeline.replay.batched import plan_block
from pipeline.replay.block_render import collate_plan, render_blocks
from pipeline.replay.view_params import AugmentConfig
from pipeline.replay.views import block_views, group_views

BACKENDS = ("per_sample", "batched")
# train.repeat_mode: local = a sample's r copies in different steps of one rank; ranks = DeiT's RASampler layout
REPEAT_MODES = ("local", "ranks")
# extras(seed_index, shard) -> {field: array with one row per sample of the shard}; "digest" is checked.
Extras = Callable[[int, int], dict]
# A unit's seeds: one seed index, or a tuple of seed indices rendered in one pass over the shard.
Seeds = int | tuple[int, ...]


def unit_seeds(seeds: Seeds) -> tuple[int, ...]:
    return tuple(int(s) for s in seeds) if isinstance(seeds, (tuple, list)) else (int(seeds),)


@dataclass(frozen=True)
class ViewSource:
    """Everything a worker needs to render units (picklable)."""

    manifest: Manifest
    cfg: AugmentConfig
    run_seed: int
    train: bool = True
    extras: Extras | None = None
    backend: str = "per_sample"  # or "batched": plan here (bytes + params), render in the consumer (replay.backend)

    def unit_blocks(self, seeds: Seeds, shard: int, rng: np.random.Generator | None = None,
                    keep: dict[int, set[int]] | None = None):
        """Yield collated blocks of the unit's views; with rng, blocks and samples come in shuffled order.

        seeds: one seed index, or a tuple of them: then each block is decoded once and rendered under every seed
        index in turn (one collated block per seed index, in tuple order), with the extras of each view's own
        seed index (one extras call per (seed, shard)).
        keep (per_sample backend): seed index -> the global indices whose views to render (others are skipped,
        and so is a block's seed index without any)."""
        group = unit_seeds(seeds)
        entry = self.manifest.shards[shard]
        path = self.manifest.shard_path(shard)
        items = [(index, data, label) for index, _key, data, label in iter_shard(path, entry, self.manifest)]
        rows = {s: self.extras(s, shard) for s in group} if self.extras is not None else None
        g = self.cfg.mix_block
        starts = list(range(0, len(items), g))
        if rng is not None:
            starts = [starts[k] for k in rng.permutation(len(starts))]
        for start in starts:
            block = items[start:start + g]
            for seed_index, batch in zip(group, self._render(block, group, rng, keep)):
                if batch is None:
                    continue
                if rows is not None:
                    pos = batch["index"].numpy() - entry.first
                    for name, arr in rows[seed_index].items():
                        if name == "digest":
                            _check(batch["digest"], torch.as_tensor(arr[pos].astype(np.int64)), batch["index"],
                                   path, seed_index, self.manifest.key_width)
                        else:
                            batch[name] = torch.as_tensor(np.ascontiguousarray(arr[pos]))
                yield batch


    def _render(self, block, group: tuple[int, ...], rng, keep=None):
        """One collated batch per seed index of ``group``: rendered views (per_sample), or plans whose pixels the
        consumer renders (batched; ``perm`` orders them as the per-sample path would)."""
        kw = dict(run_seed=self.run_seed, cfg=self.cfg, num_classes=self.manifest.num_classes, train=self.train)
        if self.backend == "batched":
            for seed_index in group:
                with named_decode_errors(self.manifest, block):  # an image that does not decode: shard and key
                    plan = plan_block(block, seed_index=seed_index, **kw)
                perm = rng.permutation(len(block)) if rng is not None else np.arange(len(block))
                yield collate_plan(plan, seed_index, perm)
            return
        with named_decode_errors(self.manifest, block):  # an image that does not decode: shard and key
            rendered = (group_views(block, seed_indices=group, keep=keep, **kw) if len(group) > 1
                        else [block_views(block, seed_index=group[0],
                                          keep=None if keep is None else keep.get(group[0], set()), **kw)])
        for seed_index, views in zip(group, rendered):
            if not views:
                yield None
                continue
            if rng is not None:
                views = [views[k] for k in rng.permutation(len(views))]
            yield collate(views, seed_index)


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

    def __init__(self, source: ViewSource, units: list[tuple[Seeds, int]], shuffle_seed: tuple | None):
        self.source, self.units, self.shuffle_seed = source, units, shuffle_seed

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for u in range(wid, len(self.units), nw):
            s, k = self.units[u]
            rng = None if self.shuffle_seed is None else seeding.generator(*self.shuffle_seed, *unit_seeds(s), k,
                                                                            seeding.SHUFFLE)
            yield from self.source.unit_blocks(s, k, rng)


def batch_sizes(total: int, steps: int) -> list[int]:
    base, extra = divmod(total, steps)
    return [base + 1 if j < extra else base for j in range(steps)]


class ViewLoader:
    """Batches of replayed views of one split: `epoch(seed_index, epoch)` for training, `units(...)` for stage one.

    Batches are dicts of tensors: index, image (uint8 NCHW), target (float, mixed + smoothed), label, digest,
    seed, plus any extras fields.

    repeats = r > 1 (repeated augmentation, train.repeats): `epoch(seeds, e)` takes r distinct seed indices and
    every sample of the rank's shards appears r times, once under each, decoded once (units (seeds, shard)); the
    epoch is r times longer in steps, and with shuffling the pool holds r times as many blocks and cuts batches
    of distinct samples where it can, so the r copies of a sample land in different steps of its rank.

    backend "batched" (replay.backend): workers only read bytes and sample params (pipeline.replay.batched); this
    process decodes and renders each pool of blocks at once on ``device`` (nvJPEG and batched tensor ops on
    CUDA). Same params, digests, targets and sample order as "per_sample"; pixels equal wherever both decode at
    full size (docs/design.md, section 5).
    """

    def __init__(self, split_dir, cfg: AugmentConfig, *, run_seed: int, batch_size: int, num_workers: int = 0,
                 train: bool = True, shuffle: bool = False, rank: int = 0, world_size: int = 1,
                 extras: Extras | None = None, pool_blocks: int = 8, pin_memory: bool = False, repeats: int = 1,
                 backend: str = "per_sample", device="cpu", repeat_mode: str = "local"):
        self.manifest = load_manifest(split_dir)
        if backend not in BACKENDS:
            raise ConfigError(f"replay.backend={backend!r} is unknown; expected one of {BACKENDS}")
        self.source = ViewSource(self.manifest, cfg, int(run_seed), train, extras, backend)
        self.device = torch.device(device)  # where the batched backend renders
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.repeats = int(repeats)
        if self.repeats < 1:
            raise ConfigError(f"train.repeats={repeats} must be >= 1")
        if repeat_mode not in REPEAT_MODES:
            raise ConfigError(f"train.repeat_mode={repeat_mode!r} is unknown; expected one of {REPEAT_MODES}")
        self.dealt = repeat_mode == "ranks"  # DeiT's copies across ranks (pipeline.replay.deal)
        self.shuffle, self.rank, self.world_size = shuffle, int(rank), int(world_size)
        self.pool_blocks, self.pin_memory = pool_blocks, pin_memory
        if self.manifest.num_shards < self.world_size:
            raise ConfigError(f"{split_dir}: {self.manifest.num_shards} shards cannot feed {self.world_size} ranks; "
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
        """The same on every rank: enough steps for the rank with the most views (repeats x its samples)."""
        if self.dealt:
            return deal.epoch_steps(self.manifest.n, epoch=epoch, repeats=self.repeats, world=self.world_size,
                                    batch_size=self.batch_size)
        most = max(self._count(self.rank_shards(epoch, r)) for r in range(self.world_size))
        return math.ceil(self.repeats * most / self.batch_size)

    def epoch(self, seed_index: int | Sequence[int], epoch: int = 0) -> Iterator[dict]:
        """One epoch of this rank: every sample of its shards once per seed index (seed_index: one, or a
        sequence of `repeats` distinct ones)."""
        seeds = unit_seeds(seed_index)
        if len(seeds) != self.repeats or len(set(seeds)) != len(seeds):
            raise ConfigError(f"epoch {epoch}: seed indices {list(seeds)} for train.repeats={self.repeats}: need "
                              f"{self.repeats} distinct seed indices")
        if self.dealt:
            return dealt_batches(self, self.deal(epoch, seeds))
        unit = seeds if self.repeats > 1 else seeds[0]
        shards = self.rank_shards(epoch)
        sizes = batch_sizes(self.repeats * self._count(shards), self.steps_per_epoch(epoch))
        seed = (self.source.run_seed, epoch, self.rank) if self.shuffle else None
        return self._batches([(unit, k) for k in shards], sizes, seed)

    def deal(self, epoch: int, seeds: Sequence[int], rank: int | None = None) -> list[list[tuple[int, int]]]:
        """repeat_mode=ranks: the rank's (sample, seed index) views of ``epoch``, step by step (copy c under
        ``seeds[c]``)."""
        shards = [(e.first, e.count) for e in self.manifest.shards]
        return deal.epoch_deal(shards, mix_block=self.source.cfg.mix_block, window=self.pool_blocks,
                               run_seed=self.source.run_seed, epoch=epoch, world=self.world_size,
                               batch_size=self.batch_size, rank=self.rank if rank is None else rank,
                               seeds=list(seeds))

    def units(self, units: list[tuple[Seeds, int]]) -> Iterator[dict]:
        """Stage one: the given units (seed index or tuple of them, shard) in order, batches of batch_size (the
        last may be smaller)."""
        total = sum(len(unit_seeds(s)) * self.manifest.shards[k].count for s, k in units)
        steps = max(1, math.ceil(total / self.batch_size))
        return self._batches(list(units), batch_sizes(total, steps) if total else [], None)

    def _batches(self, units, sizes: list[int], shuffle_seed) -> Iterator[dict]:
        loader = self.data_loader(UnitStream(self.source, units, shuffle_seed))
        rng = np.random.default_rng(list(shuffle_seed)) if shuffle_seed is not None else None
        pool: list[dict] = []
        blocks = iter(loader)
        try:
            yield from self._cut(blocks, sizes, pool, rng)
        finally:
            _shutdown(blocks)

    def data_loader(self, stream: IterableDataset) -> DataLoader:
        """``stream``'s items from this loader's workers."""
        context = storage.worker_context(self.manifest.split_dir, self.manifest.shard_path(0),  # published: its own
                                         getattr(self.source.extras, "path", None),
                                         num_workers=self.num_workers)  # object storage: no fork (pipeline.storage)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          prefetch_factor=4 if self.num_workers else None,
                          persistent_workers=False, multiprocessing_context=context)

    def _cut(self, blocks, sizes, pool, rng):
        pooled = 0
        pin = self.pin_memory and torch.cuda.is_available()
        distinct = self.repeats > 1  # repeats: keep a sample's copies in different batches where the pool allows
        # Repeats: the pool holds pool_blocks blocks' worth of distinct samples (r copies each) before every cut.
        # (r = 1 keeps its historical rule, which tops the pool up by pool_blocks - 1 blocks per cut.)
        rows = self.pool_blocks * self.repeats * self.source.cfg.mix_block
        for size in sizes:
            while pooled < size or (rng is not None and (pooled < rows if distinct else len(pool) < self.pool_blocks)):
                block = next(blocks, None)
                if block is None:
                    break
                pool.append(block)
                pooled += len(block["index"])
            if pooled < size:
                raise RuntimeError(f"loader ran dry: planned {sum(sizes)} samples, got fewer")
            render_blocks(pool, self.device, self.manifest)
            yield _take(pool, size, rng, distinct, pin)
            pooled -= size
        if next(blocks, None) is not None or pooled:
            raise RuntimeError("loader produced more samples than planned")


def run_loader(cfg, split: str, aug: AugmentConfig, *, batch_size: int, num_workers: int = 0, ctx=None,
               run_seed: int | None = None, **kwargs) -> ViewLoader:
    """The ViewLoader of a configured run over ``<data.shards>/<split>``: training views for "train", the
    deterministic eval views otherwise; ``run_seed`` (default ``cfg.run_seed``) and ``replay.backend`` from the
    config; rank, world size, device and pinned memory from ``ctx`` (a pipeline.distributed.Context; None: one
    process, CPU). Every other ViewLoader argument (shuffle, extras, repeats, a val split's own rank/world_size,
    ...) passes through unchanged and wins over these defaults."""
    from pipeline.config import split_dir

    kw = {"train": split == "train", "backend": str(cfg.replay.backend)}
    if ctx is not None:
        kw.update(rank=ctx.rank, world_size=ctx.world_size, device=ctx.device, pin_memory=ctx.device.type == "cuda")
    kw.update(kwargs)
    return ViewLoader(split_dir(cfg, split), aug, run_seed=int(cfg.run_seed if run_seed is None else run_seed),
                      batch_size=int(batch_size), num_workers=int(num_workers), **kw)


def _shutdown(blocks) -> None:
    """Stop DataLoader workers now, not when the garbage collector gets to an iterator abandoned mid-epoch.

    Never SIGTERM a worker before this: a worker killed while it holds the shared done-event's lock (workers poll
    it) leaves the main process blocked forever in `Event.set()` (a CI run hung here). The peaceful shutdown sets
    the event, sends each worker its stop and terminates only stragglers, after their pids left the SIGCHLD
    watch."""
    shutdown = getattr(blocks, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _take(pool: list[dict], size: int, rng: np.random.Generator | None, distinct: bool = False,
          pin: bool = False) -> dict:
    """Cut `size` samples from the pool (random rows when shuffling, else in arrival order).

    distinct (repeats): among the random rows, the first copy of each sample goes first, so a batch holds two
    copies of a sample only when the pool has fewer than `size` distinct samples (the end of an epoch).
    pin: the batch's CPU tensors in pinned memory (the DataLoader pinned the blocks, but a cut is a new tensor):
    a copy to the GPU from pageable memory would make the host wait for every kernel queued before it."""
    merged = pool[0] if len(pool) == 1 else {k: torch.cat([b[k] for b in pool]) for k in pool[0]}
    n = len(merged["index"])
    if rng is None:  # arrival order: slices (views), no gather copies
        pool.clear()
        if n > size:
            pool.append({k: v[size:] for k, v in merged.items()})
        return {k: _rows(v, slice(0, size), pin) for k, v in merged.items()}
    order = rng.permutation(n)
    if distinct:
        first = np.zeros(n, dtype=bool)
        first[np.unique(merged["index"].numpy()[order], return_index=True)[1]] = True
        order = np.concatenate([order[first], order[~first]])
    perm = torch.from_numpy(order)
    take, keep = perm[:size], perm[size:]
    pool.clear()
    if len(keep):
        pool.append({k: v[keep] for k, v in merged.items()})
    return {k: _rows(v, take, pin) for k, v in merged.items()}


def _rows(v: torch.Tensor, rows, pin: bool) -> torch.Tensor:
    """v[rows] (a slice, or an index tensor); with pin, a CPU result in pinned memory, gathered straight into it."""
    if not pin or v.is_cuda:
        return v[rows]
    if isinstance(rows, slice):
        out = v[rows]
        return out if out.is_pinned() else out.pin_memory()
    out = torch.empty((len(rows), *v.shape[1:]), dtype=v.dtype, pin_memory=True)
    return torch.index_select(v, 0, rows, out=out)
