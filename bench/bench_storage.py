"""Cache storage: bytes per view for soft K in {1, 5, 10, all} and hard-only, with the ImageNet-1k extrapolation.

    python -m bench.bench_storage [--shards 4] [--teacher-cache bench/out/accuracy/seed0/cache/...zarr]

Each row is a real Zarr store written by ``CacheStore.write_unit`` (the stage-one writer: top-K selection,
fp16 values, int16 ids, fp32 logsumexp, Blosc/Zstd codecs), one chunk per (seed, shard) unit of 1000 views;
bytes are the chunk files' sizes per view (``CacheStore.bytes_per_view``; filesystem blocks would add
the 4 KiB rounding of small chunks). Logit sources:

- ``synthetic-10`` / ``synthetic-1000``: a confident class plus Gaussian noise, the shape of a trained
  teacher's logits (10 classes; 1000 classes, ImageNet-like);
- ``fashion_mnist-teacher``: the real resnet10t teacher's logits on real replayed Fashion-MNIST views, read
  back from the accuracy study's cache (K = all = 10 there, so every smaller K is exact), when that cache exists.

ImageNet-1k: 1,281,167 samples x bytes per view, per cached seed and for S = 300 (DeiT's 300 epochs without a
repeated view).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from bench.common import REPO, save_json
IMAGENET_N = 1_281_167
DEIT_EPOCHS = 300
SHARD = 1000


def synthetic_logits(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    y = rng.integers(0, classes, n)
    if classes <= 10:
        x = rng.normal(0, 1, (n, classes))
        x[np.arange(n), y] += rng.normal(6, 1.5, n)
    else:
        x = rng.normal(0, 2, (n, classes))
        x[np.arange(n), y] += rng.normal(8, 2, n)
    return x.astype(np.float32)


def cached_logits(path: Path, max_views: int) -> np.ndarray | None:
    """Full logits (K = C) back from a stage-one store: top-K values scattered to their class ids."""
    from pipeline.cache.store import CacheStore

    if not path.exists():
        return None
    store = CacheStore.open(path)
    if store.topk != store.num_classes:
        return None
    rows = []
    for s, k in sorted(zip(*np.nonzero(store.done_mask()))):
        u = store.read_unit(int(s), int(k), ("topk_values", "topk_indices"))
        x = np.empty(u["topk_values"].shape, np.float32)
        np.put_along_axis(x, u["topk_indices"].astype(np.int64), u["topk_values"].astype(np.float32), axis=1)
        rows.append(x)
        if sum(len(r) for r in rows) >= max_views:
            break
    return np.concatenate(rows)[:max_views] if rows else None


def measure(logits: np.ndarray, ks: list[int], work: Path) -> dict[str, dict]:
    """{label: bytes_per_view dict} for each K (0 = hard-only), through real stores of SHARD-view units."""
    from pipeline.cache.store import CacheStore

    n, classes = logits.shape
    shards = n // SHARD
    logits = logits[: shards * SHARD]
    digests = np.random.default_rng(1).integers(0, 2**32, shards * SHARD, dtype=np.uint32)
    out = {}
    for k in ks:
        prov = {"teacher": {"name": "bench", "weights_sha256": "0", "num_classes": classes},
                "data_fingerprint": "bench", "N": shards * SHARD, "augment_hash": "bench", "run_seed": 0,
                "num_seeds": 1, "topk": k, "num_classes": classes}
        store = CacheStore.create(work / f"c{classes}-k{k}.zarr", provenance=prov, num_seeds=1,
                                  shard_counts=[SHARD] * shards, shard_size=SHARD, num_classes=classes, topk=k)
        for j in range(shards):
            rows = slice(j * SHARD, (j + 1) * SHARD)
            store.write_unit(0, j, logits[rows], digests[rows])
        label = "hard-only" if k == 0 else ("soft K=all" if k == classes else f"soft K={k}")
        out[label] = {"K": k, **store.bytes_per_view(), "allocated": store.bytes_per_view(allocated=True)["total"]}
    return out


def run(shards: int = 4, teacher_cache: Path | None = None) -> dict:
    rng = np.random.default_rng(0)
    sources = {"synthetic-10": synthetic_logits(rng, shards * SHARD, 10),
               "synthetic-1000": synthetic_logits(rng, shards * SHARD, 1000)}
    real = cached_logits(teacher_cache, shards * SHARD) if teacher_cache else None
    if real is not None and len(real) >= SHARD:
        sources["fashion_mnist-teacher"] = real
    res = {"shard_size": SHARD, "imagenet_n": IMAGENET_N, "deit_epochs": DEIT_EPOCHS, "sources": {}}
    with tempfile.TemporaryDirectory(prefix="bench_storage_") as tmp:
        for name, logits in sources.items():
            c = logits.shape[1]
            ks = sorted({k for k in (1, 5, 10) if k < c} | {c}) + [0]
            rows = measure(logits, ks, Path(tmp) / name)
            for r in rows.values():
                r["imagenet_gb_per_seed"] = r["total"] * IMAGENET_N / 1e9
                r[f"imagenet_gb_S{DEIT_EPOCHS}"] = r["total"] * IMAGENET_N * DEIT_EPOCHS / 1e9
            res["sources"][name] = {"classes": c, "views": len(logits) // SHARD * SHARD, "rows": rows}
    return res


def table(res: dict) -> str:
    lines = [f"| logits | classes | stored | B/view | of which topk values / ids / lse / argmax / digest | "
             f"ImageNet-1k GB per seed | GB for S={res['deit_epochs']} |", "|---|---|---|---|---|---|---|"]
    s_key = f"imagenet_gb_S{res['deit_epochs']}"
    for name, s in res["sources"].items():
        for label, r in s["rows"].items():
            parts = " / ".join(f"{r.get(f, 0.0):.1f}" for f in
                               ("topk_values", "topk_indices", "logsumexp", "argmax", "digest"))
            lines.append(f"| {name} | {s['classes']} | {label} | {r['total']:.1f} | {parts} | "
                         f"{r['imagenet_gb_per_seed']:.3f} | {r[s_key]:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=4, help="units of 1000 views per store")
    ap.add_argument("--teacher-cache", type=Path, default=None,
                    help="a stage-one store with K = all (default: the accuracy study's, when it has run)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "storage.json")
    args = ap.parse_args(argv)
    study = REPO / "bench" / "out" / "accuracy" / "accuracy.json"
    if args.teacher_cache is None and study.is_file():
        args.teacher_cache = Path(json.loads(study.read_text())["meta"].get("cache_path", study.parent / "none"))
    res = run(args.shards, args.teacher_cache)
    save_json(args.out, res)
    print(table(res))
    return res


if __name__ == "__main__":
    main()
