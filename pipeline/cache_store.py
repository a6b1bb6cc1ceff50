"""The teacher-target cache: one Zarr v3 store per (dataset, teacher, augmentation, run seed) (DESIGN.md s. 4).

Layout (S seeds, N samples, K top-k, C classes, n samples per shard)::

    topk_values   float16  [S, N, K]  teacher logits of the K largest classes, descending      (K > 0 only)
    topk_indices  int16    [S, N, K]  their class ids (int32 when C > 32767)                    (K > 0 only)
    logsumexp     float32  [S, N]     log softmax normaliser over all C classes (fp64 reduction) (K > 0 only)
    argmax        int16    [S, N]     teacher hard label, from the fp32 logits (int32 when C > 32767)
    digest        uint32   [S, N]     view digest (DESIGN.md s. 3)
    done          bool     [S, num_shards], chunks (1, 1): commit marker of unit (s, k), written last
    logits        float16  [S, N, C]  optional full logits (small class counts)

Every per-view array is chunked ``(1, n, ...)``: chunk ``(s, k)`` of every array belongs to exactly one work
unit (seed s, shard k), so ranks writing different units never touch the same file. ``K = 0`` ("hard-only")
stores only argmax + digest (+ done). Fill values are sentinels (NaN for floats, -1 for class ids, 0 for
digests) and ``write_empty_chunks`` is on, so an unfinished unit reads as obviously invalid and a finished
one always has its chunk files; ``done`` is the truth, and :meth:`CacheStore.read_unit` refuses units whose
marker is false.

Compression (measured, Blosc-zstd clevel 9 per array; bytes on disk per view, shard_size 1000, 8k views of
synthetic logits: 10 classes = N(0,1) plus a N(6,1.5) peak, 1000 classes = N(0,2) plus a N(8,2) peak;
chunk files only, zarr.json excluded)::

                          10 classes    1000 classes   codec
    topk_values (K=10)       17.3          11.8        blosc zstd9 byte-shuffle (bitshuffle: 17.7 / 12.6)
    topk_indices (K=10)       4.3          12.6        byte-shuffle if C <= 256 else bitshuffle
    logsumexp                 3.2           2.9        blosc zstd9 bitshuffle
    argmax                    0.5           1.3        byte-shuffle if C <= 256 else bitshuffle
    digest                    4.0           4.0        none (random 32 bits; any codec only adds a header)
    done                    0.001         0.001        none (1 byte per unit)
    total K=10 soft          29.3          32.6        goal <= 40 (TinyViT: 44)
    total hard-only           4.5           5.3        goal <= 8

Plain ZstdCodec (levels 3-19, no shuffle) was worse on every array; clevel 5 costs ~5% more bytes than 9
(clevel 9 encodes a 1000-view unit in ~6 ms: negligible beside the teacher). The table counts file sizes
(what object storage holds). A local filesystem allocates whole blocks (4 KiB on ext4) per chunk file: at
shard_size 1000 that is 45 B/view soft and 12.3 B/view hard-only *allocated* (each of argmax, digest, done,
logsumexp rounds up to 4 KiB per unit), amortised by larger shards; see ``bytes_per_view(allocated=True)``.
Zarr v3's sharding codec would pack many chunks per file (fewer objects at ImageNet scale: 1,250 shards x S
files per array), but it rewrites the whole shard file on every chunk write, so a Zarr shard must then hold
whole work units of a single writer; not used here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from importlib import metadata
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs as zc

FORMAT = "deit-teacher-cache"
FORMAT_VERSION = 1

PER_VIEW = ("topk_values", "topk_indices", "logsumexp", "argmax", "digest")  # standard fields, read order
ALL_ARRAYS = PER_VIEW + ("logits", "done")
_LAYOUT_ORDER = ("num_seeds", "shard_size", "shard_counts", "N", "num_classes", "topk", "store_logits",
                 "index_dtype")
_VERSION_LIBS = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "pillow": "pillow",
                 "numpy": "numpy", "zarr": "zarr"}
_FP16_MAX = float(np.finfo(np.float16).max)
_MISSING = "<missing>"
_ZARR_CONFIG = {"write_empty_chunks": True}


class CacheError(RuntimeError):
    """The cache store is missing, not a cache store, unwritable, incomplete or misused (message names the path)."""


class ProvenanceMismatch(CacheError):
    """A store's provenance differs from the configuration: names the field and both values."""

    def __init__(self, path, field: str, store_value, config_value):
        self.path, self.field, self.store_value, self.config_value = str(path), field, store_value, config_value
        super().__init__(f"{path}: provenance field '{field}' differs: store has {_fmt(store_value)}, "
                         f"config has {_fmt(config_value)}")


