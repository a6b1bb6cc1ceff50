"""Teacher: building and loading checkpoints (with the errors that name what is wrong), model_input,
TeacherRunner, provenance, and a short real training run through the CLI on the toy shards."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf

from pipeline.data import shard_writer, sources
from pipeline.replay.view_params import AugmentConfig
from pipeline.errors import TeacherError
from pipeline.models.teacher import (TeacherRunner, create_teacher, model_input, teacher_provenance,
                              weights_sha256)
from pipeline.train.teacher_run import TEACHER_SEED_OFFSET, teacher_augment

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# The trained-teacher test uses its own, larger toy set and resnet10t (pipeline/conf/teacher/resnet_toy.yaml), the fastest
# toy teacher to leave chance within a test's budget; the toy RegNetY (pipeline/conf/teacher/regnety_toy.yaml) is trained
# for real by the toy pipeline (tests/test_dvc.py). The loading/error tests below use that narrow RegNetY.
TRAIN_N, VAL_N = 2048, 512
TRAIN_OVERRIDES = ["teacher=resnet_toy", "teacher.train.epochs=6", "teacher.train.batch_size=32",
                   "teacher.train.num_workers=0", "num_threads=1"]


def teacher_cfg(**over):
    cfg = OmegaConf.load(REPO / "pipeline" / "conf" / "teacher" / "regnety_toy.yaml")
    cfg.checkpoint = None
    for k, v in over.items():
        cfg[k] = v
    return cfg


KWARGS = dict(teacher_cfg().kwargs)  # the toy RegNetY's configuration (widths, depth, output stride)


def run_cli(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train a toy teacher briefly through the real CLI on 2048 toy samples."""
    work = tmp_path_factory.mktemp("teacher")
    data = work / "shards"
    for split, n in (("train", TRAIN_N), ("val", VAL_N)):
        s = sources.toy(0, n, split)
        shard_writer.write_shards(s, data / split, shard_size=256, num_classes=10, class_names=s.class_names,
                            source=s.source)
    proc = run_cli("pipeline.train_teacher", f"workdir={work}", f"data.shards={data}", *TRAIN_OVERRIDES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / "runs" / "teacher" / "toy-resnet10t"
    flat = json.loads((out / "train" / "metrics.json").read_text())  # teacher.train.metrics: the flat numbers
    assert not (work / "metrics").exists()  # a run by hand never writes the project's git-tracked metrics/
    record = json.loads((out / "train" / "run.json").read_text())  # the run's full record
    assert flat == {"acc": record["val_acc"], "img_per_s": record["img_per_s"], "seconds": record["seconds"]}
    return work, data, out / "teacher.pt", record


# ------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_cli_trains_a_teacher_that_beats_chance(trained):
    _, _, ckpt, metrics = trained
    assert ckpt.is_file()
    assert metrics["epochs"] == 6 and len(metrics["history"]) == 6
    assert metrics["img_per_s"] > 0 and metrics["train_loss"] < metrics["history"][0]["train_loss"]
    assert metrics["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert metrics["run_seed"] == TEACHER_SEED_OFFSET  # cfg.run_seed 0: never the views the cache labels
    # 10 classes: chance is 0.10 (seen here: 0.59 after 6 epochs, ~36 s of 1-thread CPU)
    assert metrics["val_acc"] >= 0.3, metrics["history"]


def test_checkpoint_loads_with_create_teacher_and_plain_timm(trained):
    _, _, ckpt, _ = trained
    ours = create_teacher(teacher_cfg(name="resnet10t", checkpoint=str(ckpt)), 10)
    assert not ours.training
    plain = timm.create_model("resnet10t", num_classes=10, checkpoint_path=str(ckpt)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)


def test_cli_refuses_to_replace_a_teacher(trained):
    work, data, ckpt, _ = trained
    before = ckpt.read_bytes()
    proc = run_cli("pipeline.train_teacher", f"workdir={work}", f"data.shards={data}", "teacher=resnet_toy",
                   timeout=120)
    assert proc.returncode == 2
    assert "overwrite=true" in proc.stderr and str(ckpt) in proc.stderr and "Traceback" not in proc.stderr
    assert ckpt.read_bytes() == before


def test_cli_missing_shards_exit_2(tmp_path):
    proc = run_cli("pipeline.train_teacher", f"workdir={tmp_path}", timeout=120)
    assert proc.returncode == 2
    assert "manifest" in proc.stderr and str(tmp_path / "data" / "shards" / "toy" / "train") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_class_count_mismatch_exit_2(tmp_path, toy_shards):
    proc = run_cli("pipeline.train_teacher", f"workdir={tmp_path}", f"data.shards={toy_shards.root}",
                   "data.num_classes=7", timeout=120)
    assert proc.returncode == 2
    assert "10 classes" in proc.stderr and "data.num_classes is 7" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "teacher" / "toy" / "teacher.pt").exists()


def test_cli_fixed_size_teacher_fed_another_size_exit_2(tmp_path, toy_shards):
    """The check stage one makes (pipeline.models.teacher.check_input), before any training work."""
    proc = run_cli("pipeline.train_teacher", f"workdir={tmp_path}", f"data.shards={toy_shards.root}",
                   "teacher.name=vit_tiny_patch16_224", "teacher.train.num_workers=0", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "train_teacher: error: teacher vit_tiny_patch16_224 takes 224x224 inputs only, it would be given 32x32 "
        "(teacher.input_size=32): set teacher.input_size=224")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "metrics").exists()


