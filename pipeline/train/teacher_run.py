"""The teacher's run (classification on the shards), as configured: builds the model, the task and the loaders,
hands them to the one loop (pipeline.train.loop.fit), then writes its weights, metrics and full record atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import distributed
from pipeline.atomic import atomic_save, atomic_write_text
from pipeline.errors import TeacherError
from pipeline.models.student import unwrap
from pipeline.models.teacher import check_input, create_teacher, weights_sha256
from pipeline.replay.loader import run_loader
from pipeline.replay.view_params import augment_config
from pipeline.train.loop import fit
from pipeline.train.run_setup import checked_manifests, deit_loop_keys, loop_config
from pipeline.train.tasks import ClassificationTask

TEACHER_RECORD = "run.json"  # in teacher.train.out_dir: the teacher run's full record
# The teacher trains on views of run_seed + TEACHER_SEED_OFFSET, never on the exact views (run_seed, s, i) that
# stage one later labels with it: otherwise its cached targets would be answers on memorised training views,
# more confident than on anything the student sees at test time.
TEACHER_SEED_OFFSET = 1000


def teacher_augment(cfg: DictConfig):
    """The teacher's own augmentation recipe (`teacher.train.augment`), or the pipeline's when that is null."""
    own = cfg.teacher.train.augment
    return augment_config(cfg, own if own is not None else cfg.augment)


def train_teacher(cfg: DictConfig) -> dict:
    """Train ``teacher.name`` on the shards; writes ``teacher.checkpoint``, ``teacher.train.metrics`` (flat: acc,
    img_per_s, seconds) and the full record ``<teacher.train.out_dir>/run.json``; returns the record."""
    tcfg, tr = cfg.teacher, cfg.teacher.train
    if not tcfg.checkpoint:
        raise TeacherError("teacher.checkpoint is null: set the path the trained teacher is written to")
    ckpt = Path(tcfg.checkpoint)
    if ckpt.exists() and not cfg.overwrite:
        raise TeacherError(f"{ckpt}: a teacher checkpoint exists; refusing to replace it without overwrite=true")
    ctx = distributed.setup(str(tr.device), int(cfg.num_threads), int(tr.num_workers))
    cuda = ctx.device.type == "cuda"
    train_m, _ = checked_manifests(cfg, TeacherError)
    aug, run_seed = teacher_augment(cfg), int(cfg.run_seed) + TEACHER_SEED_OFFSET
    loaders = [run_loader(cfg, split, aug, run_seed=run_seed, batch_size=tr.batch_size, num_workers=tr.num_workers,
                          ctx=ctx, shuffle=split == "train") for split in ("train", "val")]
    task = ClassificationTask(tcfg.mean, tcfg.std, ctx.device, bf16=cuda and bool(tcfg.bf16), size=tcfg.input_size,
                              channels_last=cuda and bool(tcfg.channels_last))
    torch.manual_seed(int(tr.init_seed))  # weight init only; the views never touch global RNGs
    model = create_teacher(tcfg, train_m.num_classes, load=False).to(ctx.device)
    check_input(model, tcfg, aug.image_size)  # stage one's check: a fixed-size teacher fed another size, etc.
    if task.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loop = loop_config(tr, "teacher.train", float(tr.lr), Path(tr.out_dir), bool(cfg.overwrite))
    run_key = {"teacher": str(tcfg.name), "num_classes": train_m.num_classes, "epochs": loop.epochs,
               "batch_size": int(tr.batch_size), "world_size": ctx.world_size, "lr": loop.lr,
               "data_fingerprint": train_m.fingerprint, "augment_hash": aug.hash(), "run_seed": run_seed,
               "init_seed": loop.init_seed, **deit_loop_keys(loop)}
    start = time.time()
    history, _ = fit(model, task, *loaders, list(range(loop.epochs)), loop, ctx, run_key, name="teacher")
    metrics = {}
    if ctx.is_main:
        model.eval()
        atomic_save(unwrap(model).state_dict(), ckpt)
        last = history[-1]
        metrics = {
            "teacher": str(tcfg.name), "num_classes": train_m.num_classes, "input_size": tcfg.input_size,
            "data": str(cfg.data.name), "epochs": loop.epochs, "val_acc": last["val_acc"],
            "train_loss": last["train_loss"], "img_per_s": float(np.mean([h["img_per_s"] for h in history])),
            "seconds": time.time() - start, "run_seed": run_seed, "augment_hash": aug.hash(), "checkpoint": str(ckpt),
            "weights_sha256": weights_sha256(ckpt), "device": str(ctx.device), "world_size": ctx.world_size,
            "torch_threads": torch.get_num_threads(), "recipe": OmegaConf.to_container(tr, resolve=True),
            "history": history}
        # The full record (recipe, provenance, sha256, history) beside the run's state; `teacher.train.metrics`
        # holds only the numbers dvc metrics / dvc exp show compare.
        atomic_write_text(Path(tr.out_dir) / TEACHER_RECORD, json.dumps(metrics, indent=2) + "\n")
        flat = {"acc": last["val_acc"], "img_per_s": metrics["img_per_s"], "seconds": metrics["seconds"]}
        atomic_write_text(Path(tr.metrics), json.dumps(flat, indent=2) + "\n")
    distributed.barrier()
    return metrics
