"""The cache at ImageNet-1k scale: a synthetic teacher through the real store and commit path.

    python -m bench.scale [--n 1281167] [--seeds 1] [--writers 1 2] [--modes soft hard] [--s3-n 20000]
                          [--scan-seeds 30] [--verify-fraction 0.05] [--out bench/out/scale.json]

Shape: N samples in shards of 1000, 1000 classes, K=10 (soft) or K=0 (hard-only), S seed indices. Every unit is
written by ``CacheStore.write_unit`` (top-K selection, codecs, checksum record, commit marker, store-id and lease
checks) from W writer processes covered by the creating process's writer lease, exactly as stage one's ranks;
the teacher is a bank of synthetic logits (bench.bench_storage.synthetic_logits), so only the cache is measured.
Per store (local disk, and a local S3 server: moto, 127.0.0.1, at ``--s3-n`` samples):

- write: views/s per writer and in total, views per CPU second of each writer (what it would run at on a core
  of its own: the box may be shared), and the share of it spent computing the targets (top-K selection,
  logsumexp: pipeline.cache.targets) rather than in the store; the targets of 1000 views alone, and the full
  stable sort they replaced, in CPU ms;
- read: targets/s (and per CPU second) per reader rank in the student's access pattern (rank r of R reads shards r::R of a seed
  through pipeline.cache.reader.CacheTargets: commit marker, crc32c codec, tagged checksum record of the mode's
  fields; every digest compared with the written one, as the loader does);
- open: what stage two's start-up reads (lease probe, group and array metadata, provenance check), and the same
  once Zarr's consolidated metadata is written (measured last: it is not part of the store format);
- resume: the scan ``pending_units`` (one read of ``done``); resume's default check (pipeline.cache.integrity:
  every done unit's checksum record, tag and files, and the bytes of a sample); the full check of a unit's bytes
  (verify_cache, cache.resume_check=full) per unit, on a random ``--verify-fraction`` of the units;
- files (objects) and bytes per seed, and per (seed, shard) unit.

``--scan-seeds`` (300): a hard-only store of that many seeds at N whose markers and tagged checksum records are
all set and whose files exist (empty: no targets are computed): the resume scan and resume's metadata check
measured at ImageNet scale (384,600 units at full N). Other numbers for S=300 are derived: files from the layout's
file shapes (checked against the measured store's count), bytes from the measured bytes per view, the bytes checks
from the measured time per unit; the JSON says which numbers are measured and which derived.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_storage import DEIT_EPOCHS, IMAGENET_N, SHARD, synthetic_logits
from bench.common import REPO, machine, save_json
from bench.scale_probes import check_time, files, metadata_time, resume_check_time, scan_time
from bench.scale_table import table

CLASSES = 1000
TOPK = {"soft": 10, "hard": 0}
BANK = 4  # distinct synthetic units of logits per writer (generating them is not the cache's cost)
GOALS = {"write_views_s_per_writer": 40_000, "read_targets_s_per_rank": 100_000, "open_s": 2.0,
         "resume_scan_s_384k": 10.0, "files_per_unit": 1.0}


def shard_counts(n: int) -> list[int]:
    return [SHARD] * (n // SHARD) + ([n % SHARD] if n % SHARD else [])


def digests(s: int, k: int, count: int) -> np.ndarray:
    """The synthetic views' digests of unit (s, k): what the replay would compute, known to the reader."""
    return np.random.default_rng([s, k, 7]).integers(0, 2**32, count, dtype=np.uint32)


def provenance(mode: str, n: int) -> dict:
    from pipeline.replay.contract import CONTRACT_VERSION

    return {"teacher": {"name": "synthetic", "weights_sha256": "0", "num_classes": CLASSES},
            "data_fingerprint": f"synthetic-{n}", "augment_hash": "bench", "run_seed": 0, "num_classes": CLASSES,
            "topk": TOPK[mode], "contract_version": CONTRACT_VERSION}


def create(path, mode: str, n: int, seeds: int):
    """CacheStore.create (takes the writer lease, as stage one's rank 0); returns (store, lease record)."""
    from pipeline.cache import lease
    from pipeline.cache.store import CacheStore

    store = CacheStore.create(path, provenance=provenance(mode, n), num_seeds=seeds, shard_counts=shard_counts(n),
                              shard_size=SHARD, num_classes=CLASSES, topk=TOPK[mode])
    return store, lease.held(path).record


