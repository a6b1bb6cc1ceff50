"""Stage one: replay views unit by unit (seed index, shard), run the teacher, write each unit's Zarr chunk.

Units go round-robin to ranks; a rank owns its units' chunks outright, so concurrent writers never share a
chunk. A unit's `done` marker is written last, so a killed run resumes by recomputing the units whose marker
is false. The teacher never waits on Zarr: finished units go to a writer thread.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import pipeline
from pipeline import distributed
from pipeline.cache_store import CacheStore, library_versions
from pipeline.loader import ViewLoader
from pipeline.replay import AugmentConfig
from pipeline.shards import Manifest, load_manifest
from pipeline.teacher import TeacherRunner, create_teacher, teacher_provenance


def augment_config(cfg: DictConfig) -> AugmentConfig:
    return AugmentConfig.from_cfg(OmegaConf.to_container(cfg.augment, resolve=True), cfg.data.image_size,
                                  cfg.data.get("crop_pct", 1.0))


def train_dir(cfg: DictConfig) -> Path:
    return Path(cfg.data.shards) / "train"


def provenance(cfg: DictConfig, manifest: Manifest, aug: AugmentConfig, teacher) -> dict:
    return {
        "teacher": teacher_provenance(cfg.teacher, teacher, manifest.num_classes),
        "data_fingerprint": manifest.fingerprint,
        "N": manifest.n,
        "augment": aug.canonical(),
        "augment_hash": aug.hash(),
        "run_seed": int(cfg.run_seed),
        "num_seeds": int(cfg.cache.num_seeds),
        "topk": int(cfg.cache.topk),
        "num_classes": manifest.num_classes,
        "versions": library_versions(),
        "project_version": pipeline.__version__,
    }


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
        shard = index // self.manifest.shard_size
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
                raise RuntimeError(f"cache writer failed: {self.error}") from self.error
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
            raise RuntimeError(f"cache writer failed: {self.error}") from self.error


def build_cache(cfg: DictConfig) -> dict:
    """Build or resume the store at cfg.cache.path; returns a summary (rank 0's, for all ranks)."""
    ctx = distributed.setup(cfg.train.get("device", "auto"), cfg.get("num_threads", 0), cfg.cache.num_workers)
    manifest = load_manifest(train_dir(cfg))
    aug = augment_config(cfg)
    teacher = create_teacher(cfg.teacher, manifest.num_classes)
    path = Path(cfg.cache.path)
    if ctx.is_main:
        CacheStore.create(path, provenance=provenance(cfg, manifest, aug, teacher),
                          num_seeds=int(cfg.cache.num_seeds), shard_counts=[s.count for s in manifest.shards],
                          shard_size=manifest.shard_size, num_classes=manifest.num_classes,
                          topk=int(cfg.cache.topk), store_logits=bool(cfg.cache.store_logits),
                          overwrite=bool(cfg.overwrite))
    distributed.barrier()
    store = CacheStore.open(path, mode="r+")
    pending = distributed.broadcast_object(store.pending_units() if ctx.is_main else None)
    mine = pending[ctx.rank::ctx.world_size]
    total_units = store.num_seeds * store.num_shards

    runner = TeacherRunner(teacher, cfg.teacher, ctx.device)
    loader = ViewLoader(train_dir(cfg), aug, run_seed=int(cfg.run_seed), batch_size=int(cfg.cache.batch_size),
                        num_workers=int(cfg.cache.num_workers), train=True,
                        pin_memory=ctx.device.type == "cuda")
    assembler = UnitAssembler(store, manifest, mine, manifest.num_classes)
    views = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(mine), unit="unit", desc=f"teacher cache [rank {ctx.rank}]", file=sys.stderr,
               dynamic_ncols=True, disable=not ctx.is_main and ctx.world_size > 1)
    try:
        for batch in loader.units(mine):
            logits = runner(batch["image"]).float().cpu().numpy()
            done = assembler.add(batch["seed"].numpy(), batch["index"].numpy(), logits,
                                 batch["digest"].numpy().astype(np.uint32))
            views += len(logits)
            bar.update(done)
            bar.set_postfix(img_s=f"{views / (time.perf_counter() - t0):.0f}")
    finally:
        bar.close()
    assembler.close()
    seconds = time.perf_counter() - t0
    totals = distributed.all_reduce_sum([views, seconds, len(mine)], ctx.device)
    distributed.barrier()
    summary = {
        "units_total": total_units,
        "units_computed": int(totals[2]),
        "units_skipped": total_units - len(pending),
        "views_written": int(totals[0]),
        # Throughput of the whole job: views over the slowest rank's wall time is not known here; use the mean.
        "img_per_s": totals[0] / max(totals[1] / ctx.world_size, 1e-9),
    }
    if ctx.is_main:
        summary.update(store.bytes_per_view() | {"path": str(path)})
    return summary


