"""DeiT's recipe card: every ingredient of DeiT's distillation recipe beside ours, as configured.

Each row holds DeiT's value and where it is written (facebookresearch/deit at commit 7e160fe, or the paper:
Touvron et al. 2021), reads ours from the composed config or from the code (pipeline.train.recipe_probes), and
says "same" or "differs" with the reason recorded here. A row that differs without a recorded reason is a drift
(e.g. someone set train.lr): the card says so and tests/test_recipe.py fails on the documented run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pipeline.train import recipe_probes as probe

DEIT = "facebookresearch/deit@7e160fe"
NO_REASON = "differs: no reason recorded (a drift from DeiT's recipe)"
DEIT_TEACHER_URL = "https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth"


@dataclass(frozen=True)
class Ingredient:
    name: str
    deit: str                          # DeiT's value, as the card shows it
    deit_value: Any                    # ...and as compared with ours
    source: str
    ours: Callable[["Run"], tuple[str, Any]]   # (shown, compared)
    reason: str | None = None          # why ours differs, where it is known to


@dataclass(frozen=True)
class Row:
    name: str
    deit: str
    source: str
    ours: str
    same: bool
    reason: str | None
    deit_value: Any
    ours_value: Any

    @property
    def verdict(self) -> str:
        if self.same:
            return "same"
        return f"differs: {self.reason}" if self.reason else NO_REASON


class Run:
    """The composed (checked, resolved) config and the world size it runs on; probes run once, on demand."""

    def __init__(self, cfg, world: int):
        self.cfg, self.world = cfg, int(world)
        self.tr = cfg.train

    @property
    def global_batch(self) -> int:
        return int(self.tr.batch_size) * self.world

    @cached_property
    def aug(self):
        from pipeline.replay.view_params import augment_config

        return augment_config(self.cfg)

    @cached_property
    def student(self):
        return probe.meta_student(self.cfg)

    @cached_property
    def optimizer(self) -> dict:
        return probe.optimizer(self.cfg, self.student)

    @cached_property
    def scheduler(self) -> dict:
        return probe.scheduler(self.cfg)

    @cached_property
    def mixing(self) -> dict:
        return probe.mixing(self.aug)


def world_size(cfg, env=os.environ) -> int:
    """Ranks of the run: NPROC (as stages/launch.sh reads it; else train.nproc, what dvc.yaml passes) x NNODES."""
    from pipeline.errors import ConfigError

    counts = []
    for name, value in (("NPROC", env.get("NPROC") or cfg.train.nproc), ("NNODES", env.get("NNODES") or 1)):
        try:
            counts.append(int(value))
        except ValueError:
            raise ConfigError(f"{name}={value}: not a whole number of processes") from None
    return counts[0] * counts[1]


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return a == b


def rows(run: Run, ingredients) -> list[Row]:
    """One row per ingredient (pipeline.train.recipe_ingredients.INGREDIENTS), ours read from ``run``."""
    out = []
    for ing in ingredients:
        shown, value = ing.ours(run)
        out.append(Row(ing.name, ing.deit, ing.source, shown, _same(value, ing.deit_value), ing.reason,
                       ing.deit_value, value))
    return out


def render(table: list[Row], run: Run) -> str:
    """The card as a markdown table, with a header line naming the run it describes."""
    lines = [f"DeiT's recipe ({DEIT}; paper: Touvron et al. 2021) vs this run: {run.world} rank(s) x batch "
             f"{run.tr.batch_size}, student {run.cfg.student.name}, teacher {run.cfg.teacher.name}, distill.mode="
             f"{run.cfg.distill.mode}. {sum(r.same for r in table)} of {len(table)} ingredients the same.", "",
             "| ingredient | DeiT | source | ours | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {_cell(r.deit)} | {_cell(r.source)} | {_cell(r.ours)} | {_cell(r.verdict)} |"
              for r in table]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def drifts(table: list[Row]) -> list[Row]:
    """Rows that differ from DeiT without a recorded reason."""
    return [r for r in table if not r.same and not r.reason]
