"""Stage two's side of the cache: the start-up checks of a store for a run, and the loader hook that attaches
cached rows to replayed views.

- :func:`open_cache`: no writer may hold the store's lease (stage one running: CacheError naming it); provenance
  (data fingerprint, augmentation, run seed, class count) must match the config (ProvenanceMismatch names the
  field and both values; every augmentation key that differs), the shard layout must match the manifest and the
  mode's fields must be stored. Library-version differences come back as warnings; the store's pixel fingerprint
  must render the same here (:func:`check_pixels`).
- :func:`check_units_done`: every unit the schedule reads must be committed.
- :class:`CacheTargets`: the loader's ``extras`` hook. Picklable; opens the store lazily once per process
  (DataLoader worker); one batched read of chunk (s, shard) per field per unit, ``digest`` always included so
  the loader checks every sample against its replayed view. Every unit read is verified: its commit marker, the
  crc32c codec of each chunk, the unit's checksum record (tagged with this unit of this store: a unit copied over
  another or in from another teacher's store fails) and its checksums of the mode's fields (a mismatch is a
  CacheError naming the store, seed index, shard and field). The digest is checked view by view against the
  replay instead (DigestMismatch naming the key), which is stronger than its checksum. The hook records the
  store id when it is made and re-checks it after every unit it reads: a store rebuilt (``overwrite=true``) or
  removed under a running student stops it with a CacheError naming the store, before it trains on another
  build's targets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from pipeline.cache import lease
from pipeline.cache.provenance import check_augment, expected_provenance
from pipeline.cache.store import CacheStore, store_id_on_disk
from pipeline.cache.targets import MODE_FIELDS
from pipeline.errors import CacheError, ScheduleError
from pipeline.replay import fingerprint



def open_cache(path, *, manifest: Manifest, aug: AugmentConfig, run_seed: int,
               mode: str) -> tuple[CacheStore, list[str]]:
    """Open and check the store for a run in ``mode``; returns (store, library-version warnings)."""
    lease.refuse_if_written(path, "train_student")
    store = CacheStore.open(path, "r")
    check_augment(store.path, store.provenance.get("augment"), aug)  # names the keys; the hash check, only that
    warnings = store.check_compatible(expected_provenance(manifest, aug, run_seed)) + check_pixels(store)
    if store.shard_size != manifest.shard_size or store.shard_counts != [s.count for s in manifest.shards]:
        raise CacheError(f"{store.path}: shard layout (shard_size {store.shard_size}, {store.num_shards} shards) "
                         f"differs from the train manifest (shard_size {manifest.shard_size}, "
                         f"{manifest.num_shards} shards)")
    require_store_fields(store, mode)
    return store, warnings


def require_store_fields(store: CacheStore, mode: str, what: str = "distill.mode") -> None:
    """Refuse a store that lacks the fields ``mode`` reads (a soft loss on a hard-labels-only store)."""
    missing = [f for f in MODE_FIELDS[mode] if f not in store.fields]
    if missing:
        raise CacheError(f"{store.path}: {what}={mode} needs {'/'.join(missing)}, but the store holds "
                         f"{list(store.fields)} (built with cache.topk={store.topk}"
                         f"{': hard labels only' if store.topk == 0 else ''}); rebuild with cache.topk > 0")


def check_pixels(store: CacheStore) -> list[str]:
    """Re-render the store's pixel fingerprint here (PixelMismatch names the first differing view and the library
    versions on both sides). A store built before fingerprints were recorded is read, with a warning."""
    recorded = store.provenance.get("pixels")
    if recorded is None:
        return [f"{store.path}: no pixel fingerprint recorded (built before stores kept one): the pixels this run "
                f"replays are not checked against stage one's; rebuild (overwrite=true) to record it"]
    fingerprint.check(recorded, str(store.path))
    return []


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
    """``extras(seed_index, shard) -> {field: rows}`` for :class:`pipeline.loader.ViewLoader`.

    ``store_id``: the id of the store this run checked (``open_cache``'s store); default: the id on disk now.
    """

    def __init__(self, path, fields: Sequence[str], store_id: str | None = None):
        self.path = str(path)
        self.fields = tuple(dict.fromkeys([*fields, "digest"]))
        self.store_id = store_id or store_id_on_disk(self.path)
        if self.store_id is None:
            raise CacheError(f"{self.path}: no cache store here (no store id): build it with python -m "
                             f"pipeline.teacher_cache")
        self._store: CacheStore | None = None
        self._pid: int | None = None

    def store(self) -> CacheStore:
        if self._store is None or self._pid != os.getpid():
            store = CacheStore.open(self.path, "r")
            self._check_same(store.store_id)
            self._store, self._pid = store, os.getpid()
        return self._store

    def __call__(self, seed_index: int, shard: int) -> dict:
        verify = tuple(f for f in self.fields if f != "digest")  # the digest: checked per view by the loader
        try:
            rows = self.store().read_unit(int(seed_index), int(shard), self.fields, verify=verify)
        except CacheError:
            self._check_same()  # a store replaced mid-read: say so, not "damaged"
            raise
        self._check_same()  # after the read: rows read while the store was being replaced are never used
        return rows

    def _check_same(self, current: str | None = None) -> None:
        current = current or store_id_on_disk(self.path)
        if current != self.store_id:
            now = f"now {current}" if current else "now gone"
            raise CacheError(f"{self.path}: the cache store was replaced or removed since this run opened it (store "
                             f"id {self.store_id}, {now}): stopping rather than training on another build's "
                             f"targets; start the run again on the new store (train.resume=never if its teacher "
                             f"changed)")

    def __getstate__(self):
        return {"path": self.path, "fields": self.fields, "store_id": self.store_id}

    def __setstate__(self, state):
        self.path, self.fields, self.store_id = state["path"], tuple(state["fields"]), state["store_id"]
        self._store = self._pid = None

    def __repr__(self):
        return f"CacheTargets({self.path!r}, {list(self.fields)})"
