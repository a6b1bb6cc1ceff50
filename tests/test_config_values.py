"""Every configuration value that could poison a run is refused at composition: one line naming the key, the bad
value and what is allowed, exit 2, before any stage writes anything (pipeline.config_rules). One case per key,
composed in process as every command composes it; a few through the real command lines (and pipeline.launch)."""

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pipeline import config_rules
from pipeline.compose import compose
from pipeline.config import RunSchema, validate
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

CASES = [  # (override, what the one line must say)
    ("data.num_classes=0", "data.num_classes=0 must be >= 1"),
    ("data.image_size=0", "data.image_size=0 must be >= 1"),
    ("data.shard_size=0", "data.shard_size=0 must be >= 1"),
    ("data.crop_pct=0", "data.crop_pct=0.0 must be in (0, 1]"),
    ("data.crop_pct=1.5", "data.crop_pct=1.5 must be in (0, 1]"),
    ("data.train_size=0", "data.train_size=0 must be >= 1"),
    ("data.val_size=0", "data.val_size=0 must be >= 1"),
    ("+data.train_limit=0", "data.train_limit=0 must be >= 1"),
    ("+data.val_limit=0", "data.val_limit=0 must be >= 1"),
    ("data.seed=-1", "data.seed=-1 must be >= 0"),
    ("+data.max_side=8", "data.max_side=8 must be >= 16"),
    ("+data.max_side_quality=101", "data.max_side_quality=101 must be in [1, 100]"),
    ("data.train_label_noise=1.0", "data.train_label_noise=1.0 must be in [0, 1)"),
    ("data.source=web", "data.source='web' is not one of ('toy', 'fashion_mnist', 'folder'"),
    ("augment.crop_scale=[0.5]", "augment.crop_scale=[0.5] must be two increasing numbers [low, high], within (0, 1]"),
    ("augment.crop_scale=[0.9,0.5]", "augment.crop_scale=[0.9, 0.5] must be two increasing numbers"),
    ("augment.crop_scale=[0.5,1.5]", "augment.crop_scale=[0.5, 1.5] must be two increasing numbers"),
    ("augment.crop_scale=[0,1]", "augment.crop_scale=[0.0, 1.0] must be two increasing numbers"),
    ("augment.crop_ratio=[0,1]", "augment.crop_ratio=[0.0, 1.0] must be two increasing numbers [low, high], positive"),
    ("augment.crop_ratio=[1.3,0.75]", "augment.crop_ratio=[1.3, 0.75] must be two increasing numbers"),
    ("augment.crop_ratio=[0.75,1.3,2]", "augment.crop_ratio=[0.75, 1.3, 2.0] must be two increasing numbers"),
    ("augment.hflip=1.5", "augment.hflip=1.5 must be in [0, 1]"),
    ("augment.rand_augment=garbage-xx", "augment.rand_augment='garbage-xx' is not a timm RandAugment string"),
    ("augment.rand_augment=rand-m9-q3", "augment.rand_augment='rand-m9-q3' is not a timm RandAugment string"),
    ("augment.color_jitter=-0.1", "augment.color_jitter=-0.1 must be >= 0"),
    ("augment.erase_prob=2", "augment.erase_prob=2.0 must be in [0, 1]"),
    ("augment.mixup_alpha=-1", "augment.mixup_alpha=-1.0 must be >= 0"),
    ("augment.cutmix_alpha=nan", "augment.cutmix_alpha=nan must be a finite number >= 0"),
    ("augment.mix_prob=-0.1", "augment.mix_prob=-0.1 must be in [0, 1]"),
    ("augment.switch_prob=1.1", "augment.switch_prob=1.1 must be in [0, 1]"),
    ("augment.mix_block=1", "augment.mix_block=1 must be >= 2"),
    ("augment.mix_pairing=batch", "augment.mix_pairing='batch' is not one of ('pair', 'block')"),
    ("augment.label_smoothing=1.0", "augment.label_smoothing=1.0 must be in [0, 1)"),
    ("augment.interpolation=nearest", "augment.interpolation='nearest' is not one of ('bilinear', 'bicubic')"),
    ("teacher.train.augment.crop_scale=[0.5]", "teacher.train.augment.crop_scale=[0.5] must be two increasing"),
    ("teacher.train.augment.rand_augment=rand-q3", "teacher.train.augment.rand_augment='rand-q3' is not a timm"),
    ("teacher.train.augment.label_smoothing=-0.1", "teacher.train.augment.label_smoothing=-0.1 must be in [0, 1)"),
    ("teacher.train.augment.mix_pairing=x", "teacher.train.augment.mix_pairing='x' is not one of"),
    ("teacher.input_size=0", "teacher.input_size=0 must be >= 1"),
    ("teacher.mean=[0.5,0.5]", "teacher.mean=[0.5, 0.5] must be three finite numbers (R, G, B)"),
    ("teacher.std=[0.2,0.2,0]", "teacher.std=[0.2, 0.2, 0.0] must be three finite numbers (R, G, B), each > 0"),
    ("student.img_size=64", "student.img_size=64 must equal the view size data.image_size=32"),
    ("student.name=deit_tiny_distiled_patch16_224", "student.name='deit_tiny_distiled_patch16_224' is not a timm "
     "model (did you mean deit_tiny_distilled_patch16_224"),
    ("student.patch_size=0", "student.patch_size=0 must be >= 1"),
    ("student.drop_path=1.0", "student.drop_path=1.0 must be in [0, 1)"),
    ("student.mean=[nan,0.5,0.5]", "student.mean=[nan, 0.5, 0.5] must be three finite numbers"),
    ("student.std=[1,1,-1]", "student.std=[1.0, 1.0, -1.0] must be three finite numbers (R, G, B), each > 0"),
    ("distill.alpha=1.5", "distill.alpha=1.5 must be in [0, 1]"),
    ("distill.tau=0", "distill.tau=0.0 must be > 0"),
    ("distill.mode=sotf", "distill.mode='sotf' is not one of ('none', 'hard', 'soft')"),
    ("distill.source=web", "distill.source='web' is not one of ('cache', 'online')"),
    ("cache.num_seeds=0", "cache.num_seeds=0 must be >= 1"),
    ("cache.seeds_per_pass=0", "cache.seeds_per_pass=0 must be >= 1"),
    ("cache.topk=-1", "cache.topk=-1 must be >= 0"),
    ("cache.batch_size=0", "cache.batch_size=0 must be >= 1"),
    ("cache.num_workers=-1", "cache.num_workers=-1 must be >= 0"),
    ("cache.nproc=0", "cache.nproc=0 must be >= 1"),
    ("cache.verify_fraction=1.5", "cache.verify_fraction=1.5 must be in [0, 1]"),
    ("cache.tolerance=nan", "cache.tolerance=nan must be a finite number >= 0"),
    ("cache.device=tpu", "cache.device='tpu': expected auto, cpu, cuda or cuda:<n>"),
    ("train.epochs=0", "train.epochs=0 must be >= 1"),
    ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("train.lr=nan", "train.lr=nan must be a finite number > 0"),
    ("train.lr=inf", "train.lr=inf must be a finite number > 0"),
    ("train.lr=0", "train.lr=0.0 must be > 0"),
    ("train.lr=-1e-3", "train.lr=-0.001 must be > 0"),
    ("train.weight_decay=-1", "train.weight_decay=-1.0 must be >= 0"),
    ("train.warmup_epochs=-1", "train.warmup_epochs=-1.0 must be >= 0"),
    ("train.min_lr=-1e-5", "train.min_lr=-1e-05 must be >= 0"),
    ("train.min_lr=0.1", "train.min_lr=0.1 must be <= train.lr=0.008"),
    ("train.warmup_lr=-1e-6", "train.warmup_lr=-1e-06 must be >= 0"),
    ("train.clip_grad=0", "train.clip_grad=0.0 must be > 0"),
    ("train.ema_decay=1.0", "train.ema_decay=1.0 must be in [0, 1)"),
    ("train.init_seed=-1", "train.init_seed=-1 must be >= 0"),
    ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch=0 must be >= 1"),
    ("train.num_workers=-1", "train.num_workers=-1 must be >= 0"),
    ("train.lr_step=step", "train.lr_step='step' is not one of ('update', 'epoch')"),
    ("train.device=gpu", "train.device='gpu': expected auto, cpu, cuda or cuda:<n>"),
    ("train.repeats=0", "train.repeats=0 must be >= 1"),
    ("train.eval_batch_size=0", "train.eval_batch_size=0 must be >= 1"),
    ("train.nproc=0", "train.nproc=0 must be >= 1"),
    ("train.seed_schedule=[]", "train.seed_schedule=[] must be null or a non-empty list of seed indices"),
    ("train.seed_schedule=[0,-1]", "train.seed_schedule=[0, -1] must be null or a non-empty list"),
    ("teacher.train.epochs=0", "teacher.train.epochs=0 must be >= 1"),
    ("teacher.train.batch_size=0", "teacher.train.batch_size=0 must be >= 1"),
    ("teacher.train.lr=nan", "teacher.train.lr=nan must be a finite number > 0"),
    ("teacher.train.weight_decay=-1", "teacher.train.weight_decay=-1.0 must be >= 0"),
    ("teacher.train.warmup_epochs=-1", "teacher.train.warmup_epochs=-1.0 must be >= 0"),
    ("teacher.train.min_lr=-1", "teacher.train.min_lr=-1.0 must be >= 0"),
    ("teacher.train.warmup_lr=inf", "teacher.train.warmup_lr=inf must be a finite number >= 0"),
    ("teacher.train.clip_grad=-1", "teacher.train.clip_grad=-1.0 must be > 0"),
    ("teacher.train.ema_decay=-0.5", "teacher.train.ema_decay=-0.5 must be in [0, 1)"),
    ("teacher.train.init_seed=-1", "teacher.train.init_seed=-1 must be >= 0"),
    ("teacher.train.max_steps_per_epoch=0", "teacher.train.max_steps_per_epoch=0 must be >= 1"),
    ("teacher.train.num_workers=-1", "teacher.train.num_workers=-1 must be >= 0"),
    ("teacher.train.lr_step=x", "teacher.train.lr_step='x' is not one of ('update', 'epoch')"),
    ("teacher.train.device=gpu", "teacher.train.device='gpu': expected auto, cpu, cuda or cuda:<n>"),
    ("replay.backend=gpu", "replay.backend='gpu' is not one of ('per_sample', 'batched')"),
    ("export.model=both", "export.model='both' is not one of ('student', 'teacher')"),
    ("run_seed=-1", "run_seed=-1 must be >= 0"),
    ("num_threads=-1", "num_threads=-1 must be >= 0"),
    ("storage.retries=-1", "storage.retries=-1 must be >= 0"),
    ("storage.retry_timeout=0", "storage.retry_timeout=0.0 must be > 0"),
    ("storage.timeout=nan", "storage.timeout=nan must be a finite number > 0"),
]


