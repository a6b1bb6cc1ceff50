"""Issue 12, a cache you can trust: one writer per store (lease, store id), checksummed targets, damage found
(verify_cache) and repaired (a teacher_cache re-run), shards hashed as they are read, make_shards input checks, and
user conditions (a read-only workdir, a full disk, invalid values) that end in one named line, never a traceback.

Concurrency runs real processes (SIGSTOP, kill -9). Toy shards (tests/conftest.py: 8 train shards of 64), a seeded
random regnety_002 at 32 px, S=2 seed indices: 16 units. The reference store is built in-process once."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import zarr
from hydra import compose, initialize_config_dir
from PIL import Image

from cache_files import copy_unit as copy_unit_chunks, flip_chunk_byte, put_chunk, unset
from pipeline.cache import lease
from pipeline.cache.integrity import check_store, repair
from pipeline.cache.layout import crc32c, unit_tag
from pipeline.cache.store import CacheStore
from pipeline.config import validate
from pipeline.replay.view_params import augment_config
from pipeline.errors import CacheError, ShardError, WriteError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
S, BATCH = 2, 16
STUDENT = ["train.epochs=2", "train.batch_size=64", "train.max_steps_per_epoch=2", "train.warmup_epochs=0",
           "train.num_workers=0", "++student.kwargs.depth=2", "student.patch_size=4", "train.dvclive=false",
           "train.val=false", "num_threads=1"]


def make_cfg(overrides):
    with initialize_config_dir(config_dir=str(REPO / "pipeline" / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def env(toy_shards, tmp_path_factory):
    """Teacher checkpoint, overrides for the stages, and the reference store (an uninterrupted build)."""
    from pipeline.cache.builder import build_cache

    tmp = tmp_path_factory.mktemp("trust")
    teacher = tmp / "teacher.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model("regnety_002", num_classes=10).state_dict(), teacher)
    e = SimpleNamespace(tmp=tmp, shards=toy_shards.root, teacher=teacher, toy=toy_shards, ref=tmp / "ref.zarr")

    def overrides(store, *extra, shards=None):
        return ["teacher=regnety_002", "augment=deit", f"workdir={tmp}", f"data.shards={shards or e.shards}",
                f"teacher.checkpoint={teacher}", "teacher.input_size=32", f"cache.path={store}",
                f"cache.num_seeds={S}", f"cache.batch_size={BATCH}", "cache.num_workers=0", *extra]

    e.overrides = overrides
    e.cfg = lambda store, *extra, shards=None: validate(make_cfg(overrides(store, *extra, shards=shards)))
    build_cache(e.cfg(e.ref))
    return e


# ------------------------------------------------------------------------------------------------ helpers
def _env(threads: int | None = 1) -> dict:
    e = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if threads:
        e["OMP_NUM_THREADS"] = str(threads)
    return e


def run(module, *args, threads=1, timeout=300):
    return subprocess.run([PY, "-m", f"pipeline.{module}", *args], cwd=REPO, capture_output=True, text=True,
                          env=_env(threads), timeout=timeout)


def start(module, *args, log: Path):
    """A stage in the background; its stdout/stderr go to files (a paused process never blocks on a pipe)."""
    out, err = open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")
    p = subprocess.Popen([PY, "-m", f"pipeline.{module}", *args], cwd=REPO, stdout=out, stderr=err, env=_env())
    p.log = log
    return p


def finish(p, timeout=300) -> tuple[int, str, str]:
    rc = p.wait(timeout)
    return rc, p.log.with_suffix(".out").read_text(), p.log.with_suffix(".err").read_text()


def stop_for_good(p) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGCONT)
        p.kill()
        p.wait()


def wait_for(cond, what: str, proc=None, timeout=180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the writer exited first ({finish(proc)})")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def done_count(store) -> int:
    try:
        return int(np.asarray(zarr.open_array(str(Path(store) / "done"), mode="r")[...]).sum())
    except Exception:  # noqa: BLE001 - the store is being created
        return 0


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


def _text(records) -> str:
    return "\n".join(r.getMessage() for r in records)


HOLD = "import sys, time; from pipeline.cache import lease; lease.acquire(sys.argv[1]); print('held', flush=True); " \
       "time.sleep(600)"


# ------------------------------------------------------------------------------------------- one writer
def test_lease_refuses_a_second_writer_overwrite_and_readers_then_takes_over_a_stale_one(env, tmp_path):
    from pipeline.cache.reader import open_cache

    path = tmp_path / "c.zarr"
    shutil.copytree(env.ref, path)
    ref = CacheStore.open(env.ref)
    before = snapshot(path)
    helper = subprocess.Popen([PY, "-c", HOLD, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert helper.stdout.readline().strip() == "held"
        record = holder(path)
        assert record["pid"] == helper.pid and record["host"] and record["started"] and record["store"] == str(path)
        for overwrite in (False, True):  # resume and overwrite alike: nothing touched
            with pytest.raises(CacheError, match=rf"{path}: another writer holds its lease .*pid {helper.pid} on host"):
                recreate(path, ref, overwrite=overwrite)
        with pytest.raises(CacheError, match=rf"{path}: stage one is writing this store .*pid {helper.pid}"):
            open_cache(path, manifest=env.toy.train, aug=augment_config(env.cfg(path)), run_seed=0, mode="hard")
        assert snapshot(path) == before
    finally:
        helper.kill()
        helper.wait()
    assert holder(path)["pid"] == helper.pid  # kill -9 left its record: a stale lease
    with pipeline_log() as records:
        store = recreate(path, ref)
    assert f"taking over the stale writer lease {lease.lease_path(path)} of pid {helper.pid}" in _text(records)
    assert holder(path)["pid"] == os.getpid() and store.pending_units() == []
    store.release_lease()
    assert holder(path) == {} and snapshot(path) == before


def test_a_writer_never_commits_into_a_store_replaced_under_it(tmp_path):
    path = tmp_path / "c.zarr"
    small_store(path).write_unit(0, 0, *unit(0))
    stale = CacheStore.open(path, "r+")
    fresh = small_store(path, overwrite=True)  # this process's lease is re-entrant: it may rebuild
    assert fresh.store_id != stale.store_id
    with pytest.raises(CacheError, match=rf"{path}: the store was replaced or removed since this writer opened it "
                                         rf".*not writing unit \(seed 0, shard 1\)"):
        stale.write_unit(0, 1, *unit(1))
    assert fresh.pending_units() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not fresh.unit_file("topk_values", 0, 1).exists() and not fresh.unit_file("done", 0, 1).exists()
    fresh.write_unit(0, 1, *unit(1))
    lease.lease_path(path).unlink()  # the lease file removed under a writer: it stops before committing
    with pytest.raises(CacheError, match=rf"{path}: this writer's lease .* was removed or replaced"):
        fresh.write_unit(1, 1, *unit(1))
    fresh.release_lease()


# ------------------------------------------------------------------------------------------- checksums
def test_targets_are_checksummed_and_every_read_is_verified(tmp_path):
    from pipeline.cache.reader import CacheTargets

    path = tmp_path / "c.zarr"
    store = small_store(path)
    for k in (0, 1):
        store.write_unit(0, k, *unit(k))
    got = store.read_unit(0, 0, store.fields)
    stored = np.asarray(zarr.open_array(str(path / "checksums"), mode="r")[0, 0])
    assert store.checksum_fields == ("topk_values", "topk_indices", "logsumexp", "argmax", "digest")
    assert [crc32c(got[f]) for f in store.checksum_fields] + [unit_tag(store.key, 0, 0)] == stored.tolist()
    meta = json.loads((path / "topk_values" / "zarr.json").read_text())
    (packed,) = meta["codecs"]  # the file packs seed indices' chunks: each chunk and the file's index carry a crc32c
    assert packed["name"] == "sharding_indexed" and packed["configuration"]["codecs"][-1]["name"] == "crc32c"
    assert packed["configuration"]["index_codecs"][-1]["name"] == "crc32c"  # flipped bytes fail the codec too

    flip_chunk_byte(store, "topk_values", 0, 0)
    with pytest.raises(CacheError, match=rf"{path}: unit \(seed 0, shard 0\): field 'topk_values' fails its "
                                         rf"crc32c"):
        store.read_unit(0, 0)
    rewrite(store, 0, 1, "logsumexp", lambda a: a - 0.5, fix_checksum=False)  # valid chunk, other data
    msg = rf"{path}: unit \(seed 0, shard 1\): field 'logsumexp' does not match its checksum"
    with pytest.raises(CacheError, match=msg):
        store.read_unit(0, 1)
    with pytest.raises(CacheError, match=msg):  # stage two's hook: the same check on every unit it reads
        CacheTargets(path, ("topk_values", "topk_indices", "logsumexp"))(0, 1)
    assert set(CacheTargets(path, ("argmax",))(0, 1)) == {"argmax", "digest"}  # untouched fields still read
    put_chunk(store, "argmax", 0, 1, None)  # a removed chunk reads as fill values: its checksum fails
    with pytest.raises(CacheError, match=r"field 'argmax' does not match its checksum"):
        store.read_unit(0, 1, ["argmax"])
    unset(store, "checksums", 0, 1)  # a removed record: named as such, never trusted
    with pytest.raises(CacheError, match=r"unit \(seed 0, shard 1\): field 'checksums': no checksum record"):
        store.read_unit(0, 1, ["digest"])
    store.release_lease()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_store_of_an_older_format_is_refused_by_name_and_overwrite_rebuilds_it(tmp_path, version):
    """Version 1 (no checksums), 2 (records not tagged with their unit and store) and 3 (one file per array per
    unit): every reader and stage one refuse them, naming the version and the fix; overwrite=true replaces them."""
    from pipeline.cache.reader import CacheTargets

    path = tmp_path / "old.zarr"
    small_store(path).write_unit(0, 0, *unit(0))
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["format_version"] = version
    msg = rf"{path}: cache format version {version}, this code reads and writes only version 4 .*overwrite=true"
    for attempt in (lambda: CacheStore.open(path), lambda: CacheStore.open(path, "r+"),
                    lambda: CacheTargets(path, ("argmax",))(0, 0), lambda: small_store(path)):
        with pytest.raises(CacheError, match=msg):
            attempt()
    new = small_store(path, overwrite=True)
    assert new.format_version == 4 and new.pending_units() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    new.release_lease()


# --------------------------------------------------------------------------------- damage found, repaired
def test_integrity_check_finds_each_kind_of_damage_without_the_teacher(tmp_path):
    path = tmp_path / "c.zarr"
    store = small_store(path)
    for s in (0, 1):
        for k in (0, 1):
            store.write_unit(s, k, *unit(k, seed=s))
    assert check_store(store)["ok"]
    damage = {  # unit -> (what is done to it, a problem it must show)
        (0, 0): (lambda: rewrite(store, 0, 0, "logsumexp", lambda a: a - 2.0, True), "softmax mass"),
        (0, 1): (lambda: rewrite(store, 0, 1, "argmax", lambda a: (a + 1) % 10, True), "argmax != top-1 index"),
        (1, 0): (lambda: rewrite(store, 1, 0, "topk_values", lambda a: a[:, ::-1].copy(), True), "not descending"),
        (1, 1): (lambda: unset(store, "checksums", 1, 1), "field 'checksums': no checksum record"),
    }
    for fn, _ in damage.values():
        fn()
    report = check_store(CacheStore.open(path))
    found = {(d["seed"], d["shard"]): "; ".join(d["problems"]) for d in report["damaged"]}
    assert set(found) == set(damage) and not report["ok"]
    for u, (_, problem) in damage.items():
        assert problem in found[u], (u, found[u])
    with pipeline_log() as records:
        assert repair(CacheStore.open(path, "r+")) == sorted(damage)
    for s, k in damage:
        assert f"{path}: unit (seed {s}, shard {k}) is damaged" in _text(records)
    assert CacheStore.open(path).pending_units() == sorted(damage)
    store.release_lease()


def test_verify_cache_lists_damaged_units_and_the_teacher_recheck_compares_logsumexp(env, tmp_path):
    from pipeline.cache.audit import verify_cache

    path = tmp_path / "c.zarr"
    shutil.copytree(env.ref, path)
    store = CacheStore.open(path)
    put_chunk(store, "topk_indices", 1, 6, None)
    flip_chunk_byte(store, "logsumexp", 0, 4)
    proc = run("verify_cache", *env.overrides(path))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"{path}: damaged unit (seed 0, shard 4): field 'logsumexp': chunk fails its crc32c" in proc.stderr
    assert f"{path}: damaged unit (seed 1, shard 6): field 'topk_indices': chunk missing" in proc.stderr
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert [(d["seed"], d["shard"]) for d in result["damaged"]] == [(0, 4), (1, 6)]
    assert result["units_checked"] == 16 and not result["ok"]

    # logsumexp raised by 0.2 with its checksum updated: the invariants hold, only the teacher can tell
    clean = tmp_path / "lse.zarr"
    shutil.copytree(env.ref, clean)
    rewrite(CacheStore.open(clean), 1, 2, "logsumexp", lambda a: a + 0.2, fix_checksum=True)
    result = verify_cache(env.cfg(clean, "cache.verify_fraction=1.0", "num_threads=1"), 1.0)
    assert result["damaged"] == [] and result["argmax_agreement"] == 1.0 and result["max_topk_diff"] < 0.01
    assert result["max_logsumexp_diff"] == pytest.approx(0.2, abs=1e-3) and not result["ok"]


def test_rerun_repairs_damaged_and_missing_units_to_an_uninterrupted_build(env, tmp_path):
    path = tmp_path / "c.zarr"
    shutil.copytree(env.ref, path)
    store = CacheStore.open(path)
    put_chunk(store, "topk_values", 0, 1, None)                                          # a removed chunk
    flip_chunk_byte(store, "argmax", 1, 2)                                               # flipped bytes
    rewrite(store, 0, 3, "logsumexp", lambda a: a - 1.0, fix_checksum=False)           # lowered logsumexp
    rewrite(store, 1, 5, "argmax", lambda a: np.where(np.arange(len(a)) == 7, (a + 1) % 10, a), True)  # argmax
    unset(store, "done", 1, 7)                                                           # a missing unit
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease.lease_path(path).write_text(json.dumps({"pid": int(dead.stdout), "host": "gone", "started": "then"}))
    proc = run("teacher_cache", *env.overrides(path), threads=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (s, k), why in [((0, 1), "field 'topk_values': chunk missing"),
                        ((1, 2), "field 'argmax': chunk fails its crc32c"),
                        ((0, 3), "field 'logsumexp': checksum mismatch"), ((1, 5), "argmax != top-1 index at row 7")]:
        assert f"{path}: unit (seed {s}, shard {k}) is damaged ({why}" in proc.stderr, proc.stderr[-3000:]
    assert "5 unit(s) to compute (4 repaired): (seed 0, shard 1), (seed 0, shard 3), (seed 1, shard 2), " \
           "(seed 1, shard 5), (seed 1, shard 7)" in proc.stderr
    assert f"taking over the stale writer lease {lease.lease_path(path)} of pid {int(dead.stdout)}" in proc.stderr
    assert "(5 units computed, 11 already done, of 16)" in proc.stdout
    assert_same_store(path, env.ref)


# ------------------------------------------------------------------------- complete, bound, the same store
@pytest.fixture(scope="module")
def foreign(env):
    """A store of the same data, views and layout built by another teacher (other random weights)."""
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


def test_verify_cache_says_ok_only_of_a_complete_store_and_names_what_is_missing(env, tmp_path):
    one = tmp_path / "one.zarr"  # one commit marker deleted
    shutil.copytree(env.ref, one)
    unset(CacheStore.open(one), "done", 0, 5)
    report = check_store(CacheStore.open(one))
    assert not report["ok"]  # 15 of 16 units: not ok, though none is damaged
    assert (report["units_done"], report["damaged"], report["complete"], report["ok"]) == (15, [], False, False)
    assert report["incomplete"] == [{"seed": 0, "shard": 5}] and report["seeds_missing"] == []

    seed = tmp_path / "seed.zarr"  # a whole seed index deleted: every chunk of seed 1
    shutil.copytree(env.ref, seed)
    st = CacheStore.open(seed)
    for k in range(st.num_shards):
        for name in st.fields:
            put_chunk(st, name, 1, k, None)
        for name in ("done", "checksums"):
            unset(st, name, 1, k)
    proc = run("verify_cache", *env.overrides(seed))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (f"{seed}: incomplete: seed 1: no unit committed: (seed 1, shard 0), (seed 1, shard 1), "
            f"(seed 1, shard 2)") in proc.stderr
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert (result["units_done"], result["units_total"], result["seeds_missing"], result["ok"]) == (8, 16, [1], False)
    assert result["incomplete"] == [{"seed": 1, "shard": k} for k in range(8)] and result["damaged"] == []
    proc = run("verify_cache", *env.overrides(env.ref))  # the complete reference store
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["ok"]


def test_a_unit_swapped_or_copied_in_from_another_teachers_store_fails_and_a_rerun_repairs_it(env, foreign,
                                                                                               tmp_path):
    from pipeline.cache.reader import CacheTargets

    path = tmp_path / "c.zarr"
    shutil.copytree(env.ref, path)
    assert not np.array_equal(CacheStore.open(foreign.path).read_unit(1, 3)["topk_values"],
                              CacheStore.open(path).read_unit(1, 3)["topk_values"])  # another teacher's targets
    copy_unit(path, (0, 1), path, (0, 2))          # a unit copied over another of this store
    copy_unit(foreign.path, (1, 3), path, (1, 3))  # a unit copied in from the other teacher's store
    swapped = "field 'checksums': the record belongs to unit (seed 0, shard 1): that unit was copied over this"
    alien = "field 'checksums': the record is tagged for another store"
    report = check_store(CacheStore.open(path))
    found = {(d["seed"], d["shard"]): "; ".join(d["problems"]) for d in report["damaged"]}
    assert set(found) == {(0, 2), (1, 3)} and swapped in found[(0, 2)] and alien in found[(1, 3)], found
    for fields in (("topk_values", "topk_indices", "logsumexp"), ("argmax",)):  # stage two's hook, either mode
        for (s, k), why in (((0, 2), swapped), ((1, 3), alien)):
            with pytest.raises(CacheError, match=re.escape(f"{path}: unit (seed {s}, shard {k}): {why}")):
                CacheTargets(path, fields)(s, k)
    proc = run("verify_cache", *env.overrides(path))
    assert proc.returncode == 1 and f"{path}: damaged unit (seed 1, shard 3): {alien}" in proc.stderr, proc.stderr
    proc = run("teacher_cache", *env.overrides(path), threads=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 unit(s) to compute (2 repaired): (seed 0, shard 2), (seed 1, shard 3)" in proc.stderr
    assert "(2 units computed, 14 already done, of 16)" in proc.stdout
    assert_same_store(path, env.ref)


def test_a_store_rebuilt_by_another_teacher_under_a_student_stops_it_naming_the_store(env, foreign, tmp_path):
    """Mid-run: the student's hook re-checks the store id after every unit it reads. Resumed: its checkpoint
    records the store's key, so a resume on another teacher's targets is refused naming the field."""
    from pipeline.train.student_run import train_student

    path = tmp_path / "c.zarr"
    shutil.copytree(env.ref, path)
    rebuilt = []

    def rebuild(info):  # after the first step: teacher_cache overwrite=true with the other teacher
        if not rebuilt:
            proc = run("teacher_cache", *env.overrides(path, "overwrite=true",
                                                       f"teacher.checkpoint={foreign.teacher}"), threads=None)
            assert proc.returncode == 0, proc.stderr[-3000:]
            rebuilt.append(info)

    cfg = validate(make_cfg(env.overrides(path, *STUDENT, f"train.out_dir={tmp_path}/mid")))
    with pytest.raises(CacheError, match=rf"{path}: the cache store was replaced or removed since this run opened "
                                         rf"it \(store id [0-9a-f]+, now [0-9a-f]+\): stopping"):
        train_student(cfg, step_callback=rebuild)
    assert rebuilt and rebuilt[0]["epoch"] == 0
    assert_same_store(path, foreign.path)  # it was a real rebuild by the other teacher

    # Resumed: teacher A's store, the run dies in epoch 2 (its epoch-1 checkpoint saved), the store is then
    # replaced by teacher B's build (the store the overwrite above wrote, copied: its own store id), and resumed.
    shutil.rmtree(path)
    shutil.copytree(env.ref, path)
    out = tmp_path / "resumed"

    def crash(info):
        if info["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(validate(make_cfg(env.overrides(path, *STUDENT, f"train.out_dir={out}"))), step_callback=crash)
    shutil.rmtree(path)
    shutil.copytree(foreign.path, path)
    proc = run("train_student", *env.overrides(path, *STUDENT, f"train.out_dir={out}"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train_student: error: " in proc.stderr and "written by a run with cache_store_key=" in proc.stderr


# -------------------------------------------------------------------------------- concurrency, real processes
@pytest.mark.slow
def test_a_student_process_whose_store_is_rebuilt_while_it_is_paused_exits_2_naming_the_store(env, foreign,
                                                                                              tmp_path):
    """Real processes: the student paused (SIGSTOP) after its first epoch's checkpoint, teacher_cache
    overwrite=true rebuilds the store with another teacher (a student holds no lease), the student resumed: its
    next unit read stops it, one line, exit 2. Epochs 3-4 (views cycled) read units only after the rebuild."""
    path = tmp_path / "c.zarr"
    shutil.copytree(env.ref, path)
    out = tmp_path / "s"
    student = start("train_student", *env.overrides(path, *STUDENT, "train.epochs=4", "cache.cycle=true",
                                                    f"train.out_dir={out}"), log=tmp_path / "student")
    try:
        wait_for(lambda: (out / "checkpoint-last.pt").is_file(), "the first epoch's checkpoint", proc=student)
        os.kill(student.pid, signal.SIGSTOP)
        proc = run("teacher_cache", *env.overrides(path, "overwrite=true", f"teacher.checkpoint={foreign.teacher}"),
                   threads=None)
        assert proc.returncode == 0, proc.stderr[-3000:]
        os.kill(student.pid, signal.SIGCONT)
        rc, _, err = finish(student)
    finally:
        stop_for_good(student)
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert f"train_student: error: {path}: the cache store was replaced or removed since this run opened it" in err
    assert not (out / "student.pt").exists() and not (out / "metrics.json").exists()  # no model from mixed targets


@pytest.mark.slow
def test_while_a_writer_is_paused_a_second_writer_overwrite_and_train_student_are_refused(env, tmp_path):
    store = tmp_path / "c.zarr"
    a = start("teacher_cache", *env.overrides(store), log=tmp_path / "a")
    try:
        wait_for(lambda: done_count(store) >= 1, "a first committed unit", proc=a)
        os.kill(a.pid, signal.SIGSTOP)
        assert holder(store)["pid"] == a.pid
        before = snapshot(store)
        others = {"second": start("teacher_cache", *env.overrides(store), log=tmp_path / "b"),
                  "overwrite": start("teacher_cache", *env.overrides(store, "overwrite=true"), log=tmp_path / "c"),
                  "student": start("train_student", *env.overrides(store, *STUDENT, f"train.out_dir={tmp_path}/s"),
                                   log=tmp_path / "d")}
        for name, p in others.items():
            rc, _, err = finish(p)
            want = "stage one is writing this store" if name == "student" else "another writer holds its lease"
            assert rc == 2 and f"{store}: {want}" in err and f"pid {a.pid} on host" in err, (name, err[-2000:])
            assert "Traceback" not in err, (name, err)
        assert snapshot(store) == before  # nothing touched
        os.kill(a.pid, signal.SIGCONT)
        rc, out, err = finish(a)
        assert rc == 0, err[-2000:]
    finally:
        stop_for_good(a)
    assert holder(store) == {}  # released at the end of the run
    assert_same_store(store, env.ref)


@pytest.mark.slow
def test_a_paused_writer_resumed_after_its_store_was_rebuilt_fails_naming_it(env, tmp_path):
    from pipeline.cache.builder import build_cache

    store = tmp_path / "c.zarr"
    a = start("teacher_cache", *env.overrides(store), log=tmp_path / "a")
    try:
        wait_for(lambda: done_count(store) >= 1, "a first committed unit", proc=a)
        os.kill(a.pid, signal.SIGSTOP)
        lease.lease_path(store).unlink()  # the lease broken by hand: nothing stops an overwrite any more
        build_cache(env.cfg(store, "overwrite=true"))  # another run (this test's process) rebuilds the store
        rebuilt = snapshot(store)
        os.kill(a.pid, signal.SIGCONT)
        rc, _, err = finish(a)
    finally:
        stop_for_good(a)
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert (f"teacher_cache: error: {store}: the store was replaced or removed since this writer opened it" in err
            or f"teacher_cache: error: {store}: cannot write unit" in err), err[-2000:]  # paused inside a chunk write
    # A paused inside a commit (a few ms of its run) may still touch the unit it was writing (identical bytes, or
    # a cleared marker); whatever it left, a re-run ends with the uninterrupted build.
    now = snapshot(store)
    changed = {f for f in set(now) | set(rebuilt) if now.get(f) != rebuilt.get(f)}
    assert len({tuple(f.split("/c/")[-1].split("/")[:2]) for f in changed}) <= 1, changed
    summary = build_cache(env.cfg(store))
    assert summary["units_computed"] <= 1
    assert_same_store(store, env.ref)


# ------------------------------------------------------------------------------------- shards read verified
def _copy_train(toy_shards, dst: Path):
    shutil.copytree(toy_shards.root / "train", dst / "train")
    from pipeline.data.shards import load_manifest

    return load_manifest(dst / "train")


def test_each_shard_is_hashed_as_it_streams_and_checked_before_its_last_sample(toy_shards, tmp_path):
    m = _copy_train(toy_shards, tmp_path)
    assert len(list(m.iter_shard(2))) == 64
    path = m.shard_path(2)
    raw = path.read_bytes()
    label_at = raw.index(b"000130.cls") + 512  # a label's data block: still a valid tar, a valid label
    for what, offset in (("tar padding", len(raw) - 1), ("a label", label_at)):
        bad = bytearray(raw)
        bad[offset] = ord("5") if bad[offset] != ord("5") else ord("6")
        path.write_bytes(bytes(bad))
        got = []
        with pytest.raises(ShardError, match=rf"{path}: sha256 [0-9a-f]{{64}} does not match the manifest's"):
            for sample in m.iter_shard(2):
                got.append(sample)
        assert len(got) == 63, what  # the last sample is never handed out from a shard that fails its hash
    path.write_bytes(raw)


def test_stage_one_commits_nothing_computed_from_a_tampered_shard(env, tmp_path):
    data = tmp_path / "data"
    m = _copy_train(env.toy, data)
    shard = m.shard_path(3)
    raw = shard.read_bytes()
    flip_byte(shard, at=-1)  # the tar's last padding byte: every sample still reads
    store = tmp_path / "c.zarr"
    proc = run("teacher_cache", *env.overrides(store, "cache.num_workers=1", shards=data))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"teacher_cache: error: {shard}: sha256 " in proc.stderr
    assert not np.asarray(zarr.open_array(str(store / "done"), mode="r")[:, 3]).any()
    report = check_store(CacheStore.open(store))
    assert report["damaged"] == [] and report["array_problems"] == []  # what was committed (other shards) is intact
    assert not report["ok"] and {"seed": 0, "shard": 3} in report["incomplete"]  # shard 3: not ok, incomplete


def test_a_decode_error_names_shard_and_key(toy_shards, tmp_path):
    from pipeline.data.images import decode_error

    m = _copy_train(toy_shards, tmp_path)
    items = [(i, data, label) for i, _, data, label in m.iter_shard(1)][:8]
    assert decode_error(m.shard_path(1), items, m.key_width) is None
    items[5] = (items[5][0], items[5][1][:60], items[5][2])
    err = decode_error(m.shard_path(1), items, m.key_width)
    assert isinstance(err, ShardError) and str(err).startswith(f"{m.shard_path(1)}: key 000069: image does not decode")


@pytest.mark.parametrize("backend", ["per_sample", "batched"])
def test_the_loader_names_shard_and_key_of_an_image_that_does_not_decode(tmp_path, backend):
    from pipeline.data import sources
    from pipeline.replay.loader import ViewLoader
    from pipeline.data.shards import write_shards
    from pipeline.replay.view_params import AugmentConfig

    good = list(sources.toy(0, 32, "train"))
    good[9] = (good[9][0][:50], "png", good[9][2])  # the manifest is right: only a decode can tell
    write_shards(good, tmp_path / "train", shard_size=32, num_classes=10, class_names=sources.TOY_CLASSES,
                 source={"name": "t"})
    loader = ViewLoader(tmp_path / "train", AugmentConfig(image_size=32), run_seed=0, batch_size=32, backend=backend)
    with pytest.raises(ShardError, match=rf"{tmp_path / 'train' / 'shard-00000.tar'}: key 000009"):
        list(loader.units([(0, 0)]))


# ------------------------------------------------------------------------------------------- make_shards input
def _jpeg(seed: int, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tree(root: Path, empty: str | None = None) -> Path:
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for j in range(3 if split == "train" else 1):
                (d / f"{j}.jpg").write_bytes(_jpeg(10 * c + j))
    if empty:
        (root / "train" / empty).mkdir()
    return root


@pytest.mark.slow
def test_make_shards_refuses_a_truncated_image_by_path_and_installs_nothing(tmp_path):
    from pipeline.data.images import check_decodes

    tree = _tree(tmp_path / "tree")
    bad = tree / "val" / "dog" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:-200])
    check_decodes(bad.read_bytes(), str(bad))  # Pillow's verify() passes a truncated JPEG: only a decode tells
    with pytest.raises(ShardError, match="truncated"):
        check_decodes(bad.read_bytes(), str(bad), full=True)
    proc = run("make_shards", "data=folder", f"data.root={tree}", "data.num_classes=2", f"workdir={tmp_path}",
               "data.shard_size=4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"make_shards: error: {bad}: image does not decode" in proc.stderr
    out = tmp_path / "data" / "shards" / "tree"  # a folder data set is named after its root
    assert not out.exists() or not any(out.iterdir())  # train (read first, and fine) is not installed either


def test_sixteen_bit_and_float_images_render_like_their_8bit_versions(tmp_path):
    from pipeline.data import sources
    from pipeline.data.images import normalised
    from pipeline.replay.pixels import SourceImage

    grey = (np.add.outer(np.arange(24), np.arange(32)) * 5 % 256).astype(np.uint8)  # mean ~127
    d = tmp_path / "tree" / "train" / "grey"
    d.mkdir(parents=True)
    Image.fromarray(grey).save(d / "a8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(d / "b16.png")  # a 16-bit greyscale PNG
    assert Image.open(d / "b16.png").mode == "I;16"
    naive = np.asarray(Image.open(d / "b16.png").convert("RGB"))
    assert naive.mean() > 250  # what the replay would render from the 16-bit bytes as they are
    samples = [data for data, _, _ in sources.folder(tmp_path / "tree", "train")]
    buf = io.BytesIO()
    Image.fromarray(grey.astype(np.float32) / 255.0).save(buf, format="TIFF")  # a float image (mode F) in [0, 1]
    data, ext = normalised(buf.getvalue(), "tif", "float.tif")
    assert ext == "png" and Image.open(io.BytesIO(data)).mode == "L"
    assert normalised(samples[0], "png", "a8.png") == (samples[0], "png")  # 8-bit bytes are kept as they are
    rendered = [SourceImage(data).decode()[0] for data in [*samples, data]]
    assert len(rendered) == 3
    for image in rendered:
        assert tuple(image.shape) == (3, 24, 32)
        assert np.array_equal(image[0].numpy(), grey), np.abs(image[0].numpy().astype(int) - grey).max()
        assert abs(float(image.float().mean()) - grey.mean()) < 0.5 and 120 < grey.mean() < 135


def test_an_empty_class_folder_is_refused_by_name_unless_allowed(tmp_path):
    from pipeline.data import sources

    tree = _tree(tmp_path / "tree", empty="eel")
    with pytest.raises(ShardError, match=rf"{tree / 'train' / 'eel'}: class folder holds no images.*"
                                         r"data.allow_empty_classes=true"):
        sources.folder(tree, "train")
    s = sources.folder(tree, "train", allow_empty_classes=True)
    assert s.class_names == ["cat", "dog", "eel"] and len(s) == 6
    cfg = validate(make_cfg(["data=folder", f"data.root={tree}", "data.num_classes=3",
                             "data.allow_empty_classes=true"]))
    assert len(sources.from_config(cfg.data, "train")) == 6
    cfg = validate(make_cfg(["data=imagenet", f"data.root={tree}"]))
    assert cfg.data.allow_empty_classes is False


# ----------------------------------------------------------------------------------------- invalid values
def test_invalid_values_exit_2_naming_the_key_before_any_work(env, tmp_path, capsys):
    from pipeline.cli import stage

    for override, key in (("train.batch_size=0", "train.batch_size"), ("cache.batch_size=0", "cache.batch_size"),
                          ("run_seed=abc", "run_seed")):
        with pytest.raises(SystemExit) as exit_:
            with stage("test"):
                validate(make_cfg([override]))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and key in err and "Traceback" not in err, err
    store = tmp_path / "c.zarr"
    proc = run("teacher_cache", *env.overrides(store, "cache.batch_size=0"))
    assert proc.returncode == 2 and "cache.batch_size=0 must be >= 1" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not store.exists() and not lease.lease_path(store).exists()


# ---------------------------------------------------------------------------------------------- a full disk
def test_a_full_disk_while_writing_units_is_named_and_the_rerun_resumes(env, tmp_path, monkeypatch):
    import zarr.storage._local as local

    from pipeline.cache.builder import build_cache

    store, real, writes = tmp_path / "c.zarr", local._put, []

    def put(path, value, exclusive=False):
        if "/topk_values/c/" in str(path):
            writes.append(path)
            if len(writes) > 5:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", put)
    with pytest.raises(CacheError, match=rf"{store}: cannot write unit \(seed \d, shard \d\): \[Errno 28\] No space "
                                         r"left on device.*stays pending"):
        build_cache(env.cfg(store, "num_threads=1"))
    monkeypatch.setattr(local, "_put", real)
    report = check_store(CacheStore.open(store))
    assert report["damaged"] == [] and report["units_done"] == 5  # nothing corrupt: the failed unit is pending
    assert not report["ok"] and len(report["incomplete"]) == 11
    assert build_cache(env.cfg(store, "num_threads=1"))["units_computed"] == 16 - 5
    assert_same_store(store, env.ref)


@pytest.fixture(scope="module")
def student(env):
    """An uninterrupted tiny student run on the reference cache (distill=hard, checksums verified on every read)."""
    from pipeline.train.student_run import train_student

    out = env.tmp / "student"
    metrics = train_student(validate(make_cfg(env.overrides(env.ref, *STUDENT, f"train.out_dir={out}"))))
    return SimpleNamespace(out=out, metrics=metrics)


def test_a_full_disk_while_saving_a_checkpoint_is_named_and_resume_works(env, student, tmp_path, monkeypatch):
    from pipeline.train.checkpoint import CHECKPOINT_LAST, find_checkpoint
    from pipeline.train.run_setup import TIMING_KEYS
    from pipeline.train.student_run import train_student

    out = tmp_path / "run"
    cfg = validate(make_cfg(env.overrides(env.ref, *STUDENT, f"train.out_dir={out}")))
    real, calls = torch.save, []

    def save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # epoch 2's checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(WriteError, match=rf"{out / CHECKPOINT_LAST}: cannot write: \[Errno 28\] No space left"):
        train_student(cfg)
    monkeypatch.setattr(torch, "save", real)
    found, notes = find_checkpoint(out)
    assert found == out / CHECKPOINT_LAST and notes == [] and torch.load(found, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    resumed = train_student(cfg)

    def comparable(m):
        return {k: v for k, v in m.items() if k not in TIMING_KEYS and k != "history"}

    assert comparable(resumed) == comparable(student.metrics)


def _unshare_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_ok(), reason="needs unshare -m (root with CAP_SYS_ADMIN) for a private mount")
def test_a_real_full_disk_in_a_tiny_tmpfs(tmp_path):
    """No monkeypatch: a 64 KiB tmpfs in a private mount namespace fills up under a unit write and a torch.save."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
