"""What the cache keeps of a teacher's logits, and the one function that computes it (cache writer and online
teacher alike, so `distill.source=cache` and `source=online` see the same targets, ties included)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

FIELDS = ("argmax", "topk_values", "topk_indices", "logsumexp")
# What each distillation mode reads (stage two's distill.mode, the timm tasks' distill_type)
MODE_FIELDS = {"none": (), "hard": ("argmax",), "soft": ("topk_values", "topk_indices", "logsumexp")}


@dataclass
class TeacherTargets:
    """A batch of teacher targets in the cache's form (any field may be None when not stored or not needed)."""

    argmax: Tensor | None = None        # [B] int, from the fp32 logits
    topk_values: Tensor | None = None   # [B, K] logits, descending, rounded to fp16 as stored
    topk_indices: Tensor | None = None  # [B, K] int class ids; ties by lower class id, so [:, 0] == argmax
    logsumexp: Tensor | None = None     # [B] fp32 log softmax normaliser over all C classes (fp64 reduction)

    @classmethod
    def from_batch(cls, batch: dict) -> TeacherTargets:
        return cls(**{f: batch.get(f) for f in FIELDS})


@torch.no_grad()
def teacher_targets(logits: Tensor, k: int) -> TeacherTargets:
    """What the cache keeps of fp32 logits [B, C]: argmax; the K largest (value descending, ties by lower class
    id: a stable sort) rounded to fp16; logsumexp reduced in fp64, kept in fp32. ``k = 0``: argmax only."""
    x = logits.detach().float()
    if not 0 <= k <= x.shape[-1]:
        raise ValueError(f"top-k k={k} must be in [0, num_classes={x.shape[-1]}]")
    argmax = x.argmax(-1)  # first maximum: the same class a stable descending sort puts first
    if k == 0:  # cache.topk=0: hard labels only
        return TeacherTargets(argmax=argmax)
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return TeacherTargets(argmax=argmax, topk_values=values[:, :k].half(), topk_indices=indices[:, :k],
                          logsumexp=torch.logsumexp(x.double(), dim=-1).float())


def stored_arrays(logits: np.ndarray, topk: int, ids: np.dtype, *, store_logits: bool = False) -> dict:
    """The per-view arrays a store writes for fp32 logits [B, C] (numpy, in the store's dtypes)."""
    x = np.asarray(logits, dtype=np.float32)
    t = teacher_targets(torch.from_numpy(x), int(topk))
    out = {"argmax": t.argmax.numpy().astype(ids)}
    if topk > 0:
        out.update(topk_values=t.topk_values.numpy(), topk_indices=t.topk_indices.numpy().astype(ids),
                   logsumexp=t.logsumexp.numpy())
    if store_logits:
        out["logits"] = x.astype(np.float16)
    return out


def soft_probs(topk_values, logsumexp) -> np.ndarray:
    """Teacher probabilities of the stored top-K classes, ``p_k = exp(v_k - lse)`` (float32, [..., K])."""
    v = np.asarray(topk_values, dtype=np.float32)
    lse = np.asarray(logsumexp, dtype=np.float32)
    return np.exp(v - lse[..., None])

