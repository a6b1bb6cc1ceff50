"""Stage one: replay views unit by unit, run the teacher, write each (seed index, shard) Zarr chunk.

A work unit is (seed group, shard): one pass over the shard decodes each image once and renders its views under
every pending seed index of the group (`cache.seeds_per_pass` seeds per group; null = all S), and each
(seed, shard) chunk is committed on its own as soon as its rows are complete. Shards go round-robin to ranks
(pipeline.cache.layout.column_owner): a rank owns every file of its shards outright, so concurrent writers never
share a file. A chunk's `done`
marker is written last, so a killed run resumes by recomputing the (seed, shard) chunks whose marker is false.
The teacher never waits on Zarr: finished chunks go to a writer thread.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import torch
from omegaconf import DictConfig

from pipeline import distributed, storage
from pipeline.cache import lease
from pipeline.cache.layout import column_owner
from pipeline.cache.provenance import build_provenance
from pipeline.cache.store import CacheStore
from pipeline.config import split_dir
from pipeline.replay.view_params import augment_config
from pipeline.replay.loader import run_loader
from pipeline.data.shards import Manifest, load_manifest
from pipeline.errors import CacheError, UserError
from pipeline.logs import progress
from pipeline.models.teacher import TeacherRunner, create_teacher, warn_if_random
from pipeline.replay.fingerprint import fingerprint


def _unfingerprinted(path, overwrite: bool) -> tuple[str, ...]:
    """("pixels",) when resuming a store built before stores kept a pixel fingerprint: it is resumed as it is
    (stage two then reads it with a warning) rather than refused for the field it never had."""
    if overwrite or not path.exists():
        return ()
    try:
        return () if "pixels" in CacheStore.open(path, "r", check_contract=False).provenance else ("pixels",)
    except CacheError:  # not a (current) cache store: create() says what it is
        return ()


def group_units(pending: list[tuple[int, int]], num_seeds: int,
                seeds_per_pass: int | None) -> list[tuple[tuple[int, ...], int]]:
    """Work units (seed group, shard) over the pending (seed, shard) chunks: groups of `seeds_per_pass`
    consecutive seed indices (None: one group of all S), each unit holding only its group's pending seeds of that
    shard; ordered by group, then shard."""
    g = int(num_seeds) if seeds_per_pass is None else int(seeds_per_pass)
    if g < 1:
        raise ValueError(f"cache.seeds_per_pass={seeds_per_pass} must be >= 1 (or null for all seeds)")
    by_unit: dict[tuple[int, int], list[int]] = {}
    for s, k in sorted(pending):
        by_unit.setdefault((s // g, k), []).append(int(s))
    return [(tuple(seeds), k) for (_, k), seeds in sorted(by_unit.items())]


class UnitAssembler:
    """Collects teacher rows by unit; hands a unit to the writer thread once all its samples arrived."""

    def __init__(self, store: CacheStore, manifest: Manifest, units: list[tuple[int, int]], num_classes: int):
        self.store, self.manifest = store, manifest
        self.open: dict[tuple[int, int], list] = {}
        for s, k in units:
            n = manifest.shards[k].count
            self.open[(s, k)] = [np.zeros((n, num_classes), np.float32), np.zeros(n, np.uint32), 0]
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def add(self, seeds: np.ndarray, index: np.ndarray, logits: np.ndarray, digest: np.ndarray) -> int:
        """Scatter a batch into its units; returns how many units completed."""
        shard = self.manifest.shards_of(index)
        done = 0
        for s, k in {(int(a), int(b)) for a, b in zip(seeds, shard)}:
            sel = (seeds == s) & (shard == k)
            rows = self.open[(s, k)]
            pos = index[sel] - self.manifest.shards[k].first
            rows[0][pos] = logits[sel]
            rows[1][pos] = digest[sel]
            rows[2] += int(sel.sum())
            if rows[2] == len(rows[1]):
                self._put((s, k, rows[0], rows[1]))
                del self.open[(s, k)]
                done += 1
        return done

    def _put(self, item) -> None:
        while True:
            if self.error is not None:
                _reraise(self.error)
            try:
                self.queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def _write(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                self.store.write_unit(*item)
            except BaseException as exc:  # surfaced in the main thread
                self.error = exc
                return

    def close(self) -> None:
        if self.open:
            raise RuntimeError(f"{len(self.open)} units incomplete: {sorted(self.open)[:4]}...")
        self._put(None)
        self.thread.join()
        if self.error is not None:
            _reraise(self.error)


def _reraise(exc: BaseException):
    """A writer-thread error: user errors (a full disk, a replaced store, a lost lease) keep their one-line message."""
    if isinstance(exc, UserError):
        raise exc
    raise RuntimeError(f"cache writer failed: {exc}") from exc


def _create_or_resume(cfg: DictConfig, path, manifest, aug, teacher) -> None:
    """Rank 0: the store at ``path`` created, or resumed when its layout and provenance match."""
    provenance = {**build_provenance(cfg, manifest, aug, teacher), "pixels": fingerprint()}  # stage two re-renders
    CacheStore.create(path, provenance=provenance,
                      num_seeds=int(cfg.cache.num_seeds), shard_counts=[s.count for s in manifest.shards],
                      shard_size=manifest.shard_size, num_classes=manifest.num_classes,
                      topk=min(int(cfg.cache.topk), manifest.num_classes), store_logits=bool(cfg.cache.store_logits),
                      overwrite=bool(cfg.overwrite), resume_check=str(cfg.cache.resume_check),
                      ignore_fields=_unfingerprinted(path, bool(cfg.overwrite)))


def build_cache(cfg: DictConfig) -> dict:
    """Build or resume the store at cfg.cache.path; returns a summary (rank 0's, for all ranks)."""
    ctx = distributed.setup(cfg.cache.device, int(cfg.num_threads), cfg.cache.num_workers)
    manifest = load_manifest(split_dir(cfg, "train"))
    aug = augment_config(cfg)
    # Everything the configuration decides is checked before the store exists: a refused run creates nothing
    # (no store recording a value the corrected run would then be refused for).
    teacher = create_teacher(cfg.teacher, manifest.num_classes)
    runner = TeacherRunner(teacher, cfg.teacher, ctx.device)
    runner.check(aug.image_size)
    if ctx.is_main:
        warn_if_random(cfg.teacher, cfg.data.source)
    loader = run_loader(cfg, "train", aug, batch_size=cfg.cache.batch_size, num_workers=cfg.cache.num_workers,
                        ctx=ctx)  # units(): every rank names its own units, the rank split is not used
    path = storage.as_path(cfg.cache.path)  # local, or s3://bucket/prefix (pipeline.storage)
    if ctx.is_main:
        _create_or_resume(cfg, path, manifest, aug, teacher)
    distributed.barrier()
    store = CacheStore.open(path, mode="r+")
    # Rank 0 holds the writer lease; every other rank (on any node) commits only while rank 0 still holds it.
    pending, holder = distributed.broadcast_object(
        (store.pending_units(), getattr(lease.held(path), "record", None)) if ctx.is_main else None)
    if not ctx.is_main and holder:
        lease.cover(path, holder)
    work = group_units(pending, store.num_seeds, cfg.cache.get("seeds_per_pass"))
    mine_work = [w for w in work if column_owner(w[1], ctx.world_size) == ctx.rank]  # whole shards: their files
    mine = [(s, k) for seeds, k in mine_work for s in seeds]  # the (seed, shard) chunks this rank commits
    total_units = store.num_seeds * store.num_shards

    assembler = UnitAssembler(store, manifest, mine, manifest.num_classes)
    views = units_done = 0
    t0 = time.perf_counter()
    # In views, per batch (a unit can take minutes); rank 0's share of the work under torchrun.
    where = f" [rank 0 of {ctx.world_size}]" if ctx.world_size > 1 else ""
    bar = progress(sum(len(seeds) * manifest.shards[k].count for seeds, k in mine_work), unit="img",
                   desc=f"teacher cache{where}", disable=not ctx.is_main)

    def add(batch: dict, logits: ReadBack) -> None:
        nonlocal views, units_done
        rows = logits.numpy()
        units_done += assembler.add(batch["seed"].numpy(), batch["index"].numpy(), rows,
                                    batch["digest"].numpy().astype(np.uint32))
        views += len(rows)
        bar.set_postfix(units=f"{units_done}/{len(mine)}", refresh=False)
        bar.update(len(rows))

    # On CUDA a batch's rows are added once the next batch is queued on the device, so the teacher runs while
    # this process fetches (and, batched, renders) the next views: the same rows in the same order, one batch
    # later. On the CPU the forward has finished when it returns: its rows are added at once.
    previous = None
    try:
        for batch in loader.units(mine_work):
            logits = ReadBack(runner(batch["image"]))
            if previous is not None:
                add(*previous)
            # keep only what add() reads, so the batch's images (on the device, batched) are freed now
            previous = ({k: batch[k] for k in ("seed", "index", "digest")}, logits)
            if logits.event is None:
                add(*previous)
                previous = None
        if previous is not None:
            add(*previous)
    finally:
        bar.close()
    assembler.close()
    seconds = time.perf_counter() - t0
    totals = distributed.all_reduce_sum([views, seconds, len(mine)], ctx.device)
    distributed.barrier()
    store.release_lease()  # rank 0's writer lease (CacheStore.create took it), now that every rank has committed
    summary = {
        "units_total": total_units,
        "units_computed": int(totals[2]),
        "units_skipped": total_units - len(pending),
        "views_written": int(totals[0]),
        # Throughput of the whole job: views over the slowest rank's wall time is not known here; use the mean.
        "img_per_s": totals[0] / max(totals[1] / ctx.world_size, 1e-9),
        "seconds": totals[1] / ctx.world_size,
    }
    if ctx.is_main:
        summary.update(store.bytes_per_view() | {"path": str(path)})
    return summary


class ReadBack:
    """Device logits on their way to the host: on CUDA the copy is queued behind the forward that makes them
    (into pinned memory, non-blocking) and waited for only in numpy(), so queuing it does not stall the host."""

    def __init__(self, logits: torch.Tensor):
        self.event = None
        if logits.is_cuda:
            self.host = logits.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = logits

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


def format_summary(s: dict) -> str:
    lines = [f"teacher cache {s.get('path', '')}: {s['views_written']} views written "
             f"({s['units_computed']} units computed, {s['units_skipped']} already done, of {s['units_total']}), "
             f"{s['img_per_s']:.1f} img/s"]
    if "total" in s:
        lines.append(f"  bytes per view on disk: {s['total']:.1f}")
    return "\n".join(lines)
