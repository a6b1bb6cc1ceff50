"""The configuration schema and what the stages read from the composed config, in one place.

pipeline/conf/ (Hydra YAML) holds every default; the dataclasses below hold every key and its type, with no defaults
of their own. `validate(cfg)` merges the composed config into the schema, so a misspelled or unknown key, a
missing mandatory value (``???``) or a value of the wrong type fails before any work, naming the key; then
every value that could poison a run is checked (pipeline.config_rules), naming the key and what is
allowed. Every entry module calls it first (pipeline.cli).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline import config_rules
from pipeline.errors import ConfigError


@dataclass
class DataSchema:
    name: str = MISSING
    source: str = MISSING            # toy | fashion_mnist | folder | published
    shards: str = MISSING
    num_classes: int = MISSING
    image_size: int = MISSING
    shard_size: int = MISSING
    crop_pct: float = MISSING
    root: Optional[str] = None       # fashion_mnist, folder, published (None: not used by this source)
    train_shards: Optional[str] = None  # published: URLs or brace patterns instead of <root>/_info.json
    val_shards: Optional[str] = None
    class_names: Optional[str] = None  # published: timm's label set naming the classes (imagenet-1k: its synsets)
    seed: Optional[int] = None       # toy, folder
    train_size: Optional[int] = None  # toy
    val_size: Optional[int] = None    # toy
    train_limit: Optional[int] = None
    val_limit: Optional[int] = None
    allow_empty_classes: Optional[bool] = None  # folder: keep a class without images in a split (default: refused)
    max_side: Optional[int] = None   # ingest: re-encode images whose longer side exceeds this (None: keep bytes)
    max_side_quality: Optional[int] = None  # JPEG quality of those re-encodes (default 90)
    train_label_noise: Optional[float] = None  # train split: this fraction of labels replaced by another class


@dataclass
class AugmentSchema:
    crop_scale: list[float] = MISSING
    crop_ratio: list[float] = MISSING
    hflip: float = MISSING
    rand_augment: Optional[str] = MISSING
    color_jitter: float = MISSING
    erase_prob: float = MISSING
    mixup_alpha: float = MISSING
    cutmix_alpha: float = MISSING
    mix_prob: float = MISSING
    switch_prob: float = MISSING
    mix_block: int = MISSING
    mix_pairing: str = MISSING       # pair | block
    label_smoothing: float = MISSING
    interpolation: str = MISSING


@dataclass
class LoopSchema:
    """pipeline/conf/loop/default.yaml plus a recipe's own keys (pipeline.train.loop.LoopConfig)."""

    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_epochs: float = MISSING
    min_lr: float = MISSING
    warmup_lr: float = MISSING
    lr_step: str = MISSING           # update | epoch
    decay_dist_token: bool = MISSING
    clip_grad: Optional[float] = MISSING
    ema: bool = MISSING
    ema_decay: float = MISSING
    compile: bool = MISSING
    init_seed: int = MISSING
    device: str = MISSING
    resume: str = MISSING
    dvclive: bool = MISSING
    log_indices: bool = MISSING
    val: bool = MISSING
    max_steps_per_epoch: Optional[int] = MISSING
    num_workers: int = MISSING
    out_dir: str = MISSING


@dataclass
class TeacherTrainSchema(LoopSchema):
    metrics: str = MISSING
    augment: Optional[AugmentSchema] = MISSING


@dataclass
class TeacherSchema:
    name: str = MISSING
    pretrained: bool = MISSING
    checkpoint: Optional[str] = MISSING
    input_size: Optional[int] = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    channels_last: bool = MISSING
    bf16: bool = MISSING
    compile: bool = MISSING
    train: TeacherTrainSchema = MISSING
    kwargs: Optional[dict[str, Any]] = None  # extra timm.create_model kwargs (null: none; `={}` on the command line
    # merges into the configured dict, so `teacher.kwargs=null` is how an override drops them)
    kwargs_for: Optional[str] = None  # kwargs apply only while teacher.name is this (null: always)


@dataclass
class StudentSchema:
    name: str = MISSING
    img_size: int = MISSING
    patch_size: int = MISSING
    drop_path: float = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    kwargs: Optional[dict[str, Any]] = None  # extra timm.create_model kwargs (null: none; see TeacherSchema.kwargs)


@dataclass
class DistillSchema:
    mode: str = MISSING               # none | hard | soft
    source: str = MISSING             # cache | online
    alpha: float = MISSING
    tau: float = MISSING


@dataclass
class CacheSchema:
    path: str = MISSING
    num_seeds: int = MISSING
    seeds_per_pass: Optional[int] = MISSING
    topk: int = MISSING
    store_logits: bool = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    nproc: int = MISSING
    verify_fraction: float = MISSING
    resume_check: str = MISSING      # sample | full
    tolerance: float = MISSING
    cycle: bool = MISSING
    device: str = MISSING
    metrics: str = MISSING


