"""timm.task's token distillation with the teacher's targets read from the cache instead of a teacher forward.

:class:`CachedTokenDistillationTask` keeps the constructor and forward contract of timm 1.0's
``timm.task.TokenDistillationTask`` (student with ``set_distilled_training``; ``criterion``/``criterion_kwargs``;
``distill_type`` 'soft' or 'hard'; ``distill_loss_weight``/``task_loss_weight`` weighting; ``temperature``;
``forward(input, target) -> {'loss', 'output', 'task_loss', 'distill_loss'}``), minus the teacher: ``forward``
takes the cached targets as ``teacher=`` (a :class:`pipeline.CachedViews` batch or a TeacherTargets). Soft
targets are rebuilt from top-K + logsumexp (:func:`pipeline.train.losses.soft_teacher_log_probs`): at K = C they
are the teacher's logits up to their fp16 rounding; hard targets are the stored argmax of the fp32 logits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task.classification import resolve_classification_loss
from timm.task.task import TrainingTask
from timm.utils import unwrap_model

from pipeline.cache.targets import TeacherTargets
from pipeline.train.losses import soft_teacher_log_probs

_logger = logging.getLogger(__name__)


class CachedTokenDistillationTask(TrainingTask):
    """timm's TokenDistillationTask (DeiT: class head on ``target``, distillation head on the teacher) with the
    teacher's targets taken from the batch. ``forward(input, target, teacher=batch)``."""

    def __init__(
            self,
            student_model: nn.Module,
            criterion: Optional[nn.Module] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            distill_type: str = 'soft',
            distill_loss_weight: Optional[float] = None,
            task_loss_weight: Optional[float] = None,
            temperature: float = 1.0,
            num_classes: Optional[int] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        student_unwrapped = unwrap_model(student_model)
        if not hasattr(student_unwrapped, 'set_distilled_training'):
            raise ValueError(
                f"Model {student_unwrapped.__class__.__name__} does not have 'set_distilled_training' method. "
                "CachedTokenDistillationTask requires a model with a distillation head (e.g., DeiT distilled variants).")
        student_unwrapped.set_distilled_training(True)
        if distill_type not in ('soft', 'hard'):
            raise ValueError(f"Unsupported distill_type '{distill_type}'. Must be 'soft' or 'hard'.")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.trainable_module = student_model
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        self.distill_type, self.temperature = distill_type, float(temperature)
        self.num_classes = int(num_classes if num_classes is not None else student_unwrapped.num_classes)
        # timm's weighting rules: independent weights / complementary (distill = 1 - task) / both 1.0
        if distill_loss_weight is not None:
            self.distill_loss_weight = distill_loss_weight
            self.task_loss_weight = task_loss_weight if task_loss_weight is not None else 1.0
        elif task_loss_weight is not None:
            self.task_loss_weight, self.distill_loss_weight = task_loss_weight, 1.0 - task_loss_weight
        else:
            self.task_loss_weight = self.distill_loss_weight = 1.0
        if self.verbose:
            _logger.info(f"CachedTokenDistillationTask: distill_type={distill_type}, temperature={temperature}, "
                         f"task_weight={self.task_loss_weight}, distill_weight={self.distill_loss_weight}")

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                teacher: Mapping | TeacherTargets | None = None) -> Dict[str, torch.Tensor]:
        """``input`` [B, C, H, W] (normalised for the student), ``target`` (labels or soft targets), ``teacher``:
        the cached targets of the same views (a CachedViews batch, or TeacherTargets)."""
        if teacher is None:
            raise ValueError("CachedTokenDistillationTask.forward needs teacher= (the batch's cached targets)")
        t = teacher if isinstance(teacher, TeacherTargets) else TeacherTargets.from_batch(dict(teacher))
        main_logits, dist_logits = self.trainable_module(input)
        task_loss = self.criterion(main_logits, target)
        dev = dist_logits.device
        if self.distill_type == 'soft':
            missing = [f for f in ("topk_values", "topk_indices", "logsumexp") if getattr(t, f) is None]
            if missing:
                raise ValueError(f"distill_type='soft' needs {'/'.join(missing)} (a cache with cache.topk > 0)")
            prob_t = soft_teacher_log_probs(
                TeacherTargets(None, t.topk_values.to(dev), t.topk_indices.to(dev), t.logsumexp.to(dev)),
                self.num_classes, self.temperature)
            prob_s = F.log_softmax(dist_logits / self.temperature, dim=-1)
            distill_loss = F.kl_div(prob_s, prob_t, reduction='batchmean', log_target=True) * (self.temperature ** 2)
        else:
            if t.argmax is None:
                raise ValueError("distill_type='hard' needs the cached argmax")
            distill_loss = F.cross_entropy(dist_logits, t.argmax.to(dev).long())
        total_loss = self.task_loss_weight * task_loss + self.distill_loss_weight * distill_loss
        return {'loss': total_loss, 'output': main_logits, 'task_loss': task_loss, 'distill_loss': distill_loss}
