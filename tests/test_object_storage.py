"""Shards and the cache store on object storage (s3://), against a real S3 server (moto's, on localhost):
the toy pipeline on a bucket, kill -9 and resume, the lease through conditional puts, integrity checks."""

import json
import os
import subprocess
import time

import numpy as np
import pytest

pytest.importorskip("obstore")
pytest.importorskip("moto.server")  # the `s3` fixture (tests/conftest.py)

from store_env import PY, REPO, kill_after_units, run, stage_env, upload_shards  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.cache import integrity, lease  # noqa: E402
from pipeline.cache.store import CacheStore  # noqa: E402
from pipeline.errors import CacheError  # noqa: E402

FIELDS = ("argmax", "digest", "topk_indices", "topk_values", "logsumexp")


def run_stage(module, *overrides, timeout=300):
    proc = run(module, *overrides, timeout=timeout)
    assert proc.returncode == 0, f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def _read_all(path):
    store = CacheStore.open(path)
    return {(s, k): store.read_unit(s, k) for s in range(store.num_seeds) for k in range(store.num_shards)}


@pytest.mark.slow
def test_toy_pipeline_with_shards_and_cache_in_a_bucket(s3, tmp_path):
    """make_shards writes shards + manifest to the bucket, stage one builds the store there, stage two trains
    from both; the manifest is the last object written (its commit point)."""
    shards, store = f"{s3}/toy/data", f"{s3}/toy/cache/toy.zarr"
    small = ["data.train_size=256", "data.val_size=64", "data.shard_size=64", f"workdir={tmp_path}",
             f"data.shards={shards}", f"cache.path={store}", "num_threads=1"]
    out = run_stage("make_shards", *small).stdout
    assert f"{shards}/train: wrote 4 shards, 256 samples" in out
    again = run_stage("make_shards", *small).stdout
    assert "up to date" in again  # read back from the bucket and verified (sha256)
    train = storage.as_path(f"{shards}/train")
    assert sorted(p.name for p in train.iterdir()) == ["manifest.json"] + [f"shard-0000{k}.tar" for k in range(4)]

    run_stage("teacher_cache", *small, "teacher.checkpoint=null", "cache.num_seeds=2", "cache.num_workers=0",
              "cache.batch_size=64")
    cache = CacheStore.open(store)
    assert cache.done_mask().all() and integrity.check_store(cache)["ok"]
    assert lease.probe(store) is None and json.loads(storage.as_path(f"{store}.lease").read_text()) == {}

    run_stage("train_student", *small, "train.epochs=2", "train.batch_size=64", "++student.kwargs.depth=2",
              "train.num_workers=1")  # a DataLoader worker (a forked process) reads the bucket
    (out,) = (tmp_path / "runs" / "student").iterdir()
    assert (out / "checkpoint-last.pt").is_file(), sorted(p.name for p in out.iterdir())


def test_kill_9_and_resume_on_a_bucket_equals_a_local_build(s3, env, tmp_path):
    """A stage one killed mid-build (-9) leaves its lease object and some committed units on the bucket; the
    re-run (at another batch size) takes the dead writer's lease over at once (same host, no such process),
    recomputes exactly the missing units, and the store equals an uninterrupted local build (``env.ref``): same
    arrays, same digests."""
    shards, url = f"{s3}/kill/shards", f"{s3}/kill/cache/killed.zarr"
    upload_shards(env.shards, shards)
    overrides = env.overrides(url, "num_threads=1", shards=shards, workdir=tmp_path)
    pid = kill_after_units([PY, "-m", "pipeline.teacher_cache", *overrides], url)
    holder = lease.probe(url)
    assert holder is None  # a dead process of this host holds nothing
    assert json.loads(storage.as_path(f"{url}.lease").read_text())["pid"] == pid  # but its record stayed
    done_before = int(CacheStore.open(url).done_mask().sum())
    assert 3 <= done_before < 16
    rerun = run_stage("teacher_cache", *overrides, "cache.batch_size=64")
    assert f"({16 - done_before} units computed, {done_before} already done, of 16)" in rerun.stdout
    assert "taking over the stale writer lease" in rerun.stderr
    one, resumed = _read_all(env.ref), _read_all(url)
    for unit in one:
        for field in FIELDS:
            assert np.array_equal(one[unit][field], resumed[unit][field]), (unit, field)
    assert integrity.check_store(CacheStore.open(url))["ok"]


