"""Replay targets for stage two: which seed each epoch reads, and the cache rows attached to its views.

- :func:`seed_schedule` / :func:`plan_schedule`: epoch e reads seed index ``e mod S`` by default, or
  ``explicit[e]``. A schedule that needs more seeds than cached (more epochs than S, so views would repeat, or an
  explicit seed index >= S) is refused unless ``cache.cycle=true``: repeating views must be a visible choice.
- :func:`open_cache`: the start-up checks of a cache for this run: provenance (data fingerprint, augmentation
  hash, run seed, class count) must match the config (:class:`~pipeline.cache_store.ProvenanceMismatch` names
  the field and both values), the shard layout must match the manifest, the mode's fields must be stored and
  every unit the schedule reads must be done. Library-version differences come back as warnings.
- :class:`CacheTargets`: the loader's ``extras`` hook. Picklable; opens the store lazily once per process
  (DataLoader worker); one batched read of chunk (s, shard) per field per unit, ``digest`` always included so
  the loader checks every sample against its replayed view.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from pipeline.cache_store import CacheError, CacheStore
from pipeline.replay import AugmentConfig
from pipeline.shards import Manifest

MODE_FIELDS = {"none": (), "hard": ("argmax",), "soft": ("topk_values", "topk_indices", "logsumexp")}


class ScheduleError(ValueError):
    """The seed schedule needs seed indices that are not cached."""


def seed_schedule(epoch: int, num_seeds: int, explicit: Sequence[int] | None = None) -> int:
    """Seed index read in ``epoch``: ``explicit[epoch]`` (the list repeats if shorter), else ``epoch mod S``."""
    if explicit:
        return int(explicit[epoch % len(explicit)])
    return int(epoch) % int(num_seeds)


def plan_schedule(epochs: int, num_seeds: int, explicit: Sequence[int] | None = None, cycle: bool = False,
                  what: str = "the cache") -> list[int]:
    """Seed index of every epoch, checked against ``num_seeds`` cached seeds (see module doc).

    With ``cycle``, an explicit seed index >= S wraps to ``s mod S`` (the views of that seed are re-used).
    """
    epochs, num_seeds = int(epochs), int(num_seeds)
    if num_seeds < 1:
        raise ScheduleError(f"{what} holds {num_seeds} seeds")
    explicit = [int(s) for s in explicit] if explicit else None
    if explicit and any(s < 0 for s in explicit):
        raise ScheduleError(f"train.seed_schedule={explicit}: seed indices must be >= 0")
    plan = [seed_schedule(e, num_seeds, explicit) for e in range(epochs)]
    hint = "set cache.cycle=true to re-use cached views, or build more seeds (cache.num_seeds)"
    if explicit is None and epochs > num_seeds:
        if not cycle:
            raise ScheduleError(
                f"{epochs} epochs need {epochs} seed indices but {what} holds S={num_seeds}: epochs >= {num_seeds} "
                f"would repeat views (epoch e reads seed e mod {num_seeds}); {hint}")
    too_big = sorted({s for s in plan if s >= num_seeds})
    if too_big:
        if not cycle:
            raise ScheduleError(f"train.seed_schedule={explicit} reads seed indices {too_big} but {what} holds "
                                f"only S={num_seeds} (0..{num_seeds - 1}); {hint}")
        plan = [s % num_seeds for s in plan]
    return plan


def expected_provenance(manifest: Manifest, aug: AugmentConfig, run_seed: int) -> dict:
    """The provenance fields stage two checks, from its own config."""
    return {"data_fingerprint": manifest.fingerprint, "augment_hash": aug.hash(), "run_seed": int(run_seed),
            "num_classes": int(manifest.num_classes)}


def open_cache(path, *, manifest: Manifest, aug: AugmentConfig, run_seed: int,
               mode: str) -> tuple[CacheStore, list[str]]:
    """Open and check the store for a run in ``mode``; returns (store, library-version warnings)."""
    store = CacheStore.open(path, "r")
    warnings = store.check_compatible(expected_provenance(manifest, aug, run_seed))
    if store.shard_size != manifest.shard_size or store.shard_counts != [s.count for s in manifest.shards]:
        raise CacheError(f"{store.path}: shard layout (shard_size {store.shard_size}, {store.num_shards} shards) "
                         f"differs from the train manifest (shard_size {manifest.shard_size}, "
                         f"{manifest.num_shards} shards)")
    fields = MODE_FIELDS[mode]
    missing = [f for f in fields if f not in store.fields]
    if missing:
        raise CacheError(f"{store.path}: distill.mode={mode} needs {'/'.join(missing)}, but the store holds "
                         f"{list(store.fields)} (built with cache.topk={store.topk}"
                         f"{': hard labels only' if store.topk == 0 else ''}); rebuild with cache.topk > 0")
    return store, warnings


def check_units_done(store: CacheStore, seeds: Sequence[int]) -> None:
    """Every unit (s, k) of every scheduled seed s must be cached and committed (one read of ``done``)."""
    mask = store.done_mask()
    for s in sorted(set(seeds)):
        if s >= store.num_seeds:
            raise ScheduleError(f"{store.path}: seed index {s} is not cached (S={store.num_seeds})")
        pending = [k for k in range(store.num_shards) if not mask[s, k]]
        if pending:
            raise CacheError(f"{store.path}: unit (seed {s}, shard {pending[0]}) is not done ({len(pending)} "
                             f"shards of seed {s} pending): finish stage one (python -m pipeline.teacher_cache) "
                             f"before training")


class CacheTargets:
    """``extras(seed_index, shard) -> {field: rows}`` for :class:`pipeline.loader.ViewLoader`."""

    def __init__(self, path, fields: Sequence[str]):
        self.path = str(path)
        self.fields = tuple(dict.fromkeys([*fields, "digest"]))
        self._store: CacheStore | None = None
        self._pid: int | None = None

    def store(self) -> CacheStore:
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = CacheStore.open(self.path, "r"), os.getpid()
        return self._store

    def __call__(self, seed_index: int, shard: int) -> dict:
        return self.store().read_unit(int(seed_index), int(shard), self.fields)

    def __getstate__(self):
        return {"path": self.path, "fields": self.fields}

    def __setstate__(self, state):
        self.path, self.fields = state["path"], tuple(state["fields"])
        self._store = self._pid = None

    def __repr__(self):
        return f"CacheTargets({self.path!r}, {list(self.fields)})"