def test_teacher_augment_is_its_own_recipe():
    deit = OmegaConf.load(REPO / "pipeline" / "conf" / "augment" / "deit.yaml")
    cfg = OmegaConf.create({"augment": deit, "data": {"image_size": 32, "crop_pct": 1.0},
                            "teacher": {"train": {"augment": None}}})
    assert teacher_augment(cfg) == AugmentConfig.from_cfg(deit, 32)
    cfg.teacher.train.augment = {"mix_prob": 0.0, "rand_augment": None}
    own = teacher_augment(cfg)
    assert own.mix_prob == 0.0 and own.ra is None and own.erase_prob == AugmentConfig(32).erase_prob
    # the toy teachers' recipe
    toy = OmegaConf.load(REPO / "pipeline" / "conf" / "teacher_recipe" / "toy.yaml").augment
    assert AugmentConfig.from_cfg(toy, 32).mixing is False


# ------------------------------------------------------------------------------------------ checkpoints


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(TeacherError, match=str(path)):
        create_teacher(teacher_cfg(checkpoint=str(path)), 10)


def test_load_false_skips_the_checkpoint(tmp_path):
    model = create_teacher(teacher_cfg(checkpoint=str(tmp_path / "not-yet.pt")), 10, load=False)
    assert model.get_classifier().out_features == 10


def test_wrong_architecture_names_checkpoint_model_and_key(tmp_path):
    path = tmp_path / "regnety_004.pt"
    torch.save(timm.create_model("regnety_004", num_classes=10).state_dict(), path)
    with pytest.raises(TeacherError) as err:
        create_teacher(teacher_cfg(checkpoint=str(path)), 10)
    msg = str(err.value)
    assert str(path) in msg and "'regnety_002'" in msg
    assert "key 'stem.conv.weight'" in msg or "key 's1." in msg, msg
    assert "checkpoint [" in msg and "model [" in msg


def test_class_count_mismatch_names_both_counts(tmp_path):
    path = tmp_path / "five.pt"
    torch.save({"model": timm.create_model("regnety_002", num_classes=5, **KWARGS).state_dict(), "epoch": 3}, path)
    with pytest.raises(TeacherError) as err:
        create_teacher(teacher_cfg(checkpoint=str(path)), 10)
    msg = str(err.value)
    assert str(path) in msg and "'regnety_002'" in msg and "head.fc" in msg
    assert "checkpoint has 5 classes" in msg and "model 10" in msg


def test_wrapped_and_prefixed_state_dicts_load(tmp_path):
    src = timm.create_model("regnety_002", num_classes=10, **KWARGS)
    path = tmp_path / "wrapped.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 1}, path)
    model = create_teacher(teacher_cfg(checkpoint=str(path)), 10)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_kwargs_configure_the_architecture_and_enter_provenance(tmp_path):
    torch.manual_seed(0)
    narrow = create_teacher(teacher_cfg(), 10, load=False)
    torch.manual_seed(0)
    plain = timm.create_model("regnety_002", num_classes=10, **KWARGS)
    assert narrow.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in narrow.state_dict().items())
    stock = create_teacher(teacher_cfg(kwargs={}), 10, load=False)
    n = sum(p.numel() for p in narrow.parameters())
    assert n < 300_000 < sum(p.numel() for p in stock.parameters())  # ~0.2M vs regnety_002's ~2.8M
    with torch.inference_mode():  # output_stride 8: a 32 px view keeps a 4x4 feature map
        assert narrow.eval().forward_features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)
    assert teacher_provenance(teacher_cfg(), narrow, 10)["kwargs"] == KWARGS
    assert "kwargs" not in teacher_provenance(teacher_cfg(kwargs={}), stock, 10)  # stores from before kwargs match

    # weights of the stock architecture do not load into the configured one, and the error says which
    path = tmp_path / "stock.pt"
    torch.save(stock.state_dict(), path)
    with pytest.raises(TeacherError, match=str(path)):
        create_teacher(teacher_cfg(checkpoint=str(path)), 10)