def write_units(path, record: dict, units: list, ready, results) -> None:
    """One writer process (a stage-one rank): opens the store "r+" under the creator's lease and commits its
    units; reports {"units", "views", "seconds", "targets_seconds"}."""
    from pipeline.cache import lease
    from pipeline.cache.store import CacheStore

    torch.set_num_threads(1)  # one core per writer, as a rank's writer thread
    lease.cover(path, record)
    store = CacheStore.open(path, "r+")
    bank = synthetic_logits(np.random.default_rng(os.getpid()), BANK * SHARD, CLASSES).reshape(BANK, SHARD, -1)
    spent = [0.0]  # the targets' share of the writes (top-K sort, logsumexp): write_unit's own call, timed

    def timed(logits, compute=store.targets_from_logits):
        t = time.perf_counter()
        out = compute(logits)
        spent[0] += time.perf_counter() - t
        return out
    store.targets_from_logits = timed
    ready.wait()
    t0, c0, views = time.perf_counter(), time.process_time(), 0
    for j, (s, k) in enumerate(units):
        count = store.shard_counts[k]
        store.write_unit(s, k, bank[j % BANK, :count], digests(s, k, count))
        views += count
    results.put({"units": len(units), "views": views, "seconds": time.perf_counter() - t0,
                 "cpu_seconds": time.process_time() - c0, "targets_seconds": spent[0]})


def targets_time(reps: int = 5) -> dict:
    """CPU ms per 1000 views (one thread, best of ``reps``) of the cache's targets (pipeline.cache.targets) and of
    the full stable sort of every row that the top-K selection replaced (its output is the same, bit for bit)."""
    from pipeline.cache.targets import stored_arrays

    torch.set_num_threads(1)
    x = synthetic_logits(np.random.default_rng(0), SHARD, CLASSES)
    t = torch.from_numpy(x)

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            c0 = time.process_time()
            fn()
            times.append(time.process_time() - c0)
        return min(times) * 1e3 * 1000 / SHARD
    return {"targets_ms": best(lambda: stored_arrays(x, TOPK["soft"], np.dtype(np.uint16))),
            "full_sort_ms": best(lambda: torch.sort(t, dim=-1, descending=True, stable=True))}


def read_units(path, fields: tuple, units: list, ready, results) -> None:
    """One reader process (a student rank): CacheTargets over its units, every digest compared."""
    from pipeline.cache.reader import CacheTargets

    hook = CacheTargets(path, fields)
    hook.store()  # open before the clock: the open is measured on its own
    ready.wait()
    t0, c0, views = time.perf_counter(), time.process_time(), 0
    for s, k in units:
        rows = hook(s, k)
        if not np.array_equal(rows["digest"], digests(s, k, len(rows["digest"]))):
            raise RuntimeError(f"{path}: unit (seed {s}, shard {k}): digests differ from the written ones")
        views += len(rows["digest"])
    results.put({"units": len(units), "views": views, "seconds": time.perf_counter() - t0,
                 "cpu_seconds": time.process_time() - c0})


def run_procs(target, path, args_per_proc: list) -> dict:
    """Start one spawned process per argument tuple, release them together, and time them: per-process results
    and the total wall time from the release to the last one's end."""
    ctx = mp.get_context("spawn")  # obstore's runtime does not survive a fork
    ready, results = ctx.Barrier(len(args_per_proc) + 1), ctx.Queue()
    procs = [ctx.Process(target=target, args=(str(path), *a, ready, results)) for a in args_per_proc]
    for p in procs:
        p.start()
    ready.wait()
    t0 = time.perf_counter()
    per = []
    while len(per) < len(procs):
        try:
            per.append(results.get(timeout=1))
        except queue.Empty:  # a process that died reports nothing: stop rather than wait for it forever
            dead = [p.exitcode for p in procs if p.exitcode]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"{target.__name__} process exited with {dead[0]}") from None
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{target.__name__} process exited with {p.exitcode}")
    views = sum(r["views"] for r in per)
    return {"processes": len(procs), "per_process": per, "wall_seconds": wall, "views_s_total": views / wall,
            "views_s_per_process": [r["views"] / r["seconds"] for r in per],
            "views_per_cpu_s": [r["views"] / r["cpu_seconds"] for r in per]}  # a core each: the box is shared


