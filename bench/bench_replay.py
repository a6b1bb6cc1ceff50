"""Replay loader throughput per core next to timm's DeiT train transform, on the same photo-sized JPEGs.

    python -m bench.bench_replay [--n 256] [--reps 3]

One process, one torch thread (Pillow decodes on one thread anyway), so every number is img/s per core:
images per CPU-second of this process (time.process_time; the wall-clock rate is shown too, but on a shared
machine it also counts other tenants' time slices). Rows are interleaved block by block (32 images of row
1, of row 2, ..., then the next 32) so that every row sees the same machine state; the table shows the
median over repetitions and the spread (min-max) next to it.

Rows, per source size (500x375 and 1000x750, JPEG q90 in memory, cycling through scikit-image's photos):
  decode PIL full      Image.open(...).convert('RGB'), pixels loaded (a ceiling for timm's path)
  decode PIL draft     the same with the reduced DCT scale ours picks per sample (a ceiling for ours)
  decode tv.io         torchvision.io.decode_jpeg (full size, what ours uses when no draft applies)
  timm                 PIL decode + timm create_transform(224, is_training=True,
                       auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25) -> normalised float tensor
  ours                 pipeline.views.block_views, AugmentConfig(image_size=224), blocks of 32, full DeiT
                       recipe incl. mixup/cutmix, targets and digests -> uint8 views
  ours, no mix         the same with mix_prob=0 (like for like: timm's transform does not mix)
  ours, r=3            repeated augmentation (train.repeats=3): each block decoded once and rendered under 3 seed
                       indices (pipeline.replay.views.group_views); img/s counts views (3 per image), so it
                       compares with `ours` (r = 1) view for view
Plus the toy set (32x32 PNGs from pipeline.sources.toy) through block_views at image_size 32, and a
breakdown of where ours spends its time per image (timers wrapped around the pipeline's own functions).

Writes bench/out/replay.json next to the printed markdown table.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import save_json

SIZE = 224
BLOCK = 32
REPEATS = 3  # DeiT's --repeated-aug
SOURCES = {"500x375": (500, 375), "1000x750": (1000, 750)}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
TIMM_AA = "rand-m9-mstd0.5-inc1"
OUT = Path(__file__).resolve().parent / "out" / "replay.json"


# ------------------------------------------------------------------------------------------------ data


def photo_jpegs(size: tuple[int, int], n: int, quality: int = 90) -> list[bytes]:
    """n JPEG byte strings cycling through scikit-image's RGB photos, each resized to `size` (w, h)."""
    import skimage.data

    base = []
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        if arr.ndim != 3:
            continue
        im = Image.fromarray(np.ascontiguousarray(arr[..., :3])).convert("RGB").resize(size, Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        base.append(buf.getvalue())
    return [base[i % len(base)] for i in range(n)]


def toy_pngs(n: int) -> list[tuple[bytes, int]] | None:
    try:
        from pipeline.data.sources import toy
    except ImportError:
        return None
    return [(data, label) for data, _ext, label in toy(0, n, "train")]


# ------------------------------------------------------------------------------------------------ rows


def row_pil_full(jpegs):
    def run(lo, hi):
        for data in jpegs[lo:hi]:
            Image.open(io.BytesIO(data)).convert("RGB").load()
    return run


def row_pil_draft(jpegs, cfg):
    """Decode at the scale ours picks for each sample's crop (full size where no draft applies)."""
    from pipeline.replay import seeding
    from pipeline.replay.view_params import sample_params
    from pipeline.replay.pixels import open_image

    plans = []
    for i, data in enumerate(jpegs):
        img = open_image(data)
        p = sample_params(seeding.view_rng(0, 0, i), (img.size[1], img.size[0]), cfg)
        plans.append(min(p["crop"][2:]) / cfg.image_size)

    def run(lo, hi):
        for data, factor in zip(jpegs[lo:hi], plans[lo:hi]):
            img = Image.open(io.BytesIO(data))
            if factor >= 2:
                w0, h0 = img.size
                img.draft("RGB", (int(math.ceil(w0 / factor)), int(math.ceil(h0 / factor))))
            img.convert("RGB").load()
    return run, float(np.mean([f >= 2 for f in plans]))


def row_tv_decode(jpegs):
    from torchvision.io import ImageReadMode, decode_jpeg

    def run(lo, hi):
        for data in jpegs[lo:hi]:
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return run


class TimmRow:
    """PIL decode + timm's train transform; Pillow 13 raises on timm's 0-bit posterize: retry, count."""

    def __init__(self, jpegs):
        from timm.data import create_transform

        self.jpegs = jpegs
        self.tf = create_transform(SIZE, is_training=True, auto_augment=TIMM_AA, re_prob=0.25)
        self.retries = 0
        self.images = 0

    def __call__(self, lo, hi):
        if lo == 0:  # timm draws from `random` (and torch for erasing): the same work every repetition
            random.seed(0)
            torch.manual_seed(0)
        for data in self.jpegs[lo:hi]:
            while True:
                try:
                    self.tf(Image.open(io.BytesIO(data)).convert("RGB"))
                    break
                except ValueError:  # PIL ImageOps.posterize(img, 0) under Pillow >= 12
                    self.retries += 1
            self.images += 1


def row_ours_repeats(jpegs, cfg, repeats: int):
    """Repeated augmentation: every block decoded once, rendered under `repeats` seed indices (views)."""
    from pipeline.replay.views import group_views

    items = [(i, data, i % 1000) for i, data in enumerate(jpegs)]

    def run(lo=0, hi=None):
        for s in range(lo, len(items) if hi is None else hi, BLOCK):
            for _ in group_views(items[s:s + BLOCK], run_seed=0, seed_indices=range(repeats), cfg=cfg,
                                 num_classes=1000):
                pass
    return run


def row_ours(jpegs, cfg, labels=None):
    from pipeline.replay.views import block_views

    items = [(i, data, (labels[i] if labels else i % 1000)) for i, data in enumerate(jpegs)]
    num_classes = 10 if labels else 1000

    def run(lo=0, hi=None):
        for s in range(lo, len(items) if hi is None else hi, BLOCK):
            block_views(items[s:s + BLOCK], run_seed=0, seed_index=0, cfg=cfg, num_classes=num_classes)
    return run


# ------------------------------------------------------------------------------------------------ breakdown


def breakdown(jpegs, cfg, reps: int) -> dict:
    """ms per image in each stage of ours, by wrapping the pipeline's own functions with timers."""
    from pipeline.replay import pixels as replay
    from pipeline.replay import views

    acc: dict[str, float] = defaultdict(float)
    ra_ms: dict[str, list] = defaultdict(lambda: [0.0, 0])

    def wrap(mod, name, key):
        fn = getattr(mod, name, None)
        if fn is None:
            return None

        def timed(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.process_time() - t
        setattr(mod, name, timed)
        return (mod, name, fn)

    def timed_op(img, name, *args, _fn=replay.apply_op_image):
        t = time.process_time()
        try:
            return _fn(img, name, *args)
        finally:
            dt = time.process_time() - t
            acc["ra ops"] += dt
            ra_ms[name][0] += dt
            ra_ms[name][1] += 1

    patches = [
        wrap(views, "sample_params", "params"),
        wrap(replay, "decode_drafted" if hasattr(replay, "decode_drafted") else "decode", "decode"),
        wrap(replay, "crop_resize_image", "resized crop"),
        wrap(replay, "_erase", "erase"),
        wrap(views, "mix_images", "mix"),
        wrap(views, "view_digest", "digest"),
        wrap(views, "smooth_one_hot", "targets"),
    ]
    patches.append((replay, "apply_op_image", replay.apply_op_image))
    replay.apply_op_image = timed_op
    run = row_ours(jpegs, cfg)
    totals = []
    try:
        run()  # warm
        acc.clear()
        ra_ms.clear()
        for _ in range(reps):
            t = time.process_time()
            run()
            totals.append(time.process_time() - t)
    finally:
        for p in reversed(patches):
            if p is not None:
                setattr(p[0], p[1], p[2])
    n = len(jpegs) * reps
    total = sum(totals)
    stages = {k: v / n * 1e3 for k, v in acc.items()}
    if "resized crop" not in stages:  # code without a separate crop/resize helper: it sits in "other"
        stages["resized crop"] = float("nan")
    stages["other (flip, python, ...)"] = total / n * 1e3 - sum(v for v in stages.values() if v == v)
    return {"ms_per_image": stages, "total_ms_per_image": total / n * 1e3,
            "ra_op_ms_per_call": {k: v[0] / v[1] * 1e3 for k, v in sorted(ra_ms.items())},
            "ra_op_calls_per_image": {k: v[1] / n for k, v in sorted(ra_ms.items())}}


def check_fast_ops(jpegs) -> dict:
    """Ours' exact fast paths against the torchvision ops they stand in for (pixels must be identical)."""
    import torchvision.transforms.v2.functional as F

    from pipeline.replay import pixels as replay

    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=g),
            torch.randint(0, 256, (3, 17, 40), dtype=torch.uint8, generator=g)]
    for data in jpegs[:2]:
        image, scale = replay.decode(replay.open_image(data))
        imgs.append(F.resize(image, [SIZE, SIZE], antialias=True).contiguous())
    out = {}
    if hasattr(replay, "translate"):
        cases = bad = 0
        for im in imgs:
            h, w = im.shape[1:]
            for d in range(-max(h, w) // 2 - 2, max(h, w) // 2 + 3):
                for dx, dy in ((d, 0), (0, d)):
                    ref = F.affine(im, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], fill=replay.FILL)
                    cases += 1
                    bad += not torch.equal(ref, replay.translate(im, dx, dy))
        out["translate"] = {"cases": cases, "mismatches": bad}
    if hasattr(replay, "sharpness"):
        cases = bad = 0
        factors = [0.1, 0.5, 1.0, 1.81, 1.9] + [round(float(f), 6) for f in np.random.default_rng(0).uniform(0.1, 1.9, 40)]
        for im in imgs:
            for f in factors:
                cases += 1
                bad += not torch.equal(F.adjust_sharpness(im, f), replay.sharpness(im, f))
        out["sharpness"] = {"cases": cases, "mismatches": bad}
    return out