@pytest.mark.parametrize("override, message", CASES, ids=[c[0] for c in CASES])
def test_a_bad_value_is_refused_naming_the_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as info:
        validate(compose([override]))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("overrides", [
    [], ["augment=deit", "train=deit"], ["augment=none"], ["teacher=resnet_toy"], ["teacher=regnety_002"],
    ["data=fashion_mnist"], ["distill=soft", "train.clip_grad=1.0", "train.ema=true", "augment.rand_augment=null"],
    ["data=imagenet", "data.root=/x", "teacher=regnety_160", "student=deit_small", "train=deit", "augment=deit"],
    ["data=imagenet_wds", "data.root=/x", "teacher=regnety_160", "student=deit_small", "train=deit", "augment=deit"],
    ["student.img_size=64", "+student.kwargs.dynamic_img_size=true"],  # timm resizes its position embedding
])
def test_every_shipped_configuration_passes(overrides):
    validate(compose(overrides))


def _numeric_keys(schema, prefix=""):
    """Dotted int/float keys of a schema dataclass (Optional included; lists of numbers flagged), nested schemas
    walked: [(key, is_list)]."""
    out = []
    for f in dataclasses.fields(schema):
        hint = typing.get_type_hints(schema)[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union \
            else [hint]
        is_list = typing.get_origin(inner[0]) is list
        leaf = typing.get_args(inner[0])[0] if is_list else inner[0]
        if dataclasses.is_dataclass(leaf):
            out += _numeric_keys(leaf, f"{prefix}{f.name}.")
        elif leaf in (int, float):
            out.append((f"{prefix}{f.name}", is_list))
    return out


@pytest.mark.parametrize("overrides, message", [
    (["data=published", "data.root=/x", "data.num_classes=10", "+data.train_limit=8"],
     "data.train_limit=8 does not apply to data.source=published: a published set is read in place, whole shards"),
    (["data=imagenet_wds", "data.root=/x", "+data.max_side=512"], "data.max_side=512 does not apply"),
    (["data=folder", "data.root=/x", "data.num_classes=3", "+data.class_names=imagenet-1k"],
     "data.class_names=imagenet-1k does not apply to data.source=folder: only data.source=published reads it"),
    (["+data.train_shards=a.tar"], "data.train_shards=a.tar does not apply to data.source=toy"),
])
def test_a_data_key_the_source_does_not_read_is_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_every_numeric_key_of_the_schema_has_a_rule_and_a_case():
    """A number has a range in config_rules (a list of numbers: a rule of its own); each key a case above (the
    teacher's own augmentation shares the augment rules; a few of its keys have cases)."""
    cfg = validate(compose())
    assert cfg.teacher.train.augment is not None  # so its keys are ranged too
    ranged = set(config_rules.ranges(cfg))
    keys = _numeric_keys(RunSchema)
    assert ("teacher.train.augment.mixup_alpha", False) in keys and ("augment.crop_scale", True) in keys
    assert [k for k, is_list in keys if not is_list and k not in ranged] == []
    cased = {c[0].lstrip("+").split("=")[0] for c in CASES}
    assert [k for k, _ in keys if k not in cased and not k.startswith("teacher.train.augment.")] == []


def one_line(proc, needle):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], (proc.returncode, proc.stderr[-3000:])


@pytest.mark.parametrize("command, override, needle", [
    (["pipeline.train_student"], "train.lr=nan", "train_student: error: train.lr=nan must be a finite number > 0"),
    (["pipeline.train_student"], "train.weight_decay=-1", "train.weight_decay=-1.0 must be >= 0"),
    (["pipeline.teacher_cache"], "data.crop_pct=0", "teacher_cache: error: data.crop_pct=0.0 must be in (0, 1]"),
    (["pipeline.make_shards"], "augment.rand_augment=garbage-xx", "augment.rand_augment='garbage-xx'"),
    (["pipeline.train_teacher"], "augment.crop_scale=[0.5]", "augment.crop_scale=[0.5] must be two increasing"),
    (["pipeline.launch", "train_student"], "student.img_size=64",
     "train_student: error: student.img_size=64 must equal the view size data.image_size=32"),
])
def test_the_command_line_says_one_line_exit_2_and_writes_nothing(tmp_path, command, override, needle):
    proc = subprocess.run([sys.executable, "-m", *command, f"workdir={tmp_path}", override], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    one_line(proc, needle)
    assert not any(tmp_path.iterdir())  # no shards, store or run folder
