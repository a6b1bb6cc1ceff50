"""Stage-one benchmark: end-to-end teacher_cache img/s next to pure teacher forward on the same batches, and
bytes per view on disk (K=10 soft, hard-only; bench_storage has the K sweep and the ImageNet-1k extrapolation).

    python -m bench.bench_cache [--n 4096] [--photos 256] [--workers 1]

Two settings, each with a fixed seeded random regnety_002 teacher (speed and storage do not depend on how good
the teacher is): `toy32` (32 px toy views, teacher at 32 px: the teacher is cheaper than the augmentation, so
this measures the data path) and `photo224` (500x375 JPEG photos from scikit-image in an image-folder tree,
224 px views, teacher at 224 px: the teacher dominates, as in real use). Writes bench/out/cache.json and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
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
    from pipeline import cache_builder, distributed, make_shards
    from pipeline.loader import ViewLoader
    from pipeline.teacher import TeacherRunner, create_teacher

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "teacher.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model("regnety_002", num_classes=10).state_dict(), ckpt)
    base = ["teacher=regnety_toy", f"teacher.checkpoint={ckpt}", f"cache.num_seeds={seeds}",
            f"cache.num_workers={workers}", "cache.batch_size=128", *overrides]
    cfg = config(work, base)
    make_shards.make_shards(cfg)
    loader = ViewLoader(cache_builder.train_dir(cfg), cache_builder.augment_config(cfg), run_seed=cfg.run_seed,
                        batch_size=128, num_workers=0)
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="toy train samples")
    ap.add_argument("--photos", type=int, default=1024, help="photo train samples (0: skip)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
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
    return "\n".join(lines)


if __name__ == "__main__":
    main()
