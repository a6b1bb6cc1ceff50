"""What the cache keeps of a teacher's logits, and the one function that computes it (cache writer and online
teacher alike, so `distill.source=cache` and `source=online` see the same targets, ties included)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

FIELDS = ("argmax", "topk_values", "topk_indices", "logsumexp")
SPARE = 4  # top-K candidates beyond K; (K + 4) * 64 <= C keeps torch.topk on its partial sort (K = 10, C = 1000)
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
    values, indices = stable_topk(x, k)
    return TeacherTargets(argmax=argmax, topk_values=values.half(), topk_indices=indices,
                          logsumexp=torch.logsumexp(x.double(), dim=-1).float())


def stable_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.sort(x, dim=-1, descending=True, stable=True)`` cut to its first k columns, bit for bit, ties
    included, without sorting every row: ``torch.topk`` picks k + SPARE candidates, which are stable-sorted by
    (value descending, class id ascending). That is the full sort's head unless the k-th value equals the last
    candidate's (then a tied class left out may have the lower id) or the row holds NaN (ordered differently by
    topk and sort): those rows, rare in real logits, take the full sort."""
    rows, classes = x.shape
    m = k + SPARE
    if m >= classes or rows == 0:
        values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[:, :k], indices[:, :k]
    cand_values, cand_ids = torch.topk(x, m, dim=-1, sorted=False)
    cand_ids, order = torch.sort(cand_ids, dim=-1)  # by class id, so the stable sort below breaks ties by it
    cand_values, order = torch.sort(cand_values.gather(-1, order), dim=-1, descending=True, stable=True)
    cand_ids = cand_ids.gather(-1, order)
    # a row sum is NaN when the row holds NaN (or both infinities: a needless but harmless full sort)
    redo = (cand_values[:, k - 1] == cand_values[:, m - 1]) | torch.isnan(x.sum(-1))
    values, indices = cand_values[:, :k], cand_ids[:, :k]
    if bool(redo.any()):
        rows_ = redo.nonzero().squeeze(-1)
        full_values, full_ids = torch.sort(x[rows_], dim=-1, descending=True, stable=True)
        values, indices = values.clone(), indices.clone()
        values[rows_], indices[rows_] = full_values[:, :k], full_ids[:, :k]
    return values, indices


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

