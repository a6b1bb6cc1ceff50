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
from pipeline import CachedViews, ValViews, distillation_targets
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
    assert {"CachedViews", "ValViews", "distillation_targets", "CachedTokenDistillationTask",
            "CachedLogitDistillationTask"} <= set(pipeline.__all__)
    assert pipeline.CachedViews is CachedViews
    from pipeline.train.timm_task import CachedLogitDistillationTask, CachedTokenDistillationTask

    assert (pipeline.CachedTokenDistillationTask, pipeline.CachedLogitDistillationTask) == (
        CachedTokenDistillationTask, CachedLogitDistillationTask)


@pytest.mark.slow
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

    from pipeline import CachedTokenDistillationTask
    from pipeline.models.teacher import create_teacher, model_input

    cfg, path = cached
    views = CachedViews(toy_shards.root / "train", path, batch_size=64, seed_index=1)
    batch = next(iter(views))

    def student():
        torch.manual_seed(1)
        return timm.create_model("deit_tiny_distilled_patch16_224", num_classes=toy_shards.num_classes,
                                 img_size=32, patch_size=8, depth=2)

    kw = dict(criterion=SoftTargetCrossEntropy(), distill_type=distill_type, temperature=tau,
              task_loss_weight=0.5, verbose=False)
    online = TokenDistillationTask(student(), create_teacher(cfg.teacher, toy_shards.num_classes), **kw)
    ours = CachedTokenDistillationTask(student(), views if distill_type == "soft" else path, **kw)
    s = online.trainable_module.pretrained_cfg
    assert (list(s["mean"]), list(s["std"])) == (list(cfg.teacher.mean), list(cfg.teacher.std))  # no re-normalising
    x = model_input(batch["image"], s["mean"], s["std"], device="cpu", size=cfg.teacher.input_size)
    a, b = online(x, batch["target"]), ours(x, batch)
    assert sorted(a) == sorted(b) == ["distill_loss", "loss", "output", "task_loss"]
    assert torch.equal(a["output"], b["output"]) and torch.equal(a["task_loss"], b["task_loss"])
    if distill_type == "hard":
        assert torch.equal(a["distill_loss"], b["distill_loss"]) and torch.equal(a["loss"], b["loss"])
    else:
        torch.testing.assert_close(b["distill_loss"], a["distill_loss"], rtol=0, atol=2e-3)
        assert not torch.equal(a["distill_loss"], b["distill_loss"])  # the fp16 rounding is really there
    b["loss"].backward()
    assert ours.trainable_module.head_dist.weight.grad is not None


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_cached_logit_task_equals_timm_online_task(cached, toy_shards, tau):
    """timm's LogitDistillationTask (a student without a distillation token) with the cache's teacher, against the
    cached variant on the same views: the same task loss, the KL term within the fp16 rounding of the top-K."""
    from timm.loss import SoftTargetCrossEntropy
    from timm.task import LogitDistillationTask

    from pipeline import CachedLogitDistillationTask
    from pipeline.models.teacher import create_teacher, model_input

    cfg, path = cached
    views = CachedViews(toy_shards.root / "train", path, batch_size=32, seed_index=0)
    batch = next(iter(views))

    def student():
        torch.manual_seed(2)
        return timm.create_model("resnet10t", num_classes=toy_shards.num_classes)

    kw = dict(criterion=SoftTargetCrossEntropy(), temperature=tau, task_loss_weight=0.25, verbose=False)
    online = LogitDistillationTask(student(), create_teacher(cfg.teacher, toy_shards.num_classes), **kw)
    ours = CachedLogitDistillationTask(student(), views, **kw)
    assert (ours.task_loss_weight, ours.distill_loss_weight) == (0.25, 0.75)
    s = online.trainable_module.pretrained_cfg
    x = model_input(batch["image"], s["mean"], s["std"], device="cpu", size=cfg.teacher.input_size)
    online.eval(), ours.eval()  # batch-norm statistics: both students see the same x in the same mode
    a, b = online(x, batch["target"]), ours(x, batch)
    assert sorted(a) == sorted(b) == ["kd_loss", "loss", "output", "task_loss"]
    assert torch.equal(a["output"], b["output"]) and torch.equal(a["task_loss"], b["task_loss"])
    torch.testing.assert_close(b["kd_loss"], a["kd_loss"], rtol=0, atol=2e-3)
    assert a["kd_loss"].item() > 0


def test_cached_tasks_refuse_what_they_cannot_use(cached, toy_shards, tmp_path):
    from pipeline import CachedLogitDistillationTask, CachedTokenDistillationTask
    from pipeline.errors import ConfigError, UserError

    _, path = cached
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=toy_shards.num_classes, img_size=32,
                             patch_size=8, depth=1)
    with pytest.raises(UserError, match="ResNet has no distillation head"):
        CachedTokenDistillationTask(timm.create_model("resnet10t", num_classes=10), path, verbose=False)
    with pytest.raises(UserError, match=r"holds 10 classes.*num_classes=7"):
        CachedLogitDistillationTask(timm.create_model("resnet10t", num_classes=7), path, verbose=False)
    with pytest.raises(UserError, match="temperature=0"):
        CachedTokenDistillationTask(deit, path, temperature=0.0, verbose=False)
    with pytest.raises(UserError, match="distill_type='kd'"):
        CachedTokenDistillationTask(deit, path, distill_type="kd", verbose=False)
    with pytest.raises(UserError, match=r"cache=3: expected a pipeline.CachedViews or the path"):
        CachedTokenDistillationTask(deit, 3, verbose=False)
    task = CachedTokenDistillationTask(deit, path, verbose=False)
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="target must be the CachedViews batch.*got Tensor"):
        task(x, torch.zeros(2, 10))
    with pytest.raises(ConfigError, match="distill_type=soft needs topk_values.*missing: topk_values"):
        task(x, {"target": torch.zeros(2, 10), "argmax": torch.zeros(2, dtype=torch.int64)})