def test_kwargs_only_configure_the_model_they_are_for():
    """teacher.name=<another model> on the toy config gets none of the RegNetY's kwargs (teacher.kwargs_for)."""
    other = teacher_cfg(name="resnet10t")
    assert create_teacher(other, 10, load=False).default_cfg["architecture"] == "resnet10t"
    assert "kwargs" not in teacher_provenance(other, create_teacher(other, 10, load=False), 10)


def test_kwargs_null_override_gives_the_stock_model():
    """On the command line `teacher.kwargs={}` merges into the configured dict (Hydra); `teacher.kwargs=null` is the
    override that drops them, and it passes the config schema."""
    from bench.common import compose
    from pipeline.config import validate

    assert dict(validate(compose(["teacher.kwargs={}"])).teacher.kwargs) == KWARGS
    cfg = validate(compose(["teacher.kwargs=null"]))
    stock = create_teacher(cfg.teacher, 10, load=False)
    assert stock.stem.conv.out_channels == 32 and "kwargs" not in teacher_provenance(cfg.teacher, stock, 10)
    named = validate(compose(["teacher=regnety_002"])).teacher  # the group that tests and benches name
    assert OmegaConf.to_container(named, resolve=True) == OmegaConf.to_container(cfg.teacher, resolve=True)


def test_unknown_kwarg_names_the_teacher_and_the_key():
    with pytest.raises(TeacherError, match=r"regnety_002.*not_a_regnet_arg"):
        create_teacher(teacher_cfg(kwargs={"not_a_regnet_arg": 3}), 10, load=False)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="cannot be read"):
        create_teacher(teacher_cfg(checkpoint=str(path)), 10)


# ------------------------------------------------------------------------------------------ inference


def test_model_input_scales_resizes_and_normalises():
    x = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    out = model_input(x, MEAN, STD, device="cpu", size=16)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    want = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)])
    torch.testing.assert_close(out[0, :, 5, 7], want)
    assert model_input(x, MEAN, STD, device="cpu").shape == (2, 3, 8, 8)  # no size: view size
    assert model_input(x, MEAN, STD, device="cpu", channels_last=True).is_contiguous(
        memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="uint8"):
        model_input(x.float(), MEAN, STD, device="cpu")


def test_runner_matches_plain_eval_forward():
    torch.manual_seed(0)
    model = create_teacher(teacher_cfg(), 10)
    cfg = teacher_cfg(input_size=48)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        want = model(model_input(images, MEAN, STD, device="cpu", size=48))
    runner = TeacherRunner(model, cfg, "cpu")
    got = runner(images)
    assert got.dtype == torch.float32 and got.shape == (5, 10)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ provenance


def test_weights_sha256_and_provenance(tmp_path):
    torch.manual_seed(0)
    model = create_teacher(teacher_cfg(), 10)
    sha = weights_sha256(model)
    assert sha == weights_sha256(model.state_dict()) and len(sha) == 64
    with torch.no_grad():
        model.head.fc.bias[0] += 1
    assert weights_sha256(model) != sha

    path = tmp_path / "t.pt"
    torch.save(model.state_dict(), path)
    assert weights_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    prov = teacher_provenance(teacher_cfg(checkpoint=str(path)), model, 10)
    assert prov["name"] == "regnety_002" and prov["num_classes"] == 10 and prov["resolution"] == 32
    assert prov["weights_sha256"] == weights_sha256(path)
    hub = teacher_provenance(teacher_cfg(input_size=None), model, 10, image_size=32)
    assert hub["weights_sha256"] == weights_sha256(model) and hub["resolution"] == 32
