"""What trust costs: checksum verification on stage two's read path against a student step, and
sha256 hashing of shards as they stream against reading and rendering them.

    python -m bench.bench_trust [--out bench/out/bench_trust.json]

1. Checksums: a store of ImageNet-like units (1000 views, C=1000, K=10; and hard-only), each unit read the way
   stage two reads it (``CacheTargets``: the mode's fields + digest, one chunk per field) without and with
   verification (the unit's checksums chunk read + crc32c of every field but the digest). The student step is a
   real fwd+bwd+AdamW step of the toy recipe's student (DeiT-Ti distilled, 32 px, patch 8, depth 4, batch 64)
   and of DeiT-S distilled at 224 px (batch 16) on this machine's CPU; the cost is reported per view.
2. Shard hashing: ``iter_shard`` over toy shards (32 px PNGs) and photo-sized JPEG shards (500x375), with and
   without the streaming sha256, against rendering the same shard's train views (pipeline.replay.views).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import machine, save_json


def _best(fn, repeat: int) -> float:
    """The fastest of ``repeat`` runs (the least disturbed by the machine's other load)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def checksum_cost(work: Path, units: int = 8, repeat: int = 40) -> dict:
    from bench.bench_storage import synthetic_logits
    from pipeline.cache.integrity import check_store, verify_rows
    from pipeline.cache.reader import CacheTargets
    from pipeline.cache.store import CacheStore

    rng = np.random.default_rng(0)
    out = {}
    for name, topk, fields in (("soft K=10", 10, ("topk_values", "topk_indices", "logsumexp")),
                               ("hard", 0, ("argmax",))):
        path = work / f"{topk}.zarr"
        store = CacheStore.create(path, provenance={"topk": topk}, num_seeds=1, shard_counts=[1000] * units,
                                  shard_size=1000, num_classes=1000, topk=topk)
        for k in range(units):
            store.write_unit(0, k, synthetic_logits(rng, 1000, 1000), rng.integers(0, 2**32, 1000, dtype=np.uint32))
        store.release_lease()
        hook = CacheTargets(path, fields)
        reader = hook.store()
        read = list(hook.fields)
        verify = tuple(f for f in read if f != "digest")
        plain, checked = [], []
        for _ in range(repeat):  # interleaved, so that load on the machine hits both alike
            plain.append(_best(lambda: [reader.read_unit(0, k, read, verify=False) for k in range(units)], 1))
            checked.append(_best(lambda: [reader.read_unit(0, k, read, verify=verify) for k in range(units)], 1))
        plain, checked = min(plain) / units, min(checked) / units
        rows = [reader.read_unit(0, k, read, verify=False) for k in range(units)]
        direct = _best(lambda: [verify_rows(reader, 0, k, {f: rows[k][f] for f in verify}) for k in range(units)],
                       repeat) / units  # exactly the added work: the checksums chunk read + crc32c of the rows
        scan = _best(lambda: check_store(reader), 5) / units  # verify_cache / the resume's repair, per unit
        out[name] = {"fields_read": read, "fields_verified": list(verify), "integrity_check_ms_per_unit": scan * 1e3,
                     "unit_read_ms": plain * 1e3,
                     "unit_read_verified_ms": checked * 1e3, "read_delta_us_per_unit": (checked - plain) * 1e6,
                     "verify_us_per_unit": direct * 1e6, "verify_us_per_view": direct * 1e3}
    return out


def student_step(name: str, img: int, patch: int, batch: int, depth: int | None = None, steps: int = 6) -> float:
    """Seconds per view of a fwd+bwd+AdamW step of a distilled DeiT on the CPU (DeiT's distillation loss shape)."""
    import timm

    kw = {"img_size": img, "patch_size": patch, "num_classes": 1000}
    if depth:
        kw["depth"] = depth
    model = timm.create_model(name, **kw)
    model.set_distilled_training(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, img, img), torch.randint(0, 1000, (batch,))

    def step():
        cls, dist = model(x)
        loss = torch.nn.functional.cross_entropy(cls, y) + torch.nn.functional.cross_entropy(dist, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    return _best(step, steps) / batch


def hashing_cost(work: Path, repeat: int = 5) -> dict:
    from bench.bench_student import photo_jpegs, write_split
    from pipeline.data import sources
    from pipeline.data.shards import iter_shard
    from pipeline.data.shard_writer import write_shards
    from pipeline.replay.view_params import AugmentConfig
    from pipeline.replay.views import block_views

    toy = sources.toy(0, 256, "train")
    sets = {"toy 32px png (256/shard)": (write_shards(toy, work / "toy" / "train", shard_size=256, num_classes=10,
                                                       class_names=toy.class_names, source=toy.source), 32),
            "photo 500x375 jpeg (64/shard)": (write_split(work / "photo", "train", [
                (b, "jpg", i % 10) for i, b in enumerate(photo_jpegs(64))], 64, 10), 224)}
    out = {}
    for name, (m, size) in sets.items():
        entry, path = m.shards[0], m.shard_path(0)
        nbytes, raw = path.stat().st_size, path.read_bytes()
        plain = _best(lambda: list(iter_shard(path, entry, m, check_hash=False)), repeat)
        hashed = _best(lambda: list(iter_shard(path, entry, m, check_hash=True)), repeat)
        sha = _best(lambda: hashlib.sha256(raw).hexdigest(), repeat * 4)
        items = [(i, d, lab) for i, _, d, lab in iter_shard(path, entry, m)]
        cfg = AugmentConfig(image_size=size)
        render = _best(lambda: [block_views(items[j:j + 32], run_seed=0, seed_index=0, cfg=cfg, num_classes=10)
                                for j in range(0, len(items), 32)], 2)
        out[name] = {"shard_mb": nbytes / 1e6, "samples": len(items), "read_ms": plain * 1e3,
                     "read_hashed_ms": hashed * 1e3, "sha256_ms": sha * 1e3, "sha256_mb_per_s": nbytes / 1e6 / sha,
                     "sha256_us_per_sample": sha * 1e6 / len(items), "render_ms": render * 1e3,
                     "sha256_pct_of_read_and_render": 100 * sha / (plain + render)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/bench_trust.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        res = {"machine": machine(), "torch_threads": torch.get_num_threads(),
               "checksums": checksum_cost(Path(tmp)), "hashing": hashing_cost(Path(tmp))}
    res["student_step_s_per_view"] = {
        "deit_tiny toy recipe (32px, patch 8, depth 4, batch 64)": student_step("deit_tiny_distilled_patch16_224",
                                                                                 32, 8, 64, depth=4),
        "deit_small 224px (batch 16)": student_step("deit_small_distilled_patch16_224", 224, 16, 16, steps=3)}
    res["verify_pct_of_student_step"] = {
        f"{mode} / {student}": 100 * c["verify_us_per_view"] * 1e-6 / step
        for mode, c in res["checksums"].items() for student, step in res["student_step_s_per_view"].items()}
    save_json(args.out, res)
    import json

    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
