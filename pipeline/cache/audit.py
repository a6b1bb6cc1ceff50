"""``python -m pipeline.verify_cache``: check a store without the teacher, and optionally re-check it with it.

1. Completeness and integrity, always, without the teacher (pipeline.cache.integrity): every unit committed
   (units and seed indices not committed are listed as incomplete), and every committed unit's chunks, checksum
   record (tagged with this unit of this store), checksums, shapes, dtypes and invariants; damaged units are
   listed. "ok" means complete and intact.
2. The store belongs to this configuration: the provenance stage two checks (data fingerprint, augmentation hash,
   run seed, classes) when the train manifest is there, and the teacher's weights sha256 when its checkpoint file
   is there (hashing the file, not running the teacher).
3. ``fraction > 0`` (``cache.verify_fraction``): replay a random subset of committed, undamaged units, rerun the
   teacher (same weights required) and compare argmax, top-K logits, logsumexp and digests.

A store that a live writer holds (stage one running) is refused, naming the writer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from pipeline.cache import lease
from pipeline.cache.integrity import check_store
from pipeline.cache.provenance import check_augment, expected_provenance
from pipeline.cache.store import CacheStore
from pipeline.config import split_dir
from pipeline.replay.view_params import augment_config
from pipeline.data.shards import MANIFEST, load_manifest
from pipeline.errors import TeacherError
from pipeline.logs import progress


def verify_cache(cfg: DictConfig, fraction: float, seed: int = 0) -> dict:
    """Integrity of every committed unit, the store's provenance against ``cfg``, and with ``fraction > 0`` the
    teacher re-check; ``result["ok"]`` is False when any of them fails."""
    lease.refuse_if_written(cfg.cache.path, "verify_cache")
    store = CacheStore.open(cfg.cache.path)
    result = check_store(store, bar=True)
    _check_config(cfg, store)
    if fraction > 0:
        damaged = {(d["seed"], d["shard"]) for d in result["damaged"]}
        result.update(teacher_recheck(cfg, store, fraction, seed, skip=damaged))
        result["ok"] = result["ok"] and result["teacher_ok"]
    return result


def _check_config(cfg: DictConfig, store: CacheStore) -> None:
    train, aug = split_dir(cfg, "train"), augment_config(cfg)
    check_augment(store.path, store.provenance.get("augment"), aug)  # names the keys; the hash check, only that
    if (train / MANIFEST).is_file():
        manifest = load_manifest(train)
        for warning in store.check_compatible(expected_provenance(manifest, aug, int(cfg.run_seed))):
            print(f"warning: {warning}", file=sys.stderr)
    ckpt = cfg.teacher.get("checkpoint")
    theirs = (store.provenance.get("teacher") or {}).get("weights_sha256")
    if ckpt and theirs and Path(str(ckpt)).is_file():
        from pipeline.models.teacher import weights_sha256

        ours = weights_sha256(ckpt)
        if ours != theirs:
            raise TeacherError(f"{store.path}: built with teacher weights {theirs[:12]}, teacher.checkpoint={ckpt} "
                               f"holds {ours[:12]}: not this configuration's cache")


def teacher_recheck(cfg: DictConfig, store: CacheStore, fraction: float, seed: int = 0, skip=()) -> dict:
    """Replay a random subset of committed units (not ``skip``), rerun the teacher, compare with the store."""
    from pipeline import distributed
    from pipeline.cache.provenance import build_provenance
    from pipeline.replay.loader import run_loader
    from pipeline.models.teacher import TeacherRunner, create_teacher

    ctx = distributed.setup(cfg.cache.device, int(cfg.num_threads), cfg.cache.num_workers)
    manifest = load_manifest(split_dir(cfg, "train"))
    aug = augment_config(cfg)
    teacher = create_teacher(cfg.teacher, manifest.num_classes)
    expected = build_provenance(cfg, manifest, aug, teacher)
    ours, theirs = expected["teacher"]["weights_sha256"], store.provenance["teacher"]["weights_sha256"]
    if ours != theirs:
        raise TeacherError(f"{store.path}: built with teacher weights {theirs[:12]}, config loads {ours[:12]}: "
                           f"a re-check needs the same teacher")
    mask = store.done_mask()
    done = [(s, k) for s in range(store.num_seeds) for k in range(store.num_shards) if mask[s, k] and (s, k) not in skip]
    rng = np.random.default_rng(seed)
    count = min(len(done), max(1, int(round(fraction * len(done)))))
    chosen = sorted(done[i] for i in rng.choice(len(done), size=count, replace=False)) if done else []
    runner = TeacherRunner(teacher, cfg.teacher, ctx.device)
    loader = run_loader(cfg, "train", aug, batch_size=cfg.cache.batch_size, num_workers=cfg.cache.num_workers,
                        ctx=ctx)
    stored = {u: store.read_unit(*u) for u in chosen}
    views = agree = digest_bad = 0
    max_diff = max_lse = 0.0
    bar = progress(sum(manifest.shards[k].count for _, k in chosen), unit="view", desc="verify cache")
    for batch in loader.units(chosen):
        bar.update(len(batch["index"]))
        logits = runner(batch["image"]).float().cpu()
        lse = torch.logsumexp(logits.double(), dim=-1)
        for row, (s, i) in enumerate(zip(batch["seed"].tolist(), batch["index"].tolist())):
            k = manifest.shard_of(i)
            rows, pos = stored[(s, k)], i - manifest.shards[k].first
            digest_bad += int(rows["digest"][pos]) != int(batch["digest"][row])
            agree += int(rows["argmax"][pos]) == int(logits[row].argmax())
            if "topk_values" in rows:
                idx = torch.as_tensor(rows["topk_indices"][pos].astype(np.int64))
                diff = (logits[row][idx] - torch.as_tensor(rows["topk_values"][pos].astype(np.float32))).abs()
                max_diff = max(max_diff, float(diff.max()))
                max_lse = max(max_lse, abs(float(lse[row]) - float(rows["logsumexp"][pos])))
            views += 1
    bar.close()
    tol = float(cfg.cache.tolerance)
    return {"units_checked": len(chosen), "views_checked": views, "argmax_agreement": agree / max(views, 1),
            "max_topk_diff": max_diff, "max_logsumexp_diff": max_lse, "digest_mismatches": digest_bad,
            "tolerance": tol,
            "teacher_ok": bool(views and agree == views and digest_bad == 0 and max_diff <= tol and max_lse <= tol)}


def format_damage(result: dict) -> list[str]:
    """One line per store-level problem, per damaged unit and per seed index with units not committed."""
    path = result["store"]
    lines = [f"{path}: {p}" for p in result["array_problems"]]
    lines += [f"{path}: damaged unit (seed {d['seed']}, shard {d['shard']}): {'; '.join(d['problems'])}"
              for d in result["damaged"]]
    by_seed: dict[int, list[int]] = {}
    for u in result["incomplete"]:
        by_seed.setdefault(u["seed"], []).append(u["shard"])
    for s, ks in sorted(by_seed.items()):
        what = "no unit committed" if s in result["seeds_missing"] else f"{len(ks)} unit(s) not committed"
        shown = ", ".join(f"(seed {s}, shard {k})" for k in ks[:12]) + (", ..." if len(ks) > 12 else "")
        lines.append(f"{path}: incomplete: seed {s}: {what}: {shown}; run stage one (python -m "
                     f"pipeline.teacher_cache) to finish it")
    return lines
