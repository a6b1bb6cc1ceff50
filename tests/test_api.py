"""pipeline.api: CachedViews and distillation_targets, and the README example that uses them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir

import pipeline
from pipeline import CachedViews, distillation_targets
from pipeline.cache.reader import CacheTargets
from pipeline.cache.store import CacheStore
from pipeline.config import validate
from pipeline.replay.view_params import augment_config
from pipeline.replay.loader import ViewLoader
from pipeline.errors import CacheError, ProvenanceMismatch, ScheduleError
from pipeline.replay.view_params import AugmentConfig

REPO = Path(__file__).resolve().parents[1]
S = 2


def make_cfg(overrides):
    with initialize_config_dir(config_dir=str(REPO / "pipeline" / "conf"), version_base="1.3"):
        return validate(compose("config", overrides=list(overrides)))


@pytest.fixture(scope="module")
def cached(toy_shards, tmp_path_factory):
    """A store over the session's toy shards: S=2, K = C = 10, full fp16 logits kept; (cfg, store path)."""
    from pipeline.cache.builder import build_cache

    tmp = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=toy_shards.num_classes).state_dict(), tmp / "teacher.pt")
    cfg = make_cfg(["teacher=resnet_toy", f"workdir={tmp}", f"data.shards={toy_shards.root}",
                    f"teacher.checkpoint={tmp / 'teacher.pt'}",
                    f"cache.path={tmp / 'cache.zarr'}", f"cache.num_seeds={S}", "cache.topk=10",
                    "cache.store_logits=true", "cache.num_workers=0", "cache.batch_size=64", "num_threads=1"])
    build_cache(cfg)
    return cfg, tmp / "cache.zarr"


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart: your own training loop", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README section should hold exactly one python block"
    return blocks[0]


def test_exported():
    assert {"CachedViews", "distillation_targets"} <= set(pipeline.__all__)
    assert pipeline.CachedViews is CachedViews


def test_readme_example_runs(tmp_path):
    """The README block, verbatim, in a fresh interpreter (CPU, one thread)."""
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"epoch 1: \d+ steps, loss [0-9.]+", out.stdout), out.stdout


@pytest.mark.parametrize("epoch", [0, 1])
def test_batches_equal_viewloader_with_cache_targets(cached, toy_shards, epoch):
    cfg, path = cached
    views = CachedViews(toy_shards.root / "train", path, batch_size=48, epoch=epoch)
    assert views.fields == ("argmax", "topk_values", "topk_indices", "logsumexp")
    ref = ViewLoader(toy_shards.root / "train", augment_config(cfg), run_seed=int(cfg.run_seed), batch_size=48,
                     shuffle=True, extras=CacheTargets(path, views.fields))
    got, want = list(views), list(ref.epoch(epoch, epoch))
    assert len(got) == len(want) == len(views)
    for a, b in zip(got, want):
        assert sorted(a) == sorted(b) == sorted(["index", "image", "target", "label", "digest", "seed", "argmax",
                                                 "topk_values", "topk_indices", "logsumexp"])
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert bool((got[0]["seed"] == epoch).all())


def test_rank_split_and_epoch_seeds(cached, toy_shards):
    _, path = cached
    ranks = [CachedViews(toy_shards.root / "train", path, batch_size=32, rank=r, world_size=2, num_workers=r,
                         epoch_seeds=[1, 0]) for r in range(2)]
    idx = [torch.cat([b["index"] for b in v]) for v in ranks]
    assert len(ranks[0]) == len(ranks[1])
    assert sorted(torch.cat(idx).tolist()) == list(range(toy_shards.train_size))
    assert all(bool((b["seed"] == 1).all()) for b in ranks[0])  # epoch 0 reads epoch_seeds[0] = 1


