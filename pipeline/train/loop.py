"""The one training loop, for the teacher and the student alike (DeiT's engine.py; timm.task's split).

`fit` sets up the optimiser, schedule, EMA, DDP and resume, then runs `train_one_epoch` and `validate` per epoch
and writes a checkpoint (atomic; the previous one kept) and a metrics line. What is model-specific (inputs,
loss, validation counts) comes from the task (pipeline.train.tasks). Epoch ``e`` replays seed index
``schedule[e]`` (pipeline.train.schedule), or with repeated augmentation its r seed indices (every sample r times).

Determinism (CPU): weights come from the caller (seeded); the torch RNG (drop-path, dropout) is re-seeded at
every epoch start from (init_seed, epoch, rank); views come from the replay contract; so a resumed run repeats
an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from pipeline import distributed
from pipeline.atomic import ensure_dir
from pipeline.errors import UserError
from pipeline.logs import progress
from pipeline.models.student import plain_state_dict, unwrap
from pipeline.train.checkpoint import check_run, choose_checkpoint, load_checkpoint_file, save_checkpoint
from pipeline.train.live import IndexLog, log_live, open_live

log = logging.getLogger("pipeline")


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN or infinite (the message names the learning-rate key to lower)."""


@dataclass
class LoopConfig:
    """The loop's part of a recipe (``train.*`` for the student, ``teacher.train.*`` for the teacher)."""

    epochs: int
    lr: float                      # already scaled to the global batch where the recipe asks for it
    weight_decay: float
    min_lr: float
    warmup_epochs: float
    warmup_lr: float
    out_dir: Path
    key: str = "train"             # config prefix, for messages
    lr_step: str = "update"        # the cosine steps every update, or once per epoch (DeiT)
    decay_dist_token: bool = False  # weight-decay the distillation token (DeiT) rather than exempt it (timm)
    clip_grad: float | None = None
    ema: bool = False
    ema_decay: float = 0.9998
    compile: bool = False
    init_seed: int = 0
    resume: str = "auto"
    dvclive: bool = True
    log_indices: bool = False
    val: bool = True
    max_steps_per_epoch: int | None = None


def epoch_seed(init_seed: int, epoch: int, rank: int) -> int:
    """torch seed of one epoch on one rank (drop-path, dropout): independent of where a run was resumed."""
    return int(np.random.SeedSequence([int(init_seed), int(epoch), int(rank), 0x57D]).generate_state(1, np.uint64)[0]
               >> 1)


def make_optimizer(model, cfg: LoopConfig, *, fused: bool = False):
    """AdamW with timm's weight-decay groups: biases, norms and the model's no_weight_decay() tokens exempt;
    with ``cfg.decay_dist_token`` the distillation token is decayed (DeiT's timm 0.3.2 did not exempt it)."""
    extra = {"fused": True} if fused else {}
    if not (cfg.decay_dist_token and cfg.weight_decay):
        return create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)
    exempt = set(model.no_weight_decay()) - {"dist_token"} if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=exempt)
    return create_optimizer_v2(groups, "adamw", lr=cfg.lr, weight_decay=0.0, **extra)  # as timm: groups carry it


def make_scheduler(optimizer, cfg: LoopConfig, steps: list[int]) -> CosineLRScheduler:
    """timm's cosine with warmup, in updates (stepped by step_update) or, with ``cfg.lr_step == "epoch"``, in
    epochs as DeiT (stepped by step(epoch) at each epoch's end; the first epoch trains at cfg.warmup_lr)."""
    if cfg.lr_step == "epoch":
        return CosineLRScheduler(optimizer, t_initial=max(1, cfg.epochs), lr_min=cfg.min_lr,
                                 warmup_t=cfg.warmup_epochs, warmup_lr_init=cfg.warmup_lr, t_in_epochs=True)
    return CosineLRScheduler(optimizer, t_initial=max(1, sum(steps)), lr_min=cfg.min_lr,
                             warmup_t=int(round(cfg.warmup_epochs * (steps[0] if steps else 0))),
                             warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)


