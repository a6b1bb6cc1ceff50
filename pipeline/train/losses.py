"""Distillation loss for stage two (docs/design.md, section 7), one code path for cache and online teachers.

Teacher targets are always in the cache's form (docs/design.md, section 6): ``argmax``, top-K logits (fp16, descending),
their indices and the fp32 ``logsumexp`` over all classes at tau=1. An online teacher goes through
:func:`pipeline.cache.targets.teacher_targets`, the cache writer's own function, so ``source=online`` and
``source=cache`` give identical losses on identical logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.cache.targets import TeacherTargets
from pipeline.errors import ConfigError

MODES = ("none", "soft", "hard")


def soft_teacher_log_probs(t: TeacherTargets, num_classes: int, tau: float) -> Tensor:
    """Tempered teacher log-probabilities [B, C] rebuilt from top-K + logsumexp.

    Exact when K == C. For K < C the tail mass ``1 - sum_k exp(v_k - lse)`` is spread evenly over the C-K
    other classes via one tail logit ``lse + log(tail / (C-K))``; the rebuilt logit vector is then tempered:
    ``log_softmax(logits / tau)``. At tau=1 this reproduces the stored top-K probabilities exactly.
    """
    values, indices, lse = t.topk_values.float(), t.topk_indices.long(), t.logsumexp.float()
    k = values.shape[-1]
    if k > num_classes:
        raise ValueError(f"top-k K={k} exceeds num_classes={num_classes}")
    if k < num_classes:
        head = torch.exp(values - lse[:, None]).sum(-1)
        # fp16 rounding of the values can push sum p_k slightly above 1: keep the tail positive
        tail = (1.0 - head).clamp_min(torch.finfo(torch.float32).tiny)
        tail_logit = lse + torch.log(tail / (num_classes - k))
        full = tail_logit[:, None].expand(-1, num_classes).clone()
    else:
        full = values.new_empty(values.shape[0], num_classes)
    full.scatter_(1, indices, values)
    return F.log_softmax(full / tau, dim=-1)


def soft_target_cross_entropy(x: Tensor, target: Tensor) -> Tensor:
    """timm's SoftTargetCrossEntropy; integer labels [B] fall back to plain cross-entropy."""
    if target.ndim == 1:
        return F.cross_entropy(x, target.long())
    return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()


class DistillationLoss(nn.Module):
    def __init__(self, mode: str = "none", alpha: float = 0.5, tau: float = 1.0, num_classes: int = 1000):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"distill.mode={mode!r} is unknown; expected one of {MODES}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distill.alpha={alpha} must be in [0, 1]")
        if tau <= 0:
            raise ConfigError(f"distill.tau={tau} must be > 0")
        self.mode, self.alpha, self.tau, self.num_classes = str(mode), float(alpha), float(tau), int(num_classes)

    def _require(self, teacher: TeacherTargets | None, fields: tuple[str, ...], hint: str) -> None:
        missing = [f for f in fields if teacher is None or getattr(teacher, f) is None]
        if missing:
            got = "no teacher targets" if teacher is None else f"missing: {', '.join(missing)}"
            raise ConfigError(f"distill.mode={self.mode} needs {'/'.join(fields)}{hint}; {got}")

    def forward(self, outputs, target: Tensor, teacher: TeacherTargets | None = None
                ) -> tuple[Tensor, dict[str, float]]:
        cls_out, dist_out = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        if dist_out.shape[-1] != self.num_classes:
            raise ValueError(f"student outputs have {dist_out.shape[-1]} classes, loss expects {self.num_classes}")
        base = soft_target_cross_entropy(cls_out, target)
        if self.mode == "none":
            # No teacher: the dist head is trained on the label too, with equal weight, so that DeiT's
            # eval-time average of the two heads stays a meaningful prediction (an untrained dist head
            # would add noise to it).
            distill = soft_target_cross_entropy(dist_out, target)
            loss = 0.5 * base + 0.5 * distill
        elif self.mode == "hard":
            self._require(teacher, ("argmax",), " (teacher hard label, from the cache or online)")
            distill = F.cross_entropy(dist_out, teacher.argmax.to(dist_out.device, non_blocking=True).long())
            loss = (1 - self.alpha) * base + self.alpha * distill
        else:
            self._require(teacher, ("topk_values", "topk_indices", "logsumexp"),
                          " from the cache (cache.topk=0 stores hard labels only)")
            dev = dist_out.device
            t = TeacherTargets(None, teacher.topk_values.to(dev, non_blocking=True),
                               teacher.topk_indices.to(dev, non_blocking=True),
                               teacher.logsumexp.to(dev, non_blocking=True))
            log_p = soft_teacher_log_probs(t, self.num_classes, self.tau)
            log_q = F.log_softmax(dist_out.float() / self.tau, dim=-1)
            # KL(p_teacher^tau || q_student^tau), summed over classes, averaged over the batch ('batchmean'),
            # times tau^2 (Hinton) so gradient magnitudes do not shrink with tau. DeiT's code uses
            # reduction='sum' / outputs.numel(), i.e. it additionally divides by the class count C: its
            # distillation term is C times (1000x on ImageNet) smaller than ours for the same alpha. We do NOT.
            distill = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (self.tau ** 2)
            loss = (1 - self.alpha) * base + self.alpha * distill
        return loss, {"base": float(base.detach()), "distill": float(distill.detach())}


def create_loss(distill_cfg, num_classes: int) -> DistillationLoss:
    """``distill_cfg``: dict or DictConfig with ``mode``, ``alpha``, ``tau``."""
    return DistillationLoss(**{k: distill_cfg[k] for k in ("mode", "alpha", "tau") if k in distill_cfg},
                            num_classes=num_classes)
