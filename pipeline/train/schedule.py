"""The seed schedule of stage two: which cached seed index (or indices) each epoch reads.

Epoch e reads seed index ``e mod S`` by default, or ``explicit[e]``. A schedule that needs more seeds than cached
(more epochs than S, so views would repeat, or an explicit seed index >= S) is refused unless
``cache.cycle=true``: repeating views must be a visible choice.

Repeated augmentation (``train.repeats = r > 1``): the schedule is read in slots, r per epoch, and epoch e reads
the r seed indices of slots e*r ... e*r + r - 1 (default ``t mod S`` for slot t, or ``explicit[t]``), with the
same refusals and cycling over the e*r + r slots. The r seed indices of an epoch must be distinct (a sample's r
views in one epoch are different views), so r > S is refused even with ``cache.cycle=true``.

DeiT's layout (``train.repeat_mode=ranks``, pipeline.replay.deal): epochs come in blocks of r that share the r
seed indices of one block of slots (block t = e // r reads slots t*r ... t*r + r - 1; each epoch of the block
draws other images), so fresh views need S = r * ceil(epochs / r) seeds, about one per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.errors import ScheduleError


def seed_schedule(epoch: int, num_seeds: int, explicit: Sequence[int] | None = None) -> int:
    """Seed index read in ``epoch`` (a slot, with repeats): ``explicit[epoch]`` (the list repeats if shorter),
    else ``epoch mod S``."""
    if explicit:
        return int(explicit[epoch % len(explicit)])
    return int(epoch) % int(num_seeds)


def plan_schedule(epochs: int, num_seeds: int, explicit: Sequence[int] | None = None, cycle: bool = False,
                  what: str = "the cache", repeats: int = 1, repeat_mode: str = "local") -> list:
    """Seed index of every epoch (``repeats`` = 1), or the list of its r seed indices (``repeats`` = r > 1),
    checked against ``num_seeds`` cached seeds (see module doc).

    With ``cycle``, an explicit seed index >= S wraps to ``s mod S`` (the views of that seed are re-used).
    """
    epochs, num_seeds, r = int(epochs), int(num_seeds), int(repeats)
    if num_seeds < 1:
        raise ScheduleError(f"{what} holds {num_seeds} seeds")
    if r < 1:
        raise ScheduleError(f"train.repeats={r} must be >= 1")
    if r > num_seeds:
        raise ScheduleError(f"train.repeats={r} needs {r} distinct seed indices per epoch but {what} holds "
                            f"S={num_seeds} (cache.num_seeds); build at least {r} seeds or lower train.repeats")
    explicit = [int(s) for s in explicit] if explicit else None
    if explicit and any(s < 0 for s in explicit):
        raise ScheduleError(f"train.seed_schedule={explicit}: seed indices must be >= 0")
    ranks = repeat_mode == "ranks" and r > 1
    slots = (-(-epochs // r) if ranks else epochs) * r
    plan = [seed_schedule(t, num_seeds, explicit) for t in range(slots)]
    hint = "set cache.cycle=true to re-use cached views, or build more seeds (cache.num_seeds)"
    if explicit is None and slots > num_seeds:
        if not cycle:
            if ranks:
                raise ScheduleError(
                    f"{epochs} epochs with train.repeats={r}, train.repeat_mode=ranks need {slots} seed indices "
                    f"but {what} holds S={num_seeds} (cache.num_seeds): epochs {r}t ... {r}t+{r - 1} read seeds "
                    f"{r}t ... {r}t+{r - 1} mod {num_seeds}, so views would repeat from epoch "
                    f"{num_seeds // r * r}; {hint}")
            if r == 1:
                raise ScheduleError(
                    f"{epochs} epochs need {epochs} seed indices but {what} holds S={num_seeds}: epochs >= "
                    f"{num_seeds} would repeat views (epoch e reads seed e mod {num_seeds}); {hint}")
            raise ScheduleError(
                f"{epochs} epochs x train.repeats={r} need {slots} seed indices but {what} holds S={num_seeds} "
                f"(cache.num_seeds): epoch e reads seeds e*{r} ... e*{r}+{r - 1} mod {num_seeds}, so views would "
                f"repeat from epoch {num_seeds // r}; {hint}")
    too_big = sorted({s for s in plan if s >= num_seeds})
    if too_big:
        if not cycle:
            raise ScheduleError(f"train.seed_schedule={explicit} reads seed indices {too_big} but {what} holds "
                                f"only S={num_seeds} (0..{num_seeds - 1}); {hint}")
        plan = [s % num_seeds for s in plan]
    if r == 1:
        return plan
    epochs_plan = [plan[(e // r if ranks else e) * r:((e // r if ranks else e) + 1) * r] for e in range(epochs)]
    for e, seeds in enumerate(epochs_plan):
        if len(set(seeds)) < r:
            raise ScheduleError(f"train.seed_schedule={explicit} with train.repeats={r}: epoch {e} would read seed "
                                f"indices {list(seeds)}; an epoch's {r} seed indices must be distinct (each is one "
                                f"view of every sample)")
    return epochs_plan
