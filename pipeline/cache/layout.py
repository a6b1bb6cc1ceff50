"""The cache layout: arrays, dtypes, chunks, files and codecs of a teacher-target store (docs/design.md, section 6).

Layout (S seeds, N samples, K top-k, C classes, n rows per shard: the largest shard's sample count; R rows)::

    topk_values   float16  [S, R, K]  teacher logits of the K largest classes, descending      (K > 0 only)
    topk_indices  int16    [S, R, K]  their class ids (int32 when C > 32767)                    (K > 0 only)
    logsumexp     float32  [S, R]     log softmax normaliser over all C classes (fp64 reduction) (K > 0 only)
    argmax        int16    [S, R]     teacher hard label, from the fp32 logits (int32 when C > 32767)
    digest        uint32   [S, R]     view digest (docs/design.md, section 4)
    done          bool     [S, num_shards], chunks (S, 1): commit marker of unit (s, k), written last
    checksums     uint32   [S, num_shards, F + 1], chunks (S, 1, F + 1): crc32c of unit (s, k)'s rows of each of
                           the F per-view arrays (order: attribute ``checksum_fields`` of the array), then the
                           unit's tag (column ``unit``): crc32c of (store key, s, k), binding the record to its
                           place and its store; written before done
    logits        float16  [S, R, C]  optional full logits (small class counts)

Rows: shard k's samples, in shard order, are rows ``k * n`` to ``k * n + count_k - 1``, and R = (num_shards - 1) *
n + count_last. Where every shard but the last holds n samples (make_shards' sets), row = global sample index and
R = N. Published sets may have shards of unequal size (timm's imagenet-1k-wds: 1,281,167 training images in 1024
shards): then the rows between a shard's last sample and the next shard's first are padding, never written or
read (fill values), so that every unit still owns exactly one chunk.

Chunks and files (format version 4): every per-view array is chunked ``(1, n, ...)``, so chunk ``(s, k)`` of
every array belongs to exactly one work unit (seed s, shard k); Zarr v3's sharding codec packs the chunks of
``seeds_per_file`` (8, at most S) consecutive seed indices of one shard into one file (object). ``done`` and
``checksums`` are chunked by shard, ``(S, 1)``: one small chunk (file) holds the markers, one the records, of all S
seed indices of a shard (a sharded marker array would cost a codec call per unit: minutes to scan 384,600). So
every file belongs to one shard k (one column of units), and one writer owns each column (stage one deals
shards, not units, to its ranks: :func:`column_owner`): writers of different columns never touch the same file.
Writing a unit's chunk (or marker, or record) rewrites its whole file (read, replace, write: atomic on a local
disk and on S3), so a killed writer leaves each file as before or after its last write, never torn; a file that
is damaged anyway costs every unit it holds (they are recomputed). Files per unit: (per-view arrays) /
seeds_per_file + 2 / S (soft K > 0 at S = 300: 0.63; hard-only: 0.26), instead of one file per array per unit
(7 and 4) in version 3; ``pending_units`` reads one ``done`` file per shard.

Format version 4 (pipeline.cache.contract.FORMAT_VERSION): the files above; ``checksums``, Zarr's crc32c codec on
every chunk but the digest's (random bits, checked view by view against the replay; the sharding codec's index
carries its own crc32c), a store id (attribute ``store_id`` of ``done``, a uuid drawn at creation) and each
record's unit tag. The store key is the sha256 of the store's layout and provenance
(:func:`pipeline.cache.provenance.store_key`): a unit copied over another, or in from a store built by another
teacher, carries a tag that is not its own. Older versions (1: no checksums, 2: untagged records, 3: one file per
array per unit) are refused by name; ``overwrite=true`` rebuilds them.

``K = 0`` ("hard-only") stores only argmax + digest (+ done). Fill values are sentinels (NaN for floats, -1 for
class ids, 0 for digests) and ``write_empty_chunks`` is on, so an unfinished unit reads as obviously invalid and
a finished one always has its chunk; ``done`` is the truth, and :meth:`CacheStore.read_unit` refuses units whose
marker is false.

Codecs, per array (bytes on disk per view measured by ``python -m bench.bench_storage``, docs/results.md):
Blosc-zstd clevel 9 with byte-shuffle for top-K values, bitshuffle for logsumexp, byte-shuffle (C <= 256) or
bitshuffle for class ids; none for digests (random bits) and markers. The sharding index adds 16 bytes per chunk;
a local filesystem allocates whole blocks per file, which packing seeds_per_file units per file amortises (see
``CacheStore.bytes_per_view(allocated=True)``).
"""


from __future__ import annotations

import google_crc32c
import numpy as np
import zarr.codecs as zc

PER_VIEW = ("topk_values", "topk_indices", "logsumexp", "argmax", "digest")  # standard fields, read order
ALL_ARRAYS = PER_VIEW + ("logits", "done", "checksums")
UNIT_TAG = "unit"  # the last column of a checksums record
ZARR_CONFIG = {"write_empty_chunks": True}
SEEDS_PER_FILE = 8  # seed indices of one shard per file of a per-view array


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


def _blosc(shuffle: str) -> list:
    return [zc.BloscCodec(cname="zstd", clevel=9, shuffle=shuffle), _crc()]


def _crc():
    """Zarr's crc32c codec: a chunk whose bytes changed on disk fails to decode."""
    return zc.Crc32cCodec()


