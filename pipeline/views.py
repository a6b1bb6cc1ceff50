"""Views: a sample under a seed index, with its mixup partner fixed by the data (blocks), and its digest.

A block is `mix_block` consecutive samples inside one shard; a permutation drawn from
(run_seed, s, first index of the block, MIX_PERM) pairs them, and each pair draws mode, lambda and box from
(run_seed, s, lower index of the pair, MIX_PAIR). Both members get a mixed view (a with b, b with a).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch

from pipeline import seeding
from pipeline.replay import AugmentConfig, _r, apply, decode, eval_params, open_image, render, sample_params


def view_digest(index: int, params: dict, mix: dict | None = None) -> int:
    """32-bit blake2b over the canonical JSON of everything that determines the view's pixels."""
    blob = json.dumps({"i": int(index), "p": params, "mix": mix}, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(blob.encode(), digest_size=4).digest(), "little")


def block_partners(run_seed: int, seed_index: int, first_index: int, n: int) -> list[int]:
    """Partner position of each position in a block of n (itself when n is odd and it is left over)."""
    perm = seeding.generator(run_seed, seed_index, first_index, seeding.MIX_PERM).permutation(n)
    partner = list(range(n))
    for a, b in zip(perm[0::2], perm[1::2]):
        partner[a], partner[b] = int(b), int(a)
    return partner


def sample_mix(rng: np.random.Generator, cfg: AugmentConfig) -> dict | None:
    """timm Mixup semantics (pair mode, correct_lam for CutMix): {mode, lam, box} or None for no mix."""
    if rng.random() >= cfg.mix_prob:
        return None
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        cutmix = bool(rng.random() < cfg.switch_prob)
    else:
        cutmix = cfg.cutmix_alpha > 0
    lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha) if cutmix else rng.beta(cfg.mixup_alpha,
                                                                                     cfg.mixup_alpha))
    if not cutmix:
        return {"mode": "mixup", "lam": _r(lam), "box": None}
    size = cfg.image_size
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(size * cut), int(size * cut)
    cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
    y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, size)
    x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, size)
    lam = 1.0 - float((y1 - y0) * (x1 - x0)) / (size * size)
    return {"mode": "cutmix", "lam": _r(lam), "box": [int(y0), int(x0), int(y1 - y0), int(x1 - x0)]}


def mix_images(a: torch.Tensor, b: torch.Tensor, mix: dict) -> torch.Tensor:
    """View a mixed with partner b (uint8 in, uint8 out)."""
    if mix["mode"] == "cutmix":
        t, l, h, w = mix["box"]
        out = a.clone()
        out[:, t:t + h, l:l + w] = b[:, t:t + h, l:l + w]
        return out
    lam = mix["lam"]
    return (a.float() * lam + b.float() * (1.0 - lam)).round_().clamp_(0, 255).to(torch.uint8)


def smooth_one_hot(label: int, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    t = torch.full((num_classes,), off, dtype=torch.float32)
    t[label] = 1.0 - smoothing + off
    return t


def block_views(items: list[tuple[int, bytes, int]], *, run_seed: int, seed_index: int, cfg: AugmentConfig,
                num_classes: int, train: bool = True) -> list[dict]:
    """Render every view of one block. items: (global index, image bytes, label), consecutive indices."""
    imgs = [open_image(data) for _, data, _ in items]
    if not train:
        out = []
        for (index, _, label), img in zip(items, imgs):
            params = eval_params((img.size[1], img.size[0]), cfg)
            image, scale = decode(img)
            out.append({"index": index, "image": apply(image, params, cfg, scale), "label": label,
                        "target": smooth_one_hot(label, num_classes, 0.0),
                        "digest": view_digest(index, params)})
        return out

    params = [sample_params(seeding.view_rng(run_seed, seed_index, index), (img.size[1], img.size[0]), cfg)
              for (index, _, _), img in zip(items, imgs)]
    views = [render(img, p, cfg) for img, p in zip(imgs, params)]
    n = len(items)
    partner = block_partners(run_seed, seed_index, items[0][0], n) if cfg.mixing else list(range(n))
    mixes: dict[int, dict | None] = {}
    for a in range(n):
        b = partner[a]
        if b == a:
            mixes[a] = None
        elif b not in mixes:
            lo = min(items[a][0], items[b][0])
            mixes[a] = sample_mix(seeding.generator(run_seed, seed_index, lo, seeding.MIX_PAIR), cfg)
        else:
            mixes[a] = mixes[b]
    out = []
    for a, (index, _, label) in enumerate(items):
        b, mix = partner[a], mixes[a]
        target = smooth_one_hot(label, num_classes, cfg.label_smoothing)
        if mix is None:
            image, mix_record = views[a], None
        else:
            image = mix_images(views[a], views[b], mix)
            target = mix["lam"] * target + (1.0 - mix["lam"]) * smooth_one_hot(items[b][2], num_classes,
                                                                               cfg.label_smoothing)
            mix_record = {"j": items[b][0], "pj": params[b], **mix}
        out.append({"index": index, "image": image, "label": label, "target": target,
                    "digest": view_digest(index, params[a], mix_record), "params": params[a],
                    "mix": mix_record})
    return out
