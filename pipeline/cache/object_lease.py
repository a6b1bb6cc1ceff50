"""The writer lease of a cache store on object storage: ``<store>.lease``, an object beside the store's prefix.

Object stores have no locks and no renames; the lease is built from conditional puts (docs/design.md, section 6):

- take: ``put(mode="create")`` (S3 ``If-None-Match: *``): exactly one of several racing writers creates the object.
  An existing lease is taken over only with ``put(mode={"e_tag": ...})`` (S3 ``If-Match``) on the exact version
  read, and only when it is free: released (empty record), expired (``expires`` passed: its holder stopped
  renewing), or held by a process of *this* host that no longer exists (kill -9: taken over at once, as the
  kernel's flock does locally). Otherwise a second writer is refused, naming the holder.
- hold: a daemon thread renews ``expires`` every ``ttl/4`` with If-Match on the version it last wrote; a failed
  renewal (412: someone replaced it) marks the lease lost. Before each commit :meth:`ObjectLease.check` requires
  the lease not lost and at least ``ttl/2`` of validity left (a commit's puts must land well before another
  writer may take it over; clocks across hosts must agree to better than that margin).
- release: If-Match put of an empty record (never an unconditional delete).

``PIPELINE_LEASE_TTL`` (seconds, default 60) sets the validity.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from pipeline import storage_faults
from pipeline.cache import held_leases
from pipeline.errors import CacheError

log = logging.getLogger("pipeline")


def ttl() -> float:
    return float(os.environ.get("PIPELINE_LEASE_TTL", "60"))


def _get(path) -> tuple[dict, str | None]:
    """(record, e_tag) of the lease object; ({}, None) when it does not exist."""
    import obstore
    from obstore.exceptions import NotFoundError

    try:
        r = obstore.get(path.store, path.key)
        raw = r.bytes().to_bytes()
        etag = r.meta.get("e_tag")
    except (NotFoundError, FileNotFoundError):
        return {}, None
    except Exception as e:  # noqa: BLE001
        raise CacheError(f"cannot read the writer lease: {storage_faults.translate(e, str(path))}") from None
    try:
        return (json.loads(raw) if raw.strip() else {}), etag
    except ValueError:
        return {}, etag


def _alive(record: dict) -> bool:
    """A holder that still counts: a pid, not expired, and (on this host) a process that exists."""
    if not record.get("pid") or time.time() > float(record.get("expires", 0)):
        return False
    if record.get("host") == socket.gethostname():
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def _put(path, record: dict, etag: str | None) -> str | None:
    """Conditional put: create (etag None) or replace exactly version ``etag``. The new e_tag, or None if the
    condition failed (someone else got there first)."""
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    try:
        r = obstore.put(path.store, path.key, (json.dumps(record) + "\n").encode(),
                        mode="create" if etag is None else {"e_tag": etag})
        return r["e_tag"]
    except (AlreadyExistsError, PreconditionError):
        return None
    except Exception as e:  # noqa: BLE001
        raise CacheError(f"cannot write the writer lease: {storage_faults.translate(e, str(path))}") from None


class ObjectLease:
    """This process's lease on an object-storage store (see the module docstring)."""

    fd = 0  # lease.acquire's re-entrancy test (a local lease's file descriptor)

    def __init__(self, store, path, record: dict, etag: str):
        self.store, self.path, self.record, self.etag = store, path, record, etag
        self.lost: str | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="lease-renew")
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(ttl() / 4):
            with self._mutex:
                if self.lost or self.fd < 0:
                    return
                record = dict(self.record, expires=time.time() + ttl())
                try:
                    etag = _put(self.path, record, self.etag)
                except CacheError as e:  # a transient failure: retried next round; check() sees the expiry
                    log.warning(f"{self.store}: cannot renew the writer lease: {e}")
                    continue
                if etag is None:
                    self.lost = "it was replaced by another writer"
                    return
                self.record, self.etag = record, etag

    def check(self) -> None:
        left = float(self.record.get("expires", 0)) - time.time()
        if self.fd < 0 or self.lost or left < ttl() / 2:
            why = self.lost or ("released" if self.fd < 0 else f"not renewed in time ({left:.1f} s of validity left)")
            raise CacheError(f"{self.store}: this writer's lease {self.path} was lost ({why}): another writer may own "
                             f"the store now; not committing")

    def release(self) -> None:
        if self.fd < 0:
            return
        self._stop.set()
        with self._mutex:
            self.fd = -1
            held_leases.drop(self.path)
            if not self.lost:
                _put(self.path, {}, self.etag)  # a clean release empties the record, only if still ours


def acquire(store, path, describe) -> ObjectLease:
    """Take the lease of ``store`` at ``path`` (an ObjectPath) or raise CacheError naming the live holder."""
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "store": str(store), "job": os.environ.get("TORCHELASTIC_RUN_ID")}
    for _ in range(20):
        previous, etag = _get(path)
        if etag is not None and _alive(previous):
            raise CacheError(f"{store}: another writer holds its lease {path}: {describe(previous)}; wait for it to "
                             f"finish or stop it (a lease its holder stops renewing expires after "
                             f"{ttl():.0f} s, PIPELINE_LEASE_TTL)")
        record["expires"] = time.time() + ttl()
        new = _put(path, record, etag)
        if new is not None:
            if previous.get("pid"):
                log.warning(f"{store}: taking over the stale writer lease {path} of {describe(previous)} (expired, "
                            f"or its process has exited)")
            return ObjectLease(store, path, record, new)
        time.sleep(0.05)  # another writer changed it between our read and our put: look again
    raise CacheError(f"{store}: cannot take its writer lease {path}: it keeps changing under us")


def probe(path) -> dict | None:
    """The record of a live writer (another process), else None."""
    record, etag = _get(path)
    if etag is None or not _alive(record) or (record.get("host") == socket.gethostname()
                                              and int(record.get("pid", -1)) == os.getpid()):
        return None
    return record
