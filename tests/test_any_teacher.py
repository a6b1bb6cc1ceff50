"""Label any data with any teacher: an image folder (PNG and JPEG of mixed sizes) -> shards -> a cache built by a
timm model that is not the pipeline's teacher (here from a timm folder: ``local-dir:``, as a Hub download would
be), read back with pipeline.CachedViews; its targets are that model's own answers on the replayed views. Also
the refusals that keep such a teacher honest: weights of another class count, a fixed-size model fed other sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image

from pipeline import CachedViews
from pipeline.errors import TeacherError
from pipeline.models.teacher import TeacherRunner, create_teacher, model_input

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
CLASSES = ["cat", "dog", "fox"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 100, 2)
                pixels = (rng.random((h, w, 3)) * 90 + 60 * c).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def saved_timm_model(path: Path, name: str, num_classes: int) -> Path:
    from timm.models import save_for_hf

    torch.manual_seed(1)
    save_for_hf(timm.create_model(name, num_classes=num_classes).eval(), str(path), safe_serialization=True)
    return path


def stage(module: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_folder_cache_from_any_timm_teacher(tmp_path):
    folder = image_folder(tmp_path / "images")
    teacher = saved_timm_model(tmp_path / "teacher", "mobilenetv3_small_050", len(CLASSES))
    data = [f"workdir={tmp_path}", "data=folder", f"data.root={folder}", f"data.num_classes={len(CLASSES)}",
            "data.image_size=48", "data.shard_size=8"]
    cache = tmp_path / "labels.zarr"
    stage("pipeline.make_shards", *data)
    stage("pipeline.teacher_cache", *data, f"teacher.name=local-dir:{teacher}", "teacher.pretrained=true",
          "teacher.checkpoint=null", "teacher.input_size=null", f"cache.path={cache}", "cache.num_seeds=2",
          "cache.topk=3", "cache.num_workers=0", "num_threads=1")

    views = CachedViews(tmp_path / "data/shards/images/train", cache, batch_size=8)  # named after the folder
    model = timm.create_model(f"local-dir:{teacher}", pretrained=True).eval()
    assert views.num_classes == len(CLASSES) and len(views) == 3
    seen = 0
    for epoch in (0, 1):  # epoch e reads cached seed e
        views.set_epoch(epoch)
        for batch in views:
            assert batch["image"].shape[-2:] == (48, 48) and batch["topk_indices"].shape[1] == 3
            with torch.no_grad():
                logits = model(model_input(batch["image"], MEAN, STD, device="cpu"))
            assert torch.equal(batch["argmax"].long(), logits.argmax(1))  # the teacher's answers on these views
            torch.testing.assert_close(batch["topk_values"].float(), logits.topk(3).values, atol=0.02, rtol=0.01)
            seen += len(batch["index"])
    assert seen == 2 * 3 * len(CLASSES) * 2


def cfg(name, **kw):
    base = {"name": name, "pretrained": False, "checkpoint": None, "input_size": None, "mean": MEAN, "std": STD,
            "channels_last": False, "bf16": False, "compile": False, "train": {"init_seed": 0}}
    return OmegaConf.create({**base, **kw})


def test_teacher_weights_of_another_class_count_are_refused(tmp_path):
    teacher = saved_timm_model(tmp_path / "t5", "resnet10t", 5)
    with pytest.raises(TeacherError, match="pretrained weights have 5 classes, the data 3"):
        create_teacher(cfg(f"local-dir:{teacher}", pretrained=True), 3)
    assert create_teacher(cfg(f"local-dir:{teacher}", pretrained=True), 5).num_classes == 5


def test_safetensors_checkpoint_and_seeded_untrained_teacher(tmp_path):
    teacher = saved_timm_model(tmp_path / "t3", "resnet10t", 3)
    loaded = create_teacher(cfg("resnet10t", checkpoint=str(teacher / "model.safetensors")), 3)
    want = timm.create_model(f"local-dir:{teacher}", pretrained=True).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    a, b = create_teacher(cfg("resnet10t"), 3), create_teacher(cfg("resnet10t"), 3)  # no weights: seeded init
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_fixed_size_teacher_names_the_input_size():
    runner = TeacherRunner(create_teacher(cfg("vit_tiny_patch16_224"), 3), cfg("vit_tiny_patch16_224"), "cpu")
    with pytest.raises(TeacherError, match="takes 224x224 inputs only.*teacher.input_size=224"):
        runner(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
