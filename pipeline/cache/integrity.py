"""Integrity of a cache store without the teacher (docs/design.md, section 6), and the repair stage one runs.

A committed unit (s, k) must have: every chunk file present and decodable (crc32c codec); a checksum record tagged
with this unit of this store (pipeline.cache.layout.unit_tag: a unit copied over another, or in from a store of
another teacher, is not); rows equal to the checksums its commit recorded; the layout's shapes and dtypes; and
these invariants of the teacher targets:

- ``argmax`` and ``topk_indices`` are class ids in [0, C); a row's top-K ids are distinct;
- ``argmax == topk_indices[:, 0]`` (one stable sort decides both, pipeline.cache.targets);
- ``topk_values`` are finite and descending;
- ``logsumexp`` is finite and ``>=`` the top value, and the top-K softmax mass ``sum exp(v - lse) <= 1``, both up to
  the fp16 rounding of the stored values (half an ulp: ``|v| * 2**-11``).

:func:`check_store` reports every damaged unit and every unit not committed (``python -m pipeline.verify_cache``:
"ok" means complete and intact); :func:`repair` clears the commit marker of each damaged unit, naming it in the
log, so stage one recomputes it. A resume checks the metadata of every done unit (its record, tag and files:
one batched read and one listing) and the bytes of a sample (``cache.resume_check=full``: of every unit), so that
it costs seconds, not hours, at ImageNet scale (docs/scale.md); damage inside an unsampled unit's bytes is left to
the reader, which verifies every unit it reads against its record, and to verify_cache.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline import storage
from pipeline.cache.layout import UNIT_TAG, array_specs, crc32c, file_coords, seeds_per_file, unit_tag
from pipeline.errors import CacheError
from pipeline.logs import progress

log = logging.getLogger("pipeline")
REPAIR = ("re-run stage one with every unit re-checked (python -m pipeline.teacher_cache cache.resume_check=full) "
          "to repair it")
FP16_ULP = 2.0 ** -11  # half an ulp of float16, relative
RESUME_SAMPLE = 64  # committed units whose bytes a resume re-checks (cache.resume_check=sample); all when fewer


def damaged(store, s: int, k: int, field: str, what: str) -> CacheError:
    return CacheError(f"{store.path}: unit (seed {s}, shard {k}): field '{field}' {what}: the store is damaged; "
                      f"{REPAIR}")


def why(e: Exception) -> str:
    """A chunk read failure in words: the crc32c codec's mismatch, or the exception."""
    if isinstance(e, ValueError) and "checksum" in str(e):
        return "fails its crc32c (the chunk file's bytes changed on disk)"
    return f"does not decode ({type(e).__name__}: {e})"


def stored_checksums(store, s: int, k: int) -> dict[str, int]:
    """{field: crc32c} recorded by the commit of unit (s, k); CacheError unless the record decodes and is tagged
    as this unit's of this store."""
    record, problem = _record(store, s, k)
    if problem:
        raise CacheError(f"{store.path}: unit (seed {s}, shard {k}): field 'checksums': {problem}: the store is "
                         f"damaged; {REPAIR}")
    return record


def _record(store, s: int, k: int) -> tuple[dict[str, int], str | None]:
    """(the record's {field: crc32c}, what is wrong with it or None)."""
    try:
        row = store._arrays["checksums"][s, k]
    except Exception as e:  # noqa: BLE001 - crc32c mismatch (ValueError) or an undecodable chunk
        return {}, f"chunk {why(e)}"
    if not np.any(row):  # the fill value: no record was written into this unit's chunk (or it was removed)
        return {}, "no checksum record (never written, or its chunk is missing)"
    record = {f: int(v) for f, v in zip(store.checksum_fields + (UNIT_TAG,), row)}
    return record, tag_problem(store, s, k, record.pop(UNIT_TAG))


