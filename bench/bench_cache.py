"""Stage-one benchmark: end-to-end teacher_cache img/s next to pure teacher forward on the same batches, and
bytes per view on disk (K=10 soft, hard-only; bench_storage has the K sweep and the ImageNet-1k extrapolation).

    python -m bench.bench_cache [--n 4096] [--photos 256] [--workers 1] [--group-photos 256] [--group-seeds 8]

Two settings, each with a fixed seeded random regnety_002 teacher (speed and storage do not depend on how good
the teacher is): `toy32` (32 px toy views, teacher at 32 px: the teacher is cheaper than the augmentation, so
this measures the data path) and `photo224` (500x375 JPEG photos from scikit-image in an image-folder tree,
224 px views, teacher at 224 px: the teacher dominates, as in real use). Writes bench/out/cache.json and
prints a markdown table.

Plus stage one's data path grouped vs per seed ("decode once, render many"): the views stage one
renders for S = --group-seeds seed indices of 500x375 JPEG photos (q 90, bench_replay's photos) at 224 px with the
DeiT recipe, through the loader stage one uses (ViewLoader.units, main process, one torch thread), once with
per-seed units (s, shard), as before, and once with grouped units (all S seeds, shard), as `cache.seeds_per_pass`
= null builds them. Views per CPU-second of this process (per core), repetitions interleaved, median; the two
runs' (seed, sample, digest) sets are checked equal.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from bench.common import REPO, compose, save_json


def config(workdir: Path, overrides: list[str]):
    return compose([f"workdir={workdir}", *overrides])


def photo_tree(root: Path, n: int) -> Path:
    """An image-folder tree of 500x375 JPEGs (q 90) from scikit-image's photos, 10 classes."""
    import io

    from PIL import Image
    from skimage import data

    photos = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
    for split, count in (("train", n), ("val", 20)):
        for i in range(count):
            img = Image.fromarray(photos[i % len(photos)]).convert("RGB").resize((500, 375))
            img = img.rotate(7 * (i // len(photos)) % 360)  # distinct bytes per file
            d = root / split / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            (d / f"{i:05d}.jpg").write_bytes(buf.getvalue())
    return root


def run_setting(name: str, work: Path, overrides: list[str], seeds: int, workers: int) -> dict:
    from pipeline import distributed, make_shards
    from pipeline.cache import builder as cache_builder
    from pipeline.replay.view_params import augment_config
    from pipeline.replay.loader import run_loader
    from pipeline.models.teacher import TeacherRunner, create_teacher

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "teacher.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model("regnety_002", num_classes=10).state_dict(), ckpt)
    base = ["teacher=regnety_002", f"teacher.checkpoint={ckpt}",
            f"cache.num_seeds={seeds}", f"cache.num_workers={workers}", "cache.batch_size=128", *overrides]
    cfg = config(work, base)
    make_shards.make_shards(cfg)
    loader = run_loader(cfg, "train", augment_config(cfg), batch_size=128)
    units = [(s, k) for s in range(seeds) for k in range(loader.manifest.num_shards)]
    batches = [b["image"] for b in loader.units(units)]  # the very batches stage one sees, rendered untimed
    threads = distributed.set_threads(0, workers)
    runner = TeacherRunner(create_teacher(cfg.teacher, 10), cfg.teacher, torch.device("cpu"))
    runner(batches[0])  # warm-up
    t0 = time.perf_counter()
    for images in batches:
        runner(images)
    pure = sum(len(b) for b in batches) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    soft = cache_builder.build_cache(cfg)
    e2e = soft["views_written"] / (time.perf_counter() - t0)
    hard = cache_builder.build_cache(config(work, base + ["cache.topk=0", f"cache.path={work}/hard.zarr"]))
    return {"setting": name, "threads": threads, "views": soft["views_written"], "pure_forward_img_s": pure,
            "end_to_end_img_s": e2e, "ratio": e2e / pure, "bytes_per_view_soft_k10": soft["total"],
            "bytes_per_view_hard_only": hard["total"]}


def run_grouped(work: Path, photos: int, seeds: int, reps: int, shard_size: int = 64) -> dict:
    """Stage one's data path, per-seed units vs grouped units: views/s per core (CPU time) and the ratio."""
    from bench.bench_replay import photo_jpegs
    from pipeline.cache.builder import group_units
    from pipeline.replay.loader import ViewLoader
    from pipeline.data.shard_writer import write_shards
    from pipeline.replay import pixels
    from pipeline.replay.view_params import AugmentConfig

    jpegs = photo_jpegs((500, 375), photos)
    write_shards([(data, "jpg", i % 10) for i, data in enumerate(jpegs)], work / "train", shard_size=shard_size,
                 num_classes=10, class_names=[f"c{i}" for i in range(10)], source={"bench": "photo500x375"},
                 n=len(jpegs))
    cfg = AugmentConfig(image_size=224)  # the DeiT recipe, mixing included
    loader = ViewLoader(work / "train", cfg, run_seed=0, batch_size=128, num_workers=0)
    chunks = [(s, k) for s in range(seeds) for k in range(loader.manifest.num_shards)]
    modes = {"per_seed": [(s, k) for s, k in chunks], "grouped": group_units(chunks, seeds, None)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    decodes = {}
    real = pixels.decode_drafted

    def run(mode):
        calls = [0]

        def counted(img, scale):
            calls[0] += 1
            return real(img, scale)

        pixels.decode_drafted = counted
        try:
            keys = []
            c, w = time.process_time(), time.perf_counter()
            for b in loader.units(modes[mode]):
                keys.extend(zip(b["seed"].tolist(), b["index"].tolist(), b["digest"].tolist()))
            cpu, wall = time.process_time() - c, time.perf_counter() - w
        finally:
            pixels.decode_drafted = real
        decodes[mode] = calls[0]
        return sorted(keys), cpu, wall

    try:
        run("grouped")  # warm-up (imports, first allocations)
        cpu = {m: [] for m in modes}
        wall = {m: [] for m in modes}
        keys = {}
        for _ in range(reps):
            for mode in modes:  # interleaved: both modes see the same machine state
                keys[mode], c, w = run(mode)
                cpu[mode].append(c)
                wall[mode].append(w)
    finally:
        torch.set_num_threads(threads)
    views = len(keys["per_seed"])
    assert keys["grouped"] == keys["per_seed"], "grouped and per-seed units must render the same views"
    rows = {m: {"views_per_s_per_core": statistics.median(views / t for t in cpu[m]),
                "views_per_s_reps": [views / t for t in cpu[m]],
                "views_per_s_wall": statistics.median(views / t for t in wall[m]),
                "decodes": decodes[m]} for m in modes}
    paired = [p / g for p, g in zip(cpu["per_seed"], cpu["grouped"])]  # rep by rep: both saw the same machine
    return {"source": "500x375 JPEG q90 (bench_replay photos)", "image_size": 224, "seeds": seeds,
            "photos": photos, "views": views, "reps": reps, "rows": rows,
            "ratio": rows["grouped"]["views_per_s_per_core"] / rows["per_seed"]["views_per_s_per_core"],
            "ratio_reps": paired}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="toy train samples")
    ap.add_argument("--photos", type=int, default=1024, help="photo train samples (0: skip)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--group-photos", type=int, default=256, help="photos for grouped vs per-seed (0: skip)")
    ap.add_argument("--group-seeds", type=int, default=8, help="S for grouped vs per-seed")
    ap.add_argument("--group-reps", type=int, default=3, help="interleaved repetitions, median reported")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "cache.json"))
    args = ap.parse_args(argv)

    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "workers": args.workers, "seeds": args.seeds, "settings": []}
    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    results["settings"].append(run_setting(
        "toy32 (teacher @ 32 px)", work / "toy",
        [f"data.train_size={args.n}", "data.val_size=256", "teacher.input_size=32"], args.seeds, args.workers))
    if args.photos:
        tree = photo_tree(work / "photos", args.photos)
        results["settings"].append(run_setting(
            "photo224 (500x375 JPEG, teacher @ 224 px)", work / "photo",
            ["data=folder", f"data.root={tree}", "data.num_classes=10", "data.shard_size=64", "augment=deit",
             "teacher.input_size=224"], args.seeds, args.workers))
    if args.group_photos:
        results["grouped"] = run_grouped(work / "grouped", args.group_photos, args.group_seeds, args.group_reps)
    save_json(Path(args.out), results)
    print(table(results))
    return results


