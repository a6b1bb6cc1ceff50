"""What bench.scale times on a finished store: the resume scan, resume's checks, verify_cache's check of a unit's
bytes, and the files and bytes the store holds. Each opens the store afresh, as the stage it stands for does."""

from __future__ import annotations

import os
import time

import numpy as np


def scan_time(path) -> dict:
    """Resume's first step: the pending units among all (one read of ``done``, on a freshly opened store)."""
    from pipeline.cache.store import CacheStore

    t0 = time.perf_counter()
    store = CacheStore.open(path, "r")
    pending = store.pending_units()
    dt = time.perf_counter() - t0
    units = store.num_seeds * store.num_shards
    return {"units": units, "pending": len(pending), "seconds": dt, "us_per_unit": dt / units * 1e6}


def check_time(path, fraction: float, seed: int = 0) -> dict:
    """The integrity check (no teacher: chunks, tagged checksums, invariants) of a random ``fraction`` of the done
    units: verify_cache's check, and what resume runs over every done unit."""
    from pipeline.cache import integrity
    from pipeline.cache.store import CacheStore

    store = CacheStore.open(path, "r")
    done = list(zip(*np.nonzero(store.done_mask())))
    pick = np.random.default_rng(seed).permutation(len(done))[:max(1, round(fraction * len(done)))]
    t0 = time.perf_counter()
    bad = [u for u in (done[i] for i in pick) if integrity.unit_problems(store, int(u[0]), int(u[1]))]
    dt = time.perf_counter() - t0
    if bad:
        raise RuntimeError(f"{path}: {len(bad)} damaged unit(s) in a fresh build, e.g. {bad[0]}")
    return {"units": len(pick), "seconds": dt, "ms_per_unit": dt / len(pick) * 1e3}


def resume_check_time(path) -> dict:
    """Resume's default check (pipeline.cache.integrity.check_store with the resume's sample), on a fresh open."""
    from pipeline.cache import integrity
    from pipeline.cache.store import CacheStore

    t0 = time.perf_counter()
    report = integrity.check_store(CacheStore.open(path, "r"), sample=integrity.RESUME_SAMPLE)
    dt = time.perf_counter() - t0
    if report["damaged"]:
        raise RuntimeError(f"{path}: damaged unit(s) in a fresh build: {report['damaged'][:1]}")
    return {"units": report["units_done"], "bytes_checked": report["units_checked"], "seconds": dt}


def metadata_time(path) -> dict:
    """Resume's metadata check alone (every done unit's record, tag and files), on a fresh open."""
    from pipeline.cache import integrity
    from pipeline.cache.store import CacheStore

    t0 = time.perf_counter()
    store = CacheStore.open(path, "r")
    suspects = integrity.metadata_suspects(store, store.done_mask())
    dt = time.perf_counter() - t0
    if suspects:
        raise RuntimeError(f"{path}: {len(suspects)} unit(s) fail the metadata check, e.g. {min(suspects)}")
    units = store.num_seeds * store.num_shards
    return {"units": units, "seconds": dt, "us_per_unit": dt / units * 1e6}


def files(path, seeds: int, shards: int) -> dict:
    """Files (objects) and bytes of the store, per seed index and per unit; metadata (zarr.json) counted apart."""
    from pipeline import storage

    p = storage.as_path(path)
    if storage.is_url(p):
        entries = [(k, size) for k, size in p.walk_objects()]
    else:
        entries = [(os.path.join(d, f), os.stat(os.path.join(d, f)).st_size) for d, _, fs in os.walk(p) for f in fs]
    meta = [e for e in entries if e[0].endswith("zarr.json")]
    data = [e for e in entries if not e[0].endswith("zarr.json")]
    nbytes = sum(size for _, size in data)
    out = {"files": len(entries), "metadata_files": len(meta), "chunk_files": len(data), "bytes": nbytes,
           "files_per_seed": len(data) / seeds, "files_per_unit": len(data) / (seeds * shards),
           "bytes_per_seed": nbytes / seeds}
    if not storage.is_url(p):
        out["allocated_bytes_per_seed"] = storage.tree_size(p, allocated=True) / seeds
    return out
