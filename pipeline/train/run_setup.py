"""What the teacher's and the student's run both build from the config: the loop's settings and the checked
manifests."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pipeline.config import split_dir
from pipeline.data.shards import load_manifest
from pipeline.errors import ConfigError
from pipeline.train.loop import LoopConfig

TIMING_KEYS = ("img_per_s", "epoch_seconds", "seconds")  # metrics that measure time, not the run


def loop_config(tr: DictConfig, key: str, lr: float, out_dir: Path, overwrite: bool = False) -> LoopConfig:
    return LoopConfig(epochs=int(tr.epochs), lr=lr, weight_decay=float(tr.weight_decay), min_lr=float(tr.min_lr),
                      warmup_epochs=float(tr.warmup_epochs), warmup_lr=float(tr.warmup_lr), out_dir=out_dir, key=key,
                      lr_step=str(tr.lr_step), decay_dist_token=bool(tr.decay_dist_token),
                      clip_grad=tr.clip_grad, ema=bool(tr.ema), ema_decay=float(tr.ema_decay), compile=bool(tr.compile),
                      init_seed=int(tr.init_seed), resume="never" if overwrite else str(tr.resume),
                      dvclive=bool(tr.dvclive), log_indices=bool(tr.log_indices), val=bool(tr.val),
                      max_steps_per_epoch=tr.max_steps_per_epoch)


def deit_loop_keys(loop: LoopConfig) -> dict:
    """The loop keys DeiT's recipe sets, for the run key where they differ from the default: checkpoints written
    before the keys existed then still resume."""
    return {k: v for k, v in (("lr_step", loop.lr_step), ("decay_dist_token", loop.decay_dist_token))
            if v != getattr(LoopConfig, k)}


def checked_manifests(cfg: DictConfig, error=ConfigError):
    """Train and val manifests, with the class count the config declares (error names both)."""
    out = []
    for split in ("train", "val"):
        m = load_manifest(split_dir(cfg, split))  # ShardError naming the file when missing or invalid
        if m.num_classes != int(cfg.data.num_classes):
            raise error(f"{m.split_dir}: the shards have {m.num_classes} classes, data.num_classes is "
                        f"{int(cfg.data.num_classes)}")
        out.append(m)
    return out
