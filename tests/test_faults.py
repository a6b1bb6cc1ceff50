"""Storage and filesystem faults, each one line naming the URL or path and what to do, exit 2, with nothing left
that blocks the corrected run: object storage without credentials, a bucket that does not exist, a wrong secret
(a moto server that checks signatures), an outage mid-build (503s past the retry budget, then an exact resume), a
stalled endpoint (accepts TCP, never answers), an output directory on a read-only filesystem or with a file in its
place, and a checkpoint whose pickle would run code."""

import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

pytest.importorskip("obstore")
pytest.importorskip("moto.server")  # the `s3` fixture (tests/conftest.py)

from fault_servers import Proxy, SignedS3  # noqa: E402
from store_env import PY, REPO, done_count, run, stage_env, upload_shards, wait_for  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.cache import integrity  # noqa: E402
from pipeline.cache.store import CacheStore  # noqa: E402

KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SMALL = ["data.train_size=64", "data.val_size=64", "data.shard_size=64", "num_threads=1"]


def one_line_error(proc, stage: str, starts: str) -> str:
    """The stage's last stderr line, after checking the refusal: exit 2, that one line, no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{stage}: error: {starts}"), line
    return line


def objects(url: str) -> list[str]:
    return [k for k, _ in storage.as_path(url).walk_objects()]


# ------------------------------------------------------------------------------------------------ credentials


@pytest.mark.slow
def test_object_storage_without_credentials_is_refused_naming_the_bucket(s3, tmp_path):
    """No keys and the instance-metadata endpoint ruled out (AWS_EC2_METADATA_DISABLED=true, set for every test
    in tests/conftest.py): refused before any request; nothing written; the run with keys then succeeds."""
    url = f"{s3}/nocreds/data"
    bare = {k: v for k, v in os.environ.items() if k not in KEYS}
    assert bare["AWS_EC2_METADATA_DISABLED"] == "true"
    proc = run("make_shards", f"workdir={tmp_path}", f"data.shards={url}", *SMALL, env=bare)
    line = one_line_error(proc, "make_shards", s3)
    assert "no credentials" in line and "AWS_ACCESS_KEY_ID" in line
    assert objects(f"{s3}/nocreds") == []
    assert run("make_shards", f"workdir={tmp_path}", f"data.shards={url}", *SMALL).returncode == 0
    assert sorted(p.name for p in storage.as_path(f"{url}/train").iterdir()) == ["manifest.json", "shard-00000.tar"]


def test_a_bucket_that_does_not_exist_is_named(s3, tmp_path):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    proc = run("make_shards", f"workdir={tmp_path}", "data.shards=s3://no-such-bucket/data", *SMALL)
    line = one_line_error(proc, "make_shards", "s3://no-such-bucket/data")
    assert f"bucket 'no-such-bucket' does not exist at {endpoint}" in line


@pytest.mark.slow
def test_a_wrong_secret_is_access_denied_and_the_right_one_works(tmp_path):
    """A server that checks signatures (SignatureDoesNotMatch, 403): one line; nothing written; the right secret
    then writes the shards."""
    server = SignedS3("signed")
    try:
        env = dict(os.environ, AWS_ENDPOINT_URL=server.url, AWS_ACCESS_KEY_ID=server.key_id,
                   AWS_SECRET_ACCESS_KEY="not-the-secret")
        proc = run("make_shards", f"workdir={tmp_path}", "data.shards=s3://signed/data", *SMALL, env=env)
        line = one_line_error(proc, "make_shards", "s3://signed/data")
        assert "access denied" in line and "AWS_SECRET_ACCESS_KEY" in line and "'signed'" in line
        env["AWS_SECRET_ACCESS_KEY"] = server.secret
        ok = run("make_shards", f"workdir={tmp_path}", "data.shards=s3://signed/data", *SMALL, env=env)
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert "s3://signed/data/train: wrote 1 shards" in ok.stdout
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------- outage, stall


@pytest.mark.slow
def test_an_outage_mid_build_stops_after_the_retry_budget_and_resumes_exactly(s3, env, tmp_path):
    """Stage one writes through a proxy that starts answering 503 after a few units: after storage.retries
    retries it stops with one line naming the store, the unit and the budget; once the endpoint is back, the
    re-run recomputes exactly the missing units and the store equals an uninterrupted local build (``env.ref``)."""
    shards, url = f"{s3}/outage/shards", f"{s3}/outage/c.zarr"
    upload_shards(env.shards, shards)
    upstream = urlparse(os.environ["AWS_ENDPOINT_URL"])
    proxy = Proxy((upstream.hostname, upstream.port))
    proxied = stage_env(base=dict(os.environ, AWS_ENDPOINT_URL=proxy.url))
    budget = ["storage.retries=2", "storage.retry_timeout=30", "storage.timeout=5"]
    overrides = env.overrides(url, "num_threads=1", shards=shards, workdir=tmp_path)
    cmd = [PY, "-m", "pipeline.teacher_cache", *overrides, *budget]
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=proxied, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            wait_for(lambda: done_count(url) >= 3, "3 committed units", proc=proc, every=0.2)
            proxy.set_mode("down")
            t0 = time.time()
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        stopped_after = time.time() - t0
        line = one_line_error(subprocess.CompletedProcess(cmd, proc.returncode, "", err), "teacher_cache", url)
        assert "cannot write unit (seed " in line and "storage.retries=2 retries (503 Service Unavailable)" in line
        assert stopped_after < 60, stopped_after
        done = int(CacheStore.open(url).done_mask().sum())
        assert 3 <= done < 16
        proxy.set_mode("up")
        rerun = run("teacher_cache", *overrides, env=proxied)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"({16 - done} units computed, {done} already done, of 16)" in rerun.stdout
    finally:
        proxy.close()
    one, resumed = CacheStore.open(env.ref), CacheStore.open(url)
    for s in range(2):
        for k in range(one.num_shards):
            a, b = one.read_unit(s, k), resumed.read_unit(s, k)
            for field in ("argmax", "digest", "topk_indices", "topk_values", "logsumexp"):
                assert np.array_equal(a[field], b[field]), (s, k, field)
    assert integrity.check_store(resumed)["ok"]


def test_a_stalled_endpoint_times_out_as_one_line(tmp_path):
    """An endpoint that accepts TCP and never answers: storage.timeout per attempt, storage.retries retries, then
    one line naming the URL and the keys (obstore's defaults alone take ~3 minutes)."""
    silent = Proxy(None, mode="stall")
    try:
        env = dict(os.environ, AWS_ENDPOINT_URL=silent.url, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
        t0 = time.time()
        proc = run("make_shards", f"workdir={tmp_path}", "data.shards=s3://pipeline/stalled", *SMALL,
                   "storage.timeout=1", "storage.retries=1", env=env, timeout=120)
        took = time.time() - t0
    finally:
        silent.close()
    line = one_line_error(proc, "make_shards", "s3://pipeline/stalled")
    assert f"no answer at {silent.url} within storage.timeout=1s, storage.retries=1 retries" in line
    assert took < 60, took


# ------------------------------------------------------------------------------------- read-only filesystems


def read_only(path: Path) -> list[str]:
    """A command prefix that runs its command with ``path`` read-only: a read-only bind mount in a private mount
    namespace (root ignores permission bits); chmod 0555 for any other user."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return []
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: no way to make a directory read-only for this process")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro '
                            '"$0" "$0" && ! touch "$0/x" 2>/dev/null', str(path)], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot bind-mount {path} read-only here (unshare/mount refused): "
                    f"{probe.stderr.decode().strip()[:200]}")
    return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && '
            'shift && exec "$@"', str(path), "--"]


OUT_KEYS = {  # stage -> (key, what its value names, extra overrides)
    "make_shards": ("data.shards", "{d}/shards", SMALL),
    "teacher_cache": ("cache.path", "{d}/cache.zarr", ["teacher.checkpoint=null", "cache.num_seeds=1",
                                                       "cache.num_workers=0", "teacher.input_size=32"]),
    "train_teacher": ("teacher.train.out_dir", "{d}/run", ["teacher.train.epochs=1", "teacher.train.num_workers=0",
                                                           "teacher.train.max_steps_per_epoch=1"]),
}


@pytest.mark.parametrize("stage", list(OUT_KEYS))
def test_an_output_on_a_read_only_filesystem_is_one_line(stage, toy_shards, tmp_path):
    key, value, extra = OUT_KEYS[stage]
    ro = tmp_path / "ro"
    (ro / "kept").mkdir(parents=True)
    target = value.format(d=ro)
    data = [] if stage == "make_shards" else [f"data.shards={toy_shards.root}"]
    cmd = [*read_only(ro), PY, "-m", f"pipeline.{stage}", f"workdir={tmp_path}", *data, f"{key}={target}", *extra]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        ro.chmod(0o755)
    line = one_line_error(proc, stage, target)
    assert "Read-only file system" in line or "not writable" in line or "Permission denied" in line, line
    assert sorted(p.name for p in ro.iterdir()) == ["kept"]  # nothing written, nothing left behind


@pytest.mark.parametrize("stage", list(OUT_KEYS))
def test_a_file_where_the_output_directory_goes_is_one_line(stage, toy_shards, tmp_path):
    key, value, extra = OUT_KEYS[stage]
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory\n")
    target = value.format(d=blocker)
    data = [] if stage == "make_shards" else [f"data.shards={toy_shards.root}"]
    proc = run(stage, f"workdir={tmp_path}", *data, f"{key}={target}", *extra)
    line = one_line_error(proc, stage, target)
    assert str(blocker) in line and ("directory" in line or "File exists" in line), line
    assert blocker.read_text() == "a file, not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left beside it


# ------------------------------------------------------------------------------------------- checkpoints

EVIL = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {sys.argv[2]}",))
torch.save({"head.weight": torch.zeros(10, 4), "extra": Payload()}, sys.argv[1])
"""


def test_export_refuses_a_checkpoint_whose_pickle_would_run_code(toy_shards, tmp_path):
    evil, marker, out = tmp_path / "student.pt", tmp_path / "payload-ran", tmp_path / "export"
    subprocess.run([PY, "-c", EVIL, str(evil), str(marker)], check=True, timeout=120)
    assert evil.is_file() and not marker.exists()
    proc = run("export", f"workdir={tmp_path}", f"data.shards={toy_shards.root}", f"export.checkpoint={evil}",
               f"export.out={out}")
    line = one_line_error(proc, "export", str(evil))
    assert "refused to load" in line and "GLOBAL posix.system" in line
    assert not marker.exists(), "the checkpoint's payload ran"
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["student.pt"]
