"""Batches of a dealt epoch (pipeline.replay.deal): exactly the (sample, seed index) views a rank was dealt, in the
deal's order and step sizes.

A rank's views come from the shards of its epoch, each read once front to back: a unit is (seed indices, shard)
with the local position of every view of it the deal gave this rank (-1: another rank's). A worker renders the
dealt views of the unit (per_sample: only they and their mixup partners are decoded and rendered; batched: whole
blocks, rendered here, then the dealt rows kept); this process puts units back in deal order (a shard's views
are contiguous in it) and cuts the steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.replay.block_render import render_blocks

Unit = tuple[tuple[int, ...], int, np.ndarray]  # (seed indices, shard, positions [seed, sample of shard])


def plan_units(manifest, steps: list[list[tuple[int, int]]]) -> list[Unit]:
    """The deal's views grouped by shard, in order of their first position."""
    units: dict[int, dict[tuple[int, int], int]] = {}
    position = 0
    for step in steps:
        for index, seed in step:
            units.setdefault(manifest.shard_of(index), {})[(index, seed)] = position
            position += 1
    out = []
    for k, views in units.items():  # dicts keep insertion order: first position first
        seeds = tuple(sorted({s for _, s in views}))
        first, count = manifest.shards[k].first, manifest.shards[k].count
        pos = np.full((len(seeds), count), -1, dtype=np.int64)
        for (index, seed), p in views.items():
            pos[seeds.index(seed), index - first] = p
        out.append((seeds, k, pos))
    return out


class DealStream(IterableDataset):
    """Units split across DataLoader workers (unit u goes to worker u mod W); one item per unit."""

    def __init__(self, source, units: list[Unit]):  # source: a loader's ViewSource
        self.source, self.units = source, units

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for u in range(wid, len(self.units), nw):
            yield {"unit": u, "blocks": list(self._blocks(*self.units[u]))}

    def _blocks(self, seeds, shard, pos) -> Iterator[dict]:
        first = self.source.manifest.shards[shard].first
        # per_sample: render only the dealt views (and their mixup partners); batched renders whole blocks
        keep = (None if self.source.backend == "batched" else
                {s: set((np.flatnonzero(pos[j] >= 0) + first).tolist()) for j, s in enumerate(seeds)})
        for batch in self.source.unit_blocks(seeds, shard, None, keep):
            position = torch.from_numpy(pos[seeds.index(int(batch["seed"][0])), batch["index"].numpy() - first])
            keep = position >= 0
            if not bool(keep.any()):
                continue
            batch["position"] = position
            # batched backend: the block's pixels are rendered in the consumer, rows are kept after that
            yield batch if "plan" in batch else {k: v[keep] for k, v in batch.items()}


def dealt_batches(loader, steps: list[list[tuple[int, int]]]) -> Iterator[dict]:
    """``loader`` (a ViewLoader) rendering the rank's dealt ``steps``; every batch checked against the deal."""
    units = plan_units(loader.manifest, steps)
    blocks = iter(loader.data_loader(DealStream(loader.source, units)))
    waiting: dict[int, list[dict]] = {}
    pending: dict | None = None
    done, step = 0, 0
    try:
        for item in blocks:
            waiting[int(item["unit"])] = item["blocks"]
            while done in waiting:
                rows = _dealt_rows(waiting.pop(done), loader)
                pending = rows if pending is None else {k: torch.cat([pending[k], rows[k]]) for k in rows}
                done += 1
                while step < len(steps) and pending is not None and len(pending["index"]) >= len(steps[step]):
                    size = len(steps[step])
                    batch = {k: v[:size] for k, v in pending.items()}
                    pending = {k: v[size:] for k, v in pending.items()}
                    yield _checked(batch, steps[step], step)
                    step += 1
        if step != len(steps) or done != len(units):
            raise RuntimeError(f"dealt loader ran dry: {step} of {len(steps)} steps, {done} of {len(units)} units")
    finally:
        shutdown = getattr(blocks, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _dealt_rows(blocks: list[dict], loader) -> dict:
    """A unit's dealt rows, rendered (batched backend: here), sorted by position."""
    render_blocks(blocks, loader.device, loader.manifest)
    rows = [{k: v[b["position"] >= 0] for k, v in b.items()} for b in blocks]
    merged = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    order = torch.argsort(merged["position"])
    return {k: v[order] for k, v in merged.items()}


def _checked(batch: dict, dealt: list[tuple[int, int]], step: int) -> dict:
    got = list(zip(batch["index"].tolist(), batch["seed"].tolist()))
    if got != dealt:
        raise RuntimeError(f"step {step}: rendered (sample, seed) {got[:4]}... != dealt {dealt[:4]}...")
    batch.pop("position")
    return batch
