"""bench.scale at a tiny N: the real command, on disk and on a local S3 server (moto), two writer processes under
one lease and two reader ranks; its JSON fields, counts and file counts are checked, never its speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
N, SEEDS, SHARDS = 2500, 2, 3  # shards of 1000, 1000 and 500 samples
ARRAYS = {"hard": 2, "soft": 5}  # argmax, digest (+ topk_values, topk_indices, logsumexp); then done, checksums


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("moto")
    out = tmp_path_factory.mktemp("scale") / "scale.json"
    r = subprocess.run([sys.executable, "-m", "bench.scale", "--n", str(N), "--seeds", str(SEEDS), "--writers", "2",
                        "--readers", "2", "--s3-n", str(N), "--scan-seeds", "3", "--tmp", str(out.parent),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), out.with_suffix(".md").read_text(), r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["disk", "s3"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_counts_and_files(result, backend, mode):
    res = result[0][backend][mode]
    assert (res["N"], res["seeds"], res["shards"]) == (N, SEEDS, SHARDS)
    units = SEEDS * SHARDS
    w = res["write"]["2"]
    # whole shards per writer (their files are shared by seed indices): shards 0 and 2, and shard 1
    assert w["processes"] == 2 and sorted(p["units"] for p in w["per_process"]) == [SEEDS, 2 * SEEDS]
    assert sum(p["views"] for p in w["per_process"]) == SEEDS * N and 0 < w["targets_share"] < 1
    assert len(w["views_per_cpu_s"]) == 2 and min(w["views_per_cpu_s"]) > 0
    rd = res["read"]["2"]  # one seed index, every view's digest compared with the written one
    assert sum(p["units"] for p in rd["per_process"]) == SHARDS and sum(p["views"] for p in rd["per_process"]) == N
    assert res["scan"] == {**res["scan"], "units": units, "pending": 0}
    assert res["check"]["units"] == 1 and res["open"]["best_s"] > 0 and res["open_consolidated"]["best_s"] > 0
    # resume's default check: every unit's record and files, the bytes of all of them (fewer than its sample)
    assert res["resume_check"] == {**res["resume_check"], "units": units, "bytes_checked": units}
    f = res["files"]
    # per shard: one file per per-view array (it packs both seed indices), one of markers, one of records
    assert f["chunk_files"] == (ARRAYS[mode] + 2) * SHARDS and f["files_per_unit"] == (ARRAYS[mode] + 2) / SEEDS
    assert f["metadata_files"] == 1 + ARRAYS[mode] + 2 and f["files"] == f["chunk_files"] + f["metadata_files"]
    assert f["bytes_per_seed"] > 0 and (backend == "s3") == ("allocated_bytes_per_seed" not in f)
    if backend == "disk":
        d = res["imagenet_S300"]
        assert d["derived"] and d["units"] == 300 * 1282 and d["layout_files_match"]
        assert d["chunk_files"] == 1282 * (ARRAYS[mode] * 38 + 2) and d["files_per_unit"] < 1  # 38 files of 8 seeds


@pytest.mark.slow  # the bench.scale run it reads is the slow set's (the quick set would run it a second time)
def test_scan_store_and_report(result):
    res, md, stdout = result
    assert res["disk_scan"]["units"] == 3 * SHARDS and res["disk_scan"]["pending"] == 0
    assert res["disk_scan"]["metadata"]["units"] == 3 * SHARDS  # every record tagged and every file there
    assert md.strip() in stdout and md.count("\n| disk |") == 2 * 6 + 2 and md.count("\n| s3 |") == 2 * 5
    assert 0 < res["targets"]["targets_ms"] and 0 < res["targets"]["full_sort_ms"]
    assert res["machine"].startswith(("x86_64", "aarch64")) and set(res["goals"]) >= {"open_s", "files_per_unit"}
