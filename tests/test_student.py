"""Stage two (pipeline.train): modes, cache/online parity, refusals, DDP under torchrun, kill -9 + resume.

Toy data (tests/conftest.py: 512 train samples in 8 shards, 128 val), a randomly initialised regnety_002 teacher
(mechanics only), a DeiT-Ti student cut to depth 2 at 32 px / patch 4. CPU, one intra-op thread per process.
"""

from __future__ import annotations

import json
import os
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

from pipeline.errors import CacheError, ProvenanceMismatch
from pipeline.replay.loader import ViewLoader
from pipeline.errors import DigestMismatch
from pipeline.cache.reader import CacheTargets
from pipeline.errors import ScheduleError
from pipeline.train.schedule import plan_schedule, seed_schedule
from pipeline.replay.view_params import augment_config
from pipeline.train.checkpoint import CHECKPOINT_LAST, CHECKPOINT_PREV, find_checkpoint
from pipeline.train.run_setup import TIMING_KEYS
from pipeline.train.student_run import METRICS, STUDENT, STUDENT_EMA, train_student

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "pipeline" / "conf"
STEPS = 8  # 512 train samples / batch 64


def make_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _spread_teacher(toy_shards):
    """A randomly initialised regnety_002 whose head is re-drawn on standardised features, so that its argmax
    varies across views (timm's init gives near-equal logits and one class for almost every view)."""
    from pipeline.replay.view_params import AugmentConfig
    from pipeline.models.teacher import model_input

    torch.manual_seed(0)
    model = timm.create_model("regnety_002", num_classes=toy_shards.num_classes).eval()
    batch = next(iter(ViewLoader(toy_shards.root / "val", AugmentConfig(image_size=32), run_seed=0,
                                 batch_size=128, train=False).epoch(0)))
    with torch.no_grad():
        x = model_input(batch["image"], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], device="cpu", size=32)
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        mean, std = feats.mean(0), feats.std(0)
        std = std.clamp_min(float(std.mean()))
        w = torch.randn(toy_shards.num_classes, feats.shape[1]) / std / feats.shape[1] ** 0.5 * 3
        model.head.fc.weight.copy_(w)
        model.head.fc.bias.copy_(-w @ mean)
    return model


@pytest.fixture(scope="module")
def env(toy_shards, tmp_path_factory):
    """Teacher checkpoint + a 2-seed cache of the toy train split, built by stage one's own code."""
    from pipeline.cache.builder import build_cache

    tmp = tmp_path_factory.mktemp("student")
    teacher = tmp / "teacher.pt"
    torch.save(_spread_teacher(toy_shards).state_dict(), teacher)
    e = SimpleNamespace(tmp=tmp, shards=toy_shards.root, teacher=teacher, cache=tmp / "cache.zarr",
                        toy=toy_shards, runs={})
    e.overrides = _overrides_for(e)
    build_cache(make_cfg(e.overrides(tmp / "unused")))
    return e


def _overrides_for(e, *fixed):
    def overrides(out, *extra):
        return ["teacher=regnety_002", f"workdir={e.tmp}", f"data.shards={e.shards}", f"teacher.checkpoint={e.teacher}",
                "teacher.input_size=32", f"cache.path={e.cache}", "cache.num_seeds=2", "cache.topk=5",
                "cache.batch_size=128", "cache.num_workers=0", "train.epochs=1", "train.batch_size=64",
                "train.lr=0.008", "train.warmup_epochs=0", "train.num_workers=0", "++student.kwargs.depth=2", "student.patch_size=4",
                "num_threads=1", f"train.out_dir={out}", *fixed, *extra]

    return overrides