def test_wrong_augmentation_or_data_refused(cached, toy_shards):
    cfg, path = cached
    stored = CacheStore.open(path, "r").provenance["augment"]
    keys = {k: v for k, v in stored.items() if k not in ("image_size", "crop_pct")}
    with pytest.raises(ProvenanceMismatch, match=r"augment\.hflip"):
        CachedViews(toy_shards.root / "train", path, augment={**keys, "hflip": 0.0}, batch_size=32)
    with pytest.raises(ProvenanceMismatch, match=r"augment\.image_size"):
        CachedViews(toy_shards.root / "train", path, image_size=24, batch_size=32)
    with pytest.raises(ProvenanceMismatch, match="mix_prob"):
        CachedViews(toy_shards.root / "train", path, augment=AugmentConfig(**{**stored, "mix_prob": 0.0}),
                    batch_size=32)
    with pytest.raises(ProvenanceMismatch, match="run_seed"):
        CachedViews(toy_shards.root / "train", path, run_seed=int(cfg.run_seed) + 1, batch_size=32)
    with pytest.raises(CacheError, match="data_fingerprint"):  # another split: other data
        CachedViews(toy_shards.root / "val", path, batch_size=32)
    # the pipeline/conf/augment keys the store was built with are accepted
    CachedViews(toy_shards.root / "train", path, augment=keys, batch_size=32)
    with pytest.raises(ScheduleError, match="S=2"):
        list(CachedViews(toy_shards.root / "train", path, batch_size=32, epoch=S))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_targets_at_k_eq_c_are_softmax_of_stored_logits(cached, toy_shards, tau):
    _, path = cached
    store = CacheStore.open(path, "r")
    views = CachedViews(toy_shards.root / "train", path, batch_size=64, shuffle=False, seed_index=1)
    batch = next(iter(views))
    C = views.num_classes
    logits = torch.from_numpy(store.read_unit(1, 0, ("logits",))["logits"])[batch["index"]].float()  # shard 0
    soft = distillation_targets(batch, C, mode="soft", tau=tau)
    assert soft.shape == (64, C) and soft.dtype == torch.float32
    torch.testing.assert_close(soft, torch.softmax(logits / tau, -1), rtol=0, atol=1e-6)
    hard = distillation_targets(batch, C)
    assert hard.dtype == torch.int64 and torch.equal(hard, batch["argmax"].long())
    assert torch.equal(hard, batch["topk_indices"][:, 0].long())


@pytest.mark.parametrize("distill_type,tau", [("hard", 1.0), ("soft", 1.0), ("soft", 2.0)])
def test_cached_token_task_equals_timm_online_task(cached, toy_shards, distill_type, tau):
    """On the same views, timm's TokenDistillationTask with the cache's teacher gives the same loss as the task
    that reads the cache: hard exactly, soft within the fp16 rounding of the stored top-K (K = C)."""
    from timm.loss import SoftTargetCrossEntropy
    from timm.task import TokenDistillationTask

    from pipeline.models.teacher import create_teacher, model_input
    from pipeline.train.timm_task import CachedTokenDistillationTask

    cfg, path = cached
    batch = next(iter(CachedViews(toy_shards.root / "train", path, batch_size=64, seed_index=1)))

    def student():
        torch.manual_seed(1)
        return timm.create_model("deit_tiny_distilled_patch16_224", num_classes=toy_shards.num_classes,
                                 img_size=32, patch_size=8, depth=2)

    kw = dict(criterion=SoftTargetCrossEntropy(), distill_type=distill_type, temperature=tau,
              task_loss_weight=0.5, verbose=False)
    online = TokenDistillationTask(student(), create_teacher(cfg.teacher, toy_shards.num_classes), **kw)
    ours = CachedTokenDistillationTask(student(), **kw)
    s = online.trainable_module.pretrained_cfg
    assert (list(s["mean"]), list(s["std"])) == (list(cfg.teacher.mean), list(cfg.teacher.std))  # no re-normalising
    x = model_input(batch["image"], s["mean"], s["std"], device="cpu", size=cfg.teacher.input_size)
    a, b = online(x, batch["target"]), ours(x, batch["target"], teacher=batch)
    assert sorted(a) == sorted(b) == ["distill_loss", "loss", "output", "task_loss"]
    assert torch.equal(a["output"], b["output"]) and torch.equal(a["task_loss"], b["task_loss"])
    if distill_type == "hard":
        assert torch.equal(a["distill_loss"], b["distill_loss"]) and torch.equal(a["loss"], b["loss"])
    else:
        torch.testing.assert_close(b["distill_loss"], a["distill_loss"], rtol=0, atol=2e-3)
        assert not torch.equal(a["distill_loss"], b["distill_loss"])  # the fp16 rounding is really there
    b["loss"].backward()
    assert ours.trainable_module.head_dist.weight.grad is not None