def write(path, mode: str, n: int, seeds: int, writers: int) -> dict:
    """Create the store and commit every unit with ``writers`` processes (units dealt round-robin)."""
    from pipeline.cache import lease
    from pipeline.cache.layout import column_owner

    store, record = create(path, mode, n, seeds)
    units = store.pending_units()  # dealt as stage one deals them: whole shards (their files) to one writer each
    res = run_procs(write_units, path, [(record, [u for u in units if column_owner(u[1], writers) == r])
                                        for r in range(writers)])
    lease.release(path)
    res["targets_share"] = float(np.mean([r["targets_seconds"] / r["seconds"] for r in res["per_process"]]))
    return res


def read(path, mode: str, readers: int, seed: int = 0) -> dict:
    """Every unit of one seed index, dealt to ``readers`` ranks as the student's loader deals shards."""
    from pipeline.cache.reader import MODE_FIELDS
    from pipeline.cache.store import CacheStore

    shards = CacheStore.open(path).num_shards
    units = [(seed, k) for k in range(shards)]
    return run_procs(read_units, path, [(MODE_FIELDS[mode], units[r::readers]) for r in range(readers)])


def open_time(path, n: int, mode: str, reps: int = 3) -> dict:
    """Stage two's start-up reads (pipeline.cache.reader.open_cache without a manifest): the lease probe, the
    store's metadata and the provenance check; best and median of ``reps`` fresh opens."""
    from pipeline.cache import lease
    from pipeline.cache.store import CacheStore

    want = provenance(mode, n)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        lease.refuse_if_written(path, "bench")
        CacheStore.open(path).check_compatible(want)
        times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "median_s": float(np.median(times))}


def open_consolidated(path, n: int, mode: str) -> dict:
    """:func:`open_time` once Zarr's consolidated metadata (every array's metadata in the group's zarr.json) is
    written into the store: what consolidating would save stage two's start-up. Last, as it changes the store."""
    import warnings

    import zarr

    from pipeline import storage

    with warnings.catch_warnings():  # "not part of the Zarr format 3 specification": measured, not adopted
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(storage.zarr_store(storage.as_path(path), "r+"))
        return open_time(path, n, mode)


def mark_all_done(path, n: int, seeds: int) -> None:
    """A hard-only store of ``seeds`` x shards units whose markers and tagged checksum records are all set and
    whose files exist (empty: the targets stay uncomputed): what resume's scan and metadata check read after a
    finished build. Records and markers are set in batched writes; only the scan and the check are timed."""
    from pipeline.cache import lease
    from pipeline.cache.layout import file_coords, seeds_per_file, unit_tag

    store, _ = create(path, "hard", n, seeds)
    records = np.ones(store._arrays["checksums"].shape, np.uint32)  # bench only: a finished build's records ...
    for s in range(seeds):
        records[s, :, -1] = [unit_tag(store.key, s, k) for k in range(store.num_shards)]
    store._arrays["checksums"][...] = records
    for name in store.fields:  # ... its files (empty) ...
        arr = store._arrays[name]
        for s in range(0, seeds, seeds_per_file(seeds)):
            for k in range(store.num_shards):
                f = Path(path) / name / arr.metadata.encode_chunk_key(file_coords(name, store.layout, s, k))
                f.parent.mkdir(parents=True, exist_ok=True)
                f.touch()
    store._arrays["done"][...] = True  # ... and its markers, without computing it
    lease.release(path)


def measure(root, mode: str, n: int, seeds: int, writers: list[int], readers: list[int], fraction: float) -> dict:
    """One layout on one backend: a build per writer count (the last one kept for the rest), then read, open,
    resume scan, verify and files."""
    from pipeline import storage

    res = {"mode": mode, "N": n, "seeds": seeds, "shards": len(shard_counts(n)), "write": {}, "read": {}}
    path = None
    for w in writers:
        if path is not None:
            storage.rmtree(storage.as_path(path))
        path = f"{root}/{mode}-w{w}.zarr"
        res["write"][w] = write(path, mode, n, seeds, w)
    for r in readers:
        res["read"][r] = read(path, mode, r)
    res["open"] = open_time(path, n, mode)
    res["scan"] = scan_time(path)
    res["resume_check"] = resume_check_time(path)
    res["check"] = check_time(path, fraction)
    res["files"] = files(path, seeds, res["shards"])
    res["open_consolidated"] = open_consolidated(path, n, mode)
    return res


