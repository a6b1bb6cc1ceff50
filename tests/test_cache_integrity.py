"""Targets you can trust: checksummed on write and verified on every read, older formats refused by name, each
kind of damage found without the teacher (verify_cache), units of another store refused by their tag, and a
teacher_cache re-run repairs a store to the uninterrupted build."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import zarr

from cache_files import flip_chunk_byte, put_chunk, unset
from pipeline.cache import lease
from pipeline.cache.integrity import check_store, repair
from pipeline.cache.layout import crc32c, unit_tag
from pipeline.cache.store import CacheStore
from pipeline.errors import CacheError
from store_env import PY, run, assert_same_store, small_store, unit, rewrite, pipeline_log, log_text, copy_unit


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
        assert f"{path}: unit (seed {s}, shard {k}) is damaged" in log_text(records)
    assert CacheStore.open(path).pending_units() == sorted(damage)
    store.release_lease()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
