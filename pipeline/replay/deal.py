"""DeiT's repeated augmentation under replay (``train.repeat_mode=ranks``): which (sample, seed index) each rank
trains on in each step of an epoch. Pure functions of the shard sizes, the run seed and the epoch.

DeiT's RASampler repeats every index r = 3 times in a row and deals consecutive positions to consecutive ranks,
so an image's r copies sit in one global step on r ranks, each augmented independently; an epoch is about N
views (N/r distinct images). Under replay a copy's view is fixed by its seed index, so:

- Epochs come in blocks of r: block t = e // r draws one permutation of all N images (``block_order``) and
  epoch e takes its (e mod r)-th contiguous part (sizes differ by at most one), so each image is drawn once per
  block (without replacement; DeiT draws an independent N/r per epoch).
- In block t copy c of an image is the view under seed index r*t + c: every view is fresh with S = epochs.
- A global step holds G = (world x batch) // r whole images (copies never straddle steps); the epoch's images
  are spread evenly over ceil(n / G) steps. Inside a step the r*g copy positions (image k's copy c at r*k + c)
  are dealt round-robin: position q to rank q mod world. Local batches differ by at most one sample across
  ranks; world = 1 keeps an image's copies side by side in one local batch, world = r puts copy c on rank c.

The permutation is streaming-friendly (shards are tar files read front to back): shards in a random order, and
inside a shard windows of ``window`` mixup blocks in a random order with the samples of each window shuffled.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.errors import ConfigError
from pipeline.replay import seeding

RA_ORDER = 0x5A  # a word of the order generators' keys, apart from the pool shuffle's (order only, never content)


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes that differ by at most one, larger first."""
    base, extra = divmod(int(total), int(parts))
    return [base + 1 if j < extra else base for j in range(int(parts))]


def block_order(shards: list[tuple[int, int]], mix_block: int, window: int, run_seed: int, block: int) -> np.ndarray:
    """All sample indices in block ``block``'s order; shards: (first, count) of each shard."""
    rng = seeding.generator(run_seed, block, RA_ORDER, seeding.SHUFFLE)
    span = int(mix_block) * int(window)
    out = []
    for k in rng.permutation(len(shards)):
        first, count = shards[int(k)]
        starts = np.arange(0, count, span)
        for start in starts[rng.permutation(len(starts))]:
            out.append(first + start + rng.permutation(min(span, count - start)))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def epoch_images(shards, mix_block: int, window: int, run_seed: int, epoch: int, repeats: int) -> np.ndarray:
    """The images epoch ``epoch`` draws, in order: part (epoch mod r) of its block's permutation."""
    order = block_order(shards, mix_block, window, run_seed, int(epoch) // int(repeats))
    sizes = split_sizes(len(order), repeats)
    start = sum(sizes[:int(epoch) % int(repeats)])
    return order[start:start + sizes[int(epoch) % int(repeats)]]


def step_sizes(images: int, world: int, batch_size: int, repeats: int) -> list[int]:
    """Images per global step: G = world*batch // r whole images a step, spread evenly over ceil(n / G) steps;
    refused (naming the keys) where a step would leave a rank without a sample."""
    per_step = int(world) * int(batch_size) // int(repeats)
    if per_step < 1:
        raise ConfigError(f"train.repeat_mode=ranks: train.batch_size={batch_size} x {world} rank(s) holds fewer "
                          f"than train.repeats={repeats} copies of one image; raise train.batch_size")
    steps = max(1, math.ceil(int(images) / per_step))
    sizes = split_sizes(images, steps)
    if int(repeats) * sizes[-1] < int(world):
        raise ConfigError(f"train.repeat_mode=ranks: a step of {sizes[-1]} image(s) x train.repeats={repeats} "
                          f"leaves some of {world} ranks without a sample (the epoch draws {images} images); "
                          f"use more data or fewer ranks")
    return sizes


def rank_steps(images: np.ndarray, sizes: list[int], world: int, rank: int,
               seeds: list[int]) -> list[list[tuple[int, int]]]:
    """Rank ``rank``'s local batches: one list of (sample index, seed index) per global step; copy c of an image
    is its view under ``seeds[c]``."""
    r, out, start = len(seeds), [], 0
    for g in sizes:
        step = images[start:start + g]
        out.append([(int(step[q // r]), int(seeds[q % r])) for q in range(int(rank), r * g, int(world))])
        start += g
    return out


def block_seeds(epoch: int, repeats: int) -> list[int]:
    """The seed indices of the copies in epoch ``epoch``'s block t: r*t, ..., r*t + r - 1."""
    t = int(epoch) // int(repeats)
    return [int(repeats) * t + c for c in range(int(repeats))]


def epoch_deal(shards, *, mix_block: int, window: int, run_seed: int, epoch: int, world: int, batch_size: int,
               rank: int, seeds: list[int]) -> list[list[tuple[int, int]]]:
    """Everything above for one rank and epoch: its (sample index, seed index) pairs, step by step; ``seeds``:
    the r seed indices of the copies (``block_seeds``, or the seed schedule's)."""
    r = len(seeds)
    images = epoch_images(shards, mix_block, window, run_seed, epoch, r)
    return rank_steps(images, step_sizes(len(images), world, batch_size, r), world, rank, seeds)


def epoch_steps(total: int, *, epoch: int, repeats: int, world: int, batch_size: int) -> int:
    """Global steps of the epoch (the same on every rank) for ``total`` samples."""
    images = split_sizes(total, repeats)[int(epoch) % int(repeats)]
    return len(step_sizes(images, world, batch_size, repeats))