def layout_files(mode: str, n: int, seeds: int) -> int:
    """Chunk files (objects) of a complete store of this shape, from the layout's chunk and file shapes
    (pipeline.cache.layout.array_specs): every array has one file per shard column and per file-height of seeds."""
    from pipeline.cache.layout import array_specs, index_dtype

    counts = shard_counts(n)
    layout = {"num_seeds": seeds, "shard_size": SHARD, "shard_counts": counts, "N": n, "num_classes": CLASSES,
              "topk": TOPK[mode], "store_logits": False, "index_dtype": index_dtype(CLASSES).name}
    height = [(spec.get("shards") or spec["chunks"])[0] for spec in array_specs(layout).values()]
    return len(counts) * sum(-(-seeds // h) for h in height)


def imagenet(res: dict, mode: str, seeds: int = DEIT_EPOCHS) -> dict:
    """S=300 at ImageNet-1k's N, derived (not measured): files from the layout (checked against the measured
    store by ``layout_files_match``), bytes from the measured bytes per view, the full check (every unit's bytes)
    and the sample of resume's default check from the measured time per unit (the resume scan and the metadata
    check are measured at scale instead: ``--scan-seeds``)."""
    from pipeline.cache.integrity import RESUME_SAMPLE

    units = seeds * len(shard_counts(IMAGENET_N))
    files = layout_files(mode, IMAGENET_N, seeds)
    return {"derived": True, "seeds": seeds, "units": units, "chunk_files": files, "files_per_unit": files / units,
            "GB": res["files"]["bytes_per_seed"] / res["N"] * IMAGENET_N * seeds / 1e9,
            "integrity_pass_s": res["check"]["ms_per_unit"] * units / 1e3,
            "resume_sample_s": res["check"]["ms_per_unit"] * RESUME_SAMPLE / 1e3,
            "layout_files_match": layout_files(mode, res["N"], res["seeds"]) == res["files"]["chunk_files"]}


def run(args) -> dict:
    """Every measurement of the command line; disk under ``args.tmp``, S3 on a moto server of its own."""
    out = {"machine": machine(), "load_avg_start": os.getloadavg()[0], "goals": GOALS, "disk": {}, "s3": {}}
    out["targets"] = targets_time()
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=args.tmp) as tmp:
        for mode in args.modes:
            out["disk"][mode] = measure(tmp, mode, args.n, args.seeds, args.writers, args.readers, args.verify_fraction)
            out["disk"][mode]["imagenet_S300"] = imagenet(out["disk"][mode], mode)
        if args.scan_seeds:
            mark_all_done(f"{tmp}/scan.zarr", args.n, args.scan_seeds)
            out["disk_scan"] = scan_time(f"{tmp}/scan.zarr")
            out["disk_scan"]["metadata"] = metadata_time(f"{tmp}/scan.zarr")
    if args.s3_n:
        from bench.bench_storage_s3 import start_moto

        server = start_moto()  # moto on 127.0.0.1, its own process; AWS_* point at it (bucket "bench")
        try:
            for mode in args.modes:
                out["s3"][mode] = measure("s3://bench/scale", mode, args.s3_n, args.seeds, args.writers,
                                          args.readers, args.verify_fraction)
        finally:
            server.kill()
            server.wait()
    out["load_avg_end"] = os.getloadavg()[0]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=IMAGENET_N, help="samples (ImageNet-1k: 1,281,167)")
    ap.add_argument("--seeds", type=int, default=1, help="seed indices S of each measured store")
    ap.add_argument("--modes", nargs="+", default=["hard", "soft"], choices=sorted(TOPK))
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 2], help="writer process counts, one build each")
    ap.add_argument("--readers", type=int, nargs="+", default=[1, 2], help="reader rank counts")
    ap.add_argument("--s3-n", type=int, default=20_000, help="samples of the S3 stores (0: no S3)")
    ap.add_argument("--scan-seeds", type=int, default=DEIT_EPOCHS,
                    help="seeds of the markers-only scan store (0: none)")
    ap.add_argument("--verify-fraction", type=float, default=0.05)
    ap.add_argument("--tmp", default=None, help="where the disk stores go (default: the system's temp dir)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "scale.json")
    args = ap.parse_args(argv)
    res = run(args)
    save_json(args.out, res)
    md = table(res)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return res


if __name__ == "__main__":
    main()
