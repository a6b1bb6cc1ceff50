"""Train a teacher on our own shards (data without a pretrained teacher: toy, Fashion-MNIST, custom classes).

`train_teacher(cfg)` reads `cfg.data.shards/{train,val}`, replays fresh augmented views every epoch
(ViewLoader, seed index = epoch), fits `cfg.teacher.name` with soft-target cross-entropy on the views' mixed
and smoothed targets (timm AdamW + cosine schedule with warmup, stepped per update), measures val accuracy each
epoch and writes the checkpoint (plain timm state dict) and a metrics JSON. One process; no DDP.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from pipeline import distributed
from pipeline.loader import ViewLoader
from pipeline.replay import AugmentConfig
from pipeline.shards import load_manifest
from pipeline.teacher import TeacherError, create_teacher, model_input, weights_sha256

# The teacher trains on views of run_seed + TEACHER_SEED_OFFSET, never on the exact views (run_seed, s, i) that
# stage one later labels with it: otherwise its cached targets would be answers on memorised training views,
# more confident than on anything the student sees at test time.
TEACHER_SEED_OFFSET = 1000


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def evaluate(model, loader: ViewLoader, tcfg, device, *, bf16: bool, channels_last: bool) -> float:
    """Top-1 accuracy on the eval views of a split."""
    model.eval()
    correct = total = 0
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in loader.epoch(0):
            x = model_input(batch["image"], tcfg.mean, tcfg.std, device=device, size=tcfg.get("input_size"),
                            channels_last=channels_last)
            pred = model(x).argmax(-1).cpu()
            correct += int((pred == batch["label"]).sum())
            total += len(pred)
    return correct / max(1, total)


def teacher_augment(cfg: DictConfig) -> AugmentConfig:
    """The teacher's own augmentation recipe: `teacher.train.augment` (AugmentConfig fields; any left out take
    AugmentConfig's defaults, which are DeiT's) or, when that is null, the pipeline's `augment`."""
    own = cfg.teacher.train.get("augment")
    aug = own if own is not None else cfg.augment
    return AugmentConfig.from_cfg(OmegaConf.to_container(aug, resolve=True), cfg.data.image_size,
                                  cfg.data.get("crop_pct", 1.0))


def train_teacher(cfg: DictConfig) -> dict:
    tcfg, tr = cfg.teacher, cfg.teacher.train
    ckpt = tcfg.get("checkpoint")
    if not ckpt:
        raise TeacherError("teacher.checkpoint is null: set the path the trained teacher is written to")
    ckpt, metrics_path = Path(ckpt), Path(tr.metrics)
    if ckpt.exists() and not cfg.get("overwrite", False):
        raise TeacherError(f"{ckpt}: a teacher checkpoint exists; refusing to replace it without overwrite=true")

    num_workers = int(tr.get("num_workers", 0))
    ctx = distributed.setup(str(tr.get("device", "auto")), int(cfg.get("num_threads", 0)), num_workers)
    if ctx.distributed:
        raise TeacherError("train_teacher runs as a single process; launch it without torchrun")
    device = ctx.device
    cuda = device.type == "cuda"
    bf16, channels_last = cuda and bool(tcfg.get("bf16", False)), cuda and bool(tcfg.get("channels_last", False))

    shards = Path(cfg.data.shards)
    num_classes = int(cfg.data.num_classes)
    for split in ("train", "val"):
        m = load_manifest(shards / split)  # ShardError naming the file when missing or invalid
        if m.num_classes != num_classes:
            raise TeacherError(f"{shards / split}: the shards have {m.num_classes} classes, "
                               f"data.num_classes is {num_classes}")

    aug = teacher_augment(cfg)
    run_seed = int(cfg.run_seed) + TEACHER_SEED_OFFSET  # see TEACHER_SEED_OFFSET
    batch_size = int(tr.batch_size)
    train = ViewLoader(shards / "train", aug, run_seed=run_seed, batch_size=batch_size, num_workers=num_workers,
                       train=True, shuffle=True, pin_memory=cuda)
    val = ViewLoader(shards / "val", aug, run_seed=run_seed, batch_size=batch_size, num_workers=num_workers,
                     train=False, pin_memory=cuda)

    torch.manual_seed(int(tr.get("init_seed", 0)))  # weight init only; the views never touch global RNGs
    model = create_teacher(tcfg, num_classes, load=False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = create_optimizer_v2(model, "adamw", lr=float(tr.lr), weight_decay=float(tr.weight_decay))
    epochs = int(tr.epochs)
    steps = train.steps_per_epoch()
    sched = CosineLRScheduler(opt, t_initial=epochs * steps, lr_min=float(tr.get("min_lr", 1e-5)),
                              warmup_t=int(float(tr.get("warmup_epochs", 0)) * steps),
                              warmup_lr_init=float(tr.get("warmup_lr", 1e-5)), t_in_epochs=False)
    criterion = SoftTargetCrossEntropy()
    size = tcfg.get("input_size")

    history, update, images, train_seconds = [], 0, 0, 0.0
    start = time.time()
    for epoch in range(epochs):
        model.train()
        t0, seen, loss_sum = time.time(), 0, 0.0
        bar = tqdm(train.epoch(seed_index=epoch, epoch=epoch), total=steps, unit="batch", dynamic_ncols=True,
                   desc=f"teacher {epoch + 1}/{epochs}", file=sys.stderr)
        for batch in bar:
            x = model_input(batch["image"], tcfg.mean, tcfg.std, device=device, size=size,
                            channels_last=channels_last)
            target = batch["target"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = criterion(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update += 1
            sched.step_update(update)
            n = len(target)
            seen += n
            loss_sum += float(loss.detach()) * n
            if not math.isfinite(loss_sum):
                raise TeacherError(f"teacher training diverged (loss {float(loss)}) in epoch {epoch + 1}: "
                                   f"lower teacher.train.lr")
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen / (time.time() - t0):.0f}")
        bar.close()
        seconds = time.time() - t0
        train_seconds += seconds
        images += seen
        acc = evaluate(model, val, tcfg, device, bf16=bf16, channels_last=channels_last)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "val_acc": acc,
                        "img_per_s": seen / seconds, "lr": opt.param_groups[0]["lr"], "seconds": seconds})
        print(f"teacher epoch {epoch + 1}/{epochs}: train_loss {loss_sum / seen:.4f}  val_acc {acc:.4f}  "
              f"{seen / seconds:.0f} img/s", file=sys.stderr, flush=True)

    model.eval()
    _atomic_write(ckpt, lambda tmp: torch.save(model.state_dict(), tmp))
    last = history[-1] if history else {"train_loss": float("nan"), "val_acc": float("nan")}
    metrics = {
        "teacher": str(tcfg.name), "num_classes": num_classes, "input_size": size, "data": str(cfg.data.name),
        "epochs": epochs, "val_acc": last["val_acc"], "train_loss": last["train_loss"],
        "img_per_s": images / train_seconds if train_seconds else 0.0, "seconds": time.time() - start,
        "run_seed": run_seed, "augment_hash": aug.hash(), "checkpoint": str(ckpt),
        "weights_sha256": weights_sha256(ckpt), "device": str(device), "torch_threads": torch.get_num_threads(),
        "recipe": OmegaConf.to_container(tr, resolve=True), "history": history,
    }
    _atomic_write(metrics_path, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    return metrics
