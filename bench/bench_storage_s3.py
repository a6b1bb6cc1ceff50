"""Reading shards and the cache store from a local S3 server (moto, a separate process) vs the local disk.

    python -m bench.bench_storage_s3 [--shards 16] [--per-shard 128] [--image-kb 110] [--units 8] [--latency-ms 50]

- shards: ``iter_shard`` over every shard (the loaders' path: tar parse + sha256 as it streams), images of
  ``--image-kb`` random bytes (ImageNet's mean JPEG is ~110 KB), with the read-ahead (whole objects fetched
  ahead in threads, pipeline.storage.ReadAhead) and without it (depth 0: one GET after another), on localhost
  and with a simulated first-byte latency per GET (``--latency-ms``, a sleep before each GET: a remote bucket);
- cache: ``CacheStore.read_unit`` of every unit (soft fields + digest, checksums verified), 1000 classes, K=5,
  1000 views per unit, as stage two reads it.

MB/s counts the bytes read (tar bytes; chunk bytes), views/s the samples (shards) or cached views (cache).
moto is pure Python and single-process: a floor for a real S3-compatible server, not a ceiling.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, save_json


def start_moto():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket="bench")
            return proc
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def bench_shards(root, manifest_dir, ahead: int, latency_ms: float = 0.0) -> dict:
    from pipeline import storage
    from pipeline.data.shards import iter_shard, load_manifest

    storage.READ_AHEAD.depth = ahead
    m = load_manifest(manifest_dir)
    read = storage.ObjectPath.read_bytes

    def slow(self):  # a simulated first-byte latency per GET (a remote bucket), on top of localhost's
        time.sleep(latency_ms / 1000)
        return read(self)
    storage.ObjectPath.read_bytes = slow
    try:
        t0, n = time.perf_counter(), 0
        for k, entry in enumerate(m.shards):
            for _ in iter_shard(m.shard_path(k), entry, m):
                n += 1
        dt = time.perf_counter() - t0
    finally:
        storage.ObjectPath.read_bytes = read
    nbytes = sum((Path(root) / s.name).stat().st_size for s in m.shards)
    return {"MB_s": nbytes / dt / 1e6, "views_s": n / dt, "seconds": dt, "MB": nbytes / 1e6}


def bench_cache(path, local: Path) -> dict:
    from pipeline import storage
    from pipeline.cache.store import CacheStore

    store = CacheStore.open(path)
    fields = ("topk_values", "topk_indices", "logsumexp", "digest")
    t0, views = time.perf_counter(), 0
    for s in range(store.num_seeds):
        for k in range(store.num_shards):
            views += len(store.read_unit(s, k, fields)["digest"])
    dt = time.perf_counter() - t0
    nbytes = storage.tree_size(local)
    return {"MB_s": nbytes / dt / 1e6, "views_s": views / dt, "seconds": dt, "MB": nbytes / 1e6}


def run(shards: int, per_shard: int, image_kb: int, units: int, latency_ms: float) -> dict:
    from pipeline import storage
    from pipeline.cache import lease
    from pipeline.cache.store import CacheStore
    from pipeline.data.shard_writer import write_shards
    from pipeline.replay.contract import CONTRACT_VERSION

    server = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            rng = np.random.default_rng(0)
            n = shards * per_shard
            samples = [(rng.bytes(image_kb * 1000), "jpg", int(i % 10)) for i in range(n)]
            write_shards(samples, tmp / "train", shard_size=per_shard, num_classes=10,
                         class_names=[str(c) for c in range(10)], source={"bench": True}, n=n)
            url = storage.as_path("s3://bench/shards/train")
            storage.upload_tree(tmp / "train", url, last="manifest.json")

            path = tmp / "c.zarr"
            store = CacheStore.create(path, provenance={"contract_version": CONTRACT_VERSION}, num_seeds=2,
                                      shard_counts=[1000] * (units // 2), shard_size=1000, num_classes=1000, topk=5)
            for s in range(2):
                for k in range(units // 2):
                    x = rng.normal(0, 2, (1000, 1000)).astype(np.float32)
                    store.write_unit(s, k, x, rng.integers(0, 2**32, 1000, dtype=np.uint32))
            lease.release(path)
            storage.upload_tree(path, storage.as_path("s3://bench/cache/c.zarr"))

            res = {
                "shards_local": bench_shards(tmp / "train", tmp / "train", 4),
                "shards_s3_read_ahead": bench_shards(tmp / "train", str(url), 4),
                "shards_s3_no_read_ahead": bench_shards(tmp / "train", str(url), 0),
                f"shards_s3_{latency_ms:g}ms_read_ahead": bench_shards(tmp / "train", str(url), 4, latency_ms),
                f"shards_s3_{latency_ms:g}ms_no_read_ahead": bench_shards(tmp / "train", str(url), 0, latency_ms),
                "cache_local": bench_cache(path, path),
                "cache_s3": bench_cache("s3://bench/cache/c.zarr", path),
            }
    finally:
        server.kill()
        server.wait()
    res["setup"] = {"shards": shards, "per_shard": per_shard, "image_kb": image_kb, "cache_units": units,
                    "latency_ms": latency_ms,
                    "machine": f"{os.uname().machine}, {os.cpu_count()} cores"}
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--image-kb", type=int, default=110)
    ap.add_argument("--latency-ms", type=float, default=50.0, help="simulated first-byte latency per GET")
    ap.add_argument("--units", type=int, default=8, help="cache units of 1000 views (2 seeds)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "storage_s3.json")
    a = ap.parse_args(argv)
    res = run(a.shards, a.per_shard, a.image_kb, a.units, a.latency_ms)
    for name, r in res.items():
        if name != "setup":
            print(f"{name:26s} {r['MB_s']:8.1f} MB/s {r['views_s']:10.0f} views/s  ({r['MB']:.1f} MB, "
                  f"{r['seconds']:.2f} s)")
    save_json(a.out, res)
    return res


if __name__ == "__main__":
    main()