@pytest.fixture(scope="module")
def tiny(env, tmp_path_factory):
    """64 train samples (one shard), plain views (augment=none), a 1-seed cache: a few epochs memorise them."""
    from pipeline.data import shard_writer, sources
    from pipeline.cache.builder import build_cache

    root = tmp_path_factory.mktemp("tiny_shards")
    for split, n in (("train", 64), ("val", 32)):
        src = sources.toy(0, n, split)
        shard_writer.write_shards(src, root / split, shard_size=64, num_classes=len(src.class_names),
                            class_names=src.class_names, source=src.source)
    t = SimpleNamespace(tmp=env.tmp, shards=root, teacher=env.teacher, cache=env.tmp / "tiny.zarr", runs={})
    t.overrides = _overrides_for(t, "augment=none", "cache.num_seeds=1", "cache.cycle=true", "train.epochs=5",
                                 "train.batch_size=16", "train.lr=0.032", "train.dvclive=false")
    build_cache(make_cfg(t.overrides(env.tmp / "unused")))
    return t


def run(env, name, *extra, callback=True):
    """In-process training run; returns (final metrics, per-step records)."""
    steps = []

    def on_step(info):
        t = info["teacher"]
        top = None if t is None else t.argmax if t.argmax is not None else t.topk_indices[:, 0]
        steps.append({"epoch": info["epoch"], "step": info["step"], "loss": info["loss"],
                      "index": info["index"].tolist(), "argmax": None if top is None else top.long().tolist()})

    metrics = train_student(make_cfg(env.overrides(env.tmp / name, *extra)), step_callback=on_step if callback
                            else None)
    return metrics, steps


def cached_run(env, key, *extra):
    if key not in env.runs:
        env.runs[key] = run(env, key, *extra)
    return env.runs[key]


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS and k != "history"}


# ------------------------------------------------------------------------------------------- schedule


def test_seed_schedule_default_explicit_and_cycle():
    assert [seed_schedule(e, 4) for e in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [seed_schedule(e, 4, [3, 1]) for e in range(3)] == [3, 1, 3]
    assert plan_schedule(3, 4) == [0, 1, 2]
    with pytest.raises(ScheduleError, match="cache.cycle=true"):
        plan_schedule(5, 4)
    assert plan_schedule(5, 4, cycle=True) == [0, 1, 2, 3, 0]
    with pytest.raises(ScheduleError, match=r"\[5\].*S=4"):
        plan_schedule(2, 4, [0, 5])
    assert plan_schedule(2, 4, [0, 5], cycle=True) == [0, 1]
    assert plan_schedule(6, 4, [0, 1]) == [0, 1, 0, 1, 0, 1]  # an explicit schedule repeats by choice


def test_cache_targets_pickle_and_read(env):
    import pickle

    t = CacheTargets(env.cache, ("argmax",))
    rows = t(1, 3)
    assert set(rows) == {"argmax", "digest"} and len(rows["digest"]) == env.toy.shard_size
    clone = pickle.loads(pickle.dumps(t))
    assert clone._store is None  # reopened lazily in the worker process
    np.testing.assert_array_equal(clone(1, 3)["digest"], rows["digest"])


# ------------------------------------------------------------------------------------------- modes


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "hard", "soft"])
def test_mode_trains_and_loss_falls(tiny, mode):
    """Each mode, through the cache path (hard/soft), fits 64 plain views: 5 epochs x 4 steps."""
    metrics, steps = run(tiny, f"tiny-{mode}", f"distill={mode}")
    losses = [s["loss"] for s in steps]
    assert len(losses) == 20 and all(np.isfinite(losses))
    per_epoch = [h["train_loss"] for h in metrics["history"]]
    print(mode, np.round(per_epoch, 3))
    assert per_epoch[-1] < 0.9 * per_epoch[0], per_epoch
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    assert metrics["distill_mode"] == mode and metrics["seed_schedule"] == [0] * 5
    for key in ("val_acc", "val_acc_cls", "val_acc_dist", "val_loss", "train_loss", "val_agree_teacher"):
        assert np.isfinite(metrics[key]), key  # mode none still measures agreement: the checkpoint exists
    if mode != "none":
        assert all(s["argmax"] is not None for s in steps)