# ------------------------------------------------------------------------------------------------ main


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="images per source size (default 256)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions, median reported (default 3)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.n < BLOCK or args.n % BLOCK:
        ap.error(f"--n must be a positive multiple of {BLOCK}")
    return args


def _rows(n: int, cfg, cfg_nomix, cfg_toy) -> tuple[dict, dict, dict]:
    """key -> (label, source, runner, images); per-source metadata; timm's rows (they count posterize retries)."""
    rows: dict[str, tuple] = {}
    meta: dict[str, dict] = {}
    timm_rows = {}
    for src, wh in SOURCES.items():
        jpegs = photo_jpegs(wh, n)
        draft_run, draft_frac = row_pil_draft(jpegs, cfg)
        meta[src] = {"jpeg_kib_mean": float(np.mean([len(b) for b in jpegs]) / 1024),
                     "draft_fraction": draft_frac}
        timm_rows[src] = TimmRow(jpegs)
        rows[f"pil_full@{src}"] = ("decode PIL full", src, row_pil_full(jpegs), n)
        rows[f"pil_draft@{src}"] = ("decode PIL draft (ours' scale)", src, draft_run, n)
        rows[f"tv_decode@{src}"] = ("decode torchvision.io", src, row_tv_decode(jpegs), n)
        rows[f"timm@{src}"] = ("timm create_transform", src, timm_rows[src], n)
        rows[f"ours@{src}"] = ("ours block_views (mix)", src, row_ours(jpegs, cfg), n)
        rows[f"ours_nomix@{src}"] = ("ours block_views, no mix", src, row_ours(jpegs, cfg_nomix), n)
        rows[f"ours_r{REPEATS}@{src}"] = (f"ours, repeats r={REPEATS} (img/s = views/s)", src,
                                          row_ours_repeats(jpegs, cfg, REPEATS), REPEATS * n)
    toy = toy_pngs(n)
    if toy is not None:
        rows["toy@32x32"] = ("ours block_views, toy set", "32x32 PNG", row_ours([d for d, _ in toy], cfg_toy,
                                                                                 [lab for _, lab in toy]), n)
    return rows, meta, timm_rows