# --------------------------------------------------------------------------------------------------- helpers

def library_versions() -> dict:
    """Installed versions of the libraries that decide pixels and numerics (None where not installed)."""
    out = {}
    for key, dist in _VERSION_LIBS.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def soft_probs(topk_values, logsumexp) -> np.ndarray:
    """Teacher probabilities of the stored top-K classes, ``p_k = exp(v_k - lse)`` (float32, [..., K])."""
    v = np.asarray(topk_values, dtype=np.float32)
    lse = np.asarray(logsumexp, dtype=np.float32)
    return np.exp(v - lse[..., None])


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


def compute_targets(logits, topk: int, *, store_logits: bool = False) -> dict[str, np.ndarray]:
    """What the cache keeps for fp32 logits [B, C]: argmax, top-K (fp16, descending), logsumexp (fp32).

    argmax comes from the fp32 logits; logsumexp is reduced in float64. Top-K is ordered by value descending,
    ties by class id ascending (deterministic, and ``topk_indices[:, 0] == argmax``); note torch.topk breaks
    ties differently, which matters for bf16 teacher logits (ties are common there).
    """
    x = np.asarray(logits, dtype=np.float32)
    ids = index_dtype(x.shape[1])
    out = {"argmax": x.argmax(axis=1).astype(ids)}
    K, C = int(topk), x.shape[1]
    if K > 0:
        if K == C:
            cand = np.broadcast_to(np.arange(C), x.shape)
        else:  # the K largest; among values tied with the K-th largest, the smallest class ids
            kth = -np.partition(-x, K - 1, axis=1)[:, K - 1:K]
            gt, eq = x > kth, x == kth
            take = gt | (eq & (np.cumsum(eq, axis=1) <= K - gt.sum(axis=1, keepdims=True)))
            cand = np.nonzero(take)[1].reshape(len(x), K)  # row-major: class ids ascending per row
        cv = np.take_along_axis(x, cand, axis=1)
        order = np.lexsort((cand, -cv), axis=1)  # last key primary: value desc, then class id asc
        out["topk_values"] = np.take_along_axis(cv, order, axis=1).astype(np.float16)
        out["topk_indices"] = np.take_along_axis(cand, order, axis=1).astype(ids)
        x64 = x.astype(np.float64)
        m = x64.max(axis=1, keepdims=True)
        out["logsumexp"] = (m[:, 0] + np.log(np.exp(x64 - m).sum(axis=1))).astype(np.float32)
    if store_logits:
        out["logits"] = x.astype(np.float16)
    return out


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    raise TypeError(f"provenance value of type {type(x).__name__} is not JSON-serialisable: {x!r}")


def _canonical(x):
    """JSON round trip: tuples become lists, numpy scalars plain numbers; what the store's attrs hold."""
    return json.loads(json.dumps(x, default=_json_default, allow_nan=True))


