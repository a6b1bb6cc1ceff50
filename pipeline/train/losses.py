"""Distillation loss (docs/design.md, section 7): the one code path for the training loop, cache and online
teachers alike, and for the timm tasks (pipeline.train.timm_task).

Teacher targets are always in the cache's form (docs/design.md, section 6): ``argmax``, top-K logits (fp16, descending),
their indices and the fp32 ``logsumexp`` over all classes at tau=1. An online teacher goes through
:func:`pipeline.cache.targets.teacher_targets`, the cache writer's own function, so ``source=online`` and
``source=cache`` give identical losses on identical logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from pipeline.cache.targets import MODE_FIELDS, TeacherTargets
from pipeline.errors import ConfigError

MODES = tuple(MODE_FIELDS)  # none, hard, soft


def check_tau(tau: float, key: str = "distill.tau") -> float:
    if not tau > 0:
        raise ConfigError(f"{key}={tau} must be > 0")
    return float(tau)


def require_fields(teacher: TeacherTargets | None, mode: str, what: str = "distill.mode") -> None:
    """Refuse teacher targets that lack what ``mode`` reads, naming the missing fields."""
    fields = MODE_FIELDS[mode]
    missing = [f for f in fields if teacher is None or getattr(teacher, f) is None]
    if missing:
        hint = (" (teacher hard label, from the cache or online)" if mode == "hard"
                else " from the cache (cache.topk=0 stores hard labels only)")
        got = "no teacher targets" if teacher is None else f"missing: {', '.join(missing)}"
        raise ConfigError(f"{what}={mode} needs {'/'.join(fields)}{hint}; {got}")


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


def teacher_target(t: TeacherTargets | None, mode: str, num_classes: int, tau: float = 1.0, *,
                   device=None, what: str = "distill.mode") -> Tensor:
    """The teacher's target in ``mode``: "hard" its class [B] (int64); "soft" its tempered log-probabilities
    [B, C] (float32). Fields are checked (named when missing) and moved to ``device``."""
    require_fields(t, mode, what)

    def moved(x: Tensor) -> Tensor:
        return x if device is None else x.to(device, non_blocking=True)

    if mode == "hard":
        return moved(t.argmax).long()
    tau = check_tau(tau, "distill.tau" if what == "distill.mode" else "tau")
    return soft_teacher_log_probs(TeacherTargets(None, *(moved(getattr(t, f)) for f in MODE_FIELDS["soft"])),
                                  int(num_classes), tau)


def distill_loss(logits: Tensor, t: TeacherTargets | None, mode: str, num_classes: int, tau: float = 1.0, *,
                 what: str = "distill.mode") -> Tensor:
    """The distillation term on the student's distillation (or only) head: "hard" cross-entropy on the teacher's
    class; "soft" KL(p_teacher^tau || q_student^tau) * tau^2.

    KL is summed over classes and averaged over the batch ('batchmean', timm's and Hinton's), times tau^2 so
    gradient magnitudes do not shrink with tau. DeiT's code uses reduction='sum' / outputs.numel(), i.e. it
    additionally divides by the class count C: its term is C times (1000x on ImageNet) smaller for the same
    alpha. We do NOT.
    """
    if logits.shape[-1] != num_classes:
        raise ValueError(f"student outputs have {logits.shape[-1]} classes, loss expects {num_classes}")
    target = teacher_target(t, mode, num_classes, tau, device=logits.device, what=what)
    if mode == "hard":
        return F.cross_entropy(logits, target)
    log_q = F.log_softmax(logits.float() / tau, dim=-1)
    return F.kl_div(log_q, target, reduction="batchmean", log_target=True) * (tau ** 2)


class DistillationLoss(nn.Module):
    """``task_weight * criterion(class head, target) + distill_weight * distill term(dist head, teacher)``.

    ``alpha`` (the pipeline's distill.alpha) sets the weights to (1 - alpha, alpha) unless ``weights`` are
    given (timm's task_loss_weight / distill_loss_weight). ``mode="none"``: no teacher; the dist head is trained
    on the label too, with equal weight, so that DeiT's eval-time average of the two heads stays a meaningful
    prediction (an untrained dist head would add noise to it). ``criterion``: the task loss (default timm's
    SoftTargetCrossEntropy: the views' targets are mixed, smoothed distributions).
    """

    def __init__(self, mode: str = "none", alpha: float = 0.5, tau: float = 1.0, num_classes: int = 1000, *,
                 weights: tuple[float, float] | None = None, criterion=None, what: str = "distill.mode"):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"{what}={mode!r} is unknown; expected one of {MODES}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distill.alpha={alpha} must be in [0, 1]")
        self.mode, self.alpha, self.tau, self.num_classes = str(mode), float(alpha), check_tau(tau), int(num_classes)
        self.weights = (0.5, 0.5) if mode == "none" else weights if weights is not None else (1 - self.alpha,
                                                                                            self.alpha)
        self.criterion = criterion if criterion is not None else SoftTargetCrossEntropy()
        self.what = what

    def terms(self, outputs, target: Tensor, teacher: TeacherTargets | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, task loss, distillation term), tensors. ``outputs``: (class logits, dist logits), or one
        tensor standing for both heads."""
        cls_out, dist_out = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        if dist_out.shape[-1] != self.num_classes:
            raise ValueError(f"student outputs have {dist_out.shape[-1]} classes, loss expects {self.num_classes}")
        base = self.criterion(cls_out, target)
        if self.mode == "none":
            distill = self.criterion(dist_out, target)
        else:
            distill = distill_loss(dist_out, teacher, self.mode, self.num_classes, self.tau, what=self.what)
        task_w, distill_w = self.weights
        return task_w * base + distill_w * distill, base, distill

    def forward(self, outputs, target: Tensor, teacher: TeacherTargets | None = None
                ) -> tuple[Tensor, dict[str, float]]:
        loss, base, distill = self.terms(outputs, target, teacher)
        return loss, {"base": float(base.detach()), "distill": float(distill.detach())}


def create_loss(distill_cfg, num_classes: int) -> DistillationLoss:
    """``distill_cfg``: dict or DictConfig with ``mode``, ``alpha``, ``tau``."""
    return DistillationLoss(**{k: distill_cfg[k] for k in ("mode", "alpha", "tau") if k in distill_cfg},
                            num_classes=num_classes)
