"""Pixels of the batched backend's blocks, rendered where the consumer runs: the loader's workers plan (bytes and
params), the main process renders each pool of blocks in one call, on CUDA from a side stream."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.images import decode_error
from pipeline.data.shards import Manifest
from pipeline.errors import ShardError
from pipeline.replay.batched import merge_plans, render_plan
from pipeline.replay.transfer import cuda_stream, to_device


def collate_plan(plan: dict, seed_index: int, perm: np.ndarray) -> dict:
    """collate() of a block's plan: the same fields in ``perm`` order; the pixels come later (render_blocks)."""
    order = torch.from_numpy(np.asarray(perm, dtype=np.int64))
    return {"index": torch.tensor(plan["index"], dtype=torch.int64)[order], "target": plan["target"][order],
            "label": torch.tensor(plan["label"], dtype=torch.int64)[order],
            "digest": torch.tensor(plan["digest"], dtype=torch.int64)[order],
            "seed": torch.full((len(order),), seed_index, dtype=torch.int64), "plan": plan, "order": order}


def render_blocks(blocks: list[dict], device: torch.device, manifest: Manifest) -> None:
    """Render the pixels of batched-backend blocks in place, all in one render_plan call on ``device`` (on CUDA
    from a side stream, so rendering the next batch overlaps the current step's kernels)."""
    todo = [b for b in blocks if "plan" in b]
    if not todo:
        return
    plans = [b.pop("plan") for b in todo]
    # every block's batch order as one gather over the pool's render (offset by the blocks before it)
    starts = np.cumsum([0] + [len(b["index"]) for b in todo])
    order = torch.cat([b.pop("order") + int(start) for b, start in zip(todo, starts)])
    try:
        images = _render_plans(plans, device, order)
    except ShardError:
        raise
    except Exception as exc:  # noqa: BLE001 - an image that does not decode: name its shard and key
        for plan in plans:
            items = list(zip(plan["index"], plan["data"], plan["label"]))
            named = decode_error(manifest.shard_path(manifest.shard_of(items[0][0])), items, manifest.key_width)
            if named is not None:
                raise named from exc
        raise
    for block, start, end in zip(todo, starts, starts[1:]):
        block["image"] = images[start:end]


def _render_plans(plans: list[dict], device: torch.device, order: torch.Tensor) -> torch.Tensor:
    """The merged plans rendered on `device`, then gathered into `order`; every copy is queued, none waited for."""
    if device.type == "cuda":
        # The side stream does not wait for the main one: a render reads only host bytes and numbers, so it runs
        # while the step queued before it (backward, optimiser) still runs. Only the step that reads the pixels
        # waits for them (main.wait_stream), and record_stream keeps the caching allocator from handing their
        # memory to the side stream again before the main stream is done with it.
        side, main = cuda_stream(device, "render"), torch.cuda.current_stream(device)
        with torch.cuda.stream(side):
            images = render_plan(merge_plans(plans), device)[to_device(order, device)]
        main.wait_stream(side)
        images.record_stream(main)
        return images
    return render_plan(merge_plans(plans), device)[order]
