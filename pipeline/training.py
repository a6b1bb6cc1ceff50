"""Stage two: train a DeiT student on replayed views, with teacher targets from the cache or an online teacher.

One loop for every mode: ``distill.mode`` none / hard / soft, ``distill.source`` cache / online. Epoch ``e`` reads
seed index ``schedule[e]`` (pipeline.targets); the loader replays exactly the views stage one labelled and, with
``source=cache``, attaches the cached rows of each (seed, shard) unit, checking every sample's digest. With
``source=online`` the teacher runs on the same batch and its logits go through the cache's own rounding
(:func:`pipeline.losses.teacher_targets_from_logits`), so the two sources differ only in where targets come from.

Under torchrun every rank reads its own shards with the same number of steps (pipeline.loader); DDP averages
gradients; metrics are summed over ranks. Per epoch: a checkpoint (atomic; the previous one is kept), a
metrics line (dvclive, rank 0). At the end: ``student.pt`` (plain timm state dict), ``metrics.json``.

Outputs in ``train.out_dir``::

    checkpoint-last.pt, checkpoint-prev.pt   resumable state (weights_only-loadable: tensors and plain types)
    student.pt                               final student, plain timm state dict (student-ema.pt: EMA weights)
    metrics.json                             final metrics (flat) + run facts; history.json: every epoch
    dvclive/                                 per-epoch metrics and plots (dvclive; no dvc.yaml is written)
    indices/rank<r>.jsonl                    train.log_indices=true only: sample indices each rank trained on

Determinism (CPU): weights from ``train.init_seed``; drop-path/dropout RNG re-seeded at every epoch start from
(init_seed, epoch, rank); views from the replay contract; so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from pipeline import distributed
from pipeline.loader import ViewLoader
from pipeline.losses import TeacherTargets, create_loss, teacher_targets_from_logits
from pipeline.replay import AugmentConfig
from pipeline.shards import load_manifest
from pipeline.student import create_student, heads, normalise, plain_state_dict, unwrap
from pipeline.targets import MODE_FIELDS, CacheTargets, check_units_done, open_cache, plan_schedule

CHECKPOINT_LAST = "checkpoint-last.pt"
CHECKPOINT_PREV = "checkpoint-prev.pt"
STUDENT = "student.pt"
STUDENT_EMA = "student-ema.pt"
METRICS = "metrics.json"
HISTORY = "history.json"
CHECKPOINT_FORMAT = "pipeline-student-checkpoint"
CHECKPOINT_VERSION = 1
SOURCES = ("cache", "online")
# Metrics that measure time, not the run (left out when comparing runs).
TIMING_KEYS = ("img_per_s", "epoch_seconds", "seconds")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def augment_config(cfg: DictConfig) -> AugmentConfig:
    return AugmentConfig.from_cfg(OmegaConf.to_container(cfg.augment, resolve=True), cfg.data.image_size,
                                  cfg.data.get("crop_pct", 1.0))


def epoch_seed(init_seed: int, epoch: int, rank: int) -> int:
    """torch seed of one epoch on one rank (drop-path, dropout): independent of where a run was resumed."""
    return int(np.random.SeedSequence([int(init_seed), int(epoch), int(rank), 0x57D]).generate_state(1, np.uint64)[0]
               >> 1)


# ------------------------------------------------------------------------------------------- checkpoints


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(state: dict, out_dir: Path) -> Path:
    """Write ``checkpoint-last.pt``; the one it replaces becomes ``checkpoint-prev.pt``. A kill at any moment
    leaves at least one complete checkpoint (the new file is complete before any rename)."""
    last, prev = out_dir / CHECKPOINT_LAST, out_dir / CHECKPOINT_PREV
    tmp = out_dir / f".{CHECKPOINT_LAST}.tmp{os.getpid()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if last.exists():
            os.replace(last, prev)
        os.replace(tmp, last)
        _fsync_dir(out_dir)
    finally:
        if tmp.exists():
            tmp.unlink()
    return last


def load_checkpoint_file(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a student checkpoint of this pipeline")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {state.get('version')}, this code reads {CHECKPOINT_VERSION}")
    for key in ("epoch", "step", "model", "optimizer", "scheduler", "history", "run"):
        if key not in state:
            raise ValueError(f"incomplete checkpoint (no {key!r})")
    return state


def find_checkpoint(out_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest loadable checkpoint in ``out_dir`` (by completed epochs) and warnings about skipped files."""
    best, best_epoch, notes = None, -1, []
    for name in (CHECKPOINT_LAST, CHECKPOINT_PREV):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            state = load_checkpoint_file(path)
        except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file raises many kinds
            notes.append(f"skipping checkpoint {path}: cannot be loaded ({type(exc).__name__}: {exc})")
            continue
        if int(state["epoch"]) > best_epoch:
            best, best_epoch = path, int(state["epoch"])
    return best, notes


