"""Stage-two benchmark: student training step rate with no teacher, cached hard / soft targets, an online teacher.

    python -m bench.bench_student [--steps 7] [--warmup 2] [--teacher224 regnety_160] [--students deit_tiny deit_small]

Two settings, each run side by side through the real loop (pipeline.training.train_student: replayed views from
WebDataset shards, DataLoader worker, cache rows checked by digest, AdamW + cosine, fp32 on CPU):

- toy32:    toy shards, 32 px views, deit_tiny_toy (DeiT-Ti width, 4 blocks, patch 8), batch 32, regnety_002
            teacher at 64 px.
- photo224: synthetic photo-size JPEGs (500x375, q90), 224 px views (DeiT augmentation), DeiT-Ti/16 and DeiT-S/16
            (``--students``), batch 8, 1000 classes, regnety_160 teacher (DeiT's) at 224 px.

The caches hold seeded random logits with the real view digests (filled by replaying every view): speed does not
depend on the values, and no teacher pass is spent building them. Teachers are randomly initialised (no hub
access). Rates come from the median step time after ``--warmup`` untimed steps (loader start-up and the shuffle
pool fill excluded; the median resists other processes' bursts on a shared machine; the mean is kept too), no
validation. Writes bench/out/student.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import RECIPE_V1, REPO, compose, save_json

MODES = {  # name -> distill overrides
    "none": ["distill=none"],
    "cache-hard": ["distill=hard", "distill.source=cache"],
    "cache-soft": ["distill=soft", "distill.source=cache"],
    "online-hard": ["distill=hard", "distill.source=online"],
}


def photo_jpegs(n: int, size=(500, 375), seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth random colour fields plus texture noise (decode cost of a real photo's size)."""
    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(base + rng.normal(0, 18, size=(h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_split(root: Path, split: str, samples: list[tuple[bytes, str, int]], shard_size: int, classes: int):
    from pipeline.data.shard_writer import write_shards

    return write_shards(iter(samples), root / split, n=len(samples), shard_size=shard_size, num_classes=classes,
                        class_names=[f"c{i}" for i in range(classes)], source={"name": "bench"}, split=split)


def fill_cache(cfg, workers: int = 0) -> None:
    """A store with the run's provenance, random logits and the real digests of every (seed, shard) unit (views
    replayed by ``workers`` DataLoader workers; 0: in this process)."""
    from pipeline.cache.provenance import library_versions
    from pipeline.cache.store import CacheStore
    from pipeline.replay.loader import ViewLoader
    from pipeline.data.shards import load_manifest
    from pipeline.replay.view_params import augment_config

    train = Path(cfg.data.shards) / "train"
    m = load_manifest(train)
    aug = augment_config(cfg)
    S, K, C = int(cfg.cache.num_seeds), int(cfg.cache.topk), m.num_classes
    prov = {"teacher": {"name": str(cfg.teacher.name), "weights_sha256": "random-bench", "num_classes": C},
            "data_fingerprint": m.fingerprint, "N": m.n, "augment": aug.canonical(), "augment_hash": aug.hash(),
            "run_seed": int(cfg.run_seed), "num_seeds": S, "topk": K, "num_classes": C,
            "versions": library_versions()}
    store = CacheStore.create(cfg.cache.path, provenance=prov, num_seeds=S, shard_counts=[s.count for s in m.shards],
                              shard_size=m.shard_size, num_classes=C, topk=K, overwrite=True)
    loader = ViewLoader(train, aug, run_seed=int(cfg.run_seed), batch_size=m.shard_size, num_workers=workers)
    rng = np.random.default_rng(0)
    for s in range(S):
        digests = np.zeros(m.n, np.uint32)  # by sample index: with workers, blocks of different shards interleave
        for b in loader.units([(s, k) for k in range(m.num_shards)]):
            digests[b["index"].numpy()] = b["digest"].numpy().astype(np.uint32)
        for k, shard in enumerate(m.shards):
            unit = digests[shard.first:shard.first + shard.count]
            store.write_unit(s, k, rng.normal(0, 2, size=(len(unit), C)).astype(np.float32), unit)


def measure(base: list[str], mode: str, out: Path, warmup: int) -> dict:
    from pipeline.train.student_run import train_student

    stamps: list[float] = []
    sizes: list[int] = []

    def on_step(info):
        stamps.append(time.perf_counter())
        sizes.append(len(info["index"]))

    t0 = time.perf_counter()
    train_student(compose([*base, *MODES[mode], f"train.out_dir={out / mode}"]), step_callback=on_step)
    total = time.perf_counter() - t0
    step_s = np.diff(stamps[warmup:])  # step j's time: end of step j-1 to end of step j
    batch = float(np.mean(sizes[warmup + 1:]))
    median = float(np.median(step_s))
    return {"img_per_s": batch / median, "img_per_s_mean": batch * len(step_s) / float(step_s.sum()),
            "step_s": median, "step_s_all": [round(float(x), 4) for x in step_s], "steps_timed": len(step_s),
            "batch": sizes[-1], "wall_s": total}


def run_setting(name: str, base: list[str], work: Path, warmup: int, modes) -> dict:
    cfg = compose(base)
    t = time.perf_counter()
    fill_cache(cfg)
    print(f"[{name}] cache filled in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    rows = {}
    for mode in modes:
        rows[mode] = measure(base, mode, work / "runs" / name, warmup)
        print(f"[{name}] {mode}: {rows[mode]['img_per_s']:.1f} img/s ({rows[mode]['step_s'] * 1e3:.0f} ms/step)",
              file=sys.stderr, flush=True)
    r = {m: v["img_per_s"] for m, v in rows.items()}
    ratios = {}
    for cached in ("cache-hard", "cache-soft"):
        if cached in r and "none" in r:
            ratios[f"{cached}/none"] = r[cached] / r["none"]
        if cached in r and "online-hard" in r:
            ratios[f"{cached}/online"] = r[cached] / r["online-hard"]
    return {"modes": rows, "ratios": ratios}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=7, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    ap.add_argument("--teacher224", default="regnety_160")
    ap.add_argument("--students", nargs="*", default=["deit_tiny", "deit_small"],
                    help="224 px students (none: skip the 224 px settings)")
    ap.add_argument("--skip-224", action="store_true", help="same as --students with no names")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "student.json"))
    args = ap.parse_args(argv)

    from pipeline.data import sources

    work = Path(tempfile.mkdtemp(prefix="bench_student_"))
    steps = args.warmup + args.steps + 1
    common = ["train.epochs=1", f"train.max_steps_per_epoch={steps}", f"train.num_workers={args.workers}",
              "train.val=false", "train.dvclive=false", "train.resume=never", "train.warmup_epochs=0",
              "cache.num_seeds=1", "cache.topk=10", "teacher.checkpoint=null", "teacher.pretrained=false",
              f"workdir={work}"]
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
               "load_avg_start": os.getloadavg()[0], "warmup_steps": args.warmup, "timed_steps": args.steps,
               "workers": args.workers, "dtype": "fp32 (CPU)", "settings": {}}
    t_all = time.perf_counter()

    # ---- toy32
    batch = 32
    root = work / "toy"
    n_train = batch * steps + 64
    for split, n in (("train", n_train), ("val", 64)):
        src = sources.toy(0, n, split)
        write_split(root, split, list(src), 64, len(src.class_names))
    base = [*common, *RECIPE_V1, "teacher=regnety_002", "teacher.input_size=64", f"data.shards={root}", f"cache.path={work / 'toy.zarr'}", f"train.batch_size={batch}"]
    results["settings"]["toy32"] = {
        "student": "deit_tiny_toy (DeiT-Ti width, 4 blocks, patch 8, 32 px)", "teacher": "regnety_002 @ 64 px", "batch": batch,
        "classes": 10, **run_setting("toy32", base, work, args.warmup, MODES)}

    # ---- photo224
    students = [] if args.skip_224 else args.students
    if students:
        batch, classes = 8, 1000
        root = work / "photo"
        n_train = batch * steps + 32
        rng = np.random.default_rng(1)
        labels = rng.integers(0, classes, size=n_train + 16)
        jpegs = photo_jpegs(n_train + 16)
        write_split(root, "train", [(b, "jpg", int(y)) for b, y in zip(jpegs[:n_train], labels)], 32, classes)
        write_split(root, "val", [(b, "jpg", int(y)) for b, y in zip(jpegs[n_train:], labels[n_train:])], 16,
                    classes)
    for student in students:
        base = [*common, f"data.shards={root}", f"data.num_classes={classes}", "data.image_size=224",
                "data.crop_pct=0.875", f"student={student}", "teacher=regnety_160", f"teacher.name={args.teacher224}",
                "teacher.input_size=null", f"cache.path={work / 'photo.zarr'}", f"train.batch_size={batch}"]
        name = f"photo224-{student}"
        results["settings"][name] = {
            "student": compose(base).student.name, "teacher": f"{args.teacher224} @ 224 px", "batch": batch,
            "classes": classes, "source_image": "500x375 JPEG q90",
            **run_setting(name, base, work, args.warmup, MODES)}

    results["wall_s"] = time.perf_counter() - t_all
    results["load_avg_end"] = os.getloadavg()[0]
    out = Path(args.out)
    save_json(out, results)
    print(table(results))
    print(f"\nwritten {out} ({results['wall_s']:.0f} s)")
    return results


def table(results: dict) -> str:
    lines = ["| setting | mode | img/s | ms/step | vs none | cached vs online |", "|---|---|---|---|---|---|"]
    for name, s in results["settings"].items():
        rows = s["modes"]
        for mode, v in rows.items():
            vs_none = v["img_per_s"] / rows["none"]["img_per_s"]
            vs_online = (f"{v['img_per_s'] / rows['online-hard']['img_per_s']:.2f}x"
                         if mode.startswith("cache") else "")
            lines.append(f"| {name} (b{s['batch']}) | {mode} | {v['img_per_s']:.1f} | {v['step_s'] * 1e3:.0f} | "
                         f"{vs_none:.2f} | {vs_online} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