@pytest.mark.slow
def test_hard_cache_and_online_agree_step_by_step(env):
    cache_metrics, cache_steps = cached_run(env, "hard-cache", "distill=hard")
    online_metrics, online_steps = cached_run(env, "hard-online", "distill=hard", "distill.source=online")
    assert len(cache_steps) == len(online_steps) == STEPS
    for c, o in zip(cache_steps, online_steps):
        assert c["index"] == o["index"], "same views in the same order"
        assert c["argmax"] == o["argmax"], f"teacher argmax differs at step {c['step']}"
    np.testing.assert_allclose([s["loss"] for s in cache_steps], [s["loss"] for s in online_steps],
                               rtol=1e-5, atol=1e-6)
    assert cache_metrics["val_acc"] == pytest.approx(online_metrics["val_acc"], abs=1e-6)


@pytest.mark.slow
def test_soft_cache_and_online_close(env):
    """Soft targets: the cache's fp64 logsumexp vs the online fp32 one; same loss within float tolerance."""
    _, cache_steps = cached_run(env, "soft-cache", "distill=soft")
    _, online_steps = run(env, "soft-online", "distill=soft", "distill.source=online")
    np.testing.assert_allclose([s["loss"] for s in cache_steps], [s["loss"] for s in online_steps],
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- refusals


def test_tampered_digest_names_the_key(env, tmp_path):
    store = tmp_path / "tampered.zarr"
    shutil.copytree(env.cache, store)
    cfg = make_cfg(env.overrides(tmp_path / "out", f"cache.path={store}"))
    loader = ViewLoader(env.shards / "train", augment_config(cfg), run_seed=0, batch_size=64, shuffle=True)
    shard = loader.rank_shards(0)[0]  # the first shard epoch 0 reads
    index = env.toy.train.shards[shard].first + 5
    digest = zarr.open_array(store / "digest", mode="r+")
    digest[0, index] = int(digest[0, index]) ^ 1
    key = str(index).zfill(env.toy.train.key_width)
    with pytest.raises(DigestMismatch, match=rf"key {key}: seed 0"):
        train_student(cfg)


@pytest.mark.parametrize("overrides, field, says", [
    (["run_seed=1"], "run_seed", "store has 0, config has 1"),
    (["augment.erase_prob=0.5"], "augment.erase_prob", "store has 0.1, config has 0.5"),
    (["augment.mix_pairing=block", "augment.hflip=0.0"], "augment.hflip",  # every augmentation key that differs
     "store has 0.5, config has 0.0 (also augment.mix_pairing: store has pair, config has block; "),
])
def test_other_provenance_refused(env, tmp_path, overrides, field, says):
    with pytest.raises(ProvenanceMismatch) as info:
        train_student(make_cfg(env.overrides(tmp_path / "out", *overrides)))
    assert info.value.field == field and f"'{field}' differs: {says}" in str(info.value), str(info.value)


def test_hard_only_store_refused_for_soft(env, tmp_path):
    from pipeline.cache.store import CacheStore

    prov = CacheStore.open(env.cache).provenance
    m = env.toy.train
    store = CacheStore.create(tmp_path / "hard.zarr", provenance={**prov, "topk": 0}, num_seeds=2,
                              shard_counts=[s.count for s in m.shards], shard_size=m.shard_size,
                              num_classes=m.num_classes, topk=0)
    with pytest.raises(CacheError, match="topk"):
        train_student(make_cfg(env.overrides(tmp_path / "out", "distill=soft", f"cache.path={store.path}")))


def test_schedule_beyond_cached_seeds(env, tmp_path):
    with pytest.raises(ScheduleError, match="cache.cycle=true"):
        train_student(make_cfg(env.overrides(tmp_path / "a", "train.epochs=3")))
    with pytest.raises(ScheduleError, match="S=2"):
        train_student(make_cfg(env.overrides(tmp_path / "b", "train.seed_schedule=[0,2]", "train.epochs=2")))
    metrics = train_student(make_cfg(env.overrides(tmp_path / "c", "train.epochs=3", "cache.cycle=true",
                                                   "train.max_steps_per_epoch=1", "train.dvclive=false")))
    assert metrics["seed_schedule"] == [0, 1, 0]
    assert [h["seed"] for h in metrics["history"]] == [0, 1, 0]


@pytest.mark.slow
def test_cli_refusal_exit_status(env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.train_student", *env.overrides(tmp_path / "o", "run_seed=3")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "run_seed" in proc.stderr and "store has 0" in proc.stderr and "config has 3" in proc.stderr


# ------------------------------------------------------------------------------------------- torchrun


def _subprocess_env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_torchrun_two_ranks(env, tmp_path):
    out = tmp_path / "ddp"
    # same global batch (2 x 32) and lr as the one-process run (1 x 64)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "pipeline.train_student", *env.overrides(out, "train.batch_size=32", "train.log_indices=true")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_rank = []
    for r in range(2):
        lines = [json.loads(x) for x in (out / "indices" / f"rank{r}.jsonl").read_text().splitlines()]
        assert [x["epoch"] for x in lines] == [0]
        per_rank.append(lines[0])
    assert per_rank[0]["steps"] == per_rank[1]["steps"] == STEPS, "equal steps on every rank"
    seen = per_rank[0]["indices"] + per_rank[1]["indices"]
    assert sorted(seen) == list(range(env.toy.train_size)), "every train sample exactly once per epoch"
    assert not set(per_rank[0]["indices"]) & set(per_rank[1]["indices"])

    ddp = json.loads((out / METRICS).read_text())
    single, _ = cached_run(env, "hard-cache", "distill=hard")
    assert ddp["world_size"] == 2 and ddp["global_batch"] == 64 and ddp["steps"] == STEPS
    # different batch composition and drop-path draws: close, not equal
    print("ddp vs single:", {k: (ddp[k], single[k]) for k in ("train_loss", "val_loss", "val_acc")})
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=0.1)
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=0.1)
    assert abs(ddp["val_acc"] - single["val_acc"]) <= 0.15
    assert (out / "dvclive" / "metrics.json").is_file()  # cwd is no Git repo: dvclive ran
    assert not list(tmp_path.rglob("dvc.yaml")), "dvclive must not write a dvc.yaml"