def table(results: dict) -> str:
    lines = [f"teacher_cache on {results['machine']}: {results['workers']} loader worker(s), regnety_002, CPU fp32, "
             f"{results['seeds']} seeds", "",
             "| setting | views | pure teacher forward | end-to-end | end-to-end / pure | B/view K=10 | B/view hard |",
             "|---|---|---|---|---|---|---|"]
    for r in results["settings"]:
        lines.append(f"| {r['setting']} | {r['views']} | {r['pure_forward_img_s']:.0f} img/s | "
                     f"{r['end_to_end_img_s']:.0f} img/s | {r['ratio']:.2f} | {r['bytes_per_view_soft_k10']:.1f} | "
                     f"{r['bytes_per_view_hard_only']:.1f} |")
    g = results.get("grouped")
    if g:
        lines += ["", f"Stage one data path, {g['source']} -> {g['image_size']} px, S = {g['seeds']} seeds, "
                      f"{g['photos']} photos ({g['views']} views), median of {g['reps']} interleaved reps, "
                      "1 thread:", "",
                  "| units | views/s per core (CPU time) | views/s (wall) | JPEG decodes |", "|---|---:|---:|---:|"]
        for mode, label in (("per_seed", "per seed (s, shard)"), ("grouped", "grouped (all S seeds, shard)")):
            r = g["rows"][mode]
            lines.append(f"| {label} | {r['views_per_s_per_core']:.1f} | {r['views_per_s_wall']:.1f} | "
                         f"{r['decodes']} |")
        spread = (f" (rep by rep {min(g['ratio_reps']):.2f}-{max(g['ratio_reps']):.2f}x)"
                  if len(g.get("ratio_reps", [])) > 1 else "")
        lines.append(f"\ngrouped / per seed: {g['ratio']:.2f}x views/s per core{spread}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
