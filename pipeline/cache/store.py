"""The teacher-target cache: one Zarr v3 store per (dataset, teacher, augmentation, run seed) (docs/design.md, section 6).

The arrays, chunks and codecs are pipeline.cache.layout; provenance records and their comparison
pipeline.cache.provenance; the targets kept per view pipeline.cache.targets; the writer lease
pipeline.cache.lease; the integrity checks (checksums, invariants) and the repair pipeline.cache.integrity.

Format version 4 (the only one read or written; pipeline.cache.layout): units packed per file by shard, tagged
checksum records, the crc32c codec and a store id. Older stores are refused by name: rebuild with overwrite=true.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr

from pipeline import storage
from pipeline.cache import integrity, lease
from pipeline.cache.contract import FORMAT, FORMAT_VERSION
from pipeline.cache.layout import (PER_VIEW, UNIT_TAG, ZARR_CONFIG, array_specs, check_layout_args, crc32c,
                                   file_coords, index_dtype, unit_tag)
from pipeline.cache.provenance import (MISSING, VERSION_LIBS, canonical, check_consistent, first_difference,
                                       library_versions, lookup, store_key, without)
from pipeline.cache.targets import stored_arrays
from pipeline.errors import CacheError, ProvenanceMismatch, StorageError
from pipeline.replay.contract import CONTRACT_VERSION

_FP16_MAX = float(np.finfo(np.float16).max)
REBUILD = "rebuild with overwrite=true, or set another cache.path"  # how a writer refused by provenance goes on
log = logging.getLogger("pipeline")


class CacheStore:
    """A teacher-target cache in a folder or on s3://, or published at an http(s):// or hf:// URL (read-only: mode
    "r"). Picklable (reopens by path), e.g. for DataLoader workers.

    Writers: one process creates or resumes the store (:meth:`create`, which takes the writer lease, held until
    :meth:`release_lease` or the process ends); the ranks of its job then open it with mode "r+" (covered by that
    lease) and each :meth:`write_unit` its own units. Every commit re-checks the store id, so a writer never
    commits into a store that was replaced under it.
    """

    def __init__(self, path, mode: str, attrs: dict, arrays: dict):
        self.path = storage.as_path(path)
        self.mode = mode
        self._attrs = attrs
        self._arrays = arrays
        lay = attrs["layout"]
        self.layout: dict = lay
        self.provenance: dict = attrs["provenance"]
        self.num_seeds: int = lay["num_seeds"]
        self.shard_size: int = lay["shard_size"]
        self.shard_counts: list[int] = list(lay["shard_counts"])
        self.num_shards: int = len(self.shard_counts)
        self.num_samples: int = lay["N"]
        self.num_classes: int = lay["num_classes"]
        self.topk: int = lay["topk"]
        self.store_logits: bool = lay["store_logits"]
        self.index_dtype = np.dtype(lay["index_dtype"])
        self.format_version: int = attrs["format_version"]
        self.store_id: str | None = arrays["done"].attrs.get("store_id")
        self.checksum_fields: tuple[str, ...] = tuple(f for f in arrays["checksums"].attrs["checksum_fields"]
                                                      if f != UNIT_TAG)
        self.key: str = store_key(lay, self.provenance)  # what each unit's tag binds to (integrity.unit_tag)

    # ---------------------------------------------------------------- construction

    @classmethod
    def create(cls, path, *, provenance: dict, num_seeds: int, shard_counts: list[int], shard_size: int,
               num_classes: int, topk: int, store_logits: bool = False, overwrite: bool = False,
               ignore_fields: tuple[str, ...] = (), resume_check: str = "sample") -> CacheStore:
        """Create a store, or open an existing one with equal layout and provenance (resume).

        An existing store whose layout or provenance differs raises :class:`ProvenanceMismatch` naming the first
        differing field (dotted, e.g. ``augment.rand_magnitude``) and both values; nothing is touched.
        ``ignore_fields`` (dotted provenance names, e.g. ``"versions.timm"``) are left out of that comparison.
        ``overwrite=True`` removes an existing *cache store* (never another directory) and starts anew. Creation
        is atomic: the store is built beside ``path`` and renamed into place.

        First of all this process takes the store's writer lease (pipeline.cache.lease; a live writer elsewhere
        is a CacheError naming it, before anything is touched), and keeps it. Resuming integrity-checks the done
        units and clears the commit marker of damaged ones, which the caller then recomputes
        (:func:`pipeline.cache.integrity.repair`, which logs each unit): ``resume_check="sample"`` checks every
        done unit's checksum record, tag and files and the bytes of a sample, ``"full"`` every done unit's bytes.
        """
        path = storage.as_path(path)  # a local Path, or an s3://... ObjectPath (pipeline.storage)
        counts = check_layout_args(num_seeds, shard_counts, shard_size, num_classes, topk)
        layout = {"num_seeds": int(num_seeds), "shard_size": int(shard_size), "shard_counts": counts,
                  "N": sum(counts), "num_classes": int(num_classes), "topk": int(topk),
                  "store_logits": bool(store_logits), "index_dtype": index_dtype(int(num_classes)).name}
        try:
            # a store this code writes holds views of this code's contract, whatever else the caller records
            prov = canonical({"contract_version": CONTRACT_VERSION, **provenance})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: provenance is not JSON-serialisable: {e}") from None
        check_consistent(prov, layout)
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout, "provenance": prov}

        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise CacheError(f"{path}: exists and is not a directory (not a cache store)")
        lease.acquire(path)  # one writer per store, before any write: create, resume and overwrite alike
        if path.is_dir() and any(path.iterdir()) and not storage.partial_zarr(path):
            if overwrite:
                _cache_group(path, "r")  # raises unless it is a cache store (any version): never rmtree anything else
                storage.rmtree(path)
            else:
                return cls._resume(path, attrs, ignore_fields, resume_check)

        def build(target):
            group = zarr.open_group(store=target, mode="w-", zarr_format=3, attributes=attrs)
            for name, spec in array_specs(layout).items():
                group.create_array(name=name, config=ZARR_CONFIG, **spec)
            group["done"].attrs["store_id"] = uuid.uuid4().hex  # a new store: writers of a replaced one stop
        if storage.is_url(path):  # no rename on object storage: the group's zarr.json, uploaded last, commits it
            storage.publish_zarr(build, path)
            return cls.open(path, "r+", check_contract=False)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.creating"
        try:
            build(str(tmp))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CacheError(f"{path}: cannot create cache store: {e}") from e
        try:
            os.rename(tmp, path)  # atomic; fails if another creator won (path then non-empty)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if path.is_dir() and any(path.iterdir()):
                return cls._resume(path, attrs, ignore_fields, resume_check)
            raise CacheError(f"{path}: cannot create cache store: {e}") from e
        return cls.open(path, "r+", check_contract=False)

    @classmethod
    def _resume(cls, path: Path, attrs: dict, ignore_fields, resume_check: str = "sample") -> CacheStore:
        store = cls.open(path, "r+", check_contract=False)  # a contract change: named below
        have = {"layout": store.layout, "provenance": without(store.provenance, ignore_fields)}
        want = {"layout": attrs["layout"], "provenance": without(attrs["provenance"], ignore_fields)}
        for part in ("layout", "provenance"):
            diff = first_difference(have[part], want[part])
            if diff is not None:  # a writer's refusal: the store stays as it is, the fix is a new one
                raise ProvenanceMismatch(path, *diff, fix=REBUILD)
        if resume_check not in ("sample", "full"):
            raise ValueError(f"resume_check={resume_check!r}: 'sample' or 'full'")
        integrity.repair(store, full=resume_check == "full")
        return store

    @classmethod
    def open(cls, path, mode: str = "r", *, check_contract: bool = True) -> CacheStore:
        """Open an existing store; ``mode`` "r" (read-only) or "r+" (write units). A store built under another
        replay contract version is refused (its targets belong to other views) unless ``check_contract=False``."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = storage.as_path(path)
        group, attrs = _cache_group(path, mode)
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(f"{path}: cache format version {version}, this code reads and writes only version "
                             f"{FORMAT_VERSION} (units packed per file by shard, tagged checksum records): rebuild it "
                             f"with overwrite=true (python -m pipeline.teacher_cache overwrite=true)")
        # Stores from before the contract was versioned carry no field: they were built under version 1.
        contract = attrs["provenance"].get("contract_version", 1)
        if check_contract and contract != CONTRACT_VERSION:
            raise CacheError(f"{path}: built under replay contract version {contract}, this code renders views under "
                             f"version {CONTRACT_VERSION}: its targets belong to other views; rebuild it "
                             f"(overwrite=true)")
        names = list(array_specs(attrs["layout"]))
        arrays = {}
        for name in names:
            try:
                arrays[name] = group[name].with_config(ZARR_CONFIG)
            except (KeyError, FileNotFoundError) as e:
                raise CacheError(f"{path}: cache store is missing its array '{name}'") from e
        return cls(path, mode, attrs, arrays)

    def __getstate__(self):
        return {"path": str(self.path), "mode": self.mode}

    def __setstate__(self, state):
        other = type(self).open(state["path"], state["mode"])
        self.__dict__.update(other.__dict__)

    def __repr__(self):
        return (f"CacheStore({str(self.path)!r}, mode={self.mode!r}, S={self.num_seeds}, N={self.num_samples}, "
                f"shards={self.num_shards}, K={self.topk}, C={self.num_classes})")

    # ---------------------------------------------------------------- layout

    @property
    def fields(self) -> tuple[str, ...]:
        """Per-view arrays this store holds (standard ones; ``logits`` last when stored)."""
        return tuple(n for n in PER_VIEW + ("logits",) if n in self._arrays)

    def unit_rows(self, k: int) -> slice:
        """Global sample rows of shard ``k``."""
        self._check_unit(0, k)
        start = k * self.shard_size
        return slice(start, start + self.shard_counts[k])

    def _check_unit(self, s: int, k: int) -> None:
        if not (0 <= s < self.num_seeds and 0 <= k < self.num_shards):
            raise IndexError(f"{self.path}: unit (seed {s}, shard {k}) out of range: "
                             f"{self.num_seeds} seeds x {self.num_shards} shards")

    # ---------------------------------------------------------------- commit markers

    def done_mask(self) -> np.ndarray:
        """bool [S, num_shards], one batched read of ``done``. A marker chunk that fails its crc32c (or does not
        decode) reads as False, with a warning: that unit is pending, never wrongly committed."""
        try:
            return np.asarray(self._arrays["done"][...], dtype=bool)
        except Exception:  # noqa: BLE001 - a damaged marker chunk: read them one by one
            return np.array([[self.is_done(s, k) for k in range(self.num_shards)] for s in range(self.num_seeds)],
                            dtype=bool).reshape(self.num_seeds, self.num_shards)

    def is_done(self, s: int, k: int) -> bool:
        self._check_unit(s, k)
        try:
            return bool(self._arrays["done"][s, k])
        except Exception as e:  # noqa: BLE001 - crc32c mismatch (ValueError) or an undecodable chunk
            log.warning(f"warning: {self.path}: unit (seed {s}, shard {k}): its commit marker is damaged "
                        f"({type(e).__name__}: {e}); the unit counts as not done")
            return False

    def set_done(self, s: int, k: int, value: bool) -> None:
        """Set the commit marker of unit (s, k) (writers only; the store id is checked first)."""
        self._check_writable(s, k)
        self._arrays["done"][s, k] = bool(value)

    def pending_units(self) -> list[tuple[int, int]]:
        """Units (s, k) whose commit marker is false, in (s, k) order (one read of ``done``)."""
        s, k = np.nonzero(~self.done_mask())
        return [(int(a), int(b)) for a, b in zip(s, k)]

    # ---------------------------------------------------------------- write / read

    def targets_from_logits(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """What this store keeps for fp32 logits [B, C] (see :func:`pipeline.cache.targets.teacher_targets`)."""
        return stored_arrays(logits, self.topk, self.index_dtype, store_logits=self.store_logits)

    def write_unit(self, s: int, k: int, logits: np.ndarray, digest: np.ndarray) -> None:
        """Write unit (seed s, shard k), whose shard this process owns: chunk (s, k) of every array (rewriting the
        file that packs it), then set ``done[s, k]`` last.

        ``logits``: float32 [count_k, C] in the shard's sample order; ``digest``: uint32 [count_k].
        The marker is cleared first, so a rewrite that dies midway leaves the unit pending, never half-valid.
        """
        self._check_writable(s, k)
        rows = self.unit_rows(k)
        count = rows.stop - rows.start
        if hasattr(logits, "detach"):  # torch tensor
            logits = logits.detach().float().cpu().numpy()
        if hasattr(digest, "detach"):
            digest = digest.detach().cpu().numpy()
        x = np.asarray(logits, dtype=np.float32)
        if x.shape != (count, self.num_classes):
            raise ValueError(f"{self.path}: unit (seed {s}, shard {k}) needs logits of shape "
                             f"({count}, {self.num_classes}) (samples of the shard, classes), got {tuple(x.shape)}")
        d = np.asarray(digest)
        if d.shape != (count,):
            raise ValueError(f"{self.path}: unit (seed {s}, shard {k}) needs {count} digests, got shape {d.shape}")
        if d.dtype != np.uint32:
            if not np.issubdtype(d.dtype, np.integer) or (d.size and (d.min() < 0 or d.max() > 0xFFFFFFFF)):
                raise ValueError(f"{self.path}: digests must be unsigned 32-bit integers, got {d.dtype}")
            d = d.astype(np.uint32)
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise ValueError(f"{self.path}: unit (seed {s}, shard {k}): non-finite teacher logits "
                             f"(first at row {bad} of the shard)")
        if np.abs(x).max(initial=0.0) > _FP16_MAX:
            raise ValueError(f"{self.path}: unit (seed {s}, shard {k}): logits beyond the float16 range "
                             f"(|x| > {_FP16_MAX}) cannot be cached")
        out = self.targets_from_logits(x)
        out["digest"] = d
        out = {name: np.asarray(out[name], dtype=self._arrays[name].dtype) for name in self.fields}
        try:
            self.set_done(s, k, False)
            for name in self.fields:
                self._arrays[name][s, rows] = out[name]
            record = [crc32c(out[f]) for f in self.checksum_fields] + [unit_tag(self.key, s, k)]
            self._arrays["checksums"][s, k] = np.array(record, np.uint32)
            self.set_done(s, k, True)  # commit marker, last (set_done re-checks the store id and the lease first)
        except OSError as e:  # ENOSPC, EIO, EACCES, an outage...: the unit stays pending, a re-run recomputes it
            fix = "" if isinstance(e, StorageError) else ": free space or fix the store, then re-run to resume"
            raise CacheError(f"{self.path}: cannot write unit (seed {s}, shard {k}): {e}; the unit stays pending "
                             f"(not committed){fix}") from e

    def _check_writable(self, s: int, k: int) -> None:
        """Before each write of a unit: the store is open for writing, is the same store (store id) as when it was
        opened, and this process still holds its lease where it took one (or the lease covering it is still held)."""
        if self.mode == "r":
            raise CacheError(f"{self.path}: opened read-only; open with mode='r+' to write units")
        self._check_unit(s, k)
        current = self.current_store_id()
        if current != self.store_id:
            raise CacheError(f"{self.path}: the store was replaced or removed since this writer opened it (store id "
                             f"{self.store_id} is now {current}): not writing unit (seed {s}, shard {k}); another "
                             f"run rebuilt it (overwrite=true)")
        lease.check_writer(self.path)  # its own lease intact, or (other ranks) rank 0's still held by rank 0

    def current_store_id(self) -> str | None:
        """The store id on disk now (attribute ``store_id`` of ``done``; None when the store is gone)."""
        return store_id_on_disk(self.path)

    def release_lease(self) -> None:
        """Release this process's writer lease on the store (taken by :meth:`create`); no-op without one."""
        lease.release(self.path)

    def read_unit(self, s: int, k: int, fields=None, *, require_done: bool = True,
                  verify=True) -> dict[str, np.ndarray]:
        """Rows of shard k under seed s: one batched (one-chunk) read per array.

        ``fields``: names among :attr:`fields` (default: every standard per-view array present, not ``logits``).
        Raises :class:`CacheError` for a unit whose commit marker is false (unless ``require_done=False``).
        ``verify``: True (every field read), a collection of field names, or False: those fields' rows must match
        the unit's stored checksums, and the record's tag must be this unit's of this store (a unit copied over
        another or in from another store), else a CacheError names the store, seed index, shard and field (a
        chunk whose bytes changed on disk fails its crc32c codec: the same error). Uncommitted units are not
        verified.
        """
        self._check_unit(s, k)
        if fields is None:
            fields = tuple(n for n in PER_VIEW if n in self._arrays)
        unknown = [f for f in fields if f not in self.fields]
        if unknown:
            raise KeyError(f"{self.path}: no array {unknown} in this store (K={self.topk}, "
                           f"logits={'stored' if self.store_logits else 'not stored'}); it has {list(self.fields)}")
        if require_done and not self.is_done(s, k):
            raise CacheError(f"{self.path}: unit (seed {s}, shard {k}) is not done (its commit marker is false): "
                             f"finish or resume stage one before reading it")
        rows = self.unit_rows(k)
        out = {f: self._read(f, s, k, rows) for f in fields}
        check = fields if verify is True else tuple(verify or ())
        if check and (require_done or self.is_done(s, k)):  # uncommitted: nothing to verify
            integrity.verify_rows(self, s, k, {f: out[f] for f in check if f in out})
        return out

    def _read(self, name: str, s: int, k: int, rows: slice) -> np.ndarray:
        try:
            return self._arrays[name][s, rows]
        except Exception as e:  # noqa: BLE001 - crc32c mismatch (ValueError), undecodable chunk, unreadable file
            raise integrity.damaged(self, s, k, name, integrity.why(e)) from e

    # ---------------------------------------------------------------- provenance

    def field_value(self, field: str):
        """A provenance value by dotted name; falls back to the layout (num_classes, topk, N, ...)."""
        v = lookup(self.provenance, field)
        if v is MISSING:
            v = lookup(self.layout, field)
        return v

    def check_compatible(self, expected: dict,
                         fields=("data_fingerprint", "augment_hash", "run_seed", "num_classes")) -> list[str]:
        """Refuse a store built for another configuration; warn about library-version drift.

        ``expected`` maps each of ``fields`` (dotted names allowed) to the reader's value; the first differing
        field raises :class:`ProvenanceMismatch`. Returns warnings for libraries whose version differs between
        the store's ``provenance["versions"]`` and ``expected["versions"]`` (default: the installed versions).
        """
        for field in fields:
            want = lookup(expected, field)
            if want is MISSING:
                raise ValueError(f"check_compatible: expected value for '{field}' not given")
            have = self.field_value(field)
            diff = first_difference(canonical(have), canonical(want), field + ".")
            if diff is not None:
                raise ProvenanceMismatch(self.path, *diff)
        stored = self.provenance.get("versions") or {}
        current = expected.get("versions") or library_versions()
        warnings = []
        for lib in VERSION_LIBS:
            a, b = stored.get(lib, MISSING), current.get(lib, MISSING)
            if a != b:
                warnings.append(
                    f"{self.path}: {lib} version differs: cache built with {a}, running {b}; the store's pixel "
                    f"fingerprint still renders the same here (a store without one is not checked); "
                    f"`python -m pipeline.verify_cache cache.verify_fraction=0.05` re-checks the teacher on a sample")
        return warnings

    # ---------------------------------------------------------------- size

    def nbytes_stored(self, allocated: bool = False) -> int:
        """Bytes of the whole store on disk (file sizes; ``allocated=True``: filesystem blocks)."""
        return storage.tree_size(self.path, allocated)

    def unit_file(self, name: str, s: int, k: int) -> Path:
        """The file (object) of array ``name`` holding unit (s, k)'s chunk, among others of shard k (layout)."""
        arr = self._arrays[name]
        return self.path / name / arr.metadata.encode_chunk_key(file_coords(name, self.layout, s, k))

    def bytes_per_view(self, allocated: bool = False) -> dict[str, float]:
        """{"total", <array>...}: bytes of the files holding done units / views in done units (NaN if none); exact
        for a complete store (a file of a partly done shard counts whole).

        ``done`` and ``checksums`` are included; zarr.json metadata is not.
        """
        mask = self.done_mask()
        units = list(zip(*np.nonzero(mask)))
        views = sum(self.shard_counts[k] for _, k in units)
        out = {}
        for name in self.fields + ("done", "checksums"):
            b = 0
            for f in {self.unit_file(name, int(s), int(k)) for s, k in units}:
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                b += st.st_blocks * 512 if allocated else st.st_size
            out[name] = b / views if views else math.nan
        out["total"] = sum(out.values()) if views else math.nan
        return {"total": out.pop("total"), **out}


def _cache_group(path, mode: str):
    """(Zarr group, attributes) of the teacher cache store at ``path``, any format version; CacheError unless it is
    one."""
    target = storage.zarr_store(path, mode)  # http(s):// and hf://: mode "r" only, refused by name
    if not (storage.is_web(path) or path.is_dir()):  # no folders over HTTP: the group's zarr.json is the store
        raise CacheError(f"{path}: no cache store here (missing or not a directory)")
    if not (path / "zarr.json").is_file():  # a server that does not answer: a StorageError naming the URL
        raise CacheError(f"{path}: not a cache store (no zarr.json)" if path.is_dir() else
                         f"{path}: no cache store here (no {path}/zarr.json)")
    try:
        group = zarr.open_group(store=target, mode=mode, zarr_format=3)
        attrs = dict(group.attrs)
    except Exception as e:  # noqa: BLE001 - zarr raises many kinds for a broken store
        raise CacheError(f"{path}: not a readable Zarr v3 group: {type(e).__name__}: {e}") from e
    if attrs.get("format") != FORMAT or "layout" not in attrs or "provenance" not in attrs:
        raise CacheError(f"{path}: a Zarr group but not a teacher cache store (attribute format="
                         f"{attrs.get('format')!r}, expected {FORMAT!r})")
    return group, attrs


def store_id_on_disk(path) -> str | None:
    """The id of the store at ``path`` now (attribute ``store_id`` of ``done``; None when there is none): one small
    read, so writers check it before every commit and readers after every unit."""
    try:
        meta = json.loads((storage.as_path(path) / "done" / "zarr.json").read_text())
    except StorageError:
        raise  # an outage or a refusal, not a removed store
    except (OSError, ValueError):
        return None
    return (meta.get("attributes") or {}).get("store_id")
