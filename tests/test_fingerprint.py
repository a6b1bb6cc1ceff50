"""The pixel fingerprint: stage one records it in the store; stage two (train_student, the api) renders it again
and refuses a store whose views render differently here, naming the first differing view and the library versions
on both sides. A store without one (built before) is read with a warning."""

import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from store_env import stage_one_overrides
from pipeline.cache.reader import open_cache
from pipeline.data.shards import load_manifest
from pipeline.errors import PixelMismatch
from pipeline.replay import fingerprint as fp, pixels
from pipeline.replay.view_params import AugmentConfig

REPO = Path(__file__).resolve().parents[1]
OTHER = {"torch": "9.0.0", "torchvision": "0.90.0", "pillow": "99.0.0", "simplejpeg": "1.9.0", "numpy": "2.4.6"}


@pytest.fixture(scope="module")
def built(toy_shards, random_teacher, tmp_path_factory):
    """A store built by stage one (python -m pipeline.teacher_cache) on the toy shards: (store, overrides)."""
    tmp = tmp_path_factory.mktemp("fp")
    store = tmp / "cache" / "toy.zarr"
    overrides = stage_one_overrides(toy_shards.root, random_teacher, store, tmp, "train.epochs=1",
                                    "train.num_workers=0", "++student.kwargs.depth=1", "train.max_steps_per_epoch=1",
                                    "train.val=false", seeds=1)
    proc = _stage("teacher_cache", overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store, overrides


def _stage(module, overrides):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def _attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())


def _copy_with(store: Path, dest: Path, change) -> Path:
    """A copy of ``store`` whose zarr.json attributes went through ``change`` (a store made "elsewhere")."""
    shutil.copytree(store, dest)
    meta = _attrs(dest)
    change(meta["attributes"]["provenance"])
    (dest / "zarr.json").write_text(json.dumps(meta))
    return dest


def _open(store: Path, toy_shards):
    manifest = load_manifest(toy_shards.root / "train")
    aug = AugmentConfig(**_attrs(store)["attributes"]["provenance"]["augment"])
    return open_cache(store, manifest=manifest, aug=aug, run_seed=0, mode="hard")


def test_stage_one_records_the_fingerprint_and_a_clean_store_passes(built, toy_shards):
    store, _ = built
    recorded = _attrs(store)["attributes"]["provenance"]["pixels"]
    assert recorded == json.loads(json.dumps(fp.fingerprint()))  # this process renders what stage one did
    assert len(recorded["views"]) == 2 * 2 * (len(fp.VIEWS) + 2)  # png/jpg x bilinear/bicubic x views
    assert len(set(recorded["views"].values())) == len(recorded["views"])  # every view distinct
    assert set(recorded["versions"]) == {"torch", "torchvision", "pillow", "simplejpeg", "numpy"}
    _, warnings = _open(store, toy_shards)
    assert not any("pixel" in w for w in warnings), warnings


def test_a_store_rendered_elsewhere_is_refused_by_train_student_naming_view_and_versions(built, tmp_path):
    store, overrides = built
    name = "jpg-bicubic-rotate-shear"

    def elsewhere(prov):
        prov["pixels"]["versions"] = dict(OTHER)
        prov["pixels"]["views"][name] = "0" * 16

    other = _copy_with(store, tmp_path / "other.zarr", elsewhere)
    before = {p: p.stat().st_mtime_ns for p in other.rglob("*")}
    proc = _stage("train_student", [*overrides, f"cache.path={other}", f"train.out_dir={tmp_path / 'run'}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train_student: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert str(other) in lines[0] and f"view '{name}'" in lines[0] and "1 of 32 views differ" in lines[0]
    assert "built with torch 9.0.0, torchvision 0.90.0, pillow 99.0.0" in lines[0]
    assert f"running torch {version('torch')}, torchvision {version('torchvision')}" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in other.rglob("*")} == before  # nothing written into it
    assert not (tmp_path / "run" / "student.pt").exists()


def test_a_renderer_that_differs_is_refused_by_the_api(built, toy_shards, monkeypatch):
    from pipeline.api import CachedViews

    store, _ = built
    CachedViews(toy_shards.root / "train", store, batch_size=8)  # clean: opens
    monkeypatch.setattr(pixels, "FILL", [0, 0, 0])  # RandAugment geometry fills with another colour here
    fp.fingerprint.cache_clear()
    try:
        with pytest.raises(PixelMismatch, match=r"view 'png-bilinear-rotate-shear' .* \(12 of 32 views differ\)"):
            CachedViews(toy_shards.root / "train", store, batch_size=8)
    finally:
        fp.fingerprint.cache_clear()


@pytest.mark.slow
def test_a_store_from_before_fingerprints_is_read_with_a_warning_and_resumed(built, toy_shards, tmp_path):
    store, overrides = built
    old = _copy_with(store, tmp_path / "old.zarr", lambda prov: prov.pop("pixels"))
    _, warnings = _open(old, toy_shards)
    (warning,) = [w for w in warnings if "pixel fingerprint" in w]
    assert warning.startswith(f"{old}: no pixel fingerprint recorded") and "overwrite=true" in warning
    # stage one resumes it as it is (nothing left to do here), not refused for the field it never had
    proc = _stage("teacher_cache", [*overrides, f"cache.path={old}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pixels" not in _attrs(old)["attributes"]["provenance"]


def test_the_fingerprint_costs_about_a_tenth_of_a_second():
    fp.fingerprint()  # imports and first-call set-up out of the measurement
    times = []
    for _ in range(5):
        fp.fingerprint.cache_clear()
        t0 = time.perf_counter()
        fp.fingerprint()
        times.append(time.perf_counter() - t0)
    best = min(times) * 1e3
    print(f"pixel fingerprint: {best:.1f} ms (best of 5, 32 views, 1 thread)")
    assert best < 2000, times  # ~50-150 ms on the 2-core machine, shared


def test_the_thread_count_is_restored_and_does_not_change_pixels(monkeypatch):
    threads = torch.get_num_threads()
    fp.fingerprint.cache_clear()
    first = fp.fingerprint()
    assert torch.get_num_threads() == threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # render on the process's whole thread pool
    fp.fingerprint.cache_clear()
    try:
        assert fp.fingerprint() == first
    finally:
        fp.fingerprint.cache_clear()