# ------------------------------------------------------------------------------------------- kill -9, resume


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted(env, tmp_path):
    extra = ("train.epochs=3", "train.seed_schedule=[0,1,0]", "train.ema=true", "train.ema_decay=0.9")
    reference, _ = run(env, "kill-reference", *extra, callback=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.train_student", *env.overrides(out, *extra)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_subprocess_env(), start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (out / CHECKPOINT_LAST).exists():
            assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint after 180 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / METRICS).exists(), "killed before the end"

    resumed = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr
    final = json.loads((out / METRICS).read_text())
    ref = comparable(reference)
    got = comparable(final)
    assert got.keys() == ref.keys()
    print("resumed vs uninterrupted:", {k: (got[k], ref[k]) for k in ref if got[k] != ref[k]})
    for k in ref:
        if isinstance(ref[k], float):
            assert got[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k
        else:
            assert got[k] == ref[k], k
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]

    # A truncated newest checkpoint is skipped with a warning; the previous one is used.
    copy = tmp_path / "corrupt"
    shutil.copytree(out, copy)
    data = (copy / CHECKPOINT_LAST).read_bytes()
    (copy / CHECKPOINT_LAST).write_bytes(data[: len(data) // 2])
    chosen, notes = find_checkpoint(copy)
    assert chosen == copy / CHECKPOINT_PREV and "skipping" in notes[0] and CHECKPOINT_LAST in notes[0]

    # The final students load with timm alone (plain state dicts).
    for name in (STUDENT, STUDENT_EMA):
        model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32, patch_size=4,
                                  depth=2, checkpoint_path=str(out / name)).eval()
        with torch.no_grad():
            y = model(torch.randn(2, 3, 32, 32))
        assert y.shape == (2, 10)


def test_student_loads_with_timm_and_eval_averages_heads(env, tmp_path):
    from pipeline.models.student import heads

    train_student(make_cfg(env.overrides(tmp_path, "distill=none", "train.max_steps_per_epoch=2",
                                         "train.dvclive=false")))
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32, patch_size=4,
                              depth=2, checkpoint_path=str(tmp_path / STUDENT)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        c, d = heads(model, x)
        torch.testing.assert_close(model(x), (c + d) / 2)
    sd = torch.load(tmp_path / STUDENT, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
