"""User conditions end in one named line, never a traceback: invalid values, a full disk while writing units or
a checkpoint (then the re-run resumes), a read-only workdir for the stages that only read."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

from pipeline.cache import lease
from pipeline.cache.integrity import check_store
from pipeline.cache.store import CacheStore
from pipeline.config import validate
from pipeline.errors import CacheError, WriteError
from store_env import REPO, PY, STUDENT, make_cfg, stage_env, run, assert_same_store


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
                          capture_output=True, text=True, timeout=300, env=stage_env())
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    res = {n: (int((tmp_path / f"{n}.rc").read_text()), (tmp_path / f"{n}.out").read_text(),
               (tmp_path / f"{n}.err").read_text()) for n in cmds}
    rc, out, err = res["verify"]
    assert rc == 0 and json.loads(out[out.index("{"):])["ok"], err[-2000:]
    rc, out, err = res["evaluate"]
    assert rc == 0 and "student (hard, cache) class head" in out, err[-2000:]
    assert 0 <= json.loads((tmp_path / "eval.json").read_text())["acc"] <= 1 and (tmp_path / "plots").is_dir()
    assert sorted(str(p) for p in env.tmp.rglob("*")) == before  # nothing written into the workdir
