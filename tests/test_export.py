"""pipeline.export: a really trained student, exported in timm's Hub format, comes back from
``timm.create_model("local-dir:<folder>", pretrained=True)`` in a fresh process, with no kwargs, giving the same
eval logits; a missing checkpoint is a one-line error naming the path (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.config import validate
from pipeline.models.student import load_student

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def make_cfg(overrides):
    with initialize_config_dir(config_dir=str(REPO / "pipeline" / "conf"), version_base="1.3"):
        return validate(compose("config", overrides=list(overrides)))


def overrides(toy_shards, tmp: Path) -> list[str]:
    # A 2-block student, 2 updates without a teacher (distill=none): real training, seconds on a CPU.
    return [f"workdir={tmp}", f"data.shards={toy_shards.root}", "distill=none", "train.epochs=1",
            "train.batch_size=32", "train.max_steps_per_epoch=2", "train.num_workers=0", "train.val=false",
            "train.dvclive=false", "student.kwargs.depth=2", "num_threads=1", f"train.out_dir={tmp / 'student'}",
            f"export.out={tmp / 'export'}"]


def run_stage(module: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


LOAD = """
import sys, timm, torch
torch.set_num_threads(1)
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
cfg = timm.data.resolve_data_config(model=model)
with torch.no_grad():
    logits = model(torch.load(sys.argv[2]))
torch.save({"logits": logits, "data_config": cfg, "num_classes": model.num_classes}, sys.argv[3])
"""


@pytest.mark.slow
def test_export_round_trip_through_timm(toy_shards, tmp_path):
    from pipeline.train.student_run import train_student

    args = overrides(toy_shards, tmp_path)
    cfg = make_cfg(args)
    train_student(cfg)
    proc = run_stage("pipeline.export", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "export"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    mask = os.umask(0)
    os.umask(mask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        n: oct(0o666 & ~mask) for n in ("config.json", "model.safetensors")}  # the umask's, not safetensors' 0600
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "deit_tiny_distilled_patch16_224"
    assert config["num_classes"] == toy_shards.num_classes and config["label_names"] == toy_shards.class_names
    assert config["model_args"]["depth"] == 2 and config["model_args"]["patch_size"] == 8
    pre = config["pretrained_cfg"]
    assert pre["input_size"] == [3, 32, 32] and pre["mean"] == list(cfg.student.mean)
    assert pre["std"] == list(cfg.student.std) and pre["crop_pct"] == cfg.data.crop_pct and "tag" not in pre

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", LOAD, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt")
    trained = load_student(cfg.student, toy_shards.num_classes, tmp_path / "student" / "student.pt")
    with torch.no_grad():
        want = trained(x)
    assert got["num_classes"] == toy_shards.num_classes
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=1e-6)
    assert got["data_config"]["input_size"] == (3, 32, 32)
    assert tuple(got["data_config"]["mean"]) == tuple(cfg.student.mean)


def test_export_without_a_checkpoint_names_the_path(toy_shards, tmp_path):
    missing = tmp_path / "nowhere" / "student.pt"
    proc = run_stage("pipeline.export", [*overrides(toy_shards, tmp_path), f"export.checkpoint={missing}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"export: error: {missing}"), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "export").exists()



@pytest.mark.slow
def test_teacher_export_round_trip_through_timm(toy_shards, tmp_path):
    """`export.model=teacher`: the teacher checkpoint as a timm folder, rebuilt by timm with no kwargs."""
    import timm

    from pipeline.models.teacher import create_teacher

    torch.manual_seed(3)
    torch.save(timm.create_model("resnet10t", num_classes=toy_shards.num_classes).state_dict(), tmp_path / "t.pt")
    args = [*overrides(toy_shards, tmp_path), "teacher=resnet_toy", f"teacher.checkpoint={tmp_path / 't.pt'}",
            "export.model=teacher", f"export.out={tmp_path / 'teacher'}"]
    proc = run_stage("pipeline.export", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "teacher" / "config.json").read_text())
    assert config["architecture"] == "resnet10t" and config["label_names"] == toy_shards.class_names
    cfg = make_cfg(args)
    assert config["pretrained_cfg"]["mean"] == list(cfg.teacher.mean)
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    x = torch.randn(4, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "teacher"), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        want = create_teacher(cfg.teacher, toy_shards.num_classes)(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt")["logits"], want, rtol=0, atol=1e-6)
    assert not (tmp_path / "export").exists()  # the student's folder untouched

    missing = tmp_path / "none.pt"
    proc = run_stage("pipeline.export", [*args, f"teacher.checkpoint={missing}", f"export.out={tmp_path / 'x'}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"export: error: teacher.checkpoint={missing}: no trained teacher"), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()
