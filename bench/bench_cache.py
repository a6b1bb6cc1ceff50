"""Stage-one benchmark: end-to-end teacher_cache img/s next to pure teacher forward on the same batches, and
bytes per view on disk (K=10 soft, hard-only) with the ImageNet-1k extrapolation.

    python -m bench.bench_cache [--n 1024] [--workers 1]

Runs on the toy set (32 px views, regnety_002 at 64 px) with a fixed seeded random teacher: speed and storage
do not depend on how good the teacher is. Writes bench/out/cache.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import timm
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
IMAGENET_N = 1_281_167


def config(workdir: Path, overrides: list[str]):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"workdir={workdir}", *overrides])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024, help="toy train samples")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "cache.json"))
    args = ap.parse_args()

    from pipeline import cache_builder, make_shards
    from pipeline.loader import ViewLoader
    from pipeline.teacher import TeacherRunner, create_teacher

    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    ckpt = work / "teacher.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model("regnety_002", num_classes=10).state_dict(), ckpt)
    base = ["teacher=regnety_toy", f"data.train_size={args.n}", "data.val_size=256", f"teacher.checkpoint={ckpt}",
            f"cache.num_seeds={args.seeds}", f"cache.num_workers={args.workers}", "cache.batch_size=256"]
    cfg = config(work, base)
    make_shards.make_shards(cfg)

    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "n_train": args.n, "seeds": args.seeds, "workers": args.workers}

    # Pure teacher forward on the very batches stage one sees (rendered beforehand, untimed).
    manifest_units = [(s, k) for s in range(args.seeds) for k in range(cfg.data.train_size // cfg.data.shard_size)]
    loader = ViewLoader(cache_builder.train_dir(cfg), cache_builder.augment_config(cfg), run_seed=cfg.run_seed,
                        batch_size=256, num_workers=0)
    batches = [b["image"] for b in loader.units(manifest_units)]
    from pipeline import distributed
    threads = distributed.set_threads(0, args.workers)
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

    results.update({
        "threads": threads,
        "pure_forward_img_s": pure,
        "end_to_end_img_s": e2e,
        "ratio_end_to_end_over_pure": e2e / pure,
        "bytes_per_view_soft_k10": soft["total"],
        "bytes_per_view_hard_only": hard["total"],
        "bytes_per_view_soft_breakdown": {k: v for k, v in soft.items() if k not in ("path",) and
                                          isinstance(v, float) and not k.endswith("_s")},
    })
    for name, bpv in (("soft_k10", soft["total"]), ("hard_only", hard["total"])):
        results[f"imagenet_GB_per_seed_{name}"] = bpv * IMAGENET_N / 1e9
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"\n## teacher_cache on {results['machine']} (toy 32 px views, regnety_002 @ 64 px, "
          f"{args.workers} loader worker(s), {threads} teacher thread(s))\n")
    print("| measure | value |\n|---|---|")
    print(f"| pure teacher forward (same batches) | {pure:.0f} img/s |")
    print(f"| end-to-end teacher_cache | {e2e:.0f} img/s |")
    print(f"| end-to-end / pure | {e2e / pure:.2f} (goal >= 0.9) |")
    print(f"| bytes per view, K=10 soft | {soft['total']:.1f} B (goal <= 40; TinyViT 44) |")
    print(f"| bytes per view, hard only | {hard['total']:.1f} B (goal <= 8) |")
    for name in ("soft_k10", "hard_only"):
        gb = results[f"imagenet_GB_per_seed_{name}"]
        print(f"| ImageNet-1k, {name} | {gb:.3f} GB per seed; S=100: {gb * 100:.1f} GB |")


if __name__ == "__main__":
    main()
