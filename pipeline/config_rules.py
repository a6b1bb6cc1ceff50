"""The allowed value of every configuration key that can poison a run, checked once at composition.

`check(cfg)` runs on the schema-typed config (pipeline.config.validate), before any stage writes anything, and
raises a ConfigError naming the key, the bad value and what is allowed. Ranges are written as text (``"(0, 1]"``,
``">= 0"``); every number must be finite (``nan`` and ``inf`` are refused). The loop keys apply to the student's
recipe (``train.``) and the teacher's (``teacher.train.``); the augment keys to ``augment.`` and, when set,
``teacher.train.augment.``. tests/test_config_values.py holds one case per key and checks that every numeric key
of the schema has a rule here.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError

LR_STEPS = ("update", "epoch")  # pipeline.train.loop.make_scheduler
INTERPOLATIONS = ("bilinear", "bicubic")  # augment.interpolation: the filter of every resampling of a view
MIX_PAIRINGS = ("pair", "block")  # augment.mix_pairing (pipeline.replay.mixing)
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

DATA = {"num_classes": ">= 1", "image_size": ">= 1", "shard_size": ">= 1", "crop_pct": "(0, 1]",
        "train_size": ">= 1", "val_size": ">= 1", "train_limit": ">= 1", "val_limit": ">= 1", "seed": ">= 0",
        "max_side": ">= 16", "max_side_quality": "[1, 100]", "train_label_noise": "[0, 1)"}
AUGMENT = {"hflip": "[0, 1]", "color_jitter": ">= 0", "erase_prob": "[0, 1]", "mixup_alpha": ">= 0",
           "cutmix_alpha": ">= 0", "mix_prob": "[0, 1]", "switch_prob": "[0, 1]", "mix_block": ">= 2",
           "label_smoothing": "[0, 1)"}
LOOP = {"epochs": ">= 1", "batch_size": ">= 1", "lr": "> 0", "weight_decay": ">= 0", "warmup_epochs": ">= 0",
        "min_lr": ">= 0", "warmup_lr": ">= 0", "clip_grad": "> 0", "ema_decay": "[0, 1)", "init_seed": ">= 0",
        "max_steps_per_epoch": ">= 1", "num_workers": ">= 0"}
OTHER = {"teacher.input_size": ">= 1", "student.img_size": ">= 1", "student.patch_size": ">= 1",
         "student.drop_path": "[0, 1)", "distill.alpha": "[0, 1]", "distill.tau": "> 0", "cache.num_seeds": ">= 1",
         "cache.seeds_per_pass": ">= 1", "cache.topk": ">= 0", "cache.batch_size": ">= 1",
         "cache.num_workers": ">= 0", "cache.nproc": ">= 1", "cache.verify_fraction": "[0, 1]",
         "cache.tolerance": ">= 0", "train.repeats": ">= 1", "train.eval_batch_size": ">= 1", "train.nproc": ">= 1",
         "run_seed": ">= 0", "num_threads": ">= 0", "storage.retries": ">= 0", "storage.retry_timeout": "> 0",
         "storage.timeout": "> 0"}
CHOICES = {"data.source": ("toy", "fashion_mnist", "folder", "published"), "distill.mode": ("none", "hard", "soft"),
           "distill.source": ("cache", "online"), "replay.backend": ("per_sample", "batched"),
           "cache.resume_check": ("sample", "full"),
           "augment.mix_pairing": MIX_PAIRINGS, "augment.interpolation": INTERPOLATIONS,
           "train.lr_step": LR_STEPS, "train.repeat_mode": ("local", "ranks"),
           "export.model": ("student", "teacher")}
LOOPS, AUGMENTS = ("train", "teacher.train"), ("augment", "teacher.train.augment")


def ranges(cfg: DictConfig) -> dict[str, str]:
    """Every ranged key of this config (the optional teacher augmentation only when it is set)."""
    out = {f"data.{k}": r for k, r in DATA.items()} | dict(OTHER)
    for loop in LOOPS:
        out |= {f"{loop}.{k}": r for k, r in LOOP.items()}
    for aug in AUGMENTS:
        if OmegaConf.select(cfg, aug) is not None:
            out |= {f"{aug}.{k}": r for k, r in AUGMENT.items()}
    return out


def choices(cfg: DictConfig) -> dict[str, tuple]:
    out = dict(CHOICES) | {"teacher.train.lr_step": LR_STEPS}
    if OmegaConf.select(cfg, "teacher.train.augment") is not None:
        out |= {k.replace("augment.", "teacher.train.augment.", 1): v for k, v in CHOICES.items()
                if k.startswith("augment.")}
    return out


def check(cfg: DictConfig) -> None:
    """Raise a ConfigError naming the first key whose value is not allowed (None: an unset optional key)."""
    for key, allowed in choices(cfg).items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    for key, spec in ranges(cfg).items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not within(value, spec):
            raise ConfigError(f"{key}={value} must be {describe(value, spec)}")
    for rule in RULES:
        rule(cfg)


def within(value: float, spec: str) -> bool:
    """``value`` is finite and inside ``spec``: ``>= a``, ``> a``, or an interval ``[a, b]`` / ``(a, b)`` / mixed."""
    if not math.isfinite(value):
        return False
    m = re.fullmatch(r"(>=|>) (\S+)", spec)
    if m:
        return value >= float(m[2]) if m[1] == ">=" else value > float(m[2])
    m = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", spec)
    low, high = float(m[2]), float(m[3])
    return (value >= low if m[1] == "[" else value > low) and (value <= high if m[4] == "]" else value < high)


def describe(value: float, spec: str) -> str:
    """``>= 1``, ``in (0, 1]``; ``a finite number > 0`` for nan or inf."""
    text = spec if spec.startswith(">") else f"in {spec}"
    return text if math.isfinite(value) else f"a finite number {text}"


# ------------------------------------------------------------------------------------ keys beyond a range
def pair(key: str, value, *, fraction: bool) -> None:
    """A crop range: two increasing positive numbers (a scale also at most 1)."""
    ok = (value is not None and len(value) == 2 and all(math.isfinite(v) and v > 0 for v in value)
          and value[0] <= value[1] and (not fraction or value[1] <= 1))
    if not ok:
        want = "within (0, 1]" if fraction else "positive"
        raise ConfigError(f"{key}={list(value) if value is not None else None} must be two increasing numbers "
                          f"[low, high], {want} (e.g. {'[0.08, 1.0]' if fraction else '[0.75, 1.3333]'})")


def crops(cfg: DictConfig) -> None:
    for aug in AUGMENTS:
        if OmegaConf.select(cfg, aug) is not None:
            pair(f"{aug}.crop_scale", OmegaConf.select(cfg, f"{aug}.crop_scale"), fraction=True)
            pair(f"{aug}.crop_ratio", OmegaConf.select(cfg, f"{aug}.crop_ratio"), fraction=False)


def timm_rand_augment(text: str, key: str = "augment.rand_augment"):
    """timm's RandAugment for ``text``, parsed by timm's own parser (timm.data.auto_augment), which the replay reads
    its op set from (pipeline.replay.view_params); a ConfigError naming ``key`` when timm refuses the string or it
    weights the op choice (the replay draws ops uniformly)."""
    from timm.data.auto_augment import rand_augment_transform

    try:
        ra = rand_augment_transform(text, {})
    except Exception as exc:  # noqa: BLE001 - timm's parser asserts, and raises ValueError/KeyError
        why = str(exc).split(":")[-1].strip() or type(exc).__name__
        raise ConfigError(f"{key}={text!r} is not a timm RandAugment string ({why}): expected "
                          f"rand-m<magnitude>[-n<layers>][-mstd<std>][-inc1], e.g. rand-m9-mstd0.5-inc1, "
                          f"or null (none)") from None
    if ra.choice_weights is not None:
        raise ConfigError(f"{key}={text!r}: weighted op choice is not supported (the replay draws ops uniformly)")
    return ra


def rand_augment(cfg: DictConfig) -> None:
    for aug in AUGMENTS:
        value = OmegaConf.select(cfg, f"{aug}.rand_augment") if OmegaConf.select(cfg, aug) is not None else None
        if value:
            timm_rand_augment(value, f"{aug}.rand_augment")


def normalisation(cfg: DictConfig) -> None:
    """Three finite means and three positive stds: views are RGB."""
    for model in ("teacher", "student"):
        for key in ("mean", "std"):
            value = list(OmegaConf.select(cfg, f"{model}.{key}"))
            if len(value) != 3 or not all(math.isfinite(v) and (key == "mean" or v > 0) for v in value):
                raise ConfigError(f"{model}.{key}={value} must be three finite numbers (R, G, B)"
                                  + (", each > 0" if key == "std" else ""))


def student_input(cfg: DictConfig) -> None:
    """The student sees the replayed views as they are: its input size is the view size."""
    dynamic = (OmegaConf.select(cfg, "student.kwargs") or {}).get("dynamic_img_size")
    if cfg.student.img_size != cfg.data.image_size and not dynamic:
        raise ConfigError(f"student.img_size={cfg.student.img_size} must equal the view size data.image_size="
                          f"{cfg.data.image_size} (the student takes the replayed views as they are)")


def student_name(cfg: DictConfig) -> None:
    """A timm architecture (``local-dir:``/``hf-hub:`` names are timm's to resolve); a typo otherwise surfaces only
    when stage two builds the model, after the teacher's stages ran."""
    import timm

    name = str(cfg.student.name)
    if ":" not in name and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models("deit*distilled*"), n=3)
        raise ConfigError(f"student.name={name!r} is not a timm model" + (f" (did you mean {', '.join(close)}?)"
                                                                          if close else "; use a deit_*_distilled_*"))


