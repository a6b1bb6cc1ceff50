"""Batched replay (pipeline.replay.batched) next to the per-sample path (views.block_views), same views.

    python -m bench.bench_batched [--quick] [--n 256] [--rounds 5] [--device cuda]

CPU (always): img/s per core at 224 px from 500x375 and 1000x750 JPEGs (bench/bench_replay.py's photos) and
at 32 px from the toy PNGs, full DeiT recipe incl. mixup/cutmix, targets and digests, blocks of 32. One process,
one torch thread, CPU seconds of this process (the machine is shared); every round runs every row on every
block, block by block (interleaved), and the table shows the median over rounds with the min-max spread.

  per-sample            block_views
  batched, one by one   plan_block (the DataLoader worker's half) + render_plan on the CPU, native resize,
                        group='sample' (the batched functions on one sample at a time, through views)
  batched, batch ops    the same with group='batch' (one call per op over the block: the accelerator layout)
render_plan's default on the CPU ('auto') is batch ops up to CPU_BATCH_BYTES (toy blocks), one by one above.

Also: the resize strategies on the same crops (torch's uint8 kernel per sample vs the exact batched float64
matmuls that render_plan uses off the CPU), the per-op pixel difference table and the end-to-end difference
of the two backends (with and without RandAugment/erasing/mixing, to show what the decode scale alone does).

--device cuda: times render_plan on the GPU (whole merged batches, wall clock after a synchronize; nvJPEG
decode + exact resize + batched ops) and measures the same differences there.

Writes bench/out/bench_batched.json next to the printed tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_replay import photo_jpegs
from bench.common import save_json

SIZE = 224
BLOCK = 32
SOURCES = {"500x375": (500, 375), "1000x750": (1000, 750)}
LEVELS = (0.0, 2.5, 5.0, 7.5, 9.0, 10.0)
OUT = Path(__file__).resolve().parent / "out" / "bench_batched.json"


# ------------------------------------------------------------------------------------------------ data


def toy_items(n: int) -> list[tuple[int, bytes, int]]:
    try:
        from pipeline.data.sources import toy
    except ImportError:  # layout before the pipeline/ restructuring
        from pipeline.sources import toy
    return [(i, data, label) for i, (data, _ext, label) in enumerate(toy(0, n, "train"))]


def photo_items(size: tuple[int, int], n: int) -> list[tuple[int, bytes, int]]:
    return [(i, data, (7 * i) % 1000) for i, data in enumerate(photo_jpegs(size, n))]


def sources(n: int) -> dict:
    """name -> (items, AugmentConfig, num_classes)."""
    from pipeline.replay.view_params import AugmentConfig

    out = {src: (photo_items(wh, n), AugmentConfig(image_size=SIZE), 1000) for src, wh in SOURCES.items()}
    out["toy 32x32 PNG"] = (toy_items(n), AugmentConfig(image_size=32), 10)
    return out


def blocks(items: list) -> list[list]:
    return [items[lo:lo + BLOCK] for lo in range(0, len(items), BLOCK)]


# ------------------------------------------------------------------------------------------------ CPU rows


def cpu_rows(items, cfg, num_classes) -> dict:
    """row -> callable(block) -> {stage: CPU seconds} (one entry, or plan + render for the batched rows)."""
    from pipeline.replay import batched
    from pipeline.replay.views import block_views

    kw = dict(run_seed=0, seed_index=0, cfg=cfg, num_classes=num_classes)

    def per_sample(block):
        t = time.process_time()
        block_views(block, **kw)
        return {"total": time.process_time() - t}

    def batched_row(group):
        def run(block):
            t0 = time.process_time()
            plan = batched.plan_block(block, **kw)
            t1 = time.process_time()
            batched.render_plan(plan, "cpu", group=group)
            t2 = time.process_time()
            return {"plan": t1 - t0, "render": t2 - t1, "total": t2 - t0}
        return run

    return {"per-sample": per_sample, "batched, one by one": batched_row("sample"),
            "batched, batch ops": batched_row("batch")}


def time_cpu(srcs: dict, rounds: int) -> dict:
    """Median img/s per core (CPU time) per (source, row) over interleaved rounds, with spread and stages."""
    rows = {src: cpu_rows(*spec) for src, spec in srcs.items()}
    blks = {src: blocks(spec[0]) for src, spec in srcs.items()}
    for src, rs in rows.items():  # warm-up: imports, first-call allocations
        for run in rs.values():
            run(blks[src][0])
    acc = {(src, row): [] for src, rs in rows.items() for row in rs}
    for _ in range(rounds):
        sums = {key: {} for key in acc}
        for k in range(max(len(b) for b in blks.values())):
            for src, rs in rows.items():
                if k >= len(blks[src]):
                    continue
                for row, run in rs.items():
                    for stage, sec in run(blks[src][k]).items():
                        sums[(src, row)][stage] = sums[(src, row)].get(stage, 0.0) + sec
        for key, stages in sums.items():
            acc[key].append(stages)
    out = {}
    for (src, row), per_round in acc.items():
        n = len(srcs[src][0])
        rates = [n / r["total"] for r in per_round]
        out[f"{row}@{src}"] = {
            "row": row, "source": src, "img_per_s_median": statistics.median(rates), "img_per_s_rounds": rates,
            "ms_per_img": {stage: 1e3 * statistics.median(r[stage] for r in per_round) / n
                           for stage in per_round[0]}}
    return out


def time_resize(items, cfg, reps: int) -> dict:
    """ms per image of the two resize strategies on the same decoded images and crops (CPU time, median)."""
    from pipeline.replay import batched, batched_resize

    plan = batched.plan_block(items[:BLOCK], run_seed=0, seed_index=0, cfg=cfg, num_classes=1000)
    images = batched.decode_batch(plan["data"], plan["codec"], torch.device("cpu"))
    crops = [p["crop"] for p in plan["params"]]
    out = {}
    for name, fn in (("native (torch uint8 kernel, per sample)", batched_resize.resize_native),
                     ("exact (batched float64 matmuls)", batched_resize.resize_exact)):
        times = []
        for _ in range(reps):
            t = time.process_time()
            fn(images, crops, cfg.image_size, cfg.interpolation)
            times.append(time.process_time() - t)
        out[name] = 1e3 * statistics.median(times) / len(images)
    same = torch.equal(batched_resize.resize_native(images, crops, cfg.image_size, cfg.interpolation),
                       batched_resize.resize_exact(images, crops, cfg.image_size, cfg.interpolation))
    return {"ms_per_img": out, "identical_pixels": same}


# ------------------------------------------------------------------------------------------------ differences


def op_table(items, device) -> dict:
    """Per RandAugment op: (mean, max) abs difference, batched on `device` vs pixels.apply_op_image, on 4 photo
    views at 224 px, every magnitude in LEVELS with both signs."""
    import torchvision.transforms.v2.functional as F

    from pipeline.replay import batched_ops, compare, pixels
    from pipeline.replay.view_params import level_arg

    views = torch.stack([F.resize(pixels.decode(pixels.open_image(d))[0], [SIZE, SIZE], antialias=True)
                         for _, d, _ in items[:4]])
    table = {}
    for name in batched_ops.OPS:
        args = [level_arg(name, level, neg, SIZE) for level in LEVELS for neg in (False, True)]
        images = views.repeat(len(args), 1, 1, 1)
        mean, mx = compare.compare_op(name, images, [a for a in args for _ in range(len(views))], device)
        table[name] = {"mean": mean, "max": mx}
    return table


def end_to_end(items, cfg, num_classes, device, seeds=(0, 1)) -> dict:
    """Per-view mean abs difference of the two backends: full recipe, and crop/flip only (decode scale alone)."""
    from pipeline.replay import batched, compare
    from pipeline.replay.view_params import AugmentConfig

    plain = AugmentConfig(**{**cfg.canonical(), "rand_augment": None, "erase_prob": 0.0, "mix_prob": 0.0})
    out = {}
    for label, c in (("full recipe", cfg), ("crop+flip only", plain)):
        plans = [batched.plan_block(b, run_seed=0, seed_index=s, cfg=c, num_classes=num_classes)
                 for s in seeds for b in blocks(items)]
        per_view = compare.pixel_difference(plans, device)
        out[label] = {"views": len(per_view), "mean": float(per_view.mean()), "worst_view": float(per_view.max()),
                      "views_below_2_levels": float((per_view < 2).float().mean())}
    return out


def reduced_dct_share(items, cfg) -> float:
    """Share of training crops the per-sample path decodes at a reduced DCT scale (crop >= 2x the view)."""
    from pipeline.replay import batched

    plan = batched.plan_block(items, run_seed=0, seed_index=0, cfg=cfg, num_classes=1000)
    return float(np.mean([c == "jpeg" and min(p["crop"][2:]) / cfg.image_size >= 2
                          for c, p in zip(plan["codec"], plan["params"])]))


# ------------------------------------------------------------------------------------------------ GPU


def time_device(srcs: dict, device: str, rounds: int, batch: int) -> dict:
    """Wall-clock img/s of render_plan on `device` for merged batches of `batch` views (plans made beforehand)."""
    from pipeline.replay import batched

    out = {}
    for src, (items, cfg, num_classes) in srcs.items():
        plans = [batched.plan_block(b, run_seed=0, seed_index=0, cfg=cfg, num_classes=num_classes)
                 for b in blocks(items)]
        per = max(1, batch // BLOCK)
        merged = [batched.merge_plans(plans[k:k + per]) for k in range(0, len(plans), per)]
        batched.render_plan(merged[0], device)  # warm-up (nvJPEG handles, cuBLAS, kernels)
        rates = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for plan in merged:
                batched.render_plan(plan, device)
            torch.cuda.synchronize()
            rates.append(len(items) / (time.perf_counter() - t))
        out[src] = {"img_per_s_median": statistics.median(rates), "img_per_s_rounds": rates,
                    "batch": len(merged[0]["index"])}
    return out


# ------------------------------------------------------------------------------------------------ main


def print_tables(res: dict) -> None:
    rows = res["cpu"]
    print(f"\n## Render throughput per core ({res['config']['n']} views per source, {res['config']['rounds']} "
          f"interleaved rounds, 1 thread, CPU time)\n")
    print("| row | source | img/s per core (median) | min-max | plan ms/img | render ms/img | vs per-sample |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows.values():
        base = rows[f"per-sample@{r['source']}"]["img_per_s_median"]
        ms = r["ms_per_img"]
        print(f"| {r['row']} | {r['source']} | {r['img_per_s_median']:,.0f} | {min(r['img_per_s_rounds']):,.0f}-"
              f"{max(r['img_per_s_rounds']):,.0f} | {ms.get('plan', float('nan')):.3f} | "
              f"{ms.get('render', float('nan')):.3f} | {r['img_per_s_median'] / base:.2f}x |")
    for src, w in res["winner"].items():
        print(f"{src}: {w}")
    print("\nResize strategies (500x375 crops -> 224, ms per image, CPU): " + ", ".join(
        f"{k} {v:.2f}" for k, v in res["resize"]["ms_per_img"].items())
        + f"; identical pixels: {res['resize']['identical_pixels']}")
    for dev, table in res["op_difference"].items():
        print(f"\n### Per-op difference, batched on {dev} vs pixels.apply_op_image (uint8 levels)\n")
        print("| op | mean abs | max abs |\n|---|---:|---:|")
        for name, d in table.items():
            print(f"| {name} | {d['mean']:.4f} | {d['max']} |")
    for dev, per_src in res["end_to_end"].items():
        print(f"\n### End to end, batched on {dev} vs per-sample (per-view mean abs difference, levels)\n")
        print("| source | recipe | views | mean | worst view | views < 2 levels |\n|---|---|---:|---:|---:|---:|")
        for src, d in per_src.items():
            for label, v in d.items():
                print(f"| {src} | {label} | {v['views']} | {v['mean']:.3f} | {v['worst_view']:.3f} | "
                      f"{v['views_below_2_levels']:.1%} |")
    print("\nreduced-DCT decode share (per-sample path): " + ", ".join(
        f"{k} {v:.0%}" for k, v in res["reduced_dct_share"].items()))
    if "device" in res:
        print(f"\n### render_plan on {res['device']['name']} (wall clock)\n")
        for src, d in res["device"]["img_per_s"].items():
            print(f"- {src}: {d['img_per_s_median']:,.0f} img/s (batches of {d['batch']})")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 views per source (default 256)")
    ap.add_argument("--n", type=int, default=None, help="views per source (a multiple of 32)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds, median reported (>= 5)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="also time render_plan on a GPU")
    ap.add_argument("--batch", type=int, default=256, help="views per render_plan call on --device")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    n = args.n or (64 if args.quick else 256)
    if n < BLOCK or n % BLOCK:
        ap.error(f"--n must be a positive multiple of {BLOCK}")
    if args.rounds < 5:
        ap.error("--rounds must be >= 5")
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    srcs = sources(n)
    cpu = time_cpu(srcs, args.rounds)
    winner = {}
    for src in srcs:
        rates = {r["row"]: r["img_per_s_median"] for r in cpu.values() if r["source"] == src}
        best = max(rates, key=rates.get)
        fastest_batched = max((r for r in rates if r != "per-sample"), key=rates.get)
        winner[src] = (f"{best} wins; {fastest_batched} runs at {rates[fastest_batched] / rates['per-sample']:.2f}x "
                       f"per-sample")
    res = {
        "config": {"n": n, "rounds": args.rounds, "image_size": SIZE, "block": BLOCK, "recipe": "AugmentConfig "
                   "defaults (rand-m9-mstd0.5-inc1, erase 0.25, mixup 0.8 / cutmix 1.0)", "torch_threads": 1},
        "env": {"python": sys.version.split()[0], "torch": torch.__version__,
                "torchvision": __import__("torchvision").__version__, "timm": __import__("timm").__version__,
                "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                "load_average": os.getloadavg()},
        "cpu": cpu,
        "winner": winner,
        "resize": time_resize(srcs["500x375"][0], srcs["500x375"][1], args.rounds),
        "op_difference": {"cpu": op_table(srcs["500x375"][0], "cpu")},
        "end_to_end": {"cpu": {src: end_to_end(spec[0][:64], spec[1], spec[2], "cpu") for src, spec in srcs.items()}},
        "reduced_dct_share": {src: reduced_dct_share(spec[0], spec[1]) for src, spec in srcs.items()},
    }
    if args.device != "cpu":
        dev = torch.device(args.device)
        res["device"] = {"name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
                         "img_per_s": time_device(srcs, args.device, args.rounds, args.batch)}
        res["op_difference"][args.device] = op_table(srcs["500x375"][0], args.device)
        res["end_to_end"][args.device] = {src: end_to_end(spec[0][:64], spec[1], spec[2], args.device)
                                          for src, spec in srcs.items()}
    res["wall_s"] = time.perf_counter() - t0
    print_tables(res)
    save_json(args.out, res)
    print(f"\nwrote {args.out} ({res['wall_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