import numpy as np, torch
from pipeline.atomic import atomic_save
from pipeline.cache.store import CacheStore
from pipeline.errors import UserError
store = CacheStore.create("{mnt}/c.zarr", provenance={{}}, num_seeds=1, shard_counts=[8000], shard_size=8000,
                          num_classes=10, topk=10)
for what, fn in (("unit", lambda: store.write_unit(0, 0, np.random.default_rng(0).normal(size=(8000, 10)).astype(
                    np.float32), np.arange(8000, dtype=np.uint32))),
                 ("save", lambda: atomic_save({{"w": torch.ones(100000)}}, "{mnt}/w.pt"))):
    try:
        fn()
        print(what, "written")
    except UserError as e:
        print(what, type(e).__name__, e)
print("pending", store.pending_units())
"""
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs -o size=64k tmpfs {mnt} && {PY} -c '{script}'"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"unit CacheError {mnt}/c.zarr: cannot write unit (seed 0, shard 0): [Errno 28] No space left on device" \
           in proc.stdout, proc.stdout
    assert f"save WriteError {mnt}/w.pt: cannot write: [Errno 28] No space left on device" in proc.stdout
    assert "pending [(0, 0)]" in proc.stdout


# -------------------------------------------------------------------------------------- a read-only workdir
@pytest.mark.slow
@pytest.mark.skipif(not _unshare_ok(), reason="needs unshare -m (root with CAP_SYS_ADMIN) for a read-only bind mount")
def test_read_only_stages_run_on_a_read_only_workdir(env, student, tmp_path):
    """verify_cache and evaluate on a workdir mounted read-only (tests run as root here, where chmod -w does not
    apply: a read-only bind mount in a private mount namespace makes writes fail with EROFS, even for root)."""
    before = sorted(str(p) for p in env.tmp.rglob("*"))
    ev = [*env.overrides(env.ref, *STUDENT, f"train.out_dir={student.out}")]
    cmds = {"verify": ["verify_cache", *env.overrides(env.ref)],
            "evaluate": ["evaluate", *ev, f"eval.out={tmp_path}/eval.json", f"eval.plots={tmp_path}/plots"]}
    script = [f"mount --bind {env.tmp} {env.tmp} && mount -o remount,bind,ro {env.tmp} || exit 99",
              f"touch {env.tmp}/probe 2>/dev/null && exit 98"]
    for name, args in cmds.items():
        script.append(f"{PY} -m pipeline.{' '.join(args)} > {tmp_path}/{name}.out 2> {tmp_path}/{name}.err; "
                      f"echo $? > {tmp_path}/{name}.rc &")
    script.append("wait")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", "\n".join(script)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    res = {n: (int((tmp_path / f"{n}.rc").read_text()), (tmp_path / f"{n}.out").read_text(),
               (tmp_path / f"{n}.err").read_text()) for n in cmds}
    rc, out, err = res["verify"]
    assert rc == 0 and json.loads(out[out.index("{"):])["ok"], err[-2000:]
    rc, out, err = res["evaluate"]
    assert rc == 0 and "student (hard, cache) class head" in out, err[-2000:]
    assert 0 <= json.loads((tmp_path / "eval.json").read_text())["acc"] <= 1 and (tmp_path / "plots").is_dir()
    assert sorted(str(p) for p in env.tmp.rglob("*")) == before  # nothing written into the workdir
