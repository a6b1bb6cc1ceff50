"""What the cache-trust tests share: toy shards (tests/conftest.py: 8 train shards of 64), a seeded random
regnety_002 at 32 px, S=2 seed indices (16 units), the reference store built in-process once per session (the
`env` fixture of tests/conftest.py), a store of another teacher (`foreign`), and helpers that run stages as real
processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import timm
import torch
import zarr
from hydra import compose, initialize_config_dir

from cache_files import copy_unit as copy_unit_chunks
from pipeline.cache import lease
from pipeline.cache.layout import crc32c
from pipeline.cache.store import CacheStore
from pipeline.config import validate

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
S, BATCH = 2, 16
STUDENT = ["train.epochs=2", "train.batch_size=64", "train.max_steps_per_epoch=2", "train.warmup_epochs=0",
           "train.num_workers=0", "++student.kwargs.depth=2", "student.patch_size=4", "train.dvclive=false",
           "train.val=false", "num_threads=1"]


def make_cfg(overrides):
    with initialize_config_dir(config_dir=str(REPO / "pipeline" / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def stage_one_overrides(shards, teacher, store, workdir, *extra, seeds=S, batch=BATCH) -> list[str]:
    """Stage one on ``shards`` with a regnety_002 checkpoint at 32 px, ``seeds`` seed indices, no loader workers."""
    return ["teacher=regnety_002", "augment=deit", f"workdir={workdir}", f"data.shards={shards}",
            f"teacher.checkpoint={teacher}", "teacher.input_size=32", f"cache.path={store}",
            f"cache.num_seeds={seeds}", f"cache.batch_size={batch}", "cache.num_workers=0", *extra]


def trust_env(toy_shards, teacher: Path, tmp: Path) -> SimpleNamespace:
    """Overrides for the stages and the reference store (an uninterrupted build, in this process) in ``tmp``: the
    ``env`` fixture of tests/conftest.py (built once per session; read-only: copy a store before changing it)."""
    from pipeline.cache.builder import build_cache

    e = SimpleNamespace(tmp=tmp, shards=toy_shards.root, teacher=teacher, toy=toy_shards, ref=tmp / "ref.zarr")

    def overrides(store, *extra, shards=None, workdir=None):
        return stage_one_overrides(shards or e.shards, teacher, store, workdir or tmp, *extra)

    e.overrides = overrides
    e.cfg = lambda store, *extra, shards=None: validate(make_cfg(overrides(store, *extra, shards=shards)))
    build_cache(e.cfg(e.ref))
    return e


# ------------------------------------------------------------------------------------------------ helpers
def stage_env(threads: int | None = 1, base: dict | None = None) -> dict:
    """``base`` (default: this process's environment) with passive OpenMP waits and ``threads`` threads."""
    e = dict(os.environ if base is None else base, OMP_WAIT_POLICY="PASSIVE")
    if threads:
        e["OMP_NUM_THREADS"] = str(threads)
    return e


def run(module, *args, threads=1, env=None, timeout=300):
    """``python -m pipeline.<module> args`` in the checkout; ``env``: the environment to start from."""
    return subprocess.run([PY, "-m", f"pipeline.{module}", *args], cwd=REPO, capture_output=True, text=True,
                          env=stage_env(threads, env), timeout=timeout)


def start(module, *args, log: Path):
    """A stage in the background; its stdout/stderr go to files (a paused process never blocks on a pipe)."""
    out, err = open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")
    p = subprocess.Popen([PY, "-m", f"pipeline.{module}", *args], cwd=REPO, stdout=out, stderr=err, env=stage_env())
    p.log = log
    return p


def finish(p, timeout=300) -> tuple[int, str, str]:
    rc = p.wait(timeout)
    return rc, p.log.with_suffix(".out").read_text(), p.log.with_suffix(".err").read_text()


def upload_shards(root: Path, url: str) -> None:
    """The train and val shards under ``root`` copied to ``url`` (each manifest last: its split's commit point)."""
    from pipeline import storage

    for split in ("train", "val"):
        storage.upload_tree(root / split, storage.as_path(f"{url}/{split}"), last="manifest.json")


def stop_for_good(p) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGCONT)
        p.kill()
        p.wait()


def wait_for(cond, what: str, proc=None, timeout=180, every=0.05) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            said = finish(proc) if hasattr(proc, "log") else f"exit {proc.returncode}"
            raise AssertionError(f"{what}: the writer exited first ({said})")
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def done_count(store) -> int:
    """Committed units of a store on disk or in a bucket; 0 while it is being created."""
    try:
        return int(CacheStore.open(store).done_mask().sum())
    except Exception:  # noqa: BLE001 - the store is being created
        return 0


