"""Stage one on real shards, a real Zarr store and real processes (torchrun, kill -9)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr

from store_env import kill_after_units, stage_one_overrides
from pipeline.data import sources
from pipeline.cache.store import CacheStore
from pipeline.replay.view_params import AugmentConfig
from pipeline.data.shards import load_manifest
from pipeline.data.shard_writer import write_shards
from pipeline.models.teacher import model_input
from pipeline.replay.views import block_views

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TEACHER = "regnety_002"


def run_stage(module, *overrides, env=None, check=True, nproc=1, timeout=600):
    cmd = [PY, "-m", f"pipeline.{module}", *overrides]
    if nproc > 1:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
               f"pipeline.{module}", *overrides]
    e = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=e, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def overrides(toy_shards, random_teacher, store, *extra):
    return stage_one_overrides(toy_shards.root, random_teacher, store, store.parent, *extra, batch=64)


@pytest.fixture(scope="module")
def built(toy_shards, random_teacher, tmp_path_factory):
    store = tmp_path_factory.mktemp("cache") / "one.zarr"
    proc = run_stage("teacher_cache", *overrides(toy_shards, random_teacher, store))
    assert "1024 views written" in proc.stdout
    return store


def _read_all(path):
    store = CacheStore.open(path)
    return {u: store.read_unit(*u) for u in [(s, k) for s in range(store.num_seeds)
                                              for k in range(store.num_shards)]}


def test_store_matches_independent_teacher_forward(built, toy_shards, random_teacher):
    store = CacheStore.open(built)
    assert store.pending_units() == [] and store.num_seeds == 2 and store.topk == 10
    model = timm.create_model(TEACHER, num_classes=10)
    model.load_state_dict(torch.load(random_teacher, weights_only=True))
    model.eval()
    manifest = load_manifest(toy_shards.root / "train")
    cfg = AugmentConfig(image_size=32, mix_pairing="block")  # augment=deit: DeiT's defaults, one mix draw per block
    prov = store.provenance
    assert prov["augment_hash"] == cfg.hash() and prov["data_fingerprint"] == manifest.fingerprint
    # Independently render the first block of two shards under both seeds (no loader involved).
    for s, k in [(0, 0), (1, 5)]:
        items = [(i, data, label) for i, _, data, label in manifest.iter_shard(k)][:32]
        views = block_views(items, run_seed=0, seed_index=s, cfg=cfg, num_classes=10)
        x = model_input(torch.stack([v["image"] for v in views]), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                        device="cpu")
        with torch.no_grad():
            logits = model(x).double()
        rows = store.read_unit(s, k)
        pos = np.array([v["index"] for v in views]) - manifest.shards[k].first
        assert np.array_equal(rows["digest"][pos], np.array([v["digest"] for v in views], dtype=np.uint32))
        assert np.array_equal(rows["argmax"][pos], logits.argmax(1).numpy())
        top = logits.topk(10, dim=1)
        assert np.allclose(rows["topk_values"][pos].astype(np.float64), top.values.numpy(), rtol=1e-3, atol=2e-3)
        lse = torch.logsumexp(logits, 1).numpy()
        assert np.allclose(rows["logsumexp"][pos], lse, rtol=1e-5, atol=1e-5)
        p_top = np.exp(rows["topk_values"][pos].astype(np.float64) - rows["logsumexp"][pos, None])
        assert (p_top.sum(1) <= 1 + 2e-3).all()
        full = torch.softmax(logits, 1).numpy()
        assert np.allclose(p_top, np.take_along_axis(full, rows["topk_indices"][pos].astype(np.int64), 1),
                           atol=2e-3)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(built, toy_shards, random_teacher, tmp_path):
    store = tmp_path / "ddp.zarr"
    run_stage("teacher_cache", *overrides(toy_shards, random_teacher, store), nproc=2)
    one, two = _read_all(built), _read_all(store)
    for unit in one:
        assert np.array_equal(one[unit]["argmax"], two[unit]["argmax"])
        assert np.array_equal(one[unit]["digest"], two[unit]["digest"])
        assert np.allclose(one[unit]["topk_values"].astype(np.float32), two[unit]["topk_values"].astype(np.float32),
                           atol=2e-3)
    assert CacheStore.open(store).provenance["augment_hash"] == CacheStore.open(built).provenance["augment_hash"]


@pytest.mark.slow
def test_kill_9_then_resume_computes_only_missing_units(built, toy_shards, random_teacher, tmp_path):
    store = tmp_path / "killed.zarr"
    kill_after_units([PY, "-m", "pipeline.teacher_cache",
                      *overrides(toy_shards, random_teacher, store, "cache.batch_size=16")], store)
    done_before = int(np.asarray(zarr.open_array(store / "done", mode="r")[:]).sum())
    assert 3 <= done_before < 16
    rerun = run_stage("teacher_cache", *overrides(toy_shards, random_teacher, store))
    assert f"({16 - done_before} units computed, {done_before} already done, of 16)" in rerun.stdout
    one, resumed = _read_all(built), _read_all(store)
    for unit in one:
        for field in ("argmax", "digest", "topk_indices", "topk_values", "logsumexp"):
            assert np.array_equal(one[unit][field], resumed[unit][field]), (unit, field)


@pytest.mark.slow
def test_torchrun_killed_with_its_ranks_then_resumed_under_torchrun(built, toy_shards, random_teacher, tmp_path):
    """Two ranks killed -9 together (a node lost) after 3 units: the same two-rank command takes the stale lease
    over and computes only the missing units; the store is the one-process build (top-K within float error, as
    for an uninterrupted two-rank run)."""
    store = tmp_path / "killed.zarr"
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "pipeline.teacher_cache", *overrides(toy_shards, random_teacher, store, "cache.batch_size=16")]
    kill_after_units(torchrun, store)
    done_before = int(np.asarray(zarr.open_array(store / "done", mode="r")[:]).sum())
    assert 3 <= done_before < 16
    rerun = run_stage("teacher_cache", *overrides(toy_shards, random_teacher, store), nproc=2)
    assert f"({16 - done_before} units computed, {done_before} already done, of 16)" in rerun.stdout, rerun.stdout
    one, resumed = _read_all(built), _read_all(store)
    for unit in one:
        for field in ("argmax", "digest"):
            assert np.array_equal(one[unit][field], resumed[unit][field]), (unit, field)
        assert np.allclose(one[unit]["topk_values"].astype(np.float32),
                           resumed[unit]["topk_values"].astype(np.float32), atol=2e-3), unit


@pytest.mark.slow
def test_verify_mode_agrees_and_detects_another_teacher(built, toy_shards, random_teacher, tmp_path):
    proc = run_stage("verify_cache", *overrides(toy_shards, random_teacher, built, "cache.verify_fraction=0.2"))
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["ok"] and result["argmax_agreement"] == 1.0 and result["views_checked"] >= 128
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(timm.create_model(TEACHER, num_classes=10).state_dict(), other)
    bad = run_stage("verify_cache", *overrides(toy_shards, other, built), check=False)
    assert bad.returncode != 0 and "teacher weights" in bad.stderr
    aug = run_stage("verify_cache", *overrides(toy_shards, random_teacher, built, "augment.hflip=0.0",
                                                  "augment.label_smoothing=0.2"), check=False)
    last = aug.stderr.strip().splitlines()[-1]
    assert aug.returncode == 2 and last.startswith("verify_cache: error: ") and "field 'augment.hflip'" in last and \
        "also augment.label_smoothing: store has" in last, aug.stderr


def _snapshot(path):
    return {p: p.read_bytes() for p in Path(path).rglob("*") if p.is_file()}


@pytest.mark.parametrize("change,field", [
    ("run_seed=5", "run_seed"),
    ("augment.erase_prob=0.5", "augment"),
    ("data.shards={other_data}", "data_fingerprint"),
])
def test_store_from_other_config_is_refused_untouched(built, toy_shards, random_teacher, tmp_path, change, field):
    if "other_data" in change:
        # Same shape (N, shards, classes), other images: only the fingerprint tells them apart.
        other = tmp_path / "data"
        s = sources.toy(1, toy_shards.train_size, "train")
        write_shards(s, other / "train", shard_size=toy_shards.shard_size, num_classes=10,
                     class_names=s.class_names, source=s.source)
        change = change.format(other_data=other)
    before = _snapshot(built)
    args = overrides(toy_shards, random_teacher, built)
    args = [a for a in args if not a.startswith(change.split("=")[0] + "=")] + [change]
    proc = run_stage("teacher_cache", *args, check=False)
    assert proc.returncode != 0
    assert f"field '{field}" in proc.stderr and "store has" in proc.stderr, proc.stderr
    assert "(rebuild with overwrite=true, or set another cache.path)" in proc.stderr  # the refusal names the fix
    assert _snapshot(built) == before


@pytest.mark.slow
def test_teacher_errors_are_named(toy_shards, random_teacher, tmp_path):
    store = tmp_path / "x.zarr"
    missing = run_stage("teacher_cache", *overrides(toy_shards, tmp_path / "nope.pt", store), check=False)
    assert missing.returncode == 2 and "nope.pt" in missing.stderr and not store.exists()
    five = tmp_path / "five.pt"
    torch.save(timm.create_model(TEACHER, num_classes=5).state_dict(), five)
    mismatch = run_stage("teacher_cache", *overrides(toy_shards, five, store), check=False)
    assert mismatch.returncode == 2 and "5" in mismatch.stderr and "10" in mismatch.stderr
    arch = tmp_path / "arch.pt"
    torch.save(timm.create_model("regnety_004", num_classes=10).state_dict(), arch)
    wrong = run_stage("teacher_cache", *overrides(toy_shards, arch, store), check=False)
    assert wrong.returncode == 2 and "arch.pt" in wrong.stderr
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    args = [a for a in overrides(toy_shards, random_teacher, blocker / "c.zarr") if not a.startswith("workdir=")]
    unwritable = run_stage("teacher_cache", *args, f"workdir={tmp_path}", check=False)
    assert unwritable.returncode == 2 and str(blocker) in unwritable.stderr
    assert blocker.read_text() == "not a directory"


def _one_error_line(proc, *named):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("teacher_cache: error: ") and all(n in lines[-1] for n in named), proc.stderr


@pytest.mark.slow
def test_a_refused_run_creates_nothing_and_the_corrected_run_builds(toy_shards, tmp_path):
    """Teacher, input size and normalisation are checked before the store exists: the corrected run is then not
    refused for a value the refused one would have recorded in the store's provenance."""
    store = tmp_path / "vit.zarr"
    keep = [a for a in overrides(toy_shards, None, store)
            if not a.startswith(("teacher.checkpoint=", "teacher.input_size=", "cache.num_seeds="))]
    vit = keep + ["teacher.name=vit_tiny_patch16_224", "teacher.kwargs={img_size: 32}", "teacher.kwargs_for=null",
                  "teacher.checkpoint=null", "cache.num_seeds=1"]  # a ViT that takes 32x32 inputs only
    for bad, named in [("teacher.input_size=64", ("takes 32x32 inputs only", "set teacher.input_size=32")),
                       ("teacher.input_size=null teacher.mean=[0.5,0.5]", ("teacher.mean=[0.5, 0.5]",)),
                       ("teacher.input_size=null teacher.std=[0.2,0.0,0.2]", ("teacher.std", "> 0")),
                       ("teacher.input_size=32 teacher.checkpoint=" + str(tmp_path / "nope.pt"), ("nope.pt",))]:
        _one_error_line(run_stage("teacher_cache", *vit, *bad.split(), check=False), *named)
        assert {p.name for p in tmp_path.iterdir()} <= {"outputs"}  # no store, no lease, no metrics
    proc = run_stage("teacher_cache", *vit, "teacher.input_size=32")
    assert "512 views written" in proc.stdout
    assert "random weights" not in proc.stderr  # the toy set: an untrained teacher is intended there
    assert CacheStore.open(store).provenance["teacher"]["resolution"] == 32


