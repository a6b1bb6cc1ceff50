"""Host numbers and pixels onto the render's device without making the host wait.

``torch.tensor(x, device="cuda")`` (or ``.to("cuda")``) copies from pageable memory and then synchronises the
current stream: the host waits for every kernel already queued there. A batched render makes dozens of such
copies (per-op magnitudes, matrices, resize weights), so it would stop the host at each one; on the main stream
one of them waits for the whole queued training step. From pinned memory with ``non_blocking`` the copy is queued
like a kernel, and torch's pinned-memory cache keeps the host buffer until the copy has run.
"""

from __future__ import annotations

import functools

import torch


def to_device(data, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.as_tensor(data, dtype=dtype)`` on `device`; on CUDA queued, never waited for."""
    device = torch.device(device)
    t = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=None)
def cuda_stream(device: torch.device, purpose: str) -> torch.cuda.Stream:
    """One CUDA stream per device and purpose ("render", "decode"), made on first use."""
    return torch.cuda.Stream(device)
