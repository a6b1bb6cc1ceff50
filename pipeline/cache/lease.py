"""One writer per cache store: an exclusive lease on ``<store>.lease``, a file beside the store (docs/design.md, 6).

- A writer (stage one: :meth:`pipeline.cache.store.CacheStore.create`, for creation, resume and overwrite alike)
  takes an exclusive ``flock`` on the lease file and writes a record into it: host, pid, start time, store, the
  torchrun job id. It holds the lock for its run; the kernel drops it when the process ends, however it ends
  (kill -9 included). A second writer is refused with a :class:`CacheError` naming the holder.
- A stale lease (the record of a process that is gone: its lock was released with it) is taken over, with a
  warning naming the old holder. A clean release empties the record.
- The file lives *beside* the store, never inside: ``overwrite=true`` removes the store directory, and a lock file
  removed with it would let a second writer lock a new file while the first still holds the old one.
- The ranks of one torchrun job share (global) rank 0's lease (only rank 0 creates the store; the others open it
  with mode "r+" after a barrier and are covered by it). A covered rank is handed rank 0's record (:func:`cover`)
  and, before each commit, :func:`check_writer` probes that this record still holds the lock: ranks on another
  node can outlive a lost rank 0 until their next collective (torchrun stops the ranks of the failed node), and
  must not commit into a store whose lease was released or taken over. Across nodes the lock must be
  cluster-wide: the store lives on a shared filesystem whose ``flock`` every node sees (NFS without
  ``local_lock=flock``/``all``, CephFS, Lustre mounted with ``-o flock``, not ``localflock``); a node-local lock
  would let two jobs on two nodes both write.
- Readers (stage two, ``verify_cache``) :func:`probe` the lease with a shared, non-blocking lock that they drop at
  once: a live writer is named and the reader refuses. A writer that meets a lock without a record (a reader's
  probe, or another writer between its lock and its record) retries for a moment.
- Within one process the lease is re-entrant (one per lease file): repeated ``create`` calls of one process (tests,
  a build followed by its own verification) share it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import storage
from pipeline.cache import held_leases, object_lease
from pipeline.errors import CacheError, ConfigError

log = logging.getLogger("pipeline")

SUFFIX = ".lease"
RETRY_SECONDS = 2.0  # how long a writer retries a lock held without a record (a reader's momentary probe)
_COVERED: dict[str, dict] = {}  # leases of other processes (rank 0) this process writes under


def lease_path(store) -> Path:
    store = storage.as_path(store)  # a Path, or an ObjectPath for s3://... (pipeline.cache.object_lease)
    if isinstance(store, storage.WebPath):  # every stage takes or probes the lease first: refused here, by name
        raise ConfigError(f"{store}: http(s):// and hf:// are read-only locations for published shards and cache "
                          f"stores: build a cache store in a local folder or on s3:// (python -m pipeline.push_cache "
                          f"publishes a finished one)")
    return store.parent / f"{store.name}{SUFFIX}"


@dataclass
class Lease:
    store: Path
    path: Path
    fd: int
    record: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise unless this process still holds the lease file that is at ``path`` (not removed or replaced)."""
        try:
            same = os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except OSError:
            same = False
        if self.fd < 0 or not same:
            raise CacheError(f"{self.store}: this writer's lease {self.path} was removed or replaced while it ran: "
                             f"another writer may own the store now; not committing")

    def release(self) -> None:
        """Empty the record and drop the lock (idempotent)."""
        if self.fd < 0:
            return
        held_leases.drop(self.path)
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.ftruncate(self.fd, 0)
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = -1


def describe(record: dict) -> str:
    if not record.get("pid"):
        return "a process that left no record (a reader probing it, or a writer starting)"
    job = f", torchrun job {record['job']}" if record.get("job") else ""
    return f"pid {record['pid']} on host {record.get('host')}, started {record.get('started')}{job}"


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def held(store) -> Lease | None:
    """This process's lease on ``store``, if it holds one."""
    return held_leases.get(lease_path(store))


def acquire(store) -> Lease:
    """Take the writer lease of ``store`` for this process (re-entrant); CacheError naming the holder if it is live."""
    store = storage.as_path(store)
    path = lease_path(store)
    mine = held_leases.get(path)
    if mine is not None and mine.fd >= 0:
        mine.check()
        return mine
    if storage.is_url(store):  # no flock on object storage: conditional puts and an expiry instead
        return held_leases.put(path, object_lease.acquire(store, path, describe))
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        fd = _open(store, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            if holder.get("pid") or time.monotonic() > deadline:
                raise CacheError(f"{store}: another writer holds its lease {path}: {describe(holder)}; wait for it "
                                 f"to finish or stop it (the lease of a process that has exited is taken over "
                                 f"automatically)") from None
            time.sleep(0.05)
            continue
        except OSError as e:
            os.close(fd)
            raise CacheError(f"{store}: cannot lock its lease {path}: {e} (a filesystem without file locks "
                             f"cannot host a cache store)") from e
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed or replaced between open and lock: lock the one that is there now
    previous = _read(fd)
    if previous.get("pid"):
        log.warning(f"{store}: taking over the stale writer lease {path} of {describe(previous)} (that process has "
                    f"exited: its lock was released)")
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "store": str(store), "job": os.environ.get("TORCHELASTIC_RUN_ID")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
    except OSError as e:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise CacheError(f"{store}: cannot write its lease {path}: {e}") from e
    return held_leases.put(path, Lease(store, path, fd, record))


def _open(store: Path, path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise CacheError(f"{store}: cannot take the writer lease {path}: {e}") from e


def cover(store, record: dict) -> None:
    """This process writes ``store`` under another process's lease (rank 0 of its torchrun job): ``record``."""
    _COVERED[held_leases.key(lease_path(store))] = dict(record)


def check_writer(store) -> None:
    """Before a commit: this process's own lease is intact, or the lease covering it is still held by its holder."""
    mine = held(store)
    if mine is not None:
        mine.check()
        return
    record = _COVERED.get(held_leases.key(lease_path(store)))
    if record is None:
        return
    now = probe(store)
    if now is None or any(now.get(f) != record.get(f) for f in ("host", "pid", "started")):
        now_desc = describe(now) if now is not None else "no live writer"
        raise CacheError(f"{store}: the writer lease {lease_path(store)} covering this rank ({describe(record)}) is "
                         f"no longer held by it ({now_desc}): rank 0 of this job is gone; not committing")


def release(store) -> None:
    """Release this process's lease on ``store`` (no-op when it holds none), or stop writing under rank 0's."""
    _COVERED.pop(held_leases.key(lease_path(store)), None)
    lease = held(store)
    if lease is not None:
        lease.release()


def probe(store) -> dict | None:
    """The record of a live writer of ``store`` other than this process, else None. Takes a shared lock for an
    instant (never blocks); works on a read-only filesystem."""
    if isinstance(storage.as_path(store), storage.WebPath):
        return None  # a published store: read-only, no writer and no lease file (it was complete when pushed)
    path = lease_path(store)
    if held(store) is not None:
        return None
    if storage.is_url(path):
        return object_lease.probe(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lease file: no writer ever held one here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd)
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF):
            return None
        raise
    finally:
        os.close(fd)  # closing drops the shared lock we may have taken
    return None


def refuse_if_written(store, what: str) -> None:
    """CacheError naming the writer when a live writer holds the lease of ``store``."""
    holder = probe(store)
    if holder is not None:
        raise CacheError(f"{store}: stage one is writing this store (its lease {lease_path(store)} is held by "
                         f"{describe(holder)}): {what} reads only a store no writer holds; wait for it to finish")
