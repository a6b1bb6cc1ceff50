"""One writer per store: the lease refuses a second writer, overwrite and readers and takes over a stale one; a
writer, a reader or a student whose store is replaced under it stops naming the store. Real processes (SIGSTOP,
kill -9)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from pipeline.cache import lease
from pipeline.cache.store import CacheStore
from pipeline.config import validate
from pipeline.replay.view_params import augment_config
from pipeline.errors import CacheError
from store_env import (REPO, PY, STUDENT, make_cfg, run, start, finish, stop_for_good, wait_for, done_count, holder,
                       snapshot, assert_same_store, recreate, small_store, unit, pipeline_log, log_text, HOLD)


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
    assert f"taking over the stale writer lease {lease.lease_path(path)} of pid {helper.pid}" in log_text(records)
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


@pytest.mark.slow
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
def paused_writer(env, store, log):
    """Stage one building ``store``, paused (SIGSTOP) once it has committed its first unit."""
    a = start("teacher_cache", *env.overrides(store), log=log)
    try:
        wait_for(lambda: done_count(store) >= 1, "a first committed unit", proc=a)
        os.kill(a.pid, signal.SIGSTOP)
    except BaseException:
        stop_for_good(a)
        raise
    return a


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
    a = paused_writer(env, store, tmp_path / "a")
    try:
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
    a = paused_writer(env, store, tmp_path / "a")
    try:
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