def tag_problem(store, s: int, k: int, tag: int) -> str | None:
    """What is wrong with the unit tag a record of unit (s, k) carries, or None when it is this unit's."""
    if tag == unit_tag(store.key, s, k):
        return None
    if getattr(store, "_unit_tags", None) is None:  # built once per store, on the first wrong tag
        store._unit_tags = {unit_tag(store.key, a, b): (a, b)
                            for a in range(store.num_seeds) for b in range(store.num_shards)}
    if tag in store._unit_tags:  # a unit of this store copied over another: name it
        s2, k2 = store._unit_tags[tag]
        return (f"the record belongs to unit (seed {s2}, shard {k2}): that unit was copied over this one (its "
                f"targets are another seed index's or shard's)")
    return (f"the record is tagged for another store (tag {tag:#010x}, this unit's is "
            f"{unit_tag(store.key, s, k):#010x}): the unit was copied in from a store of another teacher, data, "
            f"augmentation or layout")


def verify_rows(store, s: int, k: int, rows: dict[str, np.ndarray]) -> None:
    """CacheError naming store, seed index, shard and field unless the unit's checksum record is its own and
    ``rows`` match it."""
    stored = stored_checksums(store, s, k)
    for f, a in rows.items():
        got = crc32c(a)
        if f in stored and got != stored[f]:
            raise damaged(store, s, k, f, f"does not match its checksum (stored crc32c {stored[f]:#010x}, data "
                                          f"{got:#010x})")


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(np.asarray(bad).reshape(len(bad), -1).any(axis=1))[0])


def invariants(rows: dict[str, np.ndarray], num_classes: int) -> list[str]:
    """Problems of one unit's rows (see the module docstring); empty when they hold."""
    out = []
    am, idx = rows.get("argmax"), rows.get("topk_indices")
    checks = []  # (mask of bad rows, what is wrong), each mask computed once
    for name, ids in (("argmax", am), ("topk_indices", idx)):
        if ids is not None:
            checks.append(((ids < 0) | (ids >= num_classes), f"{name}: class id out of range [0, {num_classes})"))
    if idx is not None and idx.shape[1] > 1:
        checks.append((np.diff(np.sort(idx, axis=1), axis=1) == 0, "topk_indices: repeated class id"))
    if idx is not None and am is not None:
        checks.append((idx[:, 0] != am, "argmax != top-1 index"))
    v = rows.get("topk_values")
    if v is not None:
        v = v.astype(np.float64)
        finite = np.isfinite(v)
        checks.append((~finite, "topk_values: non-finite") if not finite.all()
                      else (np.diff(v, axis=1) > 0, "topk_values: not descending"))
    out += [f"{what} at row {_first(mask)}" for mask, what in checks if mask.any()]
    lse = rows.get("logsumexp")
    if lse is not None:
        lse = lse.astype(np.float64)
        if not np.isfinite(lse).all():
            out.append(f"logsumexp: non-finite at row {_first(~np.isfinite(lse))}")
        elif v is not None and np.isfinite(v).all() and v.shape[1]:
            # fp16 rounding of the values (margin 2) and fp32 rounding of logsumexp
            slack = 2 * FP16_ULP * np.abs(v).max(axis=1) + 1e-6 * (1 + np.abs(lse))
            low = v[:, 0] > lse + slack
            if low.any():
                i = _first(low)
                out.append(f"logsumexp {lse[i]:.6g} below the top value {v[i, 0]:.6g} at row {i}")
            mass = np.exp(v - lse[:, None]).sum(axis=1)
            over = mass > np.exp(slack) + 1e-5
            if over.any():
                i = _first(over)
                out.append(f"top-K softmax mass {mass[i]:.6g} > 1 at row {i}")
    return out