def fit(model, task, train_loader, val_loader, schedule: list[int], cfg: LoopConfig, ctx, run_key: dict, *,
        name: str, step_callback=None):
    """Train ``model`` (created and seeded by the caller) for ``cfg.epochs``; returns (history, ema)."""
    cuda = ctx.device.type == "cuda"
    ema = _make_ema(model, cfg)
    optimizer = make_optimizer(model, cfg, fused=cuda)
    net = model
    if ctx.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)
    steps = [train_loader.steps_per_epoch(e) for e in range(cfg.epochs)]
    if cfg.max_steps_per_epoch:
        steps = [min(s, int(cfg.max_steps_per_epoch)) for s in steps]
    scheduler = make_scheduler(optimizer, cfg, steps)
    start_epoch, updates, history = _restore(model, ema, optimizer, scheduler, cfg, ctx, run_key)
    live = open_live(cfg.out_dir, history) if ctx.is_main and cfg.dvclive else None
    index_log = IndexLog(cfg.out_dir, ctx.rank, start_epoch) if cfg.log_indices else None

    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.init_seed, epoch, ctx.rank))
        seed = schedule[epoch]  # a seed index, or with repeats the list of the epoch's seed indices
        if isinstance(seed, (tuple, list)):
            seed = [int(s) for s in seed]
        label = f"seed {seed}" if isinstance(seed, int) else f"seeds {','.join(map(str, seed))}"
        stats = train_one_epoch(net, model, task, train_loader.epoch(seed, epoch), optimizer, scheduler, ema,
                                steps[epoch], updates, ctx, cfg, desc=f"{name} {epoch + 1}/{cfg.epochs} ({label})",
                                step_callback=step_callback, info={"epoch": epoch, "seed": seed})
        updates, indices, views = stats.pop("updates"), stats.pop("indices"), stats.pop("views")
        if index_log is not None:
            index_log.write(epoch, seed, steps[epoch], indices, views)
        metrics = {"epoch": epoch + 1, "seed": seed, "steps": steps[epoch], "updates": updates,
                   "lr": optimizer.param_groups[0]["lr"], **stats.pop("train")}
        if cfg.lr_step == "epoch":
            scheduler.step(epoch)  # DeiT's main.py:432: epoch e + 1 trains at the schedule's value at e
        if cfg.val:
            metrics.update(validate(model, val_loader, task, ctx))
            if ema is not None:
                metrics["val_ema_acc"] = validate(unwrap(ema.module), val_loader, task, ctx, agreement=False)["val_acc"]
        metrics.update(stats)
        history.append(metrics)
        if ctx.is_main:
            save_checkpoint({"epoch": epoch + 1, "step": updates, "model": plain_state_dict(model),
                             "ema": plain_state_dict(unwrap(ema.module)) if ema is not None else None,
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "rng": {"torch": torch.get_rng_state()}, "history": history, "run": run_key},
                            cfg.out_dir)
            if live is not None:
                log_live(live, metrics)
            log.info(_epoch_line(name, metrics, cfg.epochs))
        distributed.barrier()
    if live is not None:
        live.end()
    return history, ema