@dataclass
class TrainSchema(LoopSchema):
    seed_schedule: Optional[list[int]] = MISSING
    repeats: int = MISSING
    repeat_mode: str = "local"      # local | ranks (DeiT's RASampler layout, pipeline.replay.deal)
    init: Optional[str] = None       # a student state dict to start from (+finetune=deit_384: a 224 px run's)
    eval_batch_size: Optional[int] = MISSING
    bf16: bool = MISSING
    nproc: int = MISSING


@dataclass
class ReplaySchema:
    backend: str = MISSING           # per_sample | batched
    allow_backend_mismatch: bool = MISSING


@dataclass
class EvalSchema:
    out: str = MISSING
    plots: Optional[str] = None   # the student's per-epoch curves, at a path that does not follow the run


@dataclass
class ExportSchema:
    checkpoint: str = MISSING        # the student state dict to export
    out: str = MISSING               # folder: model.safetensors + config.json (timm's Hub format)
    push_to: Optional[str] = MISSING  # Hugging Face Hub repo id, or None (no upload)
    model: str = "student"           # student (export.checkpoint) or teacher (teacher.checkpoint)


@dataclass
class PushSchema:
    """python -m pipeline.push_cache (pipeline.cache.publish)."""

    repo: Optional[str] = MISSING    # <owner>/<name> of a Hub dataset repo
    shards: bool = MISSING           # also upload our own shards (else their manifests only)


@dataclass
class StorageSchema:
    """Object storage (s3://) requests: pipeline.storage_faults (defaults: obstore's own)."""

    retries: int = MISSING           # retries of one failed request (5xx, dropped connection, timeout)
    retry_timeout: float = MISSING   # seconds for one request and all its retries
    timeout: float = MISSING         # seconds for one attempt (a silent endpoint fails after this)


@dataclass
class RunSchema:
    data: DataSchema = MISSING
    augment: AugmentSchema = MISSING
    teacher: TeacherSchema = MISSING
    student: StudentSchema = MISSING
    distill: DistillSchema = MISSING
    cache: CacheSchema = MISSING
    train: TrainSchema = MISSING
    replay: ReplaySchema = MISSING
    eval: EvalSchema = MISSING
    export: ExportSchema = MISSING
    storage: StorageSchema = MISSING
    push: PushSchema = MISSING
    run_seed: int = MISSING
    workdir: str = MISSING
    overwrite: bool = MISSING
    num_threads: int = MISSING


def validate(cfg: DictConfig) -> DictConfig:
    """``cfg`` checked against the schema and pipeline.config_rules; raises naming the key."""
    missing = unset_keys(cfg)  # before the merge, where a schema default would hide a ???
    if missing:
        raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: add "
                          f"{' '.join(k + '=<value>' for k in missing)}")
    checked = OmegaConf.merge(OmegaConf.structured(RunSchema), cfg)  # unknown key / wrong type: names the key
    OmegaConf.resolve(checked)
    OmegaConf.to_container(checked, throw_on_missing=True)  # a ??? left unset: names the key
    config_rules.check(checked)
    return checked


def unset_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """The keys left ``???``, found without resolving anything (resolving may run ``pipeline_checked``)."""
    out = []
    for k in cfg.keys():
        node = cfg._get_node(k)
        if node._is_missing():
            out.append(f"{prefix}{k}")
        elif isinstance(node, DictConfig) and not node._is_none() and not node._is_interpolation():
            out.extend(unset_keys(node, f"{prefix}{k}."))
    return out


def split_dir(cfg: DictConfig, split: str) -> Path:
    """Shards of one split: ``<data.shards>/<split>``."""
    from pipeline import storage

    return storage.as_path(cfg.data.shards) / split  # local, or s3://bucket/prefix


def checked(value: Any, *, _root_: DictConfig) -> Any:
    """``${pipeline_checked:<value>}`` (pipeline/conf/config.yaml's ``eval.out``): ``value``, once the whole config it sits
    in passes `validate`. Resolving pipeline/conf/ thus checks it: `dvc exp run -S distill.mode=sotf` fails in DVC's Hydra
    composition, before DVC writes params.yaml or runs a stage (DVC imports hydra_plugins/, which registers this),
    and so does `python -m pipeline.params`. Inside `validate` (a schema-typed copy) it returns ``value`` as is."""
    if OmegaConf.get_type(_root_) is not RunSchema:
        validate(_root_)
    return value


def slug(name: Any) -> str:
    """``${pipeline_slug:<name>}``: a model name as one folder name (``local-dir:runs/x`` -> ``local-dir-runs-x``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.") or "unnamed"


def basename(path: Any) -> str:
    """``${pipeline_basename:<path>}``: a folder's own name, as one folder name (``/data/mine/`` -> ``mine``)."""
    return slug(Path(str(path).rstrip("/")).name)


for _name, _fn in (("pipeline_checked", checked), ("pipeline_slug", slug), ("pipeline_basename", basename)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