def kill_after_units(cmd: list[str], store, at_least: int = 3, timeout: float = 300) -> int:
    """Start ``cmd`` (a stage one writing ``store``, one process or torchrun's) and kill -9 it with every process it
    started once ``at_least`` units are committed; its pid."""
    from procs import kill_tree

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=stage_env())
    try:
        wait_for(lambda: done_count(store) >= at_least, f"{at_least} committed units", proc=proc, timeout=timeout,
                 every=0.2)
        kill_tree(proc)
    finally:
        stop_for_good(proc)
    return proc.pid


def holder(store) -> dict:
    try:
        return json.loads(lease.lease_path(store).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def snapshot(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def arrays(path) -> dict:
    return {name: np.asarray(a[...]) for name, a in zarr.open_group(str(path), mode="r").arrays()}


def assert_same_store(a, b) -> None:
    """Every array (targets, digests, markers, checksums) and the provenance equal: the same build."""
    x, y = arrays(a), arrays(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name], equal_nan=True), name
    assert dict(zarr.open_group(str(a), mode="r").attrs) == dict(zarr.open_group(str(b), mode="r").attrs)


def recreate(path, like: CacheStore, **kw) -> CacheStore:
    return CacheStore.create(path, provenance=like.provenance, num_seeds=like.num_seeds,
                             shard_counts=like.shard_counts, shard_size=like.shard_size,
                             num_classes=like.num_classes, topk=like.topk, **kw)


def small_store(path, topk=5, **kw) -> CacheStore:
    return CacheStore.create(path, provenance={"topk": topk}, num_seeds=2, shard_counts=[50, 50], shard_size=50,
                             num_classes=10, topk=topk, **kw)


def unit(k, n=50, seed=0):
    rng = np.random.default_rng([seed, k])
    return rng.normal(0, 3, (n, 10)).astype(np.float32), rng.integers(0, 2**32, n, dtype=np.uint32)


def rewrite(store: CacheStore, s: int, k: int, field: str, edit, fix_checksum: bool) -> None:
    """Change a committed unit's rows of ``field`` through Zarr (valid chunks); optionally record the matching
    checksum too, so that only the invariants can tell."""
    rows = store.unit_rows(k)
    arr = zarr.open_array(str(store.path / field), mode="r+")
    data = np.array(arr[s, rows])
    arr[s, rows] = edit(data)
    if fix_checksum:
        cs = zarr.open_array(str(store.path / "checksums"), mode="r+")
        row = np.array(cs[s, k])
        row[list(cs.attrs["checksum_fields"]).index(field)] = crc32c(np.asarray(arr[s, rows]))
        cs[s, k] = row


def flip_byte(path: Path, at: int | None = None) -> None:
    """Flip one byte of a file (default: the middle one; ``at=-1``: the last)."""
    b = bytearray(path.read_bytes())
    b[len(b) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(b))


@contextlib.contextmanager
def pipeline_log():
    """Records of the "pipeline" logger (it does not propagate to the root logger once a stage set it up)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("pipeline")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def log_text(records) -> str:
    return "\n".join(r.getMessage() for r in records)


HOLD = "import sys, time; from pipeline.cache import lease; lease.acquire(sys.argv[1]); print('held', flush=True); " \
       "time.sleep(600)"


# ------------------------------------------------------------------------- complete, bound, the same store
def foreign_store(env) -> SimpleNamespace:
    """A store of the same data, views and layout built by another teacher (other random weights): the
    ``foreign`` fixture of tests/conftest.py."""
    from pipeline.cache.builder import build_cache

    torch.manual_seed(1)
    other = env.tmp / "other_teacher.pt"
    torch.save(timm.create_model("regnety_002", num_classes=10).state_dict(), other)
    path = env.tmp / "foreign.zarr"
    build_cache(env.cfg(path, f"teacher.checkpoint={other}"))
    return SimpleNamespace(path=path, teacher=other)


def copy_unit(src: Path, src_unit: tuple[int, int], dst: Path, dst_unit: tuple[int, int]) -> None:
    """Copy one unit's chunks of every array (targets, digest, checksum record, commit marker) by hand."""
    copy_unit_chunks(CacheStore.open(src), src_unit, CacheStore.open(dst), dst_unit)