def format_summary(s: dict) -> str:
    lines = [f"teacher cache {s.get('path', '')}: {s['views_written']} views written "
             f"({s['units_computed']} units computed, {s['units_skipped']} already done, of {s['units_total']}), "
             f"{s['img_per_s']:.1f} img/s"]
    if "total" in s:
        lines.append(f"  bytes per view on disk: {s['total']:.1f}")
    return "\n".join(lines)


def verify_cache(cfg: DictConfig, fraction: float, seed: int = 0) -> dict:
    """Re-check: replay a random subset of done units, rerun the teacher, compare with the store."""
    ctx = distributed.setup(cfg.train.get("device", "auto"), cfg.get("num_threads", 0), cfg.cache.num_workers)
    manifest = load_manifest(train_dir(cfg))
    aug = augment_config(cfg)
    teacher = create_teacher(cfg.teacher, manifest.num_classes)
    store = CacheStore.open(cfg.cache.path)
    expected = provenance(cfg, manifest, aug, teacher)
    for warning in store.check_compatible(expected, fields=("data_fingerprint", "augment_hash", "run_seed",
                                                            "num_classes")):
        print(f"warning: {warning}", file=sys.stderr)
    ours, theirs = expected["teacher"]["weights_sha256"], store.provenance["teacher"]["weights_sha256"]
    if ours != theirs:
        raise ValueError(f"{store.path}: built with teacher weights {theirs[:12]}, config loads {ours[:12]}: "
                         f"a re-check needs the same teacher")
    pending = set(store.pending_units())  # one read of the markers
    done = [(s, k) for s in range(store.num_seeds) for k in range(store.num_shards) if (s, k) not in pending]
    rng = np.random.default_rng(seed)
    count = min(len(done), max(1, int(round(fraction * len(done)))))
    chosen = sorted(done[i] for i in rng.choice(len(done), size=count, replace=False))
    runner = TeacherRunner(teacher, cfg.teacher, ctx.device)
    loader = ViewLoader(train_dir(cfg), aug, run_seed=int(cfg.run_seed), batch_size=int(cfg.cache.batch_size),
                        num_workers=int(cfg.cache.num_workers))
    stored = {u: store.read_unit(*u) for u in chosen}
    views = agree = digest_bad = 0
    max_diff = 0.0
    for batch in tqdm(loader.units(chosen), desc="verify cache", unit="batch", file=sys.stderr):
        logits = runner(batch["image"]).float().cpu()
        for row, (s, i) in enumerate(zip(batch["seed"].tolist(), batch["index"].tolist())):
            k = manifest.shard_of(i)
            rows, pos = stored[(s, k)], i - manifest.shards[k].first
            digest_bad += int(rows["digest"][pos]) != int(batch["digest"][row])
            agree += int(rows["argmax"][pos]) == int(logits[row].argmax())
            if "topk_values" in rows:
                idx = torch.as_tensor(rows["topk_indices"][pos].astype(np.int64))
                diff = (logits[row][idx] - torch.as_tensor(rows["topk_values"][pos].astype(np.float32))).abs()
                max_diff = max(max_diff, float(diff.max()))
            views += 1
    result = {"units_checked": len(chosen), "views_checked": views, "argmax_agreement": agree / max(views, 1),
              "max_topk_diff": max_diff, "digest_mismatches": digest_bad,
              "tolerance": float(cfg.cache.tolerance)}
    result["ok"] = bool(views and agree == views and digest_bad == 0 and max_diff <= cfg.cache.tolerance)
    return result