def test_transform_hook_and_val_views(cached, toy_shards):
    """transform= replaces each batch's image; ValViews reads the deterministic val views, the same each pass,
    with the store's view size and crop (as stage two's val loader)."""
    cfg, path = cached
    raw = next(iter(CachedViews(toy_shards.root / "train", path, batch_size=16, shuffle=False, seed_index=0)))
    got = next(iter(CachedViews(toy_shards.root / "train", path, batch_size=16, shuffle=False, seed_index=0,
                                transform=lambda x: x.float() / 255)))
    assert got["image"].dtype == torch.float32 and torch.equal(got["image"], raw["image"].float() / 255)
    assert torch.equal(got["index"], raw["index"])

    val = ValViews(toy_shards.root / "val", path, batch_size=50, transform=lambda x: x.float())
    ref = ViewLoader(toy_shards.root / "val", augment_config(cfg), run_seed=int(cfg.run_seed), batch_size=50,
                     train=False)
    a, b, again = list(val), list(ref.epoch(0, 0)), list(val)
    assert len(a) == len(val) == len(b) and sum(len(x["index"]) for x in a) == toy_shards.val_size
    for x, y, z in zip(a, b, again):
        assert torch.equal(x["image"], y["image"].float()) and torch.equal(x["image"], z["image"])
        assert torch.equal(x["label"], y["label"]) and torch.equal(x["index"], y["index"])
    sized = next(iter(ValViews(toy_shards.root / "val", image_size=24, batch_size=8)))
    assert sized["image"].shape == (8, 3, 24, 24) and sized["image"].dtype == torch.uint8


def test_unusable_device_and_url_lists_are_one_line_errors(cached, toy_shards):
    from pipeline.errors import UserError

    _, path = cached
    train = toy_shards.root / "train"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"device='cuda': CUDA is not available.*device='cpu'"):
            CachedViews(train, path, batch_size=8, device="cuda")
        with pytest.raises(UserError, match=r"device='cuda'"):
            ValViews(toy_shards.root / "val", path, batch_size=8, device="cuda")
    with pytest.raises(UserError, match=r"device='tpu9'"):
        CachedViews(train, path, batch_size=8, device="tpu9")
    tars = [str(train / s.name) for s in toy_shards.train.shards]
    with pytest.raises(UserError, match=rf"shards: expected one path or URL.*list of 8: pass their directory "
                                        rf"'{train}'"):
        CachedViews(tars, path, batch_size=8)
    with pytest.raises(UserError, match="cache: expected one path"):
        CachedViews(train, [path], batch_size=8)


@pytest.mark.slow
def test_api_doc_runs(tmp_path):
    """docs/api.md's python blocks, verbatim and in order, as one script in a fresh interpreter (CPU, one thread):
    a timm user's script (from pipeline only the dataset and the task) trains one epoch on the toy cache."""
    text = (REPO / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 5, len(blocks)
    user = blocks[1]
    ours = re.findall(r"^from pipeline(?:\.\w+)* import (.+)$|^import pipeline", user, re.M)
    assert ours == ["CachedTokenDistillationTask, CachedViews"], ours  # only the task and the dataset from us
    script = tmp_path / "api_doc.py"
    script.write_text("\n".join(blocks))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    epoch = re.search(r"epoch 0: (\d+) steps, loss ([0-9.]+), distill ([0-9.]+)", out.stdout)
    assert epoch and int(epoch[1]) == 4 and float(epoch[2]) > 0, out.stdout  # 256 views / 64
    assert re.search(r"val accuracy [01]\.\d+ on 64 views", out.stdout), out.stdout
    assert re.search(r"resnet10t: 2 steps, kd_loss [0-9.]+", out.stdout), out.stdout
    assert "teacher regnety_002: 10 classes, input (3, 32, 32)" in out.stdout, out.stdout


def test_cached_task_prepare_distributed_wraps_the_student(cached, toy_shards):
    """timm's prepare_distributed contract: the student in DDP (a real one-process gloo group), same loss."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline import CachedTokenDistillationTask

    _, path = cached
    batch = next(iter(CachedViews(toy_shards.root / "train", path, batch_size=8, seed_index=0,
                                  transform=lambda x: x.float() / 255)))
    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=1)
    task = CachedTokenDistillationTask(student, path, verbose=False)
    before = task(batch["image"], batch)["loss"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert task.prepare_distributed() is task
        assert isinstance(task.trainable_module, DistributedDataParallel)
        after = task(batch["image"], batch)
        torch.testing.assert_close(after["loss"], before, rtol=0, atol=0)
        after["loss"].backward()
        assert student.head_dist.weight.grad is not None
    finally:
        dist.destroy_process_group()