HOLD = """
import json, sys, time
from pipeline.cache.store import CacheStore
from pipeline.cache import lease
CacheStore.create(sys.argv[1], provenance={"topk": 5}, num_seeds=2, shard_counts=[50, 50], shard_size=50,
                  num_classes=10, topk=5)
print(json.dumps(lease.held(sys.argv[1]).record), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_second_writer_is_refused_by_the_lease_on_the_bucket(s3, tmp_path):
    url = f"{s3}/lease/c.zarr"
    proc = subprocess.Popen([PY, "-c", HOLD, url], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env=stage_env(base=dict(os.environ, PIPELINE_LEASE_TTL="4")))
    try:
        record = json.loads(proc.stdout.readline())
        assert record["pid"] == proc.pid
        time.sleep(2.5)  # past one renewal (ttl/4): the holder keeps its lease
        with pytest.raises(CacheError, match=rf"another writer holds its lease .*pid {proc.pid} "):
            CacheStore.create(url, provenance={"topk": 5}, num_seeds=2, shard_counts=[50, 50], shard_size=50,
                              num_classes=10, topk=5)
        assert lease.probe(url)["pid"] == proc.pid
        from pipeline.cache.reader import open_cache
        with pytest.raises(CacheError, match="stage one is writing this store"):
            open_cache(url, manifest=None, aug=None, run_seed=0, mode="hard")
    finally:
        proc.kill()
        proc.wait()
    # its process is gone: taken over at once, and the store resumes
    store = CacheStore.create(url, provenance={"topk": 5}, num_seeds=2, shard_counts=[50, 50], shard_size=50,
                              num_classes=10, topk=5)
    assert lease.held(url).record["pid"] == os.getpid()
    store.release_lease()
    assert lease.held(url) is None and json.loads(storage.as_path(f"{url}.lease").read_text()) == {}


def test_a_lease_of_another_host_counts_until_it_expires(s3, monkeypatch):
    """No process check across hosts: a record of another host is live until its expiry, then taken over."""
    monkeypatch.setenv("PIPELINE_LEASE_TTL", "2")
    url = f"{s3}/lease/other.zarr"
    path = storage.as_path(f"{url}.lease")
    record = {"host": "elsewhere", "pid": 1, "started": "then", "store": url, "job": None}
    path.write_text(json.dumps(dict(record, expires=time.time() + 60)))
    with pytest.raises(CacheError, match="another writer holds its lease .* host elsewhere"):
        lease.acquire(url)
    path.write_text(json.dumps(dict(record, expires=time.time() - 1)))
    mine = lease.acquire(url)
    assert mine.record["pid"] == os.getpid()
    mine.check()
    # another writer replaces it (e.g. after our expiry): the next renewal fails, and so does every commit
    path.write_text(json.dumps(dict(record, expires=time.time() + 60)))
    deadline = time.time() + 10
    try:
        while mine.lost is None and time.time() < deadline:
            time.sleep(0.1)
        with pytest.raises(CacheError, match="lease .* was lost .*replaced by another writer"):
            mine.check()
    finally:
        lease.release(url)
    assert json.loads(path.read_text())["host"] == "elsewhere"  # a lost lease's release leaves the new record


def test_integrity_checks_and_repair_on_a_bucket(s3):
    url = f"{s3}/integrity/c.zarr"
    store = CacheStore.create(url, provenance={"topk": 5}, num_seeds=1, shard_counts=[50, 20], shard_size=50,
                              num_classes=10, topk=5)
    rng = np.random.default_rng(0)
    for k, n in enumerate((50, 20)):
        store.write_unit(0, k, rng.normal(0, 3, (n, 10)).astype(np.float32),
                         rng.integers(0, 2**32, n, dtype=np.uint32))
    assert integrity.check_store(store)["ok"]
    chunk = store.unit_file("topk_values", 0, 1)  # S=1: the file holds this one chunk
    assert isinstance(chunk, storage.ObjectPath) and chunk.is_file()
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = integrity.check_store(store)
    assert [(d["seed"], d["shard"]) for d in report["damaged"]] == [(0, 1)]
    with pytest.raises(CacheError, match=r"unit \(seed 0, shard 1\): field 'topk_values'"):
        CacheStore.open(url).read_unit(0, 1)
    assert integrity.repair(store) == [(0, 1)] and store.pending_units() == [(0, 1)]
    # overwrite=true: the prefix's objects are removed (never the lease beside it), a new store id is drawn, and
    # a writer of the replaced store commits nothing more
    new = CacheStore.create(url, provenance={"topk": 5}, num_seeds=1, shard_counts=[50, 20], shard_size=50,
                            num_classes=10, topk=5, overwrite=True)
    assert new.store_id != store.store_id and new.pending_units() == [(0, 0), (0, 1)]
    with pytest.raises(CacheError, match="replaced or removed since this writer opened it"):
        store.write_unit(0, 1, rng.normal(0, 3, (20, 10)).astype(np.float32), np.zeros(20, np.uint32))
    new.release_lease()