def array_problems(store) -> list[str]:
    """Array metadata against the layout: shape, dtype and chunks of every array."""
    out = []
    for name, spec in array_specs(store.layout).items():
        arr = store._arrays[name]
        for what, have, want in (("shape", tuple(arr.shape), tuple(spec["shape"])),
                                 ("dtype", np.dtype(arr.dtype), np.dtype(spec["dtype"])),
                                 ("chunks", tuple(arr.chunks), tuple(spec["chunks"])),
                                 ("files", tuple(arr.shards or ()), tuple(spec.get("shards") or ()))):
            if have != want:
                out.append(f"array '{name}': {what} {have}, the layout needs {want}")
    return out


def _absent(a: np.ndarray, fill) -> bool:
    """Rows that are all the array's fill value: the chunk was never written into its file (or was removed)."""
    return bool(a.size) and bool(np.all(np.isnan(a)) if np.isnan(fill) else np.all(a == fill))


def unit_problems(store, s: int, k: int) -> list[str]:
    """Everything wrong with committed unit (s, k): missing or undecodable chunks, checksums, shapes, invariants."""
    rows, problems, data = store.unit_rows(k), [], {}
    count = rows.stop - rows.start
    for f in store.fields + ("checksums",):
        if not store.unit_file(f, s, k).is_file():
            problems.append(f"field '{f}': chunk file missing")
        elif f != "checksums":
            try:
                a = store._arrays[f][s, rows]
            except Exception as e:  # noqa: BLE001 - crc32c mismatch (ValueError) or an undecodable chunk
                problems.append(f"field '{f}': chunk {why(e)}")
                continue
            if f != "digest" and _absent(a, float(store._arrays[f].fill_value)):  # 0 is a digest like any other
                problems.append(f"field '{f}': chunk missing")
            else:
                data[f] = a
    stored, problem = _record(store, s, k) if store.unit_file("checksums", s, k).is_file() else ({}, None)
    if problem:
        problems.append(f"field 'checksums': {problem}")
        stored = {}
    for f, a in data.items():
        width = {"topk_values": store.topk, "topk_indices": store.topk, "logits": store.num_classes}.get(f)
        shape = (count,) if width is None else (count, width)
        if a.shape != shape or a.dtype != store._arrays[f].dtype:
            problems.append(f"field '{f}': rows of shape {a.shape} {a.dtype}, expected {shape} {store._arrays[f].dtype}")
        elif f in stored and crc32c(a) != stored[f]:
            problems.append(f"field '{f}': checksum mismatch (stored crc32c {stored[f]:#010x}, data {crc32c(a):#010x})")
    return problems + invariants(data, store.num_classes)


def check_store(store, *, bar: bool = False, sample: int | None = None) -> dict:
    """Committed units checked (no teacher): {"store", "format_version", "checksums", "units_total",
    "units_done", "units_checked", "check", "array_problems", "damaged": [{"seed", "shard", "problems"}],
    "complete", "incomplete": [{"seed", "shard"}] (units not committed), "seeds_missing" (seed indices without any
    committed unit), "ok"}. "ok": complete, and every checked unit and every array intact.

    ``sample=None`` ("check": "full"): every committed unit's bytes. An int ("check": "sample"): the metadata of
    every committed unit (:func:`metadata_suspects`) and the bytes of the suspects plus ``sample`` others drawn
    at random: "ok" then speaks only of those ("units_checked")."""
    problems = array_problems(store)
    done = store.done_mask()
    units = [(int(s), int(k)) for s, k in zip(*np.nonzero(done))]
    if sample is not None:
        suspects = metadata_suspects(store, done)
        rest = [u for u in units if u not in suspects]
        pick = np.random.default_rng().permutation(len(rest))[:sample]
        units = sorted(suspects | {rest[i] for i in pick})
    damaged_units = []
    with progress(len(units), unit="unit", desc="check cache units", disable=not bar) as p:
        for s, k in units:
            found = unit_problems(store, s, k)
            if found:
                damaged_units.append({"seed": s, "shard": k, "problems": found})
            p.update(1)
    return {"store": str(store.path), "format_version": store.format_version,
            "checksums": bool(store.checksum_fields), "units_total": int(done.size), "units_done": int(done.sum()),
            "units_checked": len(units), "check": "full" if sample is None else "sample",
            "array_problems": problems, "damaged": damaged_units, "complete": bool(done.all()),
            "incomplete": [{"seed": int(s), "shard": int(k)} for s, k in zip(*np.nonzero(~done))],
            "seeds_missing": [int(s) for s in np.flatnonzero(~done.any(axis=1))],
            "ok": not problems and not damaged_units and bool(done.all())}