def _first_difference(a: dict, b: dict) -> tuple[str, object, object] | None:
    for key in list(a) + [k for k in b if k not in a]:
        if a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


# ------------------------------------------------------------------------------------------- evaluation


class ValTeacher:
    """Teacher argmax on the (deterministic) val views, computed once and kept by sample index."""

    def __init__(self, runner):
        self.runner = runner
        self.argmax: dict[int, int] = {}

    def __call__(self, batch: dict) -> torch.Tensor:
        index = batch["index"].tolist()
        todo = [k for k, i in enumerate(index) if i not in self.argmax]
        if todo:
            logits = self.runner(batch["image"][todo])
            for k, a in zip(todo, logits.argmax(-1).tolist()):
                self.argmax[index[k]] = int(a)
        return torch.tensor([self.argmax[i] for i in index], dtype=torch.int64)


@torch.inference_mode()
def evaluate(model, loader: ViewLoader | None, *, mean, std, device, bf16: bool,
             teacher: ValTeacher | None) -> list[float]:
    """Sums over this rank's val views: [n, loss, correct_cls, correct_dist, correct_avg, agree_teacher]."""
    sums = [0.0] * 6
    if loader is None:
        return sums
    was_training = model.training
    model.eval()
    for batch in loader.epoch(0, 0):
        x = normalise(batch["image"], mean, std, device)
        label = batch["label"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            c, d = heads(model, x)
        c, d = c.float(), d.float()
        avg = (c + d) / 2
        pred = avg.argmax(-1)
        sums[0] += len(label)
        sums[1] += float(F.cross_entropy(avg, label, reduction="sum"))
        sums[2] += int((c.argmax(-1) == label).sum())
        sums[3] += int((d.argmax(-1) == label).sum())
        sums[4] += int((pred == label).sum())
        if teacher is not None:
            sums[5] += int((pred.cpu() == teacher(batch)).sum())
    model.train(was_training)
    return sums


# ------------------------------------------------------------------------------------------- the run


def _resume_mode(value) -> str:
    if value is None or value is False or str(value).lower() in ("never", "false", "no", "off", "none"):
        return "never"
    if value is True or str(value).lower() in ("auto", "true", "yes", "on"):
        return "auto"
    return str(value)


def _make_teacher(cfg: DictConfig, num_classes: int, device, *, required: bool):
    from pipeline.teacher import TeacherError, TeacherRunner, create_teacher

    try:
        model = create_teacher(cfg.teacher, num_classes)
    except TeacherError:
        if required:
            raise
        return None
    return TeacherRunner(model, cfg.teacher, device)


def train_student(cfg: DictConfig, *, step_callback: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) stage two as configured; returns the final metrics (rank 0's view, the same on all ranks).

    ``step_callback(info)`` (tests, debugging) is called after every update with epoch, step, seed, sample
    indices, teacher targets and loss.
    """
    tr = cfg.train
    num_workers = int(tr.num_workers)
    ctx = distributed.setup(str(tr.get("device", "auto")), int(cfg.get("num_threads", 0)), num_workers)
    device, main = ctx.device, ctx.is_main
    cuda = device.type == "cuda"
    bf16 = cuda and bool(tr.get("bf16", True))
    say = log if main else (lambda _msg: None)

    # ---- data, augmentation, mode
    shards = Path(cfg.data.shards)
    train_manifest, val_manifest = load_manifest(shards / "train"), load_manifest(shards / "val")
    num_classes = int(cfg.data.num_classes)
    for m in (train_manifest, val_manifest):
        if m.num_classes != num_classes:
            raise ValueError(f"{m.split_dir}: the shards have {m.num_classes} classes, data.num_classes is "
                             f"{num_classes}")
    aug = augment_config(cfg)
    run_seed = int(cfg.run_seed)
    mode, source = str(cfg.distill.mode), str(cfg.distill.get("source", "cache"))
    if mode not in MODE_FIELDS:
        raise ValueError(f"distill.mode={mode!r} is unknown; expected one of {tuple(MODE_FIELDS)}")
    if source not in SOURCES:
        raise ValueError(f"distill.source={source!r} is unknown; expected one of {SOURCES}")
    cached = mode != "none" and source == "cache"
    online = mode != "none" and source == "online"
    epochs = int(tr.epochs)
    explicit = list(tr.get("seed_schedule") or []) or None
    cycle = bool(cfg.cache.get("cycle", False))

    # ---- seed schedule and cache checks (refusals name the field / seed)
    store = None
    if cached:
        store, notes = open_cache(cfg.cache.path, manifest=train_manifest, aug=aug, run_seed=run_seed, mode=mode)
        for note in notes:
            say(f"warning: {note}")
        schedule = plan_schedule(epochs, store.num_seeds, explicit, cycle, what=f"the cache {store.path}")
        check_units_done(store, schedule)
    else:
        schedule = plan_schedule(epochs, int(cfg.cache.num_seeds), explicit, cycle,
                                 what=f"cache.num_seeds (no cache read in distill.mode={mode} source={source})")
    if len(set(schedule)) < len(schedule):
        say(f"note: seed schedule {schedule} repeats views (cache.cycle=true)")

    # ---- teacher: online targets, and argmax agreement on val
    do_val = bool(tr.get("val", True))
    topk = min(int(cfg.cache.topk), num_classes)
    teacher = None
    if online:
        teacher = _make_teacher(cfg, num_classes, device, required=True)
    elif do_val:
        # Agreement needs trained weights: the checkpoint when it exists; with a distillation mode also hub
        # weights (teacher.pretrained) or a configured checkpoint that turns out unloadable (then skipped).
        ckpt = cfg.teacher.get("checkpoint")
        has_file = bool(ckpt) and Path(str(ckpt)).is_file()
        if has_file or (mode != "none" and (ckpt or cfg.teacher.get("pretrained", False))):
            teacher = _make_teacher(cfg, num_classes, device, required=False)
        if teacher is None:
            say(f"note: no trained teacher ({cfg.teacher.name}, checkpoint {ckpt}): val agreement with the teacher "
                f"is skipped")
    if teacher is not None and store is not None:
        from pipeline.teacher import teacher_provenance

        ours = teacher_provenance(cfg.teacher, teacher.model, num_classes)["weights_sha256"]
        theirs = (store.provenance.get("teacher") or {}).get("weights_sha256")
        if theirs and ours != theirs:
            say(f"warning: teacher weights {ours[:12]} differ from the cache's teacher {theirs[:12]}: "
                f"val_agree_teacher measures agreement with another teacher than the cached one")
    val_teacher = ValTeacher(teacher) if teacher is not None else None

    # ---- model, EMA, optimiser, schedule
    torch.manual_seed(int(tr.init_seed))
    model = create_student(cfg.student, num_classes).to(device)
    ema = None
    if tr.get("ema", False):
        try:
            from timm.utils import ModelEmaV3 as ModelEma
        except ImportError:  # older timm
            from timm.utils import ModelEmaV2 as ModelEma
        ema = ModelEma(model, decay=float(tr.ema_decay))
    global_batch = int(tr.batch_size) * ctx.world_size
    lr = float(tr.lr) * global_batch / 512.0
    opt_kwargs = {"fused": True} if cuda else {}
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=float(tr.weight_decay), **opt_kwargs)
    net = model
    if ctx.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if tr.get("compile", False):
        net = torch.compile(net)
    criterion = create_loss(cfg.distill, num_classes)

    extras = CacheTargets(store.path, MODE_FIELDS[mode]) if cached else None
    train_loader = ViewLoader(shards / "train", aug, run_seed=run_seed, batch_size=int(tr.batch_size),
                              num_workers=num_workers, train=True, shuffle=True, rank=ctx.rank,
                              world_size=ctx.world_size, extras=extras, pin_memory=cuda)
    val_world = ctx.world_size if val_manifest.num_shards >= ctx.world_size else 1
    val_loader = None
    if do_val and (val_world > 1 or main):
        val_loader = ViewLoader(shards / "val", aug, run_seed=run_seed,
                                batch_size=int(tr.get("eval_batch_size") or tr.batch_size), num_workers=num_workers,
                                train=False, shuffle=False, rank=ctx.rank if val_world > 1 else 0,
                                world_size=val_world, pin_memory=cuda)
    max_steps = tr.get("max_steps_per_epoch")
    steps = [train_loader.steps_per_epoch(e) for e in range(epochs)]
    if max_steps:
        steps = [min(s, int(max_steps)) for s in steps]
    total_updates = sum(steps)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total_updates), lr_min=float(tr.min_lr),
                                  warmup_t=int(round(float(tr.warmup_epochs) * (steps[0] if steps else 0))),
                                  warmup_lr_init=float(tr.get("warmup_lr", 1e-6)), t_in_epochs=False)
    mean, std = list(cfg.student.mean), list(cfg.student.std)

    # ---- resume
    out_dir = Path(tr.out_dir)
    run_key = {
        "student": str(cfg.student.name), "student_kwargs": json.dumps(
            OmegaConf.to_container(cfg.student, resolve=True), sort_keys=True),
        "num_classes": num_classes, "mode": mode, "alpha": float(cfg.distill.alpha), "tau": float(cfg.distill.tau),
        "epochs": epochs, "global_batch": global_batch, "lr": lr, "weight_decay": float(tr.weight_decay),
        "data_fingerprint": train_manifest.fingerprint, "augment_hash": aug.hash(), "run_seed": run_seed,
        "init_seed": int(tr.init_seed), "schedule": json.dumps(schedule), "ema": bool(ema is not None),
        "total_updates": total_updates,
    }
    start_epoch, num_updates, history = 0, 0, []
    resume = _resume_mode(tr.get("resume", "auto"))
    chosen = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume == "auto":
            chosen, notes = find_checkpoint(out_dir)
            for note in notes:
                say(f"warning: {note}")
        elif resume != "never":
            chosen = Path(resume)
            if not chosen.is_file():
                raise FileNotFoundError(f"train.resume={resume}: no such checkpoint")
    chosen = distributed.broadcast_object(str(chosen) if chosen else None)
    if chosen:
        state = load_checkpoint_file(Path(chosen))
        diff = _first_difference(state["run"], run_key)
        if diff is not None:
            raise ValueError(f"{chosen}: written by a run with {diff[0]}={diff[1]!r}, this config has {diff[2]!r}; "
                             f"set train.resume=never or use another train.out_dir")
        model.load_state_dict(state["model"])
        if ema is not None:
            unwrap(ema.module).load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, num_updates, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        say(f"resuming from {chosen}: {start_epoch}/{epochs} epochs done, {num_updates} updates")
    distributed.barrier()

    live = _open_live(out_dir, history, say) if main and tr.get("dvclive", True) else None
    index_log = None
    if tr.get("log_indices", False):
        index_log = out_dir / "indices" / f"rank{ctx.rank}.jsonl"
        _truncate_index_log(index_log, start_epoch)

    say(f"student {cfg.student.name}: distill.mode={mode}{f' source={source}' if mode != 'none' else ''}, {epochs} epochs, seeds {schedule}, "
        f"{ctx.world_size} rank(s) x batch {tr.batch_size} (lr {lr:.3g}), {total_updates} updates, device {device}")

    t_run = time.time()
    for epoch in range(start_epoch, epochs):
        seed_index = schedule[epoch]
        torch.manual_seed(epoch_seed(int(tr.init_seed), epoch, ctx.rank))
        net.train()
        t0 = time.time()
        sums = [0.0, 0.0, 0.0, 0.0]  # n, loss*n, base*n, distill*n
        seen_indices: list[int] = []
        bar = tqdm(total=steps[epoch], unit="step", desc=f"student {epoch + 1}/{epochs} (seed {seed_index})",
                   dynamic_ncols=True, file=sys.stderr, disable=not main)
        batches = train_loader.epoch(seed_index, epoch)
        try:
            for step, batch in enumerate(batches):
                if step >= steps[epoch]:
                    break
                x = normalise(batch["image"], mean, std, device)
                target = batch["target"].to(device, non_blocking=True)
                if online:
                    t = teacher_targets_from_logits(teacher(batch["image"]), topk)
                elif cached:
                    t = TeacherTargets.from_batch(batch)
                else:
                    t = None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    outputs = net(x)
                    loss, parts = criterion(outputs, target, t)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at epoch {epoch + 1} step {step + 1}: "
                                             f"lower train.lr or set train.clip_grad")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tr.get("clip_grad"):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(tr.clip_grad))
                optimizer.step()
                num_updates += 1
                scheduler.step_update(num_updates)
                if ema is not None:
                    ema.update(model, step=num_updates)
                n = len(target)
                sums[0] += n
                sums[1] += loss_value * n
                sums[2] += parts["base"] * n
                sums[3] += parts["distill"] * n
                if index_log is not None:
                    seen_indices.extend(batch["index"].tolist())
                if step_callback is not None:
                    step_callback({"epoch": epoch, "step": step, "seed": seed_index, "index": batch["index"],
                                   "teacher": t, "loss": loss_value, "parts": parts, "rank": ctx.rank})
                bar.update(1)
                bar.set_postfix(loss=f"{sums[1] / sums[0]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{sums[0] * ctx.world_size / max(time.time() - t0, 1e-9):.0f}")
        finally:
            batches.close()
            bar.close()
        train_seconds = time.time() - t0
        if index_log is not None:
            with open(index_log, "a") as f:
                f.write(json.dumps({"epoch": epoch, "seed": seed_index, "steps": steps[epoch],
                                    "indices": seen_indices}) + "\n")

        tot = distributed.all_reduce_sum(sums + [train_seconds], device)
        metrics = {"epoch": epoch + 1, "seed": seed_index, "steps": steps[epoch], "updates": num_updates,
                   "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": tot[1] / tot[0], "train_base": tot[2] / tot[0], "train_distill": tot[3] / tot[0]}
        if do_val:
            val = distributed.all_reduce_sum(
                evaluate(model, val_loader, mean=mean, std=std, device=device, bf16=bf16, teacher=val_teacher),
                device)
            metrics.update({"val_loss": val[1] / val[0], "val_acc": val[4] / val[0], "val_acc_cls": val[2] / val[0],
                            "val_acc_dist": val[3] / val[0]})
            if val_teacher is not None:
                metrics["val_agree_teacher"] = val[5] / val[0]
        if do_val and ema is not None:
            ev = distributed.all_reduce_sum(
                evaluate(unwrap(ema.module), val_loader, mean=mean, std=std, device=device, bf16=bf16, teacher=None),
                device)
            metrics["val_ema_acc"] = ev[4] / ev[0]
        metrics["img_per_s"] = tot[0] / max(tot[4] / ctx.world_size, 1e-9)
        metrics["epoch_seconds"] = train_seconds
        history.append(metrics)

        if main:
            save_checkpoint({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch + 1,
                "step": num_updates, "model": plain_state_dict(model),
                "ema": plain_state_dict(unwrap(ema.module)) if ema is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state()}, "history": history, "run": run_key,
            }, out_dir)
            if live is not None:
                _log_live(live, metrics)
            say(f"epoch {epoch + 1}/{epochs} seed {seed_index}: train_loss {metrics['train_loss']:.4f}"
                + (f"  val_acc {metrics['val_acc']:.4f} (cls {metrics['val_acc_cls']:.4f}, dist "
                   f"{metrics['val_acc_dist']:.4f})" if do_val else "")
                + (f"  agree_teacher {metrics['val_agree_teacher']:.4f}" if "val_agree_teacher" in metrics else "")
                + f"  {metrics['img_per_s']:.0f} img/s")
        distributed.barrier()

    final = _final_metrics(history, cfg, mode, source, ctx.world_size, global_batch, schedule, time.time() - t_run)
    if main:
        atomic_save(plain_state_dict(model), out_dir / STUDENT)
        if ema is not None:
            atomic_save(plain_state_dict(unwrap(ema.module)), out_dir / STUDENT_EMA)
        atomic_write_text(out_dir / HISTORY, json.dumps(history, indent=1) + "\n")
        atomic_write_text(out_dir / METRICS, json.dumps(final, indent=2) + "\n")
        if live is not None:
            live.end()
        say(f"student -> {out_dir / STUDENT}; metrics -> {out_dir / METRICS}")
    distributed.barrier()
    final["history"] = history
    return final


def _final_metrics(history, cfg, mode, source, world, global_batch, schedule, seconds) -> dict:
    last = dict(history[-1]) if history else {}
    out = {k: v for k, v in last.items() if k not in ("epoch_seconds",)}
    out["img_per_s"] = float(np.mean([h["img_per_s"] for h in history])) if history else 0.0
    out.update({"student": str(cfg.student.name), "distill_mode": mode, "distill_source": source,
                "epochs": int(cfg.train.epochs), "world_size": world, "global_batch": global_batch,
                "seed_schedule": list(schedule), "seconds": seconds})
    return out


# ------------------------------------------------------------------------------------------- logging


def dvclive_blocker(cwd: Path | None = None) -> Path | None:
    """The Git work tree dvclive would turn into a DVC repository, or None when dvclive is safe to use.

    dvclive opens the DVC repository around the working directory; when there is none but a Git repository
    is, it runs ``dvc init`` at the Git root (dvclive.dvc.get_dvc_repo). A training run must not do that."""
    cwd = Path.cwd() if cwd is None else cwd
    for d in (cwd, *cwd.parents):
        if (d / ".dvc").is_dir():
            return None
        if (d / ".git").exists():
            return d
    return None


def _open_live(out_dir: Path, history: list[dict], say=log):
    """dvclive in ``out_dir/dvclive``, rebuilt from the checkpoint's history (so a resumed run never logs an
    epoch twice). Writes no dvc.yaml and saves no DVC experiment; skipped (history.json has the same numbers)
    where dvclive would ``dvc init`` a Git repository."""
    try:
        from dvclive import Live
    except ImportError:
        say("note: dvclive is not installed; per-epoch metrics are in history.json")
        return None
    blocker = dvclive_blocker()
    if blocker is not None:
        say(f"note: dvclive skipped: {blocker} is a Git repository without DVC and dvclive would run `dvc init` "
            f"there; per-epoch metrics are in history.json")
        return None
    live_dir = out_dir / "dvclive"
    if live_dir.exists():
        shutil.rmtree(live_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    for metrics in history:
        _log_live(live, metrics)
    return live


def _log_live(live, metrics: dict) -> None:
    for key, value in metrics.items():
        if key in ("epoch", "seed", "steps", "updates", "epoch_seconds"):
            continue
        group = "val" if key.startswith("val_") else "train"
        name = key[4:] if key.startswith("val_") else key.removeprefix("train_")
        live.log_metric(f"{group}/{name}", float(value))
    live.next_step()


def _truncate_index_log(path: Path, start_epoch: int) -> None:
    """Keep only the lines of epochs before ``start_epoch`` (a killed run may have logged a later epoch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = []
    if start_epoch > 0 and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["epoch"] < start_epoch:
                    keep.append(line)
            except (ValueError, KeyError):
                continue
    path.write_text("".join(line + "\n" for line in keep))