def _fmt(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def _first_difference(a, b, prefix: str = ""):
    """(dotted field, a value, b value) of the first difference between two canonical JSON values, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(key, _MISSING), b.get(key, _MISSING), f"{prefix}{key}.")
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return None if all(_first_difference(x, y) is None for x, y in zip(a, b)) else (prefix[:-1], a, b)
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return prefix[:-1], a, b
    if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return None
    return prefix[:-1], a, b


def _lookup(d: dict, dotted: str):
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _blosc(shuffle: str) -> list:
    return [zc.BloscCodec(cname="zstd", clevel=9, shuffle=shuffle)]


def _array_specs(layout: dict) -> dict:
    """name -> create_array kwargs (without the store/name), per the measured codec table above."""
    S, N, K, C, n = (layout[k] for k in ("num_seeds", "N", "topk", "num_classes", "shard_size"))
    ids = np.dtype(layout["index_dtype"])
    id_shuffle = "shuffle" if C <= 256 else "bitshuffle"
    specs = {}
    if K > 0:
        specs["topk_values"] = dict(shape=(S, N, K), dtype="float16", chunks=(1, n, K), fill_value=np.nan,
                                    compressors=_blosc("shuffle"), dimension_names=("seed", "sample", "rank"))
        specs["topk_indices"] = dict(shape=(S, N, K), dtype=ids, chunks=(1, n, K), fill_value=-1,
                                     compressors=_blosc(id_shuffle), dimension_names=("seed", "sample", "rank"))
        specs["logsumexp"] = dict(shape=(S, N), dtype="float32", chunks=(1, n), fill_value=np.nan,
                                  compressors=_blosc("bitshuffle"), dimension_names=("seed", "sample"))
    specs["argmax"] = dict(shape=(S, N), dtype=ids, chunks=(1, n), fill_value=-1,
                           compressors=_blosc(id_shuffle), dimension_names=("seed", "sample"))
    specs["digest"] = dict(shape=(S, N), dtype="uint32", chunks=(1, n), fill_value=0, compressors=None,
                           dimension_names=("seed", "sample"))
    if layout["store_logits"]:
        specs["logits"] = dict(shape=(S, N, C), dtype="float16", chunks=(1, n, C), fill_value=np.nan,
                               compressors=_blosc("shuffle"), dimension_names=("seed", "sample", "class"))
    specs["done"] = dict(shape=(S, len(layout["shard_counts"])), dtype="bool", chunks=(1, 1), fill_value=False,
                         compressors=None, dimension_names=("seed", "shard"))
    return specs


def _check_layout_args(num_seeds, shard_counts, shard_size, num_classes, topk) -> list[int]:
    counts = [int(c) for c in shard_counts]
    if int(num_seeds) < 1:
        raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
    if int(shard_size) < 1 or not counts:
        raise ValueError(f"need shard_size >= 1 and at least one shard, got {shard_size}, {len(counts)} shards")
    if any(c != shard_size for c in counts[:-1]) or not 1 <= counts[-1] <= shard_size:
        raise ValueError(f"shard_counts must be shard_size={shard_size} for every shard but the last, and the "
                         f"last in [1, shard_size]; got {counts[:5]}{'...' if len(counts) > 5 else ''} "
                         f"(last {counts[-1]})")
    if int(num_classes) < 1 or not 0 <= int(topk) <= int(num_classes):
        raise ValueError(f"need num_classes >= 1 and 0 <= topk <= num_classes, got {num_classes}, {topk}")
    return counts


def _check_provenance_consistent(prov: dict, layout: dict) -> None:
    """Provenance keys that restate a layout value must agree with it (a caller bug otherwise)."""
    for field, key in (("num_seeds", "num_seeds"), ("topk", "topk"), ("N", "N"), ("num_classes", "num_classes"),
                       ("teacher.num_classes", "num_classes")):
        v = _lookup(prov, field)
        if v is not _MISSING and v != layout[key]:
            raise ValueError(f"provenance {field}={v} contradicts the store layout {key}={layout[key]}")


# ------------------------------------------------------------------------------------------------- the store

class CacheStore:
    """A teacher-target cache on the local filesystem. Picklable (reopens by path), e.g. for DataLoader workers.

    Writers: create the store once (one rank, or every rank with the same provenance and no ``overwrite``),
    then any process may :meth:`write_unit` any unit that no other process writes at the same time.
    """

    def __init__(self, path, mode: str, attrs: dict, arrays: dict):
        self.path = Path(path)
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

    # ---------------------------------------------------------------- construction

    @classmethod
    def create(cls, path, *, provenance: dict, num_seeds: int, shard_counts: list[int], shard_size: int,
               num_classes: int, topk: int, store_logits: bool = False, overwrite: bool = False,
               ignore_fields: tuple[str, ...] = ()) -> CacheStore:
        """Create a store, or open an existing one with equal layout and provenance (resume).

        An existing store whose layout or provenance differs raises :class:`ProvenanceMismatch` naming the first
        differing field (dotted, e.g. ``augment.rand_magnitude``) and both values; nothing is touched.
        ``ignore_fields`` (dotted provenance names, e.g. ``"versions.timm"``) are left out of that comparison.
        ``overwrite=True`` removes an existing *cache store* (never another directory) and starts anew; do not
        let several ranks do that concurrently. Creation is atomic: the store is built beside ``path`` and
        renamed into place, so concurrent creators of the same store all end up opening one store.
        """
        path = Path(path)
        counts = _check_layout_args(num_seeds, shard_counts, shard_size, num_classes, topk)
        layout = {"num_seeds": int(num_seeds), "shard_size": int(shard_size), "shard_counts": counts,
                  "N": sum(counts), "num_classes": int(num_classes), "topk": int(topk),
                  "store_logits": bool(store_logits), "index_dtype": index_dtype(int(num_classes)).name}
        try:
            prov = _canonical(dict(provenance))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: provenance is not JSON-serialisable: {e}") from None
        _check_provenance_consistent(prov, layout)
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout, "provenance": prov}

        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise CacheError(f"{path}: exists and is not a directory (not a cache store)")
            if any(path.iterdir()):
                if overwrite:
                    cls.open(path, "r")  # raises unless it is a cache store: never rmtree anything else
                    shutil.rmtree(path)
                else:
                    return cls._resume(path, attrs, ignore_fields)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.creating"
            group = zarr.open_group(store=str(tmp), mode="w-", zarr_format=3, attributes=attrs)
            for name, spec in _array_specs(layout).items():
                group.create_array(name=name, config=_ZARR_CONFIG, **spec)
        except OSError as e:
            raise CacheError(f"{path}: cannot create cache store: {e}") from e
        try:
            os.rename(tmp, path)  # atomic; fails if another creator won (path then non-empty)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if path.is_dir() and any(path.iterdir()):
                return cls._resume(path, attrs, ignore_fields)
            raise CacheError(f"{path}: cannot create cache store: {e}") from e
        return cls.open(path, "r+")

    @classmethod
    def _resume(cls, path: Path, attrs: dict, ignore_fields) -> CacheStore:
        store = cls.open(path, "r+")
        have = {"layout": store.layout, "provenance": _without(store.provenance, ignore_fields)}
        want = {"layout": attrs["layout"], "provenance": _without(attrs["provenance"], ignore_fields)}
        for part in ("layout", "provenance"):
            diff = _first_difference(have[part], want[part])
            if diff is not None:
                raise ProvenanceMismatch(path, *diff)
        return store

    @classmethod
    def open(cls, path, mode: str = "r") -> CacheStore:
        """Open an existing store; ``mode`` "r" (read-only) or "r+" (write units)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = Path(path)
        if not path.is_dir():
            raise CacheError(f"{path}: no cache store here (missing or not a directory)")
        if not (path / "zarr.json").is_file():
            raise CacheError(f"{path}: not a cache store (no zarr.json)")
        try:
            group = zarr.open_group(store=str(path), mode=mode, zarr_format=3)
            attrs = dict(group.attrs)
        except Exception as e:  # noqa: BLE001 - zarr raises many kinds for a broken store
            raise CacheError(f"{path}: not a readable Zarr v3 group: {type(e).__name__}: {e}") from e
        if attrs.get("format") != FORMAT or "layout" not in attrs or "provenance" not in attrs:
            raise CacheError(f"{path}: a Zarr group but not a teacher cache store (attribute format="
                             f"{attrs.get('format')!r}, expected {FORMAT!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path}: cache format version {attrs.get('format_version')} is not supported "
                             f"(this code reads version {FORMAT_VERSION})")
        names = list(_array_specs(attrs["layout"]))
        arrays = {}
        for name in names:
            try:
                arrays[name] = group[name].with_config(_ZARR_CONFIG)
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
        """bool [S, num_shards], one batched read of ``done``."""
        return np.asarray(self._arrays["done"][...], dtype=bool)

    def is_done(self, s: int, k: int) -> bool:
        self._check_unit(s, k)
        return bool(self._arrays["done"][s, k])

    def pending_units(self) -> list[tuple[int, int]]:
        """Units (s, k) whose commit marker is false, in (s, k) order (one read of ``done``)."""
        s, k = np.nonzero(~self.done_mask())
        return [(int(a), int(b)) for a, b in zip(s, k)]

    # ---------------------------------------------------------------- write / read

    def targets_from_logits(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """What this store keeps for fp32 logits [B, C] (see :func:`compute_targets`)."""
        return compute_targets(logits, self.topk, store_logits=self.store_logits)

    def write_unit(self, s: int, k: int, logits: np.ndarray, digest: np.ndarray) -> None:
        """Write unit (seed s, shard k): exactly chunk (s, k) of every array, then set ``done[s, k]`` last.

        ``logits``: float32 [count_k, C] in the shard's sample order; ``digest``: uint32 [count_k].
        The marker is cleared first, so a rewrite that dies midway leaves the unit pending, never half-valid.
        """
        if self.mode == "r":
            raise CacheError(f"{self.path}: opened read-only; open with mode='r+' to write units")
        self._check_unit(s, k)
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
        done = self._arrays["done"]
        done[s, k] = False
        for name in self.fields:
            self._arrays[name][s, rows] = out[name]
        done[s, k] = True  # commit marker, last

    def read_unit(self, s: int, k: int, fields=None, *, require_done: bool = True) -> dict[str, np.ndarray]:
        """Rows of shard k under seed s: one batched (one-chunk) read per array.

        ``fields``: names among :attr:`fields` (default: every standard per-view array present, not ``logits``).
        Raises :class:`CacheError` for a unit whose commit marker is false (unless ``require_done=False``).
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
        return {f: self._arrays[f][s, rows] for f in fields}

    # ---------------------------------------------------------------- provenance

    def field_value(self, field: str):
        """A provenance value by dotted name; falls back to the layout (num_classes, topk, N, ...)."""
        v = _lookup(self.provenance, field)
        if v is _MISSING:
            v = _lookup(self.layout, field)
        return v

    def check_compatible(self, expected: dict,
                         fields=("data_fingerprint", "augment_hash", "run_seed", "num_classes")) -> list[str]:
        """Refuse a store built for another configuration; warn about library-version drift.

        ``expected`` maps each of ``fields`` (dotted names allowed) to the reader's value; the first differing
        field raises :class:`ProvenanceMismatch`. Returns warnings for libraries whose version differs between
        the store's ``provenance["versions"]`` and ``expected["versions"]`` (default: the installed versions).
        """
        for field in fields:
            want = _lookup(expected, field)
            if want is _MISSING:
                raise ValueError(f"check_compatible: expected value for '{field}' not given")
            have = self.field_value(field)
            diff = _first_difference(_canonical(have), _canonical(want), field + ".")
            if diff is not None:
                raise ProvenanceMismatch(self.path, *diff)
        stored = self.provenance.get("versions") or {}
        current = expected.get("versions") or library_versions()
        warnings = []
        for lib in _VERSION_LIBS:
            a, b = stored.get(lib, _MISSING), current.get(lib, _MISSING)
            if a != b:
                warnings.append(
                    f"{self.path}: {lib} version differs: cache built with {a}, running {b}; augmentation "
                    f"parameters still agree but pixels (and so teacher outputs) may drift: run "
                    f"`python -m pipeline.verify_cache` to re-check the teacher's agreement on a sample of views")
        return warnings

    # ---------------------------------------------------------------- size

    def nbytes_stored(self, allocated: bool = False) -> int:
        """Bytes of the whole store on disk (file sizes; ``allocated=True``: filesystem blocks)."""
        total = 0
        for d, _, files in os.walk(self.path):
            for f in files:
                st = os.stat(os.path.join(d, f))
                total += st.st_blocks * 512 if allocated else st.st_size
        return total

    def _chunk_file(self, name: str, s: int, k: int) -> Path:
        arr = self._arrays[name]
        coords = (s, k) + (0,) * (arr.ndim - 2)
        return self.path / name / arr.metadata.encode_chunk_key(coords)

    def bytes_per_view(self, allocated: bool = False) -> dict[str, float]:
        """{"total", <array>...}: bytes of the chunk files of done units / views in done units (NaN if none).

        ``done`` is included (its per-unit marker files); zarr.json metadata is not.
        """
        mask = self.done_mask()
        units = list(zip(*np.nonzero(mask)))
        views = sum(self.shard_counts[k] for _, k in units)
        out = {}
        for name in self.fields + ("done",):
            b = 0
            for s, k in units:
                try:
                    st = os.stat(self._chunk_file(name, int(s), int(k)))
                except FileNotFoundError:
                    continue
                b += st.st_blocks * 512 if allocated else st.st_size
            out[name] = b / views if views else math.nan
        out["total"] = sum(out.values()) if views else math.nan
        return {"total": out.pop("total"), **out}

    def summary(self, bytes_table: bool = True) -> str:
        """Human-readable description: layout, progress, provenance essentials, bytes per view."""
        mask = self.done_mask()
        p = self.provenance
        lines = [
            f"cache store {self.path}",
            f"  layout: S={self.num_seeds} seeds x N={self.num_samples} samples ({self.num_shards} shards of "
            f"{self.shard_size}), C={self.num_classes} classes, K={self.topk}"
            f"{' (hard-only)' if self.topk == 0 else ''}{', full logits' if self.store_logits else ''}",
            f"  units done: {int(mask.sum())}/{mask.size}",
            f"  teacher: {_fmt(p.get('teacher', _MISSING))}",
            f"  data_fingerprint={_fmt(p.get('data_fingerprint', _MISSING))} "
            f"augment_hash={_fmt(p.get('augment_hash', _MISSING))} run_seed={_fmt(p.get('run_seed', _MISSING))}",
            f"  versions: {_fmt(p.get('versions', _MISSING))}",
        ]
        if bytes_table and mask.any():
            bpv = self.bytes_per_view()
            lines.append("  bytes/view: " + ", ".join(f"{k}={v:.2f}" for k, v in bpv.items()))
        lines.append(f"  on disk: {self.nbytes_stored()} bytes")
        return "\n".join(lines)


def _without(d: dict, dotted_fields) -> dict:
    """Copy of a nested dict without the given dotted keys."""
    d = json.loads(json.dumps(d))
    for field in dotted_fields:
        parts = field.split(".")
        cur = d
        for part in parts[:-1]:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if isinstance(cur, dict):
            cur.pop(parts[-1], None)
    return d
