"""DeiT's fine-tune at a higher resolution (`+finetune=deit_384`, conf/finetune/deit_384.yaml), end to end on the
CPU at small scale through the real commands: toy shards, a student trained at 32 px, a cache of 64 px views of
the same shards (teacher at 64 px), the fine-tune from the 32 px student (timm resamples the position embedding),
evaluate. 64 px stands in for 384 (data.image_size=64: the student's and the teacher's input follow it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.compose import compose
from pipeline.config import validate
from pipeline.errors import CheckpointError, MissingInput
from pipeline.models.student import create_student, init_student

REPO = Path(__file__).resolve().parents[1]
FT = ["+finetune=deit_384", "data.image_size=64", "cache.num_seeds=3"]
SMALL = ["train.epochs=1", "train.batch_size=16", "train.max_steps_per_epoch=2", "train.num_workers=0",
         "train.dvclive=false", "train.val=false", "++student.kwargs.depth=1", "num_threads=1"]


def stage(module: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_finetune_config_is_deits():
    cfg = validate(compose(["data=imagenet", "data.root=/x", "teacher=regnety_160", "student=deit_base", "train=deit",
                            "augment=deit", "+finetune=deit_384"]))
    t = cfg.train
    assert (cfg.data.image_size, cfg.student.img_size, cfg.teacher.input_size) == (384, 384, 384)
    assert (t.epochs, float(t.lr), float(t.min_lr), float(t.weight_decay), t.warmup_epochs) == (30, 5e-6, 5e-6, 1e-8, 5)
    assert t.batch_size * 8 == 512 and cfg.cache.num_seeds == 30 and t.repeat_mode == "ranks"
    assert t.init.endswith("runs/student/imagenet-hard-cache/student.pt")
    assert t.out_dir.endswith("imagenet-hard-cache-384px") and "-384px-s30.zarr" in cfg.cache.path


def test_init_student_resamples_the_position_embedding(tmp_path):
    """From a 32 px student to 64 px: every tensor but pos_embed copied, pos_embed timm's bicubic resample (its
    two prefix tokens kept); a missing file or another architecture is refused naming train.init."""
    from timm.layers import resample_abs_pos_embed

    small = validate(compose(["++student.kwargs.depth=1"])).student
    torch.manual_seed(0)
    src = create_student(small, 10)
    torch.save(src.state_dict(), tmp_path / "student.pt")
    big = validate(compose(["++student.kwargs.depth=1", "data.image_size=64"])).student
    dst = create_student(big, 10)
    init_student(dst, tmp_path / "student.pt")
    s, d = src.state_dict(), dst.state_dict()
    assert s["pos_embed"].shape == (1, 2 + 16, 192) and d["pos_embed"].shape == (1, 2 + 64, 192)
    assert torch.equal(d["pos_embed"], resample_abs_pos_embed(s["pos_embed"], (8, 8), (4, 4), num_prefix_tokens=2))
    assert all(torch.equal(d[k], v) for k, v in s.items() if k != "pos_embed")
    with pytest.raises(MissingInput, match="train.init=.*nothing.pt: no such file"):
        init_student(dst, tmp_path / "nothing.pt")
    deeper = create_student(validate(compose(["++student.kwargs.depth=2", "data.image_size=64"])).student, 10)
    with pytest.raises(CheckpointError, match="train.init=.*student.pt: not a state dict of this student"):
        init_student(deeper, tmp_path / "student.pt")


@pytest.mark.slow
def test_finetune_end_to_end_on_the_cpu(tmp_path):
    data = [f"workdir={tmp_path}", "data.train_size=64", "data.val_size=32", "data.shard_size=32"]
    made = stage("make_shards", *data)
    assert made.returncode == 0, made.stderr[-3000:]
    base = stage("train_student", *data, "distill=none", *SMALL)
    assert base.returncode == 0, base.stderr[-3000:]
    init = tmp_path / "runs" / "student" / "toy-none-cache" / "student.pt"
    assert init.is_file()

    teacher = ["teacher.checkpoint=null"]  # a random small teacher: the pipeline, not its accuracy, is the point
    cached = stage("teacher_cache", *data, *FT, *teacher, "cache.num_workers=0", "cache.batch_size=64")
    assert cached.returncode == 0, cached.stderr[-3000:]
    store = tmp_path / "cache" / "toy-regnety_002-64px-s3.zarr"
    assert (store / "zarr.json").is_file()
    assert not (tmp_path / "cache" / "toy-regnety_002-s3.zarr").exists()  # the 32 px store's name stays free

    ft = [*data, *FT, *teacher, *SMALL, f"train.init={init}"]
    tuned = stage("train_student", *ft)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    run = tmp_path / "runs" / "student" / "toy-hard-cache-64px"
    state = torch.load(run / "student.pt", map_location="cpu")
    assert state["pos_embed"].shape == (1, 2 + 64, 192)
    before = torch.load(init, map_location="cpu")
    assert not torch.equal(state["blocks.0.mlp.fc1.weight"], before["blocks.0.mlp.fc1.weight"])  # it trained
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 1

    evaluated = stage("evaluate", *ft)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads((run / "eval.json").read_text())
    assert 0 <= result["acc"] <= 1 and 0 <= result["acc_dist"] <= 1, result

    wrong = stage("train_student", *ft, f"train.init={tmp_path / 'none.pt'}", "train.out_dir=" + str(tmp_path / "x"))
    assert wrong.returncode == 2 and "train.init=" in wrong.stderr and "none.pt" in wrong.stderr, wrong.stderr