def checksum_fields(layout: dict) -> tuple[str, ...]:
    """The per-view arrays a unit's ``checksums`` row covers, in order."""
    return tuple(n for n in PER_VIEW if layout["topk"] > 0 or n in ("argmax", "digest")) + \
        (("logits",) if layout["store_logits"] else ())


def record_fields(layout: dict) -> tuple[str, ...]:
    """Columns of a unit's ``checksums`` record: the per-view arrays' crc32c, then the unit tag."""
    return checksum_fields(layout) + (UNIT_TAG,)


def unit_tag(key: str, s: int, k: int) -> int:
    """The tag a commit of unit (s, k) records: crc32c of the store key, the seed index and the shard index."""
    return int(google_crc32c.value(f"{key}/seed {int(s)}/shard {int(k)}".encode()))


def crc32c(rows: np.ndarray) -> int:
    """crc32c of a unit's rows of one array: its C-order little-endian bytes in the store's dtype."""
    a = np.ascontiguousarray(rows)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return int(google_crc32c.value(a.tobytes()))


def seeds_per_file(num_seeds: int) -> int:
    return min(SEEDS_PER_FILE, int(num_seeds))


def column_owner(k: int, world_size: int) -> int:
    """The rank that writes every unit of shard ``k`` (every file of a shard belongs to one writer)."""
    return int(k) % int(world_size)


def file_coords(name: str, layout: dict, s: int, k: int) -> tuple[int, ...]:
    """Coordinates, in the grid of files (Zarr shards), of the file of array ``name`` holding unit (s, k)."""
    column = name in ("done", "checksums")
    coords = (0 if column else int(s) // seeds_per_file(layout["num_seeds"]), int(k))
    return coords + (0,) * (3 - len(coords) if name in ("topk_values", "topk_indices", "logits", "checksums") else 0)


def num_rows(layout: dict) -> int:
    """R: the per-view arrays' length along samples (shard k starts at row k * shard_size)."""
    counts = layout["shard_counts"]
    return (len(counts) - 1) * int(layout["shard_size"]) + int(counts[-1])


def array_specs(layout: dict) -> dict:
    """name -> create_array kwargs (without the store/name), per the measured codec table above; ``shards``: the
    file shape (Zarr's sharding codec) over chunks ``chunks``."""
    S, K, C, n = (layout[k] for k in ("num_seeds", "topk", "num_classes", "shard_size"))
    N = num_rows(layout)
    G = seeds_per_file(S)
    ids = np.dtype(layout["index_dtype"])
    id_shuffle = "shuffle" if C <= 256 else "bitshuffle"
    specs = {}
    if K > 0:
        specs["topk_values"] = dict(shape=(S, N, K), dtype="float16", chunks=(1, n, K), shards=(G, n, K),
                                    fill_value=np.nan, compressors=_blosc("shuffle"),
                                    dimension_names=("seed", "sample", "rank"))
        specs["topk_indices"] = dict(shape=(S, N, K), dtype=ids, chunks=(1, n, K), shards=(G, n, K),
                                     fill_value=-1, compressors=_blosc(id_shuffle),
                                     dimension_names=("seed", "sample", "rank"))
        specs["logsumexp"] = dict(shape=(S, N), dtype="float32", chunks=(1, n), shards=(G, n), fill_value=np.nan,
                                  compressors=_blosc("bitshuffle"), dimension_names=("seed", "sample"))
    specs["argmax"] = dict(shape=(S, N), dtype=ids, chunks=(1, n), shards=(G, n), fill_value=-1,
                           compressors=_blosc(id_shuffle), dimension_names=("seed", "sample"))
    specs["digest"] = dict(shape=(S, N), dtype="uint32", chunks=(1, n), shards=(G, n), fill_value=0,
                           compressors=None, dimension_names=("seed", "sample"))
    if layout["store_logits"]:
        specs["logits"] = dict(shape=(S, N, C), dtype="float16", chunks=(1, n, C), shards=(G, n, C),
                               fill_value=np.nan, compressors=_blosc("shuffle"),
                               dimension_names=("seed", "sample", "class"))
    specs["done"] = dict(shape=(S, len(layout["shard_counts"])), dtype="bool", chunks=(S, 1), fill_value=False,
                         compressors=[_crc()], dimension_names=("seed", "shard"))
    cols = record_fields(layout)
    specs["checksums"] = dict(shape=(S, len(layout["shard_counts"]), len(cols)), dtype="uint32",
                              chunks=(S, 1, len(cols)), fill_value=0, compressors=[_crc()],
                              dimension_names=("seed", "shard", "field"),
                              attributes={"checksum": "crc32c", "checksum_fields": list(cols)})
    return specs


def check_layout_args(num_seeds, shard_counts, shard_size, num_classes, topk) -> list[int]:
    counts = [int(c) for c in shard_counts]
    if int(num_seeds) < 1:
        raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
    if int(shard_size) < 1 or not counts:
        raise ValueError(f"need shard_size >= 1 and at least one shard, got {shard_size}, {len(counts)} shards")
    if not all(1 <= c <= shard_size for c in counts):
        bad = next(k for k, c in enumerate(counts) if not 1 <= c <= shard_size)
        raise ValueError(f"shard_counts must each be in [1, shard_size={shard_size}]; shard {bad} has {counts[bad]}")
    if int(num_classes) < 1 or not 0 <= int(topk) <= int(num_classes):
        raise ValueError(f"need num_classes >= 1 and 0 <= topk <= num_classes, got {num_classes}, {topk}")
    return counts