def test_progress_counts_views_per_batch(toy_shards, random_teacher, tmp_path):
    store = tmp_path / "bar.zarr"
    args = [a for a in overrides(toy_shards, random_teacher, store) if not a.startswith("cache.num_seeds=")]
    proc = run_stage("teacher_cache", *args, "cache.num_seeds=1", env={"TQDM_MININTERVAL": "0"})
    bars = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("teacher cache:")]
    counts = [int(m.group(1)) for line in bars if (m := re.search(r"(\d+)/512 \[", line))]
    assert counts[:2] == [0, 64] and set(range(0, 513, 64)) <= set(counts), bars  # 8 batches of 64 views
    first = next(line for line in bars if "64/512" in line)
    assert re.search(r"[\d.]+img/s, units=\d/8", first), first  # img/s from the first batch, units beside it


def _folder_shards(root, classes=("cat", "dog", "eel"), per_class=6):
    """Real shards of the folder source (JPEG files in class folders), train split only."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        (root / "tree" / "train" / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(
                root / "tree" / "train" / c / f"{i}.jpg", quality=90)
    s = sources.folder(root / "tree", "train")
    write_shards(s, root / "shards" / "train", shard_size=8, num_classes=len(classes), class_names=s.class_names,
                 source=s.source)
    return root / "shards"


@pytest.mark.slow
def test_random_teacher_on_real_data_is_warned_about(tmp_path):
    shards = _folder_shards(tmp_path)
    args = ["teacher=regnety_002", "data=folder", "data.num_classes=3", "data.image_size=32",
            f"data.root={tmp_path / 'tree'}", f"data.shards={shards}", f"workdir={tmp_path}", "cache.num_seeds=1",
            "cache.num_workers=0", "teacher.input_size=32"]
    proc = run_stage("teacher_cache", *args, f"cache.path={tmp_path / 'random.zarr'}", "teacher.checkpoint=null")
    warned = [line for line in proc.stderr.splitlines() if "random weights" in line]
    assert len(warned) == 1 and "teacher.checkpoint" in warned[0] and "teacher.pretrained" in warned[0], proc.stderr
    assert "data.source=folder" in warned[0] and "18 views written" in proc.stdout
    trained = tmp_path / "three.pt"
    torch.save(timm.create_model(TEACHER, num_classes=3).state_dict(), trained)
    proc = run_stage("teacher_cache", *args, f"cache.path={tmp_path / 'trained.zarr'}", f"teacher.checkpoint={trained}")
    assert "random weights" not in proc.stderr and "18 views written" in proc.stdout


def test_a_rerun_with_nothing_to_do_keeps_the_metrics(built, toy_shards, random_teacher):
    """A finished cache re-run computes nothing and leaves the build's metrics (img/s, views) as they were."""
    metrics = built.parent / "runs" / "cache" / "toy-regnety_002-s2.json"  # cache.metrics of a hand run
    before = metrics.read_text()
    assert json.loads(before)["views"] == 1024 and set(json.loads(before)) == {"bytes_per_view", "img_per_s",
                                                                                "seconds", "views"}
    proc = run_stage("teacher_cache", *overrides(toy_shards, random_teacher, built))
    assert "0 views written" in proc.stdout and "keeps the last build's metrics" in proc.stderr
    assert metrics.read_text() == before
