"""timm's distillation tasks with the cache standing where the teacher stood.

:class:`CachedTokenDistillationTask` keeps timm 1.0's ``TokenDistillationTask`` contract (DeiT: class head on
``target``, distillation head on the teacher) and :class:`CachedLogitDistillationTask` its
``LogitDistillationTask`` contract (one head, KL to the teacher), with ``cache`` in place of ``teacher_model``:
a :class:`pipeline.CachedViews` (or the path of its store). ``task(input, batch)``: ``batch`` is the
CachedViews batch whose views ``input`` holds; its ``target`` goes to ``criterion``, its cached teacher targets
to the distillation term, the pipeline's own (:class:`pipeline.train.losses.DistillationLoss`). Soft targets are
rebuilt from top-K + logsumexp: at K = C they are the teacher's logits up to their fp16 rounding; hard targets
are the stored argmax of the fp32 logits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.task.classification import resolve_classification_loss
from timm.task.task import TrainingTask
from timm.utils import unwrap_model

from pipeline.cache.reader import require_store_fields
from pipeline.cache.store import CacheStore
from pipeline.cache.targets import TeacherTargets
from pipeline.errors import ConfigError
from pipeline.train.losses import DistillationLoss, check_tau

_logger = logging.getLogger(__name__)


def _weights(distill_loss_weight: Optional[float], task_loss_weight: Optional[float]) -> tuple[float, float]:
    """timm's rule: independent weights / complementary (distill = 1 - task) / both 1.0."""
    if distill_loss_weight is not None:
        return (task_loss_weight if task_loss_weight is not None else 1.0), float(distill_loss_weight)
    if task_loss_weight is not None:
        return float(task_loss_weight), 1.0 - float(task_loss_weight)
    return 1.0, 1.0


def _cache_store(cache) -> CacheStore:
    """``cache``: a CachedViews (its open store) or the path of a store."""
    store = getattr(cache, "store", None)
    if isinstance(store, CacheStore):
        return store
    if isinstance(cache, (str, os.PathLike)):
        return CacheStore.open(os.fspath(cache), "r")
    raise ConfigError(f"cache={cache!r}: expected a pipeline.CachedViews or the path of a cache store")


class CachedDistillationTask(TrainingTask):
    """What both cached tasks share: the cache in place of the teacher, timm's criterion and loss weights, and
    the one distillation loss. Subclasses say how the student's outputs map to (class, dist) logits."""

    name = "CachedDistillationTask"

    def __init__(self, student_model: nn.Module, cache, criterion=None,
                 criterion_kwargs: Optional[Dict[str, Any]] = None, distill_type: str = 'soft',
                 distill_loss_weight: Optional[float] = None, task_loss_weight: Optional[float] = None,
                 temperature: float = 1.0, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, verbose: bool = True):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if distill_type not in ('soft', 'hard'):
            raise ConfigError(f"distill_type={distill_type!r}: expected 'soft' or 'hard'")
        check_tau(temperature, "temperature")
        store = _cache_store(cache)
        require_store_fields(store, distill_type, "distill_type")
        student = unwrap_model(student_model)
        if getattr(student, "num_classes", store.num_classes) != store.num_classes:
            raise ConfigError(f"{store.path}: the cache holds {store.num_classes} classes, the student "
                              f"{type(student).__name__} has num_classes={student.num_classes}")
        self.trainable_module = student_model
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        self.task_loss_weight, self.distill_loss_weight = _weights(distill_loss_weight, task_loss_weight)
        self.distill_type, self.temperature, self.num_classes = distill_type, float(temperature), store.num_classes
        self.loss = DistillationLoss(distill_type, tau=temperature, num_classes=store.num_classes,
                                     weights=(self.task_loss_weight, self.distill_loss_weight),
                                     criterion=self.criterion, what="distill_type")
        if self.verbose:
            _logger.info(f"{self.name}: cache {store.path}, distill_type={distill_type}, temperature={temperature}, "
                         f"task_weight={self.task_loss_weight}, distill_weight={self.distill_loss_weight}")

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> CachedDistillationTask:
        """timm's: the student in DistributedDataParallel (there is no teacher to leave out)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """timm's: the student compiled, used for training and eval alike."""
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = self.trainable_module
        return self.trainable_module

    def heads(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, input: torch.Tensor, target: Mapping) -> Dict[str, torch.Tensor]:
        """``input`` [B, C, H, W] (the batch's views as the student takes them), ``target``: the CachedViews
        batch (its ``target`` for the criterion, its cached teacher targets for the distillation term)."""
        if not isinstance(target, Mapping):
            raise ConfigError(f"{self.name}(input, target): target must be the CachedViews batch (a dict holding "
                              f"'target' and the cached teacher targets), got {type(target).__name__}")
        cls_out, dist_out = self.heads(self.trainable_module(input))
        label = target["target"].to(cls_out.device, non_blocking=True)
        loss, task_loss, distill_loss = self.loss.terms((cls_out, dist_out), label, TeacherTargets.from_batch(target))
        return {'loss': loss, 'output': cls_out, 'task_loss': task_loss, self.distill_key: distill_loss}


class CachedTokenDistillationTask(CachedDistillationTask):
    """timm's TokenDistillationTask, the cache in place of ``teacher_model``: a student with a distillation head
    (DeiT distilled), its class head on the batch's ``target``, its distillation head on the teacher's
    (``distill_type`` "soft": KL at ``temperature``; "hard": cross-entropy on the teacher's argmax)."""

    name, distill_key = "CachedTokenDistillationTask", "distill_loss"

    def __init__(self, student_model: nn.Module, cache, *args, **kwargs):
        student = unwrap_model(student_model)
        if not hasattr(student, 'set_distilled_training'):
            raise ConfigError(f"{type(student).__name__} has no distillation head (set_distilled_training): "
                              f"use CachedLogitDistillationTask, or a DeiT distilled model")
        student.set_distilled_training(True)
        super().__init__(student_model, cache, *args, **kwargs)

    def heads(self, output):
        main_logits, dist_logits = output
        return main_logits, dist_logits


class CachedLogitDistillationTask(CachedDistillationTask):
    """timm's LogitDistillationTask, the cache in place of ``teacher_model``: any classifier, one head on both
    the batch's ``target`` and the teacher's (``loss_type='kl'`` at ``temperature``, timm's only type; a
    hard-labels-only cache: ``loss_type='hard'``, cross-entropy on the teacher's argmax)."""

    name, distill_key = "CachedLogitDistillationTask", "kd_loss"

    def __init__(self, student_model: nn.Module, cache, criterion=None,
                 criterion_kwargs: Optional[Dict[str, Any]] = None, loss_type: str = 'kl', **kwargs):
        if loss_type not in ('kl', 'hard'):
            raise ConfigError(f"loss_type={loss_type!r}: expected 'kl' (or 'hard' for a hard-labels-only cache)")
        super().__init__(student_model, cache, criterion, criterion_kwargs,
                         distill_type='soft' if loss_type == 'kl' else 'hard', **kwargs)
        self.loss_type = loss_type

    def heads(self, output):
        return output, output