def _time(rows: dict, n: int, reps: int) -> tuple[dict, dict]:
    """img/s per rep of every row, by CPU seconds of this process (the machine is shared: wall time would count
    other tenants' slices) and by wall time; rows interleaved block by block so that every row sees the same
    machine state."""
    for _, _, run, _ in rows.values():  # warm-up: imports, caches, first-call allocations
        run(0, BLOCK)
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    wall: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(reps):
        c_acc = dict.fromkeys(rows, 0.0)
        w_acc = dict.fromkeys(rows, 0.0)
        for lo in range(0, n, BLOCK):
            for key, (_, _, run, _) in rows.items():
                w, c = time.perf_counter(), time.process_time()
                run(lo, lo + BLOCK)
                c_acc[key] += time.process_time() - c
                w_acc[key] += time.perf_counter() - w
        for key in rows:
            cpu[key].append(rows[key][3] / c_acc[key])
            wall[key].append(rows[key][3] / w_acc[key])
    return cpu, wall


def _print_report(args, rows, res: dict) -> None:
    med, rates, wall_rates = res["med"], res["rates"], res["wall_rates"]
    ratios, meta, bd, bd_large = res["ratios"], res["sources"], *res["breakdown"].values()
    lines = ["| row | source | img/s per core (CPU time, median) | min-max | ms/img | vs timm | img/s (wall) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key, (label, src, _, _) in rows.items():
        r = med[key]
        rel = f"{r / med[f'timm@{src}']:.2f}x" if f"timm@{src}" in med else ""
        lines.append(f"| {label} | {src} | {r:,.0f} | {min(rates[key]):,.0f}-{max(rates[key]):,.0f} "
                     f"| {1e3 / r:.3f} | {rel} | {wall_rates[key]:,.0f} |")
    print(f"\n## Replay throughput per core ({args.n} images per source, {args.reps} interleaved reps, "
          f"1 thread, {SIZE}px out)\n")
    print("\n".join(lines))
    for src in SOURCES:
        print(f"\n{src}: ours/timm = {ratios[src]['ours/timm']:.2f}x (no mix: {ratios[src]['ours_nomix/timm']:.2f}x); "
              f"repeats r={REPEATS}: {ratios[src][f'ours_r{REPEATS}/ours']:.2f}x ours r=1 per view, "
              f"{ratios[src][f'ours_r{REPEATS}/timm']:.2f}x timm; "
              f"reduced-size decode applies to {meta[src]['draft_fraction']:.0%} of crops; "
              f"mean JPEG {meta[src]['jpeg_kib_mean']:.0f} KiB")
    retries = res["timm_posterize_retries"]
    print(f"timm posterize ValueError retries: {retries['retries']} in {retries['images']} images "
          f"({retries['retries'] / max(1, retries['images']):.2%})")
    print("fast paths vs torchvision ops: " + (", ".join(
        f"{k} {v['cases'] - v['mismatches']}/{v['cases']} identical" for k, v in res["fast_op_check"].items())
        or "none"))
    for src, b in (("500x375", bd), ("1000x750", bd_large)):
        print(f"\n### Where ours spends time, {src} (ms per image, timers on; total {b['total_ms_per_image']:.3f})\n")
        print("| stage | ms/img | share |\n|---|---:|---:|")
        for k, v in sorted(b["ms_per_image"].items(), key=lambda kv: -(kv[1] if kv[1] == kv[1] else -1)):
            print(f"| {k} | {v:.3f} | {v / b['total_ms_per_image']:.0%} |")
    print("\nRandAugment op cost (ms per call, 500x375 run): " + ", ".join(
        f"{k} {v:.3f}" for k, v in sorted(bd["ra_op_ms_per_call"].items(), key=lambda kv: -kv[1])))


def main(argv=None) -> dict:
    args = _args(argv)
    torch.set_num_threads(1)
    from pipeline.replay.view_params import AugmentConfig

    cfg = AugmentConfig(image_size=SIZE)
    t0 = time.perf_counter()
    rows, meta, timm_rows = _rows(args.n, cfg, AugmentConfig(image_size=SIZE, mix_prob=0.0),
                                  AugmentConfig(image_size=32))
    setup_s = time.perf_counter() - t0
    rates, wall = _time(rows, args.n, args.reps)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = {src: {"ours/timm": med[f"ours@{src}"] / med[f"timm@{src}"],
                    "ours_nomix/timm": med[f"ours_nomix@{src}"] / med[f"timm@{src}"],
                    f"ours_r{REPEATS}/ours": med[f"ours_r{REPEATS}@{src}"] / med[f"ours@{src}"],
                    f"ours_r{REPEATS}/timm": med[f"ours_r{REPEATS}@{src}"] / med[f"timm@{src}"]} for src in SOURCES}
    res = {
        "med": med, "rates": rates, "wall_rates": {k: statistics.median(v) for k, v in wall.items()},
        "ratios": ratios, "sources": meta,
        "breakdown": {src: breakdown(photo_jpegs(SOURCES[src], args.n), cfg, args.reps)
                      for src in ("500x375", "1000x750")},
        "fast_op_check": check_fast_ops(photo_jpegs(SOURCES["500x375"], 8)),
        "timm_posterize_retries": {"retries": sum(t.retries for t in timm_rows.values()),
                                   "images": sum(t.images for t in timm_rows.values())}}
    _print_report(args, rows, res)
    result = {
        "config": {"n": args.n, "reps": args.reps, "image_size": SIZE, "block": BLOCK, "repeats": REPEATS,
                   "timm_auto_augment": TIMM_AA,
                   "timm_re_prob": 0.25, "photos": list(PHOTOS), "jpeg_quality": 90},
        "env": {"python": sys.version.split()[0], "torch": torch.__version__,
                "torchvision": __import__("torchvision").__version__, "timm": __import__("timm").__version__,
                "pillow": Image.__version__, "numpy": np.__version__, "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "sources": meta,
        "rows": {k: {"label": rows[k][0], "source": rows[k][1], "img_per_s_median": med[k], "img_per_s_reps": rates[k],
                     "img_per_s_wall_median": res["wall_rates"][k]}
                 for k in rows},
        "ratios": ratios,
        "timm_posterize_retries": res["timm_posterize_retries"],
        "breakdown": res["breakdown"],
        "fast_op_check": res["fast_op_check"],
        "setup_s": setup_s,
        "wall_s": time.perf_counter() - t0,
    }
    save_json(args.out, result)
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
