"""Tasks: what a training loop asks of one kind of model (timm.task's split of loop and loss), one hierarchy
rooted at timm's ``TrainingTask``, every distillation task with the one loss (pipeline.train.losses.DistillationLoss).

For the pipeline's loop (``forward(model, batch)``): `ClassificationTask` trains the teacher on the views' (mixed,
smoothed) targets; `DistillationTask` trains the DeiT student with its two heads against teacher targets from the
cache or from an online teacher. For your own loop, timm's contract with the cache standing where the teacher
stood: `CachedTokenDistillationTask` (timm's TokenDistillationTask) and `CachedLogitDistillationTask` (timm's
LogitDistillationTask), in pipeline.train.timm_task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.task import TrainingTask

from pipeline.cache.targets import TeacherTargets, teacher_targets
from pipeline.models.student import heads
from pipeline.models.teacher import model_input


class Task(TrainingTask):
    """The loop's tasks: input transform (uint8 views -> normalised), precision, validation keys. ``forward(model,
    batch)``: the loop passes the model (DDP- or compile-wrapped) with each batch."""

    eval_keys: tuple[str, ...] = ()

    def __init__(self, mean, std, device, *, bf16: bool = False, size=None, channels_last: bool = False):
        super().__init__(device=torch.device(device), verbose=False)
        self.mean, self.std = list(mean), list(std)
        self.bf16, self.size, self.channels_last = bool(bf16), size, bool(channels_last)

    def inputs(self, images_u8: torch.Tensor) -> torch.Tensor:
        return model_input(images_u8, self.mean, self.std, device=self.device, size=self.size,
                           channels_last=self.channels_last)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


class ClassificationTask(Task):
    """A classifier on the views' soft targets (the teacher): loss = soft-target cross-entropy; val = accuracy."""

    eval_keys = ("n", "correct")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.criterion = SoftTargetCrossEntropy()

    def forward(self, model, batch: dict) -> dict:
        x = self.inputs(batch["image"])
        target = batch["target"].to(self.device, non_blocking=True)
        with self.autocast():
            loss = self.criterion(model(x), target)
        return {"loss": loss, "parts": {}}

    def eval_sums(self, model, batch: dict, agreement: bool = True) -> dict:
        with self.autocast():
            pred = model(self.inputs(batch["image"])).argmax(-1).cpu()
        return {"n": len(pred), "correct": int((pred == batch["label"]).sum())}

    @staticmethod
    def eval_metrics(s: dict) -> dict:
        return {"val_acc": s["correct"] / max(1, s["n"])}


class ValTeacher:
    """Teacher argmax on the (deterministic) val views, computed once and kept by sample index."""

    def __init__(self, runner):
        self.runner = runner
        self.argmax: dict[int, int] = {}

    def __call__(self, batch: dict) -> torch.Tensor:
        index = batch["index"].tolist()
        todo = [k for k, i in enumerate(index) if i not in self.argmax]
        if todo:
            logits = self.runner(batch["image"][todo])
            for k, a in zip(todo, logits.argmax(-1).tolist()):
                self.argmax[index[k]] = int(a)
        return torch.tensor([self.argmax[i] for i in index], dtype=torch.int64)


class DistillationTask(Task):
    """The DeiT student: class head on the views' targets, distillation head on the teacher's (docs/design.md, section 7).

    ``source``: "cache" (targets arrive with the batch, read by the loader), "online" (``teacher`` runs on the
    batch; its logits go through the cache's own :func:`teacher_targets`) or None (``distill.mode=none``).
    Validation: both heads, their average (DeiT's rule) and, with ``val_teacher``, agreement with the teacher.
    """

    eval_keys = ("n", "loss", "correct_cls", "correct_dist", "correct_avg", "agree_teacher")

    def __init__(self, criterion, mean, std, device, *, bf16: bool = False, source: str | None = None,
                 teacher=None, topk: int = 0, val_teacher: ValTeacher | None = None):
        super().__init__(mean, std, device, bf16=bf16)
        self.criterion, self.source, self.teacher, self.topk = criterion, source, teacher, int(topk)
        self.val_teacher = val_teacher

    def targets(self, batch: dict) -> TeacherTargets | None:
        if self.source == "online":
            return teacher_targets(self.teacher(batch["image"]), self.topk)
        return TeacherTargets.from_batch(batch) if self.source == "cache" else None

    def forward(self, model, batch: dict) -> dict:
        x = self.inputs(batch["image"])
        target = batch["target"].to(self.device, non_blocking=True)
        t = self.targets(batch)
        with self.autocast():
            loss, parts = self.criterion(model(x), target, t)
        return {"loss": loss, "parts": parts, "teacher": t}

    def eval_sums(self, model, batch: dict, agreement: bool = True) -> dict:
        label = batch["label"].to(self.device)
        with self.autocast():
            c, d = heads(model, self.inputs(batch["image"]))
        c, d = c.float(), d.float()
        avg = (c + d) / 2
        pred = avg.argmax(-1)
        agree = 0
        if agreement and self.val_teacher is not None:
            agree = int((pred.cpu() == self.val_teacher(batch)).sum())
        return {"n": len(label), "loss": float(F.cross_entropy(avg, label, reduction="sum")),
                "correct_cls": int((c.argmax(-1) == label).sum()), "correct_dist": int((d.argmax(-1) == label).sum()),
                "correct_avg": int((pred == label).sum()), "agree_teacher": agree}

    def eval_metrics(self, s: dict) -> dict:
        n = max(1, s["n"])
        out = {"val_loss": s["loss"] / n, "val_acc": s["correct_avg"] / n, "val_acc_cls": s["correct_cls"] / n,
               "val_acc_dist": s["correct_dist"] / n}
        if self.val_teacher is not None:
            out["val_agree_teacher"] = s["agree_teacher"] / n
        return out
