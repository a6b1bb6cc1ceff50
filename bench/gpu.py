"""`python -m bench.gpu`: the numbers that decide the product on a GPU box, side by side in one run.

    python -m bench.gpu                       # 224 px, bf16, batch 256, DeiT-Ti/16 and DeiT-S/16, regnety_160
    python -m bench.gpu --smoke --device cpu  # a seconds-long run of every code path (tests)

Rows (all on ``--device``, bf16 autocast on CUDA, channels_last teacher; img/s from the median step after warm-up):
- pure: a student's training step on uint8 views already on the device (normalise, fwd, bwd, fused AdamW): the
  ceiling any data path can reach;
- cached, per-sample: the real loop (`train_student`, distill=hard from a cache) with views rendered by CPU
  DataLoader workers (``--workers``, default every core);
- cached, batched: the same with `replay.backend=batched` (workers read bytes and sample params; the training
  process decodes the batch, nvJPEG on CUDA, and renders it with batched tensor ops);
- online: the same loop with the teacher (regnety_160) in it, per-sample views;
- stage one: `teacher_cache` end to end, with each backend, against the pure teacher forward on the very same
  batches.
Targets: cached end to end >= 0.8x pure DeiT-Ti; cached / online >= 3.4x (DeiT-Ti), >= 2.5x (DeiT-S);
teacher_cache >= 0.9x pure teacher forward. Writes bench/out/gpu.json and prints a markdown table. The caches
hold seeded random logits with the real digests (speed does not depend on the values; teachers are randomly
initialised: no hub access).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench.bench_student import fill_cache, measure, photo_jpegs, write_split
from bench.common import REPO, compose, machine, save_json


def pure_step_rate(student: str, batch: int, steps: int, warmup: int, device: torch.device, extra=()) -> float:
    """img/s of the student's training step alone, on views already on the device."""
    from timm.optim import create_optimizer_v2

    from pipeline.models.student import create_student
    from pipeline.train.losses import create_loss
    from pipeline.train.tasks import DistillationTask

    cfg = compose([f"student={student}", "data.image_size=224", "data.num_classes=1000", *extra])
    model = create_student(cfg.student, 1000).to(device)
    opt = create_optimizer_v2(model, "adamw", lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    task = DistillationTask(create_loss({"mode": "hard"}, 1000), cfg.student.mean, cfg.student.std, device,
                            bf16=device.type == "cuda", source="cache")
    g = torch.Generator(device="cpu").manual_seed(0)
    batch_data = {"image": torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, generator=g).to(device),
                  "target": torch.full((batch, 1000), 1e-3, device=device),
                  "argmax": torch.randint(0, 1000, (batch,), generator=g).to(device)}
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        loss = task.forward(model, batch_data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch / float(np.median(times[warmup:]))


def stage_one(root: Path, work: Path, teacher: str, batch: int, workers: int, device: str, extra=(), *,
              backend: str = "per_sample", pure: float | None = None) -> dict:
    """teacher_cache end to end (views rendered by `backend`) against the pure teacher forward on the very batches
    it sees (measured here unless `pure` is given: the views, hence the forward, are the same for both backends)."""
    from pipeline.cache.builder import build_cache
    from pipeline.config import validate
    from pipeline.replay.view_params import augment_config
    from pipeline.replay.loader import run_loader
    from pipeline.models.teacher import TeacherRunner, create_teacher

    cfg = validate(compose([f"data.shards={root}", "data.num_classes=1000", "data.image_size=224",
                            "data.crop_pct=0.875", "augment=deit", "teacher=regnety_160", f"teacher.name={teacher}",
                            "teacher.checkpoint=null", f"cache.path={work / f'stage1-{backend}.zarr'}",
                            f"replay.backend={backend}", "cache.num_seeds=1",
                            f"cache.batch_size={batch}", f"cache.num_workers={workers}", f"cache.device={device}",
                            f"workdir={work}", "overwrite=true", *extra]))
    if pure is None:
        loader = run_loader(cfg, "train", augment_config(cfg), run_seed=0, batch_size=batch, num_workers=workers)
        batches = [b["image"] for b in loader.units([(0, k) for k in range(loader.manifest.num_shards)])]
        runner = TeacherRunner(create_teacher(cfg.teacher, 1000), cfg.teacher, torch.device(device))
        runner(batches[0])  # warm-up (and compilation, when asked)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for images in batches:
            runner(images)
        sync()
        pure = sum(len(b) for b in batches) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    summary = build_cache(cfg)
    e2e = summary["views_written"] / (time.perf_counter() - t0)
    return {"pure_forward_img_s": pure, "end_to_end_img_s": e2e, "ratio": e2e / pure, "views": summary["views_written"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (per-sample rows)")
    ap.add_argument("--students", nargs="*", default=["deit_tiny", "deit_small"])
    ap.add_argument("--teacher", default="regnety_160")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for tests: every path, no meaningful numbers")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "gpu.json"))
    args = ap.parse_args(argv)
    extra = ["++student.kwargs.depth=1"] if args.smoke else []
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    steps = args.warmup + args.steps + 1
    n_train = args.batch * steps + args.batch
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 1000, size=n_train + 32)
    # a pool of distinct photos, cycled: each costs ~13 ms to make in one process (7k would take most of the GPU
    # session's bench time), and a repeated photo costs the same to decode and gets its own augmentation draws
    jpegs = list(itertools.islice(itertools.cycle(photo_jpegs(min(n_train + 32, 1024))), n_train + 32))
    root = work / "photo"
    shard = max(args.batch, 32)
    write_split(root, "train", [(b, "jpg", int(y)) for b, y in zip(jpegs[:n_train], labels)], shard, 1000)
    write_split(root, "val", [(b, "jpg", int(y)) for b, y in zip(jpegs[n_train:], labels[n_train:])], 32, 1000)
    res = {"machine": machine(), "torch": torch.__version__, "device": str(device), "batch": args.batch,
           "workers": args.workers, "smoke": args.smoke, "students": {}}
    common = ["train.epochs=1", f"train.max_steps_per_epoch={steps}", "train.val=false", "train.dvclive=false",
              "train.resume=never", "train.warmup_epochs=0", "cache.num_seeds=1", "cache.topk=10", "augment=deit",
              "teacher=regnety_160", f"teacher.name={args.teacher}", "teacher.checkpoint=null", "teacher.input_size=null",
              f"data.shards={root}", "data.num_classes=1000", "data.image_size=224", "data.crop_pct=0.875",
              f"train.batch_size={args.batch}", f"train.device={args.device}", f"cache.path={work / 'cache.zarr'}",
              f"workdir={work}", *extra]
    fill_cache(compose(common), workers=args.workers)
    rows = {"cached, per-sample": ["distill=hard", f"train.num_workers={args.workers}"],
            "cached, batched": ["distill=hard", "replay.backend=batched", "replay.allow_backend_mismatch=true",
                                f"train.num_workers={args.workers}"],  # random logits: speed only
            "online": ["distill=hard", "distill.source=online", f"train.num_workers={args.workers}"]}
    failed = []

    def row(key: str, store: dict, fn):
        """One measurement: a failure is printed with its traceback and recorded, and the other rows still run
        (a GPU session is one short call); the JSON is rewritten after every row, so a timeout keeps the rest."""
        try:
            store[key] = fn()
        except Exception as e:  # noqa: BLE001 - reported below, and the exit status says so
            traceback.print_exc()
            store[key] = None
            failed.append(f"{key}: {type(e).__name__}: {e}")
        save_json(Path(args.out), {**res, "failed": failed})
        return store[key]

    for student in args.students:
        r = res["students"][student] = {}
        row("pure", r, lambda: pure_step_rate(student, args.batch, args.steps, args.warmup, device, extra))
        for name, ov in rows.items():
            base = [*common, f"student={student}", *ov]
            mode = "online-hard" if "distill.source=online" in ov else "cache-hard"
            out = work / "runs" / student / name.replace(", ", "-")
            if row(name, r, lambda: measure(base, mode, out, args.warmup)["img_per_s"]) is not None:
                print(f"[{student}] {name}: {r[name]:.0f} img/s", file=sys.stderr, flush=True)
    row("stage_one", res, lambda: stage_one(root, work, args.teacher, args.batch, args.workers, args.device, extra))
    row("stage_one_batched", res, lambda: stage_one(root, work, args.teacher, args.batch, args.workers, args.device,
                                                    extra, backend="batched",
                                                    pure=(res["stage_one"] or {}).get("pure_forward_img_s")))
    print(table(res))
    if failed:
        sys.exit("bench.gpu: " + "; ".join(failed))
    return res


def table(res: dict) -> str:
    """Markdown; a row that failed shows "failed" (its traceback went to stderr)."""
    def f(x, fmt="{:.0f}"):
        return "failed" if x is None else fmt.format(x)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    lines = [f"{res['machine']}, batch {res['batch']}, {res['workers']} workers", "",
             "| student | pure step | cached, per-sample | cached, batched | online | best cached / pure | "
             "best cached / online |", "|---|---|---|---|---|---|---|"]
    for student, r in res["students"].items():
        cached = [r.get(k) for k in ("cached, per-sample", "cached, batched") if r.get(k) is not None]
        best = max(cached) if cached else None
        lines.append(f"| {student} | {f(r.get('pure'))} | {f(r.get('cached, per-sample'))} | "
                     f"{f(r.get('cached, batched'))} | {f(r.get('online'))} | {f(ratio(best, r.get('pure')), '{:.2f}')} | "
                     f"{f(ratio(best, r.get('online')), '{:.2f}x')} |")
    lines.append("")
    for key, backend in (("stage_one", "per-sample"), ("stage_one_batched", "batched")):
        s = res.get(key)
        lines.append(f"teacher_cache ({backend}): failed" if s is None else
                     f"teacher_cache ({backend}) end to end {s['end_to_end_img_s']:.0f} img/s vs pure teacher forward "
                     f"{s['pure_forward_img_s']:.0f} img/s: {s['ratio']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