def loops(cfg: DictConfig) -> None:
    for loop in LOOPS:
        lr, min_lr = OmegaConf.select(cfg, f"{loop}.lr"), OmegaConf.select(cfg, f"{loop}.min_lr")
        if min_lr > lr:
            raise ConfigError(f"{loop}.min_lr={min_lr} must be <= {loop}.lr={lr} (the cosine decays to it)")


def devices(cfg: DictConfig) -> None:
    for key in ("cache.device", "train.device", "teacher.train.device"):
        value = OmegaConf.select(cfg, key)
        if not DEVICE.fullmatch(value):
            raise ConfigError(f"{key}={value!r}: expected auto, cpu, cuda or cuda:<n>")


def seed_schedule(cfg: DictConfig) -> None:
    schedule = cfg.train.seed_schedule
    if schedule is not None and (not len(schedule) or min(schedule) < 0):
        raise ConfigError(f"train.seed_schedule={list(schedule)} must be null or a non-empty list of seed indices "
                          f"(each >= 0)")


PUBLISHED_ONLY = ("train_shards", "val_shards", "class_names")  # read by data.source=published alone
INGEST_ONLY = ("train_limit", "val_limit", "max_side", "train_label_noise")  # ours rewrite samples; a published set
# is read in place, whole shards


def source_keys(cfg: DictConfig) -> None:
    """A data key the chosen source does not read is refused, not ignored."""
    published = cfg.data.source == "published"
    for key in INGEST_ONLY if published else PUBLISHED_ONLY:
        value = OmegaConf.select(cfg, f"data.{key}")
        if value is not None:
            fix = ("a published set is read in place, whole shards: name fewer shards with data.train_shards / "
                   "data.val_shards" if published else "only data.source=published reads it")
            raise ConfigError(f"data.{key}={value} does not apply to data.source={cfg.data.source}: {fix}")


RULES: tuple[Callable[[DictConfig], None], ...] = (crops, rand_augment, normalisation, student_input, student_name,
                                                   loops, devices, seed_schedule, source_keys)