def metadata_suspects(store, done: np.ndarray) -> set[tuple[int, int]]:
    """Committed units whose metadata is wrong: no checksum record, a record tagged for another unit or another
    store (a unit copied over this one), or a file of theirs missing. Reads the records in one batch and lists the
    store once (no chunk of targets is read): milliseconds per thousand units."""
    seeds, shards = np.nonzero(done)
    try:
        records = np.asarray(store._arrays["checksums"][...])[seeds, shards]
    except Exception:  # noqa: BLE001 - a damaged record file: its units are suspects, found one by one
        out = {(int(s), int(k)) for s, k in zip(seeds, shards) if _record(store, int(s), int(k))[1] is not None}
    else:
        tags = np.fromiter((unit_tag(store.key, s, k) for s, k in zip(seeds.tolist(), shards.tolist())),
                           np.uint32, len(seeds))
        bad = ~records.any(axis=1) | (records[:, -1] != tags)
        out = {(int(s), int(k)) for s, k in zip(seeds[bad], shards[bad])}
    return out | _missing_files(store, done)


def _missing_files(store, done: np.ndarray) -> set[tuple[int, int]]:
    """Committed units one of whose files (a per-view array's, or the checksum records') is not in the store."""
    present = storage.relative_files(store.path)
    g = seeds_per_file(store.num_seeds)
    out = set()
    for name in store.fields + ("checksums",):
        height = store.num_seeds if name == "checksums" else g  # a file holds these seed indices of a shard
        for start in range(0, store.num_seeds, height):
            block = done[start:start + height]
            for k in np.flatnonzero(block.any(axis=0)):
                key = store._arrays[name].metadata.encode_chunk_key(file_coords(name, store.layout, start, int(k)))
                if f"{name}/{key}" not in present:
                    out |= {(start + int(i), int(k)) for i in np.flatnonzero(block[:, k])}
    return out


def repair(store, *, full: bool = False) -> list[tuple[int, int]]:
    """Stage one's resume: clear the commit marker of every damaged committed unit found, each named in the log,
    so it is recomputed with the pending ones (also listed); returns the damaged units. ``full``: every committed
    unit's bytes are checked (cache.resume_check=full); else the metadata of all and the bytes of a sample
    (:data:`RESUME_SAMPLE`, and every unit whose metadata is wrong)."""
    report = check_store(store, sample=None if full else RESUME_SAMPLE)
    if report["array_problems"]:
        raise CacheError(f"{store.path}: {report['array_problems'][0]}: the store itself is damaged (not one unit): "
                         f"rebuild it with overwrite=true")
    if report["units_done"]:
        what = ("the bytes of each" if full else
                f"the checksum records and files of each, the bytes of {report['units_checked']}")
        log.info(f"{store.path}: {report['units_done']} committed unit(s) checked: {what}")
    units = []
    for d in report["damaged"]:
        s, k = d["seed"], d["shard"]
        log.warning(f"{store.path}: unit (seed {s}, shard {k}) is damaged ({'; '.join(d['problems'])}): "
                    f"recomputing it")
        store.set_done(s, k, False)
        units.append((s, k))
    pending = store.pending_units()
    if pending:
        shown = ", ".join(f"(seed {s}, shard {k})" for s, k in pending[:12]) + (", ..." if len(pending) > 12 else "")
        log.info(f"{store.path}: {len(pending)} unit(s) to compute ({len(units)} repaired): {shown}")
    return units
