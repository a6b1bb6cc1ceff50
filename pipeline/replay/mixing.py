"""Mixup / CutMix pairs inside blocks of consecutive samples, and the soft targets they give.

A block is `mix_block` consecutive samples inside one shard; a permutation drawn from
(run_seed, s, first index of the block, MIX_PERM) pairs them. Both members of a pair get a mixed view (a with b,
b with a). `augment.mix_pairing` says who draws mode (mixup or CutMix), lambda and box:

    pair   each pair, from (run_seed, s, lower index of the pair, MIX_PAIR)
    block  the whole block once, from (run_seed, s, first index of the block, MIX_PAIR): DeiT's timm Mixup in
           mode "batch" (one switch, lambda and box per batch, each sample with the batch reversed) with the
           block as the batch. A random matching is what the reversed batch is, the batch being in random
           order; the block's is keyed by the seed index, so a sample meets other partners at every seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.replay import seeding
from pipeline.replay.view_params import AugmentConfig, rounded


def block_partners(run_seed: int, seed_index: int, first_index: int, n: int) -> list[int]:
    """Partner position of each position in a block of n (itself when n is odd and it is left over)."""
    perm = seeding.generator(run_seed, seed_index, first_index, seeding.MIX_PERM).permutation(n)
    partner = list(range(n))
    for a, b in zip(perm[0::2], perm[1::2]):
        partner[a], partner[b] = int(b), int(a)
    return partner


def block_mixes(items, *, run_seed: int, seed_index: int, cfg: AugmentConfig) -> tuple[list[int], list[dict | None]]:
    """Partner position and mix draw (sample_mix's record, or None) of every position in a block of items
    ((global index, ...), consecutive indices). Both members of a pair share their draw (see the module doc for
    who draws it); without cfg.mixing every position is its own partner. Both replay backends pair and mix by
    this."""
    n = len(items)
    partner = block_partners(run_seed, seed_index, items[0][0], n) if cfg.mixing else list(range(n))
    if cfg.mixing and cfg.mix_pairing == "block":
        block = sample_mix(seeding.generator(run_seed, seed_index, items[0][0], seeding.MIX_PAIR), cfg)
        return partner, [None if partner[a] == a else block for a in range(n)]
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
    return partner, [mixes[a] for a in range(n)]


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
        return {"mode": "mixup", "lam": rounded(lam), "box": None}
    size = cfg.image_size
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(size * cut), int(size * cut)
    cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
    y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, size)
    x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, size)
    lam = 1.0 - float((y1 - y0) * (x1 - x0)) / (size * size)
    return {"mode": "cutmix", "lam": rounded(lam), "box": [int(y0), int(x0), int(y1 - y0), int(x1 - x0)]}


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


def soft_target(label: int, partner_label: int, mix: dict | None, num_classes: int, smoothing: float) -> torch.Tensor:
    """A view's target, in float32: its smoothed one-hot, lambda-blended with its partner's when it is mixed."""
    target = smooth_one_hot(label, num_classes, smoothing)
    if mix is None:
        return target
    return mix["lam"] * target + (1.0 - mix["lam"]) * smooth_one_hot(partner_label, num_classes, smoothing)
