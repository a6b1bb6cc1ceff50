"""The student's run (stage two: distillation), as configured: reads its recipe from the composed config, builds
the model, the task and the loaders, hands them to the one loop (pipeline.train.loop.fit); then writes its final
weights and metrics atomically.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import distributed
from pipeline.atomic import atomic_save, atomic_write_text
from pipeline.cache.reader import MODE_FIELDS, CacheTargets, check_units_done, open_cache
from pipeline.errors import CacheError, ConfigError
from pipeline.finished import require_store, write_run_config
from pipeline.models.student import create_student, init_student, plain_state_dict, unwrap
from pipeline.models.teacher import load_runner, teacher_provenance
from pipeline.replay.loader import run_loader
from pipeline.replay.view_params import augment_config
from pipeline.train.loop import LoopConfig, fit
from pipeline.train.losses import create_loss
from pipeline.train.run_setup import checked_manifests, deit_loop_keys, loop_config
from pipeline.train.schedule import plan_schedule
from pipeline.train.tasks import DistillationTask, ValTeacher

log = logging.getLogger("pipeline")

STUDENT, STUDENT_EMA, METRICS, HISTORY = "student.pt", "student-ema.pt", "metrics.json", "history.json"
SOURCES = ("cache", "online")


def train_student(cfg: DictConfig, *, step_callback=None) -> dict:
    """Run (or resume) stage two as configured; returns the final metrics (the same on every rank).

    ``step_callback(info)`` (tests, debugging) is called after every update with epoch, step, seed, sample
    indices, teacher targets and loss."""
    tr, mode, source = cfg.train, str(cfg.distill.mode), str(cfg.distill.source)
    ctx = distributed.setup(str(tr.device), int(cfg.num_threads), int(tr.num_workers))
    cuda = ctx.device.type == "cuda"
    if mode not in MODE_FIELDS:
        raise ConfigError(f"distill.mode={mode!r} is unknown; expected one of {tuple(MODE_FIELDS)}")
    if source not in SOURCES:
        raise ConfigError(f"distill.source={source!r} is unknown; expected one of {SOURCES}")
    train_m, val_m = checked_manifests(cfg)
    num_classes, aug, run_seed = train_m.num_classes, augment_config(cfg), int(cfg.run_seed)
    cached, online = mode != "none" and source == "cache", mode != "none" and source == "online"
    store, schedule = _schedule(cfg, mode, source, cached, train_m, aug)
    teacher = _teacher(cfg, mode, online, num_classes, ctx.device, store)

    torch.manual_seed(int(tr.init_seed))
    model = create_student(cfg.student, num_classes)
    if tr.get("init"):
        init_student(model, str(tr.init))
    model = model.to(ctx.device)
    global_batch = int(tr.batch_size) * ctx.world_size
    loop = loop_config(tr, "train", float(tr.lr) * global_batch / 512.0, Path(tr.out_dir))
    task = DistillationTask(create_loss(cfg.distill, num_classes), cfg.student.mean, cfg.student.std, ctx.device,
                            bf16=cuda and bool(tr.bf16), source=source if mode != "none" else None, teacher=teacher,
                            topk=min(int(cfg.cache.topk), num_classes),
                            val_teacher=ValTeacher(teacher) if teacher is not None and loop.val else None)
    train_loader = run_loader(cfg, "train", aug, run_seed=run_seed, batch_size=tr.batch_size,
                              num_workers=tr.num_workers, ctx=ctx, shuffle=True, repeats=int(cfg.train.repeats),
                              repeat_mode=_repeat_mode(cfg),
                              extras=CacheTargets(store.path, MODE_FIELDS[mode], store.store_id) if cached else None)
    val_world = ctx.world_size if val_m.num_shards >= ctx.world_size else 1
    val_loader = None
    if loop.val and (val_world > 1 or ctx.is_main):
        val_loader = run_loader(cfg, "val", aug, run_seed=run_seed, batch_size=tr.eval_batch_size or tr.batch_size,
                                num_workers=tr.num_workers, ctx=ctx, rank=ctx.rank if val_world > 1 else 0,
                                world_size=val_world)
    run_key = {
        "student": str(cfg.student.name),
        "student_kwargs": json.dumps(OmegaConf.to_container(cfg.student, resolve=True), sort_keys=True),
        "num_classes": num_classes, "mode": mode, "alpha": float(cfg.distill.alpha), "tau": float(cfg.distill.tau),
        "epochs": loop.epochs, "global_batch": global_batch, "lr": loop.lr, "weight_decay": loop.weight_decay,
        "data_fingerprint": train_m.fingerprint, "augment_hash": aug.hash(), "run_seed": run_seed,
        "init_seed": loop.init_seed, "schedule": json.dumps(schedule), "ema": loop.ema,
        # the targets: a resume on a store rebuilt by another teacher (or layout) is refused, naming this field
        "cache_store_key": store.key if cached else None,
        "total_updates": _total_updates(train_loader, loop), **deit_loop_keys(loop),
        **({"init": str(tr.init)} if tr.get("init") else {})}
    log.info(f"student {cfg.student.name}: distill.mode={mode}{f' source={source}' if mode != 'none' else ''}, "
             f"{loop.epochs} epochs, seeds {schedule}, {ctx.world_size} rank(s) x batch {tr.batch_size} "
             f"(lr {loop.lr:.3g}), {run_key['total_updates']} updates, device {ctx.device}")
    t_run = time.time()
    history, ema = fit(model, task, train_loader, val_loader, schedule, loop, ctx, run_key, name="student",
                       step_callback=step_callback)
    final = _final_metrics(history, cfg, mode, source, ctx.world_size, global_batch, schedule, time.time() - t_run)
    if ctx.is_main:
        out = loop.out_dir
        atomic_save(plain_state_dict(model), out / STUDENT)
        if ema is not None:
            atomic_save(plain_state_dict(unwrap(ema.module)), out / STUDENT_EMA)
        atomic_write_text(out / HISTORY, json.dumps(history, indent=1) + "\n")
        atomic_write_text(out / METRICS, json.dumps(final, indent=2) + "\n")
        write_run_config(cfg, out)
        log.info(f"student -> {out / STUDENT}; metrics -> {out / METRICS}")
    distributed.barrier()
    final["history"] = history
    return final


def _repeat_mode(cfg) -> str:
    """train.repeat_mode (local when a config predates the key)."""
    return str(cfg.train.get("repeat_mode") or "local")


def _schedule(cfg, mode, source, cached, manifest, aug):
    """(store or None, seed index per epoch, or with train.repeats = r > 1 the list of its r seed indices);
    refusals name the field or seed."""
    explicit = list(cfg.train.seed_schedule or []) or None
    epochs, cycle, repeats = int(cfg.train.epochs), bool(cfg.cache.cycle), int(cfg.train.repeats)
    store = None
    if cached:
        require_store(cfg)
        store, notes = open_cache(cfg.cache.path, manifest=manifest, aug=aug, run_seed=int(cfg.run_seed), mode=mode)
        for note in notes:
            log.warning(f"warning: {note}")
        _check_backend(store, cfg.replay)
        schedule = plan_schedule(epochs, store.num_seeds, explicit, cycle, what=f"the cache {store.path}",
                                 repeats=repeats, repeat_mode=_repeat_mode(cfg))
        check_units_done(store, _flat(schedule))
    else:
        schedule = plan_schedule(epochs, int(cfg.cache.num_seeds), explicit, cycle,
                                 what=f"cache.num_seeds (no cache read in distill.mode={mode} source={source})",
                                 repeats=repeats, repeat_mode=_repeat_mode(cfg))
    # ranks: the epochs of a block share its seed indices (each draws other images); a block's are what repeat
    read = schedule[::repeats] if _repeat_mode(cfg) == "ranks" and repeats > 1 else schedule
    if len(set(_flat(read))) < len(_flat(read)):
        log.info(f"note: seed schedule {schedule} repeats views (cache.cycle=true)")
    return store, schedule


def _flat(schedule) -> list[int]:
    return [s for entry in schedule for s in (entry if isinstance(entry, list) else [entry])]


def _check_backend(store, replay) -> None:
    """A cache's targets belong to the pixels its backend rendered; another backend renders the same params with
    slightly different pixels where it decodes differently (docs/design.md, section 5): refused unless allowed."""
    theirs = store.provenance.get("replay_backend", "per_sample")  # stores from before the field: per_sample
    if theirs != replay.backend and not replay.allow_backend_mismatch:
        raise CacheError(f"{store.path}: built with replay.backend={theirs}, this run renders with "
                         f"replay.backend={replay.backend}; pixels can differ between backends: set "
                         f"replay.backend={theirs}, or replay.allow_backend_mismatch=true to accept it "
                         f"(python -m pipeline.verify_cache replay.backend={replay.backend} measures the teacher's "
                         f"agreement across the two)")
    if theirs != replay.backend:
        log.warning(f"warning: {store.path} was rendered with replay.backend={theirs}, this run uses "
                    f"{replay.backend} (replay.allow_backend_mismatch=true)")


def _teacher(cfg, mode, online, num_classes, device, store):
    """The teacher runner: required for online targets; else for val agreement when trained weights exist."""
    teacher = None
    if online:
        teacher = load_runner(cfg.teacher, num_classes, device, required=True)
    elif cfg.train.val:
        # Agreement needs trained weights: the checkpoint when it exists; with a distillation mode also hub
        # weights (teacher.pretrained) or a configured checkpoint that turns out unloadable (then skipped).
        ckpt = cfg.teacher.checkpoint
        has_file = bool(ckpt) and Path(str(ckpt)).is_file()
        if has_file or (mode != "none" and (ckpt or cfg.teacher.pretrained)):
            teacher = load_runner(cfg.teacher, num_classes, device, required=False)
        if teacher is None:
            log.info(f"note: no trained teacher ({cfg.teacher.name}, checkpoint {ckpt}): val agreement with the "
                     f"teacher is skipped")
    if teacher is not None and store is not None:
        ours = teacher_provenance(cfg.teacher, teacher.model, num_classes)["weights_sha256"]
        theirs = (store.provenance.get("teacher") or {}).get("weights_sha256")
        if theirs and ours != theirs:
            log.warning(f"warning: teacher weights {ours[:12]} differ from the cache's teacher {theirs[:12]}: "
                        f"val_agree_teacher measures agreement with another teacher than the cached one")
    return teacher


def _total_updates(loader, loop: LoopConfig) -> int:
    steps = [loader.steps_per_epoch(e) for e in range(loop.epochs)]
    return sum(min(s, int(loop.max_steps_per_epoch)) if loop.max_steps_per_epoch else s for s in steps)


def _final_metrics(history, cfg, mode, source, world, global_batch, schedule, seconds) -> dict:
    last = dict(history[-1]) if history else {}
    out = {k: v for k, v in last.items() if k not in ("epoch_seconds",)}
    out["img_per_s"] = float(np.mean([h["img_per_s"] for h in history])) if history else 0.0
    out.update({"student": str(cfg.student.name), "distill_mode": mode, "distill_source": source,
                "epochs": int(cfg.train.epochs), "world_size": world, "global_batch": global_batch,
                "seed_schedule": list(schedule), "seconds": seconds})
    return out