def train_one_epoch(net, model, task, batches, optimizer, scheduler, ema, steps: int, updates: int, ctx,
                    cfg: LoopConfig, *, desc: str, step_callback=None, info: dict) -> dict:
    """One pass over the epoch's batches; returns summed-over-ranks train metrics, img/s and the update count."""
    net.train()
    t0 = time.time()
    sums: dict[str, float] = {"n": 0.0, "loss": 0.0}
    indices: list[int] = []
    views: list[list[int]] = []
    bar = progress(total=steps, unit="step", desc=desc, disable=not ctx.is_main)
    try:
        for step, batch in enumerate(batches):
            if step >= steps:
                break
            out = task.forward(net, batch)
            loss = out["loss"]
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss is {loss_value} at epoch {info['epoch'] + 1} step {step + 1}: lower "
                                       f"{cfg.key}.lr or set {cfg.key}.clip_grad")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.clip_grad))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
            if ema is not None:
                ema.update(model, step=updates)
            n = len(batch["index"])
            sums["n"] += n
            sums["loss"] += loss_value * n
            for key, value in out["parts"].items():
                sums[key] = sums.get(key, 0.0) + value * n
            if cfg.log_indices:  # (step, sample, seed index) of every view
                indices.extend(batch["index"].tolist())
                views.extend([step, i, s] for i, s in zip(batch["index"].tolist(), batch["seed"].tolist()))
            if step_callback is not None:
                step_callback({**info, "step": step, "index": batch["index"], "teacher": out.get("teacher"),
                               "loss": loss_value, "parts": out["parts"], "rank": ctx.rank,
                               "lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{sums['n'] * ctx.world_size / max(time.time() - t0, 1e-9):.0f}",
                            refresh=False)  # refresh=True would print every step, past the bar's mininterval
    finally:
        batches.close()
        bar.close()
    seconds = time.time() - t0
    keys = list(sums)
    tot = dict(zip(keys + ["seconds"], distributed.all_reduce_sum([sums[k] for k in keys] + [seconds], ctx.device)))
    train = {"train_loss": tot["loss"] / tot["n"]}
    train.update({f"train_{k}": tot[k] / tot["n"] for k in keys if k not in ("n", "loss")})
    return {"train": train, "img_per_s": tot["n"] / max(tot["seconds"] / ctx.world_size, 1e-9),
            "epoch_seconds": seconds, "updates": updates, "indices": indices, "views": views}


@torch.inference_mode()
def validate(model, loader, task, ctx, *, agreement: bool = True) -> dict:
    """The task's validation metrics over every rank's share of the val views (ranks without one add zeros)."""
    sums = dict.fromkeys(task.eval_keys, 0.0)
    if loader is not None:
        was_training = model.training
        model.eval()
        for batch in loader.epoch(0, 0):
            for key, value in task.eval_sums(model, batch, agreement).items():
                sums[key] += value
        model.train(was_training)
    total = distributed.all_reduce_sum(list(sums.values()), ctx.device)
    return task.eval_metrics(dict(zip(sums, total)))


def _make_ema(model, cfg: LoopConfig):
    if not cfg.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=float(cfg.ema_decay))


def _restore(model, ema, optimizer, scheduler, cfg: LoopConfig, ctx, run_key: dict) -> tuple[int, int, list]:
    """(start epoch, updates, history) from the newest good checkpoint of this run, or a fresh start."""
    chosen = None
    if ctx.is_main:
        ensure_dir(cfg.out_dir)
        chosen = choose_checkpoint(cfg.out_dir, cfg.resume, log.warning)
    chosen = distributed.broadcast_object(str(chosen) if chosen else None)
    if not chosen:
        distributed.barrier()
        return 0, 0, []
    state = load_checkpoint_file(Path(chosen))
    check_run(state, run_key, chosen, cfg.key)
    model.load_state_dict(state["model"])
    if ema is not None:
        unwrap(ema.module).load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    log.info(f"resuming from {chosen}: {state['epoch']}/{cfg.epochs} epochs done, {state['step']} updates")
    distributed.barrier()
    return int(state["epoch"]), int(state["step"]), list(state["history"])


def _epoch_line(name: str, m: dict, epochs: int) -> str:
    parts = [f"{name} epoch {m['epoch']}/{epochs} seed {m['seed']}: train_loss {m['train_loss']:.4f}"]
    if "val_acc" in m:
        parts.append(f"val_acc {m['val_acc']:.4f}")
    if "val_acc_cls" in m:
        parts.append(f"(cls {m['val_acc_cls']:.4f}, dist {m['val_acc_dist']:.4f})")
    if "val_agree_teacher" in m:
        parts.append(f"agree_teacher {m['val_agree_teacher']:.4f}")
    parts.append(f"{m['img_per_s']:.0f} img/s")
    return "  ".join(parts)
